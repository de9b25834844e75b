//! Networks on the masters: `kind: Network` documents, the namespace's `default` network, the
//! address pools and what they hand out (subnets, VNIs, service VIPs, node blocks), and the
//! errors for bad, overlapping and exhausted subnets. Real masters and a real agent; every
//! address comes from 198.18.0.0/15.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use berth_tests::{Cluster, apply, cluster_with_agents, refused, wait_for};
use serde_json::Value;

const POOLS: &[&str] = &["--address-pool", "198.18.0.0/16", "--vip-pool", "198.19.0.0/20"];

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
    // Block sizes: chosen at creation, within the subnet, never changed.
    let e = refused(&c, &dir, "big", &net_doc("bigblocks", "block_prefix: 16"))?;
    assert!(e.contains("larger than the subnet 198.18.32.0/20") && e.contains("use 20 or more"), "{e}");
    let e = refused(&c, &dir, "reblock", &net_doc("front", "block_prefix: 26"))?;
    assert!(e.contains("has blocks of /24") && e.contains("cannot change"), "{e}");
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

/// What a task sees from inside its namespaces: `python3` run in the network and mount
/// namespaces of process `pid`, so names resolve through the task's own resolv.conf (glibc's
/// resolver, search list and all), as the task's program would.
fn from_task(pid: i64, script: &str) -> Option<Value> {
    let out = std::process::Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--net", "--mount", "python3", "-c", script])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

const LOOKUP: &str = r#"
import json, socket, urllib.request
def names(n):
    try: return sorted(socket.gethostbyname_ex(n)[2])
    except Exception as e: return str(e)
def get(url):
    try: return urllib.request.urlopen(url, timeout=2).status
    except Exception as e: return str(e)
print(json.dumps({"web": names("web"), "long": names("web.default.svc.berth.internal"),
                  "tasks": names("tasks.web"), "http": get("http://web:8080/")}))
"#;

const WEB_ON_NETWORK: &str = r#"
kind: Service
metadata: {name: web}
spec:
  replicas: 2
  task:
    runtime: process
    command: [/bin/sh, -c, "echo $BERTH_TASK_ID > id.txt && exec /usr/bin/python3 -m http.server 8080"]
    ports: [{name: http, container: 8080, published: 18080, mode: host}]
    health: {http: {port: 8080, path: /}, interval: 1s}
  placement:
    constraints: ["node.name != host-a"]
    max_replicas_per_node: 1
---
kind: Network
metadata: {name: edge}
---
kind: Service
metadata: {name: mesh}
spec:
  replicas: 1
  task:
    runtime: process
    networks: [edge]
    command: [/bin/sh, -c, "echo $BERTH_TASK_ID > id.txt && exec /usr/bin/python3 -m http.server 8081"]
    ports: [{container: 8081, published: 30080}]
    health: {http: {port: 8081, path: /}, interval: 1s}
  placement:
    constraints: ["node.name == host-b"]
---
kind: Service
metadata: {name: client}
spec:
  replicas: 1
  task:
    runtime: process
    command: [/bin/sleep, "3600"]
  placement:
    constraints: ["node.name == host-a"]
"#;

#[test]
fn tasks_find_each_other_by_name_across_hosts() -> Result<()> {
    if !berth_tests::is_root() {
        eprintln!("skipped: test hosts are network namespaces, which need root");
        return Ok(());
    }
    let hosts = berth_tests::Hosts::new(3)?;
    // Every network update in parts of a few hundred bytes, so that the parts (of a large
    // update) are exercised end to end.
    let args: Vec<&str> = POOLS.iter().copied().chain(["--network-update-part-bytes", "300"]).collect();
    let c = Cluster::start_on(3, &hosts.root_addr(), &args)?;
    let t = berth_tests::token(&c, &["--uses", "10"])?;
    let mut agents = Vec::new();
    for (i, name) in ["host-a", "host-b", "host-c"].iter().enumerate() {
        agents.push(berth_tests::spawn_agent_on(&hosts, i, &c, &c.dir.path().join(name), name, &t)?);
    }
    // Every node ready, attaching networks, with its underlay address.
    wait_for(Duration::from_secs(60), "three ready nodes that attach networks", || {
        let ns = c.berth_json(&["get", "nodes"]).ok()?;
        let ok = ns.as_array()?.iter().filter(|n| n["status"] == "ready" && n["networks"] == true).count();
        (ok == 3).then_some(())
    })?;
    let nodes = c.berth_json(&["get", "nodes"])?;
    for n in nodes.as_array().unwrap() {
        assert!(n["address"].as_str().is_some_and(|a| a.starts_with(&format!("198.19.{}.", hosts.k))), "{n}");
    }
    apply(&c, c.dir.path(), "web", WEB_ON_NETWORK)?;
    let dump = |c: &Cluster| {
        eprintln!("tasks: {:#}", c.berth_json(&["get", "tasks", "-a"]).unwrap_or_default());
        for name in ["host-a", "host-b", "host-c"] {
            let log = std::fs::read_to_string(c.dir.path().join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!("--- {name}.log (last lines, newest first)\n{}", tail.join("\n"));
        }
    };
    let web_addrs = wait_for(Duration::from_secs(90), "two healthy web tasks with addresses", || {
        let ts = berth_tests::tasks(&c, "web");
        let addrs: Vec<String> = ts
            .iter()
            .filter(|t| t["state"] == "running" && t["health"] == "healthy")
            .filter_map(|t| t["addresses"]["default"].as_str().map(str::to_string))
            .collect();
        (addrs.len() == 2).then_some(addrs)
    })
    .inspect_err(|_| dump(&c))?;
    let client = wait_for(Duration::from_secs(60), "the client task running", || {
        berth_tests::tasks(&c, "client").into_iter().find(|t| t["state"] == "running" && t["pid"].as_i64() > Some(0))
    })?;
    let pid = client["pid"].as_i64().unwrap();
    let vip = service(&c, "web")?["vip"].as_str().unwrap().to_string();
    let mut want_tasks = web_addrs.clone();
    want_tasks.sort();
    // Once the endpoints reached host A: the name is the VIP, tasks.web both tasks, and HTTP to
    // the name reaches a web task on another host.
    let last = std::cell::RefCell::new(None);
    let seen = wait_for(Duration::from_secs(30), "web resolving and answering from the client task", || {
        let v = from_task(pid, LOOKUP);
        *last.borrow_mut() = v.clone();
        let v = v?;
        (v["web"] == serde_json::json!([vip]) && v["tasks"] == serde_json::json!(want_tasks) && v["http"] == 200)
            .then_some(v)
    })
    .inspect_err(|_| {
        eprintln!("last lookup from the client: {:?} (vip {vip}, tasks {want_tasks:?})", last.borrow());
        dump(&c)
    })?;
    assert_eq!(seen["long"], serde_json::json!([vip]));
    // Each task answers on its own address too.
    for a in &web_addrs {
        let v = from_task(
            pid,
            &format!(
                "import json, urllib.request\nprint(json.dumps(urllib.request.urlopen('http://{a}:8080/', timeout=2).status))"
            ),
        );
        assert_eq!(v, Some(serde_json::json!(200)), "task address {a}");
    }
    // The host-mode published port: each web node forwards it into its task's namespace, from
    // outside the overlay (here, the root namespace); host A runs no web task and does not.
    let get_id = |addr: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        std::io::Write::write_all(&mut s, b"GET /id.txt HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        std::io::Read::read_to_string(&mut s, &mut body).ok()?;
        body.contains(" 200 ").then_some(body)
    };
    for i in [1, 2] {
        let addr = format!("{}:18080", hosts.addr(i));
        let body = wait_for(Duration::from_secs(10), &format!("GET {addr}/id.txt from outside"), || get_id(&addr))?;
        assert!(body.contains("web."), "{body}");
    }
    let err =
        std::net::TcpStream::connect_timeout(&format!("{}:18080", hosts.addr(0)).parse()?, Duration::from_secs(2))
            .expect_err("host A runs no web task, so its host-mode port is closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // The routing mesh: mesh's one task runs on host B, on a network of its own that hosts A
    // and C join only for the mesh; every host accepts its published port and reaches it.
    for i in [0, 1, 2] {
        let addr = format!("{}:30080", hosts.addr(i));
        let body =
            wait_for(Duration::from_secs(30), &format!("GET {addr}/id.txt through the routing mesh"), || get_id(&addr))
                .inspect_err(|_| dump(&c))?;
        assert!(body.contains("mesh."), "{body}");
    }
    let edge = network(&c, "edge")?;
    assert_eq!(edge["blocks"].as_object().map(|b| b.len()), Some(3), "every host holds a block of edge: {edge:#}");
    // Published-port conflicts are refused at apply time, naming the holder.
    let e = refused(
        &c,
        c.dir.path(),
        "clash",
        &svc_doc("clash", "    ports: [{container: 80, published: 30080, mode: host}]\n", ""),
    )?;
    assert!(e.contains("port 30080/tcp is already published by service default/mesh"), "{e}");
    let e = refused(
        &c,
        c.dir.path(),
        "clash2",
        &svc_doc("clash2", "    ports: [{container: 80, published: 18080}]\n", ""),
    )?;
    assert!(e.contains("port 18080/tcp is already published by service default/web in mode host"), "{e}");
    assert!(e.contains("spec.task.ports[0].published"), "{e}");

    // kill -9 of one web task while the client asks in a loop: once its death has reached host
    // A, no request goes to it and DNS no longer returns it.
    let victim = berth_tests::tasks(&c, "web")
        .into_iter()
        .find(|t| t["state"] == "running" && t["node_name"] == "host-b")
        .expect("a web task on host-b");
    let (victim_id, victim_pid) = (victim["id"].as_str().unwrap().to_string(), victim["pid"].as_i64().unwrap());
    let victim_addr = victim["addresses"]["default"].as_str().unwrap().to_string();
    let mut looper = std::process::Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--net", "--mount", "python3", "-u", "-c", LOOP])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(looper.stdout.take().unwrap()));
    let mut answers: Vec<(f64, String)> = Vec::new();
    let mut killed_at = None;
    for line in lines.by_ref() {
        let line = line?;
        let Some((t, who)) = line.split_once(' ') else { continue };
        answers.push((t.parse()?, who.to_string()));
        if killed_at.is_none() && answers.iter().filter(|(_, w)| *w == victim_id).count() >= 3 {
            killed_at = Some(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64());
            assert!(berth_tests::signal(victim_pid, "KILL"), "kill -9 {victim_pid}");
        }
    }
    looper.wait()?;
    let killed_at = killed_at.expect("the victim answered the client before the kill");
    let after: Vec<&(f64, String)> = answers.iter().filter(|(t, _)| *t > killed_at).collect();
    let failed = after.iter().filter(|(_, w)| w.starts_with("error")).count();
    let last_bad = after
        .iter()
        .filter(|(_, w)| w.starts_with("error") || *w == victim_id)
        .map(|(t, _)| t - killed_at)
        .fold(0.0, f64::max);
    eprintln!(
        "kill -9 of {victim_id}: {failed} of {} requests after it failed; the last failed or reached it {:.0} ms after the kill",
        after.len(),
        last_bad * 1000.0
    );
    assert!(after.iter().any(|(t, w)| *t > killed_at + 2.0 && !w.starts_with("error")), "no answers after the kill");
    assert!(last_bad < 2.0, "requests still failed or reached the dead task {last_bad:.2} s after the kill");
    // DNS answers exactly the running and healthy tasks (the slot's replacement may reuse the
    // victim's address: it was freed with its namespace).
    wait_for(Duration::from_secs(30), "tasks.web to match the healthy web tasks", || {
        let mut healthy: Vec<String> = berth_tests::tasks(&c, "web")
            .iter()
            .filter(|t| t["state"] == "running" && t["health"] == "healthy" && t["id"] != victim_id.as_str())
            .filter_map(|t| t["addresses"]["default"].as_str().map(str::to_string))
            .collect();
        healthy.sort();
        let v = from_task(pid, LOOKUP)?;
        (v["tasks"] == serde_json::json!(healthy)).then_some(())
    })?;
    eprintln!("the victim's address {victim_addr}; tasks.web matches the healthy tasks again");
    drop(agents);
    Ok(())
}

/// Asks http://web:8080/id.txt every 50 ms for 6 s, printing "<unix time> <task id or error>".
const LOOP: &str = r#"
import time, urllib.request
end = time.time() + 6
while time.time() < end:
    t = time.time()
    try: who = urllib.request.urlopen("http://web:8080/id.txt", timeout=0.5).read().decode().strip()
    except Exception as e: who = "error:" + type(e).__name__
    print(t, who, flush=True)
    time.sleep(0.05)
"#;

const TWO_NETWORKS: &str = r#"
kind: Network
metadata: {name: front}
---
kind: Network
metadata: {name: back}
spec: {internal: true}
---
kind: Service
metadata: {name: sa}
spec:
  replicas: 1
  task:
    runtime: process
    networks: [front]
    command: [/usr/bin/python3, -m, http.server, "8080"]
    ports: [{container: 8080}]
  placement: {constraints: ["node.name == host-a"]}
---
kind: Service
metadata: {name: sb}
spec:
  replicas: 1
  task:
    runtime: process
    networks: [back]
    command: [/usr/bin/python3, -m, http.server, "8080"]
    ports: [{container: 8080}]
  placement: {constraints: ["node.name == host-a"]}
---
kind: Service
metadata: {name: ca}
spec:
  replicas: 1
  task: {runtime: process, networks: [front], command: [/bin/sleep, "3600"]}
  placement: {constraints: ["node.name == host-b"]}
---
kind: Service
metadata: {name: cb}
spec:
  replicas: 1
  task: {runtime: process, networks: [back], command: [/bin/sleep, "3600"]}
  placement: {constraints: ["node.name == host-b"]}
"#;

/// GETs `url` from inside the task with `pid`: the status, or the error's kind.
fn get_from(pid: i64, url: &str) -> String {
    let script = format!(
        "import json, urllib.request\ntry: r = urllib.request.urlopen('{url}', timeout=1).status\nexcept Exception as e: r = \
         type(e).__name__ + ': ' + str(e)\nprint(json.dumps(str(r)))"
    );
    from_task(pid, &script).and_then(|v| v.as_str().map(str::to_string)).unwrap_or_else(|| "no answer".into())
}

fn running(c: &Cluster, service: &str) -> Result<Value> {
    wait_for(Duration::from_secs(90), &format!("{service} running"), || {
        berth_tests::tasks(c, service).into_iter().find(|t| t["state"] == "running" && t["pid"].as_i64() > Some(0))
    })
}

#[test]
fn networks_are_isolated_and_an_internal_one_has_no_egress() -> Result<()> {
    if !berth_tests::is_root() {
        eprintln!("skipped: test hosts are network namespaces, which need root");
        return Ok(());
    }
    let hosts = berth_tests::Hosts::new(2)?;
    let c = Cluster::start_on(3, &hosts.root_addr(), POOLS)?;
    let t = berth_tests::token(&c, &["--uses", "10"])?;
    let mut agents = ["host-a", "host-b"]
        .iter()
        .enumerate()
        .map(|(i, name)| berth_tests::spawn_agent_on(&hosts, i, &c, &c.dir.path().join(name), name, &t))
        .collect::<Result<Vec<_>>>()?;
    apply(&c, c.dir.path(), "two", TWO_NETWORKS)?;
    let (sa, sb) = (running(&c, "sa")?, running(&c, "sb")?);
    let (ca, cb) = (running(&c, "ca")?["pid"].as_i64().unwrap(), running(&c, "cb")?["pid"].as_i64().unwrap());
    let sa_addr = sa["addresses"]["front"].as_str().unwrap().to_string();
    let sb_addr = sb["addresses"]["back"].as_str().unwrap().to_string();
    // Same network, across hosts: by name and by address.
    wait_for(Duration::from_secs(30), "ca reaching sa by name", || {
        (get_from(ca, "http://sa:8080/") == "200").then_some(())
    })?;
    assert_eq!(get_from(ca, &format!("http://{sa_addr}:8080/")), "200");
    wait_for(Duration::from_secs(30), "cb reaching sb by name", || {
        (get_from(cb, "http://sb:8080/") == "200").then_some(())
    })?;
    // Across networks: no name, and the address is unreachable (the host does not route
    // between networks).
    let by_name = get_from(ca, "http://sb:8080/");
    assert!(by_name.contains("URLError"), "ca resolved sb: {by_name}");
    let by_addr = get_from(ca, &format!("http://{sb_addr}:8080/"));
    assert_ne!(by_addr, "200", "ca reached sb's address {sb_addr} on another network");
    let back = get_from(cb, &format!("http://{sa_addr}:8080/"));
    assert_ne!(back, "200", "cb reached sa's address {sa_addr} on another network");
    // Egress: a listener outside the overlay (the root namespace's address on the hosts'
    // switch) answers the non-internal network's task, never the internal one's.
    let outside = std::net::TcpListener::bind(format!("{}:0", hosts.root_addr()))?;
    let port = outside.local_addr()?.port();
    std::thread::spawn(move || {
        for mut s in outside.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut s, b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let url = format!("http://{}:{port}/", hosts.root_addr());
    assert_eq!(get_from(ca, &url), "200", "front (not internal) has egress");
    let internal = get_from(cb, &url);
    assert_ne!(internal, "200", "the internal network reached outside the overlay");
    eprintln!(
        "isolation: ca -> sb by name: {by_name}; by address: {by_addr}; cb -> sa: {back}; cb -> outside: {internal}"
    );

    // A removed node gives its address blocks back.
    let holds_block = |c: &Cluster, node: &str| -> Result<bool> {
        Ok(networks(c)?.iter().any(|n| n["blocks"].as_object().is_some_and(|b| b.contains_key(node))))
    };
    assert!(holds_block(&c, "host-b")?, "host-b has a block: {:#}", Value::Array(networks(&c)?));
    // (Once the node is gone, a block still held would show under its id.)
    let nodes = c.berth_json(&["get", "nodes"])?;
    let id = nodes.as_array().and_then(|ns| ns.iter().find(|n| n["name"] == "host-b")).map(|n| n["id"].clone());
    let id = id.and_then(|i| i.as_str().map(str::to_string)).expect("host-b's id");
    agents[1].kill9();
    let out = c.berth(&["node", "rm", "host-b", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!holds_block(&c, &id)? && !holds_block(&c, "host-b")?, "kept: {:#}", Value::Array(networks(&c)?));
    assert!(holds_block(&c, "host-a")?);
    Ok(())
}

const ECHO: &str = r#"
kind: Service
metadata: {name: echo}
spec:
  replicas: 1
  task:
    runtime: process
    command:
      - /usr/bin/python3
      - -c
      - |
        import socket, threading
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 7000)); s.listen(16)
        def serve(c):
            while True:
                b = c.recv(64)
                if not b: return
                c.sendall(b)
        while True:
            c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
    ports: [{name: echo, container: 7000}]
  placement: {constraints: ["node.name == host-b"]}
---
kind: Service
metadata: {name: client}
spec:
  replicas: 1
  task: {runtime: process, command: [/bin/sleep, "3600"]}
  placement: {constraints: ["node.name == host-a"]}
"#;

/// Holds one TCP connection to echo:7000 (through the VIP) and round-trips a byte every 100 ms
/// until `stop` exists, printing "ok N" per round trip, or "broken: ..." and exiting.
fn hold_connection(stop: &Path) -> String {
    format!(
        r#"
import os, socket, time
c = socket.create_connection(("echo", 7000), timeout=2)
n = 0
while not os.path.exists("{stop}"):
    try:
        c.sendall(b"x")
        if c.recv(1) != b"x": raise Exception("wrong echo")
    except Exception as e:
        print("broken:", e, flush=True); raise SystemExit(1)
    n += 1
    print("ok", n, flush=True)
    time.sleep(0.1)
"#,
        stop = stop.display()
    )
}

#[test]
fn connections_and_dns_survive_a_leader_kill_an_agent_restart_and_losing_every_master() -> Result<()> {
    if !berth_tests::is_root() {
        eprintln!("skipped: test hosts are network namespaces, which need root");
        return Ok(());
    }
    let hosts = berth_tests::Hosts::new(2)?;
    let mut c = Cluster::start_on(3, &hosts.root_addr(), POOLS)?;
    let t = berth_tests::token(&c, &["--uses", "10"])?;
    let dirs: Vec<_> = ["host-a", "host-b"].iter().map(|n| c.dir.path().join(n)).collect();
    let mut agents = [
        berth_tests::spawn_agent_on(&hosts, 0, &c, &dirs[0], "host-a", &t)?,
        berth_tests::spawn_agent_on(&hosts, 1, &c, &dirs[1], "host-b", &t)?,
    ];
    apply(&c, c.dir.path(), "echo", ECHO)?;
    running(&c, "echo")?;
    let client_task = running(&c, "client")?;
    let client = client_task["pid"].as_i64().unwrap();
    let client_id = client_task["id"].as_str().unwrap().to_string();
    let vip = service(&c, "echo")?["vip"].as_str().unwrap().to_string();
    let names = |c: &Cluster| -> Option<Value> {
        let _ = c;
        from_task(client, "import json, socket\nprint(json.dumps(socket.gethostbyname_ex('echo')[2]))")
    };
    wait_for(Duration::from_secs(30), "echo resolving from the client", || {
        (names(&c)? == serde_json::json!([vip])).then_some(())
    })?;
    // The holder runs in the client task's mount namespace, where the host's files are out of
    // view: it watches for the stop file in the task's private /tmp (on the host, the task
    // directory's `tmp`).
    let stop = dirs[0].join("tasks").join(&client_id).join("tmp").join("stop-echo");
    let mut holder = std::process::Command::new("nsenter")
        .args([
            "--target",
            &client.to_string(),
            "--net",
            "--mount",
            "python3",
            "-u",
            "-c",
            &hold_connection(Path::new("/tmp/stop-echo")),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = holder.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(|l| l.ok()) {
            let _ = tx.send(line);
        }
    });
    // Waits for `n` more round trips on the held connection; any break fails the test.
    let round_trips = |n: usize, what: &str| -> Result<()> {
        for _ in 0..n {
            let line =
                rx.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow::anyhow!("{what}: no round trip"))?;
            anyhow::ensure!(line.starts_with("ok"), "{what}: the connection broke: {line}");
        }
        Ok(())
    };
    round_trips(5, "before the faults")?;

    // kill -9 of the leader: a new one is elected; the data plane does not notice.
    let leader = c.wait_leader(Duration::from_secs(30))?;
    c.kill9(leader);
    c.wait_leader(Duration::from_secs(30))?;
    round_trips(10, "after kill -9 of the leader")?;

    // Restart both agents (kill -9, then start again): they adopt their links, nftables table
    // and task namespaces, so the connection through the VIP stays up and DNS answers.
    for (i, name) in ["host-a", "host-b"].iter().enumerate() {
        agents[i].kill9();
        // The dropped handle would kill the agent's tasks too (a test's cleanup): not these.
        agents[i].dir = PathBuf::new();
        round_trips(3, &format!("with agent {name} down"))?;
        agents[i] = berth_tests::spawn_agent_on(&hosts, i, &c, &dirs[i], name, &t)?;
        wait_for(Duration::from_secs(30), &format!("agent {name} back"), || {
            let ns = c.berth_json(&["get", "nodes"]).ok()?;
            let back =
                ns.as_array()?.iter().any(|n| n["name"] == *name && n["status"] == "ready" && n["connected"] == true);
            back.then_some(())
        })?;
        round_trips(5, &format!("after agent {name} restarted"))?;
        wait_for(Duration::from_secs(10), "DNS after the agent restart", || {
            (names(&c)? == serde_json::json!([vip])).then_some(())
        })?;
    }
    assert_eq!(berth_tests::tasks(&c, "client").len(), 1, "the client task was replaced");

    // Every master gone: the agents keep serving DNS and the VIP from what they know.
    let ids: Vec<u64> = c.masters.keys().copied().collect();
    for id in ids {
        c.kill9(id);
    }
    round_trips(10, "with every master gone")?;
    assert_eq!(names(&c), Some(serde_json::json!([vip])), "DNS with every master gone");
    std::fs::write(&stop, "")?;
    let status = holder.wait()?;
    assert!(status.success(), "the held connection ended badly: {status}");
    Ok(())
}

const CONTAINER_AND_PROCESS: &str = r#"
kind: Service
metadata: {name: dweb}
spec:
  replicas: 1
  task:
    runtime: docker
    image: berth-test/busybox:1
    command: [/bin/busybox, httpd, -f, -p, "8080", -h, /www]
    ports: [{name: http, container: 8080, published: 18081}]
    health: {tcp: {port: 8080}, interval: 1s}
  placement: {constraints: ["node.name == host-b"]}
---
kind: Service
metadata: {name: pweb}
spec:
  replicas: 1
  task:
    runtime: process
    command: [/bin/sh, -c, "echo process task > index.html && exec /usr/bin/python3 -m http.server 8080"]
    ports: [{name: http, container: 8080}]
  placement: {constraints: ["node.name == host-a"]}
"#;

#[test]
fn a_container_and_a_process_task_reach_each_other_by_name() -> Result<()> {
    if !berth_tests::is_root() {
        eprintln!("skipped: test hosts are network namespaces, which need root");
        return Ok(());
    }
    berth_tests::docker_test_image()?;
    let hosts = berth_tests::Hosts::new(2)?;
    let c = Cluster::start_on(3, &hosts.root_addr(), POOLS)?;
    let t = berth_tests::token(&c, &["--uses", "10"])?;
    let _agents = ["host-a", "host-b"]
        .iter()
        .enumerate()
        .map(|(i, name)| berth_tests::spawn_agent_on(&hosts, i, &c, &c.dir.path().join(name), name, &t))
        .collect::<Result<Vec<_>>>()?;
    apply(&c, c.dir.path(), "mixed", CONTAINER_AND_PROCESS)?;
    let dweb = wait_for(Duration::from_secs(90), "the container running, healthy, with an address", || {
        berth_tests::tasks(&c, "dweb").into_iter().find(|t| {
            t["state"] == "running" && t["health"] == "healthy" && t["addresses"]["default"].as_str().is_some()
        })
    })
    .inspect_err(|_| {
        eprintln!("tasks: {:#}", c.berth_json(&["get", "tasks", "-a"]).unwrap_or_default());
    })?;
    let pweb = running(&c, "pweb")?;
    let pid = pweb["pid"].as_i64().unwrap();
    // The process task (host A) reaches the container (host B) by name, through its VIP, and
    // by its task address.
    let body = wait_for(Duration::from_secs(30), "pweb reaching dweb by name", || {
        let script = "import json, urllib.request\nprint(json.dumps(urllib.request.urlopen('http://dweb:8080/', \
                      timeout=2).read().decode()))";
        from_task(pid, script).and_then(|v| v.as_str().map(str::to_string))
    })?;
    assert!(body.contains("berth test image"), "{body}");
    let daddr = dweb["addresses"]["default"].as_str().unwrap();
    assert_eq!(get_from(pid, &format!("http://{daddr}:8080/")), "200");
    // The container reaches the process task by name (Docker wrote its resolv.conf from the
    // node's DNS), with busybox's resolver and nc (its static wget crashes in this image).
    let container = format!("berth-{}", dweb["id"].as_str().unwrap());
    let last = std::cell::RefCell::new(String::new());
    let from_container = wait_for(Duration::from_secs(30), "dweb reaching pweb by name", || {
        let out = std::process::Command::new("docker")
            .args([
                "exec",
                &container,
                "/bin/busybox",
                "sh",
                "-c",
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 pweb 8080",
            ])
            .output()
            .ok()?;
        *last.borrow_mut() = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .inspect_err(|_| {
        let sh = |cmd: &str| {
            std::process::Command::new("docker")
                .args(["exec", &container, "/bin/busybox", "sh", "-c", cmd])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
                .unwrap_or_default()
        };
        eprintln!(
            "last nc: {}\nresolv.conf: {}\naddresses: {}\nlookup: {}",
            last.borrow(),
            sh("cat /etc/resolv.conf"),
            sh("ip addr; ip route"),
            sh("nslookup pweb")
        );
    })?;
    assert!(from_container.contains("process task"), "{from_container}");
    // Its published port is forwarded into its namespace by the agent, from outside the overlay.
    let addr = format!("{}:18081", hosts.addr(1));
    wait_for(Duration::from_secs(10), &format!("GET {addr} from outside"), || {
        let mut s = std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
        std::io::Write::write_all(&mut s, b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        std::io::Read::read_to_string(&mut s, &mut body).ok()?;
        body.contains("berth test image").then_some(())
    })?;
    Ok(())
}

/// Many nodes joining one network at once: the placements that give them blocks commit in
/// bounded transactions, over several controller rounds, and every node gets the network's view
/// (simulated agents, which keep it in memory and log their endpoints; no root needed).
#[test]
fn two_hundred_nodes_join_a_network_at_once() -> Result<()> {
    const NODES: usize = 200;
    let (c, _agents) = cluster_with_agents(&[], POOLS)?;
    let t = berth_tests::token(&c, &["--uses", "1000"])?;
    let dir = c.dir.path().join("sims");
    let _sims = berth_tests::spawn_agent(
        &c,
        &dir,
        "sim",
        Some(&t),
        &["--simulate", &NODES.to_string(), "--simulate-networks", "--labels", "sim=true"],
    )?;
    wait_for(Duration::from_secs(120), "every simulated node ready", || {
        let ns = c.berth_json(&["get", "nodes"]).ok()?;
        (ns.as_array()?.iter().filter(|n| n["status"] == "ready" && n["networks"] == true).count() == NODES)
            .then_some(())
    })?;
    let yaml = "kind: Network\nmetadata: {name: wide}\nspec: {subnet: 198.18.0.0/16, block_prefix: 26}\n---\n\
                kind: Service\nmetadata: {name: everywhere}\nspec:\n  mode: global\n  task:\n    runtime: process\n    \
                networks: [wide]\n    command: [/bin/true]\n    ports: [{name: http, container: 80}]\n";
    apply(&c, c.dir.path(), "wide", yaml)?;
    wait_for(Duration::from_secs(120), "a task running on every simulated node", || {
        let running = berth_tests::tasks(&c, "everywhere").iter().filter(|t| t["state"] == "running").count();
        (running == NODES).then_some(())
    })
    .inspect_err(|_| eprintln!("tasks: {:#}", c.berth_json(&["get", "tasks"]).unwrap_or_default()))?;
    let wide = network(&c, "wide")?;
    let blocks = wide["blocks"].as_object().map(|b| b.len()).unwrap_or(0);
    assert_eq!(blocks, NODES, "{wide}");
    assert!(wide["blocks"].as_object().unwrap().values().all(|b| b.as_str().is_some_and(|b| b.ends_with("/26"))));
    // Every simulated node got the network's view: the service, with no endpoints (a simulated
    // task holds no address).
    let log = dir.join("endpoints.jsonl");
    let seen = wait_for(Duration::from_secs(60), "every simulated node's view", || {
        let text = std::fs::read_to_string(&log).ok()?;
        let nodes: std::collections::BTreeSet<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["endpoints"].get("default/everywhere").is_some())
            .filter_map(|v| v["node"].as_str().map(str::to_string))
            .collect();
        (nodes.len() == NODES).then_some(nodes.len())
    })?;
    assert_eq!(seen, NODES);
    Ok(())
}
