//! One dataset's loaded graph: adding rows, and searching it with the candidates
//! rescored against the stored vectors (`index.vectors`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};

use keel_wire::vectors::{VectorFormat, pack_signs, quantize_int8};
use usearch::{Index, b1x8};

use super::format::{IndexReport, Manifest, VECTORS};
use crate::sink::config::Quantization;
use crate::sink::reduce::Projection;
use crate::sink::store::SinkError;

/// Searches that may run on one index at once beside its writers (USearch keeps one
/// context per concurrent caller).
const SEARCH_THREADS: usize = 16;

/// One dataset's loaded index.
pub struct DatasetIndex {
    pub(super) dataset: String,
    pub(super) dir: PathBuf,
    pub(super) manifest: Mutex<Manifest>,
    pub(super) graph: Index,
    /// The dataset's vector format.
    pub(super) format: VectorFormat,
    pub(super) projection: Option<Projection>,
    pub(super) vectors: File,
    /// Rows in the graph and in `index.vectors` (searches trust keys below it).
    pub(super) covered: AtomicU64,
    /// Rows covered when the graph was last saved.
    pub(super) saved: AtomicU64,
    pub(super) full: AtomicBool,
    /// Searches in the graph now (at most SEARCH_THREADS: USearch has a context each).
    pub(super) searching: (Mutex<usize>, Condvar),
    /// Held shared by every search, exclusively while rows are added, the graph's
    /// capacity grows or its search expansion changes: USearch frees and replaces its
    /// node arrays and thread contexts on a reserve, which must not meet a search in
    /// flight, and a search beside its inserts can come back empty.
    pub(super) resizing: RwLock<()>,
}

/// A search's turn in the graph; the next waiting one goes on when it drops.
struct Turn<'a>(&'a (Mutex<usize>, Condvar));

impl<'a> Turn<'a> {
    fn take(gate: &'a (Mutex<usize>, Condvar)) -> Self {
        let mut busy = gate.0.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= SEARCH_THREADS {
            busy = gate.1.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
        Self(gate)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.0.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.1.notify_one();
    }
}

/// A candidate: cosine (or its estimate) and dataset row.
pub type Scored = (f32, u64);

/// What a search of the graph found.
#[derive(Debug)]
pub struct IndexHits {
    /// The best rows, best first (ties: lower row first).
    pub best: Vec<Scored>,
    /// Candidates the graph gave (and were rescored).
    pub candidates: u64,
    /// Rows the graph covered for this search; later rows need an exact scan.
    pub covered: u64,
}

impl DatasetIndex {
    pub fn covered(&self) -> u64 {
        self.covered.load(Ordering::Acquire)
    }

    pub fn report(&self) -> IndexReport {
        let m = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        IndexReport {
            dataset: self.dataset.clone(),
            quantization: m.quantization,
            projection: m.projection.clone(),
            dimensions: m.dimensions,
            connectivity: m.connectivity,
            rescore: m.rescore,
            rows: self.covered(),
            vectors: self.graph.size() as u64,
            memory_bytes: self.graph.memory_usage() as u64,
            vector_bytes: m.quantization.vector_bytes(m.dimensions),
            rescore_bytes: self.format.packed_bytes(),
            build_seconds: m.build_seconds,
            full: self.full.load(Ordering::Relaxed),
            loaded: true,
        }
    }

    /// A dataset vector (as decoded) in the graph's space: projected, or as it is.
    pub(super) fn to_graph(&self, v: &[f32]) -> Vec<f32> {
        match &self.projection {
            Some(p) => p.project(v),
            None => v.to_vec(),
        }
    }

    pub(super) fn add(&self, key: u64, v: &[f32]) -> Result<(), String> {
        let q = self.quantization();
        let result = match q {
            Quantization::F32 | Quantization::F16 => self.graph.add::<f32>(key, v),
            Quantization::Int8 => self.graph.add::<i8>(key, &quantize_int8(v).0),
            Quantization::Binary => {
                let mut bits = vec![0u8; v.len().div_ceil(8)];
                pack_signs(v, &mut bits);
                self.graph.add::<b1x8>(key, b1x8::from_u8s(&bits))
            }
        };
        result.map_err(|e| e.to_string())
    }

    pub(super) fn quantization(&self) -> Quantization {
        self.manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .quantization
    }

    /// The graph's `count` nearest keys to `query` (already in the graph's space), with
    /// their estimated cosines.
    pub(super) fn graph_search(&self, query: &[f32], count: usize) -> Result<Vec<Scored>, String> {
        let d = query.len() as f32;
        let q = self.quantization();
        let matches = match q {
            Quantization::F32 | Quantization::F16 => self.graph.search::<f32>(query, count),
            Quantization::Int8 => self.graph.search::<i8>(&quantize_int8(query).0, count),
            Quantization::Binary => {
                let mut bits = vec![0u8; query.len().div_ceil(8)];
                pack_signs(query, &mut bits);
                self.graph.search::<b1x8>(b1x8::from_u8s(&bits), count)
            }
        }
        .map_err(|e| e.to_string())?;
        Ok(matches
            .keys
            .iter()
            .zip(&matches.distances)
            .map(|(&k, &dist)| {
                let score = match q {
                    // Hamming: the cosine of two ±1 vectors.
                    Quantization::Binary => 1.0 - 2.0 * dist / d,
                    _ => 1.0 - dist,
                };
                (score, k)
            })
            .collect())
    }

    /// The `k` best of the covered rows for `query` (the model's vector cut to the
    /// dataset's dimensions): the graph's candidates (`expansion` wide, at least
    /// `rescore` and `k` of them), rescored against the stored vectors when `rescore` > 0
    /// or `exact` (their scores are to be ranked beside exact ones: rows the graph does
    /// not cover yet, scanned exactly; a graph's estimate is on another scale).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        rescore: Option<usize>,
        expansion: Option<usize>,
        exact: bool,
    ) -> Result<IndexHits, SinkError> {
        let covered = self.covered();
        let (rescore, default_expansion) = {
            let m = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
            (rescore.unwrap_or(m.rescore), m.expansion_search)
        };
        let count = k.max(rescore);
        let expansion = expansion.unwrap_or(default_expansion).max(count);
        if self.graph.expansion_search() != expansion {
            let _alone = self.resizing.write().unwrap_or_else(|e| e.into_inner());
            self.graph.change_expansion_search(expansion);
        }
        let graph_query = self.to_graph(query);
        let turn = Turn::take(&self.searching);
        let shared = self.resizing.read().unwrap_or_else(|e| e.into_inner());
        let found = self.graph_search(&graph_query, count);
        drop(shared);
        drop(turn);
        let mut found = found.map_err(|e| {
            SinkError::NotSearchable(format!("{}: index search: {e}", self.dataset))
        })?;
        // Keys being added right now are not yet covered: the exact tail scan has them.
        found.retain(|&(_, row)| row < covered);
        let candidates = found.len() as u64;
        if rescore > 0 || exact {
            let width = self.format.packed_bytes();
            let mut buf = vec![0u8; width];
            for (score, row) in found.iter_mut() {
                self.vectors
                    .read_exact_at(&mut buf, *row * width as u64)
                    .map_err(|source| SinkError::Io {
                        path: self.dir.join(VECTORS),
                        source,
                    })?;
                *score = self.format.packed_cosine(&buf, query);
            }
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        found.truncate(k);
        Ok(IndexHits {
            best: found,
            candidates,
            covered,
        })
    }
}

/// Concurrent callers a graph is ready for: the build's threads and searches.
pub(super) fn threads() -> usize {
    rayon::current_num_threads() + SEARCH_THREADS
}
