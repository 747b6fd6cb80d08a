//! From `FlightData` messages to record batches, with arrow-flight's own decoder.
//!
//! The first message carries the stream's descriptor (and, from arrow-rs and pyarrow, the
//! schema), so it is read apart and then put back in front of the rest: `DoPut` must not
//! lose it. Messages with an empty data header are skipped (pyarrow's `do_exchange` opens
//! with one; a zero-row batch still has a header). arrow-ipc's reader can panic on a
//! malformed message (a buffer offset past the body, found by fuzzing): such a panic is
//! the client's malformed input, answered with `Invalid`, and ends the stream.

use std::pin::Pin;

use arrow_array::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightData, FlightDescriptor};
use futures::{Stream, StreamExt, TryStreamExt, stream};

use crate::WireError;

/// Decoded record batches of one stream, each or an error that ends it.
pub type Batches = Pin<Box<dyn Stream<Item = Result<RecordBatch, WireError>> + Send + 'static>>;

/// The first message's descriptor, and the batches of the whole stream.
pub fn decode(
    first: FlightData,
    rest: impl Stream<Item = Result<FlightData, tonic::Status>> + Send + 'static,
) -> (Option<FlightDescriptor>, Batches) {
    let descriptor = first.flight_descriptor.clone();
    let data = stream::once(async move { Ok(first) })
        .chain(rest)
        .try_filter(|m| futures::future::ready(!m.data_header.is_empty()))
        .map_err(|s| FlightError::Tonic(Box::new(s)));
    let batches = std::panic::AssertUnwindSafe(FlightRecordBatchStream::new_from_flight_data(data))
        .catch_unwind()
        .map(|r| match r {
            Ok(Ok(batch)) => Ok(batch),
            Ok(Err(e)) => Err(client_data(e)),
            Err(panic) => Err(WireError::Invalid(format!(
                "cannot decode the Arrow IPC stream: malformed message ({})",
                panic_message(&panic)
            ))),
        });
    (descriptor, Box::pin(batches))
}

/// An error decoding what the client sent is the client's fault; a status the transport
/// produced (the client went away, a message over the size limit) is kept as it is.
fn client_data(e: FlightError) -> WireError {
    match e {
        FlightError::Tonic(status) => WireError::Transport(status),
        FlightError::ProtocolError(m) if m.contains("multiple Schema messages") => {
            WireError::invalid("the schema changed mid-stream; open a new stream for a new schema")
        }
        other => WireError::Invalid(format!("cannot decode the Arrow IPC stream: {other}")),
    }
}

/// The message of a caught panic, for the status that reports it.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
