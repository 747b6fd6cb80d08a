//! The embedder workers, the one scheduler of `keel serve` and `keel embed`: vectors come
//! back in input order whatever the passes, and match the float64 reference.

use keel_engine::embedder::config::EmbedderConfig;
use keel_engine::embedder::workers::{EmbedderWorkers, Lane};

use crate::common::repo_root;

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn workers_return_vectors_in_input_order_from_many_small_passes() {
    let reference =
        std::fs::read_to_string(repo_root().join("crates/model/tests/data/minilm-reference.jsonl"))
            .unwrap();
    let refs: Vec<(String, Vec<f32>)> = reference
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let e = v["embedding"].as_array().unwrap();
            (
                v["text"].as_str().unwrap().to_string(),
                e.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            )
        })
        .collect();
    // Two workers, tiny passes: both take several and finish out of order.
    let mut cfg = EmbedderConfig {
        model_dir: repo_root().join("models/all-MiniLM-L6-v2"),
        ..Default::default()
    };
    cfg.cpu.workers = 2;
    cfg.cpu.max_batch_rows = 3;
    let groups = cfg.load_models().unwrap();
    let dim = groups[0].0.dim();
    let workers = EmbedderWorkers::start(groups, 16).unwrap();
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let got = workers.handle().embed_blocking(&texts, 2).unwrap();
    assert_eq!(got.len(), texts.len() * dim);
    for ((text, expected), v) in refs.iter().zip(got.chunks_exact(dim)) {
        assert!(cosine(v, expected) > 0.99999, "{text:?} out of place");
    }
    let stats = workers.handle().stats();
    assert_eq!(stats.rows, texts.len() as u64);
    assert!(stats.passes >= (texts.len() / 3) as u64, "{stats:?}");
    workers.shutdown(std::time::Duration::from_secs(5));
}

/// One CPU worker on MiniLM with passes of up to 64 rows (`edit` changes the rest), a
/// queue of `queue_jobs` places, and a runtime to send it jobs from.
fn one_worker(
    edit: impl FnOnce(&mut EmbedderConfig),
    queue_jobs: usize,
) -> (EmbedderWorkers, tokio::runtime::Runtime) {
    let mut cfg = EmbedderConfig {
        model_dir: repo_root().join("models/all-MiniLM-L6-v2"),
        ..Default::default()
    };
    cfg.cpu.workers = 1;
    cfg.cpu.max_batch_rows = 64;
    edit(&mut cfg);
    let workers = EmbedderWorkers::start(cfg.load_models().unwrap(), queue_jobs).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (workers, runtime)
}

/// A query on the fast lane does not wait behind the bulk jobs queued before it: with one
/// worker and 24 bulk jobs of 64 texts queued first, the query is answered at the next
/// pass boundary, before most of them (without the fast lane it would come last).
#[test]
fn a_fast_lane_job_overtakes_queued_bulk_jobs() {
    let (workers, runtime) = one_worker(|_| {}, 64);
    let handle = workers.handle();
    let bulk_done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (bulk_jobs, answered_after) = runtime.block_on(async {
        let mut bulk = Vec::new();
        for j in 0..24 {
            let (handle, done) = (handle.clone(), bulk_done.clone());
            let texts: Vec<String> = (0..64)
                .map(|i| format!("bulk job {j} row {i}: GENE{} missense_variant", i % 17))
                .collect();
            bulk.push(tokio::spawn(async move {
                handle.embed_in(Lane::Bulk, texts).await.unwrap();
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        // Let the bulk jobs reach the queue and the worker start on them.
        while handle.stats().passes == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let query = handle
            .embed_in(Lane::Fast, vec!["BRCA1 frameshift_variant".into()])
            .await
            .unwrap();
        assert_eq!(query.len(), handle.dim());
        let after = bulk_done.load(std::sync::atomic::Ordering::SeqCst);
        for b in bulk {
            b.await.unwrap();
        }
        (24, after)
    });
    assert!(
        answered_after <= bulk_jobs / 2,
        "the query was answered after {answered_after} of {bulk_jobs} bulk jobs"
    );
    assert_eq!(handle.stats().fast_jobs, 1);
    workers.shutdown(std::time::Duration::from_secs(5));
}

/// A query waits at most for the pass in progress, never for a whole batch: a batch
/// answers its jobs when its last pass is done, so a fast job the worker finds waiting
/// when it takes its next batch gets a batch of its own. Counted in rows, not time: with
/// one worker and passes of 64 rows under a deep bulk queue, at most one pass of bulk rows
/// is computed between a query's arrival and its answer (a batch is 4 passes, 256 rows).
#[test]
fn a_query_waits_for_the_pass_in_progress_not_the_batch() {
    let (workers, runtime) = one_worker(|c| c.cpu.max_batch_tokens = 64 * 64, 256);
    let handle = workers.handle();
    let worst = runtime.block_on(async {
        let mut bulk = Vec::new();
        for j in 0..160 {
            let handle = handle.clone();
            let texts: Vec<String> = (0..25)
                .map(|i| format!("bulk job {j} row {i}: GENE{} missense_variant", i % 17))
                .collect();
            bulk.push(tokio::spawn(async move {
                handle.embed_in(Lane::Bulk, texts).await.unwrap();
            }));
        }
        while handle.stats().passes == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let mut worst = 0;
        for q in 0..24 {
            let before = handle.stats().rows;
            handle
                .embed_in(Lane::Fast, vec![format!("query {q}: TP53 stop_gained")])
                .await
                .unwrap();
            let during = handle.stats().rows - before - 1;
            worst = worst.max(during);
            // Arrive at another point of the next pass.
            tokio::time::sleep(std::time::Duration::from_millis(7 * (q % 5))).await;
        }
        for b in bulk {
            b.await.unwrap();
        }
        worst
    });
    assert!(
        worst <= 64,
        "a query waited while {worst} bulk rows were computed (a pass is 64 rows)"
    );
    assert_eq!(handle.stats().fast_jobs, 24);
    workers.shutdown(std::time::Duration::from_secs(5));
}
