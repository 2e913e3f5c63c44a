//! `y = x · Wᵀ` for one or more weight matrices that share the same input, split across the
//! pool by output rows (one join per call, however many matrices — Q, K and V go together).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::amx;
use super::pack::{GroupJob, Packing};
use super::q8::{Q8Acts, Q8Row};
use super::{avx2, avx512};
use super::{dot_rows, QMatrix};
use crate::parallel::{SharedMut, ThreadPool};

/// One matrix of a fused product and where its output goes: `out[t * w.rows + r]`.
pub struct MatmulTask<'a> {
    /// The weights.
    pub w: &'a QMatrix,
    /// `n * w.rows` outputs, token-major.
    pub out: &'a mut [f32],
}

/// Rows handled per inner tile of the file-layout kernels: small enough that the tile's weights
/// stay in L1 while every token passes over them.
const ROW_TILE: usize = 16;
/// Tokens per kernel call.
const TOKEN_TILE: usize = 4;
/// Chunks of a product's rows per thread (see `matmul`).
const CHUNKS_PER_THREAD: usize = 8;

/// Computes every task's product of `n` input rows (`xf` as f32, `xq` the same rows quantized,
/// which must be filled when any task's kind wants it).
pub fn matmul(pool: &ThreadPool, tasks: &mut [MatmulTask<'_>], xf: &[f32], xq: &Q8Acts, n: usize) {
    if tasks.is_empty() || n == 0 {
        return;
    }
    let cols = tasks[0].w.cols;
    for t in tasks.iter() {
        assert_eq!(
            t.w.cols, cols,
            "fused matrices must share their input width"
        );
        assert!(t.out.len() >= n * t.w.rows, "output buffer too small");
    }
    assert!(xf.len() >= n * cols, "input buffer too small");
    // Work is split in units: row groups of packed matrices (their kernels' grain), single
    // rows of the others.
    let unit = |w: &QMatrix| w.packing().map_or(1, Packing::group);
    let units = |w: &QMatrix| w.rows.div_ceil(unit(w));
    let total: usize = tasks.iter().map(|t| units(t.w)).sum();
    let outs: Vec<(&QMatrix, SharedMut<f32>)> = tasks
        .iter_mut()
        .map(|t| (t.w, SharedMut::new(t.out)))
        .collect();
    // Threads take chunks of units in turn rather than fixed halves: on a memory-bound product
    // (decode) one core often gets its bytes later than the other, and a fixed split left each
    // waiting for the other about a fifth of the time. Chunks stay large enough that the
    // prefetch runs well ahead inside each.
    let chunk = total.div_ceil(pool.threads() * CHUNKS_PER_THREAD);
    let next = AtomicUsize::new(0);
    pool.run(&|_| loop {
        let lo = next.fetch_add(chunk, Ordering::Relaxed);
        if lo >= total {
            break;
        }
        let hi = (lo + chunk).min(total);
        let mut base = 0;
        for (w, out) in &outs {
            let (a, b) = (lo.max(base), hi.min(base + units(w)));
            if a < b {
                let (a, b) = (a - base, b - base);
                // SAFETY: each chunk [lo, hi) of the concatenated unit space is taken by exactly
                // one thread, so the (token, row) cells written here are disjoint from every
                // other thread's.
                match w.packing() {
                    Some(packing) => packed_range(w, packing, out, xq, n, a, b),
                    None => rows_range(w, out, xf, xq, n, a, b),
                }
            }
            base += units(w);
        }
    });
}

fn rows_range(
    w: &QMatrix,
    out: &SharedMut<f32>,
    xf: &[f32],
    xq: &Q8Acts,
    n: usize,
    r0: usize,
    r1: usize,
) {
    let cols = w.cols;
    let q8 = w.kind.wants_q8();
    let xf_row = |t: usize| &xf[t * cols..(t + 1) * cols];
    let write = |t: usize, r: usize, v: f32| {
        // SAFETY: (t, r) lies in this thread's row range; see `matmul`.
        unsafe { out.slice(t * w.rows + r, 1)[0] = v };
    };
    let mut tile = r0;
    while tile < r1 {
        let tile_end = (tile + ROW_TILE).min(r1);
        let mut t = 0;
        while t + TOKEN_TILE <= n {
            let xfs: [&[f32]; TOKEN_TILE] = std::array::from_fn(|k| xf_row(t + k));
            let xqs: Option<[Q8Row<'_>; TOKEN_TILE]> =
                q8.then(|| std::array::from_fn(|k| xq.row(t + k)));
            for r in tile..tile_end {
                let v = dot_rows::<TOKEN_TILE>(w.kind, w.row(r), xfs, xqs);
                for (k, v) in v.into_iter().enumerate() {
                    write(t + k, r, v);
                }
            }
            t += TOKEN_TILE;
        }
        while t < n {
            let xqs = q8.then(|| [xq.row(t)]);
            for r in tile..tile_end {
                let v = dot_rows::<1>(w.kind, w.row(r), [xf_row(t)], xqs);
                write(t, r, v[0]);
            }
            t += 1;
        }
        tile = tile_end;
    }
}

/// Row groups `g0..g1` of a packed matrix for every token. VNNI packing: whole 16-token tiles on
/// AMX where it runs, the rest on AVX-512 four tokens at a time; AVX2 packing: four tokens at a
/// time. The kernels of a packing end every block the same way, so each token's result is the
/// same whichever way it went.
fn packed_range(
    w: &QMatrix,
    packing: Packing,
    out: &SharedMut<f32>,
    xq: &Q8Acts,
    n: usize,
    g0: usize,
    g1: usize,
) {
    let job = |t0: usize, prefetch: bool| GroupJob {
        kind: w.kind,
        packing,
        w: w.bytes(),
        rows: w.rows,
        cols: w.cols,
        xq,
        t0,
        g0,
        g1,
        out: out.ptr(),
        prefetch,
    };
    assert!(
        packing.runs_here(),
        "{packing:?} kernels do not run on this CPU"
    );
    let vnni = packing == Packing::Vnni;
    let tiles = if vnni && amx::has_amx() {
        n / amx::TOKENS
    } else {
        0
    };
    let first = tiles * amx::TOKENS;
    let mut t = first;
    // SAFETY: VNNI-packed matrices exist only where `has_vnni` holds (AMX only where `has_amx`),
    // AVX2-packed ones only where `has_avx2` does (`QMatrix::for_this_cpu`; tests pack only what
    // runs); this thread owns row groups [g0, g1) of every token's output (see `matmul`), which
    // `out` holds (`matmul` checked its length); `GroupJob::check` bounds the rest.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        if tiles > 0 {
            amx::groups(&job(0, false), tiles);
        }
        while t < n {
            let r = if t + TOKEN_TILE <= n { TOKEN_TILE } else { 1 };
            let job = job(t, t == first);
            match (vnni, r) {
                (true, TOKEN_TILE) => avx512::groups::<TOKEN_TILE>(&job),
                (true, _) => avx512::groups::<1>(&job),
                (false, TOKEN_TILE) => avx2::groups::<TOKEN_TILE>(&job),
                (false, _) => avx2::groups::<1>(&job),
            }
            t += r;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("packed matrices on a non-x86 target ({t} of {n} tokens)");
}
