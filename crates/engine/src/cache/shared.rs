//! The second-level cache: vectors shared by every Keel of a fleet through Redis.
//!
//! The in-process LRU stays the first level. A slice's first-level misses are
//! looked up here in one round trip (`MGET`); the vectors the model then
//! computes are written back off the hot path, by one writer task that drains a bounded
//! queue into pipelined `SET ... EX` commands (a full queue drops the write and counts it).
//!
//! Redis trouble never fails a stream: a lookup that errs or outlasts `timeout_ms` is a
//! miss, counted; after `breaker_errors` failures in a row a circuit breaker stops asking
//! for `breaker_open_ms`, then lets one lookup through to probe (a success closes it).
//! The connection is redis-rs's `ConnectionManager`, which reconnects with back-off, so a
//! restarted Redis is found again without restarting Keel.
//!
//! A text is embedded once per fleet, not once per replica that misses it at the same
//! time: the lookup is a small Lua script that, for each key not in Redis, takes a lease
//! on it (`SET lease NX PX lease_ms`) in the same round trip. The replica holding the
//! lease computes the vector; the others see the key as busy and ask again (2 ms, doubling
//! to 50 ms) until its vector is written back or the lease expires (a replica that died
//! holding it), when one of them takes the lease over. `lease_ms: 0` turns leases off
//! (a plain `MGET`).
//!
//! Keys are `key_prefix` + the 32 hex digits of the first-level key, which hashes the
//! model's identity (weights digest, pooling, normalisation, truncation, precision) with
//! the text: another model or precision on the same Redis never gets a hit. Values are the
//! vector's little-endian f32 bytes; a value of another length is a miss (and an error).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, mpsc};

/// `cache.shared:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedCacheConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` for TLS); `None`: off.
    pub url: Option<String>,
    /// Prefix of every key Keel writes.
    pub key_prefix: String,
    /// Seconds a written vector lives (`SET ... EX`); 0 = no expiry.
    pub ttl_s: u64,
    /// Longest wait for one lookup round trip; a slower one is a miss.
    pub timeout_ms: u64,
    /// Vectors queued for writing back at most; beyond, writes are dropped (and counted).
    pub max_pending_writes: usize,
    /// Failed lookups in a row that open the circuit breaker.
    pub breaker_errors: u32,
    /// How long an open breaker skips Redis before one lookup probes it again.
    pub breaker_open_ms: u64,
    /// How long a replica may take to compute the vectors it leased before another
    /// replica takes them over (longer than a micro-batch takes on a loaded replica); 0:
    /// no leases, so replicas that miss a text at the same time each embed it.
    pub lease_ms: u64,
}

impl Default for SharedCacheConfig {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "keel:v1:".into(),
            ttl_s: 7 * 24 * 3600,
            timeout_ms: 50,
            max_pending_writes: 16_384,
            breaker_errors: 5,
            breaker_open_ms: 5_000,
            lease_ms: 5_000,
        }
    }
}

impl SharedCacheConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.url {
            redis::Client::open(url.as_str())
                .map_err(|e| format!("cache.shared.url {url:?}: {e}"))?;
        }
        if self.timeout_ms == 0 {
            return Err("cache.shared.timeout_ms must be at least 1".into());
        }
        if self.breaker_errors == 0 {
            return Err("cache.shared.breaker_errors must be at least 1".into());
        }
        Ok(())
    }
}

/// The second level's figures (`stats` → `cache.shared`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SharedCacheStats {
    /// Vectors found in Redis.
    pub hits: u64,
    /// Keys looked up and not found.
    pub misses: u64,
    /// Lookups that failed (connection, protocol, a value of the wrong length).
    pub errors: u64,
    /// Lookups that outlasted `timeout_ms`.
    pub timeouts: u64,
    /// Keys not looked up because the breaker was open.
    pub skipped: u64,
    /// Keys this replica leased (it computes them for the fleet).
    pub leased: u64,
    /// Keys another replica was computing, waited for rather than computed here.
    pub waited: u64,
    /// Keys waited for whose lease expired, taken over and computed here.
    pub taken_over: u64,
    /// Times the breaker opened.
    pub breaker_trips: u64,
    pub breaker_open: bool,
    /// Vectors written back, failed writes, and writes dropped on a full queue.
    pub writes: u64,
    pub write_errors: u64,
    pub writes_dropped: u64,
    /// Lookup round trips and their total and longest time.
    pub lookups: u64,
    pub lookup_micros_total: u64,
    pub lookup_micros_max: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    skipped: AtomicU64,
    leased: AtomicU64,
    waited: AtomicU64,
    taken_over: AtomicU64,
    breaker_trips: AtomicU64,
    writes: AtomicU64,
    write_errors: AtomicU64,
    writes_dropped: AtomicU64,
    lookups: AtomicU64,
    lookup_micros_total: AtomicU64,
    lookup_micros_max: AtomicU64,
}

/// Consecutive failures, and until when the breaker stays open.
#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    /// A probe is out while the breaker is half-open: others keep skipping.
    probing: bool,
    /// Counts probes, so that a probe's [`Probe`] guard clears only its own.
    probe: u64,
}

/// A lookup let through by [`SharedCache::admit`]. Dropped without an answer recorded (its
/// future dropped: an HTTP request past its queue timeout, a client that left), a
/// half-open probe is cleared, so that the next lookup probes again: otherwise the
/// breaker stayed open until the process restarted.
struct Probe<'a> {
    breaker: &'a std::sync::Mutex<Breaker>,
    /// The probe this lookup is, if it is one.
    probe: Option<u64>,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.probe {
            let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
            if b.probe == id {
                b.probing = false;
            }
        }
    }
}

/// `KEYS[1..n]`: the vectors' keys, `KEYS[n+1..2n]`: their leases; `ARGV`: this
/// replica's owner token and the lease in ms. Per key: the vector, 1 (not there, leased to
/// the caller) or 0 (not there, leased to another replica).
const LOOKUP_AND_LEASE: &str = r#"
local n = #KEYS / 2
local out = {}
for i = 1, n do
  local v = redis.call('GET', KEYS[i])
  if v then
    out[i] = v
  elseif redis.call('SET', KEYS[n + i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// What the second level said of one key.
#[derive(Debug, Clone)]
pub enum Found {
    Hit(Arc<[f32]>),
    /// Compute it here: not found and leased to this replica, or Redis could not say.
    Compute,
    /// Another replica is computing it: ask again shortly.
    Busy,
}

/// Handle to the second level; cheap to clone.
#[derive(Clone)]
pub struct SharedCache {
    inner: Arc<Inner>,
}

struct Inner {
    config: SharedCacheConfig,
    client: redis::Client,
    /// Made on first use, inside the runtime that serves streams.
    connection: OnceCell<ConnectionManager>,
    writes: OnceCell<mpsc::Sender<(u128, Arc<[f32]>)>>,
    counters: Counters,
    breaker: Mutex<Breaker>,
    breaker_open: AtomicBool,
    /// This replica's name on the leases it takes (for whoever inspects Redis).
    owner: String,
}

impl SharedCache {
    /// `None` when `config.url` is unset. Connecting is lazy: Redis being down at
    /// start-up only counts errors until it is up.
    pub fn new(config: &SharedCacheConfig) -> Result<Option<Self>, String> {
        let Some(url) = &config.url else {
            return Ok(None);
        };
        let client = redis::Client::open(url.as_str())
            .map_err(|e| format!("cache.shared.url {url:?}: {e}"))?;
        Ok(Some(Self {
            inner: Arc::new(Inner {
                config: config.clone(),
                client,
                connection: OnceCell::new(),
                writes: OnceCell::new(),
                counters: Counters::default(),
                breaker: Mutex::new(Breaker::default()),
                breaker_open: AtomicBool::new(false),
                owner: format!(
                    "{}:{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0)
                ),
            }),
        }))
    }

    fn redis_key(&self, key: u128) -> String {
        format!("{}{key:032x}", self.inner.config.key_prefix)
    }

    fn lease_key(&self, key: u128) -> String {
        format!("{}lease:{key:032x}", self.inner.config.key_prefix)
    }

    async fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        let i = &self.inner;
        let timeout = Duration::from_millis(i.config.timeout_ms);
        i.connection
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
                    .set_response_timeout(Some(timeout))
                    // Reconnection: 100 ms doubling to 5 s, a few tries per failure; the
                    // breaker paces how often a failure starts another round.
                    .set_min_delay(Duration::from_millis(100))
                    .set_max_delay(Duration::from_secs(5))
                    .set_number_of_retries(3);
                ConnectionManager::new_lazy_with_config(i.client.clone(), config)
            })
            .await
            .cloned()
    }

    /// Whether a lookup may go to Redis now (closed breaker, or the one half-open probe):
    /// `Some` while it may, held until the lookup ends.
    fn admit(&self) -> Option<Probe<'_>> {
        let breaker = &self.inner.breaker;
        let mut b = breaker.lock().unwrap_or_else(|e| e.into_inner());
        match b.open_until {
            None => Some(Probe {
                breaker,
                probe: None,
            }),
            Some(until) if Instant::now() >= until && !b.probing => {
                b.probing = true;
                b.probe += 1;
                Some(Probe {
                    breaker,
                    probe: Some(b.probe),
                })
            }
            Some(_) => None,
        }
    }

    fn record(&self, ok: bool) {
        let i = &self.inner;
        let mut b = i.breaker.lock().unwrap_or_else(|e| e.into_inner());
        b.probing = false;
        if ok {
            b.failures = 0;
            if b.open_until.take().is_some() {
                tracing::info!("Redis answers again: the shared cache is back");
            }
        } else {
            b.failures += 1;
            if b.failures >= i.config.breaker_errors {
                if b.open_until.is_none() {
                    i.counters.breaker_trips.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        failures = b.failures,
                        "Redis keeps failing: the shared cache is skipped for {} ms at a time",
                        i.config.breaker_open_ms
                    );
                }
                b.open_until =
                    Some(Instant::now() + Duration::from_millis(i.config.breaker_open_ms));
            }
        }
        i.breaker_open
            .store(b.open_until.is_some(), Ordering::Relaxed);
    }

    /// Looks `keys` up in one round trip and, with leases on, leases the ones not found
    /// (see the module doc). Never fails: trouble is counted and reads as
    /// [`Found::Compute`]. `retry`: these keys were [`Found::Busy`] before (an expired
    /// lease taken now counts as a takeover, not a new lease).
    pub async fn lookup(&self, keys: &[u128], dim: usize, retry: bool) -> Vec<Found> {
        let c = &self.inner.counters;
        let compute = || vec![Found::Compute; keys.len()];
        if keys.is_empty() {
            return compute();
        }
        let Some(_probe) = self.admit() else {
            c.skipped.fetch_add(keys.len() as u64, Ordering::Relaxed);
            return compute();
        };
        let started = Instant::now();
        let lease_ms = self.inner.config.lease_ms;
        // A plain MGET first (the cheap hit path); the keys it did not find go through
        // the lease script (which looks again: a vector written meanwhile is a hit).
        let lookup = async {
            let mut conn = self.connection().await?;
            let mut mget = redis::cmd("MGET");
            for &k in keys {
                mget.arg(self.redis_key(k));
            }
            let mut values = mget.query_async::<Vec<redis::Value>>(&mut conn).await?;
            let missing: Vec<usize> = (0..values.len())
                .filter(|&i| matches!(values[i], redis::Value::Nil))
                .collect();
            if lease_ms > 0 && !missing.is_empty() && values.len() == keys.len() {
                let mut eval = redis::cmd("EVAL");
                eval.arg(LOOKUP_AND_LEASE).arg(missing.len() * 2);
                for &i in &missing {
                    eval.arg(self.redis_key(keys[i]));
                }
                for &i in &missing {
                    eval.arg(self.lease_key(keys[i]));
                }
                eval.arg(&self.inner.owner).arg(lease_ms);
                let leased = eval.query_async::<Vec<redis::Value>>(&mut conn).await?;
                if leased.len() != missing.len() {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "the lease script answered for another number of keys",
                    )));
                }
                for (i, v) in missing.into_iter().zip(leased) {
                    values[i] = v;
                }
            }
            Ok::<_, redis::RedisError>(values)
        };
        let timeout = Duration::from_millis(self.inner.config.timeout_ms);
        let answer = tokio::time::timeout(timeout, lookup).await;
        let micros = started.elapsed().as_micros() as u64;
        c.lookups.fetch_add(1, Ordering::Relaxed);
        c.lookup_micros_total.fetch_add(micros, Ordering::Relaxed);
        c.lookup_micros_max.fetch_max(micros, Ordering::Relaxed);
        metrics::histogram!("keel_cache_shared_lookup_seconds").record(micros as f64 / 1e6);
        let values = match answer {
            Ok(Ok(v)) if v.len() == keys.len() => v,
            Ok(Ok(v)) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(got = v.len(), asked = keys.len(), "lookup answered oddly");
                self.record(false);
                return compute();
            }
            Ok(Err(e)) => {
                c.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "shared cache lookup failed");
                self.record(false);
                return compute();
            }
            Err(_) => {
                c.timeouts.fetch_add(1, Ordering::Relaxed);
                self.record(false);
                return compute();
            }
        };
        self.record(true);
        let count = |a: &AtomicU64| a.fetch_add(1, Ordering::Relaxed);
        values
            .into_iter()
            .map(|v| match v {
                redis::Value::BulkString(bytes) if bytes.len() == dim * 4 => {
                    count(&c.hits);
                    if retry {
                        count(&c.waited);
                    }
                    Found::Hit(
                        bytes
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect(),
                    )
                }
                // Not there: leased to this replica (1), or MGET's nil with leases off.
                redis::Value::Int(1) | redis::Value::Nil => {
                    if retry {
                        count(&c.taken_over);
                    } else {
                        count(&c.misses);
                        if lease_ms > 0 {
                            count(&c.leased);
                        }
                    }
                    Found::Compute
                }
                // Not there and leased to another replica.
                redis::Value::Int(0) => {
                    if !retry {
                        count(&c.misses);
                    }
                    Found::Busy
                }
                _ => {
                    count(&c.errors);
                    Found::Compute
                }
            })
            .collect()
    }

    /// How long a key may stay busy before this replica computes it anyway: two leases
    /// (a lease taken over may be held for a full lease again).
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.inner.config.lease_ms.saturating_mul(2))
    }

    /// Queues vectors for writing back; returns at once (a full queue drops them).
    pub async fn put(&self, entries: &[(u128, Arc<[f32]>)]) {
        if entries.is_empty() || self.inner.breaker_open.load(Ordering::Relaxed) {
            return;
        }
        let tx = self
            .inner
            .writes
            .get_or_init(|| async {
                let (tx, rx) = mpsc::channel(self.inner.config.max_pending_writes.max(1));
                tokio::spawn(writer(self.clone(), rx));
                tx
            })
            .await;
        for e in entries {
            if tx.try_send(e.clone()).is_err() {
                self.inner
                    .counters
                    .writes_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn stats(&self) -> SharedCacheStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SharedCacheStats {
            hits: l(&c.hits),
            misses: l(&c.misses),
            errors: l(&c.errors),
            timeouts: l(&c.timeouts),
            skipped: l(&c.skipped),
            leased: l(&c.leased),
            waited: l(&c.waited),
            taken_over: l(&c.taken_over),
            breaker_trips: l(&c.breaker_trips),
            breaker_open: self.inner.breaker_open.load(Ordering::Relaxed),
            writes: l(&c.writes),
            write_errors: l(&c.write_errors),
            writes_dropped: l(&c.writes_dropped),
            lookups: l(&c.lookups),
            lookup_micros_total: l(&c.lookup_micros_total),
            lookup_micros_max: l(&c.lookup_micros_max),
        }
    }
}

/// Drains the write queue: whatever is waiting goes out as one pipeline of `SET`s.
async fn writer(cache: SharedCache, mut rx: mpsc::Receiver<(u128, Arc<[f32]>)>) {
    const MAX_PER_PIPELINE: usize = 512;
    let mut batch = Vec::with_capacity(MAX_PER_PIPELINE);
    while rx.recv_many(&mut batch, MAX_PER_PIPELINE).await > 0 {
        let c = &cache.inner.counters;
        let n = batch.len() as u64;
        if cache.inner.breaker_open.load(Ordering::Relaxed) {
            c.writes_dropped.fetch_add(n, Ordering::Relaxed);
            batch.clear();
            continue;
        }
        let ttl = cache.inner.config.ttl_s;
        let leases = cache.inner.config.lease_ms > 0;
        let mut pipe = redis::pipe();
        for (key, vector) in batch.drain(..) {
            let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
            let set = pipe.cmd("SET").arg(cache.redis_key(key)).arg(bytes);
            if ttl > 0 {
                set.arg("EX").arg(ttl);
            }
            set.ignore();
            if leases {
                pipe.cmd("UNLINK").arg(cache.lease_key(key)).ignore();
            }
        }
        // Writes get a longer deadline than lookups: nobody waits on them.
        let timeout = Duration::from_millis(cache.inner.config.timeout_ms.max(1) * 20);
        let sent = tokio::time::timeout(timeout, async {
            let mut conn = cache.connection().await?;
            pipe.query_async::<()>(&mut conn).await
        })
        .await;
        match sent {
            Ok(Ok(())) => c.writes.fetch_add(n, Ordering::Relaxed),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "shared cache write failed");
                c.write_errors.fetch_add(n, Ordering::Relaxed)
            }
            Err(_) => c.write_errors.fetch_add(n, Ordering::Relaxed),
        };
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::{SharedCache, SharedCacheConfig};

    /// A half-open probe whose lookup is dropped before Redis answers (an HTTP request
    /// past its queue timeout, a client that left) does not leave the breaker open for
    /// good: the next lookup after the open time probes again.
    #[tokio::test]
    async fn a_probe_dropped_before_its_answer_lets_the_next_lookup_probe() {
        // A "Redis" that accepts connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", silent.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                open.push(socket);
            }
        });
        let cache = SharedCache::new(&SharedCacheConfig {
            url: Some(url),
            timeout_ms: 100,
            breaker_errors: 1,
            breaker_open_ms: 20,
            lease_ms: 0,
            ..SharedCacheConfig::default()
        })
        .unwrap()
        .unwrap();
        cache.lookup(&[1], 4, false).await;
        let stats = cache.stats();
        assert!(stats.breaker_open && stats.lookups == 1, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(40)).await;
        // The probe: polled once (its round trip out), then dropped.
        assert!(cache.lookup(&[2], 4, false).now_or_never().is_none());
        tokio::time::sleep(Duration::from_millis(40)).await;
        let before = cache.stats().skipped;
        cache.lookup(&[3], 4, false).await;
        let stats = cache.stats();
        assert_eq!(stats.skipped, before, "looked up, not skipped: {stats:?}");
        assert_eq!(stats.lookups, 2, "{stats:?}");
        held.abort();
    }
}
