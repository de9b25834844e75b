//! The networks scenario: services on the cluster's overlay network (the masters get address
//! pools, every real agent attaches tasks to networks), a client task on every real agent calling
//! a web service by name (its virtual IP) in a loop, while the nemesis kills web tasks, cuts
//! agents off from every master and kills leaders.
//!
//! The evidence:
//! - each client appends `TASK_ID UNIX_NS ok|fail DETAIL` per request to `vip-clients.log`;
//! - each real agent's endpoints: what its DNS serves (the leader's view it keeps in
//!   `<agent dir>/overlay/overlay.json`) and what its nftables load balancer sends to (the
//!   `ep-<vip>-<proto>-<port>-<address>-<port>` chains of table `ip berth`, read in the agent's
//!   host namespace).
//!
//! The checks, once the faults have healed and the cluster has converged:
//! - `endpoints-current`: within [`ENDPOINT_BOUND`], no endpoint on any agent, in DNS or in
//!   nftables, belongs to a task that is not running (berth reports it running and its process
//!   is alive), and every running, healthy web task is an endpoint on every agent;
//! - `vip-serves`: every running client then gets [`CLEAN_RUN`] answers in a row through the VIP.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use rand::{Rng, rngs::StdRng};

use crate::{checks::Check, cluster::Cluster, net::Net};

/// The web service the clients call, and the client service.
pub const WEB: &str = "vweb";
pub const CLIENT: &str = "vclient";
/// The pools the scenario's masters get: overlay addresses and VIPs, both from 198.18.0.0/15 and
/// clear of the chaos hosts' underlay (198.18.20-219.0/24).
pub const POOLS: [&str; 4] = ["--address-pool", "198.19.64.0/18", "--vip-pool", "198.19.16.0/20"];
/// How long after convergence every agent's endpoints must be current.
pub const ENDPOINT_BOUND: Duration = Duration::from_secs(30);
/// How many answers in a row each client must get through the VIP at the end.
const CLEAN_RUN: usize = 10;

fn services_yaml(log: &Path) -> String {
    let web = "import http.server, os\n\
               class H(http.server.BaseHTTPRequestHandler):\n    \
                   def do_GET(self):\n        \
                       b = os.environ['BERTH_TASK_ID'].encode()\n        \
                       self.send_response(200); self.send_header('Content-Length', str(len(b))); self.end_headers(); self.wfile.write(b)\n    \
                   def log_message(self, *a): pass\n\
               http.server.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()\n";
    let client = format!(
        "import os, time, urllib.request\n\
         me = os.environ['BERTH_TASK_ID']\n\
         f = open({log:?}, 'a', buffering=1)\n\
         while True:\n    \
             try:\n        \
                 r = 'ok ' + urllib.request.urlopen('http://{WEB}:8080/', timeout=1).read().decode()\n    \
             except Exception as e:\n        \
                 r = 'fail ' + type(e).__name__\n    \
             f.write(me + ' ' + str(time.time_ns()) + ' ' + r + '\\n')\n    \
             time.sleep(0.2)\n",
        log = log.display().to_string()
    );
    format!(
        "kind: Service\nmetadata: {{name: {WEB}}}\nspec:\n  replicas: 3\n  task:\n    runtime: process\n    \
         command: [/usr/bin/python3, -c, {web:?}]\n    ports: [{{name: http, container: 8080}}]\n    \
         health: {{http: {{port: 8080, path: /}}, interval: 500ms, timeout: 1s, retries: 2}}\n    \
         resources: {{cpu: 0.01, memory: 16Mi}}\n  placement: {{constraints: [\"node.labels.chaos == real\"]}}\n  \
         restart: {{condition: any, delay: 500ms}}\n---\n\
         kind: Service\nmetadata: {{name: {CLIENT}}}\nspec:\n  mode: global\n  task:\n    runtime: process\n    \
         privileged: true\n    command: [/usr/bin/python3, -u, -c, {client:?}]\n    resources: {{cpu: 0.01, memory: 16Mi}}\n  \
         placement: {{constraints: [\"node.labels.chaos == real\"]}}\n  restart: {{condition: any, delay: 500ms}}\n"
    )
}

pub struct VipWorkload {
    pub log: PathBuf,
    dir: PathBuf,
    /// Web tasks killed: (task id, pid).
    pub killed: Vec<(String, i64)>,
}

/// One task as berth reports it.
#[derive(Clone, Debug)]
struct TaskInfo {
    service: String,
    running: bool,
    healthy: bool,
    pid: i64,
    addresses: BTreeSet<Ipv4Addr>,
}

async fn tasks(c: &Cluster) -> Result<BTreeMap<String, TaskInfo>> {
    let text = c.admin_out(&["get", "tasks", "-o", "json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let list = v.as_array().cloned().or_else(|| v["tasks"].as_array().cloned()).unwrap_or_default();
    Ok(list
        .iter()
        .map(|t| {
            let addresses = t["addresses"]
                .as_object()
                .map(|m| m.values().filter_map(|a| a.as_str()?.parse().ok()).collect())
                .unwrap_or_default();
            (
                t["id"].as_str().unwrap_or_default().to_string(),
                TaskInfo {
                    service: t["service"].as_str().unwrap_or_default().to_string(),
                    running: t["state"] == "running" && t["desired_state"] == "running",
                    healthy: t["health"] == "healthy",
                    pid: t["pid"].as_i64().unwrap_or(0),
                    addresses,
                },
            )
        })
        .collect())
}

fn alive(pid: i64) -> bool {
    pid > 1 && Path::new(&format!("/proc/{pid}")).exists()
}

impl VipWorkload {
    pub fn new(dir: &Path) -> VipWorkload {
        VipWorkload { log: dir.join("vip-clients.log"), dir: dir.to_path_buf(), killed: Vec::new() }
    }

    pub async fn setup(&self, c: &Cluster) -> Result<()> {
        let file = self.dir.join("vip-services.yaml");
        std::fs::write(&file, services_yaml(&self.log))?;
        c.admin_out(&["apply", "-f", &file.display().to_string()]).await.context("applying the VIP services")?;
        Ok(())
    }

    /// Waits until every web task runs healthy and every client gets answers.
    pub async fn ready(&self, c: &Cluster, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        loop {
            let ts = tasks(c).await?;
            let healthy = ts.values().filter(|t| t.service == WEB && t.running && t.healthy).count();
            let clients = clean_clients(&self.log, &ts, 3, 0);
            if healthy == 3 && clients.as_ref().is_ok_and(|n| *n == c.agents.len()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the VIP services did not start within {bound:?}: {healthy}/3 web tasks healthy, clients: {clients:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// kill -9 of a random running web task's process; `None` when none runs.
    pub async fn kill_web_task(&mut self, c: &Cluster, rng: &mut StdRng) -> Result<Option<String>> {
        let ts = tasks(c).await?;
        let up: Vec<(&String, &TaskInfo)> =
            ts.iter().filter(|(_, t)| t.service == WEB && t.running && alive(t.pid)).collect();
        if up.is_empty() {
            return Ok(None);
        }
        let (id, t) = up[rng.random_range(0..up.len())];
        let _ = Command::new("kill").args(["-KILL", &t.pid.to_string()]).status();
        self.killed.push((id.clone(), t.pid));
        Ok(Some(format!("{id} (pid {})", t.pid)))
    }

    /// Failed and answered requests so far.
    pub fn counts(&self) -> (usize, usize) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let ok = text.lines().filter(|l| l.split_whitespace().nth(2) == Some("ok")).count();
        let fail = text.lines().filter(|l| l.split_whitespace().nth(2) == Some("fail")).count();
        (ok, fail)
    }
}

/// How many running clients have `want` answers in a row since `since_ns` at the end of their
/// log; an error names one that has not.
fn clean_clients(log: &Path, ts: &BTreeMap<String, TaskInfo>, want: usize, since_ns: u128) -> Result<usize, String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut tails: BTreeMap<&str, Vec<bool>> = BTreeMap::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 || f[1].parse::<u128>().map_or(true, |t| t < since_ns) {
            continue;
        }
        tails.entry(f[0]).or_default().push(f[2] == "ok");
    }
    let running: Vec<&String> = ts.iter().filter(|(_, t)| t.service == CLIENT && t.running).map(|(id, _)| id).collect();
    let mut clean = 0;
    for id in running {
        let tail = tails.get(id.as_str()).map(Vec::as_slice).unwrap_or_default();
        let ok_run = tail.iter().rev().take_while(|ok| **ok).count();
        if ok_run < want {
            return Err(format!("client {id}: {ok_run} answers in a row (of {} requests)", tail.len()));
        }
        clean += 1;
    }
    Ok(clean)
}

/// One agent's endpoints: from its kept view (what its DNS serves: task ids and addresses) and
/// from its nftables table (the addresses its VIPs send to).
struct AgentEndpoints {
    view: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    nft: BTreeSet<Ipv4Addr>,
}

fn agent_endpoints(dir: &Path, host: Option<&crate::net::Host>) -> Result<AgentEndpoints> {
    let path = dir.join("overlay").join("overlay.json");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?;
    let mut view: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for svc in v["view"]["services"].as_object().into_iter().flat_map(|m| m.values()) {
        for (task, nets) in svc["endpoints"].as_object().into_iter().flatten() {
            let addrs = nets
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
                .filter_map(|a| a.as_str()?.parse::<Ipv4Addr>().ok());
            view.entry(task.clone()).or_default().extend(addrs);
        }
    }
    let mut argv: Vec<String> = host.map(Net::exec_prefix).unwrap_or_default();
    argv.extend(["nft", "-j", "list", "table", "ip", "berth"].map(String::from));
    let out = Command::new(&argv[0]).args(&argv[1..]).output().context("running nft")?;
    anyhow::ensure!(out.status.success(), "nft list table ip berth: {}", String::from_utf8_lossy(&out.stderr).trim());
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let nft = listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["chain"]["name"].as_str())
        .filter_map(endpoint_of_chain)
        .collect();
    Ok(AgentEndpoints { view, nft })
}

/// The endpoint address in an endpoint chain's name: `ep-<vip>-<proto>-<port>-<address>-<port>`.
fn endpoint_of_chain(name: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = name.strip_prefix("ep-")?.split('-').collect();
    (parts.len() == 5).then(|| parts[3].parse().ok()).flatten()
}

/// What is wrong with the agents' endpoints now (empty when nothing is).
async fn endpoint_problems(c: &Cluster) -> Result<Vec<String>> {
    let ts = tasks(c).await?;
    let live: BTreeMap<&String, &TaskInfo> = ts.iter().filter(|(_, t)| t.running && alive(t.pid)).collect();
    let live_addrs: BTreeSet<Ipv4Addr> = live.values().flat_map(|t| t.addresses.iter().copied()).collect();
    let healthy_web: BTreeMap<&String, &TaskInfo> =
        live.iter().filter(|(_, t)| t.service == WEB && t.healthy).map(|(k, v)| (*k, *v)).collect();
    let mut problems = Vec::new();
    for a in &c.agents {
        let e = match agent_endpoints(&a.dir, a.host.as_ref()) {
            Ok(e) => e,
            Err(err) => {
                problems.push(format!("{}: {err:#}", a.name));
                continue;
            }
        };
        for (task, addrs) in &e.view {
            if !live.contains_key(task) {
                problems.push(format!("{}: DNS serves task {task} ({addrs:?}), which is not running", a.name));
            }
        }
        for addr in &e.nft {
            if !live_addrs.contains(addr) {
                problems.push(format!("{}: nftables sends to {addr}, which no running task holds", a.name));
            }
        }
        for (id, t) in &healthy_web {
            if !e.view.contains_key(*id) {
                problems.push(format!("{}: DNS lacks healthy {WEB} task {id}", a.name));
            }
            if !t.addresses.iter().all(|x| e.nft.contains(x)) {
                problems.push(format!("{}: nftables lacks healthy {WEB} task {id} {:?}", a.name, t.addresses));
            }
        }
    }
    Ok(problems)
}

/// The `endpoints-current` and `vip-serves` checks (after healing and convergence).
pub async fn checks(c: &Cluster, w: &VipWorkload) -> Vec<Check> {
    let t0 = Instant::now();
    let mut last = vec!["never read".to_string()];
    while t0.elapsed() < ENDPOINT_BOUND {
        match endpoint_problems(c).await {
            Ok(p) if p.is_empty() => {
                last.clear();
                break;
            }
            Ok(p) => last = p,
            Err(e) => last = vec![format!("{e:#}")],
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let current = Check::new(
        "endpoints-current",
        last.is_empty(),
        if last.is_empty() {
            format!(
                "every agent's DNS and nftables named exactly the running tasks {:.0} ms after convergence ({} web \
                 tasks killed)",
                t0.elapsed().as_secs_f64() * 1000.0,
                w.killed.len()
            )
        } else {
            format!("still wrong {ENDPOINT_BOUND:?} after convergence: {}", last.join("; "))
        },
    );
    let since = crate::services::unix_ns();
    let t1 = Instant::now();
    let mut why = String::new();
    let mut clean = false;
    while t1.elapsed() < ENDPOINT_BOUND {
        match tasks(c).await.map(|ts| clean_clients(&w.log, &ts, CLEAN_RUN, since)) {
            Ok(Ok(n)) if n > 0 => {
                clean = true;
                why = format!("{n} clients each got {CLEAN_RUN} answers in a row through the VIP");
                break;
            }
            Ok(Ok(_)) => why = "no client runs".into(),
            Ok(Err(e)) => why = e,
            Err(e) => why = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (ok, fail) = w.counts();
    let serves = Check::new("vip-serves", clean, format!("{why}; over the run {ok} requests answered, {fail} failed"));
    vec![current, serves]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_chain_names() {
        assert_eq!(endpoint_of_chain("ep-198.19.16.2-tcp-8080-198.19.64.3-8080"), Some(Ipv4Addr::new(198, 19, 64, 3)));
        assert_eq!(endpoint_of_chain("svc-198.19.16.2-tcp-8080"), None);
        assert_eq!(endpoint_of_chain("ep-x"), None);
    }

    #[test]
    fn clean_clients_counts_answers_in_a_row_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "c1 10 ok a\nc1 11 fail URLError\nc1 12 ok b\nc1 13 ok a\nc2 10 ok a\n").unwrap();
        let t =
            |s: &str| TaskInfo { service: s.into(), running: true, healthy: true, pid: 0, addresses: BTreeSet::new() };
        let ts: BTreeMap<String, TaskInfo> = [("c1".to_string(), t(CLIENT)), ("c2".to_string(), t(CLIENT))].into();
        assert_eq!(clean_clients(&log, &ts, 1, 0), Ok(2));
        assert!(clean_clients(&log, &ts, 2, 0).unwrap_err().contains("c2"));
        assert!(clean_clients(&log, &ts, 3, 0).is_err(), "c1's run is broken by the failure");
        assert!(clean_clients(&log, &ts, 1, 12).unwrap_err().contains("c2"), "c2 has nothing since 12");
    }
}
