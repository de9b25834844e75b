//! A process task's binds (volumes, secrets, configs), made by its init in the task's own mount
//! namespace before the program starts.
//!
//! The namespace is the task's (`unshare --mount`); its mounts are made private first,
//! recursively, so nothing mounted here reaches the host or another task. Each bind is made in
//! order of its target's depth (a parent before what is mounted inside it). A missing target is
//! created first: a directory for a directory, an empty file for a file. Process tasks share the
//! host's root filesystem, so what is created stays on the host, empty (the data is only ever
//! in the bind). A read-only bind is remounted read-only keeping the flags the kernel locks
//! (nosuid, nodev, noexec, atime), as a rootless task's user namespace requires.

use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};

use crate::driver::runtime::{BindKind, BindMount};

/// The file in the task directory the init reads its binds from.
pub(crate) const MOUNTS_FILE: &str = "mounts.json";

/// What the init mounts, and where the program starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InitMounts {
    pub binds: Vec<BindMount>,
    /// The program's working directory, entered once the binds are made (it may be one of them).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
}

/// The binds in the order they are made: shallower targets first, otherwise as given.
pub(crate) fn order(binds: &[BindMount]) -> Vec<&BindMount> {
    let mut v: Vec<&BindMount> = binds.iter().collect();
    v.sort_by_key(|b| Path::new(&b.target).components().count());
    v
}

/// Makes every bind of `m` in this (the task's) mount namespace, then enters the working
/// directory. The error says which bind failed.
pub(crate) fn apply(m: &InitMounts) -> Result<(), String> {
    if !m.binds.is_empty() {
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .map_err(|e| format!("making the task's mounts private failed: {e}"))?;
    }
    for b in order(&m.binds) {
        bind(b).map_err(|e| format!("mounting {} at {} failed: {e}", b.source.display(), b.target))?;
    }
    if let Some(w) = &m.workdir {
        std::env::set_current_dir(w)
            .map_err(|e| format!("entering the working directory {} failed: {e}", w.display()))?;
    }
    Ok(())
}

fn bind(b: &BindMount) -> Result<(), String> {
    let target = Path::new(&b.target);
    make_target(target, b.kind)?;
    mount(Some(&b.source), target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| e.to_string())?;
    if b.read_only {
        let locked = rustix::fs::statvfs(target).map(|s| locked_flags(s.f_flag)).map_err(|e| e.to_string())?;
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked,
            None::<&str>,
        )
        .map_err(|e| format!("making it read-only: {e}"))?;
    }
    Ok(())
}

/// Creates a missing target as `kind`; an existing one must be of that kind.
fn make_target(target: &Path, kind: BindKind) -> Result<(), String> {
    match (std::fs::metadata(target), kind) {
        (Ok(m), BindKind::Dir) if m.is_dir() => Ok(()),
        (Ok(m), BindKind::File) if !m.is_dir() => Ok(()),
        (Ok(_), BindKind::Dir) => Err("the target exists and is not a directory; choose another target".into()),
        (Ok(_), BindKind::File) => Err("the target exists and is a directory; choose another target".into()),
        (Err(e), _) if e.kind() != ErrorKind::NotFound => Err(format!("the target cannot be read: {e}")),
        (Err(_), BindKind::Dir) => {
            std::fs::create_dir_all(target).map_err(|e| format!("creating the target directory failed: {e}"))
        }
        (Err(_), BindKind::File) => {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("creating the target's directory failed: {e}"))?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(target)
                .map(drop)
                .map_err(|e| format!("creating the target file failed: {e}"))
        }
    }
}

/// The mount flags a read-only remount must keep (the kernel refuses to drop them in a user
/// namespace that does not own the mount).
fn locked_flags(f: rustix::fs::StatVfsMountFlags) -> MsFlags {
    use rustix::fs::StatVfsMountFlags as S;
    let mut out = MsFlags::empty();
    for (s, m) in [
        (S::NOSUID, MsFlags::MS_NOSUID),
        (S::NODEV, MsFlags::MS_NODEV),
        (S::NOEXEC, MsFlags::MS_NOEXEC),
        (S::NOATIME, MsFlags::MS_NOATIME),
        (S::NODIRATIME, MsFlags::MS_NODIRATIME),
        (S::RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(s) {
            out |= m;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(target: &str, kind: BindKind) -> BindMount {
        BindMount { source: "/src".into(), target: target.into(), read_only: false, kind }
    }

    #[test]
    fn parents_are_bound_before_what_is_inside_them() {
        let binds = [b("/data/conf/app.conf", BindKind::File), b("/data", BindKind::Dir), b("/logs", BindKind::Dir)];
        let order: Vec<&str> = order(&binds).iter().map(|b| b.target.as_str()).collect();
        assert_eq!(order, ["/data", "/logs", "/data/conf/app.conf"]);
    }

    #[test]
    fn targets_are_made_as_their_kind_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        make_target(&dir, BindKind::Dir).unwrap();
        assert!(dir.is_dir());
        let file = tmp.path().join("x/y/secret");
        make_target(&file, BindKind::File).unwrap();
        assert!(file.is_file() && std::fs::read(&file).unwrap().is_empty());
        // Existing ones of the right kind are left alone; of the wrong kind, refused.
        make_target(&file, BindKind::File).unwrap();
        assert!(make_target(&file, BindKind::Dir).unwrap_err().contains("not a directory"));
        assert!(make_target(&dir, BindKind::File).unwrap_err().contains("is a directory"));
    }

    #[test]
    fn locked_flags_are_kept() {
        use rustix::fs::StatVfsMountFlags as S;
        assert_eq!(locked_flags(S::NOSUID | S::NODEV | S::RDONLY), MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(locked_flags(S::empty()), MsFlags::empty());
    }

    #[test]
    fn the_mounts_file_round_trips() {
        let m = InitMounts {
            binds: vec![BindMount {
                source: "/v".into(),
                target: "/data".into(),
                read_only: true,
                kind: BindKind::Dir,
            }],
            workdir: Some("/data".into()),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""kind":"dir""#), "{json}");
        assert_eq!(serde_json::from_str::<InitMounts>(&json).unwrap(), m);
    }
}
