//! etcd's failover time, measured the way berth's is (see `failover.rs`): a real 3-member etcd
//! cluster (Debian's etcd-server 3.4) on loopback ports, with etcd's default timings (100 ms
//! heartbeat, 1 s election timeout).

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use etcd_client::{Client, ConnectOptions};
use serde::Serialize;

use crate::cluster::free_port;

/// One measured failover.
#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub round: usize,
    /// The killed member, 1..=3.
    pub killed: u64,
    pub ms: f64,
}

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    child: Option<Child>,
}

/// Every member started here, killed on drop.
struct Members {
    members: Vec<Member>,
    dir: std::path::PathBuf,
    initial: String,
}

impl Drop for Members {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Members {
    fn start(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        let data = self.dir.join(&m.name);
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{}.log", m.name)))?;
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &m.client_url, "--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url, "--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &self.initial, "--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (apt-get install etcd-server)")?;
        m.child = Some(child);
        Ok(())
    }

    /// For an error: each member's state (running, or how it exited) and the end of its log; the
    /// logs themselves go with the temporary directory.
    fn diagnosis(&mut self) -> String {
        let mut out = String::new();
        for m in &mut self.members {
            let state = match m.child.as_mut().map(|c| c.try_wait()) {
                None => "not running (killed by this harness)".to_string(),
                Some(Ok(None)) => "running".to_string(),
                Some(Ok(Some(status))) => format!("exited: {status}"),
                Some(Err(e)) => format!("unknown: {e}"),
            };
            let log = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            out.push_str(&format!("\n{} ({}, peer {}): {state}", m.name, m.client_url, m.peer_url));
            for line in tail.iter().rev() {
                out.push_str(&format!("\n    {line}"));
            }
        }
        out
    }
}

async fn client(url: &str) -> Result<Client> {
    let opts =
        ConnectOptions::new().with_connect_timeout(Duration::from_millis(500)).with_timeout(Duration::from_millis(100));
    Ok(Client::connect([url], Some(opts)).await?)
}

/// Waits until all members answer, agree on one leader, and have equal raft indexes; returns the
/// leader's member position.
async fn settled(m: &mut Members) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut views = Vec::new();
        for mem in &m.members {
            let Ok(mut c) = client(&mem.client_url).await else { break };
            let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), c.status()).await else { break };
            let id = s.header().map(|h| h.member_id()).unwrap_or(0);
            views.push((id, s.leader(), s.raft_index()));
        }
        if views.len() == m.members.len()
            && views.iter().all(|v| v.1 == views[0].1 && v.2 == views[0].2)
            && let Some(pos) = views.iter().position(|v| v.0 == v.1)
        {
            return Ok(pos);
        }
        if Instant::now() > deadline {
            bail!("etcd did not settle within 60 s (views {views:?}){}", m.diagnosis());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts 3 etcd members under `dir` and measures `kills` failovers: wait until settled, kill -9
/// the leader, time the first put acknowledged by a survivor (100 ms per attempt, 5 ms between
/// rounds), restart the killed member.
pub async fn failover(kills: usize, dir: &Path) -> Result<Vec<Failover>> {
    let mut members = Vec::new();
    for i in 1..=3 {
        members.push(Member {
            name: format!("m{i}"),
            client_url: format!("http://127.0.0.1:{}", free_port()?),
            peer_url: format!("http://127.0.0.1:{}", free_port()?),
            child: None,
        });
    }
    let initial = members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect::<Vec<_>>().join(",");
    let mut m = Members { members, dir: dir.to_path_buf(), initial };
    for i in 0..3 {
        m.start(i)?;
    }
    let mut out = Vec::with_capacity(kills);
    for round in 1..=kills {
        let leader = settled(&mut m).await?;
        let mut survivors = Vec::new();
        for (i, mem) in m.members.iter().enumerate() {
            if i != leader {
                survivors.push(client(&mem.client_url).await?);
            }
        }
        let t0 = Instant::now();
        if let Some(mut c) = m.members[leader].child.take() {
            c.kill()?;
            c.wait()?;
        }
        let key = format!("failover/{round}");
        let ms = 'probe: loop {
            for c in survivors.iter_mut() {
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(100), c.put(key.as_str(), "x", None)).await
                {
                    break 'probe t0.elapsed().as_secs_f64() * 1000.0;
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no write committed within 60 s of killing etcd member {}", leader + 1);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        eprintln!("etcd kill {round}: member {} killed, first committed write after {ms:.0} ms", leader + 1);
        out.push(Failover { round, killed: leader as u64 + 1, ms });
        m.start(leader)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn etcd_failover_measures_each_kill() {
        if Command::new("etcd").arg("--version").output().is_err() {
            eprintln!("etcd is not installed (deploy/chaos-prereqs.sh installs etcd-server): skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = failover(2, dir.path()).await.unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|f| f.ms > 0.0 && f.ms < 30_000.0), "{f:?}");
    }
}
