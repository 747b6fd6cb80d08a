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
    /// A field's value; `None` where it is absent, empty or VCF's missing value `.`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty() && *v != ".")
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

/// Canonical column names and the annotation fields (VEP `CSQ`, snpEff `ANN`) or INFO
/// keys (ClinVar) that fill them, first match wins.
pub const ANNOTATION_COLUMNS: [(&str, &[&str]); 8] = [
    ("gene", &["symbol", "gene_name"]),
    ("consequence", &["consequence", "annotation"]),
    ("impact", &["impact", "annotation_impact"]),
    ("hgvsc", &["hgvsc", "hgvs.c"]),
    ("hgvsp", &["hgvsp", "hgvs.p"]),
    ("amino_acids", &["amino_acids"]),
    ("sift", &["sift"]),
    ("polyphen", &["polyphen"]),
];

/// Clinical significance: VEP's `CLIN_SIG` field or ClinVar's `CLNSIG` INFO key.
const CLINICAL: &[&str] = &["clin_sig", "clnsig"];

/// Reads VCF lines one at a time: header lines set up the annotation layout, record
/// lines become [`VariantRecord`]s. Errors are per record, so a caller can skip or stop.
#[derive(Debug, Clone, Default)]
pub struct VcfLineParser {
    /// The annotation's INFO key (`CSQ` or `ANN`) and its field names, lower-cased.
    annotation: Option<(String, Vec<String>)>,
}

impl VcfLineParser {
    /// Takes the annotation layout from an `##INFO=<ID=CSQ|ANN,…Format: a|b|…>` line;
    /// other header lines are ignored.
    pub fn header_line(&mut self, line: &str) {
        let Some(meta) = line.strip_prefix("##INFO=<") else {
            return;
        };
        for key in ["CSQ", "ANN"] {
            if meta.starts_with(&format!("ID={key},")) {
                // VEP: "… Format: A|B|C"; snpEff: "Functional annotations: 'A | B | C' ".
                let format = meta
                    .split("Format: ")
                    .nth(1)
                    .or_else(|| meta.split("annotations: ").nth(1));
                if let Some(format) = format {
                    self.set_annotation(key, format);
                }
            }
        }
    }

    /// Sets the annotation layout from the INFO key and its `A|B|C` field list.
    pub fn set_annotation(&mut self, key: &str, format: &str) {
        let names = format
            .trim_end_matches(['>', '"', ' ', '\''])
            .split('|')
            .map(|n| {
                n.trim()
                    .trim_matches(['\'', '"'])
                    .trim()
                    .to_ascii_lowercase()
            })
            .collect();
        self.annotation = Some((key.to_string(), names));
    }

    /// Parses one record line (`line_no` is 1-based, for the error).
    pub fn record(&self, line_no: usize, line: &str) -> Result<VariantRecord, VcfError> {
        let err = |what: String| VcfError {
            line: line_no,
            what,
        };
        let line = line.trim_end_matches(['\n', '\r']);
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 8 {
            return Err(err(format!(
                "{} tab-separated columns, expected at least 8",
                cols.len()
            )));
        }
        if cols[1].parse::<u64>().is_err() {
            return Err(err(format!("POS {:?} is not a number", cols[1])));
        }
        if cols[0].is_empty() || cols[3].is_empty() {
            return Err(err("empty CHROM or REF".into()));
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
            if let Some((ann_key, names)) = &self.annotation
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
        for (column, sources) in ANNOTATION_COLUMNS
            .iter()
            .chain(std::iter::once(&("clinical_significance", CLINICAL)))
        {
            let value = sources.iter().find_map(|k| rec.get(k)).map(String::from);
            if let Some(value) = value {
                rec.fields.insert((*column).to_string(), value);
            }
        }
        Ok(rec)
    }
}

/// Parses VCF text into records; errors are per record, so a caller can skip or stop.
pub fn parse_vcf(text: &str) -> Vec<Result<VariantRecord, VcfError>> {
    let mut parser = VcfLineParser::default();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            parser.header_line(line);
        } else if !line.trim().is_empty() {
            out.push(parser.record(i + 1, line));
        }
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
        // No annotation: the missing fields and their separators leave nothing behind,
        // and the record still counts.
        assert_eq!(records[2].as_ref().unwrap().render(&t), "chrX:2700200 C>T");
        // VCF's missing value `.` is a missing field.
        let r = records[2].as_ref().unwrap();
        assert_eq!((r.get("id"), r.get("qual")), (None, Some("1")));
    }

    #[test]
    fn snpeff_ann_and_clinvar_fill_the_canonical_columns() {
        let vcf = "##fileformat=VCFv4.2\n\
##INFO=<ID=ANN,Number=.,Type=String,Description=\"Functional annotations: 'Allele | Annotation | Annotation_Impact | Gene_Name | Gene_ID | Feature_Type | Feature_ID | Transcript_BioType | Rank | HGVS.c | HGVS.p' \">\n\
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n\
17\t43045712\t.\tAG\tA\t.\tPASS\tCLNSIG=Pathogenic;ANN=A|frameshift_variant|HIGH|BRCA1|ENSG00000012048|transcript|ENST00000357654|protein_coding|10/23|c.1234delC|p.Leu412fs\n";
        let records = parse_vcf(vcf);
        let r = records[0].as_ref().unwrap();
        assert_eq!(r.get("gene"), Some("BRCA1"));
        assert_eq!(r.get("consequence"), Some("frameshift_variant"));
        assert_eq!(r.get("impact"), Some("HIGH"));
        assert_eq!(r.get("hgvsc"), Some("c.1234delC"));
        assert_eq!(r.get("hgvsp"), Some("p.Leu412fs"));
        assert_eq!(r.get("clinical_significance"), Some("Pathogenic"));
        assert_eq!(r.get("sift"), None);
    }

    #[test]
    fn short_lines_and_empty_fields_are_errors_with_their_line() {
        let p = VcfLineParser::default();
        assert_eq!(p.record(7, "chrX\t1\t.\tA").unwrap_err().line, 7);
        assert!(p.record(8, "\t1\t.\tA\tC\t.\t.\t.").is_err());
        assert!(p.record(9, "chrX\t1\t.\tA\tC\t.\t.\t.").is_ok());
    }
}
