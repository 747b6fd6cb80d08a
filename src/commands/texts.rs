//! `keel texts`: render the records of a VCF as the texts Keel would embed, one per line.
//!
//! Lets a user see (and pipe into `keel embed`, or into another stack for comparison)
//! exactly the text a template makes of each record. Records that do not parse are
//! reported on stderr with their line number and skipped; the count is in the summary.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use keel_actors::template::Template;
use keel_actors::variants::{DEFAULT_TEMPLATE, parse_vcf};

#[derive(clap::Args)]
pub struct TextsArgs {
    /// A VCF file with VEP `CSQ` or snpEff `ANN` annotations.
    input: PathBuf,
    /// Template over the record's fields (lower-cased names: chrom, pos, ref, alt, gene,
    /// and every annotation field).
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    template: String,
}

pub fn run(args: TextsArgs) -> anyhow::Result<()> {
    let template = Template::parse(&args.template)?;
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("reading {}", args.input.display()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut ok, mut bad) = (0usize, 0usize);
    for record in parse_vcf(&text) {
        match record {
            Ok(r) => {
                writeln!(out, "{}", r.render(&template))?;
                ok += 1;
            }
            Err(e) => {
                eprintln!("keel texts: {}: {e}; skipped", args.input.display());
                bad += 1;
            }
        }
    }
    out.flush()?;
    eprintln!("keel texts: {ok} records rendered, {bad} skipped");
    Ok(())
}
