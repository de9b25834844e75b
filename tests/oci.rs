//! `runtime: oci` end to end: real masters and agents, a real registry (`docker-registry` on
//! loopback, requiring credentials) holding the test image, pulled by each agent with the
//! credentials of a berth secret and run sandboxed by runc. What the pull did shows in the
//! task's status (`describe`); an image that cannot be pulled fails its task with the reason,
//! and the restart policy tries again.

#[path = "../crates/agent/tests/registry/mod.rs"]
mod registry;

use std::time::Duration;

use anyhow::{Result, bail};
use berth_tests::{Cluster, apply, cluster_with_agents, is_root, tasks, wait_for};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(90);

fn berth_ok(c: &Cluster, args: &[&str]) -> Result<String> {
    let out = c.berth(args);
    if !out.status.success() {
        bail!("berth {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn running(c: &Cluster, service: &str) -> Vec<Value> {
    tasks(c, service)
        .into_iter()
        .filter(|t| t["state"] == "running" && t["desired_state"] == "running" && t["pid"].as_i64().unwrap_or(0) > 0)
        .collect()
}

#[test]
fn an_oci_service_pulls_its_image_with_a_secret_and_runs_three_replicas() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: oci tasks need root (overlayfs, runc)");
        return Ok(());
    }
    let mut reg = registry::Registry::start_with_auth("puller", "pull-pw");
    let image = reg.push(registry::TEST_IMAGE, "apps/busybox:1");
    let (c, _agents) = cluster_with_agents(&[("n1", "a"), ("n2", "b"), ("n3", "c")], &[])?;
    let dir = c.dir.path().to_path_buf();
    let cred = dir.join("regcred");
    std::fs::write(&cred, "puller:pull-pw")?;
    berth_ok(&c, &["secret", "create", "regcred", "--from-file", &cred.to_string_lossy()])?;

    let svc = format!(
        "kind: Service\nmetadata: {{name: app}}\nspec:\n  replicas: 3\n  placement: {{max_replicas_per_node: 1}}\n  task:\n    \
         runtime: oci\n    image: {image}\n    image_pull_secret: regcred\n    command: [/bin/busybox, sh, -c, \"echo up as \
         $(/bin/busybox id -u); exec /bin/busybox sleep 100000\"]\n"
    );
    apply(&c, &dir, "app", &svc)?;
    let tasks3 = wait_for(LONG, "3 running oci tasks", || {
        let r = running(&c, "app");
        (r.len() == 3).then_some(r)
    })?;
    for t in &tasks3 {
        let m = t["message"].as_str().unwrap_or_default();
        assert!(m.contains("pulled image") && m.contains("apps/busybox:1") && m.contains("sha256:"), "{t}");
    }
    let described = berth_ok(&c, &["describe", "service", "app"])?;
    assert!(described.contains("running; pulled image"), "{described}");
    let logs = berth_ok(&c, &["logs", "app"])?;
    assert_eq!(logs.matches("up as 65534").count(), 3, "{logs}");

    // A tag the registry does not have: the task fails with the reason, and is tried again.
    let bad = svc
        .replace("name: app", "name: bad")
        .replace("apps/busybox:1", "apps/busybox:nope")
        .replace("replicas: 3", "replicas: 1");
    let bad = bad.replace("  task:\n", "  restart: {condition: any, delay: 200ms}\n  task:\n");
    apply(&c, &dir, "bad", &bad)?;
    // Each replacement names the attempt that failed and why.
    let retried = wait_for(LONG, "a second attempt of bad, after a failed pull", || {
        tasks(&c, "bad").into_iter().find_map(|t| {
            let m = t["message"].as_str().unwrap_or_default().to_string();
            let attempt: u32 = m.strip_prefix("restart ")?.split_whitespace().next()?.parse().ok()?;
            (attempt >= 2).then_some(m)
        })
    })
    .map_err(|e| anyhow::anyhow!("{e}; its tasks: {:#}", Value::Array(tasks(&c, "bad"))))?;
    assert!(retried.contains("pulling image") && retried.contains("apps/busybox:nope"), "{retried}");
    assert!(retried.contains("manifest unknown"), "{retried}");
    Ok(())
}
