//! `kind: Namespace` documents: a tenant's namespace and its quota, as Kubernetes' ResourceQuota
//! and Nomad's quotas have it.
//!
//! ```yaml
//! kind: Namespace
//! metadata: {name: shop}
//! spec:
//!   quota:            # each one optional: what is not named is not limited
//!     cpu: 4          # the CPU requests of the namespace's tasks, summed
//!     memory: 8Gi     # their memory requests, summed
//!     tasks: 50       # replicas of its services (a global service counts one per node)
//!     services: 10
//!     volumes: 5
//!     secrets: 20
//! ```
//!
//! A namespace that has no document has no quota. Namespaces belong to the cluster: only a
//! caller with rights on `namespaces` everywhere (a cluster-admin) applies them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Cpu, Kind, Memory, SpecError, access::ClusterMetadata, check_dns_label};

/// One `kind: Namespace` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Always `Namespace`.
    pub kind: Kind,
    pub metadata: ClusterMetadata,
    #[serde(default)]
    pub spec: NamespaceSpec,
}

/// `spec` of a namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    #[serde(default)]
    pub quota: Quota,
}

/// The most a namespace may hold; `None`: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<u64>,
}

/// What a namespace holds, in the quota's units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Millicores.
    pub cpu: u64,
    /// Bytes.
    pub memory: u64,
    pub tasks: u64,
    pub services: u64,
    pub volumes: u64,
    pub secrets: u64,
}

/// One quota a change would go past.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exceeded {
    pub what: &'static str,
    pub used: String,
    pub wanted: String,
    pub limit: String,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} would be {} (now {}), over the quota of {}", self.what, self.wanted, self.used, self.limit)
    }
}

impl Quota {
    /// Every quota `after` goes past, where it also grew from `before` (a change that shrinks or
    /// keeps a usage already over its quota, after the quota was lowered, is allowed).
    pub fn exceeded(&self, before: &Usage, after: &Usage) -> Vec<Exceeded> {
        let mut out = Vec::new();
        let mut check =
            |what: &'static str, limit: Option<u64>, used: u64, wanted: u64, show: &dyn Fn(u64) -> String| {
                if let Some(limit) = limit
                    && wanted > limit
                    && wanted > used
                {
                    out.push(Exceeded { what, used: show(used), wanted: show(wanted), limit: show(limit) });
                }
            };
        let count = |n: u64| n.to_string();
        let cpu = |m: u64| Cpu(m).to_string();
        let mem = |b: u64| Memory(b).to_string();
        check("cpu", self.cpu.map(Cpu::millis), before.cpu, after.cpu, &cpu);
        check("memory", self.memory.map(Memory::bytes), before.memory, after.memory, &mem);
        check("tasks", self.tasks, before.tasks, after.tasks, &count);
        check("services", self.services, before.services, after.services, &count);
        check("volumes", self.volumes, before.volumes, after.volumes, &count);
        check("secrets", self.secrets, before.secrets, after.secrets, &count);
        out
    }
}

impl Namespace {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.kind != Kind::Namespace {
            return Err(SpecError::invalid("kind", "expected `Namespace`"));
        }
        check_dns_label("metadata.name", "namespace", &self.metadata.name)
    }

    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a namespace serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Document, parse_all};

    #[test]
    fn quotas_parse_and_say_what_is_exceeded() {
        let docs =
            parse_all("kind: Namespace\nmetadata: {name: shop}\nspec:\n  quota: {cpu: 2, memory: 1Gi, tasks: 3}\n")
                .unwrap();
        let Document::Namespace(ns) = &docs[0] else { panic!("{docs:?}") };
        let q = &ns.spec.quota;
        assert_eq!(q.cpu, Some(Cpu(2000)));
        let before = Usage { tasks: 2, cpu: 1000, ..Default::default() };
        let after = Usage { tasks: 4, cpu: 2500, ..Default::default() };
        let e: Vec<String> = q.exceeded(&before, &after).iter().map(ToString::to_string).collect();
        assert_eq!(
            e,
            [
                "cpu would be 2500m (now 1000m), over the quota of 2000m",
                "tasks would be 4 (now 2), over the quota of 3"
            ]
        );
        // Shrinking while over a lowered quota is allowed.
        let over = Usage { tasks: 5, ..Default::default() };
        assert!(q.exceeded(&over, &Usage { tasks: 4, ..Default::default() }).is_empty());
        let err = parse_all("kind: Namespace\nmetadata: {name: shop}\nspec:\n  quota: {gpus: 2}\n").unwrap_err();
        assert!(err.to_string().contains("gpus"), "{err}");
    }
}
