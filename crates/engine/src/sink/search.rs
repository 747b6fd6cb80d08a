//! Exact nearest-neighbour search over a stored dataset: cosine similarity of a query
//! vector against every row's `embedding`, the `k` best kept as the dataset streams by
//! (memory: one batch plus `k` rows, whatever the dataset's size).

use std::sync::Arc;

use arrow_array::{ArrayRef, Float32Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use keel_wire::vectors::{SCALE_COLUMN, VectorFormat, VectorPrecision};

use super::store::{DatasetStore, SinkError};

/// The `k` rows nearest the query, best first: the dataset's columns without `embedding`,
/// then `row` (its position in the dataset) and `score` (cosine similarity).
#[derive(Debug)]
pub struct Neighbours {
    pub batch: RecordBatch,
    pub scanned_rows: u64,
}

/// Scans `name` for the `k` rows whose embedding is nearest `query` by cosine.
/// Rows with a null embedding are passed over; ties keep dataset order.
pub fn nearest(
    store: &DatasetStore,
    name: &str,
    query: &[f32],
    k: usize,
) -> Result<Neighbours, SinkError> {
    let info = store.info(name)?;
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
    // The query as the dataset's rows were made: its first dimensions, at unit length.
    let query = &query[..format.dimensions];
    let scale_idx = schema
        .column_with_name(SCALE_COLUMN)
        .filter(|_| format.precision == VectorPrecision::Int8)
        .map(|(i, _)| i);
    let kept: Vec<usize> = (0..schema.fields().len())
        .filter(|&i| i != emb_idx && Some(i) != scale_idx)
        .collect();
    let mut fields: Vec<Arc<Field>> = kept.iter().map(|&i| schema.fields()[i].clone()).collect();
    fields.push(Arc::new(Field::new("row", DataType::UInt64, false)));
    fields.push(Arc::new(Field::new("score", DataType::Float32, false)));
    let out_schema = Arc::new(Schema::new(fields));

    // (score, dataset row) of the best so far, and their rows.
    let mut best: Option<(RecordBatch, Vec<(f32, u64)>)> = None;
    let mut offset = 0u64;
    store.read(name, 8192, |batch: RecordBatch| -> Result<(), SinkError> {
        // Cosines read off the stored format (the query stays f32).
        let cosines = format
            .cosines(&batch, query)
            .map_err(|e| SinkError::NotSearchable(format!("dataset {name:?}: {e}")))?;
        let mut scored: Vec<(f32, u64, usize)> = cosines
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.map(|c| (c, offset + i as u64, i)))
            .filter(|s| s.0.is_finite())
            .collect();
        offset += batch.num_rows() as u64;
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.truncate(k);
        if scored.is_empty() {
            return Ok(());
        }
        let take = arrow_array::UInt32Array::from_iter_values(scored.iter().map(|s| s.2 as u32));
        let columns: Vec<ArrayRef> = kept
            .iter()
            .map(|&c| arrow_select::take::take(batch.column(c), &take, None))
            .collect::<Result<_, _>>()?;
        let candidates = RecordBatch::try_new(Arc::new(batch.schema().project(&kept)?), columns)?;
        let scores: Vec<(f32, u64)> = scored.iter().map(|s| (s.0, s.1)).collect();
        best = Some(match best.take() {
            None => (candidates, scores),
            Some((prev, prev_scores)) => {
                let merged =
                    arrow_select::concat::concat_batches(&prev.schema(), [&prev, &candidates])?;
                let mut all: Vec<(f32, u64, usize)> = prev_scores
                    .iter()
                    .chain(&scores)
                    .enumerate()
                    .map(|(i, s)| (s.0, s.1, i))
                    .collect();
                all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                all.truncate(k);
                let take =
                    arrow_array::UInt32Array::from_iter_values(all.iter().map(|s| s.2 as u32));
                let columns: Vec<ArrayRef> = merged
                    .columns()
                    .iter()
                    .map(|c| arrow_select::take::take(c, &take, None))
                    .collect::<Result<_, _>>()?;
                (
                    RecordBatch::try_new(merged.schema(), columns)?,
                    all.iter().map(|s| (s.0, s.1)).collect(),
                )
            }
        });
        Ok(())
    })?;
    let (rows, scores) = match best {
        Some((rows, scores)) => (rows.columns().to_vec(), scores),
        None => (
            kept.iter()
                .map(|&i| arrow_array::new_empty_array(schema.field(i).data_type()))
                .collect(),
            Vec::new(),
        ),
    };
    let mut columns = rows;
    columns.push(Arc::new(UInt64Array::from_iter_values(
        scores.iter().map(|s| s.1),
    )));
    columns.push(Arc::new(Float32Array::from_iter_values(
        scores.iter().map(|s| s.0),
    )));
    Ok(Neighbours {
        batch: RecordBatch::try_new(out_schema, columns)?,
        scanned_rows: offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float32Type;
    use arrow_array::{FixedSizeListArray, StringArray};

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
        let n = nearest(&store, "d", &[1.0, 0.0, 0.0], 3).unwrap();
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
        let err = nearest(&store, "d", &[1.0, 0.0], 1).unwrap_err();
        assert!(matches!(err, SinkError::NotSearchable(_)), "{err}");
        assert!(matches!(
            nearest(&store, "missing", &[1.0, 0.0, 0.0], 1).unwrap_err(),
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
                let n = nearest(&store, "d", &values[row * dim..(row + 1) * dim], 1).unwrap();
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
