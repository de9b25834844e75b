//! `berth token`, `berth get nodes` and `berth node`.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Result, bail};
use berth_api::pb::{self, NodeAvailability, NodeStatus};
use clap::{Subcommand, ValueEnum};
use serde::Serialize;

use crate::{
    Global,
    client::{Call, Client},
    output,
};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a bootstrap token and print it (once: only its hash is stored).
    Create {
        /// How long the token stays valid (`0s` = forever).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        ttl: Duration,
        /// How many hosts may join with it: one unless told (0 = any number, until it expires).
        #[arg(long, default_value_t = 1)]
        uses: u64,
        /// Labels every node that joins with it gets, k=v,...
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens: id, expiry, uses left, description (never the secret).
    List,
    /// Revoke a token: hosts can no longer join with it.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum GetCmd {
    /// Every node: status, availability, labels, resources, agent version, last heartbeat.
    Nodes,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Change a node's labels or availability.
    Update {
        /// Node name or id.
        node: String,
        #[arg(long = "label-add", value_parser = parse_label)]
        label_add: Vec<(String, String)>,
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        #[arg(long, value_enum)]
        availability: Option<Availability>,
    },
    /// Remove a node. Refused for a ready node unless --force.
    Rm {
        node: String,
        #[arg(long)]
        force: bool,
    },
}

pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

pub(crate) fn fmt_time_ms(ms: i64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[derive(Serialize)]
struct TokenOut {
    id: String,
    expires: String,
    uses_left: Option<i64>,
    revoked: bool,
    labels: BTreeMap<String, String>,
    description: String,
    created: String,
}

fn token_out(t: pb::JoinTokenRecord) -> TokenOut {
    TokenOut {
        id: t.id,
        expires: fmt_time_ms(t.expires_at_ms),
        uses_left: (t.uses_left >= 0).then_some(t.uses_left),
        revoked: t.revoked,
        labels: t.labels.into_iter().collect(),
        description: t.description,
        created: fmt_time_ms(t.created_at_ms),
    }
}

pub async fn run_token(cmd: TokenCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        TokenCmd::Create { ttl, uses, labels, description } => {
            let req = pb::TokenCreateRequest {
                ttl_seconds: ttl.as_secs(),
                uses,
                labels: labels.into_iter().collect(),
                description,
            };
            let r = client
                .call(Call::Once, |ch| {
                    let req = req.clone();
                    async move { Client::nodes(ch).token_create(req).await.map(|r| r.into_inner()) }
                })
                .await
                .map_err(|s| {
                    crate::client::explain(
                        s,
                        "a token may have been created: see `berth token list`, and revoke an unwanted one",
                    )
                })?;
            // The table form is the token alone, for `--token $(...)`.
            output::done(g.output, serde_json::json!({ "token": r.token }), || r.token.clone());
        }
        TokenCmd::List => {
            let r = client
                .call(Call::Idempotent, |ch| async move { Client::nodes(ch).token_list(pb::TokenListRequest {}).await })
                .await?
                .into_inner();
            let out: Vec<TokenOut> = r.tokens.into_iter().map(token_out).collect();
            output::print(g.output, &out, |out| {
                let rows = out
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            if t.revoked { "revoked".into() } else { t.expires.clone() },
                            t.uses_left.map_or("unlimited".into(), |u| u.to_string()),
                            t.description.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["ID", "EXPIRES", "USES LEFT", "DESCRIPTION"], &rows);
            });
        }
        TokenCmd::Revoke { id } => {
            client
                .call(Call::Idempotent, |ch| {
                    let id = id.clone();
                    async move { Client::nodes(ch).token_revoke(pb::TokenRevokeRequest { id }).await }
                })
                .await?;
            output::done(g.output, serde_json::json!({ "revoked": id }), || format!("token {id} revoked"));
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct NodeOut {
    id: String,
    name: String,
    status: &'static str,
    availability: &'static str,
    labels: BTreeMap<String, String>,
    cpu_millis: u64,
    memory_bytes: u64,
    disk_bytes: u64,
    agent_version: String,
    /// Milliseconds since the leader last heard from the node; null when it has not (yet).
    last_heartbeat_age_ms: Option<i64>,
    connected: bool,
    status_message: String,
    /// Unix milliseconds of the last status transition.
    status_changed_at_ms: i64,
    advertise_addr: String,
    /// The node's underlay address (what other nodes and `berth dev`'s host reach it on).
    address: String,
    /// Its agent attaches tasks to networks.
    networks: bool,
}

pub(crate) fn status_name(s: NodeStatus) -> &'static str {
    match s {
        NodeStatus::Ready => "ready",
        NodeStatus::Down => "down",
        NodeStatus::Unknown => "unknown",
    }
}

fn availability_name(a: NodeAvailability) -> &'static str {
    match a {
        NodeAvailability::Active => "active",
        NodeAvailability::Pause => "pause",
        NodeAvailability::Drain => "drain",
    }
}

pub async fn run_get(cmd: GetCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        GetCmd::Nodes => {
            let r = client
                .call(Call::Idempotent, |ch| async move { Client::nodes(ch).node_list(pb::NodeListRequest {}).await })
                .await?
                .into_inner();
            let out: Vec<NodeOut> = r
                .nodes
                .into_iter()
                .filter_map(|i| {
                    let n = i.node?;
                    let res = n.resources.unwrap_or_default();
                    Some(NodeOut {
                        status: status_name(n.status()),
                        availability: availability_name(n.availability()),
                        id: n.id,
                        name: n.name,
                        labels: n.labels.into_iter().collect(),
                        cpu_millis: res.cpu_millis,
                        memory_bytes: res.memory_bytes,
                        disk_bytes: res.disk_bytes,
                        agent_version: n.agent_version,
                        last_heartbeat_age_ms: (i.last_heartbeat_age_ms >= 0).then_some(i.last_heartbeat_age_ms),
                        connected: i.connected,
                        status_message: n.status_message,
                        status_changed_at_ms: n.status_changed_at_ms,
                        address: n.advertise_addr.clone(),
                        advertise_addr: n.advertise_addr,
                        networks: n.networks,
                    })
                })
                .collect();
            output::print(g.output, &out, |out| {
                let rows = out
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.status.to_string(),
                            n.availability.to_string(),
                            n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                            format!("{:.1}", n.cpu_millis as f64 / 1000.0),
                            output::human_bytes(n.memory_bytes),
                            n.agent_version.clone(),
                            n.last_heartbeat_age_ms.map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
                            n.id.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(
                    &["NAME", "STATUS", "AVAILABILITY", "LABELS", "CPUS", "MEMORY", "VERSION", "HEARTBEAT", "ID"],
                    &rows,
                );
            });
        }
    }
    Ok(())
}

pub async fn run_node(cmd: NodeCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        NodeCmd::Update { node, label_add, label_rm, availability } => {
            if label_add.is_empty() && label_rm.is_empty() && availability.is_none() {
                bail!("nothing to change: pass --label-add, --label-rm or --availability");
            }
            let req = pb::NodeUpdateRequest {
                node,
                label_add: label_add.into_iter().collect(),
                label_rm,
                availability: availability.map(|a| {
                    (match a {
                        Availability::Active => NodeAvailability::Active,
                        Availability::Pause => NodeAvailability::Pause,
                        Availability::Drain => NodeAvailability::Drain,
                    }) as i32
                }),
            };
            let r = client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { Client::nodes(ch).node_update(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            if let Some(n) = r.node {
                output::done(g.output, serde_json::json!({ "updated": n.name, "id": n.id }), || {
                    format!("node {} updated", n.name)
                });
            }
        }
        NodeCmd::Rm { node, force } => {
            client
                .call(Call::Idempotent, |ch| {
                    let node = node.clone();
                    async move { Client::nodes(ch).node_remove(pb::NodeRemoveRequest { node, force }).await }
                })
                .await?;
            output::done(g.output, serde_json::json!({ "removed": node }), || format!("node {node} removed"));
        }
    }
    Ok(())
}
