//! The one mapping from Keel's errors to gRPC statuses, with codes chosen on purpose:
//! the client's fault → `InvalidArgument` / `NotFound`; a limit → `ResourceExhausted`;
//! shutting down → `Unavailable`; only true bugs → `Internal`. (What the client sent is
//! `keel_wire::WireError`, which converts itself: `InvalidArgument`, or the transport's
//! own status.)

use arrow_flight::error::FlightError;
use keel_engine::ingest::IngestError;
use keel_engine::sink::store::SinkError;
use tonic::Status;

use crate::state::ServerError;

pub fn ingest(e: IngestError) -> Status {
    match e {
        IngestError::ResourceExhausted(m) => Status::resource_exhausted(m),
        IngestError::Unavailable(m) => Status::unavailable(m),
        IngestError::Internal(m) => Status::internal(m),
    }
}

pub fn sink(e: SinkError) -> Status {
    match e {
        SinkError::InvalidName(_)
        | SinkError::SchemaMismatch { .. }
        | SinkError::NotSearchable(_)
        | SinkError::Invalid(_) => Status::invalid_argument(e.to_string()),
        SinkError::OverBudget(_) => Status::resource_exhausted(e.to_string()),
        SinkError::Busy(_) | SinkError::Conflict(_) | SinkError::OtherModel(_) => {
            Status::failed_precondition(e.to_string())
        }
        SinkError::NotFound(_) => Status::not_found(e.to_string()),
        SinkError::Exists(_) => Status::already_exists(e.to_string()),
        SinkError::Closed => Status::unavailable(e.to_string()),
        SinkError::Io { .. }
        | SinkError::Parquet { .. }
        | SinkError::Arrow(_)
        | SinkError::Failed(_) => Status::internal(e.to_string()),
    }
}

pub fn server(e: ServerError) -> Status {
    match e {
        ServerError::TooManyStreams(_) => Status::resource_exhausted(e.to_string()),
        ServerError::ShuttingDown | ServerError::ActorGone(..) => {
            Status::unavailable(e.to_string())
        }
        ServerError::Sink(e) => sink(e),
        ServerError::Task(_) => Status::internal(e.to_string()),
        ServerError::Invalid(_) => Status::invalid_argument(e.to_string()),
    }
}

/// A status carried through arrow-flight's encoder, which speaks `FlightError`.
pub fn into_flight(status: Status) -> FlightError {
    FlightError::Tonic(Box::new(status))
}
