//! Once warm, a CPU pass allocates nothing but the vectors it returns: its activations
//! live in the replica's workspace and in each thread's buffers (a block's feed-forward,
//! the kernels' packing).
//! Counted with a global allocator that counts (this test binary only).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

use common::model_dir;
use keel_model::{Backend, BatchLimits, DeviceOptions, ModelDevice, Precision, SentenceModel};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as the caller promised.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller promised.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as the caller promised.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_warm_pass_allocates_only_its_output() {
    let texts = [
        "chr1:g.12345A>G missense variant in BRCA1",
        "x",
        "frameshift variant p.Lys1234fs in TP53, pathogenic, reviewed by expert panel",
        "intron variant",
    ];
    for precision in [Precision::F32, Precision::Bf16, Precision::Int8] {
        let device = ModelDevice::open(
            Backend::Cpu,
            DeviceOptions {
                precision,
                ..DeviceOptions::default()
            },
        )
        .unwrap();
        let model = SentenceModel::load_on(&model_dir(), device).expect("model loads");
        let limits = BatchLimits {
            max_rows: 64,
            max_tokens: 4096,
        };
        model.warm_up(limits);
        let tokens: Vec<Vec<u32>> = texts.iter().map(|t| model.tokenize(t).unwrap()).collect();
        // Passes of every shape used below, so that every thread has touched its buffers.
        let shapes: Vec<Vec<&[u32]>> = (1..=tokens.len())
            .map(|n| tokens[..n].iter().map(|t| t.as_slice()).collect())
            .collect();
        for _ in 0..5 {
            for rows in &shapes {
                model.embed_tokens(rows);
            }
        }
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let passes = 40;
        for i in 0..passes {
            model.embed_tokens(&shapes[i % shapes.len()]);
        }
        let per_pass = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / passes as f64;
        // One allocation per pass: the returned vectors (other threads of the process may
        // allocate now and then; a pass that allocated its activations would make dozens).
        assert!(
            per_pass <= 1.5,
            "{}: {per_pass} allocations per warm pass",
            precision.name()
        );
        assert!(model.workspace_bytes() > 0);
    }
}
