//! GlusterFS volumes across a cluster: a real `glusterd` (Debian's `glusterfs-server`) with one
//! brick in a network namespace of its own, real masters and two agents. The volume is mounted
//! through FUSE on the node of the task that uses it, when the task starts; when the node is
//! drained the task moves, its data with it, and the node it left unmounts the volume.

use std::{path::Path, time::Duration};

use anyhow::Result;
use berth_tests::{apply, cluster_with_agents, gluster::GlusterServer, tasks, wait_for};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);

fn mounted(at: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(&*at.to_string_lossy())))
}

fn running(c: &berth_tests::Cluster, service: &str) -> Vec<Value> {
    tasks(c, service)
        .into_iter()
        .filter(|t| t["state"] == "running" && t["desired_state"] == "running" && t["pid"].as_i64().unwrap_or(0) > 0)
        .collect()
}

#[test]
fn a_glusterfs_volume_follows_its_task_to_another_node() -> Result<()> {
    let volume = format!("gv{}", std::process::id());
    let Some(server) = GlusterServer::start(&volume) else { return Ok(()) };
    let (c, agents) = cluster_with_agents(&[("gl-a", "a"), ("gl-b", "b")], &[])?;
    let dir = c.dir.path().to_path_buf();
    let yaml = format!(
        r#"
kind: Volume
metadata: {{name: shared}}
spec: {{driver: glusterfs, servers: ["{addr}"], volume: {volume}}}
---
kind: Service
metadata: {{name: gl}}
spec:
  replicas: 1
  task:
    runtime: process
    command: ["/bin/sh", "-c", "echo \"$BERTH_TASK_ID\" >> /mnt/shared/log; echo seen: $(cat /mnt/shared/log | tr '\n' ' '); exec sleep 100000"]
    volumes: [{{source: shared, target: /mnt/shared}}]
"#,
        addr = server.addr
    );
    apply(&c, &dir, "gl", &yaml)?;
    let first = wait_for(LONG, "the task running", || running(&c, "gl").into_iter().next())?;
    let host_a = first["node_name"].as_str().unwrap_or_default().to_string();
    let at_a = dir.join(&host_a).join("volumes/default/shared/gluster");
    assert!(mounted(&at_a), "{} is mounted on the task's node", at_a.display());
    let first_id = first["id"].as_str().unwrap_or_default().to_string();
    wait_for(LONG, "the first line on the brick", || {
        std::fs::read_to_string(server.brick().join("log")).ok().filter(|t| t.contains(&first_id))
    })?;

    // Drained: the task moves to the other node and reads what the first one wrote.
    let out = c.berth(&["node", "update", &host_a, "--availability", "drain"]);
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    let second = wait_for(LONG, "the task on the other node", || {
        running(&c, "gl").into_iter().find(|t| t["id"] != first["id"] && t["node_name"] != host_a.as_str())
    })?;
    let second_id = second["id"].as_str().unwrap_or_default().to_string();
    wait_for(LONG, "the moved task reading the first task's line", || {
        let logs = c.berth(&["logs", &second_id]);
        String::from_utf8_lossy(&logs.stdout).contains(&format!("seen: {first_id} {second_id}")).then_some(())
    })?;
    let host_b = second["node_name"].as_str().unwrap_or_default();
    assert!(mounted(&dir.join(host_b).join("volumes/default/shared/gluster")));
    wait_for(LONG, "the drained node to unmount the volume", || (!mounted(&at_a)).then_some(()))?;

    // A server that is not there when the task starts: the task fails, saying so, and is retried.
    let bad = format!(
        "kind: Volume\nmetadata: {{name: nowhere}}\nspec: {{driver: glusterfs, servers: [\"{}:24099\"], volume: {volume}}}\n\
         ---\nkind: Service\nmetadata: {{name: nowhere}}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    \
         command: [sleep, \"1000\"]\n    volumes: [{{source: nowhere, target: /mnt/nowhere}}]\n  \
         restart: {{condition: any, delay: 1s}}\n",
        server.addr
    );
    apply(&c, &dir, "nowhere", &bad)?;
    let failed = wait_for(LONG, "the task failing on its mount", || {
        let all = c.berth_json(&["get", "tasks", "--service", "nowhere", "-a"]).ok()?;
        all.as_array()?.iter().find(|t| t["state"] == "failed").cloned()
    })?;
    let m = failed["message"].as_str().unwrap_or_default();
    assert!(m.contains("mounting GlusterFS volume") && m.contains("reachable from this node"), "{m}");
    drop(agents);
    Ok(())
}
