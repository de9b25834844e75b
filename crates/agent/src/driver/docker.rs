//! The docker runtime: one container per task, through the Docker Engine API (bollard) on the
//! local unix socket.
//!
//! - The container of task `T` is named `berth-T` and labelled `berth.task=T`, `berth.service`,
//!   `berth.namespace`, `berth.slot`, `berth.managed=true` and `berth.owner` (the agent's data
//!   directory); [`Runtime::list`] finds this agent's containers by the last two, so a new
//!   [`DockerRuntime`] (after an agent restart) adopts what the previous one started, and agents
//!   sharing a daemon never see each other's. Containers have no link to the agent process.
//! - Restart policy `no` (the orchestrator restarts tasks) and `--init` (Docker's tini as PID 1),
//!   so SIGTERM reaches the task's command even when that command is a shell, which as PID 1
//!   would ignore it.
//! - Images are never pulled when present. An absent image is pulled once; when that fails (no
//!   registry reachable) the start fails with [`RuntimeError::Invalid`] saying how to load it.
//! - `command` replaces the image's entrypoint (`Entrypoint = command`, `Cmd = args`); without a
//!   command, `args` replace the image's `Cmd`.
//! - Volumes, secrets and configs arrive as host paths ([`BindMount`]) and become bind mounts
//!   (`HostConfig.mounts`, private propagation, read-only when asked); Docker makes a missing
//!   target in the container's filesystem.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use berth_types::spec::Protocol;
use berth_types::task::RunSpec;
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig, Mount, MountBindOptions,
    MountBindOptionsPropagationEnum, MountType, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::{Stream, StreamExt};

use super::now_ms;
use super::runtime::{BindMount, LogLine, LogLines, LogQuery, LogStream, Observed, Runtime, RuntimeError};
use crate::sandbox::Policy;

/// Label holding the task id.
pub const LABEL_TASK: &str = "berth.task";
/// Label holding the service name.
pub const LABEL_SERVICE: &str = "berth.service";
/// Label holding the service namespace.
pub const LABEL_NAMESPACE: &str = "berth.namespace";
/// Label holding the replica slot.
pub const LABEL_SLOT: &str = "berth.slot";
/// Label (`true`) marking a container as berth's.
pub const LABEL_MANAGED: &str = "berth.managed";
/// Label naming the agent that created the container (its data directory), so agents sharing
/// one Docker daemon (a test host, `berth dev`) each list only their own containers.
pub const LABEL_OWNER: &str = "berth.owner";
/// Prefix of container names: `berth-<task id>`.
pub const NAME_PREFIX: &str = "berth-";

/// How long a pull may go without any progress from the daemon before it is given up.
const PULL_IDLE: Duration = Duration::from_secs(60);
/// Docker's own bound on an API call (bollard's default); `stop` raises it for long graces.
const API_TIMEOUT: Duration = Duration::from_secs(120);

/// The docker runtime. Cheap to clone (the client is shared).
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    /// [`LABEL_OWNER`] of the containers this runtime creates and lists (all berth's when None).
    owner: Option<String>,
    /// Whether `privileged: true` tasks may run (`--allow-privileged`).
    allow_privileged: bool,
    /// The node's address: published ports are bound to it rather than to every address.
    publish_ip: Option<std::net::IpAddr>,
}

impl DockerRuntime {
    /// Connects to the local daemon (`DOCKER_HOST` when it is a `unix://` address, else
    /// `/var/run/docker.sock`) and negotiates the API version with it.
    pub async fn connect() -> Result<Self, RuntimeError> {
        let socket = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| h.starts_with("unix://"))
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
        let docker = Docker::connect_with_unix_defaults().map_err(|e| unreachable(&socket, &e))?;
        Self::with_client(docker, &socket).await
    }

    /// Connects to the daemon listening on the unix socket at `path`.
    pub async fn connect_socket(path: &str) -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_unix(path, API_TIMEOUT.as_secs(), bollard::API_DEFAULT_VERSION)
            .map_err(|e| unreachable(path, &e))?;
        Self::with_client(docker, path).await
    }

    /// Wraps a connected client, after negotiating the API version (`addr` is for messages).
    pub async fn with_client(docker: Docker, addr: &str) -> Result<Self, RuntimeError> {
        let docker = docker.negotiate_version().await.map_err(|e| unreachable(addr, &e))?;
        Ok(DockerRuntime { docker, owner: None, allow_privileged: false, publish_ip: None })
    }

    /// Labels the containers it creates as `owner`'s, and lists only those: an agent's
    /// reconciliation then never takes another agent's containers on the same daemon for
    /// unknown ones. Containers created before owners existed are listed by nobody (and
    /// removed by nobody); they are still adopted by name.
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Allows `privileged: true` tasks (`--allow-privileged`).
    pub fn with_privileged(mut self, allow: bool) -> Self {
        self.allow_privileged = allow;
        self
    }

    /// Binds published ports to `ip` (the node's address) instead of every address.
    pub fn with_publish_ip(mut self, ip: Option<std::net::IpAddr>) -> Self {
        self.publish_ip = ip;
        self
    }

    /// The underlying client.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// The container name of a task: `berth-<task id>`.
    pub fn container_name(task_id: &str) -> String {
        format!("{NAME_PREFIX}{task_id}")
    }

    /// The container of a task, `None` when there is none.
    async fn find(&self, name: &str) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        match self.docker.inspect_container(name, None).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(api_error(&format!("inspecting container {name}"), e)),
        }
    }

    /// Makes sure `image` is on this node: never pulls a present image; tries one pull otherwise.
    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => return Err(api_error(&format!("inspecting image {image}"), e)),
        }
        let absent = |why: String| {
            RuntimeError::Invalid(format!(
                "image {image} is not present on this node and could not be pulled ({why}); no registry is \
                 reachable from this node: load the image onto it with `docker load -i <archive>` (made \
                 elsewhere by `docker save {image}`) or build it here with `docker build -t {image} <dir>`"
            ))
        };
        let (repo, tag) = split_reference(image);
        let mut opts = CreateImageOptionsBuilder::new().from_image(repo);
        if let Some(tag) = tag {
            opts = opts.tag(tag);
        }
        let mut pull = self.docker.create_image(Some(opts.build()), None, None);
        loop {
            match tokio::time::timeout(PULL_IDLE, pull.next()).await {
                Err(_) => return Err(absent(format!("the pull made no progress for {}s", PULL_IDLE.as_secs()))),
                Ok(None) => break,
                Ok(Some(Err(e))) if is_unavailable(&e) => {
                    return Err(api_error(&format!("pulling image {image}"), e));
                }
                Ok(Some(Err(e))) => return Err(absent(server_message(&e))),
                Ok(Some(Ok(info))) => {
                    if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                        return Err(absent(detail));
                    }
                }
            }
        }
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Err(absent("the pull ended without the image".to_string())),
            Err(e) => Err(api_error(&format!("inspecting image {image}"), e)),
        }
    }

    /// Starts a created container; a container that fails to start is removed, so the next
    /// `start` begins anew (the error says why it failed).
    async fn start_created(&self, name: &str) -> Result<(), RuntimeError> {
        match self.docker.start_container(name, None).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = self.docker.remove_container(name, Some(force_remove())).await;
                let msg = format!("starting container {name}");
                Err(match status(&e) {
                    Some(400) => RuntimeError::Invalid(format!("{msg}: {}", server_message(&e))),
                    _ => api_error(&msg, e),
                })
            }
        }
    }

    /// `start` of a task whose container exists: starts it only if it was never started.
    async fn resume(&self, task_id: &str, name: &str, c: &ContainerInspectResponse) -> Result<(), RuntimeError> {
        let labels = c.config.as_ref().and_then(|c| c.labels.as_ref());
        let ours = labels.and_then(|l| l.get(LABEL_TASK)).is_some_and(|t| t == task_id);
        if !ours {
            return Err(RuntimeError::Other(format!(
                "a container named {name} exists but berth does not manage it (no label {LABEL_TASK}={task_id}); \
                 remove it with `docker rm -f {name}`"
            )));
        }
        let state = c.state.as_ref();
        let created = state.and_then(|s| s.status) == Some(ContainerStateStatusEnum::CREATED);
        if created { self.start_created(name).await } else { Ok(()) }
    }

    /// The raw log frames of a container as lines with nanosecond timestamps.
    fn raw_lines(
        &self,
        name: &str,
        since_secs: Option<i64>,
        tail: Option<usize>,
        follow: bool,
    ) -> impl Stream<Item = RawLine> + Send + 'static {
        let mut opts = LogsOptionsBuilder::new().stdout(true).stderr(true).timestamps(true).follow(follow);
        if let Some(s) = since_secs {
            opts = opts.since(s.clamp(0, i32::MAX as i64) as i32);
        }
        let tail = tail.map(|n| n.to_string());
        if let Some(t) = &tail {
            opts = opts.tail(t);
        }
        let name = name.to_string();
        self.docker
            .logs(&name, Some(opts.build()))
            .take_while(move |item| {
                if let Err(e) = item {
                    tracing::debug!(container = %name, "log stream ended: {e}");
                }
                std::future::ready(item.is_ok())
            })
            .flat_map(|item| futures::stream::iter(item.map(frame_lines).unwrap_or_default()))
    }
}

/// One log line with its timestamp in Unix nanoseconds.
#[derive(Debug, Clone)]
struct RawLine {
    ts_ns: i64,
    stream: LogStream,
    line: String,
}

impl RawLine {
    fn into_line(self) -> LogLine {
        LogLine { ts_ms: self.ts_ns.div_euclid(1_000_000), stream: self.stream, line: self.line }
    }
}

/// Splits one log frame (`<RFC 3339 timestamp> <text>\n`) into lines.
fn frame_lines(frame: bollard::container::LogOutput) -> Vec<RawLine> {
    use bollard::container::LogOutput;
    let (stream, bytes) = match frame {
        LogOutput::StdErr { message } => (LogStream::Stderr, message),
        LogOutput::StdOut { message } | LogOutput::Console { message } => (LogStream::Stdout, message),
        LogOutput::StdIn { .. } => return Vec::new(),
    };
    let text = String::from_utf8_lossy(&bytes);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    let (ts_ns, rest) = match text.split_once(' ') {
        Some((ts, rest)) => match parse_rfc3339_ns(ts) {
            Some(ns) => (ns, rest),
            None => (now_ms() * 1_000_000, text),
        },
        None => match parse_rfc3339_ns(text) {
            // A timestamp alone: an empty line.
            Some(ns) => (ns, ""),
            None => (now_ms() * 1_000_000, text),
        },
    };
    rest.split('\n').map(|line| RawLine { ts_ns, stream, line: line.to_string() }).collect()
}

impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn start_with(&self, task_id: &str, spec: &RunSpec, binds: &[BindMount]) -> Result<(), RuntimeError> {
        check_task_id(task_id)?;
        let name = Self::container_name(task_id);
        let image = spec.task.image.as_deref().map(str::trim).filter(|i| !i.is_empty()).ok_or_else(|| {
            RuntimeError::Invalid("the docker runtime needs an image (`spec.task.image`)".to_string())
        })?;
        if let Some(c) = self.find(&name).await? {
            return self.resume(task_id, &name, &c).await;
        }
        let policy = Policy::of(&spec.task);
        policy
            .check_allowed(self.allow_privileged)
            .map_err(|e| RuntimeError::Invalid(format!("task {task_id}: {e}")))?;
        self.ensure_image(image).await?;
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let mut body = create_body(task_id, spec, image, binds, &policy, self.publish_ip);
        if let (Some(owner), Some(labels)) = (&self.owner, body.labels.as_mut()) {
            labels.insert(LABEL_OWNER.to_string(), owner.clone());
        }
        match self.docker.create_container(Some(opts), body).await {
            Ok(_) => {}
            Err(e) if status(&e) == Some(409) => {
                // Created concurrently by another start of the same task.
                return match self.find(&name).await? {
                    Some(c) => self.resume(task_id, &name, &c).await,
                    None => Err(RuntimeError::Other(format!(
                        "creating container {name}: {}; it has gone since, try again",
                        server_message(&e)
                    ))),
                };
            }
            Err(e) if status(&e) == Some(400) => {
                return Err(RuntimeError::Invalid(format!("creating container {name}: {}", server_message(&e))));
            }
            Err(e) => return Err(api_error(&format!("creating container {name}"), e)),
        }
        self.start_created(&name).await
    }

    async fn inspect(&self, task_id: &str) -> Result<Observed, RuntimeError> {
        check_task_id(task_id)?;
        let name = Self::container_name(task_id);
        let Some(c) = self.find(&name).await? else {
            return Ok(Observed::Missing);
        };
        let state = c.state.unwrap_or_default();
        if state.running == Some(true) {
            let pid = state.pid.filter(|p| *p > 0).and_then(|p| u32::try_from(p).ok());
            let started_at_ms = state.started_at.as_deref().and_then(parse_rfc3339_ms).unwrap_or(0);
            return Ok(Observed::Running { pid, started_at_ms });
        }
        let error = state.error.filter(|e| !e.is_empty());
        let never_started = state.status == Some(ContainerStateStatusEnum::CREATED);
        let finished_at_ms = state.finished_at.as_deref().and_then(parse_rfc3339_ms).filter(|ms| *ms > 0);
        let mut code = state.exit_code.unwrap_or(0).clamp(i32::MIN as i64, i32::MAX as i64) as i32;
        let message = if state.oom_killed == Some(true) {
            "killed: out of memory (the memory limit was reached)".to_string()
        } else if let Some(error) = error {
            error
        } else if never_started {
            code = -1;
            "the container was created but never started".to_string()
        } else if code == 126 {
            "exit code 126: the command could not be run (not executable?); see the task's logs".to_string()
        } else if code == 127 {
            "exit code 127: the command was not found; see the task's logs".to_string()
        } else if code > 128 && code < 128 + 65 {
            format!("killed by signal {}", code - 128)
        } else {
            format!("exited with code {code}")
        };
        Ok(Observed::Exited { code, finished_at_ms: finished_at_ms.unwrap_or_else(now_ms), message })
    }

    async fn stop(&self, task_id: &str, grace: Duration) -> Result<(), RuntimeError> {
        check_task_id(task_id)?;
        let name = Self::container_name(task_id);
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let t = i32::try_from(secs).unwrap_or(i32::MAX);
        // The daemon answers once the container has ended: after up to `grace`, then the kill.
        let docker = if Duration::from_secs(secs) + Duration::from_secs(30) > API_TIMEOUT {
            self.docker.clone().with_timeout(Duration::from_secs(secs.saturating_add(60)))
        } else {
            self.docker.clone()
        };
        match docker.stop_container(&name, Some(StopContainerOptionsBuilder::new().t(t).build())).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(api_error(&format!("stopping container {name}"), e)),
        }
    }

    async fn remove(&self, task_id: &str) -> Result<(), RuntimeError> {
        check_task_id(task_id)?;
        let name = Self::container_name(task_id);
        match self.docker.remove_container(&name, Some(force_remove())).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            // "removal of container ... is already in progress"
            Err(e) if status(&e) == Some(409) && server_message(&e).contains("in progress") => Ok(()),
            Err(e) => Err(api_error(&format!("removing container {name}"), e)),
        }
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let mut labels = vec![format!("{LABEL_MANAGED}=true")];
        if let Some(owner) = &self.owner {
            labels.push(format!("{LABEL_OWNER}={owner}"));
        }
        let filters = HashMap::from([("label", labels)]);
        let opts = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            self.docker.list_containers(Some(opts)).await.map_err(|e| api_error("listing berth's containers", e))?;
        let mut ids: Vec<String> = containers
            .into_iter()
            .filter_map(|c| c.labels.and_then(|mut l| l.remove(LABEL_TASK)))
            .filter(|id| !id.is_empty())
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    async fn logs(&self, task_id: &str, query: LogQuery) -> Result<LogLines, RuntimeError> {
        check_task_id(task_id)?;
        let name = Self::container_name(task_id);
        if self.find(&name).await?.is_none() {
            return Err(missing(task_id));
        }
        let since_ns = query.since_ms.map(|ms| ms.saturating_mul(1_000_000));
        // Docker's `since` has a resolution of a second: ask from the start of that second and
        // drop the earlier lines here.
        let since_secs = query.since_ms.map(|ms| ms.div_euclid(1000));
        let keep = move |l: &RawLine| since_ns.is_none_or(|s| l.ts_ns >= s);
        match (query.tail, since_ns) {
            (Some(n), Some(since)) => {
                // Docker applies `tail` before `since`: take the matching lines, then the last N.
                let history: Vec<RawLine> = self
                    .raw_lines(&name, since_secs, None, false)
                    .filter(|l| std::future::ready(keep(l)))
                    .collect()
                    .await;
                let mut last = VecDeque::with_capacity(n.min(4096));
                for l in history {
                    if last.len() == n {
                        last.pop_front();
                    }
                    if n > 0 {
                        last.push_back(l);
                    }
                }
                if !query.follow {
                    return Ok(Box::pin(futures::stream::iter(last.into_iter().map(RawLine::into_line))));
                }
                // Then new lines: read again from the last line's second, skipping what was seen.
                let seen = last.back().map_or(since - 1, |l| l.ts_ns);
                let live = self
                    .raw_lines(&name, Some(seen.max(since).div_euclid(1_000_000_000)), None, true)
                    .filter(move |l| std::future::ready(l.ts_ns > seen && l.ts_ns >= since));
                let history = futures::stream::iter(last);
                Ok(Box::pin(history.chain(live).map(RawLine::into_line)))
            }
            (tail, _) => Ok(Box::pin(
                self.raw_lines(&name, since_secs, tail, query.follow)
                    .filter(move |l| std::future::ready(keep(l)))
                    .map(RawLine::into_line),
            )),
        }
    }

    async fn probe_addr(&self, task_id: &str) -> Result<IpAddr, RuntimeError> {
        check_task_id(task_id)?;
        let name = Self::container_name(task_id);
        let c = self.find(&name).await?.ok_or_else(|| missing(task_id))?;
        let mode = c.host_config.as_ref().and_then(|h| h.network_mode.as_deref()).unwrap_or("");
        if mode == "host" {
            return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let mut networks: Vec<_> =
            c.network_settings.and_then(|n| n.networks).unwrap_or_default().into_iter().collect();
        // The network the container was started on first, then by name, for a stable answer.
        networks.sort_by(|a, b| (a.0 != mode, &a.0).cmp(&(b.0 != mode, &b.0)));
        networks
            .into_iter()
            .filter_map(|(_, endpoint)| endpoint.ip_address)
            .find_map(|ip| ip.parse::<IpAddr>().ok())
            .ok_or_else(|| {
                RuntimeError::Other(format!(
                    "container {name} has no IP address (it is not running, or has no network)"
                ))
            })
    }

    async fn exec(&self, task_id: &str, argv: &[String], timeout: Duration) -> Result<i32, RuntimeError> {
        check_task_id(task_id)?;
        if argv.is_empty() {
            return Err(RuntimeError::Invalid("exec needs a command".to_string()));
        }
        let name = Self::container_name(task_id);
        let config = CreateExecOptions::<String> {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(argv.to_vec()),
            ..Default::default()
        };
        let created = match self.docker.create_exec(&name, config).await {
            Ok(c) => c,
            Err(e) if status(&e) == Some(404) => return Err(missing(task_id)),
            Err(e) if status(&e) == Some(409) => {
                return Err(RuntimeError::Other(format!(
                    "exec in container {name}: the container is not running ({})",
                    server_message(&e)
                )));
            }
            Err(e) => return Err(api_error(&format!("exec in container {name}"), e)),
        };
        let id = created.id;
        let run = async {
            let start = StartExecOptions { detach: false, tty: false, output_capacity: None };
            match self.docker.start_exec(&id, Some(start)).await {
                Ok(StartExecResults::Attached { mut output, input }) => {
                    // The output ends when the command does; it is not kept.
                    while let Some(item) = output.next().await {
                        if item.is_err() {
                            break;
                        }
                    }
                    drop(input);
                }
                Ok(StartExecResults::Detached) => {}
                Err(e) => return Err(api_error(&format!("exec in container {name}"), e)),
            }
            let mut pause = Duration::from_millis(5);
            loop {
                let info = self
                    .docker
                    .inspect_exec(&id)
                    .await
                    .map_err(|e| api_error(&format!("exec in container {name}"), e))?;
                if info.running != Some(true) {
                    let code = info.exit_code.unwrap_or(-1);
                    return Ok(code.clamp(i32::MIN as i64, i32::MAX as i64) as i32);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => {
                // Docker cannot end an exec: kill its process from the host.
                let killed = match self.docker.inspect_exec(&id).await.ok().and_then(|i| i.pid) {
                    Some(pid) if pid > 0 => i32::try_from(pid).is_ok_and(kill_tree),
                    _ => false,
                };
                let what = if killed { "it was killed" } else { "it could not be killed and may still run" };
                Err(RuntimeError::Other(format!(
                    "exec `{}` in container {name} did not finish within {:?}; {what}",
                    argv.join(" "),
                    timeout
                )))
            }
        }
    }
}

/// SIGKILLs `root` (a host pid) and every descendant of it found in `/proc`; true if `root` was
/// killed.
fn kill_tree(root: i32) -> bool {
    use rustix::process::{Pid, Signal, kill_process};
    let kill = |pid: i32| Pid::from_raw(pid).is_some_and(|p| kill_process(p, Signal::KILL).is_ok());
    // Stop the tree first so nothing forks while it is walked, then kill it.
    let stop = |pid: i32| Pid::from_raw(pid).is_some_and(|p| kill_process(p, Signal::STOP).is_ok());
    let tree = descendants(root);
    stop(root);
    tree.iter().for_each(|p| {
        stop(*p);
    });
    let tree = descendants(root);
    let killed = kill(root);
    tree.iter().for_each(|p| {
        kill(*p);
    });
    killed
}

/// The pids descending from `root`, from `/proc/<pid>/stat`.
fn descendants(root: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut parent = HashMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses; the last `)` ends it.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, pp) in &parent {
            if *pp == p && !found.contains(child) && *child != root {
                found.push(*child);
                frontier.push(*child);
            }
        }
    }
    found
}

/// The container to create for a task.
fn create_body(
    task_id: &str,
    spec: &RunSpec,
    image: &str,
    binds: &[BindMount],
    policy: &Policy,
    publish_ip: Option<std::net::IpAddr>,
) -> ContainerCreateBody {
    let task = &spec.task;
    let labels = HashMap::from([
        (LABEL_TASK.to_string(), task_id.to_string()),
        (LABEL_SERVICE.to_string(), spec.service.clone()),
        (LABEL_NAMESPACE.to_string(), spec.namespace.clone()),
        (LABEL_SLOT.to_string(), spec.slot.to_string()),
        (LABEL_MANAGED.to_string(), "true".to_string()),
    ]);
    let (entrypoint, cmd) = if task.command.is_empty() {
        (None, (!task.args.is_empty()).then(|| task.args.clone()))
    } else {
        (Some(task.command.clone()), Some(task.args.clone()))
    };
    let env: Vec<String> = task.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in &task.ports {
        let proto = match port.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let key = format!("{}/{proto}", port.container);
        if !exposed.contains(&key) {
            exposed.push(key.clone());
        }
        if let Some(host) = port.published {
            bindings
                .entry(key)
                .or_default()
                .get_or_insert_with(Vec::new)
                .push(PortBinding { host_ip: publish_ip.map(|ip| ip.to_string()), host_port: Some(host.to_string()) });
        }
    }
    // A task on networks starts in a namespace of its own with only loopback; the agent plugs it
    // into its networks once it runs, and forwards its published ports itself. Docker writes
    // its resolv.conf from these options (the node's DNS).
    let network_mode = spec.attachment.as_ref().map(|_| "none".to_string());
    let dns = spec.attachment.as_ref().map(|a| resolver_options(&a.resolv_conf));
    if network_mode.is_some() {
        bindings.clear();
    }
    let limits = task.resources.limits.as_ref();
    let nano_cpus =
        limits.and_then(|l| l.cpu).map(|c| i64::try_from(c.millis().saturating_mul(1_000_000)).unwrap_or(i64::MAX));
    let memory = limits.and_then(|l| l.memory).map(|m| i64::try_from(m.bytes()).unwrap_or(i64::MAX));
    let mounts: Vec<Mount> = binds
        .iter()
        .map(|b| Mount {
            target: Some(b.target.clone()),
            source: Some(b.source.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(b.read_only),
            bind_options: Some(MountBindOptions {
                propagation: Some(MountBindOptionsPropagationEnum::RPRIVATE),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    ContainerCreateBody {
        image: Some(image.to_string()),
        entrypoint,
        cmd,
        env: (!env.is_empty()).then_some(env),
        working_dir: task.workdir.clone().filter(|w| !w.is_empty()),
        // The image's user unless the spec names one (Docker has no user namespace by default,
        // so uid 0 here is the host's root: the capabilities and no-new-privileges bound it).
        user: task.user.clone(),
        labels: Some(labels),
        // `docker stop` sends this, then SIGKILL after the grace the agent passes.
        stop_signal: task.stop_signal.as_ref().map(|_| task.stop_signal_number().to_string()),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(HostConfig {
            nano_cpus,
            memory,
            // No swap beyond the memory limit (ignored, with a warning, where swap is not limited).
            memory_swap: memory,
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
            init: Some(true),
            network_mode,
            dns: dns.as_ref().map(|d| d.nameservers.clone()),
            dns_search: dns.as_ref().map(|d| d.search.clone()),
            dns_options: dns.as_ref().map(|d| d.options.clone()),
            mounts: (!mounts.is_empty()).then_some(mounts),
            // The sandbox policy in Docker's terms: no new privileges, exactly the policy's
            // capabilities, a pids limit. Docker's own seccomp profile and namespaces apply.
            privileged: policy.privileged.then_some(true),
            security_opt: (!policy.privileged).then(|| vec!["no-new-privileges".to_string()]),
            cap_drop: (!policy.privileged).then(|| vec!["ALL".to_string()]),
            cap_add: (!policy.privileged).then(|| policy.caps.iter().map(|c| format!("CAP_{c}")).collect()),
            pids_limit: Some(i64::from(policy.pids_max)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A resolv.conf's settings, as Docker's `--dns`, `--dns-search` and `--dns-option`.
#[derive(Debug, Default, PartialEq, Eq)]
struct ResolverOptions {
    nameservers: Vec<String>,
    search: Vec<String>,
    options: Vec<String>,
}

fn resolver_options(resolv_conf: &str) -> ResolverOptions {
    let mut out = ResolverOptions::default();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => out.nameservers.extend(words.map(str::to_string)),
            Some("search") => out.search.extend(words.map(str::to_string)),
            Some("options") => out.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    out
}

fn force_remove() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::new().force(true).v(true).build()
}

/// Task ids become container names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn check_task_id(task_id: &str) -> Result<(), RuntimeError> {
    let ok = task_id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && task_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && task_id.len() <= 200;
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "task id {task_id:?} cannot name a container (letters, digits, `_`, `.` and `-` only, starting with \
             a letter or digit)"
        )))
    }
}

fn missing(task_id: &str) -> RuntimeError {
    RuntimeError::Other(format!("task {task_id} has no container on this node ({NAME_PREFIX}{task_id})"))
}

/// `repo[:tag]` or `repo@digest` -> (what to pull, tag). A digest stays in the reference.
fn split_reference(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => (&image[..slash + i], Some(&image[slash + i + 1..])),
        None => (image, Some("latest")),
    }
}

/// The HTTP status of a daemon's error answer.
fn status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The daemon's message, or the error itself.
fn server_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        other => other.to_string(),
    }
}

/// Errors that mean the daemon could not be reached or did not answer.
fn is_unavailable(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::IOError { .. }
            | DockerError::HyperLegacyError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::SocketNotFoundError(_)
            | DockerError::RequestTimeoutError
    )
}

fn unreachable(addr: &str, e: &DockerError) -> RuntimeError {
    RuntimeError::Unavailable(format!(
        "the Docker daemon is unreachable at {addr}: {e}; start it (`systemctl start docker`), or point \
         DOCKER_HOST at its unix socket, and check that this user may use the socket"
    ))
}

fn api_error(context: &str, e: DockerError) -> RuntimeError {
    if is_unavailable(&e) {
        return RuntimeError::Unavailable(format!(
            "{context}: the Docker daemon did not answer ({e}); check that dockerd is running"
        ));
    }
    match &e {
        DockerError::DockerResponseServerError { status_code, message } => {
            RuntimeError::Other(format!("{context}: {} (Docker API status {status_code})", message.trim()))
        }
        other => RuntimeError::Other(format!("{context}: {other}")),
    }
}

/// Unix milliseconds of an RFC 3339 timestamp (`None` for Docker's zero time, year 1).
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let ns = parse_rfc3339_ns(s)?;
    (ns > 0).then(|| ns.div_euclid(1_000_000))
}

/// Unix nanoseconds of an RFC 3339 timestamp such as `2024-05-01T10:00:00.123456789Z` or
/// `...+02:00`. Dates before 1970 come out negative; dates past 2262 saturate.
fn parse_rfc3339_ns(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) { part.parse().ok() } else { None }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start).min(9)..9 {
            nanos *= 10;
        }
    }
    let offset_secs = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let secs = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' { secs } else { -secs }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolver_options_from_the_generated_resolv_conf() {
        let text = crate::overlay::dns::resolv_conf(Ipv4Addr::new(198, 18, 0, 1), "shop", "berth.internal");
        let o = resolver_options(&text);
        assert_eq!(o.nameservers, ["198.18.0.1"]);
        assert_eq!(o.search, ["shop.svc.berth.internal", "svc.berth.internal", "berth.internal"]);
        assert_eq!(o.options.len(), 1);
        assert!(o.options[0].starts_with("ndots:"), "{:?}", o.options);
    }

    #[test]
    fn rfc3339_timestamps() {
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
        assert_eq!(parse_rfc3339_ns("2024-05-01T10:00:00.123456789Z"), Some(1_714_557_600_123_456_789));
        assert_eq!(parse_rfc3339_ns("2024-05-01T12:00:00.123456789+02:00"), Some(1_714_557_600_123_456_789));
        assert_eq!(parse_rfc3339_ns("2024-05-01T08:30:00-01:30"), Some(1_714_557_600_000_000_000));
        assert_eq!(parse_rfc3339_ms("2000-02-29T00:00:00.0009Z"), Some(951_782_400_000));
        assert_eq!(parse_rfc3339_ms("0001-01-01T00:00:00Z"), None);
        for bad in ["", "2024-05-01", "2024-13-01T00:00:00Z", "2024-05-01T00:00:00", "2024-05-01T00:00:00.Z", "x"] {
            assert_eq!(parse_rfc3339_ns(bad), None, "{bad}");
        }
    }

    #[test]
    fn log_frames_become_lines() {
        use bollard::container::LogOutput;
        let frame = LogOutput::StdErr { message: "2024-05-01T10:00:00.5Z hello world\n".into() };
        let lines = frame_lines(frame);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].ts_ns, 1_714_557_600_500_000_000);
        assert_eq!(lines[0].stream, LogStream::Stderr);
        assert_eq!(lines[0].line, "hello world");
        let empty = frame_lines(LogOutput::StdOut { message: "2024-05-01T10:00:00Z \n".into() });
        assert_eq!(empty[0].line, "");
    }

    #[test]
    fn image_references() {
        assert_eq!(split_reference("busybox"), ("busybox", Some("latest")));
        assert_eq!(split_reference("berth-test/busybox:1"), ("berth-test/busybox", Some("1")));
        assert_eq!(split_reference("localhost:5000/app"), ("localhost:5000/app", Some("latest")));
        assert_eq!(split_reference("localhost:5000/app:v2"), ("localhost:5000/app", Some("v2")));
        assert_eq!(split_reference("app@sha256:abc"), ("app@sha256:abc", None));
    }

    #[test]
    fn task_ids_must_name_containers() {
        assert!(check_task_id("0f3a-b_c.d").is_ok());
        assert!(check_task_id("").is_err());
        assert!(check_task_id("-x").is_err());
        assert!(check_task_id("a/b").is_err());
    }
}
