//! Messages the cache actor answers.

use std::sync::Arc;

use actix::Message;

use super::store::CacheStats;

/// Looks keys up; one answer per key, in order. Counts hits and misses.
#[derive(Message)]
#[rtype(result = "Vec<Option<Arc<[f32]>>>")]
pub struct Lookup {
    pub keys: Vec<u128>,
    /// A second look at keys already counted as misses: counts nothing.
    pub recheck: bool,
}

/// Stores freshly computed vectors.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Insert {
    pub entries: Vec<(u128, Arc<[f32]>)>,
}

/// The cache's counters and size.
#[derive(Message)]
#[rtype(result = "CacheStats")]
pub struct GetCacheStats;
