//! `memory:` section: the budget the supervisor steers by, and the allocator's settings.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// The process's memory budget in bytes. 0 = half of the cgroup limit, or of the
    /// machine's memory where there is no cgroup limit.
    pub limit_bytes: u64,
    /// Above this fraction of the limit (RSS), a gentle cleanup.
    pub soft: f64,
    /// Above this fraction of the limit, a full cleanup.
    pub hard: f64,
    /// The GPU memory budget in bytes (reserved by burn's pool); above `soft` × it a
    /// gentle cleanup, above `hard` × it a full one, both returning the pool's free pages.
    /// 0 = no device watermarks.
    pub device_limit_bytes: u64,
    /// After a cleanup, no other automatic one for this long (hysteresis).
    pub cooldown_ms: u64,
    /// After this long without ops, one trim cleanup gives memory back (allocator pages,
    /// pooled device memory; the cache keeps its entries: only pressure evicts).
    pub recovery_window_ms: u64,
    /// jemalloc background purging threads.
    pub background_thread: bool,
    /// jemalloc: how long freed pages stay dirty before being returned (ms; -1 = never).
    pub dirty_decay_ms: i64,
    /// jemalloc: how long pages stay muzzy (ms; 0 = return at once).
    pub muzzy_decay_ms: i64,
    /// Folder the `heap-profile` action writes jemalloc heap profiles to (`None`: the
    /// action is refused). Profiles are sampled only in a process started with
    /// `_RJEM_MALLOC_CONF=prof:true` (docs/OPERATIONS.md, "Heap profiles").
    pub heap_profile_dir: Option<std::path::PathBuf>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            limit_bytes: 0,
            soft: 0.75,
            hard: 0.9,
            device_limit_bytes: 0,
            cooldown_ms: 5_000,
            recovery_window_ms: 2_000,
            background_thread: true,
            dirty_decay_ms: 1_000,
            muzzy_decay_ms: 0,
            heap_profile_dir: None,
        }
    }
}

impl MemoryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0 < self.soft && self.soft < self.hard && self.hard <= 1.0) {
            return Err(format!(
                "memory.soft ({}) and memory.hard ({}) must satisfy 0 < soft < hard <= 1",
                self.soft, self.hard
            ));
        }
        if self.dirty_decay_ms < -1 || self.muzzy_decay_ms < -1 {
            return Err("memory.dirty_decay_ms / memory.muzzy_decay_ms: -1 or more".into());
        }
        Ok(())
    }

    /// The budget in bytes: `limit_bytes`, or half of the cgroup's or machine's memory.
    pub fn effective_limit(&self) -> u64 {
        if self.limit_bytes > 0 {
            return self.limit_bytes;
        }
        super::available_memory().map(|m| m / 2).unwrap_or(4 << 30)
    }
}
