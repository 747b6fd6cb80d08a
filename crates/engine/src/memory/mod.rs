//! Memory of this process: readings, the allocator, samples, creep, the budget.
//!
//! The process's RSS and the system's memory come from `sysinfo` ([`MemoryReader`]; the
//! supervisor keeps one and refreshes only this process's memory each tick); the bytes
//! the program holds come from jemalloc ([`allocator`]). The budget is the cgroup's limit
//! where one is set, else the machine's memory.

pub mod allocator;
pub mod config;
pub mod creep;
pub mod probe;

use sysinfo::{MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// The system's memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemMemory {
    pub total: u64,
    pub available: u64,
    /// The cgroup's memory limit, where one is set.
    pub cgroup_limit: Option<u64>,
}

/// Reads memory through `sysinfo`, keeping its tables between readings.
pub struct MemoryReader {
    system: System,
    pid: Option<Pid>,
}

impl Default for MemoryReader {
    fn default() -> Self {
        Self {
            system: System::new(),
            pid: sysinfo::get_current_pid().ok(),
        }
    }
}

impl MemoryReader {
    /// Resident set size of this process in bytes, if the platform says.
    pub fn rss_bytes(&mut self) -> Option<u64> {
        let pid = self.pid?;
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_memory(),
        );
        self.system.process(pid).map(|p| p.memory())
    }

    /// The system's total and available memory, and the cgroup's limit.
    pub fn system(&mut self) -> SystemMemory {
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        SystemMemory {
            total: self.system.total_memory(),
            available: self.system.available_memory(),
            cgroup_limit: self
                .system
                .cgroup_limits()
                .map(|c| c.total_memory)
                .filter(|&limit| limit > 0 && limit < (1 << 60)),
        }
    }
}

/// Resident set size of this process in bytes, if the platform says (one reading; the
/// supervisor keeps a [`MemoryReader`]).
pub fn rss_bytes() -> Option<u64> {
    MemoryReader::default().rss_bytes()
}

/// Memory this process may use: the cgroup's limit if one is set, else the machine's
/// total memory.
pub fn available_memory() -> Option<u64> {
    let m = MemoryReader::default().system();
    let total = (m.total > 0).then_some(m.total);
    match (m.cgroup_limit, total) {
        (Some(c), Some(t)) => Some(c.min(t)),
        (c, t) => c.or(t),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn rss_grows_when_memory_is_touched() {
        let before = super::rss_bytes().unwrap();
        let block = vec![1u8; 64 << 20];
        let after = super::rss_bytes().unwrap();
        assert!(std::hint::black_box(&block)[12345] == 1);
        assert!(
            after >= before + (48 << 20),
            "before {before}, after {after}"
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn available_memory_is_known_and_plausible() {
        let m = super::available_memory().unwrap();
        assert!(m > 64 << 20, "{m}");
    }
}
