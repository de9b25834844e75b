//! Clients that go around a frozen or dead master (issue 15), with real `berth master` processes
//! and the real `berth` CLI.
//!
//! `writes_go_around_a_frozen_leader`:
//! 1. start 3 masters, `berth apply` a service (no agents: a scale is accepted without them);
//! 2. SIGSTOP the leader (a guard sends SIGCONT whatever happens);
//! 3. at once run `berth kv put` and `berth scale web=3`, both with the frozen leader first in
//!    their endpoint list; each must succeed within 2 s (the other two masters elect a new leader
//!    in under a second; the CLI gives up on the frozen master's TLS handshake after 500 ms, and
//!    the follower it reaches holds the write until it hears from a leader);
//! 4. SIGCONT: one leader, every master answers, the put reads back, the service has 3 replicas.
//!
//! `an_idempotent_call_survives_its_master_being_killed`:
//! 1. start 3 masters, write a key;
//! 2. SIGSTOP the leader and one follower: the other follower has no quorum, so it holds a
//!    linearizable read until it hears from a leader;
//! 3. run `berth kv get` against that follower first; wait until its log says it holds a request;
//! 4. kill -9 it, SIGCONT the two others;
//! 5. the CLI sees its connection break after the request left, sends the read (idempotent)
//!    again to another master, and prints the value; its stderr says it sent it again.

use std::{
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use berth_tests::{Cluster, admin_env, berth_bin, signal, wait_for};

/// The tests measure times on a 2-core machine: one cluster at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const LONG: Duration = Duration::from_secs(30);
/// What a client may lose to a frozen leader, at most.
const BOUND: Duration = Duration::from_secs(2);

/// Sends SIGCONT to a SIGSTOPped master when dropped, so that a failing test leaves nothing
/// stopped (the cluster's own guard then kills it).
struct Stopped {
    pid: i64,
}

impl Stopped {
    fn new(pid: u32) -> Result<Stopped> {
        let pid = i64::from(pid);
        if !signal(pid, "STOP") {
            bail!("kill -STOP {pid} failed");
        }
        Ok(Stopped { pid })
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.pid, "CONT");
    }
}

/// The endpoints of `first` and then of every other running master.
fn endpoints_from(c: &Cluster, first: u64) -> String {
    let mut eps = vec![c.masters[&first].endpoint.clone()];
    eps.extend(c.masters.values().filter(|m| m.id != first && m.child.is_some()).map(|m| m.endpoint.clone()));
    eps.join(",")
}

fn run_timed(c: &Cluster, endpoints: &str, args: &[&str]) -> (std::process::Output, Duration) {
    let t = Instant::now();
    let out = c.berth_at(endpoints, args);
    (out, t.elapsed())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// The cluster answers through every master: one leader, three members, none in error.
fn healthy(c: &Cluster) -> Result<()> {
    wait_for(LONG, "every master to answer with one leader", || {
        let v = c.berth_json(&["cluster", "status"]).ok()?;
        let members = v["members"].as_array()?;
        let ok = v["leader"].as_u64().unwrap_or(0) != 0
            && members.len() == 3
            && members.iter().all(|m| m["error"].as_str().unwrap_or("").is_empty());
        ok.then_some(())
    })
}

#[test]
fn writes_go_around_a_frozen_leader() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3, &[])?;
    let spec = c.dir.path().join("web.yaml");
    std::fs::write(
        &spec,
        "kind: Service\nmetadata: {name: web}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    \
         command: [/bin/sleep, '1000']\n",
    )?;
    let out = c.berth(&["apply", "-f", spec.to_str().unwrap()]);
    if !out.status.success() {
        bail!("apply: {}", text(&out.stderr));
    }
    let leader = c.wait_leader(LONG)?;
    let eps = endpoints_from(&c, leader);
    let pid = c.masters[&leader].pid().context("the leader's pid")?;

    let frozen = Stopped::new(pid)?;
    let ((put, put_took), (scale, scale_took)) = std::thread::scope(|s| {
        let put = s.spawn(|| run_timed(&c, &eps, &["kv", "put", "frozen-leader", "written"]));
        let scale = s.spawn(|| run_timed(&c, &eps, &["scale", "web=3"]));
        (put.join().expect("put thread"), scale.join().expect("scale thread"))
    });
    println!("leader {leader} frozen: kv put took {put_took:?}, scale took {scale_took:?}");
    println!("kv put stderr: {}", text(&put.stderr));
    println!("scale stderr: {}", text(&scale.stderr));
    assert!(put.status.success(), "kv put failed while the leader was frozen: {}", text(&put.stderr));
    assert!(scale.status.success(), "scale failed while the leader was frozen: {}", text(&scale.stderr));
    assert!(put_took < BOUND, "kv put took {put_took:?} with the leader frozen (bound {BOUND:?})");
    assert!(scale_took < BOUND, "scale took {scale_took:?} with the leader frozen (bound {BOUND:?})");
    drop(frozen);

    healthy(&c)?;
    let v = c.berth_json(&["kv", "get", "frozen-leader"])?;
    assert_eq!(v["kvs"][0]["value"], "written", "{v}");
    let svcs = c.berth_json(&["get", "services"])?;
    assert_eq!(svcs[0]["desired"], 3, "{svcs}");
    // The resumed master serves too: a linearizable read through it alone.
    let through_old = c.berth_at(&c.masters[&leader].endpoint, &["kv", "get", "frozen-leader"]);
    assert!(through_old.status.success(), "{}", text(&through_old.stderr));
    Ok(())
}

#[test]
fn an_idempotent_call_survives_its_master_being_killed() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start(3, &[])?;
    assert!(c.put("k", "v1"), "the first write");
    let leader = c.wait_leader(LONG)?;
    let mut followers = c.masters.keys().copied().filter(|id| *id != leader);
    let (holder, other) = (followers.next().unwrap(), followers.next().unwrap());
    let eps = endpoints_from(&c, holder);
    let log_lines = |id| c.log_of(id).matches("holding client requests").count();
    let before = log_lines(holder);

    let stopped_leader = Stopped::new(c.masters[&leader].pid().context("leader pid")?)?;
    let stopped_other = Stopped::new(c.masters[&other].pid().context("follower pid")?)?;
    let cli = Command::new(berth_bin())
        .args(["kv", "get", "k", "-o", "json", "--endpoints", &eps])
        .envs(admin_env(&c.pki_dir()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Killed on the way out whatever happens.
    struct Reaped(Option<std::process::Child>);
    impl Drop for Reaped {
        fn drop(&mut self) {
            if let Some(mut ch) = self.0.take() {
                let _ = ch.kill();
                let _ = ch.wait();
            }
        }
    }
    let mut cli = Reaped(Some(cli));
    // The follower holds the read (no quorum, no leader heard from): it is in flight there.
    wait_for(LONG, "the follower to hold the read", || (log_lines(holder) > before).then_some(()))?;
    c.kill9(holder);
    drop(stopped_leader);
    drop(stopped_other);

    let child = cli.0.take().expect("the CLI");
    let started = Instant::now();
    let out = child.wait_with_output()?;
    println!("kv get finished {:?} after the kill; stderr: {}", started.elapsed(), text(&out.stderr));
    assert!(out.status.success(), "kv get failed: {}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["kvs"][0]["value"], "v1", "{v}");
    assert!(
        text(&out.stderr).contains("sending the request again (it is idempotent)"),
        "the read was not sent again after its master died: {}",
        text(&out.stderr)
    );
    Ok(())
}
