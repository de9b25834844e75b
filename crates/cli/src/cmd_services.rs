//! Services and tasks: `berth apply`, `get services|tasks|nodes`, `describe service`, `scale`,
//! `rollout`, `delete service` and `logs`, over the ControlService API.

use std::{
    collections::{HashMap, HashSet},
    io::{Read, Write},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use berth_api::pb::{
    self, RolloutAction, RolloutState, ServiceView, Task,
    agent::{TaskHealth, TaskState},
    control_service_client::ControlServiceClient,
};
use berth_types::spec;
use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::{Code, Status};

use crate::{
    Global,
    client::{Call, Client, Conn},
    cmd_nodes,
    output::{self, Format},
};

/// How often `--wait` looks at the rollouts.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Longest message shown in a table cell (the full text is in `describe` and `-o json`).
const MESSAGE_WIDTH: usize = 80;

// ---------------------------------------------------------------------------------------------
// Arguments

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// A YAML or JSON file of `kind: Service` documents, a directory (its *.yaml, *.yml and *.json
    /// files, in name order), or `-` for standard input. Repeatable.
    #[arg(short = 'f', long = "filename", value_name = "FILE|DIR|-", required = true)]
    pub files: Vec<String>,
    /// Validate and show what would change, storing nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// After applying, follow the rollout of every created or updated service until it completes.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits before giving up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub timeout: Duration,
}

#[derive(Subcommand)]
pub enum GetCmd {
    /// Services: mode, running/desired replicas, version, rollout state, age.
    #[command(visible_aliases = ["svc", "service"])]
    Services {
        /// Only this namespace (default: every namespace).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// List the services, then print each change as it is committed (a line with its
        /// event: ADDED, MODIFIED or DELETED; one JSON object a line with `-o json`) until
        /// interrupted. Follows the master's stream of changes, across a leader change.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Tasks: service, slot, node, desired and observed state, health, age, message.
    #[command(visible_alias = "task")]
    Tasks {
        /// Only this namespace (default: every namespace).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Only the tasks of this service.
        #[arg(long)]
        service: Option<String>,
        /// Include ended tasks (desired state shutdown).
        #[arg(short = 'a', long)]
        all: bool,
    },
    /// Every node: status, availability, labels, resources, agent version, last heartbeat.
    #[command(visible_alias = "node")]
    Nodes,
    /// Networks: subnet, VNI, internal, services and tasks attached.
    #[command(visible_aliases = ["network", "net"])]
    Networks {
        /// Only this namespace (default: every namespace).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Volumes: driver, access mode, node, size, usage and the tasks using them.
    #[command(visible_aliases = ["volume", "vol"])]
    Volumes {
        /// Only this namespace (default: every namespace).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Routes: host, path, service, TLS and certificate expiry, endpoints.
    #[command(visible_aliases = ["route"])]
    Routes {
        /// Only this namespace (default: every namespace).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Namespaces: what each holds (CPU, memory, tasks, services, volumes, secrets) against its
    /// quota.
    #[command(visible_aliases = ["namespace", "ns"])]
    Namespaces,
}

#[derive(Subcommand)]
pub enum DescribeCmd {
    /// A service: its spec, rollout and tasks (ended ones included), with why pending tasks wait.
    #[command(visible_aliases = ["svc", "services"])]
    Service {
        name: String,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// A network: subnet, VNI, node blocks, services, attached tasks and their addresses.
    #[command(visible_aliases = ["networks", "net"])]
    Network {
        name: String,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// A volume: driver, access mode, node, size, usage, and the tasks using it.
    #[command(visible_aliases = ["volumes", "vol"])]
    Volume {
        name: String,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// A route: hosts, service, endpoints, TLS and its certificate's expiry, the edges serving it.
    #[command(visible_aliases = ["routes"])]
    Route {
        name: String,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
}

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// NAME=REPLICAS, e.g. web=3. Several may be given.
    #[arg(value_name = "NAME=REPLICAS", required = true, value_parser = parse_scale)]
    pub targets: Vec<(String, u32)>,
    #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Wait until REPLICAS tasks of the current version run (healthy, where the service has a
    /// health check) and every other task has ended.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits before giving up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct RolloutTarget {
    /// Service name.
    pub name: String,
    #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
    pub namespace: String,
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Rollout state and message, and running/desired tasks.
    Status {
        #[command(flatten)]
        target: RolloutTarget,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop replacing tasks; running tasks stay as they are.
    Pause(RolloutTarget),
    /// Carry on with a paused rollout.
    Resume(RolloutTarget),
    /// Go back to the previous spec (as a new version).
    Undo {
        #[command(flatten)]
        target: RolloutTarget,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

/// `--wait [--timeout]` of the rollout commands.
#[derive(Args)]
pub struct WaitArgs {
    /// Follow the rollout until it is done (or fails).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits before giving up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    timeout: Duration,
}

#[derive(Subcommand)]
pub enum DeleteCmd {
    /// Delete services: their tasks are stopped, then the services go.
    #[command(visible_aliases = ["svc", "services"])]
    Service {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Wait until every task has ended (its process gone) and the service is removed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits before giving up.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
        timeout: Duration,
    },
    /// Delete networks: refused while services use them.
    #[command(visible_aliases = ["networks", "net"])]
    Network {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Delete volumes: refused while tasks or services use them.
    #[command(visible_aliases = ["volumes", "vol"])]
    Volume {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Delete routes: the edges stop serving their hosts within a second.
    #[command(visible_aliases = ["routes"])]
    Route {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
        namespace: String,
    },
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// A service name (every task of it) or a task id (from `berth get tasks`).
    pub target: String,
    #[arg(short = 'n', long, default_value = spec::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Keep streaming new lines.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines of each task (0: all).
    #[arg(long, default_value_t = 0)]
    pub tail: u32,
    /// Only lines since this long ago (5m, 1h30m) or since an RFC 3339 UTC time
    /// (2024-05-01T12:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Prefix each line with its time (RFC 3339, UTC).
    #[arg(short = 't', long)]
    pub timestamps: bool,
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers

/// `NAME=REPLICAS` of `berth scale`.
pub fn parse_scale(s: &str) -> Result<(String, u32), String> {
    let Some((name, n)) = s.split_once('=') else {
        return Err(format!("{s:?} is not NAME=REPLICAS; write e.g. web=3"));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{s:?} has no service name; write e.g. web=3"));
    }
    let n = n.trim();
    let replicas: u32 = n
        .parse()
        .map_err(|_| format!("replicas {n:?} in {s:?} is not a whole number from 0 to {}", spec::MAX_REPLICAS))?;
    if replicas > spec::MAX_REPLICAS {
        return Err(format!("replicas {replicas} in {s:?} is over the limit of {}", spec::MAX_REPLICAS));
    }
    Ok((name.to_string(), replicas))
}

/// `--since`: a duration before `now_ms` (`5m`, `1h30m`) or an RFC 3339 UTC time. Unix ms.
pub fn parse_since(s: &str, now_ms: i64) -> Result<i64, String> {
    let t = s.trim();
    if let Ok(time) = humantime::parse_rfc3339_weak(t) {
        let ms = time.duration_since(UNIX_EPOCH).map_err(|_| format!("--since {s:?} is before 1970"))?.as_millis();
        return Ok((ms as i64).max(1));
    }
    match humantime::parse_duration(t) {
        Ok(d) => Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).max(1)),
        Err(_) => Err(format!(
            "--since {s:?} is neither a duration such as 5m or 1h30m nor an RFC 3339 UTC time such as \
             2024-05-01T12:00:00Z"
        )),
    }
}

pub use berth_api::task_state_name;

pub fn health_name(h: i32) -> &'static str {
    match TaskHealth::try_from(h).unwrap_or(TaskHealth::Unknown) {
        TaskHealth::Unknown => "unknown",
        TaskHealth::Starting => "starting",
        TaskHealth::Healthy => "healthy",
        TaskHealth::Unhealthy => "unhealthy",
    }
}

pub fn rollout_state_name(s: i32) -> &'static str {
    match RolloutState::try_from(s).unwrap_or(RolloutState::Unspecified) {
        RolloutState::Unspecified => "none",
        RolloutState::Updating => "updating",
        RolloutState::Completed => "completed",
        RolloutState::Paused => "paused",
        RolloutState::RollingBack => "rolling-back",
        RolloutState::RolledBack => "rolled-back",
    }
}

/// Milliseconds since the Unix epoch, for ages and expiries.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Age as kubectl shows it: `42s`, `3m12s`, `25m`, `4h10m`, `30h`, `12d`.
pub fn fmt_age(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..600 if s % 60 != 0 => format!("{}m{}s", s / 60, s % 60),
        60..3600 => format!("{}m", s / 60),
        3600..36_000 if s % 3600 >= 60 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        3600..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn age_since(created_ms: i64, now: i64) -> String {
    if created_ms <= 0 { "-".into() } else { fmt_age(now - created_ms) }
}

fn fmt_time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
}

/// Cuts `s` to `max` characters, ending with `...` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let cut: String = s.chars().take(max.saturating_sub(3)).collect();
    format!("{}...", cut.trim_end())
}

pub(crate) fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

// ---------------------------------------------------------------------------------------------
// Output objects (`-o json|yaml`)

#[derive(Serialize, Debug, Clone)]
pub struct RolloutOut {
    pub state: &'static str,
    pub message: String,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    pub failures: u32,
}

#[derive(Serialize, Debug, Clone)]
pub struct ServiceOut {
    pub namespace: String,
    pub name: String,
    /// `replicated` or `global`.
    pub mode: String,
    pub desired: u32,
    pub running: u32,
    pub pending: u32,
    pub version: u64,
    pub previous_version: u64,
    pub rollout: RolloutOut,
    pub deleting: bool,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub mod_revision: i64,
    /// The service's virtual IP (empty: none, with `endpoint_mode: dnsrr` or no networks).
    pub vip: String,
    /// The stored spec document (kind, metadata, spec) with every default filled in.
    pub spec: serde_json::Value,
}

impl ServiceOut {
    pub fn from_view(v: &ServiceView) -> ServiceOut {
        let r = v.record.clone().unwrap_or_default();
        let spec: serde_json::Value =
            serde_json::from_str(&r.spec_json).unwrap_or(serde_json::Value::String(r.spec_json.clone()));
        let ro = r.rollout.clone().unwrap_or_default();
        ServiceOut {
            mode: spec.pointer("/spec/mode").and_then(|m| m.as_str()).unwrap_or("replicated").to_string(),
            namespace: r.namespace,
            name: r.name,
            desired: v.desired,
            running: v.running,
            pending: v.pending,
            version: r.version,
            previous_version: r.previous_version,
            rollout: RolloutOut {
                state: rollout_state_name(ro.state),
                message: ro.message,
                started_at_ms: ro.started_at_ms,
                updated_at_ms: ro.updated_at_ms,
                failures: ro.failures,
            },
            deleting: r.deleting,
            created_at_ms: r.created_at_ms,
            updated_at_ms: r.updated_at_ms,
            mod_revision: v.mod_revision,
            vip: r.vip,
            spec,
        }
    }

    /// `image` for docker, else the command line.
    fn what_runs(&self) -> String {
        let task = self.spec.pointer("/spec/task");
        if let Some(image) = task.and_then(|t| t.get("image")).and_then(|i| i.as_str()) {
            return image.to_string();
        }
        let words = |k: &str| -> Vec<String> {
            task.and_then(|t| t.get(k))
                .and_then(|c| c.as_array())
                .map(|a| a.iter().filter_map(|w| w.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        let mut cmd = words("command");
        cmd.extend(words("args"));
        cmd.join(" ")
    }

    fn rollout_column(&self) -> String {
        if self.deleting { "deleting".into() } else { self.rollout.state.to_string() }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct TaskOut {
    pub id: String,
    pub service: String,
    pub namespace: String,
    /// Replica slot from 1; 0 for a global service's task.
    pub slot: u32,
    /// Node id; empty while pending.
    pub node: String,
    /// Node name; empty while pending or when the node is unknown.
    pub node_name: String,
    pub desired_state: &'static str,
    pub state: &'static str,
    pub health: &'static str,
    pub exit_code: i32,
    pub pid: u32,
    pub message: String,
    pub pending_reason: String,
    pub spec_version: u64,
    pub attempt: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// When it was first reported running (Unix ms, the leader's clock); 0: not yet.
    pub running_at_ms: i64,
    /// The task's address on each network it joined (network name -> IPv4).
    pub addresses: std::collections::BTreeMap<String, String>,
}

impl TaskOut {
    pub fn from_task(t: &Task, node_names: &HashMap<String, String>) -> TaskOut {
        TaskOut {
            id: t.id.clone(),
            service: t.service.clone(),
            namespace: t.namespace.clone(),
            slot: t.slot,
            node: t.node_id.clone(),
            node_name: node_names.get(&t.node_id).cloned().unwrap_or_default(),
            desired_state: task_state_name(t.desired_state),
            state: task_state_name(t.state),
            health: health_name(t.health),
            exit_code: t.exit_code,
            pid: t.pid,
            message: t.message.clone(),
            pending_reason: t.pending_reason.clone(),
            spec_version: t.spec_version,
            attempt: t.attempt,
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
            running_at_ms: t.running_at_ms,
            addresses: t.addresses.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// The node's name, else its id, else `-` (pending).
    fn node_column(&self) -> String {
        if !self.node_name.is_empty() {
            self.node_name.clone()
        } else if !self.node.is_empty() {
            self.node.clone()
        } else {
            "-".into()
        }
    }

    /// What the MESSAGE column says: the task's message, with the exit code of a failed task, or
    /// why a pending task waits.
    fn message_column(&self) -> String {
        let mut m = self.message.clone();
        if matches!(self.state, "failed" | "complete")
            && self.exit_code != 0
            && !m.contains(&self.exit_code.to_string())
        {
            m = if m.is_empty() {
                format!("exit code {}", self.exit_code)
            } else {
                format!("{m} (exit code {})", self.exit_code)
            };
        }
        // Why a pending task waits now says more than how it came to be pending.
        if !self.pending_reason.is_empty() && (m.is_empty() || self.state == "pending") {
            m = self.pending_reason.clone();
        }
        m
    }

    fn slot_column(&self) -> String {
        if self.slot == 0 { "-".into() } else { self.slot.to_string() }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct ApplyOut {
    pub file: String,
    /// `Service`, `Network` or `Volume`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub action: String,
    pub version: u64,
    pub revision: i64,
    pub changes: Vec<String>,
}

#[derive(Serialize)]
struct DescribeOut {
    service: ServiceOut,
    tasks: Vec<TaskOut>,
    /// The service's and its tasks' recent events, oldest first.
    events: Vec<berth_types::event::ClusterEvent>,
}

/// The most recent events `describe` shows.
const DESCRIBE_EVENTS: usize = 20;

// ---------------------------------------------------------------------------------------------
// Table rows

pub const SERVICE_HEADERS: &[&str] = &["NAMESPACE", "NAME", "MODE", "REPLICAS", "VERSION", "ROLLOUT", "AGE"];
pub const SERVICE_WIDE_HEADERS: &[&str] =
    &["NAMESPACE", "NAME", "MODE", "REPLICAS", "PENDING", "VERSION", "ROLLOUT", "AGE", "RUNS", "MESSAGE"];

pub fn service_rows(services: &[ServiceOut], wide: bool, now: i64) -> Vec<Vec<String>> {
    services
        .iter()
        .map(|s| {
            let mut row =
                vec![s.namespace.clone(), s.name.clone(), s.mode.clone(), format!("{}/{}", s.running, s.desired)];
            if wide {
                row.push(s.pending.to_string());
            }
            row.extend([s.version.to_string(), s.rollout_column(), age_since(s.created_at_ms, now)]);
            if wide {
                row.push(s.what_runs());
                row.push(s.rollout.message.clone());
            }
            row
        })
        .collect()
}

pub const TASK_HEADERS: &[&str] = &["ID", "SERVICE", "SLOT", "NODE", "DESIRED", "STATE", "HEALTH", "AGE", "MESSAGE"];
pub const TASK_WIDE_HEADERS: &[&str] = &[
    "ID", "SERVICE", "SLOT", "NODE", "VERSION", "DESIRED", "STATE", "HEALTH", "EXIT", "PID", "ATTEMPT", "AGE",
    "MESSAGE",
];

pub fn task_rows(tasks: &[TaskOut], wide: bool, now: i64) -> Vec<Vec<String>> {
    tasks
        .iter()
        .map(|t| {
            let service = if t.namespace == spec::DEFAULT_NAMESPACE || t.namespace.is_empty() {
                t.service.clone()
            } else {
                key(&t.namespace, &t.service)
            };
            let health = if t.health == "unknown" { "-".to_string() } else { t.health.to_string() };
            let mut row = vec![t.id.clone(), service, t.slot_column(), t.node_column()];
            if wide {
                row.push(t.spec_version.to_string());
            }
            row.extend([t.desired_state.to_string(), t.state.to_string(), health]);
            if wide {
                row.push(t.exit_code.to_string());
                row.push(if t.pid == 0 { "-".into() } else { t.pid.to_string() });
                row.push(t.attempt.to_string());
            }
            row.push(age_since(t.created_at_ms, now));
            let msg = t.message_column();
            row.push(if wide { msg } else { truncate(&msg, MESSAGE_WIDTH) });
            row
        })
        .collect()
}

/// `describe`'s task table: the service is known, the version matters.
fn describe_task_rows(tasks: &[TaskOut], now: i64) -> Vec<Vec<String>> {
    tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.slot_column(),
                t.node_column(),
                t.spec_version.to_string(),
                t.desired_state.to_string(),
                t.state.to_string(),
                if t.health == "unknown" { "-".into() } else { t.health.to_string() },
                age_since(t.created_at_ms, now),
                truncate(&t.message_column(), MESSAGE_WIDTH),
            ]
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Client helpers

fn control(ch: Conn) -> ControlServiceClient<Conn> {
    Client::control(ch)
}

fn service_ref(ns: &str, name: &str) -> pb::ServiceRef {
    pb::ServiceRef { namespace: ns.to_string(), name: name.to_string() }
}

pub(crate) async fn get_service(client: &Client, ns: &str, name: &str) -> Result<pb::GetServiceResponse, Status> {
    let req = service_ref(ns, name);
    client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { control(ch).get_service(req).await.map(|r| r.into_inner()) }
        })
        .await
}

async fn list_services(client: &Client, ns: &str) -> Result<Vec<ServiceView>, Status> {
    let req = pb::ListServicesRequest { namespace: ns.to_string() };
    client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { control(ch).list_services(req).await.map(|r| r.into_inner().services) }
        })
        .await
}

/// Node id -> name, best effort (an empty map when the node list cannot be read).
pub(crate) async fn node_names(client: &Client) -> HashMap<String, String> {
    let r = client
        .call(Call::Idempotent, |ch| async move {
            Client::nodes(ch).node_list(pb::NodeListRequest {}).await.map(|r| r.into_inner())
        })
        .await;
    match r {
        Ok(r) => r.nodes.into_iter().filter_map(|i| i.node).map(|n| (n.id, n.name)).collect(),
        Err(_) => HashMap::new(),
    }
}

/// A status as the user should read it: its message, and the code unless the message says enough.
pub(crate) fn status_text(s: &Status) -> String {
    match s.code() {
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists => {
            s.message().to_string()
        }
        c => format!("{} ({c:?})", s.message()),
    }
}

fn is_table(f: Format) -> bool {
    matches!(f, Format::Table | Format::Wide)
}

/// Prints a line to stdout; a closed pipe (`| head`) ends the program quietly.
pub(crate) fn out_line(line: &str) {
    if writeln!(std::io::stdout().lock(), "{line}").is_err() {
        std::process::exit(0);
    }
}

// ---------------------------------------------------------------------------------------------
// apply

/// One input of `apply -f`: its name for messages and its text.
#[derive(Debug, PartialEq, Eq)]
pub struct Input {
    pub name: String,
    pub text: String,
}

fn is_manifest(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "yaml" | "yml" | "json"))
}

/// Reads every `-f` argument: files, directories (their manifests in name order) and `-`.
pub fn read_inputs(args: &[String], stdin: &mut dyn Read) -> Result<Vec<Input>> {
    let mut inputs = Vec::new();
    let mut stdin_used = false;
    for a in args {
        if a == "-" {
            if stdin_used {
                bail!("-f - is given twice; standard input can be read only once");
            }
            stdin_used = true;
            let mut text = String::new();
            stdin.read_to_string(&mut text).context("cannot read the documents from standard input")?;
            inputs.push(Input { name: "<stdin>".into(), text });
            continue;
        }
        let path = PathBuf::from(a);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("cannot read {a}: check the path given to -f (a file, a directory or -)"))?;
        if meta.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
                .with_context(|| format!("cannot list the directory {a}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_manifest(p))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("directory {a} holds no *.yaml, *.yml or *.json file to apply");
            }
            for f in files {
                let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {}", f.display()))?;
                inputs.push(Input { name: f.display().to_string(), text });
            }
        } else {
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {a}"))?;
            inputs.push(Input { name: a.clone(), text });
        }
    }
    Ok(inputs)
}

/// The lines `apply` prints for one result.
pub fn apply_lines(r: &ApplyOut) -> Vec<String> {
    let mut lines = if r.kind == "Network" || r.kind == "Volume" || r.kind == "Route" {
        vec![format!("{} {} {}", r.kind.to_lowercase(), key(&r.namespace, &r.name), r.action)]
    } else {
        vec![format!("service {} {} (version {})", key(&r.namespace, &r.name), r.action, r.version)]
    };
    if r.action != "unchanged" {
        lines.extend(r.changes.iter().filter(|c| *c != "(new service)").map(|c| format!("    {c}")));
    }
    lines
}

pub async fn run_apply(a: ApplyArgs, g: &Global) -> Result<()> {
    let inputs = read_inputs(&a.files, &mut std::io::stdin().lock())?;
    let client = crate::config::client(g)?;
    let mut results: Vec<ApplyOut> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for input in &inputs {
        let req = pb::ApplyRequest { documents: input.text.clone(), dry_run: a.dry_run, expected_revision: 0 };
        let r = client
            .call(Call::Idempotent, |ch| {
                let req = req.clone();
                async move { control(ch).apply(req).await.map(|r| r.into_inner()) }
            })
            .await;
        match r {
            Ok(resp) => {
                for r in resp.results {
                    let o = ApplyOut {
                        file: input.name.clone(),
                        kind: if r.kind.is_empty() { "Service".into() } else { r.kind },
                        namespace: r.namespace,
                        name: r.name,
                        action: r.action,
                        version: r.version,
                        revision: r.revision,
                        changes: r.changes,
                    };
                    if is_table(g.output) {
                        for l in apply_lines(&o) {
                            out_line(&l);
                        }
                    }
                    results.push(o);
                }
            }
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition | Code::Aborted) => {
                eprintln!("error: {}: {}", input.name, status_text(&s));
                failed.push(input.name.clone());
            }
            Err(s) => {
                if !is_table(g.output) && !results.is_empty() {
                    output::emit(g.output, &results, |_| {});
                }
                return Err(anyhow!("{}: {}", input.name, status_text(&s)));
            }
        }
    }
    if !is_table(g.output) {
        output::emit(g.output, &results, |_| {});
    }
    let mut wait_err = None;
    if a.wait && a.dry_run {
        eprintln!("note: --wait has nothing to follow with --dry-run");
    } else if a.wait {
        let targets: Vec<WaitTarget> = results
            .iter()
            .filter(|r| r.kind == "Service" && (r.action == "created" || r.action == "updated"))
            .map(|r| WaitTarget {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                min_version: r.version,
                rollback_ok: false,
            })
            .collect();
        if !targets.is_empty() {
            let plain_to_stdout = is_table(g.output);
            wait_err = wait_rollouts(&client, targets, a.timeout, plain_to_stdout).await.err();
        }
    }
    if !failed.is_empty() {
        if let Some(e) = wait_err {
            eprintln!("error: {}", output::describe(&e));
        }
        let what = if failed.len() == 1 { "file was" } else { "files were" };
        bail!(
            "{} of {} {what} not applied ({}): fix the errors above and apply again",
            failed.len(),
            inputs.len(),
            failed.join(", ")
        );
    }
    match wait_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// --wait

#[derive(Clone, Debug)]
pub struct WaitTarget {
    pub namespace: String,
    pub name: String,
    /// The version the rollout must reach (a later one counts too).
    pub min_version: u64,
    /// Whether ending rolled back (on the previous spec) is success: `rollout undo`.
    pub rollback_ok: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Waiting,
    Done,
    Failed(String),
}

/// Where a service's rollout stands for `--wait`. `rollback_reason`: the message seen while it
/// was rolling back (it names the failure; the final message does not).
pub fn rollout_progress(v: &ServiceView, t: &WaitTarget, rollback_reason: Option<&str>) -> Progress {
    let Some(r) = &v.record else { return Progress::Failed("the service is gone".into()) };
    if r.deleting {
        return Progress::Failed("the service is being deleted".into());
    }
    let ro = r.rollout.clone().unwrap_or_default();
    let state = RolloutState::try_from(ro.state).unwrap_or(RolloutState::Unspecified);
    let undo = format!(
        "`berth rollout resume {name} -n {ns}` carries on, `berth rollout undo {name} -n {ns}` goes back",
        name = r.name,
        ns = r.namespace
    );
    let settled = r.version >= t.min_version && v.running >= v.desired;
    match state {
        RolloutState::RolledBack if t.rollback_ok && settled => Progress::Done,
        RolloutState::RolledBack if t.rollback_ok => Progress::Waiting,
        RolloutState::RolledBack => Progress::Failed(format!(
            "the rollout did not complete and the service went back to its previous spec: {}{}; see \
             `berth describe service {} -n {}`",
            ro.message,
            rollback_reason.map(|m| format!(" ({m})")).unwrap_or_default(),
            r.name,
            r.namespace
        )),
        RolloutState::Paused => Progress::Failed(format!("the rollout is paused: {}; {undo}", ro.message)),
        RolloutState::Completed | RolloutState::Unspecified if settled => Progress::Done,
        _ => Progress::Waiting,
    }
}

/// `web: 2/3 running, 1 pending (updating)`.
pub fn progress_line(label: &str, v: &ServiceView) -> String {
    let state = v.record.as_ref().and_then(|r| r.rollout.as_ref()).map_or(0, |r| r.state);
    let pending = if v.pending > 0 { format!(", {} pending", v.pending) } else { String::new() };
    format!("{label}: {}/{} running{pending} ({})", v.running, v.desired, rollout_state_name(state))
}

struct Follow {
    target: WaitTarget,
    label: String,
    bar: Option<indicatif::ProgressBar>,
    last_line: String,
    last_view: Option<ServiceView>,
    rollback_reason: Option<String>,
    outcome: Option<Result<(), String>>,
}

/// Follows the rollouts of `targets` until each completes, fails or `timeout` passes. Progress:
/// bars on a terminal's stderr, else a line per change (to stdout when `plain_to_stdout`).
pub async fn wait_rollouts(
    client: &Client,
    targets: Vec<WaitTarget>,
    timeout: Duration,
    plain_to_stdout: bool,
) -> Result<()> {
    let first_ns = targets.first().map(|t| t.namespace.clone()).unwrap_or_default();
    let one_ns = targets.iter().all(|t| t.namespace == first_ns);
    let list_ns = if one_ns { first_ns.clone() } else { String::new() };
    let bars = crate::progress::Bars::new("{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} running {msg}");
    let width = targets.iter().map(|t| if one_ns { t.name.len() } else { t.namespace.len() + 1 + t.name.len() }).max();
    let mut follows: Vec<Follow> = targets
        .into_iter()
        .map(|t| {
            let label = if one_ns { t.name.clone() } else { key(&t.namespace, &t.name) };
            let bar = bars.add(&label, width.unwrap_or(0));
            Follow {
                target: t,
                label,
                bar,
                last_line: String::new(),
                last_view: None,
                rollback_reason: None,
                outcome: None,
            }
        })
        .collect();
    let plain = |line: &str| {
        if plain_to_stdout {
            out_line(line);
        } else {
            eprintln!("{line}");
        }
    };
    let started = tokio::time::Instant::now();
    let deadline = started + timeout;
    let mut changes = crate::wait::Changes::open(client, &list_ns).await;
    let mut last_error: Option<String> = None;
    loop {
        match list_services(client, &list_ns).await {
            Ok(views) => {
                last_error = None;
                let by_key: HashMap<String, &ServiceView> =
                    views.iter().filter_map(|v| v.record.as_ref().map(|r| (key(&r.namespace, &r.name), v))).collect();
                for f in follows.iter_mut().filter(|f| f.outcome.is_none()) {
                    let Some(v) = by_key.get(&key(&f.target.namespace, &f.target.name)) else {
                        f.outcome = Some(Err("the service was deleted".into()));
                        continue;
                    };
                    let line = progress_line(&f.label, v);
                    if line != f.last_line {
                        match &f.bar {
                            Some(b) => {
                                b.set_length(u64::from(v.desired));
                                b.set_position(u64::from(v.running));
                                let state = rollout_state_name(
                                    v.record.as_ref().and_then(|r| r.rollout.as_ref()).map_or(0, |r| r.state),
                                );
                                let pending =
                                    if v.pending > 0 { format!("{} pending, ", v.pending) } else { String::new() };
                                b.set_message(format!("({pending}{state})"));
                            }
                            None => plain(&line),
                        }
                        f.last_line = line;
                    }
                    f.last_view = Some((*v).clone());
                    if let Some(ro) = v.record.as_ref().and_then(|r| r.rollout.as_ref())
                        && ro.state == RolloutState::RollingBack as i32
                        && !ro.message.is_empty()
                    {
                        f.rollback_reason = Some(ro.message.clone());
                    }
                    match rollout_progress(v, &f.target, f.rollback_reason.as_deref()) {
                        Progress::Waiting => {}
                        Progress::Done => f.outcome = Some(Ok(())),
                        Progress::Failed(m) => f.outcome = Some(Err(m)),
                    }
                }
            }
            Err(s) if !is_transient(&s) => {
                bars.clear();
                bail!("following the rollouts failed: {}", status_text(&s));
            }
            Err(s) => {
                let text = status_text(&s);
                if last_error.as_deref() != Some(text.as_str()) {
                    let msg = format!("reading the services failed, retrying: {text}");
                    bars.println(&msg);
                }
                last_error = Some(text);
            }
        }
        // Finished bars and lines, as each service ends.
        for f in follows.iter_mut() {
            let Some(outcome) = &f.outcome else { continue };
            if let Some(b) = f.bar.take() {
                crate::progress::settle(b, outcome, "rolled out");
            }
        }
        if follows.iter().all(|f| f.outcome.is_some()) || tokio::time::Instant::now() >= deadline {
            break;
        }
        changes.next(deadline).await;
    }
    bars.close(follows.iter().map(|f| &f.bar));
    let mut failures = Vec::new();
    let mut unfinished = Vec::new();
    for f in &follows {
        let k = key(&f.target.namespace, &f.target.name);
        match &f.outcome {
            Some(Ok(())) => {
                let v = f.last_view.as_ref();
                let rolled_back = v
                    .and_then(|v| v.record.as_ref())
                    .and_then(|r| r.rollout.as_ref())
                    .is_some_and(|r| r.state == RolloutState::RolledBack as i32);
                plain(&format!(
                    "service {k} {} (version {}): {}/{} running",
                    if rolled_back { "rolled back" } else { "rolled out" },
                    v.and_then(|v| v.record.as_ref()).map_or(f.target.min_version, |r| r.version),
                    v.map_or(0, |v| v.running),
                    v.map_or(0, |v| v.desired),
                ));
            }
            Some(Err(m)) => {
                eprintln!("service {k}: {m}");
                failures.push(k);
            }
            None => unfinished.push(f),
        }
    }
    if !unfinished.is_empty() {
        let names = node_names(client).await;
        for f in &unfinished {
            eprintln!("{}", timeout_report(client, f, timeout, &names).await);
        }
        if let Some(e) = &last_error {
            eprintln!("the last attempt to read the services failed: {e}");
        }
    }
    match (failures.is_empty(), unfinished.is_empty()) {
        (true, true) => Ok(()),
        (false, true) => {
            bail!("the rollout of {} failed (see above)", failures.join(", "))
        }
        _ => {
            let u: Vec<String> = unfinished.iter().map(|f| key(&f.target.namespace, &f.target.name)).collect();
            bail!(
                "timed out after {} waiting for {} to roll out{}; see the reasons above, \
                 `berth describe service NAME -n NS`, or wait longer with --timeout",
                humantime::format_duration(timeout),
                u.join(", "),
                if failures.is_empty() { String::new() } else { format!(" ({} failed)", failures.join(", ")) }
            )
        }
    }
}

/// Errors worth retrying while following a rollout (a leader change, a master restarting).
pub(crate) fn is_transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Unknown
            | Code::Cancelled
            | Code::ResourceExhausted
    )
}

/// What a service whose rollout did not finish in time still lacks.
async fn timeout_report(client: &Client, f: &Follow, timeout: Duration, names: &HashMap<String, String>) -> String {
    let k = key(&f.target.namespace, &f.target.name);
    let resp = match get_service(client, &f.target.namespace, &f.target.name).await {
        Ok(r) => r,
        Err(s) => {
            let last = f.last_view.as_ref().map(|v| progress_line(&k, v)).unwrap_or_else(|| format!("{k}: unknown"));
            return format!(
                "{last} after {}; reading its tasks failed: {}",
                humantime::format_duration(timeout),
                status_text(&s)
            );
        }
    };
    let v = resp.service.unwrap_or_default();
    let r = v.record.clone().unwrap_or_default();
    let ro = r.rollout.clone().unwrap_or_default();
    let mut lines = vec![format!(
        "service {k}: {}/{} running after {}; rollout {}: {}",
        v.running,
        v.desired,
        humantime::format_duration(timeout),
        rollout_state_name(ro.state),
        if ro.message.is_empty() { "-" } else { &ro.message }
    )];
    for t in resp.tasks.iter().filter(|t| t.desired_state == TaskState::Running as i32) {
        let o = TaskOut::from_task(t, names);
        if o.state == "running" && o.health != "unhealthy" && o.health != "starting" {
            continue;
        }
        let slot = if t.slot == 0 { String::new() } else { format!(" (slot {})", t.slot) };
        if t.node_id.is_empty() {
            let reason = if t.pending_reason.is_empty() { "waiting to be scheduled" } else { &t.pending_reason };
            lines.push(format!("  task {}{slot} pending: {reason}", t.id));
        } else {
            let health = if o.health == "unknown" { String::new() } else { format!(", {}", o.health) };
            let msg = o.message_column();
            let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
            lines.push(format!(
                "  task {}{slot} on {} (version {}): {}{health}{msg}",
                t.id,
                o.node_column(),
                t.spec_version,
                o.state
            ));
        }
    }
    lines.join("\n")
}

// ---------------------------------------------------------------------------------------------
// get

/// `berth get services --watch`: every service as it is now, then each change, from the master's
/// `WatchServices` stream. After the stream breaks (its master stopped) it is opened again on
/// another master; that one sends every service again, so only what differs from what was
/// printed is printed, and a service deleted in between is found by a list and printed deleted.
async fn watch_services(client: &Client, namespace: &str, format: Format) -> Result<()> {
    let wide = format == Format::Wide;
    let mut headers = vec!["EVENT"];
    headers.extend_from_slice(if wide { SERVICE_WIDE_HEADERS } else { SERVICE_HEADERS });
    let mut rows = matches!(format, Format::Table | Format::Wide).then(|| output::RowStream::new(&headers));
    let mut seen: HashMap<String, ServiceView> = HashMap::new();
    let mut print = |event: &str, v: &ServiceView| {
        let out = ServiceOut::from_view(v);
        match rows.as_mut() {
            Some(rows) => {
                let mut row = vec![event.to_string()];
                row.extend(service_rows(std::slice::from_ref(&out), wide, now_ms()).remove(0));
                rows.line(row);
            }
            None => {
                #[derive(Serialize)]
                struct Change<'a> {
                    event: String,
                    service: &'a ServiceOut,
                }
                output::stream_item(format, &Change { event: event.to_lowercase(), service: &out });
            }
        }
    };
    let key = |v: &ServiceView| v.record.as_ref().map(|r| format!("{}/{}", r.namespace, r.name)).unwrap_or_default();
    let mut first = true;
    // Between attempts that brought nothing (a master that breaks the stream at once).
    let mut backoff = Duration::from_millis(100);
    loop {
        let req = pb::WatchServicesRequest { namespace: namespace.to_string() };
        let mut stream = client
            .call(Call::Idempotent, |ch| {
                let req = req.clone();
                async move { control(ch).watch_services(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        if !first {
            let now: HashSet<String> = list_services(client, namespace).await?.iter().map(key).collect();
            let gone: Vec<String> = seen.keys().filter(|k| !now.contains(*k)).cloned().collect();
            for k in gone {
                if let Some(v) = seen.remove(&k) {
                    print("DELETED", &v);
                }
            }
        }
        first = false;
        let mut heard = false;
        let why = loop {
            let ev = match stream.message().await {
                Ok(Some(ev)) => ev,
                Ok(None) => break "the master ended the stream".to_string(),
                Err(s) => break s.message().to_string(),
            };
            heard = true;
            let Some(v) = ev.service else { continue };
            let k = key(&v);
            if ev.kind == "delete" {
                if seen.remove(&k).is_some() {
                    print("DELETED", &v);
                }
            } else if seen.get(&k) != Some(&v) {
                let event = if seen.contains_key(&k) { "MODIFIED" } else { "ADDED" };
                print(event, &v);
                seen.insert(k, v);
            }
        };
        eprintln!("the watch of the services broke ({why}); following again from another master");
        if heard {
            backoff = Duration::from_millis(100);
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

pub async fn run_get(cmd: GetCmd, g: &Global) -> Result<()> {
    match cmd {
        GetCmd::Nodes => cmd_nodes::run_get(cmd_nodes::GetCmd::Nodes, g).await,
        GetCmd::Networks { namespace } => crate::cmd_networks::run_get(namespace.as_deref(), g).await,
        GetCmd::Volumes { namespace } => crate::cmd_storage::run_get_volumes(namespace.as_deref(), g).await,
        GetCmd::Routes { namespace } => crate::cmd_routes::run_get(namespace.as_deref(), g).await,
        GetCmd::Namespaces => crate::cmd_access::run_get_namespaces(g).await,
        GetCmd::Services { namespace, watch: true } => {
            let client = crate::config::client(g)?;
            watch_services(&client, namespace.as_deref().unwrap_or(""), g.output).await
        }
        GetCmd::Services { namespace, watch: false } => {
            let client = crate::config::client(g)?;
            let views = list_services(&client, namespace.as_deref().unwrap_or("")).await?;
            let out: Vec<ServiceOut> = views.iter().map(ServiceOut::from_view).collect();
            let now = now_ms();
            output::emit(g.output, &out, |out| {
                let wide = g.output == Format::Wide;
                if out.is_empty() {
                    eprintln!("no services{}: create one with `berth apply -f FILE`", in_ns(namespace.as_deref()));
                    return;
                }
                let headers = if wide { SERVICE_WIDE_HEADERS } else { SERVICE_HEADERS };
                output::table(headers, &service_rows(out, wide, now));
            });
            Ok(())
        }
        GetCmd::Tasks { namespace, service, all } => {
            let client = crate::config::client(g)?;
            let req = pb::ListTasksRequest {
                namespace: namespace.clone().unwrap_or_default(),
                service: service.clone().unwrap_or_default(),
                all,
            };
            let tasks = client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { control(ch).list_tasks(req).await.map(|r| r.into_inner().tasks) }
                })
                .await?;
            let names =
                if tasks.iter().any(|t| !t.node_id.is_empty()) { node_names(&client).await } else { HashMap::new() };
            let out: Vec<TaskOut> = tasks.iter().map(|t| TaskOut::from_task(t, &names)).collect();
            let now = now_ms();
            output::emit(g.output, &out, |out| {
                let wide = g.output == Format::Wide;
                if out.is_empty() {
                    let of = service.as_deref().map(|s| format!(" of service {s}")).unwrap_or_default();
                    let hint = if all { "" } else { " (--all includes ended tasks)" };
                    eprintln!("no tasks{of}{}{hint}", in_ns(namespace.as_deref()));
                    return;
                }
                let headers = if wide { TASK_WIDE_HEADERS } else { TASK_HEADERS };
                output::table(headers, &task_rows(out, wide, now));
            });
            Ok(())
        }
    }
}

fn in_ns(ns: Option<&str>) -> String {
    ns.map(|n| format!(" in namespace {n}")).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// describe

pub async fn run_describe(cmd: DescribeCmd, g: &Global) -> Result<()> {
    let (name, namespace) = match cmd {
        DescribeCmd::Service { name, namespace } => (name, namespace),
        DescribeCmd::Volume { name, namespace } => {
            return crate::cmd_storage::run_describe_volume(&namespace, &name, g).await;
        }
        DescribeCmd::Route { name, namespace } => {
            return crate::cmd_routes::run_describe(&namespace, &name, g).await;
        }
        DescribeCmd::Network { name, namespace } => {
            return crate::cmd_networks::run_describe(&namespace, &name, g).await;
        }
    };
    let client = crate::config::client(g)?;
    let resp = get_service(&client, &namespace, &name).await?;
    let names = node_names(&client).await;
    let view = resp.service.unwrap_or_default();
    let service = ServiceOut::from_view(&view);
    // Events are shown when this identity may read them (they live in the key space).
    let (events, events_note) = match crate::cmd_events::list(&client, 0).await {
        Ok((all, _)) => {
            let mut mine: Vec<_> =
                all.into_iter().filter(|e| e.concerns("service", &service.namespace, &service.name)).collect();
            let skip = mine.len().saturating_sub(DESCRIBE_EVENTS);
            (mine.split_off(skip), None)
        }
        Err(e) => (Vec::new(), Some(output::describe(&e))),
    };
    let out =
        DescribeOut { service, tasks: resp.tasks.iter().map(|t| TaskOut::from_task(t, &names)).collect(), events };
    let now = now_ms();
    output::emit(g.output, &out, |d| {
        for l in describe_lines(&d.service, now) {
            out_line(&l);
        }
        out_line("");
        if d.tasks.is_empty() {
            out_line("Tasks: none");
        } else {
            out_line("Tasks:");
            let headers = ["ID", "SLOT", "NODE", "VERSION", "DESIRED", "STATE", "HEALTH", "AGE", "MESSAGE"];
            out_line(output::render_table(&headers, &describe_task_rows(&d.tasks, now)).trim_end());
        }
        let pending: Vec<&TaskOut> =
            d.tasks.iter().filter(|t| t.desired_state == "running" && t.node.is_empty()).collect();
        if !pending.is_empty() {
            out_line("");
            for t in pending {
                let reason = if t.pending_reason.is_empty() { "waiting to be scheduled" } else { &t.pending_reason };
                let slot = if t.slot == 0 { String::new() } else { format!(" (slot {})", t.slot) };
                out_line(&format!("Pending: {}{slot}: {reason}", t.id));
            }
        }
        out_line("");
        match (&events_note, d.events.is_empty()) {
            (Some(why), _) => out_line(&format!("Events: cannot be read: {why}")),
            (None, true) => out_line("Events: none in the last hour"),
            (None, false) => {
                out_line("Events:");
                let rows = crate::cmd_events::rows(&d.events.iter().collect::<Vec<_>>());
                out_line(output::render_table(&crate::cmd_events::HEADERS, &rows).trim_end());
            }
        }
    });
    Ok(())
}

fn fmt_update(u: &spec::UpdateConfig) -> String {
    let order = match u.order {
        spec::UpdateOrder::StopFirst => "stop-first",
        spec::UpdateOrder::StartFirst => "start-first",
    };
    let action = match u.failure_action {
        spec::FailureAction::Pause => "pause",
        spec::FailureAction::Rollback => "rollback",
        spec::FailureAction::Continue => "continue",
    };
    format!(
        "parallelism {}, delay {}, {order}, on failure {action}, monitor {}, max failure ratio {}",
        u.parallelism,
        spec::format_duration(u.delay),
        spec::format_duration(u.monitor),
        u.max_failure_ratio
    )
}

/// The spec summary, version and rollout of `describe service`.
pub fn describe_lines(s: &ServiceOut, now: i64) -> Vec<String> {
    let mut l: Vec<(String, String)> = vec![
        ("Name".into(), s.name.clone()),
        ("Namespace".into(), s.namespace.clone()),
        (
            "Version".into(),
            if s.previous_version > 0 {
                format!("{} (previous {})", s.version, s.previous_version)
            } else {
                s.version.to_string()
            },
        ),
        ("Mode".into(), s.mode.clone()),
        (
            "Replicas".into(),
            format!(
                "{} running, {} desired{}",
                s.running,
                s.desired,
                if s.pending > 0 { format!(", {} pending", s.pending) } else { String::new() }
            ),
        ),
    ];
    if !s.vip.is_empty() {
        l.push(("Virtual IP".into(), s.vip.clone()));
    }
    let rollout = if s.rollout.message.is_empty() {
        s.rollout.state.to_string()
    } else {
        format!("{}: {}", s.rollout.state, s.rollout.message)
    };
    l.push(("Rollout".into(), rollout));
    if s.rollout.failures > 0 {
        l.push(("Rollout failures".into(), s.rollout.failures.to_string()));
    }
    if s.deleting {
        l.push(("Deleting".into(), "yes: its tasks are being stopped".into()));
    }
    l.push(("Created".into(), format!("{} ({} ago)", fmt_time(s.created_at_ms), age_since(s.created_at_ms, now))));
    l.push(("Updated".into(), format!("{} ({} ago)", fmt_time(s.updated_at_ms), age_since(s.updated_at_ms, now))));
    match serde_json::from_value::<spec::Service>(s.spec.clone()) {
        Ok(doc) => spec_lines(&doc, &mut l),
        Err(_) => l.push(("Spec".into(), s.spec.to_string())),
    }
    let width = l.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    l.into_iter().map(|(k, v)| format!("{:<width$} {v}", format!("{k}:")).trim_end().to_string()).collect()
}

/// What the task may do, in one line: `PRIVILEGED` loudly, else the sandbox's user and any
/// capability changes.
fn security_line(t: &spec::TaskSpec) -> String {
    if t.privileged {
        return "PRIVILEGED: no sandbox (host root, every capability, no seccomp filter); agents run it only with \
                --allow-privileged"
            .into();
    }
    let user = match (&t.user, t.runtime) {
        (Some(u), _) => u.clone(),
        (None, spec::Runtime::Docker) => "the image's".into(),
        (None, spec::Runtime::Process | spec::Runtime::Oci) => spec::security::DEFAULT_USER.to_string(),
    };
    let mut s = format!("sandboxed, user {user}");
    if !t.cap_add.is_empty() {
        s.push_str(&format!(", cap_add {}", t.cap_add.join(" ")));
    }
    if !t.cap_drop.is_empty() {
        s.push_str(&format!(", cap_drop {}", t.cap_drop.join(" ")));
    }
    s
}

fn spec_lines(doc: &spec::Service, l: &mut Vec<(String, String)>) {
    let sp = &doc.spec;
    let t = &sp.task;
    if !doc.metadata.labels.is_empty() {
        let labels: Vec<String> = doc.metadata.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        l.push(("Labels".into(), labels.join(", ")));
    }
    let runtime = match t.runtime {
        spec::Runtime::Process => "process",
        spec::Runtime::Docker => "docker",
        spec::Runtime::Oci => "oci",
    };
    l.push(("Runtime".into(), runtime.into()));
    if let Some(image) = &t.image {
        l.push(("Image".into(), image.clone()));
    }
    if let Some(secret) = &t.image_pull_secret {
        l.push(("Pull secret".into(), secret.clone()));
    }
    if !t.command.is_empty() {
        l.push(("Command".into(), t.command.join(" ")));
    }
    if !t.args.is_empty() {
        l.push(("Args".into(), t.args.join(" ")));
    }
    if let Some(w) = &t.workdir {
        l.push(("Workdir".into(), w.clone()));
    }
    if !t.env.is_empty() {
        l.push(("Env".into(), t.env.keys().cloned().collect::<Vec<_>>().join(", ")));
    }
    l.push(("Security".into(), security_line(t)));
    let res = &t.resources;
    let mut r = format!("cpu {}, memory {}", res.cpu, output::human_bytes(res.memory.bytes()));
    if let Some(lim) = &res.limits {
        let cpu = lim.cpu.map_or("-".to_string(), |c| c.to_string());
        let mem = lim.memory.map_or("-".to_string(), |m| output::human_bytes(m.bytes()));
        r.push_str(&format!(" (limits: cpu {cpu}, memory {mem})"));
    }
    let pids = res.limits.as_ref().and_then(|l| l.pids).unwrap_or(spec::security::DEFAULT_PIDS_MAX);
    r.push_str(&format!(", pids {pids}"));
    l.push(("Resources".into(), r));
    if !t.ports.is_empty() {
        let ports: Vec<String> = t
            .ports
            .iter()
            .map(|p| {
                let proto = match p.protocol {
                    spec::Protocol::Tcp => "tcp",
                    spec::Protocol::Udp => "udp",
                };
                match p.published {
                    Some(h) => format!("{h}->{}/{proto}", p.container),
                    None => format!("{}/{proto}", p.container),
                }
            })
            .collect();
        l.push(("Ports".into(), ports.join(", ")));
    }
    if let Some(h) = &t.health {
        let probe = match h.probe() {
            Some(spec::Probe::Http(p)) => format!("http GET :{}{}", p.port, p.path),
            Some(spec::Probe::Tcp(p)) => format!("tcp :{}", p.port),
            Some(spec::Probe::Exec(e)) => format!("exec {}", e.command.join(" ")),
            None => "-".into(),
        };
        l.push((
            "Health".into(),
            format!(
                "{probe} every {}, timeout {}, {} retries, start period {}",
                spec::format_duration(h.interval),
                spec::format_duration(h.timeout),
                h.retries,
                spec::format_duration(h.start_period)
            ),
        ));
    }
    let p = &sp.placement;
    let mut placement = Vec::new();
    if !p.constraints.is_empty() {
        placement.push(format!(
            "constraints: {}",
            p.constraints.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    if !p.spread.is_empty() {
        placement.push(format!("spread: {}", p.spread.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")));
    }
    if let Some(m) = p.max_replicas_per_node {
        placement.push(format!("max {m} per node"));
    }
    if !p.anti_affinity.is_empty() {
        placement.push(format!("anti-affinity: {}", p.anti_affinity.join(", ")));
    }
    if !p.affinity.is_empty() {
        placement.push(format!("affinity: {}", p.affinity.join(", ")));
    }
    l.push(("Placement".into(), if placement.is_empty() { "any node".into() } else { placement.join("; ") }));
    let rs = &sp.restart;
    let cond = match rs.condition {
        spec::RestartCondition::Any => "any",
        spec::RestartCondition::OnFailure => "on-failure",
        spec::RestartCondition::None => "none",
    };
    l.push((
        "Restart".into(),
        format!(
            "{cond}, delay {}, max attempts {}, window {}",
            spec::format_duration(rs.delay),
            rs.max_attempts.map_or("unlimited".into(), |m| m.to_string()),
            if rs.window.is_zero() { "forever".into() } else { spec::format_duration(rs.window) }
        ),
    ));
    l.push(("Update".into(), fmt_update(&sp.update)));
    l.push(("Rollback".into(), fmt_update(&sp.rollback)));
    let disconnect = match sp.disconnect {
        spec::DisconnectPolicy::Replace => "replace",
        spec::DisconnectPolicy::AtMostOnce => "at-most-once",
    };
    l.push(("Disconnect".into(), disconnect.into()));
}

// ---------------------------------------------------------------------------------------------
// scale, rollout, delete

pub async fn run_scale(a: ScaleArgs, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let mut outs = Vec::new();
    let mut failed = Vec::new();
    let mut scaled = Vec::new();
    for (name, replicas) in &a.targets {
        let req = pb::ScaleRequest { service: Some(service_ref(&a.namespace, name)), replicas: *replicas };
        let r = client
            .call(Call::Idempotent, |ch| {
                let req = req.clone();
                async move { control(ch).scale(req).await.map(|r| r.into_inner()) }
            })
            .await;
        match r {
            Ok(resp) => {
                let s = ServiceOut::from_view(&resp.service.unwrap_or_default());
                if is_table(g.output) {
                    out_line(&format!(
                        "service {} scaled to {replicas} (version {}, {}/{} running)",
                        key(&s.namespace, &s.name),
                        s.version,
                        s.running,
                        s.desired
                    ));
                }
                outs.push(s);
                scaled.push(crate::wait::Target {
                    namespace: a.namespace.clone(),
                    name: name.clone(),
                    goal: crate::wait::Goal::Scaled { replicas: *replicas },
                });
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::NotFound | Code::FailedPrecondition | Code::InvalidArgument | Code::Aborted
                ) =>
            {
                eprintln!("error: {}: {}", key(&a.namespace, name), status_text(&s));
                failed.push(name.clone());
            }
            Err(s) => return Err(anyhow!("scaling {}: {}", key(&a.namespace, name), status_text(&s))),
        }
    }
    if !is_table(g.output) {
        output::emit(g.output, &outs, |_| {});
    }
    let waited = if a.wait && !scaled.is_empty() {
        crate::wait::wait_for(&client, scaled, a.timeout, is_table(g.output)).await
    } else {
        Ok(())
    };
    if !failed.is_empty() {
        if let Err(e) = waited {
            eprintln!("error: {}", output::describe(&e));
        }
        bail!(
            "{} of {} services were not scaled ({}): see the errors above",
            failed.len(),
            a.targets.len(),
            failed.join(", ")
        );
    }
    waited
}

pub async fn run_rollout(cmd: RolloutCmd, g: &Global) -> Result<()> {
    let (target, action, wait) = match cmd {
        RolloutCmd::Status { target, wait } => (target, RolloutAction::Status, wait.wait.then_some(wait.timeout)),
        RolloutCmd::Pause(t) => (t, RolloutAction::Pause, None),
        RolloutCmd::Resume(t) => (t, RolloutAction::Resume, None),
        RolloutCmd::Undo { target, wait } => (target, RolloutAction::Undo, wait.wait.then_some(wait.timeout)),
    };
    let client = crate::config::client(g)?;
    let req = pb::RolloutRequest { service: Some(service_ref(&target.namespace, &target.name)), action: action as i32 };
    // Undo swaps the spec with the previous one: twice would go back again. Pause and resume
    // set a state, so sending them again is harmless.
    let kind = if action == RolloutAction::Undo { Call::Once } else { Call::Idempotent };
    let resp = client
        .call(kind, |ch| {
            let req = req.clone();
            async move { control(ch).rollout(req).await.map(|r| r.into_inner()) }
        })
        .await
        .map_err(|s| {
            if berth_api::outcome(&s) == Some(berth_api::Outcome::Unknown) {
                let next = format!(
                    "see where the rollout stands with `berth rollout status {} -n {}` before undoing again",
                    target.name, target.namespace
                );
                return crate::client::explain(s, &next);
            }
            anyhow!("{}: {}", key(&target.namespace, &target.name), status_text(&s))
        })?;
    let view = resp.service.unwrap_or_default();
    let s = ServiceOut::from_view(&view);
    let k = key(&s.namespace, &s.name);
    output::emit(g.output, &s, |s| {
        let status = rollout_status_line(s);
        match action {
            RolloutAction::Pause => out_line(&format!("service {k} rollout paused")),
            RolloutAction::Resume => out_line(&format!("service {k} rollout resumed")),
            RolloutAction::Undo => {
                out_line(&format!("service {k} rolling back to the previous spec (now version {})", s.version))
            }
            _ => {}
        }
        out_line(&status);
    });
    if let Some(timeout) = wait {
        let version = view.record.as_ref().map_or(0, |r| r.version);
        // Back on the previous spec is what `undo` asked for (also when `status` follows an undo).
        let rollback_ok = action == RolloutAction::Undo || s.rollout.message.starts_with("undo");
        let t = WaitTarget { namespace: s.namespace.clone(), name: s.name.clone(), min_version: version, rollback_ok };
        wait_rollouts(&client, vec![t], timeout, is_table(g.output)).await?;
    }
    Ok(())
}

/// `service default/web: rollout updating: rolling out version 2; 2/3 running, 1 pending (version 2)`.
pub fn rollout_status_line(s: &ServiceOut) -> String {
    let msg = if s.rollout.message.is_empty() { String::new() } else { format!(": {}", s.rollout.message) };
    let pending = if s.pending > 0 { format!(", {} pending", s.pending) } else { String::new() };
    let deleting = if s.deleting { " (deleting)" } else { "" };
    format!(
        "service {}{deleting}: rollout {}{msg}; {}/{} running{pending} (version {})",
        key(&s.namespace, &s.name),
        s.rollout.state,
        s.running,
        s.desired,
        s.version
    )
}

pub async fn run_delete(cmd: DeleteCmd, g: &Global) -> Result<()> {
    let (names, namespace, wait, timeout) = match cmd {
        DeleteCmd::Service { names, namespace, wait, timeout } => (names, namespace, wait, timeout),
        DeleteCmd::Network { names, namespace } => return crate::cmd_networks::run_delete(&namespace, &names, g).await,
        DeleteCmd::Volume { names, namespace } => {
            return crate::cmd_storage::run_delete_volumes(&namespace, &names, g).await;
        }
        DeleteCmd::Route { names, namespace } => return crate::cmd_routes::run_delete(&namespace, &names, g).await,
    };
    let client = crate::config::client(g)?;
    let mut failed = Vec::new();
    let mut deleting = Vec::new();
    for name in &names {
        let req = service_ref(&namespace, name);
        let r = client
            .call(Call::Idempotent, |ch| {
                let req = req.clone();
                async move { control(ch).delete_service(req).await.map(|r| r.into_inner()) }
            })
            .await;
        match r {
            Ok(_) => {
                out_line(&format!("service {} deleting", key(&namespace, name)));
                deleting.push(crate::wait::Target {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    goal: crate::wait::Goal::Deleted,
                });
            }
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition | Code::Aborted) => {
                eprintln!("error: {}", status_text(&s));
                failed.push(name.clone());
            }
            Err(s) => return Err(anyhow!("deleting {}: {}", key(&namespace, name), status_text(&s))),
        }
    }
    let waited = if wait && !deleting.is_empty() {
        crate::wait::wait_for(&client, deleting, timeout, true).await
    } else {
        Ok(())
    };
    if !failed.is_empty() {
        if let Err(e) = waited {
            eprintln!("error: {}", output::describe(&e));
        }
        bail!(
            "{} of {} services were not deleted ({}): see the errors above",
            failed.len(),
            names.len(),
            failed.join(", ")
        );
    }
    waited
}

// ---------------------------------------------------------------------------------------------
// logs

/// One log line as printed: `[time ]line` with `task | ` first when several tasks are involved.
pub fn format_log_line(e: &pb::LogEntry, prefix_width: Option<usize>, timestamps: bool) -> String {
    let mut s = String::new();
    if let Some(w) = prefix_width {
        s.push_str(&format!("{:<w$} | ", e.task_id));
    }
    if timestamps {
        let t = UNIX_EPOCH + Duration::from_millis(e.ts_ms.max(0) as u64);
        s.push_str(&humantime::format_rfc3339_millis(t).to_string());
        s.push(' ');
    }
    let line = e.line.strip_suffix('\n').unwrap_or(&e.line);
    s.push_str(line.strip_suffix('\r').unwrap_or(line));
    s
}

fn print_log_entry(e: &pb::LogEntry, prefix_width: Option<usize>, timestamps: bool) {
    let line = format_log_line(e, prefix_width, timestamps);
    if e.stream == "stderr" {
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    } else {
        out_line(&line);
    }
}

async fn open_logs(client: &Client, req: pb::LogsRequest) -> Result<tonic::Streaming<pb::LogEntry>, Status> {
    client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { control(ch).logs(req).await.map(|r| r.into_inner()) }
        })
        .await
}

enum LogMsg {
    Entry(pb::LogEntry),
    Failed { task: String, live: bool, error: String },
}

pub async fn run_logs(a: LogsArgs, g: &Global) -> Result<()> {
    let since_ms = a.since.as_deref().map(|s| parse_since(s, now_ms())).transpose().map_err(|e| anyhow!(e))?;
    let client = std::sync::Arc::new(crate::config::client(g)?);
    let base = pb::LogsRequest {
        target: String::new(),
        namespace: a.namespace.clone(),
        follow: a.follow,
        tail: a.tail,
        since_ms: since_ms.unwrap_or(0),
    };
    // Service names are DNS labels; task ids contain dots.
    if a.target.contains('.') {
        let req = pb::LogsRequest { target: a.target.clone(), ..base };
        let mut stream = open_logs(&client, req).await.map_err(|s| {
            if s.code() == Code::NotFound {
                anyhow!("no task {}: list task ids with `berth get tasks --all`", a.target)
            } else {
                anyhow!("{}", status_text(&s))
            }
        })?;
        loop {
            match stream.message().await {
                Ok(Some(e)) => print_log_entry(&e, None, a.timestamps),
                Ok(None) => return Ok(()),
                Err(s) => bail!("the log stream of task {} ended: {}", a.target, status_text(&s)),
            }
        }
    }
    // A service: one stream per task (the tasks the master would read: placed ones, only live
    // ones with --follow), so one unreachable task does not end the others.
    let k = key(&a.namespace, &a.target);
    let resp = get_service(&client, &a.namespace, &a.target).await.map_err(|s| {
        if s.code() == Code::NotFound {
            anyhow!(
                "no service {k} and no task with that id: list them with `berth get services` and `berth get tasks`"
            )
        } else {
            anyhow!("{}", status_text(&s))
        }
    })?;
    let tasks: Vec<(String, bool)> = resp
        .tasks
        .iter()
        .map(|t| (t, t.desired_state == TaskState::Running as i32))
        .filter(|(t, live)| !t.node_id.is_empty() && (*live || !a.follow))
        .map(|(t, live)| (t.id.clone(), live))
        .collect();
    if tasks.is_empty() {
        bail!(
            "service {k} has no task placed on a node{}, so there are no logs to read: see why with \
             `berth describe service {} -n {}`",
            if a.follow { " and running" } else { "" },
            a.target,
            a.namespace
        );
    }
    let prefix_width = (tasks.len() > 1).then(|| tasks.iter().map(|(id, _)| id.len()).max().unwrap_or(0));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<LogMsg>(1024);
    for (id, live) in &tasks {
        let (client, tx) = (client.clone(), tx.clone());
        let (task, live) = (id.clone(), *live);
        let req = pb::LogsRequest { target: id.clone(), ..base.clone() };
        tokio::spawn(async move {
            let res = async {
                let mut stream = open_logs(&client, req).await?;
                while let Some(e) = stream.message().await? {
                    if tx.send(LogMsg::Entry(e)).await.is_err() {
                        break;
                    }
                }
                Ok::<(), Status>(())
            }
            .await;
            if let Err(s) = res {
                let text = status_text(&s);
                let error = text.strip_prefix(&format!("logs of task {task}: ")).unwrap_or(&text).to_string();
                let _ = tx.send(LogMsg::Failed { task, live, error }).await;
            }
        });
    }
    drop(tx);
    let mut live_failures = Vec::new();
    let mut first_error = None;
    let mut failures = 0;
    while let Some(m) = rx.recv().await {
        match m {
            LogMsg::Entry(e) => print_log_entry(&e, prefix_width, a.timestamps),
            LogMsg::Failed { task, live, error } => {
                failures += 1;
                // Ended tasks often have no logs left (never started, or removed by their agent).
                if live {
                    eprintln!("error: logs of task {task}: {error}");
                    live_failures.push(task.clone());
                }
                first_error.get_or_insert(format!("task {task}: {error}"));
            }
        }
    }
    if !live_failures.is_empty() {
        bail!(
            "the logs of {} of {} tasks could not be read ({}): see the errors above",
            live_failures.len(),
            tasks.len(),
            live_failures.join(", ")
        );
    }
    if failures == tasks.len() {
        bail!("no task's logs could be read; the first error was: {}", first_error.unwrap_or_default());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::pb::{Rollout, ServiceRecord};

    fn parse(args: &[&str]) -> Result<crate::Cli, clap::Error> {
        use clap::Parser;
        crate::Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
    }

    #[test]
    fn command_line() {
        use clap::CommandFactory;
        crate::Cli::command().debug_assert();
        for args in [
            &["get", "services", "-n", "prod", "-o", "wide"][..],
            &["get", "svc"],
            &["get", "service"],
            &["get", "tasks", "--service", "web", "--all", "-o", "json"],
            &["get", "task", "-n", "prod"],
            &["get", "nodes", "-o", "json"],
            &["apply", "-f", "a.yaml", "-f", "dir", "--dry-run", "--wait", "--timeout", "2m"],
            &["describe", "service", "web", "-n", "prod"],
            &["describe", "svc", "web"],
            &["scale", "web=3", "api=0", "-n", "prod"],
            &["scale", "web=3", "--wait", "--timeout", "2m"],
            &["delete", "service", "web", "--wait", "--timeout", "30s"],
            &["rollout", "status", "web", "--wait", "--timeout", "30s"],
            &["rollout", "undo", "web", "-n", "prod", "--wait"],
            &["delete", "service", "web", "api"],
            &["logs", "web", "-f", "--tail", "10", "--since", "5m", "-t"],
        ] {
            if let Err(e) = parse(args) {
                panic!("{args:?}: {e}");
            }
        }
        assert!(parse(&["scale", "web"]).err().expect("refused").to_string().contains("NAME=REPLICAS"));
        assert!(parse(&["apply"]).is_err());
        match parse(&["get", "tasks", "--service", "web"]).unwrap().command {
            crate::Cmd::Get(GetCmd::Tasks { service, all, namespace }) => {
                assert_eq!(service.as_deref(), Some("web"));
                assert!(!all);
                assert_eq!(namespace, None);
            }
            _ => panic!("not get tasks"),
        }
    }

    #[test]
    fn scale_arguments() {
        assert_eq!(parse_scale("web=3"), Ok(("web".into(), 3)));
        assert_eq!(parse_scale(" web = 0 "), Ok(("web".into(), 0)));
        assert!(parse_scale("web").unwrap_err().contains("NAME=REPLICAS"));
        assert!(parse_scale("=3").unwrap_err().contains("no service name"));
        assert!(parse_scale("web=x").unwrap_err().contains("not a whole number"));
        assert!(parse_scale("web=-1").unwrap_err().contains("not a whole number"));
        assert!(parse_scale("web=10001").unwrap_err().contains("over the limit"));
    }

    #[test]
    fn since_values() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_since("5m", now), Ok(now - 300_000));
        assert_eq!(parse_since("1h30m", now), Ok(now - 5_400_000));
        assert_eq!(parse_since("2024-05-01T12:00:00Z", now), Ok(1_714_564_800_000));
        assert_eq!(parse_since("2024-05-01T12:00:00.250Z", now), Ok(1_714_564_800_250));
        assert_eq!(parse_since("100000d", now), Ok(1));
        let e = parse_since("yesterday", now).unwrap_err();
        assert!(e.contains("5m") && e.contains("RFC 3339"), "{e}");
        assert!(parse_since("5", now).is_err());
    }

    #[test]
    fn state_names() {
        let all = [
            (TaskState::New, "new"),
            (TaskState::Pending, "pending"),
            (TaskState::Assigned, "assigned"),
            (TaskState::Starting, "starting"),
            (TaskState::Running, "running"),
            (TaskState::Complete, "complete"),
            (TaskState::Failed, "failed"),
            (TaskState::Shutdown, "shutdown"),
            (TaskState::Orphaned, "orphaned"),
        ];
        for (s, n) in all {
            assert_eq!(task_state_name(s as i32), n);
        }
        assert_eq!(task_state_name(99), "unknown");
        assert_eq!(health_name(TaskHealth::Unknown as i32), "unknown");
        assert_eq!(health_name(TaskHealth::Starting as i32), "starting");
        assert_eq!(health_name(TaskHealth::Healthy as i32), "healthy");
        assert_eq!(health_name(TaskHealth::Unhealthy as i32), "unhealthy");
        assert_eq!(rollout_state_name(RolloutState::RolledBack as i32), "rolled-back");
        assert_eq!(rollout_state_name(RolloutState::Completed as i32), "completed");
        assert_eq!(rollout_state_name(0), "none");
    }

    #[test]
    fn ages() {
        assert_eq!(fmt_age(-5), "0s");
        assert_eq!(fmt_age(42_000), "42s");
        assert_eq!(fmt_age(192_000), "3m12s");
        assert_eq!(fmt_age(180_000), "3m");
        assert_eq!(fmt_age(25 * 60_000 + 5_000), "25m");
        assert_eq!(fmt_age((4 * 3600 + 10 * 60) * 1000), "4h10m");
        assert_eq!(fmt_age(30 * 3600 * 1000), "30h");
        assert_eq!(fmt_age(12 * 86_400 * 1000), "12d");
        assert_eq!(truncate("abcdef", 10), "abcdef");
        assert_eq!(truncate("abcdefghijkl", 8), "abcde...");
    }

    fn view(state: RolloutState, running: u32, desired: u32, version: u64) -> ServiceView {
        ServiceView {
            record: Some(ServiceRecord {
                namespace: "default".into(),
                name: "web".into(),
                spec_json: r#"{"kind":"Service","metadata":{"name":"web"},"spec":{"mode":"replicated","task":{"image":"nginx:1.27"}}}"#.into(),
                version,
                created_at_ms: 1_000,
                rollout: Some(Rollout { state: state as i32, message: "rolling out version 2".into(), ..Default::default() }),
                ..Default::default()
            }),
            mod_revision: 7,
            desired,
            running,
            pending: desired.saturating_sub(running),
        }
    }

    #[test]
    fn service_json_and_table() {
        let s = ServiceOut::from_view(&view(RolloutState::Updating, 2, 3, 2));
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["mode"], "replicated");
        assert_eq!(j["rollout"]["state"], "updating");
        assert_eq!(j["spec"]["spec"]["task"]["image"], "nginx:1.27");
        for k in ["namespace", "name", "desired", "running", "pending", "version"] {
            assert!(j.get(k).is_some(), "{k}");
        }
        let rows = service_rows(std::slice::from_ref(&s), false, 61_000);
        assert_eq!(rows, vec![vec!["default", "web", "replicated", "2/3", "2", "updating", "1m"]]);
        let wide = service_rows(std::slice::from_ref(&s), true, 61_000);
        assert_eq!(wide[0].len(), SERVICE_WIDE_HEADERS.len());
        assert_eq!(wide[0][8], "nginx:1.27");
        let text = output::render_table(SERVICE_HEADERS, &rows);
        assert_eq!(
            text,
            "NAMESPACE  NAME  MODE        REPLICAS  VERSION  ROLLOUT   AGE\n\
             default    web   replicated  2/3       2        updating  1m\n"
        );
        assert_eq!(
            rollout_status_line(&s),
            "service default/web: rollout updating: rolling out version 2; 2/3 running, 1 pending (version 2)"
        );
    }

    #[test]
    fn task_json_and_table() {
        let t = Task {
            id: "web.1.abcdef0123".into(),
            namespace: "default".into(),
            service: "web".into(),
            slot: 1,
            spec_version: 2,
            node_id: "n-1".into(),
            desired_state: TaskState::Running as i32,
            state: TaskState::Failed as i32,
            message: "container exited".into(),
            exit_code: 3,
            created_at_ms: 1_000,
            ..Default::default()
        };
        let pending = Task {
            id: "web.2.0123456789".into(),
            namespace: "prod".into(),
            service: "web".into(),
            slot: 2,
            desired_state: TaskState::Running as i32,
            state: TaskState::Pending as i32,
            pending_reason: "no node has 4 CPUs free".into(),
            created_at_ms: 1_000,
            ..Default::default()
        };
        let names: HashMap<String, String> = [("n-1".to_string(), "agent-1".to_string())].into();
        let out: Vec<TaskOut> = [t, pending].iter().map(|t| TaskOut::from_task(t, &names)).collect();
        let j = serde_json::to_value(&out).unwrap();
        assert_eq!(j[0]["node"], "n-1");
        assert_eq!(j[0]["node_name"], "agent-1");
        assert_eq!(j[0]["state"], "failed");
        assert_eq!(j[0]["desired_state"], "running");
        assert_eq!(j[0]["health"], "unknown");
        assert_eq!(j[0]["exit_code"], 3);
        assert_eq!(j[1]["pending_reason"], "no node has 4 CPUs free");
        for k in ["id", "service", "namespace", "slot", "pid", "message", "spec_version", "created_at_ms"] {
            assert!(j[0].get(k).is_some(), "{k}");
        }
        let rows = task_rows(&out, false, 11_000);
        assert_eq!(
            rows[0],
            vec![
                "web.1.abcdef0123",
                "web",
                "1",
                "agent-1",
                "running",
                "failed",
                "-",
                "10s",
                "container exited (exit code 3)"
            ]
        );
        assert_eq!(rows[1][1], "prod/web");
        assert_eq!(rows[1][3], "-");
        assert_eq!(rows[1][8], "no node has 4 CPUs free");
        assert_eq!(task_rows(&out, true, 11_000)[0].len(), TASK_WIDE_HEADERS.len());
    }

    #[test]
    fn rollout_outcomes() {
        let t = |min_version, rollback_ok| WaitTarget {
            namespace: "default".into(),
            name: "web".into(),
            min_version,
            rollback_ok,
        };
        let p = |v: ServiceView, min| rollout_progress(&v, &t(min, false), None);
        assert_eq!(p(view(RolloutState::Updating, 2, 3, 2), 2), Progress::Waiting);
        assert_eq!(p(view(RolloutState::Completed, 3, 3, 2), 2), Progress::Done);
        assert_eq!(p(view(RolloutState::Completed, 3, 3, 3), 2), Progress::Done);
        // Completed but not every replica runs (unplaceable tasks): keep waiting.
        assert_eq!(p(view(RolloutState::Completed, 2, 3, 2), 2), Progress::Waiting);
        // The completed rollout of an older version does not count.
        assert_eq!(p(view(RolloutState::Completed, 3, 3, 1), 2), Progress::Waiting);
        assert_eq!(p(view(RolloutState::RollingBack, 1, 3, 2), 2), Progress::Waiting);
        let failed = rollout_progress(
            &view(RolloutState::RolledBack, 3, 3, 3),
            &t(2, false),
            Some("rolling back: 1 task failed"),
        );
        assert!(
            matches!(&failed, Progress::Failed(m) if m.contains("previous spec") && m.contains("1 task failed")),
            "{failed:?}"
        );
        assert!(
            matches!(p(view(RolloutState::Paused, 1, 3, 2), 2), Progress::Failed(m) if m.contains("rollout resume web -n default"))
        );
        // `rollout undo --wait`: rolled back is the goal.
        assert_eq!(rollout_progress(&view(RolloutState::RolledBack, 3, 3, 3), &t(3, true), None), Progress::Done);
        assert_eq!(rollout_progress(&view(RolloutState::RolledBack, 2, 3, 3), &t(3, true), None), Progress::Waiting);
        let mut deleting = view(RolloutState::Completed, 0, 0, 2);
        deleting.record.as_mut().unwrap().deleting = true;
        assert!(matches!(p(deleting, 2), Progress::Failed(_)));
        assert_eq!(
            progress_line("web", &view(RolloutState::Updating, 2, 3, 2)),
            "web: 2/3 running, 1 pending (updating)"
        );
        assert_eq!(progress_line("web", &view(RolloutState::Completed, 3, 3, 2)), "web: 3/3 running (completed)");
    }

    #[test]
    fn apply_output() {
        let r = ApplyOut {
            file: "web.yaml".into(),
            kind: "Service".into(),
            namespace: "default".into(),
            name: "web".into(),
            action: "would be updated".into(),
            version: 2,
            revision: 0,
            changes: vec!["spec.replicas: 2 -> 3".into()],
        };
        assert_eq!(
            apply_lines(&r),
            vec!["service default/web would be updated (version 2)", "    spec.replicas: 2 -> 3"]
        );
        let created = ApplyOut { action: "created".into(), version: 1, changes: vec!["(new service)".into()], ..r };
        assert_eq!(apply_lines(&created), vec!["service default/web created (version 1)"]);
        let net = ApplyOut {
            kind: "Network".into(),
            name: "backend".into(),
            action: "created".into(),
            changes: vec!["(new network: subnet 198.18.0.0/20, VNI 4096)".into()],
            ..created
        };
        assert_eq!(
            apply_lines(&net),
            vec!["network default/backend created", "    (new network: subnet 198.18.0.0/20, VNI 4096)"]
        );
    }

    #[test]
    fn inputs_from_files_dirs_and_stdin() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.yaml"), "b").unwrap();
        std::fs::write(dir.path().join("a.json"), "a").unwrap();
        std::fs::write(dir.path().join("c.YML"), "c").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let d = dir.path().display().to_string();
        let single = dir.path().join("b.yaml").display().to_string();
        let mut stdin: &[u8] = b"from stdin";
        let got = read_inputs(&[d.clone(), "-".into(), single.clone()], &mut stdin).unwrap();
        let texts: Vec<&str> = got.iter().map(|i| i.text.as_str()).collect();
        assert_eq!(texts, ["a", "b", "c", "from stdin", "b"]);
        assert_eq!(got[3].name, "<stdin>");
        assert!(got[0].name.ends_with("a.json"));
        let mut stdin: &[u8] = b"";
        assert!(read_inputs(&["-".into(), "-".into()], &mut stdin).unwrap_err().to_string().contains("twice"));
        let empty = tempfile::tempdir().unwrap();
        let e = read_inputs(&[empty.path().display().to_string()], &mut stdin).unwrap_err().to_string();
        assert!(e.contains("no *.yaml"), "{e}");
        let e = format!("{:#}", read_inputs(&["/no/such/file.yaml".into()], &mut stdin).unwrap_err());
        assert!(e.contains("/no/such/file.yaml"), "{e}");
    }

    #[test]
    fn log_lines() {
        let e = pb::LogEntry {
            task_id: "web.1.abc".into(),
            ts_ms: 1_714_564_800_250,
            stream: "stdout".into(),
            line: "hello\n".into(),
        };
        assert_eq!(format_log_line(&e, None, false), "hello");
        assert_eq!(format_log_line(&e, Some(12), false), "web.1.abc    | hello");
        assert_eq!(format_log_line(&e, None, true), "2024-05-01T12:00:00.250Z hello");
    }

    #[test]
    fn describe_summary() {
        let doc = "kind: Service\nmetadata:\n  name: web\nspec:\n  replicas: 3\n  task:\n    runtime: docker\n    image: nginx:1.27\n  placement:\n    max_replicas_per_node: 1\n";
        let svc = spec::parse_documents(doc).unwrap().remove(0);
        let mut v = view(RolloutState::Completed, 3, 3, 1);
        v.record.as_mut().unwrap().spec_json = svc.canonical_json();
        let lines = describe_lines(&ServiceOut::from_view(&v), 61_000);
        let text = lines.join("\n");
        assert!(text.contains("Image:"), "{text}");
        assert!(text.contains("nginx:1.27"), "{text}");
        assert!(text.contains("max 1 per node"), "{text}");
        assert!(text.contains("Rollout:") && text.contains("completed: rolling out version 2"), "{text}");
        assert!(text.contains("Update:") && text.contains("parallelism 1"), "{text}");
        assert!(text.contains("sandboxed, user the image's") && text.contains("pids 1024"), "{text}");
    }

    #[test]
    fn describe_shows_privileged_and_capabilities() {
        let doc = |task: &str| {
            let d = format!(
                "kind: Service\nmetadata: {{name: p}}\nspec:\n  replicas: 1\n  task: {{runtime: process, command: [/bin/true], {task}}}\n"
            );
            let svc = spec::parse_documents(&d).unwrap().remove(0);
            let mut v = view(RolloutState::Completed, 1, 1, 1);
            v.record.as_mut().unwrap().spec_json = svc.canonical_json();
            describe_lines(&ServiceOut::from_view(&v), 61_000).join("\n")
        };
        let text = doc("privileged: true");
        assert!(text.contains("PRIVILEGED") && text.contains("--allow-privileged"), "{text}");
        let text = doc("user: \"1000:1000\", cap_add: [NET_ADMIN], cap_drop: [ALL]");
        assert!(text.contains("sandboxed, user 1000:1000, cap_add NET_ADMIN, cap_drop ALL"), "{text}");
    }
}
