//! `keel embed`: texts on stdin, one JSON object per line on stdout.
//!
//! Streams: stdin is read in chunks of [`CHUNK_LINES`] lines, each chunk embedded by the
//! engine's embedder workers (the same scheduler `keel serve` uses: length-planned passes
//! on one replica per worker) and written out before the next is read, so memory stays
//! bounded whatever the input size. Output order is input order; an empty line is an
//! empty text. `--rounds N` (benchmarks) holds the whole input and embeds it N times,
//! timing the last round.

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use keel_engine::embedder::config::Backends;
use keel_engine::embedder::workers::EmbedderWorkers;
use keel_engine::memory::rss_bytes;
use keel_model::{Backend, Precision};

use crate::ConfigArgs;
use keel_server::config::Settings;

/// Lines embedded together: enough to sort by length and keep every replica busy.
const CHUNK_LINES: usize = 2048;

#[derive(clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Model folder (overrides embedder.model_dir).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the model runs: cpu, wgpu, vulkan, both or auto (overrides embedder.backend).
    #[arg(long)]
    backend: Option<Backends>,
    /// Most texts in one forward pass (overrides embedder.cpu.max_batch_rows and
    /// embedder.gpu.max_batch_rows).
    #[arg(long)]
    batch: Option<usize>,
    /// Most padded tokens in one GPU pass (overrides embedder.gpu.max_batch_tokens).
    #[arg(long)]
    gpu_batch_tokens: Option<usize>,
    /// CPU model replicas (overrides embedder.cpu.workers; 0 = one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// What the model computes in: f32; bf16 or int8 on the CPU; f16 on the GPU (overrides
    /// embedder.cpu.precision and/or embedder.gpu.precision, for the backends in use that
    /// run it).
    #[arg(long)]
    precision: Option<Precision>,
    /// Embed the input this many times in one process and report the last round (for
    /// benchmarks: with `embedder.gpu.warm_up` off, the first round compiles the GPU
    /// kernels of exactly the pass shapes this input meets, and the last runs warm).
    /// Above 1, stdin is read whole before the first round; the vectors are written once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.config.as_deref())?;
    if let Some(model) = args.model {
        settings.embedder.model_dir = model;
    }
    let e = &mut settings.embedder;
    if let Some(backend) = args.backend {
        e.backend = backend;
    }
    let choice = e.resolve_backend();
    if choice.configured == Backends::Auto {
        tracing::info!(picked = choice.picked.name(), why = %choice.why, "backend: auto");
    }
    if let Some(batch) = args.batch {
        e.cpu.max_batch_rows = batch;
        e.gpu.max_batch_rows = batch;
    }
    if let Some(tokens) = args.gpu_batch_tokens {
        e.gpu.max_batch_tokens = tokens;
    }
    if let Some(workers) = args.workers {
        e.cpu.workers = workers;
    }
    if let Some(precision) = args.precision {
        let (cpu, gpu) = (e.uses_cpu(), e.uses_gpu());
        let mut applied = false;
        if cpu && precision.runs_on(Backend::Cpu) {
            e.cpu.precision = precision;
            applied = true;
        }
        if gpu && precision.runs_on(e.gpu_backend()) {
            e.gpu.precision = precision;
            applied = true;
        }
        if !applied {
            bail!(
                "--precision {}: no backend in use computes in it (cpu: f32, bf16, int8; wgpu, vulkan: f32, f16)",
                precision.name()
            );
        }
    }
    settings.validate()?;
    let cfg = &settings.embedder;

    if !cfg.model_dir.join("model.safetensors").exists() {
        bail!(
            "no model in {} (run scripts/fetch-model.sh, or pass --model DIR)",
            cfg.model_dir.display()
        );
    }
    let started = Instant::now();
    let groups = cfg
        .load_models()
        .with_context(|| format!("loading the model from {}", cfg.model_dir.display()))?;
    let workers = cfg.effective_workers();
    let (model_id, dim) = (groups[0].0.model_id().to_string(), groups[0].0.dim());
    // Replicas share their weights: one copy per group.
    let weight_mb = groups.iter().map(|(m, _)| m.weight_bytes()).sum::<usize>() as f64 / 1e6;
    // Jobs of the smallest pass size any group uses; every job of a chunk may wait in the
    // queue at once. CPU workers get at least 8 jobs each per chunk, so that none idles
    // while another finishes a large last job (passes are shaped by max_batch_tokens
    // within a job anyway); a GPU keeps its large passes.
    let mut rows_per_job = cfg
        .groups()
        .iter()
        .map(|g| g.limits.max_rows)
        .min()
        .unwrap_or(1);
    if !cfg.uses_gpu() {
        rows_per_job = rows_per_job.min(CHUNK_LINES / (workers * 8)).max(1);
    }
    let embedder = EmbedderWorkers::start(groups, CHUNK_LINES.div_ceil(rows_per_job))?;
    let handle = embedder.handle();
    // Kernel compilation (GPU) is start-up, not embedding: wait for it before timing.
    handle.wait_warm_blocking();
    let load_time = started.elapsed();
    tracing::info!(
        model = model_id,
        dim,
        workers,
        device = handle.stats().device,
        load_ms = load_time.as_millis() as u64,
        "model loaded"
    );

    let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let mut run = Run {
        handle: &handle,
        rows_per_job,
        dim,
        texts_done: 0,
        embed_time: std::time::Duration::ZERO,
        heap: (None, 0, 0),
    };
    let mut earlier_rounds = std::time::Duration::ZERO;
    if args.rounds > 1 {
        // Every round embeds the same texts; only the last one's vectors are written.
        let mut texts = Vec::new();
        let mut lines = std::io::stdin().lock().split(b'\n');
        while let Some(text) = next_line(&mut lines, texts.len() + 1)? {
            texts.push(text);
        }
        for _ in 1..args.rounds {
            let t0 = Instant::now();
            for chunk in texts.chunks(CHUNK_LINES) {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                handle.embed_blocking(&refs, rows_per_job)?;
            }
            earlier_rounds += t0.elapsed();
        }
        for chunk in texts.chunks(CHUNK_LINES) {
            run.chunk(chunk, &mut out)?;
        }
    } else {
        let mut lines = std::io::stdin().lock().split(b'\n');
        let mut chunk: Vec<String> = Vec::with_capacity(CHUNK_LINES);
        let mut line_no = 0usize;
        loop {
            chunk.clear();
            while let Some(text) = next_line(&mut lines, line_no + 1)? {
                line_no += 1;
                chunk.push(text);
                if chunk.len() == CHUNK_LINES {
                    break;
                }
            }
            if chunk.is_empty() {
                break;
            }
            run.chunk(&chunk, &mut out)?;
        }
    }
    let Run {
        texts_done,
        embed_time,
        heap,
        ..
    } = run;
    out.flush().context("writing stdout")?;
    let stats = handle.stats();
    drop(handle);
    embedder.shutdown(std::time::Duration::from_secs(5));

    let secs = embed_time.as_secs_f64();
    let device_memory = stats
        .device_memory
        .map(|m| {
            format!(
                "; device memory {} MB in use, {} MB reserved",
                m.in_use_bytes / 1_000_000,
                m.reserved_bytes / 1_000_000
            )
        })
        .unwrap_or_default();
    let mb = |b: u64| b as f64 / 1e6;
    let heap = match heap {
        (Some(first), last, most) if texts_done > CHUNK_LINES => format!(
            "; heap after each {CHUNK_LINES} texts: {:.1} MB first, {:.1} MB last, {:.1} MB most",
            mb(first),
            mb(last),
            mb(most)
        ),
        _ => String::new(),
    };
    let earlier = if args.rounds > 1 {
        format!(
            "; the last of {} rounds, the earlier in {:.2} s",
            args.rounds,
            earlier_rounds.as_secs_f64()
        )
    } else {
        String::new()
    };
    eprintln!(
        "keel embed: {texts_done} texts in {secs:.2} s ({:.0} texts/s; start-up {:.2} s; {workers} workers on {}; {} passes; weights {weight_mb:.1} MB; RSS {} MB{device_memory}{heap}{earlier})",
        if secs > 0.0 {
            texts_done as f64 / secs
        } else {
            0.0
        },
        load_time.as_secs_f64(),
        stats.device,
        stats.passes,
        rss_bytes().map(|b| b / 1_000_000).unwrap_or(0),
    );
    Ok(())
}

/// The next line of stdin as a text (`\r\n` endings accepted), `None` at the end.
fn next_line(
    lines: &mut std::io::Split<std::io::StdinLock<'static>>,
    line_no: usize,
) -> anyhow::Result<Option<String>> {
    let Some(line) = lines.next() else {
        return Ok(None);
    };
    let mut bytes = line.context("reading stdin")?;
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    let text =
        String::from_utf8(bytes).with_context(|| format!("stdin line {line_no} is not UTF-8"))?;
    Ok(Some(text))
}

/// The timed part of `keel embed`: chunks embedded and written, their time and the heap
/// between them.
struct Run<'a> {
    handle: &'a keel_engine::embedder::workers::EmbedderHandle,
    rows_per_job: usize,
    dim: usize,
    texts_done: usize,
    embed_time: std::time::Duration,
    /// jemalloc's allocated bytes after the first chunk, after the last, and the most.
    heap: (Option<u64>, u64, u64),
}

impl Run<'_> {
    fn chunk(&mut self, chunk: &[String], out: &mut impl Write) -> anyhow::Result<()> {
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let vectors = self.handle.embed_blocking(&texts, self.rows_per_job)?;
        self.embed_time += t0.elapsed();
        for (text, v) in texts.iter().zip(vectors.chunks_exact(self.dim)) {
            serde_json::to_writer(
                &mut *out,
                &serde_json::json!({ "text": text, "embedding": v }),
            )?;
            out.write_all(b"\n")?;
        }
        self.texts_done += texts.len();
        // What the program holds between chunks: flat once warm (a pass allocates only
        // the vectors it returns, freed with the chunk).
        let held = keel_engine::memory::allocator::stats().allocated;
        self.heap.0.get_or_insert(held);
        self.heap.1 = held;
        self.heap.2 = self.heap.2.max(held);
        Ok(())
    }
}
