//! Envoy's priority levels (EDS `LocalityLbEndpoints.priority`, which the controller sets
//! for locality failover): each level takes traffic in proportion to its healthy share
//! times the overprovisioning factor (1.4 by default), and what it cannot take spills to the
//! next level. When no level is healthy enough to take it all, the shares are scaled up to
//! the whole ("normalised"), as Envoy does.

use rand::Rng;

/// Envoy's default `overprovisioning_factor`, in percent.
pub const DEFAULT_OVERPROVISIONING: u32 = 140;

/// One level: how many of its endpoints are healthy, of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    pub priority: u32,
    pub healthy: usize,
    pub total: usize,
}

/// Each level's share of the traffic, in percent, in the order given (lowest priority
/// number first).
pub fn loads(levels: &[Level], overprovisioning: u32) -> Vec<u32> {
    let health: Vec<u32> = levels
        .iter()
        .map(|l| {
            if l.total == 0 {
                return 0;
            }
            let h = l.healthy as u64 * u64::from(overprovisioning) / l.total as u64;
            h.min(100) as u32
        })
        .collect();
    let sum: u32 = health.iter().sum::<u32>().min(100);
    if sum == 0 {
        // Nothing healthy anywhere: the first level takes it all (Envoy's panic applies).
        return levels
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { 100 } else { 0 })
            .collect();
    }
    let mut left = 100u32;
    let mut shares: Vec<u32> = health
        .iter()
        .map(|&h| {
            let share = (h * 100 / sum).min(left);
            left -= share;
            share
        })
        .collect();
    // Rounding down left a few percent: the last level that takes traffic takes them.
    if let Some(last) = shares.iter_mut().rev().find(|s| **s > 0) {
        *last += left;
    }
    shares
}

/// Draws a level for one request.
pub fn choose(levels: &[Level], overprovisioning: u32) -> Option<u32> {
    let loads = loads(levels, overprovisioning);
    let mut point = rand::rng().random_range(0..100u32);
    for (level, load) in levels.iter().zip(loads) {
        if point < load {
            return Some(level.priority);
        }
        point -= load;
    }
    levels.last().map(|l| l.priority)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(priority: u32, healthy: usize, total: usize) -> Level {
        Level {
            priority,
            healthy,
            total,
        }
    }

    #[test]
    fn traffic_spills_by_healthy_share_times_1_4() {
        let f = DEFAULT_OVERPROVISIONING;
        assert_eq!(loads(&[level(0, 10, 10), level(1, 10, 10)], f), [100, 0]);
        // 80% healthy × 1.4 = 112%: still all of it.
        assert_eq!(loads(&[level(0, 8, 10), level(1, 10, 10)], f), [100, 0]);
        // 50% healthy × 1.4 = 70%: 30% spills over.
        assert_eq!(loads(&[level(0, 5, 10), level(1, 10, 10)], f), [70, 30]);
        // Neither can take it all: 28% + 42% normalised to the whole.
        assert_eq!(loads(&[level(0, 2, 10), level(1, 3, 10)], f), [40, 60]);
        assert_eq!(loads(&[level(0, 0, 4), level(1, 0, 4)], f), [100, 0]);
    }

    #[test]
    fn draws_follow_the_loads() {
        let levels = [level(0, 5, 10), level(1, 10, 10)];
        let n = 10_000;
        let spilled = (0..n)
            .filter(|_| choose(&levels, DEFAULT_OVERPROVISIONING) == Some(1))
            .count();
        // 30% of 10 000, σ ≈ 46: six σ either side.
        assert!((2_725..=3_275).contains(&spilled), "{spilled}");
    }
}
