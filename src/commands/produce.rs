//! `keel produce`: stream a file's records to a Keel server over Arrow Flight.
//!
//! Inputs (see [`keel::input`]): VCF / VCF.gz / BCF (annotations parsed into columns, the
//! text made by `--template`), Parquet, Arrow IPC, CSV/TSV (the text from `--text-column`
//! or `--template`, applied by the server), or plain text (one row per line). The file is
//! read on its own thread, batch by batch, and paced by `--rate`; `--exchange` gets the
//! rows back (written to `--out` as Parquet, if given), `--dataset NAME` stores them on
//! the server. Replies are read while batches are written.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow_array::RecordBatch;
use arrow_flight::FlightDescriptor;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use futures::{StreamExt, TryStreamExt};
use keel::flight::stream::PutAck;
use keel::input::{self, Format, InputOptions, OnError};
use keel_engine::stats::Stats;

#[derive(clap::Args)]
pub struct ProduceArgs {
    /// Input file: VCF (.vcf, .vcf.gz), BCF, Parquet, Arrow IPC (.arrow), CSV, TSV, or
    /// text (one row per line).
    #[arg(long)]
    input: PathBuf,
    /// The input's format, when its name does not say it.
    #[arg(long, value_enum)]
    format: Option<Format>,
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
    /// Send at most this many rows per second (default: as fast as the server takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Template making the text of a row (VCF/BCF: rendered here; other inputs: by the
    /// server), e.g. "{gene} {consequence} {hgvsp}".
    #[arg(long)]
    template: Option<String>,
    /// Column holding the text (Parquet, Arrow, CSV/TSV input).
    #[arg(long, conflicts_with = "template")]
    text_column: Option<String>,
    /// Records the reader cannot parse: skip them (reported with their line, counted) or
    /// stop.
    #[arg(long, value_enum, default_value = "skip")]
    on_error: OnError,
    #[command(flatten)]
    auth: keel::flight::client::ClientAuth,
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
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of rows per second");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(produce(args))
}

/// Reads the input on a thread of its own, paced by `rate`, into a bounded channel: the
/// file is never in memory whole, and a slow server slows the reading.
fn spawn_reader(
    mut batches: input::Batches,
    rate: Option<f64>,
) -> tokio::sync::mpsc::Receiver<anyhow::Result<RecordBatch>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::Builder::new()
        .name("keel-produce-reader".into())
        .spawn(move || {
            let started = Instant::now();
            let mut sent = 0u64;
            for batch in batches.by_ref() {
                let rows = batch.as_ref().map(|b| b.num_rows() as u64).unwrap_or(0);
                let failed = batch.is_err();
                if tx.blocking_send(batch).is_err() || failed {
                    return;
                }
                sent += rows;
                if let Some(rate) = rate {
                    let due = Duration::from_secs_f64(sent as f64 / rate);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        })
        .expect("spawning the reader thread");
    rx
}

fn progress(total: Option<u64>) -> indicatif::ProgressBar {
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {human_pos}/{human_len} rows  {per_sec}  ETA {eta}",
            )
            .expect("a valid template"),
        ),
        None => indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} {human_pos} rows  {per_sec}")
                .expect("a valid template"),
        ),
    };
    // Drawn on a terminal only (indicatif hides itself otherwise).
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    bar
}

async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let opts = InputOptions {
        format: args.format,
        rows_per_batch: args.rows_per_batch,
        template: args.template.clone(),
        text_column: args.text_column.clone().unwrap_or_else(|| "text".into()),
        on_error: args.on_error,
    };
    let input = input::open(&args.input, &opts)?;
    // VCF/BCF texts are rendered here; other inputs name their text to the server.
    let command = match (
        input.format.renders_text(),
        &args.template,
        &args.text_column,
    ) {
        (true, _, _) | (false, None, None) => serde_json::json!({}),
        (false, Some(t), _) => serde_json::json!({ "template": t }),
        (false, None, Some(c)) => serde_json::json!({ "text_column": c }),
    };
    let skipped = input.skipped.clone();
    let bar = progress(input.total_rows);
    let mut client = keel::flight::client::connect_with(
        &args.to,
        Duration::from_secs(args.connect_timeout),
        &args.auth,
    )
    .await?;
    let cmd = serde_json::to_vec(&command)?;
    let started = Instant::now();
    // Rows read from the file and handed to Flight; a read error ends the stream (the
    // server sees it cancelled) and is reported after the replies.
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read_error = std::sync::Arc::new(std::sync::Mutex::new(None::<anyhow::Error>));
    let batches = {
        let (read, read_error) = (read.clone(), read_error.clone());
        tokio_stream::wrappers::ReceiverStream::new(spawn_reader(input.batches, args.rate)).map(
            move |b| match b {
                Ok(b) => {
                    read.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
                    Ok(b)
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    *read_error.lock().expect("not poisoned") = Some(e);
                    Err(FlightError::ExternalError(msg.into()))
                }
            },
        )
    };
    let outcome: anyhow::Result<usize> = async {
        if let Some(name) = &args.dataset {
            let mut descriptor = FlightDescriptor::new_path(vec!["datasets".into(), name.clone()]);
            descriptor.cmd = cmd.into();
            let data = FlightDataEncoderBuilder::new()
                .with_flight_descriptor(Some(descriptor))
                .build(batches);
            let mut acks = client.do_put(data).await?;
            let mut stored = 0u64;
            while let Some(ack) = acks.next().await {
                let ack: PutAck = serde_json::from_slice(&ack?.app_metadata)?;
                stored = ack.acknowledged_rows;
                bar.set_position(stored);
            }
            Ok(stored as usize)
        } else {
            let descriptor = if command.as_object().is_some_and(|o| o.is_empty()) {
                FlightDescriptor::new_path(vec!["embed".into()])
            } else {
                FlightDescriptor::new_cmd(cmd)
            };
            let data = FlightDataEncoderBuilder::new()
                .with_flight_descriptor(Some(descriptor))
                .build(batches);
            // do_exchange sends on its own task (tonic) while this one reads the replies.
            let mut replies = client.do_exchange(data).await?;
            let mut writer: Option<parquet::arrow::ArrowWriter<std::fs::File>> = None;
            let mut n = 0;
            while let Some(batch) = replies.try_next().await? {
                n += batch.num_rows();
                bar.inc(batch.num_rows() as u64);
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
            Ok(n)
        }
    }
    .await;
    bar.finish_and_clear();
    if let Some(e) = read_error.lock().expect("not poisoned").take() {
        return Err(e.context(format!(
            "reading {} (rows sent before the error: {})",
            args.input.display(),
            read.load(Ordering::Relaxed)
        )));
    }
    let received = outcome?;
    let rows = read.load(Ordering::Relaxed) as usize;
    let skipped = skipped.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let stats: Option<Stats> = keel::flight::client::action(&mut client, "stats", Vec::new())
        .await
        .ok();
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
    if let Some(s) = stats {
        let c = &s.cache.counts;
        eprintln!(
            "keel server: RSS {} MB (peak {} MB), cache {} entries / {} kB of {} kB, hit rate {:.1} %, {} ops",
            s.rss_bytes / 1_000_000,
            s.peak_rss_bytes / 1_000_000,
            c.entries,
            c.bytes / 1000,
            c.max_bytes / 1000,
            s.cache.hit_rate * 100.0,
            s.ops,
        );
    }
    if received != rows {
        bail!("{} rows were sent but {received} came back", rows);
    }
    Ok(())
}
