//! The cleanup protocol: what every actor that holds memory answers.
//!
//! The supervisor broadcasts [`Cleanup`] to every member it was given (as
//! `Recipient<Cleanup>`, so it knows no actor's type); each member frees what the level
//! allows and answers a [`CleanupAck`]. The supervisor then purges the allocator and keeps
//! a [`CleanupRecord`]. This module depends on nothing else in the crate, so the cache,
//! the embedder janitor and the supervisor can all speak it without importing each other.

use std::time::Duration;

use actix::Message;
use serde::{Deserialize, Serialize};

/// How hard a cleanup goes: part of the client contract (the `cleanup` action's level).
pub use keel_wire::contract::CleanupLevel;

/// Broadcast to every member; each answers with what it did and how long it took.
#[derive(Debug, Clone, Message)]
#[rtype(result = "CleanupAck")]
pub struct Cleanup {
    pub level: CleanupLevel,
    pub reason: String,
}

/// One member's answer to a [`Cleanup`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupAck {
    pub actor: String,
    pub freed_bytes: u64,
    pub detail: String,
    /// Time the member spent, in microseconds.
    #[serde(rename = "duration")]
    pub duration_micros: u64,
}

impl CleanupAck {
    pub fn new(actor: &str, freed_bytes: u64, detail: String, duration: Duration) -> Self {
        Self {
            actor: actor.to_string(),
            freed_bytes,
            detail,
            duration_micros: duration.as_micros() as u64,
        }
    }
}

/// One finished cleanup: its reason, every member's acknowledgement and the total time
/// from broadcast to last ack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupRecord {
    pub level: CleanupLevel,
    pub reason: String,
    pub acks: Vec<CleanupAck>,
    pub total_micros: u64,
    pub rss_before: u64,
    pub rss_after: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}
