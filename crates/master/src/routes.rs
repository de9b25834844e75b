//! Routes in the replicated state: `kind: Route` documents checked at apply time (the service
//! and its port exist, the certificate is valid for the host and holds its key, the host is
//! under the apps domain, no other route serves the same host and path), records at
//! `/berth/routes/<namespace>/<name>`, and the views `get routes` and `describe route` show.
//!
//! Host and path claims serialize on a guard key, `/berth/route-hosts`, as published ports do
//! (`ports`): an apply that adds a route or changes its host or path compares and rewrites it.

use std::collections::BTreeMap;

use berth_api::pb::{
    FileRecord, Node, NodeAvailability, NodeStatus, RouteEdge, RouteEndpoint, RouteRecord, RouteView, ServiceRecord,
    Task, agent::TaskState,
};
use berth_store::KvReader;
use berth_types::{
    Command, CommandResult, Compare, RequestOp,
    spec::{
        self, Service,
        route::{Route, RoutePort, host_under},
    },
    task::TaskFile,
};
use prost::Message;
use tonic::Status;
use tracing::info;

use crate::{
    node::Ctx,
    objects::{self, NODES_PREFIX, Versioned},
    tasks::{self, TASKS_PREFIX},
};

pub(crate) const ROUTES_PREFIX: &str = "/berth/routes/";
const HOSTS_GUARD: &str = "/berth/route-hosts";

pub(crate) fn route_key(ns: &str, name: &str) -> Vec<u8> {
    format!("{ROUTES_PREFIX}{ns}/{name}").into_bytes()
}

/// The route document of a record.
pub(crate) fn spec_of(r: &RouteRecord) -> Result<Route, String> {
    serde_json::from_str(&r.spec_json)
        .map_err(|e| format!("route {}/{} has an unreadable spec: {e}", r.namespace, r.name))
}

/// Whether a node runs an edge router: started with `--edge`, or labelled `role=edge`.
pub(crate) fn is_edge(n: &Node) -> bool {
    n.edge || n.labels.get("role").is_some_and(|r| r == "edge")
}

/// Whether an edge node serves and is in the apps domain's answers: ready and not drained.
pub(crate) fn edge_serving(n: &Node) -> bool {
    n.status == NodeStatus::Ready as i32 && n.availability != NodeAvailability::Drain as i32
}

/// What a certificate says about itself.
#[derive(Debug)]
struct CertInfo {
    names: Vec<String>,
    not_after_ms: i64,
}

/// Checks a PEM holding a certificate chain and its private key: both present, the key is the
/// certificate's, the certificate is valid now and for `host` (a DNS name or a `*.` wildcard of
/// one label). The errors say what is wrong and what to do.
fn check_certificate(pem_text: &[u8], host: &str, what: &str, now_ms: i64) -> Result<CertInfo, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("{what} is not PEM ({e})"))?;
    let certs: Vec<rustls::pki_types::CertificateDer<'static>> = blocks
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| rustls::pki_types::CertificateDer::from(b.contents().to_vec()))
        .collect();
    let key = blocks.iter().find(|b| b.tag().ends_with("PRIVATE KEY"));
    let (Some(leaf), Some(key)) = (certs.first(), key) else {
        return Err(format!(
            "{what} must hold the certificate chain (server certificate first) and its private key, PEM; it has {} \
             certificate(s) and {} private key",
            certs.len(),
            if key.is_some() { "a" } else { "no" }
        ));
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("{what}: the first certificate does not parse ({e})"))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty()
        && let Some(cn) = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok())
    {
        names.push(cn.to_ascii_lowercase());
    }
    let matches = |n: &str| {
        n == host || n.strip_prefix("*.").is_some_and(|base| host.split_once('.').is_some_and(|(_, rest)| rest == base))
    };
    if !names.iter().any(|n| matches(n)) {
        return Err(format!(
            "{what}: the certificate is for {}, not for host {host}; use a certificate whose subject alternative \
             names include {host} (or a matching *. wildcard)",
            if names.is_empty() { "no name".to_string() } else { names.join(", ") }
        ));
    }
    let not_after_ms = cert.validity().not_after.timestamp() * 1000;
    let not_before_ms = cert.validity().not_before.timestamp() * 1000;
    if not_after_ms <= now_ms {
        return Err(format!(
            "{what}: the certificate expired at {}; renew it (berth secret update NAME --from-file NEW.pem)",
            cert.validity().not_after
        ));
    }
    if not_before_ms > now_ms {
        return Err(format!("{what}: the certificate is not valid before {}", cert.validity().not_before));
    }
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.contents().to_vec())
        .map_err(|e| format!("{what}: the private key does not parse ({e})"))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("{what}: the private key is not usable ({e})"))?;
    rustls::sign::CertifiedKey::new(certs, signing)
        .keys_match()
        .map_err(|e| format!("{what}: the private key does not belong to the certificate ({e})"))?;
    Ok(CertInfo { names, not_after_ms })
}

/// The container port a route's `port` names in the service, or an error listing its ports.
fn target_port(route: &Route, svc: &Service) -> Result<u16, String> {
    let ports = &svc.spec.task.ports;
    let found = match &route.spec.port {
        RoutePort::Number(n) => ports.iter().find(|p| p.container == *n && p.protocol == spec::Protocol::Tcp),
        RoutePort::Name(name) => ports.iter().find(|p| p.name.as_deref() == Some(name.as_str())),
    };
    if let Some(p) = found {
        return Ok(p.container);
    }
    let have: Vec<String> = ports
        .iter()
        .filter(|p| p.protocol == spec::Protocol::Tcp)
        .map(|p| match &p.name {
            Some(n) => format!("{} ({n})", p.container),
            None => p.container.to_string(),
        })
        .collect();
    Err(format!(
        "route {}: service {} has no TCP port {}; its ports: {}; name one of them in spec.port, or add it to the \
         service's spec.task.ports",
        route.key(),
        route.spec.service,
        route.spec.port,
        if have.is_empty() { "none".to_string() } else { have.join(", ") }
    ))
}

/// The route checks of one apply: every stored route's host and path, read once.
pub(crate) struct RoutePlan {
    /// `namespace/name` -> (host, path), stored routes then this apply's.
    claims: BTreeMap<String, (String, String)>,
    guard_revision: i64,
    changed: bool,
    parts: Vec<(Compare, RequestOp)>,
}

impl RoutePlan {
    pub fn new(reader: &KvReader) -> Result<RoutePlan, Status> {
        let guard_revision = reader
            .get(HOSTS_GUARD.as_bytes())
            .map_err(|e| Status::internal(format!("reading the replicated state failed: {e}")))?
            .map_or(0, |kv| kv.mod_revision);
        let mut claims = BTreeMap::new();
        for r in objects::list::<RouteRecord>(reader, ROUTES_PREFIX)? {
            if let Ok(doc) = spec_of(&r.obj) {
                claims.insert(doc.key(), (doc.spec.host, doc.spec.path));
            }
        }
        Ok(RoutePlan { claims, guard_revision, changed: false, parts: Vec::new() })
    }

    /// Checks a Route document (`services`: the Service documents of the same apply) and
    /// plans its write. Returns the action and what changed.
    pub fn route(
        &mut self,
        ctx: &Ctx,
        doc: &Route,
        services: &[&Service],
        now: i64,
    ) -> Result<(&'static str, Vec<String>), Status> {
        let (ns, name) = (&doc.metadata.namespace, &doc.metadata.name);
        let key = doc.key();
        let refuse = |msg: String| Status::failed_precondition(msg);
        // The host: under the apps domain, unless the cluster admin allows its domain.
        if !ctx.route_domains.is_empty() && !ctx.route_domains.iter().any(|d| host_under(&doc.spec.host, d)) {
            return Err(refuse(format!(
                "route {key}: host {} is not under the apps domain {}; use a host under it, or have a cluster \
                 admin allow its domain (berth master --allow-route-domain)",
                doc.spec.host,
                ctx.route_domains.join(", ")
            )));
        }
        // The service: in this apply, or stored and not being deleted.
        let svc_name = &doc.spec.service;
        let svc: Service = match services.iter().find(|s| s.metadata.namespace == *ns && s.metadata.name == *svc_name) {
            Some(s) => (*s).clone(),
            None => {
                let rec = objects::get::<ServiceRecord>(&ctx.reader, &tasks::service_key(ns, svc_name))?
                    .filter(|r| !r.obj.deleting)
                    .ok_or_else(|| {
                        refuse(format!(
                            "route {key}: service `{svc_name}` does not exist in namespace {ns}; apply it first (it \
                             may be in the same file), or fix spec.service"
                        ))
                    })?;
                serde_json::from_str(&rec.obj.spec_json).map_err(|e| Status::internal(e.to_string()))?
            }
        };
        let port = target_port(doc, &svc).map_err(refuse)?;
        // Another route serving the same host and path.
        let want = (doc.spec.host.clone(), doc.spec.path.clone());
        if let Some((other, _)) = self.claims.iter().find(|(k, c)| **k != key && **c == want) {
            return Err(refuse(format!(
                "route {key}: host {} with path {} is already served by route {other}; choose another host or \
                 path, or change or delete {other} first",
                doc.spec.host, doc.spec.path
            )));
        }
        // The certificate.
        let mut rec = RouteRecord {
            namespace: ns.clone(),
            name: name.clone(),
            spec_json: doc.canonical_json(),
            target_port: u32::from(port),
            ..Default::default()
        };
        if let Some(secret) = doc.spec.tls.as_ref().and_then(|t| t.secret.as_ref()) {
            let what = format!("route {key}: secret {ns}/{secret}");
            let file = objects::get::<FileRecord>(
                &ctx.reader,
                &crate::secrets::file_key(spec::FileKind::Secret, ns, secret),
            )?
            .ok_or_else(|| {
                refuse(format!(
                    "{what} does not exist; create it from a PEM file holding the certificate chain and its key: \
                         berth secret create {secret} --from-file cert-and-key.pem"
                ))
            })?;
            let version = file.obj.version;
            // The route commits only if the secret is still as checked (a delete meanwhile fails it).
            self.parts.push(crate::networks::compare_unchanged(
                crate::secrets::file_key(spec::FileKind::Secret, ns, secret),
                file.mod_revision,
            ));
            let f = TaskFile {
                kind: berth_types::spec::FileKind::Secret,
                name: secret.clone(),
                version,
                target: String::new(),
                mode: 0o400,
            };
            let data = crate::secrets::contents(ctx, ns, &[f]).map_err(|e| refuse(format!("{what}: {e}")))?;
            let pem_text = data.first().map(|d| d.data.as_slice()).unwrap_or_default();
            let info = check_certificate(pem_text, &doc.spec.host, &what, now).map_err(refuse)?;
            rec.secret_version = version;
            rec.cert_names = info.names;
            rec.cert_not_after_ms = info.not_after_ms;
        }
        let existing = objects::get::<RouteRecord>(&ctx.reader, &route_key(ns, name))?;
        let (action, changes) = match &existing {
            None => ("created", vec![]),
            Some(e) => {
                let same = e.obj.spec_json == rec.spec_json
                    && e.obj.target_port == rec.target_port
                    && e.obj.secret_version == rec.secret_version;
                if same {
                    self.claims.insert(key, want);
                    return Ok(("unchanged", vec![]));
                }
                let old = spec_of(&e.obj).map_err(Status::internal)?;
                let mut ch = Vec::new();
                for (field, a, b) in [
                    ("spec.host", old.spec.host.clone(), doc.spec.host.clone()),
                    ("spec.path", old.spec.path.clone(), doc.spec.path.clone()),
                    ("spec.service", old.spec.service.clone(), doc.spec.service.clone()),
                    ("spec.port", old.spec.port.to_string(), doc.spec.port.to_string()),
                ] {
                    if a != b {
                        ch.push(format!("{field}: {a} -> {b}"));
                    }
                }
                if old.spec.tls != doc.spec.tls {
                    ch.push("spec.tls".into());
                }
                if old.spec.redirect_http != doc.spec.redirect_http {
                    ch.push(format!("spec.redirect_http: {} -> {}", old.spec.redirect_http, doc.spec.redirect_http));
                }
                ("updated", ch)
            }
        };
        let moved =
            existing.as_ref().and_then(|e| spec_of(&e.obj).ok()).is_none_or(|o| (o.spec.host, o.spec.path) != want);
        if moved {
            self.changed = true;
        }
        rec.created_at_ms = existing.as_ref().map_or(now, |e| e.obj.created_at_ms);
        rec.updated_at_ms = now;
        rec.version = existing.as_ref().map_or(1, |e| e.obj.version + 1);
        let expected = existing.as_ref().map_or(0, |e| e.mod_revision);
        self.parts.push(objects::cas_put(route_key(ns, name), expected, rec.encode_to_vec()));
        self.claims.insert(key, want);
        Ok((action, changes))
    }

    /// The writes: each route's compare-and-put, and the guard's when a claim moved.
    pub fn into_parts(mut self, now: i64) -> Vec<(Compare, RequestOp)> {
        if self.changed {
            self.parts.push(objects::cas_put(
                HOSTS_GUARD.as_bytes().to_vec(),
                self.guard_revision,
                now.to_string().into_bytes(),
            ));
        }
        self.parts
    }
}

/// The routes of namespace `ns` whose certificate comes from secret `secret`.
pub(crate) fn routes_using_secret(reader: &KvReader, ns: &str, secret: &str) -> Result<Vec<String>, Status> {
    Ok(objects::list::<RouteRecord>(reader, &format!("{ROUTES_PREFIX}{ns}/"))?
        .into_iter()
        .filter(|r| spec_of(&r.obj).is_ok_and(|d| d.spec.tls.and_then(|t| t.secret).is_some_and(|s| s == secret)))
        .map(|r| r.obj.name)
        .collect())
}

/// The view of a route: its record, the service's endpoints and the edge nodes.
fn view(reader: &KvReader, rec: Versioned<RouteRecord>, tasks: &[Task], nodes: &[Node]) -> RouteView {
    let service = spec_of(&rec.obj).map(|d| d.spec.service).unwrap_or_default();
    let network = objects::get::<ServiceRecord>(reader, &tasks::service_key(&rec.obj.namespace, &service))
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str::<Service>(&s.obj.spec_json).ok())
        .and_then(|s| crate::networks::service_networks(&s).into_iter().next());
    let endpoints = tasks
        .iter()
        .filter(|t| t.namespace == rec.obj.namespace && t.service == service)
        .filter(|t| tasks::desired_of(t) == TaskState::Running && tasks::state_of(t) == TaskState::Running)
        .filter_map(|t| {
            let addr = network.as_ref().and_then(|n| t.addresses.get(n))?;
            Some(RouteEndpoint {
                task_id: t.id.clone(),
                node_id: t.node_id.clone(),
                address: format!("{addr}:{}", rec.obj.target_port),
            })
        })
        .collect();
    let edges = nodes
        .iter()
        .filter(|n| is_edge(n))
        .map(|n| RouteEdge {
            node_id: n.id.clone(),
            name: n.name.clone(),
            address: n.advertise_addr.clone(),
            ready: edge_serving(n),
        })
        .collect();
    RouteView { record: Some(rec.obj), mod_revision: rec.mod_revision, endpoints, edges }
}

/// Every route, or those of one namespace.
pub(crate) fn list(reader: &KvReader, ns: &str) -> Result<Vec<RouteView>, Status> {
    let prefix = if ns.is_empty() { ROUTES_PREFIX.to_string() } else { format!("{ROUTES_PREFIX}{ns}/") };
    let tasks: Vec<Task> = objects::list::<Task>(reader, TASKS_PREFIX)?.into_iter().map(|t| t.obj).collect();
    let nodes: Vec<Node> = objects::list::<Node>(reader, NODES_PREFIX)?.into_iter().map(|n| n.obj).collect();
    Ok(objects::list::<RouteRecord>(reader, &prefix)?.into_iter().map(|r| view(reader, r, &tasks, &nodes)).collect())
}

/// One route.
pub(crate) fn get(reader: &KvReader, ns: &str, name: &str) -> Result<RouteView, Status> {
    let ns = if ns.is_empty() { spec::DEFAULT_NAMESPACE } else { ns };
    let rec = objects::get::<RouteRecord>(reader, &route_key(ns, name))?
        .ok_or_else(|| Status::not_found(format!("no route {ns}/{name}: list them with `berth get routes`")))?;
    let tasks: Vec<Task> = objects::list::<Task>(reader, TASKS_PREFIX)?.into_iter().map(|t| t.obj).collect();
    let nodes: Vec<Node> = objects::list::<Node>(reader, NODES_PREFIX)?.into_iter().map(|n| n.obj).collect();
    Ok(view(reader, rec, &tasks, &nodes))
}

/// `berth delete route`.
pub(crate) async fn delete(ctx: &Ctx, ns: &str, name: &str) -> Result<RouteView, Status> {
    ctx.read_barrier().await?;
    let view = get(&ctx.reader, ns, name)?;
    let ns = if ns.is_empty() { spec::DEFAULT_NAMESPACE } else { ns };
    let txn = objects::txn_of(vec![objects::cas_delete(route_key(ns, name), view.mod_revision)]);
    match ctx.write(Command::Txn(txn)).await? {
        CommandResult::Txn(t) if t.succeeded => {
            info!(route = %format!("{ns}/{name}"), "route deleted");
            Ok(view)
        }
        _ => {
            Err(Status::aborted(format!("route {ns}/{name} changed while it was being deleted; run the command again")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let cert = params.self_signed(&key).unwrap();
        format!("{}{}", cert.pem(), key.serialize_pem())
    }

    #[test]
    fn certificates_are_checked_against_the_host() {
        let now = objects::now_ms();
        let pem = self_signed(&["shop.apps.example.test"]);
        let info = check_certificate(pem.as_bytes(), "shop.apps.example.test", "secret", now).unwrap();
        assert_eq!(info.names, ["shop.apps.example.test"]);
        assert!(info.not_after_ms > now);
        let err = check_certificate(pem.as_bytes(), "other.apps.example.test", "secret", now).unwrap_err();
        assert!(err.contains("is for shop.apps.example.test, not for host other.apps.example.test"), "{err}");
        // Wildcards cover one label.
        let wild = self_signed(&["*.apps.example.test"]);
        check_certificate(wild.as_bytes(), "a.apps.example.test", "secret", now).unwrap();
        assert!(check_certificate(wild.as_bytes(), "a.b.apps.example.test", "secret", now).is_err());
        // A key that is not the certificate's, and no key at all.
        let other = self_signed(&["shop.apps.example.test"]);
        let mixed = format!(
            "{}{}",
            &pem[..pem.find("-----BEGIN PRIVATE KEY").unwrap()],
            &other[other.find("-----BEGIN PRIVATE KEY").unwrap()..]
        );
        let err = check_certificate(mixed.as_bytes(), "shop.apps.example.test", "secret", now).unwrap_err();
        assert!(err.contains("does not belong to the certificate"), "{err}");
        let cert_only = &pem[..pem.find("-----BEGIN PRIVATE KEY").unwrap()];
        let err = check_certificate(cert_only.as_bytes(), "shop.apps.example.test", "secret", now).unwrap_err();
        assert!(err.contains("no private key"), "{err}");
        let err = check_certificate(b"hello", "shop.apps.example.test", "secret", now).unwrap_err();
        assert!(err.contains("certificate chain"), "{err}");
    }
}
