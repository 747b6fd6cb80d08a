//! Bad input, misbehaving clients and overload, over real Flight: each case gets its exact
//! status, and afterwards the server still serves, with no rows or streams left held.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_flight::FlightData;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_client::FlightServiceClient;
use futures::{StreamExt, TryStreamExt};
use tonic::Code;

use crate::common::{TestServer, action, embed_path, exchange, text_batch};

/// Peak RSS (this process: server and clients) within the bound the configuration sets
/// (`docs/OPERATIONS.md`).
fn assert_within_bound(server: &TestServer, stats: &serde_json::Value) {
    let dir = &server.settings.embedder.model_dir;
    let model = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    let spec = keel_model::ModelSpec::from_dir(dir).unwrap();
    let bound = keel_client::soak::report::memory_bound(&server.settings, model, &spec);
    let peak = stats["peak_rss_bytes"].as_u64().unwrap();
    eprintln!("peak RSS {peak} of the bound {bound}");
    assert!(peak <= bound, "peak RSS {peak} above the bound {bound}");
}

/// The server answers a good stream, and nothing is left in flight or open.
async fn still_serving(server: &TestServer) {
    let mut client = server.client().await;
    let out = exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&[Some("still serving")])],
    )
    .await
    .expect("a good stream after the bad one");
    assert_eq!(out[0].num_rows(), 1);
    // The bad stream's task may finish a moment after its status went out.
    let mut stats = serde_json::Value::Null;
    for _ in 0..100 {
        stats = action(&mut client, "stats", "").await;
        if stats["in_flight_rows"] == 0 && stats["streams"]["open"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("rows or streams still held: {stats:#}");
}

async fn raw_client(server: &TestServer) -> FlightServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    FlightServiceClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX)
}

/// Encodes `batches` (descriptor on the first message) as raw FlightData.
async fn encoded(batches: Vec<RecordBatch>) -> Vec<FlightData> {
    FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(embed_path()))
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .try_collect()
        .await
        .unwrap()
}

/// Sends raw messages on a DoExchange; the status that ends it, or Ok with the rows that
/// came back.
async fn raw_exchange(
    server: &TestServer,
    messages: Vec<FlightData>,
) -> Result<usize, tonic::Status> {
    let mut client = raw_client(server).await;
    let replies = client
        .do_exchange(futures::stream::iter(messages))
        .await?
        .into_inner()
        .map_err(|s| arrow_flight::error::FlightError::Tonic(Box::new(s)));
    let batches: Vec<RecordBatch> =
        arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(replies)
            .try_collect()
            .await
            .map_err(crate::common::to_status)?;
    Ok(batches.iter().map(|b| b.num_rows()).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5_mb_text_is_truncated_not_a_blow_up() {
    let server = TestServer::start(|_| {}).await;
    let huge = "BRCA1 frameshift ".repeat(5 * 1024 * 1024 / 17);
    let messages = encoded(vec![text_batch(&[Some(&huge), Some("short")])]).await;
    // The reply carries the 5 MB text back: a client with no decoding limit reads it.
    assert_eq!(raw_exchange(&server, messages).await.unwrap(), 2);
    let mut client = server.client().await;
    let stats = action(&mut client, "stats", "").await;
    // Truncated to the model's 256 tokens: the pass's tokens stay small.
    assert!(
        stats["embedder"]["tokens"].as_u64().unwrap() <= 256 + 16,
        "{stats:#}"
    );
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_refused() {
    let server = TestServer::start(|s| s.server.max_message_bytes = 1024 * 1024).await;
    let big = "x".repeat(2 * 1024 * 1024);
    let messages = encoded(vec![text_batch(&[Some(&big)])]).await;
    let err = raw_exchange(&server, messages).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{err:?}"
    );
    assert!(
        err.message().contains("message length too large")
            || err.message().contains("max_message_bytes"),
        "{err:?}"
    );
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_in_flight_data_are_invalid_argument() {
    let server = TestServer::start(|_| {}).await;
    let mut messages = encoded(vec![text_batch(&[Some("ok")])]).await;
    // Keep the descriptor message; corrupt what follows.
    let garbage: Vec<u8> = (0..512u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    for m in messages.iter_mut().skip(1) {
        m.data_header = garbage.clone().into();
        m.data_body = garbage.clone().into();
    }
    let err = raw_exchange(&server, messages).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("cannot decode"), "{err:?}");
    // A data message before any schema.
    let mut messages = encoded(vec![text_batch(&[Some("ok")])]).await;
    let mut data = messages.remove(1);
    data.flight_descriptor = messages[0].flight_descriptor.clone();
    let err = raw_exchange(&server, vec![data]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_leaves_nothing_held() {
    let server = TestServer::start(|_| {}).await;
    let mut client = raw_client(&server).await;
    let texts: Vec<String> = (0..2000).map(|i| format!("disconnect {i}")).collect();
    let batches: Vec<RecordBatch> = texts
        .chunks(200)
        .map(|c| text_batch(&c.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<FlightData>(64);
    for m in encoded(batches).await {
        tx.send(m).await.unwrap();
    }
    let mut replies = client
        .do_exchange(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Read one reply, then go away without closing the stream properly.
    let _ = replies.message().await;
    drop(replies);
    drop(tx);
    drop(client);
    still_serving(&server).await;
    server.stop().await;
}

/// A client that sends 20 000 rows, reads its first answer and cancels: the embedder
/// skips the jobs it left behind, and computes at most the passes already on a worker
/// when it left (with one more per worker of slack for the moment before the server
/// sees the cancellation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_client_costs_at_most_the_passes_on_the_workers() {
    let server = TestServer::start(|_| {}).await;
    let workers = server.settings.embedder.cpu.workers as u64;
    let pass_rows = server.settings.embedder.cpu.max_batch_rows as u64;
    let mut client = raw_client(&server).await;
    let texts: Vec<String> = (0..20_000)
        .map(|i| format!("departed client variant {i} of gene G{}", i % 97))
        .collect();
    let batches: Vec<RecordBatch> = texts
        .chunks(1000)
        .map(|c| text_batch(&c.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()))
        .collect();
    let messages = encoded(batches).await;
    let mut replies = client
        .do_exchange(futures::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    // The schema, then the first batch of rows.
    let mut rows_seen = 0;
    while rows_seen == 0 {
        let m = replies.message().await.unwrap().expect("an answer");
        rows_seen = m.data_body.len();
    }
    let mut stats_client = server.client().await;
    let at_cancel = action(&mut stats_client, "stats", "").await;
    drop(replies);
    drop(client);
    // Wait for the embedder to go idle: an empty queue and no rows for 0.5 s.
    let mut last = at_cancel["embedder"]["rows"].as_u64().unwrap();
    let mut stats = at_cancel.clone();
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stats = action(&mut stats_client, "stats", "").await;
        let rows = stats["embedder"]["rows"].as_u64().unwrap();
        if rows == last && stats["embedder"]["queued_jobs"] == 0 {
            break;
        }
        last = rows;
    }
    let after = stats["embedder"]["rows"].as_u64().unwrap()
        - at_cancel["embedder"]["rows"].as_u64().unwrap();
    eprintln!(
        "rows embedded after the client left: {after}; dropped jobs: {}",
        stats["embedder"]["dropped_jobs"]
    );
    assert!(
        stats["embedder"]["dropped_jobs"].as_u64().unwrap() > 0,
        "the jobs left behind were computed: {stats:#}"
    );
    assert!(
        after <= 2 * workers * pass_rows,
        "{after} rows embedded after the client left; at most {} expected",
        2 * workers * pass_rows
    );
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_times_out_and_extra_streams_are_refused() {
    let server = TestServer::start(|s| {
        s.server.idle_timeout_ms = 800;
        s.server.max_streams = 2;
    })
    .await;
    // Two streams that send their schema and one batch, then nothing (kept open).
    let mut held = Vec::new();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let mut client = raw_client(&server).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<FlightData>(8);
        for m in encoded(vec![text_batch(&[Some("silent")])]).await {
            tx.send(m).await.unwrap();
        }
        let r = client
            .do_exchange(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        held.push((client, tx));
        replies.push(r);
    }
    // A third stream while both are open: refused at once.
    let mut client = server.client().await;
    let err = exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&[Some("third")])],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("server.max_streams"), "{err:?}");
    // The silent ones end with DeadlineExceeded after the idle timeout.
    for mut r in replies {
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(10), r.message())
                .await
                .expect("the idle timeout ends the stream")
            {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a silent stream must not end cleanly"),
                Err(s) => break s,
            }
        };
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains("idle_timeout_ms"), "{status:?}");
    }
    drop(held);
    still_serving(&server).await;
    server.stop().await;
}

/// `n` producers at once, each on its own connection with one batch of `rows` distinct
/// texts; what each got back.
async fn producers(
    server: &TestServer,
    n: usize,
    rows: usize,
    tag: &'static str,
) -> Vec<Result<Vec<RecordBatch>, tonic::Status>> {
    let tasks = (0..n).map(|p| {
        let addr = server.addr;
        tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = arrow_flight::FlightClient::new(channel);
            let texts: Vec<String> = (0..rows).map(|i| format!("{tag} {p} {i}")).collect();
            let batch = RecordBatch::try_from_iter([(
                "text",
                Arc::new(StringArray::from(texts)) as ArrayRef,
            )])
            .unwrap();
            exchange(&mut client, embed_path(), vec![batch]).await
        })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("a producer task"))
        .collect()
}

/// Far more producers than the embedder can serve: with `when_full: reject` the excess is
/// told `ResourceExhausted` at once, every accepted row comes back, and the rows in
/// flight never pass the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_with_reject_refuses_the_excess_and_keeps_the_bound() {
    let server = TestServer::start(|s| {
        s.ingest.max_in_flight_rows = 256;
        s.ingest.slice_rows = 128;
        s.ingest.when_full = keel_engine::ingest::config::WhenFull::Reject;
        s.cache.max_bytes = 0;
    })
    .await;
    let results = producers(&server, 20, 128, "overload").await;
    let (mut ok, mut refused) = (0, 0);
    for r in results {
        match r {
            Ok(batches) => {
                assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 128);
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("ingest.when_full"), "{s:?}");
                refused += 1;
            }
        }
    }
    assert!(ok >= 1, "some producers are served");
    assert!(
        refused >= 1,
        "20 x 128 rows against a bound of 256: some are refused"
    );
    let mut client = server.client().await;
    let stats = action(&mut client, "stats", "").await;
    assert!(
        stats["max_in_flight_rows_seen"].as_u64().unwrap() <= 256,
        "{stats:#}"
    );
    assert_eq!(stats["streams"]["rejected"], refused, "{stats:#}");
    assert_within_bound(&server, &stats);
    still_serving(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_with_block_serves_everyone_within_the_bound() {
    let server = TestServer::start(|s| {
        s.ingest.max_in_flight_rows = 256;
        s.ingest.slice_rows = 128;
        s.cache.max_bytes = 0;
    })
    .await;
    for r in producers(&server, 20, 64, "blocked").await {
        let batches = r.expect("blocking admission serves every producer");
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 64);
    }
    let mut client = server.client().await;
    let stats = action(&mut client, "stats", "").await;
    assert!(
        stats["max_in_flight_rows_seen"].as_u64().unwrap() <= 256,
        "{stats:#}"
    );
    assert_within_bound(&server, &stats);
    let _ = client
        .list_actions()
        .await
        .unwrap()
        .collect::<Vec<_>>()
        .await;
    server.stop().await;
}

/// The path the fuzz target drives (`fuzz/fuzz_targets/flight_data.rs`), on the saved
/// seeds: good streams give their texts, bad ones their status. With KEEL_BLESS set the
/// seeds are (re)written to `fuzz/corpus/flight_data/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fuzzed_path_validates_its_seed_streams() {
    use keel_wire::{frames, validate::validate_messages};
    let encode = |descriptor: arrow_flight::FlightDescriptor, batches: Vec<RecordBatch>| async move {
        let messages: Vec<FlightData> = FlightDataEncoderBuilder::new()
            .build(futures::stream::iter(batches.into_iter().map(Ok)))
            .try_collect()
            .await
            .unwrap();
        frames::encode(&descriptor, &messages)
    };
    let texts = text_batch(&[Some("BRCA1 frameshift"), None, Some("TP53 missense")]);
    let other =
        RecordBatch::try_from_iter([("text", Arc::new(StringArray::from(vec!["x"])) as ArrayRef)])
            .unwrap();
    let template = arrow_flight::FlightDescriptor::new_cmd(r#"{"template": "{text}!"}"#);
    let seeds: Vec<(&str, Vec<u8>, Result<usize, Code>)> = vec![
        (
            "good",
            encode(embed_path(), vec![texts.clone(), texts.clone()]).await,
            Ok(2),
        ),
        (
            "template",
            encode(template, vec![texts.clone()]).await,
            Ok(1),
        ),
        (
            "missing-column",
            encode(
                arrow_flight::FlightDescriptor::new_cmd(r#"{"text_column": "nope"}"#),
                vec![texts.clone()],
            )
            .await,
            Err(Code::InvalidArgument),
        ),
        (
            "schema-change",
            {
                // Two encoders: a second schema message mid-stream.
                let mut a = encode(embed_path(), vec![texts.clone()]).await;
                let b = encode(embed_path(), vec![other]).await;
                a.extend(&b[1..]);
                a
            },
            Err(Code::InvalidArgument),
        ),
        (
            "garbage",
            vec![0, 8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0],
            Err(Code::InvalidArgument),
        ),
    ];
    let dir = crate::common::repo_root().join("fuzz/corpus/flight_data");
    for (name, bytes, expected) in seeds {
        let got = validate_messages(
            frames::decode(&bytes),
            "text",
            NonZeroUsize::new(2).unwrap(),
        )
        .await
        .map_err(tonic::Status::from);
        match (&got, expected) {
            (Ok(slices), Ok(n)) => {
                // Slices of at most 2 rows: 3 rows a batch make 2 slices.
                assert_eq!(slices.len(), 2 * n, "{name}");
                assert_eq!(
                    slices[0][0].as_deref().map(|t| t.contains("BRCA1")),
                    Some(true),
                    "{name}"
                );
                // A null text stays null; a template renders a missing field empty.
                let second = if name == "template" { Some("!") } else { None };
                assert_eq!(slices[0][1].as_deref(), second, "{name}");
            }
            (Err(s), Err(code)) => assert_eq!(s.code(), code, "{name}: {s:?}"),
            _ => panic!("{name}: {got:?}"),
        }
        if std::env::var_os("KEEL_BLESS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}")), &bytes).unwrap();
        }
    }
}

/// A stream the fuzzer found (`fuzz/corpus/flight_data/seed-crash-buffer-offset`): its
/// record batch message names a buffer past the body, on which arrow-ipc's reader panics.
/// Over Flight it is `InvalidArgument`, and the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_panics_the_ipc_reader_is_invalid_argument() {
    let bytes = std::fs::read(
        crate::common::repo_root().join("fuzz/corpus/flight_data/seed-crash-buffer-offset"),
    )
    .unwrap();
    let messages = keel_wire::frames::decode(&bytes);
    let direct = keel_wire::validate::validate_messages(
        messages.clone(),
        "text",
        NonZeroUsize::new(7).unwrap(),
    )
    .await
    .map_err(tonic::Status::from)
    .unwrap_err();
    assert_eq!(direct.code(), Code::InvalidArgument, "{direct:?}");
    assert!(direct.message().contains("malformed message"), "{direct:?}");
    let server = TestServer::start(|_| {}).await;
    let err = raw_exchange(&server, messages).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    still_serving(&server).await;
    server.stop().await;
}
