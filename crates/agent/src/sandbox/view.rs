//! What a process task (one without an image) sees of the host: its system directories
//! read-only, the parts of `/etc` programs need, and nothing else, as Nomad's `exec` driver's
//! chroot does. The root is an empty skeleton directory the agent makes for the task; the
//! OCI runtime binds the host's directories into it.
//!
//! The skeleton holds every mount point the task needs, made by the agent (as the host's root)
//! before the task starts, since the task's own root (an unprivileged id on the host) may not
//! create anything in it.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path};

use serde_json::Value;

use super::bind;
use crate::driver::runtime::BindKind;

/// The host's system directories a process task sees, read-only (those that exist; a symlink,
/// such as `/bin -> usr/bin` on merged-/usr systems, is copied as the symlink).
pub const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// The entries of the host's `/etc` a process task sees, read-only: users and groups, name
/// resolution, the dynamic linker's cache, time zone, TLS roots, alternatives and protocol
/// tables. Not `shadow`, SSH host keys, `sudoers` or anything else secret.
pub const ETC_ENTRIES: &[&str] = &[
    "passwd",
    "group",
    "hosts",
    "host.conf",
    "nsswitch.conf",
    "gai.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "ssl/certs",
    "ca-certificates",
    "ca-certificates.conf",
    "alternatives",
    "mime.types",
    "protocols",
    "services",
    "os-release",
    "debian_version",
];

/// The directories of the skeleton that stay empty mount points or the task's own.
const MOUNT_POINTS: &[&str] = &["proc", "dev", "sys", "tmp", "etc", "run"];

/// The skeleton root at `root` and the mounts that fill it: the system directories, `/etc`
/// entries, the task's private `/tmp` (`scratch`), and `resolv_conf` at `/etc/resolv.conf`.
/// `targets` are the task's own binds (volumes, secrets, configs): their mount points are
/// made too, and one inside a read-only system directory is refused.
pub fn build(
    root: &Path,
    scratch: &Path,
    resolv_conf: &Path,
    targets: &[(&str, BindKind)],
) -> Result<Vec<Value>, String> {
    let mkdir = |p: &Path| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
            .map_err(|e| format!("creating the task's root directory {} failed: {e}", p.display()))
    };
    mkdir(root)?;
    for d in MOUNT_POINTS {
        mkdir(&root.join(d))?;
    }
    let mut mounts = Vec::new();
    for dir in SYSTEM_DIRS {
        let host = Path::new(dir);
        let inside = root.join(&dir[1..]);
        match fs::symlink_metadata(host) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = fs::read_link(host).map_err(|e| format!("reading the symlink {dir} failed: {e}"))?;
                symlink(&to, &inside)?;
            }
            Ok(m) if m.is_dir() => {
                mkdir(&inside)?;
                mounts.push(bind(host, dir, true));
            }
            _ => {}
        }
    }
    for entry in ETC_ENTRIES {
        let host = Path::new("/etc").join(entry);
        let inside = root.join("etc").join(entry);
        let target = format!("/etc/{entry}");
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = fs::read_link(&host).map_err(|e| format!("reading the symlink {target} failed: {e}"))?;
                if let Some(parent) = inside.parent() {
                    mkdir(parent)?;
                }
                symlink(&to, &inside)?;
            }
            Ok(m) => {
                make(&inside, if m.is_dir() { BindKind::Dir } else { BindKind::File })?;
                mounts.push(bind(&host, &target, true));
            }
            Err(_) => {}
        }
    }
    make(&root.join("etc/resolv.conf"), BindKind::File)?;
    mounts.push(bind(resolv_conf, "/etc/resolv.conf", true));
    mounts.push(bind(scratch, "/tmp", false));
    for (target, kind) in targets {
        let rel = relative(target)?;
        if let Some(dir) = SYSTEM_DIRS.iter().find(|d| Path::new(target).starts_with(d)) {
            return Err(format!(
                "the mount target {target} is inside {dir}, which a process task sees read-only from the host; \
                 choose a target outside {}",
                SYSTEM_DIRS.join(", ")
            ));
        }
        if matches!(rel.components().next(), Some(Component::Normal(c)) if c == "proc" || c == "dev" || c == "sys") {
            return Err(format!("the mount target {target} is inside /proc, /dev or /sys; choose another target"));
        }
        make(&root.join(rel), *kind)?;
    }
    // The skeleton is the host root's; the task may traverse it but not change it (its root
    // is read-only too).
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("setting the permissions of {} failed: {e}", root.display()))?;
    Ok(mounts)
}

/// Makes the mount points of `targets` under an image's root `root` (for the oci runtime).
pub fn make_targets(root: &Path, targets: &[(&str, BindKind)]) -> Result<(), String> {
    for (target, kind) in targets {
        let rel = relative(target)?;
        make(&root.join(rel), *kind)?;
    }
    Ok(())
}

/// `target` without its leading `/`; refuses `..` and relative targets.
fn relative(target: &str) -> Result<&Path, String> {
    let p = Path::new(target);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("the mount target {target:?} must be an absolute path without `..`"));
    }
    Ok(p.strip_prefix("/").unwrap_or(p))
}

fn symlink(to: &Path, at: &Path) -> Result<(), String> {
    match std::os::unix::fs::symlink(to, at) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating the symlink {} -> {} failed: {e}", at.display(), to.display())),
    }
}

/// Creates a mount point of `kind` at `at` (and its parents); an existing one must have that
/// kind. A symlink on the way is refused, so a mount point never lands outside the root.
fn make(at: &Path, kind: BindKind) -> Result<(), String> {
    if let Some(parent) = at.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| format!("creating the mount point's directory {} failed: {e}", parent.display()))?;
    }
    match (fs::symlink_metadata(at), kind) {
        (Ok(m), _) if m.file_type().is_symlink() => {
            Err(format!("the mount point {} is a symlink; choose another target", at.display()))
        }
        (Ok(m), BindKind::Dir) if m.is_dir() => Ok(()),
        (Ok(m), BindKind::File) if !m.is_dir() => Ok(()),
        (Ok(_), _) => Err(format!("the mount point {} exists as another kind (file or directory)", at.display())),
        (Err(_), BindKind::Dir) => fs::DirBuilder::new()
            .mode(0o755)
            .create(at)
            .map_err(|e| format!("creating the mount point {} failed: {e}", at.display())),
        (Err(_), BindKind::File) => fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(at)
            .map(drop)
            .map_err(|e| format!("creating the mount point {} failed: {e}", at.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skeleton_holds_every_mount_point() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        let mounts = build(
            &root,
            Path::new("/scratch"),
            Path::new("/etc/resolv.conf"),
            &[("/data", BindKind::Dir), ("/run/secrets/pw", BindKind::File), ("/etc/app.conf", BindKind::File)],
        )
        .unwrap();
        assert!(root.join("data").is_dir() && root.join("run/secrets/pw").is_file());
        assert!(root.join("etc/app.conf").is_file() && root.join("tmp").is_dir());
        let targets: Vec<&str> = mounts.iter().map(|m| m["destination"].as_str().unwrap()).collect();
        assert!(targets.contains(&"/usr") && targets.contains(&"/tmp") && targets.contains(&"/etc/resolv.conf"));
        assert!(targets.contains(&"/etc/passwd"));
        assert!(!targets.iter().any(|t| t.starts_with("/root") || t.contains("shadow") || t.contains("docker")));
        // /bin is either bound or, on a merged-/usr host, the same symlink.
        assert!(targets.contains(&"/bin") || fs::symlink_metadata(root.join("bin")).unwrap().file_type().is_symlink());
        // Built twice (an agent restart mid-start) is fine.
        build(&root, Path::new("/scratch"), Path::new("/etc/resolv.conf"), &[("/data", BindKind::Dir)]).unwrap();
    }

    #[test]
    fn targets_inside_system_directories_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let r = |t: &'static str| build(&tmp.path().join("r"), Path::new("/s"), Path::new("/r"), &[(t, BindKind::Dir)]);
        assert!(r("/usr/share/app").unwrap_err().contains("read-only from the host"));
        assert!(r("/proc/x").unwrap_err().contains("/proc, /dev or /sys"));
        assert!(r("/a/../b").unwrap_err().contains("without `..`"));
    }
}
