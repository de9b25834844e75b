//! The no-orphans check: the task processes that really run on every real node, found from the
//! outside, against the tasks the masters want running. Once the faults have healed, every task
//! whose desired state is RUNNING (of a service that exists and is not being deleted) must run
//! exactly once, on the node it is assigned to, and nothing else may run: no process of a task
//! that was stopped, replaced or whose service was deleted.
//!
//! Nothing here trusts the agent. A task's processes are found in /proc: the agent puts
//! `BERTH_TASK_ID` and `BERTH_SERVICE` in each task's environment, and the shim's `unshare`
//! launcher, the task and everything it starts inherit them. One running copy of a task is one
//! tree of such processes (its root is the launcher, whose parent, the shim, has no task id). Its
//! node is the network namespace it runs in (each real agent has its own when the suite runs as
//! root, and process tasks share their agent's), else its working directory (the process runtime
//! starts a task in `<agent data dir>/tasks/<id>/` unless the spec says otherwise). The shim's
//! `state.json` is not used: the agent deletes a task's directory when it removes the task, so a
//! process that outlived its removal would be invisible there. Processes that belong to no agent
//! of this cluster (another berth on the machine) are left out.
//!
//! Only the process runtime is covered: the suite's tasks are all process tasks. Docker tasks
//! would have to be found through the daemon (containers labelled with the task id) instead.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::{checks::Check, cluster::Cluster};

/// One process that carries a task id in its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub task: String,
    pub service: String,
    /// The inode of its network namespace.
    pub netns: Option<u64>,
    /// Its working directory (" (deleted)" removed).
    pub cwd: Option<PathBuf>,
}

/// One running copy of a task: a tree of processes carrying its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Found {
    pub task: String,
    pub service: String,
    /// The real agent it runs on.
    pub node: String,
    /// The root of the tree (the shim's `unshare` launcher).
    pub pid: u32,
    /// Processes in the tree.
    pub processes: usize,
}

/// A task the masters want running on `node`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Wanted {
    pub task: String,
    pub service: String,
    pub node: String,
}

/// One difference between what runs and what should.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Problem {
    /// A copy of a task that must not run anywhere: not desired running, or of a service that is
    /// gone or being deleted.
    Orphan(Found),
    /// A copy of a task that is desired running, but on another node.
    WrongNode { found: Found, assigned: String },
    /// A task desired running with no copy on its node.
    Missing(Wanted),
    /// A task desired running with more than one copy on its node.
    Twice { wanted: Wanted, copies: Vec<Found> },
}

/// Compares what runs (`found`) with what should (`wanted`).
pub fn compare(wanted: &[Wanted], found: &[Found]) -> Vec<Problem> {
    let want: BTreeMap<&str, &Wanted> = wanted.iter().map(|w| (w.task.as_str(), w)).collect();
    let mut on_node: BTreeMap<&str, Vec<&Found>> = BTreeMap::new();
    let mut problems = Vec::new();
    for f in found {
        match want.get(f.task.as_str()) {
            None => problems.push(Problem::Orphan(f.clone())),
            Some(w) if w.node != f.node => {
                problems.push(Problem::WrongNode { found: f.clone(), assigned: w.node.clone() })
            }
            Some(_) => on_node.entry(f.task.as_str()).or_default().push(f),
        }
    }
    for w in wanted {
        match on_node.get(w.task.as_str()).map_or(0, Vec::len) {
            0 => problems.push(Problem::Missing(w.clone())),
            1 => {}
            _ => problems.push(Problem::Twice {
                wanted: w.clone(),
                copies: on_node[w.task.as_str()].iter().map(|f| (*f).clone()).collect(),
            }),
        }
    }
    problems
}

/// Groups processes into running copies of tasks. `node_of` names the agent a process runs on
/// (None: not one of this cluster's; those are left out).
pub fn copies(procs: &[Proc], node_of: impl Fn(&Proc) -> Option<String>) -> Vec<Found> {
    let by_pid: BTreeMap<u32, &Proc> = procs.iter().map(|p| (p.pid, p)).collect();
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut out = Vec::new();
    for p in procs {
        // A root: its parent does not carry the same task id.
        if by_pid.get(&p.ppid).is_some_and(|parent| parent.task == p.task) {
            continue;
        }
        let Some(node) = node_of(p) else { continue };
        let mut n = 0;
        let mut stack = vec![p.pid];
        let mut seen = BTreeSet::new();
        while let Some(pid) = stack.pop() {
            if !seen.insert(pid) {
                continue;
            }
            n += 1;
            for c in children.get(&pid).into_iter().flatten() {
                if by_pid.get(c).is_some_and(|cp| cp.task == p.task) {
                    stack.push(*c);
                }
            }
        }
        out.push(Found { task: p.task.clone(), service: p.service.clone(), node, pid: p.pid, processes: n });
    }
    out.sort_by(|a, b| (&a.node, &a.task, a.pid).cmp(&(&b.node, &b.task, b.pid)));
    out
}

/// Every process on this machine whose environment has a `BERTH_TASK_ID` (processes that vanish
/// while being read, zombies included, are skipped).
pub fn scan() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return out };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let base = e.path();
        let Ok(env) = std::fs::read(base.join("environ")) else { continue };
        let var = |name: &str| {
            env.split(|b| *b == 0).find_map(|kv| {
                let s = std::str::from_utf8(kv).ok()?;
                s.strip_prefix(name)?.strip_prefix('=').map(str::to_string)
            })
        };
        let Some(task) = var("BERTH_TASK_ID").filter(|t| !t.is_empty()) else { continue };
        let Some(ppid) = std::fs::read_to_string(base.join("stat")).ok().and_then(|s| stat_ppid(&s)) else {
            continue;
        };
        // A sandboxed task's working directory is inside its own root (`/tmp`), which says
        // nothing about its node: the task directory its shim supervises does.
        let cwd = shim_dir(ppid).or_else(|| {
            std::fs::read_link(base.join("cwd")).ok().map(|p| {
                let s = p.to_string_lossy();
                PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
            })
        });
        out.push(Proc {
            pid,
            ppid,
            task,
            service: var("BERTH_SERVICE").unwrap_or_default(),
            netns: std::fs::metadata(base.join("ns/net")).ok().map(|m| m.ino()),
            cwd,
        });
    }
    out
}

/// The task directory of the shim (`berth task-shim DIR`) among the first ancestors of `pid`
/// (the task's parent is its OCI runtime or launcher, whose parent is the shim).
fn shim_dir(mut pid: u32) -> Option<PathBuf> {
    for _ in 0..3 {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if let Some(i) = args.iter().position(|a| *a == b"task-shim")
            && let Some(dir) = args.get(i + 1).and_then(|d| std::str::from_utf8(d).ok()).filter(|d| d.starts_with('/'))
        {
            return Some(PathBuf::from(dir));
        }
        pid = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| stat_ppid(&s))?;
    }
    None
}

/// The parent pid from /proc/PID/stat (`pid (comm) state ppid ...`; comm may hold spaces and
/// parentheses, so the fields are counted after the last `)`).
fn stat_ppid(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Which real agent a process belongs to: by network namespace, else by working directory.
pub struct Nodes {
    netns: BTreeMap<u64, String>,
    task_dirs: Vec<(PathBuf, String)>,
}

impl Nodes {
    pub fn of(c: &Cluster) -> Nodes {
        let mut netns = BTreeMap::new();
        for a in &c.agents {
            if let Some(h) = &a.host
                && let Ok(m) = std::fs::metadata(Path::new("/run/netns").join(&h.ns))
            {
                netns.insert(m.ino(), a.name.clone());
            }
        }
        Nodes { netns, task_dirs: c.agents.iter().map(|a| (a.dir.join("tasks"), a.name.clone())).collect() }
    }

    pub fn node(&self, p: &Proc) -> Option<String> {
        if let Some(n) = p.netns.and_then(|i| self.netns.get(&i)) {
            return Some(n.clone());
        }
        let cwd = p.cwd.as_ref()?;
        self.task_dirs.iter().find(|(d, _)| cwd.starts_with(d)).map(|(_, n)| n.clone())
    }
}

/// What the masters say of one task.
#[derive(Clone, Debug)]
pub struct TaskView {
    pub service: String,
    pub node: String,
    pub desired: String,
    pub state: String,
}

/// The masters' view: every task (ended ones too), and the services that exist and are not
/// being deleted.
pub async fn berth_view(c: &Cluster) -> Result<(BTreeMap<String, TaskView>, BTreeSet<String>)> {
    let text = c.admin_out(&["get", "tasks", "--all", "-o", "json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let Some(list) = v.as_array().or_else(|| v["tasks"].as_array()) else {
        bail!("unexpected `get tasks --all -o json` output: {text}")
    };
    let s = |t: &serde_json::Value, k: &str| t[k].as_str().unwrap_or_default().to_string();
    let tasks = list
        .iter()
        .map(|t| {
            (
                s(t, "id"),
                TaskView {
                    service: s(t, "service"),
                    node: s(t, "node_name"),
                    desired: s(t, "desired_state"),
                    state: s(t, "state"),
                },
            )
        })
        .collect();
    let text = c.admin_out(&["get", "services", "-o", "json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let Some(list) = v.as_array().or_else(|| v["services"].as_array()) else {
        bail!("unexpected `get services -o json` output: {text}")
    };
    let live = list.iter().filter(|s| s["deleting"] != true).map(|sv| s(sv, "name")).collect();
    Ok((tasks, live))
}

/// The tasks that must run on the real agents: desired RUNNING, of a live service, placed on one
/// of `agents` (tasks of the simulated agents have no processes to look for).
pub fn wanted(tasks: &BTreeMap<String, TaskView>, live: &BTreeSet<String>, agents: &[String]) -> Vec<Wanted> {
    tasks
        .iter()
        .filter(|(_, t)| t.desired == "running" && live.contains(&t.service) && agents.contains(&t.node))
        .map(|(id, t)| Wanted { task: id.clone(), service: t.service.clone(), node: t.node.clone() })
        .collect()
}

/// One look: the problems, and how many tasks are wanted.
async fn look(c: &Cluster, nodes: &Nodes) -> Result<(Vec<Problem>, usize, BTreeMap<String, TaskView>)> {
    let agents: Vec<String> = c.agents.iter().map(|a| a.name.clone()).collect();
    let (tasks, live) = berth_view(c).await?;
    let want = wanted(&tasks, &live, &agents);
    let found = copies(&scan(), |p| nodes.node(p));
    // A task started between the read and the scan is not in the read: look at berth again
    // before calling such a copy an orphan.
    let (tasks, want) = if found.iter().any(|f| !tasks.contains_key(&f.task)) {
        let (tasks, live) = berth_view(c).await?;
        let want = wanted(&tasks, &live, &agents);
        (tasks, want)
    } else {
        (tasks, want)
    };
    Ok((compare(&want, &found), want.len(), tasks))
}

/// The check: looks until what runs matches what should, or `deadline` passes (at least once).
pub async fn check(c: &Cluster, deadline: Instant) -> Check {
    let nodes = Nodes::of(c);
    let mut looks = 0;
    loop {
        looks += 1;
        let last = match look(c, &nodes).await {
            Ok((problems, n, _)) if problems.is_empty() => {
                return Check::new(
                    "no-orphans",
                    true,
                    format!(
                        "{n} tasks desired running on the real agents, each running exactly once on its node, and no \
                         other task process there (from /proc; look {looks})"
                    ),
                );
            }
            Ok((problems, n, tasks)) => describe(&problems, n, &tasks),
            Err(e) => format!("reading the masters' tasks failed: {e:#}"),
        };
        if Instant::now() >= deadline {
            return Check::new("no-orphans", false, format!("still after the convergence bound: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The problems, precisely: task, service, node, pid, and what the masters say of the task.
pub fn describe(problems: &[Problem], wanted: usize, tasks: &BTreeMap<String, TaskView>) -> String {
    let berth = |id: &str| match tasks.get(id) {
        Some(t) => format!("berth: desired {}, state {}, node {}", t.desired, t.state, or_dash(&t.node)),
        None => "berth: no such task (reaped, or never created)".to_string(),
    };
    let copy = |f: &Found| {
        format!(
            "task {} (service {}, node {}, pid {}, {} processes; {})",
            f.task,
            f.service,
            f.node,
            f.pid,
            f.processes,
            berth(&f.task)
        )
    };
    let mut extra = Vec::new();
    let mut missing = Vec::new();
    let mut twice = Vec::new();
    for p in problems {
        match p {
            Problem::Orphan(f) => extra.push(copy(f)),
            Problem::WrongNode { found, assigned } => extra.push(format!("{} but assigned to {assigned}", copy(found))),
            Problem::Missing(w) => {
                missing.push(format!("task {} (service {}, node {}; {})", w.task, w.service, w.node, berth(&w.task)))
            }
            Problem::Twice { wanted, copies } => twice.push(format!(
                "task {} (service {}, node {}): pids {}",
                wanted.task,
                wanted.service,
                wanted.node,
                copies.iter().map(|f| f.pid.to_string()).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    let mut parts = vec![format!(
        "{wanted} tasks desired running; {} extra, {} missing, {} twice",
        extra.len(),
        missing.len(),
        twice.len()
    )];
    for (name, list) in [("extra", extra), ("missing", missing), ("twice", twice)] {
        if !list.is_empty() {
            parts.push(format!("{name}: {}", list.join("; ")));
        }
    }
    parts.join("\n")
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// SIGKILLs every task process of this cluster's agents that is still running (by pid): the
/// last clean-up, for processes whose task directory is gone.
pub fn kill_all(nodes: &Nodes) {
    for p in scan() {
        if nodes.node(&p).is_some() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &p.pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(task: &str, node: &str) -> Wanted {
        Wanted { task: task.into(), service: "s".into(), node: node.into() }
    }

    fn found(task: &str, node: &str, pid: u32) -> Found {
        Found { task: task.into(), service: "s".into(), node: node.into(), pid, processes: 3 }
    }

    #[test]
    fn every_wanted_task_running_once_on_its_node_is_clean() {
        let w = [want("t1", "agent-1"), want("t2", "agent-2"), want("t3", "agent-1")];
        let f = [found("t1", "agent-1", 10), found("t2", "agent-2", 20), found("t3", "agent-1", 30)];
        assert_eq!(compare(&w, &f), vec![]);
        assert_eq!(compare(&[], &[]), vec![]);
    }

    #[test]
    fn a_process_of_a_task_not_desired_running_is_an_orphan() {
        let w = [want("t1", "agent-1")];
        let f = [found("t1", "agent-1", 10), found("old", "agent-3", 40)];
        assert_eq!(compare(&w, &f), vec![Problem::Orphan(found("old", "agent-3", 40))]);
    }

    #[test]
    fn a_wanted_task_running_on_another_node_is_extra_there_and_missing_on_its_own() {
        let w = [want("t1", "agent-1")];
        let f = [found("t1", "agent-2", 10)];
        assert_eq!(
            compare(&w, &f),
            vec![
                Problem::WrongNode { found: found("t1", "agent-2", 10), assigned: "agent-1".into() },
                Problem::Missing(want("t1", "agent-1")),
            ]
        );
    }

    #[test]
    fn a_wanted_task_without_a_process_is_missing() {
        let w = [want("t1", "agent-1"), want("t2", "agent-2")];
        let f = [found("t1", "agent-1", 10)];
        assert_eq!(compare(&w, &f), vec![Problem::Missing(want("t2", "agent-2"))]);
    }

    #[test]
    fn two_copies_of_a_task_on_its_node_are_reported_twice_with_both_pids() {
        let w = [want("t1", "agent-1")];
        let f = [found("t1", "agent-1", 10), found("t1", "agent-1", 11)];
        assert_eq!(
            compare(&w, &f),
            vec![Problem::Twice {
                wanted: want("t1", "agent-1"),
                copies: vec![found("t1", "agent-1", 10), found("t1", "agent-1", 11)]
            }]
        );
        let text = describe(&compare(&w, &f), 1, &BTreeMap::new());
        assert!(text.contains("0 extra, 0 missing, 1 twice"), "{text}");
        assert!(text.contains("task t1 (service s, node agent-1): pids 10, 11"), "{text}");
    }

    #[test]
    fn the_report_names_task_service_node_pid_and_what_berth_says() {
        let tasks = BTreeMap::from([(
            "old".to_string(),
            TaskView {
                service: "s".into(),
                node: "agent-3".into(),
                desired: "shutdown".into(),
                state: "running".into(),
            },
        )]);
        let p = compare(&[want("t2", "agent-2")], &[found("old", "agent-3", 40)]);
        let text = describe(&p, 1, &tasks);
        assert!(text.contains("1 extra, 1 missing, 0 twice"), "{text}");
        assert!(
            text.contains(
                "extra: task old (service s, node agent-3, pid 40, 3 processes; berth: desired shutdown, state \
                 running, node agent-3)"
            ),
            "{text}"
        );
        assert!(text.contains("missing: task t2 (service s, node agent-2; berth: no such task"), "{text}");
    }

    fn proc(pid: u32, ppid: u32, task: &str, netns: u64) -> Proc {
        Proc { pid, ppid, task: task.into(), service: "s".into(), netns: Some(netns), cwd: None }
    }

    #[test]
    fn processes_group_into_one_copy_per_tree_and_foreign_ones_are_left_out() {
        // t1: launcher 100 (parent: the shim, 99, no task id) -> task 101 -> child 102.
        // t1 again under another shim (a second copy); t2 on the other node; t3 in a namespace
        // that belongs to no agent of this cluster.
        let procs = [
            proc(100, 99, "t1", 1),
            proc(101, 100, "t1", 1),
            proc(102, 101, "t1", 1),
            proc(200, 199, "t1", 1),
            proc(201, 200, "t1", 1),
            proc(300, 1, "t2", 2),
            proc(400, 399, "t3", 9),
        ];
        let node = |p: &Proc| match p.netns {
            Some(1) => Some("agent-1".to_string()),
            Some(2) => Some("agent-2".to_string()),
            _ => None,
        };
        let got = copies(&procs, node);
        let want = vec![
            Found { task: "t1".into(), service: "s".into(), node: "agent-1".into(), pid: 100, processes: 3 },
            Found { task: "t1".into(), service: "s".into(), node: "agent-1".into(), pid: 200, processes: 2 },
            Found { task: "t2".into(), service: "s".into(), node: "agent-2".into(), pid: 300, processes: 1 },
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn a_process_is_placed_by_its_network_namespace_then_its_working_directory() {
        let nodes = Nodes {
            netns: BTreeMap::from([(7, "agent-1".to_string())]),
            task_dirs: vec![(PathBuf::from("/run/c/agent-2/tasks"), "agent-2".to_string())],
        };
        let mut p = proc(1, 0, "t", 7);
        assert_eq!(nodes.node(&p).as_deref(), Some("agent-1"));
        p.netns = Some(8);
        p.cwd = Some(PathBuf::from("/run/c/agent-2/tasks/t"));
        assert_eq!(nodes.node(&p).as_deref(), Some("agent-2"));
        p.cwd = Some(PathBuf::from("/run/c/agent-22/tasks/t"));
        assert_eq!(nodes.node(&p), None, "a path prefix is compared by components");
        p.cwd = None;
        assert_eq!(nodes.node(&p), None);
    }

    #[test]
    fn the_parent_pid_is_read_after_the_command_name() {
        assert_eq!(stat_ppid("4242 (sh) S 4241 4242 4242 0 -1"), Some(4241));
        assert_eq!(stat_ppid("7 (a) b (c) R 3 7 7 0"), Some(3));
        assert_eq!(stat_ppid("garbage"), None);
    }
}
