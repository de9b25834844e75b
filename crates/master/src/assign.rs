//! The leader's side of assignments and task status.
//!
//! - [`Assignments`] indexes tasks by node from the replicated state (a range read, then a watch
//!   on `/berth/tasks/`), so each agent session learns of its node's changes without scanning.
//!   A node's set holds every task placed on it until the task has ended with desired state
//!   SHUTDOWN; a task leaving the set tells the agent to stop it and forget it.
//! - [`Statuses`] collects the task states agents report and commits them in batches every
//!   100 ms, one conditional write per task, proposed together (one Raft entry for many).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use berth_api::pb::{
    Task,
    agent::{Assignment, TaskHealth, TaskState, TaskStatus},
};
use berth_store::WatchEvents;
use berth_types::{Command, CommandResult, EventKind, RangeQuery, prefix_end};
use prost::Message;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    node::Ctx,
    objects,
    tasks::{self, TASKS_PREFIX},
};

pub(crate) struct Assignments {
    inner: Mutex<Inner>,
    /// True once the index reflects the replicated tasks of this leadership term: sessions wait
    /// for it, so an agent is never sent an empty or stale set (which would stop its tasks).
    ready: watch::Sender<bool>,
}

impl Default for Assignments {
    fn default() -> Self {
        Assignments { inner: Mutex::new(Inner::default()), ready: watch::channel(false).0 }
    }
}

#[derive(Default)]
struct Inner {
    by_node: HashMap<String, BTreeMap<String, Assignment>>,
    node_of: HashMap<String, String>,
    changed: HashMap<String, watch::Sender<u64>>,
    /// When each node's set first changed since its session last read it (assignment lag).
    changed_at: HashMap<String, std::time::Instant>,
    /// Agents' connections, for log streams: node id -> connection.
    conns: HashMap<String, quinn::Connection>,
}

fn assignment_of(t: &Task) -> Option<Assignment> {
    if t.node_id.is_empty() {
        return None;
    }
    let desired = tasks::desired_of(t);
    if desired == TaskState::Shutdown && tasks::is_terminal(tasks::state_of(t)) {
        return None;
    }
    Some(Assignment {
        task_id: t.id.clone(),
        spec: t.run_spec.clone(),
        desired_state: desired as i32,
        files: vec![],
        image: None,
    })
}

impl Assignments {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().expect("assignments lock"))
    }

    /// The node's current set.
    pub fn current(&self, node: &str) -> BTreeMap<String, Assignment> {
        self.current_since(node).0
    }

    /// The node's current set, and when it first changed since the last read (None: unchanged).
    pub fn current_since(&self, node: &str) -> (BTreeMap<String, Assignment>, Option<std::time::Instant>) {
        self.with(|i| (i.by_node.get(node).cloned().unwrap_or_default(), i.changed_at.remove(node)))
    }

    /// A receiver that changes whenever the node's set may have changed.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        self.with(|i| i.changed.entry(node.to_string()).or_insert_with(|| watch::channel(0).0).subscribe())
    }

    fn bump(i: &mut Inner, node: &str) {
        if let Some(tx) = i.changed.get(node) {
            tx.send_modify(|v| *v += 1);
            i.changed_at.entry(node.to_string()).or_insert_with(std::time::Instant::now);
        }
    }

    fn put(i: &mut Inner, t: &Task) {
        let old_node = i.node_of.get(&t.id).cloned();
        match assignment_of(t) {
            Some(a) => {
                if let Some(old) = &old_node
                    && *old != t.node_id
                {
                    if let Some(m) = i.by_node.get_mut(old) {
                        m.remove(&t.id);
                    }
                    Self::bump(i, old);
                }
                let set = i.by_node.entry(t.node_id.clone()).or_default();
                if set.get(&t.id) != Some(&a) {
                    set.insert(t.id.clone(), a);
                    Self::bump(i, &t.node_id);
                }
                i.node_of.insert(t.id.clone(), t.node_id.clone());
            }
            None => Self::remove(i, &t.id),
        }
    }

    fn remove(i: &mut Inner, id: &str) {
        if let Some(node) = i.node_of.remove(id) {
            if let Some(m) = i.by_node.get_mut(&node) {
                m.remove(id);
            }
            Self::bump(i, &node);
        }
    }

    /// Not ready: leadership began or ended, or the index is being rebuilt.
    pub fn unready(&self) {
        self.ready.send_replace(false);
    }

    /// Whether the index is built for this term (behind its read barrier) and not rebuilding.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits (bounded) until the index is built; false if it is not within `patience`.
    pub async fn wait_ready(&self, patience: Duration) -> bool {
        let mut rx = self.ready.subscribe();
        matches!(tokio::time::timeout(patience, rx.wait_for(|r| *r)).await, Ok(Ok(_)))
    }

    /// Replaces the whole index in one step, then tells every session.
    fn replace_all(&self, tasks: Vec<Task>) {
        let mut fresh = Inner::default();
        for t in &tasks {
            Self::put(&mut fresh, t);
        }
        self.with(|i| {
            i.by_node = std::mem::take(&mut fresh.by_node);
            i.node_of = std::mem::take(&mut fresh.node_of);
            let nodes: Vec<String> = i.changed.keys().cloned().collect();
            for n in nodes {
                Self::bump(i, &n);
            }
        });
        self.ready.send_replace(true);
    }

    pub fn set_conn(&self, node: &str, conn: quinn::Connection) {
        self.with(|i| {
            i.conns.insert(node.to_string(), conn);
        });
    }

    pub fn drop_conn(&self, node: &str, conn: &quinn::Connection) {
        self.with(|i| {
            if i.conns.get(node).is_some_and(|c| c.stable_id() == conn.stable_id()) {
                i.conns.remove(node);
            }
        });
    }

    pub fn conn(&self, node: &str) -> Option<quinn::Connection> {
        self.with(|i| i.conns.get(node).cloned())
    }
}

/// Keeps [`Assignments`] in step with the replicated tasks while this master leads.
pub(crate) async fn index(ctx: Arc<Ctx>, leading: CancellationToken) {
    loop {
        match index_once(&ctx, &leading).await {
            Ok(()) => {
                ctx.assignments.unready();
                return;
            }
            Err(e) => {
                ctx.assignments.unready();
                warn!("assignment index restarts: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = leading.cancelled() => return,
                }
            }
        }
    }
}

/// The read barrier at the start of a term, shared by the leader's indexes: `Ok(false)` when
/// leadership ended first.
pub(crate) async fn term_barrier(ctx: &Ctx, leading: &CancellationToken) -> Result<bool, String> {
    tokio::select! {
        r = ctx.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex) => {
            r.map_err(|e| format!("the read barrier at the start of this term failed: {e}"))?;
            Ok(true)
        }
        _ = leading.cancelled() => Ok(false),
    }
}

async fn index_once(ctx: &Ctx, leading: &CancellationToken) -> Result<(), String> {
    // Read barrier first: a new leader's applied state may lag what an earlier leader committed,
    // and a COMPLETE set built from it could lack tasks, which the agent would then stop and
    // remove. Once this returns, everything committed before this term began is applied here.
    if !term_barrier(ctx, leading).await? {
        return Ok(());
    }
    let q = RangeQuery {
        key: TASKS_PREFIX.as_bytes().to_vec(),
        range_end: prefix_end(TASKS_PREFIX.as_bytes()),
        ..Default::default()
    };
    let (res, counters) = ctx.reader.range(&q).map_err(|e| e.to_string())?;
    let mut watcher =
        ctx.reader.watch(q.key.clone(), q.range_end.clone(), counters.revision + 1).map_err(|e| e.to_string())?;
    ctx.assignments.replace_all(res.kvs.iter().filter_map(|kv| Task::decode(kv.value.as_slice()).ok()).collect());
    debug!(tasks = res.kvs.len(), "assignment index built");
    loop {
        let ev = tokio::select! {
            e = watcher.next() => e.map_err(|e| e.to_string())?,
            _ = leading.cancelled() => return Ok(()),
        };
        match ev {
            WatchEvents::Events(events) => ctx.assignments.with(|i| {
                for (_, e) in events {
                    match e.kind {
                        EventKind::Put => {
                            if let Ok(t) = Task::decode(e.kv.value.as_slice()) {
                                Assignments::put(i, &t);
                            }
                        }
                        EventKind::Delete => {
                            let key = String::from_utf8_lossy(&e.kv.key);
                            if let Some(id) = key.strip_prefix(TASKS_PREFIX) {
                                Assignments::remove(i, id);
                            }
                        }
                    }
                }
            }),
            WatchEvents::Compacted { .. } | WatchEvents::Reset { .. } => {
                ctx.assignments.unready();
                return Err("the task history moved on; rebuilding".into());
            }
        }
    }
}

/// Task states reported by agents, waiting to be committed.
#[derive(Default)]
pub(crate) struct Statuses {
    pending: Mutex<Pending>,
    notify: Notify,
}

#[derive(Default)]
struct Pending {
    reports: HashMap<String, (String, TaskStatus)>,
    /// How many of `reports` each node made.
    per_node: HashMap<String, usize>,
}

/// Most task states one node may have waiting to be committed: far more than a node runs (the
/// task ids it reports are checked only when committed, so an agent reporting ids it does not
/// own could otherwise grow the leader's memory without bound).
pub(crate) const MAX_PENDING_PER_NODE: usize = 16_384;
/// The longest status message kept (an agent's text, shown by `berth get tasks`).
const MAX_STATUS_MESSAGE: usize = 4096;

impl Pending {
    /// Adds a report unless `node` has MAX_PENDING_PER_NODE waiting; false when dropped.
    fn add(&mut self, id: String, node: &str, mut s: TaskStatus, replace: bool) -> bool {
        if s.message.len() > MAX_STATUS_MESSAGE {
            let mut end = MAX_STATUS_MESSAGE;
            while !s.message.is_char_boundary(end) {
                end -= 1;
            }
            s.message.truncate(end);
        }
        if let Some(cur) = self.reports.get_mut(&id) {
            if replace && cur.0 == node {
                cur.1 = s;
            }
            return true;
        }
        let n = self.per_node.entry(node.to_string()).or_default();
        if *n >= MAX_PENDING_PER_NODE {
            return false;
        }
        *n += 1;
        self.reports.insert(id, (node.to_string(), s));
        true
    }
}

impl Statuses {
    /// Queues what `node` reported (a later report of the same task replaces an earlier one).
    /// Returns how many reports were dropped because the node has too many waiting.
    pub fn report(&self, node: &str, statuses: Vec<TaskStatus>) -> usize {
        if statuses.is_empty() {
            return 0;
        }
        let mut p = self.pending.lock().expect("statuses lock");
        let mut dropped = 0;
        for s in statuses {
            if !p.add(s.task_id.clone(), node, s, true) {
                dropped += 1;
            }
        }
        drop(p);
        self.notify.notify_one();
        dropped
    }

    fn take(&self) -> HashMap<String, (String, TaskStatus)> {
        let mut p = self.pending.lock().expect("statuses lock");
        p.per_node.clear();
        std::mem::take(&mut p.reports)
    }

    fn requeue(&self, id: String, v: (String, TaskStatus)) {
        let (node, s) = v;
        self.pending.lock().expect("statuses lock").add(id, &node, s, false);
    }

    fn is_empty(&self) -> bool {
        self.pending.lock().expect("statuses lock").reports.is_empty()
    }

    /// Reports waiting to be committed.
    pub fn len(&self) -> usize {
        self.pending.lock().expect("statuses lock").reports.len()
    }
}

/// How often reported states are committed.
const STATUS_FLUSH: Duration = Duration::from_millis(100);

/// Commits reported task states in batches while this master leads.
pub(crate) async fn commit_statuses(ctx: Arc<Ctx>, leading: CancellationToken) {
    loop {
        tokio::select! {
            _ = ctx.statuses.notify.notified() => {}
            _ = leading.cancelled() => return,
        }
        // Let a batch gather.
        tokio::select! {
            _ = tokio::time::sleep(STATUS_FLUSH) => {}
            _ = leading.cancelled() => return,
        }
        let batch = ctx.statuses.take();
        if batch.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        // Reading the tasks and building the writes is synchronous: off the async workers. If
        // that fails as a whole (a panic, a runtime shutting down), the batch goes back in the
        // queue: a status report is retried, never dropped.
        let c = ctx.clone();
        let kept = batch.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for (id, (node, s)) in batch {
                let cur = match objects::get::<Task>(&c.reader, &tasks::task_key(&id)) {
                    Ok(Some(t)) => t,
                    Ok(None) => continue, // reaped or unknown: nothing to record
                    Err(e) => {
                        warn!("reading task {id}: {}", e.message());
                        c.statuses.requeue(id, (node, s));
                        continue;
                    }
                };
                if cur.obj.node_id != node {
                    debug!(task = %id, %node, "ignoring a status for a task of another node");
                    continue;
                }
                let Some(updated) = apply_status(&cur.obj, &s) else { continue };
                let put = objects::cas_put(tasks::task_key(&id), cur.mod_revision, updated.encode_to_vec());
                out.push(Prepared { event: failure_event(c.id, &updated), id, node, status: s, put });
            }
            out
        })
        .await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                warn!("preparing a batch of task states failed ({e}); requeueing {} reports", kept.len());
                for (id, v) in kept {
                    ctx.statuses.requeue(id, v);
                }
                ctx.statuses.notify.notify_one();
                tokio::select! {
                    _ = tokio::time::sleep(STATUS_FLUSH) => {}
                    _ = leading.cancelled() => return,
                }
                continue;
            }
        };
        // Many tasks per transaction; the chunks are written at once, and the proposer packs
        // them into few Raft entries.
        let n = prepared.len();
        let mut chunks: Vec<Vec<Prepared>> = Vec::new();
        let mut ops = 0;
        for p in prepared {
            // A compare and a put for the task, and its event if it failed.
            let cost = 2 + usize::from(p.event.is_some());
            if chunks.is_empty() || ops + cost > ctx.limits.max_txn_ops {
                chunks.push(Vec::new());
                ops = 0;
            }
            ops += cost;
            chunks.last_mut().expect("a chunk was just pushed").push(p);
        }
        let ctx_ref = &ctx;
        futures::future::join_all(chunks.into_iter().map(|chunk| commit_chunk(ctx_ref, chunk))).await;
        ctx.meters.status_batch_seconds.observe(started.elapsed().as_secs_f64());
        if n > 0 {
            debug!(tasks = n, "task states committed");
            if !ctx.statuses.is_empty() {
                ctx.statuses.notify.notify_one();
            }
        }
    }
}

/// A task's new state, ready to be written.
struct Prepared {
    id: String,
    node: String,
    status: TaskStatus,
    put: (berth_types::Compare, berth_types::RequestOp),
    event: Option<berth_types::event::ClusterEvent>,
}

/// Writes `chunk` as one transaction. A conflict (a controller wrote one of its tasks since it
/// was read) fails it whole: then each task is written on its own, so that one busy task does not
/// hold back the others, and the one that conflicts again is applied anew next round.
async fn commit_chunk(ctx: &Ctx, chunk: Vec<Prepared>) {
    let txn_of = |ps: &[&Prepared]| {
        let txn = objects::txn_of(ps.iter().map(|p| p.put.clone()).collect());
        let events: Vec<_> = ps.iter().filter_map(|p| p.event.clone()).collect();
        crate::events::with(txn, &events)
    };
    let all: Vec<&Prepared> = chunk.iter().collect();
    let whole = ctx.write(Command::Txn(txn_of(&all))).await;
    if let Ok(CommandResult::Txn(r)) = &whole
        && r.succeeded
    {
        ctx.meters.status_committed.inc_by(chunk.len() as u64);
        return;
    }
    if chunk.len() == 1 || whole.is_err() {
        if let Err(e) = &whole {
            warn!(tasks = chunk.len(), "committing task states failed: {}", e.message());
        }
        for p in chunk {
            ctx.statuses.requeue(p.id, (p.node, p.status));
        }
        return;
    }
    let each = chunk.iter().map(|p| async move { ctx.write(Command::Txn(txn_of(&[p]))).await });
    let results = futures::future::join_all(each).await;
    for (p, r) in chunk.into_iter().zip(results) {
        match r {
            Ok(CommandResult::Txn(r)) if r.succeeded => {
                ctx.meters.status_committed.inc();
            }
            // The task changed meanwhile: apply the status again.
            Ok(_) => ctx.statuses.requeue(p.id, (p.node, p.status)),
            Err(e) => {
                info!("committing task states failed: {}", e.message());
                ctx.statuses.requeue(p.id, (p.node, p.status));
            }
        }
    }
}

/// The event of a task that has just failed (apply_status never returns a task that had
/// already ended): fenced by the at-most-once fence, or failed.
fn failure_event(master: u64, t: &Task) -> Option<berth_types::event::ClusterEvent> {
    if tasks::state_of(t) != TaskState::Failed {
        return None;
    }
    let kind = if berth_types::task::is_fence_stop(&t.message) {
        berth_types::event::TASK_FENCED
    } else {
        berth_types::event::TASK_FAILED
    };
    let on = if t.node_id.is_empty() { String::new() } else { format!(" on node {}", t.node_id) };
    Some(crate::events::new(master, kind, "task", &t.namespace, &t.id, format!("{}{on}", t.message)))
}

/// The task with the reported state applied, or None when nothing changes.
fn apply_status(t: &Task, s: &TaskStatus) -> Option<Task> {
    let reported = TaskState::try_from(s.state).unwrap_or(TaskState::Unspecified);
    // New, pending and assigned are the masters' to set; an agent's "assigned" adds nothing.
    if matches!(reported, TaskState::Unspecified | TaskState::New | TaskState::Pending | TaskState::Assigned) {
        return None;
    }
    let current = tasks::state_of(t);
    // An ended task stays as it ended: a later report (a stale one, or SHUTDOWN after a stop)
    // neither brings it back nor hides a failure.
    if tasks::is_terminal(current) {
        return None;
    }
    let same = t.state == s.state
        && t.message == s.message
        && t.exit_code == s.exit_code
        && t.health == s.health
        && (s.pid == 0 || t.pid == s.pid)
        && (s.addresses.is_empty() || t.addresses == s.addresses);
    if same {
        return None;
    }
    let mut u = t.clone();
    u.state = s.state;
    u.message = s.message.clone();
    u.exit_code = s.exit_code;
    u.health = s.health;
    if s.pid != 0 {
        u.pid = s.pid;
    }
    // Addresses come with the first report after the task's interfaces are up and never
    // change while it lives; an empty map means "not said", not "none".
    if !s.addresses.is_empty() {
        u.addresses = s.addresses.clone();
    }
    u.updated_at_ms = if s.timestamp_ms > 0 { s.timestamp_ms } else { objects::now_ms() };
    stamp_transitions(&mut u, reported, s.health, objects::now_ms());
    Some(u)
}

/// Records when a task first ran, first passed its health check and ended, on the committing
/// leader's clock (the one the controllers compare with; an agent's clock may be off), so the
/// updater's `monitor` survives a change of leader.
fn stamp_transitions(u: &mut Task, reported: TaskState, health: i32, now: i64) {
    if reported == TaskState::Running && u.running_at_ms == 0 {
        u.running_at_ms = now;
    }
    if reported == TaskState::Running && health == TaskHealth::Healthy as i32 && u.healthy_at_ms == 0 {
        u.healthy_at_ms = now;
    }
    if tasks::is_terminal(reported) && u.ended_at_ms == 0 {
        u.ended_at_ms = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent reporting states for ids it does not own (or simply very many) cannot grow the
    /// leader's queue past MAX_PENDING_PER_NODE; another node's reports still get in, and a node
    /// cannot overwrite another's report.
    #[test]
    fn pending_states_are_bounded_per_node() {
        let st = Statuses::default();
        let status = |id: String| TaskStatus { task_id: id, state: TaskState::Running as i32, ..Default::default() };
        let flood: Vec<TaskStatus> = (0..MAX_PENDING_PER_NODE + 500).map(|i| status(format!("fake-{i}"))).collect();
        assert_eq!(st.report("rogue", flood), 500);
        assert_eq!(st.report("rogue", vec![status("more".into())]), 1);
        assert_eq!(st.report("good", vec![status("t1".into())]), 0);
        let mut overwrite = status("t1".into());
        overwrite.message = "from the rogue".into();
        st.report("rogue", vec![overwrite]);
        let mut long = status("t2".into());
        long.message = "é".repeat(5000);
        st.report("good", vec![long]);
        let taken = st.take();
        assert_eq!(taken.len(), MAX_PENDING_PER_NODE + 2);
        assert_eq!(taken["t1"].0, "good");
        assert!(taken["t1"].1.message.is_empty());
        assert!(taken["t2"].1.message.len() <= MAX_STATUS_MESSAGE);
        // Taken: the node may report again.
        assert_eq!(st.report("rogue", vec![status("again".into())]), 0);
    }

    #[test]
    fn reported_addresses_are_kept_and_never_cleared() {
        let t = task(TaskState::Starting);
        let mut s = TaskStatus { task_id: "t".into(), state: TaskState::Running as i32, ..Default::default() };
        s.addresses.insert("backend".into(), "198.18.1.2".into());
        let u = apply_status(&t, &s).expect("a change");
        assert_eq!(u.addresses.get("backend").map(String::as_str), Some("198.18.1.2"));
        // A later report without addresses (e.g. from before they were known) keeps them.
        let mut later = s.clone();
        later.addresses.clear();
        later.health = TaskHealth::Healthy as i32;
        let v = apply_status(&u, &later).expect("a change");
        assert_eq!(v.addresses, u.addresses);
        // The same report twice is no change.
        assert!(apply_status(&u, &s).is_none());
    }

    fn task(state: TaskState) -> Task {
        Task { id: "t".into(), node_id: "n".into(), state: state as i32, ..Default::default() }
    }

    fn status(state: TaskState) -> TaskStatus {
        TaskStatus { task_id: "t".into(), state: state as i32, ..Default::default() }
    }

    #[test]
    fn statuses_move_forward_only() {
        assert!(apply_status(&task(TaskState::Assigned), &status(TaskState::Running)).is_some());
        assert!(apply_status(&task(TaskState::Running), &status(TaskState::Running)).is_none());
        assert!(apply_status(&task(TaskState::Failed), &status(TaskState::Running)).is_none());
        assert!(apply_status(&task(TaskState::Running), &status(TaskState::Assigned)).is_none());
        assert!(apply_status(&task(TaskState::Running), &status(TaskState::Shutdown)).is_some());
        assert!(apply_status(&task(TaskState::Failed), &status(TaskState::Shutdown)).is_none());
    }

    #[test]
    fn transitions_are_stamped_once() {
        let mut t = task(TaskState::Assigned);
        stamp_transitions(&mut t, TaskState::Running, TaskHealth::Starting as i32, 10);
        assert_eq!((t.running_at_ms, t.healthy_at_ms, t.ended_at_ms), (10, 0, 0));
        stamp_transitions(&mut t, TaskState::Running, TaskHealth::Healthy as i32, 20);
        stamp_transitions(&mut t, TaskState::Running, TaskHealth::Healthy as i32, 25);
        assert_eq!((t.running_at_ms, t.healthy_at_ms, t.ended_at_ms), (10, 20, 0));
        stamp_transitions(&mut t, TaskState::Failed, TaskHealth::Unhealthy as i32, 30);
        assert_eq!((t.running_at_ms, t.healthy_at_ms, t.ended_at_ms), (10, 20, 30));
        let mut healthy = status(TaskState::Running);
        healthy.health = TaskHealth::Healthy as i32;
        let u = apply_status(&task(TaskState::Assigned), &healthy).expect("changed");
        assert!(u.running_at_ms > 0 && u.healthy_at_ms == u.running_at_ms && u.ended_at_ms == 0);
    }

    #[test]
    fn ended_tasks_leave_the_set_once_shut_down() {
        let mut t = task(TaskState::Failed);
        t.desired_state = TaskState::Running as i32;
        assert!(assignment_of(&t).is_some());
        t.desired_state = TaskState::Shutdown as i32;
        assert!(assignment_of(&t).is_none());
        t.state = TaskState::Running as i32;
        assert!(assignment_of(&t).is_some());
        t.node_id.clear();
        assert!(assignment_of(&t).is_none());
    }
}
