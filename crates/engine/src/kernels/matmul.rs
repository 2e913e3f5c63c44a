//! `y = x · Wᵀ` for one or more weight matrices that share the same input, split across the
//! pool by output rows (one join per call, however many matrices — Q, K and V go together).

use super::amx;
use super::avx512::{self, OutPtr};
use super::q8::{Q8Acts, Q8Row};
use super::{dot_rows, QMatrix};
use crate::parallel::{SharedMut, ThreadPool};

/// One matrix of a fused product and where its output goes: `out[t * w.rows + r]`.
pub struct MatmulTask<'a> {
    /// The weights.
    pub w: &'a QMatrix,
    /// `n * w.rows` outputs, token-major.
    pub out: &'a mut [f32],
}

/// Rows handled per inner tile: small enough that the tile's weights stay in L1 while every
/// token passes over them.
const ROW_TILE: usize = 16;
/// Tokens per kernel call.
const TOKEN_TILE: usize = 4;

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
    let total_rows: usize = tasks.iter().map(|t| t.w.rows).sum();
    let outs: Vec<(&QMatrix, SharedMut<f32>)> = tasks
        .iter_mut()
        .map(|t| (t.w, SharedMut::new(t.out)))
        .collect();
    let threads = pool.threads();
    pool.run(&|tid| {
        let lo = total_rows * tid / threads;
        let hi = total_rows * (tid + 1) / threads;
        let mut base = 0;
        for (w, out) in &outs {
            let (a, b) = (lo.max(base), hi.min(base + w.rows));
            if a < b {
                // SAFETY: each thread owns rows [lo, hi) of the concatenated row space, so the
                // (token, row) cells written here are disjoint from every other thread's.
                rows_range(w, out, xf, xq, n, a - base, b - base);
            }
            base += w.rows;
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
    if w.is_packed() {
        return packed_range(w, out, xq, n, r0, r1);
    }
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

/// `rows_range` for packed matrices: the AVX-512 kernels take whole row tiles per call.
fn packed_range(w: &QMatrix, out: &SharedMut<f32>, xq: &Q8Acts, n: usize, r0: usize, r1: usize) {
    let bytes = w.bytes();
    // Whole tiles of 16 tokens on AMX where it runs; the tokens left over on AVX-512.
    let amx_tiles = if amx::has_amx() { n / amx::TOKENS } else { 0 };
    #[cfg(target_arch = "x86_64")]
    if amx_tiles > 0 {
        // SAFETY: AMX detected and granted; this thread owns rows [r0, r1) of every token's
        // output (see `matmul`), which `out` holds (`matmul` checked its length).
        unsafe {
            amx::rows(
                w.kind,
                bytes,
                w.rows,
                w.cols,
                xq,
                0,
                amx_tiles,
                r0,
                r1,
                out.ptr(),
            );
        }
    }
    let first = amx_tiles * amx::TOKENS;
    let mut tile = r0;
    while tile < r1 {
        let tile_end = (tile + ROW_TILE).min(r1);
        let mut t = first;
        while t < n {
            // SAFETY: packed matrices exist only where `has_vnni` holds; this thread owns rows
            // [r0, r1) of every token's output (see `matmul`), and `at` stays inside `out`.
            unsafe {
                let o = OutPtr {
                    ptr: out.ptr().add(t * w.rows),
                    stride: w.rows,
                };
                if t + TOKEN_TILE <= n {
                    let xs: [Q8Row<'_>; TOKEN_TILE] = std::array::from_fn(|k| xq.row(t + k));
                    avx512::rows::<TOKEN_TILE>(
                        w.kind,
                        bytes,
                        w.cols,
                        &xs,
                        tile,
                        tile_end,
                        o,
                        t == first,
                    );
                    t += TOKEN_TILE;
                } else {
                    let xs = [xq.row(t)];
                    avx512::rows::<1>(w.kind, bytes, w.cols, &xs, tile, tile_end, o, t == first);
                    t += 1;
                }
            }
        }
        tile = tile_end;
    }
}
