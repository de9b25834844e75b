//! Published ports at apply time: no two services may claim one port where both would be open.
//!
//! A port in `ingress` mode (the routing mesh) is open on every node with networks, so it
//! conflicts with the same protocol and port published by any other service, in either mode.
//! Two `host`-mode ports do not conflict: the scheduler keeps their tasks on different nodes.
//! A service being deleted holds nothing any more (the mesh stops publishing it at once; its
//! stopping tasks still hold their host ports on their nodes, which the scheduler counts).
//!
//! Claims serialize on a guard key, `/berth/ports`: an apply that adds or changes a service's
//! published ports compares and rewrites it in its own transaction, so two concurrent applies
//! that each saw the port free cannot both commit (the loser's client retries, and then sees the
//! winner). An apply that leaves a service's published ports as they were does not touch it.

use berth_api::pb::ServiceRecord;
use berth_store::KvReader;
use berth_types::{
    Compare, RequestOp,
    spec::{PortMode, Protocol, Service},
};
use tonic::Status;

use crate::{
    objects::{self, Versioned},
    tasks::SERVICES_PREFIX,
};

/// The guard key every change of published ports compares and rewrites.
pub(crate) const PORTS_GUARD: &str = "/berth/ports";

/// One published port of a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    protocol: Protocol,
    port: u16,
    mode: PortMode,
}

impl Claim {
    fn conflicts(&self, other: &Claim) -> bool {
        self.protocol == other.protocol
            && self.port == other.port
            && (self.mode == PortMode::Ingress || other.mode == PortMode::Ingress)
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// A service's published ports, with the index of each in `spec.task.ports`.
fn claims(svc: &Service, with_networks: bool) -> Vec<(usize, Claim)> {
    svc.spec
        .task
        .ports
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            Some((i, Claim { protocol: p.protocol, port: p.published?, mode: p.published_mode(with_networks)? }))
        })
        .collect()
}

/// The published-port check of one apply: every other service's claims, read once.
pub(crate) struct PortCheck {
    with_networks: bool,
    /// `namespace/name` -> its claims: stored services not being deleted, then this apply's.
    services: Vec<(String, Vec<Claim>)>,
    guard_revision: i64,
    changed: bool,
}

impl PortCheck {
    /// Reads every service's published ports when `publishing` (some document of the apply
    /// publishes a port; otherwise nothing can conflict and dropping ports frees them without a
    /// claim, so nothing is read); `with_networks` on a cluster with pools (it decides the
    /// default mode).
    pub fn new(reader: &KvReader, with_networks: bool, publishing: bool) -> Result<PortCheck, Status> {
        if !publishing {
            return Ok(PortCheck { with_networks, services: Vec::new(), guard_revision: 0, changed: false });
        }
        let guard_revision = reader
            .get(PORTS_GUARD.as_bytes())
            .map_err(|e| Status::internal(format!("reading the replicated state failed: {e}")))?
            .map_or(0, |kv| kv.mod_revision);
        let mut services = Vec::new();
        for Versioned { obj: r, .. } in objects::list::<ServiceRecord>(reader, SERVICES_PREFIX)? {
            if r.deleting {
                continue;
            }
            // An unreadable stored spec claims nothing here; the controllers report it.
            let Ok(spec) = serde_json::from_str::<Service>(&r.spec_json) else { continue };
            let c: Vec<Claim> = claims(&spec, with_networks).into_iter().map(|(_, c)| c).collect();
            if !c.is_empty() {
                services.push((format!("{}/{}", r.namespace, r.name), c));
            }
        }
        Ok(PortCheck { with_networks, services, guard_revision, changed: false })
    }

    /// Checks a Service document of the apply against every other service (those stored and
    /// the earlier documents of the same apply) and records its claims.
    pub fn service(&mut self, svc: &Service) -> Result<(), Status> {
        let key = format!("{}/{}", svc.metadata.namespace, svc.metadata.name);
        let mine = claims(svc, self.with_networks);
        let stored = self.services.iter().position(|(k, _)| *k == key);
        let mut sorted: Vec<Claim> = mine.iter().map(|(_, c)| c.clone()).collect();
        sorted.sort();
        let unchanged = stored.is_some_and(|i| {
            let mut old = self.services[i].1.clone();
            old.sort();
            old == sorted
        });
        if let Some(i) = stored {
            self.services.remove(i);
        }
        if !unchanged && !mine.is_empty() {
            for (i, c) in &mine {
                let holder =
                    self.services.iter().find_map(|(k, cs)| cs.iter().find(|o| c.conflicts(o)).map(|o| (k, o)));
                if let Some((other, o)) = holder {
                    let how = match o.mode {
                        PortMode::Ingress => "on the routing mesh (mode ingress: open on every node)",
                        PortMode::Host => "in mode host on the nodes running its tasks",
                    };
                    let why = if c.mode == PortMode::Ingress && o.mode == PortMode::Host {
                        "; an ingress port is open on every node, so no other service may publish it in any mode"
                    } else {
                        ""
                    };
                    return Err(Status::failed_precondition(format!(
                        "service {key}: spec.task.ports[{i}].published: port {}/{} is already published by service \
                         {other} {how}{why}; choose another port, or change or delete {other} first",
                        c.port,
                        proto_name(c.protocol),
                    )));
                }
            }
        }
        if !unchanged && (stored.is_some() || !mine.is_empty()) {
            self.changed = true;
        }
        if !sorted.is_empty() {
            self.services.push((key, sorted));
        }
        Ok(())
    }

    /// The guard's compare-and-put when this apply changes any service's published ports.
    pub fn into_parts(self, now_ms: i64) -> Vec<(Compare, RequestOp)> {
        if !self.changed {
            return Vec::new();
        }
        vec![objects::cas_put(PORTS_GUARD.as_bytes().to_vec(), self.guard_revision, now_ms.to_string().into_bytes())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ports: &str) -> Service {
        let text = format!(
            "kind: Service\nmetadata: {{name: {name}}}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    command: [/bin/true]\n    ports: {ports}\n"
        );
        match berth_types::spec::parse_all(&text).expect("valid").remove(0) {
            berth_types::spec::Document::Service(s) => *s,
            _ => unreachable!(),
        }
    }

    fn check(with_networks: bool, stored: &[(&str, &str)]) -> PortCheck {
        let mut c = PortCheck { with_networks, services: Vec::new(), guard_revision: 7, changed: false };
        for (name, ports) in stored {
            let s = svc(name, ports);
            let cl: Vec<Claim> = claims(&s, with_networks).into_iter().map(|(_, c)| c).collect();
            c.services.push((format!("default/{name}"), cl));
        }
        c
    }

    #[test]
    fn ingress_conflicts_with_any_mode_host_with_ingress_only() {
        let mut c = check(true, &[("web", "[{container: 80, published: 30080}]")]);
        let err = c.service(&svc("other", "[{container: 8080, published: 30080}]")).unwrap_err();
        assert!(
            err.message().contains("port 30080/tcp is already published by service default/web"),
            "{}",
            err.message()
        );
        assert!(err.message().contains("spec.task.ports[0].published"), "{}", err.message());
        let err = c.service(&svc("other", "[{container: 8080, published: 30080, mode: host}]")).unwrap_err();
        assert!(err.message().contains("routing mesh"), "{}", err.message());
        // Another protocol or port is fine.
        c.service(&svc("dns", "[{container: 53, published: 30080, protocol: udp}]")).unwrap();
        assert!(c.changed);

        let mut c = check(true, &[("a", "[{container: 80, published: 8080, mode: host}]")]);
        c.service(&svc("b", "[{container: 80, published: 8080, mode: host}]")).unwrap();
        let err = c.service(&svc("c", "[{container: 80, published: 8080}]")).unwrap_err();
        assert!(err.message().contains("already published by service default/a in mode host"), "{}", err.message());
        assert!(err.message().contains("no other service may publish it"), "{}", err.message());
    }

    #[test]
    fn without_networks_the_default_is_host() {
        let mut c = check(false, &[("a", "[{container: 80, published: 8080}]")]);
        c.service(&svc("b", "[{container: 80, published: 8080}]")).unwrap();
    }

    #[test]
    fn an_unchanged_service_leaves_the_guard_alone() {
        let mut c = check(true, &[("web", "[{container: 80, published: 30080}]")]);
        c.service(&svc("web", "[{container: 80, published: 30080}]")).unwrap();
        assert!(!c.changed);
        assert!(c.into_parts(1).is_empty());
        // Moving its own port, or dropping it, is a change.
        let mut c = check(true, &[("web", "[{container: 80, published: 30080}]")]);
        c.service(&svc("web", "[{container: 80}]")).unwrap();
        assert!(c.changed);
        assert_eq!(c.into_parts(1).len(), 1);
    }

    #[test]
    fn two_documents_of_one_apply_conflict() {
        let mut c = check(true, &[]);
        c.service(&svc("a", "[{container: 80, published: 30080}]")).unwrap();
        let err = c.service(&svc("b", "[{container: 80, published: 30080}]")).unwrap_err();
        assert!(err.message().contains("default/a"), "{}", err.message());
    }
}
