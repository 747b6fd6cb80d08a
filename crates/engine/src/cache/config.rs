//! `cache:` section.

use keel_wire::vectors::VectorPrecision;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Byte budget of the cache: every entry's real allocations (see `store::entry_bytes`).
    /// Never exceeded. 0 disables the cache.
    pub max_bytes: u64,
    /// A gentle cleanup shrinks the cache to this fraction of `max_bytes`.
    pub low_watermark: f64,
    /// Whether a full cleanup empties the cache (otherwise it shrinks to the low watermark).
    pub clear_on_full_cleanup: bool,
    /// How vectors are kept: f32 (as computed), f16 or int8 (about 2× or 4× the entries
    /// in the same budget; hits come back within cosine 0.99999 / 0.999 of the original).
    pub precision: VectorPrecision,
    /// The second level, shared by a fleet through Redis (off unless `url` is set).
    pub shared: super::shared::SharedCacheConfig,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 100 * 1024 * 1024,
            low_watermark: 0.7,
            clear_on_full_cleanup: false,
            precision: VectorPrecision::F32,
            shared: Default::default(),
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.low_watermark) {
            return Err(format!(
                "cache.low_watermark: {} is not within 0..=1",
                self.low_watermark
            ));
        }
        if self.precision == VectorPrecision::Binary {
            return Err(
                "cache.precision: binary keeps only signs, not the vectors; use f32, f16 or int8"
                    .into(),
            );
        }
        self.shared.validate()
    }
}
