//! One run: start a cluster, start the workloads, let the nemesis loose for the duration, heal,
//! and check everything that was recorded.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use tonic::transport::Channel;

use crate::{
    checks::{self, Check},
    churn::ServiceChurn,
    cluster::{Cluster, Options},
    history::{self, Kind},
    linearizable,
    nemesis::{Fault, Nemesis},
    net, orphans, overlay, services,
    services::ServiceWorkload,
    workload::{self, KvShared, Recorder},
};

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub faults: &'static [Fault],
}

use Fault::*;

pub const SCENARIOS: &[Scenario] = &[
    Scenario { name: "steady", about: "no faults: steady load; checks that the leader never changes", faults: &[] },
    Scenario { name: "kill-leader", about: "kill -9 of the leader, restarted after a while", faults: &[KillLeader] },
    Scenario { name: "kill-random", about: "kill -9 of a random master", faults: &[KillRandom] },
    Scenario { name: "kill-minority", about: "kill -9 of a minority of the masters at once", faults: &[KillMinority] },
    Scenario {
        name: "pause-leader",
        about: "SIGSTOP of the leader for longer than the election timeout (a GC pause), then SIGCONT",
        faults: &[PauseLeader],
    },
    Scenario { name: "restart", about: "graceful restarts (SIGTERM) of random masters", faults: &[Restart] },
    Scenario {
        name: "partition-leader",
        about: "the leader cut off from the other masters (nftables, root)",
        faults: &[PartitionLeader],
    },
    Scenario {
        name: "partition-halves",
        about: "a clean majority/minority split of the masters (root)",
        faults: &[PartitionHalves],
    },
    Scenario {
        name: "partition-bridge",
        about: "two sides that cannot see each other and one master that sees both (root)",
        faults: &[PartitionBridge],
    },
    Scenario {
        name: "one-way",
        about: "packets from one master to another lost, the other way delivered (root)",
        faults: &[OneWay],
    },
    Scenario { name: "packet-drop", about: "10-40% random packet loss at every master (root)", faults: &[PacketDrop] },
    Scenario {
        name: "agent-cutoff",
        about: "a real agent cut off from every master, sometimes past the node-down grace (root)",
        faults: &[AgentCutoff],
    },
    Scenario {
        name: "disk-full",
        about: "a master's data dir (tmpfs) filled up, then freed (root)",
        faults: &[DiskFull],
    },
    Scenario {
        name: "fsync-eio",
        about: "a master whose fsync/fdatasync fail with EIO (strace fault injection)",
        faults: &[FsyncEio],
    },
    Scenario { name: "clock-skew", about: "a master's wall clock off by minutes (libfaketime)", faults: &[ClockSkew] },
    Scenario {
        name: "membership",
        about: "a follower removed and a new master added while the load runs",
        faults: &[Membership],
    },
    Scenario {
        name: "churn",
        about: "services created, scaled, updated and deleted under leader kills; agents killed while stopping tasks",
        faults: &[KillLeader],
    },
    Scenario {
        name: "networks",
        about: "a VIP client on every agent while web tasks are killed, agents cut off and leaders killed (root)",
        faults: &[KillTask, AgentCutoff, KillLeader],
    },
    Scenario {
        name: "mixed",
        about: "every fault above, drawn at random (not churn's agent kills)",
        faults: &Fault::ALL,
    },
];

/// The scenario whose services run on an overlay network.
const NETWORKS: &str = "networks";

/// The churn scenario: a leader is killed after this share of its workload's steps (the other
/// scenarios inject a fault after every step).
const CHURN_FAULT_CHANCE: f64 = 0.4;

pub fn scenario(name: &str) -> Result<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name).with_context(|| {
        format!(
            "no scenario {name:?}; `berth-chaos list` shows them: {}",
            SCENARIOS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        )
    })
}

#[derive(Clone, Debug)]
pub struct RunArgs {
    pub scenario: String,
    pub seed: u64,
    pub duration: Duration,
    pub masters: u64,
    pub out: PathBuf,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct OpCounts {
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub scenario: String,
    pub seed: u64,
    pub masters: u64,
    pub duration_s: f64,
    /// Whether masters ran in network namespaces (root).
    pub namespaces: bool,
    pub faults_total: usize,
    pub faults: BTreeMap<String, usize>,
    pub kv_ops: OpCounts,
    pub set_writes: OpCounts,
    pub watch_events: usize,
    pub checks: Vec<Check>,
    pub failover_ms: Vec<f64>,
    pub failover_p50_ms: f64,
    pub failover_p99_ms: f64,
    pub failover_max_ms: f64,
    pub leader_changes: u64,
    pub convergence_ms: Option<f64>,
    pub passed: bool,
    pub dir: PathBuf,
    /// Faults this scenario could not inject here (no root), if any.
    pub skipped_faults: Vec<String>,
}

fn counts(kinds: impl Iterator<Item = Kind>) -> OpCounts {
    let mut c = OpCounts::default();
    for k in kinds {
        match k {
            Kind::Ok => c.ok += 1,
            Kind::Fail => c.fail += 1,
            _ => c.info += 1,
        }
    }
    c
}

/// How long after the faults heal the actual state must match the desired state.
pub const CONVERGENCE_BOUND: Duration = Duration::from_secs(60);
/// Simulated agents per run, and the tasks placed on them.
const SIMULATED: usize = 20;
const FLEET_TASKS: u32 = 40;
const KV_CLIENTS: u64 = 5;
const KEYS: usize = 5;

pub async fn run(args: &RunArgs) -> Result<RunReport> {
    let sc = scenario(&args.scenario)?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let dir = args.out.join(format!("{}-seed{}-{stamp}", sc.name, args.seed));
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    let use_net = match net::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("berth-chaos: {why}: masters run on loopback, and only process-level faults are injected");
            false
        }
    };
    if sc.name == NETWORKS && !use_net {
        anyhow::bail!(
            "the networks scenario needs root (agents in network namespaces attach tasks to the overlay); run it as root"
        );
    }
    let faults: Vec<Fault> = sc.faults.iter().copied().filter(|f| use_net || !f.needs_net()).collect();
    let skipped: Vec<String> =
        sc.faults.iter().filter(|f| !use_net && f.needs_net()).map(|f| f.name().to_string()).collect();
    let mut rng = StdRng::seed_from_u64(args.seed);
    eprintln!("berth-chaos: {} seed {} for {:?}; output in {}", sc.name, args.seed, args.duration, dir.display());

    let opts = Options {
        masters: args.masters,
        agents: 3,
        simulated: SIMULATED,
        // The masters' default: the checks hold berth to what it ships with.
        node_down_grace: Duration::from_secs(10),
        // Networks only in their own scenario: the others keep the host-network tasks whose
        // recorded seeds they replay.
        master_args: if sc.name == NETWORKS { overlay::POOLS.map(String::from).to_vec() } else { Vec::new() },
    };
    let mut cluster = Cluster::start(&dir.join("cluster"), opts, use_net, args.seed).await?;
    let result = drive(&mut cluster, sc, &faults, args, &mut rng, &dir).await;
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            cluster.preserve();
            return Err(e.context(format!(
                "the run could not complete; its logs and data are in {} (replay: --scenario {} --seed {})",
                dir.display(),
                sc.name,
                args.seed
            )));
        }
    };
    report.skipped_faults = skipped;
    report.namespaces = use_net;
    if !report.passed {
        cluster.preserve();
    }
    drop(cluster);
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    if report.passed {
        // Keep the report, the history and the logs; the data dirs are what is large.
        for entry in std::fs::read_dir(dir.join("cluster"))?.flatten() {
            let p = entry.path();
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
    Ok(report)
}

async fn drive(
    c: &mut Cluster,
    sc: &Scenario,
    faults: &[Fault],
    args: &RunArgs,
    rng: &mut StdRng,
    dir: &Path,
) -> Result<RunReport> {
    // Services first, and wait until they run: that is the steady state the checks start from.
    // With networks every service joins the default network, which the simulated agents do not
    // attach: no fleet on them then.
    let networks = sc.name == NETWORKS;
    let mut svc = ServiceWorkload::new(dir, if networks { 0 } else { FLEET_TASKS });
    svc.setup(c).await?;
    let mut vip = networks.then(|| overlay::VipWorkload::new(dir));
    if let Some(v) = &vip {
        v.setup(c).await?;
    }
    converge(c, &svc, Duration::from_secs(90)).await.context("the services never started")?;
    if let Some(v) = &vip {
        v.ready(c, Duration::from_secs(60)).await?;
    }
    let ready_ns = services::unix_ns();

    let start = Instant::now();
    let chans: Vec<_> = c.endpoints().iter().map(|e| c.channel(e)).collect::<Result<_>>()?;
    let (_, rev0) = workload::read_prefix(&chans, workload::PREFIX).await?;
    let rec = Recorder::new(&dir.join("history.jsonl"), start)?;
    let shared = Arc::new(KvShared {
        channels: chans.clone(),
        keys: KEYS,
        values: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        rec: rec.clone(),
    });
    let clients: Vec<_> =
        (0..KV_CLIENTS).map(|i| tokio::spawn(workload::kv_client(shared.clone(), i, KV_CLIENTS, args.seed))).collect();
    let stop_set = Arc::new(AtomicBool::new(false));
    let set_task = tokio::spawn(workload::set_writer(chans.clone(), stop_set.clone()));
    let stop_watch = Arc::new(AtomicBool::new(false));
    let until = Arc::new(AtomicU64::new(0));
    let watch_task = tokio::spawn(workload::watcher(
        chans.clone(),
        rev0 + 1,
        stop_watch.clone(),
        until.clone(),
        dir.join("watch.jsonl"),
    ));
    let (_, term0) = c.wait_leader(Duration::from_secs(30)).await?;

    let mut nemesis = Nemesis::new(StdRng::seed_from_u64(rng.random()), start, &dir.join("faults.jsonl"));
    let mut churn = (sc.name == "churn").then(|| ServiceChurn::new(dir, start));
    let mut step = 0u64;
    while start.elapsed() < args.duration {
        let gap = Duration::from_millis(nemesis.rng.random_range(300..1500));
        tokio::time::sleep(gap).await;
        if nemesis.rng.random_bool(0.3) {
            step += 1;
            svc.change(c, step).await?;
        }
        if let Some(ch) = churn.as_mut() {
            ch.step(c, &mut nemesis).await?;
            if !nemesis.rng.random_bool(CHURN_FAULT_CHANCE) {
                continue;
            }
        }
        if faults.is_empty() || start.elapsed() >= args.duration {
            continue;
        }
        let fault = faults[nemesis.rng.random_range(0..faults.len())];
        if let (Fault::KillTask, Some(v)) = (fault, vip.as_mut()) {
            if let Some(what) = v.kill_web_task(c, &mut nemesis.rng).await? {
                nemesis.record_now(fault, what);
            }
            continue;
        }
        nemesis.inject(c, fault).await.with_context(|| format!("injecting {}", fault.name()))?;
        // The next fault waits for a leader, as an operator's next action would.
        c.wait_leader(Duration::from_secs(30)).await.context("no leader after healing a fault")?;
    }
    let fault_phase = start.elapsed();
    nemesis.heal_everything(c).await?;
    let (_, term1) = c.wait_leader(Duration::from_secs(60)).await?;

    shared.stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await?;
    }
    stop_set.store(true, Ordering::Relaxed);
    let set_attempts = set_task.await?;
    rec.flush();

    // The final, authoritative state, read linearizably once everything healed.
    let chans: Vec<_> = c.endpoints().iter().map(|e| c.channel(e)).collect::<Result<_>>()?;
    let (set_now, _) = workload::read_prefix(&chans, workload::SET_PREFIX).await?;
    // A last write under the watched prefix: its revision is where both watch streams must get to
    // (the store's revision may belong to a key outside the prefix, which no watch would show).
    let final_rev = workload::sentinel(&chans).await?;
    until.store(final_rev as u64, Ordering::Relaxed);
    stop_watch.store(true, Ordering::Relaxed);
    let live = tokio::time::timeout(Duration::from_secs(60), watch_task)
        .await
        .context("the watcher did not catch up with the final revision within 60 s")??;
    let truth = tokio::time::timeout(
        Duration::from_secs(60),
        workload::watcher(
            chans.clone(),
            rev0 + 1,
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicU64::new(final_rev as u64)),
            dir.join("watch-history.jsonl"),
        ),
    )
    .await
    .context("reading the watch history back did not finish within 60 s")?;

    let agree = compare_replicas(c, &chans, final_rev).await;

    let healed = Instant::now();
    let converged = converge(c, &svc, CONVERGENCE_BOUND).await;
    let convergence_ms = converged.as_ref().ok().map(|_| healed.elapsed().as_secs_f64() * 1000.0);
    let end_ns = services::unix_ns();
    let mut no_orphans = orphans::check(c, healed + CONVERGENCE_BOUND).await;
    if let Some(ch) = &churn {
        no_orphans.detail = format!("{}\n{}", ch.summary(), no_orphans.detail);
    }
    let vip_checks = match &vip {
        Some(v) => overlay::checks(c, v).await,
        None => Vec::new(),
    };

    // Checks.
    let mut checks = Vec::new();
    let events = rec.events.lock().expect("history").clone();
    let ops = history::pair(&events);
    let lin = linearizable::check_all(&ops, Duration::from_secs(30));
    let bad: Vec<String> = lin
        .iter()
        .filter(|r| !matches!(r.verdict, linearizable::Verdict::Linearizable))
        .map(|r| format!("{}: {:?}", r.key, r.verdict))
        .collect();
    checks.push(Check::new(
        "linearizable",
        bad.is_empty(),
        if bad.is_empty() {
            format!(
                "{} keys, {} operations ({} checked after dropping failed ones and unknown reads), every key \
                 linearizable (slowest check {:?})",
                lin.len(),
                ops.len(),
                lin.iter().map(|r| r.ops).sum::<usize>(),
                lin.iter().map(|r| r.elapsed).max().unwrap_or_default()
            )
        } else {
            bad.join("\n")
        },
    ));
    let present: BTreeSet<u64> =
        set_now.keys().filter_map(|k| k.strip_prefix(workload::SET_PREFIX)?.parse().ok()).collect();
    checks.push(checks::lost_set_writes(&set_attempts, &present));
    let truth_events: Vec<_> =
        truth.events.iter().filter(|e| !e.key.starts_with(workload::SET_PREFIX)).cloned().collect();
    let live_events: Vec<_> =
        live.events.iter().filter(|e| !e.key.starts_with(workload::SET_PREFIX)).cloned().collect();
    let acked = rec.acked.lock().expect("acked").clone();
    checks.push(checks::acked_in_history(&acked, &truth.events));
    checks.push(checks::watch(&live_events, &truth_events, live.resumes, &live.errors));
    checks.push(agree);

    let runs = services::runs(&svc.hb);
    let doubles = services::double_runs(&runs, services::FENCED);
    checks.push(Check::new(
        "at-most-once",
        doubles.is_empty(),
        if doubles.is_empty() {
            format!(
                "{} runs of the at-most-once service, never two at once",
                runs.values().filter(|r| r.service == services::FENCED).count()
            )
        } else {
            format!("overlapping runs (slot, task, task, ms): {doubles:?}")
        },
    ));
    let agent_faults = nemesis.log.iter().any(|f| f.fault.touches_agents());
    if !agent_faults {
        let margin = 3 * services::HEARTBEAT.as_nanos();
        let moved: Vec<String> = runs
            .iter()
            .filter(|(_, r)| r.service == services::STEADY)
            .filter(|(_, r)| r.first_ns > ready_ns || r.last_ns + margin < end_ns)
            .map(|(id, r)| format!("{id} (slot {}, {} beats)", r.slot, r.beats))
            .collect();
        checks.push(Check::new(
            "no-restarts-on-failover",
            moved.is_empty(),
            if moved.is_empty() {
                "the steady service's tasks ran from start to end, never restarted or moved".to_string()
            } else {
                format!("tasks started or stopped during master faults: {}", moved.join(", "))
            },
        ));
    }
    checks.push(Check::new(
        "converges",
        converged.is_ok(),
        match (&converged, convergence_ms) {
            (Ok(()), Some(ms)) => {
                format!("desired state reached {ms:.0} ms after healing (bound {CONVERGENCE_BOUND:?})")
            }
            (Err(e), _) => format!("{e:#}"),
            _ => String::new(),
        },
    ));
    checks.push(no_orphans);
    checks.extend(vip_checks);
    let allowed = svc.allowed_final();
    let final_spec = services::churn_spec(c).await;
    checks.push(Check::new(
        "spec-changes-kept",
        final_spec.as_ref().is_ok_and(|s| allowed.contains(s)),
        format!(
            "{} changes ({} acknowledged); stored (replicas, generation) {:?}, allowed {:?}",
            svc.changes.len(),
            svc.changes.iter().filter(|c| c.acked == Some(true)).count(),
            final_spec.as_ref().map_err(|e| e.to_string()),
            allowed
        ),
    ));
    let failover: Vec<f64> = nemesis.log.iter().filter_map(|f| f.failover_ms).collect();
    let unrecovered = nemesis.log.iter().filter(|f| f.fault.is_failover() && f.failover_ms.is_none()).count();
    if nemesis.log.iter().any(|f| f.fault.is_failover()) {
        checks.push(Check::new(
            "failover-recovers",
            unrecovered == 0,
            format!(
                "{} leader faults, {unrecovered} without a committed write within 30 s",
                failover.len() + unrecovered
            ),
        ));
    }
    let leader_changes = term1.saturating_sub(term0);
    if faults.is_empty() {
        checks.push(Check::new(
            "stable-leader",
            leader_changes == 0,
            format!("{leader_changes} elections during {:.0} s of steady load", fault_phase.as_secs_f64()),
        ));
    }

    let mut sorted = failover.clone();
    sorted.sort_by(f64::total_cmp);
    let mut by_fault = BTreeMap::new();
    for f in &nemesis.log {
        *by_fault.entry(f.fault.name().to_string()).or_default() += 1;
    }
    let passed = checks.iter().all(|c| c.passed);
    Ok(RunReport {
        scenario: sc.name.into(),
        seed: args.seed,
        masters: args.masters,
        duration_s: fault_phase.as_secs_f64(),
        namespaces: false,
        faults_total: nemesis.log.len(),
        faults: by_fault,
        kv_ops: counts(ops.iter().map(|o| o.outcome)),
        set_writes: counts(set_attempts.iter().map(|(_, k)| *k)),
        watch_events: live.events.len(),
        checks,
        failover_p50_ms: checks::quantile(&sorted, 0.5),
        failover_p99_ms: checks::quantile(&sorted, 0.99),
        failover_max_ms: sorted.last().copied().unwrap_or(0.0),
        failover_ms: failover,
        leader_changes,
        convergence_ms,
        passed,
        dir: dir.to_path_buf(),
        skipped_faults: Vec::new(),
    })
}

/// Compares every master's own key space at one revision (see `checks::replicas_agree`). A master
/// that installed a snapshot past that revision can no longer read it: then a new sentinel write
/// gives a later revision to compare at (three tries).
async fn compare_replicas(c: &Cluster, chans: &[Channel], mut at: i64) -> Check {
    for attempt in 0..3 {
        let mut reads = Vec::new();
        let mut compacted = false;
        for (id, m) in &c.masters {
            let read = match c.channel(&m.endpoint) {
                Ok(ch) => workload::replica_keyspace(&ch, at, Duration::from_secs(30)).await,
                Err(e) => Err(e),
            };
            reads.push((
                *id,
                match read {
                    Ok(workload::ReplicaRead::Read(ks)) => Ok(ks),
                    Ok(workload::ReplicaRead::Compacted) => {
                        compacted = true;
                        Err(format!("revision {at} is compacted there"))
                    }
                    Err(e) => Err(format!("{e:#}")),
                },
            ));
        }
        if !compacted || attempt == 2 {
            return checks::replicas_agree(at, &reads);
        }
        match workload::sentinel(chans).await {
            Ok(rev) => at = rev,
            Err(e) => return Check::new("replicas-agree", false, format!("{e:#}")),
        }
    }
    unreachable!("the last attempt returns")
}

/// Waits until every service runs as desired: berth reports the desired number of running tasks,
/// each of them is heart-beating, and no other task of the service is.
async fn converge(c: &Cluster, svc: &ServiceWorkload, bound: Duration) -> Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        let why = match converged(c, svc).await {
            Ok(()) => return Ok(()),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            anyhow::bail!("not converged within {bound:?}: {why}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn converged(c: &Cluster, svc: &ServiceWorkload) -> Result<()> {
    let (churn, _) = services::churn_spec(c).await?;
    let running = services::running_tasks(c).await?;
    let runs = services::runs(&svc.hb);
    let now = services::unix_ns();
    let fresh = 5 * services::HEARTBEAT.as_nanos();
    for (name, want) in [(services::STEADY, 3usize), (services::FENCED, 1), (services::CHURN, churn as usize)] {
        let reported = running.get(name).map_or(0, Vec::len);
        let beating: Vec<&String> =
            runs.iter().filter(|(_, r)| r.service == name && r.last_ns + fresh > now).map(|(id, _)| id).collect();
        if reported != want || beating.len() != want {
            anyhow::bail!("{name}: want {want}, berth reports {reported} running, {} heart-beating", beating.len());
        }
        if let Some(ids) = running.get(name)
            && let Some(stray) = beating.iter().find(|b| !ids.contains(b))
        {
            anyhow::bail!("{name}: task {stray} runs but berth does not report it running");
        }
    }
    if svc.fleet > 0 {
        let fleet = running.get(services::FLEET).map_or(0, Vec::len);
        if fleet != svc.fleet as usize {
            anyhow::bail!("fleet: want {}, berth reports {fleet} running", svc.fleet);
        }
    }
    Ok(())
}

/// The per-run table.
pub fn table(reports: &[RunReport]) -> String {
    let mut out = String::new();
    out += &format!(
        "{:<17} {:>5} {:>6} {:>20} {:>8} {:>7} {:>23}  {}\n",
        "scenario", "seed", "faults", "kv ok/fail/unknown", "set ok", "checks", "failover p50/p99/max", "failed checks"
    );
    for r in reports {
        let failed: Vec<&str> = r.checks.iter().filter(|c| !c.passed).map(|c| c.name.as_str()).collect();
        let fo = if r.failover_ms.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}/{:.0}/{:.0} ms", r.failover_p50_ms, r.failover_p99_ms, r.failover_max_ms)
        };
        out += &format!(
            "{:<17} {:>5} {:>6} {:>20} {:>8} {:>7} {:>23}  {}\n",
            r.scenario,
            r.seed,
            r.faults_total,
            format!("{}/{}/{}", r.kv_ops.ok, r.kv_ops.fail, r.kv_ops.info),
            r.set_writes.ok,
            format!("{}/{}", r.checks.iter().filter(|c| c.passed).count(), r.checks.len()),
            fo,
            if failed.is_empty() { "-".to_string() } else { failed.join(",") }
        );
    }
    out
}
