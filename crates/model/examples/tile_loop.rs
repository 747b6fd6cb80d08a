//! The AMX tile loop alone (bf16, `tdpbf16ps`), as the kernels in
//! `crates/model/src/kernels/amx.rs` run it, in the forms docs/BENCHMARKS.md compares:
//!
//!     cargo run --release -p keel-model --example tile_loop
//!
//! MiniLM's Linear shapes at 128 rows, four 16 × 16 accumulator tiles per block of 32 rows
//! × 32 columns, panel pairs outer, rows inner; sums stored per block and not read back.
//! Forms: activations and weights 16 bytes past a cache line (what plain `Vec`s gave) or on
//! one, with four loads then four products or each load just before its first product;
//! and with the weights streamed from beyond the caches (a fresh copy per run), with and
//! without prefetching the next panel pair. Best of 24 runs each, in G multiply-adds/s.
//! Skips with a line where the CPU or the OS offers no AMX tiles.

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};

    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// Palette 1, eight tiles of 16 rows × 64 bytes.
    fn config() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
        }
        Config(c)
    }

    #[derive(Clone, Copy)]
    pub struct Form {
        pub interleaved: bool,
        pub prefetch: bool,
    }

    /// One layer: `rows` × `k` bf16 activations (`a`, rows `2k` bytes apart) times the
    /// packed weights `b` (`n / 16` panels of `k / 32` tiles of 1 KiB).
    ///
    /// # Safety
    /// The CPU must run AMX-BF16 and the process hold tile state; `a` and `b` as above.
    pub unsafe fn layer(form: Form, a: &[u8], rows: usize, k: usize, b: &[u8], n: usize) {
        let (steps, stride, pairs) = (k / 32, 2 * k, n / 32);
        assert!(a.len() >= rows * stride && b.len() >= k * n * 2 && rows.is_multiple_of(32));
        let mut out = vec![0u8; 4096];
        let cfg = config();
        // SAFETY (every access below): inside `a` and `b` (checked above) and `out`.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &cfg);
            for pair in 0..pairs {
                let b0 = b.as_ptr().add(2 * pair * steps * 1024);
                let b1 = b0.add(steps * 1024);
                let next = b1.add(steps * 1024);
                let chunk = (2 * steps * 1024)
                    .div_ceil(rows / 32 * steps)
                    .next_multiple_of(64);
                for (block, row) in (0..rows).step_by(32).enumerate() {
                    let a0 = a.as_ptr().add(row * stride);
                    let a1 = a0.add(16 * stride);
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3"
                    );
                    for s in 0..steps {
                        if form.prefetch && pair + 1 < pairs {
                            let start = (block * steps + s) * chunk;
                            for at in (start..(start + chunk).min(2 * steps * 1024)).step_by(64) {
                                _mm_prefetch::<_MM_HINT_T0>(next.add(at).cast());
                            }
                        }
                        let (pa0, pa1) = (a0.add(s * 64), a1.add(s * 64));
                        let (pb0, pb1) = (b0.add(s * 1024), b1.add(s * 1024));
                        if form.interleaved {
                            asm!(
                                "tileloadd tmm4, [{a0} + {s}*1]",
                                "tileloadd tmm6, [{b0} + {t}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{b1} + {t}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tileloadd tmm5, [{a1} + {s}*1]",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) pa0, a1 = in(reg) pa1, s = in(reg) stride,
                                b0 = in(reg) pb0, b1 = in(reg) pb1, t = in(reg) 64usize,
                            );
                        } else {
                            asm!(
                                "tileloadd tmm4, [{a0} + {s}*1]",
                                "tileloadd tmm5, [{a1} + {s}*1]",
                                "tileloadd tmm6, [{b0} + {t}*1]",
                                "tileloadd tmm7, [{b1} + {t}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) pa0, a1 = in(reg) pa1, s = in(reg) stride,
                                b0 = in(reg) pb0, b1 = in(reg) pb1, t = in(reg) 64usize,
                            );
                        }
                    }
                    let o = out.as_mut_ptr();
                    asm!(
                        "tilestored [{o} + {s}*1], tmm0",
                        "tilestored [{o} + {s}*1 + 1024], tmm1",
                        "tilestored [{o} + {s}*1 + 2048], tmm2",
                        "tilestored [{o} + {s}*1 + 3072], tmm3",
                        o = in(reg) o, s = in(reg) 64usize,
                    );
                }
            }
            asm!("tilerelease");
        }
        std::hint::black_box(&out);
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use keel_model::kernels::{Kind, amx::available};
    use std::time::Instant;
    if !available(Kind::Bf16) {
        println!(
            "no AMX-BF16 tiles on this CPU (or the OS refused tile state): nothing to measure"
        );
        return;
    }
    /// `len` bytes of plausible bf16 values starting `offset` bytes past a cache line.
    fn buffer(len: usize, offset: usize, seed: usize) -> (Vec<u8>, usize) {
        let v: Vec<u8> = (0..len + 128)
            .map(|i| {
                if i % 2 == 1 {
                    0x3e ^ (i * seed % 3) as u8
                } else {
                    (i * seed % 251) as u8
                }
            })
            .collect();
        let start = v.as_ptr().align_offset(64) + offset;
        (v, start)
    }
    let rows = 128;
    for (k, n) in [(384, 1152), (384, 384), (1536, 384)] {
        let macs = (rows * k * n) as f64;
        let time = |f: &mut dyn FnMut(usize)| {
            (0..24)
                .map(|i| {
                    let t = Instant::now();
                    f(i);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        for (offset, interleaved, label) in [
            (16, false, "16 bytes past a line, loads then products"),
            (0, false, "on cache lines, loads then products"),
            (0, true, "on cache lines, each load before its product"),
        ] {
            let (a, at) = buffer(rows * k * 2, offset, 7);
            let (b, bt) = buffer(k * n * 2, offset, 13);
            let form = amx::Form {
                interleaved,
                prefetch: false,
            };
            // SAFETY: `available` checked the CPU and the grant; the buffers hold the layer.
            let best = time(&mut |_| unsafe { amx::layer(form, &a[at..], rows, k, &b[bt..], n) });
            println!(
                "{k}x{n}, {rows} rows, {label:<46} {:>6.0} GMAC/s",
                macs / best / 1e9
            );
        }
        let (a, at) = buffer(rows * k * 2, 0, 7);
        let (many, mt) = buffer(24 * k * n * 2, 0, 13);
        for prefetch in [false, true] {
            let form = amx::Form {
                interleaved: true,
                prefetch,
            };
            let best = time(&mut |i| {
                let b = &many[mt + i * k * n * 2..];
                // SAFETY: as above; each run reads a fresh copy of the weights.
                unsafe { amx::layer(form, &a[at..], rows, k, b, n) }
            });
            let label = if prefetch {
                "weights streamed, next pair prefetched"
            } else {
                "weights streamed, no prefetch"
            };
            println!(
                "{k}x{n}, {rows} rows, {label:<46} {:>6.0} GMAC/s",
                macs / best / 1e9
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("AMX is x86-64 only: nothing to measure");
}
