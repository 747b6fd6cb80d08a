//! A real Keel server on 127.0.0.1:0 with the real model, and a real Flight client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::{FlightClient, FlightDescriptor};
use futures::{StreamExt, TryStreamExt};
use keel_server::config::Settings;
use tokio::sync::oneshot;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// The settings it runs with.
    pub settings: Settings,
    pub metrics_addr: SocketAddr,
    /// The HTTP front (OpenAI's embeddings API).
    pub http_addr: SocketAddr,
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
        settings.embedder.cpu.workers = 2;
        let data_dir = tempfile::Builder::new()
            .prefix("keel-test-")
            .tempdir()
            .unwrap();
        settings.storage.data_dir = data_dir.path().to_path_buf();
        settings.server.listen = "127.0.0.1:0".parse().unwrap();
        edit(&mut settings);
        settings.validate().unwrap();
        let kept = settings.clone();
        let running = tokio::task::spawn_blocking(move || keel_server::app::start(settings))
            .await
            .unwrap()
            .expect("the engine starts");
        let listener = keel_server::app::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = keel_server::app::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let http = keel_server::app::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let http_addr = http.local_addr().unwrap();
        let running = running.with_http(http);
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(running.serve(listener, Some(metrics), async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            settings: kept,
            metrics_addr,
            http_addr,
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
/// Every batch of a Parquet file (a `keel produce --out`).
pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

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

#[cfg(feature = "gpu")]
/// A BERT with MiniLM's tokenizer and vocabulary but 2 layers of width 32 and
/// deterministic random weights, written as a sentence-transformers folder.
pub fn tiny_bert() -> tempfile::TempDir {
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    let src = repo_root().join("models/all-MiniLM-L6-v2");
    for file in [
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(src.join(file), dir.path().join(file)).unwrap();
    }
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    std::fs::copy(
        src.join("1_Pooling/config.json"),
        dir.path().join("1_Pooling/config.json"),
    )
    .unwrap();
    let (vocab, hidden, inter, layers, positions) =
        (30522usize, 32usize, 64usize, 2usize, 512usize);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = hidden.into();
    config["intermediate_size"] = inter.into();
    config["num_hidden_layers"] = layers.into();
    config["num_attention_heads"] = 4.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();

    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize, scale: f32, offset: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                (offset + scale * u).to_le_bytes()
            })
            .collect()
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![vocab, hidden],
            random(vocab * hidden, 0.5, 0.0),
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![positions, hidden],
            random(positions * hidden, 0.5, 0.0),
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![2, hidden],
            random(2 * hidden, 0.5, 0.0),
        ),
        (
            "embeddings.LayerNorm.weight".into(),
            vec![hidden],
            random(hidden, 0.2, 1.0),
        ),
        (
            "embeddings.LayerNorm.bias".into(),
            vec![hidden],
            random(hidden, 0.2, 0.0),
        ),
    ];
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", hidden, hidden),
            ("attention.self.key", hidden, hidden),
            ("attention.self.value", hidden, hidden),
            ("attention.output.dense", hidden, hidden),
            ("intermediate.dense", inter, hidden),
            ("output.dense", hidden, inter),
        ] {
            let scale = 2.0 / (inp as f32).sqrt();
            tensors.push((
                format!("{p}.{name}.weight"),
                vec![out, inp],
                random(out * inp, scale, 0.0),
            ));
            tensors.push((format!("{p}.{name}.bias"), vec![out], random(out, 0.1, 0.0)));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            tensors.push((
                format!("{p}.{norm}.weight"),
                vec![hidden],
                random(hidden, 0.2, 1.0),
            ));
            tensors.push((
                format!("{p}.{norm}.bias"),
                vec![hidden],
                random(hidden, 0.2, 0.0),
            ));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}
