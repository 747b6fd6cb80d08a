//! `keel produce`: stream a file's records to a Keel server over Arrow Flight.
//!
//! Inputs (see [`keel_client::input`]): VCF / VCF.gz / BCF (annotations parsed into columns, the
//! text made by `--template`), Parquet, Arrow IPC, CSV/TSV (the text from `--text-column`
//! or `--template`, applied by the server), or plain text (one row per line). The file is
//! read on its own thread, batch by batch, and paced by `--rate`; `--exchange` gets the
//! rows back (written to `--out` as Parquet, if given), `--dataset NAME` stores them on
//! the server. Replies are read while batches are written.
//!
//! Long ingests survive the server going away: on a lost connection `keel produce`
//! reconnects with exponential back-off (`--retries`, `--retry-for`) and goes on from the
//! first row the server does not hold: for a dataset the count `GetFlightInfo` reports
//! (rows are stored durably before they are acknowledged), for an exchange the rows whose
//! vectors came back. `--resume` picks up a dataset an earlier run left unfinished, after
//! checking that its rows are this input's first rows.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow_array::{Array, RecordBatch, StringArray};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightClient, Ticket};
use arrow_schema::DataType;
use futures::{StreamExt, TryStreamExt};
use keel_client::input::{self, Format, InputOptions, OnError};
use keel_engine::stats::Stats;
use keel_wire::contract::{PutAck, dataset_descriptor, embed_descriptor};
use keel_wire::descriptor::DatasetTicket;
use keel_wire::text::EmbedCommand;

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
    /// With --dataset: go on with a dataset an earlier run of this input left unfinished:
    /// the rows it holds are checked against the input's first rows, skipped, and the rest
    /// appended. Refused when the dataset was made from other rows.
    #[arg(long, requires = "dataset")]
    resume: bool,
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
    auth: keel_client::flight::ClientAuth,
    /// Seconds to keep retrying the first connection (the server may still be starting).
    #[arg(long, default_value_t = 60)]
    connect_timeout: u64,
    /// When the server goes away mid-stream: reconnect and go on at most this many times
    /// (0: stop at the first loss). Waits 1 s, 2 s, 4 s, ... up to 30 s between attempts.
    #[arg(long, default_value_t = 8)]
    retries: u32,
    /// Stop retrying once this long has passed since the connection was lost (e.g. 90s,
    /// 10m); a restarting server has this long to come back.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    retry_for: Duration,
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

/// Why one attempt at the stream ended early.
enum Stop {
    /// The server went away (connection lost, unavailable): retrying may help.
    Gone(anyhow::Error),
    /// Anything else (a bad input record, a refused request): retrying would not help.
    Fatal(anyhow::Error),
}

/// Whether a Flight error means the server or the connection went away, rather than a
/// request the server refused.
fn server_gone(e: &FlightError) -> bool {
    let FlightError::Tonic(status) = e else {
        return false;
    };
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Cancelled | Code::Aborted => true,
        // A connection cut mid-stream surfaces as an h2 or transport error.
        Code::Unknown | Code::Internal => {
            let m = status.message().to_ascii_lowercase();
            [
                "h2 protocol error",
                "transport error",
                "connection",
                "broken pipe",
                "stream closed",
                "reset",
            ]
            .iter()
            .any(|s| m.contains(s))
        }
        _ => false,
    }
}

/// A person's words for a lost server: "connection lost", or the server's own message
/// when it said it is unavailable (shutting down, overloaded).
fn gone_reason(e: &anyhow::Error) -> String {
    match e.downcast_ref::<FlightError>() {
        Some(FlightError::Tonic(status))
            if status.code() == tonic::Code::Unavailable
                && !status.message().to_ascii_lowercase().contains("transport") =>
        {
            format!("unavailable: {}", status.message())
        }
        _ => "connection lost".to_string(),
    }
}

/// Whether a put was refused because the dataset holds other rows than it expected
/// (`expect_rows`).
fn late_rows(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<FlightError>(),
        Some(FlightError::Tonic(s))
            if s.code() == tonic::Code::FailedPrecondition && s.message().contains("(expect_rows)")
    )
}

fn classify(e: FlightError) -> Stop {
    if server_gone(&e) {
        Stop::Gone(e.into())
    } else {
        Stop::Fatal(e.into())
    }
}

/// Reads the input on a thread of its own, paced by `rate`, into a bounded channel: the
/// file is never in memory whole, and a slow server slows the reading. The first `skip`
/// rows are passed over (the server holds them already). A reader that panics (a
/// malformed file can make a format library do so) ends the channel with an error, never
/// silently: a closed channel without one would read as the end of the input.
fn spawn_reader(
    batches: input::Batches,
    rate: Option<f64>,
    skip: u64,
) -> tokio::sync::mpsc::Receiver<anyhow::Result<RecordBatch>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::Builder::new()
        .name("keel-produce-reader".into())
        .spawn(move || {
            let failed = tx.clone();
            let read = std::panic::AssertUnwindSafe(move || read_into(batches, rate, skip, &tx));
            if let Err(panic) = std::panic::catch_unwind(read) {
                let message = keel_wire::decode::panic_message(&panic);
                let _ = failed.blocking_send(Err(anyhow::anyhow!(
                    "reading the input failed ({message}); the rows after those sent were not read"
                )));
            }
        })
        .expect("spawning the reader thread");
    rx
}

/// [`spawn_reader`]'s loop.
fn read_into(
    mut batches: input::Batches,
    rate: Option<f64>,
    skip: u64,
    tx: &tokio::sync::mpsc::Sender<anyhow::Result<RecordBatch>>,
) {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut to_skip = skip;
    // The last batch passed over whole: when the server holds every row, a zero-row slice
    // of it still opens the stream (schema and descriptor).
    let mut passed_over: Option<RecordBatch> = None;
    let mut sent_any = false;
    for batch in batches.by_ref() {
        let batch = match batch {
            Ok(b) if to_skip > 0 => {
                let n = b.num_rows() as u64;
                if n <= to_skip {
                    to_skip -= n;
                    passed_over = Some(b);
                    continue;
                }
                let rest = b.slice(to_skip as usize, (n - to_skip) as usize);
                to_skip = 0;
                Ok(rest)
            }
            other => other,
        };
        let rows = batch.as_ref().map(|b| b.num_rows() as u64).unwrap_or(0);
        let failed = batch.is_err();
        if tx.blocking_send(batch).is_err() || failed {
            return;
        }
        sent_any = true;
        sent += rows;
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    if to_skip > 0 {
        let _ = tx.blocking_send(Err(anyhow::anyhow!(
            "the input ended {to_skip} rows before the rows the server already holds"
        )));
    } else if !sent_any && let Some(b) = passed_over {
        let _ = tx.blocking_send(Ok(b.slice(0, 0)));
    }
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

/// The wait before retry `attempt` (1-based): 1 s, 2 s, 4 s, ... at most 30 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// Rows the dataset holds (0 when it does not exist yet).
async fn dataset_rows(client: &mut FlightClient, name: &str) -> Result<u64, FlightError> {
    let descriptor = dataset_descriptor(name, &EmbedCommand::default());
    match client.get_flight_info(descriptor).await {
        Ok(info) => Ok(info.total_records.max(0) as u64),
        Err(FlightError::Tonic(s)) if s.code() == tonic::Code::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// One row of a stored dataset, read with a ranged ticket.
async fn stored_row(
    client: &mut FlightClient,
    name: &str,
    row: u64,
) -> anyhow::Result<RecordBatch> {
    let ticket = DatasetTicket {
        dataset: name.to_string(),
        offset: row,
        limit: Some(1),
    };
    let batches: Vec<RecordBatch> = client
        .do_get(Ticket::new(serde_json::to_vec(&ticket)?))
        .await?
        .try_collect()
        .await?;
    batches
        .into_iter()
        .find(|b| b.num_rows() == 1)
        .with_context(|| format!("dataset {name:?} has no row {row}"))
}

/// A cell as text, for comparing an input row with the stored row it became (Parquet may
/// store a column in another Arrow type: a view or dictionary comes back as plain Utf8).
fn cell(column: &dyn Array) -> anyhow::Result<Option<String>> {
    let as_text = arrow_cast::cast(column, &DataType::Utf8)?;
    let strings = as_text
        .as_any()
        .downcast_ref::<StringArray>()
        .context("a Utf8 cast gives strings")?;
    Ok((!strings.is_null(0)).then(|| strings.value(0).to_string()))
}

/// The first column where the stored row differs from the input row, as a message.
fn difference(input: &RecordBatch, stored: &RecordBatch) -> anyhow::Result<Option<String>> {
    for (field, column) in input.schema().fields().iter().zip(input.columns()) {
        let name = field.name();
        let Some(kept) = stored.column_by_name(name) else {
            return Ok(Some(format!("it has no column {name:?}")));
        };
        let (a, b) = (cell(column.as_ref())?, cell(kept.as_ref())?);
        if a != b {
            let show = |v: &Option<String>| {
                v.as_deref()
                    .map_or("null".to_string(), |s| format!("{s:?}"))
            };
            return Ok(Some(format!(
                "its {name} is {} where the input has {}",
                show(&b),
                show(&a)
            )));
        }
    }
    Ok(None)
}

/// `--resume`: checks that the `held` rows of the dataset are the input's first rows
/// (its first and last stored rows against the input's), so that skipping them is right.
async fn check_resume(
    client: &mut FlightClient,
    args: &ProduceArgs,
    opts: &InputOptions,
    name: &str,
    held: u64,
) -> anyhow::Result<()> {
    if held == 0 {
        eprintln!("keel produce: dataset {name:?} holds no rows yet; starting from the first row");
        return Ok(());
    }
    let input = input::open(&args.input, opts)?;
    let (mut first, mut last, mut seen) = (None, None, 0u64);
    for batch in input.batches {
        let batch = batch?;
        let n = batch.num_rows() as u64;
        if first.is_none() && n > 0 {
            first = Some(batch.slice(0, 1));
        }
        if seen + n >= held {
            last = Some(batch.slice((held - 1 - seen) as usize, 1));
            break;
        }
        seen += n;
    }
    let refuse = |why: String| {
        anyhow::anyhow!(
            "cannot resume: dataset {name:?} holds {held} rows that are not the first rows of {}: {why}; \
             store this input under another dataset name, or drop --resume to append to it",
            args.input.display()
        )
    };
    let (Some(first), Some(last)) = (first, last) else {
        return Err(refuse(format!("the input has only {seen} rows")));
    };
    for (row, input_row) in [(0, &first), (held - 1, &last)] {
        let kept = stored_row(client, name, row).await?;
        if let Some(why) = difference(input_row, &kept)? {
            return Err(refuse(format!("stored row {} differs: {why}", row + 1)));
        }
    }
    eprintln!(
        "keel produce: resuming: dataset {name:?} holds the first {held} rows of {}; sending the rest",
        args.input.display()
    );
    Ok(())
}

/// What the attempts share: the rows the server holds (dataset) or returned (exchange)
/// so far, counted from the input's first row.
struct Progress {
    done: Arc<AtomicU64>,
    bar: indicatif::ProgressBar,
}

async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let opts = InputOptions {
        format: args.format,
        rows_per_batch: args.rows_per_batch,
        template: args.template.clone(),
        text_column: args.text_column.clone().unwrap_or_else(|| "text".into()),
        on_error: args.on_error,
    };
    // Opened once up front: a bad file or template fails before anything is sent.
    let first_open = input::open(&args.input, &opts)?;
    let (format, total_rows) = (first_open.format, first_open.total_rows);
    drop(first_open);
    // VCF/BCF texts are rendered here; other inputs name their text to the server.
    let command = match (format.renders_text(), &args.template, &args.text_column) {
        (true, _, _) | (false, None, None) => EmbedCommand::default(),
        (false, Some(t), _) => EmbedCommand {
            template: Some(t.clone()),
            ..Default::default()
        },
        (false, None, Some(c)) => EmbedCommand {
            text_column: Some(c.clone()),
            ..Default::default()
        },
    };
    let mut client = keel_client::flight::connect_with(
        &args.to,
        Duration::from_secs(args.connect_timeout),
        &args.auth,
    )
    .await?;

    // `origin`: the dataset row where this input's first row is (or goes).
    let (origin, resumed) = match &args.dataset {
        Some(name) => {
            let held = dataset_rows(&mut client, name).await?;
            if args.resume {
                check_resume(&mut client, &args, &opts, name, held).await?;
                (0, held)
            } else {
                (held, 0)
            }
        }
        None => (0, 0),
    };
    let progress = Progress {
        done: Arc::new(AtomicU64::new(resumed)),
        bar: progress(total_rows),
    };
    progress.bar.set_position(resumed);
    let started = Instant::now();
    let mut writer: Option<parquet::arrow::ArrowWriter<std::fs::File>> = None;
    let mut attempt = 0u32;
    let mut lost_since: Option<Instant> = None;
    let (skipped, sent_total) = loop {
        let from = progress.done.load(Ordering::Relaxed);
        let input = input::open(&args.input, &opts)?;
        let skipped = input.skipped.clone();
        let read = Arc::new(AtomicU64::new(0));
        let outcome = match &args.dataset {
            Some(name) => {
                // The dataset must hold exactly the rows before this input's `from`th
                // when the put's first part is written: rows of an earlier connection
                // that land late are never followed by the same rows again.
                let command = EmbedCommand {
                    expect_rows: Some(origin + from),
                    ..command.clone()
                };
                put(
                    &mut client,
                    &args,
                    name,
                    &command,
                    input.batches,
                    from,
                    &read,
                    &progress,
                )
                .await
            }
            None => {
                exchange(
                    &mut client,
                    &args,
                    &command,
                    input.batches,
                    from,
                    &read,
                    &progress,
                    &mut writer,
                )
                .await
            }
        };
        let stop = match outcome {
            Ok(()) => break (skipped, from + read.load(Ordering::Relaxed)),
            // After a reconnect: the earlier connection's last part landed after the count
            // was read. Read it again and resend from there.
            Err(Stop::Fatal(e)) if attempt > 0 && late_rows(&e) => e,
            Err(Stop::Fatal(e)) => {
                progress.bar.finish_and_clear();
                let done = progress.done.load(Ordering::Relaxed);
                return Err(e.context(stopped_with(&args, done, total_rows, &mut writer)));
            }
            Err(Stop::Gone(e)) => e,
        };
        tracing::debug!(error = format!("{stop:#}"), "server went away");
        let lost = *lost_since.get_or_insert_with(Instant::now);
        attempt += 1;
        let done = progress.done.load(Ordering::Relaxed);
        let wait = backoff(attempt);
        if attempt > args.retries || lost.elapsed() + wait > args.retry_for {
            progress.bar.finish_and_clear();
            // The transport's own words (h2, hyper) are in the debug log above.
            return Err(anyhow::anyhow!(
                "the server at {} went away ({}; {}); {}",
                args.to,
                gone_reason(&stop),
                if args.retries == 0 {
                    "--retries 0".to_string()
                } else {
                    format!(
                        "gave up after {} attempts in {:.0} s",
                        attempt - 1,
                        lost.elapsed().as_secs_f64()
                    )
                },
                stopped_with(&args, done, total_rows, &mut writer)
            ));
        }
        progress.bar.suspend(|| {
            eprintln!(
                "keel produce: server at {} went away after {done} rows were {}; retrying in {} s (attempt {attempt}/{})",
                args.to,
                if args.dataset.is_some() { "stored" } else { "returned" },
                wait.as_secs(),
                args.retries
            )
        });
        tokio::time::sleep(wait).await;
        let budget = args
            .retry_for
            .saturating_sub(lost.elapsed())
            .max(Duration::from_secs(1));
        client = match keel_client::flight::connect_with(&args.to, budget, &args.auth).await {
            Ok(c) => c,
            Err(e) => {
                progress.bar.finish_and_clear();
                return Err(e.context(stopped_with(&args, done, total_rows, &mut writer)));
            }
        };
        if let Some(name) = &args.dataset {
            // The server's count decides: rows it stored but could not acknowledge are
            // not sent twice, rows it acknowledged are never sent again.
            let held = match dataset_rows(&mut client, name).await {
                Ok(n) => n,
                Err(e) => {
                    progress.bar.finish_and_clear();
                    return Err(anyhow::Error::from(e).context(stopped(&args, done, total_rows)));
                }
            };
            if held < origin + done {
                bail!(
                    "dataset {name:?} holds {held} rows, fewer than the {} acknowledged: was it removed while this ran?",
                    origin + done
                );
            }
            progress.done.store(held - origin, Ordering::Relaxed);
            progress.bar.set_position(held - origin);
        }
        // Success resets the clock: the next loss gets the whole budget again.
        lost_since = None;
    };
    progress.bar.finish_and_clear();
    if let Some(w) = writer {
        w.close()?;
    }
    let done = progress.done.load(Ordering::Relaxed);
    let skipped = skipped.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let stats: Option<Stats> = keel_client::flight::action(&mut client, "stats", Vec::new())
        .await
        .ok();
    let this_run = done.saturating_sub(resumed);
    eprintln!(
        "keel produce: {done} of {sent_total} rows {}{} in {secs:.2} s ({:.0} rows/s); {skipped} input records skipped{}",
        if args.dataset.is_some() {
            "stored"
        } else {
            "embedded and returned"
        },
        if resumed > 0 {
            format!(" ({resumed} by an earlier run)")
        } else {
            String::new()
        },
        if secs > 0.0 {
            this_run as f64 / secs
        } else {
            0.0
        },
        if attempt > 0 {
            format!(
                "; the server went away {attempt} time{} and the stream went on",
                if attempt == 1 { "" } else { "s" }
            )
        } else {
            String::new()
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
    if done != sent_total {
        bail!(
            "{sent_total} rows were read but {done} are {}",
            if args.dataset.is_some() {
                "stored"
            } else {
                "back"
            }
        );
    }
    Ok(())
}

/// [`stopped`], after finishing the `--out` file of the rows that came back (a Parquet
/// file is unreadable until its footer is written): what the message says is there.
fn stopped_with(
    args: &ProduceArgs,
    done: u64,
    total: Option<u64>,
    writer: &mut Option<parquet::arrow::ArrowWriter<std::fs::File>>,
) -> String {
    match writer.take().map(|w| w.close()) {
        Some(Err(e)) => format!(
            "stopped: {done} rows came back, but finishing {} failed: {e}",
            args.out
                .as_ref()
                .map_or("the output file".into(), |o| o.display().to_string())
        ),
        _ => stopped(args, done, total),
    }
}

/// "stopped: N of M rows stored; run again with --resume".
fn stopped(args: &ProduceArgs, done: u64, total: Option<u64>) -> String {
    let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
    match &args.dataset {
        Some(name) => format!(
            "stopped: {done}{of} rows stored in dataset {name:?}; run the same command with --resume to send the rest"
        ),
        None => format!(
            "stopped: {done}{of} rows came back{}",
            args.out
                .as_ref()
                .map(|o| format!(" and are in {}", o.display()))
                .unwrap_or_default()
        ),
    }
}

/// The input's batches from row `from` on, counted into `read` as Flight takes them; a
/// read error ends the stream and is kept for the report.
fn flight_batches(
    args: &ProduceArgs,
    batches: input::Batches,
    from: u64,
    read: &Arc<AtomicU64>,
    read_error: &Arc<std::sync::Mutex<Option<anyhow::Error>>>,
) -> impl futures::Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static {
    let (read, read_error) = (read.clone(), read_error.clone());
    tokio_stream::wrappers::ReceiverStream::new(spawn_reader(batches, args.rate, from)).map(
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
}

fn read_failure(args: &ProduceArgs, error: anyhow::Error, from: u64, read: u64) -> Stop {
    Stop::Fatal(error.context(format!(
        "reading {} (rows sent before the error: {})",
        args.input.display(),
        from + read
    )))
}

#[allow(clippy::too_many_arguments)]
async fn put(
    client: &mut FlightClient,
    args: &ProduceArgs,
    name: &str,
    command: &EmbedCommand,
    batches: input::Batches,
    from: u64,
    read: &Arc<AtomicU64>,
    progress: &Progress,
) -> Result<(), Stop> {
    let read_error = Arc::new(std::sync::Mutex::new(None));
    let descriptor = dataset_descriptor(name, command);
    let data = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor))
        .build(flight_batches(args, batches, from, read, &read_error));
    let result: Result<(), FlightError> = async {
        let mut acks = client.do_put(data).await?;
        while let Some(ack) = acks.next().await {
            let ack: PutAck = serde_json::from_slice(&ack?.app_metadata)
                .map_err(|e| FlightError::ProtocolError(format!("a DoPut acknowledgement: {e}")))?;
            progress
                .done
                .store(from + ack.acknowledged_rows, Ordering::Relaxed);
            progress.bar.set_position(from + ack.acknowledged_rows);
        }
        Ok(())
    }
    .await;
    if let Some(e) = read_error.lock().expect("not poisoned").take() {
        return Err(read_failure(args, e, from, read.load(Ordering::Relaxed)));
    }
    result.map_err(classify)
}

#[allow(clippy::too_many_arguments)]
async fn exchange(
    client: &mut FlightClient,
    args: &ProduceArgs,
    command: &EmbedCommand,
    batches: input::Batches,
    from: u64,
    read: &Arc<AtomicU64>,
    progress: &Progress,
    writer: &mut Option<parquet::arrow::ArrowWriter<std::fs::File>>,
) -> Result<(), Stop> {
    let read_error = Arc::new(std::sync::Mutex::new(None));
    let descriptor = embed_descriptor(command);
    let data = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor))
        .build(flight_batches(args, batches, from, read, &read_error));
    let result: Result<(), Stop> = async {
        // do_exchange sends on its own task (tonic) while this one reads the replies.
        let mut replies = client.do_exchange(data).await.map_err(classify)?;
        while let Some(batch) = replies.try_next().await.map_err(classify)? {
            if let Some(out) = &args.out {
                if writer.is_none() {
                    let file = std::fs::File::create(out)
                        .with_context(|| format!("creating {}", out.display()))
                        .map_err(Stop::Fatal)?;
                    *writer = Some(
                        parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)
                            .map_err(|e| Stop::Fatal(e.into()))?,
                    );
                }
                writer
                    .as_mut()
                    .expect("created above")
                    .write(&batch)
                    .map_err(|e| Stop::Fatal(e.into()))?;
            }
            // Counted once written: a retry resends exactly the rows not yet written.
            progress
                .done
                .fetch_add(batch.num_rows() as u64, Ordering::Relaxed);
            progress.bar.inc(batch.num_rows() as u64);
        }
        Ok(())
    }
    .await;
    if let Some(e) = read_error.lock().expect("not poisoned").take() {
        return Err(read_failure(args, e, from, read.load(Ordering::Relaxed)));
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array, RecordBatch};

    use super::spawn_reader;

    /// A reader that panics after its first batch ends the channel with an error naming
    /// the failure, not with a silent end that would read as the end of the input.
    #[test]
    fn a_reader_that_panics_ends_with_an_error_not_a_silent_end() {
        let batch = RecordBatch::try_from_iter([(
            "id",
            Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef,
        )])
        .unwrap();
        let mut first = Some(batch);
        let batches = Box::new(std::iter::from_fn(move || match first.take() {
            Some(b) => Some(Ok(b)),
            None => panic!("a buffer offset past the message body"),
        }));
        let mut rx = spawn_reader(batches, None, 0);
        let got: Vec<_> = std::iter::from_fn(|| rx.blocking_recv()).collect();
        assert_eq!(got.len(), 2, "the batch, then the error");
        assert_eq!(got[0].as_ref().unwrap().num_rows(), 2);
        let error = got[1].as_ref().unwrap_err().to_string();
        assert!(
            error.contains("reading the input failed") && error.contains("buffer offset"),
            "{error}"
        );
    }
}
