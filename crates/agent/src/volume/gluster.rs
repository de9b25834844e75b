//! `driver: glusterfs` volumes: mounted through the FUSE client (`mount -t glusterfs`) at
//! `<volumes dir>/<namespace>/<name>/gluster` when the first task on the node that uses the
//! volume starts, and unmounted (by [`super::Volumes::gc`]) once no task on the node needs it.
//!
//! The mount helper can hang for a long time on a server that drops packets (42 s measured
//! here): it runs under a time bound, and on a timeout its process group is killed, the
//! half-made FUSE mount detached and the client daemon (which detaches itself from the helper)
//! killed, so nothing is left behind. The client's log goes to `gluster.log` beside the mount
//! point; its errors end up in the task's status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::command::{self, Ran};
use super::{StorageError, mountinfo};

/// The mount point's name in the volume's directory.
pub(crate) const MOUNT_DIR: &str = "gluster";
/// The FUSE client's log, beside the mount point.
pub(crate) const LOG: &str = "gluster.log";
/// The filesystem type of a GlusterFS FUSE mount in mountinfo.
pub(crate) const FSTYPE: &str = "fuse.glusterfs";
/// How long a mounted volume may take to answer `statvfs` before it is taken for dead.
const ALIVE_PATIENCE: Duration = Duration::from_secs(5);

/// Mounts `servers`' volume `gluster_volume` at `dir`, or reuses the mount already there when it
/// is the same volume and answers.
pub(crate) async fn mount(
    volume: &str,
    servers: &[String],
    gluster_volume: &str,
    dir: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(), StorageError> {
    let fail = |detail: String| StorageError::Gluster {
        volume: volume.to_string(),
        gluster_volume: gluster_volume.to_string(),
        servers: servers.join(", "),
        detail,
    };
    if !rustix::process::geteuid().is_root() {
        return Err(StorageError::NeedsRoot {
            volume: volume.to_string(),
            what: "a GlusterFS volume needs an agent running as root (FUSE mounts)",
        });
    }
    if !["/sbin/mount.glusterfs", "/usr/sbin/mount.glusterfs"].iter().any(|p| Path::new(p).exists()) {
        return Err(StorageError::NoGlusterClient { volume: volume.to_string() });
    }
    let (first, args) = mount_args(servers, gluster_volume, log).map_err(&fail)?;
    let mounts = mountinfo::read().map_err(|e| StorageError::io("reading", "/proc/self/mountinfo", e))?;
    if let Some(m) = mountinfo::at(&mounts, dir) {
        if m.fstype == FSTYPE && m.source == first && alive(dir).await {
            return Ok(());
        }
        warn!(volume, dir = %dir.display(), source = %m.source, "replacing a GlusterFS mount that is stale or of another volume");
        detach(dir).await;
    }
    std::fs::create_dir_all(dir).map_err(|e| StorageError::io("creating the mount point", dir, e))?;
    let _ = std::fs::remove_file(log); // its errors are this attempt's
    let dir_s = dir.to_string_lossy().into_owned();
    let mut argv: Vec<&str> = vec!["-t", "glusterfs"];
    argv.extend(args.iter().map(String::as_str));
    argv.push(&first);
    argv.push(&dir_s);
    let t = std::time::Instant::now();
    let ran = command::run("mount", &argv, timeout).await.map_err(&fail)?;
    let why = match ran {
        Ran::Ok if mountinfo::is_mounted(dir) => {
            info!(volume, source = %first, dir = %dir.display(), took_ms = t.elapsed().as_millis() as u64, "mounted the GlusterFS volume");
            return Ok(());
        }
        Ran::Ok => "the mount helper succeeded but nothing is mounted".to_string(),
        r @ Ran::Failed { .. } => r.said(),
        Ran::TimedOut { .. } => format!("no answer within {timeout:?}"),
    };
    detach(dir).await;
    let log_says = log_errors(log);
    Err(fail(if log_says.is_empty() { why } else { format!("{why} ({log_says})") }))
}

/// The `mount` arguments before the source and mount point, and the source
/// (`server:/volume`). Backup servers and a port, when the servers give one, become options; a
/// port must be the same for all (the client takes one).
pub(crate) fn mount_args(
    servers: &[String],
    gluster_volume: &str,
    log: &Path,
) -> Result<(String, Vec<String>), String> {
    let mut hosts = Vec::new();
    let mut port: Option<&str> = None;
    for s in servers {
        let (host, p) = split_port(s);
        if let Some(p) = p {
            match port {
                Some(q) if q != p => {
                    return Err(format!(
                        "the servers name different ports ({q} and {p}); the GlusterFS client takes one port for all"
                    ));
                }
                _ => port = Some(p),
            }
        }
        hosts.push(host);
    }
    let Some((first, backups)) = hosts.split_first() else {
        return Err("the volume names no servers".into());
    };
    let mut opts = vec![format!("log-file={}", log.display())];
    if !backups.is_empty() {
        opts.push(format!("backup-volfile-servers={}", backups.join(":")));
    }
    if let Some(p) = port {
        opts.push(format!("server-port={p}"));
    }
    Ok((format!("{first}:/{gluster_volume}"), vec!["-o".into(), opts.join(",")]))
}

/// `host:port` into its parts (an IPv6 address without brackets has no port).
fn split_port(server: &str) -> (&str, Option<&str>) {
    match server.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (server, None),
    }
}

/// Whether the mount at `dir` answers `statvfs` in time (a dead client answers ENOTCONN, a
/// hung server not at all).
pub(crate) async fn alive(dir: &Path) -> bool {
    let d = dir.to_path_buf();
    let probe = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&d).is_ok());
    matches!(tokio::time::timeout(ALIVE_PATIENCE, probe).await, Ok(Ok(true)))
}

/// Detaches whatever is mounted at `dir` and kills the FUSE client serving it (it detaches
/// itself from the mount helper, so killing the helper does not reach it).
pub(crate) async fn detach(dir: &Path) {
    let d = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        while mountinfo::is_mounted(&d) {
            if nix::mount::umount2(&d, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
        for pid in clients_of(&d) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    })
    .await;
}

/// Unmounts the volume at `dir`; lazily when it is busy (a task's mount namespace may still
/// hold it: the client then ends once that is gone too).
pub(crate) async fn unmount(dir: &Path) -> Result<(), String> {
    let d = dir.to_path_buf();
    let unmounting = tokio::task::spawn_blocking(move || super::unmount(&d));
    match tokio::time::timeout(Duration::from_secs(10), unmounting).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("unmounting did not finish in time".into()),
    }
}

/// Processes that are GlusterFS clients mounted at `dir` (their last argument).
pub(crate) fn clients_of(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let want = dir.as_os_str().as_encoded_bytes();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
            args.first().is_some_and(|a| a.ends_with(b"glusterfs")) && args.last().is_some_and(|a| *a == want)
        })
        .collect()
}

/// The client log's error lines (and the lines saying which server it lost), last three, without
/// timestamps and source positions.
pub(crate) fn log_errors(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else { return String::new() };
    let lines: Vec<String> = text
        .lines()
        .filter(|l| {
            l.contains("] E [") || l.contains("] C [") || l.contains("remote-host") || l.contains("Exhausted all")
        })
        .map(|l| {
            // "[time] E [file.c:12:func] 0-xlator: message" -> "message"
            let rest = l.splitn(3, "] ").nth(2).unwrap_or(l);
            rest.split_once(": ").map_or(rest, |(_, m)| m).trim().to_string()
        })
        .collect();
    let mut last: Vec<String> = Vec::new();
    for l in lines.into_iter().rev() {
        if !last.contains(&l) {
            last.push(l);
        }
        if last.len() == 3 {
            break;
        }
    }
    last.reverse();
    last.join("; ")
}

/// The mount points of this node's GlusterFS volumes under `root`, by `namespace/name`.
pub(crate) fn mounted_under(root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(mounts) = mountinfo::read() else { return Vec::new() };
    mounts
        .into_iter()
        .filter(|m| m.fstype == FSTYPE)
        .filter_map(|m| {
            let rel = m.mount_point.strip_prefix(root).ok()?;
            let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
            match parts.as_slice() {
                [ns, name, last] if *last == MOUNT_DIR => Some((format!("{ns}/{name}"), m.mount_point.clone())),
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_arguments() {
        let log = Path::new("/v/gluster.log");
        let (src, args) = mount_args(&["g1".into()], "gv", log).unwrap();
        assert_eq!(src, "g1:/gv");
        assert_eq!(args, ["-o", "log-file=/v/gluster.log"]);
        let (src, args) = mount_args(&["198.18.0.7:24007".into(), "g2".into(), "g3:24007".into()], "gv", log).unwrap();
        assert_eq!(src, "198.18.0.7:/gv");
        assert_eq!(args[1], "log-file=/v/gluster.log,backup-volfile-servers=g2:g3,server-port=24007");
        let e = mount_args(&["a:1".into(), "b:2".into()], "gv", log).unwrap_err();
        assert!(e.contains("different ports"), "{e}");
        assert_eq!(split_port("fe80::1"), ("fe80::1", None));
    }

    #[test]
    fn the_log_says_why_in_a_few_words() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("g.log");
        std::fs::write(
            &log,
            "[2026-12-06 12:29:37.707329 +0000] I [MSGID: 100030] [glusterfsd.c:2767:main] 0-/usr/sbin/glusterfs: Started\n\
             [2026-12-06 12:29:37.717301 +0000] I [glusterfsd-mgmt.c:2673:mgmt_rpc_notify] 0-glusterfsd-mgmt: disconnected from remote-host: 198.18.77.7\n\
             [2026-12-06 12:29:37.717309 +0000] I [glusterfsd-mgmt.c:2712:mgmt_rpc_notify] 0-glusterfsd-mgmt: Exhausted all volfile servers\n\
             [2026-12-06 12:29:37.717534 +0000] W [glusterfsd.c:1458:cleanup_and_exit] 0-: received signum (1), shutting down\n",
        )
        .unwrap();
        assert_eq!(log_errors(&log), "disconnected from remote-host: 198.18.77.7; Exhausted all volfile servers");
        std::fs::write(
            &log,
            "[2026-12-06 12:29:36.500986 +0000] E [glusterfsd-mgmt.c:2170:mgmt_getspec_cbk] 0-glusterfs: failed to get the 'volume file' from server\n\
             [2026-12-06 12:29:36.500995 +0000] E [glusterfsd-mgmt.c:2371:mgmt_getspec_cbk] 0-mgmt: failed to fetch volume file (key:/nosuch)\n",
        )
        .unwrap();
        assert_eq!(
            log_errors(&log),
            "failed to get the 'volume file' from server; failed to fetch volume file (key:/nosuch)"
        );
        assert_eq!(log_errors(&dir.path().join("none")), "");
    }
}
