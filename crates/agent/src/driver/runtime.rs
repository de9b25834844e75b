//! The contract every runtime (process, docker) fulfils. The agent's task manager drives a
//! runtime through it: start, watch (`inspect`), stop, remove, logs, and, after an agent restart,
//! `list` to adopt what is still there. Every runtime passes the same conformance suite
//! (`crates/agent/tests/conformance/mod.rs`, run by `process_runtime.rs` and `docker_runtime.rs`).
//!
//! Rules every implementation keeps:
//! - `start` is idempotent: a task that already exists (running or exited) is left as it is and
//!   `Ok` is returned, so an agent restart never starts a second copy.
//! - The task manager turns a spec's volumes, secrets and configs into host paths
//!   ([`BindMount`]s) before `start_with`; a runtime only binds each at its target, creating a
//!   missing target (a directory, or an empty file for a file), read-only when asked, and lets
//!   nothing the task mounts propagate back to the host.
//! - A task outlives the agent: nothing the runtime starts may depend on the agent process
//!   staying alive (no pipes to the agent, no kill-on-drop).
//! - `stop` sends SIGTERM, waits up to `grace`, then SIGKILL. Stopping a task that has already
//!   exited, or that does not exist, is `Ok`.
//! - Errors say what failed and what to do; they never panic.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use berth_types::task::RunSpec;

/// What a runtime observes of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Running; `pid` is the task's main process as seen from the host (when known).
    Running { pid: Option<u32>, started_at_ms: i64 },
    /// Ended with this exit code (128+N when killed by signal N).
    Exited { code: i32, finished_at_ms: i64, message: String },
    /// This runtime has no such task.
    Missing,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line of a task's output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    /// Unix milliseconds when the line was captured.
    pub ts_ms: i64,
    pub stream: LogStream,
    /// The line without its newline.
    pub line: String,
}

/// Which log lines to return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    /// Only the last N lines (of those matching `since_ms`).
    pub tail: Option<usize>,
    /// Only lines captured at or after this Unix millisecond.
    pub since_ms: Option<i64>,
    /// Keep streaming new lines until the task ends or the stream is dropped.
    pub follow: bool,
}

/// A stream of log lines.
pub type LogLines = Pin<Box<dyn futures::Stream<Item = LogLine> + Send>>;

/// Why a runtime call failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec cannot run on this runtime (missing image, empty command...).
    #[error("{0}")]
    Invalid(String),
    /// The runtime itself is unavailable (Docker daemon down, cgroups unwritable...).
    #[error("{0}")]
    Unavailable(String),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

/// A host path bound into a task: a volume's directory, or a secret's or config's file. Made by
/// the task manager (`driver::manager`), bound by the runtimes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BindMount {
    /// Absolute path on the host.
    pub source: PathBuf,
    /// Absolute path in the task.
    pub target: String,
    /// The task may only read it.
    #[serde(default)]
    pub read_only: bool,
    /// What `source` is; a missing target is made as the same kind.
    pub kind: BindKind,
}

/// A directory or a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BindKind {
    Dir,
    File,
}

/// A runtime: processes, Docker containers.
pub trait Runtime: Send + Sync + 'static {
    /// `process` or `docker`.
    fn name(&self) -> &'static str;

    /// Creates and starts the task (idempotent, see the module docs) with `binds` bound into it.
    /// A task that already exists keeps the binds it was created with.
    fn start_with(
        &self,
        task_id: &str,
        spec: &RunSpec,
        binds: &[BindMount],
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// [`Runtime::start_with`] without binds.
    fn start(&self, task_id: &str, spec: &RunSpec) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        self.start_with(task_id, spec, &[])
    }

    /// What the task is doing now.
    fn inspect(&self, task_id: &str) -> impl Future<Output = Result<Observed, RuntimeError>> + Send;

    /// SIGTERM, up to `grace`, then SIGKILL. Returns once the task has ended.
    fn stop(&self, task_id: &str, grace: Duration) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Forgets an ended task: its container or files go (logs included).
    fn remove(&self, task_id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Every task id this runtime has on this host, running or ended (for adoption after an
    /// agent restart).
    fn list(&self) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;

    /// The task's output.
    fn logs(&self, task_id: &str, query: LogQuery) -> impl Future<Output = Result<LogLines, RuntimeError>> + Send;

    /// The address health probes use to reach the task's ports (127.0.0.1 for a process; the
    /// container's address for docker).
    fn probe_addr(&self, task_id: &str) -> impl Future<Output = Result<IpAddr, RuntimeError>> + Send;

    /// Runs `argv` in the task's context (its namespaces or container) and returns the exit code,
    /// for `exec` health checks. Ends it after `timeout`.
    fn exec(
        &self,
        task_id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<i32, RuntimeError>> + Send;
}
