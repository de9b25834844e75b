//! The docker runtime against the local Docker daemon, with the tiny image that
//! `deploy/test-image.sh` builds (`berth-test/busybox:1`, no registry needed): the shared
//! conformance suite (`conformance/mod.rs`), then what only containers have (ports, limits,
//! labels, images, exec).
//!
//! Every container a test creates is removed when the test ends, pass or fail ([`Cleanup`] and
//! the fixture's cleanup). Tests wait on conditions (polling), never on fixed sleeps.

mod conformance;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_agent::driver::docker::{self, DockerRuntime};
use berth_agent::driver::{LogLine, LogQuery, LogStream, Observed, Runtime, RuntimeError};
use berth_agent::probe::probe;
use berth_types::spec::{
    Cpu, DisconnectPolicy, HealthCheck, HttpProbe, Memory, PortSpec, Protocol, ResourceLimits, Resources,
    Runtime as Kind, TaskSpec,
};
use berth_types::task::RunSpec;
use futures::StreamExt;

const IMAGE: &str = "berth-test/busybox:1";
const WAIT: Duration = Duration::from_secs(30);

/// Builds the test image once per test process.
fn test_image() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/test-image.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}): {}{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = built {
        panic!("the docker runtime tests need the test image: {e}");
    }
}

async fn runtime() -> DockerRuntime {
    test_image();
    match DockerRuntime::connect().await {
        Ok(rt) => rt,
        Err(e) => panic!("the docker runtime tests need a Docker daemon: {e}"),
    }
}

/// Removes the containers of the tasks it named when dropped (test passed or panicked).
struct Cleanup {
    ids: Vec<String>,
}

impl Cleanup {
    fn new() -> Self {
        Cleanup { ids: Vec::new() }
    }

    /// A task id unique to this process and test, removed at the end.
    fn id(&mut self, what: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!("test-{}-{}-{what}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        self.ids.push(id.clone());
        id
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        force_remove(&self.ids);
    }
}

fn spec(script: &str) -> RunSpec {
    let task = TaskSpec {
        args: vec![script.to_string()],
        image: Some(IMAGE.to_string()),
        ..TaskSpec::new(Kind::Docker, &["/bin/busybox", "sh", "-c"])
    };
    RunSpec {
        service: "web".to_string(),
        slot: 2,
        disconnect: DisconnectPolicy::Replace,
        ..RunSpec::standalone("web", task)
    }
}

/// `docker rm -f -v` of task containers, synchronously (from `Drop`, even while unwinding).
fn force_remove(ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let names: Vec<String> = ids.iter().map(|id| DockerRuntime::container_name(id)).collect();
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", "-v"])
        .args(&names)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// The conformance suite's tasks as containers of the test image.
struct DockerFixture;

impl conformance::Fixture for DockerFixture {
    fn shell(&self, script: &str) -> RunSpec {
        spec(script)
    }

    fn cleanup(&self, task_id: &str) {
        force_remove(&[task_id.to_string()]);
    }
}

// ---- the conformance suite ----

#[tokio::test]
async fn conformance_lifecycle() {
    conformance::lifecycle(&runtime().await, &DockerFixture).await;
}

#[tokio::test]
async fn conformance_exit_code_reported() {
    conformance::exit_code_reported(&runtime().await, &DockerFixture).await;
}

#[tokio::test]
async fn conformance_start_is_idempotent() {
    conformance::start_is_idempotent(&runtime().await, &DockerFixture).await;
}

#[tokio::test]
async fn conformance_stop_after_exit_is_ok() {
    conformance::stop_after_exit_is_ok(&runtime().await, &DockerFixture).await;
}

#[tokio::test]
async fn conformance_remove_forgets() {
    conformance::remove_forgets(&runtime().await, &DockerFixture).await;
}

#[tokio::test]
async fn conformance_follow_yields_new_lines() {
    conformance::follow_yields_new_lines(&runtime().await, &DockerFixture).await;
}

#[tokio::test]
async fn conformance_sigterm_ignored_killed_after_grace() {
    conformance::sigterm_ignored_killed_after_grace(&runtime().await, &DockerFixture).await;
}

#[tokio::test]
async fn conformance_binds() {
    conformance::binds(&runtime().await, &DockerFixture, "/mnt/berth").await;
}

#[tokio::test]
async fn conformance_adoption() {
    // A second client of the same daemon: what an agent restart sees.
    let (rt, fresh) = (runtime().await, runtime().await);
    conformance::adoption(&rt, &fresh, &DockerFixture).await;
}

// ---- docker only ----

/// Polls `f` until it returns `Some`, for at most `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exited(rt: &DockerRuntime, id: &str) -> (i32, String) {
    wait_for("the task to exit", WAIT, || async {
        match rt.inspect(id).await.unwrap() {
            Observed::Exited { code, message, .. } => Some((code, message)),
            _ => None,
        }
    })
    .await
}

async fn wait_running(rt: &DockerRuntime, id: &str) -> Option<u32> {
    wait_for("the task to run", WAIT, || async {
        match rt.inspect(id).await.unwrap() {
            Observed::Running { pid, .. } => Some(pid),
            Observed::Exited { code, message, .. } => panic!("task {id} exited ({code}, {message}) instead of running"),
            Observed::Missing => panic!("task {id} is missing"),
        }
    })
    .await
}

async fn logs(rt: &DockerRuntime, id: &str, query: LogQuery) -> Vec<LogLine> {
    rt.logs(id, query).await.unwrap().collect().await
}

/// Waits until the task's output has a line `line`.
async fn wait_line(rt: &DockerRuntime, id: &str, line: &str) {
    wait_for(&format!("the line {line:?}"), WAIT, || async {
        logs(rt, id, LogQuery::default()).await.iter().any(|l| l.line == line).then_some(())
    })
    .await
}

fn text(lines: &[LogLine]) -> Vec<&str> {
    lines.iter().map(|l| l.line.as_str()).collect()
}

/// A TCP port free on the host right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn runs_a_container_and_reports_its_exit_code_and_output() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("exit3");
    let before = docker_now_ms();
    rt.start(&id, &spec("echo out; echo err >&2; exit 3")).await.unwrap();
    let (code, _) = wait_exited(&rt, &id).await;
    assert_eq!(code, 3);

    let lines = logs(&rt, &id, LogQuery::default()).await;
    // stdout and stderr are copied separately: their relative order is not kept.
    let mut seen = text(&lines);
    seen.sort();
    assert_eq!(seen, ["err", "out"]);
    let out = lines.iter().find(|l| l.line == "out").expect("the stdout line");
    let err = lines.iter().find(|l| l.line == "err").expect("the stderr line");
    assert_eq!(out.stream, LogStream::Stdout);
    assert_eq!(err.stream, LogStream::Stderr);
    assert!(out.ts_ms >= before - 5_000 && out.ts_ms <= docker_now_ms() + 5_000, "{out:?}");

    assert!(rt.list().await.unwrap().contains(&id));
    // Idempotent: an exited task is left as it is (not restarted, not recreated).
    rt.start(&id, &spec("echo out; echo err >&2; exit 3")).await.unwrap();
    assert!(matches!(rt.inspect(&id).await.unwrap(), Observed::Exited { code: 3, .. }));
    assert_eq!(logs(&rt, &id, LogQuery::default()).await.len(), 2);
    // Stopping an ended task is Ok.
    rt.stop(&id, Duration::from_secs(1)).await.unwrap();

    rt.remove(&id).await.unwrap();
    assert_eq!(rt.inspect(&id).await.unwrap(), Observed::Missing);
    assert!(!rt.list().await.unwrap().contains(&id));
    // Stopping and removing a missing task are Ok too.
    rt.stop(&id, Duration::from_secs(1)).await.unwrap();
    rt.remove(&id).await.unwrap();
    assert!(rt.logs(&id, LogQuery::default()).await.is_err());
}

fn docker_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn publishes_ports_reachable_from_the_host_and_probes_reach_the_container() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("httpd");
    let host_port = free_port();
    let mut s = spec("");
    s.task.command = vec!["/bin/busybox".into(), "httpd".into()];
    s.task.args = vec!["-f".into(), "-p".into(), "8080".into(), "-h".into(), "/www".into()];
    s.task.ports = vec![
        PortSpec { name: None, container: 8080, published: Some(host_port), protocol: Protocol::Tcp, mode: None },
        PortSpec { name: None, container: 9999, published: None, protocol: Protocol::Udp, mode: None },
    ];
    rt.start(&id, &s).await.unwrap();
    wait_running(&rt, &id).await;

    let check = |port: u16| HealthCheck {
        http: Some(HttpProbe { port, path: "/index.html".to_string() }),
        tcp: None,
        exec: None,
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        retries: 3,
        start_period: Duration::ZERO,
    };
    let no_exec = |_: Vec<String>, _: Duration| async { Err::<i32, String>("no exec".to_string()) };
    // Through the published port on the host.
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    wait_for("the published port to answer", WAIT, || async {
        probe(&check(host_port), localhost, no_exec).await.ok()
    })
    .await;
    // The body, to be sure it is busybox's httpd serving the image's file.
    let body = http_body(host_port).await;
    assert!(body.contains("berth test image"), "{body}");

    // Directly at the container's address, as health probes do.
    let addr = rt.probe_addr(&id).await.unwrap();
    assert_ne!(addr, localhost);
    probe(&check(8080), addr, no_exec).await.unwrap();
    let err = probe(
        &HealthCheck { http: Some(HttpProbe { port: 8080, path: "/nope".into() }), ..check(8080) },
        addr,
        no_exec,
    )
    .await
    .unwrap_err();
    assert!(err.contains("status 404"), "{err}");

    let inspected = rt.client().inspect_container(&DockerRuntime::container_name(&id), None).await.unwrap();
    let exposed = inspected.config.unwrap().exposed_ports.unwrap_or_default();
    assert!(exposed.contains(&"8080/tcp".to_string()) && exposed.contains(&"9999/udp".to_string()), "{exposed:?}");

    rt.stop(&id, Duration::from_secs(10)).await.unwrap();
    wait_exited(&rt, &id).await;
}

async fn http_body(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.unwrap();
    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, conn.read_to_string(&mut out)).await.unwrap().unwrap();
    out
}

#[tokio::test]
async fn exec_runs_in_the_container_with_a_timeout() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("exec");
    rt.start(&id, &spec("echo ready; exec /bin/busybox sleep 600")).await.unwrap();
    wait_running(&rt, &id).await;
    let argv = |s: &str| -> Vec<String> { vec!["/bin/busybox".into(), "sh".into(), "-c".into(), s.into()] };
    let t = Duration::from_secs(20);
    assert_eq!(rt.exec(&id, &argv("true"), t).await.unwrap(), 0);
    assert_eq!(rt.exec(&id, &argv("echo noise; exit 7"), t).await.unwrap(), 7);
    // It runs inside the container: the image's file is there.
    assert_eq!(rt.exec(&id, &argv("test -f /www/index.html"), t).await.unwrap(), 0);
    assert_ne!(rt.exec(&id, &["/no/such/binary".to_string()], t).await.unwrap(), 0);

    let started = Instant::now();
    let err = rt.exec(&id, &argv("sleep 77"), Duration::from_millis(500)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(err.to_string().contains("did not finish"), "{err}");
    // The overrun command was killed: only the task's own processes are left.
    wait_for("the timed-out exec to be killed", WAIT, || async {
        let ps = rt.exec(&id, &argv("! ps | grep -q '[s]leep 77'"), t).await.unwrap();
        (ps == 0).then_some(())
    })
    .await;

    let missing = cleanup.id("exec-missing");
    assert!(rt.exec(&missing, &argv("true"), t).await.is_err());
    rt.remove(&id).await.unwrap();
}

#[tokio::test]
async fn limits_env_workdir_labels_and_policy_reach_the_container() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("limits");
    let mut s = spec("echo \"foo=$FOO\"; pwd; echo \"$0 $1\"; exec /bin/busybox sleep 600");
    s.task.args.push("first".into());
    s.task.args.push("second".into());
    s.task.env = BTreeMap::from([("FOO".to_string(), "bar baz".to_string())]);
    s.task.workdir = Some("/tmp".to_string());
    s.task.resources = Resources {
        cpu: Cpu(250),
        memory: Memory(16 << 20),
        limits: Some(ResourceLimits { cpu: Some(Cpu(500)), memory: Some(Memory(64 << 20)), pids: None }),
    };
    rt.start(&id, &s).await.unwrap();
    let pid = wait_running(&rt, &id).await;
    assert!(pid.is_some_and(|p| p > 1), "{pid:?}");
    wait_line(&rt, &id, "foo=bar baz").await;
    let lines = logs(&rt, &id, LogQuery::default()).await;
    assert_eq!(text(&lines), ["foo=bar baz", "/tmp", "first second"]);

    let c = rt.client().inspect_container(&DockerRuntime::container_name(&id), None).await.unwrap();
    let host = c.host_config.unwrap();
    assert_eq!(host.memory, Some(64 << 20));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.restart_policy.and_then(|p| p.name).map(|n| n.to_string()), Some("no".to_string()));
    let config = c.config.unwrap();
    let labels = config.labels.unwrap();
    assert_eq!(labels.get(docker::LABEL_TASK), Some(&id));
    assert_eq!(labels.get(docker::LABEL_SERVICE).map(String::as_str), Some("web"));
    assert_eq!(labels.get(docker::LABEL_NAMESPACE).map(String::as_str), Some("default"));
    assert_eq!(labels.get(docker::LABEL_SLOT).map(String::as_str), Some("2"));
    assert_eq!(labels.get(docker::LABEL_MANAGED).map(String::as_str), Some("true"));
    // `command` replaces the entrypoint, `args` are the Cmd.
    assert_eq!(config.entrypoint.unwrap(), ["/bin/busybox", "sh", "-c"]);
    assert_eq!(config.cmd.unwrap().len(), 3);

    // The memory limit is what the kernel enforces: the cgroup says so.
    let limit = rt
        .exec(
            &id,
            &[
                "/bin/busybox".into(),
                "sh".into(),
                "-c".into(),
                "l=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max); \
                 test \"$l\" = 67108864"
                    .into(),
            ],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(limit, 0, "the container's cgroup memory limit is not 64 MiB");
}

/// The sandbox policy's defaults reach Docker: no new privileges, exactly Docker's default
/// capabilities (all dropped, the set added back, adjusted by the spec), a pids limit, and the
/// spec's user; inside, the process has no_new_privs and no capability beyond the set.
#[tokio::test]
async fn the_sandbox_policy_reaches_the_container() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("policy");
    let mut s = spec(
        "/bin/busybox grep -E '^(NoNewPrivs|CapBnd)' /proc/self/status; /bin/busybox id -u; exec /bin/busybox sleep 600",
    );
    s.task.user = Some("1000:1000".into());
    s.task.cap_drop = vec!["NET_RAW".into()];
    rt.start(&id, &s).await.unwrap();
    wait_running(&rt, &id).await;
    wait_line(&rt, &id, "1000").await;
    let lines = logs(&rt, &id, LogQuery::default()).await;
    let out = text(&lines);
    assert!(out.iter().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')), "{out:?}");
    let c = rt.client().inspect_container(&DockerRuntime::container_name(&id), None).await.unwrap();
    let host = c.host_config.unwrap();
    assert_eq!(host.security_opt.unwrap_or_default(), ["no-new-privileges"]);
    assert_eq!(host.cap_drop.unwrap_or_default(), ["ALL"]);
    let added = host.cap_add.unwrap_or_default();
    assert!(added.contains(&"CAP_KILL".to_string()) && !added.contains(&"CAP_NET_RAW".to_string()), "{added:?}");
    assert_eq!(host.pids_limit, Some(1024));
    assert_ne!(host.privileged, Some(true));
    assert_eq!(c.config.unwrap().user.as_deref(), Some("1000:1000"));
    // The bounding set is the policy's: no CAP_SYS_ADMIN (bit 21) and no CAP_NET_RAW (bit 13).
    let bnd = out.iter().find_map(|l| l.strip_prefix("CapBnd:")).map(str::trim).unwrap();
    let bits = u64::from_str_radix(bnd, 16).unwrap();
    assert_eq!(bits & (1 << 21), 0, "{bnd}");
    assert_eq!(bits & (1 << 13), 0, "{bnd}");
    assert_ne!(bits & (1 << 5), 0, "CAP_KILL kept: {bnd}");
}

/// `privileged: true` is refused by a runtime (an agent) that does not allow it.
#[tokio::test]
async fn privileged_is_refused_without_allow_privileged() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("privileged");
    let mut s = spec("true");
    s.task.privileged = true;
    match rt.start(&id, &s).await {
        Err(RuntimeError::Invalid(m)) => assert!(m.contains("--allow-privileged"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn a_fresh_runtime_adopts_running_containers_and_stops_them() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("adopt");
    let script = "i=0; while true; do i=$((i+1)); echo tick $i; /bin/busybox sleep 0.1; done";
    rt.start(&id, &spec(script)).await.unwrap();
    let pid = wait_running(&rt, &id).await;
    drop(rt);

    // After an "agent restart": a new client finds the same container, unchanged.
    let fresh = DockerRuntime::connect().await.unwrap();
    assert!(fresh.list().await.unwrap().contains(&id));
    assert_eq!(wait_running(&fresh, &id).await, pid);
    fresh.start(&id, &spec(script)).await.unwrap();
    assert_eq!(wait_running(&fresh, &id).await, pid, "start of a running task must not restart it");

    // Follow: new lines keep coming.
    let mut follow = fresh.logs(&id, LogQuery { tail: Some(1), since_ms: None, follow: true }).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let line = tokio::time::timeout(WAIT, follow.next()).await.expect("a followed line").expect("stream open");
        seen.push(line);
    }
    let ticks: Vec<u64> =
        seen.iter().map(|l| l.line.strip_prefix("tick ").expect("a tick").parse().expect("a number")).collect();
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");

    // SIGTERM reaches the shell (Docker's init is PID 1): it stops well before the grace.
    let started = Instant::now();
    fresh.stop(&id, Duration::from_secs(20)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "stop took {:?}", started.elapsed());
    let (code, message) = wait_exited(&fresh, &id).await;
    assert_eq!(code, 128 + 15, "{message}");
    assert!(message.contains("signal 15"), "{message}");
    // The followed stream ends with the task.
    let rest = tokio::time::timeout(WAIT, follow.collect::<Vec<_>>()).await.expect("the stream ends");
    assert!(rest.iter().all(|l| l.line.starts_with("tick ")));
}

#[tokio::test]
async fn logs_tail_and_since() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("logs");
    rt.start(&id, &spec("for i in 1 2 3 4 5; do echo line $i; /bin/busybox sleep 0.05; done")).await.unwrap();
    wait_exited(&rt, &id).await;
    let all = logs(&rt, &id, LogQuery::default()).await;
    assert_eq!(text(&all), ["line 1", "line 2", "line 3", "line 4", "line 5"]);
    assert!(all.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));

    let tail = logs(&rt, &id, LogQuery { tail: Some(2), ..Default::default() }).await;
    assert_eq!(text(&tail), ["line 4", "line 5"]);
    let since = all[2].ts_ms;
    let from3 = logs(&rt, &id, LogQuery { since_ms: Some(since), ..Default::default() }).await;
    assert!(from3.iter().all(|l| l.ts_ms >= since));
    assert!(text(&from3).ends_with(&["line 3", "line 4", "line 5"]), "{:?}", text(&from3));
    let both = logs(&rt, &id, LogQuery { tail: Some(1), since_ms: Some(since), follow: false }).await;
    assert_eq!(text(&both), ["line 5"]);
    let none = logs(&rt, &id, LogQuery { since_ms: Some(docker_now_ms() + 60_000), ..Default::default() }).await;
    assert!(none.is_empty());
    // Follow on an ended task returns what there is and ends.
    let followed =
        tokio::time::timeout(WAIT, logs(&rt, &id, LogQuery { tail: Some(2), since_ms: Some(since), follow: true }))
            .await
            .expect("a followed stream of an ended task ends");
    assert_eq!(text(&followed), ["line 4", "line 5"]);
}

#[tokio::test]
async fn start_starts_a_created_container_and_refuses_foreign_ones() {
    use bollard::models::ContainerCreateBody;
    use bollard::query_parameters::CreateContainerOptionsBuilder;
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();

    // Created by a previous agent that died before starting it.
    let id = cleanup.id("created");
    let name = DockerRuntime::container_name(&id);
    let body = |labels: Vec<(&str, &str)>| ContainerCreateBody {
        image: Some(IMAGE.to_string()),
        cmd: Some(vec!["/bin/busybox".into(), "sleep".into(), "600".into()]),
        labels: Some(labels.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..Default::default()
    };
    let opts = CreateContainerOptionsBuilder::new().name(&name).build();
    let labels = vec![(docker::LABEL_TASK, id.as_str()), (docker::LABEL_MANAGED, "true")];
    rt.client().create_container(Some(opts), body(labels)).await.unwrap();
    assert!(matches!(rt.inspect(&id).await.unwrap(), Observed::Exited { code: -1, .. }));
    rt.start(&id, &spec("exit 9")).await.unwrap();
    wait_running(&rt, &id).await;

    // A container of that name that is not berth's is left alone.
    let foreign = cleanup.id("foreign");
    let opts = CreateContainerOptionsBuilder::new().name(&DockerRuntime::container_name(&foreign)).build();
    rt.client().create_container(Some(opts), body(vec![])).await.unwrap();
    let err = rt.start(&foreign, &spec("true")).await.unwrap_err();
    assert!(err.to_string().contains("does not manage"), "{err}");
    assert!(!rt.list().await.unwrap().contains(&foreign));
}

#[tokio::test]
async fn an_absent_image_is_an_invalid_spec_that_says_how_to_load_it() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("noimage");
    let mut s = spec("true");
    s.task.image = Some("berth-test/absent-image:never".to_string());
    match rt.start(&id, &s).await {
        Err(RuntimeError::Invalid(msg)) => {
            assert!(msg.contains("berth-test/absent-image:never"), "{msg}");
            assert!(msg.contains("not present on this node"), "{msg}");
            assert!(msg.contains("docker load"), "{msg}");
            assert!(msg.contains("docker build"), "{msg}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(rt.inspect(&id).await.unwrap(), Observed::Missing);

    s.task.image = None;
    assert!(matches!(rt.start(&id, &s).await, Err(RuntimeError::Invalid(_))));
    assert!(matches!(rt.start("bad/id", &spec("true")).await, Err(RuntimeError::Invalid(_))));
}

#[tokio::test]
async fn a_missing_program_ends_the_task_with_127() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("nocmd");
    let mut s = spec("");
    s.task.command = vec!["/no/such/program".into()];
    s.task.args = vec![];
    // Docker's init starts, then fails to run the program.
    rt.start(&id, &s).await.unwrap();
    let (code, message) = wait_exited(&rt, &id).await;
    assert_eq!(code, 127, "{message}");
    assert!(message.contains("not found"), "{message}");
    let lines = logs(&rt, &id, LogQuery::default()).await;
    assert!(lines.iter().any(|l| l.line.contains("/no/such/program")), "{lines:?}");
}

#[tokio::test]
async fn a_start_that_fails_leaves_no_container() {
    let rt = runtime().await;
    let mut cleanup = Cleanup::new();
    let id = cleanup.id("portbusy");
    // The host port is taken: Docker creates the container but cannot start it.
    let taken = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let mut s = spec("exec /bin/busybox sleep 600");
    s.task.ports = vec![PortSpec {
        name: None,
        container: 80,
        published: Some(taken.local_addr().unwrap().port()),
        protocol: Protocol::Tcp,
        mode: None,
    }];
    let err = rt.start(&id, &s).await.unwrap_err();
    assert!(err.to_string().contains("starting container"), "{err}");
    assert_eq!(rt.inspect(&id).await.unwrap(), Observed::Missing);
    // Once the port is free, the same start works.
    drop(taken);
    rt.start(&id, &s).await.unwrap();
    wait_running(&rt, &id).await;
}

#[tokio::test]
async fn an_unreachable_daemon_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    match DockerRuntime::connect_socket(socket.to_str().unwrap()).await {
        Err(RuntimeError::Unavailable(msg)) => assert!(msg.contains("unreachable"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}
