//! Cross-crate tests against real `berth master` processes, driven by the real `berth` CLI.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use berth_tests::{Cluster, wait_for};

// 1. start 3 masters; 2. stream writes; 3. kill -9 the leader mid-stream; 4. keep writing until
// writes resume; 5. every acknowledged write reads back; 6. a new leader is reported.
#[test]
fn kill9_leader_during_writes_loses_nothing() -> Result<()> {
    let mut c = Cluster::start(3, &[])?;
    let old_leader = c.wait_leader(Duration::from_secs(30))?;
    let mut acked = Vec::new();
    let mut i = 0;
    while acked.len() < 30 {
        let k = format!("stream/{i:05}");
        if c.put(&k, &format!("v{i}")) {
            acked.push(k);
        }
        i += 1;
    }
    c.kill9(old_leader);
    let killed_at = Instant::now();
    let mut first_ok_after_kill = None;
    let resumed = acked.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < resumed + 30 && Instant::now() < deadline {
        let k = format!("stream/{i:05}");
        if c.put(&k, &format!("v{i}")) {
            first_ok_after_kill.get_or_insert_with(|| killed_at.elapsed());
            acked.push(k);
        }
        i += 1;
    }
    assert_eq!(acked.len(), resumed + 30, "writes did not resume after the leader was killed");
    eprintln!("first acknowledged write {:?} after kill -9 of the leader", first_ok_after_kill);
    let all = c.get_prefix("stream/")?;
    for k in &acked {
        assert!(all.contains_key(k), "acknowledged write {k} was lost");
    }
    let new_leader = c.wait_leader(Duration::from_secs(10))?;
    assert_ne!(new_leader, old_leader);
    Ok(())
}

// 1. start 3 masters with frequent snapshots; 2. write enough that the log is purged; 3. stop a
// follower, remove it, wipe its data dir; 4. add it back under a new id; 5. it catches up by
// snapshot and serves every key; 6. restarted, it keeps the current membership; 7. the removed
// id is refused forever.
#[test]
fn wiped_follower_rejoins_under_new_id_by_snapshot() -> Result<()> {
    let mut c = Cluster::start(3, &["--snapshot-logs", "50"])?;
    let out = c.berth(&["bench", "kv", "--ops", "600", "--clients", "8", "--keys", "600"]);
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let leader = c.wait_leader(Duration::from_secs(10))?;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    c.kill9(follower);
    let out = c.berth(&["member", "remove", &follower.to_string()]);
    assert!(out.status.success(), "member remove: {}", String::from_utf8_lossy(&out.stderr));
    // The removed master's certificate no longer opens the client API, on any master.
    let removed_pem = c.dir.path().join("removed-master.pem");
    std::fs::copy(c.masters[&follower].data_dir.join("pki/master.pem"), &removed_pem)?;
    for m in c.masters.values().filter(|m| m.id != follower) {
        let out = berth_as(&c, &m.endpoint, &removed_pem, &removed_pem, &["kv", "get", "bench/0", "--prefix"]);
        let err = String::from_utf8_lossy(&out.stderr);
        // `member remove` revoked its identity: refused in the TLS handshake.
        assert!(!out.status.success() && err.contains("it was revoked"), "{err}");
    }
    std::fs::remove_dir_all(&c.masters[&follower].data_dir)?;
    c.masters.remove(&follower);

    let new = c.add_entry(4).endpoint.clone();
    // The new master's credentials come from the cluster; its CA key arrives through Raft.
    let creds = c.dir.path().join("pki-4");
    // A member's id gets no certificate (it would give its identity away), a removed one neither.
    let member = (1..=3).find(|id| *id != follower).unwrap().to_string();
    let taken = c.dir.path().join("pki-taken");
    let out =
        c.berth(&["member", "certificate", "--id", &member, "--endpoint", &new, "--out", taken.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is a member of the cluster"), "{err}");
    let out = c.berth(&[
        "member",
        "certificate",
        "--id",
        &follower.to_string(),
        "--endpoint",
        &new,
        "--out",
        taken.to_str().unwrap(),
    ]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("removed earlier"));
    let out = c.berth(&["member", "certificate", "--id", "4", "--endpoint", &new, "--out", creds.to_str().unwrap()]);
    assert!(out.status.success(), "member certificate: {}", String::from_utf8_lossy(&out.stderr));
    c.spawn(4, &["--id", "4", "--join", "--pki-dir", creds.to_str().unwrap()])?;
    let out = c.berth(&["member", "add", "--id", "4", "--endpoint", &new, "--promote"]);
    assert!(out.status.success(), "member add: {}", String::from_utf8_lossy(&out.stderr));

    let members = c.berth_json(&["member", "list"])?;
    let m4 = members["members"].as_array().unwrap().iter().find(|m| m["id"] == 4).cloned().expect("member 4 listed");
    assert_eq!(m4["voter"], true);
    // Caught up: member 4 serves every key from its own state.
    let expected = c.get_prefix("bench/0")?;
    assert_eq!(expected.len(), 600);
    wait_for(Duration::from_secs(30), "member 4 to serve all keys", || {
        let out = c.berth_at(&new, &["kv", "get", "bench/0", "--prefix", "--serializable", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["count"].as_u64()? == 600).then_some(())
    })?;
    let snaps = std::fs::read_dir(c.masters[&4].data_dir.join("snapshots"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "snap"))
        .count();
    assert!(snaps >= 1, "member 4 should have caught up by installing a snapshot");

    // Restarted, member 4 still knows the membership it installed with the snapshot and the
    // changes after it: itself a voter, the removed id gone (stale membership must not survive).
    c.stop(4)?;
    c.spawn(4, &[])?;
    wait_for(Duration::from_secs(30), "restarted member 4 to see the current membership", || {
        let out = c.berth_at(&new, &["member", "list", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let ids: Vec<u64> = v["members"].as_array()?.iter().filter_map(|m| m["id"].as_u64()).collect();
        let four_votes = v["members"].as_array()?.iter().any(|m| m["id"] == 4 && m["voter"] == true);
        (four_votes && !ids.contains(&follower) && v["leader"].as_u64()? != 0).then_some(())
    })?;

    let out = c.berth(&["member", "add", "--id", &follower.to_string(), "--endpoint", "127.0.0.1:1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("can never be used again"), "{err}");
    Ok(())
}

// 1. write keys; 2. SIGTERM the leader: it hands leadership over first; 3. SIGTERM the rest;
// 4. restart each with only --data-dir; 5. all keys intact.
#[test]
fn all_masters_restarted_keep_their_data() -> Result<()> {
    let mut c = Cluster::start(3, &[])?;
    for i in 0..20 {
        assert!(c.put(&format!("keep/{i}"), &format!("v{i}")));
    }
    let before = c.get_prefix("keep/")?;
    // SIGTERM on the leader hands leadership over before it exits.
    let leader = c.wait_leader(Duration::from_secs(10))?;
    c.stop(leader)?;
    assert!(c.log_of(leader).contains("leadership handed over"), "{}", c.log_of(leader));
    for id in 1..=3 {
        c.stop(id)?;
    }
    for id in 1..=3 {
        c.spawn(id, &[])?;
    }
    c.wait_leader(Duration::from_secs(30))?;
    assert_eq!(c.get_prefix("keep/")?, before);
    Ok(())
}

// 1. write keys; 2. save a backup from a follower; 3. restore it into a new 3-master cluster on
// new ports; 4. the new cluster has the keys and a different cluster id.
#[test]
fn backup_restores_into_a_new_cluster() -> Result<()> {
    let c = Cluster::start(3, &[])?;
    for i in 0..25 {
        assert!(c.put(&format!("dr/{i}"), &format!("v{i}")));
    }
    let leader = c.wait_leader(Duration::from_secs(10))?;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let backup = c.dir.path().join("backup.snap");
    let out = c.berth_at(&c.masters[&follower].endpoint, &["snapshot", "save", backup.to_str().unwrap()]);
    assert!(out.status.success(), "snapshot save: {}", String::from_utf8_lossy(&out.stderr));
    let old_id = c.berth_json(&["cluster", "status"])?["cluster_id"].clone();

    let mut n =
        Cluster { dir: tempfile::tempdir()?, masters: Default::default(), extra_args: vec![], master_bin: None };
    berth_tests::pki_init(&n.pki_dir())?;
    let pki = n.pki_dir().display().to_string();
    for id in 1..=3 {
        n.add_entry(id);
    }
    let initial = n.initial_cluster();
    for id in 1..=3 {
        let dd = n.masters[&id].data_dir.clone();
        let out = n.berth(&[
            "snapshot",
            "restore",
            backup.to_str().unwrap(),
            "--data-dir",
            dd.to_str().unwrap(),
            "--id",
            &id.to_string(),
            "--initial-cluster",
            &initial,
        ]);
        assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    for id in 1..=3 {
        n.spawn(id, &["--pki-dir", &pki])?;
    }
    n.wait_leader(Duration::from_secs(30))?;
    let got = n.get_prefix("dr/")?;
    assert_eq!(got.len(), 25);
    assert_eq!(got["dr/7"], "v7");
    assert_ne!(n.berth_json(&["cluster", "status"])?["cluster_id"], old_id);
    // And it takes writes.
    assert!(n.put("dr/new", "x"));
    drop(c);
    Ok(())
}

// Bad input is refused with a clear error and changes nothing.
#[test]
fn bad_input_is_refused_clearly() -> Result<()> {
    let c = Cluster::start(1, &["--max-value-bytes", "1024"])?;
    // Oversized value.
    let big = "x".repeat(2000);
    let out = c.berth(&["kv", "put", "big", &big]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("over the limit of 1024 bytes"), "{err}");
    assert!(c.get_prefix("big")?.is_empty());
    // Malformed request: a negative revision.
    let out = c.berth(&["kv", "get", "k", "--revision=-5"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("revision must be >= 0"), "{err}");
    // Unknown flag.
    let out = c.berth(&["kv", "put", "--bogus", "k", "v"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--bogus"), "{err}");
    // A conditional put whose condition fails writes nothing and says why.
    assert!(c.put("cas", "1"));
    let out = c.berth(&["kv", "put", "cas", "2", "--if-mod-revision", "999"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("condition did not hold"), "{err}");
    assert_eq!(c.get_prefix("cas")?["cas"], "1");
    Ok(())
}

// A master refuses a data dir it cannot use: another cluster's, or another id's.
#[test]
fn foreign_data_dir_is_refused() -> Result<()> {
    let mut a = Cluster::start(1, &[])?;
    a.stop(1)?;
    let dir = a.masters[&1].data_dir.clone();
    let bin = berth_tests::berth_bin();
    let port = berth_tests::free_port();
    let out = std::process::Command::new(&bin)
        .args(["master", "--data-dir", dir.to_str().unwrap(), "--id", "1", "--initial-cluster"])
        .arg(format!("1=127.0.0.1:{port},2=127.0.0.1:{}", port + 1))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to another cluster"), "{err}");
    let out =
        std::process::Command::new(&bin).args(["master", "--data-dir", dir.to_str().unwrap(), "--id", "2"]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("belongs to master 1"), "{err}");
    Ok(())
}

// Conditional writes, history reads, watches and compaction through the CLI.
#[test]
fn kv_semantics_through_the_cli() -> Result<()> {
    let c = Cluster::start(3, &[])?;
    // `berth version`: the client's, and each master's as it reports it.
    let v = c.berth_json(&["version"])?;
    let client = v["client"].as_str().unwrap_or_default().to_string();
    assert!(!client.is_empty(), "{v}");
    let masters = v["masters"].as_array().cloned().unwrap_or_default();
    assert_eq!(masters.len(), 3, "{v}");
    assert!(masters.iter().all(|m| m["version"] == client.as_str()), "every master runs this build: {v}");
    let put =
        |k: &str, v: &str| -> Result<i64> { Ok(c.berth_json(&["kv", "put", k, v])?["revision"].as_i64().unwrap()) };
    let r1 = put("a", "1")?;
    let r2 = put("a", "2")?;
    assert!(r2 > r1);
    let old = c.berth_json(&["kv", "get", "a", "--revision", &r1.to_string()])?;
    assert_eq!(old["kvs"][0]["value"], "1");
    let out = c.berth(&["kv", "put", "a", "3", "--if-mod-revision", &r2.to_string()]);
    assert!(out.status.success());
    let out = c.berth(&["kv", "put", "a", "4", "--if-absent"]);
    assert!(!out.status.success());

    // A watch from r1 replays history in order, then stops at our deadline.
    let mut child = std::process::Command::new(berth_tests::berth_bin())
        .args(["kv", "watch", "a", "--from-revision", &r1.to_string(), "-o", "json", "--endpoints", &c.endpoints()])
        .envs(berth_tests::admin_env(&c.pki_dir()))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().take(3).collect::<Result<Vec<_>, _>>()
    });
    let lines = wait_for(Duration::from_secs(20), "three watch events", || lines.is_finished().then_some(()))
        .map(|_| lines.join().unwrap());
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines??;
    let values: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["value"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(values, ["1", "2", "3"]);

    // Commands that change something answer in JSON when asked (-o json everywhere).
    assert_eq!(c.berth_json(&["kv", "compact", &r2.to_string()])?["compacted"], r2);
    let out = c.berth(&["kv", "get", "a", "--revision", &r1.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("compacted"), "{err}");
    let token = c.berth_json(&["token", "create"])?["token"].as_str().unwrap_or_default().to_string();
    assert!(token.starts_with("BERTH-"), "{token}");
    let id = c.berth_json(&["token", "list"])?[0]["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(c.berth_json(&["token", "revoke", &id])?["revoked"], id.as_str());
    let plain = c.berth(&["token", "create"]);
    assert!(String::from_utf8_lossy(&plain.stdout).trim().starts_with("BERTH-"), "the table form is the token alone");
    let backup = c.dir.path().join("json.snap");
    let saved = c.berth_json(&["snapshot", "save", backup.to_str().unwrap()])?;
    assert!(
        saved["bytes"].as_u64().unwrap_or(0) > 0 && saved["sha256"].as_str().is_some_and(|s| s.len() == 64),
        "{saved}"
    );
    let moved = c.berth_json(&["cluster", "transfer-leader"])?;
    assert!(moved["leader"].as_u64().unwrap_or(0) > 0, "{moved}");
    Ok(())
}

// 1. start 3 masters; 2. kill -9 both followers; 3. a write to the lone leader fails with an error
// that says why (no quorum) instead of hanging; 4. restart one follower: writes work again and the
// earlier, unacknowledged write may or may not be there, but an acknowledged one is.
#[test]
fn write_without_quorum_fails_clearly_and_recovers() -> Result<()> {
    let mut c = Cluster::start(3, &[])?;
    assert!(c.put("q/before", "1"));
    let leader = c.wait_leader(Duration::from_secs(10))?;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for f in &followers {
        c.kill9(*f);
    }
    let out = c.berth_at(&c.masters[&leader].endpoint, &["kv", "put", "q/lost", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("majority of masters"), "{err}");
    c.spawn(followers[0], &[])?;
    wait_for(Duration::from_secs(30), "writes to work again", || c.put("q/after", "2").then_some(()))?;
    let got = c.get_prefix("q/")?;
    assert_eq!(got["q/before"], "1");
    assert_eq!(got["q/after"], "2");
    Ok(())
}

// Regression (found by the chaos suite's fsync-eio fault): a master whose fsync fails must stop
// for good and exit non-zero, not linger answering errors; restarted normally, it rejoins with
// every acknowledged write.
#[test]
fn a_master_whose_fsync_fails_exits_and_recovers_on_restart() -> Result<()> {
    if std::process::Command::new("strace").arg("-V").output().is_err() {
        eprintln!("strace is not installed (deploy/chaos-prereqs.sh installs it): skipped");
        return Ok(());
    }
    let mut c = Cluster::start(3, &[])?;
    let leader = c.wait_leader(Duration::from_secs(30))?;
    let victim = *c.masters.keys().find(|id| **id != leader).expect("a follower");
    c.kill9(victim);
    let m = &c.masters[&victim];
    let log = std::fs::OpenOptions::new().append(true).open(m.data_dir.join("master.log"))?;
    let child = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync,fdatasync"])
        .args(["-e", "inject=fsync,fdatasync:error=EIO:when=100+"])
        .arg(berth_tests::berth_bin())
        .arg("master")
        .arg("--data-dir")
        .arg(&m.data_dir)
        .arg("--listen")
        .arg(&m.endpoint)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    c.masters.get_mut(&victim).expect("victim").child = Some(child);
    // Writes reach the victim's log; once it has started, its syncs fail.
    let mut acked = Vec::new();
    let status = wait_for(Duration::from_secs(60), "the master with failing fsync to exit", || {
        let k = format!("eio/{:04}", acked.len());
        if c.put(&k, "v") {
            acked.push(k);
        }
        let child = c.masters.get_mut(&victim)?.child.as_mut()?;
        child.try_wait().ok().flatten()
    })?;
    assert!(!status.success(), "a master whose fsync failed must exit non-zero, got {status}");
    assert!(c.log_of(victim).contains("raft stopped on a fatal error"), "the log says why it exited");
    c.masters.get_mut(&victim).expect("victim").child = None;
    c.spawn(victim, &[])?;
    for k in ["eio/after-1", "eio/after-2"] {
        assert!(c.put(k, "v"));
        acked.push(k.to_string());
    }
    let endpoint = c.masters[&victim].endpoint.clone();
    wait_for(Duration::from_secs(30), "the restarted master to serve every acknowledged write", || {
        let out = c.berth_at(&endpoint, &["kv", "get", "eio/", "--prefix", "--serializable", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let n = v["kvs"].as_array()?.len();
        (n == acked.len()).then_some(())
    })?;
    Ok(())
}

/// `berth` at one master with the credentials `cert`/`key` (and the cluster's CA).
fn berth_as(c: &Cluster, endpoint: &str, cert: &Path, key: &Path, args: &[&str]) -> std::process::Output {
    Command::new(berth_tests::berth_bin())
        .args(args)
        .args(["--endpoints", endpoint])
        .env("BERTH_CA_CERT", c.pki_dir().join("ca.crt"))
        .env("BERTH_CERT", cert)
        .env("BERTH_KEY", key)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running the berth CLI")
}

// A second admin, revoked by identity, is refused by every master within a second of the
// revocation (on connections made before it too, and new ones); one revoked by serial likewise;
// an admin may not revoke itself; the revocations are listed.
#[test]
fn revoked_certificates_are_refused_on_every_master_within_a_second() -> Result<()> {
    use berth_pki::rustls_pki_types::{CertificateDer, pem::PemObject};
    let c = Cluster::start(3, &[])?;
    c.wait_leader(Duration::from_secs(10))?;
    let pki = c.pki_dir();
    let ca = berth_pki::CertificateAuthority::from_pem(
        &std::fs::read_to_string(pki.join("ca.crt"))?,
        &std::fs::read_to_string(pki.join("ca.key"))?,
    )?;
    let issue = |name: &str| -> Result<(std::path::PathBuf, std::path::PathBuf, String)> {
        let k = ca.issue(&berth_pki::Identity::admin(name), &[], &[], Duration::from_secs(3600))?;
        let (cert, key) = (c.dir.path().join(format!("{name}.crt")), c.dir.path().join(format!("{name}.key")));
        std::fs::write(&cert, &k.cert_pem)?;
        std::fs::write(&key, &k.key_pem)?;
        let der = CertificateDer::from_pem_slice(k.cert_pem.as_bytes())?;
        Ok((cert, key, berth_pki::cert_info_of_der(der.as_ref())?.serial))
    };
    let out = c.berth(&["kv", "put", "x", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let endpoints: Vec<String> = c.masters.values().map(|m| m.endpoint.clone()).collect();
    let works = |cert: &Path, key: &Path, ep: &str| {
        let out = berth_as(&c, ep, cert, key, &["kv", "get", "x"]);
        if !out.status.success() {
            eprintln!("kv get at {ep} with {}: {}", cert.display(), String::from_utf8_lossy(&out.stderr));
        }
        out.status.success()
    };
    let (alice_crt, alice_key, _) = issue("alice")?;
    let (bob_crt, bob_key, bob_serial) = issue("bob")?;
    for ep in &endpoints {
        assert!(works(&alice_crt, &alice_key, ep) && works(&bob_crt, &bob_key, ep), "a new admin works at {ep}");
    }
    // Revoking yourself is refused.
    let out = berth_as(&c, &endpoints[0], &alice_crt, &alice_key, &["cert", "revoke", "admin/alice"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("lock you out"));

    for (what, cert, key) in [("admin/alice", &alice_crt, &alice_key), (bob_serial.as_str(), &bob_crt, &bob_key)] {
        let out = c.berth(&["cert", "revoke", what, "--reason", "left the team"]);
        assert!(out.status.success(), "revoke {what}: {}", String::from_utf8_lossy(&out.stderr));
        let revoked = std::time::Instant::now();
        // Every master is asked at once, so the figure is the slowest master's, not the sum of
        // one CLI run after another.
        let c = &c;
        let took = std::thread::scope(|s| -> Result<Duration> {
            let askers: Vec<_> = endpoints
                .iter()
                .map(|ep| {
                    s.spawn(move || -> Result<Duration> {
                        let refused = wait_for(Duration::from_secs(5), &format!("{what} refused at {ep}"), || {
                            let out = berth_as(c, ep, cert, key, &["kv", "get", "x"]);
                            let err = String::from_utf8_lossy(&out.stderr).into_owned();
                            (!out.status.success()).then_some(err)
                        })?;
                        assert!(refused.contains("revoked"), "{refused}");
                        Ok(revoked.elapsed())
                    })
                })
                .collect();
            let mut slowest = Duration::ZERO;
            for a in askers {
                slowest = slowest.max(a.join().expect("an asking thread")?);
            }
            Ok(slowest)
        })?;
        eprintln!(
            "{what}: refused by all {} masters {:.0} ms after the revocation",
            endpoints.len(),
            took.as_secs_f64() * 1000.0
        );
        assert!(took < Duration::from_secs(1), "{what} was still accepted {took:?} after its revocation");
    }
    let list = c.berth_json(&["cert", "revoked"])?;
    let text = list.to_string();
    assert!(text.contains("identity admin/alice") && text.contains(&format!("serial {bob_serial}")), "{text}");
    assert!(text.contains("left the team") && text.contains("admin/admin"), "{text}");
    // The admin itself still works.
    assert!(c.berth(&["kv", "get", "x"]).status.success());
    Ok(())
}
