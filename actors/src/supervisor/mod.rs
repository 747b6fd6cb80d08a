//! The supervisor: samples memory on an interval, keeps a bounded history, and broadcasts
//! [`messages::Cleanup`] to every registered actor, timing their acknowledgements.

pub mod actor;
pub mod config;
pub mod messages;
