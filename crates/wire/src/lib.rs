//! Keel's wire and text path: everything between the bytes a client sends and the text
//! each row is embedded as. It never links the model (burn) or the actors, so the fuzz
//! targets that drive it build in minutes, and the server and the fuzzer run the same code.
//!
//! - [`contract`]: the client contract: descriptor builders, the actions' bodies and
//!   answers, `DoPut` acknowledgements (the server and every client use these types);
//! - [`descriptor`]: what a stream asks for (`["embed"]`, `["datasets", NAME]`), parsed once
//!   into a [`descriptor::Target`]; dataset names;
//! - [`decode`]: `FlightData` → record batches, malformed IPC answered, never a panic;
//! - [`slicer`]: from decoded batches to slices and their texts (schema checks, slicing
//!   into `slice_rows`, text extraction): the one implementation the server's ingestion
//!   actor and [`validate`] (the fuzz entry point) both call, batch by batch;
//! - [`text`]: the JSON command and the [`text::TextSource`] (a column or a template);
//! - [`template`]: `{field}` templates; [`variants`]: annotated VCF records as fields;
//! - [`vectors`]: the precision and dimensions vectors are written in (f32, f16, int8,
//!   binary; Matryoshka truncation), their Arrow types, encoding and decoding;
//! - [`frames`]: a byte framing of `FlightData` streams for fuzzing and its corpus.
//!
//! Errors are one [`WireError`]; it converts into the `tonic::Status` the client sees.

pub mod contract;
pub mod decode;
pub mod descriptor;
pub mod frames;
pub mod slicer;
pub mod template;
pub mod text;
pub mod validate;
pub mod variants;
pub mod vectors;

/// Why what a client sent cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Malformed input: a bad descriptor, command, template, schema or IPC message.
    #[error("{0}")]
    Invalid(String),
    /// A status from the transport (the client went away, a message over the size
    /// limit), kept as it came.
    #[error("{}", .0.message())]
    Transport(Box<tonic::Status>),
    /// A bug: something that valid and invalid input alike must never reach.
    #[error("{0}")]
    Internal(String),
}

impl WireError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Invalid(m) => tonic::Status::invalid_argument(m),
            WireError::Transport(status) => *status,
            WireError::Internal(m) => tonic::Status::internal(m),
        }
    }
}
