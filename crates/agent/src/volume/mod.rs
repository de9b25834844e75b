//! The node's side of volumes, secrets and configs: what a task's `RunSpec.mounts` and
//! `RunSpec.files` become on this host before its runtime starts it.
//!
//! Volumes live under `<data dir>/volumes/<namespace>/<name>/`:
//!
//! | driver | on this node |
//! |---|---|
//! | `local` | `data/`, a directory made on first use; with `size`, `image` (an ext4 filesystem of that size) loop-mounted at `data/` (`local.rs`) |
//! | `host` | the path itself, allowed only under `--allow-host-path` prefixes ([`paths`]) |
//! | `glusterfs` | `gluster/`, a FUSE mount made when the first task using it starts and unmounted when no task on the node needs it any more (`gluster.rs`) |
//!
//! [`Volumes::prepare`] turns a task's mounts into [`BindMount`]s (host path, target,
//! read-only) and records the task as a holder of each volume; [`Volumes::release`] drops it
//! once the task has ended; [`Volumes::gc`] is level-triggered: it unmounts every GlusterFS
//! mount under the volumes directory that no holder and no task the caller names needs, at
//! every release and every reconcile, so an agent restart converges too. Mounts outlive the
//! agent: a restarted agent finds them in mountinfo and reuses them; the data of local and
//! GlusterFS volumes is never removed here.
//!
//! Secrets and configs are [`files::TaskFiles`]: in memory, and on a per-task tmpfs outside the
//! data directory while the task exists.
//!
//! Usage (bytes used and capacity per volume) is measured every [`USAGE_INTERVAL`] and when a
//! volume is first prepared, and published on a watch channel the session reports from.

mod command;
mod error;
pub mod files;
mod gluster;
mod local;
pub mod mountinfo;
pub mod paths;
mod usage;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use berth_api::pb::agent::VolumeUsage;
use berth_types::task::{MountSource, RunSpec};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

pub use self::error::StorageError;
pub use self::files::TaskFiles;
use self::usage::Measure;
use crate::driver::runtime::{BindKind, BindMount};

/// The volumes directory's name in the agent's data directory.
pub const VOLUMES_DIR: &str = "volumes";
/// How long a mount (a GlusterFS mount helper, a loop mount) may take before it is given up.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);
/// How often volume usage is measured and reported.
pub const USAGE_INTERVAL: Duration = Duration::from_secs(30);
/// How long one GlusterFS `statvfs` may take when measuring usage.
const STATVFS_PATIENCE: Duration = Duration::from_secs(5);

/// The usage of the node's volumes, newest first measured; sorted by key.
pub type UsageReport = Arc<Vec<VolumeUsage>>;

/// The node's volumes. Cheap to clone.
#[derive(Clone)]
pub struct Volumes {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    allowed: Vec<PathBuf>,
    mount_timeout: Duration,
    /// One lock per volume: a mount or unmount of it at a time, and a holder recorded under
    /// the lock is seen by any unmount after it.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Task id -> the volumes it holds (prepared or adopted, not yet released).
    holders: Mutex<HashMap<String, BTreeMap<String, Held>>>,
    usage: watch::Sender<UsageReport>,
    /// Measure now (a volume was prepared for the first time).
    wake: Arc<Notify>,
    /// GlusterFS mounts whose last `statvfs` has not returned (not asked again meanwhile).
    stuck: Mutex<HashSet<PathBuf>>,
}

/// What a held volume is, for measuring it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    Local,
    Host(PathBuf),
    Gluster,
}

impl Volumes {
    /// Volumes under `root` (`<data dir>/volumes`), `host` volumes allowed under `allowed`
    /// (normalised, see [`paths::normalize_prefixes`]), mounts bounded by `mount_timeout`,
    /// usage measured every `usage_interval` (in a task of its own, which ends when the last
    /// clone is dropped).
    pub fn new(root: PathBuf, allowed: Vec<PathBuf>, mount_timeout: Duration, usage_interval: Duration) -> Volumes {
        let (usage, _) = watch::channel(Arc::new(Vec::new()));
        let inner = Arc::new(Inner {
            root,
            allowed,
            mount_timeout,
            locks: Mutex::new(HashMap::new()),
            holders: Mutex::new(HashMap::new()),
            usage,
            wake: Arc::new(Notify::new()),
            stuck: Mutex::new(HashSet::new()),
        });
        tokio::spawn(usage_loop(Arc::downgrade(&inner), usage_interval));
        Volumes { inner }
    }

    /// The volumes directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The `--allow-host-path` prefixes, normalised.
    pub fn allowed_host_paths(&self) -> &[PathBuf] {
        &self.inner.allowed
    }

    /// The usage reports (a new value every measurement).
    pub fn usage(&self) -> watch::Receiver<UsageReport> {
        self.inner.usage.subscribe()
    }

    /// `namespace/name` of each GlusterFS volume `spec` mounts.
    pub fn gluster_keys(spec: &RunSpec) -> BTreeSet<String> {
        spec.mounts
            .iter()
            .filter(|m| matches!(m.source, MountSource::Glusterfs { .. }))
            .map(|m| format!("{}/{}", spec.namespace, m.volume))
            .collect()
    }

    /// Makes every volume `spec` mounts ready on this node (see the module docs) and records
    /// `task_id` as holding them. On an error nothing stays held for the task (and what it alone
    /// needed is unmounted again).
    ///
    /// `owner` is the task user's uid and gid on the host: a local or GlusterFS volume the task
    /// may write whose root is still empty and the host root's (it was just made) is handed to
    /// it, so a task that does not run as root can use a new volume (as Kubernetes' `fsGroup`
    /// and Docker's copy-up of a new volume's ownership do). Host paths are left as they are.
    pub async fn prepare(
        &self,
        task_id: &str,
        spec: &RunSpec,
        owner: Option<(u32, u32)>,
    ) -> Result<Vec<BindMount>, StorageError> {
        let mut binds = Vec::with_capacity(spec.mounts.len());
        for m in &spec.mounts {
            match self.prepare_one(task_id, &spec.namespace, m, owner).await {
                Ok(b) => binds.push(b),
                Err(e) => {
                    self.release(task_id, &BTreeSet::new()).await;
                    return Err(e);
                }
            }
        }
        Ok(binds)
    }

    async fn prepare_one(
        &self,
        task_id: &str,
        namespace: &str,
        m: &berth_types::task::Mount,
        owner: Option<(u32, u32)>,
    ) -> Result<BindMount, StorageError> {
        let (key, dir) = self.place(namespace, &m.volume)?;
        let lock = self.lock(&key);
        let _guard = lock.lock().await;
        let held = match &m.source {
            MountSource::Local { .. } => Held::Local,
            MountSource::Host { path } => Held::Host(PathBuf::from(path)),
            MountSource::Glusterfs { .. } => Held::Gluster,
        };
        let first = self.hold_key(task_id, &key, held);
        let (source, kind) = match &m.source {
            MountSource::Local { size } => {
                (local::prepare(&m.volume, &dir, *size, self.inner.mount_timeout).await?, BindKind::Dir)
            }
            MountSource::Host { path } => {
                let real = paths::check_host_path(&m.volume, path, &self.inner.allowed)?;
                let kind = if real.is_dir() { BindKind::Dir } else { BindKind::File };
                (real, kind)
            }
            MountSource::Glusterfs { servers, volume } => {
                let at = dir.join(gluster::MOUNT_DIR);
                gluster::mount(&m.volume, servers, volume, &at, &dir.join(gluster::LOG), self.inner.mount_timeout)
                    .await?;
                (at, BindKind::Dir)
            }
        };
        if first {
            self.inner.wake.notify_one();
        }
        if let Some(owner) = owner.filter(|_| !m.read_only && !matches!(m.source, MountSource::Host { .. })) {
            hand_over(&source, owner);
        }
        Ok(BindMount { source, target: m.target.clone(), read_only: m.read_only, kind })
    }

    /// Records `task_id` as holding the volumes `spec` mounts, without preparing anything: for a
    /// task that already runs (adopted after an agent restart), whose mounts are in place.
    pub fn hold(&self, task_id: &str, spec: &RunSpec) {
        for m in &spec.mounts {
            let Ok((key, _)) = self.place(&spec.namespace, &m.volume) else { continue };
            let held = match &m.source {
                MountSource::Local { .. } => Held::Local,
                MountSource::Host { path } => Held::Host(PathBuf::from(path)),
                MountSource::Glusterfs { .. } => Held::Gluster,
            };
            self.hold_key(task_id, &key, held);
        }
    }

    /// Whether nobody held `key` before.
    fn hold_key(&self, task_id: &str, key: &str, held: Held) -> bool {
        let mut holders = self.inner.holders.lock().expect("holders lock");
        let first = !holders.values().any(|h| h.contains_key(key));
        holders.entry(task_id.to_string()).or_default().insert(key.to_string(), held);
        first
    }

    /// `task_id` has ended: it holds nothing any more. Then [`Self::gc`] with `needed`.
    pub async fn release(&self, task_id: &str, needed: &BTreeSet<String>) {
        let had = self.inner.holders.lock().expect("holders lock").remove(task_id).is_some();
        if had {
            debug!(task = task_id, "released the task's volumes");
        }
        self.gc(needed).await;
    }

    /// Unmounts every GlusterFS volume mounted under the volumes directory that no holder and
    /// nothing in `needed` (`namespace/name` keys of tasks the caller still runs or starts)
    /// needs.
    pub async fn gc(&self, needed: &BTreeSet<String>) {
        for (key, dir) in gluster::mounted_under(&self.inner.root) {
            if needed.contains(&key) || self.held(&key) {
                continue;
            }
            let lock = self.lock(&key);
            let _guard = lock.lock().await;
            // Held meanwhile (a task prepared it under the lock): keep it.
            if self.held(&key) || !mountinfo::is_mounted(&dir) {
                continue;
            }
            match gluster::unmount(&dir).await {
                Ok(()) => info!(volume = %key, "unmounted the GlusterFS volume: no task on this node uses it"),
                Err(e) => warn!(volume = %key, dir = %dir.display(), "unmounting the GlusterFS volume failed: {e}"),
            }
        }
    }

    fn held(&self, key: &str) -> bool {
        self.inner.holders.lock().expect("holders lock").values().any(|h| h.contains_key(key))
    }

    /// The volumes `task_id` holds (`namespace/name`).
    pub fn held_by(&self, task_id: &str) -> Vec<String> {
        self.inner
            .holders
            .lock()
            .expect("holders lock")
            .get(task_id)
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner.locks.lock().expect("locks lock").entry(key.to_string()).or_default().clone()
    }

    /// `namespace/name` and the volume's directory.
    fn place(&self, namespace: &str, name: &str) -> Result<(String, PathBuf), StorageError> {
        if !paths::is_component(namespace) || !paths::is_component(name) {
            return Err(StorageError::BadName { namespace: namespace.to_string(), volume: name.to_string() });
        }
        Ok((format!("{namespace}/{name}"), self.inner.root.join(namespace).join(name)))
    }

    /// Measures now and publishes the result (also what the background loop does).
    pub async fn measure_now(&self) -> UsageReport {
        measure(&self.inner).await
    }
}

impl Inner {
    /// What to measure: every local volume on disk (mounted images and plain directories),
    /// every mounted GlusterFS volume, and every host path held.
    fn targets(&self) -> BTreeMap<String, (Measure, bool)> {
        let mut out = BTreeMap::new();
        let mounts = mountinfo::read().unwrap_or_default();
        for (ns, name, dir) in local_dirs(&self.root) {
            let data = dir.join(local::DATA);
            let m = if mountinfo::at(&mounts, &data).is_some() {
                Measure::Fs(data)
            } else if dir.join(local::IMAGE).exists() || !data.is_dir() {
                continue; // an image not mounted now, or a GlusterFS volume's directory
            } else {
                Measure::Dir(data)
            };
            out.insert(format!("{ns}/{name}"), (m, false));
        }
        for (key, dir) in gluster::mounted_under(&self.root) {
            out.insert(key, (Measure::Fs(dir), true));
        }
        for h in self.holders.lock().expect("holders lock").values() {
            for (key, held) in h {
                if let Held::Host(p) = held {
                    out.insert(key.clone(), (Measure::Dir(p.clone()), false));
                }
            }
        }
        out
    }
}

/// `(namespace, name, dir)` of every volume directory under `root`.
fn local_dirs(root: &Path) -> Vec<(String, String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(root) else { return out };
    for ns in namespaces.flatten() {
        let Ok(names) = std::fs::read_dir(ns.path()) else { continue };
        for name in names.flatten() {
            if let (Some(n), Some(v)) = (ns.file_name().to_str(), name.file_name().to_str()) {
                out.push((n.to_string(), v.to_string(), name.path()));
            }
        }
    }
    out
}

async fn measure(inner: &Arc<Inner>) -> UsageReport {
    let targets = inner.targets();
    let mut report = Vec::with_capacity(targets.len());
    for (key, (m, is_gluster)) in targets {
        let figures = match &m {
            // A GlusterFS mount can hang: asked in a thread of its own, with a bound, and not
            // again while a previous ask has not returned.
            Measure::Fs(p) if is_gluster => {
                if !inner.stuck.lock().expect("stuck lock").insert(p.clone()) {
                    continue;
                }
                let (weak, path, m2) = (Arc::downgrade(inner), p.clone(), m.clone());
                let h = tokio::task::spawn_blocking(move || {
                    let r = usage::measure(&m2);
                    if let Some(i) = weak.upgrade() {
                        i.stuck.lock().expect("stuck lock").remove(&path);
                    }
                    r
                });
                match tokio::time::timeout(STATVFS_PATIENCE, h).await {
                    Ok(Ok(r)) => r,
                    _ => {
                        warn!(volume = %key, "measuring the GlusterFS volume did not finish in time");
                        None
                    }
                }
            }
            _ => tokio::task::spawn_blocking(move || usage::measure(&m)).await.ok().flatten(),
        };
        if let Some((used_bytes, capacity_bytes)) = figures {
            report.push(VolumeUsage { key, used_bytes, capacity_bytes });
        }
    }
    let report = Arc::new(report);
    inner.usage.send_replace(report.clone());
    report
}

async fn usage_loop(inner: Weak<Inner>, interval: Duration) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        measure(&i).await;
        let wake = i.wake.clone();
        drop(i);
        let woken = tokio::select! {
            _ = wake.notified() => true,
            _ = tokio::time::sleep(interval) => false,
        };
        if woken {
            // Let the task that prepared the volume start first.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Unmounts what is mounted at `path`: lazily when it is busy, nothing when nothing is.
pub(crate) fn unmount(path: &Path) -> std::io::Result<()> {
    use nix::errno::Errno;
    use nix::mount::{MntFlags, umount2};
    match umount2(path, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => umount2(path, MntFlags::MNT_DETACH).map_err(std::io::Error::from),
        Err(e) => Err(e.into()),
    }
}

/// Unmounts every mount under `dir` (deepest first, lazily when busy) and kills the GlusterFS
/// clients of those that are FUSE mounts: for clean-ups (tests, `berth dev`), never for a live
/// agent's volumes.
pub fn unmount_all(dir: &Path) {
    // Never a directory whose subtree holds the host's own mounts (`/`, `/run`, an empty or
    // relative path): only one at least two levels deep, such as a data dir or a test's.
    if !dir.is_absolute() || dir.components().count() < 3 {
        return;
    }
    let Ok(mounts) = mountinfo::read() else { return };
    let mut under: Vec<&mountinfo::MountEntry> = mounts.iter().filter(|m| m.mount_point.starts_with(dir)).collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    for m in under {
        let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
        if m.fstype == gluster::FSTYPE {
            for pid in gluster::clients_of(&m.mount_point) {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// Gives a new volume's root to the task's user: only when it is the host root's and empty
/// (`lost+found`, which mkfs makes, aside). Failures are logged: the task then finds the
/// volume as it is.
fn hand_over(root: &Path, (uid, gid): (u32, u32)) {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        return;
    }
    let Ok(meta) = std::fs::metadata(root) else { return };
    let empty = std::fs::read_dir(root)
        .map(|mut entries| entries.all(|e| e.is_ok_and(|e| e.file_name() == "lost+found")))
        .unwrap_or(false);
    if meta.uid() == 0 && meta.is_dir() && empty {
        match std::os::unix::fs::chown(root, Some(uid), Some(gid)) {
            Ok(()) => {
                tracing::info!(volume = %root.display(), uid, gid, "a new volume's root is given to its task's user")
            }
            Err(e) => tracing::warn!(volume = %root.display(), "giving a new volume to uid {uid} failed: {e}"),
        }
    }
}
