//! The supervisor's decisions as a pure state machine: fed one [`MemorySample`] per tick,
//! it says whether ingest should be under pressure and which cleanup, if any, to run.
//! No clock, no actor, no allocator: the time is the sample's `at_ms`, so tests feed
//! sequences and check decisions synchronously.
//!
//! Like a thermostat with hysteresis (and no automatic cleanup within `memory.cooldown_ms`
//! of the last, none while one runs):
//! - RSS above `memory.hard` × limit → pressure on, and a full cleanup;
//! - `allocated` creeping (see below) → a full cleanup and a warning;
//! - RSS above `memory.soft` × limit → a gentle cleanup; pressure off once below it;
//! - GPU memory reserved above `memory.hard` / `memory.soft` × `memory.device_limit_bytes`
//!   → a full / gentle cleanup (which returns the pool's free pages to the driver);
//! - no op for `memory.recovery_window_ms` after work, nothing in flight → one gentle
//!   cleanup, which hands a burst's memory back to the OS.
//!
//! Creep is judged on *settled* samples only, as the soak judges it: nothing in flight and
//! no op finished since the previous sample. Memory in use swings by tens of MB with the
//! work in flight (a pass's activations come and go), so a slope through every sample reads
//! that sawtooth as growth and alarms on a healthy engine (seen in CI: 10.97 MB/1000 ops on
//! an engine whose settled slope was −0.02). At each settled op count the lowest reading is
//! kept; the slope is fitted through the last `creep_window` of them once they span
//! `creep_min_ops` ops, and alarms only when it exceeds `creep_alert_mb_per_1000_ops` by
//! three standard errors, on evidence newer than the last alarm. An engine that is never
//! idle gives no settled samples: there the watermarks are the guard.

use std::collections::VecDeque;

use crate::cleanup::CleanupLevel;
use crate::memory::config::MemoryConfig;
use crate::memory::creep;
use crate::memory::probe::MemorySample;
use crate::supervisor::config::SupervisorConfig;
use crate::supervisor::messages::Creep;

const MB: f64 = 1_000_000.0;
/// Fewest settled readings a creep slope is fitted through.
const MIN_SETTLED: usize = 8;

/// Why a cleanup is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    HardWatermark,
    DeviceHardWatermark,
    Creep,
    SoftWatermark,
    DeviceSoftWatermark,
    Idle,
}

/// A cleanup the thermostat asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub level: CleanupLevel,
    pub cause: Cause,
    pub reason: String,
}

/// What one tick decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tick {
    /// `Some(on)` when the pressure flag changes.
    pub pressure: Option<bool>,
    pub cleanup: Option<Decision>,
    /// The creep that raised the alarm, for the warning.
    pub creep: Option<Creep>,
}

pub struct Thermostat {
    config: SupervisorConfig,
    memory: MemoryConfig,
    soft: u64,
    hard: u64,
    /// Device watermarks in bytes reserved; `None` without `memory.device_limit_bytes`.
    device: Option<(u64, u64)>,
    pressure: bool,
    previous: Option<MemorySample>,
    last_ops_change_ms: u64,
    idle_cleaned: bool,
    last_cleanup_ms: Option<u64>,
    /// Settled readings: (op count, lowest allocated − cache, lowest RSS − cache, at_ms).
    settled: VecDeque<Settled>,
    /// Settled readings before this time do not count as evidence of creep: one window's
    /// evidence triggers at most one alarm.
    evidence_from_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Settled {
    ops: u64,
    allocated: u64,
    rss: u64,
    at_ms: u64,
}

impl Thermostat {
    /// `limit`: the memory budget in bytes (`MemoryConfig::effective_limit`).
    pub fn new(config: SupervisorConfig, memory: MemoryConfig, limit: u64) -> Self {
        Self {
            soft: (limit as f64 * memory.soft) as u64,
            hard: (limit as f64 * memory.hard) as u64,
            device: (memory.device_limit_bytes > 0).then(|| {
                let l = memory.device_limit_bytes as f64;
                ((l * memory.soft) as u64, (l * memory.hard) as u64)
            }),
            settled: VecDeque::with_capacity(config.creep_window),
            config,
            memory,
            pressure: false,
            previous: None,
            last_ops_change_ms: 0,
            idle_cleaned: true,
            last_cleanup_ms: None,
            evidence_from_ms: 0,
        }
    }

    /// The soft and hard watermarks in bytes.
    pub fn watermarks(&self) -> (u64, u64) {
        (self.soft, self.hard)
    }

    pub fn pressure(&self) -> bool {
        self.pressure
    }

    /// Takes a sample; `busy` says a cleanup is running (then none is decided).
    pub fn observe(&mut self, s: &MemorySample, busy: bool) -> Tick {
        let mut tick = Tick::default();
        let ops_moved = self.previous.is_none_or(|p| p.ops != s.ops);
        if ops_moved {
            self.last_ops_change_ms = s.at_ms;
            if self.previous.is_some() {
                self.idle_cleaned = false;
            }
        } else if s.in_flight_rows == 0 && s.ops >= self.config.creep_warmup_ops {
            self.settle(s);
        }
        self.previous = Some(*s);

        if s.rss > self.hard && !self.pressure {
            self.pressure = true;
            tick.pressure = Some(true);
        } else if s.rss < self.soft && self.pressure {
            self.pressure = false;
            tick.pressure = Some(false);
        }
        if busy
            || self
                .last_cleanup_ms
                .is_some_and(|t| s.at_ms.saturating_sub(t) < self.memory.cooldown_ms)
        {
            return tick;
        }
        let mb = |b: u64| b / 1_000_000;
        let (device_soft, device_hard) = self.device.unwrap_or((u64::MAX, u64::MAX));
        tick.cleanup = if s.rss > self.hard {
            Some(Decision {
                level: CleanupLevel::Full,
                cause: Cause::HardWatermark,
                reason: format!(
                    "RSS {} MB above the hard watermark {} MB",
                    mb(s.rss),
                    mb(self.hard)
                ),
            })
        } else if s.device_reserved > device_hard {
            Some(Decision {
                level: CleanupLevel::Full,
                cause: Cause::DeviceHardWatermark,
                reason: format!(
                    "GPU memory reserved {} MB above the device hard watermark {} MB",
                    mb(s.device_reserved),
                    mb(device_hard)
                ),
            })
        } else if let Some(c) = self.creep().filter(|c| self.alarming(c)) {
            self.evidence_from_ms = s.at_ms + 1;
            tick.creep = Some(c);
            Some(Decision {
                level: CleanupLevel::Full,
                cause: Cause::Creep,
                reason: format!(
                    "creep: allocated grows {:.3} MB per 1000 ops (± {:.3}) over {} settled ops",
                    c.allocated_mb_per_1000_ops, c.allocated_stderr, c.window_ops
                ),
            })
        } else if s.rss > self.soft {
            Some(Decision {
                level: CleanupLevel::Gentle,
                cause: Cause::SoftWatermark,
                reason: format!(
                    "RSS {} MB above the soft watermark {} MB",
                    mb(s.rss),
                    mb(self.soft)
                ),
            })
        } else if s.device_reserved > device_soft {
            Some(Decision {
                level: CleanupLevel::Gentle,
                cause: Cause::DeviceSoftWatermark,
                reason: format!(
                    "GPU memory reserved {} MB above the device soft watermark {} MB",
                    mb(s.device_reserved),
                    mb(device_soft)
                ),
            })
        } else if !self.idle_cleaned
            && s.in_flight_rows == 0
            && s.at_ms.saturating_sub(self.last_ops_change_ms) >= self.memory.recovery_window_ms
        {
            self.idle_cleaned = true;
            Some(Decision {
                level: CleanupLevel::Trim,
                cause: Cause::Idle,
                reason: "idle: returning memory after work".to_string(),
            })
        } else {
            None
        };
        tick
    }

    /// A cleanup (decided here or asked for) started at `at_ms`: the cooldown runs from it.
    pub fn cleaned(&mut self, at_ms: u64) {
        self.last_cleanup_ms = Some(at_ms);
    }

    fn settle(&mut self, s: &MemorySample) {
        let reading = Settled {
            ops: s.ops,
            allocated: s.allocated.saturating_sub(s.cache_bytes),
            rss: s.rss.saturating_sub(s.cache_bytes),
            at_ms: s.at_ms,
        };
        match self.settled.back_mut() {
            Some(last) if last.ops == s.ops => {
                last.allocated = last.allocated.min(reading.allocated);
                last.rss = last.rss.min(reading.rss);
            }
            _ => {
                if self.settled.len() == self.config.creep_window {
                    self.settled.pop_front();
                }
                self.settled.push_back(reading);
            }
        }
    }

    fn alarming(&self, c: &Creep) -> bool {
        c.allocated_mb_per_1000_ops > self.config.creep_alert_mb_per_1000_ops
            && c.allocated_mb_per_1000_ops > 3.0 * c.allocated_stderr
            && c.window_from_ms >= self.evidence_from_ms
    }

    /// The creep over the settled readings, once they span `creep_min_ops` ops.
    pub fn creep(&self) -> Option<Creep> {
        let (first, last) = (self.settled.front()?, self.settled.back()?);
        let window_ops = last.ops.saturating_sub(first.ops);
        if window_ops < self.config.creep_min_ops || self.settled.len() < MIN_SETTLED {
            return None;
        }
        let fit = |f: fn(&Settled) -> u64| {
            let pts: Vec<(f64, f64)> = self
                .settled
                .iter()
                .map(|s| (s.ops as f64, f(s) as f64 / MB))
                .collect();
            creep::slope(&pts)
        };
        let (alloc, alloc_se) = fit(|s| s.allocated)?;
        let (rss, _) = fit(|s| s.rss)?;
        let per_hour: Vec<(f64, f64)> = self
            .settled
            .iter()
            .map(|s| (s.at_ms as f64 / 3_600_000.0, s.rss as f64 / MB))
            .collect();
        Some(Creep {
            allocated_mb_per_1000_ops: alloc * 1000.0,
            allocated_stderr: alloc_se * 1000.0,
            rss_mb_per_1000_ops: rss * 1000.0,
            rss_mb_per_hour: creep::slope(&per_hour).map(|s| s.0).unwrap_or(0.0),
            window_ops,
            settled_readings: self.settled.len(),
            window_from_ms: first.at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thermostat(limit: u64, cooldown_ms: u64) -> Thermostat {
        let config = SupervisorConfig {
            creep_window: 64,
            creep_min_ops: 500,
            creep_warmup_ops: 0,
            ..Default::default()
        };
        let memory = MemoryConfig {
            cooldown_ms,
            recovery_window_ms: 1 << 40,
            ..Default::default()
        };
        Thermostat::new(config, memory, limit)
    }

    /// A working engine: ops move every other tick and rows are in flight then; on the
    /// ticks between, it is settled. `work(i)` is the allocated bytes in use by the work
    /// in flight, `leak(ops)` what has leaked after `ops` ops.
    fn run(
        t: &mut Thermostat,
        ticks: u64,
        work: impl Fn(u64) -> u64,
        leak: impl Fn(u64) -> u64,
    ) -> Vec<Decision> {
        let mut decisions = Vec::new();
        for i in 0..ticks {
            // Ops move on even ticks (rows in flight) and stand still on odd ones (settled).
            let busy = i % 2 == 0;
            let ops = (i / 2 + 1) * 10;
            let allocated = 100_000_000 + leak(ops) + if busy { work(i) } else { 0 };
            let s = MemorySample {
                at_ms: i * 250,
                ops,
                in_flight_rows: if busy { 25 } else { 0 },
                allocated,
                rss: allocated + 50_000_000,
                ..Default::default()
            };
            if let Some(d) = t.observe(&s, false).cleanup {
                t.cleaned(s.at_ms);
                decisions.push(d);
            }
        }
        decisions
    }

    #[test]
    fn a_sawtooth_of_work_in_flight_is_not_creep() {
        // Work in flight swings 0–40 MB and grows over the run (bigger batches later),
        // which a slope through every sample would read as tens of MB per 1000 ops.
        let mut t = thermostat(1 << 40, 0);
        let decisions = run(&mut t, 2000, |i| (i % 7) * 5_000_000 + i * 20_000, |_| 0);
        assert!(
            decisions.iter().all(|d| d.cause != Cause::Creep),
            "{decisions:?}"
        );
        let c = t.creep().expect("settled readings span enough ops");
        assert!(c.allocated_mb_per_1000_ops.abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn a_leak_alarms_once_per_fresh_window() {
        // 10 kB per op = 10 MB per 1000 ops, far above the 1 MB alert; no cooldown, so
        // only the need for fresh evidence spaces the alarms.
        let mut t = thermostat(1 << 40, 0);
        let decisions = run(&mut t, 2000, |i| (i % 7) * 5_000_000, |ops| ops * 10_000);
        let alarms: Vec<&Decision> = decisions
            .iter()
            .filter(|d| d.cause == Cause::Creep)
            .collect();
        assert!(!alarms.is_empty(), "a leak this large must alarm");
        assert!(alarms.iter().all(|d| d.level == CleanupLevel::Full));
        assert!(
            alarms[0]
                .reason
                .starts_with("creep: allocated grows 10.000"),
            "{}",
            alarms[0].reason
        );
        // 1000 settled readings, a window of 64: at most one alarm per window.
        assert!(alarms.len() <= 1000 / 64 + 1, "{} alarms", alarms.len());
        let c = t.creep().unwrap();
        assert!((c.allocated_mb_per_1000_ops - 10.0).abs() < 0.01, "{c:?}");
    }

    #[test]
    fn warm_up_growth_is_not_creep() {
        // Allocated grows 20 MB over the first 2000 ops (arenas, pools), then stays flat.
        let mut t = thermostat(1 << 40, 0);
        t.config.creep_warmup_ops = 2000;
        let decisions = run(&mut t, 3000, |_| 0, |ops| ops.min(2000) * 10_000);
        assert!(
            decisions.iter().all(|d| d.cause != Cause::Creep),
            "{decisions:?}"
        );
        // Without the warm-up the same run alarms.
        let mut t = thermostat(1 << 40, 0);
        let decisions = run(&mut t, 3000, |_| 0, |ops| ops.min(2000) * 10_000);
        assert!(decisions.iter().any(|d| d.cause == Cause::Creep));
    }

    #[test]
    fn a_small_leak_under_the_alert_does_not_alarm() {
        let mut t = thermostat(1 << 40, 0);
        let decisions = run(&mut t, 2000, |_| 0, |ops| ops * 500); // 0.5 MB per 1000 ops
        assert!(
            decisions.iter().all(|d| d.cause != Cause::Creep),
            "{decisions:?}"
        );
    }

    #[test]
    fn no_creep_without_settled_readings_spanning_enough_ops() {
        let mut t = thermostat(1 << 40, 0);
        // Always busy: ops move on every tick, so nothing settles.
        for i in 0..500u64 {
            let s = MemorySample {
                at_ms: i * 250,
                ops: i * 10,
                in_flight_rows: 25,
                allocated: 100_000_000 + i * 1_000_000,
                ..Default::default()
            };
            assert_ne!(
                t.observe(&s, false).cleanup.map(|d| d.cause),
                Some(Cause::Creep)
            );
        }
        assert!(t.creep().is_none());
    }

    fn at(t: &mut Thermostat, at_ms: u64, rss: u64) -> Tick {
        let s = MemorySample {
            at_ms,
            rss,
            ..Default::default()
        };
        let tick = t.observe(&s, false);
        if tick.cleanup.is_some() {
            t.cleaned(at_ms);
        }
        tick
    }

    #[test]
    fn watermarks_act_in_steps_with_hysteresis_and_cooldown() {
        // limit 1000 B: soft 750, hard 900; cooldown 100 ms.
        let mut t = thermostat(1000, 100);
        assert_eq!(at(&mut t, 0, 100), Tick::default());
        let soft = at(&mut t, 10, 800);
        assert_eq!(
            soft.cleanup.as_ref().map(|d| d.cause),
            Some(Cause::SoftWatermark)
        );
        assert_eq!(soft.pressure, None);
        // Within the cooldown nothing more is decided, but pressure still moves.
        let hard = at(&mut t, 50, 950);
        assert_eq!(hard.pressure, Some(true));
        assert!(hard.cleanup.is_none());
        let hard = at(&mut t, 120, 950);
        assert_eq!(
            hard.cleanup.map(|d| (d.level, d.cause)),
            Some((CleanupLevel::Full, Cause::HardWatermark))
        );
        // Between soft and hard, pressure stays on.
        assert_eq!(at(&mut t, 300, 800).pressure, None);
        assert!(t.pressure());
        assert_eq!(at(&mut t, 400, 100).pressure, Some(false));
    }

    #[test]
    fn device_watermarks_ask_for_cleanups_and_leave_pressure_to_host_memory() {
        let config = SupervisorConfig::default();
        let memory = MemoryConfig {
            cooldown_ms: 100,
            recovery_window_ms: 1 << 40,
            device_limit_bytes: 1000,
            ..Default::default()
        };
        let mut t = Thermostat::new(config, memory, 1 << 40);
        let mut device = |at_ms, reserved| {
            let tick = t.observe(
                &MemorySample {
                    at_ms,
                    rss: 100,
                    device_reserved: reserved,
                    ..Default::default()
                },
                false,
            );
            if tick.cleanup.is_some() {
                t.cleaned(at_ms);
            }
            tick
        };
        assert_eq!(device(0, 700), Tick::default());
        let soft = device(10, 800).cleanup.unwrap();
        assert_eq!(
            (soft.level, soft.cause),
            (CleanupLevel::Gentle, Cause::DeviceSoftWatermark)
        );
        assert!(soft.reason.contains("GPU memory"), "{}", soft.reason);
        assert!(device(50, 950).cleanup.is_none(), "within the cooldown");
        let hard = device(200, 950);
        assert_eq!(
            hard.cleanup.map(|d| (d.level, d.cause)),
            Some((CleanupLevel::Full, Cause::DeviceHardWatermark))
        );
        assert_eq!(
            hard.pressure, None,
            "device memory does not hold back ingest"
        );
        // Without a device limit, device memory decides nothing.
        let mut t = thermostat(1 << 40, 0);
        let s = MemorySample {
            device_reserved: u64::MAX / 2,
            ..Default::default()
        };
        assert!(t.observe(&s, false).cleanup.is_none());
    }

    #[test]
    fn one_idle_cleanup_after_work() {
        let config = SupervisorConfig::default();
        let memory = MemoryConfig {
            cooldown_ms: 0,
            recovery_window_ms: 1000,
            ..Default::default()
        };
        let mut t = Thermostat::new(config, memory, 1 << 40);
        let sample = |at_ms, ops, in_flight_rows| MemorySample {
            at_ms,
            ops,
            in_flight_rows,
            ..Default::default()
        };
        // Idle from the start: nothing to return.
        assert!(t.observe(&sample(0, 0, 0), false).cleanup.is_none());
        assert!(t.observe(&sample(2000, 0, 0), false).cleanup.is_none());
        // Work, then quiet with a row still in flight: wait.
        assert!(t.observe(&sample(2100, 10, 0), false).cleanup.is_none());
        assert!(t.observe(&sample(3200, 10, 5), false).cleanup.is_none());
        let idle = t.observe(&sample(3300, 10, 0), false).cleanup;
        assert_eq!(
            idle.map(|d| (d.level, d.cause)),
            Some((CleanupLevel::Trim, Cause::Idle))
        );
        // Once per lull.
        assert!(t.observe(&sample(5000, 10, 0), false).cleanup.is_none());
    }
}
