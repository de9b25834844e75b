//! Storage end to end: real masters, agents and process tasks; local volumes (plain and sized,
//! loop-mounted), per-slot volumes, host paths, secrets and configs. What the tasks wrote is
//! read back from the volumes' directories on the "hosts" (each agent's data dir), and what they
//! read from their secrets comes back through their logs as a digest, never as the value.
//! GlusterFS has its own file (`tests/glusterfs.rs`).

use std::{path::Path, time::Duration};

use anyhow::Result;
use berth_tests::{
    AgentProc, Cluster, apply, berth_ok, cluster_with_agents, is_root, signal, spawn_agent, tasks, wait_for,
};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);

fn running(c: &Cluster, service: &str) -> Vec<Value> {
    tasks(c, service)
        .into_iter()
        .filter(|t| t["state"] == "running" && t["desired_state"] == "running" && t["pid"].as_i64().unwrap_or(0) > 0)
        .collect()
}

fn wait_running(c: &Cluster, service: &str, n: usize) -> Result<Vec<Value>> {
    wait_for(LONG, &format!("{n} running tasks of {service}"), || {
        let r = running(c, service);
        (r.len() == n).then_some(r)
    })
}

/// The directory holding a local volume's data on the node of `agent`.
fn volume_dir(agent: &Path, name: &str) -> std::path::PathBuf {
    agent.join("volumes").join("default").join(name).join("data")
}

fn berth_err(c: &Cluster, args: &[&str]) -> String {
    let out = c.berth(args);
    assert!(
        !out.status.success(),
        "berth {} should have failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const WRITER: &str = r#"
kind: Volume
metadata: {name: data}
spec: {driver: local}
---
kind: Service
metadata: {name: writer}
spec:
  replicas: 1
  task:
    runtime: process
    command: ["/bin/sh", "-c", "echo \"run $BERTH_TASK_ID $VERSION\" >> /data/log; exec sleep 100000"]
    env: {VERSION: "1"}
    volumes: [{source: data, target: /data}]
  restart: {condition: any, delay: 200ms}
  update: {order: stop-first}
"#;

const OTHER: &str = r#"
kind: Service
metadata: {name: other}
spec:
  replicas: 1
  task:
    runtime: process
    command: ["/bin/sh", "-c", "exec sleep 100000"]
    volumes: [{source: data, target: /data}]
"#;

// A task writes to a local volume and is killed: its replacement lands on the same node and
// reads the data. A second service asking for the single-node-writer volume waits with the
// reason. The data survives a leader failover, an agent restart and a rolling update.
#[test]
fn a_local_volume_keeps_its_data_on_its_node() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: process tasks mount volumes inside their mount namespace, which needs root here");
        return Ok(());
    }
    let (mut c, mut agents) = cluster_with_agents(&[("n1", "a"), ("n2", "b"), ("n3", "c")], &[])?;
    let dir = c.dir.path().to_path_buf();
    apply(&c, &dir, "writer", WRITER)?;
    let first = wait_running(&c, "writer", 1)?.remove(0);
    let node = first["node"].as_str().unwrap_or_default().to_string();
    let host = first["node_name"].as_str().unwrap_or_default().to_string();
    let agent_dir = dir.join(&host);
    let log = volume_dir(&agent_dir, "data").join("log");
    let lines = |n: usize| {
        wait_for(LONG, &format!("{n} lines in {}", log.display()), || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.lines().count() >= n).then_some(text)
        })
    };
    lines(1)?;
    let described = berth_ok(&c, &["describe", "volume", "data"])?;
    assert!(described.contains(&host) && described.contains(first["id"].as_str().unwrap()), "{described}");

    // Killed: the replacement is on the same node, and appends to the same file.
    signal(first["pid"].as_i64().unwrap(), "KILL");
    let second =
        wait_for(LONG, "a replacement task", || running(&c, "writer").into_iter().find(|t| t["id"] != first["id"]))?;
    assert_eq!(second["node"].as_str(), Some(node.as_str()), "the replacement follows the volume's node");
    let text = lines(2)?;
    assert!(text.contains(first["id"].as_str().unwrap()), "{text}");

    // Another service asking for the single-node-writer volume waits, and says why.
    apply(&c, &dir, "other", OTHER)?;
    let reason = wait_for(LONG, "the second service's pending reason", || {
        let t = tasks(&c, "other").into_iter().next()?;
        let r = t["pending_reason"].as_str()?.to_string();
        r.contains("single-node-writer").then_some(r)
    })?;
    assert!(reason.contains("in use by task") && reason.contains(second["id"].as_str().unwrap()), "{reason}");
    assert!(running(&c, "other").is_empty());
    let refused = berth_err(&c, &["delete", "volume", "data"]);
    assert!(refused.contains("in use by task") && refused.contains(second["id"].as_str().unwrap()), "{refused}");
    berth_ok(&c, &["delete", "service", "other", "--wait"])?;

    // Leader failover: nothing restarts, the data stays.
    let leader = c.wait_leader(LONG)?;
    c.kill9(leader);
    c.wait_leader(LONG)?;
    let after = wait_running(&c, "writer", 1)?;
    assert_eq!(after[0]["id"], second["id"], "a leader failover restarts nothing");

    // Agent restart: the task is adopted (or restarted), the data stays.
    let idx = agents.iter().position(|a| a.dir == agent_dir).expect("the volume's agent");
    agents[idx].kill9();
    agents[idx] = spawn_agent(&c, &agent_dir, &host, None, &[])?;
    wait_running(&c, "writer", 1)?;
    assert!(std::fs::read_to_string(&log)?.contains(second["id"].as_str().unwrap()));

    // A rolling update: the new task reads what the old ones wrote.
    apply(&c, &dir, "writer-v2", &WRITER.replace("VERSION: \"1\"", "VERSION: \"2\""))?;
    let text = wait_for(LONG, "the updated task's line", || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines().any(|l| l.ends_with(" 2")).then_some(text)
    })?;
    assert!(text.contains(first["id"].as_str().unwrap()) && text.contains(second["id"].as_str().unwrap()), "{text}");
    let now = wait_running(&c, "writer", 1)?;
    assert_eq!(now[0]["node"].as_str(), Some(node.as_str()));
    drop(agents);
    Ok(())
}

const STATEFUL: &str = r#"
kind: Service
metadata: {name: db}
spec:
  replicas: 3
  task:
    runtime: process
    command: ["/bin/sh", "-c", "echo \"slot $BERTH_SLOT $BERTH_TASK_ID\" >> /var/lib/db/log; exec sleep 100000"]
    volumes: [{source: "db-{slot}", target: /var/lib/db, size: 32Mi}]
  restart: {condition: any, delay: 200ms}
"#;

// A per-slot mount with 3 replicas makes 3 volumes (sized: loop-mounted filesystems); a slot's
// replacement task gets its own volume, and its data, back. The size is enforced.
#[test]
fn per_slot_volumes_follow_their_slot() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: sized volumes are loop-mounted, which needs root");
        return Ok(());
    }
    let (c, agents) = cluster_with_agents(&[("n1", "a"), ("n2", "b")], &[])?;
    let dir = c.dir.path().to_path_buf();
    apply(&c, &dir, "db", STATEFUL)?;
    let tasks3 = wait_running(&c, "db", 3)?;
    let vols = c.berth_json(&["get", "volumes"])?;
    let mut names: Vec<String> =
        vols.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap_or("").to_string()).collect();
    names.sort();
    assert_eq!(names, ["db-1", "db-2", "db-3"]);
    let slot2 = tasks3.iter().find(|t| t["slot"] == 2).expect("slot 2").clone();
    let host = slot2["node_name"].as_str().unwrap_or_default();
    let log = volume_dir(&dir.join(host), "db-2").join("log");
    wait_for(LONG, "slot 2's line", || std::fs::read_to_string(&log).ok().filter(|t| t.contains("slot 2")))?;
    signal(slot2["pid"].as_i64().unwrap(), "KILL");
    let text = wait_for(LONG, "slot 2's second line", || {
        let t = std::fs::read_to_string(&log).ok()?;
        (t.lines().count() >= 2).then_some(t)
    })?;
    assert!(text.lines().all(|l| l.starts_with("slot 2 ")), "only slot 2 writes to db-2: {text}");
    // The size holds: writing past 32 MiB fails inside the volume.
    let big = volume_dir(&dir.join(host), "db-2").join("big");
    let out = std::process::Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", big.display()), "bs=1M", "count=64"])
        .output()?;
    assert!(!out.status.success(), "a 64 MiB write into a 32 MiB volume fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains("No space left"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&big)?;
    drop(agents);
    Ok(())
}

// Bad input gets a clear error at apply time, and nothing is stored.
#[test]
fn bad_storage_input_is_refused_with_what_to_do() -> Result<()> {
    let (c, agents) = cluster_with_agents(&[("n1", "a")], &[])?;
    let dir = c.dir.path().to_path_buf();
    let svc = "kind: Service\nmetadata: {name: s}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    command: [sleep, \"1000\"]\n";
    for (yaml, words) in [
        (
            "kind: Volume\nmetadata: {name: v}\nspec: {driver: nfs}\n".to_string(),
            &["spec.driver", "unknown variant `nfs`"][..],
        ),
        ("kind: Volume\nmetadata: {name: v}\nspec: {driver: local, size: lots}\n".into(), &["spec.size", "Gi"]),
        (format!("{svc}    volumes: [{{source: v, target: data}}]\n"), &["target", "not an absolute path"]),
        (format!("{svc}    secrets: [missing]\n"), &["secret `missing` does not exist", "berth secret create missing"]),
        (format!("{svc}    volumes: [{{source: nowhere, target: /data}}]\n"), &["volume `nowhere` does not exist"]),
        (
            "kind: Volume\nmetadata: {name: v}\nspec: {driver: host, path: /etc}\n".into(),
            &["host path /etc is not under any agent's --allow-host-path", "no node allows any host path"],
        ),
    ] {
        let f = dir.join("bad.yaml");
        std::fs::write(&f, &yaml)?;
        let e = berth_err(&c, &["apply", "-f", &f.to_string_lossy()]);
        for w in words {
            assert!(e.contains(w), "{e:?} lacks {w:?} for\n{yaml}");
        }
    }
    let vols = c.berth_json(&["get", "volumes"])?;
    assert_eq!(vols.as_array().map(Vec::len), Some(0), "nothing was stored: {vols}");
    drop(agents);
    Ok(())
}

/// Whether `needle` occurs in any file under `dir` (following no symlinks).
fn found_in(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return hits };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
        if meta.is_dir() {
            hits.extend(found_in(&p, needle));
        } else if meta.is_file()
            && let Ok(bytes) = std::fs::read(&p)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            hits.push(p);
        }
    }
    hits
}

/// Whether a process's readable memory holds `needle` (root: /proc/PID/mem).
fn in_memory(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return false };
    let Ok(mut mem) = std::fs::File::open(format!("/proc/{pid}/mem")) else { return false };
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else { continue };
        if !perms.starts_with('r') {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { continue };
        if b - a > 1 << 30 || mem.seek(SeekFrom::Start(a)).is_err() {
            continue;
        }
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.read_exact(&mut buf).is_ok() && buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

fn sha256_hex(data: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(data)?;
            child.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
}

const READER: &str = r#"
kind: Service
metadata: {name: reader}
spec:
  replicas: 1
  task:
    runtime: process
    command: ["/bin/sh", "-c", "echo \"digest $(sha256sum < /run/secrets/pw | cut -d' ' -f1) mode $(stat -c %a /run/secrets/pw) conf $(cat /etc/app.conf)\"; exec sleep 100000"]
    secrets: [pw]
    configs: [{source: conf, target: /etc/app.conf}]
  placement:
    constraints: ["node.name == n1"]
  update: {order: stop-first}
"#;

// A secret is read by its task; afterwards no master data dir, no backup and no agent data dir
// holds its value, and the agent of a node without a task using it never had it in memory. A
// new value rolls the service, and the new task reads it.
#[test]
fn secrets_reach_only_their_tasks_and_are_never_stored_in_the_clear() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: file mounts and the memory check need root");
        return Ok(());
    }
    let (c, agents) = cluster_with_agents(&[("n1", "a"), ("n2", "b")], &[])?;
    let dir = c.dir.path().to_path_buf();
    let src = dir.join("inputs");
    std::fs::create_dir_all(&src)?;
    let value = format!("s3cr3t-{}-value", std::process::id());
    std::fs::write(src.join("pw"), &value)?;
    std::fs::write(src.join("conf"), "colour=blue")?;
    let out = berth_ok(&c, &["secret", "create", "pw", "--from-file", &src.join("pw").to_string_lossy()])?;
    assert!(out.contains("version 1") && !out.contains(&value), "{out}");
    berth_ok(&c, &["config", "create", "conf", "--from-file", &src.join("conf").to_string_lossy()])?;
    apply(&c, &dir, "reader", READER)?;
    let t = wait_running(&c, "reader", 1)?.remove(0);
    let want = format!("digest {} mode 400 conf colour=blue", sha256_hex(value.as_bytes()));
    wait_for(LONG, "the task's digest line", || {
        let logs = c.berth(&["logs", "reader"]);
        String::from_utf8_lossy(&logs.stdout).contains(&want).then_some(())
    })?;

    // Never printed back.
    for args in [
        &["secret", "ls"][..],
        &["secret", "ls", "-o", "json"],
        &["describe", "service", "reader"],
        &["get", "services", "-o", "yaml"],
    ] {
        let out = c.berth(args);
        let all = [out.stdout, out.stderr].concat();
        assert!(
            !all.windows(value.len()).any(|w| w == value.as_bytes()),
            "`berth {}` shows the secret",
            args.join(" ")
        );
    }
    // Never stored in the clear: masters' data dirs (Raft log, RocksDB, snapshots), a backup,
    // agents' data dirs.
    let backup = dir.join("backup.db");
    berth_ok(&c, &["snapshot", "save", &backup.to_string_lossy()])?;
    let mut places: Vec<std::path::PathBuf> = c.masters.values().map(|m| m.data_dir.clone()).collect();
    places.push(backup.clone());
    places.extend(agents.iter().map(|a| a.dir.clone()));
    for p in &places {
        let hits = if p.is_file() {
            let b = std::fs::read(p)?;
            if b.windows(value.len()).any(|w| w == value.as_bytes()) { vec![p.clone()] } else { vec![] }
        } else {
            found_in(p, value.as_bytes())
        };
        assert!(hits.is_empty(), "the secret's value is stored in the clear in {hits:?}");
    }
    assert!(std::fs::metadata(&backup)?.len() > 0);
    // Delivered to its node only: the agent of n1 holds it, the agent of n2 never did.
    let holder: &AgentProc = agents.iter().find(|a| a.dir.ends_with("n1")).expect("n1");
    let other: &AgentProc = agents.iter().find(|a| a.dir.ends_with("n2")).expect("n2");
    assert!(in_memory(holder.pid().expect("pid"), value.as_bytes()), "the task's agent holds the secret");
    assert!(!in_memory(other.pid().expect("pid"), value.as_bytes()), "an agent without such a task never got it");

    // A new value rolls the service; the new task reads it.
    let value2 = format!("n3w-{}-value", std::process::id());
    std::fs::write(src.join("pw"), &value2)?;
    let out = berth_ok(&c, &["secret", "update", "pw", "--from-file", &src.join("pw").to_string_lossy()])?;
    assert!(out.contains("version 2") && out.contains("reader"), "{out}");
    let want2 = format!("digest {}", sha256_hex(value2.as_bytes()));
    wait_for(LONG, "the new task's digest line", || {
        let r = running(&c, "reader");
        let t2 = r.iter().find(|x| x["id"] != t["id"])?;
        let logs = c.berth(&["logs", t2["id"].as_str()?]);
        String::from_utf8_lossy(&logs.stdout).contains(&want2).then_some(())
    })?;
    // In use: not deletable.
    let e = berth_err(&c, &["secret", "rm", "pw"]);
    assert!(e.contains("mounted by service reader"), "{e}");
    drop(agents);
    Ok(())
}
