//! Scheduler behaviour through the public API.

use std::collections::BTreeMap;

use crate::{
    Availability, Constraint, NodeInfo, Placed, Placement, Scheduler, Strategy, TaskRequest, Unplaced, VolumeNeed,
    host_path_allowed,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn node(id: &str, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        id: id.to_string(),
        name: format!("h-{id}"),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        ready: true,
        availability: Availability::Active,
        cpu_millis: 4_000,
        memory_bytes: 4 * GIB,
        networks: false,
        host_paths: Vec::new(),
    }
}

fn nodes(ids: &[&str]) -> Vec<NodeInfo> {
    ids.iter().map(|id| node(id, &[])).collect()
}

fn task(service: &str, slot: u64) -> TaskRequest {
    TaskRequest {
        task_id: format!("{service}.{slot}"),
        service: service.to_string(),
        slot,
        cpu_millis: 100,
        memory_bytes: 64 * MIB,
        ..TaskRequest::default()
    }
}

fn replicas(service: &str, n: u64, edit: impl Fn(&mut TaskRequest)) -> Vec<TaskRequest> {
    (1..=n)
        .map(|slot| {
            let mut t = task(service, slot);
            edit(&mut t);
            t
        })
        .collect()
}

/// node id per task id, in placement order.
fn where_(placements: &[Placement]) -> Vec<(&str, &str)> {
    placements.iter().map(|p| (p.task_id.as_str(), p.node_id.as_str())).collect()
}

fn on(placements: &[Placement]) -> Vec<&str> {
    placements.iter().map(|p| p.node_id.as_str()).collect()
}

fn count_on(placements: &[Placement], ids: &[&str]) -> usize {
    placements.iter().filter(|p| ids.contains(&p.node_id.as_str())).count()
}

fn placed_on(service: &str, node_id: &str, id: &str) -> Placed {
    Placed {
        task_id: id.to_string(),
        service: service.to_string(),
        node_id: node_id.to_string(),
        cpu_millis: 100,
        memory_bytes: 64 * MIB,
        host_ports: vec![],
    }
}

#[test]
fn spread_over_zone_lands_two_and_one() {
    // Zone a has two nodes, zone b one; without zone spread the per-node spread would also put 2
    // in zone a, so zone a gets three nodes to make the zone spread visible: 3 replicas -> 2 + 1.
    let cluster = vec![
        node("a1", &[("zone", "a")]),
        node("a2", &[("zone", "a")]),
        node("a3", &[("zone", "a")]),
        node("b1", &[("zone", "b")]),
    ];
    let mut s = Scheduler::new(cluster, &[], Strategy::Spread);
    let (ok, failed) = s.schedule(&replicas("ns/web", 3, |t| t.spread = vec!["zone".into()]));
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(count_on(&ok, &["a1", "a2", "a3"]), 2, "{ok:?}");
    assert_eq!(count_on(&ok, &["b1"]), 1, "{ok:?}");

    // Without the spread key the per-node spread puts all 3 in zone a (a1, a2, a3 sort first).
    let cluster = vec![
        node("a1", &[("zone", "a")]),
        node("a2", &[("zone", "a")]),
        node("a3", &[("zone", "a")]),
        node("b1", &[("zone", "b")]),
    ];
    let (ok, _) = Scheduler::new(cluster, &[], Strategy::Spread).schedule(&replicas("ns/web", 3, |_| {}));
    assert_eq!(on(&ok), ["a1", "a2", "a3"]);
}

#[test]
fn spread_counts_already_placed_tasks_and_unlabelled_nodes_form_a_group() {
    // Zone a already runs 2 replicas; nodes without a zone label form their own group "".
    let cluster = vec![node("a1", &[("zone", "a")]), node("b1", &[("zone", "b")]), node("x1", &[])];
    let placed = [placed_on("ns/web", "a1", "old1"), placed_on("ns/web", "a1", "old2")];
    let mut s = Scheduler::new(cluster, &placed, Strategy::Spread);
    let (ok, _) = s.schedule(&replicas("ns/web", 4, |t| t.spread = vec!["zone".into()]));
    // b1 and x1 first (tie by id), then again b1 and x1: zone a stays at 2 until they catch up.
    assert_eq!(on(&ok), ["b1", "x1", "b1", "x1"]);
}

#[test]
fn max_replicas_per_node_leaves_one_unplaced_with_reason() {
    let mut s = Scheduler::new(nodes(&["n1", "n2"]), &[], Strategy::Spread);
    let (ok, failed) = s.schedule(&replicas("ns/web", 3, |t| t.max_replicas_per_node = Some(1)));
    assert_eq!(on(&ok), ["n1", "n2"]);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].task_id, "ns/web.3");
    assert!(failed[0].reason.contains("max_replicas_per_node"), "{}", failed[0].reason);
    assert_eq!(failed[0].reason, "0/2 nodes eligible: 2 already run a replica of ns/web (max_replicas_per_node 1)");
}

#[test]
fn reason_lists_every_cause() {
    let mut cluster = nodes(&["n1", "n2", "n3", "n4", "n5"]);
    cluster[3].memory_bytes = 32 * MIB;
    cluster[4].memory_bytes = 32 * MIB;
    let placed = [placed_on("ns/web", "n1", "o1"), placed_on("ns/web", "n2", "o2"), placed_on("ns/web", "n3", "o3")];
    let mut s = Scheduler::new(cluster, &placed, Strategy::Spread);
    let (ok, failed) = s.schedule(&replicas("ns/web", 1, |t| t.max_replicas_per_node = Some(1)));
    assert!(ok.is_empty());
    assert_eq!(
        failed,
        [Unplaced {
            task_id: "ns/web.1".into(),
            reason: "0/5 nodes eligible: 3 already run a replica of ns/web (max_replicas_per_node 1), \
                     2 lack memory (need 64 MiB)"
                .into(),
        }]
    );
}

#[test]
fn constraints_on_labels_and_name() {
    let cluster =
        vec![node("n1", &[("zone", "eu-1a")]), node("n2", &[("zone", "eu-1b")]), node("n3", &[("zone", "eu-1a")])];
    let mut s = Scheduler::new(cluster, &[], Strategy::Spread);
    let c = |s: &str| s.parse::<Constraint>().unwrap();

    let (ok, _) = s.schedule(&replicas("ns/a", 4, |t| t.constraints = vec![c("node.labels.zone == eu-1a")]));
    assert!(on(&ok).iter().all(|n| *n == "n1" || *n == "n3"), "{ok:?}");
    assert_eq!(ok.len(), 4);

    let (ok, _) = s.schedule(&replicas("ns/b", 3, |t| t.constraints = vec![c("node.labels.zone != eu-1a")]));
    assert_eq!(on(&ok), ["n2", "n2", "n2"]);

    let (ok, _) = s.schedule(&replicas("ns/c", 4, |t| t.constraints = vec![c("node.name != h-n1")]));
    assert!(!on(&ok).contains(&"n1"), "{ok:?}");

    let (ok, failed) = s.schedule(&replicas("ns/d", 1, |t| {
        t.constraints = vec![c("node.name == h-n2"), c("node.labels.zone == eu-1a")]
    }));
    assert!(ok.is_empty());
    assert_eq!(
        failed[0].reason,
        "0/3 nodes eligible: 2 fail constraint `node.name == h-n2`, 1 fail constraint `node.labels.zone == eu-1a`"
    );
}

#[test]
fn node_without_enough_memory_is_skipped_and_usage_accumulates() {
    let mut cluster = nodes(&["big", "small"]);
    cluster[0].memory_bytes = 256 * MIB;
    cluster[1].memory_bytes = 32 * MIB;
    let mut s = Scheduler::new(cluster, &[], Strategy::Spread);
    // 4 x 64 MiB fit on "big" exactly; "small" fits none; the fifth fails on memory everywhere.
    let (ok, failed) = s.schedule(&replicas("ns/web", 5, |_| {}));
    assert_eq!(on(&ok), ["big", "big", "big", "big"]);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].reason, "0/2 nodes eligible: 2 lack memory (need 64 MiB)");

    // Usage persists across batches and counts placed tasks given to new().
    let (ok, _) = s.schedule(&[TaskRequest { memory_bytes: 0, ..task("ns/tiny", 1) }]);
    assert_eq!(ok.len(), 1);
    let mut cluster = nodes(&["n1"]);
    cluster[0].cpu_millis = 250;
    let mut s = Scheduler::new(cluster, &[placed_on("ns/old", "n1", "o1")], Strategy::Spread);
    let (ok, failed) = s.schedule(&replicas("ns/web", 2, |_| {}));
    assert_eq!(ok.len(), 1);
    assert_eq!(failed[0].reason, "0/1 nodes eligible: 1 lack CPU (need 100m)");
}

#[test]
fn down_drained_and_paused_nodes_get_nothing() {
    let mut cluster = nodes(&["down", "drain", "ok", "pause"]);
    cluster[0].ready = false;
    cluster[1].availability = Availability::Drain;
    cluster[3].availability = Availability::Pause;
    let mut s = Scheduler::new(cluster.clone(), &[], Strategy::Spread);
    let (ok, _) = s.schedule(&replicas("ns/web", 5, |_| {}));
    assert_eq!(on(&ok), ["ok"; 5]);

    cluster[2].ready = false;
    let mut s = Scheduler::new(cluster, &[], Strategy::Spread);
    let (ok, failed) = s.schedule(&replicas("ns/web", 1, |_| {}));
    assert!(ok.is_empty());
    assert_eq!(failed[0].reason, "0/4 nodes eligible: 2 not ready, 1 paused, 1 drained");

    let (_, failed) = Scheduler::new(vec![], &[], Strategy::Binpack).schedule(&replicas("ns/web", 1, |_| {}));
    assert_eq!(failed[0].reason, "0/0 nodes eligible: the cluster has no nodes");
}

#[test]
fn anti_affinity_avoids_nodes_running_the_service() {
    let placed = [placed_on("ns/db", "n1", "db1"), placed_on("ns/db", "n2", "db2")];
    let mut s = Scheduler::new(nodes(&["n1", "n2", "n3"]), &placed, Strategy::Spread);
    let (ok, _) = s.schedule(&replicas("ns/web", 3, |t| t.anti_affinity = vec!["ns/db".into()]));
    assert_eq!(on(&ok), ["n3"; 3]);

    // Within a batch: a db placed now blocks web on that node for the next task.
    let mut s = Scheduler::new(nodes(&["n1", "n2"]), &[], Strategy::Spread);
    let mut batch = replicas("ns/db", 1, |_| {});
    batch.extend(replicas("ns/web", 2, |t| t.anti_affinity = vec!["ns/db".into()]));
    let (ok, failed) = s.schedule(&batch);
    assert_eq!(where_(&ok), [("ns/db.1", "n1"), ("ns/web.1", "n2"), ("ns/web.2", "n2")]);
    assert!(failed.is_empty());

    // Anti-affinity with an unknown service blocks nothing.
    let (ok, _) = s.schedule(&replicas("ns/x", 1, |t| t.anti_affinity = vec!["ns/none".into()]));
    assert_eq!(ok.len(), 1);
}

#[test]
fn affinity_requires_every_listed_service() {
    let placed = [
        placed_on("ns/db", "n1", "db1"),
        placed_on("ns/db", "n3", "db3"),
        placed_on("ns/cache", "n3", "c3"),
        placed_on("ns/cache", "n2", "c2"),
    ];
    let mut s = Scheduler::new(nodes(&["n1", "n2", "n3", "n4"]), &placed, Strategy::Spread);
    let (ok, _) = s.schedule(&replicas("ns/web", 2, |t| t.affinity = vec!["ns/db".into()]));
    assert_eq!(on(&ok), ["n1", "n3"]);
    let (ok, _) = s.schedule(&replicas("ns/api", 2, |t| t.affinity = vec!["ns/db".into(), "ns/cache".into()]));
    assert_eq!(on(&ok), ["n3", "n3"]);
    let (ok, failed) = s.schedule(&replicas("ns/lonely", 1, |t| t.affinity = vec!["ns/nothing".into()]));
    assert!(ok.is_empty());
    assert_eq!(failed[0].reason, "0/4 nodes eligible: 4 lack a task of an affinity service (ns/nothing)");
}

#[test]
fn host_port_conflicts() {
    let placed = [Placed { host_ports: vec![80], ..placed_on("ns/old", "n1", "o1") }];
    let mut s = Scheduler::new(nodes(&["n1", "n2", "n3"]), &placed, Strategy::Binpack);
    let (ok, failed) = s.schedule(&replicas("ns/web", 3, |t| t.host_ports = vec![443, 80]));
    assert_eq!(on(&ok), ["n2", "n3"]);
    assert_eq!(failed[0].reason, "0/3 nodes eligible: 3 have host ports in use (80, 443)");
    // Another port still fits.
    let (ok, _) = s.schedule(&replicas("ns/other", 1, |t| t.host_ports = vec![8080]));
    assert_eq!(ok.len(), 1);
}

#[test]
fn binpack_fills_one_node_before_the_next() {
    let mut cluster = nodes(&["n1", "n2", "n3"]);
    for n in &mut cluster {
        n.cpu_millis = 300;
    }
    let mut s = Scheduler::new(cluster, &[], Strategy::Binpack);
    let (ok, _) = s.schedule(&replicas("ns/web", 7, |_| {}));
    assert_eq!(on(&ok), ["n1", "n1", "n1", "n2", "n2", "n2", "n3"]);
    // Binpack also prefers the fuller node for another service.
    let (ok, _) = s.schedule(&replicas("ns/api", 1, |_| {}));
    assert_eq!(on(&ok), ["n3"]);
}

#[test]
fn spread_strategy_spreads_then_prefers_free_resources() {
    let placed = [Placed { service: "ns/other".into(), cpu_millis: 2_000, ..placed_on("", "n1", "o1") }];
    let mut s = Scheduler::new(nodes(&["n1", "n2", "n3"]), &placed, Strategy::Spread);
    let (ok, _) = s.schedule(&replicas("ns/web", 6, |_| {}));
    // Equal counts: the busier n1 comes last each round.
    assert_eq!(on(&ok), ["n2", "n3", "n1", "n2", "n3", "n1"]);
}

#[test]
fn spread_is_primary_over_strategy() {
    let cluster = vec![node("a1", &[("zone", "a")]), node("b1", &[("zone", "b")])];
    let mut s = Scheduler::new(cluster, &[], Strategy::Binpack);
    let (ok, _) = s.schedule(&replicas("ns/web", 4, |t| t.spread = vec!["zone".into()]));
    assert_eq!(on(&ok), ["a1", "b1", "a1", "b1"]);
}

#[test]
fn same_input_same_output() {
    let mk = || {
        let mut cluster: Vec<NodeInfo> = (0..50)
            .map(|i| {
                let mut n = node(&format!("n{i:02}"), &[("zone", ["a", "b", "c"][i % 3])]);
                n.cpu_millis = 1_000 + (i as u64 % 7) * 500;
                n
            })
            .collect();
        // Input order must not matter either.
        cluster.reverse();
        cluster
    };
    let batch: Vec<TaskRequest> = (0..10)
        .flat_map(|s| {
            replicas(&format!("ns/s{s}"), 30, move |t| {
                t.spread = vec!["zone".into()];
                t.max_replicas_per_node = Some(2);
                t.cpu_millis = 50 + 25 * s;
                if s % 3 == 0 {
                    t.host_ports = vec![9000 + s as u16];
                }
            })
        })
        .collect();
    let first = Scheduler::new(mk(), &[], Strategy::Spread).schedule(&batch);
    let mut forward = mk();
    forward.reverse();
    let second = Scheduler::new(forward, &[], Strategy::Spread).schedule(&batch);
    assert_eq!(first, second);
    assert!(first.0.len() > 200, "{}", first.0.len());
}

#[test]
fn network_tasks_need_capable_nodes_with_room_for_a_block() {
    let mut ns = nodes(&["a", "b", "c"]);
    ns[1].networks = true;
    ns[2].networks = true;
    let task = |id: &str| TaskRequest {
        task_id: id.into(),
        service: "default/web".into(),
        networks: vec!["default/default".into()],
        ..Default::default()
    };
    // One free block, and node c holds one already: c, then b (taking the last free block).
    let rooms =
        [crate::NetworkRoom { network: "default/default".into(), nodes_with_block: vec!["c".into()], free_blocks: 1 }];
    let mut s = Scheduler::new(ns.clone(), &[], Strategy::Spread).with_networks(&rooms);
    let (placed, unplaced) = s.schedule(&[task("t1"), task("t2"), task("t3")]);
    let on: Vec<&str> = placed.iter().map(|p| p.node_id.as_str()).collect();
    assert_eq!(on, ["b", "c", "b"], "{unplaced:?}");
    // No block left for a: with b and c full of tasks' resources, the reason names both filters.
    let mut s = Scheduler::new(ns.clone(), &[], Strategy::Spread).with_networks(&[crate::NetworkRoom {
        network: "default/default".into(),
        nodes_with_block: vec![],
        free_blocks: 0,
    }]);
    let (placed, unplaced) = s.schedule(&[task("t1")]);
    assert!(placed.is_empty());
    let reason = &unplaced[0].reason;
    assert!(reason.contains("1 cannot attach networks"), "{reason}");
    assert!(reason.contains("2 have no address block of network default/default"), "{reason}");
    // A network the scheduler was not told about has no room; tasks without networks are unaffected.
    let mut s = Scheduler::new(ns, &[], Strategy::Spread);
    let (placed, _) = s.schedule(&[
        task("t1"),
        TaskRequest { task_id: "plain".into(), service: "default/x".into(), ..Default::default() },
    ]);
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].task_id, "plain");
}

fn local(volume: &str, node: Option<&str>) -> VolumeNeed {
    VolumeNeed { volume: volume.into(), local: true, node: node.map(str::to_string), host_path: None }
}

#[test]
fn a_task_goes_to_the_node_that_holds_its_local_volume() {
    let mut s = Scheduler::new(nodes(&["a", "b", "c"]), &[], Strategy::Spread);
    let t = TaskRequest { volumes: vec![local("default/db", Some("c"))], ..task("db", 1) };
    let (placed, unplaced) = s.schedule(&[t]);
    assert!(unplaced.is_empty(), "{unplaced:?}");
    assert_eq!(placed[0].node_id, "c");
}

#[test]
fn a_task_whose_volume_node_cannot_take_it_stays_pending_with_the_reason() {
    let mut all = nodes(&["a", "b"]);
    all[1].availability = Availability::Drain;
    let mut s = Scheduler::new(all, &[], Strategy::Spread);
    let t = TaskRequest { volumes: vec![local("default/db", Some("b"))], ..task("db", 1) };
    let (placed, unplaced) = s.schedule(std::slice::from_ref(&t));
    assert!(placed.is_empty());
    let reason = &unplaced[0].reason;
    assert!(reason.contains("1 drained") && reason.contains("1 do not hold local volume default/db"), "{reason}");
    assert!(reason.contains("its data is on h-b"), "{reason}");
    let gone = TaskRequest { volumes: vec![local("default/db", Some("zz"))], ..task("db", 1) };
    let (_, unplaced) = s.schedule(&[gone]);
    assert!(unplaced[0].reason.contains("a node that is gone"), "{}", unplaced[0].reason);
}

#[test]
fn tasks_of_one_batch_follow_a_new_local_volume_to_the_node_chosen_first() {
    let mut s = Scheduler::new(nodes(&["a", "b", "c"]), &[], Strategy::Spread);
    let batch: Vec<TaskRequest> =
        (1..=3).map(|i| TaskRequest { volumes: vec![local("default/shared", None)], ..task("web", i) }).collect();
    let (placed, unplaced) = s.schedule(&batch);
    assert!(unplaced.is_empty(), "{unplaced:?}");
    assert!(placed.iter().all(|p| p.node_id == placed[0].node_id), "{placed:?}");
}

#[test]
fn a_host_volume_needs_a_node_that_allows_its_path() {
    let mut all = nodes(&["a", "b"]);
    all[1].host_paths = vec!["/srv".into()];
    let mut s = Scheduler::new(all, &[], Strategy::Spread);
    let need = |p: &str| VolumeNeed { volume: "default/h".into(), host_path: Some(p.into()), ..Default::default() };
    let (placed, _) = s.schedule(&[TaskRequest { volumes: vec![need("/srv/data")], ..task("h", 1) }]);
    assert_eq!(placed[0].node_id, "b");
    let (_, unplaced) = s.schedule(&[TaskRequest { volumes: vec![need("/srvx")], ..task("h", 2) }]);
    assert!(unplaced[0].reason.contains("2 do not allow host path /srvx"), "{}", unplaced[0].reason);
}

#[test]
fn host_paths_are_compared_by_whole_components() {
    let allowed = vec!["/srv/data".to_string()];
    assert!(host_path_allowed(&allowed, "/srv/data"));
    assert!(host_path_allowed(&allowed, "/srv/data/x"));
    assert!(!host_path_allowed(&allowed, "/srv/data2"));
    assert!(!host_path_allowed(&allowed, "/srv"));
    assert!(!host_path_allowed(&[], "/srv"));
    assert!(host_path_allowed(&["/".to_string()], "/anything"));
}
