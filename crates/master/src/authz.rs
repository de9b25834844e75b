//! Authorization: who may do what, checked on every client API call.
//!
//! - The bootstrap admin (`admin/<name>`, from `berth pki init`) and the masters (forwarding a
//!   client's call) may do everything, like Kubernetes' `system:masters`.
//! - A user (`user/<name>`, from `berth user add`) may do what the roles bound to it allow:
//!   `/berth/bindings/<name>` gives a role to users, in one namespace or everywhere;
//!   `/berth/roles/<name>` holds the custom roles. The built-in ones are `cluster-admin`,
//!   `admin`, `edit`, `view` and `agent` (see [`builtin`]).
//! - Agents speak QUIC, never the client API.
//!
//! Each master follows `/berth/users/`, `/berth/roles/` and `/berth/bindings/` with a watch and
//! keeps the bindings per user in memory (`follow`), so a check is a hash lookup.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, RwLock},
};

use berth_pki::{Identity, Role as CertRole};
use berth_types::spec::access::{self, Resource, Verb};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::warn;

use crate::node::Ctx;

pub(crate) const USERS: &str = "/berth/users/";
pub(crate) const ROLES: &str = "/berth/roles/";
pub(crate) const BINDINGS: &str = "/berth/bindings/";

/// The identity a client API request was made with (set by the interceptor, read by the
/// handlers).
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub identity: Identity,
}

impl Caller {
    /// The caller of a request the interceptor accepted.
    pub(crate) fn of<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the request carries no authenticated identity"))
    }

    /// Every right: the bootstrap admin and the masters.
    fn is_superuser(&self) -> bool {
        matches!(self.identity.role, CertRole::Admin | CertRole::Master)
    }
}

/// A user, as stored (JSON) at `/berth/users/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct UserRecord {
    pub name: String,
    pub created_ms: i64,
    /// Who added it.
    pub by: String,
    /// The serials of the certificates issued to it (hex).
    #[serde(default)]
    pub serials: Vec<String>,
}

/// What a role allows: for each resource, the verbs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Grants(HashMap<Resource, BTreeSet<Verb>>);

impl Grants {
    fn of_rules(rules: &[access::Rule]) -> Grants {
        let mut g: HashMap<Resource, BTreeSet<Verb>> = HashMap::new();
        for rule in rules {
            for r in rule.resource_set() {
                g.entry(r).or_default().extend(rule.verb_set());
            }
        }
        Grants(g)
    }

    fn allows(&self, verb: Verb, res: Resource) -> bool {
        self.0.get(&res).is_some_and(|v| v.contains(&verb))
    }
}

fn rule(verbs: &[Verb], resources: &[Resource]) -> access::Rule {
    access::Rule {
        verbs: verbs.iter().map(|v| v.as_str().to_string()).collect(),
        resources: resources.iter().map(|r| r.as_str().to_string()).collect(),
    }
}

const WORKLOADS: [Resource; 7] = Resource::WORKLOADS;

/// The rules of a built-in role, as Kubernetes defines its user-facing roles:
/// - `cluster-admin`: everything, everywhere (and reading berth's own keys through KV);
/// - `admin`: everything on a namespace's workloads, and reading its audit records;
/// - `edit`: everything on a namespace's workloads;
/// - `view`: reading a namespace's workloads, but not its secrets;
/// - `agent`: what a node agent does over QUIC (its node, its tasks and their files); agents
///   never use the client API, so a binding to it is refused.
pub(crate) fn builtin(name: &str) -> Option<Vec<access::Rule>> {
    Some(match name {
        "cluster-admin" => vec![rule(&Verb::ALL, &Resource::ALL)],
        "admin" => vec![rule(&Verb::ALL, &WORKLOADS), rule(&Verb::READ, &[Resource::Audit])],
        "edit" => vec![rule(&Verb::ALL, &WORKLOADS)],
        "view" => vec![rule(
            &Verb::READ,
            &[
                Resource::Services,
                Resource::Tasks,
                Resource::Networks,
                Resource::Volumes,
                Resource::Configs,
                Resource::Routes,
            ],
        )],
        "agent" => vec![
            rule(&[Verb::Get, Verb::Update], &[Resource::Nodes, Resource::Tasks]),
            rule(&[Verb::Get], &[Resource::Secrets, Resource::Configs, Resource::Images, Resource::Networks]),
        ],
        _ => return None,
    })
}

/// One binding of a role to a user, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Granted {
    binding: String,
    role: String,
    grants: Arc<Grants>,
    /// None: every namespace and the cluster's resources.
    namespace: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Tables {
    users: HashSet<String>,
    by_user: HashMap<String, Vec<Granted>>,
}

/// Which namespaces a caller may act in, for a verb on a namespaced resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Namespaces {
    All,
    Only(BTreeSet<String>),
}

impl Namespaces {
    pub(crate) fn allows(&self, ns: &str) -> bool {
        match self {
            Namespaces::All => true,
            Namespaces::Only(set) => set.contains(ns),
        }
    }
}

/// The bindings as this master last applied them.
#[derive(Default)]
pub(crate) struct Rbac {
    tables: RwLock<Tables>,
}

impl Rbac {
    /// Checks that `caller` may `verb` the `res` in namespace `ns` (None: a cluster resource,
    /// or every namespace). The error names the identity, the verb, the resource and what the
    /// caller's bindings allow.
    pub(crate) fn check(&self, caller: &Caller, verb: Verb, res: Resource, ns: Option<&str>) -> Result<(), Status> {
        if caller.is_superuser() {
            return Ok(());
        }
        let tables = self.tables.read().expect("rbac lock");
        let id = &caller.identity;
        if id.role != CertRole::User {
            return Err(denied(caller, verb, res, ns, "agents use the QUIC protocol, not the client API"));
        }
        if !tables.users.contains(&id.id) {
            return Err(denied(caller, verb, res, ns, "there is no such user (removed?)"));
        }
        let granted = tables.by_user.get(&id.id).map(Vec::as_slice).unwrap_or_default();
        let ok = granted.iter().any(|g| {
            g.grants.allows(verb, res)
                && match (&g.namespace, ns) {
                    (None, _) => true,
                    (Some(bound), Some(ns)) => res.namespaced() && bound == ns,
                    (Some(_), None) => false,
                }
        });
        if ok {
            return Ok(());
        }
        let have = if granted.is_empty() {
            "it has no role bindings".to_string()
        } else {
            let list: Vec<String> = granted
                .iter()
                .map(|g| match &g.namespace {
                    Some(ns) => format!("{} in namespace {ns}", g.role),
                    None => format!("{} everywhere", g.role),
                })
                .collect();
            format!("its roles ({}) do not allow it", list.join(", "))
        };
        Err(denied(caller, verb, res, ns, &have))
    }

    /// The namespaces in which `caller` may `verb` the namespaced `res`: for a list or watch
    /// across namespaces, whose results are then filtered. Refused when there are none.
    pub(crate) fn namespaces(&self, caller: &Caller, verb: Verb, res: Resource) -> Result<Namespaces, Status> {
        if caller.is_superuser() {
            return Ok(Namespaces::All);
        }
        if self.check(caller, verb, res, None).is_ok() {
            return Ok(Namespaces::All);
        }
        let tables = self.tables.read().expect("rbac lock");
        let set: BTreeSet<String> = tables
            .by_user
            .get(&caller.identity.id)
            .into_iter()
            .flatten()
            .filter(|g| g.grants.allows(verb, res))
            .filter_map(|g| g.namespace.clone())
            .collect();
        drop(tables);
        if set.is_empty() {
            // The full reason.
            self.check(caller, verb, res, None)?;
        }
        Ok(Namespaces::Only(set))
    }

    /// Whether `caller` holds every right everywhere (cluster-admin): only such a caller reads
    /// berth's own keys through KV.
    pub(crate) fn is_cluster_admin(&self, caller: &Caller) -> bool {
        if caller.is_superuser() {
            return true;
        }
        let tables = self.tables.read().expect("rbac lock");
        tables
            .by_user
            .get(&caller.identity.id)
            .is_some_and(|gs| gs.iter().any(|g| g.namespace.is_none() && g.role == "cluster-admin"))
    }

    /// The roles bound to a user: (binding, role, namespace).
    pub(crate) fn bindings_of(&self, user: &str) -> Vec<(String, String, Option<String>)> {
        let tables = self.tables.read().expect("rbac lock");
        tables
            .by_user
            .get(user)
            .into_iter()
            .flatten()
            .map(|g| (g.binding.clone(), g.role.clone(), g.namespace.clone()))
            .collect()
    }

    fn replace(&self, t: Tables) {
        *self.tables.write().expect("rbac lock") = t;
    }
}

fn denied(caller: &Caller, verb: Verb, res: Resource, ns: Option<&str>, why: &str) -> Status {
    let place = match ns {
        Some(ns) if res.namespaced() => format!(" in namespace {ns}"),
        None if res.namespaced() => " in all namespaces".to_string(),
        _ => String::new(),
    };
    Status::permission_denied(format!(
        "{} may not {verb} {res}{place}: {why}; a cluster-admin can bind a role that allows it (`berth user add`, \
         or `kind: RoleBinding` with `berth apply`)",
        caller.identity
    ))
}

/// Everything under `prefix`, as (key suffix, value).
pub(crate) fn range_prefix(reader: &berth_store::KvReader, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let q = berth_types::RangeQuery {
        key: prefix.as_bytes().to_vec(),
        range_end: berth_types::prefix_end(prefix.as_bytes()),
        ..Default::default()
    };
    let (res, _) = reader.range(&q).map_err(|e| e.to_string())?;
    Ok(res
        .kvs
        .into_iter()
        .map(|kv| (String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned(), kv.value))
        .collect())
}

/// The custom roles and the bindings in the state.
pub(crate) fn read_documents(
    reader: &berth_store::KvReader,
) -> Result<(Vec<access::Role>, Vec<access::RoleBinding>), String> {
    let mut roles = Vec::new();
    for (name, value) in range_prefix(reader, ROLES)? {
        match serde_json::from_slice::<access::Role>(&value) {
            Ok(r) => roles.push(r),
            Err(e) => warn!(role = name, "ignoring a role record that does not parse: {e}"),
        }
    }
    let mut bindings = Vec::new();
    for (name, value) in range_prefix(reader, BINDINGS)? {
        match serde_json::from_slice::<access::RoleBinding>(&value) {
            Ok(b) => bindings.push(b),
            Err(e) => warn!(binding = name, "ignoring a binding record that does not parse: {e}"),
        }
    }
    Ok((roles, bindings))
}

/// The users in the state.
pub(crate) fn read_users(reader: &berth_store::KvReader) -> Result<Vec<UserRecord>, String> {
    let mut users = Vec::new();
    for (name, value) in range_prefix(reader, USERS)? {
        match serde_json::from_slice::<UserRecord>(&value) {
            Ok(u) => users.push(u),
            Err(e) => warn!(user = name, "ignoring a user record that does not parse: {e}"),
        }
    }
    Ok(users)
}

fn load(reader: &berth_store::KvReader) -> Result<Tables, String> {
    let (roles, bindings) = read_documents(reader)?;
    let custom: HashMap<String, Arc<Grants>> =
        roles.into_iter().map(|r| (r.metadata.name.clone(), Arc::new(Grants::of_rules(&r.spec.rules)))).collect();
    let builtins: HashMap<&str, Arc<Grants>> = access::BUILTIN_ROLES
        .iter()
        .map(|n| (*n, Arc::new(Grants::of_rules(&builtin(n).expect("a built-in role")))))
        .collect();
    let mut t = Tables { users: read_users(reader)?.into_iter().map(|u| u.name).collect(), by_user: HashMap::new() };
    for b in bindings {
        // A binding to a role that does not exist (yet) grants nothing.
        let Some(grants) = builtins.get(b.spec.role.as_str()).or_else(|| custom.get(&b.spec.role)).cloned() else {
            continue;
        };
        for u in &b.spec.users {
            t.by_user.entry(u.clone()).or_default().push(Granted {
                binding: b.metadata.name.clone(),
                role: b.spec.role.clone(),
                grants: grants.clone(),
                namespace: b.spec.namespace.clone(),
            });
        }
    }
    Ok(t)
}

/// Reads the users, roles and bindings into `ctx.rbac` now.
pub(crate) fn refresh(ctx: &Ctx) {
    match load(&ctx.reader) {
        Ok(t) => ctx.rbac.replace(t),
        Err(e) => warn!("cannot read the users, roles and bindings: {e}"),
    }
}

/// Keeps `ctx.rbac` and `ctx.revoked` equal to the replicated state, until `token`: one watch
/// (one task woken per applied round, not two) over /berth/bindings/ .. /berth/users/, which
/// holds the bindings, the revocations, the roles and the users.
pub(crate) async fn follow(ctx: Arc<Ctx>, token: CancellationToken) {
    let from = BINDINGS.as_bytes().to_vec();
    let to = berth_types::prefix_end(USERS.as_bytes());
    loop {
        let mut watcher = match ctx.reader.watch(from.clone(), to.clone(), 0) {
            Ok(w) => w,
            Err(e) => {
                warn!("cannot watch the users, roles and bindings: {e}; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    _ = token.cancelled() => return,
                }
            }
        };
        refresh(&ctx);
        crate::revocation::refresh(&ctx);
        crate::ca_rotation::sync(&ctx);
        loop {
            let next = tokio::select! {
                n = watcher.next() => n,
                _ = token.cancelled() => return,
            };
            match next {
                Ok(berth_store::WatchEvents::Events(events)) => {
                    let keys = || events.iter().map(|(_, e)| e.kv.key.as_slice());
                    if keys().any(|k| k.starts_with(crate::revocation::PREFIX.as_bytes())) {
                        crate::revocation::refresh(&ctx);
                    }
                    if keys().any(|k| k.starts_with(crate::ca_rotation::PREFIX.as_bytes())) {
                        crate::ca_rotation::sync(&ctx);
                    }
                    let rbac = keys().any(|k| {
                        k.starts_with(USERS.as_bytes())
                            || k.starts_with(ROLES.as_bytes())
                            || k.starts_with(BINDINGS.as_bytes())
                    });
                    if rbac {
                        refresh(&ctx);
                    }
                }
                Ok(_) | Err(_) => break,
            }
        }
    }
}

/// What `apply` does with the Role and RoleBinding documents of a request: each one's action
/// (created, updated, unchanged) and the writes (compare-and-puts on its record).
pub(crate) struct AccessPlan {
    pub results: Vec<(&'static str, String, &'static str)>,
    pub parts: Vec<(berth_types::Compare, berth_types::RequestOp)>,
}

/// Plans the roles and bindings of an apply. A binding must name a built-in role, a role in the
/// state or one in the same apply, and `caller` must hold every right of the role where the
/// binding gives it (no one grants what they do not have).
pub(crate) fn plan_access(
    ctx: &Ctx,
    caller: &Caller,
    roles: &[&access::Role],
    bindings: &[&access::RoleBinding],
) -> Result<AccessPlan, Status> {
    let mut plan = AccessPlan { results: Vec::new(), parts: Vec::new() };
    let (stored_roles, _) = read_documents(&ctx.reader).map_err(Status::internal)?;
    for role in roles {
        let key = format!("{ROLES}{}", role.metadata.name).into_bytes();
        let (action, part) = crate::objects::plan_document(&ctx.reader, key, role.canonical_json())?;
        plan.parts.extend(part);
        plan.results.push(("Role", role.metadata.name.clone(), action));
    }
    for b in bindings {
        let rules = builtin(&b.spec.role)
            .or_else(|| roles.iter().find(|r| r.metadata.name == b.spec.role).map(|r| r.spec.rules.clone()))
            .or_else(|| stored_roles.iter().find(|r| r.metadata.name == b.spec.role).map(|r| r.spec.rules.clone()))
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "binding {}: there is no role {:?}: apply its `kind: Role` first (or in the same apply), or use \
                     a built-in one ({})",
                    b.metadata.name,
                    b.spec.role,
                    access::BUILTIN_ROLES[..4].join(", ")
                ))
            })?;
        for rule in &rules {
            for res in rule.resource_set() {
                // A namespace binding gives only the namespaced resources.
                if b.spec.namespace.is_some() && !res.namespaced() {
                    continue;
                }
                for verb in rule.verb_set() {
                    ctx.rbac.check(caller, verb, res, b.spec.namespace.as_deref()).map_err(|e| {
                        Status::permission_denied(format!(
                            "binding {} would give role {} ({verb} {res}), which you do not hold yourself: {}",
                            b.metadata.name,
                            b.spec.role,
                            e.message()
                        ))
                    })?;
                }
            }
        }
        let key = format!("{BINDINGS}{}", b.metadata.name).into_bytes();
        let (action, part) = crate::objects::plan_document(&ctx.reader, key, b.canonical_json())?;
        plan.parts.extend(part);
        plan.results.push(("RoleBinding", b.metadata.name.clone(), action));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Caller {
        Caller { identity: Identity::user(name) }
    }

    fn tables(bindings: &[(&str, &str, Option<&str>)], custom: &[(&str, Vec<access::Rule>)]) -> Rbac {
        let custom: HashMap<String, Arc<Grants>> =
            custom.iter().map(|(n, r)| (n.to_string(), Arc::new(Grants::of_rules(r)))).collect();
        let mut t = Tables::default();
        for (u, role, ns) in bindings {
            t.users.insert(u.to_string());
            let grants = builtin(role).map(|r| Arc::new(Grants::of_rules(&r))).unwrap_or_else(|| custom[*role].clone());
            t.by_user.entry(u.to_string()).or_default().push(Granted {
                binding: format!("{u}-{role}"),
                role: role.to_string(),
                grants,
                namespace: ns.map(str::to_string),
            });
        }
        let r = Rbac::default();
        r.replace(t);
        r
    }

    #[test]
    fn builtin_roles_are_namespace_scoped_as_kubernetes_has_them() {
        let r = tables(&[("v", "view", Some("a")), ("e", "edit", Some("a")), ("c", "cluster-admin", None)], &[]);
        let (v, e, c) = (user("v"), user("e"), user("c"));
        assert!(r.check(&v, Verb::Get, Resource::Services, Some("a")).is_ok());
        let err = r.check(&v, Verb::Get, Resource::Services, Some("b")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("user/v may not get services in namespace b"), "{}", err.message());
        assert!(err.message().contains("view in namespace a"), "{}", err.message());
        assert!(r.check(&v, Verb::Create, Resource::Services, Some("a")).is_err());
        assert!(r.check(&v, Verb::Get, Resource::Secrets, Some("a")).is_err());
        assert!(r.check(&e, Verb::Create, Resource::Secrets, Some("a")).is_ok());
        let err = r.check(&e, Verb::Create, Resource::Tokens, None).unwrap_err();
        assert!(err.message().contains("user/e may not create tokens:"), "{}", err.message());
        assert!(r.check(&e, Verb::Update, Resource::Kv, None).is_err());
        assert!(r.check(&c, Verb::Create, Resource::Tokens, None).is_ok());
        assert!(r.is_cluster_admin(&c) && !r.is_cluster_admin(&e));
        assert_eq!(r.namespaces(&v, Verb::List, Resource::Services).unwrap(), Namespaces::Only(["a".into()].into()));
        assert_eq!(r.namespaces(&c, Verb::List, Resource::Services).unwrap(), Namespaces::All);
        assert!(r.namespaces(&v, Verb::List, Resource::Secrets).is_err());
        let gone = user("nobody");
        assert!(
            r.check(&gone, Verb::Get, Resource::Services, Some("a")).unwrap_err().message().contains("no such user")
        );
        let admin = Caller { identity: Identity::admin("root") };
        assert!(r.check(&admin, Verb::Delete, Resource::Members, None).is_ok());
        let agent = Caller { identity: Identity::agent("n1") };
        assert!(r.check(&agent, Verb::Get, Resource::Nodes, None).unwrap_err().message().contains("QUIC"));
    }

    #[test]
    fn custom_roles_grant_their_rules() {
        let deployer = vec![rule(&[Verb::Get, Verb::Update], &[Resource::Services])];
        let r = tables(&[("d", "deployer", Some("shop"))], &[("deployer", deployer)]);
        let d = user("d");
        assert!(r.check(&d, Verb::Update, Resource::Services, Some("shop")).is_ok());
        assert!(r.check(&d, Verb::Delete, Resource::Services, Some("shop")).is_err());
        assert!(r.check(&d, Verb::Update, Resource::Volumes, Some("shop")).is_err());
    }
}
