//! A rolling upgrade from the previous release to this build: 3 masters and 2 agents of the
//! previous release (deploy/previous-release: its tag and commit; built by this test from the
//! commit into a target dir of its own, kept between runs) run a service under a steady stream of writes; each master in turn is stopped
//! (SIGTERM: the leader hands over first) and started again from this build on the same data dir,
//! then each agent. No task is restarted (same ids, same processes) and no write fails.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use berth_tests::{AgentProc, Cluster, alive, apply, berth_bin, signal, spawn_agent_from, token, wait_for};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

/// The release this build upgrades from: (tag, commit), from deploy/previous-release.
fn previous_release(repo: &Path) -> Result<(String, String)> {
    let path = repo.join("deploy/previous-release");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let line = text.lines().find(|l| !l.trim().is_empty() && !l.starts_with('#')).context("no release named")?;
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(tag), Some(commit)) => Ok((tag.to_string(), commit.to_string())),
        _ => bail!("{}: expected `TAG COMMIT`, got {line:?}", path.display()),
    }
}

/// The previous release's `berth`, built from its commit (git archive, then cargo) once per
/// target dir.
fn previous_build() -> Result<PathBuf> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let (tag, commit) = previous_release(&repo)?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo.join("target"), PathBuf::from);
    let home = std::path::absolute(target.join("previous-release").join(&tag))?;
    let bin = home.join("berth");
    if bin.exists() {
        return Ok(bin);
    }
    let src = home.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let archive = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; git -C '{}' archive --format=tar '{commit}' | tar -x -C '{}'",
            repo.display(),
            src.display()
        ))
        .output()?;
    if !archive.status.success() {
        bail!(
            "cannot extract the previous release {tag} (commit {commit}; the upgrade test needs the repository's \
             history, not a shallow clone): {}",
            String::from_utf8_lossy(&archive.stderr)
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building berth {tag} ({commit}) into {} (once; a few minutes)", home.display());
    let built = Command::new(cargo)
        .args(["build", "--locked", "-p", "berth-cli", "--bin", "berth"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", home.join("target"))
        .output()?;
    if !built.status.success() {
        bail!("building {tag} failed: {}", String::from_utf8_lossy(&built.stderr));
    }
    std::fs::copy(home.join("target/debug/berth"), &bin)?;
    let _ = std::fs::remove_dir_all(&src);
    Ok(bin)
}

fn version_of(bin: &Path) -> Result<String> {
    let out = Command::new(bin).arg("--version").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Every task of `service`: id -> (state, pid).
fn tasks_of(c: &Cluster, service: &str) -> Option<Vec<(String, String, i64)>> {
    let v = c.berth_json(&["get", "tasks", "--service", service]).ok()?;
    let mut out: Vec<(String, String, i64)> = v
        .as_array()?
        .iter()
        .map(|t: &Value| {
            (
                t["id"].as_str().unwrap_or_default().to_string(),
                t["state"].as_str().unwrap_or_default().to_string(),
                t["pid"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    Some(out)
}

/// Stops an agent with SIGTERM (as systemd would) and waits for it.
fn stop_agent(a: &mut AgentProc) -> Result<()> {
    let mut child = a.child.take().context("the agent runs")?;
    assert!(signal(child.id() as i64, "TERM"));
    wait_for(Duration::from_secs(30), "the agent to stop", || child.try_wait().ok().flatten())?;
    Ok(())
}

#[test]
fn a_running_cluster_upgrades_from_the_previous_release_with_no_restart_and_no_failed_write() -> Result<()> {
    let old = previous_build()?;
    let new = berth_bin();
    let (old_v, new_v) = (version_of(&old)?, version_of(&new)?);
    eprintln!("upgrading from {old_v} to {new_v}");

    // The previous release: 3 masters, 2 agents, a service.
    let mut c = Cluster::start_with_bin(3, &old)?;
    let t = token(&c, &["--uses", "2"])?;
    let mut agents = Vec::new();
    for name in ["u1", "u2"] {
        let dir = c.dir.path().join(name);
        agents.push(spawn_agent_from(&old, &c, &dir, name, Some(&t), &[])?);
    }
    wait_for(LONG, "both agents ready", || {
        let ns = c.berth_json(&["get", "nodes"]).ok()?;
        (ns.as_array()?.iter().filter(|n| n["status"] == "ready").count() == 2).then_some(())
    })?;
    let dir = c.dir.path().to_path_buf();
    apply(
        &c,
        &dir,
        "steady",
        "kind: Service\nmetadata: {name: steady}\nspec:\n  replicas: 2\n  task:\n    runtime: process\n    command: \
         [\"/bin/sh\", \"-c\", \"exec sleep 100000\"]\n  placement: {max_replicas_per_node: 1}\n",
    )?;
    let before = wait_for(LONG, "2 running tasks", || {
        tasks_of(&c, "steady").filter(|ts| ts.len() == 2 && ts.iter().all(|(_, s, p)| s == "running" && *p > 0))
    })?;

    // A steady stream of writes for the whole upgrade, through the new client.
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let writer = {
        let (stop, acked, failed, failures) = (stop.clone(), acked.clone(), failed.clone(), failures.clone());
        let endpoints = c.endpoints();
        let env = berth_tests::admin_env(&c.pki_dir());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new(berth_bin())
                    .args(["kv", "put", &format!("upgrade/{i:05}"), &i.to_string(), "--endpoints", &endpoints])
                    .envs(env.clone())
                    .output();
                match out {
                    Ok(o) if o.status.success() => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(o) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push(String::from_utf8_lossy(&o.stderr).into_owned());
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.lock().unwrap().push(e.to_string());
                    }
                }
                i += 1;
            }
            i
        })
    };

    // Masters, one at a time, on their own data dirs.
    c.master_bin = Some(new.clone());
    for id in 1..=3u64 {
        let writes = acked.load(Ordering::Relaxed);
        c.stop(id)?;
        c.spawn(id, &[])?;
        wait_for(LONG, &format!("master {id} back and caught up"), || {
            let v = c.berth_json(&["version"]).ok()?;
            let m = v["masters"].as_array()?.iter().find(|m| m["id"] == id)?.clone();
            (m["version"] == new_v.trim_start_matches("berth ")).then_some(())
        })?;
        // Writes go on between the restarts.
        wait_for(LONG, "writes after the restart", || (acked.load(Ordering::Relaxed) > writes + 5).then_some(()))?;
    }
    // Then the agents: their tasks outlive them.
    for (i, name) in ["u1", "u2"].iter().enumerate() {
        stop_agent(&mut agents[i])?;
        let dir = c.dir.path().join(name);
        let stopped = std::mem::replace(&mut agents[i], spawn_agent_from(&new, &c, &dir, name, None, &[])?);
        // Its handle would kill the tasks when dropped: they are the new agent's now.
        std::mem::forget(stopped);
    }
    wait_for(LONG, "both agents back", || {
        let ns = c.berth_json(&["get", "nodes"]).ok()?;
        let up = ns
            .as_array()?
            .iter()
            .filter(|n| n["status"] == "ready" && n["agent_version"] == new_v.trim_start_matches("berth "))
            .count();
        (up == 2).then_some(())
    })?;
    stop.store(true, Ordering::Relaxed);
    let attempted = writer.join().expect("the writer thread");

    let failures = failures.lock().unwrap().clone();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no write failed during the upgrade: {failures:?}");
    let acked = acked.load(Ordering::Relaxed);
    assert_eq!(acked, attempted);
    let kept = c.get_prefix("upgrade/")?;
    assert_eq!(kept.len() as u64, acked, "every acknowledged write is there");
    let after = tasks_of(&c, "steady").context("the tasks")?;
    assert_eq!(before, after, "the same tasks with the same processes: none restarted");
    for (_, _, pid) in &after {
        assert!(alive(*pid), "task process {pid} runs");
    }
    eprintln!("upgraded {old_v} -> {new_v}: {acked} writes, 0 failed, 0 task restarts");
    drop(agents);
    Ok(())
}
