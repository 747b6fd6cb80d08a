//! Producers' side: every input format reads the same rows, bad VCF records are skipped
//! or fatal as asked, `keel produce` streams the sample VCF end to end, and `search`
//! finds sensible neighbours in the stored sample.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_flight::FlightDescriptor;
use futures::TryStreamExt;
use keel_client::input::{self, Format, InputOptions, OnError};
use noodles::vcf::variant::io::Write as _;

use crate::common::{TestServer, action, repo_root};

fn sample_vcf() -> PathBuf {
    repo_root().join("data/test-haploidX.vcf")
}

/// A fresh folder, removed when the test ends.
fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("keel-produce-{tag}-"))
        .tempdir()
        .unwrap()
}

fn options(format: Option<Format>, on_error: OnError) -> InputOptions {
    InputOptions {
        format,
        rows_per_batch: 100,
        template: None,
        text_column: "text".into(),
        on_error,
    }
}

/// Every batch of a file, read with `opts`.
fn read_all(path: &Path, opts: &InputOptions) -> anyhow::Result<(Vec<RecordBatch>, u64)> {
    let input = input::open(path, opts)?;
    let batches = input.batches.collect::<anyhow::Result<Vec<_>>>()?;
    assert!(batches.iter().all(|b| b.num_rows() <= opts.rows_per_batch));
    Ok((
        batches,
        input.skipped.load(std::sync::atomic::Ordering::Relaxed),
    ))
}

fn column(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = arrow_cast::cast(
                b.column_by_name(name)
                    .unwrap_or_else(|| panic!("no column {name}")),
                &arrow_schema::DataType::Utf8,
            )
            .unwrap();
            let s = c.as_string::<i32>();
            (0..s.len())
                .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The sample VCF rewritten by noodles as BGZF VCF and as BCF, and gzip-compressed as is.
fn sample_in_other_formats(dir: &Path) -> Vec<(PathBuf, Format)> {
    use noodles::{bcf, bgzf, vcf};
    let mut reader = vcf::io::reader::Builder::default()
        .build_from_path(sample_vcf())
        .unwrap();
    let header = reader.read_header().unwrap();
    let records: Vec<vcf::Record> = reader.records().collect::<Result<_, _>>().unwrap();

    let bgz = dir.join("sample.vcf.gz");
    let mut w = vcf::io::Writer::new(bgzf::io::Writer::new(std::fs::File::create(&bgz).unwrap()));
    w.write_header(&header).unwrap();
    for r in &records {
        w.write_variant_record(&header, r).unwrap();
    }
    w.into_inner().finish().unwrap();

    // BCF from the sites only (noodles' BCF writer refuses some of the sample's genotype
    // fields, which Keel does not read anyway).
    let sites: String = std::fs::read_to_string(sample_vcf())
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("##") {
                format!("{l}\n")
            } else {
                format!("{}\n", l.split('\t').take(8).collect::<Vec<_>>().join("\t"))
            }
        })
        .collect();
    let mut reader = vcf::io::Reader::new(sites.as_bytes());
    let header = reader.read_header().unwrap();
    let records: Vec<vcf::Record> = reader.records().collect::<Result<_, _>>().unwrap();
    let bcf_path = dir.join("sample.bcf");
    let mut w = bcf::io::Writer::new(std::fs::File::create(&bcf_path).unwrap());
    w.write_header(&header).unwrap();
    for (i, r) in records.iter().enumerate() {
        w.write_variant_record(&header, r)
            .unwrap_or_else(|e| panic!("BCF record {i}: {e}"));
    }
    w.try_finish().unwrap();

    let gz = dir.join("plain-gzip.vcf.gz");
    let mut e = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    e.write_all(&std::fs::read(sample_vcf()).unwrap()).unwrap();
    e.finish().unwrap();
    vec![
        (bgz, Format::Vcf),
        (bcf_path, Format::Bcf),
        (gz, Format::Vcf),
    ]
}

#[test]
fn vcf_bgzf_gzip_and_bcf_give_the_same_rows_and_columns() {
    let dir = scratch("formats");
    let opts = options(None, OnError::Fail);
    let (plain, skipped) = read_all(&sample_vcf(), &opts).unwrap();
    assert_eq!(skipped, 0);
    let rows: usize = plain.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 777);
    let texts = column(&plain, "text");
    assert_eq!(
        texts[0].as_deref(),
        Some("XG chrX:2700157 G>A missense_variant D/N tolerated(0.97) benign(0)")
    );
    let genes = column(&plain, "gene");
    assert_eq!(genes[0].as_deref(), Some("XG"));
    let pos = plain[0]
        .column_by_name("pos")
        .unwrap()
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(pos, 2700157);
    for (path, format) in sample_in_other_formats(dir.path()) {
        assert_eq!(Format::detect(&path), format, "{}", path.display());
        let (batches, skipped) =
            read_all(&path, &opts).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(skipped, 0, "{}", path.display());
        assert_eq!(batches[0].schema(), plain[0].schema(), "{}", path.display());
        for name in ["chrom", "pos", "gene", "consequence", "sift", "polyphen"] {
            assert_eq!(
                column(&batches, name),
                column(&plain, name),
                "{}: column {name}",
                path.display()
            );
        }
        // BCF stores QUAL as a float: the texts agree where the template does not use it.
        assert_eq!(column(&batches, "text"), texts, "{}", path.display());
    }
}

#[test]
fn a_bad_vcf_record_is_skipped_with_its_line_or_stops_the_read() {
    let dir = scratch("bad");
    let mut text = std::fs::read_to_string(sample_vcf()).unwrap();
    let header_lines = text.lines().take_while(|l| l.starts_with('#')).count();
    // Break the second record: POS not a number.
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let bad = header_lines + 1;
    let cols: Vec<&str> = lines[bad].split('\t').collect();
    let mut broken = cols.clone();
    broken[1] = "notanumber";
    lines[bad] = broken.join("\t");
    text = lines.join("\n") + "\n";
    let path = dir.path().join("bad.vcf");
    std::fs::write(&path, text).unwrap();

    let (batches, skipped) = read_all(&path, &options(None, OnError::Skip)).unwrap();
    assert_eq!(skipped, 1);
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 776);

    let err = read_all(&path, &options(None, OnError::Fail)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("line {}", bad + 1)),
        "names the 1-based line {}: {msg}",
        bad + 1
    );
}

/// A VCF line that is not UTF-8 is one bad record: skipped (and counted) alone, the next
/// record read, every later line numbered as it is in the file.
#[test]
fn a_vcf_line_not_in_utf8_is_skipped_alone() {
    let dir = scratch("vcf-utf8");
    let text = std::fs::read_to_string(sample_vcf()).unwrap();
    let header_lines = text.lines().take_while(|l| l.starts_with('#')).count();
    let mut lines: Vec<Vec<u8>> = text.lines().map(|l| l.as_bytes().to_vec()).collect();
    let bad = header_lines + 2;
    lines[bad].extend_from_slice(b";NOTE=\xff\xfe");
    // The line after it, broken too, must still be read (and reported by its number).
    let next = bad + 1;
    let mut cols: Vec<Vec<u8>> = lines[next]
        .split(|&b| b == b'\t')
        .map(<[u8]>::to_vec)
        .collect();
    cols[1] = b"notanumber".to_vec();
    lines[next] = cols.join(&b'\t');
    let path = dir.path().join("latin1.vcf");
    std::fs::write(&path, lines.join(&b'\n')).unwrap();

    let (batches, skipped) = read_all(&path, &options(None, OnError::Skip)).unwrap();
    assert_eq!(
        skipped, 2,
        "the line that is not UTF-8 and the broken one after it"
    );
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 775);

    let err = read_all(&path, &options(None, OnError::Fail)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("line {}: not UTF-8", bad + 1)),
        "{msg}"
    );
}

#[test]
fn parquet_arrow_csv_tsv_and_text_read_the_same_rows() {
    let dir = scratch("tables");
    let n = 250;
    let texts: Vec<String> = (0..n)
        .map(|i| format!("BRCA{} variant, \"quoted\" {i}", i % 3))
        .collect();
    let ids: Vec<i64> = (0..n as i64).collect();
    let batch = RecordBatch::try_from_iter([
        ("id", Arc::new(Int64Array::from(ids.clone())) as ArrayRef),
        (
            "text",
            Arc::new(StringArray::from_iter_values(&texts)) as ArrayRef,
        ),
    ])
    .unwrap();

    let parquet = dir.path().join("t.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&parquet).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let ipc = dir.path().join("t.arrow");
    let mut w = arrow_ipc::writer::FileWriter::try_new(
        std::fs::File::create(&ipc).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();

    let ipc_stream = dir.path().join("t.arrows");
    let mut w = arrow_ipc::writer::StreamWriter::try_new(
        std::fs::File::create(&ipc_stream).unwrap(),
        &batch.schema(),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();

    let csv = dir.path().join("t.csv");
    let mut s = String::from("id,text\n");
    for (i, t) in texts.iter().enumerate() {
        s.push_str(&format!("{i},\"{}\"\n", t.replace('"', "\"\"")));
    }
    std::fs::write(&csv, s).unwrap();

    let tsv = dir.path().join("t.tsv");
    let mut s = String::from("id\ttext\n");
    for (i, t) in texts.iter().enumerate() {
        s.push_str(&format!("{i}\t{}\n", t.replace('"', "")));
    }
    std::fs::write(&tsv, s).unwrap();

    let txt = dir.path().join("t.txt");
    std::fs::write(&txt, texts.join("\n") + "\n").unwrap();

    let expect: Vec<Option<String>> = texts.iter().cloned().map(Some).collect();
    for path in [&parquet, &ipc, &ipc_stream, &csv, &txt] {
        let input = input::open(path, &options(None, OnError::Fail)).unwrap();
        assert_eq!(
            input.total_rows.unwrap_or(n as u64),
            n as u64,
            "{}",
            path.display()
        );
        let (batches, _) = read_all(path, &options(None, OnError::Fail)).unwrap();
        assert_eq!(
            batches.len(),
            3,
            "{}: 250 rows in batches of 100",
            path.display()
        );
        assert_eq!(column(&batches, "text"), expect, "{}", path.display());
    }
    // TSV (quotes dropped above): numbers inferred, texts kept strings.
    let (batches, _) = read_all(&tsv, &options(None, OnError::Fail)).unwrap();
    assert_eq!(
        batches[0]
            .schema()
            .field_with_name("id")
            .unwrap()
            .data_type(),
        &arrow_schema::DataType::Int64
    );
    let tsv_texts: Vec<Option<String>> = texts.iter().map(|t| Some(t.replace('"', ""))).collect();
    assert_eq!(column(&batches, "text"), tsv_texts);
}

fn keel_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel"))
}

/// `keel produce` as a user runs it: the sample VCF through a real server, back into
/// Parquet, and stored as a dataset that `search` then queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_streams_the_sample_vcf_and_search_finds_sensible_neighbours() {
    let server = TestServer::start(|_| {}).await;
    let dir = scratch("e2e");
    let out = dir.path().join("out.parquet");
    let to = format!("grpc://{}", server.addr);
    let run = |args: Vec<String>| {
        let bin = keel_bin();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin)
                .args(args)
                .env("RUST_LOG", "warn")
                .output()
                .unwrap()
        })
    };
    let vcf = sample_vcf().display().to_string();
    let o = run(vec![
        "produce".into(),
        "--input".into(),
        vcf.clone(),
        "--to".into(),
        to.clone(),
        "--exchange".into(),
        "--out".into(),
        out.display().to_string(),
        "--rows-per-batch".into(),
        "200".into(),
    ])
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("777 of 777 rows"), "{stderr}");
    let back = crate::common::read_parquet(&out);
    assert_eq!(back.iter().map(|b| b.num_rows()).sum::<usize>(), 777);
    assert!(back[0].column_by_name("embedding").is_some());

    let o = run(vec![
        "produce".into(),
        "--input".into(),
        vcf,
        "--to".into(),
        to.clone(),
        "--dataset".into(),
        "sample".into(),
    ])
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let mut client = server.client().await;
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "datasets".into(),
            "sample".into(),
        ]))
        .await
        .unwrap();
    assert_eq!(info.total_records, 777);

    // Hand-checked on the sample: 6 MXRA5 missense variants, 9 DRP2 3' UTR variants.
    let search = |text: &str, k: usize| {
        serde_json::json!({ "dataset": "sample", "text": text, "k": k }).to_string()
    };
    let r = action(&mut client, "search", &search("MXRA5 missense_variant", 5)).await;
    assert_eq!(r["scanned_rows"], 777);
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    for hit in results {
        assert_eq!(hit["gene"], "MXRA5", "{r:#}");
    }
    assert_eq!(results[0]["consequence"], "missense_variant", "{r:#}");
    let scores: Vec<f64> = results
        .iter()
        .map(|h| h["score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "best first: {scores:?}"
    );

    let r = action(
        &mut client,
        "search",
        &search("DRP2 3_prime_UTR_variant", 5),
    )
    .await;
    for hit in r["results"].as_array().unwrap() {
        assert_eq!(hit["gene"], "DRP2", "{r:#}");
        assert_eq!(hit["consequence"], "3_prime_UTR_variant", "{r:#}");
    }

    // The same through `keel search`: one line per row, best first.
    let o = run(vec![
        "search".into(),
        "--to".into(),
        to.clone(),
        "--dataset".into(),
        "sample".into(),
        "-k".into(),
        "3".into(),
        "MXRA5 missense_variant".into(),
    ])
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(stdout.lines().all(|l| l.contains("MXRA5")), "{stdout}");

    // A row's own text finds that row first, at cosine 1.
    let own = "XG chrX:2700157 G>A missense_variant D/N tolerated(0.97) benign(0)";
    let r = action(&mut client, "search", &search(own, 1)).await;
    assert_eq!(r["results"][0]["text"], own);
    assert_eq!(r["results"][0]["row"], 0);
    assert!((r["results"][0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-5);

    // Bad searches: precise statuses.
    for (body, code, needle) in [
        (search("x", 0), tonic::Code::InvalidArgument, "k must be"),
        (
            serde_json::json!({"dataset": "nope", "text": "x"}).to_string(),
            tonic::Code::NotFound,
            "does not exist",
        ),
        (
            "{\"text\": 1}".to_string(),
            tonic::Code::InvalidArgument,
            "bad search body",
        ),
    ] {
        let err = client
            .do_action(arrow_flight::Action::new("search", body.into_bytes()))
            .await
            .err()
            .map(crate::common::to_status);
        let status = match err {
            Some(s) => s,
            None => panic!("{needle}: the search succeeded"),
        };
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(status.message().contains(needle), "{}", status.message());
    }
    let _ = client
        .list_actions()
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    server.stop().await;
}

#[test]
fn csv_rows_that_do_not_fit_the_columns_are_skipped_with_their_line_or_stop_the_read() {
    let dir = scratch("csv-bad");
    let path = dir.path().join("rows.csv");
    // 1 100 good rows (the types are inferred from the first 1 000: `id` is Int64), then
    // a row with a text where `id` is a number, one with a field too many, one with a
    // field too few, and a last good row.
    let mut s = String::from("id,text\n");
    for i in 0..1100 {
        s.push_str(&format!("{i},variant {i}\n"));
    }
    s.push_str("not-a-number,variant x\n"); // line 1102
    s.push_str("1101,variant y,extra\n"); // line 1103
    s.push_str("1102\n"); // line 1104
    s.push_str("1103,\"variant, last\"\n");
    std::fs::write(&path, s).unwrap();

    let (batches, skipped) = read_all(&path, &options(None, OnError::Skip)).unwrap();
    assert_eq!(skipped, 3);
    let ids: Vec<Option<String>> = column(&batches, "id");
    let expected: Vec<Option<String>> = (0..1100)
        .chain([1103])
        .map(|i| Some(i.to_string()))
        .collect();
    assert_eq!(ids, expected, "every good row once, in order");
    assert_eq!(
        column(&batches, "text").last().unwrap().as_deref(),
        Some("variant, last")
    );

    let err = read_all(&path, &options(None, OnError::Fail)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("line 1102") && msg.contains("--on-error skip"),
        "{msg}"
    );
}

/// Rows that do not fit among the first rows (those the column types are inferred from)
/// are skipped with their line too, not fatal to the whole read.
#[test]
fn csv_rows_that_do_not_fit_among_the_first_rows_are_skipped_too() {
    let dir = scratch("csv-bad-early");
    let path = dir.path().join("rows.csv");
    let mut s = b"id,text\n".to_vec();
    for i in 0..20 {
        s.extend(format!("{i},variant {i}\n").bytes());
        if i == 2 {
            s.extend(b"2,variant y,extra\n"); // line 5
            s.extend(b"2\n"); // line 6
            s.extend(b"2,variant \xff\n"); // line 7: not UTF-8
        }
    }
    std::fs::write(&path, s).unwrap();

    let (batches, skipped) = read_all(&path, &options(None, OnError::Skip)).unwrap();
    assert_eq!(skipped, 3);
    let ids: Vec<Option<String>> = column(&batches, "id");
    let expected: Vec<Option<String>> = (0..20).map(|i| Some(i.to_string())).collect();
    assert_eq!(ids, expected, "every good row once, in order");

    let err = read_all(&path, &options(None, OnError::Fail)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("line 5") && msg.contains("--on-error skip"),
        "{msg}"
    );
}

#[test]
fn a_bcf_with_format_and_sample_columns_is_read_as_its_sites() {
    use noodles::{bcf, vcf};
    let dir = scratch("bcf-samples");
    let text = "##fileformat=VCFv4.3\n\
##contig=<ID=chr1,length=248956422>\n\
##INFO=<ID=CSQ,Number=.,Type=String,Description=\"Consequence annotations from Ensembl VEP. Format: Consequence|SYMBOL|SIFT\">\n\
##FORMAT=<ID=GT,Number=1,Type=String,Description=\"Genotype\">\n\
##FORMAT=<ID=DP,Number=1,Type=Integer,Description=\"Read depth\">\n\
#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\tNA00001\tNA00002\n\
chr1\t877772\t.\tG\tC\t50\tPASS\t.\tGT:DP\t0/1:12\t1/1:30\n\
chr1\t877831\trs6672356\tT\tC\t50\tPASS\tCSQ=missense_variant|SAMD11|tolerated(0.3)\tGT:DP\t0/0:8\t0/1:21\n";
    let vcf_path = dir.path().join("samples.vcf");
    std::fs::write(&vcf_path, text).unwrap();
    let mut reader = vcf::io::Reader::new(text.as_bytes());
    let header = reader.read_header().unwrap();
    let records: Vec<vcf::Record> = reader.records().collect::<Result<_, _>>().unwrap();
    let bcf_path = dir.path().join("samples.bcf");
    let mut w = bcf::io::Writer::new(std::fs::File::create(&bcf_path).unwrap());
    w.write_header(&header).unwrap();
    for r in &records {
        w.write_variant_record(&header, r).unwrap();
    }
    w.try_finish().unwrap();

    for path in [&vcf_path, &bcf_path] {
        let (batches, skipped) = read_all(path, &options(None, OnError::Fail)).unwrap();
        assert_eq!(skipped, 0, "{}", path.display());
        assert_eq!(
            column(&batches, "text"),
            vec![
                Some("chr1:877772 G>C".to_string()),
                Some("SAMD11 chr1:877831 T>C missense_variant tolerated(0.3)".to_string()),
            ],
            "{}: sites only, no stray separators",
            path.display()
        );
        assert_eq!(
            column(&batches, "id"),
            vec![None, Some("rs6672356".to_string())]
        );
    }
}
