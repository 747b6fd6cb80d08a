//! `keel produce`: stream a file's records to a Keel server over Arrow Flight.
//!
//! Inputs: VCF (VEP `CSQ` / snpEff `ANN` annotations parsed into columns, the text made by
//! `--template`), Parquet (columns as they are; the text from `--text-column` or
//! `--template`, applied by the server), or plain text (one row per line). `--exchange`
//! gets the rows back (written to `--out` as Parquet, if given); `--dataset NAME` stores
//! them on the server. Replies are read on their own task while batches are written.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::{FlightClient, FlightDescriptor};
use futures::{StreamExt, TryStreamExt};
use keel_actors::template::Template;
use keel_actors::variants::{DEFAULT_TEMPLATE, parse_vcf};

#[derive(clap::Args)]
pub struct ProduceArgs {
    /// Input file: .vcf, .parquet, or text (one row per line).
    #[arg(long)]
    input: PathBuf,
    /// Server address, e.g. grpc://127.0.0.1:50051.
    #[arg(long, default_value = "grpc://127.0.0.1:50051")]
    to: String,
    /// Get the rows back with their embeddings (DoExchange).
    #[arg(long, conflicts_with = "dataset")]
    exchange: bool,
    /// With --exchange: write the rows and embeddings to this Parquet file.
    #[arg(long, requires = "exchange")]
    out: Option<PathBuf>,
    /// Store the rows on the server as this dataset (DoPut).
    #[arg(long)]
    dataset: Option<String>,
    /// Rows per record batch sent.
    #[arg(long, default_value_t = 1024)]
    rows_per_batch: usize,
    /// Template making the text of a row (VCF: rendered here; Parquet: by the server).
    #[arg(long)]
    template: Option<String>,
    /// Column holding the text (Parquet input).
    #[arg(long, conflicts_with = "template")]
    text_column: Option<String>,
    /// Seconds to keep retrying the first connection (the server may still be starting).
    #[arg(long, default_value_t = 60)]
    connect_timeout: u64,
}

pub fn run(args: ProduceArgs) -> anyhow::Result<()> {
    if !args.exchange && args.dataset.is_none() {
        bail!("say where the rows go: --exchange [--out FILE] or --dataset NAME");
    }
    if args.rows_per_batch == 0 {
        bail!("--rows-per-batch must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(produce(args))
}

/// Reads the input into batches and the command that names its text.
fn read_input(args: &ProduceArgs) -> anyhow::Result<(Vec<RecordBatch>, serde_json::Value, usize)> {
    let ext = args
        .input
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut skipped = 0;
    let (batches, command) = match ext.as_str() {
        "vcf" => {
            let template = Template::parse(args.template.as_deref().unwrap_or(DEFAULT_TEMPLATE))?;
            let text = std::fs::read_to_string(&args.input)
                .with_context(|| format!("reading {}", args.input.display()))?;
            let mut records = Vec::new();
            for r in parse_vcf(&text) {
                match r {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        eprintln!("keel produce: {}: {e}; skipped", args.input.display());
                        skipped += 1;
                    }
                }
            }
            let mut batches = Vec::new();
            for chunk in records.chunks(args.rows_per_batch) {
                let col = |name: &str| -> ArrayRef {
                    Arc::new(StringArray::from_iter(
                        chunk.iter().map(|r| r.get(name).map(String::from)),
                    ))
                };
                let pos: Int64Array = chunk
                    .iter()
                    .map(|r| r.get("pos").and_then(|p| p.parse().ok()))
                    .collect();
                let text: StringArray = chunk.iter().map(|r| Some(r.render(&template))).collect();
                batches.push(RecordBatch::try_from_iter([
                    ("chrom", col("chrom")),
                    ("pos", Arc::new(pos) as ArrayRef),
                    ("ref", col("ref")),
                    ("alt", col("alt")),
                    ("gene", col("gene")),
                    ("consequence", col("consequence")),
                    ("amino_acids", col("amino_acids")),
                    ("sift", col("sift")),
                    ("polyphen", col("polyphen")),
                    ("text", Arc::new(text) as ArrayRef),
                ])?);
            }
            (batches, serde_json::json!({}))
        }
        "parquet" => {
            let file = std::fs::File::open(&args.input)
                .with_context(|| format!("opening {}", args.input.display()))?;
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?
                    .with_batch_size(args.rows_per_batch)
                    .build()?;
            let batches = reader.collect::<Result<Vec<_>, _>>()?;
            let command = match (&args.template, &args.text_column) {
                (Some(t), _) => serde_json::json!({ "template": t }),
                (None, Some(c)) => serde_json::json!({ "text_column": c }),
                (None, None) => serde_json::json!({}),
            };
            (batches, command)
        }
        _ => {
            let text = std::fs::read_to_string(&args.input)
                .with_context(|| format!("reading {}", args.input.display()))?;
            let lines: Vec<&str> = text.lines().collect();
            let batches = lines
                .chunks(args.rows_per_batch)
                .map(|c| {
                    RecordBatch::try_from_iter([(
                        "text",
                        Arc::new(StringArray::from(c.to_vec())) as ArrayRef,
                    )])
                })
                .collect::<Result<Vec<_>, _>>()?;
            (batches, serde_json::json!({}))
        }
    };
    Ok((batches, command, skipped))
}

async fn connect(to: &str, timeout: Duration) -> anyhow::Result<FlightClient> {
    let uri = to
        .replacen("grpc+tcp://", "http://", 1)
        .replacen("grpc://", "http://", 1);
    let endpoint = tonic::transport::Channel::from_shared(uri.clone())
        .with_context(|| format!("bad address {to}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(FlightClient::new(channel)),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "server not up yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("cannot connect to {to}: {e}"),
        }
    }
}

async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let (batches, command, skipped) = read_input(&args)?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut client = connect(&args.to, Duration::from_secs(args.connect_timeout)).await?;
    let cmd = serde_json::to_vec(&command)?;
    let started = Instant::now();
    let input = futures::stream::iter(batches.into_iter().map(Ok));
    let received = if let Some(name) = &args.dataset {
        let mut descriptor = FlightDescriptor::new_path(vec!["datasets".into(), name.clone()]);
        descriptor.cmd = cmd.into();
        let data = FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(descriptor))
            .build(input);
        let mut acks = client.do_put(data).await?;
        let mut stored = 0u64;
        while let Some(ack) = acks.next().await {
            let meta: serde_json::Value = serde_json::from_slice(&ack?.app_metadata)?;
            stored = meta["acknowledged_rows"].as_u64().unwrap_or(stored);
        }
        stored as usize
    } else {
        let descriptor = if command.as_object().is_some_and(|o| o.is_empty()) {
            FlightDescriptor::new_path(vec!["embed".into()])
        } else {
            FlightDescriptor::new_cmd(cmd)
        };
        let data = FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(descriptor))
            .build(input);
        // do_exchange sends on its own task (tonic) while this one reads the replies.
        let mut replies = client.do_exchange(data).await?;
        let mut writer: Option<parquet::arrow::ArrowWriter<std::fs::File>> = None;
        let mut n = 0;
        while let Some(batch) = replies.try_next().await? {
            n += batch.num_rows();
            if let Some(out) = &args.out {
                if writer.is_none() {
                    let file = std::fs::File::create(out)
                        .with_context(|| format!("creating {}", out.display()))?;
                    writer = Some(parquet::arrow::ArrowWriter::try_new(
                        file,
                        batch.schema(),
                        None,
                    )?);
                }
                writer.as_mut().expect("created above").write(&batch)?;
            }
        }
        if let Some(w) = writer {
            w.close()?;
        }
        n
    };
    let secs = started.elapsed().as_secs_f64();
    let mut stats_stream = client
        .do_action(arrow_flight::Action::new("stats", Vec::<u8>::new()))
        .await?;
    let stats: serde_json::Value = match stats_stream.next().await {
        Some(Ok(b)) => serde_json::from_slice(&b)?,
        _ => serde_json::Value::Null,
    };
    eprintln!(
        "keel produce: {received} of {rows} rows {} in {secs:.2} s ({:.0} rows/s); {skipped} input records skipped",
        if args.dataset.is_some() {
            "stored"
        } else {
            "embedded and returned"
        },
        if secs > 0.0 {
            received as f64 / secs
        } else {
            0.0
        },
    );
    eprintln!(
        "keel server: RSS {} MB (peak {} MB), cache {} entries / {} kB of {} kB, hit rate {:.1} %, {} ops",
        stats["rss_bytes"].as_u64().unwrap_or(0) / 1_000_000,
        stats["peak_rss_bytes"].as_u64().unwrap_or(0) / 1_000_000,
        stats["cache"]["entries"],
        stats["cache"]["bytes"].as_u64().unwrap_or(0) / 1000,
        stats["cache"]["max_bytes"].as_u64().unwrap_or(0) / 1000,
        stats["cache"]["hit_rate"].as_f64().unwrap_or(0.0) * 100.0,
        stats["ops"],
    );
    if received != rows {
        bail!("{} rows were sent but {received} came back", rows);
    }
    Ok(())
}
