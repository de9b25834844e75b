//! Route commands: `berth get routes`, `berth describe route NAME`, `berth delete route NAME...`.

use std::collections::HashMap;

use anyhow::Result;
use berth_api::pb::{self, RouteView};
use berth_types::spec::route::Route;
use serde::Serialize;

use crate::{
    Global,
    client::{Call, Client},
    cmd_services::{fmt_age, key, node_names, now_ms, out_line},
    output,
};

/// One route as `get`/`describe` print it (and `-o json|yaml`).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RouteOut {
    pub namespace: String,
    pub name: String,
    pub host: String,
    pub path: String,
    pub service: String,
    pub port: String,
    pub target_port: u32,
    /// none, edge, passthrough or reencrypt.
    pub tls: String,
    pub tls_secret: String,
    pub redirect_http: bool,
    /// The names the certificate is valid for, and when it expires (0: no certificate).
    pub cert_names: Vec<String>,
    pub cert_not_after_ms: i64,
    pub endpoints: Vec<RouteEndpointOut>,
    pub edges: Vec<RouteEdgeOut>,
    pub version: u64,
    pub created_at_ms: i64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RouteEndpointOut {
    pub task: String,
    pub node: String,
    pub address: String,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RouteEdgeOut {
    pub node: String,
    pub address: String,
    pub ready: bool,
}

impl RouteOut {
    pub fn from_view(v: &RouteView, names: &HashMap<String, String>) -> RouteOut {
        let r = v.record.clone().unwrap_or_default();
        let doc: Option<Route> = serde_json::from_str(&r.spec_json).ok();
        let node = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
        let spec = doc.map(|d| d.spec);
        let tls = spec.as_ref().and_then(|s| s.tls.clone());
        RouteOut {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            host: spec.as_ref().map(|s| s.host.clone()).unwrap_or_default(),
            path: spec.as_ref().map(|s| s.path.clone()).unwrap_or_default(),
            service: spec.as_ref().map(|s| s.service.clone()).unwrap_or_default(),
            port: spec.as_ref().map(|s| s.port.to_string()).unwrap_or_default(),
            target_port: r.target_port,
            tls: tls.as_ref().map_or("none", |t| t.termination.as_str()).to_string(),
            tls_secret: tls.and_then(|t| t.secret).unwrap_or_default(),
            redirect_http: spec.as_ref().is_some_and(|s| s.redirect_http),
            cert_names: r.cert_names.clone(),
            cert_not_after_ms: r.cert_not_after_ms,
            endpoints: v
                .endpoints
                .iter()
                .map(|e| RouteEndpointOut {
                    task: e.task_id.clone(),
                    node: node(&e.node_id),
                    address: e.address.clone(),
                })
                .collect(),
            edges: v
                .edges
                .iter()
                .map(|e| RouteEdgeOut { node: e.name.clone(), address: e.address.clone(), ready: e.ready })
                .collect(),
            version: r.version,
            created_at_ms: r.created_at_ms,
        }
    }

    fn expiry(&self, now: i64) -> String {
        if self.cert_not_after_ms == 0 {
            return "-".into();
        }
        let left = self.cert_not_after_ms - now;
        if left <= 0 { "expired".into() } else { format!("in {}", fmt_age(left)) }
    }
}

pub const ROUTE_HEADERS: &[&str] =
    &["NAMESPACE", "NAME", "HOST", "PATH", "SERVICE", "PORT", "TLS", "CERT EXPIRES", "ENDPOINTS", "AGE"];

pub fn route_rows(routes: &[RouteOut], now: i64) -> Vec<Vec<String>> {
    routes
        .iter()
        .map(|r| {
            vec![
                r.namespace.clone(),
                r.name.clone(),
                r.host.clone(),
                r.path.clone(),
                r.service.clone(),
                r.target_port.to_string(),
                if r.redirect_http { format!("{} (redirect http)", r.tls) } else { r.tls.clone() },
                r.expiry(now),
                r.endpoints.len().to_string(),
                fmt_age(now - r.created_at_ms),
            ]
        })
        .collect()
}

pub fn describe_lines(r: &RouteOut, now: i64) -> Vec<String> {
    let mut l = vec![
        format!("Route:     {}", key(&r.namespace, &r.name)),
        format!("Host:      {}", r.host),
        format!("Path:      {}", r.path),
        format!("Service:   {} port {} (container port {})", r.service, r.port, r.target_port),
        format!(
            "TLS:       {}{}{}",
            r.tls,
            if r.tls_secret.is_empty() { String::new() } else { format!(", certificate from secret {}", r.tls_secret) },
            if r.redirect_http { ", plain HTTP redirected to https" } else { "" }
        ),
    ];
    if r.cert_not_after_ms != 0 {
        l.push(format!("Cert:      for {}; expires {}", r.cert_names.join(", "), r.expiry(now)));
    }
    if r.endpoints.is_empty() {
        l.push("Endpoints: none (no running and healthy task of the service has an address)".into());
    } else {
        l.push(String::new());
        l.push("Endpoints:".into());
        let rows: Vec<Vec<String>> =
            r.endpoints.iter().map(|e| vec![e.task.clone(), e.node.clone(), e.address.clone()]).collect();
        l.push(output::render_table(&["TASK", "NODE", "ADDRESS"], &rows).trim_end().to_string());
    }
    if r.edges.is_empty() {
        l.push("Edges:     none (start agents with --edge, or label nodes role=edge)".into());
    } else {
        l.push(String::new());
        l.push("Edges:".into());
        let rows: Vec<Vec<String>> = r
            .edges
            .iter()
            .map(|e| vec![e.node.clone(), e.address.clone(), if e.ready { "serving" } else { "not serving" }.into()])
            .collect();
        l.push(output::render_table(&["NODE", "ADDRESS", "STATE"], &rows).trim_end().to_string());
    }
    l
}

pub async fn run_get(namespace: Option<&str>, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let req = pb::ListRoutesRequest { namespace: namespace.unwrap_or("").to_string() };
    let views = client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { Client::control(ch).list_routes(req).await.map(|r| r.into_inner().routes) }
        })
        .await?;
    let names = node_names(&client).await;
    let out: Vec<RouteOut> = views.iter().map(|v| RouteOut::from_view(v, &names)).collect();
    let now = now_ms();
    output::emit(g.output, &out, |out| {
        if out.is_empty() {
            let ns = namespace.map(|n| format!(" in namespace {n}")).unwrap_or_default();
            eprintln!("no routes{ns}: apply a `kind: Route` document");
            return;
        }
        output::table(ROUTE_HEADERS, &route_rows(out, now));
    });
    Ok(())
}

pub async fn run_describe(namespace: &str, name: &str, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let req = pb::RouteRef { namespace: namespace.to_string(), name: name.to_string() };
    let view = client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { Client::control(ch).get_route(req).await.map(|r| r.into_inner().route) }
        })
        .await?
        .unwrap_or_default();
    let names = node_names(&client).await;
    let out = RouteOut::from_view(&view, &names);
    let now = now_ms();
    output::emit(g.output, &out, |r| {
        for l in describe_lines(r, now) {
            out_line(&l);
        }
    });
    Ok(())
}

pub async fn run_delete(namespace: &str, names: &[String], g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    crate::cmd_storage::delete_each("route", namespace, names, |name| {
        let req = pb::RouteRef { namespace: namespace.to_string(), name };
        let client = &client;
        async move {
            client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { Client::control(ch).delete_route(req).await.map(|_| ()) }
                })
                .await
        }
    })
    .await
}
