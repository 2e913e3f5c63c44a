//! A token bucket over an explicit clock (seconds as `f64`), so quotas are pure arithmetic
//! and can be tested without waiting.
//!
//! The bucket holds at most `capacity` (the per-minute limit) and refills at `capacity / 60`
//! per second: a key can use its whole minute's limit at once, and then its limit per minute.
//! Settling a request can push the level below zero (it used more than it reserved); later
//! requests then wait until the debt is refilled.

/// One limit (requests or tokens per minute).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenBucket {
    capacity: f64,
    level: f64,
    per_second: f64,
    at: f64,
}

impl TokenBucket {
    /// A full bucket for `per_minute` at time `now`.
    pub(crate) fn per_minute(per_minute: u64, now: f64) -> Self {
        let capacity = per_minute as f64;
        Self {
            capacity,
            level: capacity,
            per_second: capacity / 60.0,
            at: now,
        }
    }

    fn refill(&mut self, now: f64) {
        if now > self.at {
            self.level = (self.level + (now - self.at) * self.per_second).min(self.capacity);
            self.at = now;
        }
    }

    /// Takes `n` now, or says how many seconds until `n` are there (infinite if `n` is more
    /// than the bucket holds).
    pub(crate) fn take(&mut self, n: f64, now: f64) -> Result<(), f64> {
        self.refill(now);
        if n > self.capacity {
            return Err(f64::INFINITY);
        }
        if self.level >= n {
            self.level -= n;
            Ok(())
        } else {
            Err((n - self.level) / self.per_second)
        }
    }

    /// Gives `n` back (a refund when less was used than reserved; negative `n` charges more).
    /// Debt is capped at one minute's limit, so one expensive burst locks a key out for at most
    /// two minutes.
    pub(crate) fn give_back(&mut self, n: f64, now: f64) {
        self.refill(now);
        self.level = (self.level + n).clamp(-self.capacity, self.capacity);
    }

    /// The limit per minute.
    pub(crate) fn capacity(&self) -> f64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_minute_at_once_then_the_rate() {
        let mut b = TokenBucket::per_minute(3, 0.0);
        for _ in 0..3 {
            assert_eq!(b.take(1.0, 0.0), Ok(()));
        }
        let wait = b.take(1.0, 0.0).expect_err("the fourth within the minute");
        assert!((wait - 20.0).abs() < 1e-9, "one request per 20 s: {wait}");
        assert!(b.take(1.0, 19.9).is_err());
        assert_eq!(b.take(1.0, 20.0), Ok(()));
    }

    #[test]
    fn settling_refunds_or_charges_and_caps_at_capacity() {
        let mut b = TokenBucket::per_minute(600, 0.0);
        assert_eq!(b.take(500.0, 0.0), Ok(()));
        // Used 100 of the 500 reserved: 400 come back.
        b.give_back(400.0, 0.0);
        assert_eq!(b.take(500.0, 0.0), Ok(()));
        // Used 700 of 500 reserved: in debt, the next 100 wait until it is refilled.
        b.give_back(-200.0, 0.0);
        let wait = b.take(100.0, 0.0).expect_err("in debt");
        assert!((wait - 30.0).abs() < 1e-9, "{wait}");
        b.give_back(10_000.0, 1.0);
        assert_eq!(b.take(600.0, 1.0), Ok(()), "capped at the limit");
        assert_eq!(b.take(601.0, 1000.0), Err(f64::INFINITY), "never fits");
        // Debt stops at one minute's limit.
        b.give_back(-1e9, 1000.0);
        let wait = b.take(600.0, 1000.0).expect_err("in debt");
        assert!((wait - 120.0).abs() < 1e-6, "{wait}");
    }
}
