//! The input batch with its vector columns appended, in the stream's format.

use std::sync::Arc;

use arrow_array::{Array, RecordBatch};
use arrow_schema::{Field, Schema, SchemaRef};
use keel_wire::vectors::VectorFormat;

use super::IngestError;

/// The output schema for an input schema: its fields, then `embedding` (and
/// `embedding_scale` for int8 vectors).
pub fn output_schema(input: &Schema, format: &VectorFormat) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
    fields.extend(format.fields().into_iter().map(Arc::new));
    Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()))
}

/// `batch` plus its vectors in `format`: `vectors` holds `rows × dim` values (the
/// model's); rows with `valid[i] == false` are null (their values are ignored).
pub fn with_embeddings(
    batch: &RecordBatch,
    vectors: Vec<f32>,
    valid: &[bool],
    dim: usize,
    format: &VectorFormat,
) -> Result<RecordBatch, IngestError> {
    let rows = batch.num_rows();
    if vectors.len() != rows * dim || valid.len() != rows {
        return Err(IngestError::Internal(format!(
            "{} values and {} flags for {rows} rows of {dim}",
            vectors.len(),
            valid.len()
        )));
    }
    let added = format
        .encode(&vectors, dim, valid)
        .map_err(|e| IngestError::Internal(format!("building the embedding column: {e}")))?;
    let schema = output_schema(&batch.schema(), format);
    let mut columns: Vec<Arc<dyn Array>> = batch.columns().to_vec();
    columns.extend(added);
    RecordBatch::try_new(schema, columns)
        .map_err(|e| IngestError::Internal(format!("building the output batch: {e}")))
}
