//! The supervisor: samples memory on an interval into a bounded history and acts like a
//! thermostat — a gentle cleanup above the soft watermark or after an idle spell, a full
//! one above the hard watermark or on creep — broadcasting [`crate::cleanup::Cleanup`] to
//! every registered member and timing their acknowledgements.
//!
//! - [`thermostat`]: the decisions, pure (samples in, pressure and cleanups out);
//! - [`actor`]: the actix actor that samples, asks the thermostat, and runs cleanups;
//! - [`messages`]: what it answers (`RunCleanup`, `GetMemoryReport`).

pub mod actor;
pub mod config;
pub mod messages;
pub mod thermostat;
