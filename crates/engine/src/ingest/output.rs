//! The input batch with its `embedding` column appended.

use std::sync::Arc;

use arrow_array::{Array, FixedSizeListArray, Float32Array, RecordBatch};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::IngestError;

/// The `embedding` field: `FixedSizeList<Float32, dim>`, nullable (null where the text was).
pub fn embedding_field(dim: usize) -> Field {
    Field::new(
        "embedding",
        DataType::FixedSizeList(
            Arc::new(Field::new("item", DataType::Float32, false)),
            dim as i32,
        ),
        true,
    )
}

/// The output schema for an input schema.
pub fn output_schema(input: &Schema, dim: usize) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
    fields.push(Arc::new(embedding_field(dim)));
    Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()))
}

/// `batch` plus `embedding`: `vectors` holds `rows × dim` values; rows with `valid[i] ==
/// false` are null (their values are ignored).
pub fn with_embeddings(
    batch: &RecordBatch,
    vectors: Vec<f32>,
    valid: &[bool],
    dim: usize,
) -> Result<RecordBatch, IngestError> {
    let rows = batch.num_rows();
    if vectors.len() != rows * dim || valid.len() != rows {
        return Err(IngestError::Internal(format!(
            "{} values and {} flags for {rows} rows of {dim}",
            vectors.len(),
            valid.len()
        )));
    }
    let nulls = if valid.iter().all(|v| *v) {
        None
    } else {
        Some(NullBuffer::from(valid.to_vec()))
    };
    let values = Arc::new(Float32Array::from(vectors));
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let list = FixedSizeListArray::try_new(item, dim as i32, values, nulls)
        .map_err(|e| IngestError::Internal(format!("building the embedding column: {e}")))?;
    let schema = output_schema(&batch.schema(), dim);
    let mut columns: Vec<Arc<dyn Array>> = batch.columns().to_vec();
    columns.push(Arc::new(list));
    RecordBatch::try_new(schema, columns)
        .map_err(|e| IngestError::Internal(format!("building the output batch: {e}")))
}
