//! Keel's server: settings, wiring and the Arrow Flight front end. The client tools (input
//! readers, producers, the soak) are `keel-client`; the command line is the `keel`
//! binary, which links both.
//!
//! - [`config`]: `Settings`, every actor's configuration composed, loaded from YAML and
//!   `KEEL_*` variables and validated once;
//! - [`app`]: starting the actors in order, serving, and stopping in reverse order;
//! - [`state`]: the [`state::ServerState`] every handler shares (pipeline, actors, datasets,
//!   auth, stream slots) and its typed stats;
//! - [`flight`]: the Flight front end, one module per job (streams, datasets, actions,
//!   auth, the error → gRPC status mapping);
//! - [`http`]: the HTTP front (OpenAI's `/v1/embeddings`, TEI's `/embed`, `/health`,
//!   `/info`) on the same engine;
//! - [`metrics`]: the Prometheus endpoint (`/metrics`, `/health`, `/ready`).
//!
//! The actors live in `keel-engine`, the model in `keel-model`, the wire and text path
//! (decoding, slicing, templates, VCF text) and the client contract in `keel-wire`. docs/ARCHITECTURE.md follows a row through all of them.

pub mod app;
pub mod config;
pub mod flight;
pub mod http;
pub mod metrics;
pub mod state;
