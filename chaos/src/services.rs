//! The service workload and the evidence the orchestration checkers read.
//!
//! Every task of the real agents runs a small shell loop that appends
//! `SERVICE SLOT TASK_ID UNIX_NS` to one heartbeat file every 200 ms. The checkers trust that file,
//! not berth's own reports: a task's run is the span from its first to its last heartbeat.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::cluster::Cluster;

/// The heartbeat period of every task.
pub const HEARTBEAT: Duration = Duration::from_millis(200);

/// The services, by name: replicas, whether at-most-once, and whether the workload changes it.
pub const STEADY: &str = "steady";
pub const FENCED: &str = "fenced";
pub const CHURN: &str = "churn";
pub const FLEET: &str = "fleet";

/// What the workload asked for, and how the cluster answered.
#[derive(Clone, Debug, Serialize)]
pub struct SpecChange {
    pub replicas: u32,
    pub generation: u64,
    /// true: acknowledged; false: refused for certain; None: outcome unknown.
    pub acked: Option<bool>,
    pub error: String,
}

/// A service whose tasks append heartbeats to `hb`, a file on the host: they are privileged (a
/// sandboxed task cannot see the host's files), which the suite's agents allow.
fn service(name: &str, replicas: u32, hb: &Path, extra: &str, real: bool) -> String {
    let constraint = if real { "node.labels.chaos == real" } else { "node.labels.chaos != real" };
    let command = format!(
        "export PATH=/usr/bin:/bin; trap 'exit 0' TERM; while :; do echo \"$BERTH_SERVICE $BERTH_SLOT $BERTH_TASK_ID $(date +%s%N)\" >> {}; \
         sleep 0.2; done",
        hb.display()
    );
    format!(
        "kind: Service\nmetadata: {{name: {name}}}\nspec:\n  mode: replicated\n  replicas: {replicas}\n  task:\n    \
         runtime: process\n    privileged: true\n    command: [\"/bin/sh\", \"-c\", {command:?}]\n    resources: {{cpu: 0.01, memory: 8Mi}}\n{extra}  \
         placement: {{constraints: [\"{constraint}\"]}}\n"
    )
}

/// The churn service's spec at `generation` with `replicas`.
fn churn(replicas: u32, generation: u64, hb: &Path) -> String {
    let s = service(CHURN, replicas, hb, "", true);
    // The generation is an environment variable: changing it is a rolling update.
    s.replace("    resources:", &format!("    env: {{GENERATION: \"{generation}\"}}\n    resources:"))
        + "  update: {parallelism: 1, delay: 0s, order: start-first}\n  restart: {condition: any, delay: 500ms}\n"
}

pub struct ServiceWorkload {
    pub hb: PathBuf,
    dir: PathBuf,
    pub changes: Vec<SpecChange>,
    pub fleet: u32,
}

impl ServiceWorkload {
    pub fn new(dir: &Path, fleet: u32) -> ServiceWorkload {
        ServiceWorkload { hb: dir.join("heartbeats.log"), dir: dir.to_path_buf(), changes: Vec::new(), fleet }
    }

    /// Applies the initial services.
    pub async fn setup(&mut self, c: &Cluster) -> Result<()> {
        let mut docs = vec![
            service(STEADY, 3, &self.hb, "  restart: {condition: any, delay: 500ms}\n", true),
            service(
                FENCED,
                1,
                &self.hb,
                "  restart: {condition: any, delay: 500ms}\n  disconnect: at-most-once\n",
                true,
            ),
            churn(2, 0, &self.hb),
        ];
        if self.fleet > 0 {
            docs.push(service(FLEET, self.fleet, Path::new("/dev/null"), "", false));
        }
        let file = self.dir.join("services.yaml");
        std::fs::write(&file, docs.join("---\n"))?;
        c.admin_out(&["apply", "-f", &file.display().to_string()]).await.context("applying the services")?;
        self.changes.push(SpecChange { replicas: 2, generation: 0, acked: Some(true), error: String::new() });
        Ok(())
    }

    /// Scales or updates the churn service (alternately, by `step`).
    pub async fn change(&mut self, c: &Cluster, step: u64) -> Result<()> {
        let last = self.changes.last().cloned().context("setup first")?;
        let (replicas, generation) = if step.is_multiple_of(2) {
            (1 + (last.replicas % 3), last.generation)
        } else {
            (last.replicas, last.generation + 1)
        };
        let file = self.dir.join(format!("churn-{step}.yaml"));
        std::fs::write(&file, churn(replicas, generation, &self.hb))?;
        let out = c.admin(&["apply", "-f", &file.display().to_string(), "--timeout", "5s"]).await?;
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let acked = if out.status.success() {
            Some(true)
        } else if err.contains("invalid") || err.contains("not the leader") {
            Some(false)
        } else {
            None
        };
        self.changes.push(SpecChange { replicas, generation, acked, error: err });
        Ok(())
    }

    /// The specs the final state may legitimately show: the last acknowledged change, or any change
    /// after it whose outcome is unknown.
    pub fn allowed_final(&self) -> Vec<(u32, u64)> {
        let last_ok = self.changes.iter().rposition(|c| c.acked == Some(true)).unwrap_or(0);
        self.changes[last_ok..].iter().filter(|c| c.acked != Some(false)).map(|c| (c.replicas, c.generation)).collect()
    }
}

/// One task's run, as its heartbeats show it.
#[derive(Clone, Debug)]
pub struct Run {
    pub service: String,
    pub slot: u32,
    pub first_ns: u128,
    pub last_ns: u128,
    pub beats: u64,
}

/// Reads the heartbeat file: task id -> its run.
pub fn runs(hb: &Path) -> BTreeMap<String, Run> {
    let mut out: BTreeMap<String, Run> = BTreeMap::new();
    let text = std::fs::read_to_string(hb).unwrap_or_default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [service, slot, task, ns] = f[..] else { continue };
        let (Ok(slot), Ok(ns)) = (slot.parse::<u32>(), ns.parse::<u128>()) else { continue };
        let r = out.entry(task.to_string()).or_insert(Run {
            service: service.into(),
            slot,
            first_ns: ns,
            last_ns: ns,
            beats: 0,
        });
        r.first_ns = r.first_ns.min(ns);
        r.last_ns = r.last_ns.max(ns);
        r.beats += 1;
    }
    out
}

/// Pairs of runs of one at-most-once slot that overlapped in time: (slot, task a, task b, overlap ms).
pub fn double_runs(runs: &BTreeMap<String, Run>, service: &str) -> Vec<(u32, String, String, f64)> {
    let mut by_slot: BTreeMap<u32, Vec<(&String, &Run)>> = BTreeMap::new();
    for (id, r) in runs.iter().filter(|(_, r)| r.service == service) {
        by_slot.entry(r.slot).or_default().push((id, r));
    }
    let mut out = Vec::new();
    for (slot, mut rs) in by_slot {
        rs.sort_by_key(|(_, r)| r.first_ns);
        for i in 0..rs.len() {
            for j in i + 1..rs.len() {
                let (a, b) = (rs[i].1, rs[j].1);
                if b.first_ns <= a.last_ns {
                    let overlap = (a.last_ns.min(b.last_ns) - b.first_ns) as f64 / 1e6;
                    out.push((slot, rs[i].0.clone(), rs[j].0.clone(), overlap));
                }
            }
        }
    }
    out
}

/// Wall-clock now in ns since the epoch (the clock the heartbeats use).
pub fn unix_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// What berth reports as running, per service: task ids.
pub async fn running_tasks(c: &Cluster) -> Result<BTreeMap<String, Vec<String>>> {
    let text = c.admin_out(&["get", "tasks", "-o", "json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let Some(tasks) = v.as_array().or_else(|| v["tasks"].as_array()) else {
        bail!("unexpected `get tasks -o json` output: {text}")
    };
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in tasks {
        if t["state"] == "running" && t["desired_state"] == "running" {
            out.entry(t["service"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(t["id"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(out)
}

/// The churn service's stored (replicas, generation).
pub async fn churn_spec(c: &Cluster) -> Result<(u32, u64)> {
    let text = c.admin_out(&["get", "services", "-o", "json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let list = v.as_array().cloned().or_else(|| v["services"].as_array().cloned()).unwrap_or_default();
    let s = list.iter().find(|s| s["name"] == CHURN).context("the churn service is gone")?;
    let replicas = s["spec"]["spec"]["replicas"].as_u64().context("churn replicas")? as u32;
    let generation = s["spec"]["spec"]["task"]["env"]["GENERATION"].as_str().and_then(|g| g.parse().ok()).unwrap_or(0);
    Ok((replicas, generation))
}
