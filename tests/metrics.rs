//! Metrics and health endpoints on a real `berth dev` cluster (3 masters, 2 agents): every
//! process serves `/metrics` in the Prometheus text format at the address `berth dev` records in
//! cluster.json; the named series exist and move with a write and with a failover; `/readyz`
//! turns false on a master cut off from the quorum and true again after.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use berth_tests::{Dev, berth_bin, free_port, signal, wait_for};
use serde_json::Value;

/// `GET path` over HTTP/1.1: (status code, body).
fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP head from {addr}{path}"))?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("bad head {head}"))?;
    Ok((code, body.to_string()))
}

/// One scrape, parsed by a Prometheus text-format parser: sample name + sorted labels -> value
/// (a histogram's count, for histograms).
fn scrape(addr: &str) -> Result<BTreeMap<String, f64>> {
    let (code, body) = http_get(addr, "/metrics")?;
    if code != 200 {
        bail!("GET {addr}/metrics answered {code}: {body}");
    }
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .with_context(|| format!("{addr}/metrics is not in the Prometheus text format"))?;
    let mut out = BTreeMap::new();
    for s in parsed.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let key = if labels.is_empty() { s.metric.clone() } else { format!("{}{{{}}}", s.metric, labels.join(",")) };
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(b) => b.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(key, v);
    }
    Ok(out)
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// The sum of every series of `name` (all label sets).
fn sum(m: &BTreeMap<String, f64>, name: &str, label: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name) && (label.is_empty() || k.contains(label)))
        .map(|(_, v)| v)
        .sum()
}

fn missing(m: &BTreeMap<String, f64>, names: &[&str]) -> Vec<String> {
    names.iter().filter(|n| !m.keys().any(|k| k.split('{').next() == Some(**n))).map(|n| n.to_string()).collect()
}

fn masters(c: &Value) -> Vec<(u64, String, i64)> {
    c["masters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["id"].as_u64().unwrap_or(0),
                m["metrics"].as_str().unwrap_or_default().to_string(),
                m["pid"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

const SLEEPERS: &str = r#"
kind: Service
metadata: {name: sleepers}
spec:
  replicas: 2
  task:
    runtime: process
    command: ["/bin/sh", "-c", "exec sleep 100000"]
  placement:
    max_replicas_per_node: 1
"#;

const MASTER_SERIES: &[&str] = &[
    "berth_raft_term",
    "berth_raft_leader_changes_total",
    "berth_raft_commit_index",
    "berth_raft_applied_index",
    "berth_raft_log_append_seconds_count",
    "berth_raft_log_fsync_seconds_count",
    "berth_raft_proposal_commands_count",
    "berth_raft_snapshot_bytes",
    "berth_store_keys",
    "berth_store_revision",
    "berth_store_compact_revision",
    "berth_store_db_bytes",
    "berth_grpc_requests_total",
    "berth_grpc_request_seconds_count",
    "berth_agent_sessions",
    "berth_agent_heartbeat_age_max_seconds",
    "berth_status_queued",
    "berth_controller_pending_tasks",
    "berth_controller_placements_total",
    "berth_controller_restarts_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds",
];

const AGENT_SERIES: &[&str] = &[
    "berth_agent_session_connected",
    "berth_agent_sessions_opened_total",
    "berth_agent_tasks",
    "berth_agent_status_reports_total",
    "berth_agent_networks",
    "berth_agent_volumes",
    "process_resident_memory_bytes",
];

#[test]
fn every_process_serves_metrics_that_move_and_readiness_follows_the_quorum() -> Result<()> {
    let dev = Dev::start("berth-metrics-", 2)?;
    let c = dev.cluster()?;
    let ms = masters(&c);
    assert_eq!(ms.len(), 3);
    assert!(ms.iter().all(|(_, m, _)| !m.is_empty()), "every master has a metrics address in cluster.json: {c}");
    let agents: Vec<String> =
        c["agents"].as_array().unwrap().iter().map(|g| g["metrics"].as_str().unwrap_or_default().to_string()).collect();
    assert!(agents.iter().all(|m| !m.is_empty()), "every agent has a metrics address in cluster.json: {c}");

    // Every process: the named series, a live /healthz, and /readyz once settled.
    for (id, addr, _) in &ms {
        let m = scrape(addr)?;
        let gone = missing(&m, MASTER_SERIES);
        assert!(gone.is_empty(), "master {id} lacks {gone:?}");
        assert_eq!(http_get(addr, "/healthz")?.0, 200);
        wait_for(Duration::from_secs(20), "every master ready", || {
            (http_get(addr, "/readyz").ok()?.0 == 200).then_some(())
        })?;
    }
    for addr in &agents {
        let m = scrape(addr)?;
        let gone = missing(&m, AGENT_SERIES);
        assert!(gone.is_empty(), "agent {addr} lacks {gone:?}");
        assert_eq!(http_get(addr, "/healthz")?.0, 200);
        wait_for(Duration::from_secs(20), "every agent in session", || {
            (http_get(addr, "/readyz").ok()?.0 == 200).then_some(())
        })?;
        assert_eq!(value(&scrape(addr)?, "berth_agent_session_connected"), 1.0);
    }
    let leader = dev.berth_json(&["cluster", "status"])?["leader"].as_u64().ok_or_else(|| anyhow!("no leader"))?;
    let leader_addr = &ms.iter().find(|(id, _, _)| *id == leader).unwrap().1;
    let lm = scrape(leader_addr)?;
    assert_eq!(value(&lm, "berth_raft_is_leader"), 1.0);
    assert_eq!(value(&lm, "berth_agent_sessions"), 2.0, "the leader holds both agents' sessions");

    // Tasks move the agents' and the controllers' figures: placed, started, running; then gone.
    let spec = dev.dir.path().join("sleepers.yaml");
    std::fs::write(&spec, SLEEPERS)?;
    let out = dev.berth(&["apply", "-f", &spec.to_string_lossy()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let running = |addr: &String| scrape(addr).map(|m| value(&m, "berth_agent_tasks{state=running}")).unwrap_or(0.0);
    wait_for(Duration::from_secs(60), "both agents to report a running task", || {
        agents.iter().all(|a| running(a) == 1.0).then_some(())
    })?;
    for a in &agents {
        let m = scrape(a)?;
        assert!(sum(&m, "berth_agent_task_start_seconds_count", "runtime=process") >= 1.0, "{a}: start latency");
        assert!(value(&m, "berth_agent_status_reports_total") >= 1.0, "{a}: status reports");
    }
    let lm = scrape(leader_addr)?;
    assert!(value(&lm, "berth_controller_placements_total") >= 2.0, "the leader counts its placements");
    assert!(value(&lm, "berth_status_committed_total") >= 2.0, "the leader commits the agents' reports");
    assert!(value(&lm, "berth_assignment_lag_seconds_count") >= 2.0, "assignments sent to both nodes");
    let out = dev.berth(&["delete", "service", "sleepers"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(Duration::from_secs(60), "the tasks to stop", || agents.iter().all(|a| running(a) == 0.0).then_some(()))?;

    // A write moves the log, the store and the API figures on every master.
    let before: Vec<BTreeMap<String, f64>> = ms.iter().map(|(_, a, _)| scrape(a)).collect::<Result<_>>()?;
    // `berth kv put` writes through KV/Txn (with its idempotency key).
    let puts = |m: &BTreeMap<String, f64>| sum(m, "berth_grpc_requests_total", "method=/berth.v1.KV/");
    let out = dev.berth(&["kv", "put", "metrics-test", "moved"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = wait_for(Duration::from_secs(10), "every master to apply the write", || {
        let now: Vec<BTreeMap<String, f64>> = ms.iter().map(|(_, a, _)| scrape(a)).collect::<Result<_>>().ok()?;
        now.iter()
            .zip(&before)
            .all(|(n, b)| value(n, "berth_raft_applied_index") > value(b, "berth_raft_applied_index"))
            .then_some(now)
    })?;
    for (n, b) in after.iter().zip(&before) {
        assert!(value(n, "berth_store_revision") > value(b, "berth_store_revision"));
        assert!(value(n, "berth_raft_log_fsync_seconds_count") > value(b, "berth_raft_log_fsync_seconds_count"));
    }
    let put_calls: f64 = after.iter().map(puts).sum::<f64>() - before.iter().map(puts).sum::<f64>();
    assert!(put_calls >= 1.0, "the KV call is counted by the master that served it");

    // Failover: the survivors count a leader change and a new term.
    let (_, _, leader_pid) = ms.iter().find(|(id, _, _)| *id == leader).unwrap().clone();
    assert!(signal(leader_pid, "KILL"), "kill -9 the leader (a process berth dev started for this test)");
    let survivors: Vec<&(u64, String, i64)> = ms.iter().filter(|(id, _, _)| *id != leader).collect();
    let term_before = value(&before[0], "berth_raft_term");
    wait_for(Duration::from_secs(20), "the survivors to count a leader change", || {
        survivors
            .iter()
            .all(|(_, a, _)| {
                scrape(a).is_ok_and(|m| {
                    value(&m, "berth_raft_leader_changes_total") >= 1.0 && value(&m, "berth_raft_term") > term_before
                })
            })
            .then_some(())
    })?;
    for (_, a, _) in &survivors {
        wait_for(Duration::from_secs(20), "the survivors ready under the new leader", || {
            (http_get(a, "/readyz").ok()?.0 == 200).then_some(())
        })?;
    }

    // Cut one survivor off from the quorum (freeze the other): not ready, then ready again.
    let (frozen_id, _, frozen_pid) = survivors[0];
    let (alone_id, alone, _) = survivors[1];
    assert!(signal(*frozen_pid, "STOP"));
    let cut_off = wait_for(Duration::from_secs(20), "master cut off from the quorum to turn unready", || {
        let (code, body) = http_get(alone, "/readyz").ok()?;
        (code == 503).then_some(body)
    });
    assert!(signal(*frozen_pid, "CONT"), "resume master {frozen_id}");
    let body = cut_off?;
    assert!(body.starts_with("not ready: "), "{body}");
    assert_eq!(http_get(alone, "/healthz")?.0, 200, "master {alone_id} is alive all along");
    wait_for(Duration::from_secs(30), "master back in the quorum to turn ready", || {
        (http_get(alone, "/readyz").ok()?.0 == 200).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_wrong_metrics_address_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ep = format!("127.0.0.1:{}", free_port());
    let out = Command::new(berth_bin())
        .args(["master", "--id", "1", "--listen", &ep, "--initial-cluster", &format!("1={ep}")])
        .args(["--metrics-listen", "nowhere:99"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--metrics-listen") && err.contains("IP:PORT"), "{err}");
    Ok(())
}
