//! The edge router of an edge node (`--edge`, or a node labelled `role=edge`): serves the
//! cluster's routes with HAProxy (`haproxy`), and with `--apps-domain` answers DNS for the apps
//! domain (`dns`).
//!
//! Level-triggered like the overlay: the routes (the leader's `EdgeUpdate`, all of them every
//! time) and the overlay's view (the routed services' endpoints) are combined into one
//! configuration; when it differs from the running one, the certificates are written to the
//! agent's tmpfs, the configuration is checked with `haproxy -c` and HAProxy is reloaded. A
//! configuration that does not check is not loaded: HAProxy keeps serving the previous one.
//! Routes and certificates are kept in memory and on the tmpfs only (never in `agent.json`):
//! after an agent restart HAProxy goes on serving what it had until the leader resends them.

pub mod dns;
pub mod haproxy;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use berth_api::pb::agent::{EdgeRoute, EdgeUpdate};
use tracing::{info, warn};

use crate::overlay::node::View;

/// The edge's settings.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Where the access log and HAProxy's pid file live (the agent's data dir).
    pub state_dir: PathBuf,
    /// A tmpfs directory for the configuration, certificates and sockets.
    pub run_dir: PathBuf,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub haproxy: PathBuf,
    /// With `dns`: the zone answered.
    pub apps_domain: Option<String>,
    pub dns: Option<SocketAddr>,
}

/// The node's edge router.
pub struct Edge {
    cfg: EdgeConfig,
    routes: Vec<EdgeRoute>,
    edges: Vec<Ipv4Addr>,
    view: View,
    /// The configuration and crt-list HAProxy runs with.
    running: Option<(String, String)>,
    process: haproxy::Process,
    dns: Option<dns::AppsDns>,
    /// When the routes last changed (for the log line that says how long they took to load).
    changed_at: Option<std::time::Instant>,
}

impl Edge {
    /// Makes the directories and adopts a HAProxy a previous agent left running.
    pub async fn start(cfg: EdgeConfig) -> Result<Edge, String> {
        for d in [&cfg.state_dir, &cfg.run_dir, &cfg.run_dir.join("certs")] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let _ = std::fs::set_permissions(&cfg.run_dir, std::fs::Permissions::from_mode(0o700));
        let process = haproxy::Process::new(
            cfg.haproxy.clone(),
            cfg.run_dir.join("haproxy.cfg"),
            cfg.state_dir.join("haproxy.pid"),
            cfg.state_dir.join("access.log"),
        );
        if let Some(pid) = process.pid() {
            info!(pid, "adopted the running edge router (HAProxy)");
        }
        // The routes are served even when the apps domain's DNS cannot listen (its port taken).
        let dns = match (&cfg.apps_domain, cfg.dns) {
            (Some(domain), Some(addr)) => match dns::AppsDns::start(addr, domain).await {
                Ok(d) => {
                    info!(addr = %d.addr, domain = %domain, "answering DNS for the apps domain");
                    Some(d)
                }
                Err(e) => {
                    warn!("the apps domain is not published: {e}; free the port or choose another with --apps-dns");
                    None
                }
            },
            _ => None,
        };
        Ok(Edge {
            cfg,
            routes: Vec::new(),
            edges: Vec::new(),
            view: View::default(),
            running: None,
            process,
            dns,
            changed_at: None,
        })
    }

    /// The leader's routes.
    pub fn set_routes(&mut self, u: &EdgeUpdate) {
        self.routes = u.routes.clone();
        self.edges = u.edges.iter().filter_map(|a| a.parse().ok()).collect();
        self.changed_at = Some(std::time::Instant::now());
        self.publish_dns();
        self.reconcile();
    }

    /// The overlay's view changed (endpoints).
    pub fn set_view(&mut self, view: &View) {
        if self.view != *view {
            self.view = view.clone();
            self.reconcile();
        }
    }

    fn publish_dns(&self) {
        let (Some(d), Some(domain)) = (&self.dns, &self.cfg.apps_domain) else { return };
        let mut zone = dns::Zone::default();
        for r in &self.routes {
            if berth_types::spec::route::host_under(&r.host, domain) {
                zone.hosts.insert(r.host.clone(), self.edges.clone());
            }
        }
        d.set(zone);
    }

    /// Each endpoint of a service by its address on a network this node has a block of.
    fn endpoints(&self, service: &str, port: u32) -> Vec<SocketAddr> {
        let Some(s) = self.view.services.get(service) else { return Vec::new() };
        let Ok(port) = u16::try_from(port) else { return Vec::new() };
        let mut out: Vec<SocketAddr> = s
            .endpoints
            .values()
            .filter_map(|addrs| {
                s.networks
                    .iter()
                    .filter(|n| self.view.networks.get(*n).is_some_and(|v| v.block.is_some()))
                    .find_map(|n| addrs.get(n))
                    .map(|a| SocketAddr::from((*a, port)))
            })
            .collect();
        out.sort();
        out
    }

    fn cert_file(&self, key: &str) -> PathBuf {
        self.cfg.run_dir.join("certs").join(format!("{}.pem", key.replace('/', "_")))
    }

    /// Renders the configuration; when it differs from the running one, writes it (after
    /// checking it) and reloads HAProxy.
    fn reconcile(&mut self) {
        if self.routes.is_empty() && self.running.is_none() && self.process.pid().is_none() {
            return;
        }
        let mut render = Vec::new();
        let mut certs: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
        for r in &self.routes {
            let cert_file = (!r.certificate.is_empty()).then(|| self.cert_file(&r.key));
            if let Some(f) = &cert_file {
                certs.insert(f.clone(), r.certificate.clone());
            }
            render.push(haproxy::RenderRoute {
                key: r.key.clone(),
                host: r.host.clone(),
                path: r.path.clone(),
                termination: r.termination.clone(),
                redirect_http: r.redirect_http,
                cert_file,
                endpoints: self.endpoints(&r.service, r.port),
            });
        }
        let listen = haproxy::Listen { http: self.cfg.http, https: self.cfg.https, run_dir: self.cfg.run_dir.clone() };
        let (config, crt_list) = haproxy::render(&listen, &render);
        let wanted = (config, crt_list);
        if self.running.as_ref() == Some(&wanted) && self.process.pid().is_some() {
            return;
        }
        if let Err(e) = self.write_and_load(&wanted, &certs) {
            warn!("the edge router keeps its previous configuration: {e}");
            return;
        }
        if let Some(t) = self.changed_at.take() {
            info!(
                routes = self.routes.len(),
                ms = t.elapsed().as_millis() as u64,
                "edge router reloaded with new routes"
            );
        }
        self.running = Some(wanted);
    }

    fn write_and_load(
        &mut self,
        (config, crt_list): &(String, String),
        certs: &BTreeMap<PathBuf, Vec<u8>>,
    ) -> Result<(), String> {
        let write = |path: &PathBuf, data: &[u8]| -> Result<(), String> {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, data)
                .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)))
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        for (path, pem) in certs {
            write(path, pem)?;
        }
        // Certificates of routes that went.
        if let Ok(dir) = std::fs::read_dir(self.cfg.run_dir.join("certs")) {
            for e in dir.flatten() {
                if !certs.contains_key(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        write(&self.cfg.run_dir.join("crt-list"), crt_list.as_bytes())?;
        let candidate = self.cfg.run_dir.join("haproxy.cfg.new");
        write(&candidate, config.as_bytes())?;
        self.process.check(&candidate).map_err(|e| format!("haproxy -c refused the configuration: {e}"))?;
        std::fs::rename(&candidate, self.cfg.run_dir.join("haproxy.cfg")).map_err(|e| e.to_string())?;
        self.process.start_or_reload()
    }
}
