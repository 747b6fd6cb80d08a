//! The supervisor actor.
//!
//! Each tick (`interval_ms`) it takes a [`MemorySample`] into a fixed-size ring and, when
//! `act` is on, decides like a thermostat with hysteresis (no automatic cleanup within
//! `memory.cooldown_ms` of the last, and none while one runs):
//! - RSS above `memory.hard` × limit, or `allocated` creeping faster than
//!   `creep_alert_mb_per_1000_ops` → full cleanup;
//! - RSS above `memory.soft` × limit → gentle cleanup;
//! - no op for `memory.recovery_window_ms` after work, and no row in flight → one gentle
//!   cleanup, which is what hands a burst's memory back to the OS.
//!
//! A cleanup sends [`Cleanup`] to every registered actor at once, waits for every ack,
//! then purges jemalloc's arenas; the total time from broadcast to the last step is
//! recorded with each actor's own, in a bounded history.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use super::config::SupervisorConfig;
use super::messages::{
    Cleanup, CleanupAck, CleanupLevel, CleanupRecord, Creep, GetMemoryReport, MemoryReport,
    RunCleanup,
};
use super::probe::{MemoryProbe, MemorySample};
use crate::memory::config::MemoryConfig;
use crate::memory::{allocator, creep, rss_bytes};

/// Segments of the creep window whose minima the slope is fitted through.
const CREEP_SEGMENTS: usize = 8;

pub struct SupervisorActor {
    config: SupervisorConfig,
    memory: MemoryConfig,
    limit: u64,
    probe: Box<dyn MemoryProbe>,
    members: Vec<Recipient<Cleanup>>,
    samples: VecDeque<MemorySample>,
    peak_rss: u64,
    cleanups: VecDeque<CleanupRecord>,
    cleanups_total: u64,
    cleanups_gentle: u64,
    cleanups_full: u64,
    running: bool,
    last_cleanup: Option<Instant>,
    last_ops: u64,
    last_ops_change: Instant,
    idle_cleaned: bool,
    /// Samples taken before this time (ms since the epoch) do not count as evidence of
    /// creep: set when a creep cleanup starts, so that one window's evidence triggers at
    /// most one cleanup and the next alarm needs a whole new window.
    creep_evidence_from_ms: u64,
    /// Raised above the hard watermark, lowered below the soft one; ingest admits fewer
    /// rows while it is up.
    pressure: Arc<AtomicBool>,
}

impl SupervisorActor {
    /// `members` receive every cleanup broadcast.
    pub fn new(
        config: SupervisorConfig,
        memory: MemoryConfig,
        probe: Box<dyn MemoryProbe>,
        members: Vec<Recipient<Cleanup>>,
    ) -> Self {
        Self {
            samples: VecDeque::with_capacity(config.history),
            cleanups: VecDeque::with_capacity(config.cleanup_history),
            limit: memory.effective_limit(),
            config,
            memory,
            probe,
            members,
            peak_rss: 0,
            cleanups_total: 0,
            cleanups_gentle: 0,
            cleanups_full: 0,
            running: false,
            last_cleanup: None,
            last_ops: 0,
            last_ops_change: Instant::now(),
            idle_cleaned: true,
            creep_evidence_from_ms: 0,
            pressure: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Shares the memory-pressure flag with ingest.
    pub fn with_pressure_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.pressure = flag;
        self
    }

    fn sample(&mut self) -> MemorySample {
        let s = self.probe.sample();
        if self.samples.len() == self.config.history {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
        self.peak_rss = self.peak_rss.max(s.rss);
        s
    }

    /// Slopes over the last `creep_window` samples, once they span `creep_min_ops` ops.
    ///
    /// Memory in use swings with the work in flight (a pass's activations come and go),
    /// so a slope through every sample reads that sawtooth as growth. A leak raises the
    /// *floor*: the window is cut into [`CREEP_SEGMENTS`] segments and the slope is fitted
    /// through each segment's minimum (at that sample's op count). The cache's own bytes, which
    /// fill up to their budget by design, are excluded.
    fn creep(&self) -> Option<Creep> {
        // A full window only: the first minutes after start are warm-up (arenas and thread
        // caches growing to their working size), not creep.
        let n = self.config.creep_window;
        if self.samples.len() < n {
            return None;
        }
        let window: Vec<&MemorySample> = self.samples.iter().skip(self.samples.len() - n).collect();
        let (first, last) = (window.first()?, window.last()?);
        let window_ops = last.ops.saturating_sub(first.ops);
        if window_ops < self.config.creep_min_ops || window.len() < CREEP_SEGMENTS * 2 {
            return None;
        }
        const MB: f64 = 1_000_000.0;
        let floor = |f: fn(&MemorySample) -> u64| {
            let pts: Vec<(f64, f64)> = window
                .chunks(window.len().div_ceil(CREEP_SEGMENTS))
                .filter_map(|seg| {
                    let lowest = seg.iter().min_by_key(|s| f(s))?;
                    Some((lowest.ops as f64, f(lowest) as f64 / MB))
                })
                .collect();
            creep::slope(&pts)
        };
        let (alloc, alloc_se) = floor(|s| s.allocated.saturating_sub(s.cache_bytes))?;
        let (rss, _) = floor(|s| s.rss.saturating_sub(s.cache_bytes))?;
        let per_hour: Vec<(f64, f64)> = window
            .iter()
            .map(|s| {
                (
                    s.at_ms as f64 / 3_600_000.0,
                    s.rss.saturating_sub(s.cache_bytes) as f64 / MB,
                )
            })
            .collect();
        let rss_h = creep::slope(&per_hour).map(|s| s.0).unwrap_or(0.0);
        Some(Creep {
            allocated_mb_per_1000_ops: alloc * 1000.0,
            allocated_stderr: alloc_se * 1000.0,
            rss_mb_per_1000_ops: rss * 1000.0,
            rss_mb_per_hour: rss_h,
            window_ops,
            window_from_ms: first.at_ms,
        })
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let s = self.sample();
        let now = Instant::now();
        if s.ops != self.last_ops {
            self.last_ops = s.ops;
            self.last_ops_change = now;
            self.idle_cleaned = false;
        }
        if !self.config.act {
            return;
        }
        let (soft, hard) = self.watermarks();
        if s.rss > hard {
            if !self.pressure.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    rss = s.rss,
                    hard,
                    "memory pressure: admitting half as many rows"
                );
            }
        } else if s.rss < soft && self.pressure.swap(false, Ordering::Relaxed) {
            tracing::info!(rss = s.rss, soft, "memory pressure over");
        }
        if self.running {
            return;
        }
        if self
            .last_cleanup
            .is_some_and(|t| now - t < Duration::from_millis(self.memory.cooldown_ms))
        {
            return;
        }
        let decision = if s.rss > hard {
            Some((
                CleanupLevel::Full,
                format!(
                    "RSS {} MB above the hard watermark {} MB",
                    s.rss / 1_000_000,
                    hard / 1_000_000
                ),
            ))
        } else if let Some(c) = self.creep().filter(|c| {
            // Significant (three standard errors: the test runs four times a second, and
            // a noisy floor must not page anyone), and on fresh evidence.
            c.allocated_mb_per_1000_ops > self.config.creep_alert_mb_per_1000_ops
                && c.allocated_mb_per_1000_ops > 3.0 * c.allocated_stderr
                && c.window_from_ms >= self.creep_evidence_from_ms
        }) {
            self.creep_evidence_from_ms = s.at_ms + 1;
            tracing::warn!(
                mb_per_1000_ops = c.allocated_mb_per_1000_ops,
                stderr = c.allocated_stderr,
                window_ops = c.window_ops,
                "memory creep detected"
            );
            Some((
                CleanupLevel::Full,
                format!(
                    "creep: allocated grows {:.3} MB per 1000 ops",
                    c.allocated_mb_per_1000_ops
                ),
            ))
        } else if s.rss > soft {
            Some((
                CleanupLevel::Gentle,
                format!(
                    "RSS {} MB above the soft watermark {} MB",
                    s.rss / 1_000_000,
                    soft / 1_000_000
                ),
            ))
        } else if !self.idle_cleaned
            && s.in_flight_rows == 0
            && now - self.last_ops_change >= Duration::from_millis(self.memory.recovery_window_ms)
        {
            self.idle_cleaned = true;
            Some((
                CleanupLevel::Gentle,
                "idle: returning memory after work".to_string(),
            ))
        } else {
            None
        };
        if let Some((level, reason)) = decision {
            if level == CleanupLevel::Full {
                tracing::warn!(%reason, "full cleanup");
            }
            let fut = self.cleanup(level, reason);
            ctx.spawn(fut.map(|_, _, _| ()));
        }
    }

    fn watermarks(&self) -> (u64, u64) {
        (
            (self.limit as f64 * self.memory.soft) as u64,
            (self.limit as f64 * self.memory.hard) as u64,
        )
    }

    fn cleanup(
        &mut self,
        level: CleanupLevel,
        reason: String,
    ) -> ResponseActFuture<Self, CleanupRecord> {
        self.running = true;
        let rss_before = rss_bytes().unwrap_or(0);
        let started = Instant::now();
        let broadcast = Cleanup {
            level,
            reason: reason.clone(),
        };
        let sends: Vec<_> = self
            .members
            .iter()
            .map(|m| m.send(broadcast.clone()))
            .collect();
        Box::pin(
            async move {
                let mut acks = Vec::with_capacity(sends.len() + 1);
                for result in futures::future::join_all(sends).await {
                    match result {
                        Ok(ack) => acks.push(ack),
                        Err(e) => {
                            tracing::warn!(error = %e, "an actor did not acknowledge a cleanup")
                        }
                    }
                }
                // With the actors' memory freed, hand the pages back to the OS.
                let t = Instant::now();
                let before = allocator::stats().resident;
                let detail = match allocator::purge() {
                    Ok(()) => "purged all arenas".to_string(),
                    Err(e) => e,
                };
                acks.push(CleanupAck {
                    actor: "allocator",
                    freed_bytes: before.saturating_sub(allocator::stats().resident),
                    detail,
                    duration: t.elapsed(),
                });
                acks
            }
            .into_actor(self)
            .map(move |acks, act, _| {
                let record = CleanupRecord {
                    level,
                    reason,
                    acks,
                    total_micros: started.elapsed().as_micros() as u64,
                    rss_before,
                    rss_after: rss_bytes().unwrap_or(0),
                    at_ms: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0),
                };
                tracing::info!(
                    level = ?record.level,
                    reason = %record.reason,
                    total_us = record.total_micros,
                    rss_before = record.rss_before,
                    rss_after = record.rss_after,
                    "cleanup finished"
                );
                if act.cleanups.len() == act.config.cleanup_history.max(1) {
                    act.cleanups.pop_front();
                }
                act.cleanups.push_back(record.clone());
                act.cleanups_total += 1;
                match level {
                    CleanupLevel::Gentle => act.cleanups_gentle += 1,
                    CleanupLevel::Full => act.cleanups_full += 1,
                }
                act.running = false;
                act.last_cleanup = Some(Instant::now());
                record
            }),
        )
    }
}

impl Actor for SupervisorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.sample();
        ctx.run_interval(
            Duration::from_millis(self.config.interval_ms),
            |act, ctx| act.tick(ctx),
        );
    }
}

impl Handler<RunCleanup> for SupervisorActor {
    type Result = ResponseActFuture<Self, CleanupRecord>;

    fn handle(&mut self, msg: RunCleanup, _: &mut Self::Context) -> Self::Result {
        self.cleanup(msg.level, msg.reason)
    }
}

impl Handler<GetMemoryReport> for SupervisorActor {
    type Result = MessageResult<GetMemoryReport>;

    fn handle(&mut self, _: GetMemoryReport, _: &mut Self::Context) -> Self::Result {
        let latest = self.sample();
        let (soft, hard) = self.watermarks();
        MessageResult(MemoryReport {
            rss_bytes: latest.rss,
            peak_rss_bytes: self.peak_rss,
            limit_bytes: self.limit,
            pressure: self.pressure.load(Ordering::Relaxed),
            soft_bytes: soft,
            hard_bytes: hard,
            latest,
            samples: self.samples.len(),
            creep: self.creep(),
            cleanups_total: self.cleanups_total,
            cleanups_gentle: self.cleanups_gentle,
            cleanups_full: self.cleanups_full,
            recent_cleanups: self.cleanups.iter().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A probe whose `allocated` grows by `bytes_per_op` with every op: a leak.
    struct Leaky {
        ops: u64,
        bytes_per_op: u64,
    }

    impl MemoryProbe for Leaky {
        fn sample(&mut self) -> MemorySample {
            self.ops += 10;
            MemorySample {
                at_ms: self.ops,
                ops: self.ops,
                rss: 100_000_000 + self.ops * self.bytes_per_op,
                allocated: 50_000_000 + self.ops * self.bytes_per_op,
                ..Default::default()
            }
        }
    }

    /// Records every cleanup it is sent.
    struct Member(Arc<Mutex<Vec<CleanupLevel>>>);

    impl Actor for Member {
        type Context = Context<Self>;
    }

    impl Handler<Cleanup> for Member {
        type Result = MessageResult<Cleanup>;
        fn handle(&mut self, msg: Cleanup, _: &mut Self::Context) -> Self::Result {
            self.0.lock().unwrap().push(msg.level);
            MessageResult(CleanupAck {
                actor: "member",
                freed_bytes: 0,
                detail: String::new(),
                duration: Duration::ZERO,
            })
        }
    }

    fn run(bytes_per_op: u64) -> (MemoryReport, Vec<CleanupLevel>) {
        run_with_cooldown(bytes_per_op, 10_000)
    }

    fn run_with_cooldown(bytes_per_op: u64, cooldown_ms: u64) -> (MemoryReport, Vec<CleanupLevel>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let report = actix::System::new().block_on(async move {
            let member = Member(seen2).start();
            let config = SupervisorConfig {
                interval_ms: 5,
                creep_window: 20,
                creep_min_ops: 100,
                ..Default::default()
            };
            let memory = MemoryConfig {
                limit_bytes: 1 << 40,
                cooldown_ms,
                recovery_window_ms: 1 << 40,
                ..Default::default()
            };
            let probe = Box::new(Leaky {
                ops: 0,
                bytes_per_op,
            });
            let sup = SupervisorActor::new(config, memory, probe, vec![member.recipient()]).start();
            tokio::time::sleep(Duration::from_millis(400)).await;
            sup.send(GetMemoryReport).await.unwrap()
        });
        let seen = seen.lock().unwrap().clone();
        (report, seen)
    }

    #[test]
    fn an_injected_creep_triggers_one_full_cleanup_that_reaches_every_member() {
        // 10 kB per op = 10 MB per 1000 ops, far above the 1 MB alert.
        let (report, seen) = run(10_000);
        assert_eq!(
            seen,
            vec![CleanupLevel::Full],
            "one full cleanup, then the cooldown holds"
        );
        let creep = report
            .creep
            .expect("a slope once the window spans enough ops");
        assert!(
            (creep.allocated_mb_per_1000_ops - 10.0).abs() < 0.01,
            "{creep:?}"
        );
        let record = &report.recent_cleanups[0];
        assert!(record.reason.starts_with("creep"), "{}", record.reason);
        let actors: Vec<&str> = record.acks.iter().map(|a| a.actor).collect();
        assert_eq!(actors, vec!["member", "allocator"]);
        assert_eq!(report.cleanups_full, 1);
    }

    #[test]
    fn a_continuing_leak_alarms_once_per_fresh_window_not_once_per_cooldown() {
        // No cooldown: only the need for fresh evidence spaces the alarms.
        let (report, seen) = run_with_cooldown(10_000, 0);
        let window = 20u64;
        assert!(!seen.is_empty(), "a leak this large must alarm");
        assert!(seen.iter().all(|l| *l == CleanupLevel::Full));
        // A window of 20 samples must pass after each alarm: at most one per 20 samples.
        let bound = report.samples as u64 / window + 1;
        assert!(
            (seen.len() as u64) <= bound,
            "{} alarms over {} samples (bound {bound})",
            seen.len(),
            report.samples
        );
    }

    #[test]
    fn flat_memory_triggers_nothing() {
        let (report, seen) = run(0);
        assert!(seen.is_empty(), "{seen:?}");
        assert!(report.creep.unwrap().allocated_mb_per_1000_ops.abs() < 1e-9);
        assert!(report.samples > 10 && report.samples <= SupervisorConfig::default().history);
    }

    /// RSS set from outside, ops steady.
    struct Dial(Arc<std::sync::atomic::AtomicU64>);

    impl MemoryProbe for Dial {
        fn sample(&mut self) -> MemorySample {
            MemorySample {
                rss: self.0.load(Ordering::Relaxed),
                ..Default::default()
            }
        }
    }

    #[test]
    fn pressure_rises_above_hard_and_falls_below_soft_with_cleanups_in_steps() {
        let rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flag = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (rss2, flag2, seen2) = (rss.clone(), flag.clone(), seen.clone());
        actix::System::new().block_on(async move {
            let member = Member(seen2).start();
            let config = SupervisorConfig {
                interval_ms: 5,
                ..Default::default()
            };
            // limit 1000 B: soft 750, hard 900.
            let memory = MemoryConfig {
                limit_bytes: 1000,
                cooldown_ms: 0,
                recovery_window_ms: 1 << 40,
                ..Default::default()
            };
            let _sup = SupervisorActor::new(
                config,
                memory,
                Box::new(Dial(rss2.clone())),
                vec![member.recipient()],
            )
            .with_pressure_flag(flag2.clone())
            .start();
            let settle = || tokio::time::sleep(Duration::from_millis(60));
            rss2.store(800, Ordering::Relaxed); // between soft and hard
            settle().await;
            assert!(!flag2.load(Ordering::Relaxed));
            rss2.store(950, Ordering::Relaxed); // above hard
            settle().await;
            assert!(flag2.load(Ordering::Relaxed), "pressure above hard");
            rss2.store(800, Ordering::Relaxed); // hysteresis: still up between soft and hard
            settle().await;
            assert!(
                flag2.load(Ordering::Relaxed),
                "pressure stays until below soft"
            );
            rss2.store(100, Ordering::Relaxed);
            settle().await;
            assert!(!flag2.load(Ordering::Relaxed), "pressure over below soft");
        });
        let seen = seen.lock().unwrap().clone();
        assert!(seen.contains(&CleanupLevel::Gentle), "{seen:?}");
        assert!(seen.contains(&CleanupLevel::Full), "{seen:?}");
    }
}
