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

use crate::state::ServerState;

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

/// Upper bounds of the seconds-per-HTTP-request histogram: a cached query in a
/// millisecond up to a request that waited its queue timeout.
const HTTP_SECONDS_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
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
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("keel_http_request_seconds".into()),
                    &HTTP_SECONDS_BUCKETS,
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
pub async fn serve(listener: tokio::net::TcpListener, engine: Arc<ServerState>) {
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

async fn ready(State(engine): State<Arc<ServerState>>) -> (StatusCode, &'static str) {
    if engine.is_closing() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn scrape(State(engine): State<Arc<ServerState>>) -> (StatusCode, String) {
    match engine.stats().await {
        Ok(stats) => {
            publish(&stats);
            (StatusCode::OK, install().render())
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// Whether a figure is a gauge (it goes up and down) or a counter (a total).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Gauge,
    Counter,
}

/// One figure published from [`Stats`] at each scrape: its name, kind, unit and help
/// text, and where its value comes from (`None`: not published, e.g. Redis figures
/// without `cache.shared`).
struct Figure {
    name: &'static str,
    kind: Kind,
    unit: Unit,
    help: &'static str,
    value: fn(&Stats) -> Option<f64>,
}

const fn gauge(
    name: &'static str,
    unit: Unit,
    help: &'static str,
    value: fn(&Stats) -> Option<f64>,
) -> Figure {
    Figure {
        name,
        kind: Kind::Gauge,
        unit,
        help,
        value,
    }
}

const fn total(name: &'static str, help: &'static str, value: fn(&Stats) -> Option<f64>) -> Figure {
    Figure {
        name,
        kind: Kind::Counter,
        unit: Unit::Count,
        help,
        value,
    }
}

/// Every figure published from [`Stats`], once: `describe` and `publish` both read it.
/// (Totals in seconds are gauges: the `metrics` crate's counters are integers.)
#[rustfmt::skip]
const FIGURES: &[Figure] = &[
    gauge("keel_rss_bytes", Unit::Bytes, "Resident set size of the process.", |s| Some(s.rss_bytes as f64)),
    gauge("keel_rss_peak_bytes", Unit::Bytes, "Highest RSS sampled.", |s| Some(s.peak_rss_bytes as f64)),
    gauge("keel_memory_limit_bytes", Unit::Bytes, "The memory budget the supervisor steers by.", |s| Some(s.memory.limit_bytes as f64)),
    gauge("keel_allocator_allocated_bytes", Unit::Bytes, "Bytes the program holds (jemalloc stats.allocated).", |s| Some(s.memory.allocated_bytes as f64)),
    gauge("keel_allocator_resident_bytes", Unit::Bytes, "Bytes jemalloc keeps resident (stats.resident).", |s| Some(s.memory.resident_bytes as f64)),
    gauge("keel_memory_creep_mb_per_1000_ops", Unit::Count, "Slope of allocated bytes against ops over the settled readings.", |s| Some(s.memory.creep.map(|c| c.allocated_mb_per_1000_ops).unwrap_or(0.0))),
    gauge("keel_memory_pressure", Unit::Count, "1 while admission is tightened (RSS above the hard watermark, not yet below the soft one).", |s| Some(f64::from(u8::from(s.memory.pressure)))),
    total("keel_ops_total", "Micro-batches processed.", |s| Some(s.ops as f64)),
    total("keel_rows_total", "Rows processed.", |s| Some(s.rows as f64)),
    total("keel_rows_embedded_total", "Rows computed by the model (cache misses).", |s| Some(s.embedded_rows as f64)),
    total("keel_rows_coalesced_total", "Rows that took the vector of the same text embedded at that moment for another micro-batch.", |s| Some(s.coalesced_rows as f64)),
    gauge("keel_in_flight_rows", Unit::Count, "Rows read and not yet handed back or stored.", |s| Some(s.in_flight_rows as f64)),
    gauge("keel_in_flight_rows_max", Unit::Count, "The bound on rows in flight (ingest.max_in_flight_rows; requests of the fast lane are admitted through a reserve of their own on top).", |s| Some(s.max_in_flight_rows as f64)),
    gauge("keel_backpressure_wait_seconds_total", Unit::Seconds, "Time streams waited for in-flight permits.", |s| Some(s.admit_wait_s)),
    gauge("keel_streams_open", Unit::Count, "Open DoExchange and DoPut streams.", |s| Some(s.streams.open as f64)),
    total("keel_streams_total", "Streams opened.", |s| Some(s.streams.total as f64)),
    total("keel_streams_failed_total", "Streams ended by an error.", |s| Some(s.streams.failed as f64)),
    total("keel_streams_rejected_total", "Streams refused at the in-flight bound (ingest.when_full: reject).", |s| Some(s.streams.rejected as f64)),
    gauge("keel_cache_bytes", Unit::Bytes, "Bytes accounted by the vector cache.", |s| Some(s.cache.counts.bytes as f64)),
    gauge("keel_cache_max_bytes", Unit::Bytes, "The cache's byte budget.", |s| Some(s.cache.counts.max_bytes as f64)),
    gauge("keel_cache_entries", Unit::Count, "Vectors in the cache.", |s| Some(s.cache.counts.entries as f64)),
    total("keel_cache_hits_total", "Cache hits.", |s| Some(s.cache.counts.hits as f64)),
    total("keel_cache_misses_total", "Cache misses.", |s| Some(s.cache.counts.misses as f64)),
    total("keel_cache_evictions_total", "Cache evictions.", |s| Some(s.cache.counts.evictions as f64)),
    total("keel_cache_shared_hits_total", "Vectors found in the second level (Redis).", |s| s.cache.shared.as_ref().map(|r| r.hits as f64)),
    total("keel_cache_shared_misses_total", "Keys looked up in Redis and not found.", |s| s.cache.shared.as_ref().map(|r| r.misses as f64)),
    total("keel_cache_shared_errors_total", "Failed Redis lookups (counted as misses).", |s| s.cache.shared.as_ref().map(|r| r.errors as f64)),
    total("keel_cache_shared_timeouts_total", "Redis lookups over cache.shared.timeout_ms.", |s| s.cache.shared.as_ref().map(|r| r.timeouts as f64)),
    total("keel_cache_shared_skipped_total", "Keys not looked up: the breaker was open.", |s| s.cache.shared.as_ref().map(|r| r.skipped as f64)),
    total("keel_cache_shared_breaker_trips_total", "Times the Redis circuit breaker opened.", |s| s.cache.shared.as_ref().map(|r| r.breaker_trips as f64)),
    total("keel_cache_shared_leased_total", "Keys this replica leased to compute for the fleet.", |s| s.cache.shared.as_ref().map(|r| r.leased as f64)),
    total("keel_cache_shared_waited_total", "Keys another replica was computing, waited for instead of computed.", |s| s.cache.shared.as_ref().map(|r| r.waited as f64)),
    total("keel_cache_shared_taken_over_total", "Keys whose lease expired while waited for, computed here.", |s| s.cache.shared.as_ref().map(|r| r.taken_over as f64)),
    total("keel_cache_shared_writes_total", "Vectors written back to Redis.", |s| s.cache.shared.as_ref().map(|r| r.writes as f64)),
    total("keel_cache_shared_write_errors_total", "Vectors whose write to Redis failed.", |s| s.cache.shared.as_ref().map(|r| r.write_errors as f64)),
    total("keel_cache_shared_writes_dropped_total", "Writes dropped: queue full or breaker open.", |s| s.cache.shared.as_ref().map(|r| r.writes_dropped as f64)),
    gauge("keel_cache_shared_breaker_open", Unit::Count, "1 while the Redis circuit breaker is open.", |s| s.cache.shared.as_ref().map(|r| f64::from(u8::from(r.breaker_open)))),
    total("keel_embed_passes_total", "Forward passes.", |s| Some(s.embedder.passes as f64)),
    total("keel_embed_rows_total", "Rows through forward passes.", |s| Some(s.embedder.rows as f64)),
    total("keel_embed_tokens_total", "Tokens through forward passes.", |s| Some(s.embedder.tokens as f64)),
    total("keel_embed_fast_jobs_total", "Embedder jobs that came through the fast lane (requests of at most ingest.fast_lane_rows).", |s| Some(s.embedder.fast_jobs as f64)),
    total("keel_embed_dropped_jobs_total", "Embedder jobs skipped because the client that asked for them had gone.", |s| Some(s.embedder.dropped_jobs as f64)),
    gauge("keel_embed_busy_seconds_total", Unit::Seconds, "Time the embedder workers computed.", |s| Some(s.embedder.busy_ms as f64 / 1000.0)),
    gauge("keel_embed_queue_jobs", Unit::Count, "Micro-batches waiting for the embedder.", |s| Some(s.embedder.queued_jobs as f64)),
    gauge("keel_device_memory_in_use_bytes", Unit::Bytes, "GPU memory of live allocations (GPU backends).", |s| s.embedder.device_memory.map(|m| m.in_use_bytes as f64)),
    gauge("keel_device_memory_reserved_bytes", Unit::Bytes, "GPU memory reserved by the backend's pool (GPU backends).", |s| s.embedder.device_memory.map(|m| m.reserved_bytes as f64)),
    gauge("keel_cleanup_last_seconds", Unit::Seconds, "Duration of the last cleanup, broadcast to last ack.", |s| s.cleanups.recent.last().map(|c| c.total_micros as f64 / 1e6)),
    gauge("keel_index_memory_bytes", Unit::Bytes, "Memory the loaded dataset indexes hold (storage.index.max_bytes bounds it).", |s| Some(s.indexes.iter().map(|i| i.memory_bytes).sum::<u64>() as f64)),
];

/// `keel_embedder_backend_info{configured, picked} 1`: the backend that runs, and what
/// was configured (`auto` picks at start-up; `stats.embedder.backend_why` says why).
pub fn backend(choice: &keel_engine::embedder::config::BackendChoice) {
    gauge!(
        "keel_embedder_backend_info",
        "configured" => choice.configured.name(),
        "picked" => choice.picked.name()
    )
    .set(1.0);
}

/// Every metric's unit and help text, once.
fn describe() {
    for f in FIGURES {
        match f.kind {
            Kind::Gauge => describe_gauge!(f.name, f.unit, f.help),
            Kind::Counter => describe_counter!(f.name, f.unit, f.help),
        }
    }
    // Labelled figures and histograms (recorded where the work happens).
    describe_counter!("keel_cleanups_total", Unit::Count, "Cleanups by level.");
    describe_gauge!(
        "keel_embedder_backend_info",
        Unit::Count,
        "1, labelled with the embedder backend configured and the one that runs (auto picks)."
    );
    describe_gauge!(
        "keel_index_rows",
        Unit::Count,
        "Rows a dataset's index covers (later rows are scanned exactly)."
    );
    describe_counter!(
        "keel_http_requests_total",
        Unit::Count,
        "HTTP front requests by route."
    );
    describe_counter!(
        "keel_http_inputs_total",
        Unit::Count,
        "Texts embedded through the HTTP front, by route."
    );
    describe_counter!(
        "keel_http_errors_total",
        Unit::Count,
        "HTTP front errors by status."
    );
    describe_histogram!(
        "keel_http_request_seconds",
        Unit::Seconds,
        "Duration of an HTTP front request, by route."
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
}

/// Publishes `stats` into the recorder.
fn publish(s: &Stats) {
    for f in FIGURES {
        if let Some(v) = (f.value)(s) {
            match f.kind {
                Kind::Gauge => gauge!(f.name).set(v),
                Kind::Counter => counter!(f.name).absolute(v as u64),
            }
        }
    }
    counter!("keel_cleanups_total", "level" => "trim").absolute(s.cleanups.trim);
    counter!("keel_cleanups_total", "level" => "gentle").absolute(s.cleanups.gentle);
    counter!("keel_cleanups_total", "level" => "full").absolute(s.cleanups.full);
    for i in &s.indexes {
        gauge!("keel_index_rows", "dataset" => i.dataset.clone()).set(i.rows as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::FIGURES;

    #[test]
    fn every_figure_has_one_name() {
        let mut names: Vec<&str> = FIGURES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(
            before,
            names.len(),
            "a metric name appears twice in FIGURES"
        );
    }
}
