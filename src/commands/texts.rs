//! `keel texts`: render the records of a VCF/BCF as the texts Keel would embed, one per line.
//!
//! Lets a user see (and pipe into `keel embed`, or into another stack for comparison)
//! exactly the text a template makes of each record. Records that do not parse are
//! reported on stderr with their line number and skipped; the count is in the summary.

use std::io::Write;
use std::path::PathBuf;

use arrow_array::{Array, StringArray};
use keel_client::input::{self, Format, InputOptions, OnError};
use keel_wire::variants::DEFAULT_TEMPLATE;

#[derive(clap::Args)]
pub struct TextsArgs {
    /// A VCF (.vcf, .vcf.gz) or BCF file, with VEP `CSQ` or snpEff `ANN` annotations.
    input: PathBuf,
    /// Template over the record's fields (lower-cased names: chrom, pos, ref, alt, gene,
    /// consequence, impact, hgvsc, hgvsp, and every INFO key and annotation field).
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    template: String,
    /// Records that do not parse: skip them (reported, counted) or stop.
    #[arg(long, value_enum, default_value = "skip")]
    on_error: OnError,
}

pub fn run(args: TextsArgs) -> anyhow::Result<()> {
    let format = Format::detect(&args.input);
    anyhow::ensure!(
        format.renders_text(),
        "{}: keel texts reads VCF or BCF files",
        args.input.display()
    );
    let input = input::open(
        &args.input,
        &InputOptions {
            format: Some(format),
            rows_per_batch: 2048,
            template: Some(args.template.clone()),
            text_column: "text".into(),
            on_error: args.on_error,
        },
    )?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut ok = 0usize;
    for batch in input.batches {
        let batch = batch?;
        let texts = batch
            .column_by_name("text")
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .expect("VCF batches carry a string `text` column");
        for i in 0..texts.len() {
            writeln!(out, "{}", texts.value(i))?;
        }
        ok += batch.num_rows();
    }
    out.flush()?;
    eprintln!(
        "keel texts: {ok} records rendered, {} skipped",
        input.skipped.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}
