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
//! portable kernels (within f32 rounding of the sums, and of bf16×3 for int8's outlier
//! channels): a CPU or kernel that computes them wrongly is never used, and says so in the
//! log.
//!
//! The crate's tests run these kernels on every CPU with AVX-512: where the CPU has no
//! tiles, [`multiply`] runs them on a software model of the tile instructions
//! (`tests::Emulated`), so their addressing, padding, side products and epilogues are
//! tested everywhere; only the eight instructions' `asm!` need an AMX CPU (the GPU
//! machines' hosts run the same tests on their tiles: `scripts/device-check.sh`).

use std::sync::OnceLock;

use super::Kind;

/// Groups of packed inputs per tile step: 16 rows of a B tile.
pub(crate) const TILE_GROUPS: usize = 16;
/// Rows of activations per kernel step: two A tiles of 16.
pub(crate) const TILE_ROWS: usize = 32;

/// Whether this CPU has AMX tiles for `kind` (bf16; int8, which also needs AMX-BF16 for
/// its outlier channels) and Linux granted this process tile state. Asked once per
/// process.
pub fn available(kind: Kind) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static GRANTED: OnceLock<bool> = OnceLock::new();
        // CPUID exits to the hypervisor in a VM (microseconds): asked once.
        static HAS: OnceLock<(bool, bool, bool, bool)> = OnceLock::new();
        let (tile, bf16, int8, os) = *HAS.get_or_init(|| {
            let (tile, bf16, int8) = x86::cpu_has();
            (tile, bf16, int8, x86::os_enables_tiles())
        });
        let wanted = match kind {
            Kind::Bf16 => bf16,
            // int8 layers also run their outlier channels on the bf16 tiles (a side
            // product of `tdpbf16ps`): a CPU with AMX-INT8 but not AMX-BF16 is refused.
            Kind::Int8 => int8 && bf16,
            Kind::F32 => false,
        };
        tile && wanted
            && os
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

/// Whether layers may be put on the AMX kernels for `kind`: where [`available`], and in the
/// crate's tests on any CPU with AVX-512 F and BW (on the software model where the CPU has
/// no tiles: the code around the tile products is compiled for AVX-512, which every CPU
/// with AMX has).
pub(crate) fn runs(kind: Kind) -> bool {
    #[cfg(all(test, target_arch = "x86_64"))]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") {
            return true;
        }
    }
    available(kind)
}

/// The tile products a kernel runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    /// `tdpbf16ps`: bf16 pairs, f32 sums.
    Bf16,
    /// `tdpbusd`: unsigned × signed byte quads, i32 sums.
    Int8,
    /// bf16×3 (exact f32 on bf16 tiles, `super::bf16x3`): per step, `tdpbf16ps` of the
    /// three significant products `lo(x)·hi(W) + hi(x)·hi(W) + hi(x)·lo(W)`. The A
    /// pointers of a step address `hi(x)`, `lo(x)` lies `a_lo` bytes further; the B
    /// pointers address `hi(W)`'s tiles, `lo(W)`'s lie `b_lo` bytes further. Each part is
    /// loaded once and used twice: 8 tile loads for 12 products, where the three products
    /// as one bf16 layer over three times the inputs load 12.
    Bf16x3 { a_lo: usize, b_lo: usize },
}

#[cfg(target_arch = "x86_64")]
/// The tile operations the kernels use. [`Hardware`] runs them on this CPU's tiles; the
/// crate's tests run the same kernels on `Emulated` tiles (a software model of the
/// instructions) where the CPU has none, so that the kernels' addressing, padding, side
/// products and epilogues are tested on every CPU: only the instructions themselves, one
/// `asm!` each, need AMX hardware to be tested.
///
/// # Safety
/// Every method but `configure` needs a `configure` before it on the same thread; a step
/// reads 16 rows of 64 bytes from each pointer (`stride` apart for A, contiguous for B),
/// the store writes 4 KiB.
pub(crate) trait Tiles {
    unsafe fn configure(&mut self);
    unsafe fn release(&mut self);
    unsafe fn zero_accumulators(&mut self);
    /// One step of the inputs: loads two tiles of activations (`a0`, `a1`: 16 rows each,
    /// `stride` apart) and two of weights (`b0`, `b1`: one panel each) and adds their
    /// four products to the accumulators (for [`Product::Bf16x3`], the twelve products of
    /// both parts of each).
    unsafe fn step(
        &mut self,
        product: Product,
        a: (*const u8, *const u8),
        stride: usize,
        b: (*const u8, *const u8),
    );
    unsafe fn store_accumulators(&mut self, out: *mut u8);
}

/// This CPU's tiles ([`available`]).
#[cfg(target_arch = "x86_64")]
pub(crate) struct Hardware;

#[cfg(target_arch = "x86_64")]
impl Tiles for Hardware {
    #[inline(always)]
    unsafe fn configure(&mut self) {
        // SAFETY (each method): the caller vouches for the CPU and the pointers.
        unsafe { x86::configure() }
    }
    #[inline(always)]
    unsafe fn release(&mut self) {
        unsafe { x86::release() }
    }
    #[inline(always)]
    unsafe fn zero_accumulators(&mut self) {
        unsafe { x86::zero_accumulators() }
    }
    #[inline(always)]
    unsafe fn step(
        &mut self,
        product: Product,
        a: (*const u8, *const u8),
        stride: usize,
        b: (*const u8, *const u8),
    ) {
        match product {
            Product::Bf16 => unsafe { x86::step_bf16(a, stride, b) },
            Product::Int8 => unsafe { x86::step_int8(a, stride, b) },
            Product::Bf16x3 { a_lo, b_lo } => unsafe {
                x86::step_bf16x3(
                    a,
                    (a.0.add(a_lo), a.1.add(a_lo)),
                    stride,
                    b,
                    (b.0.add(b_lo), b.1.add(b_lo)),
                )
            },
        }
    }
    #[inline(always)]
    unsafe fn store_accumulators(&mut self, out: *mut u8) {
        unsafe { x86::store_accumulators(out) }
    }
}

#[cfg(target_arch = "x86_64")]
/// A second product per block of sums, kept apart from the main one: bf16 pairs summed in
/// f32 (the int8 kernels' outlier channels as bf16×3, beside their integer sums).
pub(crate) struct Side<'a> {
    /// `rows_padded` rows of `steps × 64` bytes, one after the other.
    pub a: &'a [u8],
    /// Per panel of 16 columns, `steps` tiles of 16 rows × 64 bytes, panels one after the
    /// other.
    pub b: &'a [u8],
    pub steps: usize,
}

#[cfg(target_arch = "x86_64")]
/// The sums of one block of 32 rows × 32 columns: `[2 row halves][2 panels][16 rows][16
/// columns]`, the main product's as f32 or i32 bits, the side product's as f32 (zeros
/// without one).
#[repr(C, align(64))]
pub(crate) struct Sums {
    pub main: [u32; 1024],
    pub side: [f32; 1024],
}

/// `c = a · b` (and the `side` product) for a block of rows, 32 rows × 32 columns at a
/// time, calling `store` with each 32 × 32 block of sums.
///
/// - `a`: `rows_padded` rows (a multiple of [`TILE_ROWS`], zeros past the real rows),
///   `a_stride` bytes apart, each `steps` × 64 bytes of packed activations (for
///   [`Product::Bf16x3`], `hi(x)`'s and, `a_lo` bytes on, `lo(x)`'s);
/// - `b`: the layer's packed panels, `panel_bytes` apart, each `steps` × 16 rows of 64 bytes
///   (for [`Product::Bf16x3`], `hi(W)`'s and, `b_lo` bytes on, `lo(W)`'s);
/// - `store(row, pair, sums)`: sums of rows `row..row + 32` × panel pair `pair`'s 32
///   columns ([`Sums`]).
///
/// The panel pairs are the outer loop: a pair's weights (`steps` KiB: 24 KiB for 384
/// inputs in bf16) are read from memory once and stay in the core's caches for every block
/// of rows, while the activations (a block of rows: 128 × 384 bf16 is 96 KiB) stay in its
/// L2 for every pair. The other order read the whole layer's weights once per 32 rows,
/// and at a tile unit's rate that traffic, not the products, set the pace.
///
/// On the CPU's tiles ([`Hardware`]); in the crate's tests on a CPU without them, on the
/// software model.
///
/// # Safety
/// The CPU must run the AMX instructions of `product` ([`available`]) and the process must
/// hold tile state; `a` and `b` must hold what is described above.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn multiply(
    product: Product,
    a: &[u8],
    a_stride: usize,
    rows_padded: usize,
    b: &[u8],
    panel_bytes: usize,
    pairs: usize,
    steps: usize,
    side: Option<Side<'_>>,
    store: impl FnMut(usize, usize, &Sums),
) {
    // The same call on either kind of tiles.
    macro_rules! on {
        ($tiles:expr) => {
            multiply_on(
                $tiles,
                product,
                a,
                a_stride,
                rows_padded,
                b,
                panel_bytes,
                pairs,
                steps,
                side,
                store,
            )
        };
    }
    #[cfg(test)]
    {
        let kind = match product {
            Product::Bf16 | Product::Bf16x3 { .. } => Kind::Bf16,
            Product::Int8 => Kind::Int8,
        };
        if !available(kind) {
            // SAFETY: the software model runs on any CPU; `multiply_on` checks the bounds.
            return unsafe { on!(&mut tests::Emulated::default()) };
        }
    }
    // SAFETY: as the caller vouches.
    unsafe { on!(&mut Hardware) }
}

#[cfg(target_arch = "x86_64")]
/// [`multiply`] on the given tiles.
///
/// # Safety
/// As for [`multiply`], for the CPU running `tiles`' instructions.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn multiply_on<T: Tiles>(
    tiles: &mut T,
    product: Product,
    a: &[u8],
    a_stride: usize,
    rows_padded: usize,
    b: &[u8],
    panel_bytes: usize,
    pairs: usize,
    steps: usize,
    side: Option<Side<'_>>,
    mut store: impl FnMut(usize, usize, &Sums),
) {
    const TILE: usize = TILE_GROUPS * 64;
    // The bytes a step reads past its A and B pointers.
    let (a_span, b_span) = match product {
        Product::Bf16x3 { a_lo, b_lo } => {
            assert!(
                a_lo >= steps * 64 && b_lo >= steps * TILE,
                "the parts overlap"
            );
            (a_lo + steps * 64, b_lo + steps * TILE)
        }
        _ => (steps * 64, steps * TILE),
    };
    assert_eq!(rows_padded % TILE_ROWS, 0);
    assert!(
        rows_padded == 0 || a_stride >= a_span && a.len() >= (rows_padded - 1) * a_stride + a_span
    );
    assert!(pairs == 0 || panel_bytes >= b_span && b.len() >= 2 * pairs * panel_bytes);
    if let Some(side) = &side {
        assert!(side.a.len() >= rows_padded * side.steps * 64);
        assert!(side.b.len() >= 2 * pairs * side.steps * TILE);
    }
    // Two blocks of sums: a block's epilogue (`store`) runs while the tile unit computes
    // the next block's products (it is issued after them and does not wait on them).
    let mut sums = [0, 1].map(|_| Sums {
        main: [0; 1024],
        side: [0.0; 1024],
    });
    let mut pending: Option<(usize, usize)> = None;
    let mut at = 0;
    // SAFETY: the caller vouches for the instructions; every tile read stays inside `a`,
    // `b` and the side's operands (checked above), every store inside `sums`.
    unsafe {
        tiles.configure();
        let blocks = rows_padded / TILE_ROWS;
        for pair in 0..pairs {
            let b0 = b.as_ptr().add(2 * pair * panel_bytes);
            let b1 = b0.add(panel_bytes);
            // The next pair's weights, fetched into L1 a slice per step while this pair
            // computes: a layer's weights come from L3 or memory (a pass reads every
            // layer's), and a tile load waiting on them stalls the tile unit.
            let next = (pair + 1 < pairs)
                .then(|| Prefetch::new(b1.add(panel_bytes), panel_bytes + b_span, blocks * steps));
            for (block, row) in (0..rows_padded).step_by(TILE_ROWS).enumerate() {
                let a0 = a.as_ptr().add(row * a_stride);
                let a1 = a0.add(16 * a_stride);
                tiles.zero_accumulators();
                for step in 0..steps {
                    let (ka, kb) = (step * 64, step * TILE);
                    if let Some(next) = &next {
                        next.slice(block * steps + step);
                    }
                    tiles.step(
                        product,
                        (a0.add(ka), a1.add(ka)),
                        a_stride,
                        (b0.add(kb), b1.add(kb)),
                    );
                }
                if let Some((row, pair)) = pending.take() {
                    store(row, pair, &sums[1 - at]);
                }
                let sums = &mut sums[at];
                tiles.store_accumulators(sums.main.as_mut_ptr().cast());
                if let Some(side) = &side {
                    let stride = side.steps * 64;
                    let a0 = side.a.as_ptr().add(row * stride);
                    let a1 = a0.add(16 * stride);
                    let b0 = side.b.as_ptr().add(2 * pair * side.steps * TILE);
                    let b1 = b0.add(side.steps * TILE);
                    tiles.zero_accumulators();
                    for step in 0..side.steps {
                        let (ka, kb) = (step * 64, step * TILE);
                        tiles.step(
                            Product::Bf16,
                            (a0.add(ka), a1.add(ka)),
                            stride,
                            (b0.add(kb), b1.add(kb)),
                        );
                    }
                    tiles.store_accumulators(sums.side.as_mut_ptr().cast());
                }
                pending = Some((row, pair));
                at = 1 - at;
            }
        }
        if let Some((row, pair)) = pending {
            store(row, pair, &sums[1 - at]);
        }
        tiles.release();
    }
}

#[cfg(target_arch = "x86_64")]
/// Fetches `bytes` from `base` into L1 in `slices` equal slices of whole cache lines, one
/// per [`Prefetch::slice`] call: spread over a panel pair's steps, the next pair arrives
/// by the time it is used. A prefetch only hints: it never faults, and reads nothing the
/// kernels do not read next (the next pair lies inside `b`).
struct Prefetch {
    base: *const u8,
    bytes: usize,
    chunk: usize,
}

#[cfg(target_arch = "x86_64")]
impl Prefetch {
    fn new(base: *const u8, bytes: usize, slices: usize) -> Self {
        Self {
            base,
            bytes,
            chunk: bytes.div_ceil(slices.max(1)).next_multiple_of(64),
        }
    }

    #[inline(always)]
    fn slice(&self, i: usize) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = i * self.chunk;
        for at in (start..(start + self.chunk).min(self.bytes)).step_by(64) {
            // SAFETY: `at < bytes`: inside the next pair, within `b` (the caller's bounds).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.base.add(at).cast()) };
        }
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
                    Product::Int8 => x86::dot_int8(),
                    _ => x86::dot_bf16(),
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

#[cfg(target_arch = "x86_64")]
/// The real rows and columns of one 32 × 32 block of [`Sums`]: calls `f(row, j0, at,
/// valid)` for each row below `rows` and each of the pair's two panels that starts below
/// `outputs`: that row's sums of the panel's first `valid` columns (those below `outputs`,
/// from column `j0`) are `sums.main[at..at + valid]` (and `sums.side[at..at + valid]`).
#[inline(always)]
pub(crate) fn each_row(
    row0: usize,
    pair: usize,
    rows: usize,
    outputs: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    const PANEL: usize = super::PANEL;
    for tile in 0..4 {
        let (half, panel) = (tile / 2, tile % 2);
        let j0 = (2 * pair + panel) * PANEL;
        if j0 >= outputs {
            continue;
        }
        let valid = (outputs - j0).min(PANEL);
        for r in 0..16 {
            let row = row0 + half * 16 + r;
            if row >= rows {
                break;
            }
            f(row, j0, tile * 256 + r * PANEL, valid);
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

    /// One step: two A tiles (`tmm4`, `tmm5`), two B tiles (`tmm6`, `tmm7`), four
    /// products into `tmm0`–`tmm3`. Each load comes just before the first product that
    /// reads it, so that the tile unit starts on the first product while the other tiles
    /// load (+5–10 % over four loads, then four products).
    macro_rules! step {
        ($name:ident, $dot:literal) => {
            #[inline(always)]
            pub(super) unsafe fn $name(a: (*const u8, *const u8), stride: usize, b: (*const u8, *const u8)) {
                // SAFETY: (caller) 16 rows of 64 bytes from each pointer, `stride` apart
                // for A, contiguous for B; the process holds tile state.
                unsafe {
                    asm!(
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {t}*1]",
                        concat!($dot, " tmm0, tmm4, tmm6"),
                        "tileloadd tmm7, [{b1} + {t}*1]",
                        concat!($dot, " tmm1, tmm4, tmm7"),
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        concat!($dot, " tmm2, tmm5, tmm6"),
                        concat!($dot, " tmm3, tmm5, tmm7"),
                        a0 = in(reg) a.0,
                        a1 = in(reg) a.1,
                        s = in(reg) stride,
                        b0 = in(reg) b.0,
                        b1 = in(reg) b.1,
                        t = in(reg) 64usize,
                        options(nostack, readonly)
                    )
                };
            }
        };
    }
    step!(step_bf16, "tdpbf16ps");
    step!(step_int8, "tdpbusd");

    /// One bf16×3 step: `lo(x)·hi(W)`, then `hi(x)·hi(W)` with the weights kept, then
    /// `hi(x)·lo(W)` with the activations kept: every part loaded once, 8 loads for 12
    /// products. Each accumulator is three products apart from its next use, at least,
    /// so the tile unit never waits on its own sums.
    #[inline(always)]
    pub(super) unsafe fn step_bf16x3(
        a_hi: (*const u8, *const u8),
        a_lo: (*const u8, *const u8),
        stride: usize,
        b_hi: (*const u8, *const u8),
        b_lo: (*const u8, *const u8),
    ) {
        // SAFETY: (caller) 16 rows of 64 bytes from each pointer, `stride` apart for A,
        // contiguous for B; the process holds tile state.
        unsafe {
            asm!(
                "tileloadd tmm4, [{al0} + {s}*1]",
                "tileloadd tmm6, [{bh0} + {t}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{bh1} + {t}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{al1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm4, [{ah0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{ah1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm6, [{bl0} + {t}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm7, [{bl1} + {t}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm7",
                ah0 = in(reg) a_hi.0,
                ah1 = in(reg) a_hi.1,
                al0 = in(reg) a_lo.0,
                al1 = in(reg) a_lo.1,
                s = in(reg) stride,
                bh0 = in(reg) b_hi.0,
                bh1 = in(reg) b_hi.1,
                bl0 = in(reg) b_lo.0,
                bl1 = in(reg) b_lo.1,
                t = in(reg) 64usize,
                options(nostack, readonly)
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

#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) mod tests {
    use super::*;

    /// A software model of the eight tile registers (16 rows × 64 bytes each, the one
    /// configuration the kernels use) and of the instructions on them, as Intel's
    /// reference describes them: `tdpbf16ps` adds each pair's two exact products to the
    /// f32 sum one after the other, `tdpbusd` sums unsigned × signed bytes in wrapping i32.
    pub(crate) struct Emulated {
        tmm: [[[u8; 64]; 16]; 8],
    }

    impl Default for Emulated {
        fn default() -> Self {
            Self {
                tmm: [[[0; 64]; 16]; 8],
            }
        }
    }

    impl Emulated {
        /// `tileloadd`: 16 rows of 64 bytes, `stride` apart.
        unsafe fn load(&mut self, t: usize, base: *const u8, stride: usize) {
            for r in 0..16 {
                // SAFETY: (caller) 16 rows of 64 bytes, `stride` apart.
                let row = unsafe { std::slice::from_raw_parts(base.add(r * stride), 64) };
                self.tmm[t][r].copy_from_slice(row);
            }
        }
        fn bf16_at(tile: &[[u8; 64]; 16], row: usize, i: usize) -> f32 {
            let bits = u16::from_le_bytes([tile[row][2 * i], tile[row][2 * i + 1]]);
            f32::from_bits((bits as u32) << 16)
        }
    }

    impl Tiles for Emulated {
        unsafe fn configure(&mut self) {}
        unsafe fn release(&mut self) {
            *self = Self::default();
        }
        unsafe fn zero_accumulators(&mut self) {
            self.tmm[..4].iter_mut().for_each(|t| *t = [[0; 64]; 16]);
        }
        unsafe fn step(
            &mut self,
            product: Product,
            a: (*const u8, *const u8),
            stride: usize,
            b: (*const u8, *const u8),
        ) {
            // SAFETY: as the caller vouches.
            unsafe {
                if let Product::Bf16x3 { a_lo, b_lo } = product {
                    // The hardware's order: lo(x)·hi(W), hi(x)·hi(W), hi(x)·lo(W).
                    self.load(4, a.0.add(a_lo), stride);
                    self.load(5, a.1.add(a_lo), stride);
                    self.load(6, b.0, 64);
                    self.load(7, b.1, 64);
                    self.dot(Product::Bf16);
                    self.load(4, a.0, stride);
                    self.load(5, a.1, stride);
                    self.dot(Product::Bf16);
                    self.load(6, b.0.add(b_lo), 64);
                    self.load(7, b.1.add(b_lo), 64);
                    self.dot(Product::Bf16);
                    return;
                }
                self.load(4, a.0, stride);
                self.load(5, a.1, stride);
                self.load(6, b.0, 64);
                self.load(7, b.1, 64);
            }
            self.dot(product);
        }
        unsafe fn store_accumulators(&mut self, out: *mut u8) {
            for (t, tile) in self.tmm[..4].iter().enumerate() {
                for (r, row) in tile.iter().enumerate() {
                    // SAFETY: (caller) 4 KiB writable at `out`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(t * 1024 + r * 64), 64)
                    };
                }
            }
        }
    }

    impl Emulated {
        /// The four products of a step, as the instructions define them.
        fn dot(&mut self, product: Product) {
            for (c, a, b) in [(0, 4, 6), (1, 4, 7), (2, 5, 6), (3, 5, 7)] {
                let (ta, tb) = (self.tmm[a], self.tmm[b]);
                let tc = &mut self.tmm[c];
                for m in 0..16 {
                    for n in 0..16 {
                        let cell = &mut tc[m][4 * n..4 * n + 4];
                        match product {
                            Product::Bf16 | Product::Bf16x3 { .. } => {
                                let mut acc = f32::from_le_bytes(cell.try_into().unwrap());
                                for k in 0..16 {
                                    acc +=
                                        Self::bf16_at(&ta, m, 2 * k) * Self::bf16_at(&tb, k, 2 * n);
                                    acc += Self::bf16_at(&ta, m, 2 * k + 1)
                                        * Self::bf16_at(&tb, k, 2 * n + 1);
                                }
                                cell.copy_from_slice(&acc.to_le_bytes());
                            }
                            Product::Int8 => {
                                let mut acc = i32::from_le_bytes(cell.try_into().unwrap());
                                for k in 0..16 {
                                    for i in 0..4 {
                                        let u = ta[m][4 * k + i] as i32;
                                        let s = tb[k][4 * n + i] as i8 as i32;
                                        acc = acc.wrapping_add(u * s);
                                    }
                                }
                                cell.copy_from_slice(&acc.to_le_bytes());
                            }
                        }
                    }
                }
            }
        }
    }

    /// The software tiles against products written out by hand: two row halves, two
    /// panels, two steps, for both instructions; rows and columns past the layer's are
    /// left to the caller (`each_row`).
    #[test]
    fn the_software_tiles_multiply_as_the_instructions_are_defined() {
        let (rows, steps, pairs) = (32, 2, 2);
        // int8: a[r][k] = (r + 3k) % 7 (unsigned), w[k][j] = (k % 5) - (j % 3) (signed).
        let k_len = steps * 64;
        let a: Vec<u8> = (0..rows * k_len)
            .map(|i| ((i / k_len + 3 * (i % k_len)) % 7) as u8)
            .collect();
        let w = |k: usize, j: usize| (k % 5) as i32 - (j % 3) as i32;
        let panel_bytes = steps * 1024;
        let mut b = vec![0u8; 2 * pairs * panel_bytes];
        for j in 0..2 * pairs * 16 {
            for k in 0..k_len {
                let at = (j / 16) * panel_bytes + (k / 4) * 64 + (j % 16) * 4 + k % 4;
                b[at] = w(k, j) as i8 as u8;
            }
        }
        let mut seen = 0;
        // SAFETY: the software model; the operands hold what `multiply` reads.
        unsafe {
            multiply_on(
                &mut Emulated::default(),
                Product::Int8,
                &a,
                k_len,
                rows,
                &b,
                panel_bytes,
                pairs,
                steps,
                None,
                |row0, pair, sums| {
                    each_row(row0, pair, rows, 2 * pairs * 16, |row, j0, at, valid| {
                        for c in 0..valid {
                            let want: i32 = (0..k_len)
                                .map(|k| a[row * k_len + k] as i32 * w(k, j0 + c))
                                .sum();
                            assert_eq!(
                                sums.main[at + c] as i32,
                                want,
                                "row {row} column {}",
                                j0 + c
                            );
                            seen += 1;
                        }
                    })
                },
            )
        };
        assert_eq!(seen, rows * 2 * pairs * 16);
    }

    /// bf16×3's step on the software tiles, and on this CPU's where it has them: each
    /// output is `lo(x)·hi(W) + hi(x)·hi(W) + hi(x)·lo(W)` over the padded inputs, with
    /// `lo(x)·lo(W)` left out. Small integers (exact in bf16, every sum exact in f32), so
    /// every order of the sums gives the same bits; a step that read a part from the wrong
    /// place, or multiplied the wrong pair, gives other numbers.
    #[test]
    fn the_bf16x3_step_multiplies_the_three_products_of_its_parts() {
        let (rows, steps, pairs) = (64, 3, 2);
        let k = steps * 32;
        let bf16 = |v: i32| ((v as f32).to_bits() >> 16) as u16;
        let x_hi = |r: usize, i: usize| ((r * 3 + i * 5) % 9) as i32 - 4;
        let x_lo = |r: usize, i: usize| ((r + 2 * i) % 5) as i32 - 2;
        let w_hi = |i: usize, j: usize| ((i * 7 + j) % 11) as i32 - 5;
        let w_lo = |i: usize, j: usize| ((i + 3 * j) % 7) as i32 - 3;
        // A rows: [hi(x), lo(x)], `k` bf16 values each (a_lo = 2k bytes on).
        let a_lo = 2 * k;
        let mut a = vec![0u8; rows * 2 * a_lo];
        for r in 0..rows {
            for i in 0..k {
                let at = r * 2 * a_lo + 2 * i;
                a[at..at + 2].copy_from_slice(&bf16(x_hi(r, i)).to_le_bytes());
                a[at + a_lo..at + a_lo + 2].copy_from_slice(&bf16(x_lo(r, i)).to_le_bytes());
            }
        }
        // B panels of 16 columns: `steps` tiles of hi(W), then `steps` of lo(W); a tile
        // row is a pair of inputs for each of the 16 columns.
        let b_lo = steps * 1024;
        let panel_bytes = 2 * b_lo;
        let mut b = vec![0u8; 2 * pairs * panel_bytes];
        for j in 0..2 * pairs * 16 {
            for i in 0..k {
                let at = (j / 16) * panel_bytes + (i / 2) * 64 + (j % 16) * 4 + (i % 2) * 2;
                b[at..at + 2].copy_from_slice(&bf16(w_hi(i, j)).to_le_bytes());
                b[at + b_lo..at + b_lo + 2].copy_from_slice(&bf16(w_lo(i, j)).to_le_bytes());
            }
        }
        type Store<'a> = &'a mut dyn FnMut(usize, usize, &Sums);
        let run = |tiles: &mut dyn FnMut(Store<'_>)| {
            let mut got = vec![f32::NAN; rows * 2 * pairs * 16];
            tiles(&mut |row0, pair, sums| {
                each_row(row0, pair, rows, 2 * pairs * 16, |row, j0, at, valid| {
                    for c in 0..valid {
                        got[row * 2 * pairs * 16 + j0 + c] = f32::from_bits(sums.main[at + c]);
                    }
                })
            });
            got
        };
        let product = Product::Bf16x3 { a_lo, b_lo };
        // The same call on either kind of tiles.
        macro_rules! on {
            ($tiles:expr) => {
                // SAFETY: the operands hold what `multiply_on` reads for this product.
                run(&mut |store| unsafe {
                    multiply_on(
                        $tiles,
                        product,
                        &a,
                        2 * a_lo,
                        rows,
                        &b,
                        panel_bytes,
                        pairs,
                        steps,
                        None,
                        store,
                    )
                })
            };
        }
        let emulated = on!(&mut Emulated::default());
        for r in 0..rows {
            for j in 0..2 * pairs * 16 {
                let want: i32 = (0..k)
                    .map(|i| x_lo(r, i) * w_hi(i, j) + x_hi(r, i) * (w_hi(i, j) + w_lo(i, j)))
                    .sum();
                assert_eq!(
                    emulated[r * 2 * pairs * 16 + j],
                    want as f32,
                    "row {r} column {j}"
                );
            }
        }
        if available(Kind::Bf16) {
            let hardware = on!(&mut Hardware);
            assert_eq!(
                hardware, emulated,
                "this CPU's tiles against the software model"
            );
        } else {
            eprintln!("skipped: the bf16x3 step on hardware tiles (no AMX-BF16 here)");
        }
    }
}
