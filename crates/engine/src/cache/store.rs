//! A byte-budgeted LRU of vectors.
//!
//! Accounting is what the allocator really hands out, not what was asked for: per entry,
//! the vector's allocation (`Arc` header 16 B + `dim × 4` B, rounded up to jemalloc's size
//! class: 1 552 B → 1 792 B for 384 floats) and the `lru` crate's node (key 16, value
//! pointer 16, two links 16 → 48 B class); once, the hash table, allocated at the first
//! insert for twice the entries the budget can hold ([`table_bytes`]; see
//! `table_entries`) and never grown after.
//! (A table that grew with the cache doubled its allocation at each growth while the
//! entries' accounting rose smoothly: the soak's heap profiles showed that step as the
//! residual creep of memory less the cache.) The sum never exceeds the budget: an insert
//! evicts least-recently-used entries first (O(1) each), and an entry that cannot fit
//! beside the table is not stored.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

const NODE_BYTES: usize = 48;
const ARC_HEADER_BYTES: usize = 16;
/// A slot of the `lru` crate's map: a key pointer and a node pointer.
const SLOT_BYTES: usize = 16;
/// hashbrown's control bytes past the last bucket (one SIMD group).
const GROUP_BYTES: usize = 16;

/// The bytes jemalloc really reserves for a request of `n` bytes.
fn allocation(n: usize) -> usize {
    // SAFETY: nallocx only computes a size class; it allocates nothing.
    let real = unsafe { tikv_jemalloc_sys::nallocx(n.max(1), 0) };
    if real == 0 { n } else { real }
}

/// Bytes an entry of `dim` floats is accounted for (the table apart).
pub fn entry_bytes(dim: usize) -> usize {
    allocation(ARC_HEADER_BYTES + dim * 4) + allocation(NODE_BYTES)
}

/// What the cache can hold: a vector behind one shared allocation (a fat pointer of 16
/// bytes, so the `lru` node stays 48 B).
pub trait CacheValue: Clone {
    /// The bytes of the value's own allocation.
    fn allocated(&self) -> usize;
    /// Bytes its entry is accounted for (the table apart).
    fn entry_bytes(&self) -> usize {
        self.allocated() + allocation(NODE_BYTES)
    }
}

/// Vectors as the model gave them.
impl CacheValue for Arc<[f32]> {
    fn allocated(&self) -> usize {
        allocation(ARC_HEADER_BYTES + self.len() * 4)
    }
}

/// Vectors packed into fewer bytes (`cache.precision`: f16, int8).
impl CacheValue for Arc<[u8]> {
    fn allocated(&self) -> usize {
        allocation(ARC_HEADER_BYTES + self.len())
    }
}

/// The allocation of a hash table made for `entries` entries: hashbrown's buckets (a
/// power of two, at most 7/8 full) of one slot and one control byte each.
pub fn table_bytes(entries: usize) -> usize {
    if entries == 0 {
        return 0;
    }
    let buckets = if entries < 4 {
        4
    } else if entries < 8 {
        8
    } else {
        (entries * 8).div_ceil(7).next_power_of_two()
    };
    allocation(buckets * SLOT_BYTES + buckets + GROUP_BYTES)
}

/// The entries a table is made for when the budget holds `cap`: twice as many. With
/// evictions, removed slots leave tombstones; a table whose live entries stay under half
/// its capacity cleans them by rehashing in place, where a fuller one would double.
fn table_entries(cap: usize) -> usize {
    2 * cap + 1
}

/// How many entries of `entry` bytes fit in `max_bytes` beside their table.
fn capacity(max_bytes: usize, entry: usize) -> usize {
    let mut cap = max_bytes / entry.max(1);
    while cap > 0 && table_bytes(table_entries(cap)) + cap * entry > max_bytes {
        cap -= (cap / 64).max(1);
    }
    cap
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

pub struct VectorCache<V: CacheValue = Arc<[f32]>> {
    lru: LruCache<u128, V>,
    /// The entries' accounted bytes (the table's apart).
    bytes: usize,
    /// The table's allocation, fixed from the first insert until the cache empties.
    table: usize,
    max_bytes: usize,
    stats: CacheStats,
}

impl<V: CacheValue> VectorCache<V> {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            // Sized at the first insert, when the entries' size is known.
            lru: LruCache::unbounded(),
            bytes: 0,
            table: 0,
            max_bytes,
            stats: CacheStats::default(),
        }
    }

    pub fn get(&mut self, key: u128) -> Option<V> {
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

    /// Like [`get`](Self::get), without counting a hit or a miss (a second look at a
    /// key already counted).
    pub fn recheck(&mut self, key: u128) -> Option<V> {
        self.lru.get(&key).cloned()
    }

    pub fn insert(&mut self, key: u128, vector: V) {
        let size = vector.entry_bytes();
        if self.table == 0 {
            // The first entry: a table for every entry of this size the budget holds.
            let cap = capacity(self.max_bytes, size);
            let Some(entries) = NonZeroUsize::new(table_entries(cap)).filter(|_| cap > 0) else {
                return;
            };
            self.lru = LruCache::new(entries);
            self.table = table_bytes(entries.get());
        }
        if self.table + size > self.max_bytes {
            return;
        }
        if let Some(old) = self.lru.pop(&key) {
            self.bytes -= old.entry_bytes();
        }
        while self.table + self.bytes + size > self.max_bytes {
            self.evict_one();
        }
        // At the table's entry count (smaller vectors than the first), `push` evicts the
        // least recently used entry itself.
        if let Some((_, evicted)) = self.lru.push(key, vector) {
            self.bytes -= evicted.entry_bytes();
            self.stats.evictions += 1;
        }
        self.bytes += size;
        self.stats.insertions += 1;
    }

    fn evict_one(&mut self) {
        if let Some((_, v)) = self.lru.pop_lru() {
            self.bytes -= v.entry_bytes();
            self.stats.evictions += 1;
        }
    }

    /// Evicts least-recently-used entries until at most `target` bytes are accounted.
    pub fn shrink_to(&mut self, target: usize) -> usize {
        let before = self.lru.len();
        while self.table + self.bytes > target && !self.lru.is_empty() {
            self.evict_one();
        }
        if self.lru.is_empty() {
            // Give the table's memory back too, not only the vectors'.
            self.lru = LruCache::unbounded();
            self.table = 0;
        }
        before - self.lru.len()
    }

    /// Accounted bytes: the entries' and the table's.
    pub fn bytes(&self) -> usize {
        self.table + self.bytes
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.lru.len() as u64,
            bytes: self.bytes() as u64,
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
                assert_eq!(cache.bytes(), cache.table + present.values().sum::<usize>());
            }
        }
    }

    #[test]
    fn evicts_least_recently_used_first_and_counts() {
        let one = entry_bytes(4);
        let mut cache = VectorCache::new(table_bytes(2) + one * 2);
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
        assert_eq!(entry_bytes(384), 1792 + 48);
        // 100 MiB holds ≈ 55 500 such entries beside a table of 131 072 buckets.
        let cap = capacity(100 << 20, entry_bytes(384));
        assert!(table_bytes(table_entries(cap)) + cap * entry_bytes(384) <= 100 << 20);
        assert!((55_000..57_000).contains(&cap), "{cap}");
        assert!(table_bytes(table_entries(cap)) >= 131_072 * 17);
    }

    #[test]
    fn the_table_is_made_once_and_given_back_when_empty() {
        let mut cache = VectorCache::new(1 << 20);
        cache.insert(1, vector(384, 1.0));
        let table = cache.table;
        assert!(table > 0 && cache.bytes() == table + entry_bytes(384));
        for k in 2..500 {
            cache.insert(k, vector(384, 1.0));
        }
        assert_eq!(cache.table, table, "the table never grows");
        assert!(cache.bytes() <= 1 << 20);
        cache.shrink_to(0);
        assert_eq!((cache.bytes(), cache.table), (0, 0));
    }

    #[test]
    fn replacing_a_key_does_not_double_count() {
        let mut cache = VectorCache::new(10_000);
        cache.insert(7, vector(8, 1.0));
        cache.insert(7, vector(8, 2.0));
        assert_eq!(cache.bytes(), cache.table + entry_bytes(8));
        assert_eq!(cache.get(7).unwrap()[0], 2.0);
    }
}
