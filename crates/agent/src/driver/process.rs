//! The `process` runtime: each task is a host process in its own PID, mount, UTS and IPC
//! namespaces (util-linux `unshare`), with CPU and memory limits from cgroups (v1 or v2), its
//! output in rotated JSON-lines files, supervised by a detached per-task shim so it outlives the
//! agent.
//!
//! One directory per task under the runtime's root (`<root>/<task id>/`):
//!
//! | file | written by | content |
//! |---|---|---|
//! | `config.json` | [`ProcessRuntime::start`] | argv, environment, working directory, cgroups, binds |
//! | `mounts.json` | the shim | the binds the task's init makes in its mount namespace (volumes, secrets, configs) |
//! | `state.json` | the shim (atomically) | pids and start times of the shim, the launcher (`unshare`) and the task |
//! | `output.log`, `.1`..`.3` | the shim | `{ts_ms, stream, line}` JSON lines, rotated at 10 MiB |
//! | `exit.json` | the shim (atomically), or the runtime when the shim died | exit code and message |
//! | `shim.log` | the shim | its own diagnostics |
//!
//! The shim ([`shim_main`]) runs in its own process group with no pipe to the agent, so an agent
//! that exits or restarts leaves it and its task running; a new [`ProcessRuntime`] over the same
//! root finds them through these files. Processes are always identified by pid *and* start time
//! (`/proc/<pid>/stat`), so a reused pid is never taken for the task.
//!
//! The task is PID 1 of its namespace. As for any container init, the kernel drops signals its
//! init has no handler for, so `stop` sends SIGTERM to every process in the namespace and
//! SIGKILL (which always reaches init, and takes the whole namespace with it) after the grace.

mod cgroup;
mod files;
mod init;
mod logfile;
mod mounts;
mod oci;
mod procfs;
mod shim;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use berth_types::task::RunSpec;
use rustix::process::{Pid, Signal};
use tracing::{info, warn};

use self::cgroup::{Layout, Limits};
use self::files::{CONFIG, CONFIG_FORMAT, EXIT, ExitRecord, OUTPUT, SHIM_LOG, STATE, ShimConfig, ShimState};
use super::now_ms;
use super::runtime::{BindKind, BindMount, LogLine, LogLines, LogQuery, Observed, Runtime, RuntimeError};
use crate::sandbox::{self, Policy};

pub(crate) use self::files::write_atomic;
pub use self::shim::shim_main;

/// Where a root agent whose tasks live under `tasks_root` keeps its sandboxed tasks' roots
/// (skeletons and image overlays, under `rootfs/`) and the OCI runtime's state: for tests and
/// tools that clean up after an agent.
pub fn sandbox_base(tasks_root: &Path) -> PathBuf {
    oci::sandbox_base(tasks_root, false)
}

/// util-linux `unshare`, which puts the task in its namespaces.
pub const UNSHARE: &str = "/usr/bin/unshare";
/// util-linux `nsenter`, which runs `exec` commands in the task's namespaces.
pub const NSENTER: &str = "/usr/bin/nsenter";
/// The cgroup (under each hierarchy's root) that holds one child cgroup per task.
pub const CGROUP_PARENT: &str = "berth";
/// The subcommand of the `berth` binary that runs the shim.
pub const SHIM_SUBCOMMAND: &str = "task-shim";
/// The `PATH` a task gets unless its spec sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long `start` waits for the shim to report the task's pid.
const START_PATIENCE: Duration = Duration::from_secs(10);
/// How long `stop` waits for the task to end after SIGKILL.
const KILL_PATIENCE: Duration = Duration::from_secs(10);
/// The grace `remove` gives a task that is still running.
const REMOVE_GRACE: Duration = Duration::from_secs(10);
/// How often state is polled while waiting.
const POLL: Duration = Duration::from_millis(20);
/// Numbers the exec commands of this process (for their pid files).
static EXEC_SEQ: AtomicU64 = AtomicU64::new(0);
/// How often a followed log is polled at most and, while lines keep coming, at least (the
/// pause grows by a quarter after each empty poll): a line shows within a few milliseconds of a
/// start or of the previous line, and an idle follower costs one read every 50 ms.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
const FOLLOW_POLL_BUSY: Duration = Duration::from_millis(4);

/// The process runtime. Cheap to clone (clones share everything).
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
struct Inner {
    root: PathBuf,
    shim: Vec<OsString>,
    unshare: PathBuf,
    nsenter: PathBuf,
    cgroup_parent: String,
    log_max_bytes: u64,
    log_keep: usize,
    layout: OnceLock<Layout>,
    /// Whether `privileged: true` tasks may run (`--allow-privileged`).
    allow_privileged: bool,
    /// The OCI runtime sandboxed tasks run through (`--oci-runtime`); none: found on start.
    oci_runtime: Option<PathBuf>,
    /// Where sandboxed tasks' root skeletons and the OCI runtime's state live.
    sandbox_base: PathBuf,
    /// The node's images, for `runtime: oci` tasks.
    images: Option<crate::image::Images>,
}

impl ProcessRuntime {
    /// A runtime keeping its tasks under `root` (the agent's tasks directory; created on the
    /// first start) and starting each task's shim with `shim` (program and leading arguments;
    /// the task directory is appended), e.g. [`ProcessRuntime::default_shim`].
    pub fn new(root: PathBuf, shim: Vec<OsString>) -> ProcessRuntime {
        ProcessRuntime {
            inner: Arc::new(Inner {
                shim,
                unshare: UNSHARE.into(),
                nsenter: NSENTER.into(),
                cgroup_parent: CGROUP_PARENT.into(),
                log_max_bytes: logfile::MAX_BYTES,
                log_keep: logfile::KEEP,
                layout: OnceLock::new(),
                allow_privileged: false,
                oci_runtime: None,
                sandbox_base: oci::sandbox_base(&root, shim::rootless()),
                images: None,
                root,
            }),
        }
    }

    /// This executable with the `task-shim` subcommand (the `berth` binary).
    pub fn default_shim() -> Vec<OsString> {
        let exe = std::env::current_exe().map(PathBuf::into_os_string).unwrap_or_else(|_| "berth".into());
        vec![exe, SHIM_SUBCOMMAND.into()]
    }

    fn with(self, change: impl FnOnce(&mut Inner)) -> ProcessRuntime {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| (*shared).clone());
        change(&mut inner);
        ProcessRuntime { inner: Arc::new(inner) }
    }

    /// Rotates each task's output at `max_bytes`, keeping `keep` old files (default 10 MiB, 3).
    /// Applies to tasks started afterwards.
    pub fn with_log_rotation(self, max_bytes: u64, keep: usize) -> ProcessRuntime {
        self.with(|i| (i.log_max_bytes, i.log_keep) = (max_bytes.max(1), keep))
    }

    /// Uses these util-linux programs instead of [`UNSHARE`] and [`NSENTER`].
    pub fn with_util_linux(self, unshare: PathBuf, nsenter: PathBuf) -> ProcessRuntime {
        self.with(|i| (i.unshare, i.nsenter) = (unshare, nsenter))
    }

    /// Puts the tasks' cgroups under `<hierarchy>/<parent>/` instead of `berth/`.
    pub fn with_cgroup_parent(self, parent: impl Into<String>) -> ProcessRuntime {
        self.with(|i| i.cgroup_parent = parent.into())
    }

    /// Allows `privileged: true` tasks (`--allow-privileged`) and runs sandboxed tasks through
    /// `oci_runtime` (runc or crun; none: the first found).
    pub fn with_sandbox(self, allow_privileged: bool, oci_runtime: Option<PathBuf>) -> ProcessRuntime {
        self.with(|i| (i.allow_privileged, i.oci_runtime) = (allow_privileged, oci_runtime))
    }

    /// Runs `runtime: oci` tasks from `images` (pulled there when missing).
    pub fn with_images(self, images: crate::image::Images) -> ProcessRuntime {
        self.with(|i| i.images = Some(images))
    }

    /// The tasks directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The directory of one task (it may not exist).
    pub fn task_dir(&self, task_id: &str) -> Result<PathBuf, RuntimeError> {
        check_task_id(task_id)?;
        Ok(self.inner.root.join(task_id))
    }

    /// The cgroup directories of one task on this host (they may not exist).
    pub fn cgroup_dirs(&self, task_id: &str) -> Result<Vec<PathBuf>, RuntimeError> {
        let dir = self.task_dir(task_id)?;
        let mut dirs = match files::read_json::<ShimConfig>(&dir.join(CONFIG)) {
            Ok(Some(config)) => config.cgroups,
            _ => Vec::new(),
        };
        for d in cgroup::task_dirs(self.layout(), &self.inner.cgroup_parent, task_id) {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        Ok(dirs)
    }

    /// Synchronously SIGKILLs everything of a task (shim, launcher, task) and removes its cgroups
    /// and directory, ignoring errors. For test clean-up (`Drop` guards) and last resorts; the
    /// agent uses `stop` and `remove`.
    pub fn force_remove_blocking(&self, task_id: &str) {
        let Ok(dir) = self.task_dir(task_id) else { return };
        if let Ok(Some(state)) = files::read_json::<ShimState>(&dir.join(STATE)) {
            kill_everything(&state);
            let deadline = Instant::now() + Duration::from_secs(2);
            while processes_alive(&state) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Ok(Some(config)) = files::read_json::<ShimConfig>(&dir.join(CONFIG))
            && let Some(oci) = config.oci
        {
            forget_container(&oci);
        }
        if let Ok(dirs) = self.cgroup_dirs(task_id) {
            let _ = cgroup::remove(&dirs, Duration::from_secs(2));
        }
        let _ = fs::remove_dir_all(&dir);
    }

    fn layout(&self) -> &Layout {
        self.inner.layout.get_or_init(cgroup::detect)
    }

    /// What start needs to know, checked before anything is created.
    fn prepare(
        &self,
        task_id: &str,
        spec: &RunSpec,
        binds: &[BindMount],
        dir: &Path,
        image: Option<&crate::image::ImageRecord>,
    ) -> Result<(ShimConfig, Limits, Policy), RuntimeError> {
        let argv = match image {
            Some(img) => image_argv(spec, &img.config),
            None => spec.argv(),
        };
        let Some(program) = argv.first() else {
            return Err(RuntimeError::Invalid(match image {
                Some(img) => format!(
                    "task {task_id}: image {} has no entrypoint or cmd and spec.task.command is empty; set \
                     spec.task.command",
                    img.reference
                ),
                None => {
                    format!("task {task_id}: spec.task.command is empty; the process runtime needs a program to run")
                }
            }));
        };
        let mut env = BTreeMap::from([("PATH".to_string(), DEFAULT_PATH.to_string())]);
        // An image's environment comes first; the spec's overrides it.
        for pair in image.map(|i| i.config.env.as_slice()).unwrap_or_default() {
            if let Some((k, v)) = pair.split_once('=') {
                env.insert(k.to_string(), v.to_string());
            }
        }
        for (k, v) in &spec.task.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(RuntimeError::Invalid(format!(
                    "task {task_id}: environment variable {k:?} cannot be set (names need no '=' or NUL, values no NUL); \
                     fix spec.task.env"
                )));
            }
            env.insert(k.clone(), v.clone());
        }
        for b in binds {
            if !b.source.is_absolute() || fs::metadata(&b.source).is_err() || !b.target.starts_with('/') {
                return Err(RuntimeError::Invalid(format!(
                    "task {task_id}: cannot bind {} at {:?}: the source must exist on this node and both paths be absolute",
                    b.source.display(),
                    b.target
                )));
            }
        }
        let policy = Policy::of(&spec.task);
        policy
            .check_allowed(self.inner.allow_privileged)
            .map_err(|e| RuntimeError::Invalid(format!("task {task_id}: {e}")))?;
        let in_bind = |w: &str| binds.iter().any(|b| Path::new(w).starts_with(&b.target));
        let workdir = if let Some(img) = image {
            PathBuf::from(
                spec.task.workdir.clone().or_else(|| img.config.working_dir.clone()).unwrap_or_else(|| "/".into()),
            )
        } else if policy.privileged {
            // A working directory in a volume exists once the task's init has bound it.
            match &spec.task.workdir {
                None => dir.to_path_buf(),
                Some(w) if Path::new(w).is_absolute() && (Path::new(w).is_dir() || in_bind(w)) => PathBuf::from(w),
                Some(w) => {
                    return Err(RuntimeError::Invalid(format!(
                        "task {task_id}: the working directory {w:?} is not an existing absolute directory on this node; \
                         create it or change spec.task.workdir"
                    )));
                }
            }
        } else {
            // The sandbox's view: its private /tmp (the default), a bind, or a host system
            // directory that exists.
            let w = spec.task.workdir.as_deref().unwrap_or("/tmp");
            let in_view = Path::new(w).starts_with("/tmp")
                || in_bind(w)
                || (sandbox::view::SYSTEM_DIRS.iter().any(|d| Path::new(w).starts_with(d)) && Path::new(w).is_dir());
            if !in_view {
                return Err(RuntimeError::Invalid(format!(
                    "task {task_id}: the working directory {w:?} is not in the task's sandbox, which shows the host's \
                     {} read-only, a private /tmp, and the task's volumes; set spec.task.workdir to /tmp, a volume's target, or a \
                     directory under /usr",
                    sandbox::view::SYSTEM_DIRS.join(", ")
                )));
            }
            PathBuf::from(w)
        };
        // The task's directory does not exist yet: resolve relative programs from `/` then. An
        // image's program is in the image, not on the host: the OCI runtime reports it missing.
        let base = if workdir == dir || !workdir.is_dir() { Path::new("/") } else { workdir.as_path() };
        if image.is_none() {
            check_program(program, &env["PATH"], base).map_err(|e| {
                RuntimeError::Invalid(format!(
                    "task {task_id}: {e}; use an absolute path in spec.task.command or set PATH in spec.task.env"
                ))
            })?;
        }
        if image.is_none()
            && !policy.privileged
            && program.starts_with('/')
            && !in_bind(program)
            && !sandbox::view::SYSTEM_DIRS.iter().any(|d| Path::new(program).starts_with(d))
        {
            return Err(RuntimeError::Invalid(format!(
                "task {task_id}: the program {program} is outside the task's sandbox, which shows the host's {} \
                 read-only and the task's volumes; install it under /usr, mount its directory as a `host` volume, \
                 or run an image",
                sandbox::view::SYSTEM_DIRS.join(", ")
            )));
        }
        // A privileged process task runs through util-linux's unshare and berth's init; a
        // privileged image runs through the OCI runtime like any image, with the sandbox off.
        let unsandboxed = policy.privileged && image.is_none();
        if unsandboxed && !procfs::is_executable(&self.inner.unshare) {
            return Err(RuntimeError::Unavailable(format!(
                "the process runtime needs util-linux's unshare at {} and it is missing; install util-linux \
                 (e.g. `apt-get install util-linux`) or run the task with the docker runtime",
                self.inner.unshare.display()
            )));
        }
        let Some(shim) = self.inner.shim.first() else {
            return Err(RuntimeError::Unavailable(
                "the process runtime has no shim command configured; build it with ProcessRuntime::default_shim()"
                    .into(),
            ));
        };
        if Path::new(shim).is_absolute() && !procfs::is_executable(Path::new(shim)) {
            return Err(RuntimeError::Unavailable(format!(
                "the task shim {} is missing or not executable; reinstall berth (the agent may have been upgraded in place)",
                Path::new(shim).display()
            )));
        }
        let oci = if unsandboxed {
            None
        } else {
            let runtime =
                sandbox::find_oci_runtime(self.inner.oci_runtime.as_deref()).map_err(RuntimeError::Unavailable)?;
            sandbox::find_init().map_err(RuntimeError::Unavailable)?;
            Some(oci::OciLaunch {
                runtime,
                state: self.inner.sandbox_base.join("state"),
                bundle: dir.join(oci::BUNDLE),
                id: task_id.to_string(),
                rootfs: self.inner.sandbox_base.join("rootfs").join(task_id),
            })
        };
        let limits = spec.task.resources.limits.as_ref().map_or(Limits::default(), |l| Limits {
            cpu_millis: l.cpu.map(|c| c.millis()).filter(|&m| m > 0),
            memory_bytes: l.memory.map(|m| m.bytes()).filter(|&b| b > 0),
        });
        let config = ShimConfig {
            format: CONFIG_FORMAT,
            task_id: task_id.to_string(),
            argv,
            env,
            workdir,
            unshare: self.inner.unshare.clone(),
            cgroups: Vec::new(),
            limits_required: limits.any(),
            log_max_bytes: self.inner.log_max_bytes,
            log_keep: self.inner.log_keep,
            created_at_ms: now_ms(),
            fence: (spec.disconnect == berth_types::spec::DisconnectPolicy::AtMostOnce).then(|| files::Fence {
                lease: self.inner.root.parent().unwrap_or(&self.inner.root).join(super::manager::LEASE_FILE),
                timeout_ms: spec.fence_timeout_ms.max(1),
            }),
            // A sandboxed task's init is the static tini in its bundle.
            init: if oci.is_some() {
                Vec::new()
            } else {
                self.inner
                    .shim
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .chain([init::INIT_FLAG.to_string()])
                    .collect()
            },
            stop_signal: spec.task.stop_signal_number(),
            netns: spec.attachment.as_ref().map(|a| PathBuf::from(&a.netns)),
            resolv_conf: spec.attachment.as_ref().map(|a| a.resolv_conf.clone()),
            binds: binds.to_vec(),
            oci,
        };
        Ok((config, limits, policy))
    }

    /// Creates the task's cgroups; without limits asked for, a failure only means no cgroups.
    fn cgroups(&self, task_id: &str, limits: Limits) -> Result<Vec<PathBuf>, RuntimeError> {
        match cgroup::setup(self.layout(), &self.inner.cgroup_parent, task_id, limits) {
            Ok(dirs) => Ok(dirs),
            Err(e) if limits.any() => Err(RuntimeError::Unavailable(format!(
                "task {task_id}: cannot apply its resource limits: {e}; run the agent as root on a host with the cpu \
                 and memory cgroup controllers (v1, or v2 with them delegated), or remove spec.task.resources.limits"
            ))),
            Err(e) => {
                warn!(task = task_id, "starting the task without cgroups (it asked for no limits): {e}");
                Ok(Vec::new())
            }
        }
    }

    /// A sandboxed task's bundle: its root skeleton (made now, outside the task directory) and
    /// its OCI configuration.
    fn bundle(
        &self,
        config: &ShimConfig,
        oci: &oci::OciLaunch,
        policy: &Policy,
        limits: Limits,
        dir: &Path,
        image: Option<&crate::image::ImageRecord>,
    ) -> Result<Sandboxed, RuntimeError> {
        let task_id = &config.task_id;
        let invalid = |e: String| RuntimeError::Invalid(format!("task {task_id}: {e}"));
        let init = sandbox::find_init().map_err(RuntimeError::Unavailable)?;
        if let Some(parent) = oci.rootfs.parent() {
            oci::make_traversable(parent).map_err(|e| RuntimeError::Other(format!("task {task_id}: {e}")))?;
        }
        let mut targets: Vec<(String, BindKind)> = config.binds.iter().map(|b| (b.target.clone(), b.kind)).collect();
        let (mut mounts, overlay) = match image {
            None => {
                let targets: Vec<(&str, BindKind)> = targets.iter().map(|(t, k)| (t.as_str(), *k)).collect();
                let mounts =
                    sandbox::view::build(&oci.rootfs, &dir.join(oci::SCRATCH), &dir.join(oci::RESOLV), &targets)
                        .map_err(invalid)?;
                (mounts, None)
            }
            // The image's root is an overlay the agent mounts once the task directory (which
            // holds its upper layer) exists; the mount points are made in it then.
            Some(img) => {
                let images = self.inner.images.as_ref().ok_or_else(|| {
                    RuntimeError::Unavailable("this process runtime has no image store for oci tasks".into())
                })?;
                let mounts = vec![
                    sandbox::bind(&dir.join(oci::RESOLV), "/etc/resolv.conf", true),
                    sandbox::bind(&dir.join(oci::HOSTS), "/etc/hosts", true),
                ];
                // What runc mounts (and an image made FROM scratch may lack) and what berth binds.
                for dir in ["/proc", "/dev", "/sys"] {
                    targets.push((dir.into(), BindKind::Dir));
                }
                targets.push(("/etc/resolv.conf".into(), BindKind::File));
                targets.push(("/etc/hosts".into(), BindKind::File));
                (mounts, Some(oci::Overlay { lower: images.lower_dirs(img), targets }))
            }
        };
        mounts.extend(config.binds.iter().map(|b| sandbox::bind(&b.source, &b.target, b.read_only)));
        let rootless = sandbox::rootless_ids();
        let bundle = sandbox::config(&sandbox::Container {
            policy,
            argv: &config.argv,
            env: config.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: config.workdir.to_string_lossy().into_owned(),
            rootfs: &oci.rootfs,
            readonly_root: overlay.is_none(),
            mounts,
            netns: config.netns.as_deref(),
            cgroups_path: rootless.is_none().then(|| format!("/{}/{task_id}", self.inner.cgroup_parent)),
            limits: sandbox::CgroupLimits {
                cpu_quota_us: limits.cpu_millis.map(cgroup::cfs_quota_us),
                cpu_period_us: cgroup::CFS_PERIOD_US,
                memory_bytes: limits.memory_bytes,
            },
            init: &init,
            rootless,
        });
        let resolv_conf = match &config.resolv_conf {
            Some(text) => text.clone(),
            None => fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        Ok(Sandboxed { bundle, resolv_conf, owner: policy.host_ids(rootless), overlay })
    }

    /// Writes the task directory under a temporary name and renames it into place, so a task
    /// directory always has its config. `Ok(false)`: another start created it first.
    fn create_dir(
        &self,
        task_id: &str,
        dir: &Path,
        config: &ShimConfig,
        sandboxed: Option<&Sandboxed>,
    ) -> Result<bool, RuntimeError> {
        let root = &self.inner.root;
        fs::create_dir_all(root).map_err(|e| {
            RuntimeError::Other(format!(
                "creating the tasks directory {} failed: {e}; check the agent's data directory is writable",
                root.display()
            ))
        })?;
        let tmp = root.join(format!(".{task_id}.tmp-{}-{}", std::process::id(), now_ms()));
        let written = fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .and_then(|()| files::write_json(&tmp.join(CONFIG), config))
            .and_then(|()| sandboxed.map_or(Ok(()), |s| s.write(&tmp)));
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&tmp);
            return Err(RuntimeError::Other(format!(
                "task {task_id}: writing its directory {} failed: {e}; check free space and permissions",
                tmp.display()
            )));
        }
        match fs::rename(&tmp, dir) {
            Ok(()) => Ok(true),
            Err(_) if dir.exists() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(false)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(RuntimeError::Other(format!(
                    "task {task_id}: renaming {} to {} failed: {e}; check permissions",
                    tmp.display(),
                    dir.display()
                )))
            }
        }
    }

    /// Starts the shim and waits until it has started the task (or failed to).
    async fn launch(&self, task_id: &str, dir: &Path) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(SHIM_LOG))
            .map_err(|e| format!("creating {} failed: {e}", dir.join(SHIM_LOG).display()))?;
        let log2 = log.try_clone().map_err(|e| format!("duplicating the shim log's descriptor failed: {e}"))?;
        let shim = &self.inner.shim;
        let mut child = tokio::process::Command::new(&shim[0])
            .args(&shim[1..])
            .arg(dir)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("starting the task shim {:?} failed: {e}", shim))?;
        let deadline = Instant::now() + START_PATIENCE;
        // Short pauses for the first 200 ms (a task usually runs within tens of milliseconds:
        // each pause there is latency added to its start), the usual poll after.
        let began = Instant::now();
        let outcome = loop {
            // Exited first, then the files: the shim writes exit.json before it exits.
            let exited = child.try_wait().ok().flatten();
            match files::read_json::<ExitRecord>(&dir.join(EXIT)) {
                Ok(Some(rec)) if rec.started => break Ok(()),
                Ok(Some(rec)) => break Err(rec.message),
                _ => {}
            }
            if let Ok(Some(ShimState { task: Some(_), .. })) = files::read_json::<ShimState>(&dir.join(STATE)) {
                break Ok(());
            }
            if let Some(status) = exited {
                break Err(format!(
                    "the task shim exited ({status}) before starting the task; its log says: {}",
                    files::tail_text(&dir.join(SHIM_LOG), 2000)
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                break Err(format!(
                    "the task shim did not start the task within {START_PATIENCE:?}; its log says: {}",
                    files::tail_text(&dir.join(SHIM_LOG), 2000)
                ));
            }
            let pause = if began.elapsed() < Duration::from_millis(200) { Duration::from_millis(2) } else { POLL };
            tokio::time::sleep(pause).await;
        };
        // Reap the shim when it ends (it does not depend on this: if the agent exits first the
        // shim is re-parented and reaped by init).
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        if outcome.is_ok() {
            info!(task = task_id, dir = %dir.display(), "task started");
        }
        outcome
    }

    /// What the task's files and processes say, without changing anything.
    fn observe(&self, dir: &Path) -> Result<Seen, RuntimeError> {
        if !dir.exists() {
            return Ok(Seen::Missing);
        }
        if let Some(rec) = read(dir, EXIT)? {
            return Ok(Seen::Exited(rec));
        }
        let Some(state) = read::<ShimState>(dir, STATE)? else {
            let created = read::<ShimConfig>(dir, CONFIG)?.map_or(0, |c| c.created_at_ms);
            return Ok(if now_ms() - created < 2 * START_PATIENCE.as_millis() as i64 {
                Seen::Starting { created_at_ms: created }
            } else {
                Seen::NeverStarted
            });
        };
        if processes_alive(&state) {
            return Ok(Seen::Running(state));
        }
        // Everything is gone: the shim may have just written exit.json and exited.
        match read(dir, EXIT)? {
            Some(rec) => Ok(Seen::Exited(rec)),
            None => Ok(Seen::SupervisorDied(state)),
        }
    }

    /// `observe`, turning the ends without a record into one (kept in exit.json).
    fn settle(&self, dir: &Path) -> Result<Seen, RuntimeError> {
        let message = match self.observe(dir)? {
            Seen::SupervisorDied(state) => format!(
                "the task's supervisor (shim pid {}) ended without recording how the task ended (was it killed?); \
                 the exit code is unknown. See {} and the task's output in {}",
                state.shim.pid,
                dir.join(SHIM_LOG).display(),
                dir.join(OUTPUT).display()
            ),
            Seen::NeverStarted => format!(
                "the task's supervisor never started (was the agent interrupted while starting it?); see {}",
                dir.join(SHIM_LOG).display()
            ),
            seen => return Ok(seen),
        };
        let rec = ExitRecord { code: -1, finished_at_ms: now_ms(), message, started: true };
        files::write_json(&dir.join(EXIT), &rec).map_err(|e| {
            RuntimeError::Other(format!("recording the end of the task in {} failed: {e}", dir.join(EXIT).display()))
        })?;
        Ok(Seen::Exited(rec))
    }

    async fn stop_dir(&self, task_id: &str, dir: &Path, grace: Duration) -> Result<(), RuntimeError> {
        // A task being started right now: wait until the shim has named its processes.
        let deadline = Instant::now() + START_PATIENCE;
        let state = loop {
            match self.observe(dir)? {
                Seen::Missing | Seen::Exited(_) | Seen::NeverStarted | Seen::SupervisorDied(_) => return Ok(()),
                Seen::Running(state) if state.task.is_some() || state.launcher.is_some() => break state,
                Seen::Running(state) if Instant::now() >= deadline => break state,
                Seen::Running(_) | Seen::Starting { .. } => tokio::time::sleep(POLL).await,
            }
        };
        // The stop signal goes to the task's init, which forwards it to the program and exits
        // with it, taking the rest of the namespace along. A task started before the init
        // existed has its program as PID 1, which ignores a SIGTERM it has no handler for: it
        // and everything else in its namespace get SIGTERM, as before.
        if let Some(task) = state.task.filter(procfs::alive) {
            let config = read::<ShimConfig>(dir, CONFIG)?;
            match config.filter(|c| !c.init.is_empty() || c.oci.is_some()) {
                Some(c) => signal_number(task.pid, c.stop_signal),
                None => {
                    let mut targets = vec![task.pid];
                    if let Some(ns) = procfs::pid_namespace(task.pid) {
                        targets.extend(procfs::pids_in_namespace(&ns).into_iter().filter(|&p| p != task.pid));
                    }
                    for pid in targets {
                        signal(pid, Signal::TERM);
                    }
                }
            }
        }
        if wait_until(grace, || task_ended(dir, &state)).await {
            return Ok(());
        }
        info!(task = task_id, "task still running after a grace of {grace:?}: SIGKILL");
        kill_task(&state);
        if !wait_until(KILL_PATIENCE, || !task_alive(&state)).await {
            let pid = state.task.map_or(0, |t| t.pid);
            return Err(RuntimeError::Other(format!(
                "task {task_id} (host pid {pid}) still runs {KILL_PATIENCE:?} after SIGKILL; it is probably stuck in \
                 the kernel (state D: look at /proc/{pid}/stack); try stopping it again later"
            )));
        }
        // The shim records the exit at once; give it a moment.
        wait_until(Duration::from_secs(5), || task_ended(dir, &state)).await;
        Ok(())
    }
}

/// The files a sandboxed task's directory holds besides its config.
struct Sandboxed {
    /// The OCI configuration, written as `bundle/config.json`.
    bundle: serde_json::Value,
    /// The task's `/etc/resolv.conf`.
    resolv_conf: String,
    /// The task user's ids on the host: the owner of its private `/tmp`.
    owner: (u32, u32),
    /// An image task's root, mounted once the task directory exists.
    overlay: Option<oci::Overlay>,
}

impl Sandboxed {
    fn write(&self, dir: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o700).create(dir.join(oci::BUNDLE))?;
        files::write_json(&dir.join(oci::BUNDLE).join(CONFIG), &self.bundle)?;
        files::write_atomic(&dir.join(oci::RESOLV), self.resolv_conf.as_bytes())?;
        files::write_atomic(&dir.join(oci::HOSTS), oci::HOSTS_FILE.as_bytes())?;
        let scratch = dir.join(oci::SCRATCH);
        fs::DirBuilder::new().mode(0o700).create(&scratch)?;
        std::os::unix::fs::chown(&scratch, Some(self.owner.0), Some(self.owner.1))
            .or_else(|e| if sandbox::rootless_ids().is_some() { Ok(()) } else { Err(e) })?;
        fs::set_permissions(&scratch, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
    }
}

/// What a task directory says.
#[derive(Debug)]
enum Seen {
    Missing,
    /// No state yet, created recently: the shim is starting.
    Starting {
        created_at_ms: i64,
    },
    /// No state and created long ago: the shim never ran.
    NeverStarted,
    /// The shim, the launcher or the task is alive.
    Running(ShimState),
    Exited(ExitRecord),
    /// Nothing alive and no exit record.
    SupervisorDied(ShimState),
}

fn read<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>, RuntimeError> {
    files::read_json(&dir.join(name)).map_err(|e| {
        RuntimeError::Other(format!(
            "reading {} failed: {e}; if it is corrupt, stop the task's processes by hand and remove {}",
            dir.join(name).display(),
            dir.display()
        ))
    })
}

fn check_task_id(task_id: &str) -> Result<(), RuntimeError> {
    let ok = !task_id.is_empty()
        && task_id.len() <= 128
        && !task_id.starts_with('.')
        && task_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "task id {task_id:?} cannot name a task directory: use 1 to 128 letters, digits, '-', '_' or '.', \
             not starting with '.'"
        )))
    }
}

/// An image task's command, as Docker builds it: the spec's `command` replaces the image's
/// entrypoint (and drops its cmd), the spec's `args` replace the image's cmd.
fn image_argv(spec: &RunSpec, image: &crate::image::ImageConfig) -> Vec<String> {
    let t = &spec.task;
    let (entry, cmd) = if t.command.is_empty() {
        (image.entrypoint.clone(), if t.args.is_empty() { image.cmd.clone() } else { t.args.clone() })
    } else {
        (t.command.clone(), t.args.clone())
    };
    entry.into_iter().chain(cmd).collect()
}

/// Checks that `program` can be executed, as `execvp` would find it with `path`.
fn check_program(program: &str, path: &str, base: &Path) -> Result<(), String> {
    if program.contains('/') {
        if procfs::is_executable(&base.join(program)) {
            Ok(())
        } else {
            Err(format!("the program {program:?} does not exist or is not executable"))
        }
    } else if path
        .split(':')
        .any(|d| procfs::is_executable(&base.join(if d.is_empty() { "." } else { d }).join(program)))
    {
        Ok(())
    } else {
        Err(format!("the program {program:?} was not found in PATH ({path})"))
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Sends signal number `sig` to `pid` (SIGTERM when the number is not a standard signal).
fn signal_number(pid: u32, sig: i32) {
    use nix::sys::signal::Signal as NixSignal;
    if pid > 0 && pid <= i32::MAX as u32 {
        let sig = NixSignal::try_from(sig).unwrap_or(NixSignal::SIGTERM);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

fn signal_group(pgid: u32, sig: Signal) {
    if let Some(pgid) = Pid::from_raw(pgid as i32) {
        let _ = rustix::process::kill_process_group(pgid, sig);
    }
}

/// SIGKILL to the task (PID 1 of its namespace: the kernel then kills the whole namespace) and
/// to the launcher's process group. The shim lives on to record the exit.
fn kill_task(state: &ShimState) {
    if let Some(task) = state.task.filter(procfs::alive) {
        signal(task.pid, Signal::KILL);
    }
    if let Some(launcher) = state.launcher.filter(procfs::alive) {
        signal_group(launcher.pid, Signal::KILL);
    }
}

/// Deletes what the OCI runtime keeps of a sandboxed task (nothing, unless runc was killed
/// before it could clean up) and the task's root skeleton. Errors are logged: the runtime may
/// know nothing of the task, which is the normal case.
fn forget_container(oci: &oci::OciLaunch) {
    let state = oci.state.join(&oci.id);
    if state.exists() {
        match std::process::Command::new(&oci.runtime).args(oci.delete_args()).stdin(Stdio::null()).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                warn!(task = %oci.id, "{} delete: {}", oci.runtime.display(), String::from_utf8_lossy(&out.stderr).trim())
            }
            Err(e) => warn!(task = %oci.id, "running {} delete failed: {e}", oci.runtime.display()),
        }
    }
    if let Err(e) = oci::remove_rootfs(&oci.rootfs) {
        warn!(task = %oci.id, "{e}");
    }
}

/// [`kill_task`] and the shim (its process group).
fn kill_everything(state: &ShimState) {
    kill_task(state);
    if procfs::alive(&state.shim) {
        signal_group(state.shim.pid, Signal::KILL);
    }
}

fn task_alive(state: &ShimState) -> bool {
    procfs::alive_opt(state.task.as_ref()) || procfs::alive_opt(state.launcher.as_ref())
}

fn processes_alive(state: &ShimState) -> bool {
    procfs::alive(&state.shim) || task_alive(state)
}

/// Whether the task has ended: its exit is recorded or every process of it is gone.
fn task_ended(dir: &Path, state: &ShimState) -> bool {
    dir.join(EXIT).exists() || !processes_alive(state)
}

/// Polls `done` until it holds or `patience` has passed; whether it held.
async fn wait_until(patience: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or(status.signal().map(|s| 128 + s)).unwrap_or(-1)
}

impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start_with(&self, task_id: &str, spec: &RunSpec, binds: &[BindMount]) -> Result<(), RuntimeError> {
        let dir = self.task_dir(task_id)?;
        if fs::symlink_metadata(&dir).is_ok() {
            return Ok(()); // running or ended: left as it is
        }
        let image = match (spec.task.runtime, &self.inner.images) {
            (berth_types::spec::Runtime::Oci, Some(images)) => {
                let reference = spec.task.image.as_deref().unwrap_or_default();
                // The task manager pulled it already (with the task's credentials and its
                // progress reported); a runtime used on its own pulls anonymously.
                Some(
                    images
                        .ensure(reference, None, &|_| {})
                        .await
                        .map_err(|e| RuntimeError::Unavailable(format!("task {task_id}: {e}")))?,
                )
            }
            (berth_types::spec::Runtime::Oci, None) => {
                return Err(RuntimeError::Unavailable(format!(
                    "task {task_id}: this agent has no image store; runtime `oci` needs one"
                )));
            }
            _ => None,
        };
        let (mut config, limits, policy) = self.prepare(task_id, spec, binds, &dir, image.as_ref())?;
        let sandboxed = match &config.oci {
            // runc makes the task's cgroups, with its limits, when it starts it.
            Some(oci) => Some(self.bundle(&config, oci, &policy, limits, &dir, image.as_ref())?),
            None => {
                config.cgroups = self.cgroups(task_id, limits)?;
                None
            }
        };
        match self.create_dir(task_id, &dir, &config, sandboxed.as_ref()) {
            Ok(true) => {}
            Ok(false) => return Ok(()), // a concurrent start won (the cgroups are its too)
            Err(e) => {
                let _ = cgroup::remove(&config.cgroups, Duration::ZERO);
                if let Some(oci) = &config.oci {
                    let _ = oci::remove_rootfs(&oci.rootfs);
                }
                return Err(e);
            }
        }
        if let (Some(oci), Some(overlay)) = (&config.oci, sandboxed.as_ref().and_then(|s| s.overlay.as_ref()))
            && let Err(e) = overlay.mount(&oci.rootfs, &dir)
        {
            let rt = self.clone();
            let id = task_id.to_string();
            let _ = tokio::task::spawn_blocking(move || rt.force_remove_blocking(&id)).await;
            return Err(RuntimeError::Other(format!("task {task_id}: {e}")));
        }
        match self.launch(task_id, &dir).await {
            Ok(()) => Ok(()),
            Err(message) => {
                let rt = self.clone();
                let id = task_id.to_string();
                let _ = tokio::task::spawn_blocking(move || rt.force_remove_blocking(&id)).await;
                Err(RuntimeError::Unavailable(format!("task {task_id} could not be started: {message}")))
            }
        }
    }

    async fn inspect(&self, task_id: &str) -> Result<Observed, RuntimeError> {
        let dir = self.task_dir(task_id)?;
        Ok(match self.settle(&dir)? {
            Seen::Missing => Observed::Missing,
            Seen::Starting { created_at_ms } => Observed::Running { pid: None, started_at_ms: created_at_ms },
            Seen::Running(state) => Observed::Running {
                pid: state.task.map(|t| t.pid),
                started_at_ms: if state.started_at_ms > 0 {
                    state.started_at_ms
                } else {
                    read::<ShimConfig>(&dir, CONFIG)?.map_or(0, |c| c.created_at_ms)
                },
            },
            Seen::Exited(rec) => {
                Observed::Exited { code: rec.code, finished_at_ms: rec.finished_at_ms, message: rec.message }
            }
            // `settle` records these as exits; seen only if that changed under us.
            Seen::NeverStarted | Seen::SupervisorDied(_) => Observed::Exited {
                code: -1,
                finished_at_ms: now_ms(),
                message: "the task's supervisor ended without recording how the task ended".into(),
            },
        })
    }

    async fn stop(&self, task_id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let dir = self.task_dir(task_id)?;
        self.stop_dir(task_id, &dir, grace).await
    }

    async fn remove(&self, task_id: &str) -> Result<(), RuntimeError> {
        let dir = self.task_dir(task_id)?;
        if dir.exists() {
            self.stop_dir(task_id, &dir, REMOVE_GRACE).await?;
            // The shim exits right after recording the exit; it may hold the cgroups until then.
            if let Ok(Some(state)) = files::read_json::<ShimState>(&dir.join(STATE))
                && !wait_until(Duration::from_secs(5), || !procfs::alive(&state.shim)).await
            {
                signal_group(state.shim.pid, Signal::KILL);
            }
            if let Some(oci) = read::<ShimConfig>(&dir, CONFIG)?.and_then(|c| c.oci) {
                let rootfs = oci.rootfs.clone();
                tokio::task::spawn_blocking(move || forget_container(&oci)).await.map_err(|e| {
                    RuntimeError::Other(format!("task {task_id}: forgetting its container failed: {e}"))
                })?;
                if rootfs.exists() {
                    return Err(RuntimeError::Other(format!(
                        "task {task_id}: its root skeleton {} could not be removed (see the agent's log); remove it by \
                         hand, then remove the task again",
                        rootfs.display()
                    )));
                }
            }
        }
        let cgroups = self.cgroup_dirs(task_id)?;
        let removed = tokio::task::spawn_blocking(move || cgroup::remove(&cgroups, Duration::from_secs(5)))
            .await
            .map_err(|e| RuntimeError::Other(format!("removing the task's cgroups failed: {e}")))?;
        if let Err(e) = removed {
            return Err(RuntimeError::Other(format!(
                "task {task_id}: {e}; stop those processes, then remove the task again (or rmdir the cgroup)"
            )));
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RuntimeError::Other(format!(
                "task {task_id}: removing {} failed: {e}; check permissions and remove it by hand",
                dir.display()
            ))),
        }
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let entries = match fs::read_dir(&self.inner.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(RuntimeError::Other(format!(
                    "listing the tasks directory {} failed: {e}; check its permissions",
                    self.inner.root.display()
                )));
            }
        };
        let mut ids: Vec<String> = entries
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                (e.file_type().ok()?.is_dir() && check_task_id(&name).is_ok()).then_some(name)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn logs(&self, task_id: &str, query: LogQuery) -> Result<LogLines, RuntimeError> {
        let dir = self.task_dir(task_id)?;
        if !dir.exists() {
            return Err(RuntimeError::Invalid(format!(
                "task {task_id} does not exist on this node ({} is missing); it may have been removed",
                dir.display()
            )));
        }
        let path = dir.join(OUTPUT);
        let q = query.clone();
        let p = path.clone();
        let (initial, mut follower) = tokio::task::spawn_blocking(move || logfile::read_initial(&p, &q))
            .await
            .map_err(|e| RuntimeError::Other(format!("reading the task's log failed: {e}")))?
            .map_err(|e| {
                RuntimeError::Other(format!("task {task_id}: reading its log {} failed: {e}", path.display()))
            })?;
        if !query.follow {
            return Ok(Box::pin(futures::stream::iter(initial)));
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<LogLine>(256);
        let rt = self.clone();
        let since = query.since_ms.unwrap_or(i64::MIN);
        tokio::spawn(async move {
            for line in initial {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            let mut pause = FOLLOW_POLL_BUSY;
            loop {
                // Ended first, then read: the shim writes all output before it records the end.
                let ended = !matches!(rt.observe(&dir), Ok(Seen::Running(_) | Seen::Starting { .. }));
                let lines = match follower.poll() {
                    Ok(lines) => lines,
                    Err(e) => {
                        warn!(dir = %dir.display(), "following the task's log stopped: {e}");
                        return;
                    }
                };
                pause = if lines.is_empty() { (pause * 5 / 4).min(FOLLOW_POLL) } else { FOLLOW_POLL_BUSY };
                for line in lines.into_iter().filter(|l| l.ts_ms >= since) {
                    if tx.send(line).await.is_err() {
                        return;
                    }
                }
                if ended {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|l| (l, rx)) })))
    }

    async fn probe_addr(&self, task_id: &str) -> Result<IpAddr, RuntimeError> {
        check_task_id(task_id)?;
        Ok(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    async fn exec(&self, task_id: &str, argv: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        let dir = self.task_dir(task_id)?;
        if argv.is_empty() {
            return Err(RuntimeError::Invalid(format!("exec in task {task_id}: the command is empty")));
        }
        let task = match self.observe(&dir)? {
            Seen::Running(ShimState { task: Some(task), .. }) if procfs::alive(&task) => task,
            seen => {
                let what = match seen {
                    Seen::Missing => "does not exist",
                    Seen::Exited(_) | Seen::SupervisorDied(_) | Seen::NeverStarted => "has ended",
                    _ => "is not running yet",
                };
                return Err(RuntimeError::Other(format!(
                    "exec in task {task_id}: the task {what}; exec needs a running task"
                )));
            }
        };
        let config = read::<ShimConfig>(&dir, CONFIG)?;
        // runc writes the command's host pid here: the command lives in the task's PID
        // namespace, so killing runc alone would leave it running under the task's init.
        let pid_file =
            dir.join(format!("exec-{}-{}.pid", std::process::id(), EXEC_SEQ.fetch_add(1, Ordering::Relaxed)));
        let mut command = match config.as_ref().and_then(|c| c.oci.as_ref()) {
            // Confined as the task is: its user, capabilities, seccomp filter and namespaces.
            Some(oci) => {
                let mut c = tokio::process::Command::new(&oci.runtime);
                c.args(oci.exec_args(argv, &pid_file)).env_clear().env("PATH", DEFAULT_PATH);
                c
            }
            None => {
                if !procfs::is_executable(&self.inner.nsenter) {
                    return Err(RuntimeError::Unavailable(format!(
                        "exec needs util-linux's nsenter at {} and it is missing; install util-linux",
                        self.inner.nsenter.display()
                    )));
                }
                let mut c = tokio::process::Command::new(&self.inner.nsenter);
                c.arg("--target")
                    .arg(task.pid.to_string())
                    .args(shim::nsenter_flags(shim::rootless()))
                    .arg("--")
                    .args(argv)
                    .env_clear()
                    .envs(config.map(|c| c.env).unwrap_or_default());
                c
            }
        };
        let mut child = command
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RuntimeError::Other(format!("exec in task {task_id}: starting the command failed: {e}")))?;
        let pgid = child.id();
        let outcome = tokio::time::timeout(timeout, child.wait()).await;
        let command_pid = fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse::<u32>().ok());
        let _ = fs::remove_file(&pid_file);
        match outcome {
            Ok(Ok(status)) => Ok(exit_code(status)),
            Ok(Err(e)) => Err(RuntimeError::Other(format!("exec in task {task_id}: waiting for {argv:?} failed: {e}"))),
            Err(_) => {
                // nsenter forked the command into the namespace; both are in nsenter's group.
                // runc's command is not in its group: it is killed by its pid.
                if let Some(pid) = command_pid {
                    signal(pid, Signal::KILL);
                }
                if let Some(pgid) = pgid {
                    signal_group(pgid, Signal::KILL);
                }
                let _ = child.wait().await;
                Err(RuntimeError::Other(format!(
                    "exec in task {task_id}: {argv:?} did not finish within {timeout:?} and was killed; \
                     make the command faster or raise its timeout"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids() {
        for ok in ["a", "3f2c-11", "svc.1_x", &"x".repeat(128)] {
            assert!(check_task_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            let err = check_task_id(bad).unwrap_err().to_string();
            assert!(err.contains("cannot name a task directory"), "{bad}: {err}");
        }
    }

    #[test]
    fn programs() {
        assert!(check_program("sh", DEFAULT_PATH, Path::new("/")).is_ok());
        assert!(check_program("/bin/sh", "", Path::new("/")).is_ok());
        assert!(check_program("bin/sh", "", Path::new("/")).is_ok());
        let err = check_program("no-such-program-berth", "/usr/bin:/bin", Path::new("/")).unwrap_err();
        assert!(err.contains("not found in PATH (/usr/bin:/bin)"), "{err}");
        let plain = tempfile::NamedTempFile::new().unwrap();
        let err = check_program(plain.path().to_str().unwrap(), "", Path::new("/")).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
    }

    #[test]
    fn default_shim_is_this_executable() {
        let shim = ProcessRuntime::default_shim();
        assert_eq!(shim.len(), 2);
        assert_eq!(PathBuf::from(&shim[0]), std::env::current_exe().unwrap());
        assert_eq!(shim[1], SHIM_SUBCOMMAND);
    }

    #[test]
    fn without_cgroups_only_unlimited_tasks_start() {
        let rt = ProcessRuntime::new("/tmp/x".into(), vec!["s".into()]);
        rt.inner.layout.set(Layout::None).unwrap();
        assert_eq!(rt.cgroups("t", Limits::default()).unwrap(), Vec::<PathBuf>::new());
        match rt.cgroups("t", Limits { cpu_millis: None, memory_bytes: Some(1 << 20) }) {
            Err(RuntimeError::Unavailable(m)) => {
                assert!(m.contains("cannot apply its resource limits") && m.contains("no cgroup filesystem"), "{m}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert_eq!(rt.cgroup_dirs("t").unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn builders_keep_the_rest() {
        let rt = ProcessRuntime::new("/tmp/x".into(), vec!["s".into()])
            .with_log_rotation(0, 1)
            .with_cgroup_parent("berth-test");
        assert_eq!(rt.root(), Path::new("/tmp/x"));
        assert_eq!((rt.inner.log_max_bytes, rt.inner.log_keep), (1, 1));
        assert_eq!(rt.inner.cgroup_parent, "berth-test");
        assert_eq!(rt.inner.shim, vec![OsString::from("s")]);
    }
}
