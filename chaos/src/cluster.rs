//! The cluster under test: real `berth master` processes (each in its own network namespace when
//! the suite runs as root, else on loopback ports), real `berth agent` processes running real
//! process tasks, and one process of simulated agents. Every process runs in its own process group
//! so that a fault signals the whole of it (a master under strace is two processes), and every
//! process is killed when the cluster is dropped, also when the run fails.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use berth_api::pb;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::net::{Host, Net};

/// The gRPC (and QUIC) port of masters in their own namespaces.
const NS_PORT: u16 = 7400;
/// The size of each master's tmpfs data dir (for the disk-full fault).
pub const DATA_TMPFS_MB: u64 = 384;

/// How a master process is started.
#[derive(Clone, Debug, PartialEq)]
pub enum Launch {
    Normal,
    /// Under strace, failing every fsync and fdatasync with EIO after the first `after` calls.
    FsyncEio {
        after: u32,
    },
    /// Under libfaketime, with the wall clock moved by `offset_s` seconds (monotonic time untouched).
    Skewed {
        offset_s: i64,
    },
}

pub struct Master {
    pub id: u64,
    pub endpoint: String,
    pub ip: Ipv4Addr,
    pub host: Option<Host>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub launch: Launch,
    pub paused: bool,
    /// Whether the data dir is a tmpfs mount of ours (unmounted on drop).
    pub tmpfs: bool,
    /// First start: the founding flags or the join flags; later starts need only the data dir.
    started_once: bool,
    first_args: Vec<String>,
}

pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub host: Option<Host>,
    pub child: Option<Child>,
}

pub struct Options {
    pub masters: u64,
    pub agents: usize,
    pub simulated: usize,
    pub node_down_grace: Duration,
    /// Extra `berth master` flags (e.g. timeouts), for every master.
    pub master_args: Vec<String>,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub berth: PathBuf,
    pub net: Option<Net>,
    pub masters: BTreeMap<u64, Master>,
    pub agents: Vec<Agent>,
    pub simulated: Option<Child>,
    pub tls: ClientTlsConfig,
    pub opts: Options,
    token: String,
    next_host: u8,
}

/// The `berth` binary: `$BERTH_BIN`, or `berth` beside this executable.
pub fn berth_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("BERTH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("executable dir")?.join("berth");
    if !bin.exists() {
        bail!("{} not found: build it with `cargo build -p berth-cli` (same profile), or set BERTH_BIN", bin.display());
    }
    Ok(bin)
}

/// A free TCP port on loopback for a server this harness starts, taken from below the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`). A port from `bind(0)` is one the kernel may
/// hand out again as the source port of any outgoing connection (a peer dialling another peer)
/// before the server binds it; then the server cannot start. Ports below the range are never
/// picked that way, so only another listener can race for one, and a bind check rules out the
/// ones already taken.
pub fn free_port() -> Result<u16> {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = if low > 12_000 { (10_000, low) } else { (low.saturating_sub(2000).max(1024), low) };
    if from >= to {
        // No room below the ephemeral range: the kernel's choice, as before.
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(from..to);
        // Masters serve QUIC on the same port number over UDP.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    bail!("no free TCP and UDP port on 127.0.0.1 between {from} and {to} after 200 tries")
}

/// Sends `sig` to the process group led by `child` (each process here leads its own group).
pub fn signal_group(child: &Child, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{}", child.id()))
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits (up to `timeout`) until no process holds RocksDB's lock on the database under
/// `data_dir`. Reaping the child is not enough: under `strace` or `nsenter` the child is a wrapper,
/// and the killed `berth` process may still be tearing down, holding its files, when the wrapper
/// has already been reaped. RocksDB locks with `fcntl` record locks, which the kernel lists in
/// /proc/locks by inode.
fn wait_db_unlocked(data_dir: &Path, timeout: Duration) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(data_dir.join("db").join("LOCK")) else {
        return true; // no database yet
    };
    let deadline = Instant::now() + timeout;
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if !lock_held(&locks, meta.dev(), meta.ino()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether /proc/locks (`1: POSIX  ADVISORY  WRITE 2544 00:2f:1234 0 EOF`: the device's major and
/// minor in hex, then the inode) lists a lock on the file `(dev, inode)`. Both count: every
/// master's data dir is a tmpfs of its own, where the LOCK files all have the same inode.
fn lock_held(proc_locks: &str, dev: u64, inode: u64) -> bool {
    // Linux's dev_t encoding (glibc's gnu_dev_major / gnu_dev_minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    proc_locks.lines().any(|l| {
        l.split_whitespace().find_map(|f| {
            let mut parts = f.split(':');
            let (ma, mi, ino) = (parts.next()?, parts.next()?, parts.next()?);
            (parts.next().is_none() && !ma.is_empty()).then_some(())?;
            Some(
                u64::from_str_radix(ma, 16) == Ok(major)
                    && u64::from_str_radix(mi, 16) == Ok(minor)
                    && ino.parse() == Ok(inode),
            )
        }) == Some(true)
    })
}

fn kill_child(child: &mut Child) {
    signal_group(child, "CONT");
    signal_group(child, "KILL");
    let _ = child.kill();
    let _ = child.wait();
}

impl Cluster {
    pub async fn start(dir: &Path, opts: Options, use_net: bool, seed: u64) -> Result<Cluster> {
        let berth = berth_bin()?;
        std::fs::create_dir_all(dir)?;
        let pki = dir.join("pki");
        let out = Command::new(&berth).args(["pki", "init", "--out"]).arg(&pki).output()?;
        if !out.status.success() {
            bail!("berth pki init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let tls = client_tls(&pki)?;
        let net = if use_net { Some(Net::create(seed)?) } else { None };
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            berth,
            net,
            masters: BTreeMap::new(),
            agents: Vec::new(),
            simulated: None,
            tls,
            opts,
            token: String::new(),
            next_host: 1,
        };
        for id in 1..=c.opts.masters {
            c.add_master_entry(id)?;
        }
        let initial = c.masters.values().map(|m| format!("{}={}", m.id, m.endpoint)).collect::<Vec<_>>().join(",");
        let pki_s = pki.display().to_string();
        for m in c.masters.values_mut() {
            m.first_args = vec![
                "--id".into(),
                m.id.to_string(),
                "--initial-cluster".into(),
                initial.clone(),
                "--pki-dir".into(),
                pki_s.clone(),
            ];
        }
        for id in 1..=c.opts.masters {
            c.start_master(id)?;
        }
        c.wait_leader(Duration::from_secs(60)).await?;
        c.token = c.admin_out(&["token", "create", "--ttl", "1h", "--uses", "1000"]).await?.trim().to_string();
        for i in 0..c.opts.agents {
            c.start_agent(i)?;
        }
        if c.opts.simulated > 0 {
            let d = c.dir.join("sim-agents");
            std::fs::create_dir_all(&d)?;
            let log = std::fs::File::create(c.dir.join("sim-agents.log"))?;
            let mut cmd = Command::new(&c.berth);
            cmd.args(["agent", "--simulate", &c.opts.simulated.to_string(), "--name", "sim", "--labels", "chaos=sim"])
                .arg("--data-dir")
                .arg(&d)
                .args(["--join", &c.endpoints().join(",")])
                .env("BERTH_JOIN_TOKEN", &c.token);
            c.simulated = Some(spawn_logged(cmd, log)?);
        }
        Ok(c)
    }

    fn new_host(&mut self) -> Result<Option<Host>> {
        let n = self.next_host;
        self.next_host += 1;
        self.net.as_mut().map(|net| net.add_host(n)).transpose()
    }

    fn add_master_entry(&mut self, id: u64) -> Result<()> {
        let host = self.new_host()?;
        let (ip, endpoint) = match &host {
            Some(h) => (h.ip, format!("{}:{NS_PORT}", h.ip)),
            None => (Ipv4Addr::LOCALHOST, format!("127.0.0.1:{}", free_port()?)),
        };
        let data_dir = self.dir.join(format!("master-{id}"));
        std::fs::create_dir_all(&data_dir)?;
        // On a small tmpfs of its own when we may mount one, so that a disk can fill up.
        let tmpfs = self.net.is_some()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={DATA_TMPFS_MB}m"), "tmpfs"])
                .arg(&data_dir)
                .status()
                .is_ok_and(|s| s.success());
        let log = self.dir.join(format!("master-{id}.log"));
        self.masters.insert(
            id,
            Master {
                id,
                endpoint,
                ip,
                host,
                data_dir,
                log,
                child: None,
                launch: Launch::Normal,
                paused: false,
                tmpfs,
                started_once: false,
                first_args: Vec::new(),
            },
        );
        Ok(())
    }

    /// Starts (or restarts) master `id` the way its `launch` says.
    pub fn start_master(&mut self, id: u64) -> Result<()> {
        let berth = self.berth.clone();
        let grace = humantime::format_duration(self.opts.node_down_grace).to_string();
        let master_args = self.opts.master_args.clone();
        let m = self.masters.get_mut(&id).ok_or_else(|| anyhow!("no master {id}"))?;
        if m.child.is_some() {
            return Ok(());
        }
        // A master killed a moment ago may still hold its database; starting now would fail.
        if !wait_db_unlocked(&m.data_dir, Duration::from_secs(15)) {
            eprintln!("berth-chaos: master {id}'s database is still locked 15 s after its process was reaped");
        }
        let mut argv: Vec<String> = Vec::new();
        if let Some(h) = &m.host {
            argv.extend(Net::exec_prefix(h));
        }
        if let Launch::FsyncEio { after } = m.launch {
            argv.extend(
                [
                    "strace",
                    "-f",
                    "-qq",
                    "-o",
                    "/dev/null",
                    "-e",
                    "trace=fsync,fdatasync",
                    "-e",
                    &format!("inject=fsync,fdatasync:error=EIO:when={}+", after + 1),
                ]
                .map(String::from),
            );
        }
        argv.push(berth.display().to_string());
        argv.extend(["master", "--data-dir"].map(String::from));
        argv.push(m.data_dir.display().to_string());
        argv.extend(["--listen".into(), m.endpoint.clone()]);
        argv.extend(["--node-down-grace".into(), grace]);
        argv.extend(master_args);
        if !m.started_once {
            argv.extend(m.first_args.iter().cloned());
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if let Launch::Skewed { offset_s } = m.launch {
            cmd.env("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
                .env("FAKETIME", format!("{offset_s:+}s"))
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_NO_CACHE", "1");
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&m.log)?;
        m.child = Some(spawn_logged(cmd, log)?);
        m.started_once = true;
        m.paused = false;
        Ok(())
    }

    /// kill -9 of master `id` (its whole process group). Returns when it is gone.
    pub fn kill_master(&mut self, id: u64) {
        if let Some(m) = self.masters.get_mut(&id)
            && let Some(mut c) = m.child.take()
        {
            kill_child(&mut c);
            m.paused = false;
        }
    }

    /// SIGTERM, and kill -9 if it has not exited within 15 s.
    pub fn stop_master(&mut self, id: u64) -> Result<()> {
        let Some(m) = self.masters.get_mut(&id) else { return Ok(()) };
        let Some(mut c) = m.child.take() else { return Ok(()) };
        signal_group(&c, "CONT");
        signal_group(&c, "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        kill_child(&mut c);
        bail!("master {id} did not exit within 15 s of SIGTERM; killed it")
    }

    pub fn pause_master(&mut self, id: u64) {
        if let Some(m) = self.masters.get_mut(&id)
            && let Some(c) = &m.child
        {
            m.paused = signal_group(c, "STOP");
        }
    }

    pub fn resume_master(&mut self, id: u64) {
        if let Some(m) = self.masters.get_mut(&id)
            && let Some(c) = &m.child
        {
            signal_group(c, "CONT");
            m.paused = false;
        }
    }

    /// Whether master `id`'s process has exited on its own (and reaps it if so).
    pub fn master_exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let m = self.masters.get_mut(&id)?;
        let st = m.child.as_mut()?.try_wait().ok().flatten()?;
        m.child = None;
        Some(st)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.masters.values().map(|m| m.endpoint.clone()).collect()
    }

    pub fn channel(&self, endpoint: &str) -> Result<Channel> {
        Ok(Channel::from_shared(format!("https://{endpoint}"))?
            .tls_config(self.tls.clone())?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy())
    }

    /// Each reachable master's own view: (id, leader it knows, term).
    pub async fn views(&self) -> Vec<(u64, u64, u64)> {
        let asks = self.masters.values().filter(|m| m.child.is_some() && !m.paused).map(|m| {
            let ch = self.channel(&m.endpoint);
            let id = m.id;
            async move {
                let mut client = pb::cluster_client::ClusterClient::new(ch.ok()?);
                let mut req = tonic::Request::new(pb::StatusRequest {});
                req.set_timeout(Duration::from_millis(1500));
                let s = tokio::time::timeout(Duration::from_secs(2), client.status(req)).await.ok()?.ok()?.into_inner();
                Some((id, s.leader, s.term))
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// The leader that a majority of all members agree on, at the highest term any of them reports.
    pub async fn leader(&self) -> Option<(u64, u64)> {
        let views = self.views().await;
        let term = views.iter().map(|v| v.2).max()?;
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, leader, t) in &views {
            if *t == term && *leader != 0 {
                *votes.entry(*leader).or_default() += 1;
            }
        }
        let majority = self.voters() / 2 + 1;
        votes.into_iter().find(|(_, n)| *n >= majority).map(|(l, _)| (l, term))
    }

    pub fn voters(&self) -> usize {
        self.masters.len()
    }

    pub async fn wait_leader(&self, timeout: Duration) -> Result<(u64, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}; see the master logs in {}", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the `berth` CLI with the admin credentials against every master.
    pub async fn admin(&self, args: &[&str]) -> Result<std::process::Output> {
        let pki = self.dir.join("pki");
        let mut cmd = tokio::process::Command::new(&self.berth);
        cmd.args(args)
            .arg("--endpoints")
            .arg(self.endpoints().join(","))
            .env("BERTH_CA_CERT", pki.join("ca.crt"))
            .env("BERTH_CERT", pki.join("admin.crt"))
            .env("BERTH_KEY", pki.join("admin.key"))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        Ok(tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| anyhow!("berth {args:?} did not finish within 60 s"))??)
    }

    /// Like [`Cluster::admin`], failing with the CLI's stderr unless it exits 0; returns stdout.
    pub async fn admin_out(&self, args: &[&str]) -> Result<String> {
        let out = self.admin(args).await?;
        if !out.status.success() {
            bail!("berth {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Starts real agent number `i` (first start joins with the token).
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        if i == self.agents.len() {
            let host = self.new_host()?;
            let name = format!("agent-{}", i + 1);
            let dir = self.dir.join(&name);
            self.agents.push(Agent { name, dir, host, child: None });
        }
        let join = self.endpoints().join(",");
        let a = &mut self.agents[i];
        if a.child.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&a.dir)?;
        let mut argv: Vec<String> = a.host.as_ref().map(Net::exec_prefix).unwrap_or_default();
        argv.push(self.berth.display().to_string());
        // The token in the environment: on a command line every user of the host could read it.
        argv.extend(["agent", "--join", &join, "--name", &a.name].map(String::from));
        argv.push("--data-dir".into());
        argv.push(a.dir.display().to_string());
        argv.push("--labels".into());
        argv.push(format!("zone=zone-{},chaos=real", (i % 2) + 1));
        // The networks scenario's VIP clients are privileged: they append to a log on the
        // host, which a sandboxed task cannot see.
        argv.push("--allow-privileged".into());
        if let Some(h) = &a.host {
            argv.extend(["--advertise-addr".into(), h.ip.to_string()]);
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).env("BERTH_JOIN_TOKEN", &self.token);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(a.dir.with_extension("log"))?;
        a.child = Some(spawn_logged(cmd, log)?);
        Ok(())
    }

    /// kill -9 of real agent `i`: its process group (`nsenter` and the agent). The task shims
    /// lead process groups of their own, so the tasks keep running, as after a crash of the agent.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(a) = self.agents.get_mut(i)
            && let Some(mut c) = a.child.take()
        {
            kill_child(&mut c);
        }
    }

    /// Kills every task process that the real agents' process runtime started: those its task
    /// directories name, then any other process of a task of these agents that /proc shows (a
    /// task whose directory was removed while it still ran).
    fn kill_tasks(&self) {
        for a in &self.agents {
            let Ok(dirs) = std::fs::read_dir(a.dir.join("tasks")) else { continue };
            for d in dirs.flatten() {
                let Ok(text) = std::fs::read_to_string(d.path().join("state.json")) else { continue };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                for (who, group) in [("task", false), ("launcher", true), ("shim", true)] {
                    if let Some(pid) = v[who]["pid"].as_i64().filter(|p| *p > 1) {
                        let target = if group { -pid } else { pid };
                        let _ = Command::new("kill")
                            .arg("-KILL")
                            .arg("--")
                            .arg(target.to_string())
                            .stderr(Stdio::null())
                            .status();
                    }
                }
            }
        }
        crate::orphans::kill_all(&crate::orphans::Nodes::of(self));
    }

    /// Removes master `id` from the membership, stops it and forgets it.
    pub async fn remove_member(&mut self, id: u64) -> Result<()> {
        self.admin_out(&["member", "remove", &id.to_string()]).await?;
        self.kill_master(id);
        if let Some(m) = self.masters.remove(&id)
            && m.tmpfs
        {
            let _ = Command::new("umount").arg("-l").arg(&m.data_dir).status();
        }
        Ok(())
    }

    /// Adds a new master `id` (on a host of its own) to the running cluster as a voter.
    pub async fn add_member(&mut self, id: u64) -> Result<()> {
        self.add_master_entry(id)?;
        let endpoint = self.masters[&id].endpoint.clone();
        let pki = self.dir.join(format!("pki-{id}"));
        let out = self
            .admin(&[
                "member",
                "certificate",
                "--id",
                &id.to_string(),
                "--endpoint",
                &endpoint,
                "--out",
                &pki.display().to_string(),
            ])
            .await?;
        if !out.status.success() {
            bail!("member certificate for {id}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let m = self.masters.get_mut(&id).context("new master")?;
        m.first_args =
            vec!["--id".into(), id.to_string(), "--join".into(), "--pki-dir".into(), pki.display().to_string()];
        self.start_master(id)?;
        self.admin_out(&["member", "add", "--id", &id.to_string(), "--endpoint", &endpoint, "--promote"]).await?;
        Ok(())
    }

    /// Everything a failed run keeps: the logs are already under `dir`; copies data dirs that live
    /// on tmpfs mounts (which vanish on unmount).
    pub fn preserve(&self) {
        for m in self.masters.values() {
            if m.tmpfs {
                let dest = self.dir.join(format!("master-{}-data", m.id));
                let _ = Command::new("cp").arg("-a").arg(&m.data_dir).arg(&dest).status();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in self.masters.values_mut() {
            if let Some(mut c) = m.child.take() {
                kill_child(&mut c);
            }
        }
        for a in self.agents.iter_mut() {
            if let Some(mut c) = a.child.take() {
                kill_child(&mut c);
            }
        }
        if let Some(mut c) = self.simulated.take() {
            kill_child(&mut c);
        }
        self.kill_tasks();
        for m in self.masters.values() {
            if m.tmpfs {
                let _ = Command::new("umount").arg("-l").arg(&m.data_dir).status();
            }
        }
    }
}

fn spawn_logged(mut cmd: Command, log: std::fs::File) -> Result<Child> {
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
    cmd.spawn().context("starting a cluster process")
}

/// The admin's TLS client configuration from `berth pki init`'s output.
pub fn client_tls(pki: &Path) -> Result<ClientTlsConfig> {
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).with_context(|| format!("reading {f}"));
    Ok(ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.crt")?))
        .identity(tonic::transport::Identity::from_pem(read("admin.crt")?, read("admin.key")?))
        .domain_name(berth_pki::MASTER_SERVER_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_are_matched_by_device_and_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 2544 00:27:10 0 EOF\n2: -> FLOCK  ADVISORY  WRITE 77 fe:01:99 0 EOF\n";
        assert!(lock_held(locks, 39, 10), "tmpfs device 0:39 is 00:27");
        assert!(!lock_held(locks, 40, 10), "the same inode on another master's tmpfs is another file");
        assert!(lock_held(locks, (0xfe << 8) | 1, 99));
        assert!(!lock_held(locks, 39, 11));
        assert!(!lock_held("", 39, 10));
    }

    #[test]
    fn a_database_is_reported_locked_until_its_holder_exits() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("db")).unwrap();
        let lock = dir.path().join("db").join("LOCK");
        std::fs::write(&lock, b"").unwrap();
        assert!(wait_db_unlocked(dir.path(), Duration::ZERO), "nobody holds it yet");
        // Another process holds the lock until its stdin closes.
        let mut holder = Command::new("flock")
            .arg(&lock)
            .args(["-c", "read _"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("flock (util-linux) runs");
        let meta = std::fs::metadata(&lock).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock_held(&std::fs::read_to_string("/proc/locks").unwrap(), meta.dev(), meta.ino()) {
            assert!(Instant::now() < deadline, "flock never took the lock");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!wait_db_unlocked(dir.path(), Duration::from_millis(50)));
        drop(holder.stdin.take());
        holder.wait().unwrap();
        assert!(wait_db_unlocked(dir.path(), Duration::from_secs(10)));
    }
}
