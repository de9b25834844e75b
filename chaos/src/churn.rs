//! The churn scenario's workload: services created, scaled, updated and deleted while the
//! nemesis kills leaders, and, right after a delete or a scale-down, a kill -9 of an agent that is
//! stopping the service's tasks (restarted a few seconds later). Some tasks ignore SIGTERM, so
//! their stop lasts the agent's whole stop grace (10 s) and the kill lands in the middle of it.
//! Whether anything is left running that should not be is the no-orphans check's business
//! (`orphans`). Every operation is logged to `churn.jsonl` in the run's folder.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Result;
use rand::Rng;
use serde::Serialize;

use crate::{cluster::Cluster, nemesis::Nemesis, orphans};

/// The names of the services this workload creates: `cycle-1`, `cycle-2`, ...
pub const PREFIX: &str = "cycle-";
/// At most this many of them exist at once.
const MAX_LIVE: usize = 4;
/// The chance that a delete or scale-down is followed by a kill of an agent stopping its tasks.
const KILL_AGENT_CHANCE: f64 = 0.6;

/// How a task takes SIGTERM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// A shell loop that exits on SIGTERM.
    Polite,
    /// A shell loop that ignores SIGTERM (`trap '' TERM`, inherited by its `sleep`s): only the
    /// SIGKILL after the stop grace ends it.
    Stubborn,
    /// `sleep` as PID 1 of the task's namespace: the kernel drops SIGTERM for an init without a
    /// handler, so it too ends only by SIGKILL (`sh -c 'sleep N'`, which execs sleep, is the same).
    Sleeper,
}

impl TaskKind {
    const ALL: [TaskKind; 3] = [TaskKind::Polite, TaskKind::Stubborn, TaskKind::Sleeper];

    fn argv(self) -> &'static [&'static str] {
        match self {
            TaskKind::Polite => &["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.5; done"],
            TaskKind::Stubborn => &["/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"],
            TaskKind::Sleeper => &["/bin/sleep", "100000"],
        }
    }
}

/// A service this workload believes exists.
#[derive(Clone, Debug)]
struct Live {
    replicas: u32,
    generation: u64,
    kind: TaskKind,
    start_first: bool,
}

/// The spec of a cycle service.
fn spec(name: &str, s: &Live) -> String {
    let argv = serde_json::to_string(s.kind.argv()).expect("strings serialize");
    format!(
        "kind: Service\nmetadata: {{name: {name}}}\nspec:\n  mode: replicated\n  replicas: {}\n  task:\n    runtime: process\n    \
         command: {argv}\n    env: {{GENERATION: \"{}\"}}\n    resources: {{cpu: 0.01, memory: 8Mi}}\n  placement: \
         {{constraints: [\"node.labels.chaos == real\"]}}\n  update: {{parallelism: 1, delay: 0s, order: {}}}\n  restart: \
         {{condition: any, delay: 500ms}}\n",
        s.replicas,
        s.generation,
        if s.start_first { "start-first" } else { "stop-first" }
    )
}

/// One operation, as `churn.jsonl` records it.
#[derive(Clone, Debug, Serialize)]
pub struct Op {
    pub at_ms: u64,
    pub service: String,
    /// `create`, `scale FROM->TO`, `update`, `delete`.
    pub action: String,
    pub kind: TaskKind,
    /// Whether the CLI reported success (a failure may still have happened: outcome unknown).
    pub ok: bool,
    pub error: String,
}

pub struct ServiceChurn {
    dir: PathBuf,
    start: Instant,
    live: BTreeMap<String, Live>,
    next: u32,
    pub ops: Vec<Op>,
    /// Agents killed while stopping tasks.
    pub agent_kills: usize,
    file: Option<std::fs::File>,
}

impl ServiceChurn {
    pub fn new(dir: &Path, start: Instant) -> ServiceChurn {
        ServiceChurn {
            dir: dir.to_path_buf(),
            start,
            live: BTreeMap::new(),
            next: 1,
            ops: Vec::new(),
            agent_kills: 0,
            file: std::fs::File::create(dir.join("churn.jsonl")).ok(),
        }
    }

    /// One step: restarts killed agents whose time has come, then creates, scales, updates or
    /// deletes a service; after a delete or a scale-down, sometimes kills an agent that is
    /// stopping the service's tasks.
    pub async fn step(&mut self, c: &mut Cluster, nemesis: &mut Nemesis) -> Result<()> {
        nemesis.restart_due_agents(c, false)?;
        let rng = &mut nemesis.rng;
        let names: Vec<String> = self.live.keys().cloned().collect();
        let roll = rng.random_range(0..100);
        let pick = |rng: &mut rand::rngs::StdRng| names[rng.random_range(0..names.len().max(1))].clone();
        let (name, action, stops) = if names.len() < 2 || (roll < 25 && names.len() < MAX_LIVE) {
            let name = format!("{PREFIX}{}", self.next);
            self.next += 1;
            let s = Live {
                replicas: rng.random_range(1..=3),
                generation: 0,
                kind: TaskKind::ALL[rng.random_range(0..TaskKind::ALL.len())],
                start_first: rng.random_bool(0.5),
            };
            self.apply(c, &name, &s, "create").await?;
            self.live.insert(name.clone(), s);
            (name, "create".to_string(), false)
        } else if roll < 55 {
            let name = pick(rng);
            let s = self.live.get_mut(&name).expect("picked from live");
            let from = s.replicas;
            s.replicas = (from + rng.random_range(1..=3)) % 4;
            let to = s.replicas;
            let kind = s.kind;
            let action = format!("scale {from}->{to}");
            self.run(c, &name, &action, kind, &["scale", &format!("{name}={to}")]).await?;
            (name, action, to < from)
        } else if roll < 75 {
            let name = pick(rng);
            let mut s = self.live[&name].clone();
            s.generation += 1;
            self.apply(c, &name, &s, "update").await?;
            self.live.insert(name.clone(), s);
            (name, "update".to_string(), false)
        } else {
            let name = pick(rng);
            let kind = self.live.remove(&name).expect("picked from live").kind;
            self.run(c, &name, "delete", kind, &["delete", "service", &name]).await?;
            (name, "delete".to_string(), true)
        };
        if stops && nemesis.rng.random_bool(KILL_AGENT_CHANCE) {
            self.kill_a_stopping_agent(c, nemesis, &name, &action).await;
        }
        Ok(())
    }

    async fn apply(&mut self, c: &Cluster, name: &str, s: &Live, action: &str) -> Result<()> {
        let file = self.dir.join(format!("{name}-{}.yaml", self.ops.len()));
        std::fs::write(&file, spec(name, s))?;
        self.run(c, name, action, s.kind, &["apply", "-f", &file.display().to_string()]).await
    }

    /// Runs one CLI operation and records it (a failed one too: its outcome may be unknown).
    async fn run(&mut self, c: &Cluster, name: &str, action: &str, kind: TaskKind, args: &[&str]) -> Result<()> {
        let at_ms = self.start.elapsed().as_millis() as u64;
        let (ok, error) = match c.admin(args).await {
            Ok(out) => (out.status.success(), String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Err(e) => (false, format!("{e:#}")),
        };
        let op = Op { at_ms, service: name.into(), action: action.into(), kind, ok, error };
        if let Some(f) = self.file.as_mut() {
            let _ = serde_json::to_writer(&mut *f, &op);
            let _ = f.write_all(b"\n");
        }
        self.ops.push(op);
        Ok(())
    }

    /// Waits a moment (the stop reaches the agent), then kills an agent on which a task of
    /// `service` that berth now wants stopped still runs (seen in /proc). At most one agent is
    /// down at a time.
    async fn kill_a_stopping_agent(&mut self, c: &mut Cluster, nemesis: &mut Nemesis, service: &str, action: &str) {
        if (0..c.agents.len()).any(|i| nemesis.agent_down(i)) {
            return;
        }
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_millis(nemesis.rng.random_range(200..1000))).await;
        let Ok((tasks, live)) = orphans::berth_view(c).await else { return };
        let nodes = orphans::Nodes::of(c);
        let stopping: Vec<orphans::Found> = orphans::copies(&orphans::scan(), |p| nodes.node(p))
            .into_iter()
            .filter(|f| f.service == service)
            .filter(|f| !live.contains(service) || tasks.get(&f.task).is_none_or(|t| t.desired != "running"))
            .collect();
        let Some(victim) = stopping.get(nemesis.rng.random_range(0..stopping.len().max(1))) else { return };
        let Some(i) = c.agents.iter().position(|a| a.name == victim.node) else { return };
        let on_it: Vec<&str> =
            stopping.iter().filter(|f| f.node == victim.node).map(|f| f.task.as_str()).collect::<Vec<_>>();
        let note = format!(
            "{} killed {} ms after `{action}` of {service}; tasks of it still running there that berth wants \
             stopped: {}",
            victim.node,
            t0.elapsed().as_millis(),
            on_it.join(", ")
        );
        nemesis.kill_agent(c, i, note);
        self.agent_kills += 1;
    }

    /// One line for the report: what was done.
    pub fn summary(&self) -> String {
        let count = |p: &str| self.ops.iter().filter(|o| o.action.starts_with(p)).count();
        format!(
            "churn: {} operations ({} creates, {} scales, {} updates, {} deletes; {} not acknowledged), {} agents \
             killed while stopping tasks",
            self.ops.len(),
            count("create"),
            count("scale"),
            count("update"),
            count("delete"),
            self.ops.iter().filter(|o| !o.ok).count(),
            self.agent_kills
        )
    }
}
