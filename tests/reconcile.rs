//! Agents converge on the desired state whatever happened before (level-triggered
//! reconciliation), and stops are prompt (the task's init forwards the stop signal). Real
//! masters, real agents, real processes; what runs is read from /proc, not from the agent.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use berth_tests::{AgentProc, Cluster, apply, cluster_with_agents, signal, spawn_agent, tasks, wait_for};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn wait_running(c: &Cluster, service: &str, n: usize) -> Result<Vec<Value>> {
    wait_for(LONG, &format!("{n} running tasks of {service}"), || {
        let r: Vec<Value> = tasks(c, service)
            .into_iter()
            .filter(|t| t["state"] == "running" && t["desired_state"] == "running" && t["pid"].as_i64() > Some(0))
            .collect();
        (r.len() == n).then_some(r)
    })
}

/// Every process on this host whose environment says it belongs to `service` (the agent gives
/// each task `BERTH_SERVICE`; the task's init and everything it starts inherit it).
fn processes_of(service: &str) -> BTreeSet<u32> {
    let want = format!("BERTH_SERVICE={service}");
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
                && berth_tests::alive(i64::from(*pid))
        })
        .collect()
}

/// SIGINT (what Ctrl-C on `berth dev` sends) and wait for the agent to exit.
fn interrupt(agent: &mut AgentProc) -> Result<()> {
    let Some(mut child) = agent.child.take() else { return Ok(()) };
    signal(i64::from(child.id()), "INT");
    wait_for(Duration::from_secs(20), "the agent to exit on SIGINT", || child.try_wait().ok().flatten())?;
    Ok(())
}

/// Whether every stored assignment of this agent has desired state SHUTDOWN.
fn stored_all_shutdown(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("agent.json")) else { return false };
    let Ok(v) = serde_json::from_str::<Value>(&text) else { return false };
    v["assignments"].as_object().is_some_and(|a| a.values().all(|x| x["desired"] == "TASK_STATE_SHUTDOWN"))
}

const STUBBORN: &str = r#"
kind: Service
metadata: {name: stubborn}
spec:
  mode: replicated
  replicas: 3
  task:
    runtime: process
    # Ignores SIGTERM, so its stop takes the whole grace period.
    command: ["/bin/sh", "-c", "trap '' TERM; sleep 100000 & wait"]
    stop_grace_period: 6s
    resources: {cpu: 0.1, memory: 16Mi}
"#;

// The new user's sequence that once left processes running forever:
// 1. a service of 3 tasks runs on two agents;
// 2. `berth delete service`; the agents store desired SHUTDOWN and start stopping (the tasks
//    ignore SIGTERM, so the stop waits out its grace period);
// 3. inside that grace period both agents are interrupted (Ctrl-C), and started again;
// 4. every process of the deleted service must be gone within a bound: the restarted agents
//    finish the stops they were interrupted in, from their stored state alone.
#[test]
fn a_stop_interrupted_by_an_agent_restart_is_finished() -> Result<()> {
    let (c, mut agents) = cluster_with_agents(&[("rc-a", "a"), ("rc-b", "b")], &[])?;
    apply(&c, c.dir.path(), "stubborn", STUBBORN)?;
    wait_running(&c, "stubborn", 3)?;
    let before = processes_of("stubborn");
    if before.len() < 3 {
        bail!("expected the service's processes on this host, found {before:?}");
    }
    let out = c.berth(&["delete", "service", "stubborn"]);
    if !out.status.success() {
        bail!("delete: {}", String::from_utf8_lossy(&out.stderr));
    }
    let deleted = Instant::now();
    // Each agent has stored the shutdown (those with tasks; an agent with none has nothing).
    wait_for(Duration::from_secs(20), "the agents to store desired SHUTDOWN", || {
        agents.iter().all(|a| stored_all_shutdown(&a.dir)).then_some(())
    })?;
    for a in agents.iter_mut() {
        interrupt(a)?;
    }
    let interrupted = deleted.elapsed();
    let still = processes_of("stubborn");
    if still.is_empty() {
        bail!("the stops were not interrupted: every process had ended {interrupted:?} after the delete");
    }
    println!("agents interrupted {interrupted:?} after the delete, {} processes of the service still run", still.len());
    let mut restarted = Vec::new();
    for a in &agents {
        let name = a.dir.file_name().unwrap().to_str().unwrap().to_string();
        restarted.push(spawn_agent(&c, &a.dir, &name, None, &[])?);
    }
    let restart = Instant::now();
    let bound = Duration::from_secs(6 + 14);
    wait_for(bound, "every process of the deleted service to be gone", || {
        processes_of("stubborn").is_empty().then_some(())
    })?;
    println!(
        "every process of the deleted service gone {:?} after the agents restarted ({:?} after the delete; bound {bound:?})",
        restart.elapsed(),
        deleted.elapsed()
    );
    // And the masters see the service gone: every task ended and reaped with it.
    wait_for(LONG, "the service and its tasks to be gone", || tasks(&c, "stubborn").is_empty().then_some(()))?;
    drop(restarted);
    Ok(())
}

const QUICK: &str = r#"
kind: Service
metadata: {name: NAME}
spec:
  mode: replicated
  replicas: 1
  task:
    runtime: process
    command: ["/bin/sh", "-c", "COMMAND"]
    resources: {cpu: 0.1, memory: 16Mi}
"#;

// A task that has no SIGTERM handler of its own (`sh -c 'sleep 1000'`: the shell waits for
// sleep) stops within a second of `delete`: its init forwards SIGTERM to the shell, which dies
// of it, and the init's exit takes the sleep along. A task that traps SIGTERM gets to run its
// handler, and exits cleanly from it.
#[test]
fn stops_are_prompt_and_handlers_run() -> Result<()> {
    let (c, _agents) = cluster_with_agents(&[("quick-a", "a")], &[])?;
    let plain = QUICK.replace("NAME", "plain").replace("COMMAND", "sleep 1000; echo unreachable");
    apply(&c, c.dir.path(), "plain", &plain)?;
    // The handler exits 0: the task's recorded exit code says it ran (a task killed by the
    // SIGTERM would end with 143, one killed after the grace with 137). The task is sandboxed:
    // it cannot leave a mark on the host.
    let trap = QUICK
        .replace("NAME", "trapper")
        .replace("COMMAND", "trap 'echo handled; exit 0' TERM; echo ready; sleep 1000 & wait");
    apply(&c, c.dir.path(), "trapper", &trap)?;
    wait_running(&c, "plain", 1)?;
    let trapper = wait_running(&c, "trapper", 1)?;
    let trapper_id = trapper[0]["id"].as_str().unwrap_or_default().to_string();
    wait_for(LONG, "the trapping task to install its handler", || {
        let out = c.berth(&["logs", &trapper_id]);
        String::from_utf8_lossy(&out.stdout).contains("ready").then_some(())
    })?;

    let start = Instant::now();
    let out = c.berth(&["delete", "service", "plain"]);
    if !out.status.success() {
        bail!("delete: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for(Duration::from_secs(10), "the plain task's processes to be gone", || {
        processes_of("plain").is_empty().then_some(())
    })?;
    let took = start.elapsed();
    println!("`sh -c 'sleep 1000'`: every process gone {took:?} after `berth delete service`");
    if took > Duration::from_secs(1) {
        bail!("stopping a task without a SIGTERM handler took {took:?}; it must take under 1 s");
    }

    // Scaled to zero (not deleted), so its ended task stays on record with its exit code.
    let out = c.berth(&["scale", "trapper=0"]);
    if !out.status.success() {
        bail!("scale: {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_for(Duration::from_secs(10), "the trapping task's processes to be gone", || {
        processes_of("trapper").is_empty().then_some(())
    })?;
    // Its handler ran: it exited 0.
    let ended = wait_for(LONG, "the trapping task's end on record", || {
        let all = c.berth_json(&["get", "tasks", "--service", "trapper", "--all"]).ok()?;
        all.as_array()?.iter().find(|t| t["id"] == trapper_id.as_str() && t["state"] != "running").cloned()
    })?;
    if ended["exit_code"].as_i64() != Some(0) {
        bail!("the SIGTERM handler did not run: the task ended {ended:#}");
    }
    Ok(())
}
