//! Crash safety of datasets, with the real binary: `kill -9` in the middle of a `DoPut`
//! loses no acknowledged row, leaves nothing half-written, and the producer resumes from
//! the count `GetFlightInfo` reports; SIGTERM drains an open stream with no row lost.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::{FlightClient, FlightDescriptor, Ticket};
use futures::{StreamExt, TryStreamExt};

use crate::common::repo_root;

struct Server {
    child: Child,
    addr: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(data_dir: &Path, port: u16) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve"])
        .env("KEEL_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("KEEL_STORAGE__DATA_DIR", data_dir)
        .env("KEEL_STORAGE__FLUSH_ROWS", "100")
        .env(
            "KEEL_EMBEDDER__MODEL_DIR",
            repo_root().join("models/all-MiniLM-L6-v2"),
        )
        .env("KEEL_EMBEDDER__CPU__WORKERS", "2")
        .env("KEEL_METRICS__ENABLED", "false")
        .env("KEEL_SERVER__SHUTDOWN_GRACE_MS", "30000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("keel serve starts");
    Server {
        child,
        addr: format!("http://127.0.0.1:{port}"),
    }
}

async fn client(server: &Server) -> FlightClient {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let endpoint = tonic::transport::Channel::from_shared(server.addr.clone()).unwrap();
        match endpoint.connect().await {
            Ok(c) => return FlightClient::new(c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    }
}

fn texts(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("crash-safe row {i}")).collect()
}

fn batch(texts: &[String]) -> RecordBatch {
    RecordBatch::try_from_iter([(
        "text",
        Arc::new(StringArray::from(texts.to_vec())) as ArrayRef,
    )])
    .unwrap()
}

fn descriptor() -> FlightDescriptor {
    FlightDescriptor::new_path(vec!["datasets".into(), "crash".into()])
}

async fn stored(client: &mut FlightClient) -> Vec<String> {
    let batches: Vec<RecordBatch> = client
        .do_get(Ticket::new("crash"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    crate::common::texts_of(&batches)
}

async fn reported_rows(client: &mut FlightClient) -> u64 {
    client
        .get_flight_info(descriptor())
        .await
        .unwrap()
        .total_records as u64
}

/// A fresh folder, removed when the test ends.
fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("keel-crash-{tag}-"))
        .tempdir()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_put_loses_no_acknowledged_row_and_the_put_resumes() {
    const TOTAL: usize = 3000;
    let dir = scratch("kill");
    let port = free_port();
    let mut server = start(dir.path(), port);
    let mut c = client(&server).await;
    let all = texts(0..TOTAL);

    // Batches go out through a channel, 50 rows at a time, while acknowledgements come in.
    let (tx, rx) = tokio::sync::mpsc::channel::<RecordBatch>(4);
    let sender = {
        let all = all.clone();
        tokio::spawn(async move {
            for chunk in all.chunks(50) {
                if tx.send(batch(chunk)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let input = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor()))
        .build(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok));
    let mut acks = c.do_put(input).await.unwrap();
    let mut acknowledged = 0u64;
    while let Some(ack) = acks.next().await {
        let meta: serde_json::Value = serde_json::from_slice(&ack.unwrap().app_metadata).unwrap();
        acknowledged = meta["acknowledged_rows"].as_u64().unwrap();
        if acknowledged >= 300 {
            break;
        }
    }
    assert!(
        acknowledged >= 300,
        "the put was acknowledged before the kill"
    );
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    drop(acks);
    sender.abort();

    let mut server = start(dir.path(), port);
    let mut c = client(&server).await;
    let n = reported_rows(&mut c).await;
    assert!(
        n >= acknowledged,
        "{n} rows stored, {acknowledged} were acknowledged"
    );
    let back = stored(&mut c).await;
    assert_eq!(
        back.len() as u64,
        n,
        "GetFlightInfo counts what DoGet returns"
    );
    assert_eq!(back, all[..n as usize], "a prefix, each row once, in order");
    // No temporary part is visible in the dataset folder.
    for entry in std::fs::read_dir(dir.path().join("crash")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(name.starts_with("part-"), "{name}");
    }

    // Resume from the count the server reports.
    let rest: Vec<RecordBatch> = all[n as usize..].chunks(500).map(batch).collect();
    let input = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor()))
        .build(futures::stream::iter(rest.into_iter().map(Ok)));
    let last: Vec<arrow_flight::PutResult> =
        c.do_put(input).await.unwrap().try_collect().await.unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&last.last().unwrap().app_metadata).unwrap();
    assert_eq!(meta["dataset_rows"], TOTAL as u64);
    assert_eq!(stored(&mut c).await, all);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_open_put_with_no_row_lost() {
    const TOTAL: usize = 1500;
    let dir = scratch("term");
    let port = free_port();
    let mut server = start(dir.path(), port);
    let mut c = client(&server).await;
    let all = texts(0..TOTAL);
    let (tx, rx) = tokio::sync::mpsc::channel::<RecordBatch>(4);
    let input = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor()))
        .build(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok));
    let pid = server.child.id();
    let sender = {
        let all = all.clone();
        tokio::spawn(async move {
            for (i, chunk) in all.chunks(100).enumerate() {
                tx.send(batch(chunk)).await.unwrap();
                if i == 2 {
                    // SIGTERM while the stream is open and has more to send.
                    let status = Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status()
                        .unwrap();
                    assert!(status.success());
                }
            }
        })
    };
    // The sender runs first: the server answers a put once its first message is in.
    let mut acks = c.do_put(input).await.unwrap();
    let mut acknowledged = 0;
    while let Some(ack) = acks.next().await {
        let meta: serde_json::Value = serde_json::from_slice(&ack.unwrap().app_metadata).unwrap();
        acknowledged = meta["acknowledged_rows"].as_u64().unwrap();
    }
    sender.await.unwrap();
    assert_eq!(
        acknowledged, TOTAL as u64,
        "every row acknowledged before the stop"
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "a clean exit after the drain: {status:?}");

    let mut server = start(dir.path(), port);
    let mut c = client(&server).await;
    assert_eq!(stored(&mut c).await, all);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}
