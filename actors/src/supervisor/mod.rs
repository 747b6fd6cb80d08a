//! The supervisor: samples memory on an interval into a bounded history, fits creep, and
//! acts like a thermostat — a gentle cleanup above the soft watermark or after an idle
//! spell, a full one above the hard watermark or on creep — broadcasting
//! [`messages::Cleanup`] to every registered actor and timing their acknowledgements.

pub mod actor;
pub mod config;
pub mod messages;
pub mod probe;
