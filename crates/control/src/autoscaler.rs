//! The autoscaler's decision, as pure arithmetic over observations (no clock, no I/O): how
//! many replicas a deployment should run, Knative-style.
//!
//! Each tick the controller reports the deployment's concurrency (requests in flight on its
//! replicas plus those the activator holds) and how many replicas are ready. The autoscaler
//! averages concurrency over a long *stable* window and a short *panic* window and wants
//! `ceil(average / target_concurrency)` replicas:
//! - **stable mode** follows the stable average (slow, smooth);
//! - **panic mode** starts when the panic average asks for `panic_threshold` times the ready
//!   replicas (a burst): it follows the panic average and never scales down, until the burst
//!   has been gone for a whole stable window;
//! - a **latency target** (TTFT p90), when set and missed under load, asks for one replica more
//!   than are ready;
//! - scale-ups are capped at `max_scale_up_rate` x ready, scale-downs at ready /
//!   `max_scale_down_rate`, and a scale-down waits until it has been wanted for
//!   `scale_down_delay`;
//! - **scale to zero** happens only after no request for `idle_timeout`, and any request at zero
//!   asks for a replica at once;
//! - the result is clamped to `[min_replicas, max_replicas]`.

use std::collections::VecDeque;
use std::time::Duration;

/// A deployment's scaling targets and windows.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalerConfig {
    /// Replicas kept however idle.
    pub min_replicas: usize,
    /// Most replicas.
    pub max_replicas: usize,
    /// Requests in flight per replica the autoscaler aims for.
    pub target_concurrency: f64,
    /// Window of the stable average.
    pub stable_window: Duration,
    /// Window of the panic average (shorter).
    pub panic_window: Duration,
    /// Panic when the panic average wants this many times the ready replicas.
    pub panic_threshold: f64,
    /// How long a smaller replica count must be wanted before scaling down to it.
    pub scale_down_delay: Duration,
    /// At most this many times the ready replicas in one decision.
    pub max_scale_up_rate: f64,
    /// At least the ready replicas divided by this in one decision.
    pub max_scale_down_rate: f64,
    /// No request for this long scales the deployment to zero (if `min_replicas` is 0).
    pub idle_timeout: Duration,
    /// Add a replica while the time to first token's p90 is above this.
    pub ttft_p90_target: Option<Duration>,
    /// Add a replica while the p90 gap between streamed tokens is above this.
    pub itl_p90_target: Option<Duration>,
}

impl AutoscalerConfig {
    /// Knative's defaults (60 s stable, 6 s panic window, threshold 2x, scale-up 1000x,
    /// scale-down 2x) with a concurrency target of 8, 0..=1 replicas, 5 minutes to zero.
    pub fn new(min_replicas: usize, max_replicas: usize) -> Self {
        Self {
            min_replicas,
            max_replicas,
            target_concurrency: 8.0,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            scale_down_delay: Duration::ZERO,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            idle_timeout: Duration::from_secs(300),
            ttft_p90_target: None,
            itl_p90_target: None,
        }
    }
}

/// What the controller saw at one tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Requests in flight on the replicas plus requests held by the activator.
    pub concurrency: f64,
    /// Requests that arrived since the previous observation (a short one may have come and gone
    /// between two samples of `concurrency`: it still counts as activity).
    pub arrivals: u64,
    /// Replicas ready to serve.
    pub ready: usize,
    /// p90 time to first token over the recent past, when known.
    pub ttft_p90: Option<Duration>,
    /// p90 inter-token gap over the recent past, when known.
    pub itl_p90: Option<Duration>,
}

/// The autoscaler's answer at one tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Replicas wanted.
    pub desired: usize,
    /// In panic mode (a burst).
    pub panicking: bool,
    /// Mean concurrency over the stable window.
    pub stable_concurrency: f64,
    /// Mean concurrency over the panic window.
    pub panic_concurrency: f64,
}

/// One deployment's autoscaler state: recent samples, the panic episode, recent wishes.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    config: AutoscalerConfig,
    /// (time, concurrency), oldest first, within the stable window.
    samples: VecDeque<(Duration, f64)>,
    /// When the panic condition last held, while panicking.
    panic_since: Option<Duration>,
    /// Most replicas wanted during this panic episode.
    panic_peak: usize,
    /// (time, wanted) within the scale-down delay.
    wanted: VecDeque<(Duration, usize)>,
    /// The last time a request was in flight or held.
    last_active: Option<Duration>,
    /// Replicas wanted for a missed latency target, and when the last one was added.
    latency_floor: usize,
    latency_added_at: Option<Duration>,
}

/// How long a latency-driven replica is given to bring the p90 down before another is added
/// (the replicas' p90s cover their last 30 s).
const LATENCY_COOLDOWN: Duration = Duration::from_secs(30);

impl Autoscaler {
    /// A fresh autoscaler (no traffic seen).
    pub fn new(config: AutoscalerConfig) -> Self {
        Self {
            config,
            samples: VecDeque::new(),
            panic_since: None,
            panic_peak: 0,
            wanted: VecDeque::new(),
            last_active: None,
            latency_floor: 0,
            latency_added_at: None,
        }
    }

    /// Requests are waiting now that need `replicas` (the activator's poke): as a burst seen at
    /// once, hold at least that many through a panic episode instead of letting the averages,
    /// which have not caught up yet, undo it at the next tick.
    pub fn burst(&mut self, now: Duration, replicas: usize) {
        let replicas = replicas.min(self.config.max_replicas);
        if self.panic_since.is_none() {
            self.panic_peak = 0;
        }
        self.panic_since = Some(now);
        self.panic_peak = self.panic_peak.max(replicas);
        self.last_active = Some(now);
    }

    /// Its configuration.
    pub fn config(&self) -> &AutoscalerConfig {
        &self.config
    }

    /// Records the observation made at `now` (any monotonic time) and decides.
    pub fn decide(&mut self, now: Duration, obs: Observation) -> Decision {
        let concurrency = obs.concurrency.max(0.0);
        self.record(now, concurrency, obs.arrivals);
        let stable = mean(&self.samples, now, self.config.stable_window);
        let panic = mean(&self.samples, now, self.config.panic_window);
        let panicking = self.update_panic(now, panic, obs.ready);
        let mut want = if panicking {
            self.panic_peak = self.panic_peak.max(self.replicas_for(panic));
            self.panic_peak
        } else {
            self.replicas_for(stable)
        };
        if let Some(floor) = self.latency_floor(now, &obs, concurrency) {
            want = want.max(floor);
        }

        // Idle: zero only after `idle_timeout` without any request; any request wants one.
        let idle = self
            .last_active
            .is_none_or(|t| now.saturating_sub(t) >= self.config.idle_timeout);
        want = if idle { 0 } else { want.max(1) };
        want = self.hold_for_scale_down(now, want, obs.ready);

        // Rate limits relative to what is ready.
        let c = &self.config;
        let ready = obs.ready.max(1) as f64;
        let up_cap = (c.max_scale_up_rate * ready).ceil() as usize;
        let down_floor = (obs.ready as f64 / c.max_scale_down_rate).floor() as usize;
        want = want.min(up_cap).max(down_floor);

        Decision {
            desired: want.clamp(c.min_replicas, c.max_replicas),
            panicking,
            stable_concurrency: stable,
            panic_concurrency: panic,
        }
    }

    /// Adds the sample `concurrency` at `now` (dropping those older than the stable window) and
    /// notes activity.
    fn record(&mut self, now: Duration, concurrency: f64, arrivals: u64) {
        let window = self.config.stable_window;
        self.samples.push_back((now, concurrency));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > window)
        {
            self.samples.pop_front();
        }
        if concurrency > 0.0 || arrivals > 0 {
            self.last_active = Some(now);
        }
    }

    /// Replicas that carry `load` at the target concurrency.
    fn replicas_for(&self, load: f64) -> usize {
        (load / self.config.target_concurrency).ceil() as usize
    }

    /// Starts or extends a panic episode when a burst (the `panic` window's mean) asks for
    /// several times the `ready` replicas, and ends it after a stable window without one;
    /// whether it is panicking now.
    fn update_panic(&mut self, now: Duration, panic: f64, ready: usize) -> bool {
        let c = &self.config;
        if panic / c.target_concurrency >= c.panic_threshold * ready.max(1) as f64 {
            if self.panic_since.is_none() {
                self.panic_peak = ready;
            }
            self.panic_since = Some(now);
        } else if self
            .panic_since
            .is_some_and(|t| now.saturating_sub(t) >= c.stable_window)
        {
            self.panic_since = None;
            self.panic_peak = 0;
        }
        self.panic_since.is_some()
    }

    /// A missed latency target under load wants one more replica than are ready, at most once
    /// per cooldown (the new replica needs time to show in the p90s): that floor, or `None`
    /// (and the floor goes) when the targets are met.
    fn latency_floor(
        &mut self,
        now: Duration,
        obs: &Observation,
        concurrency: f64,
    ) -> Option<usize> {
        let c = &self.config;
        let missed = |target: Option<Duration>, p90: Option<Duration>| matches!((target, p90), (Some(t), Some(p)) if p > t);
        if (missed(c.ttft_p90_target, obs.ttft_p90) || missed(c.itl_p90_target, obs.itl_p90))
            && concurrency > 0.0
            && obs.ready > 0
        {
            let cooled = self
                .latency_added_at
                .is_none_or(|t| now.saturating_sub(t) >= LATENCY_COOLDOWN);
            if cooled {
                self.latency_floor = obs.ready + 1;
                self.latency_added_at = Some(now);
            }
            Some(self.latency_floor)
        } else {
            self.latency_floor = 0;
            None
        }
    }

    /// Scales down only to what has been wanted for the whole scale-down delay: `want`, or,
    /// when below the `ready` replicas, the most wanted within the delay (at most `ready`).
    fn hold_for_scale_down(&mut self, now: Duration, want: usize, ready: usize) -> usize {
        let delay = self.config.scale_down_delay;
        self.wanted.push_back((now, want));
        while self
            .wanted
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > delay)
        {
            self.wanted.pop_front();
        }
        if want < ready {
            let held = self.wanted.iter().map(|&(_, w)| w).max().unwrap_or(want);
            return held.min(ready);
        }
        want
    }
}

/// Mean of the samples within `window` of `now`.
fn mean(samples: &VecDeque<(Duration, f64)>, now: Duration, window: Duration) -> f64 {
    let (sum, n) = samples
        .iter()
        .rev()
        .take_while(|&&(t, _)| now.saturating_sub(t) <= window)
        .fold((0.0, 0usize), |(s, n), &(_, c)| (s + c, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(500);

    /// An observation of `concurrency` with `ready` replicas and nothing else known.
    fn seen(concurrency: f64, ready: usize) -> Observation {
        Observation {
            concurrency,
            arrivals: 0,
            ready,
            ttft_p90: None,
            itl_p90: None,
        }
    }

    fn config() -> AutoscalerConfig {
        AutoscalerConfig {
            target_concurrency: 4.0,
            stable_window: Duration::from_secs(20),
            panic_window: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            ..AutoscalerConfig::new(0, 10)
        }
    }

    /// Drives an autoscaler with `load(t)` for `secs` seconds; replicas become ready the tick
    /// after they are wanted (and go at once). Returns (time, decision) per tick.
    struct Sim {
        scaler: Autoscaler,
        now: Duration,
        ready: usize,
    }

    impl Sim {
        fn new(config: AutoscalerConfig) -> Self {
            Self {
                ready: config.min_replicas,
                scaler: Autoscaler::new(config),
                now: Duration::ZERO,
            }
        }

        fn run(&mut self, secs: f64, load: impl Fn(f64) -> f64) -> Vec<Decision> {
            let end = self.now + Duration::from_secs_f64(secs);
            let mut out = Vec::new();
            while self.now < end {
                let t = self.now.as_secs_f64();
                let d = self.scaler.decide(self.now, seen(load(t), self.ready));
                self.ready = d.desired;
                out.push(d);
                self.now += TICK;
            }
            out
        }
    }

    #[test]
    fn silence_stays_at_zero_and_min_replicas_are_kept() {
        let mut sim = Sim::new(config());
        assert!(sim.run(120.0, |_| 0.0).iter().all(|d| d.desired == 0));
        let mut sim = Sim::new(AutoscalerConfig {
            min_replicas: 2,
            ..config()
        });
        assert!(sim.run(120.0, |_| 0.0).iter().all(|d| d.desired == 2));
    }

    #[test]
    fn one_request_at_zero_wants_one_replica_at_once() {
        let mut sim = Sim::new(config());
        let d = sim.run(0.5, |_| 1.0);
        assert_eq!(d[0].desired, 1);
        assert!(!d[0].panicking);
    }

    #[test]
    fn a_burst_panics_up_at_once_and_holds_until_it_is_over() {
        let mut sim = Sim::new(config());
        sim.run(10.0, |_| 2.0);
        assert_eq!(sim.ready, 1);
        // 32 concurrent requests for 5 s, target 4: 8 replicas, within one panic window.
        let burst = sim.run(5.0, |_| 32.0);
        let first_full = burst
            .iter()
            .position(|d| d.desired == 8)
            .expect("reaches 8");
        assert!(first_full <= 4, "panic window is 2 s: {first_full} ticks");
        assert!(burst[first_full].panicking);
        // After the burst: panic mode holds the peak until a stable window has passed since the
        // panic condition last held (early in the burst, when few replicas were ready).
        let after = sim.run(14.0, |_| 2.0);
        let seen: Vec<(usize, bool)> = after.iter().map(|d| (d.desired, d.panicking)).collect();
        assert!(
            after.iter().all(|d| d.desired == 8 && d.panicking),
            "{seen:?}"
        );
        // Then stable mode scales down, at most halving per tick.
        let calm = sim.run(30.0, |_| 2.0);
        let mut prev = 8;
        for d in &calm {
            assert!(
                d.desired >= prev / 2,
                "halves at most: {prev} -> {}",
                d.desired
            );
            prev = d.desired;
        }
        assert_eq!(prev, 1, "back to ceil(2 / 4) = 1");
    }

    #[test]
    fn a_ramp_is_followed_smoothly_without_panic() {
        let mut sim = Sim::new(config());
        // Concurrency rises 0.5 per second for 60 s (to 30: 8 replicas at target 4).
        let ramp = sim.run(60.0, |t| 0.5 * t);
        assert!(ramp.iter().all(|d| !d.panicking), "a ramp is not a burst");
        let desired: Vec<usize> = ramp.iter().map(|d| d.desired).collect();
        assert!(
            desired.windows(2).all(|w| w[1] >= w[0]),
            "never down on a ramp"
        );
        let last = *desired.last().expect("ticks");
        // The stable average lags the ramp by half a window (20 s => ~5 concurrency).
        assert!((6..=8).contains(&last), "{last}");
    }

    #[test]
    fn idle_scales_to_zero_only_after_the_idle_timeout() {
        let mut sim = Sim::new(config());
        sim.run(10.0, |_| 3.0);
        assert_eq!(sim.ready, 1);
        let idle = sim.run(40.0, |_| 0.0);
        let zero_at = idle
            .iter()
            .position(|d| d.desired == 0)
            .expect("reaches zero");
        let secs = zero_at as f64 * TICK.as_secs_f64();
        assert!((29.0..=30.5).contains(&secs), "zero after {secs} s idle");
        assert!(idle[..zero_at].iter().all(|d| d.desired == 1));
        // A request at zero brings one back on the next tick.
        assert_eq!(sim.run(0.5, |_| 1.0)[0].desired, 1);
    }

    #[test]
    fn scale_down_waits_for_the_delay() {
        let mut sim = Sim::new(AutoscalerConfig {
            scale_down_delay: Duration::from_secs(10),
            panic_threshold: 1000.0,
            stable_window: Duration::from_secs(2),
            ..config()
        });
        sim.run(10.0, |_| 16.0);
        assert_eq!(sim.ready, 4);
        let lower = sim.run(20.0, |_| 4.0);
        let down_at = lower
            .iter()
            .position(|d| d.desired < 4)
            .expect("scales down");
        let secs = down_at as f64 * TICK.as_secs_f64();
        assert!((10.0..=13.0).contains(&secs), "down after {secs} s");
        assert!(lower[down_at].desired >= 2, "halving at most");
        assert_eq!(sim.ready, 1);
    }

    #[test]
    fn max_replicas_and_scale_up_rate_cap_the_answer() {
        let mut sim = Sim::new(AutoscalerConfig {
            max_replicas: 3,
            ..config()
        });
        assert!(sim.run(5.0, |_| 100.0).iter().all(|d| d.desired <= 3));
        let mut sim = Sim::new(AutoscalerConfig {
            max_scale_up_rate: 2.0,
            ..config()
        });
        let d = sim.run(2.0, |_| 40.0);
        // From 0 (counted as 1) at most 2, then 4, 8, 10.
        let seq: Vec<usize> = d.iter().map(|d| d.desired).collect();
        assert_eq!(seq, [2, 4, 8, 10]);
    }

    #[test]
    fn a_missed_latency_target_adds_a_replica() {
        let mut s = Autoscaler::new(AutoscalerConfig {
            ttft_p90_target: Some(Duration::from_millis(500)),
            itl_p90_target: Some(Duration::from_millis(50)),
            ..config()
        });
        let obs = |ttft_ms: u64, itl_ms: u64| Observation {
            ttft_p90: Some(Duration::from_millis(ttft_ms)),
            itl_p90: Some(Duration::from_millis(itl_ms)),
            ..seen(2.0, 2)
        };
        assert_eq!(s.decide(Duration::ZERO, obs(200, 20)).desired, 1);
        assert_eq!(s.decide(TICK, obs(900, 20)).desired, 3, "TTFT missed");
        assert_eq!(s.decide(TICK * 2, obs(200, 80)).desired, 3, "ITL missed");
        // Still missed with 3 ready: no fourth until the cooldown has passed.
        let obs3 = Observation {
            ready: 3,
            ..obs(900, 20)
        };
        assert_eq!(s.decide(TICK * 3, obs3).desired, 3);
        assert_eq!(s.decide(TICK + LATENCY_COOLDOWN, obs3).desired, 4);
    }

    #[test]
    fn a_burst_seen_by_the_activator_is_held_until_the_averages_catch_up() {
        // Regression: a wake for 40 held requests asked for 5 replicas, and the next tick's
        // averages (nearly all idle samples) asked for 1, stopping the 4 still starting.
        let mut s = Autoscaler::new(AutoscalerConfig {
            target_concurrency: 8.0,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            ..AutoscalerConfig::new(0, 10)
        });
        let tick = |s: &mut Autoscaler, now: Duration, c: f64, ready| s.decide(now, seen(c, ready));
        let mut now = Duration::ZERO;
        for _ in 0..600 {
            now += TICK;
            assert_eq!(tick(&mut s, now, 0.0, 0).desired, 0);
        }
        s.burst(now, 5);
        for i in 0..20 {
            now += TICK;
            let ready = if i < 2 { 0 } else { 5 };
            assert_eq!(tick(&mut s, now, 40.0, ready).desired, 5, "tick {i}");
        }
    }

    #[test]
    fn a_request_between_two_samples_still_counts_as_activity() {
        // Regression: a request that came and went between ticks left concurrency at 0, so a
        // deployment woken for it looked idle at the next tick and was stopped at once.
        let mut s = Autoscaler::new(config());
        let quiet = |arrivals| Observation {
            arrivals,
            ..seen(0.0, 1)
        };
        let mut now = Duration::from_secs(100);
        assert_eq!(s.decide(now, quiet(1)).desired, 1, "it arrived: not idle");
        for _ in 0..50 {
            now += TICK;
            assert_eq!(
                s.decide(now, quiet(0)).desired,
                1,
                "idle for less than 30 s"
            );
        }
        now += Duration::from_secs(10);
        assert_eq!(s.decide(now, quiet(0)).desired, 0, "idle past the timeout");
    }
}
