//! jemalloc: what it holds, and giving it back.
//!
//! `allocated` is what the program holds (the figure that shows leaks); `resident` what
//! jemalloc keeps in RAM (close to what the OS counts); the difference is dirty or muzzy
//! pages that jemalloc has not yet returned. [`purge`] returns them at once instead of
//! waiting for the decay timers. Reading advances jemalloc's stats epoch first (≈ 8 µs).
//!
//! The binary installs jemalloc as the global allocator; where it is not (unit tests of
//! this crate), the figures describe jemalloc's own, nearly empty, heap.

/// The options a binary hands jemalloc at initialisation (`_rjem_malloc_conf`): the
/// defaults of `memory.background_thread`, `memory.dirty_decay_ms`, `memory.muzzy_decay_ms`.
pub const MALLOC_CONF: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";
const INIT_BACKGROUND_THREAD: bool = true;
const INIT_DIRTY_DECAY_MS: i64 = 1000;
const INIT_MUZZY_DECAY_MS: i64 = 0;

/// jemalloc's `arena.<i>` index meaning "every arena".
const ARENAS_ALL: usize = 4096;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    pub allocated: u64,
    pub resident: u64,
}

/// Current allocator figures; zeros if jemalloc cannot be read.
pub fn stats() -> AllocatorStats {
    use tikv_jemalloc_ctl::{epoch, stats};
    if epoch::advance().is_err() {
        return AllocatorStats::default();
    }
    let read = |r: tikv_jemalloc_ctl::Result<usize>| r.map(|v| v as u64).unwrap_or(0);
    AllocatorStats {
        allocated: read(stats::allocated::read()),
        resident: read(stats::resident::read()),
    }
}

/// Returns every arena's unused dirty and muzzy pages to the OS now.
pub fn purge() -> Result<(), String> {
    let name = format!("arena.{ARENAS_ALL}.purge\0");
    // SAFETY: a "void" mallctl: no old or new value is read or written; the name is a
    // NUL-terminated string that outlives the call.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("jemalloc purge failed (errno {rc})"))
    }
}

/// Applies decay and background-thread settings that differ from [`MALLOC_CONF`] at run
/// time (all arenas, and new ones). With the defaults it changes nothing: switching
/// jemalloc's options while threads allocate is avoided unless asked for.
pub fn configure(
    background_thread: bool,
    dirty_decay_ms: i64,
    muzzy_decay_ms: i64,
) -> Result<(), String> {
    use tikv_jemalloc_ctl::raw;
    if background_thread == INIT_BACKGROUND_THREAD
        && dirty_decay_ms == INIT_DIRTY_DECAY_MS
        && muzzy_decay_ms == INIT_MUZZY_DECAY_MS
    {
        return Ok(());
    }
    let err = |what: &str, e: tikv_jemalloc_ctl::Error| format!("jemalloc {what}: {e}");
    // SAFETY: each name is NUL-terminated and each value has the type jemalloc documents
    // for it (bool for background_thread, ssize_t for the decay times).
    unsafe {
        raw::write(b"arenas.dirty_decay_ms\0", dirty_decay_ms as isize)
            .map_err(|e| err("arenas.dirty_decay_ms", e))?;
        raw::write(b"arenas.muzzy_decay_ms\0", muzzy_decay_ms as isize)
            .map_err(|e| err("arenas.muzzy_decay_ms", e))?;
        let all_dirty = format!("arena.{ARENAS_ALL}.dirty_decay_ms\0");
        let all_muzzy = format!("arena.{ARENAS_ALL}.muzzy_decay_ms\0");
        raw::write(all_dirty.as_bytes(), dirty_decay_ms as isize)
            .map_err(|e| err("arena.<all>.dirty_decay_ms", e))?;
        raw::write(all_muzzy.as_bytes(), muzzy_decay_ms as isize)
            .map_err(|e| err("arena.<all>.muzzy_decay_ms", e))?;
        raw::write(b"background_thread\0", background_thread)
            .map_err(|e| err("background_thread", e))?;
    }
    Ok(())
}

/// Whether jemalloc samples allocations for heap profiles (`opt.prof`: set only at start,
/// with `_RJEM_MALLOC_CONF=prof:true`). False when jemalloc cannot be read.
pub fn profiling() -> bool {
    // SAFETY: `opt.prof` is a bool, as read here.
    unsafe { tikv_jemalloc_ctl::raw::read::<bool>(b"opt.prof\0") }.unwrap_or(false)
}

/// Writes a heap profile (the live sampled allocations and their stacks, jemalloc's
/// `prof.dump`) to `path`; read two with `jeprof --base=OLD BINARY NEW`.
pub fn dump_profile(path: &std::path::Path) -> Result<(), String> {
    if !profiling() {
        return Err(
            "heap profiling is off: start the process with _RJEM_MALLOC_CONF=prof:true".into(),
        );
    }
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: `prof.dump` takes a `const char *` naming the file; the string is
    // NUL-terminated and outlives the call, which does not keep the pointer.
    unsafe { tikv_jemalloc_ctl::raw::write(b"prof.dump\0", name.as_ptr()) }
        .map_err(|e| format!("jemalloc prof.dump to {}: {e}", path.display()))
}
