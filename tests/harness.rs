//! Test harness: starts real `berth master` processes on free loopback ports, drives them with the
//! real `berth` CLI, waits on conditions (never fixed sleeps), and kills every process it started
//! when dropped, even when a test fails.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

#[path = "gluster.rs"]
pub mod gluster;
#[path = "tls_checks.rs"]
mod tls_checks;
pub use tls_checks::{
    Flood, agent_refused_before_the_body, bad_frames_close_the_session, join_as_version, pre_auth_flood, rss_kib,
    tls_checks, watches_are_bounded_per_client,
};

/// The `berth` binary: `$BERTH_BIN`, or `target/<profile>/berth` next to this test binary.
pub fn berth_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BERTH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/cluster-xxxx -> target/debug/berth
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("berth");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p berth-cli` (deploy/test.sh does), or set BERTH_BIN",
        bin.display()
    );
    bin
}

/// A free TCP port on loopback (bound and released; the kernel does not hand it out again soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port()
}

/// Polls `f` until it returns Some, or fails after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// `berth pki init --out dir`.
pub fn pki_init(dir: &Path) -> Result<()> {
    let out = Command::new(berth_bin()).args(["pki", "init", "--out"]).arg(dir).output()?;
    if !out.status.success() {
        bail!("berth pki init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The environment that gives the CLI the admin credentials in `pki`.
pub fn admin_env(pki: &Path) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("BERTH_CA_CERT", pki.join("ca.crt")),
        ("BERTH_CERT", pki.join("admin.crt")),
        ("BERTH_KEY", pki.join("admin.key")),
    ]
}

pub struct MasterProc {
    pub id: u64,
    pub endpoint: String,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
}

impl MasterProc {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub masters: BTreeMap<u64, MasterProc>,
    pub extra_args: Vec<String>,
    /// The binary masters are started from (None: [`berth_bin`]); the upgrade test starts an
    /// earlier release's, then this one's.
    pub master_bin: Option<PathBuf>,
}

impl Cluster {
    /// Starts `n` masters (ids 1..=n) as a new cluster on loopback and waits for a leader.
    pub fn start(n: u64, extra_args: &[&str]) -> Result<Self> {
        Cluster::start_on(n, "127.0.0.1", extra_args)
    }

    /// The output of `berth pki init` for this cluster: CA and admin credentials.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub fn initial_cluster(&self) -> String {
        self.masters.values().map(|m| format!("{}={}", m.id, m.endpoint)).collect::<Vec<_>>().join(",")
    }

    /// Starts master `id` with `--data-dir` plus `args`.
    pub fn spawn(&mut self, id: u64, args: &[&str]) -> Result<()> {
        let m = self.masters.get_mut(&id).ok_or_else(|| anyhow!("no master {id}"))?;
        std::fs::create_dir_all(&m.data_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(m.data_dir.join("master.log"))?;
        let child = Command::new(self.master_bin.clone().unwrap_or_else(berth_bin))
            .arg("master")
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen")
            .arg(&m.endpoint)
            .args(args)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting berth master")?;
        m.child = Some(child);
        Ok(())
    }

    /// Adds a master entry (not started) for a new member.
    pub fn add_entry(&mut self, id: u64) -> &MasterProc {
        let endpoint = format!("127.0.0.1:{}", free_port());
        let data_dir = self.dir.path().join(format!("master-{id}"));
        self.masters.insert(id, MasterProc { id, endpoint, data_dir, child: None });
        &self.masters[&id]
    }

    pub fn endpoints(&self) -> String {
        self.masters.values().filter(|m| m.child.is_some()).map(|m| m.endpoint.clone()).collect::<Vec<_>>().join(",")
    }

    /// Runs the CLI against the running masters.
    pub fn berth(&self, args: &[&str]) -> Output {
        self.berth_at(&self.endpoints(), args)
    }

    pub fn berth_at(&self, endpoints: &str, args: &[&str]) -> Output {
        Command::new(berth_bin())
            .args(args)
            .arg("--endpoints")
            .arg(endpoints)
            .envs(admin_env(&self.pki_dir()))
            .stdin(Stdio::null())
            .output()
            .expect("running the berth CLI")
    }

    /// Runs the CLI and parses its JSON output; fails with its stderr when it exits non-zero.
    pub fn berth_json(&self, args: &[&str]) -> Result<Value> {
        json_output(args, |a| self.berth(a))
    }

    pub fn leader(&self) -> Option<u64> {
        let v = self.berth_json(&["cluster", "status"]).ok()?;
        let l = v["leader"].as_u64()?;
        (l != 0).then_some(l)
    }

    pub fn wait_leader(&self, timeout: Duration) -> Result<u64> {
        wait_for(timeout, "a leader", || self.leader())
    }

    pub fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.masters.get_mut(&id).and_then(|m| m.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self, id: u64) -> Result<()> {
        if let Some(mut c) = self.masters.get_mut(&id).and_then(|m| m.child.take()) {
            let pid = c.id() as libc::pid_t;
            // The pid is our own child's, still unreaped, so it cannot have been reused.
            let rc = Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
            if !rc.success() {
                bail!("kill -TERM {pid} failed");
            }
            let status =
                wait_for(Duration::from_secs(20), "master to exit after SIGTERM", || c.try_wait().ok().flatten());
            if status.is_err() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let status = status?;
            // A graceful stop must be clean: no abort while closing RocksDB, no error exit.
            if !status.success() {
                bail!("master {id} exited with {status} after SIGTERM");
            }
        }
        Ok(())
    }

    /// Puts `key=value` through the CLI; true when acknowledged.
    pub fn put(&self, key: &str, value: &str) -> bool {
        self.berth(&["kv", "put", key, value]).status.success()
    }

    /// Every key-value under `prefix`, read linearizably.
    pub fn get_prefix(&self, prefix: &str) -> Result<BTreeMap<String, String>> {
        let v = self.berth_json(&["kv", "get", prefix, "--prefix"])?;
        Ok(v["kvs"]
            .as_array()
            .ok_or_else(|| anyhow!("no kvs in {v}"))?
            .iter()
            .map(|kv| {
                (
                    kv["key"].as_str().unwrap_or_default().to_string(),
                    kv["value"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(self.masters[&id].data_dir.join("master.log")).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in self.masters.values_mut() {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            // Keep the evidence: print where the logs were and what they said last.
            for m in self.masters.values() {
                let log = std::fs::read_to_string(m.data_dir.join("master.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                eprintln!("--- master {} log (last 30 lines, newest first) ---\n{}", m.id, tail.join("\n"));
            }
        }
    }
}

/// A `berth agent` child process, killed when dropped together with every task it started (the
/// tasks' supervisors run in their own process groups, so that they outlive a real agent).
pub struct AgentProc {
    pub child: Option<Child>,
    pub dir: PathBuf,
}

impl AgentProc {
    /// kill -9 of the agent alone (its tasks keep running, as they would in production).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills every task process this agent's process runtime started, and its edge router.
    pub fn kill_tasks(&self) {
        self.remove_containers();
        // HAProxy runs in a process group of its own, its master's pid.
        if let Ok(text) = std::fs::read_to_string(self.dir.join("edge").join("haproxy.pid"))
            && let Some(pid) = text.lines().next().and_then(|l| l.trim().parse::<i64>().ok()).filter(|p| *p > 1)
        {
            signal(-pid, "KILL");
        }
        let Ok(dirs) = std::fs::read_dir(self.dir.join("tasks")) else { return };
        for d in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(d.path().join("state.json")) else { continue };
            let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
            for (who, group) in [("task", false), ("launcher", true), ("shim", true)] {
                if let Some(pid) = v[who]["pid"].as_i64().filter(|p| *p > 1) {
                    let target = if group { -pid } else { pid };
                    signal(target, "KILL");
                }
            }
        }
    }

    /// Removes the docker containers this agent made (labelled with its data directory as
    /// owner), when there are any and docker is installed.
    pub fn remove_containers(&self) {
        let Ok(owner) = std::path::absolute(&self.dir) else { return };
        let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=berth.owner={}", owner.display())])
            .stderr(Stdio::null())
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).stdout(Stdio::null()).status();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
        self.kill_tasks();
        self.unmount_storage();
    }
}

impl AgentProc {
    /// Unmounts what this agent's tasks had mounted on its host (volumes under its data dir,
    /// GlusterFS mounts, the secrets tmpfs of each task under `/run/berth/<node id>`), which a
    /// real agent keeps across its own restarts but a test must not leave behind.
    pub fn unmount_storage(&self) {
        // A handle whose directory was cleared (a test that keeps the agent's tasks) owns
        // nothing here.
        let Ok(dir) = std::path::absolute(&self.dir) else { return };
        if self.dir.as_os_str().is_empty() {
            return;
        }
        // Sandboxed tasks' roots (image overlays) and the OCI runtime's state live outside the
        // data dir, on the host's /run.
        let sandbox = berth_agent::driver::process::sandbox_base(&dir.join("tasks"));
        let mut roots = vec![sandbox.clone(), dir];
        if let Ok(state) = std::fs::read_to_string(self.dir.join("agent.json"))
            && let Ok(v) = serde_json::from_str::<Value>(&state)
            && let Some(id) = v["node_id"].as_str().filter(|id| !id.is_empty())
        {
            roots.push(PathBuf::from("/run/berth").join(id));
        }
        unmount_under(&roots);
        // Removed once nothing is mounted under it any more (removing through a mount would
        // reach into what is mounted).
        if sandbox.components().count() >= 4 && !mounted_under(&sandbox) {
            let _ = std::fs::remove_dir_all(&sandbox);
        }
    }
}

/// Whether anything is mounted at or under `root`.
fn mounted_under(root: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").map_or(true, |info| {
        info.lines().filter_map(|l| l.split(' ').nth(4)).any(|p| Path::new(&p.replace("\\040", " ")).starts_with(root))
    })
}

/// Unmounts every mount point under any of `roots`, deepest first (a loop mount's device goes
/// with it).
pub fn unmount_under(roots: &[PathBuf]) {
    // Never a root that would take the host's own mounts along: only directories at least two
    // levels deep (a test's temporary directory, /run/berth/<id>).
    let roots: Vec<&PathBuf> = roots.iter().filter(|r| r.is_absolute() && r.components().count() >= 3).collect();
    if roots.is_empty() {
        return;
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| roots.iter().any(|r| p.starts_with(r)))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = Command::new("umount").arg(&p).stderr(Stdio::null()).status();
    }
}

/// `berth ARGS` that must succeed: its standard output, or an error with its standard error.
pub fn berth_ok(c: &Cluster, args: &[&str]) -> Result<String> {
    let out = c.berth(args);
    if !out.status.success() {
        bail!("berth {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `berth apply` of `yaml` (written to `dir/NAME.yaml`) that must be refused: its standard error.
pub fn refused(c: &Cluster, dir: &Path, name: &str, yaml: &str) -> Result<String> {
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml)?;
    let out = c.berth(&["apply", "-f", &f.to_string_lossy()]);
    if out.status.success() {
        bail!("apply {name} was accepted: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Starts `berth agent` joining `c` (with `token` on its first start), output in `<dir>.log`.
pub fn spawn_agent(c: &Cluster, dir: &Path, name: &str, token: Option<&str>, extra: &[&str]) -> Result<AgentProc> {
    spawn_agent_from(&berth_bin(), c, dir, name, token, extra)
}

/// [`spawn_agent`] from the binary `bin`.
pub fn spawn_agent_from(
    bin: &Path,
    c: &Cluster,
    dir: &Path,
    name: &str,
    token: Option<&str>,
    extra: &[&str],
) -> Result<AgentProc> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log"))?;
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--join", &c.endpoints(), "--data-dir"]).arg(dir).args(["--name", name]).args(extra);
    if let Some(t) = token {
        cmd.env("BERTH_JOIN_TOKEN", t);
    }
    let child = cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
    Ok(AgentProc { child: Some(child), dir: dir.to_path_buf() })
}

/// `berth token create ARGS`, returning the token.
pub fn token(c: &Cluster, args: &[&str]) -> Result<String> {
    let mut a = vec!["token", "create"];
    a.extend(args);
    let out = c.berth(&a);
    if !out.status.success() {
        bail!("token create: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// `kill -SIG -- target` (a negative target is a process group). Only for processes the tests
/// started.
pub fn signal(target: i64, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// `berth apply -f` of `yaml`, written first to `dir/<name>.yaml`; what apply printed.
pub fn apply(c: &Cluster, dir: &Path, name: &str, yaml: &str) -> Result<String> {
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml)?;
    let out = c.berth(&["apply", "-f", &f.to_string_lossy()]);
    if !out.status.success() {
        bail!("apply {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The tasks of `service` (`berth get tasks --service S -o json`; empty when the call fails).
pub fn tasks(c: &Cluster, service: &str) -> Vec<Value> {
    c.berth_json(&["get", "tasks", "--service", service]).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// Three masters, a token, and agents `(name, zone)`.
pub fn cluster_with_agents(agents: &[(&str, &str)], master_args: &[&str]) -> Result<(Cluster, Vec<AgentProc>)> {
    let c = Cluster::start(3, master_args)?;
    c.wait_leader(Duration::from_secs(60))?;
    let t = token(&c, &["--uses", "100"])?;
    let mut procs = Vec::new();
    for (name, zone) in agents {
        let dir = c.dir.path().join(name);
        procs.push(spawn_agent(&c, &dir, name, Some(&t), &["--labels", &format!("zone={zone}")])?);
    }
    wait_for(Duration::from_secs(60), "every agent ready", || {
        let ns = c.berth_json(&["get", "nodes"]).ok()?;
        let ready = ns.as_array()?.iter().filter(|n| n["status"] == "ready").count();
        (ready == agents.len()).then_some(())
    })?;
    Ok((c, procs))
}

/// Hosts for network tests: network namespaces joined by veth pairs to a bridge in a "switch"
/// namespace of their own (as the chaos suite's hosts are: a bridge in the root namespace would
/// send the hosts' traffic through the root namespace's firewall, Docker's included), each with
/// its own underlay address in 198.19.<k>.0/24 (198.18.0.0/15 is set aside for benchmarking). The
/// root namespace joins the switch too, as 198.19.<k>.1; host i is 198.19.<k>.(10 + i). Torn
/// down when dropped. Root only.
pub struct Hosts {
    pub k: u8,
    pub count: usize,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Hosts {
    pub fn new(count: usize) -> Result<Hosts> {
        // A /24 no interface here uses yet: the test's own, whatever else runs.
        let used = String::from_utf8_lossy(&Command::new("ip").args(["-4", "addr"]).output()?.stdout).into_owned();
        let start = std::process::id() as u16;
        let k = (0..123u16)
            .map(|off| 128 + ((start.wrapping_add(off)) % 123) as u8)
            .find(|k| !used.contains(&format!("198.19.{k}.")) && !Path::new(&format!("/run/netns/bh{k}-sw")).exists())
            .ok_or_else(|| anyhow!("no free 198.19.x.0/24 for test hosts"))?;
        let hosts = Hosts { k, count };
        let sw = hosts.switch();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        // The root namespace's port on the switch.
        let root_if = format!("bh{k}r");
        ip(&["link", "add", &root_if, "type", "veth", "peer", "name", "rootport"])?;
        ip(&["link", "set", "rootport", "netns", &sw])?;
        ip(&["-n", &sw, "link", "set", "rootport", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{}/24", hosts.root_addr()), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        for i in 0..count {
            let ns = hosts.ns(i);
            let port = format!("h{i}");
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", hosts.addr(i)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    fn switch(&self) -> String {
        format!("bh{}-sw", self.k)
    }

    /// Host i's namespace name (`ip netns`).
    pub fn ns(&self, i: usize) -> String {
        format!("bh{}-{i}", self.k)
    }

    /// Host i's underlay address.
    pub fn addr(&self, i: usize) -> String {
        format!("198.19.{}.{}", self.k, 10 + i)
    }

    /// The root namespace's address on the hosts' switch (where the masters listen).
    pub fn root_addr(&self) -> String {
        format!("198.19.{}.1", self.k)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 0..self.count {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        // Deleting the switch removes its bridge and the root namespace's port with it.
        let _ = ip(&["netns", "del", &self.switch()]);
    }
}

impl Cluster {
    /// Starts `n` masters (ids 1..=n) listening on `addr` (loopback, or the root namespace's
    /// address on test hosts' switch) as a new cluster and waits for a leader.
    pub fn start_on(n: u64, addr: &str, extra_args: &[&str]) -> Result<Self> {
        Cluster::start_from(n, addr, extra_args, None)
    }

    /// Starts `n` masters on loopback from the binary `bin` (the upgrade test's earlier release).
    pub fn start_with_bin(n: u64, bin: &Path) -> Result<Self> {
        Cluster::start_from(n, "127.0.0.1", &[], Some(bin.to_path_buf()))
    }

    fn start_from(n: u64, addr: &str, extra_args: &[&str], master_bin: Option<PathBuf>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("berth-test-").tempdir()?;
        pki_init(&dir.path().join("pki"))?;
        let mut c = Cluster {
            dir,
            masters: BTreeMap::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            master_bin,
        };
        for id in 1..=n {
            let endpoint = format!("{addr}:{}", free_port());
            let data_dir = c.dir.path().join(format!("master-{id}"));
            c.masters.insert(id, MasterProc { id, endpoint, data_dir, child: None });
        }
        let initial = c.initial_cluster();
        let pki = c.pki_dir().display().to_string();
        for id in 1..=n {
            c.spawn(id, &["--id", &id.to_string(), "--initial-cluster", &initial, "--pki-dir", &pki])?;
        }
        c.wait_leader(Duration::from_secs(30))?;
        Ok(c)
    }
}

/// Starts `berth agent` inside host `i` of `hosts`, advertising the host's underlay address.
pub fn spawn_agent_on(hosts: &Hosts, i: usize, c: &Cluster, dir: &Path, name: &str, token: &str) -> Result<AgentProc> {
    spawn_agent_on_with(hosts, i, c, dir, name, token, &[])
}

/// [`spawn_agent_on`] with more `berth agent` arguments.
pub fn spawn_agent_on_with(
    hosts: &Hosts,
    i: usize,
    c: &Cluster,
    dir: &Path,
    name: &str,
    token: &str,
    extra: &[&str],
) -> Result<AgentProc> {
    std::fs::create_dir_all(dir)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log"))?;
    // nsenter, not `ip netns exec`: the latter gives the agent a mount namespace of its own, so
    // the task namespaces it bind-mounts would vanish from view when it restarts.
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", hosts.ns(i)))
        .arg(berth_bin())
        .args(["agent", "--join", &c.endpoints(), "--data-dir"])
        .arg(dir)
        .args(["--name", name, "--advertise-addr", &hosts.addr(i)])
        .args(extra)
        .env("BERTH_JOIN_TOKEN", token)
        .env("BERTH_LOG", "info,hickory_server=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(AgentProc { child: Some(child), dir: dir.to_path_buf() })
}

/// Whether this process runs as root (its effective uid, from /proc).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Builds the docker runtime's test image (`berth-test/busybox:1`, see `deploy/test-image.sh`)
/// once per test process.
pub fn docker_test_image() -> Result<&'static str> {
    static BUILT: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/test-image.sh");
        let out = Command::new("bash").arg(&script).output().map_err(|e| format!("{}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{} failed ({}): {}", script.display(), out.status, String::from_utf8_lossy(&out.stderr)))
        }
    });
    match built {
        Ok(()) => Ok("berth-test/busybox:1"),
        Err(e) => bail!("the test image could not be built: {e}"),
    }
}

/// A `berth dev` cluster, stopped (SIGTERM: it stops its masters and agents) when dropped.
pub struct Dev {
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Dev {
    /// Starts `berth dev --no-hosts` with `agents` agents (temp dir named after `prefix`) and
    /// waits until every agent is a ready node.
    pub fn start(prefix: &str, agents: usize) -> Result<Dev> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        // Three consecutive free ports for the masters.
        let base = wait_for(Duration::from_secs(10), "three consecutive free ports", || {
            let p = free_port();
            (p < 65000 && (1..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok())).then_some(p)
        })?;
        let log = std::fs::File::create(dir.path().join("dev.log"))?;
        let child = Command::new(berth_bin())
            .args(["dev", "--no-hosts", "--agents", &agents.to_string(), "--base-port", &base.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("cluster"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting berth dev")?;
        let dev = Dev { dir, child };
        wait_for(Duration::from_secs(90), "berth dev to write cluster.json and its agents to be ready", || {
            let c = dev.cluster().ok()?;
            let nodes = dev.berth_json(&["get", "nodes"]).ok()?;
            let ready = nodes.as_array()?.iter().filter(|n| n["status"] == "ready").count();
            (c["agents"].as_array()?.len() == agents && ready == agents).then_some(())
        })
        .map_err(|e| anyhow!("{e}; berth dev said:\n{}", dev.log()))?;
        Ok(dev)
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("cluster")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dev.log")).unwrap_or_default()
    }

    pub fn cluster(&self) -> Result<Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(self.root().join("cluster.json"))?)?)
    }

    pub fn berth(&self, args: &[&str]) -> std::process::Output {
        Command::new(berth_bin())
            .args(args)
            .env("BERTH_CONFIG", self.root().join("berth.toml"))
            .stdin(Stdio::null())
            .output()
            .expect("running the berth CLI")
    }

    pub fn berth_json(&self, args: &[&str]) -> Result<Value> {
        json_output(args, |a| self.berth(a))
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        // Its own child: SIGTERM makes it stop the masters and agents it started.
        signal(self.child.id() as i64, "TERM");
        let stopped = wait_for(Duration::from_secs(30), "berth dev to stop", || self.child.try_wait().ok().flatten());
        if stopped.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Tasks outlive their agents (as in production): the harness's agent handles end them.
        for name in ["agent-1", "agent-2", "agent-3"] {
            drop(AgentProc { child: None, dir: self.root().join(name) });
        }
        if std::thread::panicking() {
            eprintln!("--- berth dev output ---\n{}", self.log());
        }
    }
}

/// Runs `berth ARGS -o json` through `run` and parses its output; fails with its stderr when it
/// exits non-zero.
fn json_output(args: &[&str], run: impl FnOnce(&[&str]) -> Output) -> Result<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = run(&a);
    if !out.status.success() {
        bail!("berth {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
