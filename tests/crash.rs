//! Crash safety of datasets, with the real binary: `kill -9` in the middle of a `DoPut`
//! loses no acknowledged row, leaves nothing half-written, and the producer resumes from
//! the count `GetFlightInfo` reports; SIGTERM drains an open stream with no row lost;
//! `keel produce` retries through kills and resumes, in DoPut and DoExchange alike.

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

/// A server whose test panicked is not left running.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        .env("KEEL_HTTP__ENABLED", "false")
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
    // No temporary part is visible in the dataset folder (beside the parts: the record
    // of the model that made them).
    for entry in std::fs::read_dir(dir.path().join("crash")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(name.starts_with("part-") || name == "model.json", "{name}");
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
    // The first 300 rows go at once; the rest wait until the server has taken the put and
    // been sent SIGTERM, so the signal finds the stream open with more to come. (Signalled
    // before the put is taken, the server rightly refuses it: Unavailable, shutting down.)
    let (go, gone) = tokio::sync::oneshot::channel::<()>();
    let sender = {
        let all = all.clone();
        tokio::spawn(async move {
            let mut gone = Some(gone);
            for (i, chunk) in all.chunks(100).enumerate() {
                if i == 3 {
                    gone.take().unwrap().await.unwrap();
                }
                tx.send(batch(chunk)).await.unwrap();
            }
        })
    };
    // The server answers a put once its first message is in: the stream is open.
    let mut acks = c.do_put(input).await.unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    go.send(()).unwrap();
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

// `keel produce` across server kills: retries with back-off, resumes from what the server
// holds, and refuses to resume onto rows of another input.

/// A CSV of `n` rows, `id` 0.. and a text drawn from a small pool (so that a restarted
/// server's empty cache fills again quickly and the test spends its time on the kills).
fn id_csv(path: &Path, n: usize, tag: &str) {
    let mut s = String::from("id,text\n");
    for i in 0..n {
        s.push_str(&format!("{i},{tag} variant {} missense\n", i % 150));
    }
    std::fs::write(path, s).unwrap();
}

fn produce_cmd(port: u16, input: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
    c.args(["produce", "--input"])
        .arg(input)
        .args(["--to", &format!("grpc://127.0.0.1:{port}")])
        .args(["--rows-per-batch", "250", "--retry-for", "3m"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// The ids of a stored dataset, in stored order.
async fn stored_ids(c: &mut FlightClient, name: &str) -> Vec<i64> {
    let batches: Vec<RecordBatch> = c
        .do_get(Ticket::new(name.to_string()))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    ids_of(&batches)
}

fn ids_of(batches: &[RecordBatch]) -> Vec<i64> {
    let mut out = Vec::new();
    for b in batches {
        let col = arrow_cast::cast(
            b.column_by_name("id").unwrap(),
            &arrow_schema::DataType::Int64,
        )
        .unwrap();
        let ids = col
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .unwrap();
        out.extend(ids.values().iter().copied());
    }
    out
}

/// Waits until `progress` (polled every 100 ms) reaches `at_least`.
async fn wait_for(what: &str, at_least: u64, mut progress: impl AsyncFnMut() -> u64) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let n = progress().await;
        if n >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {n} < {at_least} after 240 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rows_seen(server: &Server) -> u64 {
    let mut c = client(server).await;
    let stats: serde_json::Value = {
        let mut r = c
            .do_action(arrow_flight::Action::new("stats", Vec::new()))
            .await
            .unwrap();
        serde_json::from_slice(&r.next().await.unwrap().unwrap()).unwrap()
    };
    stats["rows"].as_u64().unwrap()
}

/// SIGKILL, a second and a half down, and a new server on the same port and data.
async fn restart(mut server: Server, data_dir: &Path, port: u16) -> Server {
    kill(&mut server);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    start(data_dir, port)
}

fn kill(server: &mut Server) {
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
}

fn finish(mut producer: std::process::Child) -> (bool, String) {
    let mut stderr = String::new();
    std::io::Read::read_to_string(producer.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let status = producer.wait().unwrap();
    (status.success(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_retries_through_two_kills_and_stores_every_row_once_in_order() {
    const TOTAL: usize = 20_000;
    let dir = scratch("retry-put");
    let input = dir.path().join("rows.csv");
    id_csv(&input, TOTAL, "put");
    let port = free_port();
    let mut server = start(dir.path(), port);
    let producer = produce_cmd(port, &input)
        .args([
            "--dataset",
            "ingest",
            "--resume",
            "--retries",
            "20",
            "--rate",
            "4000",
        ])
        .spawn()
        .unwrap();
    for kill_at in [3_000, 9_000] {
        let mut c = client(&server).await;
        wait_for("stored rows", kill_at, async || {
            dataset_rows(&mut c, "ingest").await
        })
        .await;
        server = restart(server, dir.path(), port).await;
    }
    let (ok, stderr) = finish(producer);
    assert!(ok, "keel produce failed:\n{stderr}");
    assert!(
        stderr.contains("went away after") && stderr.contains("retrying in"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("h2 protocol error"),
        "raw transport errors stay in the debug log:\n{stderr}"
    );
    let mut c = client(&server).await;
    assert_eq!(
        stored_ids(&mut c, "ingest").await,
        (0..TOTAL as i64).collect::<Vec<_>>()
    );
    kill(&mut server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_exchange_retries_through_two_kills_and_writes_every_row_once() {
    const TOTAL: usize = 20_000;
    let dir = scratch("retry-exchange");
    let input = dir.path().join("rows.csv");
    let out = dir.path().join("out.parquet");
    id_csv(&input, TOTAL, "exchange");
    let port = free_port();
    let mut server = start(dir.path(), port);
    let producer = produce_cmd(port, &input)
        .args(["--exchange", "--out"])
        .arg(&out)
        .args(["--retries", "20", "--rate", "4000"])
        .spawn()
        .unwrap();
    for kill_at in [3_000, 5_000] {
        wait_for("rows embedded", kill_at, async || rows_seen(&server).await).await;
        server = restart(server, dir.path(), port).await;
    }
    let (ok, stderr) = finish(producer);
    assert!(ok, "keel produce failed:\n{stderr}");
    assert!(
        stderr.contains("went away after") && stderr.contains("rows were returned"),
        "{stderr}"
    );
    let batches = crate::common::read_parquet(&out);
    assert_eq!(ids_of(&batches), (0..TOTAL as i64).collect::<Vec<_>>());
    let nulls: usize = batches
        .iter()
        .map(|b| b.column_by_name("embedding").unwrap().null_count())
        .sum();
    assert_eq!(nulls, 0, "every row has its vector");
    kill(&mut server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_is_refused_onto_another_inputs_rows_and_a_lost_server_says_how_to_go_on() {
    let dir = scratch("resume-refused");
    let (a, b) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
    id_csv(&a, 300, "first");
    id_csv(&b, 600, "second");
    let port = free_port();
    let mut server = start(dir.path(), port);
    let run = |input: &Path, extra: &[&str]| {
        let out = produce_cmd(port, input).args(extra).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stderr) = run(&a, &["--dataset", "d"]);
    assert!(ok, "{stderr}");
    // Resuming the same input onto its complete dataset sends nothing more.
    let (ok, stderr) = run(&a, &["--dataset", "d", "--resume"]);
    assert!(ok, "{stderr}");
    let mut c = client(&server).await;
    assert_eq!(stored_ids(&mut c, "d").await, (0..300).collect::<Vec<_>>());
    // Another file's rows are not this input's first rows.
    let (ok, stderr) = run(&b, &["--dataset", "d", "--resume"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot resume") && stderr.contains("text"),
        "{stderr}"
    );
    assert_eq!(stored_ids(&mut c, "d").await.len(), 300, "nothing appended");

    // No retries and the server gone: the message says what is stored and what to do.
    let producer = produce_cmd(port, &b)
        .args(["--dataset", "e", "--retries", "0", "--rate", "200"])
        .spawn()
        .unwrap();
    wait_for("stored rows", 100, async || dataset_rows(&mut c, "e").await).await;
    kill(&mut server);
    let (ok, stderr) = finish(producer);
    assert!(!ok);
    assert!(
        stderr.contains("stopped: ")
            && stderr.contains("of 600 rows stored")
            && stderr.contains("--resume"),
        "{stderr}"
    );
}

async fn dataset_rows(c: &mut FlightClient, name: &str) -> u64 {
    match c
        .get_flight_info(FlightDescriptor::new_path(vec![
            "datasets".into(),
            name.into(),
        ]))
        .await
    {
        Ok(info) => info.total_records.max(0) as u64,
        Err(_) => 0,
    }
}

/// `--exchange --out` that gives up (no retries, the server killed) leaves a readable
/// Parquet file holding exactly the rows its message says came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_that_gives_up_leaves_a_readable_file_of_the_rows_that_came_back() {
    let dir = scratch("exchange-gives-up");
    let input = dir.path().join("rows.csv");
    let out = dir.path().join("out.parquet");
    id_csv(&input, 20_000, "given-up");
    let port = free_port();
    let mut server = start(dir.path(), port);
    let producer = produce_cmd(port, &input)
        .args(["--exchange", "--out"])
        .arg(&out)
        .args(["--retries", "0", "--rate", "2000"])
        .spawn()
        .unwrap();
    wait_for("rows embedded", 1_000, async || rows_seen(&server).await).await;
    kill(&mut server);
    let (ok, stderr) = finish(producer);
    assert!(!ok, "the producer gives up");
    let came_back: usize = stderr
        .split("stopped: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("says how many rows came back: {stderr}"));
    assert!(stderr.contains("rows came back and are in"), "{stderr}");
    assert!(came_back > 0, "{stderr}");
    let batches = crate::common::read_parquet(&out);
    assert_eq!(ids_of(&batches), (0..came_back as i64).collect::<Vec<_>>());
}
