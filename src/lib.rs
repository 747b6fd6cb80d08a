//! Keel, the service: settings, wiring and the Arrow Flight front end.
//!
//! - [`config`]: `Settings`, every actor's configuration composed, loaded from YAML and
//!   `KEEL_*` variables and validated once;
//! - [`app`]: starting the actors in order, serving, and stopping in reverse order;
//! - [`flight`]: the `FlightService` and the one error → gRPC status mapping;
//! - [`input`]: input files (VCF/BCF via noodles, Parquet, Arrow IPC, CSV/TSV, text)
//!   streamed as record batches;
//! - [`metrics`]: the Prometheus endpoint (`/metrics`, `/health`, `/ready`);
//! - [`soak`]: the soak benchmark (workloads, sampling, figures, verdict, report).
//!
//! The actors and the model live in the `keel-actors` crate; the command line in
//! `main.rs`.

pub mod app;
pub mod config;
pub mod flight;
pub mod input;
pub mod metrics;
pub mod soak;
