//! How a stream's vectors are written: their precision and dimensions.
//!
//! A command's `precision` and `dimensions` (or the configured defaults) choose them:
//!
//! | precision | `embedding` column | bytes per row (384 dims) |
//! |---|---|---|
//! | `f32` | `FixedSizeList<Float32, d>` | 1 536 |
//! | `f16` | `FixedSizeList<Float16, d>` | 768 |
//! | `int8` | `FixedSizeList<Int8, d>` and `embedding_scale: Float32` (value ≈ int8 × scale; symmetric, per vector) | 388 |
//! | `binary` | `FixedSizeBinary(⌈d/8⌉)`: bit i = value i > 0, most significant bit first (`numpy.unpackbits`) | 48 |
//!
//! `dimensions: N` keeps the first N values and scales them back to unit length (the
//! Matryoshka recipe; for models trained for it). The `embedding` field carries
//! `keel.precision` and `keel.dimensions` in its metadata, so a stored dataset says how
//! to read it back; a dataset written before (plain `FixedSizeList<Float32, d>`, no
//! metadata) reads as `f32`.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, Int8Type};
use arrow_array::{
    Array, ArrayRef, FixedSizeBinaryArray, FixedSizeListArray, Float16Array, Float32Array,
    Int8Array, RecordBatch,
};
use arrow_schema::{ArrowError, DataType, Field, Schema};
use serde::{Deserialize, Serialize};

use crate::WireError;

/// The name of the column of int8 vectors' scales.
pub const SCALE_COLUMN: &str = "embedding_scale";

/// The number type of a stream's (or a dataset's) vectors. Its names (`f32`, `f16`,
/// `int8`, `binary`) are serde's, `Display`'s and `FromStr`'s alike.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    Default,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum VectorPrecision {
    #[default]
    F32,
    F16,
    Int8,
    Binary,
}

impl VectorPrecision {
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// Precision and dimensions of vectors as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VectorFormat {
    pub precision: VectorPrecision,
    pub dimensions: usize,
}

impl VectorFormat {
    /// The model's own vectors.
    pub fn full(dimensions: usize) -> Self {
        Self {
            precision: VectorPrecision::F32,
            dimensions,
        }
    }

    /// A stream's format: what its command asks, else the configured default, checked
    /// against the model's dimensions.
    pub fn resolve(
        precision: Option<VectorPrecision>,
        dimensions: Option<usize>,
        default: VectorFormat,
        model_dim: usize,
    ) -> Result<Self, WireError> {
        let dimensions = dimensions.unwrap_or(default.dimensions.min(model_dim));
        if dimensions == 0 || dimensions > model_dim {
            return Err(WireError::Invalid(format!(
                "dimensions must be within 1..={model_dim} (the model's), got {dimensions}"
            )));
        }
        Ok(Self {
            precision: precision.unwrap_or(default.precision),
            dimensions,
        })
    }

    /// Bytes one row's vector takes (an int8 vector's scale included).
    pub fn bytes_per_row(&self) -> usize {
        let d = self.dimensions;
        match self.precision {
            VectorPrecision::F32 => 4 * d,
            VectorPrecision::F16 => 2 * d,
            VectorPrecision::Int8 => d + 4,
            VectorPrecision::Binary => d.div_ceil(8),
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            (
                "keel.precision".to_string(),
                self.precision.name().to_string(),
            ),
            ("keel.dimensions".to_string(), self.dimensions.to_string()),
        ])
    }

    /// The fields the vectors add to a row: `embedding` (and `embedding_scale` for int8).
    pub fn fields(&self) -> Vec<Field> {
        let d = self.dimensions as i32;
        let list = |t: DataType| DataType::FixedSizeList(Arc::new(Field::new("item", t, false)), d);
        let data_type = match self.precision {
            VectorPrecision::F32 => list(DataType::Float32),
            VectorPrecision::F16 => list(DataType::Float16),
            VectorPrecision::Int8 => list(DataType::Int8),
            VectorPrecision::Binary => {
                DataType::FixedSizeBinary(self.dimensions.div_ceil(8) as i32)
            }
        };
        let mut fields =
            vec![Field::new("embedding", data_type, true).with_metadata(self.metadata())];
        if self.precision == VectorPrecision::Int8 {
            fields.push(Field::new(SCALE_COLUMN, DataType::Float32, true));
        }
        fields
    }

    /// Reads the format of a schema's `embedding` column (a dataset's): from its metadata,
    /// or, without it (a dataset written before formats), from its type.
    pub fn of_schema(schema: &Schema) -> Result<Self, String> {
        let (_, field) = schema
            .column_with_name("embedding")
            .ok_or("no `embedding` column")?;
        let meta = field.metadata();
        let from_type = match field.data_type() {
            DataType::FixedSizeList(item, d) => {
                let p = match item.data_type() {
                    DataType::Float32 => VectorPrecision::F32,
                    DataType::Float16 => VectorPrecision::F16,
                    DataType::Int8 => VectorPrecision::Int8,
                    other => return Err(format!("`embedding` holds {other}")),
                };
                Some((p, *d as usize))
            }
            DataType::FixedSizeBinary(_) => None,
            other => return Err(format!("`embedding` is {other}")),
        };
        let precision = match (meta.get("keel.precision"), from_type) {
            (Some(name), _) => name
                .parse::<VectorPrecision>()
                .map_err(|_| format!("unknown keel.precision {name:?}"))?,
            (None, Some((p, _))) => p,
            (None, None) => return Err("a binary `embedding` without keel.precision".into()),
        };
        let dimensions = match (meta.get("keel.dimensions"), from_type) {
            (Some(d), _) => d
                .parse()
                .map_err(|_| format!("keel.dimensions {d:?} is not a number"))?,
            (None, Some((_, d))) => d,
            (None, None) => return Err("a binary `embedding` without keel.dimensions".into()),
        };
        let format = Self {
            precision,
            dimensions,
        };
        // The metadata must describe the column it sits on.
        let fits = match (precision, field.data_type()) {
            (VectorPrecision::Binary, DataType::FixedSizeBinary(w)) => {
                *w as usize == dimensions.div_ceil(8)
            }
            (p, DataType::FixedSizeList(item, d)) => {
                *d as usize == dimensions
                    && Some(item.data_type())
                        == match p {
                            VectorPrecision::F32 => Some(&DataType::Float32),
                            VectorPrecision::F16 => Some(&DataType::Float16),
                            VectorPrecision::Int8 => Some(&DataType::Int8),
                            VectorPrecision::Binary => None,
                        }
            }
            _ => false,
        };
        if !fits {
            return Err(format!(
                "`embedding` is {} but its metadata says {precision} × {dimensions}",
                field.data_type()
            ));
        }
        if precision == VectorPrecision::Int8 && schema.column_with_name(SCALE_COLUMN).is_none() {
            return Err(format!(
                "int8 vectors without their `{SCALE_COLUMN}` column"
            ));
        }
        Ok(format)
    }

    /// Makes the model's vectors into this format: for each row, the first `dimensions`
    /// values, scaled back to unit length when cut, then quantized. `values` holds
    /// `rows × model_dim` f32; rows with `valid[i] == false` are null.
    pub fn encode(
        &self,
        values: &[f32],
        model_dim: usize,
        valid: &[bool],
    ) -> Result<Vec<ArrayRef>, ArrowError> {
        let rows = valid.len();
        if values.len() != rows * model_dim || self.dimensions > model_dim {
            return Err(ArrowError::InvalidArgumentError(format!(
                "{} values for {rows} rows of {model_dim}, asked for {}",
                values.len(),
                self.dimensions
            )));
        }
        let d = self.dimensions;
        let nulls = (!valid.iter().all(|v| *v)).then(|| valid.to_vec().into());
        let fields = self.fields();
        let item = || match fields[0].data_type() {
            DataType::FixedSizeList(item, _) => item.clone(),
            _ => unreachable!("list precisions have list fields"),
        };
        let cut = |row: usize| -> std::borrow::Cow<'_, [f32]> {
            let v = &values[row * model_dim..row * model_dim + d];
            if d == model_dim {
                return v.into();
            }
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter().map(|x| x / norm).collect::<Vec<_>>().into()
            } else {
                v.into()
            }
        };
        let d32 = d as i32;
        Ok(match self.precision {
            VectorPrecision::F32 => {
                let out: Vec<f32> = (0..rows).flat_map(|r| cut(r).into_owned()).collect();
                vec![Arc::new(FixedSizeListArray::try_new(
                    item(),
                    d32,
                    Arc::new(Float32Array::from(out)),
                    nulls,
                )?)]
            }
            VectorPrecision::F16 => {
                let out: Vec<half::f16> = (0..rows)
                    .flat_map(|r| {
                        cut(r)
                            .iter()
                            .map(|&x| half::f16::from_f32(x))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                vec![Arc::new(FixedSizeListArray::try_new(
                    item(),
                    d32,
                    Arc::new(Float16Array::from(out)),
                    nulls,
                )?)]
            }
            VectorPrecision::Int8 => {
                let mut out = Vec::with_capacity(rows * d);
                let mut scales = Vec::with_capacity(rows);
                for (r, &ok) in valid.iter().enumerate() {
                    let (q, scale) = quantize_int8(&cut(r));
                    out.extend(q);
                    scales.push(ok.then_some(scale));
                }
                vec![
                    Arc::new(FixedSizeListArray::try_new(
                        item(),
                        d32,
                        Arc::new(Int8Array::from(out)),
                        nulls,
                    )?),
                    Arc::new(Float32Array::from(scales)),
                ]
            }
            VectorPrecision::Binary => {
                let bytes = d.div_ceil(8);
                let mut out = vec![0u8; rows * bytes];
                for r in 0..rows {
                    pack_signs(&cut(r), &mut out[r * bytes..(r + 1) * bytes]);
                }
                vec![Arc::new(FixedSizeBinaryArray::try_new(
                    bytes as i32,
                    out.into(),
                    nulls,
                )?)]
            }
        })
    }

    /// The vectors of a batch written in this format, as f32 (`None` for a null row):
    /// f16 widened, int8 times its scale, binary as ±1 per bit.
    pub fn decode(&self, batch: &RecordBatch) -> Result<Vec<Option<Vec<f32>>>, String> {
        let emb = batch
            .column_by_name("embedding")
            .ok_or("no `embedding` column")?;
        let d = self.dimensions;
        let rows = batch.num_rows();
        let mut out = Vec::with_capacity(rows);
        match self.precision {
            VectorPrecision::Binary => {
                let bin = emb
                    .as_fixed_size_binary_opt()
                    .ok_or("`embedding` is not FixedSizeBinary")?;
                for r in 0..rows {
                    out.push(bin.is_valid(r).then(|| unpack_signs(bin.value(r), d)));
                }
            }
            _ => {
                let list = emb
                    .as_fixed_size_list_opt()
                    .ok_or("`embedding` is not a FixedSizeList")?;
                let scales = match self.precision {
                    VectorPrecision::Int8 => Some(
                        batch
                            .column_by_name(SCALE_COLUMN)
                            .and_then(|c| c.as_primitive_opt::<Float32Type>())
                            .ok_or_else(|| format!("no Float32 `{SCALE_COLUMN}` column"))?,
                    ),
                    _ => None,
                };
                let values = list.values();
                for r in 0..rows {
                    if !list.is_valid(r) {
                        out.push(None);
                        continue;
                    }
                    let start = list.value_offset_at(r);
                    let v: Vec<f32> = match self.precision {
                        VectorPrecision::F32 => {
                            values.as_primitive::<Float32Type>().values()[start..start + d].to_vec()
                        }
                        VectorPrecision::F16 => values.as_primitive::<Float16Type>().values()
                            [start..start + d]
                            .iter()
                            .map(|x| x.to_f32())
                            .collect(),
                        VectorPrecision::Int8 => {
                            let s = scales.map(|s| s.value(r)).unwrap_or(0.0);
                            values.as_primitive::<Int8Type>().values()[start..start + d]
                                .iter()
                                .map(|&q| q as f32 * s)
                                .collect()
                        }
                        VectorPrecision::Binary => unreachable!(),
                    };
                    out.push(Some(v));
                }
            }
        }
        Ok(out)
    }
}

impl VectorFormat {
    /// The cosine of each row of a batch in this format to `query` (of `dimensions`
    /// values), `None` for a null row, read straight off the Arrow buffers (nothing is
    /// widened into a vector of its own). An int8 row's scale cancels out of a cosine;
    /// a binary row is ±1 per bit.
    pub fn cosines(&self, batch: &RecordBatch, query: &[f32]) -> Result<Vec<Option<f32>>, String> {
        let d = self.dimensions;
        if query.len() != d {
            return Err(format!(
                "a query of {} values for {d} dimensions",
                query.len()
            ));
        }
        let emb = batch
            .column_by_name("embedding")
            .ok_or("no `embedding` column")?;
        let q_norm = query.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos = |dot: f32, norm_sq: f32| dot / (norm_sq.sqrt() * q_norm).max(f32::MIN_POSITIVE);
        let rows = batch.num_rows();
        if self.precision == VectorPrecision::Binary {
            let bin = emb
                .as_fixed_size_binary_opt()
                .ok_or("`embedding` is not FixedSizeBinary")?;
            // dot(q, ±1) = 2·(sum of q where the bit is set) − sum of q.
            let total: f32 = query.iter().sum();
            return Ok((0..rows)
                .map(|r| {
                    bin.is_valid(r).then(|| {
                        let bytes = bin.value(r);
                        // Branch-free: each bit times its query value.
                        let set: f32 = query
                            .iter()
                            .enumerate()
                            .map(|(i, q)| ((bytes[i / 8] >> (7 - i % 8)) & 1) as f32 * q)
                            .sum();
                        cos(2.0 * set - total, d as f32)
                    })
                })
                .collect());
        }
        let list = emb
            .as_fixed_size_list_opt()
            .ok_or("`embedding` is not a FixedSizeList")?;
        let values = list.values();
        let mut out = Vec::with_capacity(rows);
        for r in 0..rows {
            if !list.is_valid(r) {
                out.push(None);
                continue;
            }
            let start = list.value_offset_at(r);
            let (dot, norm_sq) = match self.precision {
                VectorPrecision::F32 => dot_norm(
                    &values.as_primitive::<Float32Type>().values()[start..start + d],
                    query,
                    |x| *x,
                ),
                VectorPrecision::F16 => dot_norm(
                    &values.as_primitive::<Float16Type>().values()[start..start + d],
                    query,
                    |x| x.to_f32(),
                ),
                VectorPrecision::Int8 => dot_norm(
                    &values.as_primitive::<Int8Type>().values()[start..start + d],
                    query,
                    |x| *x as f32,
                ),
                VectorPrecision::Binary => unreachable!(),
            };
            out.push(Some(cos(dot, norm_sq)));
        }
        Ok(out)
    }
}

impl VectorFormat {
    /// Bytes of one row in the packed layout of [`VectorFormat::pack`]: the stored values
    /// without an int8 vector's scale (it cancels out of a cosine).
    pub fn packed_bytes(&self) -> usize {
        let d = self.dimensions;
        match self.precision {
            VectorPrecision::F32 => 4 * d,
            VectorPrecision::F16 => 2 * d,
            VectorPrecision::Int8 => d,
            VectorPrecision::Binary => d.div_ceil(8),
        }
    }

    /// Packs a vector of this format, as [`VectorFormat::decode`] gives it, into `out`
    /// ([`VectorFormat::packed_bytes`] long): f32 and f16 little-endian, int8 values,
    /// binary bits. Lossless for decoded rows: packing re-derives what was stored.
    pub fn pack(&self, v: &[f32], out: &mut [u8]) {
        debug_assert_eq!(v.len(), self.dimensions);
        match self.precision {
            VectorPrecision::F32 => out
                .chunks_exact_mut(4)
                .zip(v)
                .for_each(|(o, x)| o.copy_from_slice(&x.to_le_bytes())),
            VectorPrecision::F16 => out
                .chunks_exact_mut(2)
                .zip(v)
                .for_each(|(o, x)| o.copy_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
            VectorPrecision::Int8 => {
                let (q, _) = quantize_int8(v);
                out.iter_mut().zip(q).for_each(|(o, q)| *o = q as u8);
            }
            VectorPrecision::Binary => pack_signs(v, out),
        }
    }

    /// The cosine of a packed row to `query` (of `dimensions` values).
    pub fn packed_cosine(&self, row: &[u8], query: &[f32]) -> f32 {
        let q_norm = query.iter().map(|x| x * x).sum::<f32>().sqrt();
        let (dot, norm_sq) = match self.precision {
            VectorPrecision::F32 => {
                let values: Vec<f32> = row
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                dot_norm(&values, query, |x| *x)
            }
            VectorPrecision::F16 => {
                let values: Vec<f32> = row
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect();
                dot_norm(&values, query, |x| *x)
            }
            VectorPrecision::Int8 => dot_norm(row, query, |x| *x as i8 as f32),
            VectorPrecision::Binary => {
                let total: f32 = query.iter().sum();
                let set: f32 = query
                    .iter()
                    .enumerate()
                    .map(|(i, q)| ((row[i / 8] >> (7 - i % 8)) & 1) as f32 * q)
                    .sum();
                (2.0 * set - total, self.dimensions as f32)
            }
        };
        dot / (norm_sq.sqrt() * q_norm).max(f32::MIN_POSITIVE)
    }
}

/// The dot product of a row with the query, and the row's squared norm.
fn dot_norm<T>(row: &[T], query: &[f32], f: impl Fn(&T) -> f32) -> (f32, f32) {
    row.iter().zip(query).fold((0.0, 0.0), |(dot, n), (x, q)| {
        let x = f(x);
        (dot + x * q, n + x * x)
    })
}

/// Symmetric int8: `q = round(x / scale)` with `scale = max|x| / 127`.
pub fn quantize_int8(v: &[f32]) -> (Vec<i8>, f32) {
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        return (vec![0; v.len()], 0.0);
    }
    let scale = max / 127.0;
    let q = v
        .iter()
        .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (q, scale)
}

/// Bit i (most significant first in each byte) = `v[i] > 0`.
pub fn pack_signs(v: &[f32], out: &mut [u8]) {
    out.fill(0);
    for (i, x) in v.iter().enumerate() {
        if *x > 0.0 {
            out[i / 8] |= 0x80 >> (i % 8);
        }
    }
}

/// ±1 per bit, the first `d` bits.
pub fn unpack_signs(bytes: &[u8], d: usize) -> Vec<f32> {
    (0..d)
        .map(|i| {
            if bytes[i / 8] & (0x80 >> (i % 8)) != 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed rows score as the Arrow rows they came from, in every format.
    #[test]
    fn packed_rows_score_as_the_stored_rows() {
        let d = 19;
        let rows = 6;
        let values: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let query: Vec<f32> = (0..d).map(|i| (i as f32 - 9.0) / 5.0).collect();
        for precision in [
            VectorPrecision::F32,
            VectorPrecision::F16,
            VectorPrecision::Int8,
            VectorPrecision::Binary,
        ] {
            let format = VectorFormat {
                precision,
                dimensions: d,
            };
            let mut fields = vec![];
            fields.extend(format.fields());
            let columns = format.encode(&values, d, &vec![true; rows]).unwrap();
            let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
            let want = format.cosines(&batch, &query).unwrap();
            let mut packed = vec![0u8; format.packed_bytes()];
            for (r, v) in format.decode(&batch).unwrap().into_iter().enumerate() {
                format.pack(&v.unwrap(), &mut packed);
                let got = format.packed_cosine(&packed, &query);
                assert!((got - want[r].unwrap()).abs() < 1e-6, "{precision} row {r}");
            }
        }
    }

    fn unit(v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (n(a) * n(b))
    }

    /// Two rows of 10 values (the second null) through every precision and back.
    #[test]
    fn every_precision_round_trips_with_its_documented_type() {
        let a = unit((0..10).map(|i| (i as f32 - 4.5) * 0.37).collect());
        let mut values = a.clone();
        values.extend([0.0; 10]);
        let valid = [true, false];
        for precision in [
            VectorPrecision::F32,
            VectorPrecision::F16,
            VectorPrecision::Int8,
            VectorPrecision::Binary,
        ] {
            // The wire's name (schema metadata, serde) and the parsed one agree.
            let name = serde_json::to_string(&precision).unwrap();
            assert_eq!(name, format!("\"{precision}\""));
            assert_eq!(precision.name().parse::<VectorPrecision>(), Ok(precision));
            let format = VectorFormat {
                precision,
                dimensions: 10,
            };
            let columns = format.encode(&values, 10, &valid).unwrap();
            let fields: Vec<Field> = format.fields();
            assert_eq!(columns.len(), fields.len());
            let schema = Arc::new(Schema::new(fields));
            let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
            assert_eq!(VectorFormat::of_schema(&schema).unwrap(), format);
            let back = format.decode(&batch).unwrap();
            assert!(back[1].is_none(), "{precision}: a null row stays null");
            let v = back[0].as_ref().unwrap();
            let c = cosine(v, &a);
            let bound = match precision {
                VectorPrecision::F32 => 1.0 - 1e-7,
                VectorPrecision::F16 => 0.99999,
                VectorPrecision::Int8 => 0.9999,
                VectorPrecision::Binary => 0.8,
            };
            assert!(c >= bound, "{precision}: cosine {c}");
        }
    }

    /// The cosines read off the buffers equal those of the decoded vectors.
    #[test]
    fn cosines_off_the_buffers_equal_the_decoded_vectors_cosines() {
        let values: Vec<f32> = (0..30)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let query: Vec<f32> = (0..10).map(|i| (i as f32 - 3.5) / 2.0).collect();
        for precision in [
            VectorPrecision::F32,
            VectorPrecision::F16,
            VectorPrecision::Int8,
            VectorPrecision::Binary,
        ] {
            let format = VectorFormat {
                precision,
                dimensions: 10,
            };
            let valid = [true, false, true];
            let schema = Arc::new(Schema::new(format.fields()));
            let batch =
                RecordBatch::try_new(schema, format.encode(&values, 10, &valid).unwrap()).unwrap();
            let fast = format.cosines(&batch, &query).unwrap();
            let slow = format.decode(&batch).unwrap();
            assert!(fast[1].is_none());
            for r in [0, 2] {
                let want = cosine(slow[r].as_ref().unwrap(), &query);
                let got = fast[r].unwrap();
                assert!((got - want).abs() < 1e-5, "{precision}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn binary_bits_are_signs_most_significant_first() {
        let v = [1.0, -1.0, 0.5, 0.0, -0.2, 3.0, 2.0, -4.0, 0.1];
        let mut out = [0u8; 2];
        pack_signs(&v, &mut out);
        assert_eq!(out, [0b1010_0110, 0b1000_0000]);
        assert_eq!(
            unpack_signs(&out, 9),
            [1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0]
        );
    }

    #[test]
    fn int8_is_symmetric_per_vector_and_saturates_nothing() {
        let (q, s) = quantize_int8(&[0.5, -1.0, 0.25, 0.0]);
        assert_eq!(q, [64, -127, 32, 0]);
        assert!((s - 1.0 / 127.0).abs() < 1e-9);
        assert_eq!(quantize_int8(&[0.0, 0.0]), (vec![0, 0], 0.0));
    }

    #[test]
    fn fewer_dimensions_keep_the_first_values_at_unit_length() {
        let values = [3.0, 4.0, 100.0, 7.0];
        let format = VectorFormat {
            precision: VectorPrecision::F32,
            dimensions: 2,
        };
        let col = format.encode(&values, 4, &[true]).unwrap();
        let list = col[0].as_fixed_size_list();
        let v = list.value(0);
        assert_eq!(v.as_primitive::<Float32Type>().values(), &[0.6, 0.8]);
        assert_eq!(format.bytes_per_row(), 8);
    }

    #[test]
    fn resolve_checks_dimensions_against_the_model() {
        let default = VectorFormat::full(384);
        let f = VectorFormat::resolve(Some(VectorPrecision::Int8), None, default, 384).unwrap();
        assert_eq!((f.precision, f.dimensions), (VectorPrecision::Int8, 384));
        assert_eq!(
            VectorFormat::resolve(None, Some(128), default, 384)
                .unwrap()
                .dimensions,
            128
        );
        for bad in [0, 385] {
            let e = VectorFormat::resolve(None, Some(bad), default, 384).unwrap_err();
            assert!(e.to_string().contains("1..=384"), "{e}");
        }
    }

    #[test]
    fn a_dataset_written_before_formats_reads_as_f32() {
        let field = Field::new(
            "embedding",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), 384),
            true,
        );
        let schema = Schema::new(vec![Field::new("text", DataType::Utf8, true), field]);
        assert_eq!(
            VectorFormat::of_schema(&schema).unwrap(),
            VectorFormat::full(384)
        );
    }
}
