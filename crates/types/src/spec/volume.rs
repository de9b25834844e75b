//! Storage in specs: `kind: Volume` documents, and what a task mounts (`spec.task.volumes`,
//! `spec.task.secrets`, `spec.task.configs`).
//!
//! A volume outlives its tasks. `local` is a directory its node's agent keeps under its data dir
//! (with `size`, a loop-mounted filesystem image of that size); `host` a path on the node, allowed
//! only under the prefixes the agent was started with; `glusterfs` a GlusterFS volume the node
//! mounts through FUSE while a task of it uses the volume. `access` has CSI's meaning, read as
//! berth's scheduler enforces it: `single-node-writer` is held by one task at a time;
//! `multi-node-reader` by any number of tasks that mount it read-only; `multi-node-writer` by any.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use super::{Kind, Memory, Metadata, SpecError, check_dns_label};

/// The placeholder a per-slot volume's `source` holds.
pub const SLOT_PLACEHOLDER: &str = "{slot}";
/// The smallest `size` of a local volume (a filesystem image smaller than this holds nothing).
pub const MIN_VOLUME_SIZE: u64 = 16 << 20;
/// The largest secret or config value (Swarm's limit).
pub const MAX_FILE_BYTES: usize = 500 * 1024;
/// Where a secret is mounted when its target is omitted: `/run/secrets/NAME`.
pub const SECRETS_DIR: &str = "/run/secrets";

/// One `kind: Volume` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Always `Volume`.
    pub kind: Kind,
    /// Name, namespace, labels.
    pub metadata: Metadata,
    /// Driver and access.
    pub spec: VolumeSpec,
}

/// `spec` of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// `local`, `host` or `glusterfs`.
    pub driver: VolumeDriver,
    /// Who may use it at once (default `single-node-writer`).
    #[serde(default)]
    pub access: AccessMode,
    /// `local` only: the size of the volume's filesystem, enforced (such as `1Gi`). Omitted: a
    /// plain directory without a quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Memory>,
    /// `host` only: the absolute path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `glusterfs` only: the servers to fetch the volume file from (`host` or `host:port`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    /// `glusterfs` only: the GlusterFS volume's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

/// `spec.driver`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeDriver {
    /// A directory (or a sized filesystem image) under the agent's data dir, pinned to the node
    /// where it is first used.
    #[default]
    Local,
    /// A path on the node, under one of the agent's `--allow-host-path` prefixes.
    Host,
    /// A GlusterFS volume mounted through FUSE on the node of each task that uses it.
    Glusterfs,
}

impl fmt::Display for VolumeDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VolumeDriver::Local => "local",
            VolumeDriver::Host => "host",
            VolumeDriver::Glusterfs => "glusterfs",
        })
    }
}

/// `spec.access`, with CSI's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    /// One task at a time, read-write; a replacement waits until the previous one has ended.
    #[default]
    SingleNodeWriter,
    /// Any number of tasks on any nodes, each mounting it read-only.
    MultiNodeReader,
    /// Any number of tasks on any nodes, read-write.
    MultiNodeWriter,
}

impl fmt::Display for AccessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessMode::SingleNodeWriter => "single-node-writer",
            AccessMode::MultiNodeReader => "multi-node-reader",
            AccessMode::MultiNodeWriter => "multi-node-writer",
        })
    }
}

impl Volume {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// JSON with every default filled in, to detect an unchanged re-apply.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"unserializable\":{:?}}}", e.to_string()))
    }

    /// Checks the values and their combinations.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.metadata.validate()?;
        self.spec.validate("spec")
    }
}

impl VolumeSpec {
    /// Checks the fields against the driver; `path` prefixes errors (`spec` or a mount's path).
    pub fn validate(&self, path: &str) -> Result<(), SpecError> {
        let not_for = |field: &str| {
            SpecError::invalid(
                format!("{path}.{field}"),
                format!("`{field}` is not allowed with driver `{}`; remove it", self.driver),
            )
        };
        if self.driver != VolumeDriver::Local && self.size.is_some() {
            return Err(SpecError::invalid(
                format!("{path}.size"),
                format!(
                    "`size` is only enforced for driver `local`; a `{}` volume's size is its storage's",
                    self.driver
                ),
            ));
        }
        if let Some(size) = self.size
            && size.bytes() < MIN_VOLUME_SIZE
        {
            return Err(SpecError::invalid(
                format!("{path}.size"),
                format!("size {} bytes is too small; allowed: at least 16Mi", size.bytes()),
            ));
        }
        if self.driver != VolumeDriver::Host && self.path.is_some() {
            return Err(not_for("path"));
        }
        if self.driver != VolumeDriver::Glusterfs {
            if !self.servers.is_empty() {
                return Err(not_for("servers"));
            }
            if self.volume.is_some() {
                return Err(not_for("volume"));
            }
        }
        match self.driver {
            VolumeDriver::Local => {}
            VolumeDriver::Host => {
                let Some(p) = &self.path else {
                    return Err(SpecError::invalid(
                        format!("{path}.path"),
                        "driver `host` requires `path`, an absolute path on the node such as \"/srv/data\"",
                    ));
                };
                check_abs_path(&format!("{path}.path"), p)?;
            }
            VolumeDriver::Glusterfs => {
                if self.servers.is_empty() {
                    return Err(SpecError::invalid(
                        format!("{path}.servers"),
                        "driver `glusterfs` requires `servers`, such as [\"gluster-1\", \"198.18.0.7:24007\"]",
                    ));
                }
                for (i, s) in self.servers.iter().enumerate() {
                    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c == '/' || c == ',') {
                        return Err(SpecError::invalid(
                            format!("{path}.servers[{i}]"),
                            format!("invalid server {s:?}; allowed: a host name or address, with an optional :port"),
                        ));
                    }
                }
                match &self.volume {
                    None => {
                        return Err(SpecError::invalid(
                            format!("{path}.volume"),
                            "driver `glusterfs` requires `volume`, the GlusterFS volume's name",
                        ));
                    }
                    Some(v) if !is_gluster_name(v) => {
                        return Err(SpecError::invalid(
                            format!("{path}.volume"),
                            format!("invalid GlusterFS volume name {v:?}; allowed: letters, digits, '-' and '_'"),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}

fn is_gluster_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// An absolute, normalised path: starts with `/`, no `.` or `..` components, no NUL.
pub fn check_abs_path(path: &str, value: &str) -> Result<(), SpecError> {
    if !value.starts_with('/') {
        return Err(SpecError::invalid(
            path,
            format!("{value:?} is not an absolute path; allowed: a path starting with '/', such as \"/data\""),
        ));
    }
    if value.contains('\0') || value.split('/').any(|c| c == "." || c == "..") {
        return Err(SpecError::invalid(
            path,
            format!("{value:?} has a '.' or '..' component or a NUL; write the path without them"),
        ));
    }
    Ok(())
}

/// A volume mount of `spec.task.volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// The volume's name in the service's namespace; with `{slot}`, one volume per slot, created
    /// on first use from `driver`, `size` and `access`.
    pub source: String,
    /// The absolute path in the task.
    pub target: String,
    /// Mount it read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Per-slot volumes only: the driver of the volumes made (only `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<VolumeDriver>,
    /// Per-slot volumes only: their size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Memory>,
    /// Per-slot volumes only: their access mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessMode>,
}

impl VolumeMount {
    /// Whether `source` names one volume per slot.
    pub fn per_slot(&self) -> bool {
        self.source.contains(SLOT_PLACEHOLDER)
    }

    /// The volume a task of `slot` uses.
    pub fn volume_name(&self, slot: u32) -> String {
        self.source.replace(SLOT_PLACEHOLDER, &slot.to_string())
    }

    /// The spec of the volume a per-slot mount creates.
    pub fn template(&self) -> VolumeSpec {
        VolumeSpec {
            driver: self.driver.unwrap_or_default(),
            access: self.access.unwrap_or_default(),
            size: self.size,
            path: None,
            servers: Vec::new(),
            volume: None,
        }
    }
}

/// Secret or config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    /// Encrypted at rest, never shown.
    Secret,
    /// Stored and shown as is.
    Config,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Secret => "secret",
            FileKind::Config => "config",
        })
    }
}

/// One entry of `spec.task.secrets` or `spec.task.configs`: `NAME`, or `{source, target, mode}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileMount {
    /// The secret's or config's name in the service's namespace.
    pub source: String,
    /// Absolute path of the file in the task (default `/run/secrets/NAME` for a secret; a config
    /// needs one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Permission bits, written in octal (`0400`, `"0440"`); default 0400 (secret), 0444
    /// (config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl FileMount {
    /// The path in the task.
    pub fn target_path(&self) -> String {
        self.target.clone().unwrap_or_else(|| format!("{SECRETS_DIR}/{}", self.source))
    }

    /// The permission bits.
    pub fn mode_bits(&self, kind: FileKind) -> u32 {
        self.mode.unwrap_or(match kind {
            FileKind::Secret => 0o400,
            FileKind::Config => 0o444,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMountFull {
    source: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    mode: Option<ModeInput>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ModeInput {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileMountInput {
    Name(String),
    Full(FileMountFull),
}

/// Reads permission bits written in octal: `400`, `0400`, `"0o440"`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!("invalid mode {text:?}; allowed: octal permission bits from 0 to 0777, such as 0400")),
    }
}

impl<'de> Deserialize<'de> for FileMount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let input = FileMountInput::deserialize(deserializer).map_err(|_| {
            D::Error::custom(
                "expected a name, or a map with `source` and optional `target` and `mode` (no other fields)",
            )
        })?;
        Ok(match input {
            FileMountInput::Name(source) => FileMount { source, target: None, mode: None },
            FileMountInput::Full(f) => {
                let mode = match f.mode {
                    None => None,
                    // YAML reads `0400` as the number 400: its digits are the octal bits.
                    Some(ModeInput::Number(n)) => Some(parse_mode(&n.to_string()).map_err(D::Error::custom)?),
                    Some(ModeInput::Text(t)) => Some(parse_mode(&t).map_err(D::Error::custom)?),
                };
                FileMount { source: f.source, target: f.target, mode }
            }
        })
    }
}

/// Whether `name` may name a secret or config: 1-64 letters, digits, '-', '_' and '.', starting
/// with a letter or digit.
pub fn is_file_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// What [`is_file_name`] allows, for messages.
pub const FILE_NAME_ALLOWED: &str = "1-64 letters, digits, '-', '_' and '.', starting with a letter or digit";

/// Checks `spec.task.volumes`, `secrets` and `configs`. `global`: the service runs one task per
/// node, so per-slot volumes do not apply.
pub(crate) fn validate_mounts(
    volumes: &[VolumeMount],
    secrets: &[FileMount],
    configs: &[FileMount],
    global: bool,
) -> Result<(), SpecError> {
    let mut targets = std::collections::BTreeMap::new();
    let mut claim = |path: String, target: String| -> Result<(), SpecError> {
        if let Some(first) = targets.insert(target.clone(), path.clone()) {
            return Err(SpecError::invalid(path, format!("target {target:?} is already mounted by `{first}`")));
        }
        Ok(())
    };
    for (i, m) in volumes.iter().enumerate() {
        let p = format!("spec.task.volumes[{i}]");
        let name = m.source.replace(SLOT_PLACEHOLDER, "1");
        check_dns_label(&format!("{p}.source"), "volume name", &name)?;
        check_abs_path(&format!("{p}.target"), &m.target)?;
        if m.target == "/" {
            return Err(SpecError::invalid(format!("{p}.target"), "a volume cannot be mounted over `/`"));
        }
        if m.per_slot() {
            if global {
                return Err(SpecError::invalid(
                    format!("{p}.source"),
                    "per-slot volumes (`{slot}`) need mode `replicated`: a global service has no slots",
                ));
            }
            let template = m.template();
            if template.driver != VolumeDriver::Local {
                return Err(SpecError::invalid(
                    format!("{p}.driver"),
                    format!(
                        "per-slot volumes are created by berth, which it can only do for driver `local`, not `{}`; \
                         declare each volume as a `kind: Volume` document instead",
                        template.driver
                    ),
                ));
            }
            template.validate(&p)?;
        } else if m.driver.is_some() || m.size.is_some() || m.access.is_some() {
            return Err(SpecError::invalid(
                p,
                format!(
                    "`driver`, `size` and `access` on a mount are only for per-slot volumes (a source with `{{slot}}`); \
                     set them in the `kind: Volume` document `{}` instead",
                    m.source
                ),
            ));
        }
        claim(format!("{p}.target"), m.target.clone())?;
    }
    for (kind, list) in [(FileKind::Secret, secrets), (FileKind::Config, configs)] {
        let mut names = std::collections::BTreeSet::new();
        for (i, f) in list.iter().enumerate() {
            let p = format!("spec.task.{kind}s[{i}]");
            if !is_file_name(&f.source) {
                return Err(SpecError::invalid(
                    format!("{p}.source"),
                    format!("invalid {kind} name {:?}; allowed: {FILE_NAME_ALLOWED}", f.source),
                ));
            }
            if kind == FileKind::Config && f.target.is_none() {
                return Err(SpecError::invalid(
                    format!("{p}.target"),
                    "a config needs `target`, the absolute path of its file in the task, such as \"/etc/app.conf\"",
                ));
            }
            let target = f.target_path();
            check_abs_path(&format!("{p}.target"), &target)?;
            if target.ends_with('/') {
                return Err(SpecError::invalid(
                    format!("{p}.target"),
                    format!("{target:?} ends with '/'; the target names the file"),
                ));
            }
            if !names.insert(f.source.clone()) && f.target.is_none() {
                return Err(SpecError::invalid(
                    format!("{p}.source"),
                    format!("{kind} `{}` is listed twice with the same target", f.source),
                ));
            }
            claim(format!("{p}.target"), target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Document, parse_all, parse_documents};

    fn err(text: &str) -> String {
        parse_all(text).unwrap_err().to_string()
    }

    const SVC: &str = "kind: Service\nmetadata: {name: db}\nspec:\n  replicas: 3\n  task:\n    runtime: process\n    \
                       command: [sh]\n";

    #[test]
    fn volume_documents_parse_with_their_driver_fields() {
        let docs = parse_all(
            "kind: Volume\nmetadata: {name: data}\nspec: {driver: local, size: 1Gi}\n---\nkind: Volume\nmetadata: \
             {name: shared}\nspec: {driver: glusterfs, servers: [gl-1, \"198.18.0.7:24007\"], volume: gv0, access: \
             multi-node-writer}\n---\nkind: Volume\nmetadata: {name: logs}\nspec: {driver: host, path: /srv/logs}\n",
        )
        .unwrap();
        let Document::Volume(v) = &docs[0] else { panic!("{docs:?}") };
        assert_eq!((v.spec.driver, v.spec.size.map(|s| s.bytes())), (VolumeDriver::Local, Some(1 << 30)));
        assert_eq!(v.spec.access, AccessMode::SingleNodeWriter, "the default");
        let Document::Volume(g) = &docs[1] else { panic!() };
        assert_eq!(g.spec.access, AccessMode::MultiNodeWriter);
        assert_eq!(g.spec.servers.len(), 2);
    }

    #[test]
    fn bad_volumes_get_clear_errors() {
        let e = err("kind: Volume\nmetadata: {name: a}\nspec: {driver: nfs}\n");
        assert!(e.contains("spec.driver") && e.contains("local") && e.contains("glusterfs"), "{e}");
        let e = err("kind: Volume\nmetadata: {name: a}\nspec: {driver: local, size: 12 parsecs}\n");
        assert!(e.contains("spec.size") && e.contains("Ki, Mi, Gi"), "{e}");
        let e = err("kind: Volume\nmetadata: {name: a}\nspec: {driver: local, size: 1Ki}\n");
        assert!(e.contains("too small"), "{e}");
        let e = err("kind: Volume\nmetadata: {name: a}\nspec: {driver: host, path: srv/data}\n");
        assert!(e.contains("spec.path") && e.contains("not an absolute path"), "{e}");
        let e = err("kind: Volume\nmetadata: {name: a}\nspec: {driver: host, path: /srv/../etc}\n");
        assert!(e.contains("'..'"), "{e}");
        let e = err("kind: Volume\nmetadata: {name: a}\nspec: {driver: glusterfs, volume: gv0}\n");
        assert!(e.contains("requires `servers`"), "{e}");
        let e = err("kind: Volume\nmetadata: {name: a}\nspec: {driver: host, path: /srv, size: 1Gi}\n");
        assert!(e.contains("`size` is only enforced for driver `local`"), "{e}");
        let e = err("kind: Volume\nmetadata: {name: a}\nspec: {driver: local, colour: red}\n");
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn mounts_need_absolute_targets_and_per_slot_sources_need_slots() {
        let e = err(&format!("{SVC}    volumes: [{{source: data, target: data}}]\n"));
        assert!(e.contains("spec.task.volumes[0].target") && e.contains("not an absolute path"), "{e}");
        let global = SVC.replace("replicas: 3", "mode: global");
        let e = err(&format!("{global}    volumes: [{{source: \"db-{{slot}}\", target: /data}}]\n"));
        assert!(e.contains("need mode `replicated`"), "{e}");
        let e = err(&format!("{SVC}    volumes: [{{source: data, target: /data, size: 1Gi}}]\n"));
        assert!(e.contains("only for per-slot volumes"), "{e}");
        let e = err(&format!("{SVC}    volumes: [{{source: \"db-{{slot}}\", target: /d, driver: glusterfs}}]\n"));
        assert!(e.contains("only do for driver `local`"), "{e}");
        let e = err(&format!("{SVC}    volumes: [{{source: a, target: /d}}, {{source: b, target: /d}}]\n"));
        assert!(e.contains("already mounted"), "{e}");
        let s =
            parse_documents(&format!("{SVC}    volumes: [{{source: \"db-{{slot}}\", target: /data, size: 64Mi}}]\n"))
                .unwrap()
                .remove(0);
        let m = &s.spec.task.volumes[0];
        assert!(m.per_slot());
        assert_eq!(m.volume_name(2), "db-2");
        assert_eq!(m.template().size.map(|s| s.bytes()), Some(64 << 20));
    }

    #[test]
    fn secrets_take_a_name_or_a_full_form_with_an_octal_mode() {
        let s = parse_documents(&format!(
            "{SVC}    secrets: [pw, {{source: tls, target: /etc/tls.key, mode: 0440}}, {{source: k, mode: \"0o600\"}}]\n    \
             configs: [{{source: conf, target: /etc/app.conf}}]\n"
        ))
        .unwrap()
        .remove(0);
        let t = &s.spec.task;
        assert_eq!(t.secrets[0].target_path(), "/run/secrets/pw");
        assert_eq!(t.secrets[0].mode_bits(FileKind::Secret), 0o400);
        assert_eq!(t.secrets[1].mode_bits(FileKind::Secret), 0o440);
        assert_eq!(t.secrets[2].mode_bits(FileKind::Secret), 0o600);
        assert_eq!(t.configs[0].mode_bits(FileKind::Config), 0o444);
        let e = err(&format!("{SVC}    secrets: [{{source: pw, mode: 999}}]\n"));
        assert!(e.contains("invalid mode"), "{e}");
        let e = err(&format!("{SVC}    secrets: [{{source: pw, target: run/pw}}]\n"));
        assert!(e.contains("not an absolute path"), "{e}");
        let e = err(&format!("{SVC}    configs: [conf]\n"));
        assert!(e.contains("a config needs `target`"), "{e}");
        let e = err(&format!("{SVC}    secrets: [\"bad name\"]\n"));
        assert!(e.contains("invalid secret name"), "{e}");
    }
}
