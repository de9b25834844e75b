//! Networks on the masters: `kind: Network` documents, the namespace's `default` network, the
//! address pools and what they hand out (subnets, VNIs, service VIPs, node blocks), and the
//! errors for bad, overlapping and exhausted subnets. Real masters and a real agent; every
//! address comes from 198.18.0.0/15.

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};
use berth_tests::{Cluster, apply, cluster_with_agents, wait_for};
use serde_json::Value;

const POOLS: &[&str] = &["--address-pool", "198.18.0.0/16", "--vip-pool", "198.19.0.0/20"];

/// `berth apply` that must fail; its stderr.
fn refused(c: &Cluster, dir: &Path, name: &str, yaml: &str) -> Result<String> {
    let f = dir.join(format!("{name}.yaml"));
    std::fs::write(&f, yaml)?;
    let out = c.berth(&["apply", "-f", &f.to_string_lossy()]);
    if out.status.success() {
        bail!("apply {name} was accepted: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn network(c: &Cluster, name: &str) -> Result<Value> {
    c.berth_json(&["describe", "network", name])
}

fn networks(c: &Cluster) -> Result<Vec<Value>> {
    Ok(c.berth_json(&["get", "networks"])?.as_array().cloned().unwrap_or_default())
}

fn service(c: &Cluster, name: &str) -> Result<Value> {
    Ok(c.berth_json(&["describe", "service", name])?["service"].clone())
}

fn net_doc(name: &str, extra: &str) -> String {
    format!("kind: Network\nmetadata: {{name: {name}}}\nspec: {{{extra}}}\n")
}

fn svc_doc(name: &str, task_extra: &str, spec_extra: &str) -> String {
    format!(
        "kind: Service\nmetadata: {{name: {name}}}\nspec:\n  replicas: 1\n{spec_extra}  task:\n    runtime: process\n    \
         command: [/bin/sleep, \"300\"]\n{task_extra}"
    )
}

#[test]
fn a_cluster_without_pools_refuses_networks_and_runs_services_as_before() -> Result<()> {
    let (c, _agents) = cluster_with_agents(&[("host-a", "z1")], &[])?;
    let dir = c.dir.path();
    let e = refused(&c, dir, "net", &net_doc("backend", ""))?;
    assert!(e.contains("no address pool") && e.contains("--address-pool"), "{e}");
    let e = refused(&c, dir, "joins", &svc_doc("web", "    networks: [backend]\n", ""))?;
    assert!(e.contains("spec.task.networks") && e.contains("no address pool"), "{e}");
    // A service without networks runs on its host's network, with no VIP, as before.
    apply(&c, dir, "plain", &svc_doc("plain", "", ""))?;
    wait_for(Duration::from_secs(60), "plain running", || {
        let s = service(&c, "plain").ok()?;
        (s["running"] == 1).then_some(())
    })?;
    assert_eq!(service(&c, "plain")?["vip"], "");
    assert!(networks(&c)?.is_empty());
    Ok(())
}

#[test]
fn networks_subnets_vips_and_their_errors() -> Result<()> {
    let (mut c, _agents) = cluster_with_agents(&[("host-a", "z1")], POOLS)?;
    let dir = c.dir.path().to_path_buf();

    // Two networks in one file: an explicit subnet and one carved from the pool.
    let out = apply(
        &c,
        &dir,
        "nets",
        &format!("{}---\n{}", net_doc("backend", "subnet: 198.18.200.0/24, internal: true"), net_doc("front", "")),
    )?;
    assert!(out.contains("network default/backend created") && out.contains("network default/front created"), "{out}");
    let backend = network(&c, "backend")?;
    assert_eq!((backend["subnet"].as_str(), backend["internal"].as_bool()), (Some("198.18.200.0/24"), Some(true)));
    let front = network(&c, "front")?;
    assert_eq!(front["subnet"], "198.18.0.0/20");
    assert_ne!(front["vni"], backend["vni"]);
    assert!(front["vni"].as_u64() >= Some(4096));
    // Re-applying is a no-op; a dry run allocates nothing.
    let again = apply(&c, &dir, "nets", &net_doc("front", ""))?;
    assert!(again.contains("unchanged"), "{again}");
    let f = dir.join("dry.yaml");
    std::fs::write(&f, net_doc("dry", ""))?;
    let dry = c.berth(&["apply", "--dry-run", "-f", &f.to_string_lossy()]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would be created"));
    assert_eq!(networks(&c)?.len(), 2);

    // A service joins networks; one without `networks` joins its namespace's `default`, created on
    // first use. VIP services get distinct VIPs from the VIP pool, dnsrr ones none.
    apply(&c, &dir, "web", &svc_doc("web", "    networks: [front, backend]\n", ""))?;
    apply(&c, &dir, "api", &svc_doc("api", "", ""))?;
    apply(&c, &dir, "rr", &svc_doc("rr", "", "  endpoint_mode: dnsrr\n"))?;
    let default = network(&c, "default")?;
    assert_eq!((default["subnet"].as_str(), default["implicit"].as_bool()), (Some("198.18.16.0/20"), Some(true)));
    let (web_vip, api_vip) = (service(&c, "web")?["vip"].clone(), service(&c, "api")?["vip"].clone());
    assert!(web_vip.as_str().is_some_and(|v| v.starts_with("198.19.")), "{web_vip}");
    assert!(api_vip.as_str().is_some_and(|v| v.starts_with("198.19.")) && api_vip != web_vip, "{api_vip}");
    assert_eq!(service(&c, "rr")?["vip"], "");
    assert_eq!(network(&c, "front")?["services"], serde_json::json!(["web"]));
    // This agent attaches no networks yet, so the scheduler says why the tasks wait.
    let reason = wait_for(Duration::from_secs(30), "web's pending reason", || {
        let d = c.berth_json(&["describe", "service", "web"]).ok()?;
        let r = d["tasks"].as_array()?.first()?["pending_reason"].as_str()?.to_string();
        (!r.is_empty()).then_some(r)
    })?;
    assert!(reason.contains("cannot attach networks"), "{reason}");

    // Errors: a missing network, bad, overlapping and changed subnets, a network in use.
    let e = refused(&c, &dir, "ghost", &svc_doc("ghost", "    networks: [nowhere]\n", ""))?;
    assert!(e.contains("network `nowhere`, which does not exist") && e.contains("kind: Network"), "{e}");
    let e = refused(&c, &dir, "bad", &net_doc("bad", "subnet: 198.18.1.0/16"))?;
    assert!(e.contains("did you mean 198.18.0.0/16"), "{e}");
    let e = refused(&c, &dir, "overlap", &net_doc("overlap", "subnet: 198.18.200.128/25"))?;
    assert!(e.contains("overlaps network default/backend"), "{e}");
    let e = refused(&c, &dir, "vips", &net_doc("vips", "subnet: 198.19.0.0/24"))?;
    assert!(e.contains("overlaps the VIP pool"), "{e}");
    let e = refused(&c, &dir, "moved", &net_doc("front", "subnet: 198.18.240.0/20"))?;
    assert!(e.contains("subnet cannot change"), "{e}");
    let out = c.berth(&["delete", "network", "front"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("used by 1 service: web"), "{e}");

    // The pool runs out: /20s carved from a /16 around backend's explicit /24.
    let mut made = 0;
    let exhausted = loop {
        let name = format!("extra{made}");
        let f = dir.join("extra.yaml");
        std::fs::write(&f, net_doc(&name, ""))?;
        let out = c.berth(&["apply", "-f", &f.to_string_lossy()]);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        made += 1;
        assert!(made <= 16, "the pool never ran out");
    };
    assert_eq!(made, 13, "{exhausted}");
    assert!(exhausted.contains("has no free /20") && exhausted.contains("--address-pool"), "{exhausted}");

    // Allocations live in the replicated state: they survive the leader.
    let leader = c.wait_leader(Duration::from_secs(30))?;
    c.kill9(leader);
    c.wait_leader(Duration::from_secs(30))?;
    let after = wait_for(Duration::from_secs(30), "networks after failover", || networks(&c).ok())?;
    assert_eq!(after.len(), 2 + 1 + 13);
    assert_eq!(network(&c, "front")?["subnet"], "198.18.0.0/20");
    assert_eq!(service(&c, "web")?["vip"], web_vip);

    // Once its last service is gone the network can go, and its subnet is handed out again.
    let out = c.berth(&["delete", "service", "web", "--wait", "--timeout", "60s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = c.berth(&["delete", "network", "front"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    apply(&c, &dir, "again", &net_doc("again", ""))?;
    assert_eq!(network(&c, "again")?["subnet"], "198.18.0.0/20");
    Ok(())
}
