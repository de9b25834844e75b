//! The runtime conformance suite: what every [`Runtime`] (process, docker) must do, as async
//! functions over `&impl Runtime` and a [`Fixture`] that knows how to express a shell script as
//! a [`RunSpec`] for that runtime and how to clean up after a failed case.
//!
//! Use from a test crate under `crates/agent/tests/`:
//!
//! ```ignore
//! mod conformance; // this file (tests/conformance/mod.rs); from elsewhere: #[path = ".../conformance/mod.rs"]
//! use conformance::Fixture;
//!
//! struct DockerFixture { /* ... */ }
//! impl Fixture for DockerFixture {
//!     fn shell(&self, script: &str) -> RunSpec { /* image + ["/bin/busybox", "sh", "-c", script] */ }
//!     fn cleanup(&self, task_id: &str) { /* docker rm -f, synchronously */ }
//! }
//!
//! #[tokio::test]
//! async fn lifecycle() {
//!     let rt = DockerRuntime::new(..);
//!     conformance::lifecycle(&rt, &DockerFixture { .. }).await;
//! }
//! ```
//!
//! Every case waits on conditions (never fixed sleeps), uses task ids of its own, removes its
//! tasks when it passes and, through [`Cleanup`], calls [`Fixture::cleanup`] for each of them
//! even when it fails. The scripts use only POSIX `sh` and `sleep` with fractions (busybox has
//! both).

#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_agent::driver::runtime::{BindKind, BindMount, LogLine, LogQuery, LogStream, Observed, Runtime};
use berth_types::task::RunSpec;
use futures::StreamExt;

/// What the long-running task prints once on stdout.
pub const OUT_LINE: &str = "berth-conformance-stdout";
/// What the long-running task prints once on stderr.
pub const ERR_LINE: &str = "berth-conformance-stderr";
/// What the long-running task prints on stdout every 0.2 s after those.
pub const TICK_LINE: &str = "berth-conformance-tick";
/// What the SIGTERM-ignoring task prints once it ignores SIGTERM.
pub const IGNORING_LINE: &str = "berth-conformance-ignoring-sigterm";

/// Prints [`OUT_LINE`] and [`ERR_LINE`], then [`TICK_LINE`] every 0.2 s; exits 0 on SIGTERM.
pub const LONG_RUNNING: &str = "trap 'exit 0' TERM; echo berth-conformance-stdout; \
     echo berth-conformance-stderr >&2; while true; do echo berth-conformance-tick; sleep 0.2; done";
/// Prints a line and exits with code 3.
pub const EXITS_3: &str = "echo berth-conformance-bye; exit 3";
/// Ignores SIGTERM (its children too), says so, then sleeps forever.
pub const IGNORES_SIGTERM: &str =
    "trap '' TERM; echo berth-conformance-ignoring-sigterm; while true; do sleep 0.2; done";

/// How long a case waits for anything to happen.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// The grace given to tasks that exit on SIGTERM.
pub const GRACE: Duration = Duration::from_secs(10);

/// How a runtime under test expresses the suite's tasks.
pub trait Fixture: Send + Sync {
    /// A spec running `script` with a POSIX shell (`sh -c <script>`).
    fn shell(&self, script: &str) -> RunSpec;

    /// Synchronously kills and removes everything `task_id` may have left behind (processes,
    /// containers, cgroups, files). Called for every task of a case when the case ends, failed
    /// or not; must not panic and must be quick when there is nothing to do.
    fn cleanup(&self, task_id: &str);

    /// A task id no other case or run uses.
    fn task_id(&self, case: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        format!("conf-{case}-{}-{nanos:x}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// [`LONG_RUNNING`].
    fn long_running(&self) -> RunSpec {
        self.shell(LONG_RUNNING)
    }

    /// [`EXITS_3`].
    fn exits_with_3(&self) -> RunSpec {
        self.shell(EXITS_3)
    }

    /// [`IGNORES_SIGTERM`].
    fn ignores_sigterm(&self) -> RunSpec {
        self.shell(IGNORES_SIGTERM)
    }
}

/// Calls [`Fixture::cleanup`] for its tasks when dropped (also while unwinding from a failure).
pub struct Cleanup<'a, F: Fixture + ?Sized> {
    fx: &'a F,
    ids: Vec<String>,
}

impl<'a, F: Fixture + ?Sized> Cleanup<'a, F> {
    pub fn new(fx: &'a F) -> Self {
        Cleanup { fx, ids: Vec::new() }
    }

    /// A fresh task id, cleaned up on drop.
    pub fn id(&mut self, case: &str) -> String {
        let id = self.fx.task_id(case);
        self.ids.push(id.clone());
        id
    }
}

impl<F: Fixture + ?Sized> Drop for Cleanup<'_, F> {
    fn drop(&mut self) {
        for id in &self.ids {
            self.fx.cleanup(id);
        }
    }
}

/// Polls `probe` (every 50 ms) until it returns `Some`, panicking after [`PATIENCE`].
pub async fn eventually<T, Fut: Future<Output = Option<T>>>(what: &str, probe: impl FnMut() -> Fut) -> T {
    eventually_within(PATIENCE, what, probe).await
}

/// [`eventually`] with its own bound.
pub async fn eventually_within<T, Fut: Future<Output = Option<T>>>(
    bound: Duration,
    what: &str,
    mut probe: impl FnMut() -> Fut,
) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {bound:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The task's observed state, which must not be an error.
pub async fn inspect(rt: &impl Runtime, id: &str) -> Observed {
    rt.inspect(id).await.unwrap_or_else(|e| panic!("inspect {id}: {e}"))
}

/// Waits until the task runs with a known pid; returns the pid.
pub async fn running_pid(rt: &impl Runtime, id: &str) -> u32 {
    eventually(&format!("task {id} running with a pid"), || async {
        match inspect(rt, id).await {
            Observed::Running { pid: Some(pid), started_at_ms } => {
                assert!(started_at_ms > 0, "a running task has a start time");
                Some(pid)
            }
            Observed::Running { pid: None, .. } => None,
            other => panic!("task {id} should be running, is {other:?}"),
        }
    })
    .await
}

/// Waits until the task has exited; returns its code and message.
pub async fn exited(rt: &impl Runtime, id: &str) -> (i32, String) {
    eventually(&format!("task {id} to exit"), || async {
        match inspect(rt, id).await {
            Observed::Exited { code, finished_at_ms, message } => {
                assert!(finished_at_ms > 0, "an exited task has an end time");
                Some((code, message))
            }
            Observed::Running { .. } => None,
            Observed::Missing => panic!("task {id} is missing"),
        }
    })
    .await
}

/// All lines matching `query` (without `follow`).
pub async fn logs(rt: &impl Runtime, id: &str, query: LogQuery) -> Vec<LogLine> {
    assert!(!query.follow);
    rt.logs(id, query).await.unwrap_or_else(|e| panic!("logs of {id}: {e}")).collect().await
}

/// Waits until the task's output has a line `text` on `stream`; returns all lines then.
pub async fn wait_for_line(rt: &impl Runtime, id: &str, stream: LogStream, text: &str) -> Vec<LogLine> {
    eventually(&format!("{text:?} on {stream:?} of task {id}"), || async {
        let lines = logs(rt, id, LogQuery::default()).await;
        lines.iter().any(|l| l.stream == stream && l.line == text).then_some(lines)
    })
    .await
}

async fn start(rt: &impl Runtime, id: &str, spec: &RunSpec) {
    rt.start(id, spec).await.unwrap_or_else(|e| panic!("start {id}: {e}"));
}

async fn stop(rt: &impl Runtime, id: &str, grace: Duration) {
    rt.stop(id, grace).await.unwrap_or_else(|e| panic!("stop {id}: {e}"));
}

async fn remove(rt: &impl Runtime, id: &str) {
    rt.remove(id).await.unwrap_or_else(|e| panic!("remove {id}: {e}"));
}

async fn list(rt: &impl Runtime) -> Vec<String> {
    rt.list().await.unwrap_or_else(|e| panic!("list: {e}"))
}

/// start → Running with a pid → the output lines, with `tail` and `since_ms` → stop → Exited.
pub async fn lifecycle(rt: &impl Runtime, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("life");
    start(rt, &id, &fx.long_running()).await;
    running_pid(rt, &id).await;
    assert!(list(rt).await.contains(&id));

    wait_for_line(rt, &id, LogStream::Stdout, OUT_LINE).await;
    let all = wait_for_line(rt, &id, LogStream::Stderr, ERR_LINE).await;
    assert!(all.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms), "lines come oldest first");
    let out = all.iter().find(|l| l.line == OUT_LINE).expect("stdout line");
    assert_eq!(out.stream, LogStream::Stdout);
    assert!(out.ts_ms > 0);

    // Ticks keep coming; wait for a few so tail and since have something to cut.
    let all = eventually("three ticks", || async {
        let lines = logs(rt, &id, LogQuery::default()).await;
        (lines.iter().filter(|l| l.line == TICK_LINE).count() >= 3).then_some(lines)
    })
    .await;
    let tail = logs(rt, &id, LogQuery { tail: Some(2), ..Default::default() }).await;
    assert_eq!(tail.len(), 2, "{tail:?}");
    assert!(tail.iter().all(|l| l.line == TICK_LINE), "the last lines are ticks: {tail:?}");
    assert!(tail[0].ts_ms >= all[all.len() - 2].ts_ms, "tail returns the newest lines");
    let first_tick = all.iter().find(|l| l.line == TICK_LINE).expect("a tick").ts_ms;
    let since = logs(rt, &id, LogQuery { since_ms: Some(first_tick), ..Default::default() }).await;
    assert!(!since.is_empty() && since.iter().all(|l| l.ts_ms >= first_tick), "{since:?}");
    let future = logs(rt, &id, LogQuery { since_ms: Some(i64::MAX), ..Default::default() }).await;
    assert!(future.is_empty(), "nothing was captured in the far future: {future:?}");
    let both = LogQuery { since_ms: Some(out.ts_ms), tail: Some(1), follow: false };
    assert_eq!(logs(rt, &id, both).await.len(), 1);

    stop(rt, &id, GRACE).await;
    let (code, message) = exited(rt, &id).await;
    assert!(!message.is_empty(), "an exit has a message (code {code})");
    // The output stays readable after the end.
    assert!(logs(rt, &id, LogQuery::default()).await.iter().any(|l| l.line == OUT_LINE));
    remove(rt, &id).await;
}

/// The exit code of a task that exits by itself is reported; its logs are complete, also when
/// followed after the end (the stream ends).
pub async fn exit_code_reported(rt: &impl Runtime, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("exit3");
    start(rt, &id, &fx.exits_with_3()).await;
    let (code, message) = exited(rt, &id).await;
    assert_eq!(code, 3, "{message}");
    let follow = rt.logs(&id, LogQuery { follow: true, ..Default::default() }).await.expect("follow logs");
    let lines: Vec<LogLine> =
        tokio::time::timeout(PATIENCE, follow.collect()).await.expect("following an ended task's logs ends");
    assert!(lines.iter().any(|l| l.line == "berth-conformance-bye"), "{lines:?}");
    remove(rt, &id).await;
}

/// A second start of the same task leaves it alone: same process while running, no restart
/// after it exited.
pub async fn start_is_idempotent(rt: &impl Runtime, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("idem");
    start(rt, &id, &fx.long_running()).await;
    let pid = running_pid(rt, &id).await;
    start(rt, &id, &fx.long_running()).await;
    assert_eq!(running_pid(rt, &id).await, pid, "a second start must not start a second process");
    assert_eq!(list(rt).await.iter().filter(|t| **t == id).count(), 1);

    let done = guard.id("idem-exited");
    start(rt, &done, &fx.exits_with_3()).await;
    assert_eq!(exited(rt, &done).await.0, 3);
    start(rt, &done, &fx.exits_with_3()).await;
    assert!(matches!(inspect(rt, &done).await, Observed::Exited { code: 3, .. }), "an ended task is not restarted");
    let byes = logs(rt, &done, LogQuery::default()).await.iter().filter(|l| l.line == "berth-conformance-bye").count();
    assert_eq!(byes, 1, "it ran once");

    stop(rt, &id, GRACE).await;
    remove(rt, &id).await;
    remove(rt, &done).await;
}

/// Stopping an ended or unknown task is Ok; an unknown task is Missing.
pub async fn stop_after_exit_is_ok(rt: &impl Runtime, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("stopped");
    start(rt, &id, &fx.exits_with_3()).await;
    exited(rt, &id).await;
    stop(rt, &id, Duration::from_secs(1)).await;
    assert!(matches!(inspect(rt, &id).await, Observed::Exited { code: 3, .. }));

    let unknown = guard.id("never-started");
    stop(rt, &unknown, Duration::from_secs(1)).await;
    assert_eq!(inspect(rt, &unknown).await, Observed::Missing);
    remove(rt, &id).await;
}

/// remove → Missing and gone from `list`; removing again is Ok; removing a running task stops it.
pub async fn remove_forgets(rt: &impl Runtime, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("removed");
    start(rt, &id, &fx.long_running()).await;
    running_pid(rt, &id).await;
    stop(rt, &id, GRACE).await;
    exited(rt, &id).await;
    remove(rt, &id).await;
    assert_eq!(inspect(rt, &id).await, Observed::Missing);
    assert!(!list(rt).await.contains(&id));
    remove(rt, &id).await;

    let running = guard.id("removed-running");
    start(rt, &running, &fx.long_running()).await;
    running_pid(rt, &running).await;
    remove(rt, &running).await;
    assert_eq!(inspect(rt, &running).await, Observed::Missing);
    assert!(!list(rt).await.contains(&running));
}

/// A followed log yields lines printed after the follow began, and ends (after draining) once
/// the task has ended.
pub async fn follow_yields_new_lines(rt: &impl Runtime, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("follow");
    start(rt, &id, &fx.long_running()).await;
    wait_for_line(rt, &id, LogStream::Stdout, OUT_LINE).await;
    wait_for_line(rt, &id, LogStream::Stderr, ERR_LINE).await;

    // The lines seen so far carry a time no later than this millisecond (a log's times have
    // millisecond precision): following from the next one leaves them all out.
    let seen_by = now_ms();
    while now_ms() <= seen_by {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    let began = seen_by + 1;
    let mut stream = rt
        .logs(&id, LogQuery { since_ms: Some(began), follow: true, ..Default::default() })
        .await
        .expect("follow logs");
    let line = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("a new line within the patience")
        .expect("the stream goes on while the task runs");
    assert_eq!(line.line, TICK_LINE);
    assert!(line.ts_ms >= began, "{line:?} was captured before the follow began ({began})");

    stop(rt, &id, GRACE).await;
    let rest: Vec<LogLine> =
        tokio::time::timeout(PATIENCE, stream.collect()).await.expect("the followed stream ends after the task");
    assert!(rest.iter().all(|l| l.ts_ms >= began));
    remove(rt, &id).await;
}

/// A task ignoring SIGTERM is killed after the grace: code 137.
pub async fn sigterm_ignored_killed_after_grace(rt: &impl Runtime, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("stubborn");
    start(rt, &id, &fx.ignores_sigterm()).await;
    running_pid(rt, &id).await;
    wait_for_line(rt, &id, LogStream::Stdout, IGNORING_LINE).await;
    let grace = Duration::from_secs(1);
    let t = Instant::now();
    stop(rt, &id, grace).await;
    let took = t.elapsed();
    assert!(took >= grace - Duration::from_millis(100), "stop returned after {took:?}, before the grace");
    assert!(took < grace + PATIENCE, "stop took {took:?}");
    let (code, message) = exited(rt, &id).await;
    assert_eq!(code, 137, "{message}");
    remove(rt, &id).await;
}

/// A second runtime instance over the same state (an agent restart) lists the running task,
/// sees the same pid and its logs, and stops it.
pub async fn adoption<R: Runtime>(rt: &R, fresh: &R, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("adopt");
    start(rt, &id, &fx.long_running()).await;
    let pid = running_pid(rt, &id).await;
    wait_for_line(rt, &id, LogStream::Stdout, OUT_LINE).await;

    assert!(list(fresh).await.contains(&id), "the restarted runtime lists the task");
    assert_eq!(running_pid(fresh, &id).await, pid, "adopted with the same process");
    start(fresh, &id, &fx.long_running()).await;
    assert_eq!(running_pid(fresh, &id).await, pid, "start after a restart does not restart it");
    wait_for_line(fresh, &id, LogStream::Stderr, ERR_LINE).await;
    stop(fresh, &id, GRACE).await;
    exited(fresh, &id).await;
    assert!(matches!(inspect(rt, &id).await, Observed::Exited { .. }), "both instances agree");
    remove(fresh, &id).await;
}

/// Host paths bound into the task ([`Runtime::start_with`]): a directory read-write, one
/// read-only, and a file, at targets under `base` (a path the task can create, absent on the
/// host for a process task: it shares the host's root). What the task writes lands in the host
/// directory; the read-only one refuses writes; the file reads as on the host.
pub async fn binds(rt: &impl Runtime, fx: &impl Fixture, base: &str) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("binds");
    let host = tempfile::Builder::new().prefix("berth-binds-").tempdir().expect("temp dir");
    let (rw, ro, file) = (host.path().join("rw"), host.path().join("ro"), host.path().join("app.conf"));
    std::fs::create_dir(&rw).unwrap();
    std::fs::create_dir(&ro).unwrap();
    // A sandboxed task runs as an unprivileged user: the directory it writes must let it.
    std::fs::set_permissions(&rw, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::write(ro.join("kept"), "as it was").unwrap();
    std::fs::write(&file, "color=blue").unwrap();
    let bind = |source: &std::path::Path, target: &str, read_only, kind| BindMount {
        source: source.to_path_buf(),
        target: format!("{base}/{target}"),
        read_only,
        kind,
    };
    let binds = [
        bind(&rw, "rw", false, BindKind::Dir),
        bind(&ro, "ro", true, BindKind::Dir),
        bind(&file, "etc/app.conf", true, BindKind::File),
    ];
    let script = format!(
        "echo written > {base}/rw/out; \
         if echo x > {base}/ro/kept 2>/dev/null; then echo ro-writable; else echo ro-refused; fi; \
         cat {base}/etc/app.conf; echo; echo binds-done"
    );
    rt.start_with(&id, &fx.shell(&script), &binds).await.unwrap_or_else(|e| panic!("start {id}: {e}"));
    let lines = wait_for_line(rt, &id, LogStream::Stdout, "binds-done").await;
    let out: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
    assert!(out.contains(&"ro-refused"), "the read-only bind refused a write: {out:?}");
    assert!(out.contains(&"color=blue"), "the file reads as on the host: {out:?}");
    let (code, message) = exited(rt, &id).await;
    assert_eq!(code, 0, "{message}");
    assert_eq!(std::fs::read_to_string(rw.join("out")).unwrap(), "written\n");
    assert_eq!(std::fs::read_to_string(ro.join("kept")).unwrap(), "as it was");
    remove(rt, &id).await;
}

/// Every case, one after the other.
pub async fn run_all<R: Runtime>(rt: &R, fresh: &R, fx: &impl Fixture) {
    lifecycle(rt, fx).await;
    exit_code_reported(rt, fx).await;
    start_is_idempotent(rt, fx).await;
    stop_after_exit_is_ok(rt, fx).await;
    remove_forgets(rt, fx).await;
    follow_yields_new_lines(rt, fx).await;
    sigterm_ignored_killed_after_grace(rt, fx).await;
    adoption(rt, fresh, fx).await;
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
