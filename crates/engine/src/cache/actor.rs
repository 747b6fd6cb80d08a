//! The cache actor: owns the [`CacheStore`]; nothing else touches it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::{Actor, Context, Handler};

use super::config::CacheConfig;
use super::messages::{GetCacheStats, Insert, Lookup};
use super::packed::CacheStore;
use crate::cleanup::{Cleanup, CleanupAck, CleanupLevel};

pub struct CacheActor {
    cache: CacheStore,
    config: CacheConfig,
    /// The accounted bytes, published for the supervisor's probe after every change.
    bytes_gauge: Arc<AtomicU64>,
}

impl CacheActor {
    pub fn new(config: CacheConfig, bytes_gauge: Arc<AtomicU64>) -> Self {
        Self {
            cache: CacheStore::new(config.max_bytes as usize, config.precision),
            config,
            bytes_gauge,
        }
    }

    fn publish(&self) {
        self.bytes_gauge
            .store(self.cache.bytes() as u64, Ordering::Relaxed);
    }
}

impl Actor for CacheActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Room for one request per concurrent op; senders bound themselves with permits.
        ctx.set_mailbox_capacity(256);
    }
}

impl Handler<Lookup> for CacheActor {
    type Result = Vec<Option<std::sync::Arc<[f32]>>>;

    fn handle(&mut self, msg: Lookup, _: &mut Self::Context) -> Self::Result {
        if msg.recheck {
            msg.keys
                .into_iter()
                .map(|k| self.cache.recheck(k))
                .collect()
        } else {
            msg.keys.into_iter().map(|k| self.cache.get(k)).collect()
        }
    }
}

impl Handler<Insert> for CacheActor {
    type Result = ();

    fn handle(&mut self, msg: Insert, _: &mut Self::Context) {
        for (k, v) in msg.entries {
            self.cache.insert(k, v);
        }
        self.publish();
    }
}

impl Handler<GetCacheStats> for CacheActor {
    type Result = actix::MessageResult<GetCacheStats>;

    fn handle(&mut self, _: GetCacheStats, _: &mut Self::Context) -> Self::Result {
        actix::MessageResult(self.cache.stats())
    }
}

impl Handler<Cleanup> for CacheActor {
    type Result = actix::MessageResult<Cleanup>;

    fn handle(&mut self, msg: Cleanup, _: &mut Self::Context) -> Self::Result {
        tracing::debug!(level = ?msg.level, reason = %msg.reason, "cache cleanup");
        let started = std::time::Instant::now();
        let before = self.cache.bytes();
        let target = match msg.level {
            // Entries the budget allows stay; only pressure evicts.
            CleanupLevel::Trim => before,
            CleanupLevel::Full if self.config.clear_on_full_cleanup => 0,
            _ => (self.cache.max_bytes() as f64 * self.config.low_watermark) as usize,
        };
        let evicted = self.cache.shrink_to(target);
        self.publish();
        actix::MessageResult(CleanupAck::new(
            "cache",
            (before - self.cache.bytes()) as u64,
            format!("evicted {evicted} entries"),
            started.elapsed(),
        ))
    }
}
