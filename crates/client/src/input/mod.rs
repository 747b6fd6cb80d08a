//! Input files, streamed as record batches of at most `rows_per_batch` rows: a file of any
//! size costs a batch or two of memory.
//!
//! | format | detected from | rows | text |
//! |---|---|---|---|
//! | VCF, VCF.gz (BGZF or gzip) | `.vcf`, `.vcf.gz`, `.vcf.bgz` | one per record | rendered here from the template |
//! | BCF | `.bcf` | one per record | rendered here from the template |
//! | Parquet | `.parquet`, `.pq` | as stored | a column or a template, applied by the server |
//! | Arrow IPC (file or stream) | `.arrow`, `.arrows`, `.ipc`, `.feather` | as stored | as Parquet |
//! | CSV / TSV (header row; gzip allowed) | `.csv`, `.tsv` (+ `.gz`) | one per line | as Parquet |
//! | text (gzip allowed) | anything else | one per line, column `text` | the line |

pub mod vcf;

use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use keel_wire::template::Template;
use keel_wire::variants::DEFAULT_TEMPLATE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Vcf,
    Bcf,
    Parquet,
    Arrow,
    Csv,
    Tsv,
    Text,
}

impl Format {
    /// The format a file name says (`.gz` / `.bgz` looked through).
    pub fn detect(path: &Path) -> Format {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let name = name
            .strip_suffix(".gz")
            .or_else(|| name.strip_suffix(".bgz"))
            .unwrap_or(&name);
        match name.rsplit('.').next().unwrap_or("") {
            "vcf" => Format::Vcf,
            "bcf" => Format::Bcf,
            "parquet" | "pq" => Format::Parquet,
            "arrow" | "arrows" | "ipc" | "feather" => Format::Arrow,
            "csv" => Format::Csv,
            "tsv" | "tab" => Format::Tsv,
            _ => Format::Text,
        }
    }

    /// Whether Keel renders the text here (VCF, BCF) rather than the server.
    pub fn renders_text(self) -> bool {
        matches!(self, Format::Vcf | Format::Bcf)
    }
}

/// What to do with a record the reader cannot parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Report it (with its line) on stderr, count it, go on.
    Skip,
    /// Stop with an error naming its line.
    Fail,
}

pub struct InputOptions {
    pub format: Option<Format>,
    pub rows_per_batch: usize,
    /// VCF/BCF: the template rendered into `text` (default: [`DEFAULT_TEMPLATE`]).
    pub template: Option<String>,
    /// CSV/TSV: the column read as text, kept a string whatever it looks like.
    pub text_column: String,
    pub on_error: OnError,
}

pub type Batches = Box<dyn Iterator<Item = anyhow::Result<RecordBatch>> + Send>;

pub struct Input {
    pub format: Format,
    pub batches: Batches,
    /// Rows the file holds, where cheap to know (Parquet metadata, a line count).
    pub total_rows: Option<u64>,
    /// Records skipped as unreadable so far (`OnError::Skip`).
    pub skipped: Arc<AtomicU64>,
}

pub fn open(path: &Path, opts: &InputOptions) -> anyhow::Result<Input> {
    if opts.rows_per_batch == 0 {
        bail!("rows per batch must be at least 1");
    }
    let format = opts.format.unwrap_or_else(|| Format::detect(path));
    let skipped = Arc::new(AtomicU64::new(0));
    let n = opts.rows_per_batch;
    let (batches, total_rows): (Batches, Option<u64>) = match format {
        Format::Vcf | Format::Bcf => {
            let template = Template::parse(opts.template.as_deref().unwrap_or(DEFAULT_TEMPLATE))?;
            let total = (format == Format::Vcf)
                .then(|| count_lines(path, |l| !l.starts_with(b"#") && !l.is_empty()))
                .transpose()?;
            let batches = vcf::VcfBatches::open(
                path,
                format == Format::Bcf,
                template,
                n,
                opts.on_error,
                skipped.clone(),
            )?;
            (Box::new(batches), total)
        }
        Format::Parquet => {
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
            let total = builder.metadata().file_metadata().num_rows() as u64;
            let reader = builder.with_batch_size(n).build()?;
            (
                Box::new(reader.map(|b| b.map_err(anyhow::Error::from))),
                Some(total),
            )
        }
        Format::Arrow => (arrow_ipc(path, n)?, None),
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Csv { b',' } else { b'\t' };
            let total = count_lines(path, |l| !l.is_empty())?.saturating_sub(1);
            (
                csv(
                    path,
                    delimiter,
                    &opts.text_column,
                    n,
                    opts.on_error,
                    skipped.clone(),
                )?,
                Some(total),
            )
        }
        Format::Text => {
            let total = count_lines(path, |_| true)?;
            (
                Box::new(TextLines {
                    reader: vcf::open_text(path)?,
                    path: path.display().to_string(),
                    rows_per_batch: n,
                    line: 0,
                    on_error: opts.on_error,
                    skipped: skipped.clone(),
                    done: false,
                }),
                Some(total),
            )
        }
    };
    Ok(Input {
        format,
        batches,
        total_rows,
        skipped,
    })
}

/// Lines of a (possibly compressed) file that `keep` accepts: a cheap pass, next to
/// embedding, that gives the progress bar its total.
fn count_lines(path: &Path, keep: impl Fn(&[u8]) -> bool) -> anyhow::Result<u64> {
    let mut reader = vcf::open_text(path)?;
    let mut line = Vec::new();
    let mut n = 0;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(n);
        }
        let l = line.strip_suffix(b"\n").unwrap_or(&line);
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        if keep(l) {
            n += 1;
        }
    }
}

/// Arrow IPC, file format (`ARROW1` magic) or stream format, re-cut to `n` rows a batch.
fn arrow_ipc(path: &Path, n: usize) -> anyhow::Result<Batches> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 6];
    let is_file = std::io::Read::read_exact(&mut file, &mut magic).is_ok() && &magic == b"ARROW1";
    let file = std::fs::File::open(path)?;
    let what = |e| anyhow::anyhow!("{}: not a readable Arrow IPC file: {e}", path.display());
    let batches: Box<dyn Iterator<Item = Result<RecordBatch, arrow_schema::ArrowError>> + Send> =
        if is_file {
            Box::new(arrow_ipc::reader::FileReader::try_new(file, None).map_err(what)?)
        } else {
            Box::new(
                arrow_ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)
                    .map_err(what)?,
            )
        };
    Ok(Box::new(batches.flat_map(move |b| {
        let pieces: Vec<anyhow::Result<RecordBatch>> = match b {
            Ok(b) => (0..b.num_rows())
                .step_by(n)
                .map(|i| Ok(b.slice(i, n.min(b.num_rows() - i))))
                .collect(),
            Err(e) => vec![Err(e.into())],
        };
        pieces
    })))
}

/// The header and the first `rows` records that fit it (as many fields, UTF-8), as CSV for
/// arrow's type inference, which fails on a row that does not: such a row among the first
/// is left to the reading, which skips it with its line or stops per `on_error`, as it
/// does any later one.
fn inference_sample(path: &Path, delimiter: u8, rows: usize) -> anyhow::Result<Vec<u8>> {
    let mut reader = ::csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(vcf::open_text(path)?);
    let mut writer = ::csv::WriterBuilder::new()
        .delimiter(delimiter)
        .from_writer(Vec::new());
    let mut record = ::csv::ByteRecord::new();
    let (mut width, mut kept) = (None, 0);
    while kept < rows && reader.read_byte_record(&mut record)? {
        let fits = std::str::from_utf8(record.as_slice()).is_ok();
        match width {
            // The header.
            None => width = Some(record.len()),
            Some(w) if fits && record.len() == w => kept += 1,
            Some(_) => continue,
        }
        writer.write_byte_record(&record)?;
    }
    writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))
}

/// CSV/TSV with a header row; column types inferred from the first 1000 rows, except
/// `text_column`, read as a string. A row that does not fit those columns (a field too
/// many or too few, a value of another type) is skipped with its line, or stops the read,
/// per `on_error`.
fn csv(
    path: &Path,
    delimiter: u8,
    text_column: &str,
    n: usize,
    on_error: OnError,
    skipped: Arc<AtomicU64>,
) -> anyhow::Result<Batches> {
    let format = arrow_csv::reader::Format::default()
        .with_header(true)
        .with_delimiter(delimiter);
    let (schema, _) = inference_sample(path, delimiter, 1000)
        .and_then(|sample| Ok(format.infer_schema(std::io::Cursor::new(sample), None)?))
        .with_context(|| format!("{}: reading the header and first rows", path.display()))?;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| {
            if f.name() == text_column {
                Field::new(f.name(), DataType::Utf8, true)
            } else {
                f.as_ref().clone()
            }
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let records = ::csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(true)
        .from_reader(vcf::open_text(path)?);
    Ok(Box::new(CsvRows {
        records,
        format: arrow_csv::reader::Format::default().with_delimiter(delimiter),
        schema,
        delimiter,
        rows_per_batch: n,
        path: path.display().to_string(),
        on_error,
        skipped,
        done: false,
    }))
}

/// CSV records read by the `csv` crate (quotes, embedded newlines, line numbers) and
/// decoded by arrow-csv a batch at a time; when a batch does not decode, its rows are
/// decoded one by one to find the ones that do not fit.
struct CsvRows {
    records: ::csv::Reader<Box<dyn BufRead + Send>>,
    /// How a record is decoded (no header: the records come one by one).
    format: arrow_csv::reader::Format,
    schema: Arc<Schema>,
    delimiter: u8,
    rows_per_batch: usize,
    path: String,
    on_error: OnError,
    skipped: Arc<AtomicU64>,
    done: bool,
}

impl CsvRows {
    /// Decodes CSV text (no header) into one batch.
    fn decode(&self, text: &[u8]) -> Result<Option<RecordBatch>, arrow_schema::ArrowError> {
        let mut decoder = arrow_csv::ReaderBuilder::new(self.schema.clone())
            .with_format(self.format.clone())
            .with_batch_size(self.rows_per_batch)
            .build_decoder();
        let mut at = 0;
        while at < text.len() {
            let used = decoder.decode(&text[at..])?;
            if used == 0 {
                break;
            }
            at += used;
        }
        decoder.flush()
    }

    fn next_batch(&mut self) -> anyhow::Result<Option<RecordBatch>> {
        // Each record re-written as one CSV record, with the line it started on.
        let mut rows: Vec<(u64, Vec<u8>)> = Vec::with_capacity(self.rows_per_batch);
        let mut record = ::csv::ByteRecord::new();
        while rows.len() < self.rows_per_batch {
            let more = self
                .records
                .read_byte_record(&mut record)
                .with_context(|| format!("{}: reading CSV", self.path))?;
            if !more {
                self.done = true;
                break;
            }
            let line = record.position().map_or(0, |p| p.line());
            let mut writer = ::csv::WriterBuilder::new()
                .delimiter(self.delimiter)
                .has_headers(false)
                .from_writer(Vec::new());
            writer.write_byte_record(&record)?;
            rows.push((
                line,
                writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?,
            ));
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let all: Vec<u8> = rows.iter().flat_map(|(_, r)| r.iter().copied()).collect();
        if let Ok(batch) = self.decode(&all) {
            return Ok(batch);
        }
        let mut good = Vec::with_capacity(rows.len());
        for (line, row) in &rows {
            match self.decode(row) {
                Ok(Some(b)) => good.push(b),
                Ok(None) => {}
                Err(e) => match self.on_error {
                    OnError::Fail => bail!(
                        "{}: line {line}: the row does not match the columns ({e}) (--on-error skip would skip it)",
                        self.path
                    ),
                    OnError::Skip => {
                        self.skipped.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "keel: {}: line {line}: the row does not match the columns ({e}); skipped",
                            self.path
                        );
                    }
                },
            }
        }
        Ok(Some(arrow_select::concat::concat_batches(
            &self.schema,
            &good,
        )?))
    }
}

impl Iterator for CsvRows {
    type Item = anyhow::Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.next_batch() {
                // A batch whose every row was skipped yields nothing; read on.
                Ok(Some(b)) if b.num_rows() == 0 => continue,
                Ok(Some(b)) => return Some(Ok(b)),
                Ok(None) => return None,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// Plain text, one row per line, column `text`.
struct TextLines {
    reader: Box<dyn BufRead + Send>,
    path: String,
    rows_per_batch: usize,
    line: usize,
    on_error: OnError,
    skipped: Arc<AtomicU64>,
    done: bool,
}

impl Iterator for TextLines {
    type Item = anyhow::Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut texts: Vec<String> = Vec::with_capacity(self.rows_per_batch);
        let mut buf = Vec::new();
        while texts.len() < self.rows_per_batch {
            buf.clear();
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => {
                    self.done = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(anyhow::Error::from(e)
                        .context(format!("{}: after line {}", self.path, self.line))));
                }
            }
            self.line += 1;
            let l = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            match std::str::from_utf8(l) {
                Ok(s) => texts.push(s.to_string()),
                Err(_) if self.on_error == OnError::Skip => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "keel: {}: line {}: not UTF-8; skipped",
                        self.path, self.line
                    );
                }
                Err(_) => {
                    self.done = true;
                    return Some(Err(anyhow::anyhow!(
                        "{}: line {}: not UTF-8 (--on-error skip would skip it)",
                        self.path,
                        self.line
                    )));
                }
            }
        }
        if texts.is_empty() {
            return None;
        }
        Some(
            RecordBatch::try_from_iter([("text", Arc::new(StringArray::from(texts)) as ArrayRef)])
                .map_err(Into::into),
        )
    }
}

/// Texts of a file, whole (benchmarks, soak inputs): VCF/BCF rendered with the default
/// template, Parquet/Arrow/CSV from column `text`, text files by line.
pub fn load_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let format = Format::detect(path);
    let texts = if format.renders_text() {
        vcf::texts(
            path,
            format == Format::Bcf,
            Template::parse(DEFAULT_TEMPLATE)?,
        )?
        .0
    } else {
        let input = open(
            path,
            &InputOptions {
                format: Some(format),
                rows_per_batch: 4096,
                template: None,
                text_column: "text".into(),
                on_error: OnError::Skip,
            },
        )?;
        let mut out = Vec::new();
        for batch in input.batches {
            let batch = batch?;
            let col = batch
                .column_by_name("text")
                .with_context(|| format!("{}: no `text` column", path.display()))?;
            let col = arrow_cast::cast(col, &DataType::Utf8)?;
            let strings = col
                .as_any()
                .downcast_ref::<StringArray>()
                .context("text column")?;
            out.extend(strings.iter().flatten().map(String::from));
        }
        out
    };
    if texts.is_empty() {
        bail!("{} holds no texts", path.display());
    }
    Ok(texts)
}
