//! The updater's decisions, pure: one service's rollout, slots and tasks in, the next step out
//! ([`decide`]). `controller::update` reads the replicated state and turns the step into writes;
//! nothing here reads a clock or the store, so the rules are unit-tested below (SwarmKit's updater
//! tests are the model).
//!
//! Monitoring (`update.monitor` during an update, `rollback.monitor` during a rollback): a task of
//! the rollout's template that ends on its own (fails, is stopped as unhealthy, or exits) before it
//! ever turned ready, or within `monitor` of turning ready (running, and healthy when the service
//! has a health check), is a failed update task and counts against `max_failure_ratio`. A shutdown
//! the masters asked for, or a stop by the at-most-once fence, is not a failure. The rollout is
//! complete only once every slot's task has stayed ready for `monitor`. The times come from the
//! task record (`running_at_ms`, `healthy_at_ms`, `ended_at_ms`, stamped by the leader that
//! committed the agent's report), so a new leader resumes the watch where the old one stopped.

use std::time::Duration;

use berth_api::pb::{Task, agent::TaskState};
use berth_types::spec::{self, FailureAction, UpdateConfig};

use crate::tasks;

/// What the updater knows of one service whose rollout is in progress.
pub(crate) struct RolloutInput<'a> {
    /// Rolling back (the `rollback` section applies) rather than updating (`update`).
    pub rolling_back: bool,
    /// `spec.update` or `spec.rollback`, per `rolling_back`.
    pub cfg: &'a UpdateConfig,
    /// The template hash of the service's current spec: the tasks rolled out.
    pub hash: &'a str,
    pub has_health: bool,
    /// When the rollout started: tasks created earlier are not its tasks.
    pub started_at_ms: i64,
    /// When the last batch started (`delay` counts from it).
    pub last_batch_ms: i64,
    pub now: i64,
    /// The slots the service wants, each with its current task (None: none yet).
    pub slots: Vec<(String, Option<&'a Task>)>,
    /// Every task of the service (current, superseded and ended).
    pub tasks: Vec<&'a Task>,
}

/// The next step of a rollout.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    /// Too many failed tasks: pause, or roll back to the previous spec (`rollback`). A rollback
    /// is never rolled back: its `failure_action: rollback` pauses.
    Fail { rollback: bool, why: String },
    /// Every slot runs the template, and each task has stayed ready for `monitor` (or ended).
    Done,
    /// Give these slots a task of the template (in this order).
    Batch(Vec<String>),
    /// Nothing to do this round: tasks are starting, `delay` runs, or new tasks are monitored.
    Wait,
}

/// A step, and the failed tasks of the rollout counted so far.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    pub step: Step,
    pub failures: u32,
}

/// Where one slot stands in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Its task runs another template.
    Stale,
    /// No task yet, or the template's task is not ready yet.
    Starting,
    /// Ready for less than `monitor`.
    Monitored,
    /// Ready for `monitor`, or ended (the orchestrator restarts it or not; a failure inside
    /// `monitor` was counted).
    Settled,
}

/// When `t` turned ready: first running, or first healthy when the service has a health check.
fn ready_at(t: &Task, has_health: bool) -> Option<i64> {
    let at = if has_health { t.healthy_at_ms } else { t.running_at_ms };
    (at > 0).then_some(at)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn slot_state(cur: Option<&Task>, input: &RolloutInput<'_>) -> SlotState {
    let Some(t) = cur else { return SlotState::Starting };
    if t.template_hash != input.hash {
        return SlotState::Stale;
    }
    if tasks::is_terminal(tasks::state_of(t)) {
        return SlotState::Settled;
    }
    if !tasks::is_ready(t, input.has_health) {
        return SlotState::Starting;
    }
    // A record from a master that predates the stamps: its last change is the best estimate.
    let since = ready_at(t, input.has_health).unwrap_or(t.updated_at_ms);
    if input.now.saturating_sub(since) < millis(input.cfg.monitor) { SlotState::Monitored } else { SlotState::Settled }
}

/// Whether `t` (a task of the rollout) failed while watched: it ended on its own before it
/// turned ready, or at most `monitor` after.
pub(crate) fn failed_while_monitored(t: &Task, has_health: bool, monitor: Duration) -> bool {
    let state = tasks::state_of(t);
    // SHUTDOWN is the masters' own stop; the fence's stop is no fault of the task's.
    if !matches!(state, TaskState::Failed | TaskState::Complete) || berth_types::task::is_fence_stop(&t.message) {
        return false;
    }
    let Some(ready) = ready_at(t, has_health) else { return true };
    let ended = if t.ended_at_ms > 0 { t.ended_at_ms } else { t.updated_at_ms };
    ended.saturating_sub(ready) <= millis(monitor)
}

/// The next step of the rollout described by `input`.
pub(crate) fn decide(input: &RolloutInput<'_>) -> Decision {
    let cfg = input.cfg;
    let mut failed: Vec<&Task> = input
        .tasks
        .iter()
        .copied()
        .filter(|t| {
            t.template_hash == input.hash
                && t.created_at_ms >= input.started_at_ms
                && failed_while_monitored(t, input.has_health, cfg.monitor)
        })
        .collect();
    let failures = failed.len() as u32;
    let total = input.slots.len().max(1) as f64;
    if failures > 0 && f64::from(failures) / total > cfg.max_failure_ratio {
        failed.sort_by_key(|t| (t.ended_at_ms.max(t.updated_at_ms), t.id.clone()));
        let last = failed.last().expect("failures > 0");
        let why = format!(
            "{failures} task(s) of the new spec failed within monitor {} (max_failure_ratio {}); last: {}",
            spec::format_duration(cfg.monitor),
            cfg.max_failure_ratio,
            describe_failure(last, input.has_health),
        );
        let step = match cfg.failure_action {
            FailureAction::Pause => Some(Step::Fail { rollback: false, why }),
            FailureAction::Rollback => Some(Step::Fail { rollback: !input.rolling_back, why }),
            FailureAction::Continue => None,
        };
        if let Some(step) = step {
            return Decision { step, failures };
        }
    }
    let mut stale = Vec::new();
    let (mut starting, mut monitored) = (0usize, 0usize);
    for (slot, cur) in &input.slots {
        match slot_state(*cur, input) {
            SlotState::Stale => stale.push(slot.clone()),
            SlotState::Starting => starting += 1,
            SlotState::Monitored => monitored += 1,
            SlotState::Settled => {}
        }
    }
    let step = if stale.is_empty() && starting == 0 && monitored == 0 {
        Step::Done
    } else {
        let parallelism = if cfg.parallelism == 0 { usize::MAX } else { cfg.parallelism as usize };
        if starting >= parallelism
            || stale.is_empty()
            || (starting == 0 && input.now.saturating_sub(input.last_batch_ms) < millis(cfg.delay))
        {
            // Full, only monitoring left, or `delay` since the last batch still running.
            Step::Wait
        } else {
            stale.sort_by_key(|s| s.parse::<u64>().unwrap_or(u64::MAX));
            stale.truncate(parallelism - starting);
            Step::Batch(stale)
        }
    };
    Decision { step, failures }
}

fn describe_failure(t: &Task, has_health: bool) -> String {
    let what = if t.message.is_empty() { format!("exit code {}", t.exit_code) } else { t.message.clone() };
    let ended = if t.ended_at_ms > 0 { t.ended_at_ms } else { t.updated_at_ms };
    if let Some(ready) = ready_at(t, has_health) {
        format!("{} ended {:.1}s after turning ready ({what})", t.id, (ended - ready).max(0) as f64 / 1000.0)
    } else {
        format!("{} ended before turning ready ({what})", t.id)
    }
}

#[cfg(test)]
mod tests {
    use berth_api::pb::agent::TaskHealth;

    use super::*;

    const NEW: &str = "new";
    const OLD: &str = "old";
    const START: i64 = 1_000_000;

    fn cfg(monitor_s: u64, action: FailureAction) -> UpdateConfig {
        UpdateConfig {
            monitor: Duration::from_secs(monitor_s),
            failure_action: action,
            ..UpdateConfig::update_default()
        }
    }

    /// A task of `hash` in `slot`, created when the rollout started.
    fn task(id: &str, slot: u32, hash: &str) -> Task {
        Task {
            id: id.into(),
            slot,
            template_hash: hash.into(),
            desired_state: TaskState::Running as i32,
            state: TaskState::Running as i32,
            created_at_ms: START,
            updated_at_ms: START,
            ..Default::default()
        }
    }

    /// Running and healthy since `at`.
    fn healthy(mut t: Task, at: i64) -> Task {
        t.running_at_ms = at - 500;
        t.healthy_at_ms = at;
        t.health = TaskHealth::Healthy as i32;
        t.updated_at_ms = at;
        t
    }

    fn ended(mut t: Task, state: TaskState, at: i64) -> Task {
        t.state = state as i32;
        t.ended_at_ms = at;
        t.updated_at_ms = at;
        t.message = "exited with code 1".into();
        t
    }

    /// Slot `i` (from 1) holds `current[i - 1]`; `tasks` adds ended predecessors.
    fn decide_at(now: i64, cfg: &UpdateConfig, rolling_back: bool, current: &[Task], extra: &[Task]) -> Decision {
        let input = RolloutInput {
            rolling_back,
            cfg,
            hash: NEW,
            has_health: true,
            started_at_ms: START,
            last_batch_ms: START,
            now,
            slots: current.iter().enumerate().map(|(i, t)| ((i + 1).to_string(), Some(t))).collect(),
            tasks: current.iter().chain(extra).collect(),
        };
        decide(&input)
    }

    #[test]
    fn a_task_that_fails_inside_monitor_counts_and_triggers_the_failure_action() {
        let c = cfg(10, FailureAction::Rollback);
        let t0 = START + 2_000;
        // Healthy at t0, died 3 s later; its slot already has a replacement starting.
        let dead = ended(healthy(task("a.1", 1, NEW), t0), TaskState::Failed, t0 + 3_000);
        let current = [task("a.2", 1, NEW), task("b", 2, OLD)];
        let d = decide_at(t0 + 3_100, &c, false, &current, &[dead]);
        assert_eq!(d.failures, 1);
        let Step::Fail { rollback: true, why } = d.step else { panic!("{d:?}") };
        assert!(why.contains("a.1 ended 3.0s after turning ready") && why.contains("monitor 10s"), "{why}");
        // Exiting with code 0 is an early end too.
        let done = ended(healthy(task("a.1", 1, NEW), t0), TaskState::Complete, t0 + 3_000);
        assert_eq!(decide_at(t0 + 3_100, &c, false, &current, &[done]).failures, 1);
        // pause pauses, continue carries on (and keeps counting).
        let dead = ended(healthy(task("a.1", 1, NEW), t0), TaskState::Failed, t0 + 3_000);
        let d = decide_at(t0 + 3_100, &cfg(10, FailureAction::Pause), false, &current, std::slice::from_ref(&dead));
        assert!(matches!(d.step, Step::Fail { rollback: false, .. }), "{d:?}");
        let d = decide_at(t0 + 3_100, &cfg(10, FailureAction::Continue), false, &current, &[dead]);
        assert_eq!((d.failures, d.step), (1, Step::Wait), "slot 1 is still starting");
    }

    #[test]
    fn a_task_that_fails_after_monitor_does_not_count() {
        let c = cfg(10, FailureAction::Rollback);
        let t0 = START + 2_000;
        let dead = ended(healthy(task("a.1", 1, NEW), t0), TaskState::Failed, t0 + 10_001);
        let current = [task("a.2", 1, NEW), task("b", 2, OLD)];
        let d = decide_at(t0 + 20_000, &c, false, &current, &[dead]);
        assert_eq!((d.failures, d.step), (0, Step::Wait));
        // At exactly `monitor` it still counts (as in SwarmKit: `<=`).
        let dead = ended(healthy(task("a.1", 1, NEW), t0), TaskState::Failed, t0 + 10_000);
        assert_eq!(decide_at(t0 + 20_000, &c, false, &current, &[dead]).failures, 1);
    }

    #[test]
    fn a_task_that_never_turned_ready_counts_whatever_the_monitor() {
        let c = cfg(0, FailureAction::Pause);
        // Running, never healthy, then stopped as unhealthy.
        let mut t = task("a.1", 1, NEW);
        t.running_at_ms = START + 100;
        let mut t = ended(t, TaskState::Failed, START + 60_000);
        t.health = TaskHealth::Unhealthy as i32;
        let d = decide_at(START + 60_000, &c, false, &[task("a.2", 1, NEW)], &[t]);
        assert_eq!(d.failures, 1);
        assert!(matches!(d.step, Step::Fail { rollback: false, ref why } if why.contains("before turning ready")));
    }

    #[test]
    fn shutdowns_fences_older_tasks_and_other_templates_do_not_count() {
        let c = cfg(10, FailureAction::Pause);
        let t0 = START + 2_000;
        let stopped = ended(healthy(task("s", 1, NEW), t0), TaskState::Shutdown, t0 + 1_000);
        let mut fenced = ended(healthy(task("f", 1, NEW), t0), TaskState::Failed, t0 + 1_000);
        fenced.message = format!("{} stopped: no contact with the leader", berth_types::task::FENCE_STOP_PREFIX);
        let old = ended(healthy(task("o", 1, OLD), t0), TaskState::Failed, t0 + 1_000);
        let mut before = ended(healthy(task("b", 1, NEW), t0), TaskState::Failed, t0 + 1_000);
        before.created_at_ms = START - 1;
        let current = [healthy(task("a", 1, NEW), t0)];
        let d = decide_at(t0 + 2_000, &c, false, &current, &[stopped, fenced, old, before]);
        assert_eq!((d.failures, d.step), (0, Step::Wait), "slot 1 is being monitored");
    }

    #[test]
    fn the_rollout_completes_only_after_the_last_tasks_stayed_up_for_monitor() {
        let c = cfg(10, FailureAction::Rollback);
        let t0 = START + 2_000;
        let current = [healthy(task("a", 1, NEW), START + 500), healthy(task("b", 2, NEW), t0)];
        assert_eq!(decide_at(t0 + 9_999, &c, false, &current, &[]).step, Step::Wait);
        assert_eq!(decide_at(t0 + 10_000, &c, false, &current, &[]).step, Step::Done);
        // Without a health check, running is ready.
        let mut plain = task("p", 1, NEW);
        plain.running_at_ms = t0;
        let input = |now| RolloutInput {
            rolling_back: false,
            cfg: &c,
            hash: NEW,
            has_health: false,
            started_at_ms: START,
            last_batch_ms: START,
            now,
            slots: vec![("1".into(), Some(&plain))],
            tasks: vec![&plain],
        };
        assert_eq!(decide(&input(t0 + 9_999)).step, Step::Wait);
        assert_eq!(decide(&input(t0 + 10_000)).step, Step::Done);
        // A record without stamps (written by an older master): its last change stands in.
        let mut legacy = healthy(task("l", 1, NEW), t0);
        legacy.healthy_at_ms = 0;
        legacy.running_at_ms = 0;
        assert_eq!(decide_at(t0 + 9_999, &c, false, std::slice::from_ref(&legacy), &[]).step, Step::Wait);
        assert_eq!(decide_at(t0 + 10_000, &c, false, &[legacy], &[]).step, Step::Done);
    }

    #[test]
    fn monitored_tasks_do_not_hold_the_next_batch() {
        let c = UpdateConfig { parallelism: 1, ..cfg(10, FailureAction::Rollback) };
        let t0 = START + 2_000;
        let current = [healthy(task("a", 1, NEW), t0), task("b", 2, OLD), task("c", 10, OLD)];
        assert_eq!(decide_at(t0 + 100, &c, false, &current, &[]).step, Step::Batch(vec!["2".into()]));
        // A starting task fills the batch.
        let current = [task("a", 1, NEW), task("b", 2, OLD)];
        assert_eq!(decide_at(t0 + 100, &c, false, &current, &[]).step, Step::Wait);
        // `delay` counts from the last batch.
        let slow = UpdateConfig { delay: Duration::from_secs(5), ..c.clone() };
        let current = [healthy(task("a", 1, NEW), t0), task("b", 2, OLD)];
        assert_eq!(decide_at(START + 4_999, &slow, false, &current, &[]).step, Step::Wait);
        assert_eq!(decide_at(START + 5_000, &slow, false, &current, &[]).step, Step::Batch(vec!["2".into()]));
    }

    #[test]
    fn a_rollback_is_monitored_with_its_own_settings_and_never_rolled_back() {
        // rollback.monitor 20s: a task that dies 15 s after turning healthy counts.
        let c = cfg(20, FailureAction::Rollback);
        let t0 = START + 2_000;
        let dead = ended(healthy(task("a.1", 1, NEW), t0), TaskState::Failed, t0 + 15_000);
        let current = [task("a.2", 1, NEW)];
        let d = decide_at(t0 + 15_100, &c, true, &current, std::slice::from_ref(&dead));
        assert_eq!(d.failures, 1);
        assert!(matches!(d.step, Step::Fail { rollback: false, .. }), "a rollback pauses instead: {d:?}");
        // With a 10s monitor it would not have counted.
        let d = decide_at(t0 + 15_100, &cfg(10, FailureAction::Pause), true, &current, &[dead]);
        assert_eq!((d.failures, d.step), (0, Step::Wait));
    }

    #[test]
    fn max_failure_ratio_tolerates_some_failures() {
        let c = UpdateConfig { max_failure_ratio: 0.5, ..cfg(10, FailureAction::Pause) };
        let t0 = START + 2_000;
        let dead = ended(healthy(task("a.1", 1, NEW), t0), TaskState::Failed, t0 + 1_000);
        let current = [task("a.2", 1, NEW), task("b", 2, OLD)];
        let d = decide_at(t0 + 1_100, &c, false, &current, std::slice::from_ref(&dead));
        assert_eq!((d.failures, d.step), (1, Step::Wait), "1 of 2 is not over 0.5");
        let mut dead2 = dead.clone();
        dead2.id = "a.0".into();
        let d = decide_at(t0 + 1_100, &c, false, &current, &[dead, dead2]);
        assert!(matches!(d.step, Step::Fail { .. }), "2 of 2 is: {d:?}");
    }
}
