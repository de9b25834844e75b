//! `runtime: oci` against real things: the test image pushed to a real registry
//! (`docker-registry` on loopback), pulled by the agent's image store (`oci-client`), unpacked
//! into its layer store, mounted as each task's overlayfs root and run by runc in the sandbox.
//! The runtime conformance suite and every escape attempt run here as on the process runtime.
//!
//! Needs root (overlayfs, whiteouts, runc), Docker (to push the test image), docker-registry,
//! runc and tini (`deploy/sandbox-prereqs.sh`), and cc for the static escape helpers.

mod conformance;
mod escapes;
mod registry;

use std::ffi::OsString;
use std::sync::OnceLock;

use berth_agent::driver::process::ProcessRuntime;
use berth_agent::driver::runtime::{LogStream, Runtime, RuntimeError};
use berth_agent::image::{Credentials, Images, normalize};
use berth_types::spec::{Runtime as RuntimeKind, TaskSpec};
use berth_types::task::RunSpec;
use conformance::{Cleanup, Fixture};
use tempfile::TempDir;

/// One registry for every test of this binary, with the test image pushed once.
fn registry() -> &'static (std::sync::Mutex<registry::Registry>, String) {
    static REG: OnceLock<(std::sync::Mutex<registry::Registry>, String)> = OnceLock::new();
    REG.get_or_init(|| {
        let mut reg = registry::Registry::start();
        let image = reg.push(registry::TEST_IMAGE, "berth-test/busybox:1");
        (std::sync::Mutex::new(reg), image)
    })
}

fn image() -> String {
    registry().1.clone()
}

fn spec(image: &str, argv: &[&str]) -> RunSpec {
    RunSpec::standalone("oci", TaskSpec { image: Some(image.to_string()), ..TaskSpec::new(RuntimeKind::Oci, argv) })
}

struct OciFixture {
    rt: ProcessRuntime,
    image: String,
}

impl Fixture for OciFixture {
    fn shell(&self, script: &str) -> RunSpec {
        spec(&self.image, &["/bin/busybox", "sh", "-c", script])
    }

    fn cleanup(&self, task_id: &str) {
        self.rt.force_remove_blocking(task_id);
    }
}

/// A temp root with its own image store, a runtime over it, and its fixture.
fn setup() -> (TempDir, ProcessRuntime, OciFixture) {
    let tmp = tempfile::Builder::new().prefix("berth-oci-rt-").tempdir().expect("temp dir");
    let images = Images::new(tmp.path().join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let shim: Vec<OsString> = vec![env!("CARGO_BIN_EXE_berth-task-shim").into()];
    let rt = ProcessRuntime::new(tmp.path().join("tasks"), shim).with_cgroup_parent("berth-test").with_images(images);
    let fx = OciFixture { rt: rt.clone(), image: image() };
    (tmp, rt, fx)
}

const IMAGE_TOOLS: escapes::Tools = escapes::Tools { bb: "/bin/busybox " };

// ---- pulling ----

#[tokio::test]
async fn an_image_is_pulled_stored_once_and_run() {
    berth_pki::tls::install_crypto_provider();
    let (tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let images = Images::new(tmp.path().join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let seen = std::sync::Mutex::new(Vec::<String>::new());
    let rec =
        images.ensure(&fx.image, None, &|m| seen.lock().unwrap().push(m)).await.unwrap_or_else(|e| panic!("pull: {e}"));
    let progress = seen.lock().unwrap().clone();
    assert!(progress.iter().any(|m| m.contains("layer 1/1")), "{progress:?}");
    assert!(progress.last().unwrap().starts_with("pulled image"), "{progress:?}");
    // The registry's digest is the one stored; each layer is a directory named by its digest.
    let want = registry().0.lock().unwrap().digest(&fx.image);
    assert_eq!(rec.digest, want);
    for dir in images.lower_dirs(&rec) {
        assert!(dir.join("bin/busybox").is_file(), "{}", dir.display());
    }
    // By digest: the same record, no second copy of the layer.
    let by_digest = format!("{}@{want}", fx.image.rsplit_once(':').unwrap().0);
    let again = images.ensure(&by_digest, None, &|_| {}).await.unwrap();
    assert_eq!(again.layers, rec.layers);
    assert_eq!(std::fs::read_dir(tmp.path().join("images/layers")).unwrap().count(), 1);
    // Three replicas from the one store.
    let ids: Vec<String> = (0..3).map(|i| guard.id(&format!("replica{i}"))).collect();
    for id in &ids {
        rt.start(id, &fx.shell("echo hello; exec /bin/busybox sleep 1000")).await.unwrap();
    }
    for id in &ids {
        conformance::wait_for_line(&rt, id, LogStream::Stdout, "hello").await;
        rt.stop(id, std::time::Duration::from_secs(1)).await.unwrap();
        rt.remove(id).await.unwrap();
    }
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_says_why() {
    berth_pki::tls::install_crypto_provider();
    let (tmp, _rt, fx) = setup();
    let images = Images::new(tmp.path().join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let repo = fx.image.rsplit_once(':').unwrap().0.to_string();
    // An unknown tag.
    let e = images.ensure(&format!("{repo}:no-such-tag"), None, &|_| {}).await.unwrap_err();
    assert!(e.contains("no-such-tag") && e.contains("check the image name"), "{e}");
    // A digest the registry does not have.
    let wrong = format!("{repo}@sha256:{}", "0".repeat(64));
    let e = images.ensure(&wrong, None, &|_| {}).await.unwrap_err();
    assert!(e.contains("pulling image"), "{e}");
    // A registry that is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = images.ensure(&format!("127.0.0.1:{port}/x/y:1"), None, &|_| {}).await.unwrap_err();
    assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("reachable"), "{e}");
    // Nothing half-stored.
    assert!(images.list().is_empty());
    assert_eq!(normalize("busybox").unwrap(), "docker.io/library/busybox:latest");
}

/// A registry that wants credentials: pulls with the right ones work, with none or wrong ones
/// they fail and say so.
#[tokio::test]
async fn registry_credentials_are_used_and_checked() {
    berth_pki::tls::install_crypto_provider();
    let mut reg = registry::Registry::start_with_auth("alice", "s3cret");
    let image = reg.push(registry::TEST_IMAGE, "private/busybox:1");
    let tmp = tempfile::tempdir().unwrap();
    let images = Images::new(tmp.path().join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let e = images.ensure(&image, None, &|_| {}).await.unwrap_err();
    assert!(e.contains("pulling image") && e.contains("credentials"), "{e}");
    let wrong = Credentials { username: "alice".into(), password: "guess".into() };
    let e = images.ensure(&image, Some(&wrong), &|_| {}).await.unwrap_err();
    assert!(e.contains("pulling image"), "{e}");
    let right = Credentials::parse(b"alice:s3cret").unwrap();
    let rec = images.ensure(&image, Some(&right), &|_| {}).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rec.layers.len(), 1);
}

/// An air-gapped node: the test image, saved by `docker save`, is imported into the store and
/// runs with no registry at all; a corrupt archive is refused.
#[tokio::test]
async fn an_imported_image_runs_without_a_registry() {
    berth_pki::tls::install_crypto_provider();
    registry::ensure_test_image();
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("busybox.tar");
    let saved = std::process::Command::new("docker")
        .args(["save", "-o", &archive.to_string_lossy(), registry::TEST_IMAGE])
        .status()
        .unwrap();
    assert!(saved.success());
    let images = Images::new(tmp.path().join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let refs = images.import(&archive).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refs, [normalize(registry::TEST_IMAGE).unwrap()]);
    let shim: Vec<OsString> = vec![env!("CARGO_BIN_EXE_berth-task-shim").into()];
    let rt = ProcessRuntime::new(tmp.path().join("tasks"), shim).with_cgroup_parent("berth-test").with_images(images);
    let fx = OciFixture { rt: rt.clone(), image: registry::TEST_IMAGE.into() };
    conformance::lifecycle(&rt, &fx).await;

    // One byte changed in a blob: the import says the archive is corrupt.
    let unpacked = tmp.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    tar::Archive::new(std::fs::File::open(&archive).unwrap()).unpack(&unpacked).unwrap();
    // The largest file is the layer (`blobs/sha256/<hex>` or, classic, `<id>/layer.tar`).
    let mut files = vec![];
    let mut stack = vec![unpacked.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_type().unwrap().is_file() {
                files.push((e.metadata().unwrap().len(), e.path()));
            }
        }
    }
    let blob = files.into_iter().max().unwrap().1;
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let corrupt = tmp.path().join("corrupt.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&corrupt).unwrap());
    b.append_dir_all(".", &unpacked).unwrap();
    b.finish().unwrap();
    let fresh = Images::new(tmp.path().join("images2"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let e = fresh.import(&corrupt).unwrap_err();
    assert!(e.contains("does not match its digest"), "{e}");
}

#[tokio::test]
async fn unused_images_are_collected_past_the_threshold() {
    berth_pki::tls::install_crypto_provider();
    let (tmp, _rt, fx) = setup();
    // A threshold of one byte: anything not in use goes.
    let images = Images::new(tmp.path().join("images"), Vec::new(), 1);
    let rec = images.ensure(&fx.image, None, &|_| {}).await.unwrap();
    assert_eq!(images.gc(&[rec.digest.clone()].into()), Vec::<String>::new(), "an image in use stays");
    assert!(images.get(&fx.image).is_some());
    assert_eq!(images.gc(&Default::default()), vec![rec.reference.clone()]);
    assert!(images.get(&fx.image).is_none());
    assert_eq!(std::fs::read_dir(tmp.path().join("images/layers")).unwrap().count(), 0, "its layer went too");
}

#[tokio::test]
async fn privileged_is_refused_for_oci_unless_the_agent_allows_it() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    let mut s = fx.shell("true");
    s.task.privileged = true;
    match rt.start("oci-privileged", &s).await {
        Err(RuntimeError::Invalid(m)) => assert!(m.contains("--allow-privileged"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// An image's program is looked up in the image, not on the host (nor refused for being outside
/// the host's system directories): one the image lacks fails at the OCI runtime, saying so.
#[tokio::test]
async fn an_image_program_is_looked_up_in_the_image_not_on_the_host() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("missing-program");
    match rt.start(&id, &spec(&fx.image, &["/srv/app/server", "--port", "8080"])).await {
        Err(RuntimeError::Invalid(m)) => panic!("refused against the host's view: {m}"),
        Err(e) => assert!(e.to_string().contains("/srv/app/server"), "{e}"),
        Ok(()) => {
            let (code, message) = conformance::exited(&rt, &id).await;
            assert_ne!(code, 0, "a program the image lacks cannot run: {message}");
        }
    }
}

/// The image's root-owned files belong to the task's root (host uid 1000000), so a task running
/// as root writes them as it would under Docker; the default user (65534) still cannot.
#[tokio::test]
async fn a_root_task_writes_its_images_files_and_a_default_one_cannot() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("root-writes");
    let mut s = fx.shell("echo hi > /bin/made-by-root && /bin/busybox cat /bin/made-by-root");
    s.task.user = Some("0".into());
    rt.start(&id, &s).await.unwrap();
    let (code, message) = conformance::exited(&rt, &id).await;
    assert_eq!(code, 0, "{message}");
    let id = guard.id("nobody-cannot");
    rt.start(&id, &fx.shell("echo hi > /bin/made-by-nobody")).await.unwrap();
    let (code, _) = conformance::exited(&rt, &id).await;
    assert_ne!(code, 0, "the default user cannot write the image's /bin");
}

/// With `--allow-privileged`, an image runs as Docker's `--privileged` does: host root, every
/// capability, no user namespace, no seccomp filter.
#[tokio::test]
async fn a_privileged_image_runs_as_host_root_with_every_capability() {
    berth_pki::tls::install_crypto_provider();
    let (tmp, _rt, fx) = setup();
    let images = Images::new(tmp.path().join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let fx = OciFixture {
        rt: ProcessRuntime::new(tmp.path().join("tasks-priv"), vec![env!("CARGO_BIN_EXE_berth-task-shim").into()])
            .with_cgroup_parent("berth-test")
            .with_images(images)
            .with_sandbox(true, None),
        image: fx.image.clone(),
    };
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("privileged");
    let mut s = fx.shell(
        "echo uid=$(/bin/busybox id -u); /bin/busybox grep -E '^(CapEff|Seccomp):' /proc/self/status; \
         /bin/busybox cat /proc/self/uid_map",
    );
    s.task.privileged = true;
    fx.rt.start(&id, &s).await.unwrap();
    let (code, message) = conformance::exited(&fx.rt, &id).await;
    assert_eq!(code, 0, "{message}");
    let lines = conformance::logs(&fx.rt, &id, Default::default()).await;
    let out: String = lines.iter().map(|l| format!("{}\n", l.line)).collect();
    assert!(out.contains("uid=0"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("Seccomp:") && l.ends_with('0')), "no filter: {out}");
    let cap_eff = out.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap_or_default().trim().to_string();
    let mask = u64::from_str_radix(&cap_eff, 16).unwrap_or(0);
    assert!(mask & (1 << 21) != 0 && mask & (1 << 12) != 0, "CAP_SYS_ADMIN and CAP_NET_ADMIN: {out}");
    // The identity map of a process outside any user namespace.
    assert!(out.contains("4294967295"), "{out}");
}

// ---- the conformance suite ----

macro_rules! conformance_case {
    ($name:ident, $case:ident) => {
        #[tokio::test]
        async fn $name() {
            berth_pki::tls::install_crypto_provider();
            let (_tmp, rt, fx) = setup();
            conformance::$case(&rt, &fx).await;
        }
    };
}

conformance_case!(conformance_lifecycle, lifecycle);
conformance_case!(conformance_exit_code_reported, exit_code_reported);
conformance_case!(conformance_start_is_idempotent, start_is_idempotent);
conformance_case!(conformance_stop_after_exit_is_ok, stop_after_exit_is_ok);
conformance_case!(conformance_remove_forgets, remove_forgets);
conformance_case!(conformance_follow_yields_new_lines, follow_yields_new_lines);
conformance_case!(conformance_sigterm_ignored_killed_after_grace, sigterm_ignored_killed_after_grace);

#[tokio::test]
async fn conformance_binds() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    conformance::binds(&rt, &fx, "/mnt/binds").await;
}

#[tokio::test]
async fn conformance_adoption() {
    berth_pki::tls::install_crypto_provider();
    let (tmp, rt, fx) = setup();
    let images = Images::new(tmp.path().join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD);
    let shim: Vec<OsString> = vec![env!("CARGO_BIN_EXE_berth-task-shim").into()];
    let fresh =
        ProcessRuntime::new(tmp.path().join("tasks"), shim).with_cgroup_parent("berth-test").with_images(images);
    conformance::adoption(&rt, &fresh, &fx).await;
}

#[tokio::test]
async fn exec_runs_confined_in_the_task() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    let mut guard = Cleanup::new(&fx);
    let id = guard.id("exec");
    rt.start(&id, &fx.shell("echo ready; exec /bin/busybox sleep 1000")).await.unwrap();
    conformance::wait_for_line(&rt, &id, LogStream::Stdout, "ready").await;
    let sh = |s: &str| vec!["/bin/busybox".to_string(), "sh".into(), "-c".into(), s.to_string()];
    let t = std::time::Duration::from_secs(10);
    assert_eq!(rt.exec(&id, &sh("exit 7"), t).await.unwrap(), 7);
    assert_eq!(rt.exec(&id, &sh("test \"$(/bin/busybox id -u)\" = 65534"), t).await.unwrap(), 0);
    assert_eq!(rt.exec(&id, &sh("test -x /bin/busybox && test ! -e /usr/bin/python3"), t).await.unwrap(), 0);
    rt.stop(&id, std::time::Duration::from_secs(1)).await.unwrap();
    rt.remove(&id).await.unwrap();
}

// ---- escape attempts from a default oci task ----

#[tokio::test]
async fn escape_reading_the_agents_key_and_data_fails() {
    berth_pki::tls::install_crypto_provider();
    let (tmp, rt, fx) = setup();
    escapes::cannot_read_the_agents_key_or_data(&rt, &fx, tmp.path()).await;
}

#[tokio::test]
async fn escape_by_mount_fails() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    escapes::cannot_mount(&rt, &fx, IMAGE_TOOLS).await;
}

#[tokio::test]
async fn escape_by_sysrq_fails() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    escapes::cannot_write_sysrq(&rt, &fx).await;
}

#[tokio::test]
async fn escape_to_host_processes_fails() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    escapes::cannot_see_or_signal_host_processes(&rt, &fx, IMAGE_TOOLS).await;
}

#[tokio::test]
async fn escape_by_ptrace_of_another_task_fails() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    escapes::cannot_ptrace_another_task(&rt, &fx).await;
}

#[tokio::test]
async fn escape_by_unshare_fails() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    escapes::cannot_unshare(&rt, &fx, IMAGE_TOOLS).await;
}

#[tokio::test]
async fn escape_by_setuid_binary_fails() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    escapes::a_setuid_binary_gains_nothing(&rt, &fx, IMAGE_TOOLS).await;
}

#[tokio::test]
async fn escape_by_fork_bomb_stops_at_pids_max() {
    berth_pki::tls::install_crypto_provider();
    let (_tmp, rt, fx) = setup();
    let bomb = fx.shell(&format!("cd /bin; {}", escapes::FORK_BOMB));
    escapes::a_fork_bomb_stops_at_pids_max(&rt, &fx, bomb, escapes::pids_current).await;
}
