//! The checkers that are not the linearizability search: lost writes, watch guarantees, and the
//! figures (quantiles).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    history::Kind,
    workload::{KeyRecord, Keyspace, WatchEvent},
};

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, passed: bool, detail: impl Into<String>) -> Check {
        Check { name: name.into(), passed, detail: detail.into() }
    }
}

/// The set workload: every acknowledged key must be in the final read.
pub fn lost_set_writes(attempts: &[(u64, Kind)], present: &BTreeSet<u64>) -> Check {
    let acked: Vec<u64> = attempts.iter().filter(|(_, k)| *k == Kind::Ok).map(|(n, _)| *n).collect();
    let lost: Vec<u64> = acked.iter().copied().filter(|n| !present.contains(n)).collect();
    let failed_but_present: Vec<u64> =
        attempts.iter().filter(|(n, k)| *k == Kind::Fail && present.contains(n)).map(|(n, _)| *n).collect();
    let unknown = attempts.iter().filter(|(_, k)| *k == Kind::Info).count();
    let unknown_present = attempts.iter().filter(|(n, k)| *k == Kind::Info && present.contains(n)).count();
    let passed = lost.is_empty() && failed_but_present.is_empty();
    let mut detail = format!(
        "{} acknowledged, {} lost; {} unknown ({} of them applied); {} refused",
        acked.len(),
        lost.len(),
        unknown,
        unknown_present,
        attempts.iter().filter(|(_, k)| *k == Kind::Fail).count()
    );
    if !lost.is_empty() {
        detail += &format!("; lost: {:?}", &lost[..lost.len().min(20)]);
    }
    if !failed_but_present.is_empty() {
        detail += &format!(
            "; refused for certain yet applied: {:?}",
            &failed_but_present[..failed_but_present.len().min(20)]
        );
    }
    Check::new("no-lost-writes", passed, detail)
}

/// Every acknowledged register write must be in the cluster's history at the revision it was
/// acknowledged with: (key, value, revision) against the authoritative event list.
pub fn acked_in_history(acked: &[(String, u64, i64)], truth: &[WatchEvent]) -> Check {
    let by_rev: BTreeMap<i64, &WatchEvent> = truth.iter().map(|e| (e.revision, e)).collect();
    let mut missing = Vec::new();
    for (key, value, rev) in acked {
        match by_rev.get(rev) {
            Some(e) if e.key == *key && e.value == value.to_string() => {}
            other => missing.push(format!("{key}={value}@{rev} (history has {other:?})")),
        }
    }
    Check::new(
        "acked-writes-in-history",
        missing.is_empty(),
        if missing.is_empty() {
            format!("all {} acknowledged writes found at their revisions", acked.len())
        } else {
            format!("{} of {} missing: {}", missing.len(), acked.len(), missing[..missing.len().min(5)].join("; "))
        },
    )
}

/// Watch guarantees: the live stream (resumed after every break) must be ordered, without
/// duplicates, and equal to the authoritative history up to where it got.
pub fn watch(live: &[WatchEvent], truth: &[WatchEvent], resumes: u64, errors: &[String]) -> Check {
    let mut problems = Vec::new();
    for w in live.windows(2) {
        if w[1].revision < w[0].revision {
            problems.push(format!("out of order: {} after {}", w[1].revision, w[0].revision));
        } else if w[1] == w[0] {
            problems.push(format!("duplicate event at revision {}", w[0].revision));
        }
    }
    let last = live.last().map_or(0, |e| e.revision);
    let expected: Vec<&WatchEvent> = truth.iter().filter(|e| e.revision <= last).collect();
    if expected.len() != live.len() || expected.iter().zip(live).any(|(a, b)| *a != b) {
        let first_diff = expected.iter().zip(live).position(|(a, b)| *a != b).unwrap_or(expected.len().min(live.len()));
        problems.push(format!(
            "live stream differs from the history: {} events live, {} in the history up to revision {last}; first \
             difference at event {first_diff}: live {:?} vs history {:?}",
            live.len(),
            expected.len(),
            live.get(first_diff),
            expected.get(first_diff)
        ));
    }
    if live.len() < truth.len() {
        let end = truth.last().map_or(0, |e| e.revision);
        problems.push(format!("the live stream stopped at revision {last}, the history goes on to {end}"));
    }
    problems.extend(errors.iter().cloned());
    Check::new(
        "watch",
        problems.is_empty(),
        if problems.is_empty() {
            format!("{} events, ordered, no gaps or duplicates, resumed {resumes} times", live.len())
        } else {
            problems[..problems.len().min(5)].join("; ")
        },
    )
}

/// Replica agreement: every master's own key space at revision `at` (read from its local state,
/// not through the leader) must be identical, keys, values and MVCC revisions alike. A master
/// that applied a command differently, or numbered revisions differently, shows up here even
/// when every client-visible check passed.
pub fn replicas_agree(at: i64, reads: &[(u64, Result<Keyspace, String>)]) -> Check {
    let mut problems = Vec::new();
    let mut reference: Option<(u64, &Keyspace)> = None;
    for (id, read) in reads {
        let ks = match read {
            Ok(ks) => ks,
            Err(e) => {
                problems.push(format!("master {id}: {e}"));
                continue;
            }
        };
        let Some((ref_id, base)) = reference else {
            reference = Some((*id, ks));
            continue;
        };
        if base == ks {
            continue;
        }
        let show = |kv: Option<&KeyRecord>| match kv {
            Some((k, v, create, modr, ver)) => format!(
                "{}={} (create {create}, mod {modr}, version {ver})",
                String::from_utf8_lossy(k),
                String::from_utf8_lossy(&v[..v.len().min(60)])
            ),
            None => "nothing".into(),
        };
        let i = base.iter().zip(ks).position(|(a, b)| a != b).unwrap_or(base.len().min(ks.len()));
        problems.push(format!(
            "master {id} differs from master {ref_id} at revision {at} ({} keys vs {}); first difference: {} vs {}",
            ks.len(),
            base.len(),
            show(ks.get(i)),
            show(base.get(i))
        ));
    }
    Check::new(
        "replicas-agree",
        problems.is_empty() && reference.is_some(),
        if problems.is_empty() {
            format!(
                "{} masters hold the same {} keys at revision {at}",
                reads.len(),
                reference.map_or(0, |(_, ks)| ks.len())
            )
        } else {
            problems[..problems.len().min(5)].join("; ")
        },
    )
}

/// The q-quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(revision: i64, key: &str, value: &str) -> WatchEvent {
        WatchEvent { revision, key: key.into(), value: value.into(), delete: false }
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        let attempts = vec![(1, Kind::Ok), (2, Kind::Ok), (3, Kind::Info), (4, Kind::Fail)];
        let present: BTreeSet<u64> = [1, 3].into();
        let c = lost_set_writes(&attempts, &present);
        assert!(!c.passed, "{}", c.detail);
        assert!(c.detail.contains("lost: [2]"), "{}", c.detail);
        let present: BTreeSet<u64> = [1, 2].into();
        assert!(lost_set_writes(&attempts, &present).passed);
        let present: BTreeSet<u64> = [1, 2, 4].into();
        assert!(!lost_set_writes(&attempts, &present).passed, "a write refused for certain must not appear");
    }

    #[test]
    fn watch_gaps_duplicates_and_disorder_are_caught() {
        let truth = vec![ev(5, "a", "1"), ev(6, "b", "2"), ev(7, "a", "3")];
        assert!(watch(&truth, &truth, 0, &[]).passed);
        let gap = vec![ev(5, "a", "1"), ev(7, "a", "3")];
        assert!(!watch(&gap, &truth, 1, &[]).passed);
        let dup = vec![ev(5, "a", "1"), ev(6, "b", "2"), ev(6, "b", "2"), ev(7, "a", "3")];
        assert!(!watch(&dup, &truth, 1, &[]).passed);
        let disorder = vec![ev(6, "b", "2"), ev(5, "a", "1"), ev(7, "a", "3")];
        assert!(!watch(&disorder, &truth, 1, &[]).passed);
        let wrong = vec![ev(5, "a", "1"), ev(6, "b", "9"), ev(7, "a", "3")];
        assert!(!watch(&wrong, &truth, 0, &[]).passed);
        let short = vec![ev(5, "a", "1")];
        assert!(!watch(&short, &truth, 0, &[]).passed, "a stream that stopped early is a gap");
    }

    #[test]
    fn acknowledged_writes_must_sit_at_their_revision() {
        let truth = vec![ev(5, "a", "1"), ev(6, "b", "2")];
        assert!(acked_in_history(&[("a".into(), 1, 5)], &truth).passed);
        assert!(!acked_in_history(&[("a".into(), 1, 6)], &truth).passed);
        assert!(!acked_in_history(&[("c".into(), 4, 9)], &truth).passed);
    }

    #[test]
    fn replicas_that_differ_are_caught() {
        let kv = |k: &str, v: &str, rev: i64| (k.as_bytes().to_vec(), v.as_bytes().to_vec(), rev, rev, 1);
        let a = vec![kv("a", "1", 5), kv("b", "2", 6)];
        assert!(replicas_agree(6, &[(1, Ok(a.clone())), (2, Ok(a.clone())), (3, Ok(a.clone()))]).passed);
        // Same contents, one revision apart: the divergence seen once under clock skew.
        let shifted = vec![kv("a", "1", 5), kv("b", "2", 5)];
        let c = replicas_agree(6, &[(1, Ok(a.clone())), (2, Ok(shifted))]);
        assert!(!c.passed);
        assert!(c.detail.contains("master 2 differs from master 1"), "{}", c.detail);
        let missing = vec![kv("a", "1", 5)];
        assert!(!replicas_agree(6, &[(1, Ok(a.clone())), (2, Ok(missing))]).passed);
        let unreadable = replicas_agree(6, &[(1, Ok(a.clone())), (2, Err("no answer".into()))]);
        assert!(!unreadable.passed, "a master that cannot be compared is not in agreement");
        assert!(!replicas_agree(6, &[]).passed, "nothing compared is not a pass");
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
