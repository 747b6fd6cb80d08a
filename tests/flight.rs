//! The Flight contract over real gRPC: order, counts, vectors, datasets, errors, bounds.

use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, StringArray,
};
use arrow_flight::{FlightDescriptor, Ticket};
use futures::TryStreamExt;
use keel_model::{Backend, BatchLimits, SentenceModel};
use tonic::Code;

use crate::common::*;

fn embeddings(batch: &RecordBatch) -> &FixedSizeListArray {
    batch
        .column_by_name("embedding")
        .expect("an embedding column")
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .expect("FixedSizeList")
}

fn vector(list: &FixedSizeListArray, i: usize) -> Vec<f32> {
    let v = list.value(i);
    v.as_any()
        .downcast_ref::<Float32Array>()
        .unwrap()
        .values()
        .to_vec()
}

fn texts(n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| format!("{tag} variant {i} in gene G{}", i % 17))
        .collect()
}

/// The messages of a DoPut of `batches` into dataset `name`, with the command JSON `cmd`.
fn put_input(
    name: &str,
    cmd: Option<&str>,
    batches: impl futures::Stream<Item = Result<RecordBatch, arrow_flight::error::FlightError>>
    + Send
    + 'static,
) -> arrow_flight::encode::FlightDataEncoder {
    let mut descriptor = FlightDescriptor::new_path(vec!["datasets".into(), name.into()]);
    if let Some(cmd) = cmd {
        descriptor.cmd = cmd.to_string().into();
    }
    arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor))
        .build(batches)
}

/// One batch, then a stream left open (the client neither sends more nor ends it).
fn then_open(
    batch: RecordBatch,
) -> impl futures::Stream<Item = Result<RecordBatch, arrow_flight::error::FlightError>> {
    futures::StreamExt::chain(
        futures::stream::iter([Ok(batch)]),
        futures::stream::pending(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_returns_every_row_in_order_with_the_vectors_of_keel_embed() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let all = texts(130, "order");
    let batches: Vec<RecordBatch> = all
        .chunks(50)
        .map(|c| text_batch(&c.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()))
        .collect();
    let out = exchange(&mut client, embed_path(), batches).await.unwrap();
    let rows: usize = out.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 130);

    // Same vectors as the model alone (what `keel embed` runs).
    let model =
        SentenceModel::load(&repo_root().join("models/all-MiniLM-L6-v2"), Backend::Cpu).unwrap();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let expected = model
        .embed(
            &refs,
            BatchLimits {
                max_rows: 64,
                max_tokens: 8192,
            },
        )
        .unwrap();
    let mut i = 0;
    for b in &out {
        assert_eq!(b.schema().field(2).name(), "embedding");
        let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let list = embeddings(b);
        for r in 0..b.num_rows() {
            assert_eq!(ids.value(r), (i % 50) as i64, "row order");
            let got = vector(list, r);
            let want = &expected[i * 384..(i + 1) * 384];
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-5, "row {i} differs by {diff}");
            i += 1;
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_texts_get_null_embeddings_and_zero_row_batches_pass() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let out = exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&[Some("a"), None, Some("")]), text_batch(&[])],
    )
    .await
    .unwrap();
    let rows: usize = out.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 3);
    let list = embeddings(&out[0]);
    assert!(list.is_valid(0) && list.is_null(1) && list.is_valid(2));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_render_rows_and_repeated_rows_hit_the_cache() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let batch = RecordBatch::try_from_iter([
        (
            "gene",
            Arc::new(StringArray::from(vec!["BRCA1", "TP53", "BRCA1"])) as ArrayRef,
        ),
        (
            "pos",
            Arc::new(Int64Array::from(vec![43045712, 7675088, 43045712])) as ArrayRef,
        ),
    ])
    .unwrap();
    let cmd = FlightDescriptor::new_cmd(r#"{"template": "{gene} at {pos}"}"#);
    let first = exchange(&mut client, cmd.clone(), vec![batch.clone()])
        .await
        .unwrap();
    let second = exchange(&mut client, cmd, vec![batch]).await.unwrap();
    let (a, b) = (embeddings(&first[0]), embeddings(&second[0]));
    assert_eq!(
        vector(a, 0),
        vector(a, 2),
        "same rendered text, same vector"
    );
    assert_ne!(vector(a, 0), vector(a, 1));
    assert_eq!(vector(a, 1), vector(b, 1));
    let stats = action(&mut client, "stats", "").await;
    assert_eq!(stats["cache"]["hits"], 2, "{stats}");
    assert_eq!(stats["rows"], 6);
    assert_eq!(stats["embedded_rows"], 2, "duplicates are embedded once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_statuses_and_the_server_goes_on() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let good = text_batch(&[Some("still serving")]);
    let cases: Vec<(FlightDescriptor, RecordBatch, Code, &str)> = vec![
        (
            FlightDescriptor::new_path(vec!["nope".into()]),
            good.clone(),
            Code::InvalidArgument,
            "unknown descriptor path",
        ),
        (
            FlightDescriptor::new_cmd("{not json"),
            good.clone(),
            Code::InvalidArgument,
            "bad command JSON",
        ),
        (
            FlightDescriptor::new_cmd(r#"{"text_column": "missing"}"#),
            good.clone(),
            Code::InvalidArgument,
            "\"missing\" not found",
        ),
        (
            FlightDescriptor::new_cmd(r#"{"text_column": "id"}"#),
            good.clone(),
            Code::InvalidArgument,
            "has type Int64",
        ),
        (
            FlightDescriptor::new_cmd(r#"{"template": "{gene}"}"#),
            good.clone(),
            Code::InvalidArgument,
            "{gene}",
        ),
        (
            // Keel's own int8 output with `embedding` dropped, sent again: its scales
            // would sit beside the new ones under the same name.
            FlightDescriptor::new_cmd(r#"{"precision": "int8"}"#),
            RecordBatch::try_from_iter([
                ("text", good.column(1).clone()),
                (
                    "embedding_scale",
                    Arc::new(arrow_array::Float32Array::from(vec![0.01f32])) as ArrayRef,
                ),
            ])
            .unwrap(),
            Code::InvalidArgument,
            "\"embedding_scale\" column, a name Keel adds",
        ),
    ];
    for (descriptor, batch, code, needle) in cases {
        let err = exchange(&mut client, descriptor, vec![batch])
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert!(
            err.message().contains(needle),
            "{needle:?} not in {:?}",
            err.message()
        );
    }
    // A schema change mid-stream.
    let other =
        RecordBatch::try_from_iter([("text", Arc::new(StringArray::from(vec!["x"])) as ArrayRef)])
            .unwrap();
    let err = exchange_raw(&mut client, embed_path(), vec![good.clone(), other])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("schema changed"), "{err}");
    // Unknown dataset and action.
    let err = client
        .do_get(Ticket::new("no-such-dataset"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(to_status(err).code(), Code::NotFound);
    let err = client
        .do_action(arrow_flight::Action::new("explode", Vec::<u8>::new()))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(to_status(err).code(), Code::InvalidArgument);
    // Still serving, nothing left in flight.
    let out = exchange(&mut client, embed_path(), vec![good])
        .await
        .unwrap();
    assert_eq!(out[0].num_rows(), 1);
    let stats = action(&mut client, "stats", "").await;
    assert_eq!(stats["in_flight_rows"], 0, "{stats}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_stores_a_dataset_that_get_and_list_return() {
    let server = TestServer::start(|s| s.storage.flush_rows = 40).await;
    let mut client = server.client().await;
    let all = texts(100, "put");
    let batches: Vec<RecordBatch> = all
        .chunks(30)
        .map(|c| text_batch(&c.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()))
        .collect();
    let input = put_input(
        "variants",
        None,
        futures::stream::iter(batches.into_iter().map(Ok)),
    );
    let acks: Vec<serde_json::Value> = client
        .do_put(input)
        .await
        .unwrap()
        .map_ok(|r| serde_json::from_slice(&r.app_metadata).unwrap())
        .try_collect()
        .await
        .unwrap();
    assert!(
        acks.len() >= 2,
        "acknowledged as parts were written: {acks:?}"
    );
    assert_eq!(acks.last().unwrap()["acknowledged_rows"], 100);
    let mut last = 0;
    for a in &acks {
        let n = a["acknowledged_rows"].as_u64().unwrap();
        assert!(n > last, "acks grow: {acks:?}");
        last = n;
    }

    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "datasets".into(),
            "variants".into(),
        ]))
        .await
        .unwrap();
    assert_eq!(info.total_records, 100);
    let listed: Vec<_> = client
        .list_flights(Vec::<u8>::new())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let back: Vec<RecordBatch> = client
        .do_get(Ticket::new("variants"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let texts_back = crate::common::texts_of(&back);
    assert_eq!(texts_back, all);
    assert!(back.iter().all(|b| embeddings(b).value_length() == 384));

    // A JSON ticket names a range of rows, read across parts of 40.
    let mut range = async |ticket: &str| -> Result<Vec<String>, tonic::Status> {
        let batches: Vec<RecordBatch> = client
            .do_get(Ticket::new(ticket.to_string()))
            .await
            .map_err(to_status)?
            .try_collect()
            .await
            .map_err(to_status)?;
        Ok(crate::common::texts_of(&batches))
    };
    assert_eq!(
        range(r#"{"dataset": "variants", "offset": 38, "limit": 5}"#)
            .await
            .unwrap(),
        all[38..43]
    );
    assert_eq!(
        range(r#"{"dataset": "variants", "offset": 99}"#)
            .await
            .unwrap(),
        all[99..]
    );
    assert!(
        range(r#"{"dataset": "variants", "offset": 100}"#)
            .await
            .unwrap()
            .is_empty()
    );
    let bad = range(r#"{"dataset": "variants", "offset": "x"}"#)
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("bad ticket JSON"), "{bad}");
    let missing = range(r#"{"dataset": "nope", "limit": 1}"#)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
    server.stop().await;
}

/// The cache is keyed by the rendered text: a changed template costs embeddings only for
/// rows whose text it changes (here, a field every row lacks adds nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_template_changes_cache_keys_only_where_texts_change() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let batch = RecordBatch::try_from_iter([
        (
            "gene",
            Arc::new(StringArray::from(vec![Some("BRCA1"), Some("TP53"), None])) as ArrayRef,
        ),
        (
            "sift",
            Arc::new(StringArray::from(vec![None, Some("deleterious(0)"), None])) as ArrayRef,
        ),
        (
            "pos",
            Arc::new(Int64Array::from(vec![43045712, 7675088, 877772])) as ArrayRef,
        ),
    ])
    .unwrap();
    let run = async |client: &mut arrow_flight::FlightClient, template: &str| {
        let cmd = serde_json::json!({ "template": template }).to_string();
        exchange(client, FlightDescriptor::new_cmd(cmd), vec![batch.clone()])
            .await
            .unwrap();
        let stats = action(client, "stats", "").await;
        (
            stats["embedded_rows"].as_u64().unwrap(),
            stats["cache"]["hits"].as_u64().unwrap(),
        )
    };
    assert_eq!(run(&mut client, "{gene} at {pos}").await, (3, 0));
    // Adds " {sift}": only TP53's text changes ("TP53 at 7675088 deleterious(0)").
    assert_eq!(run(&mut client, "{gene} at {pos} {sift}").await, (4, 2));
    server.stop().await;
}

/// A producer far faster than the embedder: the rows in flight never pass the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_rows_never_exceed_the_bound() {
    let server = TestServer::start(|s| {
        s.ingest.max_in_flight_rows = 100;
        s.ingest.slice_rows = 50;
        s.embedder.cpu.workers = 1;
        s.cache.max_bytes = 0;
    })
    .await;
    let mut client = server.client().await;
    let all = texts(1000, "pressure");
    let batches: Vec<RecordBatch> = all
        .chunks(200)
        .map(|c| text_batch(&c.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()))
        .collect();
    let mut watcher = server.client().await;
    let watch = tokio::spawn(async move {
        let mut max_seen = 0u64;
        for _ in 0..40 {
            let s = action(&mut watcher, "stats", "").await;
            max_seen = max_seen.max(s["in_flight_rows"].as_u64().unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        max_seen
    });
    let out = exchange(&mut client, embed_path(), batches).await.unwrap();
    assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 1000);
    let sampled = watch.await.unwrap();
    let stats = action(&mut client, "stats", "").await;
    let high_water = stats["max_in_flight_rows_seen"].as_u64().unwrap();
    assert!(high_water <= 100, "high-water mark {high_water}");
    assert!(sampled <= 100, "sampled {sampled}");
    assert!(
        high_water >= 50,
        "the bound was reached (the test exercised it): {high_water}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_report_stats_cleanup_and_health() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&[Some("warm the cache")])],
    )
    .await
    .unwrap();
    let health = action(&mut client, "health", "").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["dim"], 384);
    let cleanup = action(&mut client, "cleanup", r#"{"level": "full"}"#).await;
    assert_eq!(cleanup["level"], "full");
    assert!(
        cleanup["acks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["actor"] == "cache")
    );
    let stats = action(&mut client, "stats", "").await;
    for key in ["rss_bytes", "ops", "rows", "in_flight_rows"] {
        assert!(stats[key].is_number(), "{key} in {stats}");
    }
    for key in ["hits", "misses", "entries", "bytes", "max_bytes"] {
        assert!(stats["cache"][key].is_number(), "cache.{key} in {stats}");
    }
    assert_eq!(stats["cleanups"]["total"], 1);
    let actions: Vec<_> = client
        .list_actions()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let names: Vec<&str> = actions.iter().map(|a| a.r#type.as_str()).collect();
    assert_eq!(
        names,
        [
            "stats",
            "cleanup",
            "health",
            "search",
            "heap-profile",
            "index",
            "reduce"
        ]
    );
    server.stop().await;
}

/// No ~40 ms stall on small answers (Nagle's algorithm meeting the client's delayed ACK):
/// the median of 20 `stats` actions and of 20 cached one-row DoExchanges on loopback stays
/// under 20 ms, half the stall, so a loaded machine does not fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_answers_do_not_wait_for_delayed_acks() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let median = |mut v: Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut stats = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        action(&mut client, "stats", "").await;
        stats.push(t.elapsed());
    }
    let row = || vec![text_batch(&[Some("BRCA1 missense variant, cached")])];
    exchange(&mut client, embed_path(), row()).await.unwrap();
    let mut cached = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let out = exchange(&mut client, embed_path(), row()).await.unwrap();
        cached.push(t.elapsed());
        assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    }
    let (stats, cached) = (median(stats), median(cached));
    assert!(
        stats < std::time::Duration::from_millis(20)
            && cached < std::time::Duration::from_millis(20),
        "median stats {stats:?}, cached one-row exchange {cached:?}"
    );
    server.stop().await;
}

/// A put whose columns Parquet cannot hold (a union) is refused with InvalidArgument and
/// leaves no dataset behind; the sink goes on writing every other dataset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_union_column_is_refused_and_other_datasets_go_on() {
    use arrow_array::UnionArray;
    use arrow_buffer::ScalarBuffer;
    use arrow_schema::{DataType, Field, UnionFields};

    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let put =
        |name: &str, batch: RecordBatch| put_input(name, None, futures::stream::iter([Ok(batch)]));
    let plain = text_batch(&[Some("BRCA1 missense"), Some("TP53 stop gained")]);
    let fields =
        UnionFields::try_new(vec![0], vec![Field::new("n", DataType::Int32, false)]).unwrap();
    let union = UnionArray::try_new(
        fields,
        ScalarBuffer::from(vec![0i8, 0]),
        None,
        vec![Arc::new(arrow_array::Int32Array::from(vec![1, 2])) as ArrayRef],
    )
    .unwrap();
    let odd = RecordBatch::try_from_iter([
        ("text", plain.column(1).clone()),
        ("u", Arc::new(union) as ArrayRef),
    ])
    .unwrap();
    let refused: Result<Vec<_>, _> = match client.do_put(put("odd", odd)).await {
        Ok(acks) => acks.try_collect().await,
        Err(e) => Err(e),
    };
    let status = to_status(refused.unwrap_err());
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("union"), "{status}");

    let acks: Vec<_> = client
        .do_put(put("fine", plain))
        .await
        .expect("the sink still writes")
        .try_collect()
        .await
        .expect("the sink still writes");
    assert!(!acks.is_empty());
    let listed: Vec<_> = client
        .list_flights(Vec::<u8>::new())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let names: Vec<_> = listed
        .iter()
        .filter_map(|f| f.flight_descriptor.as_ref())
        .map(|d| d.path.join("/"))
        .collect();
    assert_eq!(
        names,
        ["datasets/fine"],
        "no dataset left by the refused put"
    );
    server.stop().await;
}

/// A client that opens a stream and never sends its first message is answered with
/// DeadlineExceeded after server.idle_timeout_ms, and its slot goes to the next stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_sends_is_ended_and_frees_its_slot() {
    let server = TestServer::start(|s| {
        s.server.max_streams = 1;
        s.server.idle_timeout_ms = 800;
    })
    .await;
    let mut client = server.client().await;
    let silent = futures::stream::pending::<Result<arrow_flight::FlightData, _>>();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        match client.do_exchange(silent).await {
            Ok(s) => s.try_collect::<Vec<_>>().await.map(|_| ()),
            Err(e) => Err(e),
        }
    })
    .await
    .expect("the server answers a silent stream");
    let status = to_status(answer.unwrap_err());
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status}");
    let back = exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&[Some("after the silent one")])],
    )
    .await
    .expect("the slot is free again");
    assert_eq!(back.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    server.stop().await;
}

/// A DoPut client that goes away gets nothing more: rows it was never acknowledged are
/// not appended after it left (a producer that reconnects resends them from the dataset's
/// row count, so appending them too would store them twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_put_appends_nothing_after_it_left() {
    let server = TestServer::start(|s| s.storage.flush_rows = 1_000_000).await;
    let all = texts(300, "departed");
    let batch = text_batch(&all.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    // The producer reaches the server through a TCP proxy that the test cuts, as when
    // the producer's process dies or a load balancer drops its connection.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let upstream = server.addr;
    let relay = tokio::spawn(async move {
        let (mut inbound, _) = proxy.accept().await.unwrap();
        let mut outbound = tokio::net::TcpStream::connect(upstream).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{proxy_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut leaving = arrow_flight::FlightClient::new(channel);
    let input = put_input("left", None, then_open(batch));
    let put = tokio::spawn(async move {
        if let Ok(acks) = leaving.do_put(input).await {
            let _: Result<Vec<_>, _> = acks.try_collect().await;
        }
    });
    // The rows are embedded and wait in the stream's buffer (no flush before 10⁶ rows).
    let mut client = server.client().await;
    let embedded = async {
        loop {
            let stats = action(&mut client, "stats", "").await;
            if stats["embedded_rows"].as_u64().unwrap_or(0) >= 300 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), embedded)
        .await
        .expect("the rows are embedded");
    // Both sockets closed: the server's side of the connection breaks.
    relay.abort();
    let _ = relay.await;
    put.abort();
    let _ = put.await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "datasets".into(),
            "left".into(),
        ]))
        .await;
    match info {
        Ok(info) => assert_eq!(info.total_records, 0, "appended after the client left"),
        Err(e) => assert_eq!(to_status(e).code(), Code::NotFound),
    }
    server.stop().await;
}

/// `expect_rows`: a put is appended only if the dataset holds that many rows when its first
/// part is written (a producer resending after a lost connection never follows its earlier
/// connection's late rows with the same rows); a mismatch is FailedPrecondition and
/// appends nothing; the option is for DoPut only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_with_expect_rows_appends_only_onto_that_many_rows() {
    let server = TestServer::start(|_| {}).await;
    let mut client = server.client().await;
    let all = texts(15, "expect");
    let batch = |range: std::ops::Range<usize>| {
        text_batch(
            &all[range]
                .iter()
                .map(|s| Some(s.as_str()))
                .collect::<Vec<_>>(),
        )
    };
    let put = async |client: &mut arrow_flight::FlightClient, expect: u64, b: RecordBatch| {
        let cmd = format!(r#"{{"expect_rows": {expect}}}"#);
        let input = put_input("exp", Some(&cmd), futures::stream::iter([Ok(b)]));
        match client.do_put(input).await {
            Ok(acks) => acks.try_collect::<Vec<_>>().await.map(|_| ()),
            Err(e) => Err(e),
        }
        .map_err(to_status)
    };
    let rows = async |client: &mut arrow_flight::FlightClient| {
        client
            .get_flight_info(FlightDescriptor::new_path(vec![
                "datasets".into(),
                "exp".into(),
            ]))
            .await
            .unwrap()
            .total_records
    };
    put(&mut client, 0, batch(0..10)).await.unwrap();
    let late = put(&mut client, 0, batch(10..15)).await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late}");
    assert!(late.message().contains("holds 10 rows"), "{late}");
    assert_eq!(rows(&mut client).await, 10, "nothing appended");
    put(&mut client, 10, batch(10..15)).await.unwrap();
    assert_eq!(rows(&mut client).await, 15);

    let err = exchange(
        &mut client,
        FlightDescriptor::new_cmd(r#"{"expect_rows": 3}"#),
        vec![batch(0..1)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    server.stop().await;
}

/// Embedded rows waiting in DoPut buffers count against a budget shared by all streams
/// (ingest.max_in_flight_rows): a stream whose rows do not fit writes and acknowledges
/// its part at once, long before storage.flush_rows, while it is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_buffers_stay_within_the_in_flight_bound() {
    let server = TestServer::start(|s| {
        s.ingest.max_in_flight_rows = 200;
        s.ingest.slice_rows = 100;
        s.storage.flush_rows = 1_000_000;
        // The stream is left open: the server drops it on stop after the grace period.
        s.server.shutdown_grace_ms = 500;
    })
    .await;
    let mut client = server.client().await;
    let all = texts(300, "budget");
    let batch = text_batch(&all.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    // The stream stays open: only the budget can make it write before its end.
    let input = put_input("budget", None, then_open(batch));
    let mut acks = client.do_put(input).await.unwrap();
    let first = tokio::time::timeout(std::time::Duration::from_secs(60), acks.try_next())
        .await
        .expect("a part is written while the stream is open")
        .unwrap()
        .expect("an acknowledgement");
    let ack: serde_json::Value = serde_json::from_slice(&first.app_metadata).unwrap();
    assert_eq!(ack["acknowledged_rows"], 300, "{ack}");
    drop(acks);
    server.stop().await;
}
