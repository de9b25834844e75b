//! `berth-chaos`: fault injection against real berth clusters, with checkers that prove nothing
//! was lost. See chaos/README.md.

mod checks;
mod churn;
mod cluster;
mod etcd;
mod failover;
mod history;
mod linearizable;
mod nemesis;
mod net;
mod orphans;
mod overlay;
mod run;
mod services;
mod workload;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::run::{RunArgs, RunReport};

#[derive(Parser)]
#[command(name = "berth-chaos", version, about = "Fault injection against real berth clusters")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One scenario with one seed; the same seed replays the same fault schedule.
    Run {
        #[arg(long)]
        scenario: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        duration: Duration,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=7))]
        masters: u64,
        #[arg(long, default_value = "chaos-out")]
        out: PathBuf,
    },
    /// A set of runs: --quick for CI (about 5 minutes), --full for every scenario with several
    /// seeds (about 16 minutes a round on 2 cores; 5 rounds inject about 1,000 faults).
    Suite {
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        #[arg(long)]
        full: bool,
        /// With --full: how many rounds; round K runs every scenario with seed K, and the random
        /// mix twice (seed 2K-1 on 3 masters, seed 2K on 5).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
        rounds: u64,
        #[arg(long, default_value = "chaos-out")]
        out: PathBuf,
    },
    /// The scenarios, one line each.
    List,
    /// Failover time after kill -9 of the leader, N times, on berth or on etcd with the same probe.
    Failover {
        #[arg(long, default_value = "berth")]
        target: Target,
        #[arg(long, default_value_t = 50)]
        kills: usize,
        #[arg(long, default_value = "chaos-out")]
        out: PathBuf,
        /// An extra `berth master` flag (repeatable), e.g. --master-arg=--election-timeout=200ms.
        #[arg(long, allow_hyphen_values = true)]
        master_arg: Vec<String>,
    },
    /// Checks a kept KV history (a run folder's history.jsonl) for linearizability again, with a
    /// bigger time budget: for a run whose `linearizable` check ran out of its budget (Unknown).
    Check {
        /// The history.jsonl of a run.
        history: PathBuf,
        /// Search budget per key.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        budget: Duration,
    },
}

#[derive(Clone, Copy, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Target {
    Berth,
    Etcd,
}

#[derive(Serialize)]
struct SuiteReport<'a> {
    runs: &'a [RunReport],
    faults_total: usize,
    faults_by_kind: std::collections::BTreeMap<String, usize>,
    /// Per check: (runs it passed in, runs it ran in).
    checks: std::collections::BTreeMap<String, (usize, usize)>,
    operations_checked: usize,
    failover_count: usize,
    failover_p50_ms: f64,
    failover_p99_ms: f64,
    failover_max_ms: f64,
    passed: bool,
    /// Runs that could not complete (each one a failure).
    incomplete: &'a [String],
}

fn suite_runs(full: bool, rounds: u64) -> Vec<(&'static str, u64, Duration, u64)> {
    let s = Duration::from_secs;
    if !full {
        return vec![
            ("steady", 1, s(15), 3),
            ("kill-leader", 1, s(30), 3),
            ("pause-leader", 1, s(20), 3),
            ("partition-leader", 1, s(20), 3),
            ("agent-cutoff", 1, s(20), 3),
            ("churn", 1, s(30), 3),
            ("networks", 1, s(30), 3),
            ("mixed", 1, s(40), 3),
        ];
    }
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for sc in run::SCENARIOS {
            // Every scenario once a round; the random mix with 3 and with 5 masters.
            if sc.name == "mixed" {
                runs.push((sc.name, 2 * round - 1, s(90), 3));
                runs.push((sc.name, 2 * round, s(90), 5));
            } else {
                let masters = if sc.name == "partition-bridge" { 5 } else { 3 };
                runs.push((sc.name, round, s(30), masters));
            }
        }
    }
    runs
}

async fn suite(full: bool, rounds: u64, out: PathBuf) -> Result<bool> {
    let mut reports = Vec::new();
    let mut incomplete = Vec::new();
    for (name, seed, duration, masters) in suite_runs(full, rounds) {
        if name == "networks"
            && let Err(why) = net::available()
        {
            println!("berth-chaos: {name} seed {seed} skipped: {why} (its agents attach tasks to networks)");
            continue;
        }
        let args = RunArgs { scenario: name.into(), seed, duration, masters, out: out.clone() };
        match run::run(&args).await {
            Ok(r) => {
                print_run(&r);
                reports.push(r);
            }
            Err(e) => {
                println!("berth-chaos: {name} seed {seed} did not complete: {e:#}");
                incomplete.push(format!("{name} seed {seed}: {e:#}"));
            }
        }
    }
    let mut fo: Vec<f64> = reports.iter().flat_map(|r| r.failover_ms.iter().copied()).collect();
    fo.sort_by(f64::total_cmp);
    let s = SuiteReport {
        runs: &reports,
        faults_total: reports.iter().map(|r| r.faults_total).sum(),
        faults_by_kind: reports.iter().flat_map(|r| r.faults.iter()).fold(Default::default(), |mut m, (k, n)| {
            *m.entry(k.clone()).or_default() += n;
            m
        }),
        checks: reports.iter().flat_map(|r| r.checks.iter()).fold(Default::default(), |mut m, c| {
            let e: &mut (usize, usize) = m.entry(c.name.clone()).or_default();
            e.0 += usize::from(c.passed);
            e.1 += 1;
            m
        }),
        operations_checked: reports
            .iter()
            .map(|r| {
                r.kv_ops.ok + r.kv_ops.fail + r.kv_ops.info + r.set_writes.ok + r.set_writes.fail + r.set_writes.info
            })
            .sum(),
        failover_count: fo.len(),
        failover_p50_ms: checks::quantile(&fo, 0.5),
        failover_p99_ms: checks::quantile(&fo, 0.99),
        failover_max_ms: fo.last().copied().unwrap_or(0.0),
        passed: reports.iter().all(|r| r.passed) && incomplete.is_empty(),
        incomplete: &incomplete,
    };
    std::fs::create_dir_all(&out)?;
    let file = out.join(if full { "suite-full.json" } else { "suite-quick.json" });
    std::fs::write(&file, serde_json::to_vec_pretty(&s)?)?;
    println!("\n{}", run::table(&reports));
    println!(
        "{} runs, {} faults injected, {} operations checked, failover p50/p99/max {:.0}/{:.0}/{:.0} ms over {} leader \
         faults; {}",
        reports.len(),
        s.faults_total,
        s.operations_checked,
        s.failover_p50_ms,
        s.failover_p99_ms,
        s.failover_max_ms,
        s.failover_count,
        if s.passed { "every check passed" } else { "SOME CHECKS FAILED" }
    );
    println!(
        "faults by kind: {}",
        s.faults_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "checks (runs passed/run): {}",
        s.checks.iter().map(|(k, (p, n))| format!("{k} {p}/{n}")).collect::<Vec<_>>().join(", ")
    );
    println!("report: {}", file.display());
    let passed = reports.iter().filter(|r| r.passed).count();
    println!("chaos: {passed} passed, {} failed", reports.len() + incomplete.len() - passed);
    Ok(s.passed)
}

/// `berth-chaos check`: true when every key's history is linearizable.
fn recheck(path: &std::path::Path, budget: Duration) -> Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let events = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<history::Event>(l)
                .with_context(|| format!("{} line {}: not a history event", path.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let ops = history::pair(&events);
    let reports = linearizable::check_all(&ops, budget);
    for r in &reports {
        println!("{:<12} {:>6} operations  {:>10.1?}  {:?}", r.key, r.ops, r.elapsed, r.verdict);
    }
    Ok(reports.iter().all(|r| matches!(r.verdict, linearizable::Verdict::Linearizable)))
}

fn print_run(r: &RunReport) {
    println!("{}", run::table(std::slice::from_ref(r)));
    for c in &r.checks {
        println!("  {} {:<26} {}", if c.passed { "ok  " } else { "FAIL" }, c.name, c.detail);
    }
    if !r.skipped_faults.is_empty() {
        println!("  (not injected without root: {})", r.skipped_faults.join(", "));
    }
    if !r.passed {
        println!(
            "  history, logs and data kept in {}; replay with: berth-chaos run --scenario {} --seed {} --masters {}",
            r.dir.display(),
            r.scenario,
            r.seed,
            r.masters
        );
    }
}

/// Resolves on the first SIGINT or SIGTERM, with its name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "interrupted (SIGINT)",
        _ = term.recv() => "terminated (SIGTERM)",
    }
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let ok = rt.block_on(async {
        let work = async {
            match cli.cmd {
                Cmd::List => {
                    for s in run::SCENARIOS {
                        println!("{:<17} {}", s.name, s.about);
                    }
                    Ok(true)
                }
                Cmd::Run { scenario, seed, duration, masters, out } => {
                    let r = run::run(&RunArgs { scenario, seed, duration, masters, out }).await?;
                    print_run(&r);
                    println!("{}", serde_json::to_string(&r)?);
                    Ok(r.passed)
                }
                Cmd::Suite { quick, full, rounds, out } => {
                    if !quick && !full {
                        anyhow::bail!("say which suite: --quick (CI, about 5 minutes) or --full");
                    }
                    suite(full, rounds, out).await
                }
                Cmd::Failover { target, kills, out, master_arg } => {
                    failover::run(matches!(target, Target::Etcd), kills, &out, master_arg).await
                }
                Cmd::Check { history, budget } => recheck(&history, budget),
            }
        };
        // On SIGINT or SIGTERM the run is dropped: the clusters' destructors stop every process
        // they started and remove their namespaces and mounts.
        tokio::select! {
            r = work => r,
            sig = interrupted() => Err(anyhow::anyhow!("{sig}: stopped the clusters under test and cleaned up")),
        }
    });
    // Tasks still running (workloads, nemesis) are dropped here, with what they own.
    rt.shutdown_timeout(std::time::Duration::from_secs(30));
    match ok {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("berth-chaos: {e:#}");
            std::process::exit(2);
        }
    }
}
