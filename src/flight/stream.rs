//! One stream's pipeline: `DoExchange ["embed"]` and `DoPut ["datasets", NAME]`.
//!
//! Every stream gets a reader task that owns its decoding, validation and slicing (the
//! wire crate's [`Slicer`], the same loop the fuzzer runs), admits each slice into the
//! in-flight bound before embedding it, and hands the slices' tasks on in order. The
//! writing half awaits them in that order: `DoExchange` encodes each batch back to the
//! client (the permits go back as the rows reach the encoder), `DoPut` buffers up to
//! `storage.flush_rows` rows and appends them to the dataset, acknowledging rows only
//! once they are on disk. The first error ends the stream; rows embedded before it are
//! still stored and acknowledged.

use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arrow_array::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::{FlightData, PutResult};
use futures::{FutureExt, Stream, StreamExt};
use keel_engine::ingest::config::WhenFull;
use keel_engine::ingest::output::with_embeddings;
use keel_engine::ingest::pipeline::InFlight;
use keel_engine::sink::reduce::PROJECTION_KEY;
use keel_wire::decode::{Batches, decode, panic_message};
use keel_wire::descriptor::Target;
use keel_wire::slicer::Slicer;
use keel_wire::text::TextSource;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::error;
use crate::engine::{Engine, Shape, StreamSlot};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A stream that has been admitted, its descriptor read and parsed.
pub struct OpenStream {
    slot: StreamSlot,
    target: Target,
    batches: Batches,
}

/// Admits a stream (a slot under `server.max_streams`), reads its first message and
/// parses the descriptor: the preamble `DoPut` and `DoExchange` share.
pub async fn open(engine: &Engine, mut input: Streaming<FlightData>) -> Result<OpenStream, Status> {
    let slot = engine.admit_stream().map_err(error::engine)?;
    let first = input
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the stream ended before its first message"))?;
    let (descriptor, batches) = decode(first, input);
    let target = Target::parse(
        descriptor.as_ref(),
        &engine.pipeline.config().default_text_column,
    )?;
    Ok(OpenStream {
        slot,
        target,
        batches,
    })
}

/// `DoExchange`: the rows back, in order, with their vectors.
pub fn exchange(engine: Arc<Engine>, stream: OpenStream) -> Result<BoxStream<FlightData>, Status> {
    let OpenStream {
        slot,
        target,
        batches,
    } = stream;
    let Target::Embed(request) = target else {
        return Err(Status::invalid_argument(
            "DoExchange needs the descriptor path [\"embed\"]; use DoPut for datasets",
        ));
    };
    let shape = engine.vector_shape(&request).map_err(error::engine)?;
    let rx = spawn_reader(engine.clone(), batches, request.source, shape);
    let counters = engine.pipeline.counters().clone();
    let batches = ordered_results(rx).map(move |r| {
        let _slot = &slot;
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
        .map(|r| r.map_err(Status::from));
    Ok(Box::pin(encoded))
}

/// `DoPut`: the rows appended to a dataset; each `PutResult` acknowledges rows on disk.
pub fn put(engine: Arc<Engine>, stream: OpenStream) -> Result<BoxStream<PutResult>, Status> {
    let OpenStream {
        slot,
        target,
        batches,
    } = stream;
    let Target::Dataset(name, request) = target else {
        return Err(Status::invalid_argument(
            "DoPut needs the descriptor path [\"datasets\", NAME]; use DoExchange [\"embed\"] to get rows back",
        ));
    };
    let shape = engine.vector_shape(&request).map_err(error::engine)?;
    let rx = spawn_reader(engine.clone(), batches, request.source, shape);
    let (out_tx, out_rx) = mpsc::channel::<Result<PutResult, Status>>(4);
    tokio::spawn(async move {
        let _slot = slot;
        store(&engine, &name, rx, &out_tx).await;
    });
    Ok(Box::pin(ReceiverStream::new(out_rx)))
}

/// The writing half of a `DoPut`: buffers embedded rows (bounded by
/// `storage.flush_rows`), appends them, and acknowledges what is on disk.
async fn store(
    engine: &Engine,
    name: &str,
    rx: mpsc::Receiver<Pending>,
    out: &mpsc::Sender<Result<PutResult, Status>>,
) {
    let flush_rows = engine.settings.storage.flush_rows;
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
                    && let Ok(total) = engine.sink.append(name, std::mem::take(&mut pending)).await
                {
                    acknowledged += buffered as u64;
                    let _ = out.send(Ok(put_result(acknowledged, total))).await;
                }
                let _ = out.send(Err(status)).await;
                return;
            }
            None => {}
        }
        if (buffered >= flush_rows || end) && !pending.is_empty() {
            match engine.sink.append(name, std::mem::take(&mut pending)).await {
                Ok(total) => {
                    acknowledged += buffered as u64;
                    buffered = 0;
                    if out.send(Ok(put_result(acknowledged, total))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = out.send(Err(error::sink(e))).await;
                    return;
                }
            }
        }
        if end {
            return;
        }
    }
}

/// The `app_metadata` of a `PutResult`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PutAck {
    /// Rows of this stream on disk so far.
    pub acknowledged_rows: u64,
    /// Rows of the dataset on disk.
    pub dataset_rows: u64,
}

fn put_result(acknowledged_rows: u64, dataset_rows: u64) -> PutResult {
    let ack = PutAck {
        acknowledged_rows,
        dataset_rows,
    };
    PutResult {
        app_metadata: serde_json::to_vec(&ack).unwrap_or_default().into(),
    }
}

/// One slice of a stream on its way through the pipeline, or the error that ends it.
enum Pending {
    Slice(JoinHandle<Result<(RecordBatch, InFlight), Status>>),
    Failed(Status),
}

/// A batch whose `embedding` field names the projection its vectors went through
/// (`keel.projection`), so that a stored dataset's search projects its queries alike.
fn with_projection(batch: RecordBatch, shape: &Shape) -> Result<RecordBatch, Status> {
    let Some((name, _)) = &shape.projection else {
        return Ok(batch);
    };
    let schema = batch.schema();
    let fields: Vec<arrow_schema::FieldRef> = schema
        .fields()
        .iter()
        .map(|f| {
            if f.name() == "embedding" {
                let mut metadata = f.metadata().clone();
                metadata.insert(PROJECTION_KEY.to_string(), name.clone());
                Arc::new(f.as_ref().clone().with_metadata(metadata))
            } else {
                f.clone()
            }
        })
        .collect();
    let schema = Arc::new(arrow_schema::Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    ));
    RecordBatch::try_new(schema, batch.columns().to_vec())
        .map_err(|e| Status::internal(format!("naming the projection: {e}")))
}

/// Starts a stream's reader; its slices (in order) come out of the returned channel,
/// at most `ingest.stream_parallelism` ahead of the writer. Should the reader panic (a
/// bug), the stream ends with `Internal` rather than looking complete to its client.
fn spawn_reader(
    engine: Arc<Engine>,
    batches: Batches,
    source: TextSource,
    shape: Shape,
) -> mpsc::Receiver<Pending> {
    let (tx, rx) = mpsc::channel(engine.pipeline.config().stream_parallelism);
    tokio::spawn(async move {
        let failed = tx.clone();
        if let Err(panic) = std::panic::AssertUnwindSafe(read(engine, batches, source, shape, tx))
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
    rx
}

/// The reading half of a stream: decode, validate, slice, admit, embed. Slices go to
/// `tx` in order; the first error goes there too and ends the stream.
async fn read(
    engine: Arc<Engine>,
    mut batches: Batches,
    source: TextSource,
    shape: Shape,
    tx: mpsc::Sender<Pending>,
) {
    let pipeline = engine.pipeline.clone();
    let idle = Duration::from_millis(engine.settings.server.idle_timeout_ms);
    let slice_rows = NonZeroUsize::new(pipeline.config().slice_rows)
        .expect("ingest.slice_rows is validated to be at least 1");
    let dim = pipeline.dim();
    let mut slicer = Slicer::new(source, slice_rows);
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
            Ok(Some(Err(e))) => return fail(e.into()).await,
            Ok(Some(Ok(batch))) => batch,
        };
        let slices = match slicer.slices(&batch) {
            Ok(slices) => slices,
            Err(e) => return fail(e.into()).await,
        };
        for slice in slices {
            let len = slice.num_rows();
            let admitted = if std::mem::take(&mut first_slice) {
                pipeline.try_admit(len)
            } else {
                pipeline.admit(len).await
            };
            let in_flight = match admitted {
                Ok(p) => p,
                Err(e) => return fail(error::ingest(e)).await,
            };
            let texts = match slicer.texts(&slice) {
                Ok(t) => t,
                Err(e) => return fail(e.into()).await,
            };
            let p = pipeline.clone();
            let shape = shape.clone();
            let task = tokio::spawn(async move {
                let (vectors, valid) = p.embed(texts).await.map_err(error::ingest)?;
                let (vectors, dim) = shape.apply(vectors, dim);
                let out = with_embeddings(&slice, vectors, &valid, dim, &shape.format)
                    .map_err(error::ingest)?;
                Ok((with_projection(out, &shape)?, in_flight))
            });
            if tx.send(Pending::Slice(task)).await.is_err() {
                return; // the client went away; dropping the stream cancels the rest
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
