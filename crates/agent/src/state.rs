//! The agent's local state: `DIR/agent.json` plus the node's certificate files, all written
//! atomically (temporary file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use berth_api::pb::agent::{Assignment, TaskState, TaskStatus};
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// The state file, in the data directory.
pub const STATE_FILE: &str = "agent.json";
/// The cluster CA certificate (PEM).
pub const CA_FILE: &str = "ca.crt";
/// The node certificate (PEM), identity `agent/<node id>`.
pub const CERT_FILE: &str = "node.crt";
/// The node's private key (PEM, mode 0600).
pub const KEY_FILE: &str = "node.key";
/// The state format this agent writes; it refuses newer ones.
pub const FORMAT: u64 = 1;

/// Everything the agent remembers across restarts (except the certificate files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub format: u64,
    pub node_id: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// QUIC `host:port` of every master, as the masters last said.
    #[serde(default)]
    pub masters: Vec<String>,
    /// The master that last accepted a session.
    #[serde(default)]
    pub last_leader: Option<String>,
    /// The highest leader term seen (fencing).
    #[serde(default)]
    pub highest_term: u64,
    /// The master (raft id, from its certificate) that gave `highest_term`.
    #[serde(default)]
    pub highest_term_from: Option<u64>,
    /// Masters removed from the cluster, as the masters said (ids are never reused): refused
    /// from then on.
    #[serde(default)]
    pub removed_masters: std::collections::BTreeSet<u64>,
    /// Revoked certificate serials and identities (identity -> revoked up to, ms), as the masters
    /// last said: a master presenting one is refused in the handshake.
    #[serde(default)]
    pub revoked_serials: std::collections::BTreeSet<String>,
    #[serde(default)]
    pub revoked_identities: BTreeMap<String, i64>,
    /// Version of the assignment set held in `assignments`.
    #[serde(default)]
    pub assignments_version: u64,
    #[serde(default)]
    pub assignments: BTreeMap<String, StoredAssignment>,
    /// The last observed state of every task the agent knows.
    #[serde(default)]
    pub statuses: BTreeMap<String, StoredStatus>,
}

/// One assignment as stored: the opaque spec (hex in the file) and the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAssignment {
    #[serde(with = "hex_bytes")]
    pub spec: Vec<u8>,
    #[serde(with = "task_state")]
    pub desired: i32,
}

/// One observed task state as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredStatus {
    #[serde(with = "task_state")]
    pub state: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default)]
    pub timestamp_ms: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub health: i32,
    #[serde(default)]
    pub pid: u32,
    /// The task's address on each network it joined.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addresses: BTreeMap<String, String>,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

impl StoredAssignment {
    pub fn from_pb(a: &Assignment) -> Self {
        StoredAssignment { spec: a.spec.clone(), desired: a.desired_state }
    }

    pub fn to_pb(&self, task_id: &str) -> Assignment {
        Assignment {
            task_id: task_id.to_string(),
            spec: self.spec.clone(),
            desired_state: self.desired,
            files: Vec::new(),
            image: None,
        }
    }
}

impl StoredStatus {
    pub fn from_pb(s: &TaskStatus) -> Self {
        StoredStatus {
            state: s.state,
            message: s.message.clone(),
            timestamp_ms: s.timestamp_ms,
            exit_code: s.exit_code,
            health: s.health,
            pid: s.pid,
            addresses: s.addresses.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    pub fn to_pb(&self, task_id: &str) -> TaskStatus {
        TaskStatus {
            task_id: task_id.to_string(),
            state: self.state,
            message: self.message.clone(),
            timestamp_ms: self.timestamp_ms,
            exit_code: self.exit_code,
            health: self.health,
            pid: self.pid,
            addresses: self.addresses.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// A state the task does not leave by itself.
    pub fn is_terminal(&self) -> bool {
        matches!(
            TaskState::try_from(self.state),
            Ok(TaskState::Complete | TaskState::Failed | TaskState::Shutdown | TaskState::Orphaned)
        )
    }
}

impl AgentState {
    /// A freshly joined node.
    pub fn new(node_id: String, name: String, labels: BTreeMap<String, String>, masters: Vec<String>) -> Self {
        AgentState {
            format: FORMAT,
            node_id,
            name,
            labels,
            masters,
            last_leader: None,
            highest_term: 0,
            highest_term_from: None,
            removed_masters: Default::default(),
            revoked_serials: Default::default(),
            revoked_identities: BTreeMap::new(),
            assignments_version: 0,
            assignments: BTreeMap::new(),
            statuses: BTreeMap::new(),
        }
    }

    /// Loads `DIR/agent.json`; `Ok(None)` when there is none (the node has not joined).
    pub fn load(dir: &Path) -> Result<Option<AgentState>, AgentError> {
        let path = dir.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::io("cannot read", path, e)),
        };
        Self::parse(&bytes, &path).map(Some)
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<AgentState, AgentError> {
        let corrupt = |reason: String| AgentError::CorruptState { path: path.to_path_buf(), reason };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        let format = value
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| corrupt("it has no numeric \"format\" field".to_string()))?;
        if format > FORMAT {
            return Err(AgentError::NewerFormat { path: path.to_path_buf(), found: format, supported: FORMAT });
        }
        let state: AgentState = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        if state.node_id.is_empty() {
            return Err(corrupt("its node_id is empty".to_string()));
        }
        Ok(state)
    }

    /// The state file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("the agent state always serializes");
        out.push(b'\n');
        out
    }

    /// Writes `DIR/agent.json` atomically and durably (blocking).
    pub fn save(&self, dir: &Path) -> Result<(), AgentError> {
        write_atomic(dir, STATE_FILE, &self.to_bytes(), 0o600)
    }

    /// [`AgentState::save`] off the async runtime's worker threads.
    pub async fn save_async(&self, dir: &Path) -> Result<(), AgentError> {
        let bytes = self.to_bytes();
        let dir = dir.to_path_buf();
        match tokio::task::spawn_blocking(move || write_atomic(&dir, STATE_FILE, &bytes, 0o600)).await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// Whether state writes are fsynced. Always on for a real agent; `--simulate` turns it off, since
/// thousands of simulated agents sharing one disk would measure that disk's fsync rate rather than
/// the control plane (a real agent has its own host and disk).
static SYNC_WRITES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns fsync of state writes off (simulated agents only).
pub(crate) fn disable_sync_for_simulation() {
    SYNC_WRITES.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// Writes `dir/name` atomically: a temporary file in the same directory, fsync, rename over the
/// target, fsync of the directory. The file gets `mode` (e.g. 0o600 for keys).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` applies only when the file is created; a leftover temporary may have another.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(bytes)?;
        if SYNC_WRITES.load(std::sync::atomic::Ordering::Relaxed) {
            f.sync_all()?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(AgentError::io("cannot write", &tmp, e));
    }
    fs::rename(&tmp, &target).map_err(|e| AgentError::io("cannot rename into place", &target, e))?;
    if !SYNC_WRITES.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(());
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| AgentError::io("cannot sync directory", dir, e))?;
    Ok(())
}

/// Creates the data directory (and parents) if needed, mode 0700 for the last component.
pub fn create_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| AgentError::io("cannot create the data directory", dir, e))
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Task states by their protobuf names ("TASK_STATE_RUNNING"), so the file is readable and
/// survives renumbering mistakes.
mod task_state {
    use berth_api::pb::agent::TaskState;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        match TaskState::try_from(*v) {
            Ok(state) => s.serialize_str(state.as_str_name()),
            Err(_) => s.serialize_str(&v.to_string()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(state) = TaskState::from_str_name(&s) {
            return Ok(state as i32);
        }
        s.parse::<i32>().map_err(|_| serde::de::Error::custom(format!("unknown task state {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AgentState {
        let mut s = AgentState::new(
            "n-1".into(),
            "web-1".into(),
            BTreeMap::from([("zone".to_string(), "a".to_string())]),
            vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()],
        );
        s.last_leader = Some("127.0.0.1:7001".into());
        s.highest_term = 7;
        s.assignments_version = 12;
        s.assignments
            .insert("t1".into(), StoredAssignment { spec: vec![0, 1, 0xfe, 0xff], desired: TaskState::Running as i32 });
        s.statuses.insert(
            "t1".into(),
            StoredStatus {
                state: TaskState::Running as i32,
                message: "up".into(),
                timestamp_ms: 1_700_000_000_000,
                exit_code: 0,
                health: 0,
                pid: 4242,
                addresses: [("backend".to_string(), "198.18.1.2".to_string())].into(),
            },
        );
        s
    }

    #[test]
    fn round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), None);
        let s = sample();
        s.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), Some(s));
        let text = fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert!(text.contains("\"format\": 1"), "{text}");
        assert!(text.contains("TASK_STATE_RUNNING"), "{text}");
        assert!(text.contains("0001feff"), "{text}");
    }

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sample();
        s.save(dir.path()).unwrap();
        s.assignments.clear();
        s.highest_term = 8;
        s.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), Some(s));
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(STATE_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A stale temporary (a crash between write and rename) does not disturb the next save.
        fs::write(dir.path().join(format!(".{STATE_FILE}.tmp")), b"garbage").unwrap();
        sample().save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), Some(sample()));
    }

    #[test]
    fn key_files_get_the_requested_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), KEY_FILE, b"secret", 0o600).unwrap();
        write_atomic(dir.path(), CERT_FILE, b"cert", 0o644).unwrap();
        let mode = |n: &str| fs::metadata(dir.path().join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(mode(CERT_FILE), 0o644);
    }

    #[test]
    fn newer_format_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut value = serde_json::to_value(sample()).unwrap();
        value["format"] = serde_json::json!(2);
        value["something_new"] = serde_json::json!({"x": 1});
        fs::write(dir.path().join(STATE_FILE), serde_json::to_vec(&value).unwrap()).unwrap();
        let err = AgentState::load(dir.path()).unwrap_err();
        assert!(matches!(err, AgentError::NewerFormat { found: 2, supported: 1, .. }), "{err}");
        assert!(err.to_string().contains("newer than this agent understands"), "{err}");
    }

    #[test]
    fn corrupt_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(AgentState::load(dir.path()).unwrap_err(), AgentError::CorruptState { .. }));
        fs::write(dir.path().join(STATE_FILE), br#"{"node_id": "x"}"#).unwrap();
        let err = AgentState::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no numeric \"format\""), "{err}");
    }
}
