//! The sentence model on real variant texts: tokenization and the forward pass at the
//! batch sizes the engine uses (1, 25 = one micro-batch, 64, 256).
//!
//! `cargo bench --bench model`. Throughput is reported in texts (elements) per second.

mod common;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn tokenize(c: &mut Criterion) {
    let model = common::model();
    let texts = common::variant_texts();
    let mut g = c.benchmark_group("tokenize");
    g.throughput(Throughput::Elements(texts.len() as u64));
    g.bench_function("variant_texts", |b| {
        b.iter(|| {
            for t in &texts {
                std::hint::black_box(model.tokenize(t).unwrap());
            }
        })
    });
    g.finish();
}

fn forward(c: &mut Criterion) {
    let model = common::model();
    let texts = common::variant_texts();
    let tokens: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    for batch in [1usize, 25, 64, 256] {
        let rows: Vec<&[u32]> = tokens.iter().take(batch).map(Vec::as_slice).collect();
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &rows, |b, rows| {
            b.iter(|| pool.install(|| std::hint::black_box(model.embed_tokens(rows))))
        });
    }
    g.finish();
}

criterion_group!(benches, tokenize, forward);
criterion_main!(benches);
