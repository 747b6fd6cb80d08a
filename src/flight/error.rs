//! The one mapping from Keel's errors to gRPC statuses, with codes chosen on purpose:
//! the client's fault → `InvalidArgument` / `NotFound`; a limit → `ResourceExhausted`;
//! shutting down → `Unavailable`; only true bugs → `Internal`.

use arrow_flight::error::FlightError;
use keel_actors::ingest::IngestError;
use keel_actors::sink::store::SinkError;
use tonic::Status;

pub fn ingest(e: IngestError) -> Status {
    match e {
        IngestError::InvalidArgument(m) => Status::invalid_argument(m),
        IngestError::ResourceExhausted(m) => Status::resource_exhausted(m),
        IngestError::Unavailable(m) => Status::unavailable(m),
        IngestError::Internal(m) => Status::internal(m),
    }
}

pub fn sink(e: SinkError) -> Status {
    match e {
        SinkError::InvalidName(_)
        | SinkError::SchemaMismatch { .. }
        | SinkError::NotSearchable(_) => Status::invalid_argument(e.to_string()),
        SinkError::NotFound(_) => Status::not_found(e.to_string()),
        SinkError::Closed => Status::unavailable(e.to_string()),
        SinkError::Io { .. } | SinkError::Parquet { .. } | SinkError::Arrow(_) => {
            Status::internal(e.to_string())
        }
    }
}

/// An error decoding what the client sent is the client's fault; a status the transport
/// produced (the client went away, a message over the size limit) is kept as it is.
pub fn client_data(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(status) => *status,
        FlightError::ProtocolError(m) if m.contains("multiple Schema messages") => {
            Status::invalid_argument(
                "the schema changed mid-stream; open a new stream for a new schema",
            )
        }
        other => Status::invalid_argument(format!("cannot decode the Arrow IPC stream: {other}")),
    }
}

/// A status carried through arrow-flight's encoder, which speaks `FlightError`.
pub fn into_flight(status: Status) -> FlightError {
    FlightError::Tonic(Box::new(status))
}
