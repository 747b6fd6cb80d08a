//! The Arrow Flight front end, one module per job:
//!
//! - [`service`]: the thin `FlightService`: authentication, then a call into the others;
//! - [`stream`]: one stream's pipeline — `DoExchange ["embed"]` (rows back with their
//!   vectors, in order) and `DoPut ["datasets", NAME]` (rows appended, each `PutResult`
//!   acknowledging rows on disk);
//! - [`datasets`]: `ListFlights`, `GetFlightInfo`, `GetSchema`, `DoGet`;
//! - [`actions`]: `DoAction` parsed once into a typed action (`stats`, `health`,
//!   `cleanup`, `search`), one handler each;
//! - [`auth`]: tokens, basic credentials, `Handshake`;
//! - [`error`]: the one mapping from Keel's errors to gRPC statuses;
//!
//! Decoding, descriptor parsing, slicing and text extraction are `keel-wire`'s.

pub mod actions;
pub mod auth;
pub mod datasets;
pub mod error;
pub mod service;
pub mod stream;
