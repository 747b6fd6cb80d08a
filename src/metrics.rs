//! The Prometheus endpoint: `/metrics` (text format 0.0.4), `/health`, `/ready`.
//!
//! A deliberately small HTTP/1.1 responder on the tokio runtime: one request per
//! connection, bounded request size and read time, `Connection: close`. The figures are
//! the same as the `stats` action's (one source: [`Engine::stats`]).

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::Engine;

const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, &engine).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn handle(mut conn: TcpStream, engine: &Engine) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST_BYTES {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match engine.stats().await {
            Ok(stats) => ("200 OK", "text/plain; version=0.0.4", render(&stats)),
            Err(e) => (
                "503 Service Unavailable",
                "text/plain",
                format!("{}\n", e.message()),
            ),
        },
        ("GET", "/health") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/ready") if engine.is_closing() => (
            "503 Service Unavailable",
            "text/plain",
            "shutting down\n".into(),
        ),
        ("GET", "/ready") => ("200 OK", "text/plain", "ready\n".to_string()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /health or /ready\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// The `stats` JSON as Prometheus metrics.
pub fn render(stats: &serde_json::Value) -> String {
    let mut out = String::with_capacity(4096);
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP keel_{name} {help}\n# TYPE keel_{name} {kind}\nkeel_{name} {value}"
        );
    };
    let s = stats;
    metric(
        "rss_bytes",
        "gauge",
        "Resident set size of the process.",
        num(&s["rss_bytes"]),
    );
    metric(
        "rss_peak_bytes",
        "gauge",
        "Highest RSS sampled.",
        num(&s["peak_rss_bytes"]),
    );
    metric(
        "memory_limit_bytes",
        "gauge",
        "The memory budget the supervisor steers by.",
        num(&s["memory"]["limit_bytes"]),
    );
    metric(
        "allocator_allocated_bytes",
        "gauge",
        "Bytes the program holds (jemalloc stats.allocated).",
        num(&s["memory"]["allocated_bytes"]),
    );
    metric(
        "allocator_resident_bytes",
        "gauge",
        "Bytes jemalloc keeps resident (stats.resident).",
        num(&s["memory"]["resident_bytes"]),
    );
    metric(
        "memory_creep_mb_per_1000_ops",
        "gauge",
        "Slope of allocated bytes against ops over the creep window.",
        num(&s["memory"]["creep"]["allocated_mb_per_1000_ops"]),
    );
    metric(
        "ops_total",
        "counter",
        "Micro-batches processed.",
        num(&s["ops"]),
    );
    metric("rows_total", "counter", "Rows processed.", num(&s["rows"]));
    metric(
        "rows_embedded_total",
        "counter",
        "Rows computed by the model (cache misses).",
        num(&s["embedded_rows"]),
    );
    metric(
        "in_flight_rows",
        "gauge",
        "Rows read and not yet handed back or stored.",
        num(&s["in_flight_rows"]),
    );
    metric(
        "in_flight_rows_max",
        "gauge",
        "The bound on rows in flight.",
        num(&s["max_in_flight_rows"]),
    );
    metric(
        "backpressure_wait_seconds_total",
        "counter",
        "Time streams waited for in-flight permits.",
        num(&s["admit_wait_s"]),
    );
    metric(
        "streams_open",
        "gauge",
        "Open DoExchange and DoPut streams.",
        num(&s["streams"]["open"]),
    );
    metric(
        "streams_total",
        "counter",
        "Streams opened.",
        num(&s["streams"]["total"]),
    );
    metric(
        "streams_failed_total",
        "counter",
        "Streams ended by an error.",
        num(&s["streams"]["failed"]),
    );
    let c = &s["cache"];
    metric(
        "cache_bytes",
        "gauge",
        "Bytes accounted by the vector cache.",
        num(&c["bytes"]),
    );
    metric(
        "cache_max_bytes",
        "gauge",
        "The cache's byte budget.",
        num(&c["max_bytes"]),
    );
    metric(
        "cache_entries",
        "gauge",
        "Vectors in the cache.",
        num(&c["entries"]),
    );
    metric(
        "cache_hits_total",
        "counter",
        "Cache hits.",
        num(&c["hits"]),
    );
    metric(
        "cache_misses_total",
        "counter",
        "Cache misses.",
        num(&c["misses"]),
    );
    metric(
        "cache_evictions_total",
        "counter",
        "Cache evictions.",
        num(&c["evictions"]),
    );
    let e = &s["embedder"];
    metric(
        "embed_passes_total",
        "counter",
        "Forward passes.",
        num(&e["passes"]),
    );
    metric(
        "embed_rows_total",
        "counter",
        "Rows through forward passes.",
        num(&e["rows"]),
    );
    metric(
        "embed_tokens_total",
        "counter",
        "Tokens through forward passes.",
        num(&e["tokens"]),
    );
    metric(
        "embed_busy_seconds_total",
        "counter",
        "Time the embedder workers computed.",
        num(&e["busy_ms"]) / 1000.0,
    );
    metric(
        "embed_queue_jobs",
        "gauge",
        "Micro-batches waiting for the embedder.",
        num(&e["queued_jobs"]),
    );
    for (name, help, key) in [
        ("embed_pass_rows", "Rows per forward pass.", "pass_rows"),
        (
            "embed_pass_seconds",
            "Duration of a forward pass.",
            "pass_seconds",
        ),
    ] {
        let h = &e[key];
        let _ = writeln!(
            out,
            "# HELP keel_{name} {help}\n# TYPE keel_{name} histogram"
        );
        if let (Some(le), Some(cum)) = (h["le"].as_array(), h["cumulative"].as_array()) {
            for (b, c) in le.iter().zip(cum) {
                let _ = writeln!(out, "keel_{name}_bucket{{le=\"{}\"}} {}", num(b), num(c));
            }
        }
        let _ = writeln!(
            out,
            "keel_{name}_bucket{{le=\"+Inf\"}} {}",
            num(&h["count"])
        );
        let _ = writeln!(
            out,
            "keel_{name}_sum {}\nkeel_{name}_count {}",
            num(&h["sum"]),
            num(&h["count"])
        );
    }
    let _ = writeln!(
        out,
        "# HELP keel_cleanups_total Cleanups by level.\n# TYPE keel_cleanups_total counter\n\
         keel_cleanups_total{{level=\"gentle\"}} {}\nkeel_cleanups_total{{level=\"full\"}} {}",
        num(&s["cleanups"]["gentle"]),
        num(&s["cleanups"]["full"])
    );
    if let Some(last) = s["cleanups"]["recent"].as_array().and_then(|r| r.last()) {
        let _ = writeln!(
            out,
            "# HELP keel_cleanup_last_seconds Duration of the last cleanup, broadcast to last ack.\n\
             # TYPE keel_cleanup_last_seconds gauge\nkeel_cleanup_last_seconds {}",
            num(&last["total_micros"]) / 1e6
        );
    }
    out
}
