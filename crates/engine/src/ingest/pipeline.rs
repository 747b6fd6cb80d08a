//! From texts to vectors: micro-batches, the cache, the embedder, and the in-flight bound.
//!
//! One [`Pipeline`] serves every stream. A stream first [`Pipeline::admit`]s the rows it
//! is about to read — the returned [`InFlight`] holds that many permits of the
//! `max_in_flight_rows` semaphore until it is dropped, after the rows are sent or stored
//! — then calls [`Pipeline::embed`] with a slice of them. Its distinct texts are looked up
//! once in the first-level cache and, for what that misses, once in the second (Redis);
//! texts another slice is resolving are waited for; the rest go to the embedder in
//! micro-batches of `micro_batch_rows` (one op each), concurrently; the new vectors go
//! into both levels. One lookup per slice rather than per micro-batch keeps the cache
//! actor's messages and Redis's round trips few when everything hits.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use actix::Addr;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::IngestError;
use super::coalesce::{Claimed, InFlightTexts};
use super::config::IngestConfig;
use crate::cache::actor::CacheActor;
use crate::cache::messages::{Insert, Lookup};
use crate::cache::shared::{Found, SharedCache};
use crate::embedder::workers::{EmbedError, EmbedderHandle, Lane};

/// A distinct text of a slice: its cache key, the text, and the rows that carry it.
type Unique<'a> = (u128, &'a str, Vec<usize>);

/// Counters of ingest, read by `stats` and the supervisor.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub ops: AtomicU64,
    pub rows: AtomicU64,
    pub null_rows: AtomicU64,
    pub embedded_rows: AtomicU64,
    /// Rows whose text another slice was embedding at the same moment: they took its
    /// vector instead of computing their own.
    pub coalesced_rows: AtomicU64,
    pub max_in_flight_rows_seen: AtomicU64,
    /// Rows admitted and not yet released (a gauge).
    pub in_flight_rows: AtomicU64,
    /// Time streams spent waiting for permits, in microseconds (backpressure).
    pub admit_wait_micros: AtomicU64,
    pub streams_open: AtomicU64,
    pub streams_total: AtomicU64,
    pub streams_failed: AtomicU64,
    /// Streams refused because the bound was reached (`ingest.when_full: reject`).
    pub rejected_streams: AtomicU64,
}

/// Permits for rows in flight; dropping it releases them.
pub struct InFlight {
    _permit: OwnedSemaphorePermit,
    rows: u64,
    counters: Arc<IngestCounters>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counters
            .in_flight_rows
            .fetch_sub(self.rows, Ordering::Relaxed);
    }
}

pub struct Pipeline {
    cache: Option<Addr<CacheActor>>,
    embedder: EmbedderHandle,
    permits: Arc<Semaphore>,
    /// The fast lane's own rows in flight (`fast_lane_requests` requests of at most
    /// `fast_lane_rows`): a query never queues behind a bulk stream's admission.
    fast_permits: Arc<Semaphore>,
    config: IngestConfig,
    counters: Arc<IngestCounters>,
    /// Set by the supervisor while RSS is above the hard watermark: each row then takes
    /// two permits, halving the rows in flight until memory comes back.
    pressure: Arc<AtomicBool>,
    /// Model id and output settings: the part of every cache key that is not the text.
    key_model: String,
    key_settings: String,
    /// The second level (Redis), looked up for the first level's misses.
    shared: Option<SharedCache>,
    /// Texts being embedded now (by any micro-batch of any stream).
    computing: InFlightTexts,
}

impl Pipeline {
    /// `counters` are shared with whoever reports them (stats, the supervisor's probe).
    pub fn new(
        config: IngestConfig,
        cache: Option<Addr<CacheActor>>,
        embedder: EmbedderHandle,
        key_settings: String,
        counters: Arc<IngestCounters>,
        pressure: Arc<AtomicBool>,
    ) -> Self {
        Self {
            pressure,
            permits: Arc::new(Semaphore::new(config.max_in_flight_rows)),
            fast_permits: Arc::new(Semaphore::new(
                config.fast_lane_rows * config.fast_lane_requests,
            )),
            key_model: embedder.model_id().to_string(),
            cache,
            embedder,
            config,
            counters,
            key_settings,
            shared: None,
            computing: InFlightTexts::default(),
        }
    }

    /// Adds the second cache level (Redis) below the first.
    pub fn with_shared_cache(mut self, shared: Option<SharedCache>) -> Self {
        self.shared = shared;
        self
    }

    pub fn shared_cache(&self) -> Option<&SharedCache> {
        self.shared.as_ref()
    }

    pub fn config(&self) -> &IngestConfig {
        &self.config
    }

    pub fn counters(&self) -> &Arc<IngestCounters> {
        &self.counters
    }

    pub fn dim(&self) -> usize {
        self.embedder.dim()
    }

    pub fn embedder(&self) -> &EmbedderHandle {
        &self.embedder
    }

    /// The semaphore `rows` rows are admitted through: the fast lane's for a request of few
    /// rows, else the bound every stream shares.
    fn semaphore_for(&self, rows: usize) -> &Arc<Semaphore> {
        if rows <= self.config.fast_lane_rows {
            &self.fast_permits
        } else {
            &self.permits
        }
    }

    /// Rows counted in flight and permits taken for a request of `rows` rows.
    fn permits_for(&self, rows: usize) -> (u32, u32) {
        let c = &self.config;
        let holds = if rows <= c.fast_lane_rows {
            c.fast_lane_rows * c.fast_lane_requests
        } else {
            c.max_in_flight_rows
        };
        permits(rows, holds, self.pressure.load(Ordering::Relaxed))
    }

    fn in_flight(&self, permit: OwnedSemaphorePermit, rows: u32) -> InFlight {
        let c = &self.counters;
        let now = c.in_flight_rows.fetch_add(rows as u64, Ordering::Relaxed) + rows as u64;
        c.max_in_flight_rows_seen.fetch_max(now, Ordering::Relaxed);
        InFlight {
            _permit: permit,
            rows: rows as u64,
            counters: c.clone(),
        }
    }

    /// Waits until `rows` more rows may be in flight. `rows` must not exceed
    /// `max_in_flight_rows` (streams take at most `slice_rows` at a time).
    pub async fn admit(&self, rows: usize) -> Result<InFlight, IngestError> {
        let (rows, permits) = self.permits_for(rows);
        let waited = std::time::Instant::now();
        let permit = self
            .semaphore_for(rows as usize)
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| IngestError::Unavailable("the server is shutting down".into()))?;
        self.counters
            .admit_wait_micros
            .fetch_add(waited.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(self.in_flight(permit, rows))
    }

    /// Admits `rows` if there is room now; `ResourceExhausted` if not.
    pub fn try_admit(&self, rows: usize) -> Result<InFlight, IngestError> {
        let (rows, permits) = self.permits_for(rows);
        match self
            .semaphore_for(rows as usize)
            .clone()
            .try_acquire_many_owned(permits)
        {
            Ok(permit) => Ok(self.in_flight(permit, rows)),
            Err(TryAcquireError::Closed) => Err(IngestError::Unavailable(
                "the server is shutting down".into(),
            )),
            Err(TryAcquireError::NoPermits) => {
                self.counters
                    .rejected_streams
                    .fetch_add(1, Ordering::Relaxed);
                Err(IngestError::ResourceExhausted(format!(
                    "{} rows are in flight, the bound (ingest.max_in_flight_rows); this stream \
                     was refused (ingest.when_full: reject): retry it later",
                    self.counters.in_flight_rows.load(Ordering::Relaxed)
                )))
            }
        }
    }

    /// Stops admitting rows: waiting and future `admit`s fail with `Unavailable`.
    pub fn close(&self) {
        self.permits.close();
        self.fast_permits.close();
    }

    /// Vectors for `texts` (a slice: `rows × dim`, zeros where the text is null) and the
    /// validity of each row. The caches are asked once for the whole slice; what they
    /// miss goes to the model in micro-batches (one op each), concurrently.
    pub async fn embed(
        &self,
        texts: Vec<Option<String>>,
    ) -> Result<(Vec<f32>, Vec<bool>), IngestError> {
        let valid: Vec<bool> = texts.iter().map(Option::is_some).collect();
        let out = self.resolve(&texts).await?;
        let nulls = texts.iter().filter(|t| t.is_none()).count();
        let c = &self.counters;
        c.ops.fetch_add(
            texts.len().div_ceil(self.config.micro_batch_rows) as u64,
            Ordering::Relaxed,
        );
        c.rows.fetch_add(texts.len() as u64, Ordering::Relaxed);
        c.null_rows.fetch_add(nulls as u64, Ordering::Relaxed);
        Ok((out, valid))
    }

    /// Embeds `texts` with the model, writes each vector into its rows of `out`, and adds
    /// it to `inserts` (for the caches).
    async fn compute(
        &self,
        lane: Lane,
        texts: &[&Unique<'_>],
        out: &mut [f32],
        inserts: &mut Vec<(u128, Arc<[f32]>)>,
    ) -> Result<(), IngestError> {
        if texts.is_empty() {
            return Ok(());
        }
        let dim = self.dim();
        // One embedder job per micro-batch, all queued at once: the workers share them.
        let jobs = texts.chunks(self.config.micro_batch_rows).map(|chunk| {
            self.embedder
                .embed_in(lane, chunk.iter().map(|u| u.1.to_string()).collect())
        });
        let mut vectors = Vec::with_capacity(texts.len() * dim);
        for result in futures::future::join_all(jobs).await {
            vectors.extend(result.map_err(|e| match e {
                EmbedError::Closed => IngestError::Unavailable("the embedder is shut down".into()),
                EmbedError::Failed(m) => IngestError::Internal(m),
            })?);
        }
        for (u, v) in texts.iter().zip(vectors.chunks_exact(dim)) {
            for &row in &u.2 {
                out[row * dim..(row + 1) * dim].copy_from_slice(v);
            }
            inserts.push((u.0, Arc::<[f32]>::from(v)));
        }
        self.counters
            .embedded_rows
            .fetch_add(texts.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Puts vectors in the first level (when there is one).
    async fn insert_l1(&self, entries: Vec<(u128, Arc<[f32]>)>) -> Result<(), IngestError> {
        match &self.cache {
            Some(cache) if !entries.is_empty() => cache
                .send(Insert { entries })
                .await
                .map_err(|e| IngestError::Internal(format!("cache unavailable: {e}"))),
            _ => Ok(()),
        }
    }

    /// Resolves `mine` (first-level misses this slice claimed) through the second
    /// level: hits are copied out (and into `promoted`); keys leased to this replica, or
    /// that Redis could not answer for, are computed (into `inserts`, written back at
    /// once for the replicas waiting on them); keys another replica is computing are asked
    /// for again, backing off, until they are there or their lease has expired.
    async fn resolve_shared(
        &self,
        lane: Lane,
        shared: &SharedCache,
        mine: &[&Unique<'_>],
        out: &mut [f32],
        inserts: &mut Vec<(u128, Arc<[f32]>)>,
        promoted: &mut Vec<(u128, Arc<[f32]>)>,
    ) -> Result<(), IngestError> {
        let dim = self.dim();
        let give_up = std::time::Instant::now() + shared.max_wait();
        let mut pause = std::time::Duration::from_millis(2);
        let mut pending: Vec<&Unique> = mine.to_vec();
        let mut retry = false;
        while !pending.is_empty() {
            let keys: Vec<u128> = pending.iter().map(|u| u.0).collect();
            let found = if retry && std::time::Instant::now() >= give_up {
                vec![Found::Compute; keys.len()]
            } else {
                shared.lookup(&keys, dim, retry).await
            };
            let (mut compute, mut busy) = (Vec::new(), Vec::new());
            for (u, found) in pending.into_iter().zip(found) {
                match found {
                    Found::Hit(v) => {
                        for &row in &u.2 {
                            out[row * dim..(row + 1) * dim].copy_from_slice(&v);
                        }
                        promoted.push((u.0, v));
                    }
                    Found::Compute => compute.push(u),
                    Found::Busy => busy.push(u),
                }
            }
            let computed = inserts.len();
            self.compute(lane, &compute, out, inserts).await?;
            shared.put(&inserts[computed..]).await;
            if !busy.is_empty() {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            pending = busy;
            retry = true;
        }
        Ok(())
    }

    /// A slice's vectors, `chunk.len() × dim` values: its distinct texts looked up in the
    /// first level, then (claimed against other slices in flight) in the second, the
    /// rest computed.
    async fn resolve(&self, chunk: &[Option<String>]) -> Result<Vec<f32>, IngestError> {
        let dim = self.dim();
        // A request of few rows does not queue behind bulk work.
        let fast = chunk.len() <= self.config.fast_lane_rows;
        let lane = if fast { Lane::Fast } else { Lane::Bulk };
        let mut out = vec![0.0f32; chunk.len() * dim];
        // Unique texts of the chunk and the rows that carry each.
        let mut unique: Vec<Unique> = Vec::new();
        let mut index: HashMap<u128, usize> = HashMap::new();
        for (row, text) in chunk.iter().enumerate() {
            if let Some(text) = text {
                let key = crate::cache::key(&self.key_model, &self.key_settings, text);
                match index.get(&key) {
                    Some(&u) => unique[u].2.push(row),
                    None => {
                        index.insert(key, unique.len());
                        unique.push((key, text, vec![row]));
                    }
                }
            }
        }
        let cached = match &self.cache {
            Some(cache) if !unique.is_empty() => cache
                .send(Lookup {
                    keys: unique.iter().map(|u| u.0).collect(),
                    recheck: false,
                })
                .await
                .map_err(|e| IngestError::Internal(format!("cache unavailable: {e}")))?,
            _ => vec![None; unique.len()],
        };
        let mut misses = Vec::new();
        for (u, hit) in unique.iter().zip(&cached) {
            match hit {
                Some(v) => {
                    for &row in &u.2 {
                        out[row * dim..(row + 1) * dim].copy_from_slice(v);
                    }
                }
                None => misses.push(u),
            }
        }
        if !misses.is_empty() {
            // A text another slice of this process is resolving right now is waited
            // for, not looked up or computed twice. Ours are published before theirs are
            // awaited (no cycle).
            let keys: Vec<u128> = misses.iter().map(|u| u.0).collect();
            let Claimed {
                mine,
                theirs,
                claim,
            } = self.computing.claim(&keys);
            let mut mine: Vec<&Unique> = mine.into_iter().map(|i| misses[i]).collect();
            // Claimed keys found on the second look: published with the computed ones, so
            // that whoever waits on them here gets them too.
            let mut found_again = Vec::new();
            // A claimant puts its vectors in the first level before it releases them, so
            // a key claimed here may have landed since this op's lookup: look again.
            if let (Some(cache), false) = (&self.cache, mine.is_empty()) {
                let found = cache
                    .send(Lookup {
                        keys: mine.iter().map(|u| u.0).collect(),
                        recheck: true,
                    })
                    .await
                    .map_err(|e| IngestError::Internal(format!("cache unavailable: {e}")))?;
                let mut still = Vec::with_capacity(mine.len());
                for (u, hit) in mine.into_iter().zip(found) {
                    match hit {
                        Some(v) => {
                            for &row in &u.2 {
                                out[row * dim..(row + 1) * dim].copy_from_slice(&v);
                            }
                            self.counters
                                .coalesced_rows
                                .fetch_add(u.2.len() as u64, Ordering::Relaxed);
                            found_again.push((u.0, v));
                        }
                        None => still.push(u),
                    }
                }
                mine = still;
            }
            // Computed here (to both levels) and found in the second level (to the first).
            let mut inserts = Vec::with_capacity(mine.len());
            let mut promoted = Vec::new();
            match &self.shared {
                Some(shared) => {
                    self.resolve_shared(lane, shared, &mine, &mut out, &mut inserts, &mut promoted)
                        .await?
                }
                None => self.compute(lane, &mine, &mut out, &mut inserts).await?,
            }
            inserts.append(&mut promoted);
            self.insert_l1(inserts.clone()).await?;
            claim.publish(inserts.iter().chain(&found_again));
            let mut fallback = Vec::new();
            for (i, rx) in theirs {
                let u = misses[i];
                match rx.await {
                    Ok(v) => {
                        for &row in &u.2 {
                            out[row * dim..(row + 1) * dim].copy_from_slice(&v);
                        }
                        self.counters
                            .coalesced_rows
                            .fetch_add(u.2.len() as u64, Ordering::Relaxed);
                    }
                    // Its claimant failed or was cancelled: compute it here.
                    Err(_) => fallback.push(u),
                }
            }
            if !fallback.is_empty() {
                let mut computed = Vec::with_capacity(fallback.len());
                self.compute(lane, &fallback, &mut out, &mut computed)
                    .await?;
                if let Some(shared) = &self.shared {
                    shared.put(&computed).await;
                }
                self.insert_l1(computed).await?;
            }
        }
        Ok(out)
    }
}

/// Rows counted in flight and permits taken for a request of `rows` rows through a
/// semaphore of `holds` permits: twice the rows under memory pressure (so that half as many
/// rows are admitted), never more than the semaphore holds: a request asking for more would
/// wait forever, and every request after it in the semaphore's queue with it (the fast
/// lane holds `fast_lane_rows × fast_lane_requests`, which can be less than twice a
/// request).
fn permits(rows: usize, holds: usize, pressure: bool) -> (u32, u32) {
    let rows = rows.min(holds) as u32;
    let permits = if pressure {
        (rows * 2).min(holds as u32)
    } else {
        rows
    };
    (rows, permits)
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;

    use super::permits;

    /// Under memory pressure a request takes twice its rows in permits, but never more
    /// than its semaphore holds: with `fast_lane_requests: 1` a fast-lane request of 5–8
    /// rows asked for up to 16 of 8 and waited forever.
    #[test]
    fn a_request_under_pressure_never_asks_for_more_than_its_semaphore_holds() {
        for (rows, holds) in [(8, 8), (5, 8), (1, 1), (1024, 1024), (700, 1024)] {
            let semaphore = Semaphore::new(holds);
            let (counted, taken) = permits(rows, holds, true);
            assert_eq!(counted as usize, rows);
            assert!(
                taken as usize >= rows && taken as usize <= holds,
                "{rows} of {holds}"
            );
            assert!(
                semaphore.try_acquire_many(taken).is_ok(),
                "{rows} of {holds}"
            );
        }
        assert_eq!(permits(100, 1024, true), (100, 200));
        assert_eq!(permits(100, 1024, false), (100, 100));
    }
}
