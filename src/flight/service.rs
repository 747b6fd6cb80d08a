//! `FlightService` for Keel. Every stream gets its own task that owns its decoding,
//! validation, slicing, in-flight permits and in-order reassembly; the pipeline, cache,
//! embedder and sink are shared through the [`Engine`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use arrow_ipc::writer::IpcWriteOptions;
use arrow_schema::SchemaRef;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt, stream};
use keel_actors::ingest::config::WhenFull;
use keel_actors::ingest::output::with_embeddings;
use keel_actors::ingest::pipeline::InFlight;
use keel_actors::ingest::source::{EmbedCommand, TextSource};
use keel_actors::sink::store::{DatasetInfo, DatasetStore};
use keel_actors::supervisor::messages::{CleanupLevel, RunCleanup};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::error;
use crate::app::Engine;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Rows per batch when a dataset is streamed back.
const DO_GET_BATCH_ROWS: usize = 8192;

pub struct KeelFlight {
    engine: Arc<Engine>,
}

impl KeelFlight {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    /// The `search` action: embeds the query text (through the cache, like any row),
    /// then scans the dataset on a blocking thread for the `k` nearest rows by cosine.
    async fn search(&self, body: &[u8]) -> Result<serde_json::Value, Status> {
        let max_k = self.engine.settings.server.search_max_k;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            dataset: String,
            text: String,
            #[serde(default = "ten")]
            k: usize,
        }
        fn ten() -> usize {
            10
        }
        let body: Body = serde_json::from_slice(body).map_err(|e| {
            Status::invalid_argument(format!(
                "bad search body ({e}); send {{\"dataset\": NAME, \"text\": \"...\", \"k\": 10}}"
            ))
        })?;
        if body.k == 0 || body.k > max_k {
            return Err(Status::invalid_argument(format!(
                "search: k must be within 1..={max_k} (server.search_max_k), got {}",
                body.k
            )));
        }
        DatasetStore::validate_name(&body.dataset).map_err(error::sink)?;
        let pipeline = &self.engine.pipeline;
        let vector = {
            let _in_flight = pipeline.admit(1).await.map_err(error::ingest)?;
            pipeline
                .embed(vec![Some(body.text.clone())])
                .await
                .map_err(error::ingest)?
                .0
        };
        let store = self.engine.sink.store().clone();
        let (dataset, k) = (body.dataset.clone(), body.k);
        let found = tokio::task::spawn_blocking(move || {
            keel_actors::sink::search::nearest(&store, &dataset, &vector, k)
        })
        .await
        .map_err(|e| Status::internal(format!("search task failed: {e}")))?
        .map_err(error::sink)?;
        let mut writer = arrow_json::ArrayWriter::new(Vec::new());
        writer
            .write(&found.batch)
            .and_then(|()| writer.finish())
            .map_err(|e| Status::internal(format!("encoding search results: {e}")))?;
        let json = writer.into_inner();
        let results: serde_json::Value = if json.is_empty() {
            serde_json::json!([])
        } else {
            serde_json::from_slice(&json).map_err(|e| Status::internal(e.to_string()))?
        };
        Ok(serde_json::json!({
            "dataset": body.dataset,
            "text": body.text,
            "k": body.k,
            "scanned_rows": found.scanned_rows,
            "results": results,
        }))
    }
}

/// What a stream's descriptor asks for.
enum Target {
    Embed(TextSource),
    Dataset(String, TextSource),
}

fn parse_descriptor(d: Option<&FlightDescriptor>, default_column: &str) -> Result<Target, Status> {
    let d = d.ok_or_else(|| {
        Status::invalid_argument("the first message carries no flight descriptor")
    })?;
    let source = |cmd: &[u8]| {
        EmbedCommand::parse(cmd)
            .and_then(|c| TextSource::from_command(&c, default_column))
            .map_err(error::ingest)
    };
    match DescriptorType::try_from(d.r#type) {
        Ok(DescriptorType::Path) => {
            let path: Vec<&str> = d.path.iter().map(String::as_str).collect();
            match path.as_slice() {
                ["embed"] => Ok(Target::Embed(source(&d.cmd)?)),
                ["embed", cmd] => Ok(Target::Embed(source(cmd.as_bytes())?)),
                ["datasets", name] => {
                    DatasetStore::validate_name(name).map_err(error::sink)?;
                    Ok(Target::Dataset(name.to_string(), source(&d.cmd)?))
                }
                ["datasets", name, cmd] => {
                    DatasetStore::validate_name(name).map_err(error::sink)?;
                    Ok(Target::Dataset(name.to_string(), source(cmd.as_bytes())?))
                }
                _ => Err(Status::invalid_argument(format!(
                    "unknown descriptor path {path:?}; use [\"embed\"] or [\"datasets\", NAME]"
                ))),
            }
        }
        Ok(DescriptorType::Cmd) => Ok(Target::Embed(source(&d.cmd)?)),
        _ => Err(Status::invalid_argument("unknown descriptor type")),
    }
}

/// Reads the first message (for its descriptor), then decodes the rest as record batches.
async fn open_stream(
    mut input: Streaming<FlightData>,
) -> Result<(Option<FlightDescriptor>, BoxStream<RecordBatch>), Status> {
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the stream ended before its first message"))?;
    Ok(decode(first, input))
}

/// The first message's descriptor, and the batches of the whole stream. Messages with an
/// empty data header (pyarrow's `do_exchange` opens with one) are skipped.
fn decode(
    first: FlightData,
    rest: impl Stream<Item = Result<FlightData, Status>> + Send + 'static,
) -> (Option<FlightDescriptor>, BoxStream<RecordBatch>) {
    let descriptor = first.flight_descriptor.clone();
    let data = stream::once(async move { Ok(first) })
        .chain(rest)
        .try_filter(|m| futures::future::ready(!m.data_header.is_empty()))
        .map_err(|s| FlightError::Tonic(Box::new(s)));
    // arrow-ipc's reader can panic on a malformed message (a buffer offset past the
    // body, found by fuzzing): a panic while decoding is the client's malformed input,
    // answered with InvalidArgument, and ends the stream.
    let batches = std::panic::AssertUnwindSafe(FlightRecordBatchStream::new_from_flight_data(data))
        .catch_unwind()
        .map(|r| match r {
            Ok(Ok(batch)) => Ok(batch),
            Ok(Err(e)) => Err(error::client_data(e)),
            Err(panic) => Err(Status::invalid_argument(format!(
                "cannot decode the Arrow IPC stream: malformed message ({})",
                panic_message(&panic)
            ))),
        });
    (descriptor, Box::pin(batches))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Runs a stream's reader; should it panic (a bug), the stream ends with `Internal`
/// rather than looking complete to its client.
fn spawn_reader(
    engine: Arc<Engine>,
    batches: BoxStream<RecordBatch>,
    source: TextSource,
    tx: mpsc::Sender<Pending>,
) {
    tokio::spawn(async move {
        let failed = tx.clone();
        if let Err(panic) = std::panic::AssertUnwindSafe(engine.read_stream(batches, source, tx))
            .catch_unwind()
            .await
        {
            let message = panic_message(&panic);
            tracing::error!(%message, "a stream's reader panicked");
            let _ = failed
                .send(Pending::Failed(Status::internal(format!(
                    "the stream's reader failed ({message}); this is a bug, please report it"
                ))))
                .await;
        }
    });
}

/// What every incoming batch must pass before any of its rows is admitted: the text
/// source binds to the first batch's schema, and later batches keep that schema.
fn check_batch(
    source: &TextSource,
    schema: &mut Option<SchemaRef>,
    batch: &RecordBatch,
) -> Result<(), Status> {
    match schema {
        None => {
            source.bind(&batch.schema()).map_err(error::ingest)?;
            *schema = Some(batch.schema());
            Ok(())
        }
        Some(s) if s.fields() != batch.schema().fields() => Err(Status::invalid_argument(
            "the schema changed mid-stream; open a new stream for a new schema",
        )),
        Some(_) => Ok(()),
    }
}

/// The path from raw `FlightData` to validated micro-batch texts, with no network, model
/// or server: the same decoding, descriptor parsing, schema checks, slicing and text
/// extraction a stream gets. For fuzzing (`fuzz/`) and tests.
pub async fn validate_messages(
    messages: Vec<FlightData>,
    default_text_column: &str,
    slice_rows: usize,
) -> Result<Vec<Vec<Option<String>>>, Status> {
    let mut messages = messages.into_iter();
    let first = messages
        .next()
        .ok_or_else(|| Status::invalid_argument("the stream ended before its first message"))?;
    let (descriptor, mut batches) = decode(first, stream::iter(messages.map(Ok)));
    let source = match parse_descriptor(descriptor.as_ref(), default_text_column)? {
        Target::Embed(source) | Target::Dataset(_, source) => source,
    };
    let mut schema = None;
    let mut out = Vec::new();
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        check_batch(&source, &mut schema, &batch)?;
        let mut offset = 0;
        while offset < batch.num_rows() {
            let len = slice_rows.max(1).min(batch.num_rows() - offset);
            out.push(
                source
                    .texts(&batch.slice(offset, len))
                    .map_err(error::ingest)?,
            );
            offset += len;
        }
    }
    Ok(out)
}

/// One slice of a stream on its way through the pipeline, or the error that ends it.
enum Pending {
    Slice(JoinHandle<Result<(RecordBatch, InFlight), Status>>),
    Failed(Status),
}

impl Engine {
    /// A dataset's description, read off the async workers.
    async fn dataset(&self, name: String) -> Result<DatasetInfo, Status> {
        let store = self.sink.store().clone();
        tokio::task::spawn_blocking(move || store.info(&name))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(error::sink)
    }

    /// The reading half of a stream: decode, validate, slice, admit, embed. Slices go to
    /// `tx` in order; the first error goes there too and ends the stream.
    async fn read_stream(
        self: Arc<Self>,
        mut batches: BoxStream<RecordBatch>,
        source: TextSource,
        tx: mpsc::Sender<Pending>,
    ) {
        let pipeline = self.pipeline.clone();
        let idle = Duration::from_millis(self.settings.server.idle_timeout_ms);
        let slice_rows = pipeline.config().slice_rows;
        let dim = pipeline.dim();
        let mut schema: Option<SchemaRef> = None;
        // With `when_full: reject` a stream's first slice must find room at once.
        let mut first_slice = pipeline.config().when_full == WhenFull::Reject;
        let fail = |status: Status| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Pending::Failed(status)).await;
            }
        };
        loop {
            let batch = match tokio::time::timeout(idle, batches.next()).await {
                Err(_) => {
                    return fail(Status::deadline_exceeded(format!(
                        "no message for {} ms (server.idle_timeout_ms)",
                        idle.as_millis()
                    )))
                    .await;
                }
                Ok(None) => return,
                Ok(Some(Err(status))) => return fail(status).await,
                Ok(Some(Ok(batch))) => batch,
            };
            if let Err(status) = check_batch(&source, &mut schema, &batch) {
                return fail(status).await;
            }
            let rows = batch.num_rows();
            let mut offset = 0;
            loop {
                let len = slice_rows.min(rows - offset);
                let slice = batch.slice(offset, len);
                let admitted = if std::mem::take(&mut first_slice) {
                    pipeline.try_admit(len)
                } else {
                    pipeline.admit(len).await
                };
                let in_flight = match admitted {
                    Ok(p) => p,
                    Err(e) => return fail(error::ingest(e)).await,
                };
                let texts = match source.texts(&slice) {
                    Ok(t) => t,
                    Err(e) => return fail(error::ingest(e)).await,
                };
                let p = pipeline.clone();
                let task = tokio::spawn(async move {
                    let (vectors, valid) = p.embed(texts).await.map_err(error::ingest)?;
                    let out =
                        with_embeddings(&slice, vectors, &valid, dim).map_err(error::ingest)?;
                    Ok((out, in_flight))
                });
                if tx.send(Pending::Slice(task)).await.is_err() {
                    return; // the client went away; dropping the stream cancels the rest
                }
                offset += len;
                if offset >= rows {
                    break;
                }
            }
        }
    }
}

/// Awaits pending slices in order; ends after the first error.
fn ordered_results(
    rx: mpsc::Receiver<Pending>,
) -> impl Stream<Item = Result<(RecordBatch, InFlight), Status>> {
    ReceiverStream::new(rx)
        .then(|p| async move {
            match p {
                Pending::Failed(s) => Err(s),
                Pending::Slice(h) => match h.await {
                    Ok(r) => r,
                    Err(e) => Err(Status::internal(format!("a slice task failed: {e}"))),
                },
            }
        })
        .scan(false, |failed, r| {
            if *failed {
                return futures::future::ready(None);
            }
            *failed = r.is_err();
            futures::future::ready(Some(r))
        })
}

fn dataset_info(info: &DatasetInfo) -> Result<FlightInfo, Status> {
    FlightInfo::new()
        .try_with_schema(&info.schema)
        .map_err(|e| Status::internal(e.to_string()))
        .map(|fi| {
            fi.with_descriptor(FlightDescriptor::new_path(vec![
                "datasets".into(),
                info.name.clone(),
            ]))
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(info.name.clone())))
            .with_total_records(info.rows as i64)
            .with_total_bytes(info.bytes as i64)
            .with_ordered(true)
        })
}

fn dataset_name(d: &FlightDescriptor) -> Result<&str, Status> {
    match d.path.as_slice() {
        [kind, name] if kind == "datasets" => Ok(name),
        _ => Err(Status::invalid_argument(
            "expected the descriptor path [\"datasets\", NAME]",
        )),
    }
}

#[tonic::async_trait]
impl FlightService for KeelFlight {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let token = self.engine.auth.handshake(request.metadata())?;
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        };
        let mut response: Response<Self::HandshakeStream> =
            Response::new(Box::pin(stream::once(async move { Ok(reply) })));
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("an issued token is not a valid header"))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.engine.auth.check(request.metadata())?;
        let store = self.engine.sink.store().clone();
        let infos = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(error::sink)?;
        let flights: Vec<Result<FlightInfo, Status>> = infos.iter().map(dataset_info).collect();
        Ok(Response::new(Box::pin(stream::iter(flights))))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.engine.auth.check(request.metadata())?;
        let name = dataset_name(request.get_ref())?.to_string();
        let info = self.engine.dataset(name).await?;
        Ok(Response::new(dataset_info(&info)?))
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        self.engine.auth.check(request.metadata())?;
        Err(Status::unimplemented(
            "datasets are described by GetFlightInfo",
        ))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        self.engine.auth.check(request.metadata())?;
        let name = dataset_name(request.get_ref())?.to_string();
        let info = self.engine.dataset(name).await?;
        let options = IpcWriteOptions::default();
        let result: SchemaResult = SchemaAsIpc::new(&info.schema, &options)
            .try_into()
            .map_err(|e: arrow_schema::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(result))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        self.engine.auth.check(request.metadata())?;
        let name = String::from_utf8(request.into_inner().ticket.to_vec())
            .map_err(|_| Status::invalid_argument("the ticket is not a UTF-8 dataset name"))?;
        let store = self.engine.sink.store().clone();
        let info = self.engine.dataset(name.clone()).await?;
        let (tx, rx) = mpsc::channel::<Result<RecordBatch, FlightError>>(2);
        tokio::task::spawn_blocking(move || {
            let result = store.read(&name, DO_GET_BATCH_ROWS, |b| {
                tx.blocking_send(Ok(b))
                    .map_err(|_| keel_actors::sink::store::SinkError::Closed)
            });
            if let Err(e) = result
                && !matches!(e, keel_actors::sink::store::SinkError::Closed)
            {
                let _ = tx.blocking_send(Err(error::into_flight(error::sink(e))));
            }
        });
        let encoded = FlightDataEncoderBuilder::new()
            .with_schema(info.schema.clone())
            .build(ReceiverStream::new(rx))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(encoded)))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        self.engine.auth.check(request.metadata())?;
        let stream_permit = self.engine.admit_stream()?;
        let (descriptor, batches) = open_stream(request.into_inner()).await?;
        let Target::Dataset(name, source) = parse_descriptor(
            descriptor.as_ref(),
            &self.engine.pipeline.config().default_text_column,
        )?
        else {
            return Err(Status::invalid_argument(
                "DoPut needs the descriptor path [\"datasets\", NAME]; use DoExchange [\"embed\"] to get rows back",
            ));
        };
        let engine = self.engine.clone();
        let parallelism = engine.pipeline.config().stream_parallelism;
        let (tx, rx) = mpsc::channel(parallelism);
        spawn_reader(engine.clone(), batches, source, tx);
        let (out_tx, out_rx) = mpsc::channel::<Result<PutResult, Status>>(4);
        let flush_rows = engine.settings.storage.flush_rows;
        tokio::spawn(async move {
            let _stream_permit = stream_permit;
            let mut results = Box::pin(ordered_results(rx));
            let mut pending: Vec<RecordBatch> = Vec::new();
            let (mut buffered, mut acknowledged) = (0usize, 0u64);
            loop {
                let next = results.next().await;
                let end = next.is_none();
                match next {
                    Some(Ok((batch, in_flight))) => {
                        // Embedded rows wait in this stream's buffer (bounded by
                        // storage.flush_rows), not in the pipeline: release their permits.
                        drop(in_flight);
                        buffered += batch.num_rows();
                        pending.push(batch);
                    }
                    Some(Err(status)) => {
                        engine
                            .pipeline
                            .counters()
                            .streams_failed
                            .fetch_add(1, Ordering::Relaxed);
                        // Rows embedded before the error are still stored and acknowledged.
                        if !pending.is_empty()
                            && let Ok(total) = engine
                                .sink
                                .append(&name, std::mem::take(&mut pending))
                                .await
                        {
                            acknowledged += buffered as u64;
                            let _ = out_tx.send(Ok(put_result(acknowledged, total))).await;
                        }
                        let _ = out_tx.send(Err(status)).await;
                        return;
                    }
                    None => {}
                }
                if (buffered >= flush_rows || end) && !pending.is_empty() {
                    match engine
                        .sink
                        .append(&name, std::mem::take(&mut pending))
                        .await
                    {
                        Ok(total) => {
                            acknowledged += buffered as u64;
                            buffered = 0;
                            if out_tx
                                .send(Ok(put_result(acknowledged, total)))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = out_tx.send(Err(error::sink(e))).await;
                            return;
                        }
                    }
                }
                if end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.engine.auth.check(request.metadata())?;
        let stream_permit = self.engine.admit_stream()?;
        let (descriptor, batches) = open_stream(request.into_inner()).await?;
        let Target::Embed(source) = parse_descriptor(
            descriptor.as_ref(),
            &self.engine.pipeline.config().default_text_column,
        )?
        else {
            return Err(Status::invalid_argument(
                "DoExchange needs the descriptor path [\"embed\"]; use DoPut for datasets",
            ));
        };
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel(engine.pipeline.config().stream_parallelism);
        spawn_reader(engine.clone(), batches, source, tx);
        let counters = engine.pipeline.counters().clone();
        let batches = ordered_results(rx).map(move |r| {
            let _keep = &stream_permit;
            match r {
                // The permits go back as the rows are handed to the encoder.
                Ok((batch, _in_flight)) => Ok(batch),
                Err(status) => {
                    counters.streams_failed.fetch_add(1, Ordering::Relaxed);
                    Err(error::into_flight(status))
                }
            }
        });
        let encoded = FlightDataEncoderBuilder::new()
            .with_max_flight_data_size(engine.settings.server.max_message_bytes / 2)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(Box::pin(encoded)))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        self.engine.auth.check(request.metadata())?;
        let action = request.into_inner();
        let body = match action.r#type.as_str() {
            "stats" => serde_json::to_vec(&self.engine.stats().await?),
            "health" => serde_json::to_vec(&serde_json::json!({
                "status": if self.engine.is_closing() { "shutting_down" } else { "ok" },
                "model": self.engine.pipeline.embedder().model_id(),
                "dim": self.engine.pipeline.dim(),
            })),
            "cleanup" => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Body {
                    #[serde(default)]
                    level: Option<CleanupLevel>,
                }
                let level = if action.body.iter().all(|b| b.is_ascii_whitespace()) {
                    CleanupLevel::Gentle
                } else {
                    serde_json::from_slice::<Body>(&action.body)
                        .map_err(|e| Status::invalid_argument(format!("bad cleanup body: {e}")))?
                        .level
                        .unwrap_or(CleanupLevel::Gentle)
                };
                let record = self
                    .engine
                    .supervisor
                    .send(RunCleanup {
                        level,
                        reason: "requested by the cleanup action".into(),
                    })
                    .await
                    .map_err(|e| Status::unavailable(format!("supervisor unavailable: {e}")))?;
                serde_json::to_vec(&record)
            }
            "search" => serde_json::to_vec(&self.search(&action.body).await?),
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action {other:?}; actions: stats, cleanup, health, search"
                )));
            }
        }
        .map_err(|e| Status::internal(e.to_string()))?;
        let result = arrow_flight::Result { body: body.into() };
        Ok(Response::new(Box::pin(stream::once(
            async move { Ok(result) },
        ))))
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.engine.auth.check(request.metadata())?;
        let actions = [
            ("stats", "JSON: memory, cache, embedder, ops, rows, in-flight rows, recent cleanups"),
            ("cleanup", "Run a cleanup now; body {\"level\": \"gentle\"|\"full\"}; returns each actor's duration"),
            ("health", "JSON: status, model, dimension"),
            ("search", "Nearest rows of a dataset by cosine; body {\"dataset\": NAME, \"text\": \"...\", \"k\": 10}"),
        ]
        .map(|(t, d)| {
            Ok(ActionType {
                r#type: t.into(),
                description: d.into(),
            })
        });
        Ok(Response::new(Box::pin(stream::iter(actions))))
    }
}

fn put_result(acknowledged: u64, dataset_rows: u64) -> PutResult {
    let meta =
        serde_json::json!({ "acknowledged_rows": acknowledged, "dataset_rows": dataset_rows });
    PutResult {
        app_metadata: serde_json::to_vec(&meta).unwrap_or_default().into(),
    }
}
