//! `keel soak`: drive an engine with real Flight producers, sample its memory, and judge.
//!
//! The engine runs in this process (or elsewhere, `--target`); `streams` producers send
//! a workload's rows through `DoExchange` and read the replies; a sampler calls the
//! `stats` action every tick and writes every sample to `samples.csv` ([`log`]) as it
//! goes. When the run ends (`ops` or `duration`), [`report`] reads the samples back,
//! computes the figures, checks them against the targets and writes the report folder.

pub mod log;
pub mod report;
pub mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_flight::FlightClient;
use arrow_flight::encode::FlightDataEncoderBuilder;
use futures::TryStreamExt;
use keel_engine::cleanup::CleanupRecord;
use keel_engine::stats::Stats;
use keel_wire::contract::embed_descriptor;
use keel_wire::text::EmbedCommand;
use serde::Serialize;

use keel_server::config::Settings;
use log::{SampleLog, SeenCleanup};
use workload::{Generator, Workload};

/// One reading of the engine's figures (a line of `samples.csv`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    /// 0, then one more for each resumption of an interrupted run (a fresh engine).
    pub segment: u32,
    pub t_s: f64,
    pub ops: u64,
    pub rows: u64,
    pub rss: u64,
    pub allocated: u64,
    pub resident: u64,
    pub cache_bytes: u64,
    pub in_flight_rows: u64,
    pub cleanups: u64,
    /// GPU memory pool: bytes reserved from the driver and in use (0 without a GPU).
    pub device_reserved: u64,
    pub device_in_use: u64,
}

pub struct SoakOptions {
    pub ops: Option<u64>,
    pub duration: Option<Duration>,
    pub rate: Option<f64>,
    pub workload: Workload,
    pub texts: Vec<String>,
    pub streams: usize,
    pub batch_rows: usize,
    pub warmup_ops: u64,
    /// Every this many ops after warm-up, hold the producers until nothing is in flight and
    /// sample the engine settled (0 = never).
    pub settle_every: u64,
    /// Seconds per segment of the throughput comparison with the supervisor's actions off
    /// (0 = no comparison).
    pub compare_secs: u64,
    /// Every this many ops after warm-up, at a settled reading, have the engine write a
    /// jemalloc heap profile (the `heap-profile` action; 0 = never).
    pub heap_profile_every: u64,
    pub progress: bool,
}

/// A burst's memory: RSS less the cache's bytes (the cache may keep what a burst added, up
/// to its budget; an idle cleanup evicts nothing) before it, at its peak, and after the
/// idle spell that follows.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Burst {
    pub before: u64,
    pub peak: u64,
    pub after: u64,
}

/// Memory a burst should give back: RSS less the cache's (bounded, kept) entries.
fn transient(s: &Sample) -> u64 {
    s.rss.saturating_sub(s.cache_bytes)
}

/// Everything a run observed (all segments of a resumed one).
pub struct Observed {
    pub samples: Vec<Sample>,
    /// Samples taken with producers held and nothing in flight: memory that the work in
    /// flight does not blur (the one with the least allocated of a few readings each).
    pub settled: Vec<Sample>,
    pub cleanups: Vec<SeenCleanup>,
    /// Heap profiles written during this segment: (ops, path).
    pub heap_profiles: Vec<(u64, String)>,
    pub bursts: Vec<Burst>,
    pub final_stats: Stats,
    pub elapsed: Duration,
    pub rows_sent: u64,
    /// rows/s with the supervisor acting, and with it off, segment by segment.
    pub compare: Option<(Vec<f64>, Vec<f64>)>,
}

async fn stats(client: &mut FlightClient) -> anyhow::Result<Stats> {
    crate::flight::action(client, "stats", Vec::new()).await
}

/// Has the engine write a heap profile; returns its path.
async fn heap_profile(client: &mut FlightClient) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Written {
        path: String,
    }
    let w: Written = crate::flight::action(client, "heap-profile", Vec::new()).await?;
    Ok(w.path)
}

fn sample_of(s: &Stats, started: Instant) -> Sample {
    Sample {
        segment: 0,
        t_s: started.elapsed().as_secs_f64(),
        ops: s.ops,
        rows: s.rows,
        rss: s.rss_bytes,
        allocated: s.memory.allocated_bytes,
        resident: s.memory.resident_bytes,
        cache_bytes: s.cache.counts.bytes,
        in_flight_rows: s.in_flight_rows,
        cleanups: s.cleanups.total,
        device_reserved: s.embedder.device_memory.map_or(0, |m| m.reserved_bytes),
        device_in_use: s.embedder.device_memory.map_or(0, |m| m.in_use_bytes),
    }
}

/// Producers send until `stop`; `long` switches the burst workload to long texts and
/// `paused` holds them (idle spells).
struct Control {
    stop: AtomicBool,
    long: AtomicBool,
    paused: AtomicBool,
    rows: AtomicU64,
}

async fn producer(
    mut client: FlightClient,
    control: Arc<Control>,
    mut generator: Generator,
    workload: Workload,
    batch_rows: usize,
    rows_per_s: Option<f64>,
) -> anyhow::Result<()> {
    // Short streams, so that a stop or a pause takes effect within seconds.
    const BATCHES_PER_STREAM: usize = 4;
    let started = Instant::now();
    while !control.stop.load(Ordering::Relaxed) {
        if control.paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let long = control.long.load(Ordering::Relaxed);
        // Long texts cost about ten times as much each: send fewer per batch.
        let rows = if long {
            (batch_rows / 8).max(1)
        } else {
            batch_rows
        };
        let batches: Vec<RecordBatch> = (0..BATCHES_PER_STREAM)
            .map(|_| {
                let texts = generator.batch(workload, rows, long);
                RecordBatch::try_from_iter([(
                    "text",
                    Arc::new(StringArray::from(texts)) as ArrayRef,
                )])
            })
            .collect::<Result<_, _>>()?;
        let n: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let input = FlightDataEncoderBuilder::new()
            .with_flight_descriptor(Some(embed_descriptor(&EmbedCommand::default())))
            .build(futures::stream::iter(batches.into_iter().map(Ok)));
        let replies = client.do_exchange(input).await?;
        let got: usize = replies
            .map_ok(|b| b.num_rows())
            .try_collect::<Vec<_>>()
            .await?
            .iter()
            .sum();
        anyhow::ensure!(got as u64 == n, "sent {n} rows, got {got} back");
        let total = control.rows.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(rate) = rows_per_s {
            let due = Duration::from_secs_f64(total as f64 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(())
}

/// Holds the producers until the engine has nothing in flight and its op count stands
/// still, then returns the reading with the least allocated of three (and, with
/// `profile`, the path of a heap profile taken while they are still held).
async fn settle(
    probe: &mut FlightClient,
    control: &Control,
    started: Instant,
    profile: bool,
) -> anyhow::Result<(Option<Sample>, Option<String>)> {
    const POLL: Duration = Duration::from_millis(50);
    control.paused.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_ops = u64::MAX;
    let settled = loop {
        tokio::time::sleep(POLL).await;
        let s = sample_of(&stats(probe).await?, started);
        if s.in_flight_rows == 0 && s.ops == last_ops {
            break true;
        }
        last_ops = s.ops;
        if Instant::now() >= deadline {
            break false;
        }
    };
    let mut best: Option<Sample> = None;
    if settled {
        for _ in 0..3 {
            tokio::time::sleep(POLL).await;
            let s = sample_of(&stats(probe).await?, started);
            if best.is_none_or(|b| s.allocated < b.allocated) {
                best = Some(s);
            }
        }
    }
    let path = if settled && profile {
        Some(heap_profile(probe).await?)
    } else {
        None
    };
    control.paused.store(false, Ordering::Relaxed);
    Ok((best, path))
}

/// Runs producers against `addr` until `until` says stop; samples every `tick`.
/// With `log`, every sample goes to `samples.csv` (and none is kept here).
async fn drive(
    addr: &str,
    opts: &SoakOptions,
    tick: Duration,
    recovery_window: Duration,
    mut log: Option<&mut SampleLog>,
) -> anyhow::Result<Observed> {
    let mut probe = crate::flight::connect(addr, Duration::ZERO).await?;
    let control = Arc::new(Control {
        stop: AtomicBool::new(false),
        long: AtomicBool::new(false),
        paused: AtomicBool::new(opts.workload == Workload::Burst),
        rows: AtomicU64::new(0),
    });
    let base = opts.texts.clone();
    let mut producers = Vec::new();
    for i in 0..opts.streams {
        let client = crate::flight::connect(addr, Duration::ZERO).await?;
        // Producers pace themselves on the rows all of them have sent: each gets the
        // whole rate, not a share of it.
        let rate = opts.rate;
        producers.push(tokio::spawn(producer(
            client,
            control.clone(),
            Generator::new(base.clone(), 0x5eed + i as u64 * 7919),
            opts.workload,
            opts.batch_rows,
            rate,
        )));
    }
    let ops_before = log.as_ref().map_or(0, |l| l.offsets.ops);
    let started = Instant::now();
    let mut settled = Vec::new();
    let mut next_settle = opts.warmup_ops;
    let mut next_profile = opts.warmup_ops.max(opts.heap_profile_every);
    let mut heap_profiles = Vec::new();
    let mut cleanups: Vec<SeenCleanup> = Vec::new();
    let mut last_cleanup_at = 0u64;
    let mut bursts = Vec::new();
    // Burst cycle: (phase start, phase): 0 = before (idle), 1 = burst, 2 = recovering.
    let mut phase = (Instant::now(), 0u8);
    let mut burst = Burst {
        before: 0,
        peak: 0,
        after: 0,
    };
    let (mut last_ops, mut last_ops_change) = (0u64, Instant::now());
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let s = stats(&mut probe).await?;
        // `sample`: this engine's counters, which pace the run; `logged`: with the
        // earlier segments' totals added.
        let sample = sample_of(&s, started);
        let new: Vec<CleanupRecord> = s
            .cleanups
            .recent
            .iter()
            .filter(|c| c.at_ms > last_cleanup_at)
            .cloned()
            .collect();
        last_cleanup_at = new.iter().map(|c| c.at_ms).max().unwrap_or(last_cleanup_at);
        if let Some(log) = log.as_deref_mut() {
            let logged = log.offset(sample);
            cleanups.extend(log.write(&logged, false, &new, None)?);
        }
        if opts.workload == Workload::Burst {
            let in_phase = phase.0.elapsed();
            match phase.1 {
                0 if in_phase >= recovery_window + Duration::from_secs(1) => {
                    burst = Burst {
                        before: transient(&sample),
                        peak: transient(&sample),
                        after: 0,
                    };
                    control.long.store(true, Ordering::Relaxed);
                    control.paused.store(false, Ordering::Relaxed);
                    phase = (Instant::now(), 1);
                }
                1 => {
                    burst.peak = burst.peak.max(transient(&sample));
                    if in_phase >= Duration::from_secs(8) {
                        control.paused.store(true, Ordering::Relaxed);
                        control.long.store(false, Ordering::Relaxed);
                        phase = (Instant::now(), 2);
                    }
                }
                2 => {
                    burst.peak = burst.peak.max(transient(&sample));
                    // Producers finish the stream they are in after the pause: wait until
                    // ops have stood still long enough for the supervisor's idle cleanup.
                    if sample.ops != last_ops {
                        last_ops = sample.ops;
                        last_ops_change = Instant::now();
                    }
                    let quiet = last_ops_change.elapsed();
                    if in_phase >= Duration::from_secs(1)
                        && quiet >= recovery_window + Duration::from_millis(1500)
                        && sample.in_flight_rows == 0
                    {
                        burst.after = transient(&sample);
                        bursts.push(burst);
                        phase = (Instant::now(), 0);
                    }
                }
                _ => {}
            }
        }
        if opts.progress && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprint!(
                "\r\x1b[Kops {:>8}  rows/s {:>8.0}  RSS {:>6.1} MB  cache hit {:>5.1} %  cleanups {}",
                sample.ops,
                sample.rows as f64 / secs.max(1e-9),
                sample.rss as f64 / 1e6,
                s.cache.hit_rate * 100.0,
                sample.cleanups
            );
        }
        if opts.settle_every > 0 && opts.workload != Workload::Burst && sample.ops >= next_settle {
            // Heap profiles are taken there: producers held, nothing in flight.
            let due = opts.heap_profile_every > 0 && sample.ops >= next_profile;
            let (reading, profile) = settle(&mut probe, &control, started, due).await?;
            if let Some(path) = &profile {
                next_profile = sample.ops + opts.heap_profile_every;
                heap_profiles.push((ops_before + sample.ops, path.clone()));
            }
            if let Some(s) = reading
                && let Some(log) = log.as_deref_mut()
            {
                let logged = log.offset(s);
                log.write(&logged, true, &[], profile.as_deref())?;
                settled.push(logged);
            }
            next_settle = sample.ops.max(next_settle) + opts.settle_every;
        }
        let done_ops = opts.ops.is_some_and(|n| sample.ops + ops_before >= n);
        let done_time = opts.duration.is_some_and(|d| started.elapsed() >= d);
        if producers.iter().any(|p| p.is_finished()) || done_ops || done_time {
            break;
        }
    }
    control.stop.store(true, Ordering::Relaxed);
    control.paused.store(false, Ordering::Relaxed);
    for p in producers {
        p.await.context("a producer panicked")??;
    }
    if opts.progress {
        eprintln!();
    }
    let elapsed = started.elapsed();
    let final_stats = stats(&mut probe).await?;
    Ok(Observed {
        samples: Vec::new(),
        settled,
        cleanups,
        heap_profiles,
        bursts,
        final_stats,
        elapsed,
        rows_sent: control.rows.load(Ordering::Relaxed),
        compare: None,
    })
}

/// Rows/s of a short segment against `addr`.
async fn segment(addr: &str, opts: &SoakOptions, secs: u64) -> anyhow::Result<f64> {
    let seg = SoakOptions {
        ops: None,
        duration: Some(Duration::from_secs(secs)),
        rate: opts.rate,
        workload: if opts.workload == Workload::Burst {
            Workload::Mixed
        } else {
            opts.workload
        },
        texts: opts.texts.clone(),
        streams: opts.streams,
        batch_rows: opts.batch_rows,
        warmup_ops: 0,
        settle_every: 0,
        compare_secs: 0,
        heap_profile_every: 0,
        progress: false,
    };
    let o = drive(
        addr,
        &seg,
        Duration::from_millis(250),
        Duration::from_secs(1),
        None,
    )
    .await?;
    Ok(o.rows_sent as f64 / o.elapsed.as_secs_f64())
}

/// Runs a soak (or the rest of an interrupted one: `log` resumed), writing its samples to
/// `log`; returns every segment's samples, read back. With `target` None the engine is
/// started here from `settings`.
pub async fn run(
    settings: &Settings,
    target: Option<&str>,
    opts: &SoakOptions,
    log: &mut SampleLog,
) -> anyhow::Result<Observed> {
    let mut observed = run_segment(settings, target, opts, log).await?;
    let (samples, settled, cleanups) = log::read(log.path())?;
    observed.samples = samples;
    observed.settled = settled;
    observed.cleanups = cleanups;
    observed.elapsed += Duration::from_secs_f64(log.offsets.t_s);
    observed.rows_sent += log.offsets.rows;
    Ok(observed)
}

async fn run_segment(
    settings: &Settings,
    target: Option<&str>,
    opts: &SoakOptions,
    log: &mut SampleLog,
) -> anyhow::Result<Observed> {
    let tick = Duration::from_millis(settings.supervisor.interval_ms.max(100));
    let recovery = Duration::from_millis(settings.memory.recovery_window_ms);
    if let Some(addr) = target {
        return drive(addr, opts, tick, recovery, Some(log)).await;
    }
    let (addr, stop, done) = start_engine(settings.clone()).await?;
    let mut observed = drive(&addr, opts, tick, recovery, Some(log)).await;
    let _ = stop.send(());
    done.await??;
    if let (Ok(o), true) = (&mut observed, opts.compare_secs > 0) {
        // Throughput with and without the supervisor's actions: two fresh engines, the
        // same rows (segments replay one sequence), one unmeasured warm-up segment each,
        // then measured segments interleaved.
        let mut quiet = settings.clone();
        quiet.supervisor.act = false;
        let (addr_a, stop_a, done_a) = start_engine(settings.clone()).await?;
        let (addr_b, stop_b, done_b) = start_engine(quiet).await?;
        segment(&addr_a, opts, opts.compare_secs).await?;
        segment(&addr_b, opts, opts.compare_secs).await?;
        // ABBA order: throughput drifts up as caches warm, which a fixed order would
        // credit to whichever engine always goes second.
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for round in 0..2 {
            if round % 2 == 0 {
                on.push(segment(&addr_a, opts, opts.compare_secs).await?);
                off.push(segment(&addr_b, opts, opts.compare_secs).await?);
            } else {
                off.push(segment(&addr_b, opts, opts.compare_secs).await?);
                on.push(segment(&addr_a, opts, opts.compare_secs).await?);
            }
        }
        o.compare = Some((on, off));
        let _ = stop_a.send(());
        let _ = stop_b.send(());
        done_a.await??;
        done_b.await??;
    }
    observed
}

type Done = tokio::task::JoinHandle<anyhow::Result<()>>;

async fn start_engine(
    settings: Settings,
) -> anyhow::Result<(String, tokio::sync::oneshot::Sender<()>, Done)> {
    let running = tokio::task::spawn_blocking(move || keel_server::app::start(settings)).await??;
    let listener = keel_server::app::bind("127.0.0.1:0".parse()?).await?;
    let addr = format!("grpc://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(running.serve(listener, None, async {
        let _ = stopped.await;
    }));
    Ok((addr, stop, done))
}
