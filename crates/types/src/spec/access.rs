//! Who may do what: `kind: Role` (verbs on resources) and `kind: RoleBinding` (a role given to
//! users, in one namespace or everywhere), as Kubernetes has them.
//!
//! ```yaml
//! kind: Role
//! metadata: {name: deployer}
//! spec:
//!   rules:
//!     - verbs: [get, list, watch, create, update]
//!       resources: [services, tasks]
//! ---
//! kind: RoleBinding
//! metadata: {name: alice-deployer}
//! spec:
//!   role: deployer
//!   users: [alice]
//!   namespace: shop     # optional: only the namespaced resources of `shop`; omitted: everywhere
//! ```
//!
//! Roles and bindings belong to the cluster, not to a namespace: their `metadata` has a name
//! only.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Kind, SpecError, check_dns_label};

/// What a call does to a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Delete,
}

impl Verb {
    pub const ALL: [Verb; 6] = [Verb::Get, Verb::List, Verb::Watch, Verb::Create, Verb::Update, Verb::Delete];
    /// The verbs that only read.
    pub const READ: [Verb; 3] = [Verb::Get, Verb::List, Verb::Watch];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
        }
    }

    /// Whether the verb changes something (and is therefore audited).
    pub fn mutates(self) -> bool {
        matches!(self, Verb::Create | Verb::Update | Verb::Delete)
    }

    pub fn parse(s: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Services,
    Tasks,
    Networks,
    Volumes,
    Secrets,
    Configs,
    Routes,
    Nodes,
    Tokens,
    Members,
    Kv,
    Users,
    Roles,
    Images,
    Certificates,
    Namespaces,
    Audit,
}

impl Resource {
    pub const ALL: [Resource; 17] = [
        Resource::Services,
        Resource::Tasks,
        Resource::Networks,
        Resource::Volumes,
        Resource::Secrets,
        Resource::Configs,
        Resource::Routes,
        Resource::Nodes,
        Resource::Tokens,
        Resource::Members,
        Resource::Kv,
        Resource::Users,
        Resource::Roles,
        Resource::Images,
        Resource::Certificates,
        Resource::Namespaces,
        Resource::Audit,
    ];
    /// What a tenant runs and stores in its namespace (the built-in admin, edit and view roles
    /// are about these).
    pub const WORKLOADS: [Resource; 7] = [
        Resource::Services,
        Resource::Tasks,
        Resource::Networks,
        Resource::Volumes,
        Resource::Secrets,
        Resource::Configs,
        Resource::Routes,
    ];
    /// The resources that live in a namespace (the rest belong to the cluster): the workloads,
    /// and the audit log (a record of a namespaced call belongs to that namespace).
    pub const NAMESPACED: [Resource; 8] = [
        Resource::Services,
        Resource::Tasks,
        Resource::Networks,
        Resource::Volumes,
        Resource::Secrets,
        Resource::Configs,
        Resource::Routes,
        Resource::Audit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::Tasks => "tasks",
            Resource::Networks => "networks",
            Resource::Volumes => "volumes",
            Resource::Secrets => "secrets",
            Resource::Configs => "configs",
            Resource::Routes => "routes",
            Resource::Nodes => "nodes",
            Resource::Tokens => "tokens",
            Resource::Members => "members",
            Resource::Kv => "kv",
            Resource::Users => "users",
            Resource::Roles => "roles",
            Resource::Images => "images",
            Resource::Certificates => "certificates",
            Resource::Namespaces => "namespaces",
            Resource::Audit => "audit",
        }
    }

    pub fn namespaced(self) -> bool {
        Resource::NAMESPACED.contains(&self)
    }

    pub fn parse(s: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `metadata` of a cluster-wide document: a name only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMetadata {
    pub name: String,
}

/// One `kind: Role` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Always `Role`.
    pub kind: Kind,
    pub metadata: ClusterMetadata,
    pub spec: RoleSpec,
}

/// `spec` of a role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    pub rules: Vec<Rule>,
}

/// Verbs allowed on resources. `"*"` in either list means all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub verbs: Vec<String>,
    pub resources: Vec<String>,
}

impl Rule {
    /// The verbs, `*` expanded.
    pub fn verb_set(&self) -> Vec<Verb> {
        if self.verbs.iter().any(|v| v == "*") {
            return Verb::ALL.to_vec();
        }
        self.verbs.iter().filter_map(|v| Verb::parse(v)).collect()
    }

    /// The resources, `*` expanded.
    pub fn resource_set(&self) -> Vec<Resource> {
        if self.resources.iter().any(|r| r == "*") {
            return Resource::ALL.to_vec();
        }
        self.resources.iter().filter_map(|r| Resource::parse(r)).collect()
    }
}

/// The roles berth defines; a `kind: Role` may not take their names.
pub const BUILTIN_ROLES: [&str; 5] = ["cluster-admin", "admin", "edit", "view", "agent"];

impl Role {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.kind != Kind::Role {
            return Err(SpecError::invalid("kind", "expected `Role`"));
        }
        check_dns_label("metadata.name", "role name", &self.metadata.name)?;
        if BUILTIN_ROLES.contains(&self.metadata.name.as_str()) {
            return Err(SpecError::invalid(
                "metadata.name",
                format!(
                    "{:?} is a built-in role ({}): give your role another name",
                    self.metadata.name,
                    BUILTIN_ROLES.join(", ")
                ),
            ));
        }
        if self.spec.rules.is_empty() {
            return Err(SpecError::invalid("spec.rules", "a role needs at least one rule"));
        }
        if self.spec.rules.len() > 64 {
            return Err(SpecError::invalid("spec.rules", "a role has at most 64 rules"));
        }
        for (i, rule) in self.spec.rules.iter().enumerate() {
            if rule.verbs.is_empty() {
                return Err(SpecError::invalid(format!("spec.rules[{i}].verbs"), "name at least one verb"));
            }
            for v in &rule.verbs {
                if v != "*" && Verb::parse(v).is_none() {
                    return Err(SpecError::invalid(
                        format!("spec.rules[{i}].verbs"),
                        format!("unknown verb {v:?}; allowed: {} or \"*\"", Verb::ALL.map(|v| v.as_str()).join(", ")),
                    ));
                }
            }
            if rule.resources.is_empty() {
                return Err(SpecError::invalid(format!("spec.rules[{i}].resources"), "name at least one resource"));
            }
            for r in &rule.resources {
                if r != "*" && Resource::parse(r).is_none() {
                    return Err(SpecError::invalid(
                        format!("spec.rules[{i}].resources"),
                        format!(
                            "unknown resource {r:?}; allowed: {} or \"*\"",
                            Resource::ALL.map(|r| r.as_str()).join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The document as stored: JSON with its fields in a fixed order.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a role serializes")
    }
}

/// One `kind: RoleBinding` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBinding {
    /// Always `RoleBinding`.
    pub kind: Kind,
    pub metadata: ClusterMetadata,
    pub spec: BindingSpec,
}

/// `spec` of a role binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSpec {
    /// A built-in role or a `kind: Role`'s name.
    pub role: String,
    /// The users (`berth user add`) given the role.
    pub users: Vec<String>,
    /// Only the namespaced resources of this namespace; omitted: every namespace and the
    /// cluster's own resources (nodes, tokens, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl RoleBinding {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.kind != Kind::RoleBinding {
            return Err(SpecError::invalid("kind", "expected `RoleBinding`"));
        }
        check_dns_label("metadata.name", "binding name", &self.metadata.name)?;
        check_dns_label("spec.role", "role name", &self.spec.role)?;
        if self.spec.role == "agent" {
            return Err(SpecError::invalid(
                "spec.role",
                "the agent role belongs to node agents, which get it by joining with a token: bind users to \
                 cluster-admin, admin, edit, view or a role of your own",
            ));
        }
        if self.spec.users.is_empty() {
            return Err(SpecError::invalid("spec.users", "name at least one user"));
        }
        if self.spec.users.len() > 1000 {
            return Err(SpecError::invalid("spec.users", "a binding names at most 1000 users"));
        }
        for u in &self.spec.users {
            check_user_name("spec.users", u)?;
        }
        if let Some(ns) = &self.spec.namespace {
            check_dns_label("spec.namespace", "namespace", ns)?;
        }
        Ok(())
    }

    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("a binding serializes")
    }
}

/// Checks a user name: it becomes the certificate identity `user/<name>`, so a DNS label.
pub fn check_user_name(path: &str, name: &str) -> Result<(), SpecError> {
    check_dns_label(path, "user name", name)
}

#[cfg(test)]
mod tests {
    use crate::spec::{Document, parse_all};

    #[test]
    fn roles_and_bindings_parse_and_validate() {
        let docs = parse_all(
            "kind: Role\nmetadata: {name: deployer}\nspec:\n  rules:\n    - {verbs: [get, create], resources: [services]}\n\
             ---\nkind: RoleBinding\nmetadata: {name: alice}\nspec: {role: deployer, users: [alice], namespace: shop}\n",
        )
        .unwrap();
        assert!(matches!(&docs[0], Document::Role(r) if r.spec.rules[0].verb_set().len() == 2));
        assert!(matches!(&docs[1], Document::RoleBinding(b) if b.spec.namespace.as_deref() == Some("shop")));
        let bad = |text: &str| parse_all(text).unwrap_err().to_string();
        let e = bad("kind: Role\nmetadata: {name: x}\nspec:\n  rules:\n    - {verbs: [fly], resources: [services]}\n");
        assert!(e.contains("unknown verb \"fly\""), "{e}");
        let e = bad("kind: Role\nmetadata: {name: edit}\nspec:\n  rules:\n    - {verbs: [get], resources: [kv]}\n");
        assert!(e.contains("built-in role"), "{e}");
        let e = bad("kind: Role\nmetadata: {name: x, namespace: a}\nspec: {rules: []}\n");
        assert!(e.contains("namespace"), "{e}");
        let e = bad("kind: RoleBinding\nmetadata: {name: b}\nspec: {role: agent, users: [alice]}\n");
        assert!(e.contains("node agents"), "{e}");
        let e = bad("kind: RoleBinding\nmetadata: {name: b}\nspec: {role: view, users: [Alice!]}\n");
        assert!(e.contains("user name"), "{e}");
    }
}
