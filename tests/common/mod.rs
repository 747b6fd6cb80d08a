//! A real Keel server on 127.0.0.1:0 with the real model, and a real Flight client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::{FlightClient, FlightDescriptor};
use futures::{StreamExt, TryStreamExt};
use keel::config::Settings;
use tokio::sync::oneshot;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// The settings it runs with.
    pub settings: Settings,
    pub metrics_addr: SocketAddr,
    /// The server's storage.data_dir (held so that it is removed when the server drops).
    _data_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with the default settings changed by `edit`.
    pub async fn start(edit: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = Settings::default();
        settings.embedder.model_dir = repo_root().join("models/all-MiniLM-L6-v2");
        assert!(
            settings
                .embedder
                .model_dir
                .join("model.safetensors")
                .exists(),
            "model missing: run scripts/fetch-model.sh"
        );
        settings.embedder.workers = 2;
        let data_dir = tempfile::Builder::new()
            .prefix("keel-test-")
            .tempdir()
            .unwrap();
        settings.storage.data_dir = data_dir.path().to_path_buf();
        settings.server.listen = "127.0.0.1:0".parse().unwrap();
        edit(&mut settings);
        settings.validate().unwrap();
        let kept = settings.clone();
        let running = tokio::task::spawn_blocking(move || keel::app::start(settings))
            .await
            .unwrap()
            .expect("the engine starts");
        let listener = keel::app::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = keel::app::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(running.serve(listener, Some(metrics), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            settings: kept,
            metrics_addr,
            _data_dir: data_dir,
            stop: Some(stop),
            done: Some(done),
        }
    }

    pub async fn client(&self) -> FlightClient {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connects");
        FlightClient::new(channel)
    }

    /// Stops the server (with the grace period) and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(30), d)
                .await
                .expect("the server stops in time")
                .unwrap()
                .unwrap();
        }
    }
}

pub fn text_batch(texts: &[Option<&str>]) -> RecordBatch {
    let ids: Vec<i64> = (0..texts.len() as i64).collect();
    RecordBatch::try_from_iter_with_nullable([
        (
            "id",
            Arc::new(arrow_array::Int64Array::from(ids)) as ArrayRef,
            false,
        ),
        (
            "text",
            Arc::new(StringArray::from(texts.to_vec())) as ArrayRef,
            true,
        ),
    ])
    .unwrap()
}

/// Sends `batches` on a DoExchange with `descriptor`; returns every batch received.
pub async fn exchange(
    client: &mut FlightClient,
    descriptor: FlightDescriptor,
    batches: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>, tonic::Status> {
    let input = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor))
        .build(futures::stream::iter(batches.into_iter().map(Ok)));
    let stream = client.do_exchange(input).await.map_err(to_status)?;
    stream.map_err(to_status).try_collect().await
}

/// Sends each batch with its own schema message, as a client that changes schema
/// mid-stream would (arrow-flight's encoder refuses to do that itself).
pub async fn exchange_raw(
    client: &mut FlightClient,
    descriptor: FlightDescriptor,
    batches: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>, tonic::Status> {
    let mut parts = Vec::new();
    for (i, b) in batches.into_iter().enumerate() {
        let enc = FlightDataEncoderBuilder::new()
            .with_flight_descriptor((i == 0).then(|| descriptor.clone()))
            .build(futures::stream::iter([Ok(b)]));
        parts.push(enc);
    }
    let input = futures::stream::iter(parts).flatten();
    let stream = client.do_exchange(input).await.map_err(to_status)?;
    stream.map_err(to_status).try_collect().await
}

/// The `text` column of `batches`, in order.
pub fn texts_of(batches: &[RecordBatch]) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let t = b
                .column_by_name("text")
                .expect("a text column")
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("text is Utf8");
            (0..b.num_rows())
                .map(|i| t.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

pub fn to_status(e: arrow_flight::error::FlightError) -> tonic::Status {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => *s,
        other => tonic::Status::unknown(other.to_string()),
    }
}

pub async fn action(client: &mut FlightClient, kind: &str, body: &str) -> serde_json::Value {
    let mut results = client
        .do_action(arrow_flight::Action::new(kind, body.as_bytes().to_vec()))
        .await
        .unwrap();
    let bytes = results.next().await.unwrap().unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

pub fn embed_path() -> FlightDescriptor {
    FlightDescriptor::new_path(vec!["embed".into()])
}
