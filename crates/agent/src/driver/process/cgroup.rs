//! CPU and memory limits through cgroups, v1 (one hierarchy per controller) or v2 (unified).
//!
//! Each task gets `<hierarchy>/<parent>/<task id>` (v1: one in the `cpu` and one in the
//! `memory` hierarchy; v2: one). They are created under the hierarchy's root, not under the
//! agent's own cgroup, so the task outlives the agent's cgroup (a service manager stopping the
//! agent does not take its tasks along).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The CFS period (µs) every task uses.
pub(crate) const CFS_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts (µs).
const CFS_MIN_QUOTA_US: u64 = 1_000;

/// The limits of one task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
}

impl Limits {
    pub fn any(&self) -> bool {
        self.cpu_millis.is_some() || self.memory_bytes.is_some()
    }
}

/// The CFS quota for `millis` millicores per [`CFS_PERIOD_US`].
pub(crate) fn cfs_quota_us(millis: u64) -> u64 {
    (millis.saturating_mul(CFS_PERIOD_US) / 1000).max(CFS_MIN_QUOTA_US)
}

/// Where the cgroup controllers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    /// cgroup v1: the mount points of the `cpu` and `memory` hierarchies (hybrid hosts too).
    V1 { cpu: Option<PathBuf>, memory: Option<PathBuf> },
    /// cgroup v2 only: the unified mount point and the controllers its root offers.
    V2 { root: PathBuf, controllers: Vec<String> },
    /// No usable cgroup mount.
    None,
}

/// A cgroup mount: one line of `/proc/self/mountinfo` (parsed by the one parser the agent has).
pub(crate) type Mount = crate::volume::mountinfo::MountEntry;

/// Parses `/proc/self/mountinfo`, keeping cgroup mounts.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    crate::volume::mountinfo::parse(text)
        .into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .collect()
}

/// Decides the layout from the cgroup mounts; `v2_controllers` reads a cgroup2 root's
/// `cgroup.controllers`.
pub(crate) fn layout_from(mounts: &[Mount], v2_controllers: impl Fn(&Path) -> Vec<String>) -> Layout {
    let v1 = |controller: &str| {
        mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == controller))
            .map(|m| m.mount_point.clone())
    };
    let (cpu, memory) = (v1("cpu"), v1("memory"));
    if cpu.is_some() || memory.is_some() {
        return Layout::V1 { cpu, memory };
    }
    match mounts.iter().find(|m| m.fstype == "cgroup2") {
        Some(m) => Layout::V2 { root: m.mount_point.clone(), controllers: v2_controllers(&m.mount_point) },
        None => Layout::None,
    }
}

/// This host's layout.
pub(crate) fn detect() -> Layout {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    layout_from(&parse_mountinfo(&text), |root| {
        fs::read_to_string(root.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    })
}

/// The directories a task's cgroups have (or would have) in `layout`.
pub(crate) fn task_dirs(layout: &Layout, parent: &str, task_id: &str) -> Vec<PathBuf> {
    match layout {
        Layout::V1 { cpu, memory } => {
            let mut dirs: Vec<PathBuf> =
                [cpu, memory].into_iter().flatten().map(|m| m.join(parent).join(task_id)).collect();
            dirs.dedup();
            dirs
        }
        Layout::V2 { root, .. } => vec![root.join(parent).join(task_id)],
        Layout::None => Vec::new(),
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("writing {value:?} to {} failed: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("creating cgroup {} failed: {e}", path.display()))
}

/// Creates the task's cgroups and writes its limits; returns the directories the task joins.
/// On error, whatever was created is removed again.
pub(crate) fn setup(layout: &Layout, parent: &str, task_id: &str, limits: Limits) -> Result<Vec<PathBuf>, String> {
    let dirs = task_dirs(layout, parent, task_id);
    let result = setup_inner(layout, parent, task_id, limits);
    if result.is_err() {
        let _ = remove(&dirs, Duration::ZERO);
    }
    result
}

fn setup_inner(layout: &Layout, parent: &str, task_id: &str, limits: Limits) -> Result<Vec<PathBuf>, String> {
    match layout {
        Layout::None => Err("no cgroup filesystem is mounted (none in /proc/self/mountinfo)".into()),
        Layout::V1 { cpu, memory } => {
            if cpu.is_none() && limits.cpu_millis.is_some() {
                return Err("the cgroup v1 `cpu` controller is not mounted".into());
            }
            if memory.is_none() && limits.memory_bytes.is_some() {
                return Err("the cgroup v1 `memory` controller is not mounted".into());
            }
            let mut dirs = Vec::new();
            if let Some(mount) = cpu {
                let dir = mount.join(parent).join(task_id);
                mkdir(&dir)?;
                if let Some(millis) = limits.cpu_millis {
                    write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &cfs_quota_us(millis).to_string())?;
                }
                dirs.push(dir);
            }
            if let Some(mount) = memory {
                let dir = mount.join(parent).join(task_id);
                mkdir(&dir)?;
                if let Some(bytes) = limits.memory_bytes {
                    write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                }
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
            Ok(dirs)
        }
        Layout::V2 { root, controllers } => {
            let wanted: Vec<&str> = [("cpu", limits.cpu_millis.is_some()), ("memory", limits.memory_bytes.is_some())]
                .into_iter()
                .filter(|(_, asked)| *asked)
                .map(|(c, _)| c)
                .collect();
            if let Some(missing) = wanted.iter().find(|c| !controllers.iter().any(|have| have == *c)) {
                return Err(format!(
                    "the cgroup v2 root {} does not offer the `{missing}` controller (cgroup.controllers: {:?})",
                    root.display(),
                    controllers.join(" ")
                ));
            }
            let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();
            let enable = enable.trim_end();
            let parent_dir = root.join(parent);
            if !enable.is_empty() {
                write(&root.join("cgroup.subtree_control"), enable)?;
            }
            mkdir(&parent_dir)?;
            if !enable.is_empty() {
                write(&parent_dir.join("cgroup.subtree_control"), enable)?;
            }
            let dir = parent_dir.join(task_id);
            mkdir(&dir)?;
            if let Some(millis) = limits.cpu_millis {
                write(&dir.join("cpu.max"), &format!("{} {CFS_PERIOD_US}", cfs_quota_us(millis)))?;
            }
            if let Some(bytes) = limits.memory_bytes {
                write(&dir.join("memory.max"), &bytes.to_string())?;
            }
            Ok(vec![dir])
        }
    }
}

/// Moves process `pid` into each of `dirs`.
pub(crate) fn join(dirs: &[PathBuf], pid: u32) -> Result<(), String> {
    for dir in dirs {
        write(&dir.join("cgroup.procs"), &pid.to_string())?;
    }
    Ok(())
}

/// The processes in a cgroup.
pub(crate) fn procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs")).map(|t| super::procfs::parse_pids(&t)).unwrap_or_default()
}

/// Removes the cgroup directories, retrying for up to `patience` while they are busy (processes
/// still exiting). Directories that do not exist are fine.
pub(crate) fn remove(dirs: &[PathBuf], patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    for dir in dirs {
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(format!(
                        "removing cgroup {} failed: {e} (processes still in it: {:?})",
                        dir.display(),
                        procs(dir)
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
29 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
31 25 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,memory
32 25 0:30 / /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,cpuset
40 30 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
";

    const UNIFIED: &str = "\
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_hosts_use_v1_and_cpuset_is_not_cpu() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 4);
        let layout = layout_from(&mounts, |_| panic!("v2 not consulted on a v1 host"));
        assert_eq!(
            layout,
            Layout::V1 { cpu: Some("/sys/fs/cgroup/cpu,cpuacct".into()), memory: Some("/sys/fs/cgroup/memory".into()) }
        );
        assert_eq!(
            task_dirs(&layout, "berth", "t1"),
            vec![PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/berth/t1"), PathBuf::from("/sys/fs/cgroup/memory/berth/t1")]
        );
    }

    #[test]
    fn unified_hosts_use_v2_and_no_mount_is_none() {
        let layout = layout_from(&parse_mountinfo(UNIFIED), |root| {
            assert_eq!(root, Path::new("/sys/fs/cgroup"));
            vec!["cpu".into(), "memory".into()]
        });
        assert_eq!(
            layout,
            Layout::V2 { root: "/sys/fs/cgroup".into(), controllers: vec!["cpu".into(), "memory".into()] }
        );
        assert_eq!(task_dirs(&layout, "berth", "t"), vec![PathBuf::from("/sys/fs/cgroup/berth/t")]);
        assert_eq!(layout_from(&parse_mountinfo("40 30 0:5 / /proc rw - proc proc rw\n"), |_| vec![]), Layout::None);
        let err = setup(&Layout::None, "berth", "t", Limits { memory_bytes: Some(1), cpu_millis: None }).unwrap_err();
        assert!(err.contains("no cgroup filesystem"), "{err}");
    }

    #[test]
    fn escaped_mount_points() {
        let m = parse_mountinfo("1 2 0:1 / /mnt/my\\040cgroups rw - cgroup cgroup rw,memory\n");
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/my cgroups"));
        assert_eq!(crate::volume::mountinfo::unescape("a\\\\b\\04"), "a\\\\b\\04");
    }

    #[test]
    fn quotas() {
        assert_eq!(cfs_quota_us(1000), 100_000);
        assert_eq!(cfs_quota_us(250), 25_000);
        assert_eq!(cfs_quota_us(2500), 250_000);
        assert_eq!(cfs_quota_us(1), CFS_MIN_QUOTA_US);
        assert!(!Limits::default().any());
        assert!(Limits { cpu_millis: Some(1), memory_bytes: None }.any());
    }

    /// v2 set-up against a fake cgroup tree (plain directories).
    #[test]
    fn v2_setup_writes_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::V2 { root: tmp.path().to_path_buf(), controllers: vec!["cpu".into(), "memory".into()] };
        let limits = Limits { cpu_millis: Some(500), memory_bytes: Some(64 << 20) };
        let dirs = setup(&layout, "berth", "t", limits).unwrap();
        assert_eq!(dirs, vec![tmp.path().join("berth/t")]);
        let read = |p: &str| fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory");
        assert_eq!(read("berth/cgroup.subtree_control"), "+cpu +memory");
        assert_eq!(read("berth/t/cpu.max"), "50000 100000");
        assert_eq!(read("berth/t/memory.max"), (64u64 << 20).to_string());

        let no_memory = Layout::V2 { root: tmp.path().to_path_buf(), controllers: vec!["cpu".into()] };
        let err = setup(&no_memory, "berth", "u", limits).unwrap_err();
        assert!(err.contains("`memory` controller"), "{err}");
    }

    /// v1 set-up against a fake cgroup tree; a failure removes what was created.
    #[test]
    fn v1_setup_writes_the_files_and_cleans_up_on_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::V1 { cpu: Some(tmp.path().join("cpu")), memory: Some(tmp.path().join("memory")) };
        let limits = Limits { cpu_millis: Some(1500), memory_bytes: Some(1 << 30) };
        let dirs = setup(&layout, "berth", "t", limits).unwrap();
        assert_eq!(dirs.len(), 2);
        let read = |p: &str| fs::read_to_string(tmp.path().join(p)).unwrap();
        assert_eq!(read("cpu/berth/t/cpu.cfs_quota_us"), "150000");
        assert_eq!(read("cpu/berth/t/cpu.cfs_period_us"), "100000");
        assert_eq!(read("memory/berth/t/memory.limit_in_bytes"), (1u64 << 30).to_string());

        let no_memory = Layout::V1 { cpu: Some(tmp.path().join("cpu")), memory: None };
        let err = setup(&no_memory, "berth", "u", limits).unwrap_err();
        assert!(err.contains("`memory` controller is not mounted"), "{err}");
        assert!(!tmp.path().join("cpu/berth/u").exists());
        // Without limits a missing controller is fine.
        assert_eq!(setup(&no_memory, "berth", "v", Limits::default()).unwrap(), vec![tmp.path().join("cpu/berth/v")]);
    }
}
