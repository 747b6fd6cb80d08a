//! Self-attention of one row, every head, in one pass per head: QKᵀ, softmax and ·V, reading
//! Q, K and V in place in the fused QKV output. Two forms compute the same thing:
//!
//! - [`avx512`]: explicit 512-bit FMA, eight queries at a time (each key and value vector
//!   loaded once for all eight), the exponentials on whole vectors with `vscalefps`;
//! - [`attend_lanes`]: plain Rust the compiler vectorises for AVX-512, AVX2 or the
//!   baseline, for CPUs without AVX-512 (and `KEEL_CPU_KERNELS=avx2|portable`).
//!
//! Attention is ~0.6 % of MiniLM's multiply-adds but was ~18 % of a bf16 pass in the lanes
//! form: once the Linear layers run on AMX tiles, it is what is left.

use super::{exp_neg, lanes_max, lanes_sum};
use crate::kernels::{Isa, Kind};

/// Buffer values [`attend`] needs for a row of `len` tokens with heads of `dh` values:
/// one head's keys, transposed, and the scores of a group of queries, both padded to
/// whole pairs of vectors (the larger need of the two forms).
pub(super) fn attention_buffer(len: usize, dh: usize) -> usize {
    len.next_multiple_of(2 * LANES) * (GROUP.max(QUERIES) + dh)
}

/// Self-attention of one row of `len` tokens, every head: `qkv` is the row's fused QKV
/// output (`len × 3·h`: Q, K, V side by side, each `heads × dh`), `ctx` its context rows
/// (`len × h`), `buffer` at least [`attention_buffer`] values.
pub(super) fn attend(qkv: &[f32], ctx: &mut [f32], h: usize, heads: usize, buffer: &mut [f32]) {
    debug_assert!(buffer.len() >= attention_buffer(ctx.len() / h, h / heads));
    #[cfg(target_arch = "x86_64")]
    if Isa::detect(Kind::F32) >= Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 F (`Isa::runs`).
        return unsafe { avx512::attend(qkv, ctx, h, heads, buffer) };
    }
    attend_lanes(qkv, ctx, h, heads, buffer)
}

/// Queries of the AVX-512 form scored together: 8 × 2 accumulators, 2 key vectors and a
/// broadcast fit in 32 registers.
const GROUP: usize = 8;

/// Lanes of one vector of attention scores (a 512-bit register of f32).
const LANES: usize = 16;
/// Queries scored together, sharing each load of the keys.
const QUERIES: usize = 4;

widest! {
    /// Self-attention of one row of `len` tokens, every head: `qkv` is the row's fused QKV
    /// output (`len × 3·h`: Q, K, V side by side, each `heads × dh`), `ctx` its context
    /// rows (`len × h`). Per head, the keys are transposed into `buffer` (`dh × lp`, `lp`
    /// = `len` rounded up to whole vectors, zeros past `len`), so that the scores of
    /// [`QUERIES`] queries are `dh` broadcast multiply-adds per vector of keys, each key
    /// vector loaded once for all of them; padded scores are masked to −∞ before the
    /// softmax, whose exponentials and sums run on whole vectors too.
    fn attend_lanes(qkv: &[f32], ctx: &mut [f32], h: usize, heads: usize, buffer: &mut [f32]) {
        let len = ctx.len() / h;
        let dh = h / heads;
        let lp = len.next_multiple_of(LANES);
        let scale = 1.0 / (dh as f32).sqrt();
        let (scores, keys) = buffer[..lp * (QUERIES + dh)].split_at_mut(QUERIES * lp);
        for head in 0..heads {
            let (q0, k0, v0) = (head * dh, h + head * dh, 2 * h + head * dh);
            for (d, keys) in keys.chunks_exact_mut(lp).enumerate() {
                for (k, row) in keys.iter_mut().zip(qkv.chunks_exact(3 * h)) {
                    *k = row[k0 + d];
                }
                keys[len..].fill(0.0);
            }
            for first in (0..len).step_by(QUERIES) {
                let count = (len - first).min(QUERIES);
                // Scores: per vector of keys, QUERIES accumulators over the head's dh values.
                for c in 0..lp / LANES {
                    let mut acc = [[0.0f32; LANES]; QUERIES];
                    for d in 0..dh {
                        let k: &[f32; LANES] = keys[d * lp + c * LANES..][..LANES]
                            .try_into()
                            .expect("a whole vector");
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let q = qkv[(first + r.min(count - 1)) * 3 * h + q0 + d] * scale;
                            for (a, &k) in acc.iter_mut().zip(k) {
                                *a += q * k;
                            }
                        }
                    }
                    for (r, acc) in acc.iter().enumerate() {
                        scores[r * lp + c * LANES..][..LANES].copy_from_slice(acc);
                    }
                }
                for r in 0..count {
                    let s = &mut scores[r * lp..(r + 1) * lp];
                    s[len..].fill(f32::NEG_INFINITY);
                    let max = lanes_max(s);
                    for v in s.iter_mut() {
                        *v = exp_neg(*v - max);
                    }
                    let inv = 1.0 / lanes_sum(s, |v| v);
                    let i = first + r;
                    let out = &mut ctx[i * h + q0..i * h + q0 + dh];
                    // ·V a vector of the head's values at a time, summed in registers.
                    let mut start = 0;
                    while start < dh {
                        let width = (dh - start).min(LANES);
                        let mut acc = [0.0f32; LANES];
                        let rows = s.iter().zip(qkv.chunks_exact(3 * h));
                        if width == LANES {
                            // A whole vector: fixed width, so `acc` stays in a register.
                            for (&p, row) in rows {
                                let v: &[f32; LANES] = row[v0 + start..][..LANES]
                                    .try_into()
                                    .expect("a whole vector");
                                for (a, &v) in acc.iter_mut().zip(v) {
                                    *a += p * v;
                                }
                            }
                        } else {
                            for (&p, row) in rows {
                                let v = &row[v0 + start..v0 + start + width];
                                for (a, &v) in acc.iter_mut().zip(v) {
                                    *a += p * v;
                                }
                            }
                        }
                        for (o, a) in out[start..start + width].iter_mut().zip(acc) {
                            *o = a * inv;
                        }
                        start += width;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{GROUP, LANES};

    /// Keys (and values) per step: two vectors.
    const STEP: usize = 2 * LANES;

    /// Lanes `0..n` of a vector (all for `n ≥ 16`, none for `n = 0`).
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= LANES {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// `e^x` for `x ≤ 0` on 16 lanes: the lanes form's `exp_neg` (Cephes' polynomial on
    /// `x = n·ln 2 + r`), with `2^n` applied by `vscalefps`.
    #[target_feature(enable = "avx512f")]
    fn exp_neg(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(y, n)
    }

    /// Transposes 16 rows of 16 values in place (rows become columns): unpacks of
    /// pairs of rows, then of pairs of pairs, then two shuffles of 128-bit lanes.
    #[target_feature(enable = "avx512f")]
    fn transpose(r: &mut [__m512; LANES]) {
        let mut t = [_mm512_setzero_ps(); LANES];
        for i in (0..LANES).step_by(2) {
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        // Per 128-bit lane k, r[4g + c] now holds column 4k + c of rows 4g..4g + 4.
        for g in (0..LANES).step_by(4) {
            let (a, b) = (_mm512_castps_pd(t[g]), _mm512_castps_pd(t[g + 2]));
            let (c, d) = (_mm512_castps_pd(t[g + 1]), _mm512_castps_pd(t[g + 3]));
            r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
            r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
            r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
        }
        for c in 0..4 {
            t[c] = _mm512_shuffle_f32x4::<0x88>(r[c], r[c + 4]);
            t[c + 4] = _mm512_shuffle_f32x4::<0xdd>(r[c], r[c + 4]);
            t[c + 8] = _mm512_shuffle_f32x4::<0x88>(r[c + 8], r[c + 12]);
            t[c + 12] = _mm512_shuffle_f32x4::<0xdd>(r[c + 8], r[c + 12]);
        }
        for c in 0..8 {
            r[c] = _mm512_shuffle_f32x4::<0x88>(t[c], t[c + 8]);
            r[c + 8] = _mm512_shuffle_f32x4::<0xdd>(t[c], t[c + 8]);
        }
    }

    /// [`super::attend`] on 512-bit FMA. Per head: the keys transposed into `buffer`
    /// (`dh × lp`, `lp` = `len` rounded up to [`STEP`], zeros past `len`); then per group
    /// of [`GROUP`] queries, their scores [`STEP`] keys at a time (`dh` steps of two key
    /// loads and eight broadcast FMAs each), the softmax on whole vectors (lanes past
    /// `len` masked out), and ·V [`STEP`] values at a time (per key: two value loads,
    /// eight broadcast FMAs). A group past the row's last query repeats that query; its
    /// copies are never written out.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend(
        qkv: &[f32],
        ctx: &mut [f32],
        h: usize,
        heads: usize,
        buffer: &mut [f32],
    ) {
        let len = ctx.len() / h;
        let dh = h / heads;
        let stride = 3 * h;
        let lp = len.next_multiple_of(STEP);
        let scale = _mm512_set1_ps(1.0 / (dh as f32).sqrt());
        assert!(qkv.len() >= len * stride && buffer.len() >= lp * (GROUP + dh));
        let (scores, keys) = buffer[..lp * (GROUP + dh)].split_at_mut(GROUP * lp);
        let q = qkv.as_ptr();
        for head in 0..heads {
            let (q0, k0, v0) = (head * dh, h + head * dh, 2 * h + head * dh);
            // The head's keys transposed, 16 × 16 values at a time in registers; rows past
            // `len` are zeros.
            for j in (0..lp).step_by(LANES) {
                for d in (0..dh).step_by(LANES) {
                    let m = lanes(dh - d);
                    let mut block = [_mm512_setzero_ps(); LANES];
                    for (t, v) in block.iter_mut().enumerate().take(len.saturating_sub(j)) {
                        // SAFETY: row j + t < len, its values k0 + d.. masked to dh.
                        *v = unsafe { _mm512_maskz_loadu_ps(m, q.add((j + t) * stride + k0 + d)) };
                    }
                    transpose(&mut block);
                    for (c, v) in block.iter().enumerate().take((dh - d).min(LANES)) {
                        // SAFETY: (d + c) · lp + j + 16 ≤ dh · lp.
                        unsafe { _mm512_storeu_ps(keys.as_mut_ptr().add((d + c) * lp + j), *v) };
                    }
                }
            }
            let (sp, kp) = (scores.as_mut_ptr(), keys.as_ptr());
            for first in (0..len).step_by(GROUP) {
                let count = (len - first).min(GROUP);
                let rows: [usize; GROUP] =
                    std::array::from_fn(|r| (first + r.min(count - 1)) * stride + q0);
                // SAFETY (every access below): query rows are below `len`, `d < dh`, key
                // and score offsets below `dh · lp` and `GROUP · lp`, value reads masked
                // to the head's `dh` values of rows below `len`.
                unsafe {
                    for c in (0..lp).step_by(STEP) {
                        let mut acc = [[_mm512_setzero_ps(); 2]; GROUP];
                        for d in 0..dh {
                            let k = kp.add(d * lp + c);
                            let (ka, kb) = (_mm512_loadu_ps(k), _mm512_loadu_ps(k.add(LANES)));
                            for (acc, &row) in acc.iter_mut().zip(&rows) {
                                let x = _mm512_set1_ps(*q.add(row + d));
                                acc[0] = _mm512_fmadd_ps(x, ka, acc[0]);
                                acc[1] = _mm512_fmadd_ps(x, kb, acc[1]);
                            }
                        }
                        for (r, acc) in acc.iter().enumerate() {
                            let s = sp.add(r * lp + c);
                            _mm512_storeu_ps(s, _mm512_mul_ps(acc[0], scale));
                            _mm512_storeu_ps(s.add(LANES), _mm512_mul_ps(acc[1], scale));
                        }
                    }
                    let mut inv = [0.0f32; GROUP];
                    for (r, inv) in inv.iter_mut().enumerate().take(count) {
                        let s = sp.add(r * lp);
                        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
                        for v in (0..len).step_by(LANES) {
                            let x = _mm512_loadu_ps(s.add(v));
                            max = _mm512_mask_max_ps(max, lanes(len - v), max, x);
                        }
                        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
                        let mut sum = _mm512_setzero_ps();
                        for v in (0..len).step_by(LANES) {
                            let x = _mm512_loadu_ps(s.add(v));
                            let p =
                                _mm512_maskz_mov_ps(lanes(len - v), exp_neg(_mm512_sub_ps(x, max)));
                            _mm512_storeu_ps(s.add(v), p);
                            sum = _mm512_add_ps(sum, p);
                        }
                        *inv = 1.0 / _mm512_reduce_add_ps(sum);
                    }
                    for c in (0..dh).step_by(STEP) {
                        let (ma, mb) = (lanes(dh - c), lanes((dh - c).saturating_sub(LANES)));
                        let mut acc = [[_mm512_setzero_ps(); 2]; GROUP];
                        for j in 0..len {
                            let v = q.add(j * stride + v0 + c);
                            let va = _mm512_maskz_loadu_ps(ma, v);
                            let vb = _mm512_maskz_loadu_ps(mb, v.add(LANES));
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let p = _mm512_set1_ps(*sp.add(r * lp + j));
                                acc[0] = _mm512_fmadd_ps(p, va, acc[0]);
                                acc[1] = _mm512_fmadd_ps(p, vb, acc[1]);
                            }
                        }
                        for (r, acc) in acc.iter().enumerate().take(count) {
                            let o = ctx.as_mut_ptr().add((first + r) * h + q0 + c);
                            let s = _mm512_set1_ps(inv[r]);
                            _mm512_mask_storeu_ps(o, ma, _mm512_mul_ps(acc[0], s));
                            _mm512_mask_storeu_ps(o.add(LANES), mb, _mm512_mul_ps(acc[1], s));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::noise;

    /// Attention of one row in f64, straight from the definition.
    fn reference(qkv: &[f32], len: usize, h: usize, heads: usize) -> Vec<f64> {
        let (dh, stride) = (h / heads, 3 * h);
        let mut out = vec![0.0f64; len * h];
        for head in 0..heads {
            let (q0, k0, v0) = (head * dh, h + head * dh, 2 * h + head * dh);
            for i in 0..len {
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..dh)
                            .map(|d| {
                                qkv[i * stride + q0 + d] as f64 * qkv[j * stride + k0 + d] as f64
                            })
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = p.iter().sum();
                for d in 0..dh {
                    out[i * h + q0 + d] = (0..len)
                        .map(|j| p[j] * qkv[j * stride + v0 + d] as f64)
                        .sum::<f64>()
                        / sum;
                }
            }
        }
        out
    }

    /// Every form against the f64 definition: MiniLM's heads (12 × 32) on lengths 1–256,
    /// and odd head widths (24, 40: partial vectors; 64: two steps of values) on a few.
    #[test]
    fn every_form_matches_the_definition() {
        let avx512 = cfg!(target_arch = "x86_64") && Isa::Avx512.runs(Kind::F32);
        if !avx512 {
            eprintln!("SKIPPED attention form avx512: this CPU cannot run it");
        }
        let mut seed = 0x5eed_u64;
        let shapes = (1..=256).map(|len| (len, 384, 12)).chain(
            [1, 7, 31, 33, 100]
                .into_iter()
                .flat_map(|len| [(len, 48, 2), (len, 80, 2), (len, 128, 2)]),
        );
        for (len, h, heads) in shapes {
            // Scores of a few units, as in a trained model: softmax neither flat nor one-hot.
            let qkv = noise(&mut seed, len * 3 * h, 1.5);
            let want = reference(&qkv, len, h, heads);
            let mut buffer = vec![f32::NAN; attention_buffer(len, h / heads)];
            let mut forms: Vec<(&str, Vec<f32>)> = Vec::new();
            let mut got = vec![0.0f32; len * h];
            attend_lanes(&qkv, &mut got, h, heads, &mut buffer);
            forms.push(("lanes", got));
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                let mut got = vec![0.0f32; len * h];
                buffer.fill(f32::NAN);
                // SAFETY: the CPU has AVX-512 F.
                unsafe { avx512::attend(&qkv, &mut got, h, heads, &mut buffer) };
                forms.push(("avx512", got));
            }
            for (form, got) in forms {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= 2e-6 * (1.0 + w.abs()),
                        "{form}, length {len}, h {h}, heads {heads}, value {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
