//! `berth bench kv`: the same write workload against berth or etcd, from the same harness; the
//! dispatch of the other benchmarks (`bench_cluster`, `bench_overlay`, the scheduler's).

use std::{sync::Arc, time::Instant};

use anyhow::{Context, Result, bail};
use berth_api::pb;
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{Global, client::Client, output};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Concurrent puts of random values; prints throughput and latency.
    Kv(KvBench),
    /// Starts its own 3-master cluster and kills the leader N times: time from kill -9 to the
    /// first committed write.
    Failover(FailoverBench),
    /// Starts its own 3-master cluster, writes steadily for a while and counts leader changes
    /// (there should be none).
    Stability(StabilityBench),
    /// Starts its own 3-master cluster and N simulated agents; reports the leader's CPU and
    /// memory while they heartbeat.
    Agents(AgentsBench),
    /// The pure scheduler alone: a synthetic cluster (3 zones, mixed node sizes, constraints,
    /// spread, anti-affinity) and N tasks placed in batches of 1,000.
    Schedule(ScheduleBench),
    /// The agent's data plane in network namespaces of its own (root): a VIP's first-packet
    /// cost with 10 and with 10,000 services, the DNS server against dnsmasq, the overlay's
    /// memory with 1,000 services and 10,000 endpoints.
    Overlay(crate::bench_overlay::OverlayBench),
}

#[derive(Args)]
pub struct ScheduleBench {
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// End to end instead: start 3 masters and --nodes simulated agents, apply services with
    /// --tasks replicas in all, and time until every task is committed as running.
    #[arg(long)]
    e2e: bool,
    #[arg(long = "master-arg", allow_hyphen_values = true)]
    master_args: Vec<String>,
}

#[derive(Args)]
pub struct AgentsBench {
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// How long to measure once every node is ready.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    duration: std::time::Duration,
    #[arg(long = "master-arg", allow_hyphen_values = true)]
    master_args: Vec<String>,
}

#[derive(Args)]
pub struct FailoverBench {
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Extra flags for every master, e.g. "--election-timeout=500ms".
    #[arg(long = "master-arg", allow_hyphen_values = true)]
    master_args: Vec<String>,
}

#[derive(Args)]
pub struct StabilityBench {
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    duration: std::time::Duration,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    #[arg(long = "master-arg", allow_hyphen_values = true)]
    master_args: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Berth,
    Etcd,
}

#[derive(Args)]
pub struct KvBench {
    #[arg(long, value_enum, default_value_t = Target::Berth)]
    target: Target,
    /// Concurrent clients, each with its own connection.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Total puts across all clients.
    #[arg(long, default_value_t = 10_000)]
    ops: usize,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Distinct keys written (round-robin).
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
}

#[derive(Serialize)]
struct BenchOut {
    target: Target,
    clients: usize,
    value_size: usize,
    ops: usize,
    errors: usize,
    seconds: f64,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

enum Conn {
    Berth(berth_api::pb::kv_client::KvClient<crate::client::Conn>),
    Etcd(Box<etcd_client::KvClient>),
}

impl Conn {
    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        match self {
            Conn::Berth(c) => {
                c.put(pb::PutRequest { key, value, prev_kv: false }).await?;
            }
            Conn::Etcd(c) => {
                c.put(key, value, None).await?;
            }
        }
        Ok(())
    }
}

pub async fn run(cmd: BenchCmd, g: &Global) -> Result<()> {
    let a = match cmd {
        BenchCmd::Kv(a) => a,
        BenchCmd::Failover(f) => return crate::bench_cluster::failover(f.kills, &f.master_args, g.output).await,
        BenchCmd::Schedule(s) if s.e2e => {
            return crate::bench_cluster::schedule_e2e(s.nodes, s.tasks, &s.master_args, g.output).await;
        }
        BenchCmd::Schedule(s) => {
            let r = berth_scheduler::bench(s.nodes, s.tasks);
            output::print(g.output, &r, |r| {
                println!(
                    "schedule: {} nodes, {} tasks: {} placed, {} unplaced in {:.3}s ({:.0} placements/s)",
                    r.nodes, r.tasks, r.placed, r.unplaced, r.seconds, r.placements_per_sec
                )
            });
            return Ok(());
        }
        BenchCmd::Overlay(o) => return crate::bench_overlay::run(o, g.output).await,
        BenchCmd::Agents(a) => {
            return crate::bench_cluster::agents(a.count, a.duration, &a.master_args, g.output).await;
        }
        BenchCmd::Stability(s) => {
            return crate::bench_cluster::stability(s.duration, s.clients, s.value_size, &s.master_args, g.output)
                .await;
        }
    };
    if a.clients == 0 || a.ops == 0 {
        bail!("--clients and --ops must be at least 1");
    }
    // berth always speaks mutual TLS. etcd does when --ca-cert/--cert/--key are given (the
    // comparison script gives it the same kind of certificates), plain text otherwise.
    let berth = match a.target {
        Target::Berth => Some(crate::config::client(g)?),
        Target::Etcd => None,
    };
    let etcd_tls = match (&g.ca_cert, &g.cert, &g.key) {
        (Some(ca), Some(cert), Some(key)) if a.target == Target::Etcd => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            Some(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?))
                    .identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?)),
            )
        }
        _ => None,
    };
    let endpoints: Vec<String> = match &berth {
        Some(c) => c.endpoints().to_vec(),
        None => g.endpoints.clone(),
    };
    if endpoints.is_empty() {
        bail!("no endpoints: pass --endpoints");
    }
    // Clients are spread over the endpoints, as etcd's own benchmark does.
    let mut conns = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let ep = &endpoints[i % endpoints.len()];
        conns.push(match a.target {
            Target::Berth => Conn::Berth(Client::kv(berth.as_ref().expect("berth client").channel(ep)?)),
            Target::Etcd => {
                let (url, opts) = match &etcd_tls {
                    Some(tls) => {
                        (format!("https://{ep}"), Some(etcd_client::ConnectOptions::new().with_tls(tls.clone())))
                    }
                    None => (format!("http://{ep}"), None),
                };
                let c = etcd_client::Client::connect([url], opts)
                    .await
                    .with_context(|| format!("cannot connect to etcd at {ep}"))?;
                Conn::Etcd(Box::new(c.kv_client()))
            }
        });
    }
    // Warm up every connection so that connection set-up is not measured.
    for (i, c) in conns.iter_mut().enumerate() {
        c.put(format!("bench/warmup/{i}").into_bytes(), vec![b'w'; a.value_size])
            .await
            .context("warm-up put failed")?;
    }
    let per_client = a.ops.div_ceil(a.clients);
    let value: Arc<Vec<u8>> = Arc::new((0..a.value_size).map(|i| b'a' + (i % 26) as u8).collect());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (ci, mut conn) in conns.into_iter().enumerate() {
        let value = value.clone();
        let n = per_client.min(a.ops.saturating_sub(ci * per_client));
        let keys = a.keys;
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut errors = 0;
            for i in 0..n {
                let key = format!("bench/{:08}", (ci * per_client + i) % keys).into_bytes();
                let t = Instant::now();
                match conn.put(key, value.to_vec()).await {
                    Ok(()) => h.saturating_record(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (h, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await?;
        hist.add(&h)?;
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = hist.len() as usize;
    let out = BenchOut {
        target: a.target,
        clients: a.clients,
        value_size: a.value_size,
        ops: ok,
        errors,
        seconds: secs,
        ops_per_sec: ok as f64 / secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
    };
    output::print(g.output, &out, |o| {
        println!(
            "target={:?} clients={} ops={} errors={} seconds={:.2} ops_per_sec={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
            o.target, o.clients, o.ops, o.errors, o.seconds, o.ops_per_sec, o.p50_ms, o.p99_ms, o.max_ms
        )
    });
    Ok(())
}
