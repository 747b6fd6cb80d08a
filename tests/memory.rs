//! Memory behaviour of a running engine: /metrics agrees with stats, cleanup reaches
//! every actor, and memory comes back after a burst.

use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: keel\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    conn.read_to_string(&mut buf).await.unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|b| b.1.to_string())
        .unwrap_or_default();
    (status, body)
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_stats_and_health_endpoints_answer() {
    let server = TestServer::start(|s| s.supervisor.act = false).await;
    let mut client = server.client().await;
    let texts: Vec<String> = (0..60).map(|i| format!("metric text {}", i % 20)).collect();
    let batch = text_batch(&texts.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    exchange(&mut client, embed_path(), vec![batch])
        .await
        .unwrap();
    let stats = action(&mut client, "stats", "").await;
    let (status, body) = http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&body, "keel_rows_total"),
        stats["rows"].as_f64().unwrap()
    );
    assert_eq!(
        metric(&body, "keel_ops_total"),
        stats["ops"].as_f64().unwrap()
    );
    assert_eq!(
        metric(&body, "keel_cache_hits_total"),
        stats["cache"]["hits"].as_f64().unwrap()
    );
    assert_eq!(metric(&body, "keel_cache_entries"), 20.0);
    assert_eq!(metric(&body, "keel_in_flight_rows"), 0.0);
    assert!(metric(&body, "keel_allocator_allocated_bytes") > 0.0);
    assert!(metric(&body, "keel_rss_bytes") > 50e6);
    assert_eq!(http_get(server.metrics_addr, "/health").await.0, 200);
    assert_eq!(http_get(server.metrics_addr, "/ready").await.0, 200);
    assert_eq!(http_get(server.metrics_addr, "/nope").await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_reaches_every_actor_and_the_allocator() {
    let server = TestServer::start(|s| s.supervisor.act = false).await;
    let mut client = server.client().await;
    let record = action(&mut client, "cleanup", r#"{"level": "gentle"}"#).await;
    let mut actors: Vec<String> = record["acks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["actor"].as_str().unwrap().to_string())
        .collect();
    actors.sort();
    assert_eq!(actors, vec!["allocator", "cache", "embedder"]);
    assert!(record["total_micros"].as_u64().unwrap() < 5_000_000);
    server.stop().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits (20 s at most) for the supervisor's idle cleanup at or after `since_ms`; returns
/// its record and the stats that showed it.
async fn idle_cleanup_after(
    client: &mut arrow_flight::FlightClient,
    since_ms: u64,
) -> (serde_json::Value, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = action(client, "stats", "").await;
        let idle = stats["cleanups"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["reason"].as_str().unwrap().starts_with("idle")
                    && c["at_ms"].as_u64().unwrap() >= since_ms
            })
            .cloned();
        if let Some(idle) = idle {
            return (idle, stats);
        }
        assert!(Instant::now() < deadline, "no idle cleanup: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a burst of long texts at full in-flight, memory comes back once the engine has
/// been idle for the recovery window (the supervisor's idle cleanup purges the
/// allocator). The margin is generous; the soak benchmark measures the exact figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_comes_back_after_a_burst() {
    let server = TestServer::start(|s| {
        s.cache.max_bytes = 0;
        s.memory.recovery_window_ms = 300;
        s.memory.cooldown_ms = 100;
        s.supervisor.interval_ms = 50;
        s.embedder.cpu.max_batch_tokens = 16_384;
    })
    .await;
    let mut client = server.client().await;
    exchange(
        &mut client,
        embed_path(),
        vec![text_batch(&[Some("warm up")])],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = action(&mut client, "stats", "").await["rss_bytes"]
        .as_f64()
        .unwrap();

    let long = "pathogenic frameshift variant in the BRCA1 gene with loss of function ".repeat(12);
    let texts: Vec<String> = (0..128).map(|i| format!("{i} {long}")).collect();
    let batches: Vec<RecordBatch> = texts
        .chunks(64)
        .map(|c| text_batch(&c.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>()))
        .collect();
    exchange(&mut client, embed_path(), batches).await.unwrap();
    let peak = action(&mut client, "stats", "").await["peak_rss_bytes"]
        .as_f64()
        .unwrap();

    // Wait for the idle cleanup that follows the burst.
    let (_, stats) = idle_cleanup_after(&mut client, now_ms()).await;
    let after = stats["rss_bytes"].as_f64().unwrap();
    assert!(
        peak > before + 20e6,
        "the burst must raise RSS to be a test: {before} → {peak}"
    );
    let recovery = (peak - after) / (peak - before);
    eprintln!(
        "recovery {recovery:.3}: RSS before {before} B, peak {peak} B, after idle cleanup {after} B"
    );
    assert!(
        recovery > 0.5,
        "recovery {recovery:.3}: before {before}, peak {peak}, after {after}"
    );
    server.stop().await;
}

/// A lull does not cost the working set: the idle cleanup (trim) returns allocator pages
/// but evicts nothing the cache's budget allows, so the same texts after the lull are all
/// cache hits. Pressure (a gentle cleanup) still shrinks the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cleanup_keeps_the_cache_and_pressure_still_shrinks_it() {
    let server = TestServer::start(|s| {
        s.memory.recovery_window_ms = 300;
        s.memory.cooldown_ms = 100;
        s.supervisor.interval_ms = 50;
        // A gentle cleanup would empty the cache: only a trim keeps it.
        s.cache.low_watermark = 0.0;
    })
    .await;
    let mut client = server.client().await;
    let texts: Vec<String> = (0..200)
        .map(|i| format!("working set variant {i}"))
        .collect();
    let batch = || text_batch(&texts.iter().map(|s| Some(s.as_str())).collect::<Vec<_>>());
    exchange(&mut client, embed_path(), vec![batch()])
        .await
        .unwrap();
    let (idle, stats) = idle_cleanup_after(&mut client, now_ms()).await;
    assert_eq!(stats["cache"]["entries"], 200, "{stats}");
    assert_eq!(idle["level"], "trim", "{idle}");
    let hits_before = action(&mut client, "stats", "").await["cache"]["hits"]
        .as_u64()
        .unwrap();
    exchange(&mut client, embed_path(), vec![batch()])
        .await
        .unwrap();
    let stats = action(&mut client, "stats", "").await;
    assert_eq!(
        stats["cache"]["hits"].as_u64().unwrap() - hits_before,
        200,
        "every text of the working set is still cached after the lull: {stats}"
    );
    assert!(stats["cleanups"]["trim"].as_u64().unwrap() >= 1, "{stats}");

    // An explicit trim keeps the entries too; a gentle cleanup (pressure) evicts down to
    // the low watermark, here everything.
    let trim = action(&mut client, "cleanup", r#"{"level": "trim"}"#).await;
    let cache_ack = trim["acks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["actor"] == "cache")
        .unwrap()
        .clone();
    assert_eq!(cache_ack["freed_bytes"], 0, "{trim}");
    assert_eq!(
        action(&mut client, "stats", "").await["cache"]["entries"],
        200
    );
    let gentle = action(&mut client, "cleanup", r#"{"level": "gentle"}"#).await;
    assert_eq!(gentle["level"], "gentle", "{gentle}");
    assert_eq!(
        action(&mut client, "stats", "").await["cache"]["entries"],
        0
    );
    server.stop().await;
}

/// The residual creep the long soak's heap profiles found: the cache's hash table doubled
/// its allocation at each growth while the entries' accounting rose smoothly, so memory
/// less the cache's accounted bytes stepped up as the cache filled. Now the table is made
/// once: jemalloc's live bytes less the accounted ones stay level from the first entry to
/// a full cache.
#[test]
fn memory_less_the_cache_stays_level_as_the_cache_fills() {
    use keel_engine::cache::store::VectorCache;
    use keel_engine::memory::allocator;
    let mut cache: VectorCache = VectorCache::new(100 << 20);
    cache.insert(0, std::sync::Arc::from(vec![0.5f32; 384]));
    let base = allocator::stats().allocated as i64 - cache.bytes() as i64;
    let mut worst = 0i64;
    for k in 1..60_000u128 {
        cache.insert(k, std::sync::Arc::from(vec![0.5f32; 384]));
        if k % 1000 == 0 {
            let outside = allocator::stats().allocated as i64 - cache.bytes() as i64;
            worst = worst.max((outside - base).abs());
        }
    }
    assert!(cache.stats().evictions > 0, "the cache filled up");
    assert!(
        worst < 128 * 1024,
        "memory less the cache moved by {worst} bytes as it filled"
    );
}

/// `keel embed` over 10 240 distinct texts (five chunks of 2 048): what the program holds
/// between chunks (jemalloc's allocated bytes, printed on its summary line) stays where
/// the first chunk left it (within 4 MB): once warm, a pass allocates only the vectors it
/// returns.
#[test]
fn keel_embed_holds_a_flat_heap_over_many_texts() {
    let texts: String = (0..10_240)
        // One length for all (a longer pass shape first met late would grow the threads'
        // kernel buffers once: warm-up, not a leak).
        .map(|i| {
            format!(
                "BRCA{} chr17:{} C>T missense_variant #{i:05}\n",
                i % 3,
                43_000_000 + i
            )
        })
        .collect();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["embed", "--precision", "int8", "--model"])
        .arg(repo_root().join("models/all-MiniLM-L6-v2"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(texts.as_bytes()).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = err.lines().rfind(|l| l.starts_with("keel embed:")).unwrap();
    let mb = |label: &str| -> f64 {
        let end = line
            .find(&format!(" MB {label}"))
            .unwrap_or_else(|| panic!("{line}"));
        line[..end].rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (first, last, most) = (mb("first"), mb("last"), mb("most"));
    assert!(line.contains("10240 texts"), "{line}");
    // A pass that kept its activations (MBs each, ~30 passes a chunk) would add tens of
    // MB; the allowance is for threads' caches and buffers met under a loaded machine.
    assert!(
        most <= first + 4.0 && last <= first + 4.0,
        "the heap grew over the run: {line}"
    );
}
