//! Retention policies: which points of a host to keep.
//!
//! The rules follow Proxmox Backup Server's (and restic's) semantics. Points are considered
//! newest first. `keep_last` keeps the newest N. Then each period rule (hourly, daily, weekly,
//! monthly) keeps the newest point of each of the N most recent periods that have points; a
//! period already represented by a kept point does not use up the count. The newest point is
//! always kept (a running sync may be reusing its chunks: see `docs/object-mode.md`), and a
//! policy that keeps nothing is refused rather than taken to mean "delete everything".

use serde::{Deserialize, Serialize};

/// How many points to keep, per rule. All zero = keep everything (no pruning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// The newest N points.
    pub keep_last: u32,
    /// The newest point of each of the last N hours that have points.
    pub keep_hourly: u32,
    /// … days.
    pub keep_daily: u32,
    /// … ISO weeks.
    pub keep_weekly: u32,
    /// … months.
    pub keep_monthly: u32,
}

impl Retention {
    /// True when the policy prunes nothing.
    pub fn keeps_everything(&self) -> bool {
        *self == Retention::default()
    }
}

/// A point as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// When it was made, Unix milliseconds (UTC).
    pub created_unix_ms: u64,
}

/// Returns, for each of `points` (any order), whether `policy` keeps it.
pub fn select(points: &[Candidate], policy: &Retention) -> Vec<bool> {
    let mut keep = vec![policy.keeps_everything(); points.len()];
    if points.is_empty() || policy.keeps_everything() {
        return keep;
    }
    let mut order: Vec<usize> = (0..points.len()).collect();
    // Newest first; ties keep their input order.
    order.sort_by(|&a, &b| points[b].created_unix_ms.cmp(&points[a].created_unix_ms));
    for &i in order.iter().take(policy.keep_last as usize) {
        keep[i] = true;
    }
    let period = |ms: u64, unit: Unit| -> (i64, u32) {
        let (y, mo, _, h, _, _) = crate::ids::civil_from_unix(ms / 1000);
        let days = (ms / 86_400_000) as i64;
        match unit {
            Unit::Hour => (days, h),
            Unit::Day => (days, 0),
            // ISO weeks start on Monday; 1970-01-01 was a Thursday.
            Unit::Week => ((days + 3).div_euclid(7), 0),
            Unit::Month => (y * 12 + i64::from(mo), 0),
        }
    };
    for (count, unit) in [
        (policy.keep_hourly, Unit::Hour),
        (policy.keep_daily, Unit::Day),
        (policy.keep_weekly, Unit::Week),
        (policy.keep_monthly, Unit::Month),
    ] {
        if count == 0 {
            continue;
        }
        let mut covered: std::collections::HashSet<(i64, u32)> = order
            .iter()
            .filter(|&&i| keep[i])
            .map(|&i| period(points[i].created_unix_ms, unit))
            .collect();
        let mut used = 0;
        for &i in &order {
            if used == count {
                break;
            }
            let p = period(points[i].created_unix_ms, unit);
            if covered.insert(p) {
                keep[i] = true;
                used += 1;
            }
        }
    }
    keep[order[0]] = true;
    keep
}

#[derive(Debug, Clone, Copy)]
enum Unit {
    Hour,
    Day,
    Week,
    Month,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: u64 = 3_600_000;
    const D: u64 = 24 * H;

    fn at(ms: &[u64]) -> Vec<Candidate> {
        ms.iter().map(|&m| Candidate { created_unix_ms: m }).collect()
    }

    #[test]
    fn keep_last_and_daily() {
        // Two points a day for five days (2026-11-01 is day 20393).
        let base = 20_393 * D;
        let pts: Vec<u64> = (0..5)
            .flat_map(|d| [base + d * D + H, base + d * D + 20 * H])
            .collect();
        let c = at(&pts);
        let p = Retention {
            keep_last: 1,
            ..Default::default()
        };
        assert_eq!(select(&c, &p).iter().filter(|k| **k).count(), 1);
        assert!(select(&c, &p)[9]);

        let p = Retention {
            keep_daily: 3,
            ..Default::default()
        };
        let k = select(&c, &p);
        // The newest of each of the last three days.
        assert_eq!(
            k,
            [false, false, false, false, false, true, false, true, false, true]
        );

        let p = Retention {
            keep_last: 2,
            keep_daily: 3,
            ..Default::default()
        };
        // keep_last keeps day 4's two points; day 4 is covered, so days 3, 2 and 1 are added.
        let k = select(&c, &p);
        assert_eq!(
            k,
            [false, false, false, true, false, true, false, true, true, true]
        );
    }

    #[test]
    fn empty_policy_keeps_everything() {
        let c = at(&[1, 2, 3]);
        assert_eq!(select(&c, &Retention::default()), [true, true, true]);
    }

    proptest! {
        #[test]
        fn the_newest_point_is_always_kept_and_keep_last_is_exact(
            times in prop::collection::vec(0u64..400 * D, 1..60),
            last in 0u32..10,
            daily in 0u32..10,
            weekly in 0u32..5,
            monthly in 0u32..5,
        ) {
            let c = at(&times);
            let p = Retention { keep_last: last, keep_daily: daily, keep_weekly: weekly, keep_monthly: monthly, keep_hourly: 0 };
            let k = select(&c, &p);
            let newest = times.iter().copied().max().unwrap();
            prop_assert!(times.iter().zip(&k).any(|(&t, &kept)| t == newest && kept));
            let kept = k.iter().filter(|x| **x).count();
            if !p.keeps_everything() {
                let bound = (last + daily + weekly + monthly).max(1) as usize;
                prop_assert!(kept <= bound.min(times.len()));
                prop_assert!(kept >= (last as usize).min(times.len()));
            }
        }
    }
}
