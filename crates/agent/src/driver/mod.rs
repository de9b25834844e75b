//! Drivers run the tasks assigned to this node and report what they observe.
//!
//! The agent calls [`Driver::start`] / [`Driver::stop`]; the driver reports every state change
//! through the [`StatusSink`] it was built with. The agent batches those reports to the leader.
//! Real runtimes (processes, containers) plug into the same trait.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_api::pb::agent::{Assignment, FileData, TaskState, TaskStatus};
use tokio::sync::mpsc;

pub mod docker;
pub mod manager;
pub mod process;
pub mod runtime;

pub use manager::{LogSource, TaskManager};

pub use runtime::{BindKind, BindMount, LogLine, LogLines, LogQuery, LogStream, Observed, Runtime, RuntimeError};

/// The receiving end of a driver's status reports (owned by the agent).
pub type StatusStream = mpsc::UnboundedReceiver<TaskStatus>;

/// Where a driver reports observed task states. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StatusSink {
    tx: mpsc::UnboundedSender<TaskStatus>,
}

/// A connected sink and stream.
pub fn status_channel() -> (StatusSink, StatusStream) {
    let (tx, rx) = mpsc::unbounded_channel();
    (StatusSink { tx }, rx)
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl StatusSink {
    /// Reports a status as is (a zero `timestamp_ms` is filled in with now).
    pub fn report(&self, mut status: TaskStatus) {
        if status.timestamp_ms == 0 {
            status.timestamp_ms = now_ms();
        }
        // The agent owns the stream for as long as the driver lives; a send can only fail while
        // the agent is shutting down, when nobody needs the report any more.
        let _ = self.tx.send(status);
    }

    /// Reports `state` for `task_id` with a message.
    pub fn state(&self, task_id: &str, state: TaskState, message: impl Into<String>) {
        self.report(TaskStatus {
            task_id: task_id.to_string(),
            state: state as i32,
            message: message.into(),
            timestamp_ms: now_ms(),
            exit_code: 0,
            ..Default::default()
        });
    }
}

/// Runs tasks. Implementations must return quickly and report progress through their
/// [`StatusSink`]; they are called from the agent's session task.
///
/// A session ending (leader change, network loss) never calls [`Driver::stop`]: tasks keep
/// running. `stop` is called only when the leader says so (desired state SHUTDOWN, removal from
/// the assignment set, or absence from a COMPLETE set).
pub trait Driver: Send + Sync + 'static {
    /// Start the task, or bring it in line with a changed assignment (desired state RUNNING).
    /// Also called at start-up for every assignment persisted with desired RUNNING, so the driver
    /// can adopt or restart what it runs.
    fn start(&self, assignment: &Assignment) -> impl Future<Output = ()> + Send;

    /// Stop the task; report SHUTDOWN once it has stopped.
    fn stop(&self, task_id: &str) -> impl Future<Output = ()> + Send;

    /// The task left this node's assignment set: stop it and remove what is left of it.
    fn forget(&self, task_id: &str) -> impl Future<Output = ()> + Send {
        self.stop(task_id)
    }

    /// Level-triggered reconciliation: bring what runs on this node in line with `desired`
    /// (every task assigned to this node, with its desired state), whatever happened before.
    /// Starts desired-RUNNING tasks that do not run (except those in `ended`: tasks known to
    /// have ended stay ended), stops desired-SHUTDOWN tasks not known to have ended, and, when
    /// `complete` (the leader confirmed `desired` as the whole set in this session), stops and
    /// removes every task the runtimes hold that `desired` does not name. Called at start-up
    /// (not complete: the set may be stale) and for every complete set.
    fn reconcile(
        &self,
        desired: &[Assignment],
        ended: &BTreeSet<String>,
        complete: bool,
    ) -> impl Future<Output = ()> + Send {
        let _ = complete;
        async move {
            for a in desired {
                if a.desired_state == TaskState::Running as i32 {
                    if !ended.contains(&a.task_id) {
                        self.start(a).await;
                    }
                } else if !ended.contains(&a.task_id) {
                    self.stop(&a.task_id).await;
                }
            }
        }
    }

    /// The leader was just heard from (fencing of at-most-once tasks).
    fn leader_contact(&self) {}

    /// This node's id, once known (joined, or read from the state file), before any task is
    /// started or reconciled.
    fn identify(&self, node_id: &str) {
        let _ = node_id;
    }

    /// The contents of the secrets and configs an assignment of `task_id` carried
    /// (`Assignment.files`). Kept in memory only; never logged, never persisted.
    fn task_files(&self, task_id: &str, files: &[FileData]) {
        let _ = (task_id, files);
    }

    /// Where the session puts what assignments say of images the cluster holds, and its
    /// connection to fetch them over; `None` when this driver runs no oci tasks.
    fn cluster_images(&self) -> Option<crate::image::ClusterSource> {
        None
    }

    /// The node's volume usage, refreshed by the driver; `None` when it has no volumes.
    fn volume_usage(&self) -> Option<tokio::sync::watch::Receiver<crate::volume::UsageReport>> {
        None
    }

    /// Where task logs can be read, if this driver keeps any.
    fn log_source(&self) -> Option<std::sync::Arc<dyn LogSource>> {
        None
    }
}

/// A driver that runs nothing but says it does: ASSIGNED then RUNNING at once on start, SHUTDOWN on
/// stop. For simulated agents and tests.
#[derive(Debug)]
pub struct SimulatedDriver {
    sink: StatusSink,
    running: Mutex<HashSet<String>>,
}

impl SimulatedDriver {
    pub fn new(sink: StatusSink) -> Self {
        SimulatedDriver { sink, running: Mutex::new(HashSet::new()) }
    }

    /// How many tasks it pretends to run.
    pub fn running(&self) -> usize {
        self.running.lock().expect("simulated driver lock").len()
    }
}

impl Driver for SimulatedDriver {
    async fn start(&self, assignment: &Assignment) {
        let fresh = self.running.lock().expect("simulated driver lock").insert(assignment.task_id.clone());
        if fresh {
            self.sink.state(&assignment.task_id, TaskState::Assigned, "");
        }
        self.sink.state(&assignment.task_id, TaskState::Running, "simulated");
    }

    async fn stop(&self, task_id: &str) {
        self.running.lock().expect("simulated driver lock").remove(task_id);
        self.sink.state(task_id, TaskState::Shutdown, "simulated");
    }

    async fn reconcile(&self, desired: &[Assignment], ended: &BTreeSet<String>, complete: bool) {
        let known: HashSet<&str> = desired.iter().map(|a| a.task_id.as_str()).collect();
        if complete {
            self.running.lock().expect("simulated driver lock").retain(|id| known.contains(id.as_str()));
        }
        for a in desired {
            let running = self.running.lock().expect("simulated driver lock").contains(&a.task_id);
            if a.desired_state == TaskState::Running as i32 {
                if !running && !ended.contains(&a.task_id) {
                    self.start(a).await;
                }
            } else if running || !ended.contains(&a.task_id) {
                self.stop(&a.task_id).await;
            }
        }
    }
}

/// The driver of a real agent until runtime drivers exist: every task it is asked to start fails.
#[derive(Debug)]
pub struct UnsupportedDriver {
    sink: StatusSink,
}

/// What [`UnsupportedDriver`] reports.
pub const UNSUPPORTED_MESSAGE: &str = "this agent has no runtime driver yet for this task";

impl UnsupportedDriver {
    pub fn new(sink: StatusSink) -> Self {
        UnsupportedDriver { sink }
    }
}

impl Driver for UnsupportedDriver {
    async fn start(&self, assignment: &Assignment) {
        self.sink.state(&assignment.task_id, TaskState::Failed, UNSUPPORTED_MESSAGE);
    }

    async fn stop(&self, task_id: &str) {
        self.sink.state(task_id, TaskState::Shutdown, "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(id: &str) -> Assignment {
        Assignment {
            task_id: id.into(),
            spec: vec![],
            desired_state: TaskState::Running as i32,
            files: vec![],
            image: None,
        }
    }

    #[tokio::test]
    async fn simulated_driver_reports_assigned_running_shutdown() {
        let (sink, mut rx) = status_channel();
        let d = SimulatedDriver::new(sink);
        d.start(&assignment("a")).await;
        d.start(&assignment("a")).await; // an update: no second ASSIGNED
        d.stop("a").await;
        let states: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).map(|s| s.state).collect();
        use TaskState::*;
        assert_eq!(states, [Assigned, Running, Running, Shutdown].map(|s| s as i32));
        assert_eq!(d.running(), 0);
    }

    #[tokio::test]
    async fn unsupported_driver_fails_every_task() {
        let (sink, mut rx) = status_channel();
        UnsupportedDriver::new(sink).start(&assignment("b")).await;
        let s = rx.try_recv().unwrap();
        assert_eq!(s.state, TaskState::Failed as i32);
        assert_eq!(s.message, UNSUPPORTED_MESSAGE);
        assert!(s.timestamp_ms > 0);
    }
}
