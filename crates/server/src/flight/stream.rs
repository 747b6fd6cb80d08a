//! One stream's pipeline: `DoExchange ["embed"]` and `DoPut ["datasets", NAME]`.
//!
//! Every stream gets an ingestion actor ([`IngestActor`], a task of its own) that owns its
//! decoding, validation and slicing (the wire crate's [`Slicer`], which the fuzzer's
//! `keel_wire::validate` drives too), admits each slice into the in-flight bound before
//! embedding it, and hands the slices' tasks on in order. The
//! writing half awaits them in that order: `DoExchange` encodes each batch back to the
//! client (the permits go back as the rows reach the encoder), `DoPut` buffers up to
//! `storage.flush_rows` rows and appends them to the dataset, acknowledging rows only
//! once they are on disk. The first error ends the stream; rows embedded before it are
//! still stored and acknowledged, unless the error is the client going away.

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
use keel_wire::contract::PutAck;
use keel_wire::decode::{Batches, decode, panic_message};
use keel_wire::descriptor::Target;
use keel_wire::slicer::Slicer;
use keel_wire::text::TextSource;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Code, Status, Streaming};

use super::error;
use crate::state::{ServerState, Shape, StreamSlot};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A stream that has been admitted, its descriptor read and parsed.
pub struct OpenStream {
    slot: StreamSlot,
    target: Target,
    batches: Batches,
}

/// Admits a stream (a slot under `server.max_streams`), reads its first message and
/// parses the descriptor: the preamble `DoPut` and `DoExchange` share.
pub async fn open(
    engine: &ServerState,
    mut input: Streaming<FlightData>,
) -> Result<OpenStream, Status> {
    let slot = engine.admit_stream().map_err(error::server)?;
    // A client that opens a stream and never sends would hold its slot for good: the
    // first message gets the same wait as every later one (server.idle_timeout_ms).
    let idle = Duration::from_millis(engine.settings.server.idle_timeout_ms);
    let first = tokio::time::timeout(idle, input.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "no first message for {} ms (server.idle_timeout_ms)",
                idle.as_millis()
            ))
        })??
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
pub fn exchange(
    engine: Arc<ServerState>,
    stream: OpenStream,
) -> Result<BoxStream<FlightData>, Status> {
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
    let shape = engine.vector_shape(&request).map_err(error::server)?;
    let rx = spawn_reader(engine.clone(), batches, request.source, shape);
    let counters = engine.pipeline.counters().clone();
    let batches = ordered_results(rx).map(move |r| {
        let _slot = &slot;
        match r {
            // The permits go back as the rows are handed to the encoder.
            Ok((batch, _in_flight)) => Ok(batch),
            Err(Ended { status, .. }) => {
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
pub fn put(engine: Arc<ServerState>, stream: OpenStream) -> Result<BoxStream<PutResult>, Status> {
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
    let shape = engine.vector_shape(&request).map_err(error::server)?;
    let expect = request.expect_rows;
    let rx = spawn_reader(engine.clone(), batches, request.source, shape);
    let (out_tx, out_rx) = mpsc::channel::<Result<PutResult, Status>>(4);
    tokio::spawn(async move {
        let _slot = slot;
        store(&engine, &name, expect, rx, &out_tx).await;
    });
    Ok(Box::pin(ReceiverStream::new(out_rx)))
}

/// The writing half of a `DoPut`: buffers embedded rows (bounded by
/// `storage.flush_rows`), appends them, and acknowledges what is on disk. A client that
/// goes away (its acknowledgements no longer read, or its side of the stream broken) gets
/// nothing more: its queued slices are dropped (their embedding jobs with them) and rows
/// it was never acknowledged are not appended, so a producer that reconnects and resends
/// from the dataset's row count stores each row once.
async fn store(
    engine: &ServerState,
    name: &str,
    mut expect: Option<u64>,
    rx: mpsc::Receiver<Pending>,
    out: &mpsc::Sender<Result<PutResult, Status>>,
) {
    let flush_rows = engine.settings.storage.flush_rows;
    let mut results = Box::pin(ordered_results(rx));
    let mut pending: Vec<RecordBatch> = Vec::new();
    let (mut buffered, mut acknowledged) = (0usize, 0u64);
    // Rows of `pending` counted in the buffers' shared budget (their permits given back),
    // and the permits of those the budget had no room for (kept until written).
    let mut budget = BufferBudget::new(engine);
    let mut held: Vec<InFlight> = Vec::new();
    loop {
        let next = tokio::select! {
            next = results.next() => next,
            () = out.closed() => return,
        };
        let end = next.is_none();
        match next {
            Some(Ok((batch, in_flight))) => {
                // Embedded rows wait in this stream's buffer (bounded by
                // storage.flush_rows, and all streams' by ingest.max_in_flight_rows),
                // not in the pipeline: their permits go back. Rows over the shared
                // budget keep theirs and are written at once.
                if budget.take(batch.num_rows()) {
                    drop(in_flight);
                } else {
                    held.push(in_flight);
                }
                buffered += batch.num_rows();
                pending.push(batch);
            }
            Some(Err(Ended { status, departed })) => {
                engine
                    .pipeline
                    .counters()
                    .streams_failed
                    .fetch_add(1, Ordering::Relaxed);
                if departed || out.is_closed() {
                    // Its status still goes out, should the client be there to read it.
                    let _ = out.send(Err(status)).await;
                    return;
                }
                // Rows embedded before the error are still stored and acknowledged.
                if !pending.is_empty()
                    && let Ok(total) = engine
                        .datasets
                        .append(name, std::mem::take(&mut pending), expect)
                        .await
                {
                    acknowledged += buffered as u64;
                    let _ = out.send(Ok(put_result(acknowledged, total))).await;
                }
                let _ = out.send(Err(status)).await;
                return;
            }
            None => {}
        }
        if (buffered >= flush_rows || end || !held.is_empty()) && !pending.is_empty() {
            let appended = engine
                .datasets
                .append(name, std::mem::take(&mut pending), expect)
                .await;
            budget.release();
            held.clear();
            match appended {
                Ok(total) => {
                    // The next part follows this one: none other in between.
                    expect = expect.map(|_| total);
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

/// One `DoPut` stream's share of the rows buffered by all streams
/// ([`ServerState::put_buffered_rows`], at most `ingest.max_in_flight_rows`): given back
/// when its rows are written, or when the stream ends, however it ends.
struct BufferBudget<'a> {
    engine: &'a ServerState,
    rows: usize,
}

impl<'a> BufferBudget<'a> {
    fn new(engine: &'a ServerState) -> Self {
        Self { engine, rows: 0 }
    }

    /// Counts `rows` more in the shared budget if they fit; false if they do not.
    fn take(&mut self, rows: usize) -> bool {
        let limit = self.engine.pipeline.config().max_in_flight_rows;
        let fits = self
            .engine
            .put_buffered_rows
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + rows <= limit).then_some(held + rows)
            })
            .is_ok();
        if fits {
            self.rows += rows;
        }
        fits
    }

    fn release(&mut self) {
        self.engine
            .put_buffered_rows
            .fetch_sub(std::mem::take(&mut self.rows), Ordering::AcqRel);
    }
}

impl Drop for BufferBudget<'_> {
    fn drop(&mut self) {
        self.release();
    }
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
/// Dropping a slice aborts its task: when a client leaves, the stream's pending slices
/// are dropped with it, their embedder jobs lose their requester, and the workers skip
/// them (`stats.embedder.dropped_jobs`).
enum Pending {
    Slice(AbortOnDropHandle<Result<(RecordBatch, InFlight), Status>>),
    Failed(Status),
    /// The client's side of the stream broke: it went away.
    Departed(Status),
}

/// Why a stream's results ended before its last row.
struct Ended {
    status: Status,
    /// The client went away (its side of the stream broke).
    departed: bool,
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

/// Starts a stream's ingestion actor; its slices (in order) come out of the returned
/// channel, at most `ingest.stream_parallelism` ahead of the writer. Should the actor
/// panic (a bug), the stream ends with `Internal` rather than looking complete to its
/// client.
fn spawn_reader(
    engine: Arc<ServerState>,
    batches: Batches,
    source: TextSource,
    shape: Shape,
) -> mpsc::Receiver<Pending> {
    let (tx, rx) = mpsc::channel(engine.pipeline.config().stream_parallelism);
    let failed = tx.clone();
    let actor = IngestActor::new(engine, source, shape, tx);
    tokio::spawn(async move {
        if let Err(panic) = std::panic::AssertUnwindSafe(actor.run(batches))
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

/// The ingestion actor of one stream. Its mailbox is the client's stream of decoded
/// messages (record batches, in order); for each it validates and slices, admits every
/// slice into the in-flight bound, starts the slice's embedding (cache lookups, embedder
/// jobs) and sends it on, in order, to the stream's writer. It ends at the client's last
/// message, at the first error (sent on as the stream's status), or when the writer is
/// gone (the client left).
struct IngestActor {
    engine: Arc<ServerState>,
    slicer: Slicer,
    shape: Shape,
    dim: usize,
    /// With `when_full: reject` a stream's first slice must find room at once.
    first_slice: bool,
    out: mpsc::Sender<Pending>,
}

/// What became of one message.
enum Handled {
    /// Its slices went on; read the next.
    Next,
    /// The writer is gone (the client left): stop quietly.
    Gone,
}

impl IngestActor {
    fn new(
        engine: Arc<ServerState>,
        source: TextSource,
        shape: Shape,
        out: mpsc::Sender<Pending>,
    ) -> Self {
        let pipeline = &engine.pipeline;
        let slice_rows = NonZeroUsize::new(pipeline.config().slice_rows)
            .expect("ingest.slice_rows is validated to be at least 1");
        Self {
            slicer: Slicer::new(source, slice_rows),
            dim: pipeline.dim(),
            first_slice: pipeline.config().when_full == WhenFull::Reject,
            engine,
            shape,
            out,
        }
    }

    /// Reads the mailbox until the stream ends; the first error is the stream's status.
    async fn run(mut self, mut mailbox: Batches) {
        let idle = Duration::from_millis(self.engine.settings.server.idle_timeout_ms);
        loop {
            let handled = match tokio::time::timeout(idle, mailbox.next()).await {
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no message for {} ms (server.idle_timeout_ms)",
                    idle.as_millis()
                ))),
                Ok(None) => return,
                // The client's side broke: cancelled (CANCEL), reset with an error
                // (INTERNAL_ERROR reads as Internal), or its connection lost (Unknown). A
                // message over the size limit (OutOfRange) is answered like any other
                // error.
                Ok(Some(Err(keel_wire::WireError::Transport(status))))
                    if matches!(
                        status.code(),
                        Code::Cancelled | Code::Unknown | Code::Internal | Code::Unavailable
                    ) =>
                {
                    let _ = self.out.send(Pending::Departed(*status)).await;
                    return;
                }
                Ok(Some(Err(e))) => Err(e.into()),
                Ok(Some(Ok(batch))) => self.handle(&batch).await,
            };
            match handled {
                Ok(Handled::Next) => {}
                Ok(Handled::Gone) => return,
                Err(status) => {
                    let _ = self.out.send(Pending::Failed(status)).await;
                    return;
                }
            }
        }
    }

    /// One record batch: its slices admitted, their embedding started, sent on in order.
    async fn handle(&mut self, batch: &RecordBatch) -> Result<Handled, Status> {
        let pipeline = self.engine.pipeline.clone();
        for slice in self.slicer.slices(batch)? {
            let len = slice.num_rows();
            let admitted = if std::mem::take(&mut self.first_slice) {
                pipeline.try_admit(len)
            } else {
                pipeline.admit(len).await
            };
            let in_flight = admitted.map_err(error::ingest)?;
            let texts = self.slicer.texts(&slice)?;
            let (p, shape, dim) = (pipeline.clone(), self.shape.clone(), self.dim);
            let task = AbortOnDropHandle::new(tokio::spawn(async move {
                let (vectors, valid) = p.embed(texts).await.map_err(error::ingest)?;
                let (vectors, dim) = shape.apply(vectors, dim);
                let out = with_embeddings(&slice, vectors, &valid, dim, &shape.format)
                    .map_err(error::ingest)?;
                Ok((with_projection(out, &shape)?, in_flight))
            }));
            if self.out.send(Pending::Slice(task)).await.is_err() {
                // The client went away: the unsent slice's task is aborted.
                return Ok(Handled::Gone);
            }
        }
        Ok(Handled::Next)
    }
}

/// Awaits pending slices in order; ends after the first error.
fn ordered_results(
    rx: mpsc::Receiver<Pending>,
) -> impl Stream<Item = Result<(RecordBatch, InFlight), Ended>> {
    let failed = |status| Ended {
        status,
        departed: false,
    };
    ReceiverStream::new(rx)
        .then(move |p| async move {
            match p {
                Pending::Failed(s) => Err(failed(s)),
                Pending::Departed(status) => Err(Ended {
                    status,
                    departed: true,
                }),
                Pending::Slice(h) => match h.await {
                    Ok(r) => r.map_err(failed),
                    Err(e) => Err(failed(Status::internal(format!(
                        "a slice task failed: {e}"
                    )))),
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
