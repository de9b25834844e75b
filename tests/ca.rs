//! CA rotation under a running cluster: three masters, two agents, a service's tasks running.
//! `berth ca rotate` moves every master and agent onto a new CA and retires the old one, and
//! nothing restarts and no node goes down on the way.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Result, bail};
use berth_pki::{CertifiedKey, bundle_cert_digests};
use berth_tests::{Cluster, apply, berth_bin, cluster_with_agents, spawn_agent, tasks, wait_for};
use serde_json::Value;

const SLEEPER: &str = r#"
kind: Service
metadata: {name: steady}
spec:
  replicas: 2
  task:
    runtime: process
    command: ["/bin/sh", "-c", "exec sleep 100000"]
    resources: {cpu: 0.1, memory: 16Mi}
  placement:
    max_replicas_per_node: 1
"#;

/// `berth ARGS` with the credentials in `dir/berth.toml` only.
fn with_config(c: &Cluster, dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(berth_bin());
    cmd.args(args).arg("--config").arg(dir.join("berth.toml")).args(["--endpoints", &c.endpoints()]);
    for var in ["BERTH_CONFIG", "BERTH_ENDPOINTS", "BERTH_CA_CERT", "BERTH_CERT", "BERTH_KEY"] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).output().expect("running the berth CLI")
}

fn ok(out: Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Digests of the CA certificates in a PEM file.
fn digests(path: &Path) -> Result<Vec<String>> {
    let pem = std::fs::read_to_string(path)?;
    Ok(bundle_cert_digests(&pem)?.iter().map(|d| d.to_string()).collect())
}

/// (task id, pid) of the running tasks in `tasks` (`berth get tasks -o json`).
fn running(tasks: Vec<Value>) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = tasks
        .into_iter()
        .filter(|t| t["state"] == "running")
        .map(|t| (t["id"].as_str().unwrap_or("").to_string(), t["pid"].as_i64().unwrap_or(0)))
        .collect();
    out.sort();
    out
}

/// `berth ARGS -o json` with the credentials in `dir`, as an array.
fn list_with(c: &Cluster, dir: &Path, args: &[&str]) -> Result<Vec<Value>> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let v: Value = serde_json::from_str(&ok(with_config(c, dir, &a), &format!("{args:?}"))?)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

// The rotation's whole course: both CAs trusted, agents renewed onto the new one over their open
// sessions, masters switched, the old CA retired. The same tasks run with the same PIDs, every
// node stays ready and connected throughout (polled while the rotation runs), the old admin
// certificate is refused afterwards and the new one works, and a token made afterwards joins a
// new agent.
#[test]
fn ca_rotation_moves_everything_without_a_restart() -> Result<()> {
    let (c, agents) = cluster_with_agents(&[("r1", "a"), ("r2", "b")], &[])?;
    let dir = c.dir.path().to_path_buf();
    apply(&c, &dir, "steady", SLEEPER)?;
    let before = wait_for(Duration::from_secs(60), "2 running tasks", || {
        let r = running(tasks(&c, "steady"));
        (r.len() == 2 && r.iter().all(|(_, pid)| *pid > 0)).then_some(r)
    })?;
    let changed_at = |ns: &[Value]| -> Vec<(String, i64)> {
        let mut v: Vec<_> = ns
            .iter()
            .map(|n| (n["name"].as_str().unwrap_or("").to_string(), n["status_changed_at_ms"].as_i64().unwrap_or(0)))
            .collect();
        v.sort();
        v
    };
    let nodes_before = changed_at(c.berth_json(&["get", "nodes"])?.as_array().unwrap_or(&Vec::new()));
    let old_ca = digests(&c.pki_dir().join("ca.crt"))?;
    assert_eq!(old_ca.len(), 1);

    // The rotation runs in the background while this thread watches the nodes.
    let out_dir = dir.join("rotated");
    let mut rotate = Command::new(berth_bin());
    rotate
        .args(["ca", "rotate", "--out", out_dir.to_str().unwrap(), "--timeout", "3m"])
        .args(["--endpoints", &c.endpoints()]);
    for (k, v) in berth_tests::admin_env(&c.pki_dir()) {
        rotate.env(k, v);
    }
    let child = rotate.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let started = std::time::Instant::now();
    let watcher = std::thread::spawn({
        let endpoints = c.endpoints();
        let out_dir = out_dir.clone();
        let pki = c.pki_dir();
        move || -> Vec<String> {
            // Whatever credentials work at the moment (the old ones until the masters switch).
            let mut bad = Vec::new();
            for _ in 0..600 {
                let mut cmd = Command::new(berth_bin());
                cmd.args(["get", "nodes", "-o", "json", "--endpoints", &endpoints]);
                if out_dir.join("client.crt").exists() {
                    cmd.arg("--config").arg(out_dir.join("berth.toml"));
                    for var in ["BERTH_CONFIG", "BERTH_CA_CERT", "BERTH_CERT", "BERTH_KEY"] {
                        cmd.env_remove(var);
                    }
                } else {
                    for (k, v) in berth_tests::admin_env(&pki) {
                        cmd.env(k, v);
                    }
                }
                if let Ok(out) = cmd.stdin(Stdio::null()).output()
                    && out.status.success()
                    && let Ok(Value::Array(ns)) = serde_json::from_slice::<Value>(&out.stdout)
                {
                    for n in ns {
                        if n["status"] != "ready" || n["connected"] == false {
                            bad.push(format!("{} {} connected={}", n["name"], n["status"], n["connected"]));
                        }
                    }
                }
                if std::fs::read_to_string(out_dir.join("done")).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            bad
        }
    });
    let out = child.wait_with_output()?;
    std::fs::write(out_dir.join("done"), b"")?;
    let bad = watcher.join().expect("the watcher thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ca rotate: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("CA rotation done"), "{stdout}");
    eprintln!("CA rotation done in {:.1}s:\n{stdout}", started.elapsed().as_secs_f64());
    assert!(bad.is_empty(), "a node was not ready and connected during the rotation: {bad:?}");

    // Everything on the new CA alone.
    let status: Value =
        serde_json::from_str(&ok(with_config(&c, &out_dir, &["ca", "status", "-o", "json"]), "ca status")?)?;
    assert_eq!(status["phase"], "done", "{status}");
    let new_ca = status["signing"].as_str().unwrap_or_default().to_string();
    assert!(!old_ca.contains(&new_ca), "{status}");
    assert_eq!(status["trusted"], serde_json::json!([new_ca]), "{status}");
    for (id, m) in &c.masters {
        let pki = m.data_dir.join("pki");
        assert_eq!(digests(&pki.join("ca.crt"))?, vec![new_ca.clone()], "master {id}'s ca.crt");
        let bundle = std::fs::read_to_string(pki.join("master.pem"))?;
        let key_at = bundle.find("-----BEGIN PRIVATE KEY").unwrap_or(bundle.len());
        let cert = CertifiedKey::new(&bundle[..key_at], "");
        assert!(cert.issued_by(&std::fs::read_to_string(pki.join("ca.crt"))?), "master {id}'s certificate");
    }
    for name in ["r1", "r2"] {
        let d = dir.join(name);
        // Agents drop the old CA on their next heartbeat's acknowledgement, after the masters
        // have retired it: the file follows within a heartbeat or two.
        let want = vec![new_ca.clone()];
        wait_for(Duration::from_secs(10), &format!("{name}'s ca.crt to hold the new CA alone"), || {
            digests(&d.join("ca.crt")).ok().filter(|got| *got == want)
        })?;
        let cert = CertifiedKey::new(std::fs::read_to_string(d.join("node.crt"))?, "");
        assert!(cert.issued_by(&std::fs::read_to_string(d.join("ca.crt"))?), "{name}'s certificate");
    }

    // Nothing restarted, no node went down.
    let after = running(list_with(&c, &out_dir, &["get", "tasks", "--service", "steady"])?);
    assert_eq!(after, before, "the tasks changed");
    for (_, pid) in &before {
        assert!(berth_tests::alive(*pid), "task process {pid} is gone");
    }
    let ns = list_with(&c, &out_dir, &["get", "nodes"])?;
    assert_eq!(changed_at(&ns), nodes_before, "a node's status changed: {ns:?}");

    // The old admin certificate is refused; the new credentials work.
    let old = c.berth(&["get", "nodes"]);
    assert!(!old.status.success(), "the old CA's admin certificate still works");
    let why = String::from_utf8_lossy(&old.stderr);
    assert!(why.contains("does not trust the masters' certificate") && why.contains("ca rotate"), "{why}");
    // A certificate of the old CA, with the new CA file, is refused by the masters.
    let mut stale = Command::new(berth_bin());
    stale.args(["get", "nodes", "--endpoints", &c.endpoints()]).envs(berth_tests::admin_env(&c.pki_dir()));
    let stale = stale.env("BERTH_CA_CERT", out_dir.join("ca.crt")).stdin(Stdio::null()).output()?;
    let why = String::from_utf8_lossy(&stale.stderr);
    assert!(!stale.status.success() && why.contains("not from a CA they trust"), "{why}");
    ok(with_config(&c, &out_dir, &["kv", "put", "after/rotation", "ok"]), "a write with the new credentials")?;

    // A token made now pins the new CA, and an agent joins with it.
    let token = ok(with_config(&c, &out_dir, &["token", "create"]), "token create")?.trim().to_string();
    let mut fresh = spawn_agent(&c, &dir.join("r3"), "r3", Some(&token), &[])?;
    wait_for(Duration::from_secs(60), "the new agent ready", || {
        let ns = list_with(&c, &out_dir, &["get", "nodes"]).ok()?;
        ns.iter().any(|n| n["name"] == "r3" && n["status"] == "ready").then_some(())
    })?;
    fresh.kill9();
    drop(agents);
    Ok(())
}
