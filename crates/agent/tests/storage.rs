//! Volumes, secrets and configs on a node: the task manager prepares them, the process runtime
//! binds them into its tasks (real mounts: loop devices, tmpfs, GlusterFS through FUSE).
//!
//! Tasks run `/bin/sh -c ...` through this crate's `berth-task-shim`. Process tasks share the
//! host's root, so every target is under the test's own directory. What needs root (sized local
//! volumes, the secrets tmpfs, GlusterFS) is skipped with a message without it; the GlusterFS
//! case also when `glusterd` (Debian `glusterfs-server`) is not installed. Every task, mount,
//! tmpfs, network namespace and server process a test makes is removed when it ends, passed or
//! failed (`Drop` guards). Tests wait on conditions, never fixed sleeps.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use berth_agent::driver::manager::StorageOptions;
use berth_agent::driver::process::ProcessRuntime;
use berth_agent::driver::runtime::{LogQuery, Observed, Runtime};
use berth_agent::driver::{Driver, StatusStream, TaskManager, status_channel};
use berth_agent::volume::{self, mountinfo};
use berth_api::pb::agent::{Assignment, FileData, TaskState, TaskStatus};
use berth_types::spec::{FileKind, Runtime as Kind, TaskSpec};
use berth_types::task::{Mount, MountSource, RunSpec, TaskFile};
use futures::StreamExt;
use tempfile::TempDir;

#[path = "../../../tests/gluster.rs"]
mod gluster;
use gluster::GlusterServer;

const PATIENCE: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn unique(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most [`PATIENCE`].
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(what: &str, mut probe: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(script: &str, mounts: Vec<Mount>, files: Vec<TaskFile>) -> RunSpec {
    let task = TaskSpec {
        stop_grace_period: Duration::from_secs(5),
        ..TaskSpec::new(Kind::Process, &["/bin/sh", "-c", script])
    };
    RunSpec { mounts, files, ..RunSpec::standalone("storage", task) }
}

fn mount(volume: &str, target: &Path, read_only: bool, source: MountSource) -> Mount {
    Mount { volume: volume.into(), target: target.to_string_lossy().into_owned(), read_only, source }
}

fn local(size: Option<u64>) -> MountSource {
    MountSource::Local { size }
}

/// One node: a data directory, a process runtime and a task manager over it, and everything to
/// clean up afterwards.
struct Node {
    dir: TempDir,
    rt: ProcessRuntime,
    mgr: Option<TaskManager>,
    statuses: StatusStream,
    seen: Vec<TaskStatus>,
    node_id: String,
    opts: StorageOptions,
    tasks: Vec<String>,
}

impl Node {
    fn new(opts: StorageOptions) -> Node {
        let dir = tempfile::Builder::new().prefix("berth-storage-").tempdir().expect("temp dir");
        let rt = ProcessRuntime::new(dir.path().join("tasks"), vec![env!("CARGO_BIN_EXE_berth-task-shim").into()])
            .with_cgroup_parent("berth-test");
        let (sink, statuses) = status_channel();
        let node_id = unique("test-node");
        let mgr = TaskManager::with_storage(
            rt.clone(),
            Err::<ProcessRuntime, _>("no docker here".into()),
            sink,
            dir.path().into(),
            opts.clone(),
        );
        mgr.identify(&node_id);
        Node { dir, rt, mgr: Some(mgr), statuses, seen: Vec::new(), node_id, opts, tasks: Vec::new() }
    }

    fn mgr(&self) -> &TaskManager {
        self.mgr.as_ref().expect("a task manager")
    }

    /// An agent restart: a new task manager over the same data directory, knowing nothing of
    /// what the previous one had in memory.
    fn restart(&mut self) {
        self.mgr = None;
        let (sink, statuses) = status_channel();
        let mgr = TaskManager::with_storage(
            self.rt.clone(),
            Err::<ProcessRuntime, _>("no docker here".into()),
            sink,
            self.dir.path().into(),
            self.opts.clone(),
        );
        mgr.identify(&self.node_id);
        self.mgr = Some(mgr);
        self.statuses = statuses;
        self.seen.clear();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Where the task's targets go (the task shares the host's root).
    fn target(&self, rel: &str) -> PathBuf {
        self.path("in-task").join(rel)
    }

    fn volume_dir(&self, name: &str) -> PathBuf {
        self.path("volumes/default").join(name)
    }

    fn id(&mut self, what: &str) -> String {
        let id = unique(what);
        self.tasks.push(id.clone());
        id
    }

    fn files_dir(&self, task: &str) -> PathBuf {
        self.mgr().files().task_dir(task).expect("the node id is known")
    }

    fn assignment(id: &str, spec: &RunSpec, files: &[(&TaskFile, &[u8])]) -> Assignment {
        Assignment {
            task_id: id.into(),
            spec: spec.encode(),
            desired_state: TaskState::Running as i32,
            files: files.iter().map(|(f, data)| FileData { id: f.id(), data: data.to_vec() }).collect(),
            image: None,
        }
    }

    async fn start(&self, id: &str, spec: &RunSpec, files: &[(&TaskFile, &[u8])]) {
        Driver::start(self.mgr(), &Self::assignment(id, spec, files)).await;
    }

    /// Waits for `state` of task `id`; returns its status.
    async fn wait(&mut self, id: &str, state: TaskState) -> TaskStatus {
        let want = state as i32;
        if let Some(s) = self.seen.iter().find(|s| s.task_id == id && s.state == want) {
            return s.clone();
        }
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let s = tokio::time::timeout_at(deadline, self.statuses.recv())
                .await
                .unwrap_or_else(|_| panic!("task {id} never reached {state:?}; seen: {:#?}", self.seen))
                .expect("the status stream ended");
            self.seen.push(s.clone());
            if s.task_id == id && s.state == want {
                return s;
            }
            let failed = s.task_id == id && s.state == TaskState::Failed as i32;
            assert!(!failed || state == TaskState::Failed, "task {id} failed: {}", s.message);
        }
    }

    async fn lines(&self, id: &str) -> Vec<String> {
        match self.rt.logs(id, LogQuery::default()).await {
            Ok(lines) => lines.map(|l| l.line).collect().await,
            Err(_) => Vec::new(),
        }
    }

    async fn wait_line(&self, id: &str, text: &str) -> Vec<String> {
        eventually(&format!("{text:?} in the output of {id}"), || async {
            let lines = self.lines(id).await;
            lines.iter().any(|l| l == text).then_some(lines)
        })
        .await
    }

    async fn pid(&self, id: &str) -> u32 {
        eventually("the task to run", || async {
            match self.rt.inspect(id).await {
                Ok(Observed::Running { pid, .. }) => pid,
                _ => None,
            }
        })
        .await
    }

    /// Removes the task (stop, then its files), as when it leaves the node's assignments.
    async fn remove(&mut self, id: &str) {
        Driver::forget(self.mgr(), id).await;
        let dir = self.rt.task_dir(id).unwrap();
        eventually("the task to be removed", || async { (!dir.exists()).then_some(()) }).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for id in &self.tasks {
            self.rt.force_remove_blocking(id);
        }
        volume::unmount_all(self.dir.path());
        if let Some(root) = self.mgr.as_ref().and_then(|m| m.files().root()).map(Path::to_path_buf) {
            volume::unmount_all(&root);
            // `<base>/<node id>/files`: the node's directory goes whole.
            if let Some(node_dir) = root.parent() {
                let _ = std::fs::remove_dir_all(node_dir);
            }
        }
    }
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() && std::fs::read(e.path()).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                hits.push(e.path());
            }
        }
    }
    hits
}

// A task writes into a local volume (a plain directory) and ends; the next task reads the data
// back; a read-only mount of it refuses writes. The data is in the volume's directory on the
// host, and its usage is measured.
#[tokio::test]
async fn a_local_volume_keeps_its_data_between_tasks() {
    let mut node = Node::new(StorageOptions::default());
    let target = node.target("data");
    let vol = |ro| vec![mount("shared", &target, ro, local(None))];
    let t = target.display();

    let writer = node.id("writer");
    node.start(&writer, &spec(&format!("echo from-the-writer > {t}/f"), vol(false), vec![]), &[]).await;
    node.wait(&writer, TaskState::Complete).await;
    let on_host = node.volume_dir("shared").join("data/f");
    assert_eq!(std::fs::read_to_string(&on_host).unwrap(), "from-the-writer\n");

    let reader = node.id("reader");
    node.start(&reader, &spec(&format!("cat {t}/f"), vol(false), vec![]), &[]).await;
    node.wait(&reader, TaskState::Complete).await;
    node.wait_line(&reader, "from-the-writer").await;

    let ro = node.id("read-only");
    let script = format!("if echo x > {t}/g 2>/dev/null; then echo writable; else echo read-only; fi");
    node.start(&ro, &spec(&script, vol(true), vec![]), &[]).await;
    node.wait(&ro, TaskState::Complete).await;
    node.wait_line(&ro, "read-only").await;
    assert!(!node.volume_dir("shared").join("data/g").exists());
    // Nothing was mounted on the host: the bind lived in the tasks' namespaces.
    assert!(!mountinfo::is_mounted(&target));

    let usage = node.mgr().volumes().measure_now().await;
    let shared = usage.iter().find(|u| u.key == "default/shared").expect("the volume's usage");
    assert!(shared.used_bytes > 0 && shared.capacity_bytes > shared.used_bytes, "{shared:?}");
}

// A local volume with `size` is a filesystem of that size: writing past it fails with ENOSPC.
// It stays mounted for the next task (and an agent restart), which sees the data.
#[tokio::test]
async fn a_sized_local_volume_refuses_writes_past_its_size() {
    if !is_root() {
        eprintln!("skipped: a sized local volume needs root (loop devices)");
        return;
    }
    let mut node = Node::new(StorageOptions::default());
    let target = node.target("data");
    let size = 16u64 << 20;
    let vol = vec![mount("sized", &target, false, local(Some(size)))];
    let t = target.display();

    let filler = node.id("filler");
    let script = format!("dd if=/dev/zero of={t}/big bs=1M count=64 2>&1; echo dd-exit=$?");
    node.start(&filler, &spec(&script, vol.clone(), vec![]), &[]).await;
    node.wait(&filler, TaskState::Complete).await;
    let lines = node.wait_line(&filler, "dd-exit=1").await;
    assert!(lines.iter().any(|l| l.contains("No space left on device")), "{lines:?}");

    let data = node.volume_dir("sized").join("data");
    let mounts = mountinfo::read().unwrap();
    let m = mountinfo::at(&mounts, &data).expect("the image is mounted at the volume's data directory");
    assert_eq!(m.fstype, "ext4");
    let image = std::fs::metadata(node.volume_dir("sized").join("image")).unwrap();
    assert_eq!(image.len(), size);
    let usage = node.mgr().volumes().measure_now().await;
    let u = usage.iter().find(|u| u.key == "default/sized").expect("the volume's usage");
    assert!(u.capacity_bytes <= size && u.capacity_bytes > size / 2, "{u:?}");
    assert!(u.used_bytes > size / 2, "{u:?}");

    // An agent restart: the mount is found and reused.
    node.restart();
    let reader = node.id("reader");
    let script = format!("test -s {t}/big && echo the-data-is-there");
    node.start(&reader, &spec(&script, vol, vec![]), &[]).await;
    node.wait(&reader, TaskState::Complete).await;
    node.wait_line(&reader, "the-data-is-there").await;
}

// A secret and a config appear at their targets with their modes and contents, read-only, from
// a tmpfs of the task's own outside the data directory; nothing of them reaches the data
// directory; once the task is removed they are gone from the host.
#[tokio::test]
async fn secrets_and_configs_are_files_of_the_task_and_go_with_it() {
    let mut node = Node::new(StorageOptions::default());
    let secret_value = format!("s3cret-{}", unique("value"));
    let config_value = "color=blue";
    let secret_at = node.target("run/secrets/db-password");
    let config_at = node.target("etc/app.conf");
    let secret = TaskFile {
        kind: FileKind::Secret,
        name: "db-password".into(),
        version: 3,
        target: secret_at.to_string_lossy().into_owned(),
        mode: 0o400,
    };
    let config = TaskFile {
        kind: FileKind::Config,
        name: "app".into(),
        version: 1,
        target: config_at.to_string_lossy().into_owned(),
        mode: 0o444,
    };
    let (s, c) = (secret_at.display(), config_at.display());
    // The task prints a digest of the secret, not the secret: its output is kept in the data
    // directory, which must not hold the secret.
    let script = format!(
        "stat -c 'secret %a %u' {s}; sha256sum < {s}; stat -c 'config %a' {c}; cat {c}; echo; \
         if echo x > {s} 2>/dev/null; then echo writable; else echo read-only; fi; echo files-ok; sleep 1000"
    );
    let id = node.id("files");
    let task = spec(&script, vec![], vec![secret.clone(), config.clone()]);
    node.start(&id, &task, &[(&secret, secret_value.as_bytes()), (&config, config_value.as_bytes())]).await;
    node.wait(&id, TaskState::Running).await;
    let lines = node.wait_line(&id, "files-ok").await;
    // A secret belongs to the task's user: nobody (65534) by default, which a rootless
    // agent's task namespace maps to the agent's own uid.
    let want_uid = 65534;
    let digest = Command::new("sh")
        .arg("-c")
        .arg(format!("printf %s '{secret_value}' | sha256sum"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap();
    for want in [format!("secret 400 {want_uid}"), digest, "config 444".into(), config_value.into()] {
        assert!(lines.contains(&want), "{want:?} not in {lines:?}");
    }
    assert!(lines.contains(&"read-only".to_string()), "{lines:?}");

    // On a tmpfs of its own, outside the data directory.
    let files = node.files_dir(&id);
    assert!(!files.starts_with(node.dir.path()));
    if is_root() {
        let mounts = mountinfo::read().unwrap();
        assert_eq!(mountinfo::at(&mounts, &files).map(|m| m.fstype.as_str()), Some("tmpfs"));
        assert!(files.starts_with(format!("/run/berth/{}", node.node_id)));
    }
    assert_eq!(files_containing(&files, secret_value.as_bytes()).len(), 1);
    assert!(files_containing(node.dir.path(), secret_value.as_bytes()).is_empty(), "the secret reached the data dir");

    node.remove(&id).await;
    eventually("the task's secrets tmpfs to go", || async { (!files.exists()).then_some(()) }).await;
    assert!(!mountinfo::is_mounted(&files));
    // What stays on the host at the target is the empty file the bind covered.
    assert_eq!(std::fs::read(&secret_at).unwrap_or_default(), b"");
    assert!(files_containing(node.dir.path(), secret_value.as_bytes()).is_empty());
}

// Contents that never came fail the task (after the patience) with a message saying so; an
// agent restart adopts a running task that has its files, without their contents in memory,
// and removing it afterwards removes them.
#[tokio::test]
async fn missing_contents_fail_the_task_and_a_restart_keeps_the_running_tasks_files() {
    let opts = StorageOptions { files_patience: Duration::from_millis(300), ..Default::default() };
    let mut node = Node::new(opts);
    let secret = TaskFile {
        kind: FileKind::Secret,
        name: "token".into(),
        version: 7,
        target: node.target("run/secrets/token").to_string_lossy().into_owned(),
        mode: 0o400,
    };
    let lonely = node.id("no-contents");
    node.start(&lonely, &spec("echo never", vec![], vec![secret.clone()]), &[]).await;
    let failed = node.wait(&lonely, TaskState::Failed).await;
    assert!(
        failed.message.contains("secret token (version 7)") && failed.message.contains("not on this node"),
        "{}",
        failed.message
    );

    let id = node.id("adopted");
    let target = node.target("data");
    let task = spec("sleep 1000", vec![mount("kept", &target, false, local(None))], vec![secret.clone()]);
    node.start(&id, &task, &[(&secret, b"t0ken")]).await;
    node.wait(&id, TaskState::Running).await;
    let pid = node.pid(&id).await;
    let files = node.files_dir(&id);

    node.restart();
    // From the stored state: the assignment, without contents.
    let stored = Node::assignment(&id, &task, &[]);
    node.mgr().reconcile(&[stored], &BTreeSet::new(), false).await;
    node.wait(&id, TaskState::Running).await;
    assert_eq!(node.pid(&id).await, pid, "adopted, not restarted");
    assert_eq!(node.mgr().volumes().held_by(&id), ["default/kept"]);
    assert_eq!(std::fs::read(files_containing(&files, b"t0ken")[0].clone()).unwrap(), b"t0ken");

    node.remove(&id).await;
    eventually("the task's secrets to go", || async { (!files.exists()).then_some(()) }).await;
    assert!(node.mgr().volumes().held_by(&id).is_empty());
}

// A host path is bound only under the agent's --allow-host-path prefixes (by whole components)
// and only when it exists; otherwise the task fails with the reason.
#[tokio::test]
async fn host_paths_are_bound_only_under_the_allowed_prefixes() {
    let tmp = tempfile::tempdir().unwrap();
    let allowed = std::fs::canonicalize(tmp.path()).unwrap().join("srv/data");
    std::fs::create_dir_all(allowed.join("app")).unwrap();
    std::fs::write(allowed.join("app/hello"), "hello from the host\n").unwrap();
    let sibling = allowed.with_file_name("data2");
    std::fs::create_dir_all(&sibling).unwrap();
    let opts = StorageOptions { allow_host_paths: vec![allowed.clone()], ..Default::default() };
    let mut node = Node::new(opts);
    let target = node.target("app");
    let host = |p: &Path| MountSource::Host { path: p.to_string_lossy().into_owned() };

    let ok = node.id("allowed");
    let script = format!("cat {}/hello", target.display());
    node.start(&ok, &spec(&script, vec![mount("app", &target, true, host(&allowed.join("app")))], vec![]), &[]).await;
    node.wait(&ok, TaskState::Complete).await;
    node.wait_line(&ok, "hello from the host").await;

    let outside = node.id("outside");
    node.start(&outside, &spec("true", vec![mount("other", &target, false, host(&sibling))], vec![]), &[]).await;
    let failed = node.wait(&outside, TaskState::Failed).await;
    let m = &failed.message;
    assert!(m.contains("volume other") && m.contains(&sibling.display().to_string()), "{m}");
    assert!(m.contains("is not under") && m.contains(&allowed.display().to_string()), "{m}");

    let missing = node.id("missing");
    let gone = allowed.join("none");
    node.start(&missing, &spec("true", vec![mount("gone", &target, false, host(&gone))], vec![]), &[]).await;
    let failed = node.wait(&missing, TaskState::Failed).await;
    assert!(failed.message.contains("does not exist"), "{}", failed.message);
}

// GlusterFS end to end on one node: the volume is mounted through FUSE when the first task that
// uses it starts, shared by tasks, and unmounted when the last one ends; the data is on the
// server. A server that refuses or never answers fails the task, in bounded time, with what
// went wrong, and leaves nothing mounted or running.
#[tokio::test]
async fn a_glusterfs_volume_is_mounted_while_tasks_use_it() {
    let Some(server) = GlusterServer::start("gv") else { return };
    let opts = StorageOptions { mount_timeout: Duration::from_secs(3), ..Default::default() };
    let mut node = Node::new(opts);
    let target = node.target("shared");
    let gluster = |servers: Vec<String>| MountSource::Glusterfs { servers, volume: "gv".into() };
    let vol = |servers| vec![mount("shared", &target, false, gluster(servers))];
    let at = node.volume_dir("shared").join("gluster");
    let t = target.display();

    let writer = node.id("writer");
    node.start(&writer, &spec(&format!("echo via-gluster > {t}/f"), vol(vec![server.addr.clone()]), vec![]), &[]).await;
    node.wait(&writer, TaskState::Complete).await;
    assert_eq!(std::fs::read_to_string(server.brick().join("f")).unwrap(), "via-gluster\n");
    eventually("the volume to be unmounted after its last task", || async {
        (!mountinfo::is_mounted(&at)).then_some(())
    })
    .await;

    // Two tasks share the mount; it goes only with the second.
    let (r1, r2) = (node.id("reader-1"), node.id("reader-2"));
    let script = format!("cat {t}/f; sleep 1000");
    for r in [&r1, &r2] {
        node.start(r, &spec(&script, vol(vec![server.addr.clone()]), vec![]), &[]).await;
        node.wait(r, TaskState::Running).await;
        node.wait_line(r, "via-gluster").await;
    }
    let mounts = mountinfo::read().unwrap();
    assert_eq!(mountinfo::at(&mounts, &at).map(|m| m.fstype.as_str()), Some("fuse.glusterfs"));
    let usage = node.mgr().volumes().measure_now().await;
    assert!(usage.iter().any(|u| u.key == "default/shared" && u.capacity_bytes > 0), "{usage:?}");
    node.remove(&r1).await;
    assert!(mountinfo::is_mounted(&at), "still used by the second reader");
    node.remove(&r2).await;
    eventually("the volume to be unmounted", || async { (!mountinfo::is_mounted(&at)).then_some(()) }).await;

    // Nothing listens there: refused at once.
    let refused = node.id("refused");
    let wrong_port = format!("{}:24099", server.addr);
    node.start(&refused, &spec("true", vol(vec![wrong_port.clone()]), vec![]), &[]).await;
    let m = node.wait(&refused, TaskState::Failed).await.message;
    assert!(m.contains(&format!("volume shared: mounting GlusterFS volume gv from {wrong_port} failed")), "{m}");
    assert!(m.contains("check that the GlusterFS servers are reachable from this node"), "{m}");

    // A server that never answers: the mount is given up after the timeout, and cleaned up.
    server.drop_packets();
    let hung = node.id("hung");
    let started = Instant::now();
    node.start(&hung, &spec("true", vol(vec![server.addr.clone()]), vec![]), &[]).await;
    let m = node.wait(&hung, TaskState::Failed).await.message;
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(m.contains("no answer within 3s"), "{m}");
    assert!(!mountinfo::is_mounted(&at), "the half-made mount is gone");
    let clients = Command::new("pgrep").args(["-f", &format!("glusterfs.*{}", at.display())]).output().unwrap();
    assert!(clients.stdout.is_empty(), "a GlusterFS client is left: {}", String::from_utf8_lossy(&clients.stdout));
}
