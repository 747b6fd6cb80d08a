//! Compact vectors over Flight: each precision (and fewer dimensions) through DoExchange
//! and DoPut/DoGet with its documented Arrow types, measured against the f32 vectors of
//! the same texts; a stored compact dataset's FlightInfo and search.

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, Int8Type};
use arrow_flight::FlightClient;
use arrow_flight::{FlightDescriptor, Ticket};
use arrow_schema::DataType;
use futures::{StreamExt, TryStreamExt};
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

/// Sends an action expected to fail; its status.
async fn refused(client: &mut FlightClient, kind: &str, body: &str) -> tonic::Status {
    match client
        .do_action(arrow_flight::Action::new(kind, body.as_bytes().to_vec()))
        .await
    {
        Err(e) => to_status(e),
        Ok(mut results) => match results.next().await {
            Some(Err(e)) => to_status(e),
            other => panic!("{kind} {body} was answered: {other:?}"),
        },
    }
}

/// A dataset's index (the `index` action) and a PCA projection (`reduce`): searches go
/// through the index and find what the exact scan finds; rows put afterwards are found at
/// once (scanned) and then indexed; FlightInfo and stats describe it; bad requests say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexed_dataset_is_searched_through_its_index_and_grows_with_puts() {
    let server = TestServer::start(|s| s.storage.flush_rows = 100).await;
    let mut client = server.client().await;
    let all = texts(400);
    let put = |rows: &[String]| {
        let descriptor = FlightDescriptor::new_path(vec!["datasets".into(), "v".into()]);
        arrow_flight::encode::FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(descriptor))
            .build(futures::stream::iter(batches(rows).into_iter().map(Ok)))
    };
    let stored: Vec<_> = client
        .do_put(put(&all[..300]))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(!stored.is_empty());

    let e = refused(
        &mut client,
        "search",
        r#"{"dataset":"v","text":"x","mode":"index"}"#,
    )
    .await;
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("keel index"), "{}", e.message());

    let reduced = action(&mut client, "reduce", r#"{"dataset":"v","dimensions":32}"#).await;
    assert_eq!(reduced["name"], "pca32", "{reduced}");
    assert_eq!(reduced["rows"], 300, "{reduced}");
    let kept = reduced["variance_kept"].as_f64().unwrap();
    assert!(kept > 0.5 && kept <= 1.0, "{reduced}");

    let report = action(&mut client, "index", r#"{"dataset":"v"}"#).await;
    assert_eq!(report["rows"], 300, "{report}");
    assert_eq!(
        report["quantization"], "int8",
        "the configured default: {report}"
    );
    assert!(
        report["memory_bytes"].as_u64().unwrap() > 300 * 384,
        "{report}"
    );
    let stats = action(&mut client, "stats", "").await;
    assert_eq!(stats["indexes"][0]["dataset"], "v", "{stats}");
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "datasets".into(),
            "v".into(),
        ]))
        .await
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
    assert_eq!(meta["index"]["rows"], 300, "{meta}");

    let rows_of = |found: &serde_json::Value| -> Vec<u64> {
        found["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["row"].as_u64().unwrap())
            .collect()
    };
    let mut overlap = 0;
    for i in [0usize, 41, 150, 299] {
        let ask = |mode: &str| {
            serde_json::json!({"dataset": "v", "text": all[i], "k": 5, "mode": mode}).to_string()
        };
        let indexed = action(&mut client, "search", &ask("auto")).await;
        assert_eq!(indexed["mode"], "index", "{indexed}");
        assert_eq!(indexed["scanned_rows"], 0, "{indexed}");
        assert_eq!(indexed["results"][0]["text"], all[i].as_str(), "{indexed}");
        let exact = action(&mut client, "search", &ask("exact")).await;
        assert_eq!(exact["mode"], "exact");
        assert_eq!(exact["scanned_rows"], 300);
        let e = rows_of(&exact);
        overlap += rows_of(&indexed).iter().filter(|r| e.contains(r)).count();
    }
    assert!(overlap >= 19, "{overlap} of 20 of the exact top 5s");

    // Rows put after the build: found at once, then added to the index.
    client
        .do_put(put(&all[300..]))
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let body = serde_json::json!({"dataset": "v", "text": all[377], "k": 3}).to_string();
    let found = action(&mut client, "search", &body).await;
    assert_eq!(found["results"][0]["text"], all[377].as_str(), "{found}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stats = action(&mut client, "stats", "").await;
        if stats["indexes"][0]["rows"] == 400 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not grown: {stats}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let found = action(&mut client, "search", &body).await;
    assert_eq!(
        (found["scanned_rows"].clone(), found["indexed_rows"].clone()),
        (0.into(), 400.into()),
        "{found}"
    );

    // Through the projection, in sign bits, rescored against the stored vectors.
    let report = action(
        &mut client,
        "index",
        r#"{"dataset":"v","projection":"pca32","quantization":"binary","rescore":100}"#,
    )
    .await;
    assert_eq!(
        (report["dimensions"].clone(), report["vector_bytes"].clone()),
        (32.into(), 4.into()),
        "{report}"
    );
    let found = action(&mut client, "search", &body).await;
    assert_eq!(found["results"][0]["text"], all[377].as_str(), "{found}");

    for (kind, body, code) in [
        ("index", r#"{"dataset":"missing"}"#, Code::NotFound),
        (
            "index",
            r#"{"dataset":"v","quantization":"int4"}"#,
            Code::InvalidArgument,
        ),
        (
            "index",
            r#"{"dataset":"v","connectivity":1}"#,
            Code::InvalidArgument,
        ),
        (
            "index",
            r#"{"dataset":"v","projection":"nope"}"#,
            Code::NotFound,
        ),
        (
            "reduce",
            r#"{"dataset":"v","dimensions":0}"#,
            Code::InvalidArgument,
        ),
        (
            "reduce",
            r#"{"dataset":"v","dimensions":385}"#,
            Code::InvalidArgument,
        ),
        ("reduce", r#"{"dataset":"v"}"#, Code::InvalidArgument),
        // pca32 exists, and rows are indexed through it: a refit would move their space.
        (
            "reduce",
            r#"{"dataset":"v","dimensions":32}"#,
            Code::AlreadyExists,
        ),
        // Every search would reserve this many candidates.
        (
            "index",
            r#"{"dataset":"v","rescore":4611686018427387904}"#,
            Code::InvalidArgument,
        ),
        (
            "index",
            r#"{"dataset":"v","expansion_search":100001}"#,
            Code::InvalidArgument,
        ),
        (
            "search",
            r#"{"dataset":"v","text":"x","mode":"fast"}"#,
            Code::InvalidArgument,
        ),
    ] {
        let e = refused(&mut client, kind, body).await;
        assert_eq!(e.code(), code, "{kind} {body}: {}", e.message());
    }
    server.stop().await;
}

/// A projection fitted by `reduce` used by later streams: DoExchange vectors come back
/// projected (to its dimensions, in any precision, naming it in their field's metadata),
/// and a dataset put through it is searched with projected queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_streams_and_their_datasets_use_a_projection() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let rows = texts(200);
    let put = |name: &str, cmd: &str| {
        let descriptor =
            FlightDescriptor::new_path(vec!["datasets".into(), name.into(), cmd.into()]);
        arrow_flight::encode::FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(descriptor))
            .build(futures::stream::iter(batches(&rows).into_iter().map(Ok)))
    };
    client
        .do_put(put("base", "{}"))
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    action(
        &mut client,
        "reduce",
        r#"{"dataset":"base","dimensions":24,"name":"p24"}"#,
    )
    .await;
    let projection = keel_engine::sink::reduce::Projection::load_named(
        &server.settings.storage.data_dir,
        "base/p24",
    )
    .unwrap();

    let full = decoded(
        &exchange(&mut client, embed_path(), batches(&rows[..40]))
            .await
            .unwrap(),
    );
    let got = exchange(
        &mut client,
        command(r#"{"projection":"base/p24","precision":"int8"}"#),
        batches(&rows[..40]),
    )
    .await
    .unwrap();
    let field = got[0]
        .schema()
        .field_with_name("embedding")
        .unwrap()
        .clone();
    assert_eq!(
        field.metadata().get("keel.projection").map(String::as_str),
        Some("base/p24")
    );
    let got = decoded(&got);
    assert_eq!(got[0].len(), 24);
    for (g, f) in got.iter().zip(&full) {
        let want = projection.project_model(f);
        assert!(cosine(g, &want) >= 0.999, "{}", cosine(g, &want));
    }

    client
        .do_put(put("small", r#"{"projection":"base/p24"}"#))
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "datasets".into(),
            "small".into(),
        ]))
        .await
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&info.app_metadata).unwrap();
    assert_eq!(meta["vector_bytes_per_row"], 96, "{meta}");
    for i in [5usize, 123] {
        let body = serde_json::json!({"dataset": "small", "text": rows[i], "k": 3}).to_string();
        let found = action(&mut client, "search", &body).await;
        assert_eq!(found["results"][0]["text"], rows[i].as_str(), "{found}");
    }

    for (cmd, code) in [
        (r#"{"projection":"base/nope"}"#, Code::NotFound),
        (r#"{"projection":"nope"}"#, Code::InvalidArgument),
        (
            r#"{"projection":"base/p24","dimensions":12}"#,
            Code::InvalidArgument,
        ),
    ] {
        let e = exchange(&mut client, command(cmd), batches(&rows[..2]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{cmd}: {}", e.message());
    }
    server.stop().await;
}

/// A dataset records the model that made its vectors: a server on another model refuses
/// to append to it or search it (its queries would be in another space), with
/// FailedPrecondition naming both, and keeps datasets of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_is_kept_to_the_model_that_made_it() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let put = |name: &str, rows: &[String]| {
        let descriptor = FlightDescriptor::new_path(vec!["datasets".into(), name.into()]);
        arrow_flight::encode::FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(descriptor))
            .build(futures::stream::iter(batches(rows).into_iter().map(Ok)))
    };
    let rows = texts(20);
    let minilm = TestServer::start({
        let dir = dir.clone();
        move |s| s.storage.data_dir = dir
    })
    .await;
    let mut client = minilm.client().await;
    client
        .do_put(put("v", &rows))
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    minilm.stop().await;

    let tiny = tiny_bert();
    let other = TestServer::start({
        let (dir, model) = (dir.clone(), tiny.path().to_path_buf());
        move |s| {
            s.storage.data_dir = dir;
            s.embedder.model_dir = model;
        }
    })
    .await;
    let mut client = other.client().await;
    let e = match client.do_put(put("v", &rows)).await {
        Err(e) => to_status(e),
        Ok(results) => to_status(
            results
                .try_collect::<Vec<_>>()
                .await
                .expect_err("a put from another model is refused"),
        ),
    };
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("another model"), "{}", e.message());
    let e = refused(&mut client, "search", r#"{"dataset":"v","text":"x","k":3}"#).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    // Its own datasets are its own.
    client
        .do_put(put("w", &rows))
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let found = action(&mut client, "search", r#"{"dataset":"w","text":"x","k":3}"#).await;
    assert_eq!(found["results"].as_array().unwrap().len(), 3, "{found}");
    other.stop().await;
}
