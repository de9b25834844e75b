//! Agents against real masters: joining with tokens, sessions, node health, mTLS refusals and
//! simulated agents. Every test starts real `berth master` and `berth agent` processes.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Result;
use berth_tests::{Cluster, admin_env, berth_bin, spawn_agent, token, wait_for};
use serde_json::Value;

/// Runs `berth agent` to completion (a join that must fail), returning (success, stderr).
fn agent_once(c: &Cluster, dir: &Path, token: &str) -> Result<(bool, String)> {
    agent_once_with(c, dir, token, &[])
}

fn agent_once_with(c: &Cluster, dir: &Path, token: &str, extra: &[&str]) -> Result<(bool, String)> {
    std::fs::create_dir_all(dir)?;
    let file = dir.with_extension("token");
    std::fs::write(&file, token)?;
    let out = Command::new(berth_bin())
        .args(["agent", "--join", &c.endpoints(), "--data-dir"])
        .arg(dir)
        .args(["--name", "refused", "--token-file"])
        .arg(&file)
        .args(extra)
        .stdin(Stdio::null())
        .output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

fn nodes(c: &Cluster) -> Result<Vec<Value>> {
    Ok(c.berth_json(&["get", "nodes"])?.as_array().cloned().unwrap_or_default())
}

fn node<'a>(nodes: &'a [Value], name: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["name"] == name)
}

fn wait_status(c: &Cluster, name: &str, status: &str, timeout: Duration) -> Result<Value> {
    wait_for(timeout, &format!("node {name} {status}"), || {
        let ns = nodes(c).ok()?;
        node(&ns, name).filter(|n| n["status"] == status).cloned()
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn is_empty_dir(d: &Path) -> bool {
    std::fs::read_dir(d).map(|mut r| r.next().is_none()).unwrap_or(true)
}

// 1. 3 masters, a token for 2 hosts; 2. two agents join and both nodes become ready, with the
// token's and the agent's labels; 3. one agent stops and restarts from its data dir without the
// token: same node id, ready again.
#[test]
fn agents_join_and_restart_without_token() -> Result<()> {
    let c = Cluster::start(3, &[])?;
    let t = token(&c, &["--uses", "2", "--labels", "tier=edge", "--description", "two hosts"])?;
    assert!(t.starts_with("BERTH-1-"), "{t}");
    let d1 = c.dir.path().join("agent-1");
    let d2 = c.dir.path().join("agent-2");
    let _a1 = spawn_agent(&c, &d1, "node-a", Some(&t), &["--labels", "zone=a"])?;
    let mut a2 = spawn_agent(&c, &d2, "node-b", Some(&t), &["--labels", "zone=b"])?;
    let n1 = wait_status(&c, "node-a", "ready", Duration::from_secs(30))?;
    let n2 = wait_status(&c, "node-b", "ready", Duration::from_secs(30))?;
    assert_eq!(n1["labels"]["zone"], "a");
    assert_eq!(n1["labels"]["tier"], "edge");
    assert!(n1["cpu_millis"].as_u64().unwrap() >= 1000, "{n1}");
    assert!(n1["memory_bytes"].as_u64().unwrap() > 0, "{n1}");
    assert_eq!(n1["availability"], "active");
    let id_b = n2["id"].clone();

    // The token is used up and listed without its secret.
    let list = c.berth(&["token", "list", "-o", "json"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(!text.contains(t.rsplit('.').next().unwrap()), "token list shows the secret: {text}");
    let tokens: Value = serde_json::from_str(&text)?;
    assert_eq!(tokens[0]["uses_left"], 0);

    a2.kill9();
    let _a2 = spawn_agent(&c, &d2, "node-b", None, &[])?;
    wait_for(Duration::from_secs(30), "node-b back in session", || {
        let ns = nodes(&c).ok()?;
        node(&ns, "node-b").filter(|n| n["connected"] == true && n["status"] == "ready").cloned()
    })?;
    let ns = nodes(&c)?;
    assert_eq!(node(&ns, "node-b").unwrap()["id"], id_b, "the restarted agent kept its identity");
    assert_eq!(ns.len(), 2);
    Ok(())
}

// Each refused join fails with its own message and leaves the data dir empty: a wrong secret
// (and an unknown token id, with the same message), a token for another CA, an expired token, a revoked token, a token with no uses left.
#[test]
fn refused_joins_say_why_and_leave_nothing() -> Result<()> {
    let c = Cluster::start(1, &[])?;
    let good = token(&c, &["--uses", "1"])?;
    let dir = |n: &str| c.dir.path().join(n);

    let (head, _) = good.rsplit_once('.').unwrap();
    let wrong_secret = format!("{head}.{}", "x".repeat(32));
    let (ok, err) = agent_once(&c, &dir("wrong-secret"), &wrong_secret)?;
    assert!(!ok && err.contains("not valid"), "{err}");
    assert!(is_empty_dir(&dir("wrong-secret")));
    // An unknown token id gets the very same answer: the answers do not tell which ids exist.
    let (before_id, secret) = good.rsplit_once('.').unwrap();
    let unknown_id = format!("{}-{}.{secret}", before_id.rsplit_once('-').unwrap().0, "0".repeat(8));
    let (ok, err_unknown) = agent_once(&c, &dir("unknown-id"), &unknown_id)?;
    let reason =
        |e: &str| e.find("the token is not valid").map(|at| e[at..].lines().next().unwrap_or_default().to_string());
    assert!(!ok && reason(&err_unknown).is_some() && reason(&err_unknown) == reason(&err), "{err_unknown}\n{err}");
    assert!(is_empty_dir(&dir("unknown-id")));

    // A token admits one host unless told otherwise; a count that does not fit is refused.
    let _one = token(&c, &[])?;
    let listed = c.berth_json(&["token", "list"])?;
    let uses: Vec<i64> = listed.as_array().unwrap().iter().filter_map(|t| t["uses_left"].as_i64()).collect();
    assert!(uses.contains(&1), "a token made without --uses: {listed}");
    let out = c.berth(&["token", "create", "--uses", &u64::MAX.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("more than 1000000"), "{err}");
    let out = c.berth(&["token", "create", "--ttl", "300000years"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("more than 10 years"), "{err}");

    let parts: Vec<&str> = good.splitn(4, '-').collect();
    let other_ca = format!("{}-{}-{}-{}", parts[0], parts[1], "0".repeat(64), parts[3]);
    let (ok, err) = agent_once(&c, &dir("other-ca"), &other_ca)?;
    assert!(!ok && err.contains("digest"), "{err}");
    assert!(is_empty_dir(&dir("other-ca")));

    let short = token(&c, &["--ttl", "1s"])?;
    let created = Instant::now();
    wait_for(Duration::from_secs(10), "the 1s token to expire", || {
        (created.elapsed() > Duration::from_millis(1500)).then_some(())
    })?;
    let (ok, err) = agent_once(&c, &dir("expired"), &short)?;
    assert!(!ok && err.contains("expired"), "{err}");
    assert!(is_empty_dir(&dir("expired")));

    let revoked = token(&c, &[])?;
    let id = revoked.rsplit_once('.').unwrap().0.rsplit('-').next().unwrap().to_string();
    let out = c.berth(&["token", "revoke", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, err) = agent_once(&c, &dir("revoked"), &revoked)?;
    assert!(!ok && err.contains("revoked"), "{err}");
    assert!(is_empty_dir(&dir("revoked")));

    let _first = spawn_agent(&c, &dir("first"), "first", Some(&good), &[])?;
    wait_status(&c, "first", "ready", Duration::from_secs(30))?;
    let (ok, err) = agent_once(&c, &dir("used-up"), &good)?;
    assert!(!ok && err.contains("no uses left"), "{err}");
    assert!(is_empty_dir(&dir("used-up")));

    // A joining agent adds labels to its token's, never changes them; and what it says about
    // itself must be plausible.
    let labelled = token(&c, &["--labels", "tier=edge"])?;
    let (ok, err) = agent_once_with(&c, &dir("relabel"), &labelled, &["--labels", "tier=core"])?;
    assert!(!ok && err.contains("conflicts with the token's tier=edge"), "{err}");
    assert!(is_empty_dir(&dir("relabel")));
    let (ok, err) = agent_once_with(&c, &dir("nowhere"), &labelled, &["--advertise-addr", "0.0.0.0"])?;
    assert!(!ok && err.contains("cannot reach this host"), "{err}");

    let (ok, err) = agent_once(&c, &dir("garbage"), "not-a-token")?;
    assert!(!ok && err.contains("token"), "{err}");
    assert_eq!(nodes(&c)?.len(), 1, "no refused join recorded a node");
    Ok(())
}

// 1. 3 masters and 2 ready agents; 2. kill -9 the leader; 3. both sessions reach the new leader
// within a few seconds; 4. neither node was ever declared down (no status change since before
// the kill).
#[test]
fn leader_kill_keeps_nodes_ready() -> Result<()> {
    let mut c = Cluster::start(3, &[])?;
    let t = token(&c, &["--uses", "2"])?;
    let _a1 = spawn_agent(&c, &c.dir.path().join("a1"), "n1", Some(&t), &[])?;
    let _a2 = spawn_agent(&c, &c.dir.path().join("a2"), "n2", Some(&t), &[])?;
    wait_status(&c, "n1", "ready", Duration::from_secs(30))?;
    wait_status(&c, "n2", "ready", Duration::from_secs(30))?;
    let before = now_ms();
    let leader = c.wait_leader(Duration::from_secs(10))?;
    c.kill9(leader);
    let killed = Instant::now();
    let moved = wait_for(Duration::from_secs(15), "both sessions on the new leader", || {
        let ns = nodes(&c).ok()?;
        let ok = ns.len() == 2 && ns.iter().all(|n| n["connected"] == true);
        ok.then(|| killed.elapsed())
    })?;
    eprintln!("sessions moved to the new leader {:.1}s after the kill", moved.as_secs_f64());
    assert!(moved < Duration::from_secs(10), "sessions took {moved:?} to move");
    for n in nodes(&c)? {
        assert_eq!(n["status"], "ready", "{n}");
        assert!(n["status_changed_at_ms"].as_i64().unwrap() < before, "node changed status after the kill: {n}");
    }
    Ok(())
}

// 1. an agent is ready (node-down grace 3s); 2. kill -9 the agent: its node goes down after the
// grace; 3. restart it: ready again.
#[test]
fn dead_agent_goes_down_and_comes_back() -> Result<()> {
    let c = Cluster::start(3, &["--node-down-grace", "3s"])?;
    let t = token(&c, &[])?;
    let d = c.dir.path().join("a");
    let mut a = spawn_agent(&c, &d, "victim", Some(&t), &[])?;
    wait_status(&c, "victim", "ready", Duration::from_secs(30))?;
    a.kill9();
    let killed = Instant::now();
    wait_status(&c, "victim", "down", Duration::from_secs(20))?;
    // The grace counts from the last heartbeat, which came at most one heartbeat period (1 s)
    // before the kill.
    assert!(killed.elapsed() >= Duration::from_secs(2), "declared down before the grace ran out");
    let _a = spawn_agent(&c, &a.dir, "victim", None, &[])?;
    wait_status(&c, "victim", "ready", Duration::from_secs(30))?;
    // A ready node is not removed without --force; a forced removal refuses the agent from then on.
    let out = c.berth(&["node", "rm", "victim"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = c.berth(&["node", "update", "victim", "--label-add", "disk=ssd", "--availability", "drain"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let n = wait_status(&c, "victim", "ready", Duration::from_secs(5))?;
    assert_eq!(n["labels"]["disk"], "ssd");
    assert_eq!(n["availability"], "drain");
    let out = c.berth(&["node", "rm", "victim", "--force"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(nodes(&c)?.is_empty());
    Ok(())
}

// A client with a certificate from another CA is refused by the API; the Raft service refuses
// an admin certificate, and an agent's (with reflection) from the request's head; a client without a certificate fails the handshake. (QUIC refusals are
// in `quic_refuses_foreign_and_missing_certificates`.)
#[test]
fn api_and_raft_refuse_foreign_certificates() -> Result<()> {
    let c = Cluster::start(1, &[])?;
    let other = c.dir.path().join("other-pki");
    berth_tests::pki_init(&other)?;
    let out = Command::new(berth_bin())
        .args(["kv", "put", "x", "1", "--endpoints", &c.endpoints()])
        .envs(admin_env(&other))
        .output()?;
    assert!(!out.status.success(), "a foreign admin certificate was accepted");
    let out = c.berth(&["kv", "put", "x", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // berth's own records cannot be forged or deleted through KV.
    for args in [["kv", "put", "/berth/tokens/forged", "x"].as_slice(), ["kv", "del", "/berth/", "--prefix"].as_slice()]
    {
        let out = c.berth(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("berth's own records"), "{args:?}: {err}");
    }
    berth_tests::tls_checks(&c.endpoints(), &c.pki_dir(), &other)?;
    // The data dir (the CA's key, RocksDB's files) is the master's alone, and so is its key.
    for m in c.masters.values() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
        assert_eq!(mode(&m.data_dir), 0o700, "{}", m.data_dir.display());
        assert_eq!(mode(&m.data_dir.join("pki/master.pem")), 0o600);
    }
    // An agent's certificate is refused by Raft and reflection before the body is read.
    berth_tests::agent_refused_before_the_body(&c.endpoints(), &c.pki_dir())?;
    // One client's watches are bounded (and a closed one frees its place).
    let open = berth_tests::watches_are_bounded_per_client(&c.endpoints(), &c.pki_dir())?;
    eprintln!("watches: the master refused one client's watch with {open} open");
    assert_eq!(open, 256);
    // Malformed and oversized frames close their connection; the master keeps serving.
    berth_tests::bad_frames_close_the_session(&c.endpoints(), &c.pki_dir())?;
    let t = token(&c, &[])?;
    let _a = spawn_agent(&c, &c.dir.path().join("after-garbage"), "after-garbage", Some(&t), &[])?;
    wait_status(&c, "after-garbage", "ready", Duration::from_secs(30))?;
    Ok(())
}

// `berth agent --simulate 1000`: 1,000 agents in one process, each its own identity and QUIC
// session, all ready.
#[test]
fn thousand_simulated_agents_become_ready() -> Result<()> {
    let c = Cluster::start(3, &[])?;
    let t = token(&c, &["--uses", "1000"])?;
    let _sim = spawn_agent(&c, &c.dir.path().join("sim"), "sim", Some(&t), &["--simulate", "1000"])?;
    let started = Instant::now();
    wait_for(Duration::from_secs(240), "1000 ready nodes", || {
        let ns = nodes(&c).ok()?;
        let ready = ns.iter().filter(|n| n["status"] == "ready").count();
        (ready == 1000).then_some(())
    })?;
    eprintln!("1000 simulated agents ready after {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

// Joins run concurrently and token uses stay exact: 200 simulated agents (each its own key, CSR
// and QUIC connection, 64 joining at a time) race for a token of 150 uses. Exactly 150 become
// nodes; the other 50 are told the token is used up; the token ends with 0 uses left.
#[test]
fn two_hundred_agents_race_for_a_token_of_150_uses() -> Result<()> {
    let c = Cluster::start(3, &[])?;
    let t = token(&c, &["--uses", "150"])?;
    let dir = c.dir.path().join("sim");
    let _sim = spawn_agent(&c, &dir, "sim", Some(&t), &["--simulate", "200"])?;
    let log = dir.with_extension("log");
    let used_up = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("simulated agent failed") && l.contains("no uses left"))
            .count()
    };
    let started = Instant::now();
    wait_for(Duration::from_secs(180), "150 ready nodes and 50 joins refused as used up", || {
        let ready = nodes(&c).ok()?.iter().filter(|n| n["status"] == "ready").count();
        (ready >= 150 && used_up() >= 50).then_some(())
    })?;
    eprintln!("200 agents raced for 150 uses: decided after {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(nodes(&c)?.len(), 150, "a node too many or too few");
    assert_eq!(used_up(), 50, "joins refused as used up:\n{}", std::fs::read_to_string(&log)?);
    let listed = c.berth_json(&["token", "list"])?;
    let left: Vec<i64> = listed.as_array().unwrap().iter().filter_map(|t| t["uses_left"].as_i64()).collect();
    assert_eq!(left, [0], "{listed}");
    Ok(())
}

// Certificates renew before they expire: with a 1-minute lifetime, 1. the masters re-issue their
// own certificates and the agent gets a new node certificate over its session, each at a random
// 50-80% of the lifetime; 2. after the first lifetime has run out the cluster still serves
// clients and Raft (a write commits) and the node is still ready on a session using the renewed
// certificate.
#[test]
fn certificates_renew_before_expiry() -> Result<()> {
    let c = Cluster::start(3, &["--cert-validity", "1m"])?;
    let t = token(&c, &[])?;
    let d = c.dir.path().join("renewing");
    let _a = spawn_agent(&c, &d, "renewing", Some(&t), &[])?;
    wait_status(&c, "renewing", "ready", Duration::from_secs(30))?;
    let started = Instant::now();
    let node_cert = std::fs::read(d.join("node.crt"))?;
    let master_certs: Vec<Vec<u8>> =
        c.masters.values().map(|m| std::fs::read(m.data_dir.join("pki/master.pem"))).collect::<Result<_, _>>()?;
    wait_for(Duration::from_secs(70), "the agent's renewed certificate", || {
        std::fs::read(d.join("node.crt")).ok().filter(|now| *now != node_cert).map(|_| ())
    })?;
    wait_for(Duration::from_secs(70), "every master's renewed certificate", || {
        let renewed = c
            .masters
            .values()
            .zip(&master_certs)
            .all(|(m, old)| std::fs::read(m.data_dir.join("pki/master.pem")).is_ok_and(|now| now != *old));
        renewed.then_some(())
    })?;
    let renewed_after = started.elapsed();
    assert!(renewed_after >= Duration::from_secs(25), "renewed after only {renewed_after:?}");
    wait_for(Duration::from_secs(60), "the first lifetime to run out", || {
        (started.elapsed() > Duration::from_secs(65)).then_some(())
    })?;
    assert!(c.put("after/renewal", "ok"), "a write failed after the original certificates expired");
    wait_for(Duration::from_secs(30), "the node ready on its renewed certificate", || {
        let ns = nodes(&c).ok()?;
        node(&ns, "renewing").filter(|n| n["status"] == "ready" && n["connected"] == true).cloned()
    })?;
    Ok(())
}

// Pre-authentication QUIC: 300 connections without a certificate, each trying to open 4 streams
// and to send a frame header announcing MAX_FRAME then 1 MiB, leave the master's memory bounded
// and the real agent ready and connected; a new agent still joins after it.
#[test]
fn pre_auth_quic_floods_leave_the_master_bounded() -> Result<()> {
    use anyhow::Context;
    let c = Cluster::start(1, &[])?;
    let t = token(&c, &[])?;
    let _a = spawn_agent(&c, &c.dir.path().join("real"), "real", Some(&t), &[])?;
    wait_status(&c, "real", "ready", Duration::from_secs(30))?;
    let master = &c.masters[&1];
    let pid = master.pid().context("the master's pid")?;
    let before = berth_tests::rss_kib(pid).context("the master's RSS")?;
    let mut peak = before;
    let mut seen_ready = false;
    let flood = berth_tests::pre_auth_flood(&master.endpoint, &c.pki_dir(), 300, 4, 1 << 20, |_| {
        peak = peak.max(berth_tests::rss_kib(pid).unwrap_or(0));
        let n = wait_status(&c, "real", "ready", Duration::from_secs(10))?;
        seen_ready = n["connected"].as_bool().unwrap_or(true);
        Ok(())
    })?;
    peak = peak.max(berth_tests::rss_kib(pid).unwrap_or(0));
    eprintln!(
        "pre-auth flood: {} connections up ({} refused), {} streams opened, {} bytes let through; \
         master RSS {} KiB before, peak {} KiB (+{} KiB)",
        flood.connections,
        flood.refused,
        flood.streams_opened,
        flood.bytes_accepted,
        before,
        peak,
        peak.saturating_sub(before)
    );
    assert!(seen_ready, "the real agent's session was lost during the flood");
    let limit = (flood.connections + flood.refused) as u64 * (berth_channel::PRE_AUTH_WINDOW as u64 + 64);
    assert!(flood.bytes_accepted <= limit, "{} bytes let through (bound {limit})", flood.bytes_accepted);
    assert!(peak.saturating_sub(before) < 64 * 1024, "the master grew by {} KiB", peak - before);
    // Still serving agents: another one joins.
    let t = token(&c, &[])?;
    let _b = spawn_agent(&c, &c.dir.path().join("after"), "after", Some(&t), &[])?;
    wait_status(&c, "after", "ready", Duration::from_secs(30))?;
    Ok(())
}

// Revoking an agent's identity ends its session within a heartbeat, and its reconnections are
// refused, saying why.
#[test]
fn a_revoked_agent_is_cut_off() -> Result<()> {
    let c = Cluster::start(1, &[])?;
    let t = token(&c, &[])?;
    let dir = c.dir.path().join("revoked-agent");
    let _a = spawn_agent(&c, &dir, "doomed", Some(&t), &[])?;
    let n = wait_status(&c, "doomed", "ready", Duration::from_secs(30))?;
    let id = n["id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "{n}");
    let out = c.berth(&["cert", "revoke", &format!("agent/{id}"), "--reason", "host decommissioned"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked = Instant::now();
    wait_for(Duration::from_secs(10), "the revoked agent's session to end", || {
        let ns = nodes(&c).ok()?;
        node(&ns, "doomed").filter(|n| n["connected"] == false).map(|_| ())
    })?;
    eprintln!("revoked agent disconnected {:.1}s after the revocation", revoked.elapsed().as_secs_f64());
    wait_for(Duration::from_secs(15), "the agent to be told why", || {
        let log = std::fs::read_to_string(dir.with_extension("log")).ok()?;
        log.contains("revoked").then_some(())
    })?;
    Ok(())
}

// In a cluster of 60 nodes (node-down grace 3s): 1. 20 go silent (their agents killed): they go
// down, as any silent node does; 2. the other 40 go silent too, so every node would be down at
// once: the leader holds those declarations (the fault looks like its own) and says so, and the
// 40 stay ready.
#[test]
fn most_nodes_silent_at_once_are_not_declared_down() -> Result<()> {
    let c = Cluster::start(3, &["--node-down-grace", "3s"])?;
    let t = token(&c, &["--uses", "60"])?;
    let mut few = spawn_agent(&c, &c.dir.path().join("few"), "few", Some(&t), &["--simulate", "20"])?;
    let mut most = spawn_agent(&c, &c.dir.path().join("most"), "most", Some(&t), &["--simulate", "40"])?;
    let count = |status: &str, prefix: &str| -> Option<usize> {
        let ns = nodes(&c).ok()?;
        Some(
            ns.iter()
                .filter(|n| n["status"] == status && n["name"].as_str().is_some_and(|s| s.starts_with(prefix)))
                .count(),
        )
    };
    wait_for(Duration::from_secs(120), "60 ready nodes", || (count("ready", "")? == 60).then_some(()))?;
    few.kill9();
    wait_for(Duration::from_secs(30), "the 20 silent nodes down", || (count("down", "few-")? == 20).then_some(()))?;
    most.kill9();
    let leader = c.wait_leader(Duration::from_secs(10))?;
    wait_for(Duration::from_secs(30), "the leader to hold the node-down declarations", || {
        c.log_of(leader).contains("holding node-down declarations").then_some(())
    })?;
    let states: Vec<String> = nodes(&c)?.iter().map(|n| format!("{} {}", n["name"], n["status"])).collect();
    assert_eq!(count("ready", "most-"), Some(40), "a node of the mass silence was declared down: {states:?}");
    assert_eq!(count("down", ""), Some(20));
    Ok(())
}
