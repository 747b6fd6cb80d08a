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
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            interval_ms: 250,
            history: 4096,
            cleanup_history: 32,
        }
    }
}

impl SupervisorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 {
            return Err("supervisor.interval_ms: must be at least 1".into());
        }
        if self.history < 2 {
            return Err("supervisor.history: must be at least 2".into());
        }
        Ok(())
    }
}
