//! Datasets on disk.
//!
//! Layout: `data_dir/NAME/part-NNNNNNNNNN.parquet`, numbered from 0. A part is written to
//! `.tmp-part-…` in the same folder, fsynced, renamed into place and the folder fsynced:
//! a crash leaves either the whole part or none of it, and temporary files (ignored by
//! every reader) are removed at start-up. All parts of a dataset share one schema.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, DataType, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
    RowSelector,
};
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::PageIndexPolicy;
use parquet::file::properties::WriterProperties;

use super::config::StorageConfig;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "invalid dataset name {0:?}: use 1-128 characters of A-Z a-z 0-9 _ - . (not starting with '.')"
    )]
    InvalidName(String),
    #[error("dataset {0:?} does not exist")]
    NotFound(String),
    #[error("dataset {name:?} has schema {existing}, this stream sends {incoming}")]
    SchemaMismatch {
        name: String,
        existing: String,
        incoming: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: ParquetError,
    },
    #[error("{0}")]
    Arrow(#[from] ArrowError),
    #[error("the sink is shut down")]
    Closed,
    /// Writing failed in a way the sink did not foresee (a bug in it or a library).
    #[error("{0}")]
    Failed(String),
    /// The dataset does not hold the rows an append expected (`expect_rows`).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotSearchable(String),
    /// A request that cannot be met as asked (bad parameters).
    #[error("{0}")]
    Invalid(String),
    /// Building or growing an index would pass `storage.index.max_bytes`.
    #[error("{0}")]
    OverBudget(String),
    /// The dataset's index is being built by another request.
    #[error("{0}")]
    Busy(String),
    /// Something that stays as made exists under that name (a projection).
    #[error("{0}")]
    Exists(String),
    /// The dataset's vectors come from another model than this server's.
    #[error("{0}")]
    OtherModel(String),
}

/// What `ListFlights` / `GetFlightInfo` say about a dataset.
#[derive(Debug, Clone)]
pub struct DatasetInfo {
    pub name: String,
    pub schema: SchemaRef,
    pub rows: u64,
    pub bytes: u64,
    pub parts: usize,
}

/// Part footers kept for fetching rows by number (a few KB to a few hundred KB each):
/// the parts of a million-row dataset are 100 at the default `flush_rows`.
const FOOTERS: usize = 1024;

/// Most rows in one Parquet data page.
const PAGE_ROWS: usize = 1024;

pub struct DatasetStore {
    root: PathBuf,
    /// Footer and page index of the parts read last by [`DatasetStore::take`], by path
    /// and length (parts never change once renamed into place); at most FOOTERS kept.
    footers: Mutex<lru::LruCache<PathBuf, (u64, ArrowReaderMetadata)>>,
    /// Each part's rows (and the first part's schema) by path and length, so that
    /// [`DatasetStore::info`] (every append, search and `GetFlightInfo`) opens only the
    /// parts it has not seen: a dataset of thousands of parts is not re-read each time.
    counts: Mutex<HashMap<PathBuf, PartCount>>,
    /// Most entries in `counts` (`storage.counted_parts`); past it, they are forgotten.
    counted_parts: usize,
    /// What made this server's vectors (weights digest, pooling, normalisation, ...), as
    /// recorded in each dataset's `model.json` at its first append: rows from another
    /// model are refused, and so are searches with its queries. `None`: not checked.
    model: Option<String>,
}

/// Beside a dataset's parts: which model made its vectors.
const MODEL_FILE: &str = "model.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct ModelRecord {
    /// The model's identity as `keel serve` names it (`stats`' cache key settings less
    /// the precision a pass computes in: vectors of one model in f32, bf16 or int8 are
    /// one space).
    model: String,
}

/// What [`DatasetStore::info`] needs of one part.
struct PartCount {
    bytes: u64,
    rows: u64,
    /// Kept for a dataset's first part only (every part has the dataset's schema).
    schema: Option<SchemaRef>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DatasetStore {
    /// Opens (creating) the data folder and removes temporary files left by a crash.
    pub fn open(root: &Path) -> Result<Self, SinkError> {
        fs::create_dir_all(root).map_err(io(root))?;
        for entry in fs::read_dir(root).map_err(io(root))? {
            let dir = entry.map_err(io(root))?.path();
            if dir.is_dir() {
                for f in fs::read_dir(&dir).map_err(io(&dir))? {
                    let f = f.map_err(io(&dir))?.path();
                    if f.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(".tmp-"))
                    {
                        tracing::warn!(file = %f.display(), "removing a partial part left by an interrupted write");
                        fs::remove_file(&f).map_err(io(&f))?;
                    }
                }
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            footers: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(FOOTERS).expect("FOOTERS > 0"),
            )),
            counts: Mutex::new(HashMap::new()),
            counted_parts: StorageConfig::default().counted_parts,
            model: None,
        })
    }

    /// Remembers the row counts of at most `parts` parts (`storage.counted_parts`).
    pub fn with_counted_parts(mut self, parts: usize) -> Self {
        self.counted_parts = parts;
        self
    }

    /// Datasets are tied to the model `identity`: the first append records it, rows and
    /// searches from another model are refused ([`SinkError::OtherModel`]).
    pub fn with_model(mut self, identity: impl Into<String>) -> Self {
        self.model = Some(identity.into());
        self
    }

    /// `Ok` when `name` was made by this server's model (or records none: a dataset from
    /// before models were recorded, or a store that does not check).
    pub fn check_model(&self, name: &str) -> Result<(), SinkError> {
        let Some(ours) = &self.model else {
            return Ok(());
        };
        let path = self.dir(name)?.join(MODEL_FILE);
        let record: ModelRecord = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SinkError::Io {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path)(e)),
        };
        if &record.model != ours {
            return Err(SinkError::OtherModel(format!(
                "dataset {name:?} holds vectors of another model ({}); this server's is {ours}: \
                 its vectors and queries are in different spaces (store into a new dataset, \
                 or serve the dataset's model)",
                record.model
            )));
        }
        Ok(())
    }

    /// Records this server's model in the dataset folder `dir` if nothing is recorded yet.
    fn record_model(&self, dir: &Path) -> Result<(), SinkError> {
        let Some(ours) = &self.model else {
            return Ok(());
        };
        let path = dir.join(MODEL_FILE);
        if path.exists() {
            return Ok(());
        }
        let tmp = dir.join(format!(".tmp-{MODEL_FILE}"));
        let json = serde_json::to_vec(&ModelRecord {
            model: ours.clone(),
        })
        .expect("a model record serialises");
        fs::write(&tmp, json)
            .and_then(|()| File::open(&tmp)?.sync_all())
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(io(&path))
    }

    /// The data folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn validate_name(name: &str) -> Result<(), SinkError> {
        if keel_wire::descriptor::is_valid_dataset_name(name) {
            Ok(())
        } else {
            Err(SinkError::InvalidName(name.to_string()))
        }
    }

    fn dir(&self, name: &str) -> Result<PathBuf, SinkError> {
        Self::validate_name(name)?;
        Ok(self.root.join(name))
    }

    /// Part files of a dataset, in order.
    pub fn parts(&self, name: &str) -> Result<Vec<PathBuf>, SinkError> {
        let dir = self.dir(name)?;
        if !dir.is_dir() {
            return Err(SinkError::NotFound(name.to_string()));
        }
        let mut parts: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("part-") && n.ends_with(".parquet"))
            })
            .collect();
        parts.sort();
        Ok(parts)
    }

    /// Appends `batches` as one new part. Returns the rows now stored in the dataset.
    pub fn append(&self, name: &str, batches: &[RecordBatch]) -> Result<u64, SinkError> {
        self.append_expecting(name, batches, None)
    }

    /// [`Self::append`], only if the dataset holds `expect` rows now (when given): else
    /// [`SinkError::Conflict`] and nothing is written.
    pub fn append_expecting(
        &self,
        name: &str,
        batches: &[RecordBatch],
        expect: Option<u64>,
    ) -> Result<u64, SinkError> {
        if let Some(expect) = expect {
            let held = match self.info(name) {
                Ok(info) => info.rows,
                Err(SinkError::NotFound(_)) => 0,
                Err(e) => return Err(e),
            };
            if held != expect {
                return Err(SinkError::Conflict(format!(
                    "dataset {name:?} holds {held} rows, this put expected {expect} \
                     (expect_rows): read its row count and resend from there"
                )));
            }
        }
        let dir = self.dir(name)?;
        if let Some(first) = batches.first() {
            storable(&first.schema())?;
        }
        self.check_model(name)?;
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        // Before the first part: a dataset never holds rows without its model named.
        if !batches.is_empty() {
            self.record_model(&dir)?;
        }
        let Some(first) = batches.first() else {
            return Ok(self.info(name)?.rows);
        };
        let schema = first.schema();
        let existing = self.parts(name)?;
        if let Some(part) = existing.first() {
            let have = read_schema(part)?;
            if have.fields() != schema.fields() {
                return Err(SinkError::SchemaMismatch {
                    name: name.to_string(),
                    existing: format_schema(&have),
                    incoming: format_schema(&schema),
                });
            }
        }
        let next = existing
            .last()
            .and_then(|p| {
                p.file_stem()?
                    .to_str()?
                    .strip_prefix("part-")?
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |n| n + 1);
        let final_path = dir.join(format!("part-{next:010}.parquet"));
        let tmp_path = dir.join(format!(".tmp-part-{next:010}.parquet"));
        let file = File::create(&tmp_path).map_err(io(&tmp_path))?;
        // Pages of at most PAGE_ROWS rows (with the page index parquet writes by default):
        // fetching a few rows by number (search results) decompresses a page this size per
        // column, not a megabyte.
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_data_page_row_count_limit(PAGE_ROWS)
            .set_write_batch_size(PAGE_ROWS)
            .build();
        let pq = |source| SinkError::Parquet {
            path: tmp_path.clone(),
            source,
        };
        let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(pq)?;
        for b in batches {
            if b.schema().fields() != schema.fields() {
                return Err(SinkError::SchemaMismatch {
                    name: name.to_string(),
                    existing: format_schema(&schema),
                    incoming: format_schema(&b.schema()),
                });
            }
            writer.write(b).map_err(pq)?;
        }
        let file = writer.into_inner().map_err(pq)?;
        file.sync_all().map_err(io(&tmp_path))?;
        drop(file);
        fs::rename(&tmp_path, &final_path).map_err(io(&final_path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
        Ok(self.info(name)?.rows)
    }

    pub fn info(&self, name: &str) -> Result<DatasetInfo, SinkError> {
        let parts = self.parts(name)?;
        let (mut rows, mut bytes) = (0u64, 0u64);
        let mut schema: SchemaRef = Arc::new(arrow_schema::Schema::empty());
        for (i, p) in parts.iter().enumerate() {
            let len = fs::metadata(p).map_err(io(p))?.len();
            let known = {
                let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
                counts
                    .get(p)
                    .filter(|c| c.bytes == len && (i > 0 || c.schema.is_some()))
                    .map(|c| (c.rows, c.schema.clone()))
            };
            let (part_rows, part_schema) = match known {
                Some(known) => known,
                None => {
                    let file = File::open(p).map_err(io(p))?;
                    let builder =
                        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|source| {
                            SinkError::Parquet {
                                path: p.clone(),
                                source,
                            }
                        })?;
                    let part_rows = builder.metadata().file_metadata().num_rows() as u64;
                    let part_schema = (i == 0).then(|| builder.schema().clone());
                    let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
                    if counts.len() >= self.counted_parts {
                        counts.clear();
                    }
                    if self.counted_parts > 0 {
                        counts.insert(
                            p.clone(),
                            PartCount {
                                bytes: len,
                                rows: part_rows,
                                schema: part_schema.clone(),
                            },
                        );
                    }
                    (part_rows, part_schema)
                }
            };
            bytes += len;
            rows += part_rows;
            if let Some(s) = part_schema {
                schema = s;
            }
        }
        Ok(DatasetInfo {
            name: name.to_string(),
            schema,
            rows,
            bytes,
            parts: parts.len(),
        })
    }

    pub fn list(&self) -> Result<Vec<DatasetInfo>, SinkError> {
        let mut names: Vec<String> = fs::read_dir(&self.root)
            .map_err(io(&self.root))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| Self::validate_name(n).is_ok())
            .collect();
        names.sort();
        names.iter().map(|n| self.info(n)).collect()
    }

    /// Reads a dataset's batches in order, handing each to `f`; stops at `f`'s first error.
    pub fn read<E: From<SinkError>>(
        &self,
        name: &str,
        batch_rows: usize,
        f: impl FnMut(RecordBatch) -> Result<(), E>,
    ) -> Result<(), E> {
        self.read_range(name, 0, None, batch_rows, f)
    }

    /// Reads rows `offset..offset + limit` of a dataset (to its end when `limit` is
    /// `None`; fewer where it ends sooner) in order, opening only the parts that hold them.
    pub fn read_range<E: From<SinkError>>(
        &self,
        name: &str,
        offset: u64,
        limit: Option<u64>,
        batch_rows: usize,
        f: impl FnMut(RecordBatch) -> Result<(), E>,
    ) -> Result<(), E> {
        self.read_columns(name, offset, limit, None, batch_rows, f)
    }

    /// [`DatasetStore::read_range`] of only the columns `columns` (indices into the
    /// dataset's schema; all when `None`).
    pub fn read_columns<E: From<SinkError>>(
        &self,
        name: &str,
        offset: u64,
        limit: Option<u64>,
        columns: Option<&[usize]>,
        batch_rows: usize,
        mut f: impl FnMut(RecordBatch) -> Result<(), E>,
    ) -> Result<(), E> {
        let (mut skip, mut left) = (offset, limit.unwrap_or(u64::MAX));
        for p in self.parts(name)? {
            if left == 0 {
                break;
            }
            let file = File::open(&p).map_err(io(&p))?;
            let pq = |source| SinkError::Parquet {
                path: p.clone(),
                source,
            };
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?;
            let rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
            if skip >= rows {
                skip -= rows;
                continue;
            }
            let take = left.min(rows - skip);
            let mut builder = builder;
            if let Some(c) = columns {
                let mask = ProjectionMask::roots(builder.parquet_schema(), c.iter().copied());
                builder = builder.with_projection(mask);
            }
            let reader = builder
                .with_batch_size(batch_rows)
                .with_offset(skip as usize)
                .with_limit(take as usize)
                .build()
                .map_err(pq)?;
            for batch in reader {
                f(batch.map_err(SinkError::Arrow)?)?;
            }
            skip = 0;
            left -= take;
        }
        Ok(())
    }
}

impl DatasetStore {
    /// The rows numbered `rows` (positions in the dataset, any order, repeats allowed), in
    /// that order, with the columns `columns` (indices into the dataset's schema; all when
    /// `None`). Only the pages holding them are read where the part has a page index.
    /// A number past the dataset's end is `NotFound`.
    pub fn take(
        &self,
        name: &str,
        rows: &[u64],
        columns: Option<&[usize]>,
    ) -> Result<RecordBatch, SinkError> {
        let parts = self.parts(name)?;
        let mut order: Vec<(u64, usize)> = rows.iter().enumerate().map(|(i, &r)| (r, i)).collect();
        order.sort_unstable();
        let mut batches = Vec::new();
        // Where each asked row landed in the concatenation of `batches`.
        let mut landed = vec![0u32; rows.len()];
        let (mut start, mut next, mut produced) = (0u64, 0usize, 0u32);
        let mut schema = None;
        for path in &parts {
            let meta = self.footer(path)?;
            let part_rows = meta.metadata().file_metadata().num_rows().max(0) as u64;
            schema.get_or_insert_with(|| match columns {
                Some(c) => meta.schema().project(c).map(Arc::new),
                None => Ok(meta.schema().clone()),
            });
            let end = start + part_rows;
            let mut local: Vec<u64> = Vec::new();
            while next < order.len() && order[next].0 < end {
                if local.last() != Some(&(order[next].0 - start)) {
                    local.push(order[next].0 - start);
                    produced += 1;
                }
                landed[order[next].1] = produced - 1;
                next += 1;
            }
            if !local.is_empty() {
                let mut selectors = Vec::with_capacity(local.len() * 2);
                let mut at = 0u64;
                for &r in &local {
                    if r > at {
                        selectors.push(RowSelector::skip((r - at) as usize));
                    }
                    selectors.push(RowSelector::select(1));
                    at = r + 1;
                }
                let file = File::open(path).map_err(io(path))?;
                let mut builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta)
                    .with_row_selection(RowSelection::from(selectors))
                    .with_batch_size(local.len());
                if let Some(c) = columns {
                    let mask = ProjectionMask::roots(builder.parquet_schema(), c.iter().copied());
                    builder = builder.with_projection(mask);
                }
                let pq = |source| SinkError::Parquet {
                    path: path.clone(),
                    source,
                };
                for batch in builder.build().map_err(pq)? {
                    batches.push(batch?);
                }
            }
            start = end;
            if next == order.len() {
                break;
            }
        }
        if next < order.len() {
            return Err(SinkError::NotFound(format!(
                "{name} row {} (the dataset has {start} rows)",
                order[next].0
            )));
        }
        let schema = match schema {
            Some(s) => s?,
            None => return Err(SinkError::NotFound(name.to_string())),
        };
        let all = arrow_select::concat::concat_batches(&schema, &batches)?;
        let indices = arrow_array::UInt32Array::from(landed);
        Ok(arrow_select::take::take_record_batch(&all, &indices)?)
    }

    /// A part's footer with its page index, read once.
    fn footer(&self, path: &Path) -> Result<ArrowReaderMetadata, SinkError> {
        let file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let mut cache = self.footers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((l, meta)) = cache.get(path)
            && *l == len
        {
            return Ok(meta.clone());
        }
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional);
        let meta =
            ArrowReaderMetadata::load(&file, options).map_err(|source| SinkError::Parquet {
                path: path.to_path_buf(),
                source,
            })?;
        cache.put(path.to_path_buf(), (len, meta.clone()));
        Ok(meta)
    }
}

fn read_schema(path: &Path) -> Result<SchemaRef, SinkError> {
    let file = File::open(path).map_err(io(path))?;
    Ok(ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|source| SinkError::Parquet {
            path: path.to_path_buf(),
            source,
        })?
        .schema()
        .clone())
}

fn format_schema(schema: &SchemaRef) -> String {
    let fields: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect();
    format!("[{}]", fields.join(", "))
}

/// Whether Parquet holds columns of these types: a union (parquet panics on it, ARROW-8817)
/// or a type it cannot convert (an interval of months, days and nanoseconds, a map with
/// nullable keys) is the stream's mistake, refused before a dataset folder is made.
fn storable(schema: &arrow_schema::Schema) -> Result<(), SinkError> {
    fn union_in(t: &DataType) -> bool {
        match t {
            DataType::Union(..) => true,
            DataType::List(f)
            | DataType::LargeList(f)
            | DataType::ListView(f)
            | DataType::LargeListView(f)
            | DataType::FixedSizeList(f, _)
            | DataType::Map(f, _) => union_in(f.data_type()),
            DataType::Struct(fields) => fields.iter().any(|f| union_in(f.data_type())),
            DataType::Dictionary(_, v) => union_in(v),
            DataType::RunEndEncoded(_, v) => union_in(v.data_type()),
            _ => false,
        }
    }
    let refuse = |why: String| {
        SinkError::Invalid(format!(
            "this stream's columns cannot be stored as Parquet: {why}"
        ))
    };
    if let Some(f) = schema.fields().iter().find(|f| union_in(f.data_type())) {
        return Err(refuse(format!(
            "column {:?} holds a union, which Parquet has no type for",
            f.name()
        )));
    }
    match std::panic::catch_unwind(|| parquet::arrow::ArrowSchemaConverter::new().convert(schema)) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(refuse(e.to_string())),
        Err(panic) => Err(refuse(panic_text(&panic))),
    }
}

/// The message of a caught panic.
pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, StringArray};

    fn batch(start: i64, n: i64) -> RecordBatch {
        RecordBatch::try_from_iter([
            (
                "id",
                Arc::new(Int64Array::from_iter_values(start..start + n)) as _,
            ),
            (
                "text",
                Arc::new(StringArray::from_iter_values(
                    (start..start + n).map(|i| format!("t{i}")),
                )) as _,
            ),
        ])
        .unwrap()
    }

    fn temp_root() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn row_counts_stay_right_whatever_the_counted_parts() {
        let dir = tempfile::tempdir().unwrap();
        DatasetStore::open(dir.path()).unwrap();
        for parts in [0, 1, 2, 100] {
            let store = DatasetStore::open(dir.path())
                .unwrap()
                .with_counted_parts(parts);
            let before = store.info("d").map_or(0, |i| i.rows);
            for i in 0..3 {
                store.append("d", &[batch(i * 10, 4)]).unwrap();
                let info = store.info("d").unwrap();
                assert_eq!(info.rows, before + 4 * (i as u64 + 1), "{parts} counted");
                assert_eq!(info.schema.fields().len(), 2, "{parts} counted");
                assert!(store.counts.lock().unwrap().len() <= parts);
            }
        }
    }

    #[test]
    fn a_dataset_keeps_to_the_model_that_made_it() {
        let dir = tempfile::tempdir().unwrap();
        // A dataset from before models were recorded: the first append under a model
        // records it.
        let legacy = DatasetStore::open(dir.path()).unwrap();
        legacy.append("old", &[batch(0, 3)]).unwrap();
        assert!(!dir.path().join("old").join(MODEL_FILE).exists());

        let a = DatasetStore::open(dir.path())
            .unwrap()
            .with_model("weights=a");
        a.append("new", &[batch(0, 3)]).unwrap();
        assert_eq!(a.append("old", &[batch(3, 2)]).unwrap(), 5);
        a.check_model("new").unwrap();

        let b = DatasetStore::open(dir.path())
            .unwrap()
            .with_model("weights=b");
        for name in ["new", "old"] {
            let err = b.append(name, &[batch(10, 1)]).unwrap_err();
            assert!(matches!(err, SinkError::OtherModel(_)), "{err}");
            assert!(err.to_string().contains("weights=a"), "{err}");
            assert!(matches!(b.check_model(name), Err(SinkError::OtherModel(_))));
        }
        assert_eq!(b.info("new").unwrap().rows, 3, "nothing written");
        // A dataset of its own is b's.
        b.append("b-only", &[batch(0, 1)]).unwrap();
        assert!(matches!(
            a.check_model("b-only"),
            Err(SinkError::OtherModel(_))
        ));
    }

    #[test]
    fn appends_parts_and_reads_them_back_in_order() {
        let root = temp_root();
        let store = DatasetStore::open(root.path()).unwrap();
        assert_eq!(store.append("genes", &[batch(0, 10)]).unwrap(), 10);
        assert_eq!(
            store
                .append("genes", &[batch(10, 5), batch(15, 5)])
                .unwrap(),
            20
        );
        let info = store.info("genes").unwrap();
        assert_eq!((info.rows, info.parts), (20, 2));
        let mut ids = Vec::new();
        store
            .read::<SinkError>("genes", 7, |b| {
                let col = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                ids.extend(col.values().iter().copied());
                Ok(())
            })
            .unwrap();
        assert_eq!(ids, (0..20).collect::<Vec<_>>());
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn refuses_bad_names_schema_changes_and_unknown_datasets() {
        let root = temp_root();
        let store = DatasetStore::open(root.path()).unwrap();
        for bad in ["", "../x", ".hidden", "a/b", &"x".repeat(129)] {
            assert!(
                matches!(
                    store.append(bad, &[batch(0, 1)]),
                    Err(SinkError::InvalidName(_))
                ),
                "{bad}"
            );
        }
        store.append("d", &[batch(0, 3)]).unwrap();
        let other =
            RecordBatch::try_from_iter([("id", Arc::new(StringArray::from(vec!["x"])) as _)])
                .unwrap();
        assert!(matches!(
            store.append("d", &[other]),
            Err(SinkError::SchemaMismatch { .. })
        ));
        assert!(matches!(store.info("nope"), Err(SinkError::NotFound(_))));
    }

    #[test]
    fn a_partial_write_is_invisible_and_removed_at_open() {
        let root = temp_root();
        let store = DatasetStore::open(root.path()).unwrap();
        store.append("d", &[batch(0, 4)]).unwrap();
        fs::write(
            root.path().join("d/.tmp-part-0000000001.parquet"),
            b"half a file",
        )
        .unwrap();
        assert_eq!(store.info("d").unwrap().rows, 4);
        let store = DatasetStore::open(root.path()).unwrap();
        assert!(!root.path().join("d/.tmp-part-0000000001.parquet").exists());
        assert_eq!(store.append("d", &[batch(4, 1)]).unwrap(), 5);
    }

    #[test]
    fn rows_taken_by_number_come_back_in_the_order_asked() {
        let root = tempfile::tempdir().unwrap();
        let store = DatasetStore::open(root.path()).unwrap();
        // A part larger than a page, so rows come from several pages of one part.
        for (from, n) in [(0, 10), (10, 3000), (3010, 7)] {
            store.append("d", &[batch(from, n)]).unwrap();
        }
        // Pages of at most PAGE_ROWS rows, with a page index to skip the others by.
        let part = &store.parts("d").unwrap()[1];
        let footer = store.footer(part).unwrap();
        let pages = footer
            .metadata()
            .page_index()
            .and_then(|p| p.offset_index(0, 0))
            .expect("a page index")
            .page_locations()
            .len();
        assert!(pages >= 3000 / PAGE_ROWS, "{pages} pages");
        let ids = |rows: &[u64], columns: Option<&[usize]>| {
            let b = store.take("d", rows, columns).unwrap();
            let col = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            (b.num_columns(), col.values().to_vec())
        };
        let asked = [3016, 0, 2500, 9, 10, 2500, 1024, 3015];
        assert_eq!(
            ids(&asked, None),
            (2, asked.iter().map(|&r| r as i64).collect::<Vec<_>>())
        );
        // Only the text column: its values follow the rows asked.
        let b = store.take("d", &[1500, 3], Some(&[1])).unwrap();
        assert_eq!(b.num_columns(), 1);
        let text = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!((text.value(0), text.value(1)), ("t1500", "t3"));
        assert_eq!(ids(&[], None).1, Vec::<i64>::new());
        assert!(matches!(
            store.take("d", &[5, 3017], None),
            Err(SinkError::NotFound(_))
        ));
    }

    #[test]
    fn a_range_of_rows_reads_only_what_it_names_across_parts() {
        let root = tempfile::tempdir().unwrap();
        let store = DatasetStore::open(root.path()).unwrap();
        for (from, n) in [(0, 10), (10, 5), (15, 20)] {
            store.append("d", &[batch(from, n)]).unwrap();
        }
        let ids = |offset, limit| {
            let mut out = Vec::new();
            store
                .read_range(
                    "d",
                    offset,
                    limit,
                    4,
                    |b: RecordBatch| -> Result<(), SinkError> {
                        let col = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                        out.extend(col.values().iter().copied());
                        Ok(())
                    },
                )
                .unwrap();
            out
        };
        assert_eq!(ids(0, None), (0..35).collect::<Vec<_>>());
        assert_eq!(ids(9, Some(3)), vec![9, 10, 11], "across a part boundary");
        assert_eq!(ids(14, Some(1)), vec![14], "the last row of a part");
        assert_eq!(ids(30, None), (30..35).collect::<Vec<_>>());
        assert_eq!(ids(34, Some(10)), vec![34], "fewer where the dataset ends");
        assert!(ids(35, Some(1)).is_empty());
        assert!(ids(0, Some(0)).is_empty());
    }
}
