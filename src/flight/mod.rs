//! The Arrow Flight service: descriptors and tickets decoded once, then typed handlers.
//!
//! - `DoExchange ["embed"]`: rows in, the same rows plus `embedding` out, in order;
//! - `DoPut ["datasets", NAME]`: rows embedded and appended to a Parquet dataset, each
//!   `PutResult` acknowledging rows that are on disk;
//! - `DoGet NAME`, `ListFlights`, `GetFlightInfo`, `GetSchema`: datasets;
//! - `DoAction`: `stats`, `cleanup`, `health`, `search`;
//! - [`client`]: connecting as a client (the commands and the soak).
//!
//! Errors go through [`error`], the single mapping to gRPC statuses.

pub mod auth;
pub mod client;
pub mod error;
pub mod frames;
pub mod service;
