//! A byte-budgeted LRU of vectors.
//!
//! Accounting per entry is what the allocator really hands out, not what was asked for:
//! the vector's allocation (`Arc` header 16 B + `dim × 4` B, rounded up to jemalloc's size
//! class: 1 552 B → 1 792 B for 384 floats), the `lru` crate's node (key 16, value
//! pointer 16, two links 16 → 48 B class) and [`TABLE_BYTES_PER_ENTRY`] for the hash
//! table's slot and control byte at its worst load after growing. The sum never exceeds
//! the budget: an insert evicts least-recently-used entries first (O(1) each), and an
//! entry larger than the whole budget is not stored.

use std::sync::Arc;

use lru::LruCache;

/// The hash table's share per entry: a 16-byte slot and a control byte, doubled because
/// the table may be half empty right after it grows.
pub const TABLE_BYTES_PER_ENTRY: usize = 34;
const NODE_BYTES: usize = 48;
const ARC_HEADER_BYTES: usize = 16;

/// The bytes jemalloc really reserves for a request of `n` bytes.
fn allocation(n: usize) -> usize {
    // SAFETY: nallocx only computes a size class; it allocates nothing.
    let real = unsafe { tikv_jemalloc_sys::nallocx(n, 0) };
    if real == 0 { n } else { real }
}

/// Bytes an entry of `dim` floats is accounted for.
pub fn entry_bytes(dim: usize) -> usize {
    allocation(ARC_HEADER_BYTES + dim * 4) + allocation(NODE_BYTES) + TABLE_BYTES_PER_ENTRY
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub insertions: u64,
    pub evictions: u64,
    pub entries: u64,
    pub bytes: u64,
    pub max_bytes: u64,
}

pub struct VectorCache {
    lru: LruCache<u128, Arc<[f32]>>,
    bytes: usize,
    max_bytes: usize,
    stats: CacheStats,
}

impl VectorCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            // No entry-count cap: the byte budget below bounds it (see `insert`).
            lru: LruCache::unbounded(),
            bytes: 0,
            max_bytes,
            stats: CacheStats::default(),
        }
    }

    pub fn get(&mut self, key: u128) -> Option<Arc<[f32]>> {
        match self.lru.get(&key) {
            Some(v) => {
                self.stats.hits += 1;
                Some(v.clone())
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    pub fn insert(&mut self, key: u128, vector: Arc<[f32]>) {
        let size = entry_bytes(vector.len());
        if size > self.max_bytes {
            return;
        }
        if let Some(old) = self.lru.pop(&key) {
            self.bytes -= entry_bytes(old.len());
        }
        while self.bytes + size > self.max_bytes {
            self.evict_one();
        }
        self.lru.put(key, vector);
        self.bytes += size;
        self.stats.insertions += 1;
    }

    fn evict_one(&mut self) {
        if let Some((_, v)) = self.lru.pop_lru() {
            self.bytes -= entry_bytes(v.len());
            self.stats.evictions += 1;
        }
    }

    /// Evicts least-recently-used entries until at most `target` bytes are accounted.
    pub fn shrink_to(&mut self, target: usize) -> usize {
        let before = self.lru.len();
        while self.bytes > target && !self.lru.is_empty() {
            self.evict_one();
        }
        if self.lru.is_empty() {
            // Give the table's memory back too, not only the vectors'.
            self.lru = LruCache::unbounded();
        }
        before - self.lru.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.lru.len() as u64,
            bytes: self.bytes as u64,
            max_bytes: self.max_bytes as u64,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(dim: usize, fill: f32) -> Arc<[f32]> {
        vec![fill; dim].into()
    }

    /// Random sizes and orders (a xorshift stream): the budget holds after every step,
    /// and the accounted bytes equal the sum over the entries actually present.
    #[test]
    fn never_exceeds_its_budget() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for budget in [0usize, 100, 1_000, 10_000, 100_000] {
            let mut cache = VectorCache::new(budget);
            let mut present: std::collections::HashMap<u128, usize> = Default::default();
            for _ in 0..5_000 {
                let key = (next() % 300) as u128;
                match next() % 4 {
                    0 => {
                        let _ = cache.get(key);
                    }
                    1 => {
                        let target = (next() as usize) % (budget + 1);
                        cache.shrink_to(target);
                        assert!(cache.bytes() <= target);
                    }
                    _ => {
                        let dim = 1 + (next() % 600) as usize;
                        cache.insert(key, vector(dim, 1.0));
                    }
                }
                assert!(cache.bytes() <= budget, "{} > {budget}", cache.bytes());
                present.clear();
                for (k, v) in cache.lru.iter() {
                    present.insert(*k, entry_bytes(v.len()));
                }
                assert_eq!(cache.bytes(), present.values().sum::<usize>());
            }
        }
    }

    #[test]
    fn evicts_least_recently_used_first_and_counts() {
        let one = entry_bytes(4);
        let mut cache = VectorCache::new(one * 2);
        cache.insert(1, vector(4, 1.0));
        cache.insert(2, vector(4, 2.0));
        assert!(cache.get(1).is_some()); // 2 is now least recently used
        cache.insert(3, vector(4, 3.0));
        assert!(cache.get(2).is_none());
        assert_eq!(cache.get(1).unwrap()[0], 1.0);
        assert_eq!(cache.get(3).unwrap()[0], 3.0);
        let s = cache.stats();
        assert_eq!(
            (s.hits, s.misses, s.insertions, s.evictions, s.entries),
            (3, 1, 3, 1, 2)
        );
    }

    #[test]
    fn accounting_uses_the_allocators_size_classes() {
        // 16 + 384 × 4 = 1 552 requested bytes live in jemalloc's 1 792-byte class.
        assert_eq!(entry_bytes(384), 1792 + 48 + TABLE_BYTES_PER_ENTRY);
    }

    #[test]
    fn replacing_a_key_does_not_double_count() {
        let mut cache = VectorCache::new(10_000);
        cache.insert(7, vector(8, 1.0));
        cache.insert(7, vector(8, 2.0));
        assert_eq!(cache.bytes(), entry_bytes(8));
        assert_eq!(cache.get(7).unwrap()[0], 2.0);
    }
}
