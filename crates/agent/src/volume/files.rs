//! Secrets and configs on the node.
//!
//! Their contents come with a task's RUNNING assignment (`Assignment.files`) and are kept in
//! memory only, by task, until the task is removed: never logged, never in `agent.json` nor
//! anywhere under the data directory. Before a task that mounts some starts, they are written
//! to a tmpfs of the task's own outside the data directory:
//!
//! - as root: a small tmpfs (mode 0700, `nosuid,nodev,noexec`) mounted at
//!   `/run/berth/<node id>/files/<task id>`;
//! - without root: a directory (0700) under `/dev/shm/berth-<uid>/<node id>/files/`, once
//!   `statfs` says `/dev/shm` is a tmpfs (refused otherwise: they must never reach a disk).
//!
//! Each is a file with its mode, owned by the task's user, bound read-only at its target by the
//! runtime. An agent that restarts while no leader is reachable has no contents in memory: a
//! task whose files are still on its tmpfs uses those; otherwise the start waits a while for a
//! leader to send them, then fails with a message saying so. The tmpfs goes (unmounted, removed)
//! when the task is removed.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use berth_api::pb::agent::FileData;
use berth_types::task::RunSpec;
use tracing::{debug, info, warn};

use super::{StorageError, mountinfo, paths};
use crate::driver::runtime::{BindKind, BindMount};

/// How long a task start waits for contents it does not have (an agent restart: the leader sends
/// them with its complete set).
pub const FILES_PATIENCE: Duration = Duration::from_secs(30);
/// `statfs` type of a tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// File contents, kept in memory; `Debug` shows sizes only.
#[derive(Clone)]
struct Contents(Arc<Vec<u8>>);

impl std::fmt::Debug for Contents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// The secrets and configs of this node's tasks.
#[derive(Debug)]
pub struct TaskFiles {
    /// Set by configuration, else from the node id.
    root: OnceLock<PathBuf>,
    patience: Duration,
    /// Task id -> file id (`kind/name@version`) -> contents.
    contents: Mutex<HashMap<String, HashMap<String, Contents>>>,
}

impl TaskFiles {
    /// Files under `root` (one directory or tmpfs per task), or under [`Self::default_root`] once
    /// the node id is known ([`Self::set_node`]); a start waits `patience` for missing contents.
    pub fn new(root: Option<PathBuf>, patience: Duration) -> TaskFiles {
        let cell = OnceLock::new();
        if let Some(r) = root {
            let _ = cell.set(r);
        }
        TaskFiles { root: cell, patience, contents: Mutex::new(HashMap::new()) }
    }

    /// `/run/berth/<node>/files` for an agent running as root, else
    /// `/dev/shm/berth-<uid>/<node>/files`.
    pub fn default_root(node_id: &str) -> PathBuf {
        let uid = rustix::process::geteuid();
        if uid.is_root() {
            PathBuf::from("/run/berth").join(node_id).join("files")
        } else {
            PathBuf::from(format!("/dev/shm/berth-{}", uid.as_raw())).join(node_id).join("files")
        }
    }

    /// The node's id is known: files go under [`Self::default_root`] unless configured.
    pub fn set_node(&self, node_id: &str) {
        let _ = self.root.set(Self::default_root(node_id));
    }

    /// Where task files go, once known.
    pub fn root(&self) -> Option<&Path> {
        self.root.get().map(PathBuf::as_path)
    }

    /// The directory (or tmpfs) of one task's files.
    pub fn task_dir(&self, task_id: &str) -> Option<PathBuf> {
        Some(self.root()?.join(task_id))
    }

    /// Keeps the contents an assignment of `task_id` carried (in memory only).
    pub fn remember(&self, task_id: &str, files: &[FileData]) {
        if files.is_empty() {
            return;
        }
        let mut c = self.contents.lock().expect("contents lock");
        let task = c.entry(task_id.to_string()).or_default();
        for f in files {
            task.insert(f.id.clone(), Contents(Arc::new(f.data.clone())));
        }
        debug!(task = task_id, files = files.len(), "keeping the task's secrets and configs in memory");
    }

    /// Whether the contents of file `id` are in memory (for any task).
    pub fn has(&self, id: &str) -> bool {
        self.lookup("", id).is_some()
    }

    fn lookup(&self, task_id: &str, id: &str) -> Option<Contents> {
        let c = self.contents.lock().expect("contents lock");
        c.get(task_id).and_then(|t| t.get(id)).or_else(|| c.values().find_map(|t| t.get(id))).cloned()
    }

    /// The contents of `file` for `task_id`, waiting up to the patience for them to arrive with
    /// the task's assignment: how an oci task's registry credentials reach its pull.
    pub async fn contents(&self, task_id: &str, file: &berth_types::task::TaskFile) -> Result<Vec<u8>, StorageError> {
        let deadline = Instant::now() + self.patience;
        loop {
            if let Some(c) = self.lookup(task_id, &file.id()) {
                return Ok(c.0.as_ref().clone());
            }
            if Instant::now() >= deadline {
                return Err(StorageError::FileMissing {
                    kind: file.kind.to_string(),
                    name: file.name.clone(),
                    version: file.version,
                    patience: self.patience,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes the files `spec` mounts onto the task's tmpfs and returns their binds (read-only),
    /// each owned by `owner` (uid, gid) with its mode. Reuses what is there when the contents
    /// are not in memory; waits up to the patience for them otherwise.
    pub async fn prepare(
        &self,
        task_id: &str,
        spec: &RunSpec,
        owner: (u32, u32),
    ) -> Result<Vec<BindMount>, StorageError> {
        // A file without a target (an oci task's registry credentials) is never mounted.
        let mounted: Vec<&berth_types::task::TaskFile> = spec.files.iter().filter(|f| !f.target.is_empty()).collect();
        if mounted.is_empty() {
            return Ok(Vec::new());
        }
        let fail = |detail: String| StorageError::Files { task: task_id.to_string(), detail };
        let root = self.root().ok_or_else(|| fail("this agent does not know its node id yet".into()))?.to_path_buf();
        if !paths::is_component(task_id) {
            return Err(fail("the task id cannot name a directory".into()));
        }
        let dir = root.join(task_id);
        let names: Vec<String> =
            mounted.iter().enumerate().map(|(i, f)| format!("{i}-{}-{}-v{}", f.kind, f.name, f.version)).collect();
        if let Some(bad) = names.iter().find(|n| !paths::is_component(n)) {
            return Err(fail(format!("{bad:?} cannot name a file")));
        }
        // The contents first (in memory, or already on the task's tmpfs), then the tmpfs sized
        // for them, then the files.
        let mut data: Vec<Option<Contents>> = Vec::with_capacity(mounted.len());
        let deadline = Instant::now() + self.patience;
        for (f, name) in mounted.iter().zip(&names) {
            let id = f.id();
            loop {
                if let Some(c) = self.lookup(task_id, &id) {
                    data.push(Some(c));
                    break;
                }
                if Self::on_tmpfs(&dir) && dir.join(name).is_file() {
                    data.push(None);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(StorageError::FileMissing {
                        kind: f.kind.to_string(),
                        name: f.name.clone(),
                        version: f.version,
                        patience: self.patience,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let bytes: u64 = data.iter().flatten().map(|c| (c.0.len() as u64).div_ceil(4096) * 4096).sum();
        self.make_dir(&root, &dir, (1 << 20) + bytes).map_err(fail)?;
        let mut binds = Vec::with_capacity(mounted.len());
        for ((f, name), contents) in mounted.iter().zip(&names).zip(data) {
            let path = dir.join(name);
            write_file(&dir, &path, contents.as_ref(), f.mode, owner)
                .map_err(|e| fail(format!("writing {} {}: {e}", f.kind, f.name)))?;
            binds.push(BindMount { source: path, target: f.target.clone(), read_only: true, kind: BindKind::File });
        }
        Ok(binds)
    }

    /// Whether `dir` is a task tmpfs this agent made (a mount as root; a directory on a tmpfs
    /// otherwise).
    fn on_tmpfs(dir: &Path) -> bool {
        if rustix::process::geteuid().is_root() {
            mountinfo::read().is_ok_and(|m| mountinfo::at(&m, dir).is_some_and(|e| e.fstype == "tmpfs"))
        } else {
            dir.is_dir() && is_tmpfs(dir)
        }
    }

    /// Makes the task's tmpfs (`size` bytes as root) unless it is there.
    fn make_dir(&self, root: &Path, dir: &Path, size: u64) -> Result<(), String> {
        let private = |p: &Path| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(p)
                .map_err(|e| format!("creating {} failed: {e}", p.display()))
        };
        private(root)?;
        if rustix::process::geteuid().is_root() {
            if Self::on_tmpfs(dir) {
                return Ok(());
            }
            private(dir)?;
            use nix::mount::{MsFlags, mount};
            mount(
                Some("tmpfs"),
                dir,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(format!("mode=0700,size={size}").as_str()),
            )
            .map_err(|e| format!("mounting a tmpfs at {} failed: {e}", dir.display()))?;
            debug!(dir = %dir.display(), size, "mounted the task's secrets tmpfs");
            Ok(())
        } else {
            if !is_tmpfs(root) {
                return Err(format!(
                    "{} is not on a tmpfs, and secrets and configs are never written to a disk; run the agent as root \
                     (it then mounts a tmpfs of its own), or make /dev/shm a tmpfs",
                    root.display()
                ));
            }
            private(dir)
        }
    }

    /// The task is gone: its tmpfs is unmounted and removed, its contents forgotten.
    pub async fn remove(&self, task_id: &str) {
        self.contents.lock().expect("contents lock").remove(task_id);
        let Some(dir) = self.task_dir(task_id) else { return };
        if !paths::is_component(task_id) {
            return;
        }
        let d = dir.clone();
        let removed = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let mounted = mountinfo::is_mounted(&d);
            if mounted {
                super::unmount(&d)?;
            }
            match std::fs::remove_dir_all(&d) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(mounted),
                Err(e) => Err(e),
            }
        })
        .await;
        match removed {
            Ok(Ok(true)) => info!(task = task_id, "removed the task's secrets and configs"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(task = task_id, dir = %dir.display(), "removing the task's secrets and configs failed: {e}")
            }
            Err(e) => warn!(task = task_id, "removing the task's secrets and configs failed: {e}"),
        }
    }

    /// Removes the files of every task not in `keep` (level-triggered clean-up after a confirmed
    /// set) and forgets their contents.
    pub async fn gc(&self, keep: &HashSet<String>) {
        self.contents.lock().expect("contents lock").retain(|t, _| keep.contains(t));
        let Some(root) = self.root() else { return };
        let Ok(entries) = std::fs::read_dir(root) else { return };
        let stale: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|t| paths::is_component(t) && !keep.contains(t))
            .collect();
        for t in stale {
            self.remove(&t).await;
        }
    }
}

/// Whether `path` is on a tmpfs.
#[allow(clippy::unnecessary_cast)] // `f_type`'s type differs between architectures
fn is_tmpfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == TMPFS_MAGIC)
}

/// Writes one file atomically (temp file, then rename) with `mode`, owned by `owner`;
/// `contents` none: the file is there already and only gets its mode and owner.
fn write_file(
    dir: &Path,
    path: &Path,
    contents: Option<&Contents>,
    mode: u32,
    owner: (u32, u32),
) -> std::io::Result<()> {
    let set = |f: &std::fs::File| -> std::io::Result<()> {
        let me = rustix::process::geteuid();
        if me.is_root() || me.as_raw() == owner.0 {
            rustix::fs::fchown(f, Some(rustix::fs::Uid::from_raw(owner.0)), Some(rustix::fs::Gid::from_raw(owner.1)))?;
        }
        rustix::fs::fchmod(f, rustix::fs::Mode::from_raw_mode(mode & 0o7777))?;
        Ok(())
    };
    match contents {
        Some(c) => {
            let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(&c.0)?;
            set(&f)?;
            drop(f);
            std::fs::rename(&tmp, path)
        }
        None => set(&std::fs::File::open(path)?),
    }
}
