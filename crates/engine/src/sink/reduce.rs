//! PCA projections fitted on a stored dataset (`keel reduce`).
//!
//! Two streaming passes over the dataset's vectors: the first sums them (the mean), the
//! second sums the outer products of the centred vectors (the covariance), both in f64, a
//! block of rows at a time. Memory is one `d × d` matrix and one block whatever the
//! dataset's size. The covariance's eigenvectors with the largest eigenvalues are the
//! projection's components; the share of the total variance their eigenvalues hold is
//! reported as `variance_kept`.
//!
//! A projected vector is `components · (v − mean)`, scaled back to unit length (cosine
//! search on it, like on the model's vectors). Projections live beside the dataset, in
//! `data_dir/NAME/projections/PROJECTION.json`.

use std::fs;
use std::path::{Path, PathBuf};

use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

use keel_wire::vectors::{SCALE_COLUMN, VectorFormat};

use super::store::{DatasetStore, SinkError};

/// Rows multiplied into the covariance at once (one matrix product per block).
const BLOCK_ROWS: usize = 1024;

/// A fitted PCA projection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Projection {
    pub name: String,
    /// The dataset it was fitted on.
    pub dataset: String,
    /// Dimensions of the vectors it takes.
    pub input_dimensions: usize,
    /// Dimensions of the vectors it gives.
    pub dimensions: usize,
    /// Rows it was fitted on.
    pub rows: u64,
    /// Share of the total variance the kept components hold (0..=1).
    pub variance_kept: f64,
    /// The kept eigenvalues (variances along the components), largest first.
    pub eigenvalues: Vec<f64>,
    /// The mean the vectors are centred by (`input_dimensions` values).
    pub mean: Vec<f32>,
    /// `dimensions` rows of `input_dimensions` values, row-major: the unit components.
    pub components: Vec<f32>,
}

/// The field metadata key naming the projection a dataset's vectors went through
/// (`"DATASET/NAME"`).
pub const PROJECTION_KEY: &str = "keel.projection";

impl Projection {
    /// Loads a projection named `"DATASET/NAME"` from the data folder `root`.
    pub fn load_named(root: &Path, qualified: &str) -> Result<Self, SinkError> {
        let Some((dataset, name)) = qualified.split_once('/') else {
            return Err(SinkError::Invalid(format!(
                "projection {qualified:?} must be \"DATASET/NAME\""
            )));
        };
        if !keel_wire::descriptor::is_valid_dataset_name(dataset) {
            return Err(SinkError::InvalidName(dataset.to_string()));
        }
        Self::load(&root.join(dataset), dataset, name)
    }

    /// The projection of a model vector: its first `input_dimensions` values at unit
    /// length (as the dataset it was fitted on holds them), then projected.
    pub fn project_model(&self, v: &[f32]) -> Vec<f32> {
        let cut = &v[..self.input_dimensions.min(v.len())];
        let norm = cut
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        let unit: Vec<f32> = cut.iter().map(|x| x / norm).collect();
        self.project(&unit)
    }

    /// `components · (v − mean)` at unit length (all zeros stays all zeros).
    pub fn project(&self, v: &[f32]) -> Vec<f32> {
        debug_assert_eq!(v.len(), self.input_dimensions);
        let centred: Vec<f32> = v.iter().zip(&self.mean).map(|(x, m)| x - m).collect();
        let mut out: Vec<f32> = self
            .components
            .chunks_exact(self.input_dimensions)
            .map(|c| c.iter().zip(&centred).map(|(a, b)| a * b).sum())
            .collect();
        let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            out.iter_mut().for_each(|x| *x /= norm);
        }
        out
    }

    /// Where a dataset's projection `name` is kept.
    pub fn path(dataset_dir: &Path, name: &str) -> PathBuf {
        dataset_dir.join("projections").join(format!("{name}.json"))
    }

    /// Writes it beside the dataset (whole or not at all: a temporary file renamed).
    pub fn save(&self, dataset_dir: &Path) -> Result<PathBuf, SinkError> {
        let path = Self::path(dataset_dir, &self.name);
        let dir = path.parent().expect("a projections folder");
        fs::create_dir_all(dir).map_err(|source| SinkError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let tmp = dir.join(format!(".tmp-{}.json", self.name));
        let json = serde_json::to_vec(self).expect("a projection serialises");
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| SinkError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    /// Reads a dataset's projection `name`; `NotFound` names what is there.
    pub fn load(dataset_dir: &Path, dataset: &str, name: &str) -> Result<Self, SinkError> {
        if !keel_wire::descriptor::is_valid_dataset_name(name) {
            return Err(SinkError::InvalidName(name.to_string()));
        }
        let path = Self::path(dataset_dir, name);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SinkError::NotFound(format!(
                "{dataset}'s projection {name:?} (fit one with keel reduce --dataset \
                 {dataset} --dimensions N --name {name})"
            )),
            _ => SinkError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&bytes).map_err(|e| SinkError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }
}

/// Fits a PCA projection of `dimensions` components on dataset `name`'s vectors (two
/// passes over its vector columns) and saves it as `projection` beside the dataset.
pub fn reduce_dataset(
    store: &DatasetStore,
    root: &Path,
    name: &str,
    dimensions: usize,
    projection: &str,
) -> Result<Projection, SinkError> {
    if !keel_wire::descriptor::is_valid_dataset_name(projection) {
        return Err(SinkError::InvalidName(projection.to_string()));
    }
    let info = store.info(name)?;
    // Rows stored and indexes built through a projection name it, not its components: a
    // refit under the same name would leave them in another space than the queries.
    if Projection::path(&root.join(name), projection).exists() {
        return Err(SinkError::Exists(format!(
            "{name}'s projection {projection:?} exists (vectors stored or indexed through it              would no longer match a refit): fit one under another name"
        )));
    }
    let format = VectorFormat::of_schema(&info.schema)
        .map_err(|e| SinkError::NotSearchable(format!("dataset {name:?}: {e}")))?;
    let columns: Vec<usize> = ["embedding", SCALE_COLUMN]
        .iter()
        .filter_map(|c| info.schema.column_with_name(c).map(|(i, _)| i))
        .collect();
    let mut pass = |f: &mut dyn FnMut(&[f32])| -> Result<(), SinkError> {
        store.read_columns(name, 0, Some(info.rows), Some(&columns), 8192, |batch| {
            let rows = format
                .decode(&batch)
                .map_err(|e| SinkError::NotSearchable(format!("dataset {name:?}: {e}")))?;
            rows.iter().flatten().for_each(|v| f(v));
            Ok::<(), SinkError>(())
        })
    };
    let fitted = fit(format.dimensions, dimensions, &mut pass)?;
    let projection = fitted.into_projection(projection, name);
    projection.save(&root.join(name))?;
    Ok(projection)
}

/// One streaming pass: hands every vector (of the fitted dimensions) to the callback.
pub type Pass<'a> = dyn FnMut(&mut dyn FnMut(&[f32])) -> Result<(), SinkError> + 'a;

/// Fits a `dimensions`-component PCA on `input_dimensions`-value vectors, reading them in
/// two passes (`pass` is called twice and must yield the same vectors each time).
pub fn fit(
    input_dimensions: usize,
    dimensions: usize,
    pass: &mut Pass<'_>,
) -> Result<Fitted, SinkError> {
    let d = input_dimensions;
    if dimensions == 0 || dimensions > d {
        return Err(SinkError::Invalid(format!(
            "a projection keeps 1..={d} dimensions, not {dimensions}"
        )));
    }
    // Pass 1: the mean.
    let mut sum = vec![0f64; d];
    let mut rows = 0u64;
    pass(&mut |v| {
        rows += 1;
        sum.iter_mut().zip(v).for_each(|(s, x)| *s += f64::from(*x));
    })?;
    if rows < 2 {
        return Err(SinkError::Invalid(format!(
            "a projection needs at least 2 vectors, the dataset has {rows}"
        )));
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / rows as f64).collect();
    // Pass 2: the covariance of the centred vectors, a block of rows per matrix product.
    let mut cov = DMatrix::<f64>::zeros(d, d);
    let mut block = DMatrix::<f64>::zeros(BLOCK_ROWS, d);
    let mut filled = 0usize;
    let mut seen = 0u64;
    let flush = |block: &DMatrix<f64>, filled: usize, cov: &mut DMatrix<f64>| {
        let rows = block.rows(0, filled);
        cov.gemm_tr(1.0, &rows, &rows, 1.0);
    };
    pass(&mut |v| {
        seen += 1;
        for (j, (x, m)) in v.iter().zip(&mean).enumerate() {
            block[(filled, j)] = f64::from(*x) - m;
        }
        filled += 1;
        if filled == BLOCK_ROWS {
            flush(&block, filled, &mut cov);
            filled = 0;
        }
    })?;
    if filled > 0 {
        flush(&block, filled, &mut cov);
    }
    if seen != rows {
        return Err(SinkError::Invalid(format!(
            "the dataset changed between the two passes ({rows} then {seen} vectors)"
        )));
    }
    cov /= (rows - 1) as f64;
    Ok(Fitted::from_covariance(cov, mean, rows, dimensions))
}

/// A fit before it is named and saved.
#[derive(Debug, Clone)]
pub struct Fitted {
    pub rows: u64,
    pub mean: Vec<f64>,
    /// Every eigenvalue, largest first.
    pub eigenvalues: Vec<f64>,
    /// The kept components (one per row), each with its largest entry positive.
    pub components: DMatrix<f64>,
}

impl Fitted {
    fn from_covariance(cov: DMatrix<f64>, mean: Vec<f64>, rows: u64, keep: usize) -> Self {
        let d = cov.nrows();
        let eigen = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
        let mut components = DMatrix::<f64>::zeros(keep, d);
        for (i, &k) in order.iter().take(keep).enumerate() {
            let v = eigen.eigenvectors.column(k);
            // An eigenvector's sign is arbitrary: fix it so fits can be compared.
            let largest = v.iter().copied().max_by(|a, b| a.abs().total_cmp(&b.abs()));
            let sign = if largest.unwrap_or(1.0) < 0.0 {
                -1.0
            } else {
                1.0
            };
            for j in 0..d {
                components[(i, j)] = sign * v[j];
            }
        }
        Self {
            rows,
            mean,
            eigenvalues: order
                .iter()
                .map(|&k| eigen.eigenvalues[k].max(0.0))
                .collect(),
            components,
        }
    }

    /// Share of the total variance held by the kept components.
    pub fn variance_kept(&self) -> f64 {
        let total: f64 = self.eigenvalues.iter().sum();
        let kept: f64 = self.eigenvalues[..self.components.nrows()].iter().sum();
        if total > 0.0 { kept / total } else { 0.0 }
    }

    pub fn into_projection(self, name: &str, dataset: &str) -> Projection {
        let (dimensions, d) = self.components.shape();
        Projection {
            name: name.to_string(),
            dataset: dataset.to_string(),
            input_dimensions: d,
            dimensions,
            rows: self.rows,
            variance_kept: self.variance_kept(),
            eigenvalues: self.eigenvalues[..dimensions].to_vec(),
            mean: self.mean.iter().map(|&m| m as f32).collect(),
            components: (0..dimensions)
                .flat_map(|i| (0..d).map(move |j| (i, j)))
                .map(|(i, j)| self.components[(i, j)] as f32)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic standard normals (xorshift + Box-Muller).
    struct Normals(u64);
    impl Normals {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn next(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    /// `n` vectors with variances `spectrum` along the axes of a random rotation, offset
    /// by a mean: the true components are that rotation's columns.
    fn synthetic(n: usize, spectrum: &[f64], seed: u64) -> (Vec<Vec<f32>>, DMatrix<f64>) {
        let d = spectrum.len();
        let mut rng = Normals(seed);
        let random = DMatrix::<f64>::from_fn(d, d, |_, _| rng.next());
        let rotation = random.qr().q();
        let mean: Vec<f64> = (0..d).map(|i| i as f64 * 0.1 - 0.5).collect();
        let rows = (0..n)
            .map(|_| {
                let z: Vec<f64> = spectrum.iter().map(|l| l.sqrt() * rng.next()).collect();
                (0..d)
                    .map(|i| {
                        (mean[i] + (0..d).map(|j| rotation[(i, j)] * z[j]).sum::<f64>()) as f32
                    })
                    .collect()
            })
            .collect();
        (rows, rotation)
    }

    fn fit_rows(rows: &[Vec<f32>], keep: usize) -> Fitted {
        let d = rows[0].len();
        fit(d, keep, &mut |f: &mut dyn FnMut(&[f32])| {
            rows.iter().for_each(|r| f(r));
            Ok(())
        })
        .unwrap()
    }

    #[test]
    fn recovers_a_known_spectrum_and_the_variance_it_keeps() {
        let spectrum = [9.0, 4.0, 2.0, 1.0, 0.25, 0.1, 0.05, 0.01];
        let (rows, rotation) = synthetic(40_000, &spectrum, 42);
        let fitted = fit_rows(&rows, 3);
        for (got, want) in fitted.eigenvalues.iter().zip(spectrum) {
            assert!((got - want).abs() <= 0.03 * want + 0.002, "{got} vs {want}");
        }
        let total: f64 = spectrum.iter().sum();
        let want = (9.0 + 4.0 + 2.0) / total;
        assert!(
            (fitted.variance_kept() - want).abs() < 0.01,
            "{}",
            fitted.variance_kept()
        );
        // Each kept component is the rotation's column, up to sign.
        for i in 0..3 {
            let dot: f64 = (0..8)
                .map(|j| fitted.components[(i, j)] * rotation[(j, i)])
                .sum();
            assert!(dot.abs() > 0.999, "component {i}: |cos| {}", dot.abs());
        }
        // Projected vectors are unit length and keep the leading structure.
        let p = fitted.into_projection("p", "d");
        let v = p.project(&rows[0]);
        assert_eq!(v.len(), 3);
        assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
    }

    /// The two streaming passes equal the textbook fit on the whole matrix at once
    /// (centre the matrix, `XᵀX / (n − 1)`, eigendecompose) within 1e-4.
    #[test]
    fn two_streaming_passes_equal_a_fit_on_the_whole_matrix() {
        let d = 24;
        let spectrum: Vec<f64> = (0..d).map(|i| 5.0 / (1.0 + i as f64)).collect();
        // Not a multiple of the block: the last block is partial.
        let (rows, _) = synthetic(3_000 + 17, &spectrum, 7);
        let streamed = fit_rows(&rows, 8);
        let n = rows.len();
        let x = DMatrix::<f64>::from_fn(n, d, |i, j| f64::from(rows[i][j]));
        let mean: Vec<f64> = (0..d).map(|j| x.column(j).sum() / n as f64).collect();
        let centred = DMatrix::<f64>::from_fn(n, d, |i, j| x[(i, j)] - mean[j]);
        let cov = centred.transpose() * &centred / (n - 1) as f64;
        let whole = Fitted::from_covariance(cov, mean.clone(), n as u64, 8);
        for (a, b) in streamed.mean.iter().zip(&mean) {
            assert!((a - b).abs() < 1e-9);
        }
        for (a, b) in streamed.eigenvalues.iter().zip(&whole.eigenvalues) {
            assert!((a - b).abs() < 1e-4 * b.max(1.0), "{a} vs {b}");
        }
        let diff = (&streamed.components - &whole.components).abs().max();
        assert!(diff < 1e-4, "components differ by {diff}");
        // And so do the projections of a vector, through the saved f32 form.
        let (ps, pw) = (
            streamed.into_projection("a", "d"),
            whole.into_projection("b", "d"),
        );
        for r in rows.iter().take(50) {
            let (a, b) = (ps.project(r), pw.project(r));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-4, "{worst}");
        }
    }

    #[test]
    fn saved_and_loaded_whole_and_refusals_say_why() {
        let (rows, _) = synthetic(200, &[3.0, 1.0, 0.5, 0.1], 3);
        let p = fit_rows(&rows, 2).into_projection("pca2", "d");
        let dir = tempfile::tempdir().unwrap();
        p.save(dir.path()).unwrap();
        let back = Projection::load(dir.path(), "d", "pca2").unwrap();
        assert_eq!((&back.mean, &back.components), (&p.mean, &p.components));
        for (a, b) in back.eigenvalues.iter().zip(&p.eigenvalues) {
            assert!((a - b).abs() <= 1e-12 * b.abs());
        }
        let missing = Projection::load(dir.path(), "d", "nope").unwrap_err();
        assert!(matches!(missing, SinkError::NotFound(_)), "{missing}");
        assert!(missing.to_string().contains("keel reduce"), "{missing}");
        assert!(matches!(
            Projection::load(dir.path(), "d", "../x"),
            Err(SinkError::InvalidName(_))
        ));
        let none = fit(4, 5, &mut |_f: &mut dyn FnMut(&[f32])| Ok(())).unwrap_err();
        assert!(none.to_string().contains("1..=4"), "{none}");
        let one = fit(4, 2, &mut |f: &mut dyn FnMut(&[f32])| {
            f(&[1.0, 0.0, 0.0, 0.0]);
            Ok(())
        })
        .unwrap_err();
        assert!(one.to_string().contains("at least 2"), "{one}");
    }
}
