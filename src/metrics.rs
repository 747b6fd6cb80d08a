//! The Prometheus endpoint (`/metrics`) and the HTTP probes (`/health`, `/ready`).
//!
//! Figures go through the `metrics` crate and are rendered by
//! `metrics-exporter-prometheus`; HTTP is axum's. Histograms are recorded where the work
//! happens (the embedder workers record each pass); everything else is published from the
//! typed [`Stats`] at each scrape, so `/metrics` and the `stats` action never disagree.
//!
//! The recorder is process-wide (the `metrics` crate's global): [`install`] sets it once,
//! before the engine starts, and every engine in the process (tests start several)
//! publishes into it.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use keel_engine::stats::Stats;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::engine::Engine;

/// Upper bounds of the rows-per-pass histogram.
const PASS_ROWS_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Upper bounds of the seconds-per-pass histogram.
const PASS_SECONDS_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Upper bounds of the seconds-per-Redis-lookup histogram.
const LOOKUP_SECONDS_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// Installs the process-wide recorder (once) and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("keel_embed_pass_rows".into()),
                &PASS_ROWS_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("keel_embed_pass_seconds".into()),
                    &PASS_SECONDS_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("keel_cache_shared_lookup_seconds".into()),
                    &LOOKUP_SECONDS_BUCKETS,
                )
            })
            .expect("the bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            // A library user installed their own: the histograms go there; /metrics
            // still shows every figure published from stats.
            tracing::warn!("a metrics recorder was already installed; /metrics shows stats only");
        }
        describe();
        handle
    })
}

/// Serves `/metrics`, `/health` and `/ready` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, engine: Arc<Engine>) {
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /health or /ready\n") })
        .with_state(engine);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "the metrics endpoint stopped");
    }
}

async fn ready(State(engine): State<Arc<Engine>>) -> (StatusCode, &'static str) {
    if engine.is_closing() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn scrape(State(engine): State<Arc<Engine>>) -> (StatusCode, String) {
    match engine.stats().await {
        Ok(stats) => {
            publish(&stats);
            (StatusCode::OK, install().render())
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// Every metric's unit and help text, once.
fn describe() {
    for (name, unit, help) in [
        (
            "keel_rss_bytes",
            Unit::Bytes,
            "Resident set size of the process.",
        ),
        ("keel_rss_peak_bytes", Unit::Bytes, "Highest RSS sampled."),
        (
            "keel_memory_limit_bytes",
            Unit::Bytes,
            "The memory budget the supervisor steers by.",
        ),
        (
            "keel_allocator_allocated_bytes",
            Unit::Bytes,
            "Bytes the program holds (jemalloc stats.allocated).",
        ),
        (
            "keel_allocator_resident_bytes",
            Unit::Bytes,
            "Bytes jemalloc keeps resident (stats.resident).",
        ),
        (
            "keel_memory_creep_mb_per_1000_ops",
            Unit::Count,
            "Slope of allocated bytes against ops over the settled readings.",
        ),
        (
            "keel_memory_pressure",
            Unit::Count,
            "1 while admission is tightened (RSS above the hard watermark, not yet below the soft one).",
        ),
        (
            "keel_in_flight_rows",
            Unit::Count,
            "Rows read and not yet handed back or stored.",
        ),
        (
            "keel_in_flight_rows_max",
            Unit::Count,
            "The bound on rows in flight.",
        ),
        (
            "keel_streams_open",
            Unit::Count,
            "Open DoExchange and DoPut streams.",
        ),
        (
            "keel_cache_bytes",
            Unit::Bytes,
            "Bytes accounted by the vector cache.",
        ),
        (
            "keel_cache_max_bytes",
            Unit::Bytes,
            "The cache's byte budget.",
        ),
        ("keel_cache_entries", Unit::Count, "Vectors in the cache."),
        (
            "keel_embed_queue_jobs",
            Unit::Count,
            "Micro-batches waiting for the embedder.",
        ),
        (
            "keel_cleanup_last_seconds",
            Unit::Seconds,
            "Duration of the last cleanup, broadcast to last ack.",
        ),
        // Totals in seconds (fractions): the `metrics` crate's counters are integers.
        (
            "keel_backpressure_wait_seconds_total",
            Unit::Seconds,
            "Time streams waited for in-flight permits.",
        ),
        (
            "keel_embed_busy_seconds_total",
            Unit::Seconds,
            "Time the embedder workers computed.",
        ),
    ] {
        describe_gauge!(name, unit, help);
    }
    for (name, unit, help) in [
        ("keel_ops_total", Unit::Count, "Micro-batches processed."),
        ("keel_rows_total", Unit::Count, "Rows processed."),
        (
            "keel_rows_embedded_total",
            Unit::Count,
            "Rows computed by the model (cache misses).",
        ),
        (
            "keel_rows_coalesced_total",
            Unit::Count,
            "Rows that took the vector of the same text embedded at that moment for another micro-batch.",
        ),
        ("keel_streams_total", Unit::Count, "Streams opened."),
        (
            "keel_streams_failed_total",
            Unit::Count,
            "Streams ended by an error.",
        ),
        (
            "keel_streams_rejected_total",
            Unit::Count,
            "Streams refused at the in-flight bound (ingest.when_full: reject).",
        ),
        ("keel_cache_hits_total", Unit::Count, "Cache hits."),
        ("keel_cache_misses_total", Unit::Count, "Cache misses."),
        (
            "keel_cache_evictions_total",
            Unit::Count,
            "Cache evictions.",
        ),
        ("keel_embed_passes_total", Unit::Count, "Forward passes."),
        (
            "keel_embed_rows_total",
            Unit::Count,
            "Rows through forward passes.",
        ),
        (
            "keel_embed_tokens_total",
            Unit::Count,
            "Tokens through forward passes.",
        ),
        ("keel_cleanups_total", Unit::Count, "Cleanups by level."),
    ] {
        describe_counter!(name, unit, help);
    }
    describe_gauge!(
        "keel_device_memory_in_use_bytes",
        Unit::Bytes,
        "GPU memory of live allocations (GPU backends)."
    );
    describe_gauge!(
        "keel_device_memory_reserved_bytes",
        Unit::Bytes,
        "GPU memory reserved by the backend's pool (GPU backends)."
    );
    describe_histogram!(
        "keel_embed_pass_rows",
        Unit::Count,
        "Rows per forward pass."
    );
    describe_histogram!(
        "keel_embed_pass_seconds",
        Unit::Seconds,
        "Duration of a forward pass."
    );
    describe_histogram!(
        "keel_cache_shared_lookup_seconds",
        Unit::Seconds,
        "Duration of one second-level (Redis) lookup round trip (MGET)."
    );
    for (name, help) in [
        (
            "keel_cache_shared_hits_total",
            "Vectors found in the second level (Redis).",
        ),
        (
            "keel_cache_shared_misses_total",
            "Keys looked up in Redis and not found.",
        ),
        (
            "keel_cache_shared_errors_total",
            "Failed Redis lookups (counted as misses).",
        ),
        (
            "keel_cache_shared_timeouts_total",
            "Redis lookups over cache.shared.timeout_ms.",
        ),
        (
            "keel_cache_shared_skipped_total",
            "Keys not looked up: the breaker was open.",
        ),
        (
            "keel_cache_shared_breaker_trips_total",
            "Times the Redis circuit breaker opened.",
        ),
        (
            "keel_cache_shared_leased_total",
            "Keys this replica leased to compute for the fleet.",
        ),
        (
            "keel_cache_shared_waited_total",
            "Keys another replica was computing, waited for instead of computed.",
        ),
        (
            "keel_cache_shared_taken_over_total",
            "Keys whose lease expired while waited for, computed here.",
        ),
        (
            "keel_cache_shared_writes_total",
            "Vectors written back to Redis.",
        ),
        (
            "keel_cache_shared_write_errors_total",
            "Vectors whose write to Redis failed.",
        ),
        (
            "keel_cache_shared_writes_dropped_total",
            "Writes dropped: queue full or breaker open.",
        ),
    ] {
        describe_counter!(name, Unit::Count, help);
    }
    describe_gauge!(
        "keel_cache_shared_breaker_open",
        Unit::Count,
        "1 while the Redis circuit breaker is open."
    );
    describe_gauge!(
        "keel_index_memory_bytes",
        Unit::Bytes,
        "Memory the loaded dataset indexes hold (storage.index.max_bytes bounds it)."
    );
    describe_gauge!(
        "keel_index_rows",
        Unit::Count,
        "Rows a dataset's index covers (later rows are scanned exactly)."
    );
}

/// Publishes `stats` into the recorder.
fn publish(s: &Stats) {
    let set = |name: &'static str, v: f64| gauge!(name).set(v);
    let total = |name: &'static str, v: u64| counter!(name).absolute(v);
    set("keel_rss_bytes", s.rss_bytes as f64);
    set("keel_rss_peak_bytes", s.peak_rss_bytes as f64);
    set("keel_memory_limit_bytes", s.memory.limit_bytes as f64);
    set(
        "keel_allocator_allocated_bytes",
        s.memory.allocated_bytes as f64,
    );
    set(
        "keel_allocator_resident_bytes",
        s.memory.resident_bytes as f64,
    );
    set(
        "keel_memory_creep_mb_per_1000_ops",
        s.memory
            .creep
            .map(|c| c.allocated_mb_per_1000_ops)
            .unwrap_or(0.0),
    );
    set(
        "keel_memory_pressure",
        f64::from(u8::from(s.memory.pressure)),
    );
    total("keel_ops_total", s.ops);
    total("keel_rows_total", s.rows);
    total("keel_rows_embedded_total", s.embedded_rows);
    total("keel_rows_coalesced_total", s.coalesced_rows);
    set("keel_in_flight_rows", s.in_flight_rows as f64);
    set("keel_in_flight_rows_max", s.max_in_flight_rows as f64);
    set("keel_backpressure_wait_seconds_total", s.admit_wait_s);
    set("keel_streams_open", s.streams.open as f64);
    total("keel_streams_total", s.streams.total);
    total("keel_streams_failed_total", s.streams.failed);
    total("keel_streams_rejected_total", s.streams.rejected);
    let c = &s.cache.counts;
    set("keel_cache_bytes", c.bytes as f64);
    set("keel_cache_max_bytes", c.max_bytes as f64);
    set("keel_cache_entries", c.entries as f64);
    total("keel_cache_hits_total", c.hits);
    total("keel_cache_misses_total", c.misses);
    total("keel_cache_evictions_total", c.evictions);
    if let Some(r) = &s.cache.shared {
        total("keel_cache_shared_hits_total", r.hits);
        total("keel_cache_shared_misses_total", r.misses);
        total("keel_cache_shared_errors_total", r.errors);
        total("keel_cache_shared_timeouts_total", r.timeouts);
        total("keel_cache_shared_skipped_total", r.skipped);
        total("keel_cache_shared_breaker_trips_total", r.breaker_trips);
        total("keel_cache_shared_leased_total", r.leased);
        total("keel_cache_shared_waited_total", r.waited);
        total("keel_cache_shared_taken_over_total", r.taken_over);
        total("keel_cache_shared_writes_total", r.writes);
        total("keel_cache_shared_write_errors_total", r.write_errors);
        total("keel_cache_shared_writes_dropped_total", r.writes_dropped);
        set(
            "keel_cache_shared_breaker_open",
            f64::from(u8::from(r.breaker_open)),
        );
    }
    let e = &s.embedder;
    total("keel_embed_passes_total", e.passes);
    total("keel_embed_rows_total", e.rows);
    total("keel_embed_tokens_total", e.tokens);
    set("keel_embed_busy_seconds_total", e.busy_ms as f64 / 1000.0);
    set("keel_embed_queue_jobs", e.queued_jobs as f64);
    if let Some(m) = e.device_memory {
        set("keel_device_memory_in_use_bytes", m.in_use_bytes as f64);
        set("keel_device_memory_reserved_bytes", m.reserved_bytes as f64);
    }
    counter!("keel_cleanups_total", "level" => "trim").absolute(s.cleanups.trim);
    counter!("keel_cleanups_total", "level" => "gentle").absolute(s.cleanups.gentle);
    counter!("keel_cleanups_total", "level" => "full").absolute(s.cleanups.full);
    if let Some(last) = s.cleanups.recent.last() {
        set("keel_cleanup_last_seconds", last.total_micros as f64 / 1e6);
    }
    set(
        "keel_index_memory_bytes",
        s.indexes.iter().map(|i| i.memory_bytes).sum::<u64>() as f64,
    );
    for i in &s.indexes {
        gauge!("keel_index_rows", "dataset" => i.dataset.clone()).set(i.rows as f64);
    }
}
