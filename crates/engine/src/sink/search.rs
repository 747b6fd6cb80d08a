//! Nearest-neighbour search over a stored dataset: the rows whose `embedding` is nearest a
//! query vector by cosine. Through the dataset's index when it has one (its graph's
//! candidates, rescored against the stored vectors, plus an exact scan of the rows it
//! does not cover yet), else by an exact scan keeping the `k` best as the dataset streams
//! by (memory: one batch of vectors plus `k` scores). Only the `k` rows found are read
//! whole, by number.

use std::sync::Arc;

use arrow_array::{Float32Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use keel_wire::vectors::{SCALE_COLUMN, VectorFormat, VectorPrecision};

use super::index::{Indexes, Scored};
use super::reduce::{PROJECTION_KEY, Projection};
use super::store::{DatasetStore, SinkError};

/// Rows scored per batch of an exact scan.
const SCAN_ROWS: usize = 8192;

/// Whether a search uses the dataset's index: part of the client contract.
pub use keel_wire::contract::SearchMode;

/// How to search, beyond the query and `k`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SearchOptions {
    pub mode: SearchMode,
    /// Candidates rescored (default: the index's).
    pub rescore: Option<usize>,
    /// The graph's search breadth (default: the index's `expansion_search`).
    pub expansion: Option<usize>,
}

/// The `k` rows nearest the query, best first: the dataset's columns without `embedding`,
/// then `row` (its position in the dataset) and `score` (cosine similarity).
#[derive(Debug)]
pub struct Neighbours {
    pub batch: RecordBatch,
    /// Rows scored exactly (all of them for an exact scan; those the index does not
    /// cover yet otherwise).
    pub scanned_rows: u64,
    /// `exact` or `index`.
    pub mode: SearchMode,
    /// Rows the index covered, and the candidates it gave.
    pub indexed_rows: u64,
    pub candidates: u64,
}

/// Finds the `k` rows of `name` nearest `query` (the model's vector) by cosine.
/// Rows with a null embedding are passed over; ties keep dataset order.
pub fn nearest(
    store: &DatasetStore,
    indexes: Option<&Indexes>,
    name: &str,
    query: &[f32],
    k: usize,
    options: SearchOptions,
) -> Result<Neighbours, SinkError> {
    let info = store.info(name)?;
    // The query comes from this server's model: the rows must too.
    store.check_model(name)?;
    let schema = info.schema.clone();
    let Some((emb_idx, _)) = schema.column_with_name("embedding") else {
        return Err(SinkError::NotSearchable(format!(
            "dataset {name:?} has no `embedding` column"
        )));
    };
    let format = VectorFormat::of_schema(&schema)
        .map_err(|e| SinkError::NotSearchable(format!("dataset {name:?}: {e}")))?;
    if format.dimensions > query.len() {
        return Err(SinkError::NotSearchable(format!(
            "dataset {name:?} has {} dimensions, the model gives {}",
            format.dimensions,
            query.len()
        )));
    }
    // The query as the dataset's rows were made: through the projection they went
    // through, or its first dimensions (cosines do not need it at unit length).
    let projected = match schema.field(emb_idx).metadata().get(PROJECTION_KEY) {
        Some(p) => Some(Projection::load_named(store.root(), p)?.project_model(query)),
        None => None,
    };
    let query = projected.as_deref().unwrap_or(&query[..format.dimensions]);
    if query.len() != format.dimensions {
        return Err(SinkError::NotSearchable(format!(
            "dataset {name:?} has {} dimensions, its projection gives {}",
            format.dimensions,
            query.len()
        )));
    }
    let scale_idx = schema
        .column_with_name(SCALE_COLUMN)
        .filter(|_| format.precision == VectorPrecision::Int8)
        .map(|(i, _)| i);
    let index = match (options.mode, indexes) {
        (SearchMode::Exact, _) => None,
        (SearchMode::Auto, Some(indexes)) => indexes.get(name).unwrap_or_else(|e| {
            tracing::warn!(dataset = %name, error = %e, "index unavailable; scanning exactly");
            None
        }),
        (SearchMode::Auto, None) => None,
        (SearchMode::Index, indexes) => {
            let found = match indexes {
                Some(i) => i.get(name)?,
                None => None,
            };
            Some(found.ok_or_else(|| {
                SinkError::Invalid(format!(
                    "dataset {name:?} has no index; build one with the index action \
                     (keel index --dataset {name})"
                ))
            })?)
        }
    };
    let (mut best, from, indexed_rows, candidates) = match &index {
        Some(index) => {
            // Rows beyond the graph are scored exactly: the graph's hits must be too.
            let tail = info.rows > index.covered();
            let hits = index.search(query, k, options.rescore, options.expansion, tail)?;
            (hits.best, hits.covered, hits.covered, hits.candidates)
        }
        None => (Vec::new(), 0, 0, 0),
    };
    // The rows the index does not cover (all of them without one), scored exactly.
    let scanned = scan(store, name, format, query, from, k, emb_idx, scale_idx)?;
    let scanned_rows = info.rows.saturating_sub(from);
    best.extend(scanned);
    best.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    best.truncate(k);

    let kept: Vec<usize> = (0..schema.fields().len())
        .filter(|&i| i != emb_idx && Some(i) != scale_idx)
        .collect();
    let mut fields: Vec<Arc<Field>> = kept.iter().map(|&i| schema.fields()[i].clone()).collect();
    fields.push(Arc::new(Field::new("row", DataType::UInt64, false)));
    fields.push(Arc::new(Field::new("score", DataType::Float32, false)));
    let rows: Vec<u64> = best.iter().map(|s| s.1).collect();
    let mut columns = store.take(name, &rows, Some(&kept))?.columns().to_vec();
    columns.push(Arc::new(UInt64Array::from(rows)));
    columns.push(Arc::new(Float32Array::from_iter_values(
        best.iter().map(|s| s.0),
    )));
    Ok(Neighbours {
        batch: RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?,
        scanned_rows,
        mode: if index.is_some() {
            SearchMode::Index
        } else {
            SearchMode::Exact
        },
        indexed_rows,
        candidates,
    })
}

/// The `k` best rows from row `from` on, read off the stored format (only the vector
/// columns are read).
#[allow(clippy::too_many_arguments)]
fn scan(
    store: &DatasetStore,
    name: &str,
    format: VectorFormat,
    query: &[f32],
    from: u64,
    k: usize,
    emb_idx: usize,
    scale_idx: Option<usize>,
) -> Result<Vec<Scored>, SinkError> {
    let columns: Vec<usize> = std::iter::once(emb_idx).chain(scale_idx).collect();
    let mut best: Vec<Scored> = Vec::with_capacity(2 * k);
    let mut offset = from;
    store.read_columns(
        name,
        from,
        None,
        Some(&columns),
        SCAN_ROWS,
        |batch: RecordBatch| -> Result<(), SinkError> {
            let cosines = format
                .cosines(&batch, query)
                .map_err(|e| SinkError::NotSearchable(format!("dataset {name:?}: {e}")))?;
            best.extend(
                cosines
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.map(|c| (c, offset + i as u64)))
                    .filter(|s| s.0.is_finite()),
            );
            offset += batch.num_rows() as u64;
            if best.len() > k {
                // Keep the k best (ties: the earlier row), in no particular order.
                best.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                best.truncate(k);
            }
            Ok(())
        },
    )?;
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float32Type;
    use arrow_array::{ArrayRef, FixedSizeListArray, StringArray};

    fn dataset(rows: &[(&str, Option<[f32; 3]>)]) -> RecordBatch {
        let text = StringArray::from_iter_values(rows.iter().map(|r| r.0));
        let values: Vec<f32> = rows.iter().flat_map(|r| r.1.unwrap_or([0.0; 3])).collect();
        let validity: Vec<bool> = rows.iter().map(|r| r.1.is_some()).collect();
        let item = Arc::new(Field::new("item", DataType::Float32, true));
        let emb = FixedSizeListArray::new(
            item,
            3,
            Arc::new(Float32Array::from(values)),
            Some(validity.into()),
        );
        // Nullable columns whatever the rows hold: every part of a dataset shares a schema.
        RecordBatch::try_from_iter_with_nullable([
            ("text", Arc::new(text) as ArrayRef, true),
            ("embedding", Arc::new(emb) as ArrayRef, true),
        ])
        .unwrap()
    }

    fn temp_root() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn finds_the_nearest_across_parts_best_first_nulls_passed_over() {
        let root = temp_root();
        let store = DatasetStore::open(root.path()).unwrap();
        store
            .append(
                "d",
                &[dataset(&[
                    ("x", Some([1.0, 0.0, 0.0])),
                    ("null", None),
                    ("xy", Some([1.0, 1.0, 0.0])),
                ])],
            )
            .unwrap();
        store
            .append(
                "d",
                &[dataset(&[
                    ("y", Some([0.0, 2.0, 0.0])),
                    ("x again", Some([2.0, 0.0, 0.0])),
                    ("-x", Some([-1.0, 0.0, 0.0])),
                ])],
            )
            .unwrap();
        let n = nearest(
            &store,
            None,
            "d",
            &[1.0, 0.0, 0.0],
            3,
            SearchOptions::default(),
        )
        .unwrap();
        assert_eq!(n.scanned_rows, 6);
        let texts: Vec<&str> = n
            .batch
            .column(0)
            .as_string::<i32>()
            .iter()
            .flatten()
            .collect();
        // x and "x again" tie at cosine 1 exactly (same direction): dataset order breaks it.
        assert_eq!(texts, ["x", "x again", "xy"]);
        let rows: Vec<u64> = n
            .batch
            .column(1)
            .as_primitive::<arrow_array::types::UInt64Type>()
            .values()
            .to_vec();
        assert_eq!(rows, [0, 4, 2]);
        let scores = n
            .batch
            .column(2)
            .as_primitive::<Float32Type>()
            .values()
            .to_vec();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        assert_eq!(scores[..2], [1.0, 1.0]);
        assert!((scores[2] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert!(n.batch.schema().column_with_name("embedding").is_none());
    }

    #[test]
    fn refuses_a_dataset_without_matching_embeddings() {
        let root = temp_root();
        let store = DatasetStore::open(root.path()).unwrap();
        store
            .append("d", &[dataset(&[("x", Some([1.0, 0.0, 0.0]))])])
            .unwrap();
        let err = nearest(&store, None, "d", &[1.0, 0.0], 1, SearchOptions::default()).unwrap_err();
        assert!(matches!(err, SinkError::NotSearchable(_)), "{err}");
        assert!(matches!(
            nearest(
                &store,
                None,
                "missing",
                &[1.0, 0.0, 0.0],
                1,
                SearchOptions::default()
            )
            .unwrap_err(),
            SinkError::NotFound(_)
        ));
    }

    /// A dataset stored in each precision (and in fewer dimensions) is searched in it:
    /// each row's own vector, as the query, finds that row first.
    #[test]
    fn compact_datasets_are_searched_in_their_own_format() {
        let dim = 32;
        let rows = 40;
        // Deterministic pseudo-random vectors (xorshift), values in [-1, 1).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let values: Vec<f32> = (0..rows * dim)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        let valid = vec![true; rows];
        for (precision, dimensions) in [
            (VectorPrecision::F32, dim),
            (VectorPrecision::F16, dim),
            (VectorPrecision::Int8, dim),
            (VectorPrecision::Int8, 16),
            (VectorPrecision::Binary, dim),
        ] {
            let format = VectorFormat {
                precision,
                dimensions,
            };
            let text = StringArray::from_iter_values((0..rows).map(|i| format!("row {i}")));
            let mut fields = vec![Field::new("text", DataType::Utf8, true)];
            fields.extend(format.fields());
            let mut columns: Vec<ArrayRef> = vec![Arc::new(text)];
            columns.extend(format.encode(&values, dim, &valid).unwrap());
            let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
            let root = temp_root();
            let store = DatasetStore::open(root.path()).unwrap();
            store.append("d", &[batch]).unwrap();
            for row in [0usize, 17, 39] {
                let n = nearest(
                    &store,
                    None,
                    "d",
                    &values[row * dim..(row + 1) * dim],
                    1,
                    SearchOptions::default(),
                )
                .unwrap();
                let found = n
                    .batch
                    .column(1)
                    .as_primitive::<arrow_array::types::UInt64Type>();
                assert_eq!(found.value(0), row as u64, "{precision} × {dimensions}");
                assert!(
                    n.batch.schema().column_with_name(SCALE_COLUMN).is_none(),
                    "the scale column is not returned"
                );
            }
        }
    }
}
