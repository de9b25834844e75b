//! Why a task's storage could not be prepared. Each message is what the task's status shows:
//! it names the volume or file and says what to do. None ever contains a secret's contents.

use std::path::PathBuf;

/// A volume, secret or config that could not be made ready for a task.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A volume or namespace name that cannot name a directory.
    #[error("volume {volume:?} in namespace {namespace:?}: the name cannot name a directory on this node")]
    BadName { namespace: String, volume: String },

    /// Something that needs root (loop devices, FUSE mounts, tmpfs mounts) on an agent without.
    #[error("volume {volume}: {what}")]
    NeedsRoot { volume: String, what: &'static str },

    /// A `host` volume outside the agent's `--allow-host-path` prefixes.
    #[error("{}", host_path_message(volume, path, resolved.as_ref(), allowed))]
    HostPathNotAllowed { volume: String, path: String, resolved: Option<PathBuf>, allowed: Vec<PathBuf> },

    /// A `host` volume whose path does not exist.
    #[error(
        "volume {volume}: host path {} does not exist on this node; create it on the node (berth does not create host paths)",
        path.display()
    )]
    HostPathMissing { volume: String, path: PathBuf },

    /// A local volume that cannot be made or mounted.
    #[error("volume {volume}: {detail}")]
    Local { volume: String, detail: String },

    /// A GlusterFS volume that cannot be mounted.
    #[error(
        "volume {volume}: mounting GlusterFS volume {gluster_volume} from {servers} failed: {detail}; check that the \
         GlusterFS servers are reachable from this node and that the volume exists and is started"
    )]
    Gluster { volume: String, gluster_volume: String, servers: String, detail: String },

    /// A GlusterFS volume on a node without the FUSE client.
    #[error(
        "volume {volume}: this node has no GlusterFS client (mount.glusterfs); install it (Debian: `apt-get install \
         glusterfs-client`) or keep the task off this node with a constraint"
    )]
    NoGlusterClient { volume: String },

    /// A secret's or config's contents are neither in memory nor on the task's tmpfs.
    #[error(
        "{kind} {name} (version {version}): its contents are not on this node (the agent restarted and no leader has \
         sent them again within {patience:?}); the task is retried once a leader is reachable"
    )]
    FileMissing { kind: String, name: String, version: u64, patience: std::time::Duration },

    /// The tmpfs that holds a task's secrets and configs cannot be made.
    #[error("the secrets and configs of task {task}: {detail}")]
    Files { task: String, detail: String },

    /// A file or directory operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StorageError::Io { action, path: path.into(), source }
    }

    pub(crate) fn local(volume: &str, detail: impl Into<String>) -> Self {
        StorageError::Local { volume: volume.to_string(), detail: detail.into() }
    }
}

fn host_path_message(volume: &str, path: &str, resolved: Option<&PathBuf>, allowed: &[PathBuf]) -> String {
    let list = allowed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let what = match resolved {
        Some(r) => {
            format!("host path {path} resolves to {} (through a symbolic link), which is not under", r.display())
        }
        None => format!("host path {path} is not under"),
    };
    if allowed.is_empty() {
        format!(
            "volume {volume}: {what} any allowed prefix: this node's agent allows no host paths; start it with \
             --allow-host-path PREFIX to allow some"
        )
    } else {
        format!(
            "volume {volume}: {what} any of this node's allowed prefixes ({list}); use a path under one of them, or \
             start the agent with --allow-host-path for this one"
        )
    }
}
