//! VCF, VCF.gz (BGZF or plain gzip) and BCF, read with `noodles`, streamed in batches.
//!
//! The header is parsed by noodles (a malformed header is fatal). Each record is checked
//! by noodles and then read by [`VcfLineParser`], which takes the VEP `CSQ` / snpEff `ANN`
//! annotation apart into columns; BCF records are decoded by noodles and written as VCF
//! lines first, so that both formats give the same columns. A record that cannot be read
//! is reported with its line (VCF) or record number (BCF) and skipped or fatal, per
//! [`OnError`].

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use keel_wire::template::Template;
use keel_wire::variants::{ANNOTATION_COLUMNS, VariantRecord, VcfLineParser};
use noodles::vcf::variant::io::Write as _;
use noodles::{bcf, bgzf, vcf};

use super::OnError;

/// The columns a VCF becomes, in order, besides `pos` (Int64) and `text`.
const STRING_COLUMNS: [&str; 4] = ["chrom", "id", "ref", "alt"];

/// Opens a file, undoing BGZF or gzip compression (by content, not by name).
pub(crate) fn open_text(path: &Path) -> anyhow::Result<Box<dyn BufRead + Send>> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut magic = [0u8; 18];
    let n = read_up_to(&mut file, &mut magic)?;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        // BGZF: gzip with an extra field `BC` (bytes 12–13) holding the block size.
        let bgzf = n >= 14 && magic[3] & 0x04 != 0 && &magic[12..14] == b"BC";
        if bgzf {
            return Ok(Box::new(bgzf::io::Reader::new(file)));
        }
        return Ok(Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(file),
        )));
    }
    Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

enum Records {
    /// Line by line (exact line numbers; a bad line cannot swallow the next one).
    Vcf(Box<dyn BufRead + Send>),
    Bcf(bcf::io::Reader<bgzf::io::Reader<File>>, bcf::Record),
}

/// Record batches from a VCF or BCF file.
pub struct VcfBatches {
    path: PathBuf,
    records: Records,
    header: vcf::Header,
    parser: VcfLineParser,
    template: Template,
    rows_per_batch: usize,
    on_error: OnError,
    skipped: Arc<AtomicU64>,
    /// VCF: lines read so far; BCF: records read so far.
    position: usize,
    /// The line being read, as bytes (checked to be UTF-8 once whole).
    line: Vec<u8>,
    done: bool,
}

impl VcfBatches {
    pub fn open(
        path: &Path,
        bcf: bool,
        template: Template,
        rows_per_batch: usize,
        on_error: OnError,
        skipped: Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let mut parser = VcfLineParser::default();
        let (records, header, position) = if bcf {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let mut reader = bcf::io::Reader::new(file);
            let header = reader
                .read_header()
                .with_context(|| format!("{}: reading the BCF header", path.display()))?;
            // The header as VCF text gives the parser the annotation layout.
            let mut text = Vec::new();
            vcf::io::Writer::new(&mut text).write_header(&header)?;
            for line in String::from_utf8_lossy(&text).lines() {
                parser.header_line(line);
            }
            (Records::Bcf(reader, bcf::Record::default()), header, 0)
        } else {
            let mut reader = open_text(path)?;
            let mut text = String::new();
            let mut lines = 0;
            loop {
                let buf = reader.fill_buf()?;
                if buf.first() != Some(&b'#') {
                    break;
                }
                let start = text.len();
                reader
                    .read_line(&mut text)
                    .with_context(|| format!("{}: line {}", path.display(), lines + 1))?;
                lines += 1;
                parser.header_line(text[start..].trim_end());
            }
            if lines == 0 {
                bail!(
                    "{}: not a VCF file (no header: the first line must be ##fileformat=VCFv4.x)",
                    path.display()
                );
            }
            let header: vcf::Header = text
                .parse()
                .with_context(|| format!("{}: the VCF header is malformed", path.display()))?;
            (Records::Vcf(reader), header, lines)
        };
        Ok(Self {
            path: path.to_path_buf(),
            records,
            header,
            parser,
            template,
            rows_per_batch,
            on_error,
            skipped,
            position,
            line: Vec::new(),
            done: false,
        })
    }

    /// The next record, `Ok(None)` at the end, `Err` for a fatal error. Records that
    /// cannot be read are skipped (counted, reported) or fatal per `on_error`.
    fn next_record(&mut self) -> anyhow::Result<Option<VariantRecord>> {
        loop {
            let result = match &mut self.records {
                Records::Vcf(reader) => {
                    // Read as bytes and checked after: `read_line` consumes a line that is
                    // not UTF-8 before it fails, and skipping "the rest" of it then ate the
                    // next record.
                    self.line.clear();
                    let n = reader.read_until(b'\n', &mut self.line).with_context(|| {
                        format!("{}: after line {}", self.path.display(), self.position)
                    })?;
                    if n == 0 {
                        return Ok(None);
                    }
                    self.position += 1;
                    let Ok(line) = std::str::from_utf8(&self.line) else {
                        self.bad(format!("line {}: not UTF-8", self.position))?;
                        continue;
                    };
                    let line = line.trim_end_matches(['\n', '\r']);
                    if line.is_empty() {
                        continue;
                    }
                    vcf::Record::try_from(line.as_bytes())
                        .map_err(|e| e.to_string())
                        .and_then(|r| check(&r))
                        .and_then(|()| self.parser.record(self.position, line).map_err(|e| e.what))
                        .map_err(|e| format!("line {}: {e}", self.position))
                }
                Records::Bcf(reader, record) => {
                    let n = reader.read_record(record).with_context(|| {
                        format!(
                            "{}: reading BCF record {}",
                            self.path.display(),
                            self.position + 1
                        )
                    })?;
                    if n == 0 {
                        return Ok(None);
                    }
                    self.position += 1;
                    let mut buf = Vec::new();
                    vcf::io::Writer::new(&mut buf)
                        .write_variant_record(&self.header, record)
                        .map_err(|e| e.to_string())
                        .and_then(|()| String::from_utf8(buf).map_err(|e| e.to_string()))
                        .and_then(|line| {
                            self.parser.record(self.position, &line).map_err(|e| e.what)
                        })
                        .map_err(|e| format!("BCF record {}: {e}", self.position))
                }
            };
            match result {
                Ok(r) => return Ok(Some(r)),
                Err(e) => self.bad(e)?,
            }
        }
    }

    fn bad(&self, what: String) -> anyhow::Result<()> {
        match self.on_error {
            OnError::Fail => bail!(
                "{}: {what} (--on-error skip would skip it)",
                self.path.display()
            ),
            OnError::Skip => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                eprintln!("keel: {}: {what}; skipped", self.path.display());
                Ok(())
            }
        }
    }

    fn batch(&self, records: &[VariantRecord]) -> anyhow::Result<RecordBatch> {
        let col = |name: &str| -> ArrayRef {
            Arc::new(StringArray::from_iter(
                records.iter().map(|r| r.get(name).map(String::from)),
            ))
        };
        let mut columns: Vec<(&str, ArrayRef)> = vec![("chrom", col("chrom"))];
        let pos: Int64Array = records
            .iter()
            .map(|r| r.get("pos").and_then(|p| p.parse().ok()))
            .collect();
        columns.push(("pos", Arc::new(pos)));
        for name in &STRING_COLUMNS[1..] {
            columns.push((name, col(name)));
        }
        for (name, _) in ANNOTATION_COLUMNS {
            columns.push((name, col(name)));
        }
        columns.push(("clinical_significance", col("clinical_significance")));
        let text: StringArray = records
            .iter()
            .map(|r| Some(r.render(&self.template)))
            .collect();
        columns.push(("text", Arc::new(text)));
        Ok(RecordBatch::try_from_iter(columns)?)
    }
}

/// Checks a record's fixed fields with noodles (position, bases, alleles).
fn check(r: &vcf::Record) -> Result<(), String> {
    match r.variant_start() {
        Some(Ok(_)) => {}
        Some(Err(e)) => return Err(format!("POS: {e}")),
        None => return Err("POS missing".into()),
    }
    if r.reference_bases().is_empty() {
        return Err("REF is empty".into());
    }
    Ok(())
}

impl Iterator for VcfBatches {
    type Item = anyhow::Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut records = Vec::with_capacity(self.rows_per_batch);
        while records.len() < self.rows_per_batch {
            match self.next_record() {
                Ok(Some(r)) => records.push(r),
                Ok(None) => {
                    self.done = true;
                    break;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        if records.is_empty() {
            return None;
        }
        Some(self.batch(&records))
    }
}

/// Texts rendered from every readable record of a VCF/BCF file (small files: benchmarks,
/// soak inputs); unreadable records are skipped and counted.
pub fn texts(path: &Path, bcf: bool, template: Template) -> anyhow::Result<(Vec<String>, u64)> {
    let skipped = Arc::new(AtomicU64::new(0));
    let mut batches = VcfBatches::open(
        path,
        bcf,
        template.clone(),
        4096,
        OnError::Skip,
        skipped.clone(),
    )?;
    let mut out = Vec::new();
    while let Some(record) = batches.next_record()? {
        out.push(record.render(&template));
    }
    Ok((out, skipped.load(Ordering::Relaxed)))
}
