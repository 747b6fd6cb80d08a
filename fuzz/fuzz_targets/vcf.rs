//! VCF text → Keel's record parser (header lines set the CSQ/ANN layout, record lines
//! become fields) and noodles' record check, as `keel produce` reads a file. Any input
//! must end in records or per-record errors, never a panic.
#![no_main]

use keel_wire::template::Template;
use keel_wire::variants::{DEFAULT_TEMPLATE, VcfLineParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let template = Template::parse(DEFAULT_TEMPLATE).expect("the default template parses");
    let mut parser = VcfLineParser::default();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            parser.header_line(line);
        } else if let Ok(record) = parser.record(i + 1, line) {
            let _ = record.render(&template);
            if let Ok(r) = noodles::vcf::Record::try_from(line.as_bytes()) {
                let _ = r.variant_start();
                let _ = r.reference_bases();
            }
        }
    }
});
