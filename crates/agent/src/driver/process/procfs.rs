//! What `/proc` says about processes: start times (to tell a live process from a reused pid),
//! children, PID namespaces.

use std::fs;
use std::path::Path;

use super::files::ProcRef;

/// The fields of `/proc/<pid>/stat` this runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead)...
    pub state: char,
    pub ppid: u32,
    pub pgrp: i32,
    /// Clock ticks after boot when the process started.
    pub start_ticks: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (field 3), ppid (4), pgrp (5), ... starttime (22).
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// The stat of a process, `None` when it does not exist.
pub(crate) fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// A reference to a live process.
pub(crate) fn proc_ref(pid: u32) -> Option<ProcRef> {
    stat(pid).map(|s| ProcRef { pid, start_ticks: s.start_ticks })
}

/// Whether the process is still the one recorded and has not ended (a zombie has ended).
pub(crate) fn alive(p: &ProcRef) -> bool {
    stat(p.pid).is_some_and(|s| s.start_ticks == p.start_ticks && !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// Whether an optional process is alive.
pub(crate) fn alive_opt(p: Option<&ProcRef>) -> bool {
    p.is_some_and(alive)
}

/// Parses `/proc/<pid>/task/<tid>/children`: space-separated pids.
pub(crate) fn parse_pids(text: &str) -> Vec<u32> {
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// Every pid under `/proc`.
pub(crate) fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

/// The children of `pid` (from its main thread's `children` file, or by scanning `/proc` when
/// the kernel lacks that file).
pub(crate) fn children(pid: u32) -> Vec<u32> {
    // Each thread lists the children it forked (a Go program such as runc forks from any of
    // its threads).
    let Ok(threads) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut found = Vec::new();
    for t in threads.flatten() {
        match fs::read_to_string(t.path().join("children")) {
            Ok(text) => found.extend(parse_pids(&text)),
            Err(_) => return all_pids().into_iter().filter(|&p| stat(p).is_some_and(|s| s.ppid == pid)).collect(),
        }
    }
    found
}

/// The PID namespace of a process (`pid:[4026532...]`).
pub(crate) fn pid_namespace(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/pid")).ok().map(|l| l.to_string_lossy().into_owned())
}

/// Every process in the PID namespace `ns` (those of its descendant namespaces excluded).
pub(crate) fn pids_in_namespace(ns: &str) -> Vec<u32> {
    all_pids().into_iter().filter(|&p| pid_namespace(p).as_deref() == Some(ns)).collect()
}

/// Whether `path` is an executable regular file.
pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_hostile_command_name() {
        let text = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 120 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let s = parse_stat(text).unwrap();
        assert_eq!(s, Stat { state: 'S', ppid: 1, pgrp: 4242, start_ticks: 987654 });
        assert_eq!(parse_stat("12 (x) Z 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_a_changed_start_time_is_not() {
        let me = proc_ref(std::process::id()).unwrap();
        assert!(alive(&me));
        assert!(!alive(&ProcRef { start_ticks: me.start_ticks + 1, ..me }));
        assert!(!alive_opt(None));
        assert!(pid_namespace(me.pid).unwrap().starts_with("pid:["));
        assert!(pids_in_namespace(&pid_namespace(me.pid).unwrap()).contains(&me.pid));
    }

    #[test]
    fn pid_lists() {
        assert_eq!(parse_pids("12 13 \n"), vec![12, 13]);
        assert_eq!(parse_pids(""), Vec::<u32>::new());
    }

    #[test]
    fn children_of_a_spawned_process() {
        let mut child = std::process::Command::new("/bin/sh").args(["-c", "sleep 5 & wait"]).spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while children(pid).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let kids = children(pid);
        let _ = child.kill();
        for k in &kids {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(*k as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
        let _ = child.wait();
        assert_eq!(kids.len(), 1, "{kids:?}");
    }
}
