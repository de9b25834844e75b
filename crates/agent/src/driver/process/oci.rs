//! How the process runtime runs a sandboxed task: through an OCI runtime (runc or crun), with a
//! bundle in the task's directory (`bundle/config.json`, from [`crate::sandbox::config`]) whose
//! root is a skeleton outside it ([`crate::sandbox::view`]).
//!
//! The shim stays the task's supervisor exactly as with `unshare`: it starts `runc run` in the
//! foreground (its child is the task's init, a static tini bound at `/dev/init`, PID 1 of the
//! task's namespace, which starts the program), copies its output, and records its exit code.
//! runc removes its container state when the task ends; `remove` deletes what a killed runc left.
//!
//! The skeleton lives under a directory every id can traverse (`/run/berth/sandbox/...` for a
//! root agent): the task's root (an unprivileged id on the host) must be able to reach it, and
//! the agent's data directory is private. Mount sources may stay private: runc opens them as
//! the host's root.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The bundle directory inside the task directory.
pub(crate) const BUNDLE: &str = "bundle";
/// The task's private `/tmp` inside the task directory.
pub(crate) const SCRATCH: &str = "tmp";
/// The task's `/etc/resolv.conf` inside the task directory (a task on networks).
pub(crate) const RESOLV: &str = "resolv.conf";

/// An image task's `/etc/hosts` inside the task directory.
pub(crate) const HOSTS: &str = "hosts";
/// What it says.
pub(crate) const HOSTS_FILE: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
/// An image task's writable layer and overlayfs's work directory, inside the task directory.
const UPPER: &str = "upper";
const WORK: &str = "work";

/// An image task's root filesystem: its image's layers under a writable layer of its own.
#[derive(Debug, Clone)]
pub(crate) struct Overlay {
    /// The image's unpacked layers, topmost first.
    pub lower: Vec<PathBuf>,
    /// Mount points the task needs in it (made by the agent, as the host's root).
    pub targets: Vec<(String, crate::driver::runtime::BindKind)>,
}

impl Overlay {
    /// Mounts the overlay at `rootfs` (upper and work directories in the task directory `dir`)
    /// and makes the mount points.
    pub fn mount(&self, rootfs: &Path, dir: &Path) -> Result<(), String> {
        let (upper, work) = (dir.join(UPPER), dir.join(WORK));
        for d in [&upper, &work] {
            fs::DirBuilder::new().mode(0o755).create(d).map_err(|e| format!("creating {} failed: {e}", d.display()))?;
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(rootfs)
            .map_err(|e| format!("creating {} failed: {e}", rootfs.display()))?;
        let lower: Vec<String> = self.lower.iter().map(|p| p.display().to_string()).collect();
        if lower.iter().any(|l| l.contains([',', ':'])) {
            return Err("an image layer's path holds ',' or ':', which overlayfs cannot take".into());
        }
        let options = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), upper.display(), work.display());
        nix::mount::mount(
            Some("overlay"),
            rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| format!("mounting the image's root (overlayfs) at {} failed: {e}", rootfs.display()))?;
        let targets: Vec<(&str, crate::driver::runtime::BindKind)> =
            self.targets.iter().map(|(t, k)| (t.as_str(), *k)).collect();
        if let Err(e) = crate::sandbox::view::make_targets(rootfs, &targets) {
            let _ = nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH);
            return Err(e);
        }
        Ok(())
    }
}

/// How the shim starts a sandboxed task: `runtime --root state run --bundle bundle id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OciLaunch {
    /// runc or crun.
    pub runtime: PathBuf,
    /// The runtime's state directory (`--root`).
    pub state: PathBuf,
    pub bundle: PathBuf,
    /// The container id: the task id.
    pub id: String,
    /// The task's root skeleton (removed with the task).
    pub rootfs: PathBuf,
}

impl OciLaunch {
    /// The arguments of the run: detached, so the runtime exits once the container runs (its
    /// init has exec'd), after writing the init's pid to [`OciLaunch::pid_file`]; the init, whose
    /// stdout and stderr are the runtime's, is then the shim's child (the shim is a subreaper).
    pub fn run_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--root".into(),
            self.state.clone().into_os_string(),
            "run".into(),
            "--detach".into(),
            "--bundle".into(),
            self.bundle.clone().into_os_string(),
            "--pid-file".into(),
            self.pid_file().into_os_string(),
            self.id.clone().into(),
        ]
    }

    /// Where the runtime writes the task's init pid (in the bundle).
    pub fn pid_file(&self) -> PathBuf {
        self.bundle.join("init.pid")
    }

    /// The arguments that run `argv` in the task, confined as the task is.
    pub fn exec_args(&self, argv: &[String], pid_file: &Path) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "--root".into(),
            self.state.clone().into_os_string(),
            "exec".into(),
            "--pid-file".into(),
            pid_file.as_os_str().to_owned(),
            self.id.clone().into(),
        ];
        v.extend(argv.iter().map(Into::into));
        v
    }

    /// The arguments that report the container's state (JSON with `status` and `pid`).
    pub fn state_args(&self) -> Vec<std::ffi::OsString> {
        vec!["--root".into(), self.state.clone().into_os_string(), "state".into(), self.id.clone().into()]
    }

    /// The arguments that forget a container runc left behind (it was killed).
    pub fn delete_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--root".into(),
            self.state.clone().into_os_string(),
            "delete".into(),
            "--force".into(),
            self.id.clone().into(),
        ]
    }
}

/// The directory under which sandboxed tasks' skeletons and the OCI runtime's state live, for
/// the tasks under `tasks_root`: `/run/berth/sandbox/<hash of tasks_root>` for a root agent
/// (each level traversable by every id, nothing listable but by root), `<tasks_root>.sandbox`
/// for a rootless one (its tasks' root is the agent's own id).
pub(crate) fn sandbox_base(tasks_root: &Path, rootless: bool) -> PathBuf {
    if rootless {
        let mut p = tasks_root.as_os_str().to_owned();
        p.push(".sandbox");
        return PathBuf::from(p);
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tasks_root.hash(&mut h);
    PathBuf::from("/run/berth/sandbox").join(format!("{:016x}", h.finish()))
}

/// Creates `dir` and its missing parents with mode 0711 (traversable, not listable), and makes
/// the existing ones under `/run/berth` traversable too.
pub(crate) fn make_traversable(dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(|e| format!("creating {} failed: {e}", dir.display()))?;
    for a in dir.ancestors().filter(|a| a.starts_with("/run/berth")) {
        let mode = fs::metadata(a).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o711);
        if mode & 0o011 != 0o011 {
            fs::set_permissions(a, fs::Permissions::from_mode(mode | 0o711))
                .map_err(|e| format!("making {} traversable failed: {e}", a.display()))?;
        }
    }
    Ok(())
}

/// Removes a task's skeleton, refusing if anything is mounted under it (it never should be:
/// every mount of the task is in its own mount namespace).
pub(crate) fn remove_rootfs(rootfs: &Path) -> Result<(), String> {
    if rootfs.components().count() < 4 {
        return Err(format!("refusing to remove {}: not a task's root skeleton", rootfs.display()));
    }
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts = crate::volume::mountinfo::parse(&text);
    // An image task's root is the overlay mounted at the skeleton's place.
    if mounts.iter().any(|m| m.mount_point == rootfs && m.fstype == "overlay") {
        nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| format!("unmounting the task's root {} failed: {e}", rootfs.display()))?;
    }
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(m) = crate::volume::mountinfo::parse(&text).iter().find(|m| m.mount_point.starts_with(rootfs)) {
        return Err(format!(
            "{} is mounted under the task's root skeleton {}; unmount it, then remove the task again",
            m.mount_point.display(),
            rootfs.display()
        ));
    }
    match fs::remove_dir_all(rootfs) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing the task's root skeleton {} failed: {e}", rootfs.display())),
    }
}

/// The `status` and `pid` of `runc state`'s output.
pub(crate) fn parse_state(json: &[u8]) -> Option<(String, u32)> {
    #[derive(Deserialize)]
    struct State {
        status: String,
        #[serde(default)]
        pid: u32,
    }
    serde_json::from_slice::<State>(json).ok().map(|s| (s.status, s.pid))
}

/// What runc said when it failed before the task ran: its `msg="..."`, unquoted.
pub(crate) fn runtime_error(stderr_line: &str) -> Option<String> {
    // Only runc's own failures to create or run the container, not a task's program that logs
    // in the same format.
    if !stderr_line.contains("level=error") || !stderr_line.contains("msg=\"runc ") {
        return None;
    }
    let start = stderr_line.find("msg=\"")? + 5;
    let rest = &stderr_line[start..];
    let end = rest.rfind('"').unwrap_or(rest.len());
    Some(rest[..end].replace("\\\"", "\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_errors_are_read() {
        let line = r#"time="2026-12-06T15:01:00Z" level=error msg="runc run failed: unable to start: error mounting \"sysfs\": operation not permitted""#;
        assert_eq!(
            runtime_error(line).unwrap(),
            r#"runc run failed: unable to start: error mounting "sysfs": operation not permitted"#
        );
        assert_eq!(runtime_error("my program said level 3"), None);
    }

    #[test]
    fn the_base_depends_on_the_tasks_root() {
        let a = sandbox_base(Path::new("/var/lib/berth/tasks"), false);
        assert!(a.starts_with("/run/berth/sandbox"));
        assert_ne!(a, sandbox_base(Path::new("/other/tasks"), false));
        assert_eq!(sandbox_base(Path::new("/home/u/tasks"), true), Path::new("/home/u/tasks.sandbox"));
    }

    #[test]
    fn args() {
        let l = OciLaunch {
            runtime: "/usr/sbin/runc".into(),
            state: "/s".into(),
            bundle: "/t/bundle".into(),
            id: "t1".into(),
            rootfs: "/r".into(),
        };
        assert_eq!(
            l.run_args(),
            ["--root", "/s", "run", "--detach", "--bundle", "/t/bundle", "--pid-file", "/t/bundle/init.pid", "t1"]
        );
        assert_eq!(
            l.exec_args(&["ls".into()], Path::new("/p")),
            ["--root", "/s", "exec", "--pid-file", "/p", "t1", "ls"]
        );
        assert_eq!(l.delete_args(), ["--root", "/s", "delete", "--force", "t1"]);
    }
}
