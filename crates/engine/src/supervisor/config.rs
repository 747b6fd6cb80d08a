//! `supervisor:` section.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Sampling period in milliseconds.
    pub interval_ms: u64,
    /// Samples kept (a ring: older ones are dropped).
    pub history: usize,
    /// Cleanups kept for `stats`.
    pub cleanup_history: usize,
    /// Settled readings (nothing in flight, no op since the previous sample; one per op
    /// count) the creep slope is fitted over, the last ones.
    pub creep_window: usize,
    /// Ops the settled readings must span before a slope counts.
    pub creep_min_ops: u64,
    /// Readings before this many ops are warm-up (arenas, thread caches and pools growing
    /// to their working size), not creep.
    pub creep_warmup_ops: u64,
    /// Allocator growth that triggers a full cleanup and a warning, MB per 1000 ops.
    pub creep_alert_mb_per_1000_ops: f64,
    /// Whether the supervisor acts on its own (watermarks, creep, idle recovery). With
    /// false it only samples and runs cleanups that are asked for (the `cleanup` action).
    pub act: bool,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            interval_ms: 250,
            history: 4096,
            cleanup_history: 32,
            creep_window: 480,
            creep_min_ops: 2000,
            creep_warmup_ops: 2000,
            creep_alert_mb_per_1000_ops: 1.0,
            act: true,
        }
    }
}

impl SupervisorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 {
            return Err("supervisor.interval_ms: must be at least 1".into());
        }
        // Each is allocated whole at start-up: an absurd value is refused here rather
        // than aborting the process on allocation.
        if !(2..=1_000_000).contains(&self.history) {
            return Err(format!(
                "supervisor.history: {} must be within 2..=1000000",
                self.history
            ));
        }
        if !(16..=1_000_000).contains(&self.creep_window) {
            return Err(format!(
                "supervisor.creep_window: {} must be within 16..=1000000",
                self.creep_window
            ));
        }
        if self.cleanup_history > 100_000 {
            return Err(format!(
                "supervisor.cleanup_history: {} must be at most 100000",
                self.cleanup_history
            ));
        }
        if self.creep_alert_mb_per_1000_ops <= 0.0 {
            return Err("supervisor.creep_alert_mb_per_1000_ops: must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SupervisorConfig;

    /// The rings allocated whole at start-up are bounded: an absurd size is a clear
    /// configuration error, not an allocation abort.
    #[test]
    fn absurd_ring_sizes_are_refused_with_their_key() {
        assert!(SupervisorConfig::default().validate().is_ok());
        for (config, key) in [
            (
                SupervisorConfig {
                    history: 1 << 40,
                    ..SupervisorConfig::default()
                },
                "supervisor.history",
            ),
            (
                SupervisorConfig {
                    creep_window: 1 << 40,
                    ..SupervisorConfig::default()
                },
                "supervisor.creep_window",
            ),
            (
                SupervisorConfig {
                    cleanup_history: 1 << 40,
                    ..SupervisorConfig::default()
                },
                "supervisor.cleanup_history",
            ),
        ] {
            let error = config.validate().unwrap_err();
            assert!(error.contains(key), "{error}");
        }
    }
}
