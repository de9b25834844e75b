//! The leader's controllers: orchestrator, updater, scheduler loop and task reaper.
//!
//! They run as one loop on the leader, started when it becomes leader and stopped when it stops
//! being leader. Each round decides over the leader's in-memory index of the replicated state
//! (services, tasks, slots, nodes; see [`index`]), which the loop's watch keeps current, and
//! writes conditional transactions (compare mod_revision), one per slot change, proposed together
//! so that the proposer packs them into few Raft entries. The index is only a cache of the store:
//! a new leader builds it from the replicated state before its first round, so it resumes exactly
//! where the old one stopped. A round runs when anything under `/berth/` changes, and at least
//! every second (restart delays, update delays).
//!
//! - **orchestrator**: one task per slot (replicas 1..N, or one per eligible node for `global`);
//!   replaces tasks that ended, per the restart policy with exponential backoff; replaces tasks
//!   whose node is down, removed or drained; shuts down tasks of removed slots.
//! - **updater**: replaces tasks whose template differs from the service's, `parallelism` at a
//!   time, stop-first or start-first, waiting for the new ones to be running (and healthy), with
//!   `delay` between batches; counts the new tasks that fail before turning ready or within
//!   `monitor` after, and pauses, rolls back or continues; completes once the last ones stayed up
//!   for `monitor`. Its decisions are the pure functions of [`crate::updater`].
//! - **scheduler loop**: places pending tasks in one batch with `berth-scheduler`.
//! - **reaper**: keeps the last few ended tasks per slot; removes deleted services once their
//!   tasks have ended.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use berth_api::pb::{NetworkRecord, Node, NodeAvailability, NodeStatus, Rollout, RolloutState, Task, agent::TaskState};
use berth_scheduler::{NetworkRoom, Scheduler, Strategy};
use berth_types::{
    Command, CommandResult, Compare, Event, RequestOp, Revision, Txn,
    spec::{PlacementStrategy, RestartCondition, UpdateOrder, network::block_count},
};
use futures::FutureExt;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    node::Ctx,
    objects,
    tasks::{self, SLOTS_PREFIX, Svc},
    updater::{self, Step},
};

mod index;
use index::World;

/// Ended tasks kept per slot (for `describe` and logs).
pub(crate) const KEEP_ENDED_PER_SLOT: usize = 3;
/// The longest restart backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a round waits for further changes after the first one wakes it.
const ROUND_SETTLE: Duration = Duration::from_millis(30);

pub(crate) async fn run(ctx: Arc<Ctx>, leading: CancellationToken) {
    let prefix = b"/berth/".to_vec();
    let watch = || ctx.reader.watch(prefix.clone(), berth_types::prefix_end(&prefix), 0);
    // The watch starts before the index is read, so that no change falls between the two.
    let mut watcher = match watch() {
        Ok(w) => w,
        Err(e) => {
            warn!("controllers not started: cannot watch the state: {e}");
            return;
        }
    };
    // None: (re)build the index from the store before the next round.
    let mut world: Option<World> = None;
    let mut changes: Vec<(Revision, Event)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!("controllers started");
    loop {
        let mut broken = false;
        tokio::select! {
            _ = leading.cancelled() => break,
            r = watcher.next() => broken = !take(r, &mut changes),
            _ = tick.tick() => {}
        }
        let leads = !leading.is_cancelled() && ctx.is_leader();
        if leads && !broken {
            // Coalesce a burst of changes (a status batch, a wave of placements) into one round.
            let settle = tokio::time::sleep(ROUND_SETTLE);
            tokio::pin!(settle);
            while !broken {
                tokio::select! {
                    _ = &mut settle => break,
                    r = watcher.next() => broken = !take(r, &mut changes),
                }
            }
            // What is already out (this leader's own last writes, often) goes into this round too.
            while !broken && let Some(r) = watcher.next().now_or_never() {
                broken = !take(r, &mut changes);
            }
        }
        if broken || !leads {
            world = None;
            changes.clear();
        }
        if broken {
            // The watch fell behind compaction, the state was replaced by a snapshot, or it
            // broke: start a fresh one from now; the next round reads the index again.
            match watch() {
                Ok(w) => watcher = w,
                Err(e) => {
                    warn!("controllers: cannot watch the state: {e}");
                    tokio::select! {
                        _ = leading.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                }
            }
            continue;
        }
        if !leads {
            continue;
        }
        let seen = watcher.last_revision();
        match round(&ctx, &mut world, std::mem::take(&mut changes), seen).await {
            Ok(0) => {}
            Ok(n) => debug!(writes = n, "controller round"),
            Err(e) => info!("controller round: {e}"),
        }
    }
    info!("controllers stopped");
}

/// Adds a watch result's changes to `changes`; false if the watch must start over.
fn take(r: Result<berth_store::WatchEvents, berth_store::StoreError>, changes: &mut Vec<(Revision, Event)>) -> bool {
    match r {
        Ok(berth_store::WatchEvents::Events(ev)) => {
            changes.extend(ev);
            true
        }
        Ok(_) => false,
        Err(e) => {
            warn!("controllers: watch failed: {e}");
            false
        }
    }
}

impl World {
    /// Whether task `id` exists now (read again, outside this round's snapshot).
    fn fresh_task_exists(&self, id: &str) -> bool {
        !matches!(self.reader.get(&tasks::task_key(id)), Ok(None))
    }
}

/// The writes of one round: independent transactions, and the tasks they touch.
#[derive(Default)]
struct Plan {
    txns: Vec<Txn>,
    /// What each of `txns` does, for the metrics (same order).
    tags: Vec<Tag>,
    /// Tasks no node could take this round.
    unplaced: usize,
    touched: HashSet<String>,
    /// Tasks created this round (so the scheduler can count them next round).
    log: Vec<String>,
}

/// What a decision counts as once committed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tag {
    Other,
    /// Places this many tasks.
    Placements(u64),
    /// Replaces a task under its restart policy.
    Restart,
}

impl Plan {
    fn push(&mut self, parts: Vec<(Compare, RequestOp)>, what: String) {
        self.push_tagged(parts, what, Tag::Other);
    }

    fn push_tagged(&mut self, parts: Vec<(Compare, RequestOp)>, what: String, tag: Tag) {
        self.push_txn(objects::txn_of(parts), what, tag);
    }

    fn push_txn(&mut self, txn: Txn, what: String, tag: Tag) {
        self.txns.push(txn);
        self.tags.push(tag);
        self.log.push(what);
    }

    /// Marks the decision pushed last (if one was pushed since `before` decisions).
    fn tag_since(&mut self, before: usize, tag: Tag) {
        if self.tags.len() > before
            && let Some(t) = self.tags.last_mut()
        {
            *t = tag;
        }
    }

    fn touch(&mut self, id: &str) -> bool {
        self.touched.insert(id.to_string())
    }
}

fn put_task(t: &Task, expected: i64) -> (Compare, RequestOp) {
    objects::cas_put(tasks::task_key(&t.id), expected, t.encode_to_vec())
}

async fn round(
    ctx: &Arc<Ctx>,
    world: &mut Option<World>,
    changes: Vec<(Revision, Event)>,
    seen: Revision,
) -> Result<usize, String> {
    let started = std::time::Instant::now();
    let r = decide_and_commit(ctx, world, changes, seen).await;
    ctx.meters.round_seconds.observe(started.elapsed().as_secs_f64());
    r
}

async fn decide_and_commit(
    ctx: &Arc<Ctx>,
    world: &mut Option<World>,
    changes: Vec<(Revision, Event)>,
    seen: Revision,
) -> Result<usize, String> {
    // Updating the index and deciding is synchronous CPU work: off the async workers, so that
    // heartbeats and Raft traffic never wait behind it. The index goes along and comes back; if
    // the round fails it is dropped, and the next round reads it again.
    let c = ctx.clone();
    let index = world.take();
    let (index, plan) = tokio::task::spawn_blocking(move || -> Result<(World, Plan), String> {
        let mut w = match index {
            Some(w) => w,
            None => World::load(&c.reader, c.id)?,
        };
        for (rev, e) in &changes {
            w.apply(*rev, e);
        }
        w.refresh_aux()?;
        w.now = objects::now_ms();
        if cfg!(debug_assertions)
            && let Err(e) = w.check_against_store(seen)
        {
            // Debug builds (every test cluster) prove the index against the store each round.
            error!("the controllers' index differs from the store: {e}");
            std::process::abort();
        }
        let mut plan = Plan::default();
        let fence_ms = fence_timeout(&c).as_millis() as u64;
        for svc in w.services.values() {
            orchestrate(&w, svc, fence_ms, &mut plan);
        }
        for svc in w.services.values() {
            update(&w, svc, fence_ms, &mut plan);
        }
        schedule(&w, &mut plan);
        ingress_blocks(&w, &mut plan);
        reap(&w, &mut plan);
        Ok((w, plan))
    })
    .await
    .map_err(|e| format!("the controller round panicked: {e}"))??;
    *world = Some(index);
    ctx.meters.pending_tasks.set(plan.unplaced as i64);
    if plan.txns.is_empty() {
        return Ok(0);
    }
    if !ctx.is_leader() {
        return Ok(0);
    }
    let n = plan.txns.len();
    let writes = plan.txns.into_iter().map(|t| ctx.write(Command::Txn(t)));
    let mut conflicts = 0;
    for (r, tag) in futures::future::join_all(writes).await.into_iter().zip(plan.tags) {
        match r {
            Ok(CommandResult::Txn(r)) if r.succeeded => match tag {
                Tag::Placements(k) => {
                    ctx.meters.placements.inc_by(k);
                }
                Tag::Restart => {
                    ctx.meters.restarts.inc();
                }
                Tag::Other => {}
            },
            Ok(_) => {
                conflicts += 1;
                ctx.meters.conflicts.inc();
            }
            Err(s) => return Err(format!("writing controller decisions failed: {}", s.message())),
        }
    }
    if conflicts > 0 {
        debug!(conflicts, "some controller writes lost a race; the next round retries them");
    }
    for l in plan.log.iter().take(20) {
        debug!("{l}");
    }
    Ok(n)
}

/// How long an at-most-once task may run without hearing from the leader: well under the
/// node-down grace, so its replacement never starts while it still runs.
pub(crate) fn fence_timeout(ctx: &Ctx) -> Duration {
    (ctx.node_down_grace / 2).max(Duration::from_secs(1))
}

/// The slots a service wants now: slot name -> (replica number, pinned node).
fn desired_slots(w: &World, svc: &Svc) -> BTreeMap<String, (u32, String)> {
    let mut out = BTreeMap::new();
    if svc.record.deleting {
        return out;
    }
    if svc.is_global() {
        for n in w.nodes.values() {
            let info = tasks::node_info(n);
            if n.availability != NodeAvailability::Drain as i32 && tasks::node_matches(svc, &info) {
                out.insert(format!("node-{}", n.id), (0, n.id.clone()));
            }
        }
    } else {
        for i in 1..=svc.replicas() {
            out.insert(i.to_string(), (i, String::new()));
        }
    }
    out
}

fn new_task(w: &World, svc: &Svc, slot: u32, pinned: &str, fence_ms: u64) -> Task {
    let slot_name = if slot > 0 { slot.to_string() } else { format!("node-{pinned}") };
    Task {
        id: tasks::new_task_id(&svc.record.name, &slot_name),
        namespace: svc.record.namespace.clone(),
        service: svc.record.name.clone(),
        slot,
        spec_version: svc.record.version,
        node_id: String::new(),
        desired_state: TaskState::Running as i32,
        state: TaskState::Pending as i32,
        message: "waiting for a node".into(),
        exit_code: 0,
        run_spec: tasks::run_spec(svc, slot, fence_ms, w.has_pools, &w.volumes).encode(),
        created_at_ms: w.now,
        updated_at_ms: w.now,
        pending_reason: String::new(),
        not_before_ms: 0,
        attempt: 1,
        health: 0,
        pid: 0,
        window_start_ms: w.now,
        template_hash: svc.hash.clone(),
        pinned_node: pinned.to_string(),
        running_at_ms: 0,
        healthy_at_ms: 0,
        ended_at_ms: 0,
        addresses: Default::default(),
    }
}

fn shutdown(t: &Task, now: i64, why: &str) -> Task {
    let mut t = t.clone();
    t.desired_state = TaskState::Shutdown as i32;
    t.updated_at_ms = now;
    if tasks::is_terminal(tasks::state_of(&t)) {
        // Already ended: its message says how (a failed mount, an exit code), which is what
        // `get tasks -a` should keep showing.
        return t;
    }
    if t.node_id.is_empty() {
        // Never placed: nothing runs, so it ends here.
        t.state = TaskState::Shutdown as i32;
    }
    t.message = why.to_string();
    t
}

/// Gives `slot` a new task (replacing `old`, if any, which is shut down unless `keep_old`).
#[allow(clippy::too_many_arguments)]
fn replace_in_slot(
    w: &World,
    svc: &Svc,
    plan: &mut Plan,
    slot_name: &str,
    new: Task,
    old: Option<&objects::Versioned<Task>>,
    keep_old: bool,
    why: &str,
) {
    let key = tasks::slot_key(&svc.record.namespace, &svc.record.name, slot_name);
    let expected = w.slots.get(&key).map_or(0, |(_, rev)| *rev);
    let mut parts = vec![objects::cas_put(key, expected, new.id.clone().into_bytes()), put_task(&new, 0)];
    if let Some(old) = old {
        if !plan.touch(&old.obj.id) {
            return;
        }
        if !keep_old && tasks::desired_of(&old.obj) != TaskState::Shutdown {
            parts.push(put_task(&shutdown(&old.obj, w.now, why), old.mod_revision));
        }
    }
    plan.touch(&new.id);
    plan.push(parts, format!("{}: slot {slot_name} gets task {} ({why})", svc.key(), new.id));
}

/// A replacement runs what the task it replaces ran (restarts and moves are not updates; the
/// updater changes templates).
fn keep_template(new: &mut Task, old: &Task) {
    if new.template_hash != old.template_hash && !old.run_spec.is_empty() {
        new.run_spec = old.run_spec.clone();
        new.template_hash = old.template_hash.clone();
        new.spec_version = old.spec_version;
    }
}

fn node_gone(w: &World, t: &Task) -> Option<&'static str> {
    if t.node_id.is_empty() {
        return None;
    }
    match w.nodes.get(&t.node_id) {
        None => Some("its node was removed"),
        Some(n) if n.status == NodeStatus::Down as i32 => Some("its node is down"),
        Some(n) if n.availability == NodeAvailability::Drain as i32 => Some("its node is draining"),
        _ => None,
    }
}

fn orchestrate(w: &World, svc: &Svc, fence_ms: u64, plan: &mut Plan) {
    let desired = desired_slots(w, svc);
    let ns = &svc.record.namespace;
    let name = &svc.record.name;
    let restart = &svc.spec.spec.restart;
    for (slot_name, (slot, pinned)) in &desired {
        let key = tasks::slot_key(ns, name, slot_name);
        let cur = w.slots.get(&key).and_then(|(id, _)| w.tasks.get(id));
        if cur.is_none()
            && let Some((id, _)) = w.slots.get(&key)
            && w.fresh_task_exists(id)
        {
            continue; // written after this round read the tasks: the next round sees it
        }
        let Some(cur) = cur else {
            let t = new_task(w, svc, *slot, pinned, fence_ms);
            replace_in_slot(w, svc, plan, slot_name, t, None, false, "new slot");
            continue;
        };
        let t = &cur.obj;
        if plan.touched.contains(&t.id) {
            continue;
        }
        let state = tasks::state_of(t);
        if tasks::desired_of(t) != TaskState::Running {
            let nt = new_task(w, svc, *slot, pinned, fence_ms);
            replace_in_slot(w, svc, plan, slot_name, nt, Some(cur), false, "slot's task was shut down");
            continue;
        }
        if tasks::is_terminal(state) {
            let failed = state == TaskState::Failed || (state != TaskState::Complete && t.exit_code != 0);
            let restart_it = match restart.condition {
                RestartCondition::Any => true,
                RestartCondition::OnFailure => failed,
                RestartCondition::None => false,
            };
            if !restart_it {
                continue;
            }
            let Some((attempt, window_start_ms, backoff)) = next_attempt(t, restart, w.now) else { continue };
            let mut nt = new_task(w, svc, *slot, pinned, fence_ms);
            nt.attempt = attempt;
            nt.window_start_ms = window_start_ms;
            nt.not_before_ms = w.now + backoff.as_millis() as i64;
            nt.message = format!("restart {attempt} of the slot after {}", describe_end(t));
            // Keep the template the slot had: restarts are not updates.
            keep_template(&mut nt, t);
            let before = plan.tags.len();
            replace_in_slot(w, svc, plan, slot_name, nt, Some(cur), false, "restart policy");
            plan.tag_since(before, Tag::Restart);
            continue;
        }
        if let Some(why) = node_gone(w, t) {
            if svc.is_global() {
                continue; // a global task lives and dies with its node
            }
            let mut nt = new_task(w, svc, *slot, pinned, fence_ms);
            nt.message = format!("replaces {} ({why})", t.id);
            keep_template(&mut nt, t);
            replace_in_slot(w, svc, plan, slot_name, nt, Some(cur), false, why);
            continue;
        }
        if t.node_id.is_empty() && t.template_hash != svc.hash && plan.touch(&t.id) {
            // Not placed yet: it simply takes the new template.
            let mut u = t.clone();
            u.run_spec = tasks::run_spec(svc, *slot, fence_ms, w.has_pools, &w.volumes).encode();
            u.template_hash = svc.hash.clone();
            u.spec_version = svc.record.version;
            u.updated_at_ms = w.now;
            plan.push(
                vec![put_task(&u, cur.mod_revision)],
                format!("{}: pending task {} takes the new spec", svc.key(), t.id),
            );
        }
    }
    // Slots no longer wanted, and running tasks that are not their slot's current task.
    let prefix = format!("{SLOTS_PREFIX}{ns}/{name}/");
    for (key, (id, rev)) in w.slots_of(ns, name) {
        let Some(slot_name) = key.strip_prefix(prefix.as_bytes()) else { continue };
        let slot_name = String::from_utf8_lossy(slot_name).into_owned();
        if desired.contains_key(&slot_name) {
            continue;
        }
        let mut parts = vec![objects::cas_delete(key.clone(), *rev)];
        if let Some(t) = w.tasks.get(id)
            && tasks::desired_of(&t.obj) == TaskState::Running
        {
            if !plan.touch(id) {
                continue;
            }
            let why =
                if svc.record.deleting { "service deleted" } else { "slot removed (scaled down or node ineligible)" };
            parts.push(put_task(&shutdown(&t.obj, w.now, why), t.mod_revision));
        }
        plan.push(parts, format!("{}: slot {slot_name} removed", svc.key()));
    }
    let current: HashSet<&str> = w.slots_of(ns, name).map(|(_, (id, _))| id.as_str()).collect();
    let start_first = svc.spec.spec.update.order == UpdateOrder::StartFirst;
    for t in w.tasks_of(ns, name) {
        let o = &t.obj;
        if tasks::desired_of(o) != TaskState::Running {
            continue;
        }
        if current.contains(o.id.as_str()) || plan.touched.contains(&o.id) {
            continue;
        }
        if start_first && !tasks::is_terminal(tasks::state_of(o)) {
            // Start-first update: the old copy runs until the slot's new task is ready.
            let slot = tasks::slot_key(ns, name, &tasks::slot_name(o));
            let successor_ready = w.slots.get(&slot).and_then(|(id, _)| w.tasks.get(id)).is_some_and(|n| {
                tasks::is_ready(&n.obj, svc.has_health()) || tasks::is_terminal(tasks::state_of(&n.obj))
            });
            if !successor_ready && w.slots.contains_key(&slot) {
                continue;
            }
        }
        plan.touch(&o.id);
        plan.push(
            vec![put_task(&shutdown(o, w.now, "superseded in its slot"), t.mod_revision)],
            format!("{}: task {} superseded", svc.key(), o.id),
        );
    }
}

/// The restart of an ended task: its attempt number, restart window start and backoff, or None
/// when the policy's attempts are used up. A stop by the at-most-once fence is not the task's
/// failure: it neither counts as an attempt nor grows the backoff. (Counted, leader faults longer
/// than the fence timeout pushed the backoff past a minute and left the slot empty: found by the
/// chaos suite.)
fn next_attempt(t: &Task, restart: &berth_types::spec::RestartPolicy, now: i64) -> Option<(u32, i64, Duration)> {
    if berth_types::task::is_fence_stop(&t.message) {
        return Some((t.attempt.max(1), t.window_start_ms, restart.delay));
    }
    let window_ms = restart.window.as_millis() as i64;
    let in_window = window_ms == 0 || now - t.window_start_ms < window_ms;
    let attempt = if in_window { t.attempt + 1 } else { 1 };
    if let Some(max) = restart.max_attempts
        && attempt > max
    {
        return None;
    }
    let backoff =
        restart.delay.saturating_mul(1 << (attempt.saturating_sub(2)).min(6)).min(MAX_BACKOFF.max(restart.delay));
    Some((attempt, if in_window { t.window_start_ms } else { now }, backoff))
}

fn describe_end(t: &Task) -> String {
    match tasks::state_of(t) {
        TaskState::Failed if !t.message.is_empty() => format!("{} failed: {}", t.id, t.message),
        TaskState::Failed => format!("{} failed with exit code {}", t.id, t.exit_code),
        s => format!("{} ended ({})", t.id, s.as_str_name().trim_start_matches("TASK_STATE_").to_lowercase()),
    }
}

fn set_rollout(w: &World, svc: &Svc, plan: &mut Plan, state: RolloutState, message: String, failures: u32) {
    let mut r = svc.record.clone();
    let old = r.rollout.clone().unwrap_or_default();
    if old.state == state as i32 && old.message == message && old.failures == failures {
        return;
    }
    r.rollout = Some(Rollout {
        state: state as i32,
        message,
        started_at_ms: old.started_at_ms,
        updated_at_ms: w.now,
        failures,
    });
    let key = tasks::service_key(&r.namespace, &r.name);
    let mut txn = objects::txn_of(vec![objects::cas_put(key, svc.mod_revision, r.encode_to_vec())]);
    // An event when the state changes (not for a new message or failure count).
    if old.state != state as i32
        && let Some(kind) = crate::events::rollout_kind(state)
    {
        let message = r.rollout.as_ref().map(|ro| ro.message.clone()).unwrap_or_default();
        let e = crate::events::new(w.me, kind, "service", &r.namespace, &r.name, message);
        txn = crate::events::with(txn, &[e]);
    }
    plan.push_txn(txn, format!("{}: rollout {:?}", svc.key(), state), Tag::Other);
}

fn update(w: &World, svc: &Svc, fence_ms: u64, plan: &mut Plan) {
    let Some(rollout) = svc.record.rollout.clone() else { return };
    let state = RolloutState::try_from(rollout.state).unwrap_or(RolloutState::Unspecified);
    if svc.record.deleting || !matches!(state, RolloutState::Updating | RolloutState::RollingBack) {
        return;
    }
    let rolling_back = state == RolloutState::RollingBack;
    let desired = desired_slots(w, svc);
    let ns = &svc.record.namespace;
    let name = &svc.record.name;
    let current =
        |slot_name: &str| w.slots.get(&tasks::slot_key(ns, name, slot_name)).and_then(|(id, _)| w.tasks.get(id));
    let input = updater::RolloutInput {
        rolling_back,
        cfg: if rolling_back { &svc.spec.spec.rollback } else { &svc.spec.spec.update },
        hash: &svc.hash,
        has_health: svc.has_health(),
        started_at_ms: rollout.started_at_ms,
        last_batch_ms: rollout.updated_at_ms,
        now: w.now,
        slots: desired.keys().map(|s| (s.clone(), current(s).map(|t| &t.obj))).collect(),
        tasks: w.tasks_of(ns, name).map(|t| &t.obj).collect(),
    };
    let decision = updater::decide(&input);
    let failures = decision.failures;
    match decision.step {
        Step::Fail { rollback: true, why } => rollback(w, svc, plan, &why),
        Step::Fail { rollback: false, why } => {
            let what = if rolling_back { "rollback paused" } else { "paused" };
            set_rollout(w, svc, plan, RolloutState::Paused, format!("{what}: {why}"), failures);
        }
        Step::Done => {
            let (done, msg) = if rolling_back {
                (RolloutState::RolledBack, format!("rolled back to version {}", svc.record.version))
            } else {
                (RolloutState::Completed, format!("version {} is running on every slot", svc.record.version))
            };
            set_rollout(w, svc, plan, done, msg, failures);
        }
        Step::Wait => {
            // Keep the count `describe` shows current (tolerated failures); `updated_at_ms`
            // stays, as `delay` counts from the last batch.
            if failures != rollout.failures {
                let mut r = svc.record.clone();
                if let Some(ro) = r.rollout.as_mut() {
                    ro.failures = failures;
                }
                let key = tasks::service_key(ns, name);
                plan.push(
                    vec![objects::cas_put(key, svc.mod_revision, r.encode_to_vec())],
                    format!("{}: {failures} failed task(s) in the rollout", svc.key()),
                );
            }
        }
        Step::Batch(slots) => {
            let start_first = input.cfg.order == UpdateOrder::StartFirst;
            for slot_name in slots {
                let Some(cur) = current(&slot_name) else { continue };
                if plan.touched.contains(&cur.obj.id) {
                    continue;
                }
                let (slot, pinned) = desired[&slot_name].clone();
                let mut nt = new_task(w, svc, slot, &pinned, fence_ms);
                nt.message = format!("update to version {} (replaces {})", svc.record.version, cur.obj.id);
                replace_in_slot(w, svc, plan, &slot_name, nt, Some(cur), start_first, "updated");
            }
            // Record progress so that `delay` counts from this batch.
            let mut r = svc.record.clone();
            if let Some(ro) = r.rollout.as_mut() {
                ro.updated_at_ms = w.now;
                ro.failures = failures;
            }
            let key = tasks::service_key(ns, name);
            plan.push(
                vec![objects::cas_put(key, svc.mod_revision, r.encode_to_vec())],
                format!("{}: update batch", svc.key()),
            );
        }
    }
}

/// Puts the previous spec back as a new version and rolls the tasks back to it.
fn rollback(w: &World, svc: &Svc, plan: &mut Plan, why: &str) {
    let mut r = svc.record.clone();
    if r.previous_spec_json.is_empty() {
        set_rollout(
            w,
            svc,
            plan,
            RolloutState::Paused,
            format!("paused: {why}; there is no previous spec to roll back to"),
            0,
        );
        return;
    }
    std::mem::swap(&mut r.spec_json, &mut r.previous_spec_json);
    std::mem::swap(&mut r.file_versions, &mut r.previous_file_versions);
    r.previous_version = r.version;
    r.version += 1;
    r.updated_at_ms = w.now;
    r.rollout = Some(Rollout {
        state: RolloutState::RollingBack as i32,
        message: format!("rolling back: {why}"),
        started_at_ms: w.now,
        updated_at_ms: 0,
        failures: 0,
    });
    warn!(service = %svc.key(), "rolling back: {why}");
    let key = tasks::service_key(&r.namespace, &r.name);
    let e = crate::events::new(
        w.me,
        berth_types::event::ROLLBACK_STARTED,
        "service",
        &r.namespace,
        &r.name,
        format!("rolling back to the previous spec as version {}: {why}", r.version),
    );
    let txn =
        crate::events::with(objects::txn_of(vec![objects::cas_put(key, svc.mod_revision, r.encode_to_vec())]), &[e]);
    plan.push_txn(txn, format!("{}: rollback", svc.key()), Tag::Other);
}

/// The slot a task fills: namespace, service, slot number and, for a global service, its node.
fn slot_of(t: &Task) -> (&str, &str, u32, &str) {
    (&t.namespace, &t.service, t.slot, &t.pinned_node)
}

/// Slots whose previous task is still stopping on a node that is up, with that task's id: a
/// replacement there waits until it has ended, so the two never run at once (a stop-first
/// update's new task would otherwise race the old one for its published port and its data). A
/// task on a node that is down or gone does not hold its slot: the node-down grace has passed.
fn stopping_slots<'a>(
    tasks: impl Iterator<Item = &'a Task>,
    nodes: &HashMap<String, Node>,
) -> HashMap<(&'a str, &'a str, u32, &'a str), &'a str> {
    tasks
        .filter(|o| {
            tasks::desired_of(o) == TaskState::Shutdown
                && !tasks::is_terminal(tasks::state_of(o))
                && !o.node_id.is_empty()
                && nodes.get(&o.node_id).is_some_and(|n| n.status == NodeStatus::Ready as i32)
        })
        .map(|o| (slot_of(o), o.id.as_str()))
        .collect()
}

fn schedule(w: &World, plan: &mut Plan) {
    let svcs: HashMap<(String, String), &Svc> =
        w.services.values().map(|s| ((s.record.namespace.clone(), s.record.name.clone()), s)).collect();
    let svc_of = |t: &Task| svcs.get(&(t.namespace.clone(), t.service.clone())).copied();
    let stopping = stopping_slots(w.tasks.values().map(|t| &t.obj), &w.nodes);
    let held = crate::volumes::holders(w.tasks.values().map(|t| &t.obj), &w.nodes, &w.volumes);
    // Single-node-writer volumes an older pending task of this round asks for.
    let mut claimed: HashSet<String> = HashSet::new();
    let mut volume_needs: HashMap<String, Vec<berth_scheduler::VolumeNeed>> = HashMap::new();
    let mut pending: Vec<&objects::Versioned<Task>> = Vec::new();
    let waiting = |t: &objects::Versioned<Task>, reason: String, message: &str, plan: &mut Plan| {
        let o = &t.obj;
        if o.pending_reason != reason {
            let mut n = o.clone();
            n.pending_reason = reason;
            n.message = message.into();
            n.updated_at_ms = w.now;
            plan.touch(&n.id);
            plan.push(vec![put_task(&n, t.mod_revision)], String::new());
        }
    };
    // Oldest first, so the oldest task waiting for a single-node-writer volume gets it.
    let mut candidates: Vec<&objects::Versioned<Task>> =
        w.tasks.values().filter(|t| t.obj.node_id.is_empty()).collect();
    candidates.sort_by(|a, b| (a.obj.created_at_ms, &a.obj.id).cmp(&(b.obj.created_at_ms, &b.obj.id)));
    for t in candidates {
        let o = &t.obj;
        let ready = o.node_id.is_empty()
            && tasks::desired_of(o) == TaskState::Running
            && tasks::state_of(o) == TaskState::Pending
            && o.not_before_ms <= w.now
            && !plan.touched.contains(&o.id)
            && svc_of(o).is_some();
        if !ready {
            continue;
        }
        if let Some(old) = stopping.get(&slot_of(o)) {
            let reason = format!("waiting for the slot's previous task {old} to stop");
            waiting(t, reason, "waiting for the previous task to stop", plan);
            continue;
        }
        if crate::volumes::has_mounts(o) {
            match crate::volumes::needs(o, &w.volumes, &held, &w.nodes) {
                Err(reason) => {
                    waiting(t, reason, "waiting for its volumes", plan);
                    continue;
                }
                Ok((needs, exclusive)) => {
                    if exclusive.iter().any(|v| claimed.contains(v)) {
                        continue; // an older task asks for the same volume; the next round decides
                    }
                    claimed.extend(exclusive);
                    volume_needs.insert(o.id.clone(), needs);
                }
            }
        }
        pending.push(t);
    }
    if pending.is_empty() {
        return;
    }
    pending.sort_by(|a, b| (a.obj.created_at_ms, &a.obj.id).cmp(&(b.obj.created_at_ms, &b.obj.id)));
    let nodes: Vec<_> = w.nodes.values().map(tasks::node_info).collect();
    let placed: Vec<_> = w
        .tasks
        .values()
        .filter(|t| !t.obj.node_id.is_empty() && !tasks::is_terminal(tasks::state_of(&t.obj)))
        .map(|t| tasks::placed(&t.obj, svc_of(&t.obj), w.has_pools))
        .collect();
    // Spread services first, then binpack ones over what the first pass used.
    let strategy_of = |t: &Task| match svc_of(t).map(|s| s.spec.spec.placement.strategy) {
        Some(PlacementStrategy::Binpack) => Strategy::Binpack,
        _ => Strategy::Spread,
    };
    let mut placed = placed;
    let mut rooms = network_rooms(w);
    let mut placements = Vec::new();
    let mut unplaced = Vec::new();
    for strategy in [Strategy::Spread, Strategy::Binpack] {
        let group: Vec<&objects::Versioned<Task>> =
            pending.iter().copied().filter(|t| strategy_of(&t.obj) == strategy).collect();
        if group.is_empty() {
            continue;
        }
        let requests: Vec<_> = group
            .iter()
            .map(|t| {
                let mut r = tasks::task_request(&t.obj, svc_of(&t.obj).expect("filtered"), w.has_pools);
                r.volumes = volume_needs.get(&t.obj.id).cloned().unwrap_or_default();
                r
            })
            .collect();
        let mut scheduler = Scheduler::new(nodes.clone(), &placed, strategy).with_networks(&rooms);
        let (p, u) = scheduler.schedule(&requests);
        if strategy == Strategy::Spread {
            let ids: HashMap<&str, &Task> = group.iter().map(|t| (t.obj.id.as_str(), &t.obj)).collect();
            for pl in &p {
                if let Some(t) = ids.get(pl.task_id.as_str()) {
                    let mut on = (*t).clone();
                    on.node_id = pl.node_id.clone();
                    placed.push(tasks::placed(&on, svc_of(&on), w.has_pools));
                }
            }
        }
        // The binpack pass sees the blocks the spread pass took.
        let ids: HashMap<&str, &Task> = group.iter().map(|t| (t.obj.id.as_str(), &t.obj)).collect();
        for pl in &p {
            let Some(t) = ids.get(pl.task_id.as_str()) else { continue };
            for net in svc_of(t).map(|s| task_networks(w, s)).unwrap_or_default() {
                if let Some(room) = rooms.iter_mut().find(|r| r.network == net)
                    && !room.nodes_with_block.contains(&pl.node_id)
                {
                    room.nodes_with_block.push(pl.node_id.clone());
                    room.free_blocks = room.free_blocks.saturating_sub(1);
                }
            }
        }
        placements.extend(p);
        unplaced.extend(u);
    }
    let by_id: HashMap<&str, &objects::Versioned<Task>> = pending.iter().map(|t| (t.obj.id.as_str(), *t)).collect();
    let mut parts = Vec::new();
    // Placements that give a node its first block of a network share one transaction with the
    // network records they extend: a block and the tasks that need it commit together or not at all.
    let mut with_blocks = Vec::new();
    let mut grown: BTreeMap<String, NetworkRecord> = BTreeMap::new();
    let mut deferred = 0usize;
    let mut placed_with_blocks = 0u64;
    for p in placements {
        let Some(t) = by_id.get(p.task_id.as_str()) else { continue };
        // That one transaction is bounded: placements past what it holds wait for the next round
        // (a thousand nodes joining a network at once take about twenty rounds, not one
        // transaction too large to ever commit).
        let nets = svc_of(&t.obj).map(|s| task_networks(w, s)).unwrap_or_default();
        let new_nets: std::collections::BTreeSet<&String> = nets
            .iter()
            .filter(|n| w.networks.get(*n).is_some_and(|c| !c.obj.blocks.contains_key(&p.node_id)))
            .collect();
        if !new_nets.is_empty() {
            let records = grown.keys().filter(|k| !new_nets.contains(k)).count() + new_nets.len();
            if with_blocks.len() + 1 + records > max_block_txn_parts() {
                deferred += 1;
                continue;
            }
        }
        let mut u = t.obj.clone();
        u.node_id = p.node_id;
        u.state = TaskState::Assigned as i32;
        u.pending_reason.clear();
        u.message = "assigned".into();
        u.updated_at_ms = w.now;
        let mut needs_block = false;
        for net in svc_of(&u).map(|s| task_networks(w, s)).unwrap_or_default() {
            let Some(current) = w.networks.get(&net) else { continue };
            let rec = grown.entry(net.clone()).or_insert_with(|| current.obj.clone());
            if rec.blocks.contains_key(&u.node_id) {
                needs_block |= !current.obj.blocks.contains_key(&u.node_id);
                continue;
            }
            let Ok((subnet, prefix)) = crate::networks::record_blocks(rec) else { continue };
            let taken: std::collections::BTreeSet<u32> = rec.blocks.values().copied().collect();
            match crate::ipam::allocate_block(&net, subnet, prefix, &taken) {
                Ok(b) => {
                    rec.blocks.insert(u.node_id.clone(), b);
                    rec.updated_at_ms = w.now;
                    needs_block = true;
                }
                Err(e) => warn!("{e}"),
            }
        }
        plan.touch(&u.id);
        // New local volumes are pinned to the node in the placement's own transaction.
        let pins = crate::volumes::pin(&t.obj, &u.node_id, &w.volumes, w.now);
        if needs_block {
            with_blocks.push(put_task(&u, t.mod_revision));
            with_blocks.extend(pins);
            placed_with_blocks += 1;
        } else if !pins.is_empty() {
            let mut txn = vec![put_task(&u, t.mod_revision)];
            txn.extend(pins);
            plan.push_tagged(txn, format!("scheduler: {} placed with its new volumes", u.id), Tag::Placements(1));
        } else {
            parts.push((put_task(&u, t.mod_revision), Tag::Placements(1)));
        }
    }
    if !with_blocks.is_empty() {
        for (net, rec) in &grown {
            let current = &w.networks[net];
            if rec.blocks != current.obj.blocks {
                let key = crate::networks::network_key(&rec.namespace, &rec.name);
                with_blocks.push(objects::cas_put(key, current.mod_revision, rec.encode_to_vec()));
            }
        }
        plan.push_tagged(
            with_blocks,
            "scheduler: placements with new address blocks".into(),
            Tag::Placements(placed_with_blocks),
        );
    }
    if deferred > 0 {
        debug!(deferred, "placements that need new address blocks wait for the next round");
    }
    plan.unplaced = unplaced.len() + deferred;
    for u in unplaced {
        let Some(t) = by_id.get(u.task_id.as_str()) else { continue };
        if t.obj.pending_reason == u.reason {
            continue;
        }
        let mut n = t.obj.clone();
        n.pending_reason = u.reason;
        n.message = "no node can take it yet".into();
        n.updated_at_ms = w.now;
        plan.touch(&n.id);
        parts.push((put_task(&n, t.mod_revision), Tag::Other));
    }
    // Placements are independent: one compare each, packed many to a transaction would make one
    // conflict fail the lot, so each is its own transaction (the proposer batches them anyway).
    let count = parts.len();
    for (p, tag) in parts {
        plan.push_tagged(vec![p], String::new(), tag);
    }
    if count > 0 {
        plan.log.push(format!("scheduler: {count} placement decisions"));
    }
}

/// The routing mesh and the edge: every node whose agent attaches networks gets a block of each
/// network that a service's ingress ports reach its tasks through (the service's first
/// network), so that any node can forward a published port to any task; every edge node gets
/// one of each routed service's first network, so its router reaches the tasks. One
/// conditional write per network that has such nodes without a block; a lost race (a placement
/// growing the same record) is retried by the next round. Blocks go back when a node is
/// removed, like any other.
fn ingress_blocks(w: &World, plan: &mut Plan) {
    if !w.has_pools {
        return;
    }
    let mut capable: Vec<&Node> = w.nodes.values().filter(|n| n.networks).collect();
    capable.sort_by(|a, b| a.id.cmp(&b.id));
    let mut wants: BTreeMap<String, Vec<&Node>> = BTreeMap::new();
    for s in w.services.values().filter(|s| !s.record.deleting) {
        let Some(net) = task_networks(w, s).into_iter().next() else { continue };
        if s.has_ingress() {
            wants.entry(net.clone()).or_default().extend(capable.iter().copied());
        }
        if w.routed.contains(&s.key()) {
            wants.entry(net).or_default().extend(capable.iter().copied().filter(|n| crate::routes::is_edge(n)));
        }
    }
    for (net, mut nodes) in wants {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|a, b| a.id == b.id);
        let Some(current) = w.networks.get(&net).filter(|c| !c.obj.deleting) else { continue };
        let Ok((subnet, prefix)) = crate::networks::record_blocks(&current.obj) else { continue };
        let mut rec = current.obj.clone();
        let mut added = 0;
        for n in &nodes {
            if rec.blocks.contains_key(&n.id) {
                continue;
            }
            let taken: std::collections::BTreeSet<u32> = rec.blocks.values().copied().collect();
            match crate::ipam::allocate_block(&net, subnet, prefix, &taken) {
                Ok(b) => {
                    rec.blocks.insert(n.id.clone(), b);
                    added += 1;
                }
                Err(e) => {
                    warn_every_minute(&format!(
                        "the routing mesh or edge cannot reach node {} ({}): {e}; give network {net} a larger \
                         subnet or smaller blocks (spec.block_prefix)",
                        n.name, n.id
                    ));
                    break;
                }
            }
        }
        if added > 0 {
            rec.updated_at_ms = w.now;
            let key = crate::networks::network_key(&rec.namespace, &rec.name);
            plan.push(
                vec![objects::cas_put(key, current.mod_revision, rec.encode_to_vec())],
                format!("routing mesh and edge: {added} nodes get a block of {net}"),
            );
        }
    }
}

/// Logs `msg` as a warning at most once a minute (a controller round runs every second).
fn warn_every_minute(msg: &str) {
    static LAST: objects::Throttle = objects::Throttle::new();
    if LAST.ready(60_000) {
        warn!("{msg}");
    }
}

/// The networks (`namespace/name`) a service's tasks join: none on a cluster without pools.
fn task_networks(w: &World, svc: &Svc) -> Vec<String> {
    if !w.has_pools {
        return Vec::new();
    }
    crate::networks::service_networks(&svc.spec).into_iter().map(|n| format!("{}/{n}", svc.record.namespace)).collect()
}

/// The most parts (a compare and an operation each) of the transaction that commits placements
/// with the address blocks they need: half the store's operation limit, less some room.
fn max_block_txn_parts() -> usize {
    (berth_types::Limits::default().max_txn_ops / 2).saturating_sub(4).max(2)
}

/// Every network's blocks, for the scheduler.
fn network_rooms(w: &World) -> Vec<NetworkRoom> {
    w.networks
        .iter()
        .filter(|(_, n)| !n.obj.deleting)
        .map(|(key, n)| {
            let total = crate::networks::record_blocks(&n.obj).map_or(0, |(s, p)| block_count(s, p));
            NetworkRoom {
                network: key.clone(),
                nodes_with_block: n.obj.blocks.keys().cloned().collect(),
                free_blocks: total.saturating_sub(n.obj.blocks.len() as u32),
            }
        })
        .collect()
}

fn reap(w: &World, plan: &mut Plan) {
    let svcs: HashMap<(&str, &str), &Svc> =
        w.services.values().map(|s| ((s.record.namespace.as_str(), s.record.name.as_str()), s)).collect();
    // Ended tasks per slot, newest first.
    let mut ended: HashMap<(String, String, String), Vec<&objects::Versioned<Task>>> = HashMap::new();
    let mut live_per_service: HashMap<(&str, &str), usize> = HashMap::new();
    for t in w.tasks.values() {
        let o = &t.obj;
        let gone = tasks::desired_of(o) == TaskState::Shutdown
            && (tasks::is_terminal(tasks::state_of(o))
                || matches!(node_gone(w, o), Some(r) if r != "its node is draining"));
        let svc = svcs.get(&(o.namespace.as_str(), o.service.as_str()));
        if gone {
            if svc.is_none() {
                if plan.touch(&o.id) {
                    plan.push(vec![objects::cas_delete(tasks::task_key(&o.id), t.mod_revision)], String::new());
                }
                continue;
            }
            ended.entry((o.namespace.clone(), o.service.clone(), tasks::slot_name(o))).or_default().push(t);
        } else {
            *live_per_service.entry((o.namespace.as_str(), o.service.as_str())).or_default() += 1;
        }
    }
    for (_, mut list) in ended {
        if list.len() <= KEEP_ENDED_PER_SLOT {
            continue;
        }
        list.sort_by_key(|t| std::cmp::Reverse(t.obj.created_at_ms));
        for t in list.into_iter().skip(KEEP_ENDED_PER_SLOT) {
            if plan.touch(&t.obj.id) {
                plan.push(vec![objects::cas_delete(tasks::task_key(&t.obj.id), t.mod_revision)], String::new());
            }
        }
    }
    // A deleted service goes once none of its tasks may still run; its ended tasks go with it.
    for svc in w.services.values() {
        let key = (svc.record.namespace.as_str(), svc.record.name.as_str());
        if !svc.record.deleting || live_per_service.get(&key).copied().unwrap_or(0) > 0 {
            continue;
        }
        if w.slots_of(key.0, key.1).next().is_some() {
            continue; // the orchestrator removes the slots first
        }
        let mut parts = vec![objects::cas_delete(tasks::service_key(key.0, key.1), svc.mod_revision)];
        for t in w.tasks_of(key.0, key.1) {
            if parts.len() < 60 && plan.touch(&t.obj.id) {
                parts.push(objects::cas_delete(tasks::task_key(&t.obj.id), t.mod_revision));
            }
        }
        info!(service = %svc.key(), "service removed");
        plan.push(parts, format!("{}: removed", svc.key()));
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;

    // A stop-first replacement waits while the slot's previous task is still stopping on a node
    // that is up; not once that task has ended, nor when its node is down, nor for another slot.
    #[test]
    fn a_replacement_waits_for_its_slots_previous_task_to_stop() {
        let node = |id: &str, status: NodeStatus| {
            (id.to_string(), Node { id: id.into(), status: status as i32, ..Default::default() })
        };
        let nodes = HashMap::from([node("up", NodeStatus::Ready), node("gone", NodeStatus::Down)]);
        let task = |id: &str, slot: u32, node: &str, desired: TaskState, state: TaskState| Task {
            id: id.into(),
            namespace: "default".into(),
            service: "web".into(),
            slot,
            node_id: node.into(),
            desired_state: desired as i32,
            state: state as i32,
            ..Default::default()
        };
        use TaskState::*;
        let all = [
            task("old-1", 1, "up", Shutdown, Running),
            task("new-1", 1, "", Running, Pending),
            task("old-2", 2, "up", Shutdown, Shutdown),
            task("old-3", 3, "gone", Shutdown, Running),
            task("run-4", 4, "up", Running, Running),
        ];
        let held = stopping_slots(all.iter(), &nodes);
        assert_eq!(held.get(&("default", "web", 1, "")), Some(&"old-1"));
        assert_eq!(held.len(), 1, "{held:?}");
    }

    #[test]
    fn fence_stops_do_not_grow_the_backoff_but_failures_do() {
        let policy = berth_types::spec::RestartPolicy::default();
        let mut t = Task { attempt: 5, window_start_ms: 1_000, ..Default::default() };
        t.message = format!(
            "{} stopped: no contact with the leader for 5001 ms (at-most-once)",
            berth_types::task::FENCE_STOP_PREFIX
        );
        let (attempt, start, backoff) = next_attempt(&t, &policy, 2_000).expect("restarted");
        assert_eq!((attempt, start, backoff), (5, 1_000, policy.delay), "a fence stop is not an attempt");
        t.message = "exited with code 1".into();
        let (attempt, _, backoff) = next_attempt(&t, &policy, 2_000).expect("restarted");
        assert_eq!(attempt, 6);
        assert!(backoff > policy.delay, "a failure grows the backoff");
    }
}
