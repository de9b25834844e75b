//! One sandbox policy for every runtime: what a task may do, decided once from its spec and
//! turned into each runtime's own terms (an OCI `config.json` for tasks run through runc or
//! crun; Docker's `HostConfig` for the docker runtime).
//!
//! By default a task:
//! - runs in a user namespace of its own as `spec.task.user` (default 65534); uid and gid 0 in
//!   it are [`ROOT_HOST_ID`] on the host, every other id is itself, so the task is never the
//!   host's root and a volume's files keep the owners the host gives them;
//! - has `no_new_privs`, so no setuid binary or file capability raises it;
//! - keeps Docker's default capabilities (in its bounding set; effective only when it runs as
//!   uid 0), adjusted by `cap_add` and `cap_drop`;
//! - runs under a seccomp filter equivalent to Docker's default ([`seccomp`]);
//! - may have at most `resources.limits.pids` processes (default 1024);
//! - sees `/proc` with runc's masked and read-only paths, `/sys` read-only, a minimal `/dev`;
//! - sees either its image's root filesystem or, for a process task, a read-only view of the
//!   host's system directories ([`view`]) and a private `/tmp`, plus its volumes, secrets and
//!   configs: never the agent's data, `/root` or the Docker socket.
//!
//! `privileged: true` turns all of that off and is refused unless the agent was started with
//! `--allow-privileged`.

pub mod seccomp;
pub mod view;

use std::path::{Path, PathBuf};

use berth_types::spec::TaskSpec;
use berth_types::spec::security::{self, DEFAULT_PIDS_MAX, User};
use serde_json::{Value, json};

/// Docker's default capabilities (names without `CAP_`).
pub const DEFAULT_CAPS: &[&str] = security::DEFAULT_CAPABILITIES;

/// The host uid and gid of a task's root: uid 0 inside its user namespace. Every other id in
/// 1..=65535 is mapped to itself.
pub const ROOT_HOST_ID: u32 = 1_000_000;

/// Where the task's init (a static tini) appears inside the task.
pub const INIT_TARGET: &str = "/dev/init";

/// What one task may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// No sandbox at all (`privileged: true`).
    pub privileged: bool,
    /// The user inside the task's namespace.
    pub user: User,
    /// The capabilities it keeps, without `CAP_`.
    pub caps: Vec<&'static str>,
    /// `pids.max`.
    pub pids_max: u32,
}

impl Policy {
    /// The policy a task spec asks for.
    pub fn of(task: &TaskSpec) -> Policy {
        Policy {
            privileged: task.privileged,
            // Privileged means host root unless the spec names a user.
            user: match task.user.as_deref() {
                None if task.privileged => User { uid: 0, gid: 0 },
                spec => User::of(spec),
            },
            caps: security::effective_capabilities(&task.cap_add, &task.cap_drop),
            pids_max: task.resources.limits.as_ref().and_then(|l| l.pids).unwrap_or(DEFAULT_PIDS_MAX).max(1),
        }
    }

    /// Refuses a privileged task on an agent that does not allow them.
    pub fn check_allowed(&self, allow_privileged: bool) -> Result<(), String> {
        if self.privileged && !allow_privileged {
            return Err("the task asks for `privileged: true` (no sandbox: host root, every capability, no seccomp \
                 filter, the host's filesystem), and this agent refuses privileged tasks; start the agent with \
                 --allow-privileged to allow them, or remove `privileged` from spec.task"
                .into());
        }
        Ok(())
    }

    /// The task user's uid and gid on the host: see [`ROOT_HOST_ID`]. A rootless agent has one
    /// id to give, its own.
    pub fn host_ids(&self, rootless: Option<(u32, u32)>) -> (u32, u32) {
        match rootless {
            Some(ids) => ids,
            // No user namespace: the ids are the host's.
            None if self.privileged => (self.user.uid, self.user.gid),
            None => (host_id(self.user.uid), host_id(self.user.gid)),
        }
    }

    /// The capabilities the process holds: in its bounding set always; permitted and
    /// effective only as uid 0 (as Docker does: a non-root task gains none by exec).
    fn capabilities(&self) -> Value {
        let all = bounding_set();
        let caps = if self.privileged { &all } else { &self.caps };
        let caps: Vec<String> = caps.iter().map(|c| format!("CAP_{c}")).collect();
        let active = if self.user.uid == 0 { caps.clone() } else { Vec::new() };
        json!({"bounding": caps, "permitted": active, "effective": active, "inheritable": [], "ambient": []})
    }
}

/// The capabilities in the agent's own bounding set (a privileged task gets every one of them;
/// one the agent lacks cannot be given). `CAPABILITIES` is in capability-number order.
fn bounding_set() -> Vec<&'static str> {
    let mask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapBnd:")).and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    security::CAPABILITIES.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, c)| *c).collect()
}

/// The host id of id `id` inside a task's user namespace.
pub fn host_id(id: u32) -> u32 {
    if id == 0 { ROOT_HOST_ID } else { id }
}

/// The uid and gid the agent runs as, when it is not root (rootless: the task's namespace maps
/// only them).
pub fn rootless_ids() -> Option<(u32, u32)> {
    let uid = rustix::process::geteuid();
    (!uid.is_root()).then(|| (uid.as_raw(), rustix::process::getegid().as_raw()))
}

/// The static init (tini) bound into every task as [`INIT_TARGET`]: the first of the usual
/// places that exists.
pub fn find_init() -> Result<PathBuf, String> {
    const CANDIDATES: &[&str] =
        &["/usr/bin/tini-static", "/usr/bin/docker-init", "/usr/libexec/podman/catatonit", "/usr/bin/catatonit"];
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "no static init for sandboxed tasks was found (looked for {}); install Debian's tini package \
             (`apt-get install tini`)",
            CANDIDATES.join(", ")
        )
    })
}

/// The OCI runtime (runc or crun): `configured` when given, else the first of runc and crun on
/// the usual paths. runc comes first: crun 1.8 refuses hosts whose cgroup v2 hierarchy holds
/// controllers next to v1 ones (hybrid), which runc handles.
pub fn find_oci_runtime(configured: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("the OCI runtime {} (--oci-runtime) does not exist; install runc or crun", p.display()))
        };
    }
    const CANDIDATES: &[&str] = &["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc", "/usr/bin/crun"];
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "sandboxed tasks need an OCI runtime and none was found (looked for {}); install runc or crun \
             (`apt-get install runc`), or point --oci-runtime at one",
            CANDIDATES.join(", ")
        )
    })
}

/// The resource limits runc applies to the task's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: u64,
    pub memory_bytes: Option<u64>,
}

/// Everything one OCI `config.json` needs besides the policy.
#[derive(Debug, Clone)]
pub struct Container<'a> {
    pub policy: &'a Policy,
    /// The program and its arguments (the init is put in front here).
    pub argv: &'a [String],
    /// `NAME=value` pairs.
    pub env: Vec<String>,
    pub cwd: String,
    /// The root filesystem and whether it is read-only.
    pub rootfs: &'a Path,
    pub readonly_root: bool,
    /// Mounts after the standard ones (system directories, /tmp, volumes, secrets...).
    pub mounts: Vec<Value>,
    /// The network namespace to join; none: the host's.
    pub netns: Option<&'a Path>,
    /// The cgroup (under each hierarchy's root) runc puts the task in; none: runc's choice.
    pub cgroups_path: Option<String>,
    pub limits: CgroupLimits,
    /// The static init on the host.
    pub init: &'a Path,
    /// The agent runs without root: map only its ids.
    pub rootless: Option<(u32, u32)>,
}

/// A bind mount for a `config.json`. A read-only bind is a remount in the task's user
/// namespace, which must keep the flags the source's mount has locked (`noexec`, the atime
/// ones): they are carried over.
pub fn bind(source: &Path, target: &str, read_only: bool) -> Value {
    use rustix::fs::StatVfsMountFlags as F;
    let mut options = vec!["rbind", "nosuid", "nodev"];
    if read_only {
        options.push("ro");
    }
    let locked = rustix::fs::statvfs(source).map(|s| s.f_flag).unwrap_or(F::empty());
    for (flag, option) in [(F::NOEXEC, "noexec"), (F::NOATIME, "noatime"), (F::NODIRATIME, "nodiratime")] {
        if locked.contains(flag) {
            options.push(option);
        }
    }
    json!({"destination": target, "type": "bind", "source": source, "options": options})
}

/// The paths of `/proc` and `/sys` hidden from the task (runc's and Docker's defaults).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/sys/fs/cgroup",
];

/// The paths of `/proc` the task may only read.
pub const READONLY_PATHS: &[&str] = &["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

/// The character devices a task may use: null, zero, full, random, urandom, tty, console, ptmx
/// and its pseudo-terminals.
const DEVICES: &[(i64, Option<i64>)] = &[
    (1, Some(3)),
    (1, Some(5)),
    (1, Some(7)),
    (1, Some(8)),
    (1, Some(9)),
    (5, Some(0)),
    (5, Some(1)),
    (5, Some(2)),
    (136, None),
];

/// The OCI runtime configuration of a sandboxed task.
pub fn config(c: &Container<'_>) -> Value {
    let p = c.policy;
    let mut args = vec![INIT_TARGET.to_string(), "--".to_string()];
    args.extend(c.argv.iter().cloned());
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        // sysfs cannot be mounted from a user namespace that does not own the network
        // namespace; a read-only bind of the host's shows the same (recursive: the kernel
        // refuses to bind part of a tree from a user namespace). The host's cgroup tree under
        // it is masked.
        if p.privileged {
            // No user namespace: a sysfs of its own, writable.
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "rw"]})
        } else {
            json!({"destination": "/sys", "type": "bind", "source": "/sys",
                   "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
        },
        json!({"destination": INIT_TARGET, "type": "bind", "source": c.init, "options": ["bind", "ro", "nosuid", "nodev"]}),
    ];
    mounts.extend(c.mounts.iter().cloned());
    let (map_uids, map_gids) = match c.rootless {
        Some((uid, gid)) => (
            vec![json!({"containerID": p.user.uid, "hostID": uid, "size": 1})],
            vec![json!({"containerID": p.user.gid, "hostID": gid, "size": 1})],
        ),
        None => {
            let map = json!([{"containerID": 0, "hostID": ROOT_HOST_ID, "size": 1},
                             {"containerID": 1, "hostID": 1, "size": security::MAX_ID}]);
            (map.as_array().cloned().unwrap_or_default(), map.as_array().cloned().unwrap_or_default())
        }
    };
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        json!({"type": "cgroup"}),
    ];
    if !p.privileged {
        namespaces.push(json!({"type": "user"}));
    }
    if let Some(netns) = c.netns {
        namespaces.push(json!({"type": "network", "path": netns}));
    }
    let mut devices = vec![json!({"allow": p.privileged, "access": "rwm"})];
    if !p.privileged {
        devices.extend(DEVICES.iter().map(|(major, minor)| match minor {
            Some(minor) => json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"}),
            None => json!({"allow": true, "type": "c", "major": major, "access": "rwm"}),
        }));
    }
    let mut resources = json!({"devices": devices, "pids": {"limit": p.pids_max}});
    if let Some(bytes) = c.limits.memory_bytes {
        resources["memory"] = json!({"limit": bytes});
    }
    if let Some(quota) = c.limits.cpu_quota_us {
        resources["cpu"] = json!({"quota": quota, "period": c.limits.cpu_period_us});
    }
    let mut linux = if p.privileged {
        // Docker's --privileged: no user namespace, every capability, no seccomp filter, no
        // masked paths, every device allowed; still its own pid, mount, ipc and uts namespaces
        // and the task's cgroup limits.
        json!({"namespaces": namespaces, "resources": resources})
    } else {
        json!({
            "uidMappings": map_uids,
            "gidMappings": map_gids,
            "namespaces": namespaces,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": seccomp::profile(&p.caps),
            "resources": resources,
        })
    };
    if let Some(path) = &c.cgroups_path {
        linux["cgroupsPath"] = json!(path);
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": p.user.uid, "gid": p.user.gid},
            "args": args,
            "env": c.env,
            "cwd": c.cwd,
            "capabilities": p.capabilities(),
            "noNewPrivileges": !p.privileged,
        },
        "root": {"path": c.rootfs, "readonly": c.readonly_root},
        "mounts": mounts,
        "linux": linux,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskSpec {
        serde_json::from_str(r#"{"runtime": "process", "command": ["/bin/true"]}"#).unwrap()
    }

    #[test]
    fn the_default_policy_is_strict() {
        let p = Policy::of(&task());
        assert!(!p.privileged);
        assert_eq!(p.user, User { uid: 65534, gid: 65534 });
        assert_eq!(p.caps.len(), DEFAULT_CAPS.len());
        assert_eq!(p.pids_max, 1024);
        assert_eq!(p.host_ids(None), (65534, 65534));
        assert!(p.check_allowed(false).is_ok());
    }

    #[test]
    fn root_inside_is_never_root_outside() {
        let mut t = task();
        t.user = Some("0".into());
        let p = Policy::of(&t);
        assert_eq!(p.host_ids(None), (ROOT_HOST_ID, ROOT_HOST_ID));
        assert_eq!(p.host_ids(Some((1000, 1000))), (1000, 1000));
        // As uid 0 the capabilities are effective; as any other user only bounding.
        assert_eq!(p.capabilities()["effective"].as_array().unwrap().len(), DEFAULT_CAPS.len());
        assert_eq!(Policy::of(&task()).capabilities()["effective"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn privileged_needs_the_agents_consent() {
        let mut t = task();
        t.privileged = true;
        let e = Policy::of(&t).check_allowed(false).unwrap_err();
        assert!(e.contains("--allow-privileged"), "{e}");
        assert!(Policy::of(&t).check_allowed(true).is_ok());
    }

    #[test]
    fn the_config_carries_the_policy() {
        let mut t = task();
        t.cap_add = vec!["NET_ADMIN".into()];
        t.resources.limits = Some(berth_types::spec::ResourceLimits { pids: Some(50), ..Default::default() });
        let p = Policy::of(&t);
        let argv = vec!["/bin/sh".to_string()];
        let c = config(&Container {
            policy: &p,
            argv: &argv,
            env: vec!["A=1".into()],
            cwd: "/tmp".into(),
            rootfs: Path::new("/r"),
            readonly_root: true,
            mounts: vec![bind(Path::new("/v"), "/data", true)],
            netns: Some(Path::new("/run/netns/x")),
            cgroups_path: Some("/berth/t".into()),
            limits: CgroupLimits { cpu_quota_us: Some(50_000), cpu_period_us: 100_000, memory_bytes: Some(1 << 20) },
            init: Path::new("/usr/bin/tini-static"),
            rootless: None,
        });
        assert_eq!(c["process"]["args"], json!(["/dev/init", "--", "/bin/sh"]));
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(c["process"]["user"], json!({"uid": 65534, "gid": 65534}));
        assert!(c["process"]["capabilities"]["bounding"].as_array().unwrap().contains(&json!("CAP_NET_ADMIN")));
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 50);
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 1 << 20);
        assert_eq!(c["linux"]["uidMappings"][0], json!({"containerID": 0, "hostID": ROOT_HOST_ID, "size": 1}));
        assert!(
            c["linux"]["namespaces"].as_array().unwrap().contains(&json!({"type": "network", "path": "/run/netns/x"}))
        );
        assert!(c["linux"]["maskedPaths"].as_array().unwrap().contains(&json!("/proc/kcore")));
        assert_eq!(c["root"], json!({"path": "/r", "readonly": true}));
        let mounts = c["mounts"].as_array().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["destination"] == "/data" && m["options"].as_array().unwrap().contains(&json!("ro")))
        );
    }
}
