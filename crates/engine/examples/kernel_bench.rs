//! Kernel microbenchmark: times the matrix products of a GGUF model's layers and output at a given
//! token count, on 1 and 2 threads, in the file layout and in this CPU's packed layout (16-row
//! groups where AVX-512 VNNI runs, 8-row groups where AVX2 does). Medians of 30 passes; a tool for kernel work, not a benchmark of
//! record (see `lastmile engine-bench` and BENCHMARKS.md for those).
//!
//!     cargo run --release -p lastmile-engine --example kernel_bench -- MODEL.gguf [TOKENS] [packed]
//!
//! With `packed`, only this CPU's packed layout is timed (the file layout's kernels are slow).

use std::time::Instant;

use lastmile_engine::kernels::{matmul, simd_name, MatmulTask, Q8Acts, QMatrix};
use lastmile_engine::parallel::ThreadPool;
use lastmile_engine::LoadedModel;

/// Median seconds of one pass over every matrix in `mats` at `n` tokens.
fn time_mats(pool: &ThreadPool, mats: &[QMatrix], n: usize, passes: usize) -> f64 {
    let cols = mats.iter().map(|m| m.cols).max().unwrap_or(0);
    let rows = mats.iter().map(|m| m.rows).max().unwrap_or(0);
    let x: Vec<f32> = (0..n * cols)
        .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
        .collect();
    let mut out = vec![0.0f32; n * rows];
    let acts: Vec<Q8Acts> = mats
        .iter()
        .map(|m| {
            let mut a = Q8Acts::default();
            a.quantize(&x, n, m.cols);
            a
        })
        .collect();
    let mut times: Vec<f64> = (0..passes)
        .map(|_| {
            let t0 = Instant::now();
            for (m, a) in mats.iter().zip(&acts) {
                matmul(
                    pool,
                    &mut [MatmulTask {
                        w: m,
                        out: &mut out,
                    }],
                    &x,
                    a,
                    n,
                );
            }
            t0.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: kernel_bench MODEL.gguf [TOKENS] [packed]");
        std::process::exit(2);
    };
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let packed_only = args.next().as_deref() == Some("packed");
    let model = match LoadedModel::load(std::path::Path::new(&path)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("loading {path}: {e}");
            std::process::exit(1);
        }
    };
    let w = &model.model.weights;
    let loaded: Vec<QMatrix> = w
        .layers
        .iter()
        .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
        .cloned()
        .collect();
    let file_layout = |m: &QMatrix| m.file_layout();
    for (layout, layers, output) in [
        (
            "file",
            loaded.iter().map(file_layout).collect::<Vec<_>>(),
            file_layout(&w.output),
        ),
        (simd_name(), loaded.clone(), w.output.clone()),
    ]
    .into_iter()
    .skip(usize::from(packed_only))
    {
        let bytes: usize = layers.iter().map(|m| m.byte_len()).sum();
        for threads in [1, 2] {
            let pool = ThreadPool::new(threads);
            let t = time_mats(&pool, &layers, n, 30);
            println!(
                "{layout:>12} layout, {threads} threads, {n} tokens: layers {:.2} ms ({:.1} GB/s), output {:?} {:.2} ms",
                t * 1e3,
                bytes as f64 / t / 1e9,
                output.kind,
                time_mats(&pool, std::slice::from_ref(&output), n, 30) * 1e3,
            );
        }
    }
}
