//! AMX tile kernels (Intel Xeon since Sapphire Rapids): `tdpbf16ps` for bf16 layers,
//! `tdpbusd` for int8 layers, over the same packed weights as the AVX-512 kernels.
//!
//! A tile register holds up to 16 rows of 64 bytes. The kernels keep four 16 × 16
//! accumulator tiles (32 rows × 32 columns of output) in `tmm0`–`tmm3`, and per step of
//! the inputs load two tiles of activations (`tmm4`, `tmm5`: 16 rows each) and two of
//! weights (`tmm6`, `tmm7`: one 16-column panel each). The weights need no repacking: a
//! bf16 panel's group of two inputs (an int8 panel's group of four) is one 64-byte row of
//! a B tile, and the groups of a panel follow each other, so a panel's next 16 groups are
//! one tile read with a stride of 64 bytes. Layers are packed with their groups padded to
//! a multiple of 16 (zeros) so that every step is a whole tile.
//!
//! Stable Rust has no AMX intrinsics: the tile instructions are inline `asm!`. Linux gives
//! a process tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`);
//! [`available`] asks once and says no where the CPU or the kernel refuses. Before the
//! kernels are chosen, [`super::amx_verified`] runs them once on a small layer against the
//! portable kernels (exactly equal for int8's integer sums, within f32 rounding for bf16): a CPU or
//! kernel that computes them wrongly is never used, and says so in the log.

use std::sync::OnceLock;

use super::Kind;

/// Groups of packed inputs per tile step: 16 rows of a B tile.
pub(crate) const TILE_GROUPS: usize = 16;
/// Rows of activations per kernel step: two A tiles of 16.
pub(crate) const TILE_ROWS: usize = 32;

/// Whether this CPU has AMX tiles for `kind` (bf16 or int8) and Linux granted this
/// process tile state. Asked once per process.
pub fn available(kind: Kind) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static GRANTED: OnceLock<bool> = OnceLock::new();
        let (tile, bf16, int8) = x86::cpu_has();
        let wanted = match kind {
            Kind::Bf16 => bf16,
            Kind::Int8 => int8,
            Kind::F32 => false,
        };
        tile && wanted
            && x86::os_enables_tiles()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && *GRANTED.get_or_init(|| {
                let granted = x86::request_tile_state();
                if !granted {
                    tracing::warn!("the CPU has AMX but Linux refused tile state (kernel < 5.16?): AMX kernels off");
                }
                granted
            })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        false
    }
}

/// The two tile products a kernel runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    /// `tdpbf16ps`: bf16 pairs, f32 sums.
    Bf16,
    /// `tdpbusd`: unsigned × signed byte quads, i32 sums.
    Int8,
}

/// `c = a · b` for a block of rows, 32 rows × 32 columns at a time, calling `store` with
/// each 32 × 32 block of sums.
///
/// - `a`: `rows_padded` rows (a multiple of [`TILE_ROWS`], zeros past the real rows),
///   `a_stride` bytes apart, each `steps` × 64 bytes of packed activations;
/// - `b`: the layer's packed panels, `panel_bytes` apart, each `steps` × 16 rows of 64 bytes;
/// - `store(row, pair, sums)`: sums of rows `row..row + 32` × panel pair `pair`'s 32
///   columns, as `[2 row halves][2 panels][16 rows][16 columns]` f32 or i32 bits.
///
/// # Safety
/// The CPU must run the AMX instructions of `product` ([`available`]) and the process must
/// hold tile state; `a` and `b` must hold what is described above.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn multiply(
    product: Product,
    a: &[u8],
    a_stride: usize,
    rows_padded: usize,
    b: &[u8],
    panel_bytes: usize,
    pairs: usize,
    steps: usize,
    mut store: impl FnMut(usize, usize, &[u32; 1024]),
) {
    assert_eq!(rows_padded % TILE_ROWS, 0);
    assert!(a_stride >= steps * 64 && a.len() >= (rows_padded - 1) * a_stride + steps * 64);
    assert!(pairs == 0 || b.len() >= (2 * pairs - 1) * panel_bytes + steps * TILE_GROUPS * 64);
    let mut sums = [0u32; 1024];
    // SAFETY: the caller vouches for the instructions; every tile read stays inside `a`
    // and `b` (checked above), every store inside `sums`.
    unsafe {
        x86::configure();
        for row in (0..rows_padded).step_by(TILE_ROWS) {
            let a0 = a.as_ptr().add(row * a_stride);
            let a1 = a0.add(16 * a_stride);
            for pair in 0..pairs {
                let b0 = b.as_ptr().add(2 * pair * panel_bytes);
                let b1 = b0.add(panel_bytes);
                x86::zero_accumulators();
                for step in 0..steps {
                    let (ka, kb) = (step * 64, step * TILE_GROUPS * 64);
                    x86::load_a(a0.add(ka), a1.add(ka), a_stride);
                    x86::load_b(b0.add(kb), b1.add(kb));
                    match product {
                        Product::Bf16 => x86::dot_bf16(),
                        Product::Int8 => x86::dot_int8(),
                    }
                }
                x86::store_accumulators(sums.as_mut_ptr().cast());
                store(row, pair, &sums);
            }
        }
        x86::release();
    }
}

/// The peak rate of one core's tile unit for `kind` (bf16 or int8), in multiply-adds per
/// second: `steps` back-to-back tile products on four accumulators from tiles already
/// loaded (no memory traffic). `None` where the CPU or the OS offers no tiles.
pub fn peak_macs_per_second(kind: Kind, steps: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !available(kind) {
            return None;
        }
        let (product, macs) = match kind {
            Kind::Bf16 => (Product::Bf16, 16.0 * 16.0 * 32.0),
            Kind::Int8 => (Product::Int8, 16.0 * 16.0 * 64.0),
            Kind::F32 => return None,
        };
        let zeros = [0u8; 1024];
        // SAFETY: `available` checked the CPU and the OS grant; the tiles load from a
        // 1 KiB buffer (16 rows × 64 bytes).
        let seconds = unsafe {
            x86::configure();
            x86::zero_accumulators();
            x86::load_a(zeros.as_ptr(), zeros.as_ptr(), 64);
            x86::load_b(zeros.as_ptr(), zeros.as_ptr());
            let t = std::time::Instant::now();
            for _ in 0..steps {
                match product {
                    Product::Bf16 => x86::dot_bf16(),
                    Product::Int8 => x86::dot_int8(),
                }
            }
            let seconds = t.elapsed().as_secs_f64();
            x86::release();
            seconds
        };
        Some(steps as f64 * 4.0 * macs / seconds)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, steps);
        None
    }
}

/// The real rows and columns of one 32 × 32 block of sums from [`multiply`]: calls
/// `f(row, j0, sums)` for each row below `rows` and each of the pair's two panels that
/// starts below `outputs`, with that row's sums of the panel's columns below `outputs`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn each_row(
    sums: &[u32; 1024],
    row0: usize,
    pair: usize,
    rows: usize,
    outputs: usize,
    mut f: impl FnMut(usize, usize, &[u32]),
) {
    const PANEL: usize = super::PANEL;
    for (tile, sums) in sums.chunks_exact(256).enumerate() {
        let (half, panel) = (tile / 2, tile % 2);
        let j0 = (2 * pair + panel) * PANEL;
        if j0 >= outputs {
            continue;
        }
        let valid = (outputs - j0).min(PANEL);
        for (r, sums) in sums.chunks_exact(PANEL).enumerate() {
            let row = row0 + half * 16 + r;
            if row >= rows {
                break;
            }
            f(row, j0, &sums[..valid]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::__cpuid_count;

    /// CPUID leaf 7: (AMX-TILE, AMX-BF16, AMX-INT8).
    pub(super) fn cpu_has() -> (bool, bool, bool) {
        // Leaf 7 reads as zeros where unsupported.
        let edx = __cpuid_count(7, 0).edx;
        (edx >> 24 & 1 == 1, edx >> 22 & 1 == 1, edx >> 25 & 1 == 1)
    }

    /// Whether the OS saves tile state (XCR0 bits 17 and 18: XTILECFG, XTILEDATA). A
    /// kernel or sandbox that does not (an old kernel, some gVisor platforms) would let the
    /// first tile instruction fault however `arch_prctl` answers.
    pub(super) fn os_enables_tiles() -> bool {
        // CPUID leaf 1, ECX bit 27: OSXSAVE (XGETBV may run).
        if __cpuid_count(1, 0).ecx >> 27 & 1 == 0 {
            return false;
        }
        let (eax, _edx): (u32, u32);
        // SAFETY: XGETBV with ECX = 0 reads XCR0; OSXSAVE says the OS allows it.
        unsafe {
            asm!("xgetbv", in("ecx") 0u32, out("eax") eax, out("edx") _edx, options(nostack, nomem));
        }
        eax >> 17 & 0b11 == 0b11
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it the first tile
    /// instruction kills the process. Granted for the whole process, every thread.
    pub(super) fn request_tile_state() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a plain system call; it reads no memory of ours.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    /// Palette 1, every tile 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        TileConfig(c)
    };

    #[inline(always)]
    pub(super) unsafe fn configure() {
        // SAFETY: (caller) the CPU has AMX and the process holds tile state.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    }

    #[inline(always)]
    pub(super) unsafe fn release() {
        // SAFETY: as for `configure`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    #[inline(always)]
    pub(super) unsafe fn zero_accumulators() {
        // SAFETY: as for `configure`.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            )
        };
    }

    #[inline(always)]
    pub(super) unsafe fn load_a(a0: *const u8, a1: *const u8, stride: usize) {
        // SAFETY: (caller) 16 rows of 64 bytes, `stride` apart, from each pointer.
        unsafe {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm5, [{a1} + {s}*1]",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                s = in(reg) stride,
                options(nostack, readonly)
            )
        };
    }

    #[inline(always)]
    pub(super) unsafe fn load_b(b0: *const u8, b1: *const u8) {
        // SAFETY: (caller) 16 rows of 64 contiguous bytes from each pointer.
        unsafe {
            asm!(
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tileloadd tmm7, [{b1} + {s}*1]",
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                s = in(reg) 64usize,
                options(nostack, readonly)
            )
        };
    }

    #[inline(always)]
    pub(super) unsafe fn dot_bf16() {
        // SAFETY: as for `configure`.
        unsafe {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem)
            )
        };
    }

    #[inline(always)]
    pub(super) unsafe fn dot_int8() {
        // SAFETY: as for `configure`.
        unsafe {
            asm!(
                "tdpbusd tmm0, tmm4, tmm6",
                "tdpbusd tmm1, tmm4, tmm7",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                options(nostack, nomem)
            )
        };
    }

    /// Stores the accumulators as `[tmm0, tmm1, tmm2, tmm3]`, each 16 rows × 64 bytes.
    #[inline(always)]
    pub(super) unsafe fn store_accumulators(out: *mut u8) {
        // SAFETY: (caller) 4 KiB writable at `out`.
        unsafe {
            asm!(
                "tilestored [{o} + {s}*1], tmm0",
                "tilestored [{o} + {s}*1 + 1024], tmm1",
                "tilestored [{o} + {s}*1 + 2048], tmm2",
                "tilestored [{o} + {s}*1 + 3072], tmm3",
                o = in(reg) out,
                s = in(reg) 64usize,
                options(nostack)
            )
        };
    }
}
