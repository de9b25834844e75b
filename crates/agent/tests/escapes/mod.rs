//! Escape attempts from a default (sandboxed) task, shared by every runtime that sandboxes
//! (process, oci). Each attempt is its own test in the runtime's test file; each runs a real
//! task through the runtime and asserts from what the task printed and from the host.
//!
//! A `Sandboxed` fixture gives the runtime, a shell spec and the host paths an attacker would
//! want (the agent's key, its data directory).

use std::path::Path;
use std::time::Duration;

use berth_agent::driver::runtime::{BindKind, BindMount, LogStream, Runtime};
use berth_types::task::RunSpec;

use crate::conformance::{self, Cleanup, Fixture};

/// How a task's scripts reach tools: a process task uses the host's (`""`); an image task
/// (the FROM-scratch test image) calls busybox's applets (`"/bin/busybox "`).
#[derive(Clone, Copy)]
pub struct Tools {
    pub bb: &'static str,
}

/// Static helper programs (C, compiled here with `cc -static`, so they run in any image):
/// `ptrace-attach PID` prints `ptrace=<result> errno=<errno>` of PTRACE_ATTACH, and `euid`
/// (setuid, owned by root) prints its effective uid. In a directory to bind into tasks.
pub fn helpers() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("berth-escape-helpers-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sources = [
            (
                "ptrace-attach",
                "#include <sys/ptrace.h>\n#include <stdio.h>\n#include <stdlib.h>\n#include <errno.h>\n\
                 int main(int c, char **v) { long r = ptrace(PTRACE_ATTACH, atoi(v[1]), 0, 0); \
                 printf(\"ptrace=%ld errno=%d\\n\", r, errno); return 0; }\n",
            ),
            ("euid", "#include <stdio.h>\n#include <unistd.h>\nint main(void) { printf(\"%d\\n\", (int)geteuid()); return 0; }\n"),
        ];
        for (name, code) in sources {
            let src = dir.path().join(format!("{name}.c"));
            std::fs::write(&src, code).unwrap();
            let out = std::process::Command::new("cc")
                .args(["-static", "-O1", "-o"])
                .arg(dir.path().join(name))
                .arg(&src)
                .output()
                .expect("cc (gcc) to build the escape helpers");
            assert!(out.status.success(), "cc {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::set_permissions(dir.path().join("euid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        dir
    })
    .path()
}

/// The helpers bound read-only at `/opt/helpers`.
pub fn helpers_bind() -> BindMount {
    BindMount { source: helpers().to_path_buf(), target: "/opt/helpers".into(), read_only: true, kind: BindKind::Dir }
}

/// Runs `script` as a default task with `binds` until it ends; its exit code and stdout lines.
pub async fn run(
    rt: &impl Runtime,
    fx: &impl Fixture,
    case: &str,
    script: &str,
    binds: &[BindMount],
) -> (i32, Vec<String>) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id(case);
    rt.start_with(&id, &fx.shell(script), binds).await.unwrap_or_else(|e| panic!("start {id}: {e}"));
    let (code, _) = conformance::exited(rt, &id).await;
    let lines = conformance::logs(rt, &id, Default::default())
        .await
        .into_iter()
        .filter(|l| l.stream == LogStream::Stdout)
        .map(|l| l.line)
        .collect();
    rt.remove(&id).await.unwrap_or_else(|e| panic!("remove {id}: {e}"));
    (code, lines)
}

/// The line `key=value` the task printed.
pub fn said<'a>(lines: &'a [String], key: &str) -> &'a str {
    let prefix = format!("{key}=");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the task never printed {key}=...: {lines:?}"))
}

/// The agent's private key and data directory are out of the task's view; so are /root and
/// the Docker socket.
pub async fn cannot_read_the_agents_key_or_data(rt: &impl Runtime, fx: &impl Fixture, data_dir: &Path) {
    let key = data_dir.join("node.key");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY----- not for tasks").unwrap();
    let script = format!(
        "cat {key} >/dev/null 2>&1; echo key=$?; ls {data} >/dev/null 2>&1; echo data=$?; \
         ls /root >/dev/null 2>&1; echo root=$?; test -e /var/run/docker.sock; echo docker=$?; \
         test -e /run/docker.sock; echo docker2=$?; cat /etc/shadow >/dev/null 2>&1; echo shadow=$?",
        key = key.display(),
        data = data_dir.display()
    );
    let (_, lines) = run(rt, fx, "esc-key", &script, &[]).await;
    for what in ["key", "data", "root", "docker", "docker2", "shadow"] {
        assert_ne!(said(&lines, what), "0", "the task reached {what}: {lines:?}");
    }
}

/// `mount` is refused (no CAP_SYS_ADMIN, and the seccomp filter refuses the call).
pub async fn cannot_mount(rt: &impl Runtime, fx: &impl Fixture, t: Tools) {
    let script = format!("{}mount -t tmpfs none /tmp 2>&1; echo mount=$?", t.bb);
    let (_, lines) = run(rt, fx, "esc-mount", &script, &[]).await;
    assert_ne!(said(&lines, "mount"), "0", "{lines:?}");
}

/// `/proc/sysrq-trigger` is read-only.
pub async fn cannot_write_sysrq(rt: &impl Runtime, fx: &impl Fixture) {
    let (_, lines) = run(rt, fx, "esc-sysrq", "echo h > /proc/sysrq-trigger 2>/dev/null; echo sysrq=$?", &[]).await;
    assert_ne!(said(&lines, "sysrq"), "0", "{lines:?}");
}

/// Host processes are invisible and cannot be signalled: the test process's pid means nothing
/// in the task, and its /proc lists only its own processes.
pub async fn cannot_see_or_signal_host_processes(rt: &impl Runtime, fx: &impl Fixture, t: Tools) {
    let me = std::process::id();
    let script = format!(
        "kill -0 {me} 2>/dev/null; echo signal=$?; kill -0 1 2>/dev/null; echo init=$?; \
         echo procs=$(ls /proc | {}grep -c '^[0-9]')",
        t.bb
    );
    let (_, lines) = run(rt, fx, "esc-procs", &script, &[]).await;
    assert_ne!(said(&lines, "signal"), "0", "the task can signal host pid {me}: {lines:?}");
    let procs: usize = said(&lines, "procs").parse().unwrap();
    assert!(procs < 10, "the task sees {procs} processes: {lines:?}");
}

/// A task cannot ptrace another task (it cannot even name it: sibling PID namespaces).
pub async fn cannot_ptrace_another_task(rt: &impl Runtime, fx: &impl Fixture) {
    let mut guard = Cleanup::new(fx);
    let victim = guard.id("esc-victim");
    rt.start(&victim, &fx.shell("echo up; exec sleep 1000")).await.unwrap();
    let pid = conformance::running_pid(rt, &victim).await;
    let script = format!("/opt/helpers/ptrace-attach {pid}");
    let (_, lines) = run(rt, fx, "esc-ptrace", &script, &[helpers_bind()]).await;
    assert_eq!(said(&lines, "ptrace").split_whitespace().next(), Some("-1"), "{lines:?}");
    rt.stop(&victim, Duration::from_secs(1)).await.unwrap();
    rt.remove(&victim).await.unwrap();
}

/// `unshare` (new namespaces) is refused.
pub async fn cannot_unshare(rt: &impl Runtime, fx: &impl Fixture, t: Tools) {
    let script = format!(
        "{bb}unshare -U true 2>/dev/null; echo user=$?; {bb}unshare -m true 2>/dev/null; echo mnt=$?; \
         {bb}unshare -n true 2>/dev/null; echo net=$?",
        bb = t.bb
    );
    let (_, lines) = run(rt, fx, "esc-unshare", &script, &[]).await;
    for ns in ["user", "mnt", "net"] {
        assert_ne!(said(&lines, ns), "0", "unshare of a {ns} namespace worked: {lines:?}");
    }
}

/// A setuid-root binary does not make the task root: a static program that prints its
/// effective uid, setuid and owned by the host's root, bound into the task, prints the task's.
pub async fn a_setuid_binary_gains_nothing(rt: &impl Runtime, fx: &impl Fixture, t: Tools) {
    let script = format!("echo euid=$(/opt/helpers/euid); echo uid=$({}id -u)", t.bb);
    let (_, lines) = run(rt, fx, "esc-suid", &script, &[helpers_bind()]).await;
    assert_eq!(said(&lines, "euid"), "65534", "{lines:?}");
    assert_eq!(said(&lines, "uid"), "65534", "{lines:?}");
}

/// A fork bomb stops at the task's `pids.max` (1024 by default), and the node can still start
/// processes meanwhile.
pub async fn a_fork_bomb_stops_at_pids_max(
    rt: &impl Runtime,
    fx: &impl Fixture,
    spec: RunSpec,
    pids_current: impl Fn(&str) -> Option<u64>,
) {
    let mut guard = Cleanup::new(fx);
    let id = guard.id("esc-bomb");
    rt.start(&id, &spec).await.unwrap();
    // Forking a thousand processes takes a while on a loaded machine: a longer bound than the
    // suite's.
    let limit = berth_types::spec::security::DEFAULT_PIDS_MAX as u64;
    let what = format!("the bomb to reach pids.max ({limit})");
    let at_limit = conformance::eventually_within(Duration::from_secs(120), &what, || async {
        pids_current(&id).filter(|&n| n >= limit - 2)
    })
    .await;
    assert!(at_limit <= berth_types::spec::security::DEFAULT_PIDS_MAX as u64, "{at_limit} processes");
    // The node is fine: it starts a process at once.
    let began = std::time::Instant::now();
    assert!(std::process::Command::new("/bin/true").status().unwrap().success());
    assert!(began.elapsed() < Duration::from_secs(5));
    rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    rt.remove(&id).await.unwrap();
}

/// `pids.current` of a task whose cgroup is `berth-test/<id>` (cgroup v1 or v2).
pub fn pids_current(id: &str) -> Option<u64> {
    ["/sys/fs/cgroup/pids/berth-test", "/sys/fs/cgroup/berth-test"]
        .iter()
        .find_map(|base| std::fs::read_to_string(format!("{base}/{id}/pids.current")).ok())
        .and_then(|t| t.trim().parse().ok())
}

/// The script of a fork bomb that keeps its processes. A shell may give up once a fork is
/// refused; the task then stays (an outer shell execs a sleep), so the processes stay counted.
pub const FORK_BOMB: &str = "sh -c 'while :; do sleep 1000 & done'; echo bomb-stopped; exec sleep 1000";
