//! The first level in a configured precision (`cache.precision`): f32 keeps the model's
//! vectors as they are; f16 and int8 pack each into 2 or 1 byte per value (int8 with its
//! per-vector scale first), so the same byte budget holds about 2× or 4× the entries.
//! A hit is unpacked to f32 on its way out (cosine to the original ≥ 0.99999 for f16,
//! ≥ 0.999 for int8: `keel_wire::vectors`' symmetric quantization). The budget stays
//! exact: entries are accounted at their real allocations ([`super::store`]).

use std::sync::Arc;

use keel_wire::vectors::{VectorPrecision, quantize_int8};

use super::store::{CacheStats, VectorCache};

pub enum CacheStore {
    F32(VectorCache<Arc<[f32]>>),
    Packed(VectorCache<Arc<[u8]>>, VectorPrecision),
}

impl CacheStore {
    /// `precision`: f32, f16 or int8 (`cache.precision`, validated).
    pub fn new(max_bytes: usize, precision: VectorPrecision) -> Self {
        match precision {
            VectorPrecision::F32 => Self::F32(VectorCache::new(max_bytes)),
            p => Self::Packed(VectorCache::new(max_bytes), p),
        }
    }

    pub fn get(&mut self, key: u128) -> Option<Arc<[f32]>> {
        match self {
            Self::F32(c) => c.get(key),
            Self::Packed(c, p) => c.get(key).map(|b| unpack(*p, &b)),
        }
    }

    /// A second look, counting nothing.
    pub fn recheck(&mut self, key: u128) -> Option<Arc<[f32]>> {
        match self {
            Self::F32(c) => c.recheck(key),
            Self::Packed(c, p) => c.recheck(key).map(|b| unpack(*p, &b)),
        }
    }

    pub fn insert(&mut self, key: u128, vector: Arc<[f32]>) {
        match self {
            Self::F32(c) => c.insert(key, vector),
            Self::Packed(c, p) => c.insert(key, pack(*p, &vector)),
        }
    }

    pub fn shrink_to(&mut self, target: usize) -> usize {
        match self {
            Self::F32(c) => c.shrink_to(target),
            Self::Packed(c, _) => c.shrink_to(target),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::F32(c) => c.bytes(),
            Self::Packed(c, _) => c.bytes(),
        }
    }

    pub fn max_bytes(&self) -> usize {
        match self {
            Self::F32(c) => c.max_bytes(),
            Self::Packed(c, _) => c.max_bytes(),
        }
    }

    pub fn stats(&self) -> CacheStats {
        match self {
            Self::F32(c) => c.stats(),
            Self::Packed(c, _) => c.stats(),
        }
    }
}

/// f16: 2 bytes (little-endian) per value; int8: the scale (f32, little-endian), then
/// one byte per value.
pub fn pack(precision: VectorPrecision, v: &[f32]) -> Arc<[u8]> {
    match precision {
        VectorPrecision::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        VectorPrecision::Int8 => {
            let (q, scale) = quantize_int8(v);
            scale
                .to_le_bytes()
                .into_iter()
                .chain(q.into_iter().map(|x| x as u8))
                .collect()
        }
        VectorPrecision::F32 | VectorPrecision::Binary => {
            unreachable!("cache.precision is validated to f32, f16 or int8")
        }
    }
}

pub fn unpack(precision: VectorPrecision, b: &[u8]) -> Arc<[f32]> {
    match precision {
        VectorPrecision::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        VectorPrecision::Int8 => {
            let scale = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            b[4..].iter().map(|&q| q as i8 as f32 * scale).collect()
        }
        VectorPrecision::F32 | VectorPrecision::Binary => {
            unreachable!("cache.precision is validated to f32, f16 or int8")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (n(a) * n(b))
    }

    fn vector(seed: u64, dim: usize) -> Arc<[f32]> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..dim)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn packed_vectors_come_back_close_and_the_budget_holds_more_of_them() {
        let budget = 2 << 20;
        let mut entries = Vec::new();
        for precision in [
            VectorPrecision::F32,
            VectorPrecision::F16,
            VectorPrecision::Int8,
        ] {
            let mut cache = CacheStore::new(budget, precision);
            for k in 0..5_000u64 {
                cache.insert(k as u128, vector(k, 384));
                assert!(cache.bytes() <= budget, "{precision}: over the budget");
            }
            let held = cache.stats().entries;
            entries.push(held);
            // The newest entries are there, close to what went in.
            let worst = (5_000 - held.min(100)..5_000)
                .map(|k| cosine(&cache.get(k as u128).unwrap(), &vector(k, 384)))
                .fold(1.0f32, f32::min);
            let bound = match precision {
                VectorPrecision::F32 => 1.0 - 1e-7,
                VectorPrecision::F16 => 0.99999,
                _ => 0.999,
            };
            assert!(worst >= bound, "{precision}: cosine {worst}");
        }
        // Per entry 1 792 + 48 B for f32, 896 + 48 for f16 (768 + 16 → jemalloc's 896
        // class), 448 + 48 for int8 (388 + 16 → 448), plus the hash table's share (made
        // for twice the entries, in a power of two of buckets: more entries, more table).
        assert!(entries[1] as f64 >= 1.8 * entries[0] as f64, "{entries:?}");
        assert!(entries[2] as f64 >= 3.0 * entries[0] as f64, "{entries:?}");
    }

    /// Keys drawn from a Zipf law (s = 1) over `n` keys, by inverse CDF; deterministic.
    fn zipf(n: usize, draws: usize) -> Vec<u64> {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0f64;
        for k in 1..=n {
            total += 1.0 / k as f64;
            cdf.push(total);
        }
        let mut s = 0x853c_49e6_748f_ea9bu64;
        (0..draws)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f64 / (1u64 << 53) as f64 * total;
                cdf.partition_point(|&c| c < u) as u64
            })
            .collect()
    }

    /// A Zipf workload at one byte budget: every miss inserts its vector. int8 entries
    /// take a quarter of the room, so more of the tail stays and more lookups hit.
    /// (`cargo nextest run --release -E 'test(zipf)' --no-capture` prints both rates.)
    #[test]
    fn at_the_same_budget_int8_entries_hit_more_often_on_a_zipf_workload() {
        let keys = zipf(200_000, 400_000);
        let budget = 16 << 20;
        let mut rates = Vec::new();
        for precision in [
            VectorPrecision::F32,
            VectorPrecision::F16,
            VectorPrecision::Int8,
        ] {
            let mut cache = CacheStore::new(budget, precision);
            let mut hits = 0u64;
            for &k in &keys {
                if cache.get(k as u128).is_some() {
                    hits += 1;
                } else {
                    cache.insert(k as u128, vector(k, 384));
                }
                assert!(cache.bytes() <= budget);
            }
            let rate = hits as f64 / keys.len() as f64;
            println!(
                "zipf s=1 over 200 000 keys, 400 000 lookups, 16 MiB: {precision} holds {} entries, hit rate {rate:.4}",
                cache.stats().entries
            );
            rates.push(rate);
        }
        assert!(rates[1] > rates[0] + 0.02, "{rates:?}");
        assert!(rates[2] > rates[1] + 0.02, "{rates:?}");
    }
}
