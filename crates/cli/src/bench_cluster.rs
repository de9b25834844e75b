//! Benchmarks that run their own local cluster of real `berth master` processes: failover time
//! after kill -9 of the leader, and leader stability under steady write load.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use berth_api::pb;
use serde::Serialize;

use crate::{
    client::{Call, Client},
    dev::{spawn_logged, stop_all},
    output::{self, Format},
};

struct LocalCluster {
    _dir: tempfile::TempDir,
    endpoints: BTreeMap<u64, String>,
    /// Each master's /metrics address.
    metrics: BTreeMap<u64, String>,
    data_dirs: BTreeMap<u64, PathBuf>,
    children: BTreeMap<u64, Child>,
    exe: PathBuf,
    extra: Vec<String>,
    tls: tonic::transport::ClientTlsConfig,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalCluster {
    fn start(n: u64, extra: &[String]) -> Result<Self> {
        let tmp = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
        let dir = tmp.path().to_path_buf();
        let pki = dir.join("pki");
        crate::cmd_pki::init(&crate::cmd_pki::PkiInitArgs {
            out: pki.clone(),
            admin_name: "admin".into(),
            admin_validity: Duration::from_secs(24 * 3600),
        })?;
        let tls = crate::config::Credentials {
            ca_cert: pki.join("ca.crt"),
            cert: pki.join("admin.crt"),
            key: pki.join("admin.key"),
        }
        .tls()?;
        let mut c = LocalCluster {
            _dir: tmp,
            endpoints: BTreeMap::new(),
            metrics: BTreeMap::new(),
            data_dirs: BTreeMap::new(),
            children: BTreeMap::new(),
            exe: std::env::current_exe()?,
            extra: extra.to_vec(),
            tls,
        };
        for id in 1..=n {
            c.endpoints.insert(id, format!("127.0.0.1:{}", free_port()?));
            c.metrics.insert(id, format!("127.0.0.1:{}", free_port()?));
            c.data_dirs.insert(id, dir.join(format!("master-{id}")));
        }
        let initial = c.endpoints.iter().map(|(id, ep)| format!("{id}={ep}")).collect::<Vec<_>>().join(",");
        for id in 1..=n {
            let mut args = vec![
                "master".to_string(),
                "--id".into(),
                id.to_string(),
                "--initial-cluster".into(),
                initial.clone(),
                "--pki-dir".into(),
                pki.display().to_string(),
            ];
            args.extend(c.extra.iter().cloned());
            c.spawn(id, args)?;
        }
        Ok(c)
    }

    fn spawn(&mut self, id: u64, mut args: Vec<String>) -> Result<()> {
        let dd = &self.data_dirs[&id];
        std::fs::create_dir_all(dd)?;
        args.extend([
            "--data-dir".into(),
            dd.display().to_string(),
            "--listen".into(),
            self.endpoints[&id].clone(),
            "--metrics-listen".into(),
            self.metrics[&id].clone(),
        ]);
        let child = spawn_logged(&self.exe, &args, &dd.join("master.log"))?;
        self.children.insert(id, child);
        Ok(())
    }

    fn restart(&mut self, id: u64) -> Result<()> {
        let mut args = vec!["master".to_string()];
        args.extend(self.extra.iter().cloned());
        self.spawn(id, args)
    }

    fn kill9(&mut self, id: u64) -> Result<()> {
        let mut c = self.children.remove(&id).context("no such master")?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// The value of counter or gauge `name` on master `id`'s /metrics (0 if it is not there).
    fn metric(&self, id: u64, name: &str) -> Result<f64> {
        use std::io::{Read, Write};
        let addr = &self.metrics[&id];
        let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("reading {addr}/metrics"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|rest| rest.strip_prefix(' ').or_else(|| rest.strip_prefix("_total ")))
            .find_map(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0))
    }

    fn client(&self) -> Result<Client> {
        let mut c = Client::new(self.endpoints.values().cloned().collect(), self.tls.clone())?;
        c.patience = Duration::from_secs(60);
        Ok(c)
    }

    async fn status(&self) -> Result<pb::StatusResponse> {
        Ok(self
            .client()?
            .call(Call::Idempotent, |ch| async move {
                Client::cluster(ch).status(pb::StatusRequest {}).await.map(|r| r.into_inner())
            })
            .await?)
    }

    /// Waits until exactly one member calls itself leader, none is campaigning, and every member
    /// has applied as much as the others (the start-up election has settled).
    async fn wait_converged(&self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(s) = self.status().await
                && s.leader != 0
            {
                let top = s.members.iter().map(|m| m.applied_index).max().unwrap_or(0);
                let leaders: Vec<u64> = s.members.iter().filter(|m| m.role == "leader").map(|m| m.id).collect();
                if leaders == [s.leader]
                    && s.members.iter().all(|m| m.error.is_empty() && m.role != "candidate" && m.applied_index == top)
                {
                    return Ok(s.leader);
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster did not converge within 60s; see the master logs");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        stop_all(&mut self.children);
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[idx]
}

/// One put against any endpoint, each attempt bounded, until one is acknowledged.
async fn first_write(client: &Client, key: &str) -> Duration {
    let start = Instant::now();
    let mut clients: Vec<_> =
        client.endpoints().iter().filter_map(|e| client.channel(e).ok()).map(Client::kv).collect();
    loop {
        for c in clients.iter_mut() {
            let mut req = tonic::Request::new(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"x".to_vec(),
                prev_kv: false,
            });
            // Short attempts, so that the measurement's granularity is well below the failover time.
            req.set_timeout(Duration::from_millis(100));
            if c.put(req).await.is_ok() {
                return start.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn failover(kills: usize, extra: &[String], format: Format) -> Result<()> {
    let mut c = LocalCluster::start(3, extra)?;
    c.wait_converged().await?;
    let mut times = Vec::with_capacity(kills);
    for round in 0..kills {
        let leader = c.wait_converged().await?;
        let others: Vec<String> = c.endpoints.iter().filter(|(id, _)| **id != leader).map(|(_, e)| e.clone()).collect();
        c.kill9(leader)?;
        let others = Client::new(others, c.tls.clone())?;
        let t = first_write(&others, &format!("failover/{round}")).await;
        eprintln!(
            "kill {}: master {leader} killed, first committed write after {:.0} ms",
            round + 1,
            t.as_secs_f64() * 1000.0
        );
        times.push(t.as_secs_f64() * 1000.0);
        c.restart(leader)?;
    }
    times.sort_by(f64::total_cmp);
    #[derive(Serialize)]
    struct Out {
        kills: usize,
        master_args: Vec<String>,
        p50_ms: f64,
        p99_ms: f64,
        max_ms: f64,
        min_ms: f64,
    }
    let out = Out {
        kills,
        master_args: extra.to_vec(),
        p50_ms: quantile(&times, 0.5),
        p99_ms: quantile(&times, 0.99),
        max_ms: times.last().copied().unwrap_or(0.0),
        min_ms: times.first().copied().unwrap_or(0.0),
    };
    output::print(format, &out, |o| {
        println!(
            "failover after kill -9 of the leader ({} kills): p50_ms={:.0} p99_ms={:.0} max_ms={:.0} min_ms={:.0}",
            o.kills, o.p50_ms, o.p99_ms, o.max_ms, o.min_ms
        )
    });
    Ok(())
}

pub async fn stability(
    duration: Duration,
    clients: usize,
    value_size: usize,
    extra: &[String],
    format: Format,
) -> Result<()> {
    let c = LocalCluster::start(3, extra)?;
    let first_leader = c.wait_converged().await?;
    let first_term = c.status().await?.term;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let endpoints: Vec<String> = c.endpoints.values().cloned().collect();
    let client = c.client()?;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut kv = Client::kv(client.channel(&endpoints[i % endpoints.len()])?);
        let (stop, ops, errors) = (stop.clone(), ops.clone(), errors.clone());
        let value = vec![b'v'; value_size];
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("stability/{i}/{}", n % 1000).into_bytes();
                match kv.put(pb::PutRequest { key, value: value.clone(), prev_kv: false }).await {
                    Ok(_) => ops.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                n += 1;
            }
        }));
    }
    let start = Instant::now();
    let mut leader_changes = 0u64;
    let mut last = (first_term, first_leader);
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(s) = c.status().await
            && (s.term, s.leader) != last
        {
            leader_changes += 1;
            eprintln!("leader change: term {} leader {} -> term {} leader {}", last.0, last.1, s.term, s.leader);
            last = (s.term, s.leader);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    #[derive(Serialize)]
    struct Out {
        seconds: f64,
        clients: usize,
        ops: u64,
        errors: u64,
        ops_per_sec: f64,
        leader_changes: u64,
        master_args: Vec<String>,
    }
    let ops = ops.load(Ordering::Relaxed);
    let out = Out {
        seconds: secs,
        clients,
        ops,
        errors: errors.load(Ordering::Relaxed),
        ops_per_sec: ops as f64 / secs,
        leader_changes,
        master_args: extra.to_vec(),
    };
    output::print(format, &out, |o| {
        println!(
            "stability: {:.0}s of writes from {} clients, {} ops ({:.0}/s), {} errors, leader_changes={}",
            o.seconds, o.clients, o.ops, o.ops_per_sec, o.errors, o.leader_changes
        )
    });
    Ok(())
}

/// CPU seconds (user + system) and resident memory of a process, from /proc.
fn proc_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("unexpected /proc stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    let cpu = ticks / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok((cpu, rss_kb * 1024))
}

/// Starts its own 3-master cluster and `berth agent --simulate N`, waits for every node to be
/// ready, then measures the leader's CPU and memory while the agents heartbeat.
/// Starts a 3-master cluster and `berth agent --simulate count`, and waits until every node is
/// ready. Returns the cluster, a client, the leader and how long the nodes took.
async fn with_simulated_agents(count: usize, extra: &[String]) -> Result<(LocalCluster, Client, u64, Duration)> {
    let mut c = LocalCluster::start(3, extra)?;
    let leader = c.wait_converged().await?;
    let client = c.client()?;
    let req = pb::TokenCreateRequest {
        ttl_seconds: 3600,
        uses: count as u64,
        labels: Default::default(),
        description: "bench agents".into(),
    };
    let token = client
        .call(Call::Once, |ch| {
            let req = req.clone();
            async move { Client::nodes(ch).token_create(req).await.map(|r| r.into_inner().token) }
        })
        .await?;
    let dir = c._dir.path().join("agents");
    std::fs::create_dir_all(&dir)?;
    let args = vec![
        "agent".to_string(),
        "--join".into(),
        c.endpoints.values().cloned().collect::<Vec<_>>().join(","),
        "--token-file".into(),
        crate::dev::token_file(&dir, &token)?.display().to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--name".into(),
        "sim".into(),
        "--simulate".into(),
        count.to_string(),
    ];
    let agent = spawn_logged(&c.exe, &args, &dir.join("agent.log"))?;
    c.children.insert(u64::MAX, agent);
    let started = Instant::now();
    let ready = loop {
        let r = client
            .call(Call::Idempotent, |ch| async move {
                Client::nodes(ch).node_list(pb::NodeListRequest {}).await.map(|r| r.into_inner())
            })
            .await?;
        let ready =
            r.nodes.iter().filter(|n| n.node.as_ref().is_some_and(|n| n.status() == pb::NodeStatus::Ready)).count();
        if ready >= count {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("only {ready} of {count} simulated nodes became ready within 30 minutes");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    Ok((c, client, leader, ready))
}

/// Live tasks of a run, counted from a watch of their records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TaskCounts {
    /// Desired running and on a node.
    placed: u64,
    /// Desired running and reported running.
    running: u64,
}

impl TaskCounts {
    /// Moves one task from `old` (placed, running) to `new` (None: absent).
    fn apply(&mut self, old: Option<(bool, bool)>, new: Option<(bool, bool)>) {
        let (op, or) = old.unwrap_or_default();
        let (np, nr) = new.unwrap_or_default();
        self.placed = self.placed + u64::from(np) - u64::from(op);
        self.running = self.running + u64::from(nr) - u64::from(or);
    }
}

/// End to end: a 3-master cluster with `nodes` simulated agents; services totalling `tasks`
/// replicas are applied at once, and the clock runs until every task is committed as running
/// (placed by the leader's scheduler, sent to its agent, acknowledged running, and that state
/// committed through Raft).
pub async fn schedule_e2e(nodes: usize, tasks: usize, extra: &[String], format: Format) -> Result<()> {
    let (c, client, leader, ready) = with_simulated_agents(nodes, extra).await?;
    eprintln!("{nodes} simulated nodes ready after {:.1}s; applying {tasks} replicas", ready.as_secs_f64());
    let pid = c.children[&leader].id();
    let (cpu0, _) = proc_usage(pid)?;
    let (entries0, bytes0) = (c.metric(leader, "berth_raft_log_entries")?, c.metric(leader, "berth_raft_log_bytes")?);
    let mut peak_rss = 0;
    // The tasks are counted from a watch of their records, fed as they commit: reading them all
    // again and again would load the masters more than the run itself does at large counts.
    let from = c.status().await?.header.map_or(0, |h| h.revision) + 1;
    let (counts_tx, mut counts) = tokio::sync::watch::channel(TaskCounts::default());
    // From a follower where there is one, so that serving the watch is not the leader's work.
    let mut order: Vec<String> = c.endpoints.iter().filter(|(id, _)| **id != leader).map(|(_, e)| e.clone()).collect();
    order.push(c.endpoints[&leader].clone());
    let mut watch_client = Client::new(order, c.tls.clone())?;
    watch_client.patience = Duration::from_secs(60);
    let watcher = tokio::spawn({
        let client = watch_client;
        async move {
            let prefix = b"/berth/tasks/".to_vec();
            let end = berth_types::prefix_end(&prefix);
            let mut tasks: std::collections::HashMap<Vec<u8>, (bool, bool)> = std::collections::HashMap::new();
            let mut now = TaskCounts::default();
            crate::cmd_kv::follow(&client, prefix, end, from, |e| {
                let kv = e.kv.unwrap_or_default();
                let new = if e.r#type == pb::event::EventType::Delete as i32 {
                    None
                } else {
                    let t = <pb::Task as prost::Message>::decode(kv.value.as_slice())
                        .context("a task record that does not decode")?;
                    let live = t.desired_state == pb::agent::TaskState::Running as i32;
                    Some((live && !t.node_id.is_empty(), live && t.state == pb::agent::TaskState::Running as i32))
                };
                let old = match new {
                    Some(v) => tasks.insert(kv.key, v),
                    None => tasks.remove(&kv.key),
                };
                now.apply(old, new);
                counts_tx.send_replace(now);
                Ok(())
            })
            .await
        }
    });
    let per = berth_types::spec::MAX_REPLICAS as usize;
    let mut docs = Vec::new();
    let mut left = tasks;
    let mut i = 0;
    while left > 0 {
        let n = left.min(per);
        docs.push(format!(
            "kind: Service\nmetadata: {{name: bench-{i}}}\nspec:\n  mode: replicated\n  replicas: {n}\n  task:\n    runtime: process\n    command: [/bin/true]\n"
        ));
        left -= n;
        i += 1;
    }
    let documents = docs.join("---\n");
    let t0 = Instant::now();
    client
        .call(Call::Idempotent, |ch| {
            let req = pb::ApplyRequest { documents: documents.clone(), dry_run: false, expected_revision: 0 };
            async move { Client::control(ch).apply(req).await.map(|r| r.into_inner()) }
        })
        .await?;
    let mut first_all_placed = None;
    let mut rss_checked = Instant::now();
    let running = loop {
        let now = *counts.borrow_and_update();
        if first_all_placed.is_none() && now.placed as usize >= tasks {
            first_all_placed = Some(t0.elapsed());
        }
        if now.running as usize >= tasks {
            break Some(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("only {} of {tasks} tasks were running after 30 minutes", now.running);
        }
        if rss_checked.elapsed() >= Duration::from_millis(200) {
            peak_rss = peak_rss.max(proc_usage(pid)?.1);
            rss_checked = Instant::now();
        }
        tokio::select! {
            changed = counts.changed() => if changed.is_err() { break None },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    };
    let Some(running) = running else {
        let why = match watcher.await {
            Ok(Err(e)) => format!("{e:#}"),
            _ => "it ended".to_string(),
        };
        bail!("the watch of the tasks failed: {why}");
    };
    watcher.abort();
    let (cpu1, rss) = proc_usage(pid)?;
    let (entries1, bytes1) = (c.metric(leader, "berth_raft_log_entries")?, c.metric(leader, "berth_raft_log_bytes")?);
    #[derive(Serialize)]
    struct Out {
        nodes: usize,
        tasks: usize,
        seconds_to_all_placed: f64,
        seconds_to_all_running: f64,
        running_per_sec: f64,
        /// The leader's CPU time over the run, in cores (seconds of CPU per second).
        leader_cpu_cores: f64,
        leader_cpu_seconds: f64,
        leader_peak_rss_bytes: u64,
        /// Entries and bytes the leader appended to its Raft log during the run.
        raft_entries: u64,
        raft_bytes: u64,
    }
    let secs = running.as_secs_f64();
    let out = Out {
        nodes,
        tasks,
        seconds_to_all_placed: first_all_placed.unwrap_or(running).as_secs_f64(),
        seconds_to_all_running: secs,
        running_per_sec: tasks as f64 / secs,
        leader_cpu_cores: (cpu1 - cpu0) / secs,
        leader_cpu_seconds: cpu1 - cpu0,
        leader_peak_rss_bytes: peak_rss.max(rss),
        raft_entries: (entries1 - entries0) as u64,
        raft_bytes: (bytes1 - bytes0) as u64,
    };
    output::print(format, &out, |o| {
        println!(
            "schedule end to end: {} simulated nodes, {} tasks: all placed in {:.1}s, all running (committed) in {:.1}s: \
             {:.0} tasks/s; leader {:.2} cores, peak RSS {}; Raft log {} entries, {}",
            o.nodes,
            o.tasks,
            o.seconds_to_all_placed,
            o.seconds_to_all_running,
            o.running_per_sec,
            o.leader_cpu_cores,
            output::human_bytes(o.leader_peak_rss_bytes),
            o.raft_entries,
            output::human_bytes(o.raft_bytes)
        )
    });
    Ok(())
}

pub async fn agents(count: usize, duration: Duration, extra: &[String], format: Format) -> Result<()> {
    let (c, client, leader, ready) = with_simulated_agents(count, extra).await?;
    eprintln!("{count} simulated nodes ready after {:.1}s; measuring the leader for {duration:?}", ready.as_secs_f64());
    let pid = c.children[&leader].id();
    let (cpu0, _) = proc_usage(pid)?;
    let t0 = Instant::now();
    let mut peak_rss = 0;
    while t0.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(proc_usage(pid)?.1);
    }
    let (cpu1, rss) = proc_usage(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    // Every node still ready at the end: heartbeats kept up.
    let r = client
        .call(Call::Idempotent, |ch| async move {
            Client::nodes(ch).node_list(pb::NodeListRequest {}).await.map(|r| r.into_inner())
        })
        .await?;
    let still_ready =
        r.nodes.iter().filter(|n| n.node.as_ref().is_some_and(|n| n.status() == pb::NodeStatus::Ready)).count();
    #[derive(Serialize)]
    struct Out {
        agents: usize,
        seconds_to_ready: f64,
        measured_seconds: f64,
        leader_cpu_cores: f64,
        leader_rss_bytes: u64,
        leader_peak_rss_bytes: u64,
        ready_at_end: usize,
    }
    let out = Out {
        agents: count,
        seconds_to_ready: ready.as_secs_f64(),
        measured_seconds: secs,
        leader_cpu_cores: (cpu1 - cpu0) / secs,
        leader_rss_bytes: rss,
        leader_peak_rss_bytes: peak_rss.max(rss),
        ready_at_end: still_ready,
    };
    output::print(format, &out, |o| {
        println!(
            "agents: {} simulated nodes ready in {:.1}s; leader over {:.0}s: {:.3} cores, RSS {} (peak {}); {} ready at the end",
            o.agents,
            o.seconds_to_ready,
            o.measured_seconds,
            o.leader_cpu_cores,
            output::human_bytes(o.leader_rss_bytes),
            output::human_bytes(o.leader_peak_rss_bytes),
            o.ready_at_end
        )
    });
    Ok(())
}
