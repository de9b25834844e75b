//! Services end to end: real masters, real agents, real processes. Specs go in through
//! `berth apply`; what runs is read back through `berth get tasks -o json` and /proc.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;
use berth_tests::{Cluster, alive, apply, cluster_with_agents, signal, spawn_agent, tasks, token, wait_for};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn running(c: &Cluster, service: &str) -> Vec<Value> {
    tasks(c, service).into_iter().filter(|t| t["state"] == "running" && t["desired_state"] == "running").collect()
}

fn wait_running(c: &Cluster, service: &str, n: usize, timeout: Duration) -> Result<Vec<Value>> {
    wait_for(timeout, &format!("{n} running tasks of {service}"), || {
        let r = running(c, service);
        (r.len() == n && r.iter().all(|t| t["pid"].as_i64().unwrap_or(0) > 0)).then_some(r)
    })
}

fn node_zones(c: &Cluster) -> Result<BTreeMap<String, String>> {
    let ns = c.berth_json(&["get", "nodes"])?;
    Ok(ns
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|n| (n["id"].as_str().unwrap_or("").to_string(), n["labels"]["zone"].as_str().unwrap_or("").to_string()))
        .collect())
}

const SLEEPER: &str = r#"
kind: Service
metadata: {name: spread}
spec:
  mode: replicated
  replicas: 3
  task:
    runtime: process
    command: ["/bin/sh", "-c", "echo started; exec sleep 100000"]
    resources: {cpu: 0.1, memory: 16Mi}
  placement:
    spread: [node.labels.zone]
    max_replicas_per_node: 1
  restart: {condition: any, delay: 500ms}
"#;

// 3 replicas over 2 zones land 2+1; too few nodes for max_replicas_per_node leaves a replica
// pending with a reason; kill -9 of a task's process gets its slot a new task; kill -9 of the
// leader changes nothing: same task ids, same PIDs, nothing restarted.
#[test]
fn spread_pending_restart_and_leader_failover() -> Result<()> {
    let (mut c, agents) = cluster_with_agents(&[("n1", "a"), ("n2", "b"), ("n3", "a")], &[])?;
    let dir = c.dir.path().to_path_buf();
    apply(&c, &dir, "spread", SLEEPER)?;
    let r = wait_running(&c, "spread", 3, LONG)?;
    let zones = node_zones(&c)?;
    let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
    for t in &r {
        *per_zone.entry(zones[t["node"].as_str().unwrap()].clone()).or_default() += 1;
    }
    assert_eq!(per_zone, BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 1)]), "tasks: {r:?}");
    let mut nodes: Vec<&str> = r.iter().map(|t| t["node"].as_str().unwrap()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "max_replicas_per_node 1: one task per node");

    // Logs come from the agents through a master.
    let logs = wait_for(LONG, "the tasks' output through `berth logs`", || {
        let out = c.berth(&["logs", "spread", "--tail", "5"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.matches("started").count() == 3).then_some(text)
    })?;
    assert!(logs.lines().all(|l| l.contains("spread.")), "lines carry their task id: {logs}");

    // Re-applying the same spec changes nothing.
    let again = apply(&c, &dir, "spread", SLEEPER)?;
    assert!(again.contains("unchanged"), "{again}");

    // Four replicas, at most one per node, three nodes: one stays pending, with a reason.
    apply(&c, &dir, "crowd", &SLEEPER.replace("name: spread", "name: crowd").replace("replicas: 3", "replicas: 4"))?;
    wait_running(&c, "crowd", 3, LONG)?;
    let pending = wait_for(LONG, "a pending crowd task with a reason", || {
        tasks(&c, "crowd")
            .into_iter()
            .find(|t| t["state"] == "pending" && t["pending_reason"].as_str().is_some_and(|r| !r.is_empty()))
    })?;
    let out = c.berth(&["describe", "service", "crowd"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "describe: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(pending["pending_reason"].as_str().unwrap()), "describe shows the reason:\n{text}");

    // binpack fills one node before the next.
    let packed = SLEEPER
        .replace("name: spread", "name: packed")
        .replace("replicas: 3", "replicas: 2")
        .replace("    spread: [node.labels.zone]\n    max_replicas_per_node: 1\n", "    strategy: binpack\n");
    apply(&c, &dir, "packed", &packed)?;
    let p = wait_running(&c, "packed", 2, LONG)?;
    assert_eq!(p[0]["node"], p[1]["node"], "binpack puts both on one node: {p:?}");

    // kill -9 a task's process: its slot gets a new task that runs.
    let victim = r[0].clone();
    let (vid, vpid, vslot) = (victim["id"].as_str().unwrap(), victim["pid"].as_i64().unwrap(), victim["slot"].clone());
    assert!(signal(vpid, "KILL"));
    let replacement = wait_for(LONG, "a new task in the killed task's slot", || {
        running(&c, "spread")
            .into_iter()
            .find(|t| t["slot"] == vslot && t["id"] != vid && t["pid"].as_i64().unwrap_or(0) > 0)
    })?;
    assert!(alive(replacement["pid"].as_i64().unwrap()));
    let all = c.berth_json(&["get", "tasks", "--service", "spread", "--all"])?;
    let old = all.as_array().unwrap().iter().find(|t| t["id"] == vid).cloned().expect("the killed task is kept");
    assert_eq!(old["state"], "failed", "{old}");

    // kill -9 the leader while the tasks run.
    let before = wait_running(&c, "spread", 3, LONG)?;
    let snapshot = |ts: &[Value]| -> BTreeMap<String, i64> {
        ts.iter().map(|t| (t["id"].as_str().unwrap().to_string(), t["pid"].as_i64().unwrap())).collect()
    };
    let before = snapshot(&before);
    let leader = c.wait_leader(LONG)?;
    c.kill9(leader);
    let new_leader = wait_for(LONG, "a new leader", || c.leader().filter(|l| *l != leader))?;
    // The new leader's controllers and sessions work: a new service runs on every node.
    let global = "kind: Service\nmetadata: {name: probe}\nspec:\n  mode: global\n  task:\n    runtime: process\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 100000\"]\n";
    apply(&c, &dir, "probe", global)?;
    wait_running(&c, "probe", 3, LONG)?;
    let after = snapshot(&wait_running(&c, "spread", 3, LONG)?);
    assert_eq!(before, after, "same task ids with the same PIDs after the failover to {new_leader}");
    for pid in after.values() {
        assert!(alive(*pid), "task process {pid} still runs");
    }
    drop(agents);
    Ok(())
}

// kill -9 of an agent: after the grace its task is replaced elsewhere, and when the agent comes
// back the old copy is stopped. An at-most-once task never runs twice across a SIGSTOPped agent.
#[test]
fn lost_agents_replace_and_at_most_once_fences() -> Result<()> {
    let (c, mut agents) = cluster_with_agents(&[("m1", "a"), ("m2", "b")], &["--node-down-grace", "4s"])?;
    let dir = c.dir.path().to_path_buf();
    let one = |name: &str, extra: &str| {
        format!(
            "kind: Service\nmetadata: {{name: {name}}}\nspec:\n  mode: replicated\n  replicas: 1\n  task:\n    runtime: process\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 100000\"]\n  restart: {{condition: any, delay: 200ms}}\n{extra}"
        )
    };
    apply(&c, &dir, "solo", &one("solo", ""))?;
    let first = wait_running(&c, "solo", 1, LONG)?.remove(0);
    let (old_id, old_pid) = (first["id"].as_str().unwrap().to_string(), first["pid"].as_i64().unwrap());
    let host = first["node_name"].as_str().unwrap().to_string();
    let idx = if host == "m1" { 0 } else { 1 };
    agents[idx].kill9();
    let moved = wait_for(LONG, "the task replaced on the other node", || {
        running(&c, "solo").into_iter().find(|t| t["id"] != old_id.as_str())
    })?;
    assert_ne!(moved["node_name"], host.as_str());
    assert!(alive(old_pid), "a lost agent's task keeps running until its agent hears otherwise");
    // The agent returns: the old copy is stopped.
    let t = token(&c, &[])?;
    let back = spawn_agent(&c, &agents[idx].dir.clone(), &host, Some(&t), &[])?;
    wait_for(LONG, "the old copy stopped", || (!alive(old_pid)).then_some(()))?;
    let stale = std::mem::replace(&mut agents[idx], back);
    drop(stale);
    // The node's fall and return are events, in order.
    wait_for(LONG, "NodeDown then NodeUp events for the lost node", || {
        let evs = c.berth_json(&["events", "--type", "NodeDown", "--type", "nodeup"]).ok()?;
        let kinds: Vec<&str> =
            evs.as_array()?.iter().filter(|e| e["name"] == host.as_str()).filter_map(|e| e["type"].as_str()).collect();
        let down = kinds.iter().position(|k| *k == "NodeDown")?;
        kinds[down..].contains(&"NodeUp").then_some(())
    })?;

    // at-most-once: freeze the agent running it; the task must be gone before its replacement runs.
    apply(&c, &dir, "ledger", &one("ledger", "  disconnect: at-most-once\n"))?;
    let first = wait_running(&c, "ledger", 1, LONG)?.remove(0);
    let (lid, lpid) = (first["id"].as_str().unwrap().to_string(), first["pid"].as_i64().unwrap());
    let host = first["node_name"].as_str().unwrap().to_string();
    let idx = if host == "m1" { 0 } else { 1 };
    let apid = i64::from(agents[idx].pid().unwrap());
    assert!(signal(apid, "STOP"));
    let mut overlap = false;
    let replacement = wait_for(LONG, "the ledger replaced", || {
        let r = running(&c, "ledger").into_iter().find(|t| t["id"] != lid.as_str())?;
        let rpid = r["pid"].as_i64()?;
        if alive(lpid) && alive(rpid) {
            overlap = true;
        }
        Some(r)
    });
    signal(apid, "CONT");
    let replacement = replacement?;
    assert!(!overlap, "two copies ran at once");
    assert!(!alive(lpid), "the fenced copy is gone");
    assert!(alive(replacement["pid"].as_i64().unwrap()));
    Ok(())
}

// A rolling update whose new tasks fail their health check rolls back by itself; a global
// service runs one task per node, including a node that joins later.
#[test]
fn failed_update_rolls_back_and_global_follows_nodes() -> Result<()> {
    let (c, mut agents) = cluster_with_agents(&[("g1", "a"), ("g2", "b")], &[])?;
    let dir = c.dir.path().to_path_buf();
    // A host port per task: with one fixed port, a new task's probe could reach its
    // predecessor's server (stop-first does not wait for the old task to exit), pass, and the new
    // task then fail to bind: a failure inside `rollback.monitor`, which pauses the rollback.
    let healthy = r#"
kind: Service
metadata: {name: site}
spec:
  mode: replicated
  replicas: 1
  task:
    runtime: process
    command: ["/bin/sh", "-c", "exec /usr/bin/python3 -m http.server \"$BERTH_PORT_8080\" --bind 127.0.0.1"]
    ports: [{container: 8080}]
    workdir: /tmp
    health: {http: {port: 8080, path: /}, interval: 500ms, timeout: 1s, retries: 2}
  update: {parallelism: 1, failure_action: rollback}
  restart: {condition: any, delay: 200ms}
"#;
    apply(&c, &dir, "site", healthy)?;
    let v1 = wait_for(LONG, "site healthy", || running(&c, "site").into_iter().find(|t| t["health"] == "healthy"))?;
    // Version 2 probes a path that does not exist: 404, unhealthy.
    apply(&c, &dir, "site", &healthy.replace("path: /}", "path: /missing-page}"))?;
    let svc = wait_for(LONG, "the update rolled back", || {
        let s = c.berth_json(&["get", "services"]).ok()?;
        let s = s.as_array()?.iter().find(|s| s["name"] == "site")?.clone();
        (s["rollout"]["state"] == "rolled-back").then_some(s)
    })?;
    assert_eq!(svc["version"], 3, "the rollback is version 3: {svc}");
    let back = wait_for(LONG, "a healthy task after the rollback", || {
        running(&c, "site").into_iter().find(|t| t["health"] == "healthy")
    })?;
    assert_ne!(back["id"], v1["id"]);

    // global: one per node, and one more for a node that joins later.
    apply(
        &c,
        &dir,
        "everywhere",
        "kind: Service\nmetadata: {name: everywhere}\nspec:\n  mode: global\n  task:\n    runtime: process\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 100000\"]\n",
    )?;
    wait_running(&c, "everywhere", 2, LONG)?;
    let t = token(&c, &[])?;
    agents.push(spawn_agent(&c, &c.dir.path().join("g3"), "g3", Some(&t), &["--labels", "zone=c"])?);
    let r = wait_running(&c, "everywhere", 3, LONG)?;
    let mut nodes: Vec<&str> = r.iter().map(|t| t["node_name"].as_str().unwrap()).collect();
    nodes.sort();
    assert_eq!(nodes, ["g1", "g2", "g3"]);

    // Draining a node moves its tasks off: the global task there stops, a replicated one moves.
    let site_node = wait_running(&c, "site", 1, LONG)?[0]["node_name"].as_str().unwrap().to_string();
    let out = c.berth(&["node", "update", &site_node, "--availability", "drain"]);
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    wait_for(LONG, "the drained node emptied", || {
        let e = running(&c, "everywhere");
        let s = running(&c, "site");
        (e.len() == 2
            && e.iter().all(|t| t["node_name"] != site_node.as_str())
            && s.len() == 1
            && s[0]["node_name"] != site_node.as_str())
        .then_some(())
    })?;
    Ok(())
}

// Bad specs are refused before anything is stored, with the field, the line and what is allowed.
#[test]
fn bad_specs_are_rejected_clearly() -> Result<()> {
    let c = Cluster::start(3, &[])?;
    c.wait_leader(LONG)?;
    let dir = c.dir.path().to_path_buf();
    let cases = [
        (
            "unknown-field",
            "kind: Service\nmetadata: {name: x}\nspec:\n  mode: replicated\n  replicas: 1\n  colour: red\n  task: {runtime: process, command: [/bin/true]}\n",
            "colour",
        ),
        (
            "bad-replicas",
            "kind: Service\nmetadata: {name: x}\nspec:\n  mode: replicated\n  replicas: -2\n  task: {runtime: process, command: [/bin/true]}\n",
            "replicas",
        ),
        (
            "no-command",
            "kind: Service\nmetadata: {name: x}\nspec:\n  mode: replicated\n  replicas: 1\n  task: {runtime: process}\n",
            "command",
        ),
        (
            "bad-constraint",
            "kind: Service\nmetadata: {name: x}\nspec:\n  mode: replicated\n  replicas: 1\n  task: {runtime: process, command: [/bin/true]}\n  placement: {constraints: [\"node.labels.zone ~ a\"]}\n",
            "constraint",
        ),
    ];
    for (name, yaml, needle) in cases {
        let f = dir.join(format!("{name}.yaml"));
        std::fs::write(&f, yaml)?;
        let out = c.berth(&["apply", "-f", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(err.contains(needle) && err.contains("line"), "{name}: {err}");
    }
    let listed = c.berth_json(&["get", "services"])?;
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "nothing was stored");
    Ok(())
}

/// A `berth get services --watch` child, killed when the test ends however it ends.
struct Watching {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::path::PathBuf,
}

impl Watching {
    fn start(c: &Cluster) -> Result<Watching> {
        use std::io::BufRead;
        let stderr = c.dir.path().join("watch.stderr");
        let mut child = std::process::Command::new(berth_tests::berth_bin())
            .args(["get", "services", "--watch", "-o", "json", "--endpoints", &c.endpoints()])
            .envs(berth_tests::admin_env(&c.pki_dir()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()?;
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Watching { child, lines, stderr })
    }

    /// The first change printed from now on that `want` accepts.
    fn expect(&self, what: &str, want: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = std::time::Instant::now() + LONG;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else { break };
            let v: Value = serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{e}: {line}"))?;
            if want(&v) {
                return Ok(v);
            }
            seen.push(line);
        }
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        anyhow::bail!("`get services --watch` printed no change with {what}; it printed: {seen:#?}\nstderr: {stderr}")
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// `get services --watch` prints each change of a service as it commits, and keeps doing so when
// the master it follows is killed.
#[test]
fn get_services_watch_follows_changes_across_a_leader_change() -> Result<()> {
    let (mut c, _agents) = cluster_with_agents(&[("w1", "a")], &[])?;
    let dir = c.dir.path().to_path_buf();
    let watch = Watching::start(&c)?;
    let spec = |n: u32| {
        format!(
            "kind: Service\nmetadata: {{name: watched}}\nspec:\n  replicas: {n}\n  task:\n    runtime: process\n    \
             command: [/bin/sh, -c, 'exec sleep 100000']\n    resources: {{cpu: 0.1, memory: 16Mi}}\n"
        )
    };
    apply(&c, &dir, "watched", &spec(1))?;
    let named = |v: &Value| v["service"]["name"] == "watched";
    let added = watch.expect("watched added", |v| named(v) && v["event"] == "added")?;
    assert_eq!(added["service"]["desired"], 1, "{added}");
    watch.expect("watched running 1/1", |v| named(v) && v["event"] == "modified" && v["service"]["running"] == 1)?;

    // The CLI follows the first endpoint it was given (master 1, as `endpoints()` lists them in
    // order): kill it, and the leader if that is another, then change the service.
    let leader = c.wait_leader(LONG)?;
    let first = *c.masters.keys().next().expect("a master");
    c.kill9(first);
    if leader != first {
        c.wait_leader(LONG)?;
        c.kill9(leader);
        // Two of three gone is no quorum: bring the first back.
        c.spawn(first, &[])?;
    }
    c.wait_leader(LONG)?;
    let out = c.berth(&["scale", "watched=2"]);
    assert!(out.status.success(), "scale: {}", String::from_utf8_lossy(&out.stderr));
    let two = watch
        .expect("watched running 2/2", |v| named(v) && v["service"]["running"] == 2 && v["service"]["desired"] == 2)?;
    assert_eq!(two["event"], "modified", "{two}");

    let out = c.berth(&["delete", "service", "watched"]);
    assert!(out.status.success(), "delete: {}", String::from_utf8_lossy(&out.stderr));
    watch.expect("watched deleted", |v| named(v) && v["event"] == "deleted")?;
    Ok(())
}
