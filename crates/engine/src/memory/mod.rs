//! Memory of this process: readings, the allocator, samples, creep, the budget.
//!
//! RSS comes from `/proc/self/statm` (under a microsecond per read, against tens of
//! microseconds for sysinfo). Elsewhere than Linux it reads as `None`.

pub mod allocator;
pub mod config;
pub mod creep;
pub mod probe;

/// Resident set size of this process in bytes, if the platform says.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(resident_pages * page_size())
}

fn page_size() -> u64 {
    // 4 KiB on x86-64, but 16 or 64 KiB on some aarch64 kernels: ask the system.
    // SAFETY: sysconf(3) has no preconditions; it reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

/// Memory this process may use: the cgroup v2 (or v1) limit if one is set, else the
/// machine's total memory.
pub fn available_memory() -> Option<u64> {
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    .find(|v| *v < (1u64 << 60));
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, total) {
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
