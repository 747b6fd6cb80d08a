//! The vector cache: a byte-budgeted LRU of sentence vectors, owned by an actix actor.
//!
//! [`store::VectorCache`] is the plain data structure (testable without actors);
//! [`packed::CacheStore`] keeps one in the configured precision (f32, f16, int8);
//! [`actor::CacheActor`] owns that and answers [`messages`]; [`shared::SharedCache`] is the
//! optional second level in Redis, shared by a fleet. Keys are 128-bit hashes of
//! (model id, output settings, text) made by [`key`], so a changed model or setting can
//! never serve a stale vector.

pub mod actor;
pub mod config;
pub mod messages;
pub mod packed;
pub mod shared;
pub mod store;

/// The cache key of `text` under a model and its output settings.
pub fn key(model_id: &str, settings: &str, text: &str) -> u128 {
    use xxhash_rust::xxh3::Xxh3;
    let mut h = Xxh3::new();
    // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    for part in [model_id, settings, text] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.digest128()
}
