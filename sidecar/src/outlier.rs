//! Passive outlier detection, as Envoy does it: an endpoint that fails
//! `consecutive_failures` times in a row is ejected for `base_ejection_time`
//! times the number of times it has been ejected (capped), while never more than
//! `max_ejection_percent` of the endpoints are out at once (but at least one may be).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The knobs, with Envoy's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Failures in a row that eject an endpoint (Envoy's `consecutive_local_origin_failure`: 5).
    pub consecutive_failures: u32,
    /// Ejection time for a first ejection; each later ejection multiplies it (Envoy: 30 s).
    pub base_ejection_time: Duration,
    /// The longest an ejection may last (Envoy: 300 s).
    pub max_ejection_time: Duration,
    /// How long an endpoint must stay healthy to forget one past ejection (Envoy's `interval`: 10 s).
    pub interval: Duration,
    /// At most this share of the endpoints may be ejected at once, yet always at least one (Envoy: 10 %).
    pub max_ejection_percent: u8,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            interval: Duration::from_secs(10),
            max_ejection_percent: 10,
        }
    }
}

/// What recording a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Still in service.
    Kept,
    /// Ejected for this long.
    Ejected(Duration),
    /// Would have been ejected, but too many endpoints are out already.
    KeptAtLimit,
}

/// Health of one set of endpoints (one service's endpoints on one network).
#[derive(Debug)]
pub struct OutlierDetector {
    policy: OutlierPolicy,
    epoch: Instant,
    hosts: Vec<HostHealth>,
}

#[derive(Debug, Default)]
struct HostHealth {
    /// Nanoseconds after `epoch` until which the host is ejected; read lock-free on every pick.
    ejected_until: AtomicU64,
    state: Mutex<HostState>,
}

#[derive(Debug, Default, Clone)]
struct HostState {
    consecutive_failures: u32,
    ejections: u32,
    /// When the multiplier was last decayed (nanos after epoch).
    decayed_at: u64,
}

impl OutlierDetector {
    /// A detector for `n` endpoints, all healthy.
    pub fn new(policy: OutlierPolicy, n: usize) -> Self {
        Self {
            policy,
            epoch: Instant::now(),
            hosts: (0..n).map(|_| HostHealth::default()).collect(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &OutlierPolicy {
        &self.policy
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether endpoint `i` may take traffic now.
    pub fn is_available(&self, i: usize) -> bool {
        self.hosts[i].ejected_until.load(Ordering::Relaxed) <= self.now()
    }

    /// How long endpoint `i` stays ejected, if it is.
    pub fn ejected_for(&self, i: usize) -> Option<Duration> {
        let until = self.hosts[i].ejected_until.load(Ordering::Relaxed);
        let now = self.now();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Number of endpoints ejected now.
    pub fn ejected_count(&self) -> usize {
        (0..self.hosts.len()).filter(|&i| !self.is_available(i)).count()
    }

    /// Endpoint `i` served a connection: its failure streak ends.
    pub fn record_success(&self, i: usize) {
        let mut s = self.hosts[i].state.lock().unwrap_or_else(|p| p.into_inner());
        s.consecutive_failures = 0;
    }

    /// Endpoint `i` failed (refused, timed out, reset before serving).
    pub fn record_failure(&self, i: usize) -> Verdict {
        let host = &self.hosts[i];
        let now = self.now();
        let mut s = host.state.lock().unwrap_or_else(|p| p.into_inner());
        if host.ejected_until.load(Ordering::Relaxed) > now {
            return Verdict::Kept; // already out; late failures of old attempts don't extend it
        }
        s.consecutive_failures += 1;
        if s.consecutive_failures < self.policy.consecutive_failures {
            return Verdict::Kept;
        }
        let allowed = (self.hosts.len() * usize::from(self.policy.max_ejection_percent) / 100).max(1);
        if self.ejected_count() >= allowed {
            return Verdict::KeptAtLimit;
        }
        // Forget one past ejection per healthy interval, as Envoy's interval timer does.
        let interval = self.policy.interval.as_nanos().max(1) as u64;
        let healthy_intervals = (now.saturating_sub(s.decayed_at) / interval) as u32;
        s.ejections = s.ejections.saturating_sub(healthy_intervals) + 1;
        let time = self
            .policy
            .base_ejection_time
            .saturating_mul(s.ejections)
            .min(self.policy.max_ejection_time);
        s.consecutive_failures = 0;
        let until = now + time.as_nanos() as u64;
        s.decayed_at = until;
        host.ejected_until.store(until, Ordering::Relaxed);
        Verdict::Ejected(time)
    }

    /// Carries the health of endpoint `from` of `old` over to endpoint `to` of this
    /// detector, so a config reload does not give a failing endpoint a fresh start.
    pub fn inherit(&self, to: usize, old: &OutlierDetector, from: usize) {
        let offset = |t: u64| -> u64 {
            // Re-base old.epoch-relative nanos onto self.epoch.
            let abs = old.epoch + Duration::from_nanos(t);
            abs.saturating_duration_since(self.epoch).as_nanos() as u64
        };
        let src = &old.hosts[from];
        let s = src.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let until = src.ejected_until.load(Ordering::Relaxed);
        let dst = &self.hosts[to];
        *dst.state.lock().unwrap_or_else(|p| p.into_inner()) = HostState {
            decayed_at: offset(s.decayed_at),
            ..s
        };
        dst.ejected_until
            .store(if until == 0 { 0 } else { offset(until) }, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 2,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            interval: Duration::from_secs(100),
            max_ejection_percent: 50,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_and_returns() {
        let d = OutlierDetector::new(policy(), 4);
        assert_eq!(d.record_failure(0), Verdict::Kept);
        d.record_success(0); // breaks the streak
        assert_eq!(d.record_failure(0), Verdict::Kept);
        assert_eq!(d.record_failure(0), Verdict::Ejected(Duration::from_secs(10)));
        assert!(!d.is_available(0));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(d.is_available(0));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_then_caps_then_decays() {
        let d = OutlierDetector::new(policy(), 4);
        let mut times = vec![];
        for _ in 0..3 {
            d.record_failure(1);
            if let Verdict::Ejected(t) = d.record_failure(1) {
                times.push(t.as_secs());
                tokio::time::advance(t).await;
            }
        }
        assert_eq!(times, [10, 20, 25]);
        // Healthy for long enough forgets the past ejections.
        tokio::time::advance(Duration::from_secs(1000)).await;
        d.record_failure(1);
        assert_eq!(d.record_failure(1), Verdict::Ejected(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn never_ejects_more_than_the_limit_but_always_one() {
        let d = OutlierDetector::new(policy(), 4); // 50 % of 4 = 2
        for i in 0..4 {
            d.record_failure(i);
            d.record_failure(i);
        }
        assert_eq!(d.ejected_count(), 2);
        let one = OutlierDetector::new(
            OutlierPolicy {
                max_ejection_percent: 0,
                ..policy()
            },
            2,
        );
        one.record_failure(0);
        assert!(matches!(one.record_failure(0), Verdict::Ejected(_)));
        one.record_failure(1);
        assert_eq!(one.record_failure(1), Verdict::KeptAtLimit);
    }

    #[tokio::test(start_paused = true)]
    async fn health_survives_a_reload() {
        let old = OutlierDetector::new(policy(), 2);
        old.record_failure(1);
        old.record_failure(1);
        tokio::time::advance(Duration::from_secs(3)).await;
        let new = OutlierDetector::new(policy(), 3);
        new.inherit(0, &old, 1);
        assert_eq!(new.ejected_for(0), Some(Duration::from_secs(7)));
        assert!(new.is_available(1));
    }
}
