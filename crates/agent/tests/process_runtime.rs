//! The process runtime: the shared conformance suite (`conformance/mod.rs`), then what only
//! processes have (namespaces, cgroups, the shim, exec, rotation).
//!
//! Tasks run `/bin/sh -c ...` through the `berth-task-shim` binary of this crate. Every task is
//! SIGKILLed and removed by a `Cleanup` guard when its test ends, passed or failed.

mod conformance;
mod escapes;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_agent::driver::process::{DEFAULT_PATH, ProcessRuntime};
use berth_agent::driver::runtime::{LogLine, LogQuery, LogStream, Observed, Runtime, RuntimeError};
use berth_types::spec::{Cpu, Memory, ResourceLimits, Runtime as RuntimeKind, TaskSpec};
use berth_types::task::RunSpec;
use conformance::{Cleanup, Fixture, eventually, exited, running_pid, wait_for_line};
use futures::StreamExt;
use tempfile::TempDir;

fn shim() -> Vec<OsString> {
    vec![env!("CARGO_BIN_EXE_berth-task-shim").into()]
}

/// A runtime over `root` whose cgroups go under `berth-test/`, not a real agent's `berth/`.
fn runtime(root: &Path) -> ProcessRuntime {
    ProcessRuntime::new(root.to_path_buf(), shim()).with_cgroup_parent("berth-test")
}

fn spec(argv: &[&str]) -> RunSpec {
    RunSpec::standalone("conformance", TaskSpec::new(RuntimeKind::Process, argv))
}

struct ProcessFixture {
    rt: ProcessRuntime,
}

impl Fixture for ProcessFixture {
    fn shell(&self, script: &str) -> RunSpec {
        spec(&["/bin/sh", "-c", script])
    }

    fn cleanup(&self, task_id: &str) {
        self.rt.force_remove_blocking(task_id);
    }
}

/// A temp root, a runtime over it and its fixture.
fn setup() -> (TempDir, ProcessRuntime, ProcessFixture) {
    let tmp = tempfile::Builder::new().prefix("berth-process-rt-").tempdir().expect("temp dir");
    let rt = runtime(tmp.path());
    let fx = ProcessFixture { rt: rt.clone() };
    (tmp, rt, fx)
}

// ---- the conformance suite ----

#[tokio::test]
async fn conformance_lifecycle() {
    let (_tmp, rt, fx) = setup();
    conformance::lifecycle(&rt, &fx).await;
}

#[tokio::test]
async fn conformance_exit_code_reported() {
    let (_tmp, rt, fx) = setup();
    conformance::exit_code_reported(&rt, &fx).await;
}

#[tokio::test]
async fn conformance_start_is_idempotent() {
    let (_tmp, rt, fx) = setup();
    conformance::start_is_idempotent(&rt, &fx).await;
}

#[tokio::test]
async fn conformance_stop_after_exit_is_ok() {
    let (_tmp, rt, fx) = setup();
    conformance::stop_after_exit_is_ok(&rt, &fx).await;
}

#[tokio::test]
async fn conformance_remove_forgets() {
    let (_tmp, rt, fx) = setup();
    conformance::remove_forgets(&rt, &fx).await;
}

#[tokio::test]
async fn conformance_follow_yields_new_lines() {
    let (_tmp, rt, fx) = setup();
    conformance::follow_yields_new_lines(&rt, &fx).await;
}

#[tokio::test]
async fn conformance_sigterm_ignored_killed_after_grace() {
    let (_tmp, rt, fx) = setup();
    conformance::sigterm_ignored_killed_after_grace(&rt, &fx).await;
}

#[tokio::test]
async fn conformance_binds() {
    let (tmp, rt, fx) = setup();
    // The task shares the host's root: its targets are made under this test's directory.
    conformance::binds(&rt, &fx, &tmp.path().join("in-task").to_string_lossy()).await;
}

#[tokio::test]
async fn conformance_adoption() {
    let (tmp, rt, fx) = setup();
    let fresh = runtime(tmp.path());
    conformance::adoption(&rt, &fresh, &fx).await;
}

// ---- process-specific ----

fn ns(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).map(|l| l.display().to_string()).unwrap_or_default()
}

/// Processes in the PID namespace `ns_id`.
fn processes_in(ns_id: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| ns(p, "pid") == ns_id)
        .count()
}

fn sigkill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
}

async fn lines(rt: &ProcessRuntime, id: &str) -> Vec<String> {
    conformance::logs(rt, id, LogQuery::default()).await.into_iter().map(|l| l.line).collect()
}

#[tokio::test]
async fn task_has_its_own_namespaces() {
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("ns");
    rt.start(&id, &fx.shell("echo ppid=$PPID; echo procs=$(ls /proc | grep -c '^[0-9]'); sleep 1000")).await.unwrap();
    let pid = running_pid(&rt, &id).await;
    assert_ne!(pid, 1);
    // PID 1 is the task's init; the program is its child.
    wait_for_line(&rt, &id, LogStream::Stdout, "ppid=1").await;
    // Its /proc is its own: only the init, itself, the sleep and the ls/grep pipeline at most.
    let procs: usize = eventually("the procs line", || async {
        lines(&rt, &id).await.iter().find_map(|l| l.strip_prefix("procs=").and_then(|n| n.parse().ok()))
    })
    .await;
    assert!(procs <= 5, "the task sees {procs} processes in its /proc");
    let me = std::process::id();
    for kind in ["pid", "mnt", "uts", "ipc"] {
        assert_ne!(ns(pid, kind), ns(me, kind), "the task shares the {kind} namespace");
        assert!(!ns(pid, kind).is_empty());
    }
    rt.stop(&id, Duration::from_secs(5)).await.unwrap();
    rt.remove(&id).await.unwrap();
}

#[tokio::test]
async fn kill_9_reports_137() {
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("kill9");
    rt.start(&id, &fx.long_running()).await.unwrap();
    let pid = running_pid(&rt, &id).await;
    sigkill(pid);
    let (code, message) = exited(&rt, &id).await;
    assert_eq!(code, 137, "{message}");
    assert!(message.contains("SIGKILL"), "{message}");
    rt.remove(&id).await.unwrap();
}

#[tokio::test]
async fn limits_are_applied_or_the_start_fails() {
    let (tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("limits");
    let mut limited = fx.shell("echo up; sleep 1000");
    limited.task.resources.limits =
        Some(ResourceLimits { cpu: Some(Cpu(500)), memory: Some(Memory(64 << 20)), pids: None });
    match rt.start(&id, &limited).await {
        Err(RuntimeError::Unavailable(message)) => {
            // No writable cgroups here: the start must fail, saying why, and leave nothing.
            assert!(message.contains("resource limits"), "{message}");
            assert!(!tmp.path().join(&id).exists());
            eprintln!("cgroups are not writable here; checked the refusal only: {message}");
            return;
        }
        Err(e) => panic!("start with limits: {e}"),
        Ok(()) => {}
    }
    let pid = running_pid(&rt, &id).await;
    let dirs = rt.cgroup_dirs(&id).unwrap();
    assert!(!dirs.is_empty());
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).ok().map(|s| s.trim().to_string());
    let (mut memory, mut cpu) = (false, false);
    for d in &dirs {
        if let Some(v) = read(d, "memory.limit_in_bytes").or_else(|| read(d, "memory.max")) {
            assert_eq!(v, (64u64 << 20).to_string(), "{}", d.display());
            memory = true;
        }
        if let Some(v) = read(d, "cpu.cfs_quota_us") {
            assert_eq!(v, "50000");
            assert_eq!(read(d, "cpu.cfs_period_us").as_deref(), Some("100000"));
            cpu = true;
        }
        if let Some(v) = read(d, "cpu.max") {
            assert_eq!(v, "50000 100000");
            cpu = true;
        }
    }
    assert!(memory && cpu, "memory and cpu limits in {dirs:?}");
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(membership.contains(&format!("/berth-test/{id}")), "the task is in its cgroups: {membership}");

    rt.remove(&id).await.unwrap();
    for d in &dirs {
        assert!(!d.exists(), "{} was removed", d.display());
    }
}

#[tokio::test]
async fn a_dead_supervisor_is_reported() {
    let (tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("shimdeath");
    rt.start(&id, &fx.shell("echo up; sleep 1000")).await.unwrap();
    let pid = running_pid(&rt, &id).await;
    wait_for_line(&rt, &id, LogStream::Stdout, "up").await;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(&id).join("state.json")).unwrap()).unwrap();
    let shim_pid = state["shim"]["pid"].as_u64().expect("shim pid") as u32;
    sigkill(shim_pid);
    eventually("the shim to be gone", || async {
        let stat = std::fs::read_to_string(format!("/proc/{shim_pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.contains(") Z ")).then_some(())
    })
    .await;
    // The task itself lives on, and can still be stopped.
    assert_eq!(running_pid(&rt, &id).await, pid);
    rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    let (code, message) = exited(&rt, &id).await;
    assert_eq!(code, -1);
    assert!(message.contains("supervisor"), "{message}");
    // The verdict is kept.
    assert_eq!(exited(&rt, &id).await, (code, message));
    rt.remove(&id).await.unwrap();
}

#[tokio::test]
async fn exec_runs_in_the_task_namespaces() {
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("exec");
    let mut s = fx.shell("echo ready; exec sleep 1000");
    s.task.env.insert("BERTH_TEST_VAR".into(), "hello".into());
    rt.start(&id, &s).await.unwrap();
    let pid = running_pid(&rt, &id).await;
    wait_for_line(&rt, &id, LogStream::Stdout, "ready").await;
    let sh = |script: &str| vec!["sh".to_string(), "-c".to_string(), script.to_string()];
    let t = Duration::from_secs(10);

    assert_eq!(rt.exec(&id, &sh("exit 7"), t).await.unwrap(), 7);
    // PID 1 of the namespace is the task's init; its program, the `sleep`, is its child.
    assert_eq!(
        rt.exec(&id, &sh("grep -qx sleep /proc/$(cat /proc/1/task/1/children | cut -d' ' -f1)/comm"), t).await.unwrap(),
        0
    );
    assert_eq!(rt.exec(&id, &sh("test \"$BERTH_TEST_VAR\" = hello"), t).await.unwrap(), 0);
    // A sandboxed task starts in its private /tmp, and so does what runs in it.
    assert_eq!(rt.exec(&id, &sh("test \"$(pwd -P)\" = /tmp"), t).await.unwrap(), 0);
    assert_eq!(rt.exec(&id, &sh("kill -9 $$"), t).await.unwrap(), 137);

    let began = Instant::now();
    let err = rt.exec(&id, &["sleep".to_string(), "60".to_string()], Duration::from_millis(300)).await.unwrap_err();
    assert!(err.to_string().contains("did not finish within"), "{err}");
    assert!(began.elapsed() < Duration::from_secs(10));
    let task_ns = ns(pid, "pid");
    eventually("the timed-out command to be killed", || async { (processes_in(&task_ns) == 2).then_some(()) }).await;

    let err = rt.exec("no-such-task", &sh("true"), t).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    let err = rt.exec(&id, &sh("true"), t).await.unwrap_err();
    assert!(err.to_string().contains("has ended"), "{err}");
    rt.remove(&id).await.unwrap();
}

#[tokio::test]
async fn environment_and_working_directory() {
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("env");
    let mut s = fx.shell("echo foo=$FOO; echo cwd=$(pwd); echo path=$PATH; echo home=${HOME:-unset}");
    s.task.env.insert("FOO".into(), "bar baz".into());
    s.task.workdir = Some("/tmp".into());
    rt.start(&id, &s).await.unwrap();
    assert_eq!(exited(&rt, &id).await.0, 0);
    let out = lines(&rt, &id).await;
    for want in ["foo=bar baz", "cwd=/tmp", &format!("path={DEFAULT_PATH}")] {
        assert!(out.iter().any(|l| l == want), "{want:?} in {out:?}");
    }
    // Nothing comes from the agent's environment: HOME is the task user's (nobody's), as the
    // OCI runtime sets it, never the agent's.
    let agent_home = format!("home={}", std::env::var("HOME").unwrap_or_default());
    assert!(!out.contains(&agent_home), "{out:?}");
    rt.remove(&id).await.unwrap();
}

#[tokio::test]
async fn start_refuses_what_cannot_run_and_leaves_nothing() {
    let (tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("refused");
    let invalid = |r: Result<(), RuntimeError>| match r {
        Err(RuntimeError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    };
    let m = invalid(rt.start(&id, &spec(&[])).await);
    assert!(m.contains("command is empty"), "{m}");
    let m = invalid(rt.start(&id, &spec(&["no-such-program-berth-test"])).await);
    assert!(m.contains("not found in PATH") && m.contains("spec.task.env"), "{m}");
    let m = invalid(rt.start(&id, &spec(&["/no/such/program"])).await);
    assert!(m.contains("does not exist"), "{m}");
    let mut s = fx.shell("true");
    s.task.workdir = Some("/no/such/dir".into());
    let m = invalid(rt.start(&id, &s).await);
    assert!(m.contains("spec.task.workdir"), "{m}");
    let m = invalid(rt.start("../escape", &fx.shell("true")).await);
    assert!(m.contains("cannot name a task directory"), "{m}");

    // A privileged task (allowed here) starts through util-linux's unshare...
    let mut privileged = fx.shell("true");
    privileged.task.privileged = true;
    let no_util_linux =
        runtime(tmp.path()).with_util_linux("/no/unshare".into(), "/no/nsenter".into()).with_sandbox(true, None);
    match no_util_linux.start(&id, &privileged).await {
        Err(RuntimeError::Unavailable(m)) => assert!(m.contains("util-linux") && m.contains("/no/unshare"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // ...and is refused by an agent that does not allow privileged tasks.
    let m = invalid(rt.start(&id, &privileged).await);
    assert!(m.contains("--allow-privileged"), "{m}");
    // A sandboxed one needs an OCI runtime.
    let no_runc = runtime(tmp.path()).with_sandbox(false, Some("/no/runc".into()));
    match no_runc.start(&id, &fx.shell("true")).await {
        Err(RuntimeError::Unavailable(m)) => assert!(m.contains("/no/runc") && m.contains("install runc"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let broken_shim =
        ProcessRuntime::new(tmp.path().to_path_buf(), vec!["/bin/false".into()]).with_cgroup_parent("berth-test");
    match broken_shim.start(&id, &fx.shell("true")).await {
        Err(RuntimeError::Unavailable(m)) => assert!(m.contains("shim exited"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // Nothing was left, and list ignores what is not a task.
    std::fs::create_dir_all(tmp.path().join(".partial-start")).unwrap();
    std::fs::write(tmp.path().join("stray-file"), b"").unwrap();
    assert_eq!(rt.list().await.unwrap(), Vec::<String>::new());
    assert_eq!(rt.inspect(&id).await.unwrap(), Observed::Missing);
    assert!(rt.logs(&id, LogQuery::default()).await.is_err());
}

#[tokio::test]
async fn output_is_rotated_and_followed_across_rotations() {
    let (tmp, _, _) = setup();
    let rt = runtime(tmp.path()).with_log_rotation(4096, 50);
    let fx = ProcessFixture { rt: rt.clone() };
    let mut guard = Cleanup::new(&fx);
    let script = "i=1; while [ $i -le 400 ]; do echo line-$i; i=$((i+1)); done";
    let id = guard.id("rotate");
    rt.start(&id, &fx.shell(script)).await.unwrap();
    let followed: Vec<LogLine> = tokio::time::timeout(
        conformance::PATIENCE,
        rt.logs(&id, LogQuery { follow: true, ..Default::default() }).await.unwrap().collect(),
    )
    .await
    .expect("the followed stream ends with the task");
    let want: Vec<String> = (1..=400).map(|i| format!("line-{i}")).collect();
    assert_eq!(followed.into_iter().map(|l| l.line).collect::<Vec<_>>(), want);
    assert!(tmp.path().join(&id).join("output.log.3").exists(), "the output was rotated");
    let tail = conformance::logs(&rt, &id, LogQuery { tail: Some(3), ..Default::default() }).await;
    assert_eq!(tail.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["line-398", "line-399", "line-400"]);
    rt.remove(&id).await.unwrap();

    // Keeping two old files: the newest lines survive, in order, without gaps.
    let small = runtime(tmp.path()).with_log_rotation(4096, 2);
    let id = guard.id("rotate-small");
    small.start(&id, &fx.shell(script)).await.unwrap();
    assert_eq!(exited(&small, &id).await.0, 0);
    let kept = lines(&small, &id).await;
    let first: usize = kept[0].strip_prefix("line-").unwrap().parse().unwrap();
    assert!(first > 1, "old lines were dropped");
    let want: Vec<String> = (first..=400).map(|i| format!("line-{i}")).collect();
    assert_eq!(kept, want);
    assert!(!tmp.path().join(&id).join("output.log.3").exists());
    small.remove(&id).await.unwrap();
}

/// Run in a child process by `a_task_outlives_the_process_that_started_it`: starts a task and
/// exits, like an agent that dies.
#[tokio::test]
#[ignore = "a helper, run in a child process by a_task_outlives_the_process_that_started_it"]
async fn helper_start_a_task_and_exit() {
    let (Ok(root), Ok(id)) = (std::env::var("BERTH_TEST_ROOT"), std::env::var("BERTH_TEST_TASK")) else {
        return;
    };
    let rt = runtime(Path::new(&root));
    rt.start(&id, &spec(&["/bin/sh", "-c", conformance::LONG_RUNNING])).await.unwrap();
    running_pid(&rt, &id).await;
}

#[tokio::test]
async fn a_task_outlives_the_process_that_started_it() {
    let (tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("orphan");
    let helper = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["helper_start_a_task_and_exit", "--exact", "--ignored", "--test-threads=1"])
        .env("BERTH_TEST_ROOT", tmp.path())
        .env("BERTH_TEST_TASK", &id)
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&helper.stdout);
    assert!(helper.status.success(), "the helper process failed ({}): {said}", helper.status);
    assert!(said.contains("1 passed"), "the helper ran: {said}");
    let pid = running_pid(&rt, &id).await;
    wait_for_line(&rt, &id, LogStream::Stdout, conformance::OUT_LINE).await;
    // Still ticking after its starter is gone.
    let ticks = |l: &Vec<String>| l.iter().filter(|l| *l == conformance::TICK_LINE).count();
    let before = ticks(&lines(&rt, &id).await);
    eventually("more ticks", || async { (ticks(&lines(&rt, &id).await) > before + 2).then_some(()) }).await;
    rt.stop(&id, conformance::GRACE).await.unwrap();
    let (code, message) = exited(&rt, &id).await;
    assert_eq!(code, 0, "the task exits 0 on SIGTERM: {message}");
    assert!(std::fs::metadata(format!("/proc/{pid}")).is_err() || !running(pid));
    rt.remove(&id).await.unwrap();
}

/// Whether `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Regression (found by the chaos suite): the agent's session awaited task stops inline, so a task
/// that ignores SIGTERM froze the session, heartbeats included, for the whole 10 s grace, and the
/// masters declared the node down and moved its tasks. A stop must return at once and finish in
/// the background.
#[tokio::test]
async fn a_stop_returns_at_once_and_finishes_in_the_background() {
    use berth_agent::driver::{Driver, TaskManager, status_channel};
    use berth_api::pb::agent::{Assignment, TaskState};

    let (_dir, rt, fx) = setup();
    let mut cleanup = Cleanup::new(&fx);
    let id = cleanup.id("stop-in-background");
    let state_dir = tempfile::tempdir().unwrap();
    let (sink, mut statuses) = status_channel();
    let mgr =
        TaskManager::new(rt.clone(), Err::<ProcessRuntime, _>("no docker here".into()), sink, state_dir.path().into());
    // The task says when its trap is in place: a SIGTERM before that would end it at once.
    let script = "trap '' TERM; echo trapped; while :; do sleep 0.1; done";
    let spec = spec(&["/bin/sh", "-c", script]);
    let a = Assignment {
        task_id: id.clone(),
        spec: spec.encode(),
        desired_state: TaskState::Running as i32,
        files: Vec::new(),
        image: None,
    };
    Driver::start(&mgr, &a).await;
    wait_state(&id, TaskState::Running, &mut statuses).await;
    wait_for_line(&rt, &id, LogStream::Stdout, "trapped").await;
    let asked = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), Driver::stop(&mgr, &id))
        .await
        .expect("Driver::stop must not wait for the task's stop grace");
    wait_state(&id, TaskState::Shutdown, &mut statuses).await;
    assert!(asked.elapsed() >= Duration::from_secs(5), "the task ignores SIGTERM, so it ended only at the grace");
}

async fn wait_states(
    want: &[(&str, berth_api::pb::agent::TaskState)],
    statuses: &mut berth_agent::driver::StatusStream,
) {
    let mut left: Vec<(String, i32)> = want.iter().map(|(id, s)| (id.to_string(), *s as i32)).collect();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(s) = statuses.recv().await {
            left.retain(|(id, state)| !(s.task_id == *id && s.state == *state));
            if left.is_empty() {
                return;
            }
        }
    })
    .await
    .expect("the statuses never came")
}

async fn wait_state(id: &str, want: berth_api::pb::agent::TaskState, statuses: &mut berth_agent::driver::StatusStream) {
    let want = want as i32;
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(s) = statuses.recv().await {
            if s.task_id == id && s.state == want {
                return;
            }
        }
    })
    .await
    .expect("the status never came")
}

// An at-most-once task whose agent has gone quiet (no lease file is ever written here) is killed
// by its own shim after the fence timeout, and its exit says so first, with the marker the
// masters read to restart the slot without growing its crash-loop backoff.
#[tokio::test]
async fn the_shim_fences_an_at_most_once_task_and_marks_the_stop() {
    let tmp = tempfile::Builder::new().prefix("berth-process-fence-").tempdir().expect("temp dir");
    // The lease file is looked for beside the runtime's root: keep both inside the temp dir.
    let rt = runtime(&tmp.path().join("tasks"));
    let fx = ProcessFixture { rt: rt.clone() };
    let mut cleanup = Cleanup::new(&fx);
    let id = cleanup.id("fenced");
    let mut s = spec(&["/bin/sh", "-c", "exec sleep 1000"]);
    s.disconnect = berth_types::spec::DisconnectPolicy::AtMostOnce;
    s.fence_timeout_ms = 300;
    rt.start(&id, &s).await.expect("start");
    let (code, message) = exited(&rt, &id).await;
    assert_ne!(code, 0);
    assert!(berth_types::task::is_fence_stop(&message), "{message}");
}

/// Processes in the PID namespace `ns_id` that are zombies.
fn zombies_in(ns_id: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| ns(p, "pid") == ns_id)
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        })
        .count()
}

// A program with no SIGTERM handler of its own, which as PID 1 would ignore SIGTERM and wait out
// the grace: under the task's init, SIGTERM reaches it as to any process, and the stop is prompt.
#[tokio::test]
async fn a_task_without_a_sigterm_handler_stops_at_once() {
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("plain");
    rt.start(&id, &fx.shell("echo up; sleep 1000")).await.unwrap();
    let pid = running_pid(&rt, &id).await;
    wait_for_line(&rt, &id, LogStream::Stdout, "up").await;
    let ns_id = ns(pid, "pid");
    let t = Instant::now();
    rt.stop(&id, Duration::from_secs(10)).await.unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "stopping took {took:?}: the grace was waited out");
    let (code, message) = exited(&rt, &id).await;
    assert_eq!(code, 128 + 15, "{message}");
    assert!(message.contains("SIGTERM"), "{message}");
    assert_eq!(processes_in(&ns_id), 0, "the namespace ended with its init");
    rt.remove(&id).await.unwrap();
}

// The spec's stop signal is what the program receives, and a program that handles it exits
// cleanly from its handler.
#[tokio::test]
async fn the_stop_signal_reaches_the_program_and_its_handler_runs() {
    let (_tmp, rt, _fx) = setup();
    let fx = ProcessFixture { rt: rt.clone() };
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("usr1");
    let mut s = spec(&["/bin/sh", "-c", "trap 'echo handled USR1; exit 0' USR1; echo ready; sleep 1000 & wait"]);
    s.task.stop_signal = Some("SIGUSR1".into());
    rt.start(&id, &s).await.unwrap();
    running_pid(&rt, &id).await;
    wait_for_line(&rt, &id, LogStream::Stdout, "ready").await;
    let t = Instant::now();
    rt.stop(&id, Duration::from_secs(10)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "the handler's exit took {:?}", t.elapsed());
    wait_for_line(&rt, &id, LogStream::Stdout, "handled USR1").await;
    let (code, message) = exited(&rt, &id).await;
    assert_eq!(code, 0, "{message}");
    rt.remove(&id).await.unwrap();
}

// Orphans are re-parented to the task's init, which reaps them: no zombies pile up.
#[tokio::test]
async fn the_init_reaps_orphans() {
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("orphans");
    // Each subshell starts a short sleep and exits at once: the sleeps end as orphans.
    rt.start(&id, &fx.shell("for i in 1 2 3 4 5; do (sleep 0.1 &); done; echo spawned; sleep 1000")).await.unwrap();
    let pid = running_pid(&rt, &id).await;
    wait_for_line(&rt, &id, LogStream::Stdout, "spawned").await;
    let ns_id = ns(pid, "pid");
    eventually("the orphans to be reaped", || async {
        // The init, the shell and its sleep remain, and nothing is a zombie.
        (processes_in(&ns_id) == 3 && zombies_in(&ns_id) == 0).then_some(())
    })
    .await;
    rt.stop(&id, Duration::from_secs(5)).await.unwrap();
    rt.remove(&id).await.unwrap();
}

// Level-triggered reconciliation over the real process runtime: what runs is compared with what
// should, whatever the manager saw happen. Before the leader confirms the set, nothing unknown is
// touched; once it does, unknown tasks are stopped and removed; a desired SHUTDOWN is carried out
// for a task this manager never watched (as after an agent restart), and a desired RUNNING task
// that does not run is started.
#[tokio::test]
async fn reconcile_converges_on_the_desired_set() {
    use std::collections::BTreeSet;

    use berth_agent::driver::{Driver, TaskManager, status_channel};
    use berth_api::pb::agent::{Assignment, TaskState};

    let (_dir, rt, fx) = setup();
    let mut cleanup = Cleanup::new(&fx);
    let wanted = cleanup.id("wanted");
    let stray = cleanup.id("stray");
    let stopping = cleanup.id("stopping");
    // Started behind the manager's back: a stray task, and one whose stop was cut short.
    let long = spec(&["/bin/sh", "-c", "sleep 1000"]);
    rt.start(&stray, &long).await.unwrap();
    rt.start(&stopping, &long).await.unwrap();
    let stray_pid = running_pid(&rt, &stray).await;
    running_pid(&rt, &stopping).await;

    let state_dir = tempfile::tempdir().unwrap();
    let (sink, mut statuses) = status_channel();
    let mgr =
        TaskManager::new(rt.clone(), Err::<ProcessRuntime, _>("no docker here".into()), sink, state_dir.path().into());
    let assign = |id: &str, desired: TaskState| Assignment {
        task_id: id.to_string(),
        spec: long.encode(),
        desired_state: desired as i32,
        files: Vec::new(),
        image: None,
    };
    let desired = vec![assign(&wanted, TaskState::Running), assign(&stopping, TaskState::Shutdown)];
    let none = BTreeSet::new();

    // Not confirmed (an agent start from its stored state): the stray one is left alone.
    mgr.reconcile(&desired, &none, false).await;
    // Both, in whichever order they come (one wait after the other would drop the second's
    // status if it came first).
    wait_states(&[(&wanted, TaskState::Running), (&stopping, TaskState::Shutdown)], &mut statuses).await;
    assert!(running(stray_pid), "an unconfirmed set must not remove anything");

    // Confirmed by the leader: the stray task is stopped and its files removed.
    mgr.reconcile(&desired, &none, true).await;
    wait_state(&stray, TaskState::Shutdown, &mut statuses).await;
    eventually("the stray task's directory to be removed", || async {
        (!rt.task_dir(&stray).unwrap().exists()).then_some(())
    })
    .await;
    assert!(!running(stray_pid));
    // The wanted task runs once, however often the set is reconciled.
    let pid = running_pid(&rt, &wanted).await;
    mgr.reconcile(&desired, &none, true).await;
    assert_eq!(running_pid(&rt, &wanted).await, pid);
    assert_eq!(rt.list().await.unwrap().iter().filter(|t| **t == wanted).count(), 1);

    // A task known to have ended is not started again.
    let ended = BTreeSet::from([stopping.clone()]);
    let again = vec![assign(&wanted, TaskState::Running), assign(&stopping, TaskState::Running)];
    mgr.reconcile(&again, &ended, true).await;
    assert!(matches!(rt.inspect(&stopping).await.unwrap(), Observed::Exited { .. }));
}

#[tokio::test]
async fn a_task_on_networks_runs_in_its_namespace_with_its_resolv_conf() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let (tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("netns");
    let netns = tmp.path().join("netns-of-task");
    berth_agent::overlay::link::create_netns(&netns).unwrap();
    // Unmounted and removed even when an assertion fails.
    struct NetnsGuard(std::path::PathBuf);
    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = berth_agent::overlay::link::delete_netns(&self.0);
        }
    }
    let _netns_guard = NetnsGuard(netns.clone());
    let mut spec = fx.shell("cat /etc/resolv.conf; echo links=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,); sleep 1000");
    spec.attachment = Some(berth_types::task::Attachment {
        netns: netns.to_string_lossy().into_owned(),
        resolv_conf: "nameserver 198.18.9.1\nsearch default.svc.berth.internal\n".into(),
        addresses: BTreeMap::new(),
    });
    rt.start(&id, &spec).await.unwrap();
    let pid = running_pid(&rt, &id).await;
    wait_for_line(&rt, &id, LogStream::Stdout, "nameserver 198.18.9.1").await;
    // Its network namespace is the one it was given (only `lo` in it), not the host's.
    wait_for_line(&rt, &id, LogStream::Stdout, "links=lo,").await;
    let given = std::fs::metadata(&netns).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    assert_eq!(ns(pid, "net"), format!("net:[{given}]"));
    // The host's resolv.conf is untouched.
    assert!(!std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default().contains("198.18.9.1"));
    rt.stop(&id, Duration::from_secs(5)).await.unwrap();
    rt.remove(&id).await.unwrap();
}

// ---- escape attempts from a default task ----

/// A process task uses the host's tools.
const HOST_TOOLS: escapes::Tools = escapes::Tools { bb: "" };

#[tokio::test]
async fn escape_reading_the_agents_key_and_data_fails() {
    let (tmp, rt, fx) = setup();
    escapes::cannot_read_the_agents_key_or_data(&rt, &fx, tmp.path()).await;
}

#[tokio::test]
async fn escape_by_mount_fails() {
    let (_tmp, rt, fx) = setup();
    escapes::cannot_mount(&rt, &fx, HOST_TOOLS).await;
}

#[tokio::test]
async fn escape_by_sysrq_fails() {
    let (_tmp, rt, fx) = setup();
    escapes::cannot_write_sysrq(&rt, &fx).await;
}

#[tokio::test]
async fn escape_to_host_processes_fails() {
    let (_tmp, rt, fx) = setup();
    escapes::cannot_see_or_signal_host_processes(&rt, &fx, HOST_TOOLS).await;
}

#[tokio::test]
async fn escape_by_ptrace_of_another_task_fails() {
    let (_tmp, rt, fx) = setup();
    escapes::cannot_ptrace_another_task(&rt, &fx).await;
}

#[tokio::test]
async fn escape_by_unshare_fails() {
    let (_tmp, rt, fx) = setup();
    escapes::cannot_unshare(&rt, &fx, HOST_TOOLS).await;
}

#[tokio::test]
async fn escape_by_setuid_binary_fails() {
    let (_tmp, rt, fx) = setup();
    escapes::a_setuid_binary_gains_nothing(&rt, &fx, HOST_TOOLS).await;
}

#[tokio::test]
async fn escape_by_fork_bomb_stops_at_pids_max() {
    let (_tmp, rt, fx) = setup();
    escapes::a_fork_bomb_stops_at_pids_max(&rt, &fx, fx.shell(escapes::FORK_BOMB), escapes::pids_current).await;
}
