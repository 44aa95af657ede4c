//! `RateLimit`: keeps a flood of bad input from flooding the log.
//!
//! At most `burst` events are let through per `window`; the first one let through after a
//! quiet spell reports how many were suppressed, so nothing goes uncounted.

use std::time::{Duration, Instant};

/// A per-category limiter (not shared between threads: each thread keeps its own).
#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    started: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    /// `burst` events per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self { window, burst, started: None, used: 0, suppressed: 0 }
    }

    /// `Some(suppressed_before)` if this event may be logged, `None` if it must be dropped.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.started.is_none_or(|s| now.duration_since(s) >= self.window) {
            self.started = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_reports_what_it_suppressed() {
        let mut r = RateLimit::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(11)), Some(2));
    }
}
