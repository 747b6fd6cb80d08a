//! The supervisor actor.
//!
//! Every `interval_ms` it reads RSS into a fixed-size ring. On [`RunCleanup`] it sends
//! [`Cleanup`] to every registered actor at once, waits for all acknowledgements, and
//! records the total time from broadcast to last ack. History is bounded: `history`
//! samples and `cleanup_history` cleanups.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use super::config::SupervisorConfig;
use super::messages::{Cleanup, CleanupRecord, GetMemoryReport, MemoryReport, RunCleanup};
use crate::memory::rss_bytes;

pub struct SupervisorActor {
    config: SupervisorConfig,
    members: Vec<Recipient<Cleanup>>,
    samples: VecDeque<(Instant, u64)>,
    peak_rss: u64,
    cleanups: VecDeque<CleanupRecord>,
    cleanups_total: u64,
}

impl SupervisorActor {
    /// `members` receive every cleanup broadcast.
    pub fn new(config: SupervisorConfig, members: Vec<Recipient<Cleanup>>) -> Self {
        Self {
            samples: VecDeque::with_capacity(config.history),
            cleanups: VecDeque::with_capacity(config.cleanup_history),
            config,
            members,
            peak_rss: 0,
            cleanups_total: 0,
        }
    }

    fn sample(&mut self) {
        let rss = rss_bytes().unwrap_or(0);
        if self.samples.len() == self.config.history {
            self.samples.pop_front();
        }
        self.samples.push_back((Instant::now(), rss));
        self.peak_rss = self.peak_rss.max(rss);
    }
}

impl Actor for SupervisorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.sample();
        ctx.run_interval(Duration::from_millis(self.config.interval_ms), |act, _| {
            act.sample()
        });
    }
}

impl Handler<RunCleanup> for SupervisorActor {
    type Result = ResponseActFuture<Self, CleanupRecord>;

    fn handle(&mut self, msg: RunCleanup, _: &mut Self::Context) -> Self::Result {
        let rss_before = rss_bytes().unwrap_or(0);
        let started = Instant::now();
        let broadcast = Cleanup {
            level: msg.level,
            reason: msg.reason.clone(),
        };
        let sends: Vec<_> = self
            .members
            .iter()
            .map(|m| m.send(broadcast.clone()))
            .collect();
        Box::pin(
            async move {
                let mut acks = Vec::with_capacity(sends.len());
                for result in futures::future::join_all(sends).await {
                    match result {
                        Ok(ack) => acks.push(ack),
                        Err(e) => {
                            tracing::warn!(error = %e, "an actor did not acknowledge a cleanup")
                        }
                    }
                }
                acks
            }
            .into_actor(self)
            .map(move |acks, act, _| {
                let record = CleanupRecord {
                    level: msg.level,
                    reason: msg.reason,
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
                record
            }),
        )
    }
}

impl Handler<GetMemoryReport> for SupervisorActor {
    type Result = MessageResult<GetMemoryReport>;

    fn handle(&mut self, _: GetMemoryReport, _: &mut Self::Context) -> Self::Result {
        self.sample();
        MessageResult(MemoryReport {
            rss_bytes: self.samples.back().map(|s| s.1).unwrap_or(0),
            peak_rss_bytes: self.peak_rss,
            samples: self.samples.len(),
            cleanups_total: self.cleanups_total,
            recent_cleanups: self.cleanups.iter().cloned().collect(),
        })
    }
}
