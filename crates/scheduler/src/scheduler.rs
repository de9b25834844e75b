//! The scheduler: incremental counters over nodes, filters, scores and unplaced reasons.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt::Write as _;

use crate::constraint::Constraint;
use crate::model::{
    Availability, NetworkRoom, NodeInfo, Placed, Placement, Strategy, TaskRequest, Unplaced, host_path_allowed,
};

/// Node index into the id-sorted node list.
type NodeIx = u32;
/// Interned service name.
type ServiceIx = u32;

/// Places pending tasks onto nodes. Built from the nodes and the tasks already placed; keeps per-node
/// free resources, per-node and per-label-value task counts per service and used host ports, and
/// updates them on every placement so the next task sees them.
#[derive(Debug)]
pub struct Scheduler {
    strategy: Strategy,
    /// Sorted by id (duplicate ids: the first one wins); index order is the tie-break order.
    nodes: Vec<NodeInfo>,
    by_id: HashMap<String, NodeIx>,
    /// Ready and Active nodes, ascending: the only ones `schedule` scans.
    schedulable: Vec<NodeIx>,
    free_cpu: Vec<u64>,
    free_mem: Vec<u64>,
    /// Mean free fraction of CPU and memory, in parts per million of capacity.
    free_ppm: Vec<u32>,
    /// Host ports in use per node, sorted.
    ports: Vec<Vec<u16>>,
    services: HashMap<String, ServiceIx>,
    /// Per service: number of its tasks on each node.
    on_node: Vec<Counts>,
    /// Per spread label key, built on first use.
    spread: HashMap<String, SpreadIndex>,
    /// Per distinct constraint list in the current batch: whether each node satisfies it. Labels do
    /// not change during a batch, so each list is evaluated once per node, not once per task.
    constraint_masks: HashMap<Vec<Constraint>, Vec<bool>>,
    /// Per network: which nodes hold an address block, and how many blocks are free.
    rooms: HashMap<String, Room>,
    /// Local volumes not created yet that a task of this batch was placed with: the node that
    /// will hold each, so later tasks mounting it follow.
    pins: HashMap<String, NodeIx>,
    scratch: Scratch,
}

#[derive(Debug)]
struct Room {
    has_block: Vec<bool>,
    free: u32,
}

/// Label values of one key as groups, with per-service task counts per group.
#[derive(Debug)]
struct SpreadIndex {
    /// Group of each node; nodes without the label share the group of "".
    node_group: Vec<u32>,
    group_count: usize,
    /// Per service: tasks per group.
    counts: HashMap<ServiceIx, Vec<u32>>,
}

/// Tasks of one service per node: sparse while the service is on few nodes, a dense array once it
/// is on more than 1/8 of them (so the dense form costs at most about twice the sparse one, and
/// large services need no per-task copy).
#[derive(Debug)]
enum Counts {
    Sparse(HashMap<NodeIx, u32>),
    Dense(Vec<u32>),
}

impl Counts {
    fn add(&mut self, node: NodeIx, node_count: usize) {
        match self {
            Counts::Dense(d) => d[node as usize] += 1,
            Counts::Sparse(m) => {
                *m.entry(node).or_insert(0) += 1;
                if m.len() * 8 > node_count {
                    let mut d = vec![0; node_count];
                    for (&n, &c) in m.iter() {
                        d[n as usize] = c;
                    }
                    *self = Counts::Dense(d);
                }
            }
        }
    }

    /// Calls `f(node, count)` for every node with at least one task.
    fn for_each(&self, mut f: impl FnMut(NodeIx, u32)) {
        match self {
            Counts::Sparse(m) => m.iter().for_each(|(&n, &c)| f(n, c)),
            Counts::Dense(d) => d.iter().enumerate().filter(|(_, c)| **c > 0).for_each(|(n, &c)| f(n as NodeIx, c)),
        }
    }

    fn sparse(&self) -> Option<&HashMap<NodeIx, u32>> {
        match self {
            Counts::Sparse(m) => Some(m),
            Counts::Dense(_) => None,
        }
    }
}

/// Dense per-node arrays filled from sparse counters for one task, then cleared.
#[derive(Debug, Default)]
struct Scratch {
    /// Tasks of the task's own service on each node.
    same: Vec<u32>,
    /// Non-zero: the node runs an anti-affinity service.
    blocked: Vec<u32>,
    /// Number of distinct affinity services the node runs.
    affine: Vec<u32>,
}

/// Why a node is not eligible, in the order filters are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    NotReady,
    Paused,
    Drained,
    Constraint,
    MaxReplicas,
    AntiAffinity,
    Affinity,
    Ports,
    Cpu,
    Memory,
    NoNetworks,
    NetworkFull,
    VolumeNode,
    HostPath,
}

/// A task's request, resolved against the scheduler's counters.
struct Ctx<'a> {
    task: &'a TaskRequest,
    max_per_node: u32,
    /// Tasks of the task's own service per node.
    same: &'a [u32],
    /// Non-zero where a sparse anti-affinity service runs (valid if `anti_sparse`).
    blocked: &'a [u32],
    anti_sparse: bool,
    /// Dense anti-affinity services.
    anti_dense: Vec<&'a [u32]>,
    /// Number of distinct affinity services required; `None` when the task has no affinity.
    affinity_needed: Option<u32>,
    /// Sparse affinity services present per node, plus the dense ones to check.
    affine: &'a [u32],
    affinity_dense: Vec<&'a [u32]>,
    ports: Vec<u16>,
    /// (group of each node, this service's count per group) for each spread key with tasks.
    spread: Vec<(&'a [u32], &'a [u32])>,
    /// Whether each node satisfies all constraints; `None` without constraints.
    constraints_ok: Option<&'a [bool]>,
}

/// The score of the best node so far, so each candidate is compared without recomputing it.
struct Best {
    node: NodeIx,
    spread: Vec<u32>,
    same: u32,
    free_ppm: u32,
}

impl Scheduler {
    /// Builds the scheduler's counters from the nodes and the tasks already placed. Placed tasks on
    /// unknown nodes are ignored; placed usage beyond a node's capacity leaves it with nothing free.
    pub fn new(mut nodes: Vec<NodeInfo>, placed: &[Placed], strategy: Strategy) -> Self {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|later, first| later.id == first.id);
        let n = nodes.len();
        let by_id = nodes.iter().enumerate().map(|(i, node)| (node.id.clone(), i as NodeIx)).collect();
        let schedulable = (0..n as NodeIx)
            .filter(|&i| {
                let node = &nodes[i as usize];
                node.ready && node.availability == Availability::Active
            })
            .collect();
        let free_cpu: Vec<u64> = nodes.iter().map(|node| node.cpu_millis).collect();
        let free_mem: Vec<u64> = nodes.iter().map(|node| node.memory_bytes).collect();
        let mut s = Scheduler {
            strategy,
            by_id,
            schedulable,
            free_ppm: vec![0; n],
            free_cpu,
            free_mem,
            ports: vec![Vec::new(); n],
            services: HashMap::new(),
            on_node: Vec::new(),
            spread: HashMap::new(),
            constraint_masks: HashMap::new(),
            rooms: HashMap::new(),
            pins: HashMap::new(),
            scratch: Scratch { same: vec![0; n], blocked: vec![0; n], affine: vec![0; n] },
            nodes,
        };
        for i in 0..n {
            s.refresh_ppm(i);
        }
        for p in placed {
            if let Some(&node) = s.by_id.get(&p.node_id) {
                let svc = s.intern(&p.service);
                s.commit(node, svc, p.cpu_millis, p.memory_bytes, &p.host_ports);
            }
        }
        s
    }

    /// The address blocks of the networks tasks join. A network a task names that is not given
    /// here has no room anywhere.
    pub fn with_networks(mut self, rooms: &[NetworkRoom]) -> Self {
        for r in rooms {
            let mut has_block = vec![false; self.nodes.len()];
            for id in &r.nodes_with_block {
                if let Some(&i) = self.by_id.get(id) {
                    has_block[i as usize] = true;
                }
            }
            self.rooms.insert(r.network.clone(), Room { has_block, free: r.free_blocks });
        }
        self
    }

    /// Places a batch in order; each placement updates the usage seen by the next task. Returns the
    /// placements and, for tasks no node can take, the reason.
    pub fn schedule(&mut self, tasks: &[TaskRequest]) -> (Vec<Placement>, Vec<Unplaced>) {
        self.constraint_masks.clear();
        self.pins.clear();
        let mut placements = Vec::with_capacity(tasks.len());
        let mut unplaced = Vec::new();
        for task in tasks {
            match self.place(task) {
                Ok(node) => placements
                    .push(Placement { task_id: task.task_id.clone(), node_id: self.nodes[node as usize].id.clone() }),
                Err(reason) => unplaced.push(Unplaced { task_id: task.task_id.clone(), reason }),
            }
        }
        (placements, unplaced)
    }

    /// Places one task and commits it, or explains why no node fits.
    fn place(&mut self, task: &TaskRequest) -> Result<NodeIx, String> {
        let svc = self.intern(&task.service);
        for key in &task.spread {
            if !self.spread.contains_key(key) {
                let index = self.build_spread(key);
                self.spread.insert(key.clone(), index);
            }
        }
        if !task.constraints.is_empty() && !self.constraint_masks.contains_key(&task.constraints) {
            let mask = self.nodes.iter().map(|node| task.constraints.iter().all(|c| c.matches(node))).collect();
            self.constraint_masks.insert(task.constraints.clone(), mask);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let anti = self.resolve(&task.anti_affinity);
        let affinity = self.resolve(&task.affinity);
        let mut affinity_needed = None;
        if !task.affinity.is_empty() {
            // An affinity service with no task anywhere can never be satisfied.
            let mut distinct = task.affinity.clone();
            distinct.sort();
            distinct.dedup();
            affinity_needed = Some(distinct.len() as u32);
        }
        self.fill(&mut scratch, svc, &anti, &affinity, 1);
        let result = {
            let mut ctx = self.context(task, svc, &scratch, affinity_needed);
            for &s in &anti {
                match &self.on_node[s as usize] {
                    Counts::Dense(d) => ctx.anti_dense.push(d),
                    Counts::Sparse(_) => ctx.anti_sparse = true,
                }
            }
            for &s in &affinity {
                if let Counts::Dense(d) = &self.on_node[s as usize] {
                    ctx.affinity_dense.push(d);
                }
            }
            let best = self.best(&ctx);
            best.ok_or_else(|| self.explain(&ctx))
        };
        self.fill(&mut scratch, svc, &anti, &affinity, 0);
        self.scratch = scratch;
        if let Ok(node) = result {
            self.commit(node, svc, task.cpu_millis, task.memory_bytes, &task.host_ports);
            for net in &task.networks {
                if let Some(room) = self.rooms.get_mut(net)
                    && !room.has_block[node as usize]
                {
                    room.has_block[node as usize] = true;
                    room.free = room.free.saturating_sub(1);
                }
            }
            for v in task.volumes.iter().filter(|v| v.local && v.node.is_none()) {
                self.pins.entry(v.volume.clone()).or_insert(node);
            }
        }
        result
    }

    fn context<'a>(
        &'a self,
        task: &'a TaskRequest,
        svc: ServiceIx,
        scratch: &'a Scratch,
        affinity_needed: Option<u32>,
    ) -> Ctx<'a> {
        let mut ports = task.host_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        let mut keys: Vec<&String> = task.spread.iter().collect();
        // Duplicate keys add nothing; keep the first occurrence's priority.
        let mut seen = Vec::new();
        keys.retain(|k| {
            let fresh = !seen.contains(k);
            seen.push(*k);
            fresh
        });
        let spread = keys
            .into_iter()
            .filter_map(|key| {
                let index = &self.spread[key.as_str()];
                // No task of the service under this key: every group ties, skip it.
                index.counts.get(&svc).map(|c| (index.node_group.as_slice(), c.as_slice()))
            })
            .collect();
        let constraints_ok = if task.constraints.is_empty() {
            None
        } else {
            self.constraint_masks.get(&task.constraints).map(Vec::as_slice)
        };
        Ctx {
            constraints_ok,
            task,
            max_per_node: task.max_replicas_per_node.unwrap_or(u32::MAX),
            same: match &self.on_node[svc as usize] {
                Counts::Dense(d) => d,
                Counts::Sparse(_) => &scratch.same,
            },
            blocked: &scratch.blocked,
            anti_sparse: false,
            anti_dense: Vec::new(),
            affinity_needed,
            affine: &scratch.affine,
            affinity_dense: Vec::new(),
            ports,
            spread,
        }
    }

    /// Writes (`on` = 1) or clears (`on` = 0) the dense per-node counts for one task.
    fn fill(&self, scratch: &mut Scratch, svc: ServiceIx, anti: &[ServiceIx], affinity: &[ServiceIx], on: u32) {
        if let Some(m) = self.on_node[svc as usize].sparse() {
            for (&node, &count) in m {
                scratch.same[node as usize] = count * on;
            }
        }
        for m in anti.iter().filter_map(|&s| self.on_node[s as usize].sparse()) {
            for &node in m.keys() {
                scratch.blocked[node as usize] = on;
            }
        }
        for m in affinity.iter().filter_map(|&s| self.on_node[s as usize].sparse()) {
            for &node in m.keys() {
                let a = &mut scratch.affine[node as usize];
                *a = if on == 1 { *a + 1 } else { 0 };
            }
        }
    }

    /// Distinct known services among `names`.
    fn resolve(&self, names: &[String]) -> Vec<ServiceIx> {
        let mut ix: Vec<ServiceIx> = names.iter().filter_map(|name| self.services.get(name).copied()).collect();
        ix.sort_unstable();
        ix.dedup();
        ix
    }

    /// The best eligible node, scanning only ready and active ones.
    fn best(&self, ctx: &Ctx<'_>) -> Option<NodeIx> {
        let mut best: Option<Best> = None;
        // Ascending node order: a candidate that only ties keeps the earlier (smaller) id.
        // Scoring is cheaper than filtering, so filters run only on nodes that would win.
        for &node in &self.schedulable {
            match &mut best {
                Some(b) if self.compare(ctx, node, b) != Ordering::Less => {}
                _ if self.dynamic_reject(ctx, node).is_some() => {}
                Some(b) => self.record(ctx, node, b),
                None => {
                    let mut b = Best { node, spread: Vec::with_capacity(ctx.spread.len()), same: 0, free_ppm: 0 };
                    self.record(ctx, node, &mut b);
                    best = Some(b);
                }
            }
        }
        best.map(|b| b.node)
    }

    fn record(&self, ctx: &Ctx<'_>, node: NodeIx, best: &mut Best) {
        let i = node as usize;
        best.node = node;
        best.spread.clear();
        best.spread.extend(ctx.spread.iter().map(|(group, counts)| counts[group[i] as usize]));
        best.same = ctx.same[i];
        best.free_ppm = self.free_ppm[i];
    }

    /// Score order: spread groups, then strategy, then node id. `Less` means `a` is better.
    #[inline]
    fn compare(&self, ctx: &Ctx<'_>, a: NodeIx, b: &Best) -> Ordering {
        let i = a as usize;
        for ((group, counts), &theirs) in ctx.spread.iter().zip(&b.spread) {
            let order = counts[group[i] as usize].cmp(&theirs);
            if order != Ordering::Equal {
                return order;
            }
        }
        let order = match self.strategy {
            Strategy::Spread => ctx.same[i].cmp(&b.same).then_with(|| b.free_ppm.cmp(&self.free_ppm[i])),
            Strategy::Binpack => self.free_ppm[i].cmp(&b.free_ppm),
        };
        order.then(a.cmp(&b.node))
    }

    /// First failing filter among those that do not depend on readiness or availability.
    #[inline]
    fn dynamic_reject(&self, ctx: &Ctx<'_>, node: NodeIx) -> Option<Reject> {
        let i = node as usize;
        let task = ctx.task;
        if let Some(ok) = ctx.constraints_ok
            && !ok[i]
        {
            return Some(Reject::Constraint);
        }
        if ctx.same[i] >= ctx.max_per_node {
            return Some(Reject::MaxReplicas);
        }
        if (ctx.anti_sparse && ctx.blocked[i] != 0) || ctx.anti_dense.iter().any(|d| d[i] != 0) {
            return Some(Reject::AntiAffinity);
        }
        if let Some(needed) = ctx.affinity_needed
            && (ctx.affine[i] + ctx.affinity_dense.iter().filter(|d| d[i] != 0).count() as u32) < needed
        {
            return Some(Reject::Affinity);
        }
        if !ctx.ports.is_empty() && ctx.ports.iter().any(|p| self.ports[i].binary_search(p).is_ok()) {
            return Some(Reject::Ports);
        }
        if self.free_cpu[i] < task.cpu_millis {
            return Some(Reject::Cpu);
        }
        if self.free_mem[i] < task.memory_bytes {
            return Some(Reject::Memory);
        }
        if !task.networks.is_empty() {
            if !self.nodes[i].networks {
                return Some(Reject::NoNetworks);
            }
            let full = |net: &String| self.rooms.get(net).is_none_or(|r| !r.has_block[i] && r.free == 0);
            if task.networks.iter().any(full) {
                return Some(Reject::NetworkFull);
            }
        }
        if !task.volumes.is_empty() {
            for v in &task.volumes {
                if v.local && self.volume_node(v).is_some_and(|n| n != node) {
                    return Some(Reject::VolumeNode);
                }
                if let Some(path) = &v.host_path
                    && !host_path_allowed(&self.nodes[i].host_paths, path)
                {
                    return Some(Reject::HostPath);
                }
            }
        }
        None
    }

    /// The node a local volume's data is on (or will be, placed earlier in this batch).
    fn volume_node(&self, v: &crate::model::VolumeNeed) -> Option<NodeIx> {
        match &v.node {
            // A volume on a node that is gone: no node can take the task.
            Some(id) => Some(self.by_id.get(id).copied().unwrap_or(NodeIx::MAX)),
            None => self.pins.get(&v.volume).copied(),
        }
    }

    fn reject(&self, ctx: &Ctx<'_>, node: NodeIx) -> Option<Reject> {
        let info = &self.nodes[node as usize];
        if !info.ready {
            return Some(Reject::NotReady);
        }
        match info.availability {
            Availability::Active => self.dynamic_reject(ctx, node),
            Availability::Pause => Some(Reject::Paused),
            Availability::Drain => Some(Reject::Drained),
        }
    }

    /// "0/5 nodes eligible: 3 already run a replica of web (max_replicas_per_node 1), 2 lack memory
    /// (need 64 MiB)". Only computed when a task cannot be placed.
    fn explain(&self, ctx: &Ctx<'_>) -> String {
        let n = self.nodes.len();
        if n == 0 {
            return "0/0 nodes eligible: the cluster has no nodes".to_string();
        }
        let task = ctx.task;
        let mut fixed = [0usize; 13];
        let mut per_constraint = vec![0usize; task.constraints.len()];
        for node in 0..n as NodeIx {
            match self.reject(ctx, node) {
                None => {}
                Some(Reject::Constraint) => {
                    let info = &self.nodes[node as usize];
                    if let Some(c) = task.constraints.iter().position(|c| !c.matches(info)) {
                        per_constraint[c] += 1;
                    }
                }
                Some(r) => fixed[slot(r)] += 1,
            }
        }
        let mut parts: Vec<String> = Vec::new();
        let mut push = |count: usize, text: String| {
            if count > 0 {
                parts.push(format!("{count} {text}"));
            }
        };
        push(fixed[slot(Reject::NotReady)], "not ready".into());
        push(fixed[slot(Reject::Paused)], "paused".into());
        push(fixed[slot(Reject::Drained)], "drained".into());
        for (c, &count) in per_constraint.iter().enumerate() {
            push(count, format!("fail constraint `{}`", task.constraints[c]));
        }
        let max = ctx.max_per_node;
        let replicas = if max == 1 { "a replica".to_string() } else { format!("{max} replicas") };
        push(
            fixed[slot(Reject::MaxReplicas)],
            format!("already run {replicas} of {} (max_replicas_per_node {max})", task.service),
        );
        push(
            fixed[slot(Reject::AntiAffinity)],
            format!("run a task of an anti-affinity service ({})", task.anti_affinity.join(", ")),
        );
        push(
            fixed[slot(Reject::Affinity)],
            format!("lack a task of an affinity service ({})", task.affinity.join(", ")),
        );
        let ports: Vec<String> = ctx.ports.iter().map(u16::to_string).collect();
        push(fixed[slot(Reject::Ports)], format!("have host ports in use ({})", ports.join(", ")));
        push(fixed[slot(Reject::Cpu)], format!("lack CPU (need {}m)", task.cpu_millis));
        push(fixed[slot(Reject::Memory)], format!("lack memory (need {})", human_bytes(task.memory_bytes)));
        push(
            fixed[slot(Reject::NoNetworks)],
            "cannot attach networks (their agents do not run as root with the overlay data plane)".into(),
        );
        let full: Vec<&str> = task
            .networks
            .iter()
            .filter(|n| self.rooms.get(*n).is_none_or(|r| r.free == 0))
            .map(String::as_str)
            .collect();
        push(
            fixed[slot(Reject::NetworkFull)],
            format!("have no address block of network {} and none is free (give it a larger subnet)", full.join(", ")),
        );
        let pinned: Vec<String> = task
            .volumes
            .iter()
            .filter(|v| v.local)
            .filter_map(|v| {
                let node = self.volume_node(v)?;
                let on = self.nodes.get(node as usize).map_or("a node that is gone", |n| n.name.as_str());
                Some(format!("{} (its data is on {on})", v.volume))
            })
            .collect();
        push(fixed[slot(Reject::VolumeNode)], format!("do not hold local volume {}", pinned.join(", ")));
        let paths: Vec<&str> = task.volumes.iter().filter_map(|v| v.host_path.as_deref()).collect();
        push(
            fixed[slot(Reject::HostPath)],
            format!("do not allow host path {} (start their agents with --allow-host-path)", paths.join(", ")),
        );
        format!("0/{n} nodes eligible: {}", parts.join(", "))
    }

    /// Records a task on a node: resources, ports and every counter.
    fn commit(&mut self, node: NodeIx, svc: ServiceIx, cpu: u64, mem: u64, ports: &[u16]) {
        let i = node as usize;
        self.free_cpu[i] = self.free_cpu[i].saturating_sub(cpu);
        self.free_mem[i] = self.free_mem[i].saturating_sub(mem);
        self.refresh_ppm(i);
        for &p in ports {
            if let Err(at) = self.ports[i].binary_search(&p) {
                self.ports[i].insert(at, p);
            }
        }
        let node_count = self.nodes.len();
        self.on_node[svc as usize].add(node, node_count);
        for index in self.spread.values_mut() {
            let groups = index.group_count;
            index.counts.entry(svc).or_insert_with(|| vec![0; groups])[index.node_group[i] as usize] += 1;
        }
    }

    fn refresh_ppm(&mut self, i: usize) {
        let frac = |free: u64, cap: u64| if cap == 0 { 0 } else { (free as u128 * 1_000_000 / cap as u128) as u64 };
        let node = &self.nodes[i];
        let ppm = (frac(self.free_cpu[i], node.cpu_millis) + frac(self.free_mem[i], node.memory_bytes)) / 2;
        self.free_ppm[i] = ppm as u32;
    }

    fn intern(&mut self, service: &str) -> ServiceIx {
        if let Some(&ix) = self.services.get(service) {
            return ix;
        }
        let ix = self.on_node.len() as ServiceIx;
        self.services.insert(service.to_string(), ix);
        self.on_node.push(Counts::Sparse(HashMap::new()));
        ix
    }

    /// Groups nodes by the value of label `key` and counts each service's tasks per group.
    fn build_spread(&self, key: &str) -> SpreadIndex {
        let mut values: HashMap<&str, u32> = HashMap::new();
        // Sorted values give group numbers independent of hash order.
        let mut distinct: Vec<&str> = self.nodes.iter().map(|n| n.labels.get(key).map_or("", String::as_str)).collect();
        distinct.sort_unstable();
        distinct.dedup();
        for (g, v) in distinct.iter().enumerate() {
            values.insert(v, g as u32);
        }
        let node_group: Vec<u32> =
            self.nodes.iter().map(|n| values[n.labels.get(key).map_or("", String::as_str)]).collect();
        let group_count = distinct.len();
        let mut counts = HashMap::new();
        for (svc, nodes) in self.on_node.iter().enumerate() {
            let mut per_group = vec![0u32; group_count];
            let mut any = false;
            nodes.for_each(|node, count| {
                per_group[node_group[node as usize] as usize] += count;
                any = true;
            });
            if any {
                counts.insert(svc as ServiceIx, per_group);
            }
        }
        SpreadIndex { node_group, group_count, counts }
    }
}

/// Slot of a non-constraint reject in the reason counters.
fn slot(r: Reject) -> usize {
    match r {
        Reject::NotReady => 0,
        Reject::Paused => 1,
        Reject::Drained => 2,
        Reject::MaxReplicas | Reject::Constraint => 3,
        Reject::AntiAffinity => 4,
        Reject::Affinity => 5,
        Reject::Ports => 6,
        Reject::Cpu => 7,
        Reject::Memory => 8,
        Reject::NoNetworks => 9,
        Reject::NetworkFull => 10,
        Reject::VolumeNode => 11,
        Reject::HostPath => 12,
    }
}

/// 64 MiB, 1.5 GiB, 512 B.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let mut s = String::new();
    if value.fract() == 0.0 {
        let _ = write!(s, "{value} {}", UNITS[unit]);
    } else {
        let _ = write!(s, "{value:.1} {}", UNITS[unit]);
    }
    s
}
