//! Compact vectors over Flight: each precision (and fewer dimensions) through DoExchange
//! and DoPut/DoGet with its documented Arrow types, measured against the f32 vectors of
//! the same texts; a stored compact dataset's FlightInfo and search.

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, Int8Type};
use arrow_flight::{FlightDescriptor, Ticket};
use arrow_schema::DataType;
use futures::TryStreamExt;
use keel_wire::vectors::VectorFormat;
use tonic::Code;

use crate::common::*;

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "GENE{} chr{}:{} C>T {} variant",
                i % 13,
                1 + i % 22,
                10_000 + 37 * i,
                ["missense", "synonymous", "frameshift", "stop_gained"][i % 4]
            )
        })
        .collect()
}

fn batches(texts: &[String]) -> Vec<RecordBatch> {
    texts
        .chunks(25)
        .map(|c| text_batch(&c.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()))
        .collect()
}

fn command(json: &str) -> FlightDescriptor {
    FlightDescriptor::new_path(vec!["embed".into(), json.into()])
}

/// Every row's vector as f32, decoded by the batch's own format.
fn decoded(batches: &[RecordBatch]) -> Vec<Vec<f32>> {
    let format = VectorFormat::of_schema(&batches[0].schema()).unwrap();
    batches
        .iter()
        .flat_map(|b| format.decode(b).unwrap())
        .map(|v| v.unwrap())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_precision_comes_back_in_its_documented_type_and_close_to_f32() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let rows = texts(60);
    let full = exchange(&mut client, embed_path(), batches(&rows))
        .await
        .unwrap();
    let full = decoded(&full);

    // (command, embedding type, scale column, worst cosine to f32 allowed)
    let cases: [(&str, DataType, bool, f32); 5] = [
        (
            r#"{"precision":"f32"}"#,
            DataType::Float32,
            false,
            0.999_999,
        ),
        (r#"{"precision":"f16"}"#, DataType::Float16, false, 0.999_99),
        (r#"{"precision":"int8"}"#, DataType::Int8, true, 0.999),
        (
            r#"{"precision":"binary"}"#,
            DataType::FixedSizeBinary(48),
            false,
            0.75,
        ),
        (
            r#"{"precision":"int8","dimensions":128}"#,
            DataType::Int8,
            true,
            0.0,
        ),
    ];
    for (cmd, item, scale, bound) in cases {
        let out = exchange(&mut client, command(cmd), batches(&rows))
            .await
            .unwrap();
        assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 60, "{cmd}");
        let schema = out[0].schema();
        let field = schema.field_with_name("embedding").unwrap();
        match (field.data_type(), &item) {
            (DataType::FixedSizeList(inner, d), _) => {
                assert_eq!(inner.data_type(), &item, "{cmd}");
                let want = if cmd.contains("128") { 128 } else { 384 };
                assert_eq!(*d, want, "{cmd}");
            }
            (t, DataType::FixedSizeBinary(_)) => assert_eq!(t, &item, "{cmd}"),
            (t, _) => panic!("{cmd}: embedding is {t}"),
        }
        assert_eq!(schema.column_with_name("embedding_scale").is_some(), scale);
        let meta = field.metadata();
        assert!(meta.contains_key("keel.precision") && meta.contains_key("keel.dimensions"));
        let got = decoded(&out);
        if cmd.contains("128") {
            // Fewer dimensions: the first 128 values, at unit length.
            for (g, f) in got.iter().zip(&full) {
                let cut = &f[..128];
                assert!(cosine(g, cut) >= 0.999, "{cmd}");
                let n: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((n - 1.0).abs() < 0.01, "{cmd}: norm {n}");
            }
            continue;
        }
        let worst = got
            .iter()
            .zip(&full)
            .map(|(g, f)| cosine(g, f))
            .fold(1.0f32, f32::min);
        assert!(worst >= bound, "{cmd}: worst cosine to f32 {worst}");
    }

    // Values a client reads directly: f16 and int8 × scale are the f32 values.
    let out = exchange(
        &mut client,
        command(r#"{"precision":"int8"}"#),
        batches(&rows[..1]),
    )
    .await
    .unwrap();
    let list = out[0]
        .column_by_name("embedding")
        .unwrap()
        .as_fixed_size_list();
    let q = list.value(0);
    let scale = out[0]
        .column_by_name("embedding_scale")
        .unwrap()
        .as_primitive::<Float32Type>()
        .value(0);
    let manual: Vec<f32> = q
        .as_primitive::<Int8Type>()
        .values()
        .iter()
        .map(|&v| v as f32 * scale)
        .collect();
    assert!(cosine(&manual, &full[0]) >= 0.999);
    let out = exchange(
        &mut client,
        command(r#"{"precision":"f16"}"#),
        batches(&rows[..1]),
    )
    .await
    .unwrap();
    let list = out[0]
        .column_by_name("embedding")
        .unwrap()
        .as_fixed_size_list();
    let h = list.value(0);
    let widened: Vec<f32> = h
        .as_primitive::<Float16Type>()
        .values()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert!(cosine(&widened, &full[0]) >= 0.99999);

    // Bad requests are InvalidArgument, naming what is allowed.
    for (cmd, says) in [
        (r#"{"dimensions":0}"#, "1..=384"),
        (r#"{"dimensions":500}"#, "1..=384"),
        (r#"{"precision":"int4"}"#, "binary"),
    ] {
        let e = exchange(&mut client, command(cmd), batches(&rows[..2]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{cmd}");
        assert!(e.message().contains(says), "{cmd}: {}", e.message());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compact_dataset_is_stored_read_back_described_and_searched() {
    let server = TestServer::start(|s| s.storage.flush_rows = 40).await;
    let mut client = server.client().await;
    let rows = texts(100);
    let put = |name: &str, cmd: &str| {
        let descriptor =
            FlightDescriptor::new_path(vec!["datasets".into(), name.into(), cmd.into()]);
        arrow_flight::encode::FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(descriptor))
            .build(futures::stream::iter(batches(&rows).into_iter().map(Ok)))
    };
    for (name, cmd, bytes) in [
        ("int8", r#"{"precision":"int8"}"#, 388),
        ("binary", r#"{"precision":"binary"}"#, 48),
        ("f16-128", r#"{"precision":"f16","dimensions":128}"#, 256),
    ] {
        let acks: Vec<_> = client
            .do_put(put(name, cmd))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let last: serde_json::Value =
            serde_json::from_slice(&acks.last().unwrap().app_metadata).unwrap();
        assert_eq!(last["acknowledged_rows"], 100, "{name}");

        let info = client
            .get_flight_info(FlightDescriptor::new_path(vec![
                "datasets".into(),
                name.into(),
            ]))
            .await
            .unwrap();
        let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
        assert_eq!(meta["vector_bytes_per_row"], bytes, "{name}: {meta}");

        let back: Vec<RecordBatch> = client
            .do_get(Ticket::new(name))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(texts_of(&back), rows, "{name}");
        let format = VectorFormat::of_schema(&back[0].schema()).unwrap();
        assert_eq!(format.bytes_per_row(), bytes, "{name}");

        // Search runs on the stored format: a row's own text finds it first.
        for i in [3usize, 71] {
            let body = serde_json::json!({"dataset": name, "text": rows[i], "k": 3}).to_string();
            let found = action(&mut client, "search", &body).await;
            assert_eq!(
                found["results"][0]["text"],
                rows[i].as_str(),
                "{name}: {found}"
            );
        }
    }
    // One dataset, one format: a put in another precision is refused, the data kept.
    let e = client
        .do_put(put("int8", r#"{"precision":"f32"}"#))
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .map_err(to_status)
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "datasets".into(),
            "int8".into(),
        ]))
        .await
        .unwrap();
    assert_eq!(info.total_records, 100);
    server.stop().await;
}

/// `cache.precision: int8`: a repeated stream is served from the cache, dequantized
/// within cosine 0.999 of the vectors the model gave; the budget is never exceeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_cache_serves_hits_close_to_the_models_vectors() {
    let server = TestServer::start(|s| {
        s.cache.precision = keel_wire::vectors::VectorPrecision::Int8;
    })
    .await;
    let mut client = server.client().await;
    let rows = texts(80);
    let first = decoded(
        &exchange(&mut client, embed_path(), batches(&rows))
            .await
            .unwrap(),
    );
    let again = decoded(
        &exchange(&mut client, embed_path(), batches(&rows))
            .await
            .unwrap(),
    );
    let s = action(&mut client, "stats", "").await;
    assert_eq!(s["embedded_rows"], 80, "{s}");
    assert_eq!(s["cache"]["hits"], 80, "the second pass hit: {s}");
    assert!(s["cache"]["bytes"].as_u64() <= s["cache"]["max_bytes"].as_u64());
    let worst = first
        .iter()
        .zip(&again)
        .map(|(a, b)| cosine(a, b))
        .fold(1.0f32, f32::min);
    assert!(worst >= 0.999, "worst cosine {worst}");
    assert!(worst < 1.0, "the hits came from int8 entries, not f32");
    server.stop().await;
}
