//! The supervisor actor: samples memory every `interval_ms` into a fixed-size ring, asks
//! its [`Thermostat`] what to do, and runs cleanups.
//!
//! A cleanup sends [`Cleanup`] to every registered member at once, waits for every ack,
//! then purges jemalloc's arenas; the total time from broadcast to the last step is
//! recorded with each member's own, in a bounded history. The decisions themselves (the
//! watermarks, creep, idle recovery) live in [`super::thermostat`], as pure functions.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use super::config::SupervisorConfig;
use super::messages::{GetMemoryReport, MemoryReport, RunCleanup};
use super::thermostat::{Cause, Thermostat};
use crate::cleanup::{Cleanup, CleanupAck, CleanupLevel, CleanupRecord};
use crate::memory::config::MemoryConfig;
use crate::memory::probe::{MemoryProbe, MemorySample};
use crate::memory::{allocator, rss_bytes};

pub struct SupervisorActor {
    config: SupervisorConfig,
    limit: u64,
    probe: Box<dyn MemoryProbe>,
    members: Vec<Recipient<Cleanup>>,
    thermostat: Thermostat,
    samples: VecDeque<MemorySample>,
    peak_rss: u64,
    cleanups: VecDeque<CleanupRecord>,
    cleanups_total: u64,
    cleanups_trim: u64,
    cleanups_gentle: u64,
    cleanups_full: u64,
    running: bool,
    /// Whether the supervisor acts on its own (`supervisor.act`).
    act: bool,
    /// Raised above the hard watermark, lowered below the soft one; ingest admits fewer
    /// rows while it is up.
    pressure: Arc<AtomicBool>,
}

impl SupervisorActor {
    /// `members` receive every cleanup broadcast; `pressure` is shared with ingest.
    pub fn new(
        config: SupervisorConfig,
        memory: MemoryConfig,
        probe: Box<dyn MemoryProbe>,
        members: Vec<Recipient<Cleanup>>,
        pressure: Arc<AtomicBool>,
    ) -> Self {
        let limit = memory.effective_limit();
        Self {
            samples: VecDeque::with_capacity(config.history),
            cleanups: VecDeque::with_capacity(config.cleanup_history),
            thermostat: Thermostat::new(config.clone(), memory, limit),
            act: config.act,
            limit,
            config,
            probe,
            members,
            peak_rss: 0,
            cleanups_total: 0,
            cleanups_trim: 0,
            cleanups_gentle: 0,
            cleanups_full: 0,
            running: false,
            pressure,
        }
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

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let s = self.sample();
        if !self.act {
            return;
        }
        let tick = self.thermostat.observe(&s, self.running);
        match tick.pressure {
            Some(true) => {
                self.pressure.store(true, Ordering::Relaxed);
                tracing::warn!(rss = s.rss, "memory pressure: admitting half as many rows");
            }
            Some(false) => {
                self.pressure.store(false, Ordering::Relaxed);
                tracing::info!(rss = s.rss, "memory pressure over");
            }
            None => {}
        }
        if let Some(c) = tick.creep {
            tracing::warn!(
                mb_per_1000_ops = c.allocated_mb_per_1000_ops,
                stderr = c.allocated_stderr,
                window_ops = c.window_ops,
                "memory creep detected"
            );
        }
        if let Some(decision) = tick.cleanup {
            if decision.level == CleanupLevel::Full || decision.cause == Cause::Creep {
                tracing::warn!(reason = %decision.reason, "full cleanup");
            }
            self.thermostat.cleaned(s.at_ms);
            let fut = self.cleanup(decision.level, decision.reason);
            ctx.spawn(fut.map(|_, _, _| ()));
        }
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
                acks.push(CleanupAck::new(
                    "allocator",
                    before.saturating_sub(allocator::stats().resident),
                    detail,
                    t.elapsed(),
                ));
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
                    CleanupLevel::Trim => act.cleanups_trim += 1,
                    CleanupLevel::Gentle => act.cleanups_gentle += 1,
                    CleanupLevel::Full => act.cleanups_full += 1,
                }
                act.running = false;
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
        if let Some(latest) = self.samples.back() {
            self.thermostat.cleaned(latest.at_ms);
        }
        self.cleanup(msg.level, msg.reason)
    }
}

impl Handler<GetMemoryReport> for SupervisorActor {
    type Result = MessageResult<GetMemoryReport>;

    fn handle(&mut self, _: GetMemoryReport, _: &mut Self::Context) -> Self::Result {
        let latest = self.sample();
        let (soft, hard) = self.thermostat.watermarks();
        MessageResult(MemoryReport {
            rss_bytes: latest.rss,
            peak_rss_bytes: self.peak_rss,
            limit_bytes: self.limit,
            pressure: self.pressure.load(Ordering::Relaxed),
            soft_bytes: soft,
            hard_bytes: hard,
            latest,
            samples: self.samples.len(),
            creep: self.thermostat.creep(),
            cleanups_total: self.cleanups_total,
            cleanups_trim: self.cleanups_trim,
            cleanups_gentle: self.cleanups_gentle,
            cleanups_full: self.cleanups_full,
            recent_cleanups: self.cleanups.iter().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    //! The decisions are the thermostat's (tested there, synchronously); these check the
    //! actor's part: a decided cleanup reaches every member and is recorded.
    use super::*;
    use std::sync::Mutex;

    /// A probe whose `allocated` grows by 10 kB per op, settled every other sample.
    struct Leaky {
        tick: u64,
    }

    impl MemoryProbe for Leaky {
        fn sample(&mut self) -> MemorySample {
            self.tick += 1;
            let ops = (self.tick / 2) * 100;
            MemorySample {
                at_ms: self.tick,
                ops,
                rss: 100_000_000 + ops * 10_000,
                allocated: 50_000_000 + ops * 10_000,
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
            MessageResult(CleanupAck::new("member", 0, String::new(), Duration::ZERO))
        }
    }

    #[test]
    fn a_creep_cleanup_reaches_every_member_and_is_recorded() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let report = actix::System::new().block_on(async move {
            let member = Member(seen2).start();
            let config = SupervisorConfig {
                interval_ms: 2,
                creep_window: 16,
                creep_min_ops: 500,
                ..Default::default()
            };
            let memory = MemoryConfig {
                limit_bytes: 1 << 40,
                cooldown_ms: 1 << 40,
                recovery_window_ms: 1 << 40,
                ..Default::default()
            };
            let probe = Box::new(Leaky { tick: 0 });
            let flag = Arc::new(AtomicBool::new(false));
            let sup =
                SupervisorActor::new(config, memory, probe, vec![member.recipient()], flag).start();
            // Poll until the cleanup is recorded (bounded: a stuck actor fails the test).
            for _ in 0..500 {
                let report = sup.send(GetMemoryReport).await.unwrap();
                if report.cleanups_total > 0 {
                    return report;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("no cleanup within 2.5 s");
        });
        assert_eq!(*seen.lock().unwrap(), vec![CleanupLevel::Full]);
        let record = &report.recent_cleanups[0];
        assert!(record.reason.starts_with("creep"), "{}", record.reason);
        let actors: Vec<&str> = record.acks.iter().map(|a| a.actor.as_str()).collect();
        assert_eq!(actors, vec!["member", "allocator"]);
        assert_eq!(report.cleanups_full, 1);
    }
}
