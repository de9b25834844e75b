//! The task manager: the [`Driver`] of a real agent. It runs each task through the runtime its
//! spec names (process or docker), watches it, probes its health and reports every change.
//!
//! - start: idempotent. A task the runtime already has (an agent restart) is adopted, never
//!   started twice; its watcher resumes.
//! - Each task has one watcher: it polls the runtime every 500 ms and runs the health check at
//!   its interval. An unhealthy task (`retries` failures in a row after `start_period`) is stopped
//!   and reported FAILED, so the orchestrator replaces it per the restart policy.
//! - stop: the task's stop signal (SIGTERM unless its spec says otherwise), its grace period
//!   (`stop_grace_period`, default 10 s), then SIGKILL; SHUTDOWN is reported. forget: stop and
//!   remove the task's files or container (the task left the node's assignment set). At most
//!   one stop of a task runs at a time; a forget asked for during a stop removes the task once
//!   the stop is done.
//! - reconcile (level-triggered, at agent start and on every complete assignment set): compares
//!   the desired tasks with what the runtimes actually hold, starts what should run and does not,
//!   stops what should not run, and once the leader has confirmed the whole set removes what it
//!   does not know. Nothing depends on having seen a change happen.
//! - storage: before a task starts, [`TaskManager`] turns its volumes, secrets and configs into
//!   host paths (`crate::volume`: mounts made or reused, files written to the task's tmpfs) and
//!   hands them to the runtime as [`BindMount`]s; the runtimes only bind them. A failure fails
//!   the task with the reason (the masters' restart policy retries it). A task that already
//!   runs (adopted) keeps its mounts and is only recorded as holding its volumes. Once the task
//!   has ended its volumes are released (a GlusterFS volume no task needs is unmounted); once it
//!   is removed, its secrets and configs go.
//! - at-most-once: the agent writes a lease file (`lease`, the Unix millisecond it last heard the
//!   leader) on every leader frame; the manager stops at-most-once tasks whose fence timeout
//!   passed without contact. The process runtime's supervisor checks the same lease itself, so the
//!   fence holds even while the agent is frozen.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use berth_api::pb::agent::{Assignment, FileData, TaskHealth, TaskState, TaskStatus};
use berth_types::{
    spec::{DisconnectPolicy, Runtime as RuntimeKind},
    task::{Attachment, RunSpec},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::runtime::BindMount;
use super::{Driver, LogLines, LogQuery, Observed, Runtime, StatusSink, now_ms};
use crate::probe::{Health, HealthTracker};
use crate::volume::{TaskFiles, Volumes};

/// How often a task's runtime state is polled.
const POLL: Duration = Duration::from_millis(500);
/// How long a stopped task gets between its stop signal and SIGKILL when its spec is unknown
/// here (the spec's `stop_grace_period` otherwise).
pub const STOP_GRACE: Duration = berth_types::spec::DEFAULT_STOP_GRACE;
/// The lease file in the agent's data dir.
pub const LEASE_FILE: &str = "lease";

/// Where logs come from, for the agent's log streams (object-safe, shareable).
pub trait LogSource: Send + Sync {
    fn logs(
        &self,
        task_id: String,
        q: LogQuery,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<LogLines, String>> + Send + '_>>;
}

struct Watched {
    cancel: CancellationToken,
    spec: RunSpec,
}

struct Inner {
    process: Box<dyn RuntimeCalls>,
    docker: Result<Box<dyn RuntimeCalls>, String>,
    sink: StatusSink,
    tasks: Mutex<HashMap<String, Watched>>,
    lease: PathBuf,
    /// Host ports given to process tasks: `<data dir>/ports/<task id>.json`.
    ports_dir: PathBuf,
    /// Last contact with the leader (Unix ms), mirrored in the lease file.
    contact_ms: Mutex<i64>,
    /// Tasks being stopped, and whether to remove them once stopped.
    stopping: Mutex<HashMap<String, bool>>,
    /// The node's overlay, when the agent attaches tasks to networks.
    overlay: std::sync::OnceLock<SharedOverlay>,
    /// The node's volumes.
    volumes: Volumes,
    /// The tasks' secrets and configs.
    files: TaskFiles,
    /// The node's images (`runtime: oci`).
    images: Option<crate::image::Images>,
    /// Images the cluster holds, as the session learns of them.
    cluster: crate::image::ClusterSource,
}

/// How the task manager keeps volumes, secrets and configs.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// The prefixes `host` volumes may use (`--allow-host-path`); normalised here, relative
    /// ones are left out.
    pub allow_host_paths: Vec<PathBuf>,
    /// Where each task's secrets and configs go (a tmpfs per task); default
    /// [`TaskFiles::default_root`] once the node id is known.
    pub files_root: Option<PathBuf>,
    /// How long a mount may take ([`crate::volume::MOUNT_TIMEOUT`]).
    pub mount_timeout: Duration,
    /// How long a start waits for secret or config contents it lacks
    /// ([`crate::volume::files::FILES_PATIENCE`]).
    pub files_patience: Duration,
    /// How often volume usage is measured ([`crate::volume::USAGE_INTERVAL`]).
    pub usage_interval: Duration,
    /// The node's image store, shared with the process runtime that runs oci tasks from it.
    pub images: Option<crate::image::Images>,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            allow_host_paths: Vec::new(),
            files_root: None,
            mount_timeout: crate::volume::MOUNT_TIMEOUT,
            files_patience: crate::volume::files::FILES_PATIENCE,
            usage_interval: crate::volume::USAGE_INTERVAL,
            images: None,
        }
    }
}

/// How long a task on networks waits at start for the leader's view of them.
const NETWORK_VIEW_PATIENCE: Duration = Duration::from_secs(30);

/// The node's overlay, shared by the task manager and the session.
pub type SharedOverlay = Arc<tokio::sync::Mutex<crate::overlay::node::Overlay>>;

/// Runs tasks with a process runtime `P` and a docker runtime `D` (which may be unavailable).
pub struct TaskManager {
    inner: Arc<Inner>,
}

impl Clone for TaskManager {
    fn clone(&self) -> Self {
        TaskManager { inner: self.inner.clone() }
    }
}

impl TaskManager {
    /// `docker` is the docker runtime, or why it is unavailable (tasks asking for it fail with
    /// that message). `data_dir` holds the lease file.
    pub fn new<P: Runtime, D: Runtime>(
        process: P,
        docker: Result<D, String>,
        sink: StatusSink,
        data_dir: PathBuf,
    ) -> Self {
        Self::with_storage(process, docker, sink, data_dir, StorageOptions::default())
    }

    /// [`TaskManager::new`] with volumes under `<data_dir>/volumes` and storage as `storage` says.
    pub fn with_storage<P: Runtime, D: Runtime>(
        process: P,
        docker: Result<D, String>,
        sink: StatusSink,
        data_dir: PathBuf,
        storage: StorageOptions,
    ) -> Self {
        let allowed = storage
            .allow_host_paths
            .iter()
            .filter_map(|p| {
                let n = crate::volume::paths::normalize(p);
                if n.is_none() {
                    warn!(path = %p.display(), "ignoring an allowed host path that is not absolute");
                }
                n
            })
            .collect();
        let volumes = Volumes::new(
            data_dir.join(crate::volume::VOLUMES_DIR),
            allowed,
            storage.mount_timeout,
            storage.usage_interval,
        );
        let m = TaskManager {
            inner: Arc::new(Inner {
                process: Box::new(Owned(process)),
                docker: docker.map(|d| Box::new(Owned(d)) as Box<dyn RuntimeCalls>),
                sink,
                tasks: Mutex::new(HashMap::new()),
                lease: data_dir.join(LEASE_FILE),
                ports_dir: data_dir.join("ports"),
                contact_ms: Mutex::new(now_ms()),
                stopping: Mutex::new(HashMap::new()),
                overlay: std::sync::OnceLock::new(),
                volumes,
                files: TaskFiles::new(storage.files_root, storage.files_patience),
                images: storage.images,
                cluster: crate::image::ClusterSource::default(),
            }),
        };
        let fence = m.clone();
        tokio::spawn(async move { fence.fence_loop().await });
        m
    }

    /// The node's volumes.
    pub fn volumes(&self) -> &Volumes {
        &self.inner.volumes
    }

    /// The tasks' secrets and configs.
    pub fn files(&self) -> &TaskFiles {
        &self.inner.files
    }

    /// Makes the task's volumes, secrets and configs ready; their binds.
    async fn prepare_storage(&self, id: &str, spec: &RunSpec) -> Result<Vec<BindMount>, String> {
        // The task user's ids on the host: a sandboxed process task's (its user namespace maps
        // them), a privileged one's (the agent's), a container's (the spec's user; root, as
        // Docker runs most images, without one).
        let policy = crate::sandbox::Policy::of(&spec.task);
        let owner = match spec.task.runtime {
            RuntimeKind::Process if policy.privileged => {
                (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw())
            }
            RuntimeKind::Process | RuntimeKind::Oci => policy.host_ids(crate::sandbox::rootless_ids()),
            RuntimeKind::Docker if spec.task.user.is_some() => (policy.user.uid, policy.user.gid),
            RuntimeKind::Docker => (0, 0),
        };
        let mut binds = self.inner.volumes.prepare(id, spec, Some(owner)).await.map_err(|e| e.to_string())?;
        match self.inner.files.prepare(id, spec, owner).await {
            Ok(files) => binds.extend(files),
            Err(e) => {
                self.release(id).await;
                return Err(e.to_string());
            }
        }
        Ok(binds)
    }

    /// Makes an oci task's image present on this node, pulling it with the credentials of its
    /// `image_pull_secret` and reporting the pull's progress as the task's STARTING message.
    /// Returns what happened, for the task's running message.
    async fn pull(&self, id: &str, spec: &RunSpec) -> Result<String, String> {
        let Some(images) = &self.inner.images else {
            return Err("this agent has no image store; runtime `oci` needs one".into());
        };
        let reference = spec.task.image.as_deref().unwrap_or_default();
        let auth = match &spec.task.image_pull_secret {
            None => None,
            Some(name) => {
                let file = spec
                    .files
                    .iter()
                    .find(|f| {
                        f.kind == berth_types::spec::volume::FileKind::Secret && &f.name == name && f.target.is_empty()
                    })
                    .ok_or_else(|| {
                        format!("the image pull secret `{name}` is not in the task's files; apply the service again")
                    })?;
                let bytes = self.inner.files.contents(id, file).await.map_err(|e| e.to_string())?;
                Some(crate::image::Credentials::parse(&bytes).map_err(|e| format!("image pull secret `{name}`: {e}"))?)
            }
        };
        let sink = self.inner.sink.clone();
        let task = id.to_string();
        let pulled = std::sync::Mutex::new(None::<String>);
        let began = std::time::Instant::now();
        let progress = |message: String| {
            if message.starts_with("pulled image") {
                *pulled.lock().expect("pulled lock") = Some(message.clone());
            }
            sink.report(TaskStatus {
                task_id: task.clone(),
                state: TaskState::Starting as i32,
                message,
                timestamp_ms: now_ms(),
                ..Default::default()
            })
        };
        let held = self.inner.cluster.image_for(id);
        let source = match &held {
            // The cluster's copy first: an air-gapped node has no registry to ask.
            Some(img) => crate::image::Source::Cluster(img, &self.inner.cluster),
            None => crate::image::Source::Registry(auth.as_ref()),
        };
        let image = images.ensure_from(reference, source, &progress).await?;
        let note = match pulled.lock().expect("pulled lock").take() {
            Some(m) => format!("{m} in {:.1} s ({})", began.elapsed().as_secs_f64(), image.digest),
            None => format!("image {reference} was on the node ({})", image.digest),
        };
        Ok(note)
    }

    /// The GlusterFS volumes (`namespace/name`) the watched tasks other than `except` use.
    fn needed_volumes(&self, except: &str) -> BTreeSet<String> {
        self.inner
            .tasks
            .lock()
            .expect("tasks lock")
            .iter()
            .filter(|(id, _)| id.as_str() != except)
            .flat_map(|(_, w)| Volumes::gluster_keys(&w.spec))
            .collect()
    }

    /// The task has ended: it holds its volumes no longer (those nothing needs are unmounted).
    async fn release(&self, id: &str) {
        let needed = self.needed_volumes(id);
        self.inner.volumes.release(id, &needed).await;
    }

    /// A task that ends before it started: FAILED with `message`, and nothing of it held.
    async fn fail_before_start(&self, id: &str, message: impl Into<String>) {
        let message = message.into();
        self.inner.tasks.lock().expect("tasks lock").remove(id);
        warn!(task = %id, "could not start: {message}");
        self.inner.sink.report(self.status(id, TaskState::Failed, message));
        self.release(id).await;
    }

    /// Lets tasks join networks through `overlay` (set once, before tasks start).
    pub fn set_overlay(&self, overlay: SharedOverlay) {
        let _ = self.inner.overlay.set(overlay);
    }

    /// Puts a task on its networks: its namespace, addresses and resolv.conf, recorded in the
    /// spec for the runtime.
    ///
    /// A container's namespace is Docker's, made when the container starts: here it only gets its
    /// resolv.conf (Docker writes it from the DNS options) and [`Self::plug`] plugs the namespace
    /// once the container runs, as a CNI plugin would.
    async fn attach(&self, id: &str, spec: &mut RunSpec) -> Result<(), String> {
        if spec.networks.is_empty() {
            return Ok(());
        }
        let Some(overlay) = self.inner.overlay.get() else {
            return Err(format!(
                "the task joins networks ({}) but this agent cannot attach tasks to networks: run it as root with \
                 --advertise-addr set to this host's IPv4 address on the network between the hosts",
                spec.networks.join(", ")
            ));
        };
        // The assignment and the network view that comes with it travel separately: wait a
        // while for the view (the leader sends a node the networks of the tasks it assigns).
        let keys: Vec<String> = spec.networks.iter().map(|n| format!("{}/{n}", spec.namespace)).collect();
        let deadline = Instant::now() + NETWORK_VIEW_PATIENCE;
        loop {
            let missing: Vec<&String> = {
                let o = overlay.lock().await;
                keys.iter().filter(|k| !o.has_network(k)).collect()
            };
            if missing.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the leader has not sent network {} with an address block for this node within {:?}; is a \
                     leader reachable?",
                    missing.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "),
                    NETWORK_VIEW_PATIENCE
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if spec.task.runtime == RuntimeKind::Docker {
            let resolv_conf = overlay
                .lock()
                .await
                .resolv_conf_for(&spec.namespace, &spec.networks)
                .ok_or_else(|| format!("network {} has no address block on this node", keys[0]))?;
            spec.attachment = Some(Attachment { netns: String::new(), resolv_conf, addresses: Default::default() });
            return Ok(());
        }
        let a = overlay
            .lock()
            .await
            .attach(id, &spec.namespace, &spec.networks, &host_ports_of(spec), None)
            .await
            .map_err(|e| e.to_string())?;
        spec.attachment = Some(Attachment {
            netns: a.netns.to_string_lossy().into_owned(),
            resolv_conf: a.resolv_conf,
            addresses: a.addresses.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(),
        });
        Ok(())
    }

    /// Plugs a started container's namespace (that of its process `pid`) into its networks.
    async fn plug(&self, id: &str, spec: &mut RunSpec, pid: u32) -> Result<(), String> {
        let overlay = self.inner.overlay.get().ok_or("this agent has no overlay")?;
        let source = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let a = overlay
            .lock()
            .await
            .attach(id, &spec.namespace, &spec.networks, &host_ports_of(spec), Some(&source))
            .await
            .map_err(|e| format!("plugging the container into its networks: {e}"))?;
        if let Some(at) = spec.attachment.as_mut() {
            at.netns = a.netns.to_string_lossy().into_owned();
            at.addresses = a.addresses.iter().map(|(k, v)| (k.clone(), v.to_string())).collect();
        }
        Ok(())
    }

    fn status(&self, id: &str, state: TaskState, message: impl Into<String>) -> TaskStatus {
        TaskStatus {
            task_id: id.to_string(),
            state: state as i32,
            message: message.into(),
            timestamp_ms: now_ms(),
            ..Default::default()
        }
    }

    fn rt(&self, kind: RuntimeKind) -> Result<&dyn RuntimeCalls, String> {
        match kind {
            // Image tasks are the process runtime's, run from an image instead of the host view.
            RuntimeKind::Process | RuntimeKind::Oci => Ok(self.inner.process.as_ref()),
            RuntimeKind::Docker => self.inner.docker.as_ref().map(|d| d.as_ref()).map_err(Clone::clone),
        }
    }

    /// Stops a task and waits for it: its stop signal, SIGKILL after the grace (the watched
    /// spec's, else `grace`, else [`STOP_GRACE`]). Reports the outcome.
    pub async fn stop_now(&self, task_id: &str, grace: Option<Duration>) {
        let watched = self.inner.tasks.lock().expect("tasks lock").remove(task_id);
        let (kinds, grace): (Vec<RuntimeKind>, Duration) = match &watched {
            Some(w) => {
                w.cancel.cancel();
                (vec![w.spec.task.runtime], w.spec.task.stop_grace_period)
            }
            None => (vec![RuntimeKind::Process, RuntimeKind::Docker], grace.unwrap_or(STOP_GRACE)),
        };
        let mut found = false;
        for kind in kinds {
            let ended_before = match self.call(kind, |rt| rt.inspect(task_id)).await {
                Ok(Observed::Missing) | Err(_) => continue,
                Ok(Observed::Exited { code, .. }) => Some(code),
                Ok(Observed::Running { .. }) => None,
            };
            found = true;
            match self.call(kind, |rt| rt.stop(task_id, grace)).await {
                Ok(()) => match ended_before {
                    None => {
                        info!(task = %task_id, "stopped");
                        self.inner.sink.report(self.status(task_id, TaskState::Shutdown, "stopped"));
                    }
                    // Ended before it was asked to stop (perhaps while the agent was away): say
                    // so, or the masters keep waiting for it to stop.
                    Some(code) => {
                        let mut s =
                            self.status(task_id, TaskState::Shutdown, format!("had already ended (exit code {code})"));
                        s.exit_code = code;
                        self.inner.sink.report(s);
                    }
                },
                Err(e) => {
                    warn!(task = %task_id, "stopping failed: {e}");
                    self.inner.sink.report(self.status(task_id, TaskState::Failed, format!("stopping failed: {e}")));
                }
            }
        }
        if !found && watched.is_none() {
            // Shut down before it ever started here: say so, or the masters wait for it forever.
            self.inner.sink.report(self.status(task_id, TaskState::Shutdown, "never started on this node"));
        }
        self.release(task_id).await;
    }

    async fn call<'a, T>(
        &'a self,
        kind: RuntimeKind,
        f: impl FnOnce(&'a dyn RuntimeCalls) -> BoxFut<'a, T>,
    ) -> Result<T, String> {
        f(self.rt(kind)?).await
    }

    /// Stops at-most-once tasks once the leader has been silent for their fence timeout.
    async fn fence_loop(self) {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if Arc::strong_count(&self.inner) == 1 {
                return;
            }
            let silent = now_ms() - *self.inner.contact_ms.lock().expect("contact lock");
            let fenced: Vec<(String, RunSpec)> = self
                .inner
                .tasks
                .lock()
                .expect("tasks lock")
                .iter()
                .filter(|(_, w)| {
                    w.spec.disconnect == DisconnectPolicy::AtMostOnce && silent > w.spec.fence_timeout_ms as i64
                })
                .map(|(id, w)| (id.clone(), w.spec.clone()))
                .collect();
            for (id, spec) in fenced {
                warn!(task = %id, silent_ms = silent, "at-most-once task: no word from the leader; stopping it");
                self.halt(
                    &id,
                    &spec,
                    format!(
                        "{} stopped: no contact with the leader for {silent} ms (at-most-once)",
                        berth_types::task::FENCE_STOP_PREFIX
                    ),
                )
                .await;
            }
        }
    }

    async fn halt(&self, id: &str, spec: &RunSpec, message: String) {
        if let Some(w) = self.inner.tasks.lock().expect("tasks lock").remove(id) {
            w.cancel.cancel();
        }
        let r = self.call(spec.task.runtime, |rt| rt.stop(id, spec.task.stop_grace_period)).await;
        let mut s = self.status(id, TaskState::Failed, message);
        if let Err(e) = r {
            s.message = format!("{}; stopping failed: {e}", s.message);
        }
        self.inner.sink.report(s);
        self.release(id).await;
    }

    /// Stops a task in the background (so the caller, the session, keeps heartbeating), and
    /// with `remove` removes its files or container afterwards. One stop per task at a time: a
    /// stop asked for while one runs joins it, and a removal asked for meanwhile is done after.
    fn spawn_stop(&self, task_id: &str, grace: Option<Duration>, remove: bool) {
        {
            let mut stopping = self.inner.stopping.lock().expect("stopping lock");
            if let Some(r) = stopping.get_mut(task_id) {
                *r |= remove;
                return;
            }
            stopping.insert(task_id.to_string(), remove);
        }
        let me = self.clone();
        let id = task_id.to_string();
        tokio::spawn(async move {
            me.stop_now(&id, grace).await;
            loop {
                let remove = me.inner.stopping.lock().expect("stopping lock").get(&id).copied().unwrap_or(false);
                if remove {
                    let _ = std::fs::remove_file(me.inner.ports_dir.join(format!("{id}.json")));
                    for kind in [RuntimeKind::Process, RuntimeKind::Docker] {
                        if let Err(e) = me.call(kind, |rt| rt.remove(&id)).await {
                            tracing::debug!(task = %id, "removing: {e}");
                        }
                    }
                    // Its namespace and addresses go once nothing of it runs.
                    if let Some(o) = me.inner.overlay.get()
                        && let Err(e) = o.lock().await.detach(&id).await
                    {
                        warn!(task = %id, "releasing its network namespace: {e}");
                    }
                    // So do its secrets and configs.
                    me.inner.files.remove(&id).await;
                }
                let mut stopping = me.inner.stopping.lock().expect("stopping lock");
                // A removal asked for while this one ran without it: go round once more.
                if stopping.get(&id).copied().unwrap_or(false) == remove {
                    stopping.remove(&id);
                    return;
                }
            }
        });
    }

    /// The tasks the runtimes hold (running or ended), by runtime. A runtime that cannot be
    /// listed is left out, with a warning: nothing of it is then taken for unknown.
    async fn present(&self) -> HashMap<String, RuntimeKind> {
        let mut out = HashMap::new();
        for kind in [RuntimeKind::Process, RuntimeKind::Docker] {
            if kind == RuntimeKind::Docker && self.inner.docker.is_err() {
                continue;
            }
            match self.call(kind, |rt| rt.list()).await {
                Ok(ids) => out.extend(ids.into_iter().map(|id| (id, kind))),
                Err(e) => warn!("reconcile: listing the {kind:?} runtime's tasks failed: {e}"),
            }
        }
        out
    }

    /// Process tasks share the host's network, so each container port gets a host port: the
    /// published one when set, else a free one. The task reads it from `BERTH_PORT_<port>` (and
    /// `PORT`, for the first); health checks on a container port probe its host port. The map is
    /// kept in a file so an adopted task keeps its ports across agent restarts.
    fn host_ports(&self, id: &str, spec: &RunSpec) -> Result<HashMap<u16, u16>, String> {
        let file = self.inner.ports_dir.join(format!("{id}.json"));
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(map) = serde_json::from_str::<HashMap<u16, u16>>(&text)
        {
            return Ok(map);
        }
        let mut map = HashMap::new();
        for p in &spec.task.ports {
            let host = match p.published {
                Some(h) => h,
                None => std::net::TcpListener::bind(("0.0.0.0", 0))
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .map_err(|e| format!("no free host port for container port {}: {e}", p.container))?,
            };
            map.insert(p.container, host);
        }
        std::fs::create_dir_all(&self.inner.ports_dir)
            .and_then(|()| std::fs::write(&file, serde_json::to_vec(&map).unwrap_or_default()))
            .map_err(|e| format!("recording the task's host ports in {} failed: {e}", file.display()))?;
        Ok(map)
    }

    async fn watch(self, id: String, mut spec: RunSpec, cancel: CancellationToken) {
        let kind = spec.task.runtime;
        // What the task may want to know about itself, as Nomad's NOMAD_ALLOC_ID and friends.
        for (k, v) in [
            ("BERTH_TASK_ID", id.clone()),
            ("BERTH_SERVICE", spec.service.clone()),
            ("BERTH_NAMESPACE", spec.namespace.clone()),
            ("BERTH_SLOT", spec.slot.to_string()),
        ] {
            spec.task.env.entry(k.into()).or_insert(v);
        }
        // A task the runtime already has (an agent restart) keeps the mounts it started with:
        // it only holds its volumes again. Anything else gets them prepared now.
        let exists = matches!(
            self.call(kind, |rt| rt.inspect(&id)).await,
            Ok(Observed::Running { .. } | Observed::Exited { .. })
        );
        let binds = if exists {
            self.inner.volumes.hold(&id, &spec);
            Vec::new()
        } else {
            match self.prepare_storage(&id, &spec).await {
                Ok(b) => b,
                Err(e) => {
                    self.fail_before_start(&id, e).await;
                    return;
                }
            }
        };
        if cancel.is_cancelled() {
            // Stopped while its storage was being prepared: nothing of it runs.
            self.inner.sink.report(self.status(&id, TaskState::Shutdown, "stopped while starting"));
            self.release(&id).await;
            return;
        }
        if let Err(e) = self.attach(&id, &mut spec).await {
            self.fail_before_start(&id, e).await;
            return;
        }
        let mut addresses: HashMap<String, String> =
            spec.attachment.as_ref().map(|a| a.addresses.clone().into_iter().collect()).unwrap_or_default();
        let mut ports = HashMap::new();
        // A task on networks listens in its own namespace on its container ports; a host-network
        // process task gets free host ports instead.
        if matches!(kind, RuntimeKind::Process | RuntimeKind::Oci)
            && !spec.task.ports.is_empty()
            && spec.attachment.is_none()
        {
            match self.host_ports(&id, &spec) {
                Ok(map) => {
                    for (i, p) in spec.task.ports.iter().enumerate() {
                        let host = map.get(&p.container).copied().unwrap_or(p.container);
                        spec.task.env.insert(format!("BERTH_PORT_{}", p.container), host.to_string());
                        if i == 0 {
                            spec.task.env.entry("PORT".into()).or_insert_with(|| host.to_string());
                        }
                    }
                    ports = map;
                }
                Err(e) => {
                    self.fail_before_start(&id, e).await;
                    return;
                }
            }
        }
        let check = spec.task.health.clone().map(|mut h| {
            if let Some(x) = h.http.as_mut() {
                x.port = ports.get(&x.port).copied().unwrap_or(x.port);
            }
            if let Some(x) = h.tcp.as_mut() {
                x.port = ports.get(&x.port).copied().unwrap_or(x.port);
            }
            h
        });
        self.inner.sink.report(self.status(&id, TaskState::Starting, "starting"));
        // What the running status says: for an oci task, how its image came to be here.
        let mut running_message = "running".to_string();
        if kind == RuntimeKind::Oci {
            match self.pull(&id, &spec).await {
                Ok(note) => running_message = format!("running; {note}"),
                Err(e) => {
                    self.fail_before_start(&id, e).await;
                    return;
                }
            }
        }
        let started = std::time::Instant::now();
        let runtime = crate::metrics::RuntimeLabel { runtime: crate::metrics::runtime_name(kind) };
        if let Err(e) = self.call(kind, |rt| rt.start_with(&id, &spec, &binds)).await {
            crate::metrics::METRICS.start_failures.get_or_create(&runtime).inc();
            self.fail_before_start(&id, format!("could not start: {e}")).await;
            return;
        }
        crate::metrics::METRICS.start_seconds.get_or_create(&runtime).observe(started.elapsed().as_secs_f64());
        if kind == RuntimeKind::Docker && spec.attachment.is_some() {
            // A container that has already ended has nothing to plug: the loop below reports it.
            if let Ok(Observed::Running { pid: Some(pid), .. }) = self.call(kind, |rt| rt.inspect(&id)).await {
                if let Err(e) = self.plug(&id, &mut spec, pid).await {
                    let _ = self.call(kind, |rt| rt.stop(&id, spec.task.stop_grace_period)).await;
                    self.fail_before_start(&id, e).await;
                    return;
                }
                addresses =
                    spec.attachment.as_ref().map(|a| a.addresses.clone().into_iter().collect()).unwrap_or_default();
            }
        }
        if cancel.is_cancelled() {
            // Stopped while it was starting: `stop` found nothing to stop, so stop it here.
            let _ = self.call(kind, |rt| rt.stop(&id, spec.task.stop_grace_period)).await;
            self.inner.sink.report(self.status(&id, TaskState::Shutdown, "stopped while starting"));
            self.release(&id).await;
            return;
        }
        let started = Instant::now();
        let mut tracker = check.as_ref().map(|h| HealthTracker::new(h, started));
        let mut next_probe = started;
        let mut last: Option<(u32, TaskHealth)> = None;
        loop {
            let observed = tokio::select! {
                _ = cancel.cancelled() => return,
                o = self.call(kind, |rt| rt.inspect(&id)) => o,
            };
            match observed {
                Ok(Observed::Running { pid, .. }) => {
                    let pid = pid.unwrap_or(0);
                    if let (Some(t), Some(check)) = (tracker.as_mut(), check.as_ref())
                        && Instant::now() >= next_probe
                    {
                        next_probe = Instant::now() + check.interval;
                        // A task on networks is probed on its first address, from the host.
                        let on_network = spec
                            .attachment
                            .as_ref()
                            .and_then(|a| a.addresses.values().next())
                            .and_then(|a| a.parse::<std::net::IpAddr>().ok());
                        let addr = match on_network {
                            Some(a) => a,
                            None => self
                                .call(kind, |rt| rt.probe_addr(&id))
                                .await
                                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
                        };
                        let me = self.clone();
                        let tid = id.clone();
                        let result = crate::probe::probe(check, addr, |argv: Vec<String>, timeout| async move {
                            me.call(kind, |rt| rt.exec(&tid, &argv, timeout)).await
                        })
                        .await;
                        let label = if result.is_ok() { "success" } else { "failure" };
                        crate::metrics::METRICS
                            .probes
                            .get_or_create(&crate::metrics::ProbeLabel { result: label })
                            .inc();
                        if let Some(Health::Unhealthy) = t.record(Instant::now(), result) {
                            let why = t.last_error().unwrap_or("probe failed").to_string();
                            warn!(task = %id, "unhealthy: {why}");
                            let mut s = self.status(&id, TaskState::Failed, format!("health check failed: {why}"));
                            s.health = TaskHealth::Unhealthy as i32;
                            s.pid = pid;
                            self.inner.sink.report(s);
                            let _ = self.call(kind, |rt| rt.stop(&id, spec.task.stop_grace_period)).await;
                            self.inner.tasks.lock().expect("tasks lock").remove(&id);
                            self.release(&id).await;
                            return;
                        }
                    }
                    let health = match tracker.as_ref().map(HealthTracker::state) {
                        None => TaskHealth::Unknown,
                        Some(Health::Starting) => TaskHealth::Starting,
                        Some(Health::Healthy) => TaskHealth::Healthy,
                        Some(Health::Unhealthy) => TaskHealth::Unhealthy,
                    };
                    if last != Some((pid, health)) {
                        last = Some((pid, health));
                        let mut s = self.status(&id, TaskState::Running, running_message.clone());
                        s.pid = pid;
                        s.health = health as i32;
                        s.addresses = addresses.clone();
                        self.inner.sink.report(s);
                    }
                }
                Ok(Observed::Exited { code, message, .. }) => {
                    let (state, msg) = if code == 0 {
                        (TaskState::Complete, "exited with code 0".to_string())
                    } else if berth_types::task::is_fence_stop(&message) {
                        // The shim's fence stopped it: keep the marker first (see FENCE_STOP_PREFIX).
                        (TaskState::Failed, format!("{message} (exit code {code})"))
                    } else if message.is_empty() {
                        (TaskState::Failed, format!("exited with code {code}"))
                    } else {
                        (TaskState::Failed, format!("exited with code {code}: {message}"))
                    };
                    let mut s = self.status(&id, state, msg);
                    s.exit_code = code;
                    self.inner.sink.report(s);
                    self.inner.tasks.lock().expect("tasks lock").remove(&id);
                    self.release(&id).await;
                    return;
                }
                Ok(Observed::Missing) => {
                    self.inner.sink.report(self.status(&id, TaskState::Failed, "the task vanished from its runtime"));
                    self.inner.tasks.lock().expect("tasks lock").remove(&id);
                    self.release(&id).await;
                    return;
                }
                Err(e) => warn!(task = %id, "inspecting: {e}"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// The runtime calls the manager needs, object-safe.
trait RuntimeCalls: Send + Sync {
    fn start_with<'a>(&'a self, id: &'a str, spec: &'a RunSpec, binds: &'a [BindMount]) -> BoxFut<'a, ()>;
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFut<'a, Observed>;
    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFut<'a, ()>;
    fn remove<'a>(&'a self, id: &'a str) -> BoxFut<'a, ()>;
    fn list(&self) -> BoxFut<'_, Vec<String>>;
    fn probe_addr<'a>(&'a self, id: &'a str) -> BoxFut<'a, std::net::IpAddr>;
    fn exec<'a>(&'a self, id: &'a str, argv: &'a [String], timeout: Duration) -> BoxFut<'a, i32>;
    fn logs<'a>(&'a self, id: &'a str, q: LogQuery) -> BoxFut<'a, LogLines>;
}

type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send + 'a>>;

struct Owned<R>(R);

impl<R: Runtime> RuntimeCalls for Owned<R> {
    fn start_with<'a>(&'a self, id: &'a str, spec: &'a RunSpec, binds: &'a [BindMount]) -> BoxFut<'a, ()> {
        Box::pin(async move { self.0.start_with(id, spec, binds).await.map_err(|e| e.to_string()) })
    }
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFut<'a, Observed> {
        Box::pin(async move { self.0.inspect(id).await.map_err(|e| e.to_string()) })
    }
    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFut<'a, ()> {
        Box::pin(async move { self.0.stop(id, grace).await.map_err(|e| e.to_string()) })
    }
    fn remove<'a>(&'a self, id: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move { self.0.remove(id).await.map_err(|e| e.to_string()) })
    }
    fn list(&self) -> BoxFut<'_, Vec<String>> {
        Box::pin(async move { self.0.list().await.map_err(|e| e.to_string()) })
    }
    fn probe_addr<'a>(&'a self, id: &'a str) -> BoxFut<'a, std::net::IpAddr> {
        Box::pin(async move { self.0.probe_addr(id).await.map_err(|e| e.to_string()) })
    }
    fn exec<'a>(&'a self, id: &'a str, argv: &'a [String], timeout: Duration) -> BoxFut<'a, i32> {
        Box::pin(async move { self.0.exec(id, argv, timeout).await.map_err(|e| e.to_string()) })
    }
    fn logs<'a>(&'a self, id: &'a str, q: LogQuery) -> BoxFut<'a, LogLines> {
        Box::pin(async move { self.0.logs(id, q).await.map_err(|e| e.to_string()) })
    }
}

impl Driver for TaskManager {
    async fn start(&self, a: &Assignment) {
        self.inner.files.remember(&a.task_id, &a.files);
        let spec = match RunSpec::decode(&a.spec) {
            Ok(s) => s,
            Err(e) => {
                self.inner.sink.report(self.status(&a.task_id, TaskState::Failed, e));
                return;
            }
        };
        let cancel = CancellationToken::new();
        {
            let mut tasks = self.inner.tasks.lock().expect("tasks lock");
            if tasks.contains_key(&a.task_id) {
                return; // already watched: tasks never change in place
            }
            tasks.insert(a.task_id.clone(), Watched { cancel: cancel.clone(), spec: spec.clone() });
        }
        // An ended task stays ended: after an agent restart its exit is reported, not rerun.
        let me = self.clone();
        tokio::spawn(me.watch(a.task_id.clone(), spec, cancel));
    }

    /// Returns at once: the stop (up to the grace, then SIGKILL) runs in the background, so that
    /// the session that asked for it keeps sending heartbeats. (Awaiting it here once froze a
    /// session for the whole 10 s grace, and the masters declared the node down: found by the
    /// chaos suite.) The stop's outcome is reported through the status sink.
    async fn stop(&self, task_id: &str) {
        self.spawn_stop(task_id, None, false);
    }

    async fn forget(&self, task_id: &str) {
        self.spawn_stop(task_id, None, true);
    }

    async fn reconcile(&self, desired: &[Assignment], ended: &BTreeSet<String>, complete: bool) {
        let present = self.present().await;
        let watched: HashSet<String> = self.inner.tasks.lock().expect("tasks lock").keys().cloned().collect();
        let mut known = HashSet::new();
        let (mut started, mut stopped, mut removed) = (0usize, 0usize, 0usize);
        for a in desired {
            known.insert(a.task_id.as_str());
            if a.desired_state == TaskState::Running as i32 {
                // Ended tasks stay ended: the orchestrator replaces them with new tasks.
                if !ended.contains(&a.task_id) && !watched.contains(&a.task_id) {
                    started += 1;
                    self.start(a).await;
                }
            } else if !ended.contains(&a.task_id) || watched.contains(&a.task_id) {
                // Desired SHUTDOWN and not known to have ended: make sure it is stopped (a stop
                // cut short by an agent restart is finished here) and that its end is reported,
                // also when it never started or ended while the agent was away.
                stopped += 1;
                let grace = RunSpec::decode(&a.spec).ok().map(|s| s.task.stop_grace_period);
                self.spawn_stop(&a.task_id, grace, false);
            }
        }
        if complete {
            for id in present.keys().chain(watched.iter()) {
                if !known.contains(id.as_str()) {
                    removed += 1;
                    info!(task = %id, "reconcile: not assigned to this node; stopping and removing it");
                    self.spawn_stop(id, None, true);
                }
            }
        }
        if started + stopped + removed > 0 {
            info!(started, stopped, removed, complete, "reconciled the tasks with the desired state");
        }
        // Storage, level-triggered too: GlusterFS volumes that no task still running or about to
        // run needs are unmounted; once the set is confirmed, the secrets and configs of tasks
        // neither assigned nor present go. In the background: the session must keep heartbeating.
        let mut needed = self.needed_volumes("");
        for a in desired {
            if !ended.contains(&a.task_id)
                && let Ok(spec) = RunSpec::decode(&a.spec)
            {
                needed.extend(Volumes::gluster_keys(&spec));
            }
        }
        let keep: Option<HashSet<String>> =
            complete.then(|| known.iter().map(|k| k.to_string()).chain(present.into_keys()).chain(watched).collect());
        let me = self.clone();
        tokio::spawn(async move {
            me.inner.volumes.gc(&needed).await;
            if let Some(keep) = keep {
                me.inner.files.gc(&keep).await;
            }
        });
    }

    fn identify(&self, node_id: &str) {
        self.inner.files.set_node(node_id);
    }

    fn task_files(&self, task_id: &str, files: &[FileData]) {
        self.inner.files.remember(task_id, files);
    }

    fn volume_usage(&self) -> Option<tokio::sync::watch::Receiver<crate::volume::UsageReport>> {
        Some(self.inner.volumes.usage())
    }

    fn cluster_images(&self) -> Option<crate::image::ClusterSource> {
        self.inner.images.as_ref().map(|_| self.inner.cluster.clone())
    }

    fn leader_contact(&self) {
        let now = now_ms();
        *self.inner.contact_ms.lock().expect("contact lock") = now;
        // Best effort, and small: the process supervisors read it to enforce at-most-once.
        let tmp = self.inner.lease.with_extension("tmp");
        if std::fs::write(&tmp, now.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, &self.inner.lease);
        }
    }

    fn log_source(&self) -> Option<Arc<dyn LogSource>> {
        Some(Arc::new(self.clone()))
    }
}

impl LogSource for TaskManager {
    fn logs(
        &self,
        task_id: String,
        q: LogQuery,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<LogLines, String>> + Send + '_>> {
        Box::pin(async move {
            let kind = self.inner.tasks.lock().expect("tasks lock").get(&task_id).map(|w| w.spec.task.runtime);
            let kinds = match kind {
                Some(k) => vec![k],
                None => vec![RuntimeKind::Process, RuntimeKind::Docker],
            };
            let mut last = format!("no task {task_id} on this node");
            for k in kinds {
                let exists = matches!(
                    self.call(k, |rt| rt.inspect(&task_id)).await,
                    Ok(Observed::Running { .. } | Observed::Exited { .. })
                );
                if !exists {
                    continue;
                }
                match self.call(k, |rt| rt.logs(&task_id, q.clone())).await {
                    Ok(l) => return Ok(l),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

/// The host-mode published ports of a task on networks, which the overlay forwards into its
/// namespace. Ingress ports are the routing mesh's, which every node forwards from the leader's
/// endpoints, not from its own tasks.
fn host_ports_of(spec: &RunSpec) -> Vec<crate::overlay::node::HostPort> {
    spec.task
        .ports
        .iter()
        .filter(|p| p.published_mode(true) == Some(berth_types::spec::PortMode::Host))
        .filter_map(|p| {
            Some(crate::overlay::node::HostPort {
                protocol: match p.protocol {
                    berth_types::spec::Protocol::Tcp => "tcp".into(),
                    berth_types::spec::Protocol::Udp => "udp".into(),
                },
                published: p.published?,
                container: p.container,
            })
        })
        .collect()
}
