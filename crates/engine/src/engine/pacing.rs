//! How many prompt tokens a step may carry while other streams decode.
//!
//! A step that decodes `d` streams and also prefills `p` prompt tokens delays every one of those
//! streams' next token by the prefill's cost. A fixed token budget is wrong on every machine but
//! one, and wrong at long context, where each prompt token also attends over thousands of keys.
//! So the pacer measures instead. It models a step as
//!
//! `time = fixed_ms + row_ms * rows + pair_ms * pairs`
//!
//! where `rows` are the step's tokens (matrix products and small ops: a line fitted by least
//! squares over recent steps, with exponential forgetting) and `pairs` its (query token, key
//! position) pairs (attention, which the model times apart from the rest). All three are learned
//! from every step, so none goes stale while the mix of decodes and prefill changes. Each step
//! then gets the largest chunk whose predicted time fits the latency target: by default twice
//! the predicted decode-only step, at least [`AUTO_FLOOR_MS`].

/// The auto target never goes below this (a single stream's decode step is a few ms, and a
/// 30 ms gap between tokens is still far faster than anyone reads).
pub(super) const AUTO_FLOOR_MS: f64 = 30.0;
/// Weight of a new measurement in the attention rate.
const ALPHA: f64 = 0.1;
/// Weight of a new step in the line fit: a longer memory, so that the spread of row counts
/// that prefill steps gave it survives long runs of same-sized decode steps.
const LINE_ALPHA: f64 = 0.02;
/// Chunk before anything is measured.
const FIRST_CHUNK: usize = 16;

/// The work of one step, as the cost model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct StepShape {
    /// Tokens in the batch.
    pub rows: usize,
    /// (query token, key position) pairs attention computes.
    pub pairs: f64,
}

impl StepShape {
    /// Adds `n` consecutive tokens of one sequence starting at position `pos0`.
    pub(super) fn add(&mut self, pos0: usize, n: usize) {
        self.rows += n;
        // Token at position q attends over q + 1 keys.
        self.pairs += (n * pos0) as f64 + (n * (n + 1) / 2) as f64;
    }
}

/// `y = a + b x` fitted by least squares over exponentially weighted observations.
#[derive(Debug, Default)]
struct LineFit {
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    /// The slope of the last fit whose `x` varied enough to tell.
    slope: Option<f64>,
}

impl LineFit {
    /// Whether the recent `x` vary enough to tell a slope (their weighted variance is at least
    /// 1).
    fn varies(&self) -> bool {
        self.w > 0.0 && self.sxx / self.w - (self.sx / self.w).powi(2) >= 1.0
    }

    fn add(&mut self, x: f64, y: f64) {
        let keep = 1.0 - LINE_ALPHA;
        self.w = self.w * keep + 1.0;
        self.sx = self.sx * keep + x;
        self.sy = self.sy * keep + y;
        self.sxx = self.sxx * keep + x * x;
        self.sxy = self.sxy * keep + x * y;
        let var = self.sxx / self.w - (self.sx / self.w).powi(2);
        if var >= 1.0 {
            let slope = (self.sxy / self.w - self.sx * self.sy / (self.w * self.w)) / var;
            self.slope = Some(slope.max(0.0));
        }
    }

    /// (intercept, slope), both non-negative. While the observed `x` have (almost) not varied,
    /// the last slope that could be told, through the recent mean (or through the origin when
    /// there is none yet).
    fn line(&self) -> Option<(f64, f64)> {
        if self.w <= 0.0 || self.sx <= 0.0 {
            return None;
        }
        let (mx, my) = (self.sx / self.w, self.sy / self.w);
        let through_origin = (0.0, (my / mx).max(0.0));
        let Some(slope) = self.slope else {
            return Some(through_origin);
        };
        let intercept = my - slope * mx;
        if intercept < 0.0 {
            return Some(through_origin);
        }
        Some((intercept, slope))
    }
}

#[derive(Debug, Default)]
pub(super) struct Pacer {
    /// Milliseconds of everything but attention against the step's rows.
    rows: LineFit,
    /// Estimated milliseconds of attention per (query, key) pair.
    pair_ms: Option<f64>,
}

impl Pacer {
    /// Learns from a finished step of shape `shape` that took `ms` milliseconds, `attention_ms`
    /// of them in attention.
    pub(super) fn observe(&mut self, shape: StepShape, ms: f64, attention_ms: f64) {
        if !(ms.is_finite() && attention_ms.is_finite() && ms >= 0.0 && shape.rows > 0) {
            return;
        }
        let attention_ms = attention_ms.clamp(0.0, ms);
        self.rows.add(shape.rows as f64, ms - attention_ms);
        if shape.pairs > 0.0 {
            let sample = attention_ms / shape.pairs;
            self.pair_ms = Some(match self.pair_ms {
                Some(o) => o + ALPHA * (sample - o),
                None => sample,
            });
        }
    }

    /// Predicted milliseconds of a step of this shape, once something has been measured.
    pub(super) fn predict(&self, shape: StepShape) -> Option<f64> {
        let (a, b) = self.rows.line()?;
        Some(a + b * shape.rows as f64 + self.pair_ms? * shape.pairs)
    }

    /// Most prompt tokens the next step may add to `decodes` (the decode tokens already in it),
    /// taken from a sequence whose next prompt token is at position `pos0`, at most `cap`, with
    /// `target_ms` (or the auto target) as the step's latency budget. At least one token, so
    /// prompts always make progress.
    pub(super) fn chunk(
        &self,
        decodes: StepShape,
        pos0: usize,
        cap: usize,
        target_ms: Option<f64>,
    ) -> usize {
        let cap = cap.max(1);
        let Some(base) = self.predict(decodes) else {
            return FIRST_CHUNK.min(cap);
        };
        let target = target_ms.unwrap_or((2.0 * base).max(AUTO_FLOOR_MS));
        let fits = |p: usize| {
            let mut s = decodes;
            s.add(pos0, p);
            self.predict(s).is_some_and(|t| t <= target)
        };
        // The predicted time grows with the chunk: binary search for the largest that fits.
        let (mut lo, mut hi) = (1, cap);
        if !fits(lo) {
            return 1;
        }
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// The current estimates (fixed ms, ms per row, ms per attention pair), for logs.
    /// Most draft positions a decode may carry (speculative decoding) so that its step costs at
    /// most about twice a step without them, from the fitted cost of rows: about `a / b`, where
    /// a CPU with slow matrix rows (AVX2) affords fewer than one with fast ones. `None` until
    /// measured. Attention is left out: a sequence's draft rows share its keys, so they add far
    /// less than separate queries would. Also `None` while the recent steps had too few
    /// different row counts to tell the cost of a row from the cost of a step (one-row decodes
    /// after a short prompt, or after a cold first step that left a stale slope): a bound from a
    /// guessed line would allow one draft row, the steps would keep their one or two rows, and
    /// the cost of a row would never be learned. Unbounded drafts vary the rows again, and the
    /// bound comes back measured.
    pub(super) fn draft_rows(&self) -> Option<usize> {
        if !self.rows.varies() {
            return None;
        }
        let (a, b) = self.rows.line()?;
        (b > 0.0).then(|| ((a + b) / b + 1e-9).floor() as usize)
    }

    pub(super) fn estimates(&self) -> (Option<(f64, f64)>, Option<f64>) {
        (self.rows.line(), self.pair_ms)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn shape(rows: usize, pos: usize) -> StepShape {
        let mut s = StepShape::default();
        for _ in 0..rows {
            s.add(pos, 1);
        }
        s
    }

    /// 4 ms per step, 0.5 ms per row, 1 µs per attention pair.
    fn cost(s: StepShape) -> (f64, f64) {
        let attn = s.pairs * 1e-3;
        (4.0 + 0.5 * s.rows as f64 + attn, attn)
    }

    /// A pacer that has seen steps cost what [`cost`] says (planner tests use it too).
    pub(in crate::engine) fn trained() -> Pacer {
        let mut p = Pacer::default();
        for _ in 0..40 {
            for (rows, pos) in [(8, 500), (40, 100), (16, 2000), (3, 10), (9, 1000)] {
                let s = shape(rows, pos);
                let (ms, attn) = cost(s);
                p.observe(s, ms, attn);
            }
        }
        p
    }

    #[test]
    fn shapes_count_rows_and_attention_pairs() {
        let mut s = StepShape::default();
        s.add(0, 4); // positions 0..4 attend over 1, 2, 3, 4 keys
        s.add(10, 1); // one decode at position 10: 11 keys
        assert_eq!(s.rows, 5);
        assert_eq!(s.pairs, 21.0);
    }

    #[test]
    fn drafts_may_double_a_step_at_most() {
        assert_eq!(
            Pacer::default().draft_rows(),
            None,
            "unmeasured: no bound yet"
        );
        // 4 ms a step plus 0.5 ms a row: a one-row step costs 4.5 ms, nine rows 8.5 ms.
        assert_eq!(trained().draft_rows(), Some(9));
        // Only one- and two-row steps seen: the cost of a row is unknown, and drafts are not
        // bounded by a guess of it (they would stay at one row, and it would stay unknown).
        let mut p = Pacer::default();
        for rows in [3, 1, 2, 1, 2, 1, 2] {
            p.observe(shape(rows, 0), 14.0 + rows as f64, 0.0);
        }
        assert!(
            p.estimates().0.is_some(),
            "a line through the origin predicts"
        );
        assert_eq!(p.draft_rows(), None);
        // A slope told once (a cold first step of 8 rows) and then only one-row steps: stale,
        // not a bound either.
        let mut p = Pacer::default();
        p.observe(shape(8, 0), 80.0, 0.0);
        p.observe(shape(1, 0), 15.0, 0.0);
        assert!(
            p.draft_rows().is_some(),
            "two far-apart row counts tell a slope"
        );
        for _ in 0..200 {
            p.observe(shape(1, 0), 15.0, 0.0);
        }
        assert_eq!(p.draft_rows(), None);
        // Rows as dear as the step itself (slow kernels): one draft row.
        let mut p = Pacer::default();
        for rows in [1, 2, 4, 8] {
            p.observe(shape(rows, 0), 2.0 + 2.0 * rows as f64, 0.0);
        }
        assert_eq!(p.draft_rows(), Some(2));
    }

    #[test]
    fn unmeasured_pacer_sends_a_small_first_chunk() {
        let p = Pacer::default();
        assert_eq!(p.chunk(shape(3, 100), 0, 256, None), FIRST_CHUNK);
        assert_eq!(p.chunk(shape(3, 100), 0, 8, None), 8, "the cap holds");
    }

    #[test]
    fn learns_the_cost_line_and_the_attention_rate_from_mixed_steps() {
        let (line, pair) = trained().estimates();
        let (a, b) = line.unwrap();
        assert!((a - 4.0).abs() < 1e-6 && (b - 0.5).abs() < 1e-6, "{a} {b}");
        assert!((pair.unwrap() - 1e-3).abs() < 1e-12);
        // Steps that never vary their rows: a line through the origin.
        let mut p = Pacer::default();
        for _ in 0..5 {
            p.observe(shape(8, 0), 8.0, 0.0);
        }
        assert_eq!(p.estimates().0, Some((0.0, 1.0)));
        // After a long run of same-sized steps the learned slope stays, and the level follows
        // the recent steps (here everything got 2 ms slower).
        let mut p = trained();
        for _ in 0..2000 {
            p.observe(shape(8, 0), 4.0 + 0.5 * 8.0 + 2.0, 0.0);
        }
        let (a, b) = p.estimates().0.unwrap();
        assert!(
            (b - 0.5).abs() < 0.1 && (a + 8.0 * b - 10.0).abs() < 1e-3,
            "{a} {b}"
        );
    }

    #[test]
    fn chunk_fits_the_latency_target() {
        let p = trained();
        let decodes = shape(8, 1000); // 8 decodes at position 1000: 8008 pairs
        let base = p.predict(decodes).unwrap();
        assert!((base - (4.0 + 4.0 + 8.008)).abs() < 1e-6, "{base}");
        // Auto target: max(2 x 16 ms, 30 ms) = 32 ms, 16 ms of room: at position 0 a prompt
        // token costs 0.5 ms plus a little attention.
        let p0 = p.chunk(decodes, 0, 256, None);
        let fits = |n: usize| {
            let mut s = decodes;
            s.add(0, n);
            p.predict(s).unwrap()
        };
        assert!(
            fits(p0) <= 32.1 && fits(p0 + 1) > 32.0,
            "{p0}: the largest chunk that fits"
        );
        assert_eq!(p0, 31, "16 ms of room / ~0.5 ms per token");
        // Deep into a long prompt each token also attends over ~3,000 keys (3 ms): fewer fit.
        let deep = p.chunk(decodes, 3000, 256, None);
        assert_eq!(deep, 4, "16 ms of room / 3.5 ms per token");
        // An explicit target and the cap.
        assert!(p.chunk(decodes, 0, 256, Some(200.0)) > p0);
        assert_eq!(p.chunk(decodes, 0, 50, Some(200.0)), 50);
        // A target below the decode step still lets one token through.
        assert_eq!(p.chunk(decodes, 0, 256, Some(5.0)), 1);
    }
}
