//! The endpoints index's derivation (objects -> views) and its diffs (views -> updates), without
//! a cluster: objects are fed to an [`Index`] as puts and deletes, as the watch would.

use std::{collections::BTreeMap, time::Instant};

use berth_api::pb::{IpamConfig, agent::TaskHealth};
use berth_types::spec::parse_documents;

use super::*;

const TERM: u64 = 7;

fn svc_yaml(ns: &str, name: &str, extra_spec: &str, extra_task: &str) -> ServiceRecord {
    let yaml = format!(
        "kind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: 1\n{extra_spec}  task:\n    \
         runtime: process\n    command: [/bin/true]\n{extra_task}"
    );
    let spec = parse_documents(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")).remove(0);
    ServiceRecord { namespace: ns.into(), name: name.into(), spec_json: spec.canonical_json(), ..Default::default() }
}

/// A test cluster: an index and the puts that feed it.
struct World {
    index: Index,
    snap: Arc<Snapshot>,
}

impl World {
    fn new(pools: bool) -> World {
        let mut w = World { index: Index::new(0), snap: Arc::default() };
        if pools {
            w.put(IPAM_CONFIG_KEY, &IpamConfig::default());
        }
        w
    }

    fn put(&mut self, key: &str, m: &impl Message) {
        self.index.apply(key.as_bytes(), Some(&m.encode_to_vec()));
    }

    fn delete(&mut self, key: &str) {
        self.index.apply(key.as_bytes(), None);
    }

    fn node(&mut self, id: &str, addr: &str) {
        let n = Node { id: id.into(), advertise_addr: addr.into(), ..Default::default() };
        self.put(&format!("{NODES_PREFIX}{id}"), &n);
    }

    fn network(&mut self, ns: &str, name: &str, subnet: &str, vni: u32, blocks: &[(&str, u32)]) {
        let r = NetworkRecord {
            namespace: ns.into(),
            name: name.into(),
            subnet: subnet.into(),
            vni,
            blocks: blocks.iter().map(|(n, i)| (n.to_string(), *i)).collect(),
            ..Default::default()
        };
        self.put(&format!("{NETWORKS_PREFIX}{ns}/{name}"), &r);
    }

    fn service(&mut self, r: ServiceRecord) {
        self.put(&format!("{SERVICES_PREFIX}{}/{}", r.namespace, r.name), &r);
    }

    fn task(&mut self, t: Task) {
        self.put(&format!("{TASKS_PREFIX}{}", t.id), &t);
    }

    /// Publishes what changed (panics if nothing did, so tests say what they expect).
    fn publish(&mut self) -> Arc<Snapshot> {
        self.snap = Arc::new(self.index.publish().expect("something changed"));
        self.snap.clone()
    }

    fn view(&self, node: &str) -> NetworkUpdate {
        Sent::default().complete(TERM, &self.snap, node)
    }
}

/// A task of service `ns/svc` on `node`, joining `nets` (names), in `state` with `health`.
fn task(id: &str, ns: &str, svc: &str, node: &str, nets: &[&str], state: TaskState) -> Task {
    let run = serde_json::json!({ "namespace": ns, "service": svc, "task": { "networks": nets } });
    Task {
        id: id.into(),
        namespace: ns.into(),
        service: svc.into(),
        node_id: node.into(),
        desired_state: TaskState::Running as i32,
        state: state as i32,
        run_spec: serde_json::to_vec(&run).unwrap(),
        ..Default::default()
    }
}

fn with_addr(mut t: Task, net: &str, addr: &str) -> Task {
    t.addresses.insert(net.into(), addr.into());
    t
}

fn healthy(mut t: Task) -> Task {
    t.health = TaskHealth::Healthy as i32;
    t
}

fn endpoint_ids(s: &ServiceEndpoints) -> Vec<&str> {
    s.endpoints.iter().map(|e| e.task_id.as_str()).collect()
}

fn service<'a>(u: &'a NetworkUpdate, key: &str) -> &'a ServiceEndpoints {
    u.services.iter().find(|s| s.key == key).unwrap_or_else(|| panic!("no service {key} in {u:#?}"))
}

/// One network `prod/front` (10.1.0.0/16, blocks of /24) with n1 and n2 holding blocks 1 and 2.
fn front(w: &mut World) {
    w.node("n1", "192.0.2.1");
    w.node("n2", "192.0.2.2");
    w.network("prod", "front", "10.1.0.0/16", 4096, &[("n1", 1), ("n2", 2)]);
}

#[test]
fn only_running_and_healthy_tasks_wanted_running_with_addresses_are_endpoints() {
    let mut w = World::new(true);
    front(&mut w);
    let health = "    health: {tcp: {port: 80}}\n";
    w.service(svc_yaml("prod", "api", "", health));
    w.service(svc_yaml("prod", "plain", "", "    networks: [front]\n"));
    use TaskState::*;
    let on = |t| with_addr(t, "front", "10.1.1.9");
    // api has a health check: only running AND healthy counts.
    w.task(healthy(on(task("api.1", "prod", "api", "n1", &["front"], Running))));
    w.task(on(task("api.2", "prod", "api", "n1", &["front"], Running))); // health unknown
    w.task(healthy(task("api.3", "prod", "api", "n1", &["front"], Running))); // no address yet
    w.task(healthy(on(task("api.4", "prod", "api", "n1", &["front"], Starting))));
    w.task(healthy(on(task("api.5", "prod", "api", "n1", &["front"], Failed))));
    let mut stopping = healthy(on(task("api.6", "prod", "api", "n1", &["front"], Running)));
    stopping.desired_state = Shutdown as i32;
    w.task(stopping);
    // plain has none: running is enough.
    w.task(on(task("plain.1", "prod", "plain", "n2", &["front"], Running)));
    w.task(on(task("plain.2", "prod", "plain", "n2", &["front"], Assigned)));
    w.publish();
    let v = w.view("n1");
    assert_eq!(endpoint_ids(service(&v, "prod/api")), ["api.1"]);
    assert_eq!(endpoint_ids(service(&v, "prod/plain")), ["plain.1"]);

    // api.2 passes its check, api.1 fails it: the endpoints follow.
    let mut feed = Feed::default();
    feed.next(TERM, &w.snap, "n1").expect("a COMPLETE update");
    w.task(healthy(on(task("api.2", "prod", "api", "n1", &["front"], Running))));
    let mut failing = on(task("api.1", "prod", "api", "n1", &["front"], Running));
    failing.health = TaskHealth::Unhealthy as i32;
    w.task(failing);
    let snap = w.publish();
    let u = feed.next(TERM, &snap, "n1").expect("an update");
    assert_eq!(u.kind, AssignmentsKind::Incremental as i32);
    assert_eq!(u.services.len(), 1);
    assert_eq!(endpoint_ids(service(&u, "prod/api")), ["api.2"]);

    // A service that gains a health check drops the tasks that have not passed it.
    w.service(svc_yaml("prod", "plain", "", "    networks: [front]\n    health: {tcp: {port: 80}}\n"));
    let snap = w.publish();
    let u = feed.next(TERM, &snap, "n1").expect("an update");
    assert!(service(&u, "prod/plain").endpoints.is_empty());
}

#[test]
fn addresses_are_keyed_by_network_key_and_ports_and_modes_come_from_the_spec() {
    let mut w = World::new(true);
    front(&mut w);
    w.network("prod", "back", "10.2.0.0/16", 4097, &[("n1", 0)]);
    let ports = "    ports: [{name: http, container: 8080}, {container: 53, protocol: udp}]\n";
    let mut api = svc_yaml("prod", "api", "", &format!("    networks: [front, back]\n{ports}"));
    api.vip = "10.255.0.5".into();
    w.service(api);
    w.service(svc_yaml("prod", "db", "  endpoint_mode: dnsrr\n", "    networks: [back]\n"));
    let t = task("api.1", "prod", "api", "n1", &["front", "back"], TaskState::Running);
    w.task(with_addr(with_addr(t, "front", "10.1.1.2"), "back", "10.2.0.2"));
    w.task(with_addr(task("db.1", "prod", "db", "n1", &["back"], TaskState::Running), "back", "10.2.0.3"));
    w.publish();
    let v = w.view("n1");
    let api = service(&v, "prod/api");
    assert_eq!((api.vip.as_str(), api.endpoint_mode.as_str()), ("10.255.0.5", "vip"));
    assert_eq!(api.networks, ["prod/back", "prod/front"]);
    let ports: Vec<_> = api.ports.iter().map(|p| (p.name.as_str(), p.protocol.as_str(), p.port)).collect();
    assert_eq!(ports, [("http", "tcp", 8080), ("", "udp", 53)]);
    let addrs: BTreeMap<_, _> = api.endpoints[0].addresses.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(addrs, BTreeMap::from([("prod/back", "10.2.0.2"), ("prod/front", "10.1.1.2")]));
    assert_eq!(api.endpoints[0].node_id, "n1");
    let db = service(&v, "prod/db");
    assert_eq!((db.vip.as_str(), db.endpoint_mode.as_str()), ("", "dnsrr"));
    assert_eq!(endpoint_ids(db), ["db.1"]);
    let nets: Vec<_> = v.networks.iter().map(|n| n.key.as_str()).collect();
    assert_eq!(nets, ["prod/back", "prod/front"]);
}

#[test]
fn peers_are_the_other_block_holders_with_an_underlay() {
    let mut w = World::new(true);
    front(&mut w);
    w.node("n3", ""); // no address: holds a block but cannot be a peer
    w.network("prod", "front", "10.1.0.0/16", 4096, &[("n1", 1), ("n2", 2), ("n3", 3)]);
    w.service(svc_yaml("prod", "api", "", "    networks: [front]\n"));
    w.task(task("api.1", "prod", "api", "n1", &["front"], TaskState::Assigned));
    w.task(task("api.2", "prod", "api", "n3", &["front"], TaskState::Assigned));
    w.publish();
    let n1 = w.view("n1");
    assert_eq!(n1.networks.len(), 1);
    let net = &n1.networks[0];
    assert_eq!(
        (net.key.as_str(), net.subnet.as_str(), net.vni, net.block.as_str()),
        ("prod/front", "10.1.0.0/16", 4096, "10.1.1.0/24")
    );
    let peers: Vec<_> = net.peers.iter().map(|p| (p.node_id.as_str(), p.underlay.as_str(), p.block.as_str())).collect();
    assert_eq!(peers, [("n2", "192.0.2.2", "10.1.2.0/24")]);
    // n3 has its own block, and both others as peers.
    let n3 = w.view("n3");
    assert_eq!(n3.networks[0].block, "10.1.3.0/24");
    assert_eq!(n3.networks[0].peers.iter().map(|p| p.node_id.as_str()).collect::<Vec<_>>(), ["n1", "n2"]);
    // n2 holds a block but runs nothing there: no view.
    assert!(w.view("n2").networks.is_empty());

    // n3 gets an address: n1's network changes (a new peer), and nothing else.
    let mut feed = Feed::default();
    feed.next(TERM, &w.snap, "n1").expect("COMPLETE");
    w.node("n3", "192.0.2.3");
    let snap = w.publish();
    let u = feed.next(TERM, &snap, "n1").expect("an update");
    assert!(u.services.is_empty() && u.removed_services.is_empty() && u.removed_networks.is_empty());
    assert_eq!(u.networks[0].peers.iter().map(|p| p.node_id.as_str()).collect::<Vec<_>>(), ["n2", "n3"]);
    // A node record rewritten without a change of address (a status change) changes nothing.
    w.node("n2", "192.0.2.2");
    assert!(w.index.publish().is_none());
}

#[test]
fn a_node_leaves_a_network_when_its_last_task_on_it_is_done() {
    let mut w = World::new(true);
    front(&mut w);
    w.network("prod", "back", "10.2.0.0/16", 4097, &[("n1", 0)]);
    w.service(svc_yaml("prod", "api", "", "    networks: [front]\n"));
    w.service(svc_yaml("prod", "db", "", "    networks: [back]\n"));
    w.task(with_addr(task("api.1", "prod", "api", "n1", &["front"], TaskState::Running), "front", "10.1.1.2"));
    w.task(task("db.1", "prod", "db", "n1", &["back"], TaskState::Running));
    w.publish();
    let mut feed = Feed::default();
    let c = feed.next(TERM, &w.snap, "n1").expect("COMPLETE");
    assert_eq!(c.networks.len(), 2);
    assert_eq!(c.services.len(), 2);

    // db.1 fails but is still wanted running (a restart may come): n1 keeps the network.
    let mut failed = task("db.1", "prod", "db", "n1", &["back"], TaskState::Failed);
    w.task(failed.clone());
    assert!(w.index.publish().is_none(), "nothing published changed");
    // Once it is shut down for good, n1 leaves `back` and its services.
    failed.desired_state = TaskState::Shutdown as i32;
    w.task(failed);
    let snap = w.publish();
    let u = feed.next(TERM, &snap, "n1").expect("an update");
    assert_eq!(u.removed_networks, ["prod/back"]);
    assert_eq!(u.removed_services, ["prod/db"]);
    assert!(u.networks.is_empty() && u.services.is_empty());
    assert_eq!(u.base_version, c.version);

    // The last task leaving (deleted by the reaper) empties the view.
    w.delete(&format!("{TASKS_PREFIX}api.1"));
    let snap = w.publish();
    let u = feed.next(TERM, &snap, "n1").expect("an update");
    assert_eq!(u.removed_networks, ["prod/front"]);
    assert_eq!(u.removed_services, ["prod/api"]);
    assert!(snap.is_empty_for("n1"));
}

#[test]
fn a_cluster_without_pools_sends_nothing() {
    let mut w = World::new(false);
    front(&mut w);
    w.service(svc_yaml("prod", "api", "", ""));
    w.task(with_addr(task("api.1", "prod", "api", "n1", &[], TaskState::Running), "default", "10.1.1.2"));
    w.publish();
    assert!(w.view("n1").networks.is_empty() && w.view("n1").services.is_empty());
    let mut feed = Feed::default();
    assert!(feed.next(TERM, &w.snap, "n1").is_none());
    // Unless the agent asks: then it gets an empty COMPLETE update.
    feed.request_complete();
    let c = feed.next(TERM, &w.snap, "n1").expect("COMPLETE on request");
    assert!(c.networks.is_empty() && c.services.is_empty());

    // With pools, a node without a view still gets one (empty) COMPLETE update, so an agent
    // drops what it kept from an earlier leader.
    let mut w = World::new(true);
    w.node("n1", "192.0.2.1");
    w.publish();
    let mut feed = Feed::default();
    let c = feed.next(TERM, &w.snap, "n1").expect("COMPLETE");
    assert_eq!((c.kind, c.version, c.term), (AssignmentsKind::Complete as i32, 1, TERM));
    assert!(feed.next(TERM, &w.snap, "n1").is_none());
}

#[test]
fn nothing_is_sent_before_the_index_is_ready() {
    let mut feed = Feed::default();
    let snap = Snapshot { has_pools: true, ..Default::default() };
    assert!(feed.next(TERM, &snap, "n1").is_none());
    feed.request_complete();
    assert!(feed.next(TERM, &snap, "n1").is_none(), "asked, but not ready yet");
    let ready = Snapshot { has_pools: true, ready: true, version: 1, ..Default::default() };
    assert_eq!(feed.next(TERM, &ready, "n1").expect("COMPLETE").kind, AssignmentsKind::Complete as i32);
}

#[test]
fn increments_carry_only_changes_and_chain_versions() {
    let mut w = World::new(true);
    front(&mut w);
    for s in ["a", "b", "c"] {
        w.service(svc_yaml("prod", s, "", "    networks: [front]\n"));
        w.task(with_addr(
            task(&format!("{s}.1"), "prod", s, "n1", &["front"], TaskState::Running),
            "front",
            "10.1.1.2",
        ));
    }
    w.publish();
    let mut feed = Feed::default();
    let c = feed.next(TERM, &w.snap, "n1").expect("COMPLETE");
    assert_eq!((c.version, c.base_version, c.services.len()), (1, 0, 3));

    // One more endpoint of b: only b.
    w.task(with_addr(task("b.2", "prod", "b", "n2", &["front"], TaskState::Running), "front", "10.1.2.2"));
    let snap = w.publish();
    let u = feed.next(TERM, &snap, "n1").expect("an update");
    assert_eq!((u.kind, u.version, u.base_version), (AssignmentsKind::Incremental as i32, 2, 1));
    assert!(u.networks.is_empty(), "the network did not change");
    assert_eq!(u.services.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["prod/b"]);
    assert_eq!(endpoint_ids(&u.services[0]), ["b.1", "b.2"]);
    // Nothing changed: nothing to send.
    assert!(feed.next(TERM, &snap, "n1").is_none());

    // c deleted (its record, then its task): removed, version chained.
    w.delete(&format!("{SERVICES_PREFIX}prod/c"));
    let snap = w.publish();
    let u = feed.next(TERM, &snap, "n1").expect("an update");
    assert_eq!((u.version, u.base_version), (3, 2));
    assert_eq!(u.removed_services, ["prod/c"]);
    assert!(u.services.is_empty());

    // Several publications between two sends come as one update.
    w.task(with_addr(task("a.2", "prod", "a", "n2", &["front"], TaskState::Running), "front", "10.1.2.3"));
    w.publish();
    w.task(task("a.2", "prod", "a", "n2", &["front"], TaskState::Failed));
    w.publish();
    w.task(with_addr(task("b.3", "prod", "b", "n2", &["front"], TaskState::Running), "front", "10.1.2.4"));
    let snap = w.publish();
    let u = feed.next(TERM, &snap, "n1").expect("an update");
    assert_eq!((u.version, u.base_version), (4, 3));
    assert_eq!(u.services.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["prod/a", "prod/b"]);
    assert_eq!(endpoint_ids(&u.services[0]), ["a.1"]);

    // A COMPLETE on request continues the chain.
    feed.request_complete();
    let c = feed.next(TERM, &snap, "n1").expect("COMPLETE");
    assert_eq!((c.kind, c.version, c.base_version), (AssignmentsKind::Complete as i32, 5, 0));
}

/// An agent's state, updated as the protocol says.
#[derive(Default, Debug, PartialEq)]
struct AgentModel {
    version: u64,
    networks: BTreeMap<String, NetworkState>,
    services: BTreeMap<String, ServiceEndpoints>,
}

impl AgentModel {
    fn apply(&mut self, u: &NetworkUpdate) {
        if u.kind == AssignmentsKind::Complete as i32 {
            self.networks.clear();
            self.services.clear();
        } else {
            assert_eq!(u.base_version, self.version, "the chain is broken");
        }
        self.version = u.version;
        for k in &u.removed_networks {
            assert!(self.networks.remove(k).is_some(), "removed an unknown network {k}");
        }
        for k in &u.removed_services {
            assert!(self.services.remove(k).is_some(), "removed an unknown service {k}");
        }
        for n in &u.networks {
            self.networks.insert(n.key.clone(), n.clone());
        }
        for s in &u.services {
            self.services.insert(s.key.clone(), s.clone());
        }
    }

    fn same_as(&self, c: &NetworkUpdate) -> bool {
        let mut m = AgentModel::default();
        m.apply(c);
        m.networks == self.networks && m.services == self.services
    }
}

/// A tiny deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn increments_applied_in_order_always_equal_the_complete_view() {
    // Random changes (tasks placed, started, failed, shut down, deleted; node addresses; blocks;
    // services added and removed); sessions that send after every change, every few changes, or
    // rarely (past the change log, so they compare everything) must all converge to the view.
    let mut w = World::new(true);
    let nodes = ["n1", "n2", "n3", "n4"];
    let mut rng = Lcg(42);
    let mut feeds: Vec<(Feed, AgentModel, u64, &str)> = Vec::new();
    for every in [1u64, 3, 100] {
        for n in nodes {
            feeds.push((Feed::default(), AgentModel::default(), every, n));
        }
    }
    for n in nodes {
        w.node(n, "192.0.2.1");
    }
    w.network("p", "x", "10.1.0.0/16", 1, &[]);
    w.network("p", "y", "10.2.0.0/16", 2, &[]);
    w.publish();
    let svcs = ["s0", "s1", "s2", "s3", "s4"];
    let nets_of = |s: &str| -> &'static [&'static str] {
        match s {
            "s0" | "s1" => &["x"],
            "s2" => &["y"],
            _ => &["x", "y"],
        }
    };
    let (mut updates, mut hinted, mut endpoints_seen, mut removals) = (0, 0, false, false);
    let states = [TaskState::Assigned, TaskState::Running, TaskState::Running, TaskState::Failed, TaskState::Shutdown];
    for step in 0..600u64 {
        match rng.below(10) {
            0 => {
                let s = svcs[rng.below(5) as usize];
                if rng.below(4) == 0 {
                    w.delete(&format!("{SERVICES_PREFIX}p/{s}"));
                } else {
                    let nets = nets_of(s).join(", ");
                    let health = if rng.below(2) == 0 { "    health: {tcp: {port: 1}}\n" } else { "" };
                    w.service(svc_yaml("p", s, "", &format!("    networks: [{nets}]\n{health}")));
                }
            }
            1 => {
                let n = nodes[rng.below(4) as usize];
                w.node(n, &format!("192.0.2.{}", rng.below(3)));
            }
            2 => {
                let blocks: Vec<(&str, u32)> =
                    nodes.iter().enumerate().filter(|_| rng.below(2) == 0).map(|(i, n)| (*n, i as u32)).collect();
                match rng.below(2) {
                    0 => w.network("p", "x", "10.1.0.0/16", 1, &blocks),
                    _ => w.network("p", "y", "10.2.0.0/16", 2, &blocks),
                }
            }
            3 => w.delete(&format!("{TASKS_PREFIX}t{}", rng.below(12))),
            _ => {
                let s = svcs[rng.below(5) as usize];
                let id = format!("t{}", rng.below(12));
                let node = nodes[rng.below(4) as usize];
                let mut t = task(&id, "p", s, node, nets_of(s), states[rng.below(5) as usize]);
                if rng.below(3) == 0 {
                    t.desired_state = TaskState::Shutdown as i32;
                }
                if rng.below(2) == 0 {
                    t.health = TaskHealth::Healthy as i32;
                }
                for n in nets_of(s) {
                    if rng.below(4) != 0 {
                        t.addresses.insert(n.to_string(), format!("10.0.0.{}", rng.below(200)));
                    }
                }
                w.task(t);
            }
        }
        if let Some(s) = w.index.publish() {
            w.snap = Arc::new(s);
        }
        for (feed, model, every, node) in &mut feeds {
            if step % *every == 0 {
                if let Some(sent) = &feed.sent
                    && w.snap.changed_since(sent.snapshot).is_some()
                {
                    hinted += 1;
                }
                if let Some(u) = feed.next(TERM, &w.snap, node) {
                    model.apply(&u);
                    updates += 1;
                    endpoints_seen |= u.services.iter().any(|s| !s.endpoints.is_empty());
                    removals |= !u.removed_services.is_empty() || !u.removed_networks.is_empty();
                }
            }
        }
    }
    // The run exercised what it is meant to.
    println!("{updates} updates, {hinted} diffs through the change log");
    assert!(updates > 500 && hinted > 500 && endpoints_seen && removals);
    for (feed, model, _, node) in &mut feeds {
        if let Some(u) = feed.next(TERM, &w.snap, node) {
            model.apply(&u);
        }
        let complete = Sent::default().complete(TERM, &w.snap, node);
        assert!(model.same_as(&complete), "node {node}: {model:#?}\nvs\n{complete:#?}");
    }
}

#[test]
fn a_large_update_is_split_into_parts_that_add_up_to_it() {
    let service = |i: usize| ServiceEndpoints {
        key: format!("default/s{i:04}"),
        vip: format!("198.19.{}.{}", i / 250, 1 + i % 250),
        endpoints: (0..10)
            .map(|e| Endpoint {
                task_id: format!("s{i:04}.{e}.abcdef0123"),
                addresses: [("default/default".to_string(), format!("198.18.{}.{}", e, 2 + i % 250))].into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let whole = NetworkUpdate {
        term: TERM,
        kind: AssignmentsKind::Complete as i32,
        version: 3,
        networks: vec![NetworkState { key: "default/default".into(), ..Default::default() }],
        services: (0..500).map(service).collect(),
        removed_services: vec!["default/gone".into()],
        ..Default::default()
    };
    // Fits: one part, as it was.
    assert_eq!(split(whole.clone(), usize::MAX), vec![whole.clone()]);
    let max = 16 * 1024;
    let parts = split(whole.clone(), max);
    assert!(parts.len() > 5, "{} parts", parts.len());
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p.more, i + 1 < parts.len(), "part {i}");
        assert!(p.encoded_len() <= max, "part {i} is {} bytes", p.encoded_len());
        assert_eq!((p.term, p.kind, p.version, p.base_version), (whole.term, whole.kind, 3, 0));
        assert_eq!(p.networks.is_empty(), i > 0, "networks ride in the first part");
    }
    let services: Vec<ServiceEndpoints> = parts.iter().flat_map(|p| p.services.clone()).collect();
    assert_eq!(services, whole.services);
    assert_eq!(parts[0].removed_services, whole.removed_services);
    // A service larger than a part still goes, alone.
    let parts = split(whole.clone(), 100);
    assert_eq!(parts.len(), 500);
    assert!(parts.iter().all(|p| p.services.len() == 1));
}

#[test]
#[ignore = "a measurement: cargo test -p berth-master --lib endpoints::tests::scale -- --ignored --nocapture"]
fn scale() {
    // 1,000 nodes, 10 namespaces with a `default` network each, 100 services per namespace with
    // 10 ready tasks each (10,000 endpoints), every task on a node holding a block of its
    // network. Then one endpoint goes away, and every node's session computes its update.
    const NODES: u32 = 1000;
    const NAMESPACES: u32 = 10;
    const SERVICES_PER_NS: u32 = 100;
    const TASKS_PER_SERVICE: u32 = 10;
    let mut w = World::new(true);
    for n in 0..NODES {
        w.node(&format!("node-{n}"), &format!("10.200.{}.{}", n / 250, n % 250 + 1));
    }
    let placement = |s: u32, j: u32| (s.wrapping_mul(7919) + j.wrapping_mul(104_729)) % NODES;
    let mut tasks = Vec::new();
    let mut blocks: Vec<BTreeMap<String, u32>> = vec![BTreeMap::new(); NAMESPACES as usize];
    let mut next_host: HashMap<(u32, u32), u32> = HashMap::new();
    for s in 0..NAMESPACES * SERVICES_PER_NS {
        let ns = s / SERVICES_PER_NS;
        for j in 0..TASKS_PER_SERVICE {
            let node = placement(s, j);
            let b = &mut blocks[ns as usize];
            let idx = b.len() as u32;
            let idx = *b.entry(format!("node-{node}")).or_insert(idx);
            let host = next_host.entry((ns, node)).or_insert(2);
            *host += 1;
            // 10.(16 ns + 16).0.0/12, blocks of /24: 10.x.y.0/24 with y from the block index.
            let base = u32::from(Ipv4Addr::new(10, (16 * ns + 16) as u8, 0, 0)) + (idx << 8) + *host;
            tasks.push((s, j, node, Ipv4Addr::from(base)));
        }
    }
    for ns in 0..NAMESPACES {
        let b: Vec<(&str, u32)> = blocks[ns as usize].iter().map(|(n, i)| (n.as_str(), *i)).collect();
        w.network(&format!("ns{ns}"), "default", &format!("10.{}.0.0/12", 16 * ns + 16), 4096 + ns, &b);
    }
    let records: Vec<ServiceRecord> = (0..NAMESPACES * SERVICES_PER_NS)
        .map(|s| {
            let mut r = svc_yaml(
                &format!("ns{}", s / SERVICES_PER_NS),
                &format!("svc{s}"),
                "",
                "    ports: [{name: http, container: 80}]\n    health: {tcp: {port: 80}}\n",
            );
            r.vip = format!("10.250.{}.{}", s / 250, s % 250 + 1);
            r
        })
        .collect();
    let task_of = |s: u32, j: u32, node: u32, addr: Ipv4Addr, state: TaskState| {
        let ns = format!("ns{}", s / SERVICES_PER_NS);
        let t = task(&format!("svc{s}.{j}"), &ns, &format!("svc{s}"), &format!("node-{node}"), &[], state);
        healthy(with_addr(t, "default", &addr.to_string()))
    };
    let started = Instant::now();
    for r in records {
        w.service(r);
    }
    for &(s, j, node, addr) in &tasks {
        w.task(task_of(s, j, node, addr, TaskState::Running));
    }
    let snap = w.publish();
    let build = started.elapsed();
    let endpoints: usize = snap.services.values().map(|s| s.endpoints.len()).sum();
    assert_eq!(endpoints, (NAMESPACES * SERVICES_PER_NS * TASKS_PER_SERVICE) as usize);

    let mut feeds: Vec<(String, Feed)> = (0..NODES).map(|n| (format!("node-{n}"), Feed::default())).collect();
    let started = Instant::now();
    let mut bytes = 0;
    for (node, feed) in &mut feeds {
        let c = feed.next(TERM, &snap, node).expect("COMPLETE");
        bytes += c.encoded_len();
    }
    let complete = started.elapsed();

    // One endpoint fails its health check.
    let (s, j, node, addr) = tasks[4321];
    let started = Instant::now();
    let mut t = task_of(s, j, node, addr, TaskState::Running);
    t.health = TaskHealth::Unhealthy as i32;
    w.task(t);
    let snap = w.publish();
    let publish = started.elapsed();
    let started = Instant::now();
    let mut updates = 0;
    let mut update_bytes = 0;
    for (node, feed) in &mut feeds {
        if let Some(u) = feed.next(TERM, &snap, node) {
            assert_eq!(u.services.len(), 1);
            assert!(u.networks.is_empty() && u.removed_services.is_empty());
            updates += 1;
            update_bytes += u.encoded_len();
        }
    }
    let diff = started.elapsed();

    // The same change seen by sessions that cannot use the change log (too far behind): each
    // compares its whole view.
    let mut sents: Vec<(String, Sent)> = Vec::new();
    for (node, _) in &feeds {
        let mut s = Sent::default();
        s.complete(TERM, &snap, node);
        sents.push((node.clone(), s));
    }
    let mut t = task_of(s, j, node, addr, TaskState::Running);
    t.health = TaskHealth::Healthy as i32;
    w.task(t);
    let snap = w.publish();
    let no_log = Snapshot { log: vec![], ..Snapshot::clone_parts(&snap) };
    let started = Instant::now();
    let mut full_updates = 0;
    for (node, sent) in &mut sents {
        if sent.incremental(TERM, &no_log, node).is_some() {
            full_updates += 1;
        }
    }
    let full = started.elapsed();
    assert_eq!(full_updates, updates);

    println!(
        "endpoints index: {NODES} nodes, {} services, {endpoints} endpoints, {} networks",
        NAMESPACES * SERVICES_PER_NS,
        NAMESPACES
    );
    println!("  build (apply every object, first publish): {build:?}");
    println!("  COMPLETE for every node: {complete:?} ({} KiB in all)", bytes / 1024);
    println!("  one endpoint changes: publish {publish:?}");
    println!(
        "  every node's update (change log): {diff:?}; {updates} nodes got one ({} bytes each)",
        update_bytes / updates.max(1)
    );
    println!("  every node's update (whole-view compare): {full:?}");
}

impl Snapshot {
    /// A copy sharing every part (tests only).
    fn clone_parts(s: &Snapshot) -> Snapshot {
        Snapshot {
            version: s.version,
            ready: s.ready,
            has_pools: s.has_pools,
            nodes: s.nodes.clone(),
            networks: s.networks.clone(),
            members: s.members.clone(),
            services: s.services.clone(),
            log: s.log.clone(),
            edge: s.edge.clone(),
        }
    }
}
