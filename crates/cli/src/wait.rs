//! `--wait` of `berth delete service` and `berth scale`: follow the tasks of services until they
//! reach a goal, with progress as `apply --wait` shows it (bars on a terminal, else a line per
//! change).
//!
//! A task has *ended* when its process is gone: its state is complete, failed, shutdown or
//! orphaned, or it never reached a node, or its node is down or removed (the master counts such
//! tasks as gone too; what still runs on a dead host cannot be seen from here).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use anyhow::{Result, bail};
use berth_api::pb::{self, ServiceView, Task, agent::TaskState};
use tonic::{Code, Status};

use crate::{
    client::{Call, Client},
    cmd_services::{
        POLL_INTERVAL, TaskOut, get_service, is_transient, key, node_names, out_line, rollout_state_name, status_text,
    },
    progress::{self, Bars},
};

/// Wakes a wait loop when something a service view shows changes: the master's `WatchServices`
/// stream (which also fires on its tasks' changes), so that a wait sees a change as soon as it
/// is committed rather than at the next poll. Without the stream (a master that refuses it, or a
/// broken one) it falls back to polling every [`POLL_INTERVAL`].
pub(crate) struct Changes {
    stream: Option<tonic::Streaming<pb::ServiceEvent>>,
    last_wake: tokio::time::Instant,
}

/// How long a wait sleeps without news from the stream before it reads again anyway (a node
/// going down changes what a wait counts as ended without a service event).
const QUIET_RECHECK: Duration = Duration::from_secs(2);
/// The least time between two reads of a burst of changes.
const MIN_RECHECK: Duration = Duration::from_millis(50);

impl Changes {
    /// Watches the services of `namespace` ("" for all the caller may see).
    pub(crate) async fn open(client: &Client, namespace: &str) -> Changes {
        let req = pb::WatchServicesRequest { namespace: namespace.to_string() };
        let stream = client
            .call(Call::Idempotent, |ch| {
                let req = req.clone();
                async move { Client::control(ch).watch_services(req).await.map(|r| r.into_inner()) }
            })
            .await
            .ok();
        Changes { stream, last_wake: tokio::time::Instant::now() }
    }

    /// Returns at the next change, after [`QUIET_RECHECK`] without one, or at `deadline`.
    pub(crate) async fn next(&mut self, deadline: tokio::time::Instant) {
        let now = tokio::time::Instant::now();
        let Some(stream) = self.stream.as_mut() else {
            tokio::time::sleep_until(deadline.min(now + POLL_INTERVAL)).await;
            return;
        };
        // A burst of events is one wake-up.
        tokio::time::sleep_until(deadline.min(self.last_wake + MIN_RECHECK)).await;
        let (mut changed, mut broken) = (false, false);
        loop {
            match futures::FutureExt::now_or_never(stream.message()) {
                Some(Ok(Some(_))) => {
                    changed = true;
                    continue;
                }
                Some(_) => broken = true,
                None => {}
            }
            break;
        }
        if !changed && !broken {
            tokio::select! {
                r = stream.message() => broken = !matches!(r, Ok(Some(_))),
                _ = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + QUIET_RECHECK)) => {}
            }
        }
        if broken {
            // Polling from here on; the caller's reads report what is wrong.
            self.stream = None;
        }
        self.last_wake = tokio::time::Instant::now();
    }
}

/// What a service's tasks must reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goal {
    /// The service is gone and every task of it has ended.
    Deleted,
    /// `replicas` tasks of the current version run (and are healthy where the service has a
    /// health check), and every other task has ended.
    Scaled { replicas: u32 },
}

#[derive(Clone, Debug)]
pub struct Target {
    pub namespace: String,
    pub name: String,
    pub goal: Goal,
}

/// Where a target stands after one look.
#[derive(Debug, PartialEq, Eq)]
pub struct Look {
    /// The progress line, e.g. `web: 1 of 3 tasks ended (deleting)`.
    pub line: String,
    /// Bar position and length.
    pub done: u64,
    pub total: u64,
    pub state: State,
}

#[derive(Debug, PartialEq, Eq)]
pub enum State {
    Waiting,
    Done,
    Failed(String),
}

/// Whether `t`'s process is gone (see the module doc). `gone_nodes`: nodes down or removed.
pub fn has_ended(t: &Task, gone_nodes: &HashSet<String>) -> bool {
    let state = TaskState::try_from(t.state).unwrap_or(TaskState::Unspecified);
    let desired = TaskState::try_from(t.desired_state).unwrap_or(TaskState::Unspecified);
    matches!(state, TaskState::Complete | TaskState::Failed | TaskState::Shutdown | TaskState::Orphaned)
        || (t.node_id.is_empty() && desired != TaskState::Running)
        || (!t.node_id.is_empty() && gone_nodes.contains(&t.node_id))
}

/// Evaluates `target` from the service (None: it no longer exists) and its tasks, ended ones
/// included.
pub fn look(
    label: &str,
    target: &Target,
    service: Option<&ServiceView>,
    tasks: &[Task],
    gone_nodes: &HashSet<String>,
) -> Look {
    let live: Vec<&Task> = tasks.iter().filter(|t| !has_ended(t, gone_nodes)).collect();
    let total = tasks.len() as u64;
    let ended = total - live.len() as u64;
    let record = service.and_then(|v| v.record.as_ref());
    match &target.goal {
        Goal::Deleted => {
            if let Some(r) = record
                && !r.deleting
            {
                let state = State::Failed(format!(
                    "the service exists again (version {}, created again by `berth apply`?)",
                    r.version
                ));
                return Look { line: format!("{label}: not deleted"), done: ended, total, state };
            }
            let line = match (record.is_some(), live.len()) {
                (true, _) => format!("{label}: {ended} of {total} tasks ended (deleting)"),
                (false, 0) => format!("{label}: deleted, every task ended"),
                (false, n) => format!("{label}: service removed, {n} tasks still running"),
            };
            let state = if record.is_none() && live.is_empty() { State::Done } else { State::Waiting };
            Look { line, done: ended, total, state }
        }
        Goal::Scaled { replicas } => {
            let (Some(v), Some(r)) = (service, record) else {
                return Look {
                    line: format!("{label}: deleted"),
                    done: 0,
                    total: u64::from(*replicas),
                    state: State::Failed("the service was deleted".into()),
                };
            };
            let n = u64::from(*replicas);
            if r.deleting {
                let state = State::Failed("the service is being deleted".into());
                return Look { line: format!("{label}: deleting"), done: 0, total: n, state };
            }
            if v.desired != *replicas {
                let state = State::Failed(format!("the service was scaled again, to {} replicas", v.desired));
                return Look {
                    line: format!("{label}: {}/{} running", v.running, v.desired),
                    done: 0,
                    total: n,
                    state,
                };
            }
            let stopping = live.iter().filter(|t| t.desired_state != TaskState::Running as i32).count();
            let mut line = format!("{label}: {}/{replicas} running", v.running);
            if v.pending > 0 {
                line.push_str(&format!(", {} pending", v.pending));
            }
            if stopping > 0 {
                line.push_str(&format!(", {stopping} stopping"));
            }
            let rollout = r.rollout.as_ref().map_or(0, |ro| ro.state);
            line.push_str(&format!(" ({})", rollout_state_name(rollout)));
            // An oci task pulling its image (or loading the cluster's copy) says how far it got.
            if let Some(pull) = live.iter().filter(|t| t.state == TaskState::Starting as i32).find_map(|t| {
                (t.message.starts_with("pulling image") || t.message.starts_with("loading image"))
                    .then_some(t.message.as_str())
            }) {
                line.push_str(&format!("; {pull}"));
            }
            let state = if v.running == *replicas && live.len() as u64 == n { State::Done } else { State::Waiting };
            Look { line, done: u64::from(v.running).min(n), total: n, state }
        }
    }
}

/// The service and every task of it (ended ones included); None for the service once it is gone.
async fn read(client: &Client, t: &Target) -> Result<(Option<ServiceView>, Vec<Task>), Status> {
    match get_service(client, &t.namespace, &t.name).await {
        Ok(r) => Ok((r.service, r.tasks)),
        Err(s) if s.code() == Code::NotFound => {
            let req = pb::ListTasksRequest { namespace: t.namespace.clone(), service: t.name.clone(), all: true };
            let tasks = client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { Client::control(ch).list_tasks(req).await.map(|r| r.into_inner().tasks) }
                })
                .await?;
            Ok((None, tasks))
        }
        Err(s) => Err(s),
    }
}

/// Nodes that are down or removed. Empty when the node list cannot be read (then tasks on dead
/// nodes keep the wait going until its timeout rather than ending it early).
async fn gone_nodes(client: &Client, tasks: &[Task]) -> HashSet<String> {
    if tasks.iter().all(|t| t.node_id.is_empty()) {
        return HashSet::new();
    }
    let r = client
        .call(Call::Idempotent, |ch| async move {
            Client::nodes(ch).node_list(pb::NodeListRequest {}).await.map(|r| r.into_inner())
        })
        .await;
    let Ok(r) = r else { return HashSet::new() };
    let known: HashMap<String, i32> = r.nodes.into_iter().filter_map(|i| i.node).map(|n| (n.id, n.status)).collect();
    tasks
        .iter()
        .filter(|t| !t.node_id.is_empty())
        .filter(|t| known.get(&t.node_id).is_none_or(|s| *s == pb::NodeStatus::Down as i32))
        .map(|t| t.node_id.clone())
        .collect()
}

struct Follow {
    target: Target,
    label: String,
    bar: Option<indicatif::ProgressBar>,
    last_line: String,
    last: Option<(Option<ServiceView>, Vec<Task>, HashSet<String>)>,
    outcome: Option<Result<(), String>>,
}

/// Follows `targets` until each reaches its goal, fails, or `timeout` passes. Progress: bars on a
/// terminal's stderr, else a line per change (to stdout when `plain_to_stdout`).
pub async fn wait_for(client: &Client, targets: Vec<Target>, timeout: Duration, plain_to_stdout: bool) -> Result<()> {
    let one_ns = targets.windows(2).all(|w| w[0].namespace == w[1].namespace);
    let bars = Bars::new("{prefix:.bold} [{bar:30.cyan/blue}] {msg}");
    let label_of = |t: &Target| if one_ns { t.name.clone() } else { key(&t.namespace, &t.name) };
    let width = targets.iter().map(|t| label_of(t).len()).max().unwrap_or(0);
    let mut follows: Vec<Follow> = targets
        .into_iter()
        .map(|t| {
            let label = label_of(&t);
            let bar = bars.add(&label, width);
            Follow { target: t, label, bar, last_line: String::new(), last: None, outcome: None }
        })
        .collect();
    let plain = |line: &str| {
        if plain_to_stdout {
            out_line(line);
        } else {
            eprintln!("{line}");
        }
    };
    let notice = |msg: &str| bars.println(msg);
    let deadline = tokio::time::Instant::now() + timeout;
    let watch_ns =
        if one_ns { follows.first().map(|f| f.target.namespace.clone()).unwrap_or_default() } else { String::new() };
    let mut changes = Changes::open(client, &watch_ns).await;
    let mut last_error: Option<String> = None;
    loop {
        for f in follows.iter_mut().filter(|f| f.outcome.is_none()) {
            let (service, tasks) = match read(client, &f.target).await {
                Ok(r) => r,
                Err(s) if is_transient(&s) => {
                    let text = status_text(&s);
                    if last_error.as_deref() != Some(text.as_str()) {
                        notice(&format!("reading service {} failed, retrying: {text}", f.label));
                    }
                    last_error = Some(text);
                    continue;
                }
                Err(s) => {
                    bars.clear();
                    bail!("following service {} failed: {}", key(&f.target.namespace, &f.target.name), status_text(&s));
                }
            };
            last_error = None;
            let gone = gone_nodes(client, &tasks).await;
            let l = look(&f.label, &f.target, service.as_ref(), &tasks, &gone);
            if l.line != f.last_line {
                match &f.bar {
                    Some(b) => {
                        b.set_length(l.total);
                        b.set_position(l.done);
                        b.set_message(l.line.strip_prefix(&format!("{}: ", f.label)).unwrap_or(&l.line).to_string());
                    }
                    None => plain(&l.line),
                }
                f.last_line = l.line.clone();
            }
            f.last = Some((service, tasks, gone));
            match l.state {
                State::Waiting => {}
                State::Done => f.outcome = Some(Ok(())),
                State::Failed(m) => f.outcome = Some(Err(m)),
            }
            if let Some(outcome) = &f.outcome
                && let Some(b) = f.bar.take()
            {
                let done = match f.target.goal {
                    Goal::Deleted => "deleted".to_string(),
                    Goal::Scaled { replicas } => format!("{replicas} running"),
                };
                progress::settle(b, outcome, done);
            }
        }
        if follows.iter().all(|f| f.outcome.is_some()) || tokio::time::Instant::now() >= deadline {
            break;
        }
        changes.next(deadline).await;
    }
    bars.close(follows.iter().map(|f| &f.bar));
    let mut failures = Vec::new();
    let mut unfinished = Vec::new();
    for f in &follows {
        let k = key(&f.target.namespace, &f.target.name);
        match &f.outcome {
            Some(Ok(())) => plain(&match f.target.goal {
                Goal::Deleted => format!("service {k} deleted; every task ended"),
                Goal::Scaled { replicas } => format!("service {k} scaled: {replicas}/{replicas} running"),
            }),
            Some(Err(m)) => {
                eprintln!("service {k}: {m}");
                failures.push(k);
            }
            None => unfinished.push(f),
        }
    }
    if !unfinished.is_empty() {
        let names = node_names(client).await;
        for f in &unfinished {
            eprintln!("{}", timeout_report(f, timeout, &names));
        }
        if let Some(e) = &last_error {
            eprintln!("the last attempt to read the services failed: {e}");
        }
    }
    match (failures.is_empty(), unfinished.is_empty()) {
        (true, true) => Ok(()),
        (false, true) => bail!("waiting for {} failed (see above)", failures.join(", ")),
        _ => {
            let u: Vec<String> = unfinished.iter().map(|f| key(&f.target.namespace, &f.target.name)).collect();
            bail!(
                "timed out after {} waiting for {}{}; see the tasks above, `berth get tasks --service NAME -n NS \
                 --all`, or wait longer with --timeout",
                humantime::format_duration(timeout),
                u.join(", "),
                if failures.is_empty() { String::new() } else { format!(" ({} failed)", failures.join(", ")) }
            )
        }
    }
}

/// What a target that did not reach its goal in time still waits for: its tasks still running.
fn timeout_report(f: &Follow, timeout: Duration, names: &HashMap<String, String>) -> String {
    let mut lines = vec![format!(
        "{} after {}",
        if f.last_line.is_empty() { format!("{}: never read", f.label) } else { f.last_line.clone() },
        humantime::format_duration(timeout)
    )];
    if let Some((_, tasks, gone)) = &f.last {
        for t in tasks.iter().filter(|t| !has_ended(t, gone)) {
            let o = TaskOut::from_task(t, names);
            let node = if o.node_name.is_empty() { o.node.clone() } else { o.node_name.clone() };
            let node = if node.is_empty() { "no node yet".to_string() } else { format!("node {node}") };
            let msg = if t.message.is_empty() { String::new() } else { format!(": {}", t.message) };
            lines.push(format!("  task {} on {node}: {} (desired {}){msg}", t.id, o.state, o.desired_state));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use berth_api::pb::{Rollout, RolloutState, ServiceRecord};

    use super::*;

    fn task(id: &str, node: &str, desired: TaskState, state: TaskState) -> Task {
        Task {
            id: id.into(),
            node_id: node.into(),
            desired_state: desired as i32,
            state: state as i32,
            ..Default::default()
        }
    }

    fn service(deleting: bool, desired: u32, running: u32) -> ServiceView {
        ServiceView {
            record: Some(ServiceRecord {
                namespace: "default".into(),
                name: "web".into(),
                version: 2,
                deleting,
                rollout: Some(Rollout { state: RolloutState::Completed as i32, ..Default::default() }),
                ..Default::default()
            }),
            desired,
            running,
            ..Default::default()
        }
    }

    fn target(goal: Goal) -> Target {
        Target { namespace: "default".into(), name: "web".into(), goal }
    }

    #[test]
    fn ended_tasks() {
        let none = HashSet::new();
        use TaskState::*;
        for s in [Complete, Failed, Shutdown, Orphaned] {
            assert!(has_ended(&task("a", "n1", Shutdown, s), &none), "{s:?}");
        }
        for s in [Assigned, Starting, Running] {
            assert!(!has_ended(&task("a", "n1", Shutdown, s), &none), "{s:?}: its process may run");
        }
        // Never placed and no longer wanted: nothing ever ran.
        assert!(has_ended(&task("a", "", Shutdown, Pending), &none));
        assert!(!has_ended(&task("a", "", Running, Pending), &none), "still to be placed");
        // On a node that is down or removed: gone, as the master counts it.
        let gone: HashSet<String> = ["n1".to_string()].into();
        assert!(has_ended(&task("a", "n1", Shutdown, Running), &gone));
    }

    #[test]
    fn delete_waits_for_every_task_and_the_service() {
        let none = HashSet::new();
        let t = target(Goal::Deleted);
        let tasks = vec![
            task("a", "n1", TaskState::Shutdown, TaskState::Running),
            task("b", "n1", TaskState::Shutdown, TaskState::Shutdown),
        ];
        let l = look("web", &t, Some(&service(true, 0, 0)), &tasks, &none);
        assert_eq!((l.done, l.total, &l.state), (1, 2, &State::Waiting));
        assert_eq!(l.line, "web: 1 of 2 tasks ended (deleting)");
        // Every task ended, but the service is still there: the reaper has not removed it yet.
        let ended = vec![task("a", "n1", TaskState::Shutdown, TaskState::Complete)];
        assert_eq!(look("web", &t, Some(&service(true, 0, 0)), &ended, &none).state, State::Waiting);
        // Gone, with a task still running (read from the task list): keep waiting.
        let l = look("web", &t, None, &tasks, &none);
        assert_eq!(l.state, State::Waiting);
        assert_eq!(l.line, "web: service removed, 1 tasks still running");
        let l = look("web", &t, None, &[], &none);
        assert_eq!((l.state, l.line.as_str()), (State::Done, "web: deleted, every task ended"));
        // Applied again meanwhile.
        assert!(matches!(look("web", &t, Some(&service(false, 3, 0)), &[], &none).state, State::Failed(_)));
    }

    #[test]
    fn an_image_pull_shows_in_the_line() {
        let none = HashSet::new();
        let t = target(Goal::Scaled { replicas: 2 });
        let mut pulling = task("b", "n1", TaskState::Running, TaskState::Starting);
        pulling.message = "pulling image r/app:1: layer 1/2 (0.0 MiB of 3.0 MiB fetched)".into();
        let tasks = vec![task("a", "n1", TaskState::Running, TaskState::Running), pulling];
        let l = look("web", &t, Some(&service(false, 2, 1)), &tasks, &none);
        assert_eq!(
            l.line,
            "web: 1/2 running (completed); pulling image r/app:1: layer 1/2 (0.0 MiB of 3.0 MiB fetched)"
        );
        // From the cluster's copy (`berth image import`) instead of a registry.
        let mut loading = task("c", "n1", TaskState::Running, TaskState::Starting);
        loading.message = "loading image docker.io/r/app:1 from the cluster: layer 1/1 (0 B of 1.0 MiB fetched)".into();
        let tasks = vec![task("a", "n1", TaskState::Running, TaskState::Running), loading];
        let l = look("web", &t, Some(&service(false, 2, 1)), &tasks, &none);
        assert!(
            l.line.ends_with("; loading image docker.io/r/app:1 from the cluster: layer 1/1 (0 B of 1.0 MiB fetched)")
        );
    }

    #[test]
    fn scale_waits_for_n_running_and_the_extra_ones_ended() {
        let none = HashSet::new();
        let t = target(Goal::Scaled { replicas: 2 });
        let run = |id: &str| task(id, "n1", TaskState::Running, TaskState::Running);
        let stopping = task("c", "n1", TaskState::Shutdown, TaskState::Running);
        // Scaled down from 3: two run, the third is still stopping.
        let tasks = vec![run("a"), run("b"), stopping.clone()];
        let l = look("web", &t, Some(&service(false, 2, 2)), &tasks, &none);
        assert_eq!(l.state, State::Waiting);
        assert_eq!(l.line, "web: 2/2 running, 1 stopping (completed)");
        let stopped = task("c", "n1", TaskState::Shutdown, TaskState::Shutdown);
        let l = look("web", &t, Some(&service(false, 2, 2)), &[run("a"), run("b"), stopped], &none);
        assert_eq!((l.state, l.done, l.total), (State::Done, 2, 2));
        // Scaled up: one of two runs (the view counts ready tasks of the current version).
        let l = look("web", &t, Some(&service(false, 2, 1)), &[run("a"), run("b")], &none);
        assert_eq!(l.state, State::Waiting);
        // Scaled again by someone else, deleted, or being deleted: fail rather than wait forever.
        assert!(
            matches!(look("web", &t, Some(&service(false, 5, 2)), &tasks, &none).state, State::Failed(m) if m.contains("to 5"))
        );
        assert!(matches!(look("web", &t, None, &[], &none).state, State::Failed(_)));
        assert!(matches!(look("web", &t, Some(&service(true, 0, 0)), &[], &none).state, State::Failed(_)));
        // Scale to zero: done once nothing runs.
        let zero = target(Goal::Scaled { replicas: 0 });
        let l = look("web", &zero, Some(&service(false, 0, 0)), &[stopping], &none);
        assert_eq!(l.state, State::Waiting);
        assert_eq!(look("web", &zero, Some(&service(false, 0, 0)), &[], &none).state, State::Done);
    }
}
