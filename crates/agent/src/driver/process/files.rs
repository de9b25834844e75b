//! The files of one task directory and how they are written: `config.json` (written by the
//! runtime before the shim starts), `state.json` (the shim's processes), `exit.json` (the end),
//! `output.log` (+ rotated `.1`..`.N`) and `shim.log` (the shim's own stderr).
//!
//! `state.json` and `exit.json` are replaced atomically (temp file, fsync, rename), so a reader
//! sees either the old or the new content, never half of it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What the shim runs; written by the runtime.
pub(crate) const CONFIG: &str = "config.json";
/// The shim's processes; written by the shim.
pub(crate) const STATE: &str = "state.json";
/// How the task ended; written by the shim (or by the runtime when the shim died).
pub(crate) const EXIT: &str = "exit.json";
/// The task's output, JSON lines.
pub(crate) const OUTPUT: &str = "output.log";
/// The shim's own stdout and stderr.
pub(crate) const SHIM_LOG: &str = "shim.log";

/// The format of `config.json` this code writes and reads.
/// 2: sandboxed tasks run through an OCI runtime (`oci`); a shim of format 1 would run them
/// without their sandbox, so it must refuse them.
pub(crate) const CONFIG_FORMAT: u32 = 2;

/// What the shim is asked to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShimConfig {
    pub format: u32,
    pub task_id: String,
    pub argv: Vec<String>,
    /// The task's whole environment (nothing is inherited).
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    /// util-linux `unshare`.
    pub unshare: PathBuf,
    /// Cgroup directories the shim joins before it starts the task (empty: none).
    pub cgroups: Vec<PathBuf>,
    /// Whether limits were asked for: then failing to join a cgroup fails the task.
    pub limits_required: bool,
    pub log_max_bytes: u64,
    pub log_keep: usize,
    pub created_at_ms: i64,
    /// At-most-once tasks: the shim kills the task once the agent's lease is older than this.
    #[serde(default)]
    pub fence: Option<Fence>,
    /// The command that runs as the task's init (PID 1 of its namespace) with `-- argv` after
    /// it: the shim itself with `--init`. Empty for tasks started before the init existed: their
    /// program is PID 1.
    #[serde(default)]
    pub init: Vec<String>,
    /// The signal that asks the task to stop (Linux number).
    #[serde(default = "sigterm")]
    pub stop_signal: i32,
    /// The network namespace the task runs in (a task on networks); none: the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The task's /etc/resolv.conf (a task on networks: the node's DNS on its gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<String>,
    /// Host paths the task's init binds into its mount namespace (volumes, secrets, configs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<crate::driver::runtime::BindMount>,
    /// A sandboxed task: started through the OCI runtime with this bundle (its argv,
    /// environment, binds and namespaces are all in the bundle's config). None: a privileged
    /// task, started with `unshare` and the fields above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<super::oci::OciLaunch>,
}

fn sigterm() -> i32 {
    15
}

/// The fence of an at-most-once task: the agent writes the Unix millisecond it last heard the
/// leader into `lease`; once that is older than `timeout_ms` the task must not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fence {
    pub lease: PathBuf,
    pub timeout_ms: u64,
}

/// A process identified by pid and start time (clock ticks since boot), so a reused pid is
/// never mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcRef {
    pub pid: u32,
    pub start_ticks: u64,
}

/// The shim's processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShimState {
    pub shim: ProcRef,
    /// `unshare`, the shim's child, leader of the task's process group.
    #[serde(default)]
    pub launcher: Option<ProcRef>,
    /// The task's main process (PID 1 of its namespace) as seen from the host.
    #[serde(default)]
    pub task: Option<ProcRef>,
    #[serde(default)]
    pub started_at_ms: i64,
}

/// How the task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExitRecord {
    /// Exit code, 128+N for signal N, -1 when unknown (the shim failed or died).
    pub code: i32,
    pub finished_at_ms: i64,
    pub message: String,
    /// False when the task never ran (the shim or the namespace launcher failed first).
    #[serde(default = "yes")]
    pub started: bool,
}

fn yes() -> bool {
    true
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsynced, renamed.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Serializes `value` as JSON into `path` atomically.
pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic(path, &bytes)
}

/// Reads a JSON file: `None` when it does not exist, an `InvalidData` error when it does not parse.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The last `max` bytes of a text file (for error messages), trimmed; empty when unreadable.
pub(crate) fn tail_text(path: &Path, max: usize) -> String {
    let Ok(bytes) = fs::read(path) else { return String::new() };
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_json_round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EXIT);
        assert_eq!(read_json::<ExitRecord>(&path).unwrap(), None);
        let rec = ExitRecord { code: 137, finished_at_ms: 5, message: "killed".into(), started: true };
        write_json(&path, &rec).unwrap();
        assert_eq!(read_json::<ExitRecord>(&path).unwrap(), Some(rec));
        // Only the file itself is left (no temp file).
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn exit_record_defaults_started_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EXIT);
        fs::write(&path, br#"{"code":3,"finished_at_ms":1,"message":"m"}"#).unwrap();
        assert!(read_json::<ExitRecord>(&path).unwrap().unwrap().started);
        fs::write(&path, b"{not json").unwrap();
        let err = read_json::<ExitRecord>(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exit.json"), "{err}");
    }

    #[test]
    fn state_reads_with_optional_fields_missing() {
        let s: ShimState = serde_json::from_str(r#"{"shim":{"pid":7,"start_ticks":9}}"#).unwrap();
        assert_eq!(s.shim, ProcRef { pid: 7, start_ticks: 9 });
        assert_eq!((s.launcher, s.task, s.started_at_ms), (None, None, 0));
    }
}
