//! Where the scheduler's step time goes (`LASTMILE_STEP_PROFILE=1`): planning, the forward
//! pass and sampling, summed and printed on stderr every 2 s.

/// Step time by phase, summed since the last report.
pub(super) struct StepProfile {
    since: std::time::Instant,
    steps: usize,
    tokens: usize,
    /// Planning, the forward pass, and sampling (with detokenizing and streaming).
    phases: [std::time::Duration; 3],
}

impl StepProfile {
    /// Every step's phases; a line on stderr every 2 s.
    pub(super) fn add(&mut self, tokens: usize, phases: [std::time::Duration; 3]) {
        self.steps += 1;
        self.tokens += tokens;
        for (sum, p) in self.phases.iter_mut().zip(phases) {
            *sum += p;
        }
        let wall = self.since.elapsed();
        if wall.as_secs() < 2 {
            return;
        }
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / self.steps as f64;
        let [plan, forward, sample] = self.phases;
        eprintln!(
            "step profile: {} steps in {:.1} s, {:.1} tokens a step; per step: plan {:.3} ms, \
             forward {:.3} ms, sample {:.3} ms; idle {:.0}%",
            self.steps,
            wall.as_secs_f64(),
            self.tokens as f64 / self.steps as f64,
            ms(plan),
            ms(forward),
            ms(sample),
            100.0 * (1.0 - (plan + forward + sample).as_secs_f64() / wall.as_secs_f64()),
        );
        *self = Self::new();
    }

    pub(super) fn new() -> Self {
        Self {
            since: std::time::Instant::now(),
            steps: 0,
            tokens: 0,
            phases: Default::default(),
        }
    }
}
