//! `berth get networks`, `berth describe network NAME`, `berth delete network NAME...`.

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use berth_api::pb::{self, NetworkView};
use serde::Serialize;

use crate::{
    Global,
    client::{Call, Client},
    cmd_services::{fmt_age, key, node_names, now_ms, out_line, task_state_name},
    output,
};

/// One network as `get`/`describe` print it (and `-o json|yaml`).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct NetworkOut {
    pub namespace: String,
    pub name: String,
    pub subnet: String,
    pub vni: u32,
    pub internal: bool,
    /// Created because a service used it (a namespace's `default`).
    pub implicit: bool,
    /// Node name (or id) -> its address block.
    pub blocks: BTreeMap<String, String>,
    pub services: Vec<String>,
    pub tasks: Vec<NetworkTaskOut>,
    pub created_at_ms: i64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct NetworkTaskOut {
    pub task: String,
    pub service: String,
    pub node: String,
    pub address: String,
    pub state: String,
}

impl NetworkOut {
    pub fn from_view(v: &NetworkView, names: &HashMap<String, String>) -> NetworkOut {
        let r = v.record.clone().unwrap_or_default();
        let node = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
        let subnet = r.subnet.parse::<ipnet::Ipv4Net>().ok();
        let blocks = r
            .blocks
            .iter()
            .map(|(id, b)| {
                let block = subnet
                    .and_then(|s| {
                        let prefix = berth_types::spec::network::recorded_block_prefix(s, r.block_prefix);
                        berth_types::spec::network::node_block(s, prefix, *b)
                    })
                    .map_or_else(|| format!("block {b}"), |n| n.to_string());
                (node(id), block)
            })
            .collect();
        NetworkOut {
            namespace: r.namespace,
            name: r.name,
            subnet: r.subnet,
            vni: r.vni,
            internal: r.internal,
            implicit: r.implicit,
            blocks,
            services: v.services.clone(),
            tasks: v
                .tasks
                .iter()
                .map(|t| NetworkTaskOut {
                    task: t.task_id.clone(),
                    service: t.service.clone(),
                    node: if t.node_id.is_empty() { String::new() } else { node(&t.node_id) },
                    address: t.address.clone(),
                    state: task_state_name(t.state).to_string(),
                })
                .collect(),
            created_at_ms: r.created_at_ms,
        }
    }
}

pub const NETWORK_HEADERS: &[&str] = &["NAMESPACE", "NAME", "SUBNET", "VNI", "INTERNAL", "SERVICES", "TASKS", "AGE"];

pub fn network_rows(networks: &[NetworkOut], now: i64) -> Vec<Vec<String>> {
    networks
        .iter()
        .map(|n| {
            vec![
                n.namespace.clone(),
                n.name.clone(),
                n.subnet.clone(),
                n.vni.to_string(),
                if n.internal { "yes".into() } else { "no".into() },
                n.services.len().to_string(),
                n.tasks.len().to_string(),
                fmt_age(now - n.created_at_ms),
            ]
        })
        .collect()
}

pub fn describe_lines(n: &NetworkOut) -> Vec<String> {
    let mut l = vec![
        format!("Network:   {}", key(&n.namespace, &n.name)),
        format!("Subnet:    {}", n.subnet),
        format!("VNI:       {}", n.vni),
        format!(
            "Internal:  {}",
            if n.internal { "yes (no traffic leaves the overlay)" } else { "no (egress is masqueraded)" }
        ),
    ];
    if n.implicit {
        l.push("Created:   on first use by a service of the namespace".into());
    }
    if n.blocks.is_empty() {
        l.push("Nodes:     none yet (a node gets an address block when a task of this network is placed on it)".into());
    } else {
        l.push("Nodes:".into());
        l.extend(n.blocks.iter().map(|(node, block)| format!("  {node:<24} {block}")));
    }
    l.push(format!("Services:  {}", if n.services.is_empty() { "none".to_string() } else { n.services.join(", ") }));
    if n.tasks.is_empty() {
        l.push("Tasks:     none".into());
    } else {
        l.push(String::new());
        l.push("Tasks:".into());
        let rows: Vec<Vec<String>> = n
            .tasks
            .iter()
            .map(|t| {
                let addr = if t.address.is_empty() { "-".to_string() } else { t.address.clone() };
                vec![t.task.clone(), t.service.clone(), t.node.clone(), addr, t.state.clone()]
            })
            .collect();
        l.push(output::render_table(&["TASK", "SERVICE", "NODE", "ADDRESS", "STATE"], &rows).trim_end().to_string());
    }
    l
}

pub async fn run_get(namespace: Option<&str>, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let req = pb::ListNetworksRequest { namespace: namespace.unwrap_or("").to_string() };
    let views = client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { Client::control(ch).list_networks(req).await.map(|r| r.into_inner().networks) }
        })
        .await?;
    let names = if views.iter().any(|v| v.record.as_ref().is_some_and(|r| !r.blocks.is_empty())) {
        node_names(&client).await
    } else {
        HashMap::new()
    };
    let out: Vec<NetworkOut> = views.iter().map(|v| NetworkOut::from_view(v, &names)).collect();
    let now = now_ms();
    output::emit(g.output, &out, |out| {
        if out.is_empty() {
            let ns = namespace.map(|n| format!(" in namespace {n}")).unwrap_or_default();
            eprintln!(
                "no networks{ns}: apply a `kind: Network` document, or a service (which creates its namespace's \
                 `default` network)"
            );
            return;
        }
        output::table(NETWORK_HEADERS, &network_rows(out, now));
    });
    Ok(())
}

pub async fn run_describe(namespace: &str, name: &str, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let req = pb::NetworkRef { namespace: namespace.to_string(), name: name.to_string() };
    let view = client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { Client::control(ch).get_network(req).await.map(|r| r.into_inner().network) }
        })
        .await?
        .unwrap_or_default();
    let names = node_names(&client).await;
    let out = NetworkOut::from_view(&view, &names);
    output::emit(g.output, &out, |n| {
        for l in describe_lines(n) {
            out_line(&l);
        }
    });
    Ok(())
}

pub async fn run_delete(namespace: &str, names: &[String], g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    crate::cmd_storage::delete_each("network", namespace, names, |name| {
        let req = pb::NetworkRef { namespace: namespace.to_string(), name };
        let client = &client;
        async move {
            client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { Client::control(ch).delete_network(req).await.map(|_| ()) }
                })
                .await
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_prints_its_blocks_tasks_and_addresses() {
        let view = NetworkView {
            record: Some(pb::NetworkRecord {
                namespace: "shop".into(),
                name: "backend".into(),
                subnet: "198.18.0.0/20".into(),
                vni: 4096,
                blocks: [("n1".to_string(), 1u32)].into(),
                created_at_ms: 1,
                ..Default::default()
            }),
            mod_revision: 3,
            services: vec!["web".into()],
            tasks: vec![pb::NetworkTask {
                task_id: "web.1.abc".into(),
                service: "web".into(),
                node_id: "n1".into(),
                address: "198.18.1.2".into(),
                state: pb::agent::TaskState::Running as i32,
            }],
        };
        let names: HashMap<String, String> = [("n1".to_string(), "host-a".to_string())].into();
        let out = NetworkOut::from_view(&view, &names);
        assert_eq!(out.blocks.get("host-a").map(String::as_str), Some("198.18.1.0/24"), "a /20 has /24 blocks");
        let text = describe_lines(&out).join("\n");
        for w in ["shop/backend", "198.18.0.0/20", "VNI:       4096", "host-a", "198.18.1.2", "running", "web"] {
            assert!(text.contains(w), "{w:?} missing from\n{text}");
        }
        let rows = network_rows(&[out], 1001);
        assert_eq!(rows[0][..7], ["shop", "backend", "198.18.0.0/20", "4096", "no", "1", "1"]);
    }
}
