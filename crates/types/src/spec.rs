//! The Service spec that `berth apply -f FILE` accepts, its parsing and its validation.
//!
//! [`parse_documents`] reads one or more YAML documents (JSON is valid YAML) separated by `---`. Shape and
//! value-format errors (unknown fields, bad enum values, bad quantities, bad constraints) are caught while
//! parsing and carry the document, field path, line and column; cross-field rules are checked by
//! [`Service::validate`], which `parse_documents` also runs, and carry the document and field path.
//!
//! Defaults are filled in while parsing, so two specs that differ only in omitted defaults are equal, and
//! [`Service::canonical_json`] gives a stable string to detect an unchanged re-apply.

pub mod access;
pub mod namespace;
pub mod network;
mod placement;
mod quantity;
pub mod route;
pub mod security;
#[cfg(test)]
mod tests;
pub mod volume;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

pub use network::{DEFAULT_NETWORK, Network, NetworkSpec};
pub use placement::{
    CONSTRAINT_ALLOWED, Constraint, ConstraintField, ConstraintOp, SPREAD_ALLOWED, SpreadLabel, is_label_key,
};
pub use quantity::{
    CPU_ALLOWED, Cpu, DURATION_ALLOWED, MEMORY_ALLOWED, Memory, duration, format_duration, parse_duration,
};
pub use volume::{AccessMode, FileKind, FileMount, Volume, VolumeDriver, VolumeMount, VolumeSpec};

/// The kinds `apply` accepts.
pub const KINDS: &[&str] = &["Service", "Network", "Volume"];
/// The largest `spec.replicas`.
pub const MAX_REPLICAS: u32 = 10_000;
/// The namespace used when `metadata.namespace` is omitted.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a spec was refused. Every variant says where (document, field path, line when known) and what is
/// allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text is not valid YAML, or a field is unknown, missing, of the wrong type or badly formatted.
    #[error("document {document}, field `{path}`{}: {message}", fmt_location(*.line, *.column))]
    Parse {
        /// 1-based position of the document in the file.
        document: usize,
        /// Dotted field path such as `spec.task.resources.memory` (`.` for the document itself).
        path: String,
        /// 1-based line in the whole file, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
        /// What was wrong and what is allowed.
        message: String,
    },
    /// The document parsed, but a value or a combination of values is not allowed.
    #[error("{}field `{path}`{}: {message}", fmt_document(*.document), fmt_location(*.line, None))]
    Invalid {
        /// 1-based position of the document in the file, when validated from a file.
        document: Option<usize>,
        /// Dotted field path such as `spec.replicas`.
        path: String,
        /// 1-based line in the whole file of the field (or of its nearest written parent), when
        /// validated from a file.
        line: Option<usize>,
        /// What was wrong and what is allowed or what to do.
        message: String,
    },
    /// Two documents define the same service.
    #[error("document {document}: `{key}` is already defined by document {first}; define each object once")]
    Duplicate {
        /// 1-based position of the second definition.
        document: usize,
        /// 1-based position of the first definition.
        first: usize,
        /// `namespace/name`.
        key: String,
    },
    /// The input holds no document.
    #[error(
        "the input contains no documents; expected one or more `kind: Service`, `kind: Network` or `kind: Volume` documents separated \
         by `---`"
    )]
    Empty,
}

fn fmt_location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" (line {l}, column {c})"),
        (Some(l), None) => format!(" (line {l})"),
        _ => String::new(),
    }
}

fn fmt_document(document: Option<usize>) -> String {
    document.map(|d| format!("document {d}, ")).unwrap_or_default()
}

impl SpecError {
    fn invalid(path: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError::Invalid { document: None, path: path.into(), line: None, message: message.into() }
    }

    /// The field path the error is about (empty when it concerns no single field).
    pub fn path(&self) -> &str {
        match self {
            SpecError::Parse { path, .. } | SpecError::Invalid { path, .. } => path,
            SpecError::Duplicate { .. } | SpecError::Empty => "",
        }
    }

    /// The 1-based document position, when known.
    pub fn document(&self) -> Option<usize> {
        match self {
            SpecError::Parse { document, .. } | SpecError::Duplicate { document, .. } => Some(*document),
            SpecError::Invalid { document, .. } => *document,
            SpecError::Empty => None,
        }
    }

    /// The 1-based line, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            SpecError::Parse { line, .. } | SpecError::Invalid { line, .. } => *line,
            _ => None,
        }
    }

    fn in_document(self, n: usize, text: &str) -> SpecError {
        match self {
            SpecError::Invalid { path, message, .. } => {
                let line = locate(text, n, &path);
                SpecError::Invalid { document: Some(n), path, line, message }
            }
            other => other,
        }
    }

    fn from_yaml(document: usize, err: &serde_yaml_ng::Error) -> SpecError {
        let location = err.location();
        let mut text = err.to_string();
        if let Some(loc) = &location {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(stripped) = text.strip_suffix(&suffix) {
                text = stripped.to_string();
            }
        }
        let (mut path, message) = match text.split_once(": ") {
            Some((p, m)) if is_path_like(p) => (p.to_string(), m.to_string()),
            _ => (".".to_string(), text),
        };
        // serde names the enclosing mapping; name the offending field itself.
        for prefix in ["unknown field `", "missing field `", "duplicate field `"] {
            if let Some(field) = message.strip_prefix(prefix).and_then(|rest| rest.split('`').next()) {
                path = if path == "." { field.to_string() } else { format!("{path}.{field}") };
                break;
            }
        }
        SpecError::Parse {
            document,
            path,
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            message,
        }
    }
}

/// The 1-based line (in the whole file) of field `path` of document `document`, or of its
/// deepest parent written in the text: each path component is looked for as `name:` after the
/// line of the previous one. A heuristic over the text, good for block and flow style alike.
fn locate(text: &str, document: usize, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    // Where the document starts: after its (document - 1)th `---` separator, if there are any.
    let mut start = 0;
    let mut seen = 1;
    let mut has_content = false;
    for (i, l) in lines.iter().enumerate() {
        if seen == document {
            break;
        }
        if l.starts_with("---") {
            if has_content {
                seen += 1;
                has_content = false;
            }
            start = i + 1;
        } else if !l.trim().is_empty() && !l.trim_start().starts_with('#') {
            has_content = true;
        }
    }
    let mut at: Option<usize> = None;
    let mut from = start;
    for part in path.split('.') {
        let name = part.split('[').next().unwrap_or(part);
        if name.is_empty() {
            continue;
        }
        let key = format!("{name}:");
        let found = lines.iter().enumerate().skip(from).take_while(|(i, l)| *i == from || !l.starts_with("---")).find(
            |(_, l)| {
                l.match_indices(&key).any(|(pos, _)| {
                    pos == 0 || matches!(l.as_bytes()[pos - 1], b' ' | b'{' | b',' | b'-' | b'"' | b'\'')
                })
            },
        );
        match found {
            Some((i, _)) => {
                at = Some(i + 1);
                from = i;
            }
            None => break,
        }
    }
    at
}

fn is_path_like(p: &str) -> bool {
    !p.is_empty()
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'[' | b']' | b'?'))
}

/// True for a DNS label: 1-63 characters, lowercase letters, digits and `-`, starting with a letter and not
/// ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// True for a port name usable in an SRV record (an IANA service name): 1-15 lowercase letters,
/// digits and `-`, at least one letter, no leading, trailing or doubled `-`.
pub fn is_port_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=15).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--")
}

const DNS_LABEL_ALLOWED: &str =
    "1-63 characters: lowercase letters, digits and '-', starting with a letter and not ending with '-'";

fn check_dns_label(path: &str, what: &str, value: &str) -> Result<(), SpecError> {
    if is_dns_label(value) {
        Ok(())
    } else {
        Err(SpecError::invalid(path, format!("invalid {what} {value:?}; allowed: {DNS_LABEL_ALLOWED}")))
    }
}

/// A visitor that parses a string with a function. Errors are raised inside the visitor so that serde_yaml_ng
/// attributes them to the field itself (path, line and column), not to the enclosing mapping.
struct ParseStr<F> {
    expecting: &'static str,
    parse: F,
}

impl<T, F: FnOnce(&str) -> Result<T, String>> serde::de::Visitor<'_> for ParseStr<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

/// Deserializes a string and parses it with `parse`, reporting errors at the field.
fn parse_str<'de, D, T, F>(deserializer: D, expecting: &'static str, parse: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    deserializer.deserialize_str(ParseStr { expecting, parse })
}

fn de_dns_label<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    parse_str(deserializer, DNS_LABEL_ALLOWED, |s| {
        if is_dns_label(s) {
            Ok(s.to_string())
        } else {
            Err(format!("invalid name {s:?}; allowed: {DNS_LABEL_ALLOWED}"))
        }
    })
}

fn de_replicas<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    use serde::de::{Error, Visitor};

    struct Count;
    impl Visitor<'_> for Count {
        type Value = u32;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a whole number from 0 to {MAX_REPLICAS}")
        }
        fn visit_i64<E: Error>(self, n: i64) -> Result<u32, E> {
            match u32::try_from(n) {
                Ok(n) if n <= MAX_REPLICAS => Ok(n),
                _ => Err(E::custom(format!("replicas {n} is out of range; allowed: 0 to {MAX_REPLICAS}"))),
            }
        }
        fn visit_u64<E: Error>(self, n: u64) -> Result<u32, E> {
            match u32::try_from(n) {
                Ok(n) if n <= MAX_REPLICAS => Ok(n),
                _ => Err(E::custom(format!("replicas {n} is out of range; allowed: 0 to {MAX_REPLICAS}"))),
            }
        }
        fn visit_u128<E: Error>(self, n: u128) -> Result<u32, E> {
            Err(E::custom(format!("replicas {n} is out of range; allowed: 0 to {MAX_REPLICAS}")))
        }
        fn visit_i128<E: Error>(self, n: i128) -> Result<u32, E> {
            Err(E::custom(format!("replicas {n} is out of range; allowed: 0 to {MAX_REPLICAS}")))
        }
    }

    struct MaybeCount;
    impl<'de> Visitor<'de> for MaybeCount {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a whole number from 0 to {MAX_REPLICAS}")
        }
        fn visit_none<E: Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u32>, D::Error> {
            d.deserialize_any(Count).map(Some)
        }
    }

    deserializer.deserialize_option(MaybeCount)
}

/// A document's `kind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// A long-running replicated or global service.
    #[default]
    Service,
    /// An overlay network tasks join.
    Network,
    /// Storage that outlives its tasks.
    Volume,
    /// A host name served by the edge routers.
    Route,
    /// Verbs on resources (`spec::access`).
    Role,
    /// A role given to users.
    RoleBinding,
    /// A tenant's namespace and its quota (`spec::namespace`).
    Namespace,
}

/// One document of an `apply`.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    /// `kind: Service`.
    Service(Box<Service>),
    /// `kind: Network`.
    Network(Network),
    /// `kind: Volume`.
    Volume(Volume),
    /// `kind: Route`.
    Route(route::Route),
    /// `kind: Role`.
    Role(access::Role),
    /// `kind: RoleBinding`.
    RoleBinding(access::RoleBinding),
    /// `kind: Namespace`.
    Namespace(namespace::Namespace),
}

impl Document {
    /// `Service` or `Network`.
    pub fn kind(&self) -> Kind {
        match self {
            Document::Service(_) => Kind::Service,
            Document::Network(_) => Kind::Network,
            Document::Volume(_) => Kind::Volume,
            Document::Route(_) => Kind::Route,
            Document::Role(_) => Kind::Role,
            Document::RoleBinding(_) => Kind::RoleBinding,
            Document::Namespace(_) => Kind::Namespace,
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        match self {
            Document::Service(s) => s.key(),
            Document::Network(n) => n.key(),
            Document::Volume(v) => v.key(),
            Document::Route(r) => r.key(),
            Document::Role(r) => r.metadata.name.clone(),
            Document::RoleBinding(b) => b.metadata.name.clone(),
            Document::Namespace(n) => n.metadata.name.clone(),
        }
    }
}

/// One `kind: Service` document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Always `Service`.
    pub kind: Kind,
    /// Name, namespace, labels.
    pub metadata: Metadata,
    /// Desired state.
    pub spec: ServiceSpec,
}

/// `metadata`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// A DNS label.
    #[serde(deserialize_with = "de_dns_label")]
    pub name: String,
    /// A DNS label; `default` when omitted.
    #[serde(default = "default_namespace", deserialize_with = "de_dns_label")]
    pub namespace: String,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Metadata {
    /// Checks the name, the namespace and the label keys.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_dns_label("metadata.name", "name", &self.name)?;
        check_dns_label("metadata.namespace", "namespace", &self.namespace)?;
        for key in self.labels.keys() {
            if !is_label_key(key) {
                return Err(SpecError::invalid(
                    format!("metadata.labels.{key}"),
                    format!("invalid label key {key:?}; allowed: 1-253 letters, digits, '-', '_', '.' and '/'"),
                ));
            }
        }
        Ok(())
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

/// `spec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// `replicated` (default) or `global`.
    #[serde(default)]
    pub mode: ServiceMode,
    /// Required for `replicated` (0 to 10000), not allowed for `global`.
    #[serde(default, deserialize_with = "de_replicas")]
    pub replicas: Option<u32>,
    /// What each replica runs.
    pub task: TaskSpec,
    /// Where replicas may run.
    #[serde(default)]
    pub placement: Placement,
    /// When a finished task is restarted.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How a changed spec is rolled out.
    #[serde(default = "UpdateConfig::update_default", deserialize_with = "de_update")]
    pub update: UpdateConfig,
    /// How a failed update is rolled back.
    #[serde(default = "UpdateConfig::rollback_default", deserialize_with = "de_rollback")]
    pub rollback: UpdateConfig,
    /// What happens to tasks on a node that loses contact.
    #[serde(default)]
    pub disconnect: DisconnectPolicy,
    /// How other tasks reach this service by name: `vip` (default: one virtual IP, connections
    /// spread over the healthy tasks) or `dnsrr` (the name resolves to the tasks' addresses).
    #[serde(default, skip_serializing_if = "EndpointMode::is_vip")]
    pub endpoint_mode: EndpointMode,
}

/// `spec.endpoint_mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointMode {
    /// A virtual IP per service, load-balanced over its healthy tasks.
    #[default]
    Vip,
    /// DNS round robin: the name answers with the healthy tasks' addresses.
    Dnsrr,
}

impl EndpointMode {
    fn is_vip(&self) -> bool {
        *self == EndpointMode::Vip
    }
}

/// `spec.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMode {
    /// A fixed number of replicas.
    #[default]
    Replicated,
    /// One task on every eligible node.
    Global,
}

/// `spec.task.runtime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// A host process started by the agent.
    Process,
    /// A Docker container.
    Docker,
    /// An image pulled from an OCI registry and run by the node's OCI runtime (runc or crun),
    /// sandboxed as process tasks are; no Docker needed.
    Oci,
}

/// `spec.task`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// `process`, `docker` or `oci`.
    pub runtime: Runtime,
    /// Program and arguments; required for `process`, overrides the entrypoint for `docker`.
    #[serde(default)]
    pub command: Vec<String>,
    /// Extra arguments appended to the command.
    #[serde(default)]
    pub args: Vec<String>,
    /// Required for `docker` and `oci`, not allowed for `process`.
    #[serde(default)]
    pub image: Option<String>,
    /// `oci` only: the secret holding the registry's credentials (`username:password`, or
    /// JSON with `username` and `password`); it reaches the node for the pull and is never
    /// mounted into the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Requests and limits.
    #[serde(default)]
    pub resources: Resources,
    /// Exposed ports.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Health check.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// The signal that asks the task to stop (default `SIGTERM`): a name such as `SIGINT` or
    /// `QUIT`, or a number. Kept out of the serialized spec when it is the default, so specs
    /// written before it existed keep their template hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// How long the task has, after its stop signal, before SIGKILL (default 10s).
    #[serde(default = "default_stop_grace", with = "duration", skip_serializing_if = "is_default_stop_grace")]
    pub stop_grace_period: Duration,
    /// The networks the task joins, by name in the service's namespace. Empty: the namespace's
    /// `default` network, on a cluster with an address pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Volumes mounted into the task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Secrets mounted as files (default `/run/secrets/NAME`, mode 0400).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<FileMount>,
    /// Configs mounted as files at their targets (mode 0444 unless set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configs: Vec<FileMount>,
    /// The user the task runs as, `UID` or `UID:GID`, in a user namespace of its own (default
    /// 65534, `nobody`; uid 0 is root in that namespace only, never the host's root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Capabilities added to the default set (Docker's), by name: `NET_ADMIN` or `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities dropped from the default set, by name: `NET_RAW` or `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// No sandbox: host root, every capability, no seccomp filter and (process tasks) the host's
    /// filesystem. Refused by agents not started with `--allow-privileged`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
}

/// `spec.task.stop_grace_period` when unset (Docker's and Kubernetes' 10 s).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// The longest `stop_grace_period` allowed.
pub const MAX_STOP_GRACE: Duration = Duration::from_secs(3600);

fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

fn is_default_stop_grace(d: &Duration) -> bool {
    *d == DEFAULT_STOP_GRACE
}

/// The signals `stop_signal` may name, with their Linux numbers.
pub const STOP_SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGKILL", 9),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGTERM", 15),
    ("SIGWINCH", 28),
    ("SIGPWR", 30),
];

/// The Linux number of a `stop_signal` value: `SIGTERM`, `TERM` (any case) or `15`.
pub fn signal_number(name: &str) -> Option<i32> {
    let t = name.trim();
    if let Ok(n) = t.parse::<i32>() {
        return (1..=31).contains(&n).then_some(n);
    }
    let upper = t.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
    STOP_SIGNALS.iter().find(|(n, _)| *n == full).map(|&(_, v)| v)
}

impl TaskSpec {
    /// A task of `runtime` running `command`, everything else as a spec that leaves it out
    /// would have it (for code that builds specs, such as tests and benchmarks).
    pub fn new(runtime: Runtime, command: &[&str]) -> TaskSpec {
        TaskSpec {
            runtime,
            command: command.iter().map(|s| s.to_string()).collect(),
            args: Vec::new(),
            image: None,
            image_pull_secret: None,
            env: BTreeMap::new(),
            workdir: None,
            resources: Resources::default(),
            ports: Vec::new(),
            health: None,
            stop_signal: None,
            stop_grace_period: DEFAULT_STOP_GRACE,
            networks: Vec::new(),
            volumes: Vec::new(),
            secrets: Vec::new(),
            configs: Vec::new(),
            user: None,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            privileged: false,
        }
    }

    /// The stop signal's number (SIGTERM unless the spec names another).
    pub fn stop_signal_number(&self) -> i32 {
        self.stop_signal.as_deref().and_then(signal_number).unwrap_or(15)
    }
}

/// `spec.task.resources`: `cpu` and `memory` are requests (used for scheduling); `limits` caps usage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Requested CPU (millicores).
    #[serde(default)]
    pub cpu: Cpu,
    /// Requested memory (bytes).
    #[serde(default)]
    pub memory: Memory,
    /// Optional caps; each must be at least the request.
    #[serde(default)]
    pub limits: Option<ResourceLimits>,
}

/// `spec.task.resources.limits`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    /// CPU cap.
    #[serde(default)]
    pub cpu: Option<Cpu>,
    /// Memory cap.
    #[serde(default)]
    pub memory: Option<Memory>,
    /// The most processes and threads the task may have at once (`pids.max`; default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// `spec.task.ports[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// A name for SRV records (`_NAME._tcp.SERVICE...`): 1-15 lowercase letters, digits and `-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port inside the task.
    pub container: u16,
    /// Port published on the node, if any.
    #[serde(default)]
    pub published: Option<u16>,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// How the published port is offered: `ingress` (every node accepts it and spreads
    /// connections over the service's tasks, wherever they run: the routing mesh) or `host`
    /// (only the nodes running a task accept it, straight into that task). Default: ingress
    /// when the task joins networks (a cluster with address pools), else host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<PortMode>,
}

impl PortSpec {
    /// The mode of a published port (None when it is not published): its `mode`, else
    /// ingress for a task on networks (`with_networks`: the cluster has address pools; the
    /// routing mesh runs over them) and host for a task on its host's network.
    pub fn published_mode(&self, with_networks: bool) -> Option<PortMode> {
        self.published?;
        Some(self.mode.unwrap_or(if with_networks { PortMode::Ingress } else { PortMode::Host }))
    }
}

/// How a published port is offered (`spec.task.ports[].mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortMode {
    /// Every node accepts the port and balances over the service's healthy tasks (Swarm's
    /// routing mesh).
    Ingress,
    /// Only nodes running a task accept the port, into that task.
    Host,
}

impl PortMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PortMode::Ingress => "ingress",
            PortMode::Host => "host",
        }
    }
}

/// A port's protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// `spec.task.health`: exactly one of `http`, `tcp`, `exec`, plus timings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// HTTP GET probe.
    #[serde(default)]
    pub http: Option<HttpProbe>,
    /// TCP connect probe.
    #[serde(default)]
    pub tcp: Option<TcpProbe>,
    /// Command probe.
    #[serde(default)]
    pub exec: Option<ExecProbe>,
    /// Time between probes (default 5s).
    #[serde(default = "secs::<5>", with = "duration")]
    pub interval: Duration,
    /// Time a probe may take (default 2s).
    #[serde(default = "secs::<2>", with = "duration")]
    pub timeout: Duration,
    /// Consecutive failures before unhealthy (default 3).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Grace after start during which failures do not count (default 0s).
    #[serde(default, with = "duration")]
    pub start_period: Duration,
}

fn secs<const N: u64>() -> Duration {
    Duration::from_secs(N)
}

fn default_retries() -> u32 {
    3
}

/// `health.http`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// Port to probe.
    pub port: u16,
    /// Path to GET (default `/`).
    #[serde(default = "default_http_path")]
    pub path: String,
}

fn default_http_path() -> String {
    "/".to_string()
}

/// `health.tcp`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    /// Port to connect to.
    pub port: u16,
}

/// `health.exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecProbe {
    /// Command whose zero exit status means healthy.
    pub command: Vec<String>,
}

/// The single probe of a valid [`HealthCheck`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe<'a> {
    /// `http`
    Http(&'a HttpProbe),
    /// `tcp`
    Tcp(&'a TcpProbe),
    /// `exec`
    Exec(&'a ExecProbe),
}

impl HealthCheck {
    /// The probe, when exactly one is set (always, after validation).
    pub fn probe(&self) -> Option<Probe<'_>> {
        match (&self.http, &self.tcp, &self.exec) {
            (Some(h), None, None) => Some(Probe::Http(h)),
            (None, Some(t), None) => Some(Probe::Tcp(t)),
            (None, None, Some(e)) => Some(Probe::Exec(e)),
            _ => None,
        }
    }
}

/// `spec.placement`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// All must hold for a node to be eligible.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Node labels to spread replicas over, in priority order.
    #[serde(default)]
    pub spread: Vec<SpreadLabel>,
    /// At most this many replicas on one node (at least 1).
    #[serde(default)]
    pub max_replicas_per_node: Option<u32>,
    /// Avoid nodes running these services (same namespace).
    #[serde(default)]
    pub anti_affinity: Vec<String>,
    /// Prefer nodes running these services (same namespace).
    #[serde(default)]
    pub affinity: Vec<String>,
    /// After spread labels: `spread` (fewest tasks of the service, most free resources; the
    /// default) or `binpack` (fill the fullest node that fits first).
    #[serde(default)]
    pub strategy: PlacementStrategy,
}

/// `spec.placement.strategy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementStrategy {
    /// Fewest tasks of the service on the node, then the most free resources.
    #[default]
    Spread,
    /// The least free resources that still fit.
    Binpack,
}

impl Placement {
    /// The parsed constraints.
    pub fn constraints(&self) -> &[Constraint] {
        &self.constraints
    }

    /// The label keys to spread over (`zone` for `node.labels.zone`).
    pub fn spread_labels(&self) -> impl Iterator<Item = &str> {
        self.spread.iter().map(SpreadLabel::label)
    }
}

/// `spec.restart.condition`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Restart whenever the task stops.
    #[default]
    Any,
    /// Restart only when it exits non-zero.
    OnFailure,
    /// Never restart.
    None,
}

/// `spec.restart`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// `any` (default), `on-failure` or `none`.
    #[serde(default)]
    pub condition: RestartCondition,
    /// Wait between restarts (default 1s).
    #[serde(default = "secs::<1>", with = "duration")]
    pub delay: Duration,
    /// Give up after this many restarts within `window`; `None` (default) is unlimited.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Window for counting attempts; 0s (default) means forever.
    #[serde(default, with = "duration")]
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay: secs::<1>(),
            max_attempts: None,
            window: Duration::ZERO,
        }
    }
}

/// `order` of an update or rollback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Stop the old task, then start the new one (default).
    #[default]
    StopFirst,
    /// Start the new task, then stop the old one.
    StartFirst,
}

/// `failure_action` of an update or rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureAction {
    /// Stop rolling out and wait for an operator.
    Pause,
    /// Roll back to the previous spec.
    Rollback,
    /// Carry on.
    Continue,
}

/// `spec.update` and `spec.rollback`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// Tasks changed at once (default 1, at least 1).
    #[serde(default = "default_parallelism")]
    pub parallelism: u32,
    /// Wait between batches (default 0s).
    #[serde(default, with = "duration")]
    pub delay: Duration,
    /// `stop-first` (default) or `start-first`.
    #[serde(default)]
    pub order: UpdateOrder,
    /// What to do when too many tasks fail: update default `rollback`, rollback default `pause`
    /// (a rollback is never rolled back: there `rollback` pauses).
    #[serde(default = "default_update_action")]
    pub failure_action: FailureAction,
    /// How long a new task is watched for failure after it turned ready (running, and healthy
    /// with a health check); the rollout completes once the last tasks stayed up this long
    /// (default 5s).
    #[serde(default = "secs::<5>", with = "duration")]
    pub monitor: Duration,
    /// Tolerated fraction of failed tasks, 0.0 to 1.0 (default 0.0).
    #[serde(default)]
    pub max_failure_ratio: f64,
}

fn default_parallelism() -> u32 {
    1
}

fn default_update_action() -> FailureAction {
    FailureAction::Rollback
}

impl UpdateConfig {
    fn with_action(failure_action: FailureAction) -> UpdateConfig {
        UpdateConfig {
            parallelism: 1,
            delay: Duration::ZERO,
            order: UpdateOrder::StopFirst,
            failure_action,
            monitor: secs::<5>(),
            max_failure_ratio: 0.0,
        }
    }

    /// The defaults of `spec.update`.
    pub fn update_default() -> UpdateConfig {
        UpdateConfig::with_action(FailureAction::Rollback)
    }

    /// The defaults of `spec.rollback`.
    pub fn rollback_default() -> UpdateConfig {
        UpdateConfig::with_action(FailureAction::Pause)
    }
}

/// `UpdateConfig` as written, where the default `failure_action` depends on the section.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateInput {
    #[serde(default = "default_parallelism")]
    parallelism: u32,
    #[serde(default, deserialize_with = "duration::deserialize")]
    delay: Duration,
    #[serde(default)]
    order: UpdateOrder,
    #[serde(default)]
    failure_action: Option<FailureAction>,
    #[serde(default = "secs::<5>", deserialize_with = "duration::deserialize")]
    monitor: Duration,
    #[serde(default)]
    max_failure_ratio: f64,
}

impl UpdateInput {
    fn resolve(self, default_action: FailureAction) -> UpdateConfig {
        UpdateConfig {
            parallelism: self.parallelism,
            delay: self.delay,
            order: self.order,
            failure_action: self.failure_action.unwrap_or(default_action),
            monitor: self.monitor,
            max_failure_ratio: self.max_failure_ratio,
        }
    }
}

fn de_update<'de, D: Deserializer<'de>>(deserializer: D) -> Result<UpdateConfig, D::Error> {
    Ok(UpdateInput::deserialize(deserializer)?.resolve(FailureAction::Rollback))
}

fn de_rollback<'de, D: Deserializer<'de>>(deserializer: D) -> Result<UpdateConfig, D::Error> {
    Ok(UpdateInput::deserialize(deserializer)?.resolve(FailureAction::Pause))
}

/// `spec.disconnect`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DisconnectPolicy {
    /// Stateless: replace the task elsewhere after the node-down grace (default).
    #[default]
    Replace,
    /// Stateful: the agent stops the task itself after the fence timeout, so two copies never run.
    AtMostOnce,
}

/// Parses one or more `---`-separated YAML (or JSON) documents and validates each one. A document
/// is a Service unless its `kind` says `Network` or `Volume`.
///
/// Empty documents are skipped; a file with no document, or two documents defining the same
/// kind and `namespace/name`, is an error.
pub fn parse_all(text: &str) -> Result<Vec<Document>, SpecError> {
    // First pass: each document's size in YAML nodes with its aliases expanded (a document
    // whose aliases expand exponentially, a "billion laughs", is refused before anything
    // expands it), then its `kind`, so the second pass can deserialize it into its own type
    // straight from the text (keeping serde_yaml_ng's lines and columns in errors).
    //
    // serde_yaml_ng's document iterator repeats a syntax error forever instead of ending: every
    // pass stops after the first document that does not load (the second pass reports it).
    let mut loaded = 0;
    for (i, d) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let nodes = std::cell::Cell::new(0);
        match serde::de::DeserializeSeed::deserialize(NodeBudget(&nodes), d) {
            Ok(()) => loaded += 1,
            Err(e) if !e.to_string().contains(TOO_MANY_NODES) => break,
            Err(_) => {
                return Err(SpecError::Parse {
                    document: i + 1,
                    path: ".".into(),
                    line: None,
                    column: None,
                    message: format!(
                        "the document expands to more than {MAX_YAML_NODES} YAML nodes (are its aliases \
                     nested?): write it out, or split it"
                    ),
                });
            }
        }
    }
    #[derive(Deserialize)]
    struct KindOnly {
        kind: Option<String>,
    }
    let kinds: Vec<Option<String>> = serde_yaml_ng::Deserializer::from_str(text)
        .take(loaded)
        .map(|d| Option::<KindOnly>::deserialize(d).ok().flatten().and_then(|k| k.kind))
        .collect();
    let mut documents: Vec<Document> = Vec::new();
    let mut first_seen: BTreeMap<(Kind, String), usize> = BTreeMap::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate().take(loaded + 1) {
        let n = i + 1;
        let kind = kinds.get(i).and_then(|k| k.as_deref());
        let parsed = if kind == Some("Network") {
            let parsed = Option::<Network>::deserialize(document).map_err(|e| SpecError::from_yaml(n, &e))?;
            let Some(network) = parsed else { continue };
            network.validate().map_err(|e| e.in_document(n, text))?;
            Document::Network(network)
        } else if kind == Some("Volume") {
            let parsed = Option::<Volume>::deserialize(document).map_err(|e| SpecError::from_yaml(n, &e))?;
            let Some(volume) = parsed else { continue };
            volume.validate().map_err(|e| e.in_document(n, text))?;
            Document::Volume(volume)
        } else if kind == Some("Route") {
            let parsed = Option::<route::Route>::deserialize(document).map_err(|e| SpecError::from_yaml(n, &e))?;
            let Some(route) = parsed else { continue };
            route.validate().map_err(|e| e.in_document(n, text))?;
            Document::Route(route)
        } else if kind == Some("Role") {
            let parsed = Option::<access::Role>::deserialize(document).map_err(|e| SpecError::from_yaml(n, &e))?;
            let Some(role) = parsed else { continue };
            role.validate().map_err(|e| e.in_document(n, text))?;
            Document::Role(role)
        } else if kind == Some("RoleBinding") {
            let parsed =
                Option::<access::RoleBinding>::deserialize(document).map_err(|e| SpecError::from_yaml(n, &e))?;
            let Some(binding) = parsed else { continue };
            binding.validate().map_err(|e| e.in_document(n, text))?;
            Document::RoleBinding(binding)
        } else if kind == Some("Namespace") {
            let parsed =
                Option::<namespace::Namespace>::deserialize(document).map_err(|e| SpecError::from_yaml(n, &e))?;
            let Some(ns) = parsed else { continue };
            ns.validate().map_err(|e| e.in_document(n, text))?;
            Document::Namespace(ns)
        } else {
            let parsed = Option::<Service>::deserialize(document).map_err(|e| SpecError::from_yaml(n, &e))?;
            let Some(service) = parsed else { continue };
            if service.kind != Kind::Service {
                return Err(SpecError::invalid(
                    "kind",
                    "expected `Service`, `Network`, `Volume`, `Route`, `Role`, `RoleBinding` or `Namespace`",
                )
                .in_document(n, text));
            }
            service.validate().map_err(|e| e.in_document(n, text))?;
            Document::Service(Box::new(service))
        };
        let id = (parsed.kind(), parsed.key());
        if let Some(&first) = first_seen.get(&id) {
            return Err(SpecError::Duplicate { document: n, first, key: parsed.key() });
        }
        first_seen.insert(id, n);
        documents.push(parsed);
    }
    if documents.is_empty() {
        return Err(SpecError::Empty);
    }
    Ok(documents)
}

/// The most YAML nodes one document may expand to, its aliases included. A service spec has a
/// few hundred at most.
pub const MAX_YAML_NODES: usize = 100_000;
const TOO_MANY_NODES: &str = "berth: too many YAML nodes";

/// Walks a document, counting its nodes (each alias expanded where it is used, as every
/// deserializer sees it), and fails once there are more than [`MAX_YAML_NODES`].
struct NodeBudget<'a>(&'a std::cell::Cell<usize>);

impl NodeBudget<'_> {
    fn take<E: serde::de::Error>(&self) -> Result<(), E> {
        let n = self.0.get() + 1;
        self.0.set(n);
        if n > MAX_YAML_NODES { Err(E::custom(TOO_MANY_NODES)) } else { Ok(()) }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for NodeBudget<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! count_scalar {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: serde::de::Error>(self, _: $t) -> Result<(), E> {
            self.take()
        })*
    };
}

impl<'de> serde::de::Visitor<'de> for NodeBudget<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    count_scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
        visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.take()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.take()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take()?;
        serde::de::DeserializeSeed::deserialize(NodeBudget(self.0), d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.take()?;
        serde::de::DeserializeSeed::deserialize(NodeBudget(self.0), d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.take()?;
        while seq.next_element_seed(NodeBudget(self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.take()?;
        while map.next_key_seed(NodeBudget(self.0))?.is_some() {
            map.next_value_seed(NodeBudget(self.0))?;
        }
        Ok(())
    }

    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): its value counts like any other.
        use serde::de::VariantAccess;
        self.take()?;
        let (_, variant) = data.variant_seed(NodeBudget(self.0))?;
        variant.newtype_variant_seed(NodeBudget(self.0))
    }
}

/// [`parse_all`] for input that must hold only services: a `kind: Network` document is an error.
pub fn parse_documents(text: &str) -> Result<Vec<Service>, SpecError> {
    parse_all(text)?
        .into_iter()
        .enumerate()
        .map(|(i, d)| match d {
            Document::Service(s) => Ok(*s),
            Document::Network(_)
            | Document::Volume(_)
            | Document::Route(_)
            | Document::Role(_)
            | Document::RoleBinding(_)
            | Document::Namespace(_) => {
                Err(SpecError::invalid("kind", "only `kind: Service` documents are allowed here")
                    .in_document(i + 1, text))
            }
        })
        .collect()
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// JSON with every default filled in and a stable field order (struct order, sorted maps): equal for two
    /// specs that differ only in omitted defaults, so an unchanged re-apply can be detected.
    pub fn canonical_json(&self) -> String {
        // Serializing plain structs, string-keyed BTreeMaps and finite floats cannot fail; the fallback is
        // unreachable but keeps this infallible.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"unserializable\":{:?}}}", e.to_string()))
    }

    /// Checks the values and their combinations. Returns the first problem found.
    pub fn validate(&self) -> Result<(), SpecError> {
        let meta = &self.metadata;
        meta.validate()?;
        let spec = &self.spec;
        match (spec.mode, spec.replicas) {
            (ServiceMode::Replicated, None) => {
                return Err(SpecError::invalid(
                    "spec.replicas",
                    format!("mode `replicated` requires `replicas` (0 to {MAX_REPLICAS})"),
                ));
            }
            (ServiceMode::Replicated, Some(n)) if n > MAX_REPLICAS => {
                return Err(SpecError::invalid(
                    "spec.replicas",
                    format!("replicas {n} is out of range; allowed: 0 to {MAX_REPLICAS}"),
                ));
            }
            (ServiceMode::Global, Some(_)) => {
                return Err(SpecError::invalid(
                    "spec.replicas",
                    "`replicas` is not allowed with mode `global` (one task runs on every eligible node); \
                     remove it or use mode `replicated`",
                ));
            }
            _ => {}
        }
        validate_task(&spec.task)?;
        let t = &spec.task;
        volume::validate_mounts(&t.volumes, &t.secrets, &t.configs, spec.mode == ServiceMode::Global)?;
        validate_placement(&spec.placement, &meta.name)?;
        validate_update("spec.update", &spec.update)?;
        validate_update("spec.rollback", &spec.rollback)?;
        Ok(())
    }
}

fn validate_task(task: &TaskSpec) -> Result<(), SpecError> {
    match task.runtime {
        Runtime::Process => {
            if task.command.is_empty() {
                return Err(SpecError::invalid(
                    "spec.task.command",
                    "runtime `process` requires `command`, a non-empty list such as [\"/usr/bin/python3\", \"app.py\"]",
                ));
            }
            if task.image.is_some() {
                return Err(SpecError::invalid(
                    "spec.task.image",
                    "`image` is not allowed with runtime `process`; remove it or use runtime `docker`",
                ));
            }
        }
        Runtime::Docker | Runtime::Oci => match task.image.as_deref() {
            None => {
                return Err(SpecError::invalid(
                    "spec.task.image",
                    format!(
                        "runtime `{}` requires `image`, such as \"nginx:1.27\" or \"registry.example.com/app@sha256:...\"",
                        if task.runtime == Runtime::Oci { "oci" } else { "docker" }
                    ),
                ));
            }
            Some(image) if image.trim().is_empty() || image.chars().any(char::is_whitespace) => {
                return Err(SpecError::invalid(
                    "spec.task.image",
                    format!("invalid image {image:?}; allowed: a non-empty image reference without spaces"),
                ));
            }
            Some(_) => {}
        },
    }
    if task.command.first().is_some_and(|c| c.is_empty()) {
        return Err(SpecError::invalid("spec.task.command[0]", "the program must not be empty"));
    }
    if let Some(dir) = &task.workdir
        && !dir.starts_with('/')
    {
        return Err(SpecError::invalid(
            "spec.task.workdir",
            format!("workdir {dir:?} is relative; allowed: an absolute path such as \"/srv/app\""),
        ));
    }
    for key in task.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(SpecError::invalid(
                format!("spec.task.env.{key}"),
                format!("invalid environment variable name {key:?}; allowed: a non-empty name without '=' or NUL"),
            ));
        }
    }
    let res = &task.resources;
    if let Some(limits) = &res.limits {
        if let Some(cpu) = limits.cpu
            && cpu < res.cpu
        {
            return Err(SpecError::invalid(
                "spec.task.resources.limits.cpu",
                format!("cpu limit {cpu} is below the request {}; a limit must be at least the request", res.cpu),
            ));
        }
        if let Some(memory) = limits.memory
            && memory < res.memory
        {
            return Err(SpecError::invalid(
                "spec.task.resources.limits.memory",
                format!(
                    "memory limit {memory} bytes is below the request {} bytes; a limit must be at least the request",
                    res.memory
                ),
            ));
        }
    }
    let mut published = BTreeSet::new();
    let mut container = BTreeSet::new();
    for (i, port) in task.ports.iter().enumerate() {
        if port.container == 0 {
            return Err(SpecError::invalid(format!("spec.task.ports[{i}].container"), "allowed: 1 to 65535"));
        }
        if !container.insert((port.container, port.protocol)) {
            return Err(SpecError::invalid(
                format!("spec.task.ports[{i}].container"),
                format!("container port {} is listed twice for the same protocol", port.container),
            ));
        }
        if port.mode.is_some() && port.published.is_none() {
            return Err(SpecError::invalid(
                format!("spec.task.ports[{i}].mode"),
                "a mode applies to a published port only; set `published` or remove `mode`",
            ));
        }
        if let Some(p) = port.published {
            if p == 0 {
                return Err(SpecError::invalid(format!("spec.task.ports[{i}].published"), "allowed: 1 to 65535"));
            }
            if !published.insert((p, port.protocol)) {
                return Err(SpecError::invalid(
                    format!("spec.task.ports[{i}].published"),
                    format!("published port {p} is used twice for the same protocol; each must be unique"),
                ));
            }
        }
    }
    let mut port_names = BTreeSet::new();
    for (i, port) in task.ports.iter().enumerate() {
        let Some(name) = &port.name else { continue };
        if !is_port_name(name) {
            return Err(SpecError::invalid(
                format!("spec.task.ports[{i}].name"),
                format!(
                    "invalid port name {name:?}; allowed: 1-15 lowercase letters, digits and '-', with a letter, \
                     not starting or ending with '-' (an IANA service name such as \"http\")"
                ),
            ));
        }
        if !port_names.insert(name) {
            return Err(SpecError::invalid(
                format!("spec.task.ports[{i}].name"),
                format!("port name {name:?} is used twice; each must be unique"),
            ));
        }
    }
    if task.networks.len() > network::MAX_NETWORKS_PER_TASK {
        return Err(SpecError::invalid(
            "spec.task.networks",
            format!(
                "{} networks listed; a task may join at most {}",
                task.networks.len(),
                network::MAX_NETWORKS_PER_TASK
            ),
        ));
    }
    let mut networks = BTreeSet::new();
    for (i, name) in task.networks.iter().enumerate() {
        check_dns_label(&format!("spec.task.networks[{i}]"), "network name", name)?;
        if !networks.insert(name) {
            return Err(SpecError::invalid(
                format!("spec.task.networks[{i}]"),
                format!("network `{name}` is listed twice"),
            ));
        }
    }
    if let Some(health) = &task.health {
        validate_health(health)?;
    }
    if let Some(sig) = &task.stop_signal
        && signal_number(sig).is_none()
    {
        let names: Vec<&str> = STOP_SIGNALS.iter().map(|(n, _)| *n).collect();
        return Err(SpecError::invalid(
            "spec.task.stop_signal",
            format!(
                "unknown signal {sig:?}; allowed: {}, without the SIG prefix too, or a number 1 to 31",
                names.join(", ")
            ),
        ));
    }
    security::validate(task.user.as_deref(), &task.cap_add, &task.cap_drop)?;
    if let Some(secret) = &task.image_pull_secret {
        if task.runtime != Runtime::Oci {
            return Err(SpecError::invalid(
                "spec.task.image_pull_secret",
                "only runtime `oci` pulls images itself; remove image_pull_secret or use runtime `oci`",
            ));
        }
        if !volume::is_file_name(secret) {
            return Err(SpecError::invalid(
                "spec.task.image_pull_secret",
                format!("invalid secret name {secret:?}; allowed: {}", volume::FILE_NAME_ALLOWED),
            ));
        }
    }
    if let Some(pids) = task.resources.limits.as_ref().and_then(|l| l.pids)
        && pids < 1
    {
        return Err(SpecError::invalid(
            "spec.task.resources.limits.pids",
            "a task needs at least one process; allowed: 1 or more (default 1024)",
        ));
    }
    if task.stop_grace_period > MAX_STOP_GRACE {
        return Err(SpecError::invalid(
            "spec.task.stop_grace_period",
            format!(
                "{} is too long; allowed: 0s to {}",
                format_duration(task.stop_grace_period),
                format_duration(MAX_STOP_GRACE)
            ),
        ));
    }
    Ok(())
}

fn validate_health(health: &HealthCheck) -> Result<(), SpecError> {
    const P: &str = "spec.task.health";
    let set = [health.http.is_some(), health.tcp.is_some(), health.exec.is_some()].iter().filter(|s| **s).count();
    if set != 1 {
        let what = if set == 0 { "no probe is set" } else { "more than one probe is set" };
        return Err(SpecError::invalid(P, format!("{what}; set exactly one of `http`, `tcp` or `exec`")));
    }
    match health.probe() {
        Some(Probe::Http(h)) => {
            if h.port == 0 {
                return Err(SpecError::invalid(format!("{P}.http.port"), "allowed: 1 to 65535"));
            }
            if !h.path.starts_with('/') {
                return Err(SpecError::invalid(
                    format!("{P}.http.path"),
                    format!("path {:?} must start with '/'", h.path),
                ));
            }
        }
        Some(Probe::Tcp(t)) if t.port == 0 => {
            return Err(SpecError::invalid(format!("{P}.tcp.port"), "allowed: 1 to 65535"));
        }
        Some(Probe::Exec(e)) if e.command.first().is_none_or(|c| c.is_empty()) => {
            return Err(SpecError::invalid(
                format!("{P}.exec.command"),
                "requires a non-empty command list such as [\"/bin/check\"]",
            ));
        }
        _ => {}
    }
    if health.interval.is_zero() {
        return Err(SpecError::invalid(format!("{P}.interval"), "must be greater than 0s, such as \"5s\""));
    }
    if health.timeout.is_zero() {
        return Err(SpecError::invalid(format!("{P}.timeout"), "must be greater than 0s, such as \"2s\""));
    }
    if health.retries == 0 {
        return Err(SpecError::invalid(format!("{P}.retries"), "must be at least 1"));
    }
    Ok(())
}

fn validate_placement(placement: &Placement, own_name: &str) -> Result<(), SpecError> {
    const P: &str = "spec.placement";
    if placement.max_replicas_per_node == Some(0) {
        return Err(SpecError::invalid(
            format!("{P}.max_replicas_per_node"),
            "0 would place no replica anywhere; allowed: at least 1, or omit it for no limit",
        ));
    }
    // Unsatisfiable combinations: two different `==` on one field, or `==` and `!=` with the same value.
    let mut required: BTreeMap<&ConstraintField, &str> = BTreeMap::new();
    for c in placement.constraints.iter().filter(|c| c.op == ConstraintOp::Eq) {
        if let Some(previous) = required.insert(&c.field, &c.value)
            && previous != c.value
        {
            return Err(SpecError::invalid(
                format!("{P}.constraints"),
                format!(
                    "`{} == {previous}` and `{c}` cannot both hold, so no node is eligible; keep one of them",
                    c.field
                ),
            ));
        }
    }
    for c in placement.constraints.iter().filter(|c| c.op == ConstraintOp::Ne) {
        if required.get(&c.field) == Some(&c.value.as_str()) {
            return Err(SpecError::invalid(
                format!("{P}.constraints"),
                format!("`{} == {}` and `{c}` contradict each other, so no node is eligible", c.field, c.value),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for s in &placement.spread {
        if !seen.insert(s.label()) {
            return Err(SpecError::invalid(format!("{P}.spread"), format!("`{s}` is listed twice")));
        }
    }
    for (field, names) in [("affinity", &placement.affinity), ("anti_affinity", &placement.anti_affinity)] {
        for (i, name) in names.iter().enumerate() {
            check_dns_label(&format!("{P}.{field}[{i}]"), "service name", name)?;
        }
    }
    if let Some(name) = placement.affinity.iter().find(|n| placement.anti_affinity.contains(n)) {
        return Err(SpecError::invalid(
            format!("{P}.affinity"),
            format!("service `{name}` is listed in both `affinity` and `anti_affinity`; keep it in one"),
        ));
    }
    if placement.affinity.iter().any(|n| n == own_name) {
        return Err(SpecError::invalid(
            format!("{P}.affinity"),
            format!("a service cannot have affinity to itself (`{own_name}`); use `spread` or remove it"),
        ));
    }
    Ok(())
}

fn validate_update(path: &str, u: &UpdateConfig) -> Result<(), SpecError> {
    if u.parallelism == 0 {
        return Err(SpecError::invalid(format!("{path}.parallelism"), "must be at least 1"));
    }
    if !(0.0..=1.0).contains(&u.max_failure_ratio) {
        return Err(SpecError::invalid(
            format!("{path}.max_failure_ratio"),
            format!("{} is out of range; allowed: 0.0 to 1.0", u.max_failure_ratio),
        ));
    }
    Ok(())
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Service {}", self.key())
    }
}
