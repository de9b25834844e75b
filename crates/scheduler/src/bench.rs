//! A synthetic cluster to measure placement speed (`berth bench schedule`).

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::constraint::{Constraint, Field, Op};
use crate::model::{Availability, NodeInfo, Strategy, TaskRequest};
use crate::scheduler::Scheduler;

/// Tasks per `schedule` call in [`bench`].
const BATCH: usize = 1_000;
const SERVICES: usize = 10;
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// What [`bench`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub nodes: usize,
    pub tasks: usize,
    pub placed: usize,
    pub unplaced: usize,
    /// Wall time of all `schedule` calls (not of building the cluster).
    pub seconds: f64,
    pub placements_per_sec: f64,
}

/// Schedules `tasks` replicas of 10 services onto `nodes` synthetic nodes (3 zones, 4 capacity
/// sizes, half of them labelled `disk=ssd`; some services constrained to or away from ssd,
/// one with `max_replicas_per_node`, one with anti-affinity) in batches of 1,000 with the spread strategy, spreading
/// over `zone`. Deterministic apart from the timing.
pub fn bench(nodes: usize, tasks: usize) -> BenchResult {
    let cluster = synthetic_nodes(nodes);
    let mut scheduler = Scheduler::new(cluster, &[], Strategy::Spread);
    let requests = synthetic_tasks(tasks);
    let (mut placed, mut unplaced) = (0, 0);
    let start = Instant::now();
    for batch in requests.chunks(BATCH) {
        let (ok, failed) = scheduler.schedule(batch);
        placed += ok.len();
        unplaced += failed.len();
    }
    let seconds = start.elapsed().as_secs_f64();
    let placements_per_sec = if seconds > 0.0 { placed as f64 / seconds } else { 0.0 };
    BenchResult { nodes, tasks, placed, unplaced, seconds, placements_per_sec }
}

/// A cheap deterministic mix (splitmix64) so sizes vary without a random number crate.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn synthetic_nodes(count: usize) -> Vec<NodeInfo> {
    (0..count)
        .map(|i| {
            let size = mix(i as u64) % 4;
            let mut labels = BTreeMap::new();
            labels.insert("zone".to_string(), ZONES[i % ZONES.len()].to_string());
            if mix(i as u64 + 1_000_003) & 1 == 0 {
                labels.insert("disk".to_string(), "ssd".to_string());
            }
            NodeInfo {
                id: format!("node-{i:06}"),
                name: format!("host-{i:06}"),
                labels,
                ready: true,
                availability: Availability::Active,
                cpu_millis: 4_000 << size,
                memory_bytes: (8 * GIB) << size,
                networks: true,
                host_paths: Vec::new(),
            }
        })
        .collect()
}

fn synthetic_tasks(count: usize) -> Vec<TaskRequest> {
    (0..count)
        .map(|j| {
            let s = j % SERVICES;
            let mut task = TaskRequest {
                task_id: format!("task-{j:07}"),
                service: format!("bench/svc-{s}"),
                slot: (j / SERVICES) as u64,
                cpu_millis: 100 + 50 * s as u64,
                memory_bytes: (64 + 32 * s as u64) * MIB,
                spread: vec!["zone".to_string()],
                ..TaskRequest::default()
            };
            match s {
                0 => task.constraints.push(Constraint {
                    field: Field::Label("disk".to_string()),
                    op: Op::Eq,
                    value: "ssd".to_string(),
                }),
                1 => task.max_replicas_per_node = Some(2),
                2 => task.anti_affinity.push("bench/svc-3".to_string()),
                3 => task.constraints.push(Constraint {
                    field: Field::Label("disk".to_string()),
                    op: Op::Ne,
                    value: "ssd".to_string(),
                }),
                _ => {}
            }
            task
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_2000_nodes_20000_tasks_completes() {
        let r = bench(2_000, 20_000);
        assert_eq!(r.placed + r.unplaced, 20_000);
        assert_eq!(r.unplaced, 0, "{r:?}");
        assert!(r.placements_per_sec > 0.0);
        println!("{r:?}");
    }

    /// `cargo test --release -p berth-scheduler -- --ignored --nocapture`
    #[test]
    #[ignore = "large; run in release"]
    fn bench_10000_nodes_100000_tasks() {
        let r = bench(10_000, 100_000);
        println!("{}", line(&r));
        assert_eq!(r.placed + r.unplaced, 100_000);
    }

    fn line(r: &BenchResult) -> String {
        format!(
            "bench nodes={} tasks={} placed={} unplaced={} seconds={:.3} placements_per_sec={:.0}",
            r.nodes, r.tasks, r.placed, r.unplaced, r.seconds, r.placements_per_sec
        )
    }
}
