//! Annotated variant records as text: the VCF subset Keel's sample data and benchmarks use.
//!
//! Reads a VCF's fixed columns and the first entry of the VEP `CSQ` (or snpEff `ANN`)
//! annotation, with field names taken from the header's `Format:` description and
//! lower-cased (`SYMBOL` → `symbol`; `gene` is the symbol when present, as users expect).
//! Every record becomes a [`VariantRecord`] whose fields a [`Template`] renders.

use std::collections::HashMap;

use crate::template::Template;

/// The template the benchmarks and the sample job use.
pub const DEFAULT_TEMPLATE: &str =
    "{gene} {chrom}:{pos} {ref}>{alt} {consequence} {amino_acids} {sift} {polyphen}";

/// One record's named fields.
#[derive(Debug, Clone, Default)]
pub struct VariantRecord {
    pub fields: HashMap<String, String>,
}

impl VariantRecord {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn render(&self, template: &Template) -> String {
        template.render(|k| self.get(k))
    }
}

/// A record that could not be read, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VCF line {line}: {what}")]
pub struct VcfError {
    pub line: usize,
    pub what: String,
}

/// Parses VCF text into records; errors are per record, so a caller can skip or stop.
pub fn parse_vcf(text: &str) -> Vec<Result<VariantRecord, VcfError>> {
    let mut annotation: Option<(String, Vec<String>)> = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if let Some(meta) = line.strip_prefix("##INFO=<") {
            for key in ["CSQ", "ANN"] {
                if meta.starts_with(&format!("ID={key},"))
                    && let Some(format) = meta.split("Format: ").nth(1)
                {
                    let names = format
                        .trim_end_matches(['>', '"'])
                        .split('|')
                        .map(|n| n.trim().trim_matches('\'').to_ascii_lowercase())
                        .collect();
                    annotation = Some((key.to_string(), names));
                }
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 8 {
            out.push(Err(VcfError {
                line: line_no,
                what: format!("{} tab-separated columns, expected at least 8", cols.len()),
            }));
            continue;
        }
        if cols[1].parse::<u64>().is_err() {
            out.push(Err(VcfError {
                line: line_no,
                what: format!("POS {:?} is not a number", cols[1]),
            }));
            continue;
        }
        let mut rec = VariantRecord::default();
        for (name, value) in ["chrom", "pos", "id", "ref", "alt", "qual", "filter"]
            .iter()
            .zip(&cols)
        {
            rec.fields.insert((*name).to_string(), (*value).to_string());
        }
        for item in cols[7].split(';') {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if let Some((ann_key, names)) = &annotation
                && key == ann_key
            {
                let first = value.split(',').next().unwrap_or("");
                for (name, v) in names.iter().zip(first.split('|')) {
                    rec.fields.insert(name.clone(), v.to_string());
                }
            } else {
                rec.fields
                    .insert(key.to_ascii_lowercase(), value.to_string());
            }
        }
        let gene = rec
            .get("symbol")
            .or_else(|| rec.get("gene_name"))
            .map(String::from);
        if let Some(gene) = gene {
            rec.fields.insert("gene".into(), gene);
        }
        out.push(Ok(rec));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCF: &str = "##fileformat=VCFv4.2\n\
##INFO=<ID=CSQ,Number=.,Type=String,Description=\"Consequence annotations from Ensembl VEP. Format: Consequence|Amino_acids|Gene|SYMBOL|PolyPhen|SIFT\">\n\
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n\
chrX\t2700157\t.\tG\tA\t3450.64\tPASS\tAC=3;CSQ=missense_variant|D/N|ENSG1|XG|benign(0)|tolerated(0.97),intron_variant||ENSG1|XG||\n\
chrX\tnotanumber\t.\tG\tA\t1\tPASS\tAC=3\n\
chrX\t2700200\t.\tC\tT\t1\tPASS\tAC=1\n";

    #[test]
    fn renders_the_first_annotation_with_the_default_template() {
        let records = parse_vcf(VCF);
        assert_eq!(records.len(), 3);
        let t = Template::parse(DEFAULT_TEMPLATE).unwrap();
        assert_eq!(
            records[0].as_ref().unwrap().render(&t),
            "XG chrX:2700157 G>A missense_variant D/N tolerated(0.97) benign(0)"
        );
        assert_eq!(records[1].as_ref().unwrap_err().line, 5);
        // No annotation: the missing fields render empty, the record still counts.
        assert_eq!(
            records[2].as_ref().unwrap().render(&t),
            " chrX:2700200 C>T    "
        );
    }
}
