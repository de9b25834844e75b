//! Failover time after kill -9 of the leader, measured the same way on berth and on etcd: the
//! clock starts just before the SIGKILL, and stops at the first put acknowledged by any surviving
//! member (each attempt bounded by 100 ms, 5 ms between rounds). Every round starts from a
//! settled cluster: all members up, agreeing on the leader, with equal applied indexes.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use berth_api::pb;
use serde::Serialize;

use crate::{
    checks::quantile,
    cluster::{Cluster, Options},
    workload,
};

#[derive(Serialize)]
struct Summary<'a> {
    target: &'a str,
    kills: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    all_ms: Vec<f64>,
}

pub async fn run(etcd: bool, kills: usize, out: &Path, master_args: Vec<String>) -> Result<bool> {
    std::fs::create_dir_all(out)?;
    let dir = tempfile::Builder::new().prefix("failover-").tempdir_in(out)?;
    let times: Vec<f64> = if etcd {
        crate::etcd::failover(kills, dir.path()).await?.into_iter().map(|f| f.ms).collect()
    } else {
        berth(kills, dir.path(), master_args).await?
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let target = if etcd { "etcd" } else { "berth" };
    let s = Summary {
        target,
        kills: times.len(),
        p50_ms: quantile(&sorted, 0.5),
        p99_ms: quantile(&sorted, 0.99),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        mean_ms: sorted.iter().sum::<f64>() / sorted.len().max(1) as f64,
        all_ms: times,
    };
    println!(
        "{target}: {} leader kills, failover (kill -9 to first committed write) p50 {:.0} ms, p99 {:.0} ms, max {:.0} \
         ms, mean {:.0} ms",
        s.kills, s.p50_ms, s.p99_ms, s.max_ms, s.mean_ms
    );
    let json = serde_json::to_string(&s)?;
    println!("{json}");
    std::fs::write(out.join(format!("failover-{target}.json")), json)?;
    Ok(true)
}

async fn berth(kills: usize, dir: &Path, master_args: Vec<String>) -> Result<Vec<f64>> {
    let opts = Options { masters: 3, agents: 0, simulated: 0, node_down_grace: Duration::from_secs(10), master_args };
    let mut c = Cluster::start(dir, opts, false, 0).await?;
    let mut times = Vec::with_capacity(kills);
    for round in 1..=kills {
        let leader = settled(&c).await?;
        let others: Vec<_> =
            c.masters.values().filter(|m| m.id != leader).map(|m| c.channel(&m.endpoint)).collect::<Result<_>>()?;
        let t0 = Instant::now();
        c.kill_master(leader);
        let Some(_) = workload::first_write(&others, &format!("failover/{round}"), Duration::from_secs(60)).await
        else {
            bail!("no write was committed within 60 s of killing leader {leader}; logs in {}", dir.display());
        };
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        eprintln!("berth kill {round}: master {leader} killed, first committed write after {ms:.0} ms");
        times.push(ms);
        c.start_master(leader)?;
    }
    Ok(times)
}

/// Waits until every master is up, all agree on one leader, and all have applied the same index.
async fn settled(c: &Cluster) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let views = c.views().await;
        if views.len() == c.masters.len()
            && let Some((_, leader, term)) = views.first().copied()
            && leader != 0
            && views.iter().all(|v| v.1 == leader && v.2 == term)
            && let Some(m) = c.masters.get(&leader)
        {
            let mut client = pb::cluster_client::ClusterClient::new(c.channel(&m.endpoint)?);
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), client.status(pb::StatusRequest {})).await {
                let s = s.into_inner();
                let top = s.members.iter().map(|m| m.applied_index).max().unwrap_or(0);
                if s.members.iter().all(|m| m.applied_index == top && m.error.is_empty()) {
                    return Ok(leader);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster did not settle within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
