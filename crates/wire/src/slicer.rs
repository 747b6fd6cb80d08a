//! The one path from a decoded batch to the slices a stream admits and embeds.
//!
//! The first batch binds the stream's [`TextSource`] to its schema (a missing column or
//! template field fails here, before any row is admitted); later batches must keep that
//! schema. Each batch is cut into slices of at most `slice_rows` rows, zero-copy; an empty
//! batch gives one empty slice, so that `DoExchange` hands back every batch it was sent.
//! The server's stream task and the fuzz entry point ([`crate::validate`]) both run it.

use std::num::NonZeroUsize;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::WireError;
use crate::text::TextSource;

/// A stream's source and schema, and how its batches are cut.
pub struct Slicer {
    source: TextSource,
    schema: Option<SchemaRef>,
    slice_rows: NonZeroUsize,
}

impl Slicer {
    pub fn new(source: TextSource, slice_rows: NonZeroUsize) -> Self {
        Self {
            source,
            schema: None,
            slice_rows,
        }
    }

    /// Checks `batch` against the stream's schema (binding the source on the first batch)
    /// and returns its slices, in order.
    pub fn slices(&mut self, batch: &RecordBatch) -> Result<Vec<RecordBatch>, WireError> {
        match &self.schema {
            None => {
                self.source.bind(&batch.schema())?;
                self.schema = Some(batch.schema());
            }
            Some(s) if s.fields() != batch.schema().fields() => {
                return Err(WireError::invalid(
                    "the schema changed mid-stream; open a new stream for a new schema",
                ));
            }
            Some(_) => {}
        }
        let rows = batch.num_rows();
        let step = self.slice_rows.get();
        if rows == 0 {
            return Ok(vec![batch.clone()]);
        }
        Ok((0..rows)
            .step_by(step)
            .map(|offset| batch.slice(offset, step.min(rows - offset)))
            .collect())
    }

    /// The text of every row of a slice; `None` where the text is null.
    pub fn texts(&self, slice: &RecordBatch) -> Result<Vec<Option<String>>, WireError> {
        self.source.texts(slice)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array, StringArray};

    use super::*;

    fn batch(n: usize) -> RecordBatch {
        let texts: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        RecordBatch::try_from_iter([("text", Arc::new(StringArray::from(texts)) as ArrayRef)])
            .unwrap()
    }

    fn slicer(rows: usize) -> Slicer {
        Slicer::new(
            TextSource::Column("text".into()),
            NonZeroUsize::new(rows).unwrap(),
        )
    }

    #[test]
    fn batches_are_cut_in_order_with_a_short_tail() {
        let mut s = slicer(4);
        let slices = s.slices(&batch(10)).unwrap();
        let sizes: Vec<usize> = slices.iter().map(RecordBatch::num_rows).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        let texts: Vec<Option<String>> = slices.iter().flat_map(|b| s.texts(b).unwrap()).collect();
        let expected: Vec<Option<String>> = (0..10).map(|i| Some(format!("t{i}"))).collect();
        assert_eq!(texts, expected);
    }

    #[test]
    fn an_empty_batch_is_one_empty_slice() {
        let mut s = slicer(4);
        let slices = s.slices(&batch(0)).unwrap();
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].num_rows(), 0);
    }

    #[test]
    fn the_first_batch_binds_and_later_batches_keep_its_schema() {
        let other =
            RecordBatch::try_from_iter([("text", Arc::new(Int64Array::from(vec![1])) as ArrayRef)])
                .unwrap();
        let e = slicer(4).slices(&other).unwrap_err().to_string();
        assert!(e.contains("has type Int64"), "{e}");
        let mut s = slicer(4);
        s.slices(&batch(3)).unwrap();
        let renamed = RecordBatch::try_from_iter([(
            "other",
            Arc::new(StringArray::from(vec!["x"])) as ArrayRef,
        )])
        .unwrap();
        let e = s.slices(&renamed).unwrap_err().to_string();
        assert!(e.contains("schema changed mid-stream"), "{e}");
    }
}
