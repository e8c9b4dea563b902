//! Choosing an endpoint: weighted round robin, least connections, random, and a
//! consistent-hash ring (Envoy's `RING_HASH`) for requests that carry a hash.
//!
//! A balancer knows only indices, weights and how many connections each index
//! holds; whether an index may be chosen now (outlier ejection, an attempt that
//! already failed) is asked of the caller, so the same balancer serves every proxy.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use rand::Rng;

/// The load-balancing policies (Istio's `simple` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Weighted round robin (Istio's `ROUND_ROBIN`, the default).
    #[default]
    RoundRobin,
    /// Fewest open connections relative to weight (`LEAST_CONN` / `LEAST_REQUEST`).
    LeastConn,
    /// Weighted random (`RANDOM`).
    Random,
    /// A consistent-hash ring (Istio's `consistentHash`, Envoy's `RING_HASH`): a request's
    /// hash picks the endpoint; one without a hash is placed at random.
    RingHash,
}

impl Policy {
    /// Istio's name for the policy.
    pub fn istio_name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "ROUND_ROBIN",
            Policy::LeastConn => "LEAST_CONN",
            Policy::Random => "RANDOM",
            Policy::RingHash => "RING_HASH",
        }
    }

    /// Parses Istio's names (`LEAST_REQUEST` is taken as least connections).
    pub fn from_istio_name(s: &str) -> Option<Self> {
        match s {
            "ROUND_ROBIN" | "UNSPECIFIED" => Some(Policy::RoundRobin),
            "LEAST_CONN" | "LEAST_REQUEST" => Some(Policy::LeastConn),
            "RANDOM" => Some(Policy::Random),
            "RING_HASH" => Some(Policy::RingHash),
            _ => None,
        }
    }
}

/// The longest weighted round-robin schedule; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 4096;

/// Envoy's `minimum_ring_size`: points on a hash ring, shared out by weight.
const RING_SIZE: u64 = 1024;

/// A 64-bit hash that is the same in every process (FNV-1a, then a finalizer that spreads
/// FNV's low bits), so that every sidecar puts a key on the same endpoint.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Picks endpoints among a fixed list by weight.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    weights: Vec<u32>,
    /// Round robin: indices in smooth weighted order, walked by `next`.
    schedule: Vec<u32>,
    next: AtomicUsize,
    active: Vec<AtomicU32>,
    /// Ring hash: (point, index), sorted by point.
    ring: Vec<(u64, u32)>,
}

impl Balancer {
    /// A ring-hash balancer whose endpoints are placed by `keys` (their addresses), so an
    /// endpoint keeps its place on the ring when others come and go.
    pub fn ring(weights: &[u32], keys: &[String]) -> Self {
        let mut b = Self::new(Policy::Random, weights);
        b.policy = Policy::RingHash;
        let total: u64 = b.weights.iter().map(|&w| u64::from(w)).sum();
        for (i, (w, key)) in b.weights.iter().zip(keys).enumerate() {
            let points = (RING_SIZE * u64::from(*w)).div_ceil(total.max(1)).max(1);
            for n in 0..points {
                b.ring.push((stable_hash(format!("{key}_{n}").as_bytes()), i as u32));
            }
        }
        b.ring.sort_unstable();
        b
    }

    /// Chooses for a request with `hash`: on a ring, the first eligible endpoint at or after
    /// the hash's point; otherwise as [`Balancer::pick`].
    pub fn pick_for(&self, hash: Option<u64>, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let (Some(hash), false) = (hash, self.ring.is_empty()) else {
            return self.pick(eligible);
        };
        let start = self.ring.partition_point(|(point, _)| *point < hash);
        (0..self.ring.len())
            .map(|k| self.ring[(start + k) % self.ring.len()].1 as usize)
            .find(|&i| eligible(i))
    }

    /// A balancer over endpoints with these weights (0 is taken as 1).
    pub fn new(policy: Policy, weights: &[u32]) -> Self {
        let weights: Vec<u32> = weights.iter().map(|&w| w.max(1)).collect();
        let schedule = if policy == Policy::RoundRobin {
            smooth_schedule(&weights)
        } else {
            Vec::new()
        };
        // Start each balancer at a random place so that many proxies restarted at
        // once do not all send their first connection to the same endpoint.
        let start = if schedule.is_empty() {
            0
        } else {
            rand::rng().random_range(0..schedule.len())
        };
        Self {
            policy,
            active: weights.iter().map(|_| AtomicU32::new(0)).collect(),
            weights,
            schedule,
            next: AtomicUsize::new(start),
            ring: Vec::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// How many endpoints it chooses among.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether it has no endpoint at all.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Open connections on endpoint `i`.
    pub fn active(&self, i: usize) -> u32 {
        self.active[i].load(Ordering::Relaxed)
    }

    /// Chooses an endpoint for which `eligible` holds, or None when there is none.
    pub fn pick(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        match self.policy {
            Policy::RoundRobin => self.pick_round_robin(eligible),
            Policy::LeastConn => self.pick_least_conn(eligible),
            Policy::Random | Policy::RingHash => self.pick_random(eligible),
        }
    }

    /// Counts a connection on endpoint `i` until the guard drops.
    pub fn open(&self, i: usize) -> Active<'_> {
        self.active[i].fetch_add(1, Ordering::Relaxed);
        Active {
            counter: &self.active[i],
        }
    }

    fn pick_round_robin(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.schedule.len();
        if n == 0 {
            return None;
        }
        let i = self.schedule[self.next.fetch_add(1, Ordering::Relaxed) % n] as usize;
        if eligible(i) {
            return Some(i);
        }
        // Walking on to the next slot would hand all of an ejected endpoint's share
        // to its neighbour in the schedule; a weighted draw spreads it by weight.
        self.pick_random(eligible)
    }

    fn pick_least_conn(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        // Ties go to whoever comes first from a random start, not always index 0.
        let start = rand::rng().random_range(0..n);
        let mut best: Option<(usize, u64, u64)> = None; // (index, load numerator, weight)
        for k in 0..n {
            let i = (start + k) % n;
            if !eligible(i) {
                continue;
            }
            let load = u64::from(self.active(i)) + 1;
            let w = u64::from(self.weights[i]);
            // load_i / w_i < load_b / w_b, compared without division.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * w) {
                best = Some((i, load, w));
            }
        }
        best.map(|(i, _, _)| i)
    }

    fn pick_random(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let total: u64 = (0..self.weights.len())
            .filter(|&i| eligible(i))
            .map(|i| u64::from(self.weights[i]))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = rand::rng().random_range(0..total);
        for i in (0..self.weights.len()).filter(|&i| eligible(i)) {
            let w = u64::from(self.weights[i]);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

/// A connection counted against an endpoint; dropping it uncounts it.
#[derive(Debug)]
pub struct Active<'a> {
    counter: &'a AtomicU32,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// nginx's smooth weighted round robin, unrolled once into a schedule: weights
/// 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let sum: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let scaled: Vec<i64> = if sum > MAX_SCHEDULE {
        weights
            .iter()
            .map(|&w| ((u64::from(w) * MAX_SCHEDULE / sum).max(1)) as i64)
            .collect()
    } else {
        weights.iter().map(|&w| i64::from(w)).collect()
    };
    let total: i64 = scaled.iter().sum();
    let mut current = vec![0i64; scaled.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..scaled.len() {
            current[i] += scaled[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(b: &Balancer, picks: usize, eligible: impl Fn(usize) -> bool) -> Vec<usize> {
        let mut c = vec![0; b.len()];
        for _ in 0..picks {
            c[b.pick(&eligible).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_honours_weights_exactly_per_cycle() {
        let b = Balancer::new(Policy::RoundRobin, &[3, 1, 0]);
        assert_eq!(counts(&b, 5 * 100, |_| true), vec![300, 100, 100]);
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_skips_ineligible() {
        let b = Balancer::new(Policy::RoundRobin, &[1, 1, 1]);
        let c = counts(&b, 30_000, |i| i != 1);
        // The ejected third is shared out evenly: 15,000 each, ±6 sigma (≈ 350).
        assert_eq!(c[1], 0);
        assert!((14_600..15_400).contains(&c[0]), "{c:?}");
        assert_eq!(b.pick(|_| false), None);
    }

    #[test]
    fn least_conn_prefers_idle_and_weighs() {
        let b = Balancer::new(Policy::LeastConn, &[1, 1]);
        let _busy = b.open(0);
        for _ in 0..20 {
            assert_eq!(b.pick(|_| true), Some(1));
        }
        let w = Balancer::new(Policy::LeastConn, &[4, 1]);
        let _a = w.open(0);
        let _b = w.open(0); // 3/4 < 1/1 once counted as (active+1)/weight
        assert_eq!(w.pick(|_| true), Some(0));
        drop(_busy);
        assert_eq!(b.active(0), 0);
    }

    #[test]
    fn random_follows_weights_within_bounds() {
        let b = Balancer::new(Policy::Random, &[1, 3]);
        let c = counts(&b, 40_000, |_| true);
        // Expected 10,000 / 30,000; 6 sigma is about ±520.
        assert!((9_400..10_600).contains(&c[0]), "{c:?}");
        assert_eq!(b.pick(|i| i == 0), Some(0));
    }

    #[test]
    fn a_ring_keeps_a_key_on_its_endpoint_and_moves_only_the_gone_endpoints_keys() {
        let keys: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}:80")).collect();
        let ring = Balancer::ring(&[1, 1, 1, 1], &keys);
        let placed: Vec<usize> = (0..2_000u64)
            .map(|k| ring.pick_for(Some(stable_hash(&k.to_be_bytes())), |_| true).unwrap())
            .collect();
        let mut share = [0usize; 4];
        placed.iter().for_each(|&i| share[i] += 1);
        assert!(share.iter().all(|&c| (250..=750).contains(&c)), "{share:?}");
        // Endpoint 2 goes: only its keys move, and not to one neighbour alone.
        let without: Vec<usize> = (0..2_000u64)
            .map(|k| ring.pick_for(Some(stable_hash(&k.to_be_bytes())), |i| i != 2).unwrap())
            .collect();
        for (before, after) in placed.iter().zip(&without) {
            if *before != 2 {
                assert_eq!(before, after);
            }
        }
        // The same key, another process: the same endpoint.
        let again = Balancer::ring(&[1, 1, 1, 1], &keys);
        assert_eq!(again.pick_for(Some(42), |_| true), ring.pick_for(Some(42), |_| true));
        assert!(ring.pick_for(None, |_| true).is_some(), "no hash: placed at random");
    }

    #[test]
    fn big_weights_scale_down() {
        let s = smooth_schedule(&[1_000_000, 1]);
        assert!(s.len() <= MAX_SCHEDULE as usize + 1);
        assert!(s.contains(&1));
    }
}
