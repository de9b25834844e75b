//! The leader's in-memory index of what the controllers decide over: nodes, services, tasks and
//! slots, kept current by the controllers' watch of `/berth/`, so that a round reads nothing from
//! the store and costs what changed, not what exists.
//!
//! A new leader (and a leader whose watch broke, fell behind compaction or saw its state replaced
//! by a snapshot) builds it from the replicated state before acting. The watch starts before that
//! read, and every change is applied only if it is newer than what the index holds for its key, so
//! events that the read already saw are no-ops and none is missed. Decisions stay conditional
//! transactions on the mod_revisions the index holds: an index that is behind only costs a lost
//! compare, never a wrong write.
//!
//! The few records the rounds need whole (networks, volumes, routes, address pools) are read
//! again only when one of them changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_api::pb::{NetworkRecord, Node, ServiceRecord, Task, VolumeRecord};
use berth_store::KvReader;
use berth_types::{Event, EventKind, Revision};
use prost::Message;
use tracing::warn;

use crate::{
    objects::{self, NODES_PREFIX, Versioned},
    tasks::{SERVICES_PREFIX, SLOTS_PREFIX, Svc, TASKS_PREFIX},
};

/// A task's service: (namespace, name).
pub(super) type SvcId = (String, String);

/// What the controllers decide over.
pub(super) struct World {
    pub reader: KvReader,
    /// This master, for the events it records.
    pub me: u64,
    /// The time of this round.
    pub now: i64,
    pub nodes: HashMap<String, Node>,
    /// Service key -> service (parsable ones only; an unreadable spec is warned about once).
    pub services: BTreeMap<Vec<u8>, Svc>,
    pub tasks: HashMap<String, Versioned<Task>>,
    /// The ids of each service's tasks.
    pub by_service: HashMap<SvcId, BTreeSet<String>>,
    /// slot key -> (task id, mod_revision)
    pub slots: BTreeMap<Vec<u8>, (String, Revision)>,
    /// `namespace/name` -> network; empty on a cluster without pools.
    pub networks: HashMap<String, Versioned<NetworkRecord>>,
    /// The cluster has address pools: services' tasks join networks.
    pub has_pools: bool,
    /// `namespace/name` -> volume.
    pub volumes: HashMap<String, Versioned<VolumeRecord>>,
    /// The services routes go to (`namespace/name`); empty on a cluster without pools.
    pub routed: BTreeSet<String>,
    /// mod_revision of each node and service key (including unreadable services).
    revs: HashMap<Vec<u8>, Revision>,
    /// Networks, volumes, routes or pools changed: read them again before the next round.
    aux_stale: bool,
}

/// The keys whose change makes the small records be read again.
const AUX_PREFIXES: [&str; 4] = [
    crate::networks::NETWORKS_PREFIX,
    crate::volumes::VOLUMES_PREFIX,
    crate::routes::ROUTES_PREFIX,
    crate::networks::IPAM_CONFIG_KEY,
];

impl World {
    /// Reads everything from the replicated state.
    pub fn load(reader: &KvReader, me: u64) -> Result<World, String> {
        let err = |e: tonic::Status| e.message().to_string();
        let mut w = World {
            reader: reader.clone(),
            me,
            now: objects::now_ms(),
            nodes: HashMap::new(),
            services: BTreeMap::new(),
            tasks: HashMap::new(),
            by_service: HashMap::new(),
            slots: BTreeMap::new(),
            networks: HashMap::new(),
            has_pools: false,
            volumes: HashMap::new(),
            routed: BTreeSet::new(),
            revs: HashMap::new(),
            aux_stale: true,
        };
        for n in objects::list::<Node>(reader, NODES_PREFIX).map_err(err)? {
            w.revs.insert(objects::node_key(&n.obj.id), n.mod_revision);
            w.nodes.insert(n.obj.id.clone(), n.obj);
        }
        for s in objects::list::<ServiceRecord>(reader, SERVICES_PREFIX).map_err(err)? {
            let key = crate::tasks::service_key(&s.obj.namespace, &s.obj.name);
            w.put_service(key, s.obj, s.mod_revision);
        }
        for t in objects::list::<Task>(reader, TASKS_PREFIX).map_err(err)? {
            w.put_task(t);
        }
        let q = berth_types::RangeQuery {
            key: SLOTS_PREFIX.as_bytes().to_vec(),
            range_end: berth_types::prefix_end(SLOTS_PREFIX.as_bytes()),
            ..Default::default()
        };
        let (slots, _) = reader.range(&q).map_err(|e| e.to_string())?;
        for kv in slots.kvs {
            w.slots.insert(kv.key, (String::from_utf8_lossy(&kv.value).into_owned(), kv.mod_revision));
        }
        w.refresh_aux()?;
        Ok(w)
    }

    /// Reads networks, volumes, routes and pools again if one of them changed.
    pub fn refresh_aux(&mut self) -> Result<(), String> {
        if !self.aux_stale {
            return Ok(());
        }
        let err = |e: tonic::Status| e.message().to_string();
        let reader = &self.reader;
        let has_pools = crate::networks::load_pools(reader).map_err(err)?.is_some();
        let networks = if has_pools {
            objects::list::<NetworkRecord>(reader, crate::networks::NETWORKS_PREFIX)
                .map_err(err)?
                .into_iter()
                .map(|n| (format!("{}/{}", n.obj.namespace, n.obj.name), n))
                .collect()
        } else {
            HashMap::new()
        };
        let volumes = crate::volumes::load_all(reader).map_err(err)?;
        let routed = if has_pools {
            objects::list::<berth_api::pb::RouteRecord>(reader, crate::routes::ROUTES_PREFIX)
                .map_err(err)?
                .into_iter()
                .filter_map(|r| {
                    crate::routes::spec_of(&r.obj).ok().map(|d| format!("{}/{}", r.obj.namespace, d.spec.service))
                })
                .collect()
        } else {
            BTreeSet::new()
        };
        self.has_pools = has_pools;
        self.networks = networks;
        self.volumes = volumes;
        self.routed = routed;
        self.aux_stale = false;
        Ok(())
    }

    /// Applies one change seen by the watch at revision `rev` (an older one than the index holds
    /// for its key is ignored).
    pub fn apply(&mut self, rev: Revision, e: &Event) {
        let key = &e.kv.key;
        let put = e.kind == EventKind::Put;
        let at = if put { e.kv.mod_revision } else { rev };
        if let Some(id) = key.strip_prefix(TASKS_PREFIX.as_bytes()) {
            let id = String::from_utf8_lossy(id).into_owned();
            if self.tasks.get(&id).is_some_and(|t| t.mod_revision >= at) {
                return;
            }
            self.remove_task(&id);
            if put {
                match Task::decode(e.kv.value.as_slice()) {
                    Ok(obj) => self.put_task(Versioned { obj, mod_revision: at }),
                    Err(err) => warn!("task {id} is undecodable ({err}); the controllers leave it alone"),
                }
            }
        } else if key.starts_with(SLOTS_PREFIX.as_bytes()) {
            if self.slots.get(key).is_some_and(|(_, r)| *r >= at) {
                return;
            }
            if put {
                self.slots.insert(key.clone(), (String::from_utf8_lossy(&e.kv.value).into_owned(), at));
            } else {
                self.slots.remove(key);
            }
        } else if let Some(id) = key.strip_prefix(NODES_PREFIX.as_bytes()) {
            if !self.newer(key, at) {
                return;
            }
            let id = String::from_utf8_lossy(id).into_owned();
            self.nodes.remove(&id);
            if !put {
                self.revs.remove(key);
            } else {
                match Node::decode(e.kv.value.as_slice()) {
                    Ok(n) => {
                        self.nodes.insert(id, n);
                    }
                    Err(err) => warn!("node {id} is undecodable ({err}); the controllers leave it out"),
                }
            }
        } else if key.starts_with(SERVICES_PREFIX.as_bytes()) {
            if !self.newer(key, at) {
                return;
            }
            self.services.remove(key);
            if !put {
                self.revs.remove(key);
            } else {
                match ServiceRecord::decode(e.kv.value.as_slice()) {
                    Ok(r) => self.put_service(key.clone(), r, at),
                    Err(err) => {
                        warn!("service {} is undecodable ({err})", String::from_utf8_lossy(key));
                    }
                }
            }
        } else if AUX_PREFIXES.iter().any(|p| key.starts_with(p.as_bytes())) {
            self.aux_stale = true;
        }
    }

    /// Records `at` as `key`'s revision if it is newer than the one held. (A delete forgets the
    /// key: the watch delivers changes in revision order, so no older put of it comes later.)
    fn newer(&mut self, key: &[u8], at: Revision) -> bool {
        match self.revs.get_mut(key) {
            Some(r) if *r >= at => false,
            Some(r) => {
                *r = at;
                true
            }
            None => {
                self.revs.insert(key.to_vec(), at);
                true
            }
        }
    }

    fn put_service(&mut self, key: Vec<u8>, r: ServiceRecord, at: Revision) {
        self.revs.insert(key.clone(), at);
        match Svc::parse(r, at) {
            Ok(s) => {
                self.services.insert(key, s);
            }
            Err(e) => warn!("{e}"),
        }
    }

    fn put_task(&mut self, t: Versioned<Task>) {
        self.by_service.entry((t.obj.namespace.clone(), t.obj.service.clone())).or_default().insert(t.obj.id.clone());
        self.tasks.insert(t.obj.id.clone(), t);
    }

    fn remove_task(&mut self, id: &str) {
        let Some(t) = self.tasks.remove(id) else { return };
        let sid = (t.obj.namespace, t.obj.service);
        if let Some(ids) = self.by_service.get_mut(&sid) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_service.remove(&sid);
            }
        }
    }

    /// The tasks of service `ns/name`.
    pub fn tasks_of<'a>(&'a self, ns: &str, name: &str) -> impl Iterator<Item = &'a Versioned<Task>> + 'a {
        self.by_service
            .get(&(ns.to_string(), name.to_string()))
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
    }

    /// The slots of service `ns/name`: slot key -> (task id, mod_revision).
    pub fn slots_of<'a>(
        &'a self,
        ns: &str,
        name: &str,
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a (String, Revision))> + 'a {
        let prefix = format!("{SLOTS_PREFIX}{ns}/{name}/").into_bytes();
        let end = berth_types::prefix_end(&prefix);
        self.slots.range(prefix..end)
    }

    /// Compares the index with a fresh read of the store, for what both can see: every key the
    /// store holds at or below `at` (the revision the index has applied) must be in the index
    /// with the same revision and value, and nothing in the index may be newer than the store.
    /// Keys written or deleted after `at` are not compared.
    pub fn check_against_store(&self, at: Revision) -> Result<(), String> {
        let fresh = World::load(&self.reader, self.me)?;
        let mut problems = Vec::new();
        let mut compare =
            |what: &str, id: &str, ours: Option<Revision>, theirs: Option<Revision>, same: bool| match (ours, theirs) {
                (None, Some(t)) if t <= at => problems.push(format!("{what} {id} (revision {t}) is missing")),
                (Some(o), Some(t)) if t <= at && (o != t || !same) => {
                    problems.push(format!("{what} {id} is at revision {o} here and {t} in the store"))
                }
                (Some(o), Some(t)) if o > t => problems.push(format!("{what} {id} is newer here ({o} > {t})")),
                _ => {}
            };
        for (id, t) in &fresh.tasks {
            let ours = self.tasks.get(id);
            compare(
                "task",
                id,
                ours.map(|o| o.mod_revision),
                Some(t.mod_revision),
                ours.is_some_and(|o| o.obj == t.obj),
            );
        }
        for (id, t) in &self.tasks {
            if !fresh.tasks.contains_key(id) {
                compare("task", id, Some(t.mod_revision), None, true);
            }
        }
        for (key, (id, r)) in &fresh.slots {
            let ours = self.slots.get(key);
            compare(
                "slot",
                &String::from_utf8_lossy(key),
                ours.map(|o| o.1),
                Some(*r),
                ours.is_some_and(|o| o.0 == *id),
            );
        }
        for (key, r) in &fresh.revs {
            compare("record", &String::from_utf8_lossy(key), self.revs.get(key).copied(), Some(*r), true);
        }
        for (id, n) in &fresh.nodes {
            if fresh.revs.get(&objects::node_key(id)).is_some_and(|r| *r <= at) && self.nodes.get(id) != Some(n) {
                problems.push(format!("node {id} differs"));
            }
        }
        let mut grouped = 0;
        for ((ns, name), ids) in &self.by_service {
            for id in ids {
                grouped += 1;
                if self.tasks.get(id).is_none_or(|t| t.obj.namespace != *ns || t.obj.service != *name) {
                    problems.push(format!("task {id} is grouped under {ns}/{name} wrongly"));
                }
            }
        }
        if grouped != self.tasks.len() {
            problems.push(format!("{grouped} tasks are grouped by service, of {}", self.tasks.len()));
        }
        if problems.is_empty() {
            return Ok(());
        }
        let n = problems.len();
        problems.truncate(10);
        Err(format!("{n} differences at revision {at}: {}", problems.join("; ")))
    }
}
