//! Keel's client tools, apart from the server: what the `keel` binary's client commands
//! (`produce`, `search`, `action`, `index`, `texts`, `soak`) are made of.
//!
//! - [`flight`]: connecting to a Keel server as a Flight client (TLS, tokens, retries while
//!   it starts) and calling its actions;
//! - [`input`]: input files (VCF/BCF via noodles, Parquet, Arrow IPC, CSV/TSV, text)
//!   streamed as record batches;
//! - [`soak`]: the soak benchmark (workloads, sampling, figures, verdict, report, plots),
//!   which drives servers started in its own process.
//!
//! The requests and answers themselves are the client contract, `keel_wire::contract`.

pub mod flight;
pub mod input;
pub mod soak;
