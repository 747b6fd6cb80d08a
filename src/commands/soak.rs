//! `keel soak`: the soak benchmark — drive an engine for a number of ops or a duration,
//! sample its memory, and write a verdict with its figures and a picture.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_client::soak::workload::Workload;
use keel_client::soak::{SoakOptions, report};
use keel_server::config::Settings;

use crate::ConfigArgs;

#[derive(clap::Args)]
pub struct SoakArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Stop after this many ops (micro-batches).
    #[arg(long, conflicts_with = "duration")]
    ops: Option<u64>,
    /// Stop after this long: 90s, 5m, 1h, 24h (default 2m when --ops is not given).
    #[arg(long)]
    duration: Option<String>,
    /// Rows per second over all producers (default: as fast as the engine takes them).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, value_enum, default_value = "mixed")]
    workload: Workload,
    /// Texts to draw from: VCF (rendered with the variant template), Parquet (column
    /// `text`) or a text file (one per line).
    #[arg(long, default_value = "data/test-haploidX.vcf")]
    input: PathBuf,
    /// Drive a running engine instead of starting one here.
    #[arg(long)]
    target: Option<String>,
    /// Folder for samples.csv (written as the run goes), report.json, memory.png, report.md.
    #[arg(long, default_value = "reports/soak")]
    report: PathBuf,
    /// Concurrent producer streams.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Rows per record batch.
    #[arg(long, default_value_t = 100)]
    batch_rows: usize,
    /// Ops excluded from the memory figures: start-up, and the allocator's thread caches
    /// and arenas reaching their working size (RSS plateaus after ≈ 2000 ops here).
    #[arg(long, default_value_t = 2000)]
    warmup_ops: u64,
    /// Every this many ops after warm-up, hold the producers until nothing is in flight
    /// and take a settled memory reading; growth and creep are judged on those (0 = off).
    #[arg(long, default_value_t = 500)]
    settle_every: u64,
    /// Also measure throughput against an engine whose supervisor does not act: two
    /// rounds of this many seconds each, interleaved (0 = skip).
    #[arg(long, default_value_t = 0)]
    compare_secs: u64,
    /// Every this many ops after warm-up, at a settled reading, write a jemalloc heap
    /// profile into the report folder (needs _RJEM_MALLOC_CONF=prof:true; 0 = never).
    #[arg(long, default_value_t = 0)]
    heap_profile_every: u64,
    /// Continue the run whose samples.csv is in the report folder (an interrupted one):
    /// a fresh engine runs what is left of --ops or --duration, and the report covers every
    /// segment. Starts a new run when the folder has none.
    #[arg(long)]
    resume: bool,
}

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(s.trim())
        .with_context(|| format!("bad duration {s:?} (use 90s, 5m, 1h, 24h)"))
}

pub fn run(args: SoakArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.config.as_deref())?;
    let duration = match (&args.duration, args.ops) {
        (Some(d), _) => Some(parse_duration(d)?),
        (None, None) => Some(Duration::from_secs(120)),
        (None, Some(_)) => None,
    };
    if args.streams == 0 || args.batch_rows == 0 {
        bail!("--streams and --batch-rows must be at least 1");
    }
    if args.heap_profile_every > 0 && args.target.is_none() {
        if !keel_engine::memory::allocator::profiling() {
            bail!(
                "--heap-profile-every needs jemalloc's profiling: run with _RJEM_MALLOC_CONF=prof:true \
                 (e.g. _RJEM_MALLOC_CONF=prof:true,lg_prof_sample:18 keel soak ...)"
            );
        }
        let dir = std::path::absolute(args.report.join("heap"))?;
        settings.memory.heap_profile_dir.get_or_insert(dir);
    }
    let resuming = args.resume && args.report.join("samples.csv").exists();
    let mut log = if resuming {
        keel_client::soak::log::SampleLog::resume(&args.report)?
    } else {
        keel_client::soak::log::SampleLog::create(&args.report)?
    };
    let done = log.offsets;
    // What is left of the run.
    let duration = duration.map(|d| d.saturating_sub(Duration::from_secs_f64(done.t_s)));
    if resuming {
        let left = match (duration, args.ops) {
            (Some(d), _) => !d.is_zero(),
            (None, Some(n)) => n > done.ops,
            (None, None) => true,
        };
        if !left {
            let verdict = std::fs::read(args.report.join("report.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|j| j["verdict"].as_str().map(str::to_string));
            match verdict.as_deref() {
                Some("pass") => {
                    eprintln!(
                        "keel soak: the run in {} is complete: PASS",
                        args.report.display()
                    );
                    return Ok(());
                }
                Some(v) => bail!("the run in {} is complete: {v}", args.report.display()),
                None => bail!(
                    "the run in {} reached its end without a report; remove the folder to start over",
                    args.report.display()
                ),
            }
        }
        eprintln!(
            "keel soak: resuming {} at {:.0} s, {} ops (segment {})",
            args.report.display(),
            done.t_s,
            done.ops,
            done.segment
        );
    }
    let opts = SoakOptions {
        ops: args.ops,
        duration,
        rate: args.rate,
        workload: args.workload,
        texts: keel_client::input::load_texts(&args.input)?,
        streams: args.streams,
        batch_rows: args.batch_rows,
        warmup_ops: args.warmup_ops,
        settle_every: args.settle_every,
        compare_secs: args.compare_secs,
        heap_profile_every: args.heap_profile_every,
        progress: std::io::stderr().is_terminal(),
    };
    let model_dir = &settings.embedder.model_dir;
    let model_bytes = std::fs::metadata(model_dir.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    // The memory bound is the model's own: its widths, heads and longest sequence.
    let spec = keel_model::ModelSpec::from_dir(model_dir).with_context(|| {
        format!(
            "reading the model's configuration in {}",
            model_dir.display()
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let observed = runtime.block_on(keel_client::soak::run(
        &settings,
        args.target.as_deref(),
        &opts,
        &mut log,
    ))?;
    let report = report::build(
        &observed,
        &settings,
        args.workload,
        args.warmup_ops,
        model_bytes,
        &spec,
    );
    report::write(&args.report, &observed, &report, args.warmup_ops)?;
    for c in &report.checks {
        let verdict = match c.pass {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "    ",
        };
        let value = c
            .value
            .map(|v| format!("{v:.4} {}", c.unit))
            .unwrap_or_else(|| "not reached".into());
        eprintln!(
            "{verdict}  {:<52} {:<24} floor {:<24} target {}",
            c.name, value, c.threshold, c.target
        );
    }
    eprintln!(
        "keel soak: {} — {:.0} s, {} rows ({:.0} rows/s); report in {}",
        if report.passed() { "PASS" } else { "FAIL" },
        observed.elapsed.as_secs_f64(),
        observed.rows_sent,
        observed.rows_sent as f64 / observed.elapsed.as_secs_f64().max(1e-9),
        args.report.display()
    );
    if !report.passed() {
        bail!("the soak run failed at least one criterion");
    }
    Ok(())
}
