//! `y = x · Wᵀ` for one or more weight matrices that share the same input, split across the
//! pool by output rows (one join per call, however many matrices — Q, K and V go together).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::amx;
use super::pack::{chunk_bytes, prefetch_range, GroupJob, Packing, PREFETCH_BYTES};
use super::q8::{Q8Acts, Q8Row};
use super::{avx2, avx512};
use super::{dot_rows, has_avx2, has_vnni, QKind, QMatrix, QK};
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
/// Rows x tokens of a float product's register tile (`float_range`): with two accumulator
/// chains a sum, twelve accumulators, three converted weight blocks and one activation block
/// fill the sixteen registers (3 x 2 and 2 x 3 timed alike on an AVX2-only AMD EPYC; a 3 x 4
/// tile summing its two chains in two passes was 12% slower).
const FLOAT_TILE: (usize, usize) = (3, 2);
/// Bytes of float weight rows every pair of tokens passes over before the next rows: they stay
/// near (L1, L2) while the pair's activations stay in L1 (`kernel_bench`, AVX2-only AMD EPYC,
/// F16 layers at 128 tokens: 24, 32 and 64 KiB timed alike, 5–8% faster than 8 or 16 KiB).
const FLOAT_TILE_BYTES: usize = 32 << 10;
/// The same for AVX-512 (`wide_float_range`): two chains a sum, twenty-four accumulators, four
/// weight blocks and one activation block of the thirty-two registers.
const WIDE_FLOAT_TILE: (usize, usize) = (4, 3);
/// Tokens from which an AVX-512 product over 16-bit rows widens each row tile to f32 once for
/// all of them (below, each tile converts its blocks in the loop, for every token group).
const WIDEN_MIN_TOKENS: usize = 4;
/// Bytes of widened (f32) rows in an AVX-512 row tile.
const WIDE_TILE_BYTES: usize = 32 << 10;
/// Tokens from which a Q5 product unpacks its k-rows once for all of them (below, each kernel
/// call unpacks the chunks it reads for its four tokens). Q5's fifth bits make unpacking cost
/// more than the bytes it saves; Q4's nibbles cost less (unpacked, Q4's products of 512 tokens
/// were 4–7% slower, Q5's 15–18% faster).
const UNPACK_MIN_TOKENS: usize = 16;
/// Most bytes of k-rows unpacked at a time: they stay in L2 while every token passes over them.
const UNPACK_BYTES: usize = 256 << 10;
/// A product's largest chunks: its units over this many per thread (see `ChunkQueue`).
const CHUNKS_PER_THREAD: usize = 2;
/// Its smallest: the largest over this.
const FLOOR_DIVISOR: usize = 16;

/// Work units of a product: row groups of packed matrices (their kernels' grain), single rows
/// of the others.
fn units(w: &QMatrix) -> usize {
    w.rows.div_ceil(w.packing().map_or(1, Packing::group))
}

/// Prefetches `len` bytes of weights from unit `u` of the unit space the matrices span, in
/// order (nothing where that unit's matrix is not packed).
fn prefetch_units(mats: &[(&QMatrix, SharedMut<f32>)], u: usize, len: usize) {
    let mut base = 0;
    for (w, _) in mats {
        if u < base + units(w) {
            if let Some(p) = w.packing() {
                let at = (u - base) * (w.cols / QK) * chunk_bytes(w.kind, p);
                prefetch_range(w.bytes(), at, len);
            }
            return;
        }
        base += units(w);
    }
}

/// How a product's units are handed to the pool's threads. Thread `i` starts with chunk `i`;
/// the rest are claimed as threads get to them, each a share of what is left (guided
/// self-scheduling): large while much remains, so each chunk is a long stream the prefetch runs
/// well ahead in, and short at the end, so the threads finish together (on a memory-bound
/// product one core often gets its bytes later than the other: a fixed split left each waiting
/// for the other about a fifth of the time, fixed chunks still a few percent).
struct ChunkQueue {
    total: usize,
    threads: usize,
    /// The largest chunk (and each thread's first).
    cap: usize,
    /// The smallest chunk (but the very last).
    floor: usize,
    next: AtomicUsize,
}

impl ChunkQueue {
    fn new(total: usize, threads: usize, chunks_per_thread: usize, floor_div: usize) -> Self {
        let cap = total.div_ceil(threads * chunks_per_thread).max(1);
        Self {
            total,
            threads,
            cap,
            floor: (cap / floor_div).max(1),
            next: AtomicUsize::new((threads * cap).min(total)),
        }
    }

    /// Thread `tid`'s first chunk (empty where there are fewer chunks than threads).
    fn first(&self, tid: usize) -> (usize, usize) {
        let lo = (tid * self.cap).min(self.total);
        (lo, (lo + self.cap).min(self.total))
    }

    /// The next unclaimed chunk (empty once every unit is taken).
    fn claim(&self) -> (usize, usize) {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            if cur >= self.total {
                return (self.total, self.total);
            }
            let size = ((self.total - cur) / (2 * self.threads)).clamp(self.floor, self.cap);
            let hi = (cur + size).min(self.total);
            match self
                .next
                .compare_exchange_weak(cur, hi, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return (cur, hi),
                Err(now) => cur = now,
            }
        }
    }
}

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
    let outs: Vec<(&QMatrix, SharedMut<f32>)> = tasks
        .iter_mut()
        .map(|t| (t.w, SharedMut::new(t.out)))
        .collect();
    let total = outs.iter().map(|(w, _)| units(w)).sum();
    let queue = ChunkQueue::new(total, pool.threads(), CHUNKS_PER_THREAD, FLOOR_DIVISOR);
    pool.run(&|tid| {
        let (mut lo, mut hi) = queue.first(tid);
        while lo < hi {
            // A thread claims its next chunk as it starts one and prefetches that chunk's first
            // bytes: a chunk is a new memory stream, whose head the in-kernel prefetch (a fixed
            // distance ahead of the bytes being read) does not cover.
            let (ahead, ahead_hi) = queue.claim();
            if ahead < ahead_hi {
                prefetch_units(&outs, ahead, PREFETCH_BYTES);
            }
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
                        None if w.kind.is_float() && has_vnni() => {
                            wide_float_range(w, out, xf, n, a, b)
                        }
                        None if w.kind.is_float() && has_avx2() => float_range(w, out, xf, n, a, b),
                        None => rows_range::<TOKEN_TILE>(w, out, xf, xq, n, a, b),
                    }
                }
                base += units(w);
            }
            (lo, hi) = (ahead, ahead_hi);
        }
    });
}

/// Rows `r0..r1` of a matrix in the file layout for every token, `T` tokens per kernel call
/// (and the rest one at a time).
fn rows_range<const T: usize>(
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
        while t + T <= n {
            let xfs: [&[f32]; T] = std::array::from_fn(|k| xf_row(t + k));
            let xqs: Option<[Q8Row<'_>; T]> = q8.then(|| std::array::from_fn(|k| xq.row(t + k)));
            for r in tile..tile_end {
                let v = dot_rows::<T>(w.kind, w.row(r), xfs, xqs);
                for (k, v) in v.into_iter().enumerate() {
                    write(t + k, r, v);
                }
            }
            t += T;
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

/// Rows `r0..r1` of a float matrix for every token, in register tiles of `FLOAT_TILE` rows x
/// tokens, the rest one row or one token at a time (each (row, token) sum is the same bits in
/// any tile: see `avx2::float_rows`).
fn float_range(w: &QMatrix, out: &SharedMut<f32>, xf: &[f32], n: usize, r0: usize, r1: usize) {
    const R: usize = FLOAT_TILE.0;
    const T: usize = FLOAT_TILE.1;
    let cols = w.cols;
    let row_bytes = w.kind.row_bytes(cols);
    let xf_row = |t: usize| &xf[t * cols..(t + 1) * cols];
    // A lone token reads each row once, so its rows are one tile.
    let tile_rows = match n == 1 {
        true => r1 - r0,
        false => (FLOAT_TILE_BYTES / row_bytes).clamp(R, ROW_TILE * 4) / R * R,
    };
    let mut tile = r0;
    while tile < r1 {
        let tile_end = (tile + tile_rows).min(r1);
        let wt = &w.bytes()[tile * row_bytes..tile_end * row_bytes];
        // SAFETY: rows tile..tile_end of each token lie in this thread's row range (see
        // `matmul`), and each token's rows are a span of their own.
        let outs = |t: usize| unsafe { out.slice(t * w.rows + tile, tile_end - tile) };
        let mut t = 0;
        while t + T <= n {
            let xs: [&[f32]; T] = std::array::from_fn(|k| xf_row(t + k));
            let mut o: [&mut [f32]; T] = std::array::from_fn(|k| outs(t + k));
            // SAFETY: `matmul` runs `float_range` only where `has_avx2` holds.
            unsafe { avx2::float_rows::<R, T>(w.kind, wt, &xs, &mut o) };
            t += T;
        }
        // The tokens left over: in the tile's rows while these are in L1 from the tokens
        // before; a lone token one row at a time (see `avx2::float_tile`).
        // SAFETY (both calls): as above.
        match n - t {
            0 => {}
            1 if n > 1 => unsafe {
                avx2::float_rows::<R, 1>(w.kind, wt, &[xf_row(t)], &mut [outs(t)])
            },
            _ => {
                for t in t..n {
                    unsafe { avx2::float_rows::<1, 1>(w.kind, wt, &[xf_row(t)], &mut [outs(t)]) };
                }
            }
        }
        tile = tile_end;
    }
}

/// `float_range` on AVX-512: tiles of `WIDE_FLOAT_TILE`; from `WIDEN_MIN_TOKENS` tokens, each
/// row tile of 16-bit weights widened to f32 once (exact, so a token's result is the same bits
/// either way) and the tiles' inner loops left with loads and FMAs only.
fn wide_float_range(w: &QMatrix, out: &SharedMut<f32>, xf: &[f32], n: usize, r0: usize, r1: usize) {
    const R: usize = WIDE_FLOAT_TILE.0;
    const T: usize = WIDE_FLOAT_TILE.1;
    let cols = w.cols;
    let row_bytes = w.kind.row_bytes(cols);
    let xf_row = |t: usize| &xf[t * cols..(t + 1) * cols];
    let widen = w.kind != QKind::F32 && n >= WIDEN_MIN_TOKENS;
    // A lone token reads each row once, so its rows are one tile.
    let tile_rows = match n == 1 {
        true => r1 - r0,
        false => (WIDE_TILE_BYTES / (cols * 4)).clamp(R, ROW_TILE * 4) / R * R,
    };
    WIDENED.with_borrow_mut(|scratch| {
        if widen && scratch.len() < tile_rows * cols {
            scratch.resize(tile_rows * cols, 0.0);
        }
        let mut tile = r0;
        while tile < r1 {
            let tile_end = (tile + tile_rows).min(r1);
            let file = &w.bytes()[tile * row_bytes..tile_end * row_bytes];
            let (kind, wt) = match widen {
                true => {
                    let dst = &mut scratch[..(tile_end - tile) * cols];
                    // SAFETY: `matmul` runs `wide_float_range` only where `has_vnni` holds.
                    unsafe { avx512::widen_rows(w.kind, file, dst) };
                    // SAFETY: any f32 slice is a valid byte slice of four times its length.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(dst.as_ptr() as *const u8, dst.len() * 4)
                    };
                    (QKind::F32, bytes)
                }
                false => (w.kind, file),
            };
            // SAFETY: rows tile..tile_end of each token lie in this thread's row range (see
            // `matmul`), and each token's rows are a span of their own.
            let outs = |t: usize| unsafe { out.slice(t * w.rows + tile, tile_end - tile) };
            let mut t = 0;
            while t + T <= n {
                let xs: [&[f32]; T] = std::array::from_fn(|k| xf_row(t + k));
                let mut o: [&mut [f32]; T] = std::array::from_fn(|k| outs(t + k));
                // SAFETY: as above (`has_vnni`).
                unsafe { avx512::float_rows::<R, T>(kind, wt, &xs, &mut o) };
                t += T;
            }
            // The tokens left over two at a time, then one: in the tile's rows, or a lone
            // token one row at a time. SAFETY (all three calls): as above.
            while t + 2 <= n {
                let xs = [xf_row(t), xf_row(t + 1)];
                unsafe { avx512::float_rows::<R, 2>(kind, wt, &xs, &mut [outs(t), outs(t + 1)]) };
                t += 2;
            }
            match (n - t, n) {
                (0, _) => {}
                (_, 1) => unsafe {
                    avx512::float_rows::<1, 1>(kind, wt, &[xf_row(t)], &mut [outs(t)])
                },
                _ => unsafe { avx512::float_rows::<R, 1>(kind, wt, &[xf_row(t)], &mut [outs(t)]) },
            }
            tile = tile_end;
        }
    });
}

/// Row groups `g0..g1` of a packed matrix for every token. VNNI packing: whole 16-token tiles on
/// AMX where it runs, the rest on AVX-512 four tokens at a time; AVX2 packing: four tokens at a
/// time. Where at least `UNPACK_MIN_TOKENS` tokens take the four-at-a-time kernels, a Q5
/// matrix's k-rows are unpacked once per span of groups (at most `UNPACK_BYTES`) for all of
/// them. The kernels of a packing end every block the same way, so each token's result is the
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
    let job = |t0: usize, (g0, g1): (usize, usize), prefetch: bool| GroupJob {
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
        unpacked: None,
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
    let unpack = matches!(w.kind, QKind::Q5_0 | QKind::Q5_1) && n - first >= UNPACK_MIN_TOKENS;
    // SAFETY: VNNI-packed matrices exist only where `has_vnni` holds (AMX only where `has_amx`),
    // AVX2-packed ones only where `has_avx2` does (`QMatrix::for_this_cpu`; tests pack only what
    // runs); this thread owns row groups [g0, g1) of every token's output (see `matmul`), which
    // `out` holds (`matmul` checked its length); `GroupJob::check` bounds the rest.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        if tiles > 0 {
            amx::groups(&job(0, (g0, g1), false), tiles);
        }
        if !unpack {
            tokens(vnni, first, n, |t| job(t, (g0, g1), t == first));
            return;
        }
        let per_group = w.cols / QK * packing.unpacked_chunk();
        let span = (UNPACK_BYTES / per_group).max(1);
        UNPACKED.with_borrow_mut(|buf| {
            for s0 in (g0..g1).step_by(span) {
                let groups = (s0, (s0 + span).min(g1));
                buf.resize((groups.1 - s0) * per_group, 0);
                let from = job(first, groups, true);
                if vnni {
                    avx512::unpack(&from, buf);
                } else {
                    avx2::unpack(&from, buf);
                }
                let buf: &[u8] = buf;
                tokens(vnni, first, n, |t| GroupJob {
                    unpacked: Some(buf),
                    ..job(t, groups, false)
                });
            }
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("packed matrices on a non-x86 target ({first} of {n} tokens, {unpack})");
}

thread_local! {
    /// Each thread's unpacked k-rows (`packed_range`).
    static UNPACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's widened float rows (`wide_float_range`).
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tokens `first..n` of the jobs `job(t)` makes, four at a time on the packing's kernels and
/// the last few one at a time.
///
/// # Safety
/// As `packed_range`'s kernel calls.
#[cfg(target_arch = "x86_64")]
unsafe fn tokens<'a>(vnni: bool, first: usize, n: usize, job: impl Fn(usize) -> GroupJob<'a>) {
    let mut t = first;
    while t < n {
        let r = if t + TOKEN_TILE <= n { TOKEN_TILE } else { 1 };
        let job = job(t);
        // SAFETY: forwarded from the caller.
        unsafe {
            match (vnni, r) {
                (true, TOKEN_TILE) => avx512::groups::<TOKEN_TILE>(&job),
                (true, _) => avx512::groups::<1>(&job),
                (false, TOKEN_TILE) => avx2::groups::<TOKEN_TILE>(&job),
                (false, _) => avx2::groups::<1>(&job),
            }
        }
        t += r;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit is handed out exactly once, in chunks within the cap (the floor too, but for
    /// the last), whatever the total, the threads and the order they claim in; chunks shrink
    /// toward the end.
    #[test]
    fn chunk_queue_hands_out_every_unit_once() {
        for threads in 1..=4 {
            for total in (0..200).chain([383, 1536, 6144]) {
                for order in 0..3usize {
                    let q = ChunkQueue::new(total, threads, CHUNKS_PER_THREAD, FLOOR_DIVISOR);
                    let mut seen = vec![0u8; total];
                    let mut chunks: Vec<(usize, usize)> =
                        (0..threads).map(|t| q.first(t)).collect();
                    let mut sizes = Vec::new();
                    let mut seed = order as u64 + 1;
                    loop {
                        // A busy thread picked pseudo-randomly (the pattern varies with `order`).
                        let busy: Vec<usize> = (0..threads)
                            .filter(|&t| chunks[t].0 < chunks[t].1)
                            .collect();
                        if busy.is_empty() {
                            break;
                        }
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let turn = busy[(seed >> 33) as usize % busy.len()];
                        let (lo, hi) = chunks[turn];
                        assert!(hi - lo <= q.cap, "chunk past the cap");
                        sizes.push((lo, hi - lo));
                        seen[lo..hi].iter_mut().for_each(|s| *s += 1);
                        chunks[turn] = q.claim();
                    }
                    assert!(
                        seen.iter().all(|&s| s == 1),
                        "t{threads} n{total}: {seen:?}"
                    );
                    sizes.sort();
                    for w in sizes.windows(2) {
                        let ((lo_a, a), (lo, b)) = (w[0], w[1]);
                        let last = lo + b == total;
                        assert!(b >= q.floor || last, "chunk under the floor");
                        if lo_a >= threads * q.cap {
                            assert!(b <= a, "chunks grew: {a} then {b}");
                        }
                    }
                }
            }
        }
    }

    /// The same with real threads racing for chunks.
    #[test]
    fn chunk_queue_under_contention() {
        let pool = ThreadPool::new(4);
        for total in [1usize, 7, 100, 4097] {
            let q = ChunkQueue::new(total, 4, CHUNKS_PER_THREAD, FLOOR_DIVISOR);
            let hits: Vec<AtomicUsize> = (0..total).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|tid| {
                let (mut lo, mut hi) = q.first(tid);
                while lo < hi {
                    for h in &hits[lo..hi] {
                        h.fetch_add(1, Ordering::Relaxed);
                    }
                    (lo, hi) = q.claim();
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }
}
