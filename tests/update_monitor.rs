//! `update.monitor` with real masters, a real agent and real task processes.
//!
//! Scenario:
//! 1. Three masters and one agent. `mon` version 1 runs an HTTP server with an HTTP health check
//!    and `update: {monitor: 10s, failure_action: rollback}`: its rollout stays `updating` while
//!    the task has been healthy for less than 10 s, and completes after.
//! 2. Version 2's task turns healthy, then exits 3 s after it started. That is inside `monitor`,
//!    so the update counts it as failed and rolls back: version 3 (version 1's spec) runs healthy,
//!    and the rollback's reason says the task ended after turning ready.
//! 3. Version 2 again (version 4, `monitor: 30s`), and kill -9 of the leader once its task is
//!    healthy: the new leader learns when the task turned healthy from the replicated task record,
//!    counts its death as a failure and rolls back again (version 5).

use std::time::{Duration, Instant};

use anyhow::Result;
use berth_tests::{Cluster, apply, spawn_agent, token, wait_for};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);

fn service(c: &Cluster) -> Option<Value> {
    let s = c.berth_json(&["get", "services"]).ok()?;
    s.as_array()?.iter().find(|s| s["name"] == "mon").cloned()
}

/// The running, healthy task of `mon` made from spec `version`.
fn healthy_task(c: &Cluster, version: u64) -> Option<Value> {
    let ts = c.berth_json(&["get", "tasks", "--service", "mon"]).ok()?;
    ts.as_array()?
        .iter()
        .find(|t| {
            t["state"] == "running"
                && t["desired_state"] == "running"
                && t["health"] == "healthy"
                && t["spec_version"] == version
        })
        .cloned()
}

/// Waits until the rollout is rolled back to `version`; returns the message it had while rolling
/// back (the reason), if a poll saw it.
fn wait_rolled_back(c: &Cluster, version: u64) -> Result<Option<String>> {
    let mut reason = None;
    wait_for(LONG, &format!("the rollback to version {version}"), || {
        let s = service(c)?;
        if s["rollout"]["state"] == "rolling-back" {
            reason = s["rollout"]["message"].as_str().map(str::to_string);
        }
        (s["rollout"]["state"] == "rolled-back" && s["version"] == version).then_some(())
    })?;
    Ok(reason)
}

/// How many rollbacks the masters' logs say were caused by a task that ended after turning ready
/// (so the monitor, not a failed start, caught it).
fn monitor_rollbacks_logged(c: &Cluster) -> usize {
    c.masters
        .keys()
        .map(|id| {
            c.log_of(*id).lines().filter(|l| l.contains("rolling back") && l.contains("after turning ready")).count()
        })
        .sum()
}

fn spec(command: &str, monitor: &str) -> String {
    format!(
        r#"
kind: Service
metadata: {{name: mon}}
spec:
  mode: replicated
  replicas: 1
  task:
    runtime: process
    command: ["/bin/sh", "-c", "{command}"]
    ports: [{{container: 8080}}]
    workdir: /tmp
    health: {{http: {{port: 8080, path: /}}, interval: 500ms, timeout: 1s, retries: 2}}
  restart: {{condition: any, delay: 200ms}}
  update: {{parallelism: 1, failure_action: rollback, monitor: {monitor}}}
"#
    )
}

const SERVE: &str = r#"exec /usr/bin/python3 -m http.server \"$BERTH_PORT_8080\" --bind 127.0.0.1"#;
/// Healthy within a second, gone 3 s after the start (exit code 1).
const DIES: &str =
    r#"/usr/bin/python3 -m http.server \"$BERTH_PORT_8080\" --bind 127.0.0.1 & sleep 3; kill $!; exit 1"#;

#[test]
fn tasks_that_fail_within_monitor_roll_the_update_back() -> Result<()> {
    let mut c = Cluster::start(3, &[])?;
    c.wait_leader(LONG)?;
    let t = token(&c, &[])?;
    let _agent = spawn_agent(&c, &c.dir.path().join("a1"), "a1", Some(&t), &[])?;
    wait_for(LONG, "the agent ready", || {
        let ns = c.berth_json(&["get", "nodes"]).ok()?;
        ns.as_array()?.iter().any(|n| n["status"] == "ready").then_some(())
    })?;
    let dir = c.dir.path().to_path_buf();

    // 1. The rollout completes only once the task has stayed healthy for `monitor`.
    let v1 = spec(SERVE, "10s");
    apply(&c, &dir, "v1", &v1)?;
    wait_for(LONG, "version 1 healthy", || healthy_task(&c, 1))?;
    let seen_healthy = Instant::now();
    let s = service(&c).expect("the service");
    assert_eq!(s["rollout"]["state"], "updating", "healthy for less than monitor: not complete yet: {s}");
    wait_for(LONG, "version 1 completed", || (service(&c)?["rollout"]["state"] == "completed").then_some(()))?;
    let waited = seen_healthy.elapsed();
    assert!(waited >= Duration::from_secs(8), "completed {waited:?} after turning healthy, monitor is 10s");

    // 2. A task that dies 3 s into a 10 s monitor fails the update: rollback to version 1's spec.
    apply(&c, &dir, "v2", &spec(DIES, "10s"))?;
    let reason = wait_rolled_back(&c, 3)?;
    eprintln!("version 2 rolled back: {reason:?}");
    let logged = monitor_rollbacks_logged(&c);
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("after turning ready")) || logged >= 1,
        "the rollback's reason names a task that ended after turning ready: {reason:?}"
    );
    // The rollout's story is in the events, and `describe` shows it.
    let evs = c.berth_json(&["events"])?;
    let kinds: Vec<&str> = evs
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["object"] == "service" && e["name"] == "mon")
        .filter_map(|e| e["type"].as_str())
        .collect();
    for k in ["RolloutStarted", "RolloutCompleted", "RollbackStarted", "RolledBack"] {
        assert!(kinds.contains(&k), "a {k} event for the service: {kinds:?}");
    }
    let failed = c.berth_json(&["events", "--type", "TaskFailed"])?;
    assert!(
        failed.as_array().unwrap().iter().any(|e| e["name"].as_str().is_some_and(|n| n.starts_with("mon."))),
        "the task that died has a TaskFailed event: {failed}"
    );
    let described = c.berth(&["describe", "service", "mon"]);
    let text = String::from_utf8_lossy(&described.stdout);
    assert!(text.contains("Events:") && text.contains("RolledBack"), "{text}");
    let back = wait_for(LONG, "version 3 healthy", || healthy_task(&c, 3))?;
    let s = service(&c).expect("the service");
    assert_eq!(s["spec"]["spec"]["task"]["command"][2], SERVE.replace("\\\"", "\""), "version 3 runs version 1's spec");
    assert_eq!(s["previous_version"], 2, "{s}");

    // 3. The same across a change of leader: the new leader reads when the task turned healthy
    //    from the replicated record.
    apply(&c, &dir, "v4", &spec(DIES, "30s"))?;
    wait_for(LONG, "version 4 healthy", || healthy_task(&c, 4))?;
    let leader = c.wait_leader(LONG)?;
    c.kill9(leader);
    wait_for(LONG, "a new leader", || c.leader().filter(|l| *l != leader))?;
    let reason = wait_rolled_back(&c, 5)?;
    eprintln!("version 4 rolled back under a new leader: {reason:?}");
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("after turning ready")) || monitor_rollbacks_logged(&c) > logged,
        "the new leader caught the task's end inside monitor: {reason:?}"
    );
    let again = wait_for(LONG, "version 5 healthy", || healthy_task(&c, 5))?;
    assert_ne!(again["id"], back["id"]);
    let failed = c.berth_json(&["get", "tasks", "--service", "mon", "--all"])?;
    let v4_failed = failed
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["spec_version"] == 4 && t["state"] == "failed" && t["exit_code"] == 1);
    assert!(v4_failed, "version 4's task died on its own: {failed}");
    Ok(())
}
