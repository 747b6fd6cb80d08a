//! Every dataset's index: loaded on first use, built on request, grown by the indexer
//! thread as rows are appended, saved by generation with the manifest renamed last.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use keel_wire::vectors::VectorFormat;
use rayon::prelude::*;
use usearch::Index;

use super::format::{
    IndexReport, MANIFEST, Manifest, VECTORS, graph_options, invalid_data, per_row_bytes,
};
use super::graph::{DatasetIndex, threads};
use super::{IndexOptions, MAX_CANDIDATES};
use crate::sink::config::IndexConfig;
use crate::sink::reduce::Projection;
use crate::sink::store::{DatasetStore, SinkError};

/// Rows read from the dataset per batch while building or growing.
const READ_ROWS: usize = 8192;

/// Rows added to a graph while searches wait (each wait: about this many inserts).
const ADD_ROWS: usize = 256;

/// Every dataset's index: loaded on first use, grown by an indexer thread as DoPut
/// appends rows, saved every `save_every_rows` rows and at shutdown.
pub struct Indexes {
    store: Arc<DatasetStore>,
    root: PathBuf,
    config: IndexConfig,
    loaded: Mutex<HashMap<String, Arc<DatasetIndex>>>,
    /// Datasets whose index is being built or grown (one writer at a time).
    writing: Mutex<HashSet<String>>,
    /// Datasets with rows to add (a set: at most one entry per dataset), and whether the
    /// indexer is told to stop; the indexer waits on `wake`.
    pending: Mutex<(HashSet<String>, bool)>,
    wake: Condvar,
}

/// Held while a dataset's index is written; released on drop.
struct Writing<'a>(&'a Indexes, String);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0
            .writing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

impl Indexes {
    /// The registry over `store` (rooted at `root`, the data folder) and its indexer
    /// thread, which grows indexes after appends until [`Indexes::stop`].
    pub fn start(
        store: Arc<DatasetStore>,
        root: &Path,
        config: IndexConfig,
    ) -> (Arc<Self>, std::thread::JoinHandle<()>) {
        remove_leftovers(root);
        let indexes = Arc::new(Self {
            store,
            root: root.to_path_buf(),
            config,
            loaded: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashSet::new()),
            pending: Mutex::new((HashSet::new(), false)),
            wake: Condvar::new(),
        });
        let worker = indexes.clone();
        let thread = std::thread::Builder::new()
            .name("keel-indexer".into())
            .spawn(move || {
                while let Some(name) = worker.next_pending() {
                    if let Err(e) = worker.catch_up(&name) {
                        tracing::warn!(dataset = %name, error = %e, "growing the index failed; its new rows are scanned exactly");
                    }
                }
                worker.save_all();
            })
            .expect("the indexer thread starts");
        (indexes, thread)
    }

    /// The next dataset to grow; `None` once stopped with nothing left.
    fn next_pending(&self) -> Option<String> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(name) = pending.0.iter().next().cloned() {
                pending.0.remove(&name);
                return Some(name);
            }
            if pending.1 {
                return None;
            }
            pending = self.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops the indexer thread once what is pending is done; it saves every index.
    pub fn stop(&self) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.wake.notify_all();
    }

    /// Rows were appended to `name`: grow its index, if it has one (off this thread).
    pub fn appended(&self, name: &str) {
        if self.dir(name).join(MANIFEST).is_file() {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if !pending.1 {
                pending.0.insert(name.to_string());
                self.wake.notify_one();
            }
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn lock(&self, name: &str) -> Option<Writing<'_>> {
        let mut writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        writing
            .insert(name.to_string())
            .then(|| Writing(self, name.to_string()))
    }

    /// Memory held by every loaded index.
    pub fn memory_bytes(&self) -> u64 {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|i| i.graph.memory_usage() as u64)
            .sum()
    }

    /// Memory held by the loaded indexes of other datasets than `name`.
    fn others(&self, name: &str) -> u64 {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, i)| i.graph.memory_usage() as u64)
            .sum()
    }

    /// Reports of the loaded indexes, by dataset name.
    pub fn reports(&self) -> Vec<IndexReport> {
        let mut out: Vec<IndexReport> = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|i| i.report())
            .collect();
        out.sort_by(|a, b| a.dataset.cmp(&b.dataset));
        out
    }

    /// What is known of `name`'s index without loading it: the loaded one's report, else
    /// its manifest's; `None` without an index.
    pub fn describe(&self, name: &str) -> Option<IndexReport> {
        if let Some(i) = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Some(i.report());
        }
        let m: Manifest =
            serde_json::from_slice(&fs::read(self.dir(name).join(MANIFEST)).ok()?).ok()?;
        let format = VectorFormat {
            precision: m.precision,
            dimensions: m.dataset_dimensions,
        };
        Some(IndexReport {
            dataset: name.to_string(),
            quantization: m.quantization,
            projection: m.projection.clone(),
            dimensions: m.dimensions,
            connectivity: m.connectivity,
            rescore: m.rescore,
            rows: m.rows,
            vectors: 0,
            memory_bytes: 0,
            vector_bytes: m.quantization.vector_bytes(m.dimensions),
            rescore_bytes: format.packed_bytes(),
            build_seconds: m.build_seconds,
            full: false,
            loaded: false,
        })
    }

    /// The dataset's index, loaded if it has one on disk; `None` if it has none.
    pub fn get(&self, name: &str) -> Result<Option<Arc<DatasetIndex>>, SinkError> {
        DatasetStore::validate_name(name)?;
        if let Some(i) = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(Some(i.clone()));
        }
        let path = self.dir(name).join(MANIFEST);
        let manifest: Manifest = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| invalid_data(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SinkError::Io { path, source }),
        };
        let index = Arc::new(self.open(name, manifest)?);
        let used = self.memory_bytes();
        let size = index.graph.memory_usage() as u64;
        if used + size > self.config.max_bytes {
            return Err(SinkError::OverBudget(format!(
                "loading {name}'s index ({size} bytes) would pass storage.index.max_bytes \
                 ({} bytes; {used} held by other indexes)",
                self.config.max_bytes
            )));
        }
        let index = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_insert(index)
            .clone();
        // Rows stored since it was saved are added by the indexer thread.
        self.appended(name);
        Ok(Some(index))
    }

    /// Opens a saved index (the graph loaded into memory).
    fn open(&self, name: &str, mut manifest: Manifest) -> Result<DatasetIndex, SinkError> {
        let dir = self.dir(name);
        // A manifest saved before these were bounded: every search reserves this many.
        manifest.rescore = manifest.rescore.min(MAX_CANDIDATES);
        manifest.expansion_search = manifest.expansion_search.clamp(1, MAX_CANDIDATES);
        manifest.expansion_add = manifest.expansion_add.clamp(1, MAX_CANDIDATES);
        let graph = Index::new(&graph_options(&manifest))
            .map_err(|e| SinkError::NotSearchable(format!("{name}: index: {e}")))?;
        let graph_path = dir.join(&manifest.graph);
        graph
            .load(&graph_path.to_string_lossy())
            .map_err(|e| SinkError::NotSearchable(format!("{}: {e}", graph_path.display())))?;
        graph
            .reserve_capacity_and_threads(graph.size(), threads())
            .map_err(|e| SinkError::NotSearchable(format!("{name}: index: {e}")))?;
        let projection = match &manifest.projection {
            Some(p) => Some(Projection::load(&dir, name, p)?),
            None => None,
        };
        let vectors_path = dir.join(VECTORS);
        let vectors = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&vectors_path)
            .map_err(|source| SinkError::Io {
                path: vectors_path,
                source,
            })?;
        let rows = manifest.rows;
        Ok(DatasetIndex {
            dataset: name.to_string(),
            dir,
            format: VectorFormat {
                precision: manifest.precision,
                dimensions: manifest.dataset_dimensions,
            },
            manifest: Mutex::new(manifest),
            graph,
            projection,
            vectors,
            covered: AtomicU64::new(rows),
            saved: AtomicU64::new(rows),
            full: AtomicBool::new(false),
            searching: Default::default(),
            resizing: Default::default(),
        })
    }

    /// Builds (or rebuilds) `name`'s index over every row it holds now, then keeps it
    /// growing with later appends. Blocking: minutes for millions of rows.
    pub fn build(&self, name: &str, request: &IndexOptions) -> Result<IndexReport, SinkError> {
        let started = Instant::now();
        let info = self.store.info(name)?;
        let format = VectorFormat::of_schema(&info.schema)
            .map_err(|e| SinkError::NotSearchable(format!("dataset {name:?}: {e}")))?;
        let c = &self.config;
        let projection = match &request.projection {
            Some(p) => {
                let p = Projection::load(&self.dir(name), name, p)?;
                if p.input_dimensions != format.dimensions {
                    return Err(SinkError::Invalid(format!(
                        "projection {:?} takes {} dimensions, {name}'s vectors have {}",
                        p.name, p.input_dimensions, format.dimensions
                    )));
                }
                Some(p)
            }
            None => None,
        };
        let quantization = request.quantization.unwrap_or(c.quantization);
        let dimensions = projection
            .as_ref()
            .map_or(format.dimensions, |p| p.dimensions);
        let connectivity = request.connectivity.unwrap_or(c.connectivity);
        if !(2..=256).contains(&connectivity) {
            return Err(SinkError::Invalid(format!(
                "connectivity must be within 2..=256, got {connectivity}"
            )));
        }
        for (what, value) in [
            ("rescore", request.rescore),
            ("expansion_add", request.expansion_add),
            ("expansion_search", request.expansion_search),
        ] {
            if value.is_some_and(|v| v > MAX_CANDIDATES) {
                return Err(SinkError::Invalid(format!(
                    "{what} must be at most {MAX_CANDIDATES}, got {}",
                    value.unwrap_or_default()
                )));
            }
        }
        let manifest = Manifest {
            quantization,
            projection: request.projection.clone(),
            connectivity,
            expansion_add: request.expansion_add.unwrap_or(c.expansion_add).max(1),
            expansion_search: request
                .expansion_search
                .unwrap_or(c.expansion_search)
                .max(1),
            rescore: request.rescore.unwrap_or(c.rescore),
            dimensions,
            precision: format.precision,
            dataset_dimensions: format.dimensions,
            rows: 0,
            graph: String::new(),
            build_seconds: 0.0,
        };
        // The budget: what the graph will hold, against what other indexes hold.
        let estimate = info.rows * per_row_bytes(&manifest);
        let others = self.others(name);
        if others + estimate > c.max_bytes {
            return Err(SinkError::OverBudget(format!(
                "an index of {name}'s {} rows needs about {estimate} bytes; with {others} held \
                 by other indexes that passes storage.index.max_bytes ({} bytes): raise it, \
                 or choose a smaller quantization (binary, int8) or a projection",
                info.rows, c.max_bytes
            )));
        }
        let Some(_writing) = self.lock(name) else {
            return Err(SinkError::Busy(format!(
                "{name}'s index is being built or grown; try again when that is done"
            )));
        };
        let dir = self.dir(name);
        let graph = Index::new(&graph_options(&manifest))
            .map_err(|e| SinkError::NotSearchable(format!("{name}: index: {e}")))?;
        graph
            .reserve_capacity_and_threads(info.rows as usize, threads())
            .map_err(|e| SinkError::NotSearchable(format!("{name}: index: {e}")))?;
        let vectors_tmp = dir.join(format!(".tmp-{VECTORS}"));
        let vectors = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&vectors_tmp)
            .map_err(|source| SinkError::Io {
                path: vectors_tmp.clone(),
                source,
            })?;
        let index = DatasetIndex {
            dataset: name.to_string(),
            dir: dir.clone(),
            format,
            manifest: Mutex::new(manifest),
            graph,
            projection,
            vectors,
            covered: AtomicU64::new(0),
            saved: AtomicU64::new(0),
            full: AtomicBool::new(false),
            searching: Default::default(),
            resizing: Default::default(),
        };
        // Rows appended while this runs are added too: go on until none are left.
        loop {
            let total = self.store.info(name)?.rows;
            if index.covered() >= total || index.full.load(Ordering::Relaxed) {
                break;
            }
            self.add_rows(&index, total)?;
        }
        index
            .manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .build_seconds = started.elapsed().as_secs_f64();
        // The graph an earlier index saved, removed once the new one is in place.
        let replaced = fs::read(dir.join(MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
            .map(|m| m.graph);
        fs::rename(&vectors_tmp, dir.join(VECTORS)).map_err(|source| SinkError::Io {
            path: vectors_tmp,
            source,
        })?;
        self.save(&index)?;
        if let Some(old) = replaced {
            let _ = fs::remove_file(dir.join(old));
        }
        let index = Arc::new(index);
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), index.clone());
        tracing::info!(dataset = %name, rows = index.covered(), seconds = started.elapsed().as_secs_f64(), "index built");
        Ok(index.report())
    }

    /// Adds rows `covered..until` of the dataset to `index` (vectors file first, then
    /// the graph, in parallel), stopping at the memory budget.
    fn add_rows(&self, index: &DatasetIndex, until: u64) -> Result<(), SinkError> {
        let from = index.covered();
        let width = index.format.packed_bytes();
        let per_row = per_row_bytes(&index.manifest.lock().unwrap_or_else(|e| e.into_inner()));
        let mut at = from;
        let mut packed = Vec::new();
        self.store.read_range(
            &index.dataset,
            from,
            Some(until - from),
            READ_ROWS,
            |batch| -> Result<(), SinkError> {
                let n = batch.num_rows() as u64;
                let used = self.others(&index.dataset) + index.graph.memory_usage() as u64;
                if used + n * per_row > self.config.max_bytes {
                    if !index.full.swap(true, Ordering::Relaxed) {
                        tracing::warn!(dataset = %index.dataset, rows = at, max_bytes = self.config.max_bytes,
                            "index reached storage.index.max_bytes; later rows are scanned exactly");
                    }
                    return Err(SinkError::OverBudget("index full".into()));
                }
                let rows = index
                    .format
                    .decode(&batch)
                    .map_err(|e| SinkError::NotSearchable(format!("{}: {e}", index.dataset)))?;
                packed.clear();
                packed.resize(rows.len() * width, 0);
                for (v, out) in rows.iter().zip(packed.chunks_exact_mut(width)) {
                    if let Some(v) = v {
                        index.format.pack(v, out);
                    }
                }
                index
                    .vectors
                    .write_all_at(&packed, at * width as u64)
                    .map_err(|source| SinkError::Io {
                        path: index.dir.join(VECTORS),
                        source,
                    })?;
                let need = index.graph.size() + rows.len();
                if need > index.graph.capacity() {
                    // No search may run while USearch replaces its arrays.
                    let _alone = index.resizing.write().unwrap_or_else(|e| e.into_inner());
                    index
                        .graph
                        .reserve_capacity_and_threads(need.max(2 * index.graph.capacity()), threads())
                        .map_err(|e| SinkError::NotSearchable(format!("index: {e}")))?;
                }
                // Searches wait while rows go in, a few hundred at a time: a search beside
                // USearch's inserts can find nothing (an entry point whose links are
                // still being written), so the two never overlap.
                for (c, chunk) in rows.chunks(ADD_ROWS).enumerate() {
                    let first = at + (c * ADD_ROWS) as u64;
                    let _alone = index.resizing.write().unwrap_or_else(|e| e.into_inner());
                    chunk
                        .par_iter()
                        .enumerate()
                        .filter_map(|(i, v)| v.as_ref().map(|v| (first + i as u64, v)))
                        .try_for_each(|(key, v)| index.add(key, &index.to_graph(v)))
                        .map_err(|e| {
                            SinkError::NotSearchable(format!("{}: index: {e}", index.dataset))
                        })?;
                }
                at += n;
                index.covered.store(at, Ordering::Release);
                Ok(())
            },
        )
        .or_else(|e| match e {
            SinkError::OverBudget(_) if index.full.load(Ordering::Relaxed) => Ok(()),
            e => Err(e),
        })
    }

    /// Grows `name`'s index to the dataset's rows; saves when enough rows were added.
    fn catch_up(&self, name: &str) -> Result<(), SinkError> {
        let Some(index) = self.get(name)? else {
            return Ok(());
        };
        let Some(_writing) = self.lock(name) else {
            // Being built: the build adds the new rows itself.
            return Ok(());
        };
        if index.full.load(Ordering::Relaxed) {
            return Ok(());
        }
        let total = self.store.info(name)?.rows;
        if index.covered() < total {
            self.add_rows(&index, total)?;
        }
        if index.covered() - index.saved.load(Ordering::Relaxed) >= self.config.save_every_rows {
            self.save(&index)?;
        }
        Ok(())
    }

    /// Saves every loaded index with unsaved rows (at shutdown).
    fn save_all(&self) {
        let loaded: Vec<Arc<DatasetIndex>> = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for index in loaded {
            if index.covered() > index.saved.load(Ordering::Relaxed)
                && let Some(_writing) = self.lock(&index.dataset)
                && let Err(e) = self.save(&index)
            {
                tracing::warn!(dataset = %index.dataset, error = %e, "saving the index failed");
            }
        }
    }

    /// Writes the graph to a new generation file, then the manifest naming it (by a
    /// rename), then removes the previous generation.
    fn save(&self, index: &DatasetIndex) -> Result<(), SinkError> {
        let rows = index.covered();
        index.vectors.sync_data().map_err(|source| SinkError::Io {
            path: index.dir.join(VECTORS),
            source,
        })?;
        let mut manifest = index
            .manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let previous = std::mem::take(&mut manifest.graph);
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        manifest.graph = format!("index-{generation}.usearch");
        manifest.rows = rows;
        let graph_path = index.dir.join(&manifest.graph);
        index
            .graph
            .save(&graph_path.to_string_lossy())
            .map_err(|e| SinkError::NotSearchable(format!("{}: {e}", graph_path.display())))?;
        File::open(&graph_path)
            .and_then(|f| f.sync_all())
            .map_err(|source| SinkError::Io {
                path: graph_path.clone(),
                source,
            })?;
        let path = index.dir.join(MANIFEST);
        let tmp = index.dir.join(format!(".tmp-{MANIFEST}"));
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        fs::write(&tmp, json)
            .and_then(|()| File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &path))
            .and_then(|()| File::open(&index.dir)?.sync_all())
            .map_err(|source| SinkError::Io { path, source })?;
        if !previous.is_empty() && previous != manifest.graph {
            let _ = fs::remove_file(index.dir.join(previous));
        }
        *index.manifest.lock().unwrap_or_else(|e| e.into_inner()) = manifest;
        index.saved.store(rows, Ordering::Relaxed);
        Ok(())
    }
}

/// Removes what a crash can leave in the data folder's index files: a graph generation
/// written but never named by its manifest (killed before the rename), and projections
/// half written. Runs at start-up, before any build can be writing one.
fn remove_leftovers(root: &Path) {
    let Ok(datasets) = fs::read_dir(root) else {
        return;
    };
    for dir in datasets.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        let named = fs::read(dir.join(MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
            .map(|m| m.graph);
        let mut leftovers = Vec::new();
        for f in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with("index-")
                && name.ends_with(".usearch")
                && named.as_deref() != Some(name.as_str())
            {
                leftovers.push(f.path());
            }
        }
        for f in fs::read_dir(dir.join("projections"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.file_name().to_string_lossy().starts_with(".tmp-") {
                leftovers.push(f.path());
            }
        }
        for f in leftovers {
            tracing::warn!(file = %f.display(), "removing an index file left by an interrupted write");
            if let Err(e) = fs::remove_file(&f) {
                tracing::warn!(file = %f.display(), error = %e, "could not remove it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use keel_wire::vectors::{VectorFormat, VectorPrecision};

    use super::*;
    use crate::sink::config::Quantization;
    use crate::sink::search::{SearchMode, SearchOptions, nearest};

    const D: usize = 48;

    /// Clustered unit vectors (xorshift): 40 centres, each row a centre plus noise, so
    /// neighbourhoods are real and exact rankings are stable.
    fn vectors(rows: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let centres: Vec<f32> = (0..40 * D).map(|_| next()).collect();
        let mut out = Vec::with_capacity(rows * D);
        for r in 0..rows {
            let c = (r * 7919) % 40;
            let v: Vec<f32> = (0..D).map(|j| centres[c * D + j] + 0.35 * next()).collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.extend(v.iter().map(|x| x / n));
        }
        out
    }

    fn part(values: &[f32], first: usize, precision: VectorPrecision) -> RecordBatch {
        let rows = values.len() / D;
        let format = VectorFormat {
            precision,
            dimensions: D,
        };
        let text = StringArray::from_iter_values((first..first + rows).map(|i| format!("row {i}")));
        let mut fields = vec![Field::new("text", DataType::Utf8, true)];
        fields.extend(format.fields());
        let mut columns: Vec<ArrayRef> = vec![Arc::new(text)];
        columns.extend(format.encode(values, D, &vec![true; rows]).unwrap());
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    struct Fixture {
        _root: tempfile::TempDir,
        root: PathBuf,
        store: Arc<DatasetStore>,
        indexes: Arc<Indexes>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Fixture {
        fn new(config: IndexConfig) -> Self {
            let root = tempfile::tempdir().unwrap();
            let path = root.path().to_path_buf();
            let store = Arc::new(DatasetStore::open(&path).unwrap());
            let (indexes, thread) = Indexes::start(store.clone(), &path, config);
            Self {
                _root: root,
                root: path,
                store,
                indexes,
                thread: Some(thread),
            }
        }

        /// Stops the indexer (it saves) and opens the same folder again.
        fn restart(mut self) -> Self {
            self.indexes.stop();
            self.thread.take().unwrap().join().unwrap();
            let (indexes, thread) =
                Indexes::start(self.store.clone(), &self.root, self.indexes.config.clone());
            self.indexes = indexes;
            self.thread = Some(thread);
            self
        }

        fn rows(&self, query: &[f32], k: usize, mode: SearchMode) -> (Vec<u64>, u64) {
            let options = SearchOptions {
                mode,
                ..Default::default()
            };
            let n = nearest(&self.store, Some(&self.indexes), "d", query, k, options).unwrap();
            let rows = n
                .batch
                .column_by_name("row")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow_array::UInt64Array>()
                .unwrap()
                .values()
                .to_vec();
            (rows, n.scanned_rows)
        }
    }

    fn recall(f: &Fixture, queries: &[f32], k: usize) -> f64 {
        let mut hit = 0usize;
        for q in queries.chunks_exact(D) {
            let exact = f.rows(q, k, SearchMode::Exact).0;
            let (found, _) = f.rows(q, k, SearchMode::Index);
            hit += found.iter().filter(|r| exact.contains(r)).count();
        }
        hit as f64 / (k * queries.len() / D) as f64
    }

    #[test]
    fn each_quantization_finds_what_the_exact_scan_finds() {
        let values = vectors(3000, 0x9e37_79b9_7f4a_7c15);
        let queries = vectors(30, 0x2545_f491_4f6c_dd1d);
        for (precision, quantization, rescore, bound) in [
            (VectorPrecision::F32, Quantization::F32, 0, 0.9),
            (VectorPrecision::F32, Quantization::F16, 0, 0.9),
            (VectorPrecision::F32, Quantization::Int8, 0, 0.9),
            (VectorPrecision::F32, Quantization::Int8, 50, 0.95),
            // 48 sign bits take 49 distances only (the bench measures 384 on real
            // vectors): alone far above chance (10 of 3 000), rescored from a wide pool, most.
            (VectorPrecision::F32, Quantization::Binary, 0, 0.1),
            (VectorPrecision::F32, Quantization::Binary, 300, 0.7),
            (VectorPrecision::Int8, Quantization::Int8, 50, 0.95),
        ] {
            let f = Fixture::new(IndexConfig::default());
            f.store.append("d", &[part(&values, 0, precision)]).unwrap();
            let request = IndexOptions {
                quantization: Some(quantization),
                rescore: Some(rescore),
                expansion_search: Some(128),
                ..Default::default()
            };
            let report = f.indexes.build("d", &request).unwrap();
            assert_eq!((report.rows, report.vectors), (3000, 3000));
            assert!(report.memory_bytes > 3000 * report.vector_bytes as u64);
            let r = recall(&f, &queries, 10);
            assert!(
                r >= bound,
                "{quantization:?} rescore {rescore} on {precision}: recall {r}"
            );
            // A row's own vector finds that row first.
            let (rows, scanned) = f.rows(&values[1234 * D..1235 * D], 1, SearchMode::Index);
            if rescore > 0 || quantization != Quantization::Binary {
                assert_eq!(rows, [1234], "{quantization:?}");
            }
            assert_eq!(scanned, 0, "the index covers every row");
        }
    }

    #[test]
    fn appended_rows_are_found_at_once_then_indexed_and_survive_a_restart() {
        let values = vectors(2500, 7);
        let config = IndexConfig {
            save_every_rows: 1,
            ..IndexConfig::default()
        };
        let f = Fixture::new(config);
        f.store
            .append("d", &[part(&values[..2000 * D], 0, VectorPrecision::F32)])
            .unwrap();
        f.indexes.build("d", &IndexOptions::default()).unwrap();
        f.store
            .append(
                "d",
                &[part(&values[2000 * D..], 2000, VectorPrecision::F32)],
            )
            .unwrap();
        // Before the indexer hears of the new part, a search scans it exactly.
        let (rows, scanned) = f.rows(&values[2222 * D..2223 * D], 1, SearchMode::Index);
        assert_eq!((rows, scanned), (vec![2222], 500));
        f.indexes.appended("d");
        let deadline = Instant::now() + Duration::from_secs(60);
        while f.indexes.get("d").unwrap().unwrap().covered() < 2500 {
            assert!(Instant::now() < deadline, "the index did not grow");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (rows, scanned) = f.rows(&values[2222 * D..2223 * D], 1, SearchMode::Index);
        assert_eq!((rows, scanned), (vec![2222], 0));
        let before = f.indexes.describe("d").unwrap();
        // A generation written but never named by the manifest (killed before its rename).
        fs::write(f.root.join("d").join("index-1.usearch"), b"partial").unwrap();
        let f = f.restart();
        let described = f.indexes.describe("d").unwrap();
        assert!(!described.loaded, "loaded on first use only");
        assert_eq!(described.rows, 2500, "saved with the rows it grew by");
        let index = f.indexes.get("d").unwrap().unwrap();
        assert_eq!(index.covered(), 2500);
        let after = index.report();
        assert_eq!(
            (after.vectors, after.quantization),
            (before.vectors, before.quantization)
        );
        let (rows, scanned) = f.rows(&values[17 * D..18 * D], 1, SearchMode::Index);
        assert_eq!((rows, scanned), (vec![17], 0));
        // One graph file on disk: the earlier generations were removed.
        let graphs = fs::read_dir(f.root.join("d"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".usearch")
            })
            .count();
        assert_eq!(graphs, 1);
    }

    /// Unit vectors near a 12-dimensional subspace of the 48 (a latent vector through a
    /// fixed random map, plus a little noise): what a 16-component PCA keeps.
    fn low_rank(rows: usize, seed: u64) -> Vec<f32> {
        let mut state: u64 = 0x51_7cc1_b727_220a;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let map: Vec<f32> = (0..12 * D).map(|_| next()).collect();
        let noise = vectors(rows, seed);
        let mut rng = seed | 1;
        let mut latent = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let mut out = Vec::with_capacity(rows * D);
        for r in 0..rows {
            let z: Vec<f32> = (0..12).map(|_| latent()).collect();
            let v: Vec<f32> = (0..D)
                .map(|j| {
                    (0..12).map(|i| z[i] * map[i * D + j]).sum::<f32>() + 0.05 * noise[r * D + j]
                })
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.extend(v.iter().map(|x| x / n));
        }
        out
    }

    #[test]
    fn a_projection_indexes_fewer_dimensions() {
        let values = low_rank(2000, 99);
        let f = Fixture::new(IndexConfig::default());
        f.store
            .append("d", &[part(&values, 0, VectorPrecision::F32)])
            .unwrap();
        let p = crate::sink::reduce::reduce_dataset(&f.store, &f.root, "d", 16, "p16").unwrap();
        assert!(
            p.variance_kept > 0.95 && p.variance_kept <= 1.0,
            "{}",
            p.variance_kept
        );
        let request = IndexOptions {
            projection: Some("p16".into()),
            ..Default::default()
        };
        let report = f.indexes.build("d", &request).unwrap();
        assert_eq!((report.dimensions, report.vector_bytes), (16, 16));
        let queries = low_rank(20, 5);
        let r = recall(&f, &queries, 10);
        assert!(r >= 0.9, "recall {r} with rescoring");
        let missing = IndexOptions {
            projection: Some("nope".into()),
            ..Default::default()
        };
        assert!(matches!(
            f.indexes.build("d", &missing),
            Err(SinkError::NotFound(_))
        ));
    }

    #[test]
    fn the_memory_budget_refuses_a_build_and_stops_growth() {
        let values = vectors(3000, 3);
        let f = Fixture::new(IndexConfig {
            max_bytes: 10_000,
            ..IndexConfig::default()
        });
        f.store
            .append("d", &[part(&values[..1000 * D], 0, VectorPrecision::F32)])
            .unwrap();
        let err = f.indexes.build("d", &IndexOptions::default()).unwrap_err();
        assert!(matches!(err, SinkError::OverBudget(_)), "{err}");
        assert!(err.to_string().contains("storage.index.max_bytes"), "{err}");
        assert!(f.indexes.describe("d").is_none());

        // What an index of 800 rows holds (its vectors, links and per-thread search
        // state), measured.
        let f = Fixture::new(IndexConfig::default());
        f.store
            .append("d", &[part(&values[..800 * D], 0, VectorPrecision::F32)])
            .unwrap();
        let held = f
            .indexes
            .build("d", &IndexOptions::default())
            .unwrap()
            .memory_bytes;
        // Room for that and a few rows more: the build fits, growth stops at the budget,
        // and the rows past it are still found (scanned exactly).
        let max_bytes = held + 20_000;
        let f = Fixture::new(IndexConfig {
            max_bytes,
            ..IndexConfig::default()
        });
        f.store
            .append("d", &[part(&values[..800 * D], 0, VectorPrecision::F32)])
            .unwrap();
        f.indexes.build("d", &IndexOptions::default()).unwrap();
        f.store
            .append("d", &[part(&values[800 * D..], 800, VectorPrecision::F32)])
            .unwrap();
        f.indexes.catch_up("d").unwrap();
        let report = f.indexes.get("d").unwrap().unwrap().report();
        assert!(report.full, "{report:?}");
        assert!(report.memory_bytes <= max_bytes, "{report:?}");
        assert!(report.rows < 3000);
        let (rows, scanned) = f.rows(&values[2999 * D..3000 * D], 1, SearchMode::Auto);
        assert_eq!(rows, [2999]);
        assert_eq!(scanned, 3000 - report.rows);
    }

    #[test]
    fn a_build_that_reaches_the_budget_midway_returns() {
        let values = vectors(800, 5);
        // The budget the build's own estimate allows exactly: the graph's real memory
        // (reserved before the first row) passes it at the first batch.
        let f = Fixture::new(IndexConfig::default());
        f.store
            .append("d", &[part(&values, 0, VectorPrecision::F32)])
            .unwrap();
        f.indexes.build("d", &IndexOptions::default()).unwrap();
        let manifest: Manifest =
            serde_json::from_slice(&fs::read(f.root.join("d").join(MANIFEST)).unwrap()).unwrap();
        let max_bytes = 800 * per_row_bytes(&manifest);
        let f = Fixture::new(IndexConfig {
            max_bytes,
            ..IndexConfig::default()
        });
        f.store
            .append("d", &[part(&values, 0, VectorPrecision::F32)])
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let indexes = f.indexes.clone();
        std::thread::spawn(move || {
            let _ = tx.send(indexes.build("d", &IndexOptions::default()));
        });
        let built = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the build returns once the budget is reached");
        let report = built.unwrap();
        assert!(report.full && report.rows < 800, "{report:?}");
        // Every row is still found: the ones past the budget by an exact scan.
        let (rows, _) = f.rows(&values[799 * D..], 1, SearchMode::Auto);
        assert_eq!(rows, [799]);
    }

    #[test]
    fn binary_estimates_are_not_ranked_beside_exact_scores() {
        // Indexed: cosine 0.911 to the query, but 8 of 48 signs differ (estimate 0.667).
        // Appended after the build (scanned exactly): cosine 0.842.
        let unit = |v: Vec<f32>| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let indexed = unit((0..D).map(|j| if j < 40 { 1.0 } else { -0.01 }).collect());
        let tail = unit((0..D).map(|j| if j < 34 { 1.0 } else { 0.0 }).collect());
        let query = unit(vec![1.0; D]);
        let f = Fixture::new(IndexConfig::default());
        f.store
            .append("d", &[part(&indexed, 0, VectorPrecision::F32)])
            .unwrap();
        let options = IndexOptions {
            quantization: Some(Quantization::Binary),
            rescore: Some(0),
            ..IndexOptions::default()
        };
        f.indexes.build("d", &options).unwrap();
        f.store
            .append("d", &[part(&tail, 1, VectorPrecision::F32)])
            .unwrap();
        let (rows, scanned) = f.rows(&query, 1, SearchMode::Auto);
        assert_eq!(scanned, 1, "the appended row is scanned");
        assert_eq!(rows, [0], "the nearer row, though only the graph covers it");
    }

    #[test]
    fn searches_run_safely_while_the_graph_grows() {
        let values = vectors(10_000, 11);
        let f = Fixture::new(IndexConfig::default());
        f.store
            .append("d", &[part(&values[..2000 * D], 0, VectorPrecision::F32)])
            .unwrap();
        f.indexes.build("d", &IndexOptions::default()).unwrap();
        // Loaded again from disk: its capacity is exactly its size, so the first rows
        // appended make USearch reserve anew, with searches running.
        let f = f.restart();
        f.indexes.get("d").unwrap().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let searchers: Vec<_> = (0..4)
            .map(|t| {
                let (indexes, stop) = (f.indexes.clone(), stop.clone());
                let query = values[(t * 97) * D..(t * 97 + 1) * D].to_vec();
                std::thread::spawn(move || {
                    let mut searches = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let index = indexes.get("d").unwrap().unwrap();
                        let hits = index.search(&query, 5, None, Some(200), false).unwrap();
                        // Never empty, never another row first: the graph had it all along.
                        assert_eq!(
                            hits.best.first().map(|b| b.1),
                            Some((t * 97) as u64),
                            "{hits:?}"
                        );
                        searches += 1;
                    }
                    searches
                })
            })
            .collect();
        for at in (2000..10_000).step_by(125) {
            f.store
                .append(
                    "d",
                    &[part(
                        &values[at * D..(at + 125) * D],
                        at,
                        VectorPrecision::F32,
                    )],
                )
                .unwrap();
            f.indexes.catch_up("d").unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for s in searchers {
            assert!(s.join().unwrap() > 0);
        }
        assert_eq!(f.indexes.get("d").unwrap().unwrap().covered(), 10_000);
    }

    #[test]
    fn index_mode_without_an_index_says_how_to_build_one() {
        let f = Fixture::new(IndexConfig::default());
        f.store
            .append("d", &[part(&vectors(10, 1), 0, VectorPrecision::F32)])
            .unwrap();
        let q = vectors(1, 2);
        let options = SearchOptions {
            mode: SearchMode::Index,
            ..Default::default()
        };
        let err = nearest(&f.store, Some(&f.indexes), "d", &q, 3, options).unwrap_err();
        assert!(matches!(err, SinkError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("keel index"), "{err}");
        // Auto scans exactly.
        assert_eq!(f.rows(&q, 3, SearchMode::Auto).1, 10);
    }
}
