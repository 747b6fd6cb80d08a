//! Keel, the service: settings, wiring and the Arrow Flight front end.
//!
//! - [`config`]: `Settings`, every actor's configuration composed, loaded from YAML and
//!   `KEEL_*` variables and validated once;
//! - [`app`]: starting the actors in order, serving, and stopping in reverse order;
//! - [`state`]: the [`state::ServerState`] every handler shares (pipeline, actors, datasets,
//!   auth, stream slots) and its typed stats;
//! - [`flight`]: the Flight front end, one module per job (streams, datasets, actions,
//!   auth, the error → gRPC status mapping, the client);
//! - [`input`]: input files (VCF/BCF via noodles, Parquet, Arrow IPC, CSV/TSV, text)
//!   streamed as record batches;
//! - [`metrics`]: the Prometheus endpoint (`/metrics`, `/health`, `/ready`);
//! - [`soak`]: the soak benchmark (workloads, sampling, figures, verdict, report).
//!
//! The actors live in `keel-engine`, the model in `keel-model`, the wire and text path
//! (decoding, slicing, templates, VCF text) in `keel-wire`; the command line in
//! `main.rs`. docs/ARCHITECTURE.md follows a row through all of them.

pub mod app;
pub mod config;
pub mod flight;
pub mod input;
pub mod metrics;
pub mod soak;
pub mod state;
