//! `berth dev`: a local HA cluster of real `berth master` child processes.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use berth_api::pb;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::{
    Global,
    client::{Call, Client},
    config::ClientConfig,
};

#[derive(Args)]
pub struct DevArgs {
    /// Where the cluster lives: one data dir per master, cluster.json and berth.toml.
    #[arg(long)]
    data_dir: PathBuf,
    /// Number of masters (odd: 1, 3, 5, ...).
    #[arg(long, default_value_t = 3)]
    masters: u64,
    /// Port of master 1; master N listens on base-port + N - 1.
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    /// Number of node agents (real `berth agent` processes, alternately in zones zone-a and
    /// zone-b).
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Extra flags for every master (e.g. --node-down-grace 3s).
    #[arg(long = "master-arg", allow_hyphen_values = true)]
    master_args: Vec<String>,
    /// Run every agent on the machine's own network, without networks, even as root. (As root,
    /// a new cluster's agents otherwise each get a host of their own: a network namespace with
    /// an underlay address, and the masters get address pools, so tasks get networks.)
    #[arg(long)]
    no_hosts: bool,
    /// Delete the hosts (network namespaces) that `berth dev` made for its agents, and exit.
    /// Stop the cluster first; tasks still running on those hosts lose their network.
    #[arg(long)]
    remove_hosts: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub endpoints: Vec<String>,
    pub masters: Vec<MasterEntry>,
    #[serde(default)]
    pub agents: Vec<AgentEntry>,
    /// Whether each agent runs in a host (network namespace) of its own.
    #[serde(default)]
    pub hosts: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AgentEntry {
    pub name: String,
    pub pid: u32,
    pub data_dir: PathBuf,
    /// Its host's underlay address, when it runs in a host of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Where it serves /metrics, /healthz and /readyz (HOST:PORT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MasterEntry {
    pub id: u64,
    pub endpoint: String,
    pub pid: u32,
    pub data_dir: PathBuf,
    /// Where it serves /metrics, /healthz and /readyz (HOST:PORT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Where it serves the web console (HOST:PORT, HTTPS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
}

/// The port an agent in a host of its own serves metrics on (each host has its own addresses).
const HOST_METRICS_PORT: u16 = 9101;

/// A free TCP port on `addr` (bound and released), for a metrics or console endpoint.
fn free_addr(addr: &str) -> Result<String> {
    let l = std::net::TcpListener::bind((addr, 0)).with_context(|| format!("cannot find a free port on {addr}"))?;
    Ok(format!("{addr}:{}", l.local_addr()?.port()))
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Starts a berth process (a master, an agent, or `nsenter` running one) with its output appended to `log`.
pub(crate) fn spawn_logged(exe: &Path, args: &[String], log: &Path) -> Result<Child> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

pub async fn run(a: DevArgs, _g: &Global) -> Result<()> {
    if a.remove_hosts {
        // The edge's HAProxy outlives its agent (as tasks do) and lives in a host: it goes with
        // the hosts.
        if let Ok(entries) = fs::read_dir(&a.data_dir) {
            for e in entries.flatten() {
                let pid = fs::read_to_string(e.path().join("edge").join("haproxy.pid"))
                    .ok()
                    .and_then(|t| t.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()))
                    .filter(|p| *p > 1);
                if let Some(pid) = pid {
                    let _ =
                        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
                }
            }
        }
        let n = crate::dev_hosts::remove()?;
        println!("berth dev: removed {n} hosts and their switch");
        return Ok(());
    }
    if a.masters == 0 || a.masters.is_multiple_of(2) {
        bail!("--masters must be odd (1, 3, 5, ...) so that a majority is well defined; got {}", a.masters);
    }
    fs::create_dir_all(&a.data_dir).with_context(|| format!("cannot create {}", a.data_dir.display()))?;
    let dir = fs::canonicalize(&a.data_dir)?;
    let exe = std::env::current_exe().context("cannot find the berth binary")?;
    let cluster_json = dir.join("cluster.json");

    // Resume: the masters already exist; a restart needs only each data dir.
    let previous: Option<ClusterFile> = match fs::read_to_string(&cluster_json) {
        Ok(t) => Some(serde_json::from_str(&t).with_context(|| format!("{} is not valid", cluster_json.display()))?),
        Err(_) => None,
    };
    // Hosts for the agents: as root, for a new cluster (unless --no-hosts); a resumed cluster
    // keeps what it was made with.
    let hosts = match &previous {
        Some(p) => p.hosts,
        None if a.no_hosts => false,
        None => match crate::dev_hosts::available() {
            Ok(()) => true,
            Err(why) => {
                eprintln!(
                    "berth dev: {why}, so the agents share this machine's network and the cluster has no networks \
                     (tasks use their host's network); run it as root for agents on hosts of their own with networks"
                );
                false
            }
        },
    };
    let agent_count = previous.as_ref().filter(|p| !p.agents.is_empty()).map_or(a.agents, |p| p.agents.len());
    if hosts {
        crate::dev_hosts::ensure(agent_count).context("building the agents' hosts (network namespaces)")?;
    }
    let master_addr = if hosts { crate::dev_hosts::root_addr() } else { "127.0.0.1".to_string() };
    let plan: BTreeMap<u64, (String, PathBuf)> = match &previous {
        Some(p) => {
            if a.masters != p.masters.len() as u64 {
                eprintln!(
                    "resuming the existing {}-master cluster in {} (--masters ignored)",
                    p.masters.len(),
                    dir.display()
                );
            }
            p.masters.iter().map(|m| (m.id, (m.endpoint.clone(), m.data_dir.clone()))).collect()
        }
        None => (1..=a.masters)
            .map(|id| {
                let port = a.base_port as u64 + id - 1;
                if port > u16::MAX as u64 {
                    return Err(anyhow::anyhow!(
                        "--base-port {} leaves no room for {} masters",
                        a.base_port,
                        a.masters
                    ));
                }
                Ok((id, (format!("{master_addr}:{port}"), dir.join(format!("master-{id}")))))
            })
            .collect::<Result<_>>()?,
    };
    if previous.is_none() {
        for (ep, _) in plan.values() {
            if std::net::TcpListener::bind(ep).is_err() {
                bail!("port {ep} is in use: pick other ports with --base-port");
            }
        }
    }
    let initial = plan.iter().map(|(id, (ep, _))| format!("{id}={ep}")).collect::<Vec<_>>().join(",");
    // The cluster CA and admin credentials, made once; each master copies the CA on its first start.
    let pki = dir.join("pki");
    if !pki.join("ca.crt").exists() {
        crate::cmd_pki::init(&crate::cmd_pki::PkiInitArgs {
            out: pki.clone(),
            admin_name: "admin".into(),
            admin_validity: Duration::from_secs(365 * 24 * 3600),
        })?;
    }
    let creds = crate::config::Credentials {
        ca_cert: pki.join("ca.crt"),
        cert: pki.join("admin.crt"),
        key: pki.join("admin.key"),
    };

    // Every master gets a metrics endpoint and a web console: the ones it had, or free ports.
    let mut master_metrics: BTreeMap<u64, String> = BTreeMap::new();
    let mut master_console: BTreeMap<u64, String> = BTreeMap::new();
    for id in plan.keys() {
        let had = previous.as_ref().and_then(|p| p.masters.iter().find(|m| m.id == *id));
        let keep_or_pick = |a: Option<&String>| a.cloned().map_or_else(|| free_addr(&master_addr), Ok);
        master_metrics.insert(*id, keep_or_pick(had.and_then(|m| m.metrics.as_ref()))?);
        master_console.insert(*id, keep_or_pick(had.and_then(|m| m.console.as_ref()))?);
    }
    let mut children: BTreeMap<u64, Child> = BTreeMap::new();
    for (id, (ep, mdir)) in &plan {
        fs::create_dir_all(mdir)?;
        let mut args = vec![
            "master".to_string(),
            "--data-dir".into(),
            mdir.display().to_string(),
            "--metrics-listen".into(),
            master_metrics[id].clone(),
            "--console-listen".into(),
            master_console[id].clone(),
        ];
        if !mdir.join(berth_master::IDENTITY_FILE).exists() {
            args.extend([
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                ep.clone(),
                "--initial-cluster".into(),
                initial.clone(),
                "--pki-dir".into(),
                pki.display().to_string(),
            ]);
            // Networks: the pools, recorded by the first leader, unless the caller gave its own.
            if hosts && !a.master_args.iter().any(|m| m.starts_with("--address-pool")) {
                args.extend([
                    "--address-pool".into(),
                    crate::dev_hosts::ADDRESS_POOL.into(),
                    "--vip-pool".into(),
                    crate::dev_hosts::VIP_POOL.into(),
                ]);
            }
        }
        // Routes' hosts fall under the dev cluster's apps domain, which agent-1's edge answers.
        if hosts && !a.master_args.iter().any(|m| m.starts_with("--apps-domain")) {
            args.extend(["--apps-domain".into(), crate::dev_hosts::APPS_DOMAIN.into()]);
        }
        args.extend(a.master_args.iter().cloned());
        let child = spawn_logged(&exe, &args, &mdir.join("master.log"))?;
        children.insert(*id, child);
    }

    let endpoints: Vec<String> = plan.values().map(|(ep, _)| ep.clone()).collect();
    let client = Client::new(endpoints.clone(), creds.tls()?)?;
    let leader = match wait_for_leader(&client, &mut children).await {
        Ok(l) => l,
        Err(e) => {
            stop_all(&mut children);
            return Err(e);
        }
    };
    // Agents: resumed from their data dirs, or joined with one token made for them.
    let agent_plan: Vec<(String, PathBuf)> = match &previous {
        Some(p) if !p.agents.is_empty() => p.agents.iter().map(|g| (g.name.clone(), g.data_dir.clone())).collect(),
        _ => (1..=a.agents).map(|i| (format!("agent-{i}"), dir.join(format!("agent-{i}")))).collect(),
    };
    let needs_token = agent_plan.iter().any(|(_, d)| !d.join("agent.json").exists());
    let token = if needs_token {
        let req = pb::TokenCreateRequest {
            ttl_seconds: 3600,
            uses: agent_plan.len() as u64,
            labels: Default::default(),
            description: "berth dev agents".into(),
        };
        match client
            .call(Call::Once, |ch| {
                let req = req.clone();
                async move { Client::nodes(ch).token_create(req).await.map(|r| r.into_inner().token) }
            })
            .await
        {
            Ok(t) => Some(t),
            Err(e) => {
                stop_all(&mut children);
                bail!("could not create a join token for the agents: {}", e.message());
            }
        }
    } else {
        None
    };
    let mut agent_children: Vec<(String, PathBuf, Child, Option<String>, String)> = Vec::new();
    for (i, (name, adir)) in agent_plan.iter().enumerate() {
        fs::create_dir_all(adir)?;
        let had =
            previous.as_ref().and_then(|p| p.agents.iter().find(|g| &g.name == name)).and_then(|g| g.metrics.clone());
        let metrics = match had {
            Some(m) => m,
            None if hosts => format!("{}:{HOST_METRICS_PORT}", crate::dev_hosts::addr(i + 1)),
            None => free_addr("127.0.0.1")?,
        };
        let mut args = vec![
            "agent".to_string(),
            "--metrics-listen".into(),
            metrics.clone(),
            "--join".into(),
            endpoints.join(","),
            "--data-dir".into(),
            adir.display().to_string(),
            "--name".into(),
            name.clone(),
            "--labels".into(),
            format!("zone=zone-{}", if i % 2 == 0 { 'a' } else { 'b' }),
        ];
        if !adir.join("agent.json").exists()
            && let Some(t) = &token
        {
            let file = token_file(adir, t)?;
            args.extend(["--token-file".into(), file.display().to_string()]);
        }
        let child = if hosts {
            // In host i+1's network namespace (nsenter, not `ip netns exec`, which would give the
            // agent a mount namespace of its own, where the task namespaces it bind-mounts would
            // vanish when it restarts).
            let address = crate::dev_hosts::addr(i + 1);
            args.extend(["--advertise-addr".into(), address.clone()]);
            // agent-1 is the edge: it serves routes on its address, ports 80 and 443, and
            // answers DNS for the apps domain there.
            if i == 0 {
                args.extend(["--edge".into(), "--apps-domain".into(), crate::dev_hosts::APPS_DOMAIN.into()]);
            }
            let mut all = vec![format!("--net=/run/netns/{}", crate::dev_hosts::ns(i + 1)), exe.display().to_string()];
            all.extend(args);
            (spawn_logged(Path::new("nsenter"), &all, &adir.join("agent.log"))?, Some(address))
        } else {
            (spawn_logged(&exe, &args, &adir.join("agent.log"))?, None)
        };
        agent_children.push((name.clone(), adir.clone(), child.0, child.1, metrics));
    }
    let file = ClusterFile {
        endpoints: endpoints.clone(),
        masters: plan
            .iter()
            .map(|(id, (ep, d))| MasterEntry {
                id: *id,
                endpoint: ep.clone(),
                pid: children[id].id(),
                data_dir: d.clone(),
                metrics: Some(master_metrics[id].clone()),
                console: Some(master_console[id].clone()),
            })
            .collect(),
        agents: agent_children
            .iter()
            .map(|(name, d, c, address, metrics)| AgentEntry {
                name: name.clone(),
                pid: c.id(),
                data_dir: d.clone(),
                address: address.clone(),
                metrics: Some(metrics.clone()),
            })
            .collect(),
        hosts,
    };
    write_atomic(&cluster_json, &serde_json::to_string_pretty(&file)?)?;
    let toml_path = dir.join("berth.toml");
    let config = ClientConfig {
        endpoints: endpoints.clone(),
        ca_cert: Some(creds.ca_cert.clone()),
        cert: Some(creds.cert.clone()),
        key: Some(creds.key.clone()),
    };
    write_atomic(&toml_path, &toml::to_string(&config)?)?;

    println!("berth dev: {} masters up, leader is master {leader}", plan.len());
    for m in &file.masters {
        let metrics = m.metrics.as_ref().map(|a| format!("  metrics http://{a}/metrics")).unwrap_or_default();
        println!(
            "  master {}  {}  pid {}  log {}{metrics}",
            m.id,
            m.endpoint,
            m.pid,
            m.data_dir.join("master.log").display()
        );
    }
    if let Some(c) =
        file.masters.iter().find(|m| m.id == leader).or(file.masters.first()).and_then(|m| m.console.as_ref())
    {
        println!(
            "  web console: https://{c}/ (any master's; the certificate is the cluster CA's, {}; log in with a token \
             from `berth console token create`)",
            creds.ca_cert.display()
        );
    }
    println!();
    println!("Use it from another shell:");
    println!("  export BERTH_CONFIG={}", toml_path.display());
    for g in &file.agents {
        let on = g.address.as_ref().map(|a| format!("  host {a}")).unwrap_or_default();
        let metrics = g.metrics.as_ref().map(|a| format!("  metrics http://{a}/metrics")).unwrap_or_default();
        println!("  agent {}{on}  pid {}  log {}{metrics}", g.name, g.pid, g.data_dir.join("agent.log").display());
    }
    if hosts {
        println!(
            "  networks: on (agents on hosts of their own, 198.19.254.0/24; overlay pool {}, VIPs {})",
            crate::dev_hosts::ADDRESS_POOL,
            crate::dev_hosts::VIP_POOL
        );
    }
    println!("  berth cluster status");
    println!("  berth get nodes");
    println!("  berth kv put hello world && berth kv get hello");
    println!(
        "Kill a master to see failover: kill -9 <pid>. Ctrl-C stops the cluster; run the same command to resume it."
    );

    let shutdown = crate::shutdown_on_signals();
    let mut reported = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for (id, child) in children.iter_mut() {
            if !reported.contains(id)
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!(
                    "berth dev: master {id} (pid {}) exited: {status}; not restarting it. Its log: {}",
                    child.id(),
                    plan[id].1.join("master.log").display()
                );
                reported.insert(*id);
            }
        }
        for (name, adir, child, _, _) in agent_children.iter_mut() {
            let key = u64::MAX - child.id() as u64;
            if !reported.contains(&key)
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!(
                    "berth dev: agent {name} (pid {}) exited: {status}; not restarting it. Its log: {}",
                    child.id(),
                    adir.join("agent.log").display()
                );
                reported.insert(key);
            }
        }
    }
    eprintln!("berth dev: stopping the agents and the masters");
    let mut agents: BTreeMap<u64, Child> =
        agent_children.into_iter().enumerate().map(|(i, (_, _, c, _, _))| (i as u64, c)).collect();
    stop_all(&mut agents);
    stop_all(&mut children);
    Ok(())
}

async fn wait_for_leader(client: &Client, children: &mut BTreeMap<u64, Child>) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        for (id, child) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("master {id} exited during start-up ({status}); see its master.log");
            }
        }
        let r = client
            .call(Call::Idempotent, |ch| async move {
                Client::cluster(ch).member_list(pb::MemberListRequest {}).await.map(|r| r.into_inner())
            })
            .await;
        if let Ok(r) = r
            && r.leader != 0
        {
            return Ok(r.leader);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no leader was elected within 60s; see the masters' master.log files");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM to every child, then SIGKILL to any still running after 10 s.
pub(crate) fn stop_all(children: &mut BTreeMap<u64, Child>) {
    for child in children.values() {
        // A polite stop first: a leader hands over leadership on SIGTERM.
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for child in children.values_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if std::time::Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Writes a join token to `dir/join-token` (0600) for `--token-file`: on a command line it would
/// be visible to every user of the host.
pub(crate) fn token_file(dir: &Path, token: &str) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("join-token");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    f.write_all(token.as_bytes())?;
    Ok(path)
}
