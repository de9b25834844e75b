//! The per-task supervisor ("shim"): a small process, detached from the agent, that starts the
//! task in its namespaces, copies its output into the rotated log, waits for it and records how
//! it ended. The agent can die and come back meanwhile; the shim does not need it.
//!
//! Sequence: read `config.json`; write `state.json` (own pid); join the task's cgroups (so
//! everything started after inherits them); start `unshare --pid --fork --mount --uts --ipc
//! --kill-child --mount-proc -- argv` in a process group of its own with piped stdout/stderr;
//! find the task (the launcher's child, PID 1 of the new namespace) and record it in
//! `state.json`; copy output until both pipes close; write `exit.json`; exit.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::files::{self, CONFIG, CONFIG_FORMAT, EXIT, ExitRecord, OUTPUT, STATE, ShimConfig, ShimState};
use super::logfile::{MAX_LINE, RotatingLog};
use super::{cgroup, init, procfs};
use crate::driver::now_ms;
use crate::driver::runtime::{LogLine, LogStream};

/// The flags given to `unshare` before `--` and the task's argv.
pub(crate) const UNSHARE_FLAGS: [&str; 7] =
    ["--pid", "--fork", "--mount", "--uts", "--ipc", "--kill-child", "--mount-proc"];
/// Whether this process runs without root, and its tasks need a user namespace of their own.
pub(crate) fn rootless() -> bool {
    !rustix::process::geteuid().is_root()
}

/// The `nsenter` flags (after `--target PID`) that run a command in a task's namespaces. A
/// rootless task's user namespace is entered first, keeping our credentials: its setgroups is
/// denied, and our uid is already its root.
pub(crate) fn nsenter_flags(rootless: bool) -> Vec<&'static str> {
    let user: &[&'static str] = if rootless { &["--user", "--preserve-credentials"] } else { &[] };
    user.iter().chain(["--pid", "--mount", "--uts", "--ipc", "--wd"].iter()).copied().collect()
}

/// The `unshare` flags for a task. Only root may create PID and mount namespaces in the host's
/// user namespace, so a rootless agent gives each task a user namespace of its own with the
/// agent's uid mapped to root inside (as rootless Podman does); the task's files on the host
/// belong to the agent's user.
pub(crate) fn unshare_flags(rootless: bool) -> Vec<&'static str> {
    let extra: &[&'static str] = if rootless { &["--user", "--map-root-user"] } else { &[] };
    extra.iter().chain(UNSHARE_FLAGS.iter()).copied().collect()
}

/// How long the shim looks for the task process after starting the launcher.
const FIND_TASK_PATIENCE: Duration = Duration::from_secs(5);
/// How long output may keep flowing after the task ended (the pipes close when the namespace
/// is gone, so this only guards against the unexpected).
const DRAIN_PATIENCE: Duration = Duration::from_secs(5);

/// The shim's entry point: `args` are the arguments after the program (and subcommand) name,
/// exactly one: the task directory. Returns the shim's exit code (0 when the task ran and its
/// end was recorded, whatever the task's own code; 1 when the shim failed, also recorded in
/// `exit.json` when possible; 2 on bad usage).
pub fn shim_main(args: Vec<OsString>) -> i32 {
    if args.first().is_some_and(|a| a == init::EXEC_FLAG) {
        return match args.get(1) {
            Some(sep) if sep == "--" => init::exec_main(&args[2..]),
            _ => {
                eprintln!("usage: task-shim --exec -- PROGRAM [ARGS...] (started by the task's init, not by hand)");
                2
            }
        };
    }
    if args.first().is_some_and(|a| a == init::INIT_FLAG) {
        let (mut resolv, mut mounts) = (None, None);
        let mut i = 1;
        loop {
            match (args.get(i), args.get(i + 1)) {
                (Some(flag), Some(file)) if flag == init::RESOLV_FLAG => resolv = Some(PathBuf::from(file)),
                (Some(flag), Some(file)) if flag == init::MOUNTS_FLAG => mounts = Some(PathBuf::from(file)),
                (Some(sep), _) if sep == "--" => {
                    return init::init_main(&args[i + 1..], resolv.as_deref(), mounts.as_deref());
                }
                _ => {
                    eprintln!(
                        "usage: task-shim --init [--resolv-conf FILE] [--mounts FILE] -- PROGRAM [ARGS...] (started by \
                         the shim, not by hand)"
                    );
                    return 2;
                }
            }
            i += 2;
        }
    }
    let [dir] = args.as_slice() else {
        eprintln!("usage: task-shim <task dir> (started by the berth agent's process runtime, not by hand)");
        return 2;
    };
    let dir = PathBuf::from(dir);
    match run(&dir) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("berth task-shim: {message}");
            let exit = dir.join(EXIT);
            if !exit.exists() {
                let rec = ExitRecord { code: -1, finished_at_ms: now_ms(), message, started: false };
                if let Err(e) = files::write_json(&exit, &rec) {
                    eprintln!("berth task-shim: recording the failure in {} failed too: {e}", exit.display());
                }
            }
            1
        }
    }
}

fn run(dir: &Path) -> Result<(), String> {
    let config: ShimConfig = match files::read_json(&dir.join(CONFIG)) {
        Ok(Some(c)) => c,
        Ok(None) => {
            return Err(format!("{} does not exist; the task directory is incomplete", dir.join(CONFIG).display()));
        }
        Err(e) => return Err(format!("reading the task's config failed: {e}")),
    };
    if config.format != CONFIG_FORMAT {
        return Err(format!(
            "{} has format {}, this shim reads format {CONFIG_FORMAT}; run the agent and shim of the same berth version",
            dir.join(CONFIG).display(),
            config.format
        ));
    }
    let me = procfs::proc_ref(std::process::id()).ok_or("reading /proc/self/stat failed; is /proc mounted?")?;
    let mut state = ShimState { shim: me, launcher: None, task: None, started_at_ms: 0 };
    write_state(dir, &state)?;

    if let Err(e) = cgroup::join(&config.cgroups, me.pid) {
        if config.limits_required {
            return Err(format!(
                "cannot apply the task's resource limits: {e}; run the agent as root with the cpu and memory \
                 cgroup controllers available, or remove spec.task.resources.limits"
            ));
        }
        eprintln!("berth task-shim: running task {} without its cgroups: {e}", config.task_id);
    }

    let log = RotatingLog::open(&dir.join(OUTPUT), config.log_max_bytes, config.log_keep)
        .map_err(|e| format!("opening the task's log {} failed: {e}", dir.join(OUTPUT).display()))?;
    let log = Arc::new(Mutex::new(log));

    if config.oci.is_some() {
        // The OCI runtime exits once the task runs: its init is then reparented to the shim.
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .map_err(|e| format!("becoming the task's subreaper failed: {e}"))?;
    }
    let mut child = match &config.oci {
        Some(oci) => launch_oci(oci)?,
        None => launch_unshare(dir, &config)?,
    };
    let started_at_ms = now_ms();

    let last_stderr = Arc::new(Mutex::new(String::new()));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut pumps = 0;
    if let Some(out) = child.stdout.take() {
        spawn_pump(out, LogStream::Stdout, log.clone(), None, done_tx.clone());
        pumps += 1;
    }
    if let Some(err) = child.stderr.take() {
        spawn_pump(err, LogStream::Stderr, log.clone(), Some(last_stderr.clone()), done_tx.clone());
        pumps += 1;
    }
    drop(done_tx);

    state.launcher = procfs::proc_ref(child.id());
    // A detached OCI runtime's own exit: success once the task runs, else why it did not start.
    let mut launched = None;
    state.task = match &config.oci {
        Some(oci) => {
            let status = wait_child(&mut child)?;
            launched = Some(status);
            match status.success().then(|| find_container(oci)) {
                Some(None) => {
                    // Started, by the runtime's word, yet nowhere to be found: nothing would
                    // supervise it, so it goes.
                    delete_container(oci);
                    return Err(format!(
                        "{} reported the task started but gave no pid for it (no {} and no running state); it \
                         was removed",
                        oci.runtime.display(),
                        oci.pid_file().display()
                    ));
                }
                Some(found) => found,
                None => None,
            }
        }
        None => find_task(&mut child),
    };
    state.started_at_ms = started_at_ms;
    write_state(dir, &state)?;
    match state.task {
        Some(t) => eprintln!("berth task-shim: task {} runs as host pid {}", config.task_id, t.pid),
        None => eprintln!("berth task-shim: the launcher of task {} ended before its task was seen", config.task_id),
    }

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let (Some(fence), Some(launcher)) = (config.fence.clone(), state.launcher) {
        let (done, fenced) = (done.clone(), fenced.clone());
        let task = state.task.map(|t| t.pid);
        // A detached OCI runtime has exited and been reaped: its process group id may be
        // another's by now.
        let group = launched.is_none().then_some(launcher.pid);
        std::thread::spawn(move || enforce_fence(&fence, group, task, started_at_ms, &done, &fenced));
    }
    let status = match (launched, state.task) {
        (Some(_), Some(task)) => wait_reaped(task.pid)?,
        (Some(failed), None) => failed,
        (None, _) => wait_child(&mut child)?,
    };
    if let (Some(oci), Some(_)) = (&config.oci, launched) {
        // What the runtime keeps of the stopped container (its state and cgroup), as a
        // foreground run would have removed it; the agent's remove deletes any leftover.
        delete_container(oci);
    }
    let deadline = Instant::now() + DRAIN_PATIENCE;
    for _ in 0..pumps {
        if done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
            eprintln!("berth task-shim: output still open {DRAIN_PATIENCE:?} after the task ended; not waiting longer");
            break;
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let last = last_stderr.lock().map(|l| l.clone()).unwrap_or_default();
    let launcher = config.oci.as_ref().map_or(&config.unshare, |o| &o.runtime);
    let mut rec = exit_record(status, state.task.is_some(), &last, launcher);
    if !config.init.is_empty() || config.oci.is_some() {
        rec = init_exit(rec);
    }
    if fenced.load(std::sync::atomic::Ordering::SeqCst) {
        // Marked as a fence stop, so that the masters restart the slot without counting a failure.
        rec.message = format!(
            "{} stopped by its supervisor, as the agent had not heard from the leader within the fence timeout \
             (at-most-once); {}",
            berth_types::task::FENCE_STOP_PREFIX,
            rec.message
        );
    }
    eprintln!("berth task-shim: task {}: {}", config.task_id, rec.message);
    files::write_json(&dir.join(EXIT), &rec).map_err(|e| format!("recording the task's exit in {EXIT} failed: {e}"))
}

/// Starts a privileged task: `unshare` into its namespaces, with the shim's init as PID 1.
fn launch_unshare(dir: &Path, config: &ShimConfig) -> Result<std::process::Child, String> {
    // A task on networks runs in the namespace its agent made: the shim enters it, and the
    // launcher and the task inherit it.
    if let Some(netns) = &config.netns {
        let file = std::fs::File::open(netns)
            .map_err(|e| format!("opening the task's network namespace {} failed: {e}", netns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the task's network namespace {} failed: {e}", netns.display()))?;
    }
    let mut init_args = config.init.clone();
    if let Some(text) = &config.resolv_conf
        && !init_args.is_empty()
    {
        let path = dir.join("resolv.conf");
        std::fs::write(&path, text).map_err(|e| format!("writing {} failed: {e}", path.display()))?;
        init_args.push(init::RESOLV_FLAG.to_string());
        init_args.push(path.to_string_lossy().into_owned());
    }
    // The binds are made by the init, in the task's mount namespace; the working directory may
    // be one of them, so the launcher starts in `/` then and the init enters it afterwards.
    let mut workdir = config.workdir.clone();
    if !config.binds.is_empty() && !init_args.is_empty() {
        let path = dir.join(super::mounts::MOUNTS_FILE);
        let m = super::mounts::InitMounts { binds: config.binds.clone(), workdir: Some(config.workdir.clone()) };
        files::write_json(&path, &m).map_err(|e| format!("writing {} failed: {e}", path.display()))?;
        init_args.push(init::MOUNTS_FLAG.to_string());
        init_args.push(path.to_string_lossy().into_owned());
        if !workdir.is_dir() {
            workdir = PathBuf::from("/");
        }
    } else if !config.binds.is_empty() {
        return Err("the task has volumes, secrets or configs, which need the task's init; restart it".into());
    }
    let mut launcher = Command::new(&config.unshare);
    launcher.args(unshare_flags(rootless())).arg("--");
    if !init_args.is_empty() {
        launcher.args(&init_args).arg("--");
    }
    launcher
        .args(&config.argv)
        .env_clear()
        .envs(&config.env)
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            format!(
                "starting {} (in {}) failed: {e}; check util-linux is installed and the working directory exists",
                config.unshare.display(),
                config.workdir.display()
            )
        })
}

/// Starts a sandboxed task: the OCI runtime in the foreground, with the bundle the runtime
/// wrote (argv, environment, namespaces, mounts and limits are all in its config).
fn launch_oci(oci: &super::oci::OciLaunch) -> Result<std::process::Child, String> {
    // A pid file left by an earlier start of this bundle would name a process long gone.
    let _ = std::fs::remove_file(oci.pid_file());
    Command::new(&oci.runtime)
        .args(oci.run_args())
        .env_clear()
        .env("PATH", super::DEFAULT_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the OCI runtime {} failed: {e}; install runc or crun", oci.runtime.display()))
}

/// At-most-once: kills the task's process group once the agent's lease is older than the fence
/// timeout. It runs in the shim, not the agent, so it holds while the agent is frozen or dead.
fn enforce_fence(
    fence: &files::Fence,
    launcher: Option<u32>,
    task: Option<u32>,
    started_at_ms: i64,
    done: &std::sync::atomic::AtomicBool,
    fenced: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering::SeqCst;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if done.load(SeqCst) {
            return;
        }
        let lease = std::fs::read_to_string(&fence.lease)
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(started_at_ms)
            .max(started_at_ms);
        if now_ms() - lease > fence.timeout_ms as i64 {
            eprintln!("berth task-shim: no leader contact for {} ms; stopping the at-most-once task", now_ms() - lease);
            fenced.store(true, SeqCst);
            if done.load(SeqCst) {
                return;
            }
            // The task is PID 1 of its namespace: killing it ends everything in it, also when
            // an OCI runtime started it in a process group of its own.
            if let Some(pid) = task.and_then(|t| rustix::process::Pid::from_raw(t as i32)) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            if let Some(pid) = launcher.and_then(|l| rustix::process::Pid::from_raw(l as i32)) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            return;
        }
    }
}

fn write_state(dir: &Path, state: &ShimState) -> Result<(), String> {
    files::write_json(&dir.join(STATE), state).map_err(|e| format!("writing {} failed: {e}", dir.join(STATE).display()))
}

/// The launcher's child: the task, PID 1 of its namespace, as seen from the host.
fn find_task(child: &mut std::process::Child) -> Option<files::ProcRef> {
    let deadline = Instant::now() + FIND_TASK_PATIENCE;
    loop {
        if let Some(task) = procfs::children(child.id()).into_iter().find_map(procfs::proc_ref) {
            return Some(task);
        }
        if !matches!(child.try_wait(), Ok(None)) || Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A sandboxed task's init, once the detached runtime has exited successfully: the pid it
/// wrote (the init has exec'd by then). `runc state` answers for a runtime that wrote no pid file.
fn find_container(oci: &super::oci::OciLaunch) -> Option<files::ProcRef> {
    if let Some(pid) = std::fs::read_to_string(oci.pid_file()).ok().and_then(|t| t.trim().parse::<u32>().ok()) {
        return procfs::proc_ref(pid);
    }
    let out = Command::new(&oci.runtime).args(oci.state_args()).stdin(Stdio::null()).output().ok()?;
    let (status, pid) = super::oci::parse_state(&out.stdout)?;
    (pid > 0 && status == "running").then(|| procfs::proc_ref(pid)).flatten()
}

/// `runc delete --force` of the task's container; what fails is left to the agent's remove.
fn delete_container(oci: &super::oci::OciLaunch) {
    let _ = Command::new(&oci.runtime)
        .args(oci.delete_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for the launcher.
fn wait_child(child: &mut std::process::Child) -> Result<ExitStatus, String> {
    loop {
        match child.wait() {
            Ok(status) => return Ok(status),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("waiting for the task failed: {e}")),
        }
    }
}

/// Waits for the task `pid`, which the shim adopted as a subreaper, reaping any other orphan
/// that comes its way meanwhile.
fn wait_reaped(pid: u32) -> Result<ExitStatus, String> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(Some((p, status))) if p.as_raw_nonzero().get() as u32 == pid => {
                return Ok(ExitStatus::from_raw(status.as_raw()));
            }
            Ok(_) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("waiting for the task (pid {pid}) failed: {e}")),
        }
    }
}

/// The exit code (128+N for signal N) and a message.
pub(crate) fn exit_record(status: ExitStatus, task_seen: bool, last_stderr: &str, unshare: &Path) -> ExitRecord {
    let (code, mut message) = match (status.code(), status.signal()) {
        (Some(code), _) => (code, format!("exited with code {code}")),
        (None, Some(sig)) => (128 + sig, format!("killed by signal {} ({sig})", signal_name(sig))),
        (None, None) => (-1, format!("ended with an unknown status ({status})")),
    };
    // util-linux before 2.39 cannot re-raise SIGKILL on itself when its child was killed by
    // it: it says so and exits 1 instead. Nothing else makes `signal()` fail with EINVAL.
    if code == 1 && last_stderr.contains("sigprocmask unblock failed") && last_stderr.ends_with("Invalid argument") {
        return ExitRecord {
            code: 128 + 9,
            finished_at_ms: now_ms(),
            message: format!("killed by signal {} (9)", signal_name(9)),
            started: true,
        };
    }
    // The OCI runtime could not set the task up: it never ran.
    if let Some(why) = super::oci::runtime_error(last_stderr) {
        return ExitRecord {
            code,
            finished_at_ms: now_ms(),
            message: format!("the OCI runtime {} could not start the task: {why}", unshare.display()),
            started: false,
        };
    }
    // The task's init could not make its mounts: that is why it ended.
    if code == 127
        && let Some(why) = last_stderr.strip_prefix(init::SAYS)
    {
        return ExitRecord { code, finished_at_ms: now_ms(), message: why.trim().to_string(), started: task_seen };
    }
    let launcher_said = last_stderr.starts_with("unshare:");
    let started = task_seen || !launcher_said;
    if !started {
        // unshare is refused namespaces: say what would allow them.
        let hint = if last_stderr.ends_with("Operation not permitted") {
            "; run the agent as root, or (rootless) allow unprivileged user namespaces: \
             sysctl user.max_user_namespaces above 0, and on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0"
        } else {
            ""
        };
        message = format!(
            "the namespace launcher {} failed ({message}): {last_stderr}; the task never ran{hint}",
            unshare.display()
        );
    } else if launcher_said {
        message = format!("{message}: {last_stderr}");
    }
    ExitRecord { code, finished_at_ms: now_ms(), message, started }
}

/// An exit through the task's init, which reports a program killed by signal N as code 128+N
/// (as a shell does): said as the signal it was.
fn init_exit(mut rec: ExitRecord) -> ExitRecord {
    if rec.started && (129..=128 + 64).contains(&rec.code) && rec.message == format!("exited with code {}", rec.code) {
        let sig = rec.code - 128;
        rec.message = format!("killed by signal {} ({sig})", signal_name(sig));
    }
    rec
}

/// The usual name of a signal.
pub(crate) fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

fn spawn_pump(
    reader: impl Read + Send + 'static,
    stream: LogStream,
    log: Arc<Mutex<RotatingLog>>,
    last: Option<Arc<Mutex<String>>>,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut failed = false;
        split_lines(reader, |text| {
            if let Some(last) = &last
                && !text.trim().is_empty()
                && let Ok(mut last) = last.lock()
            {
                *last = text.to_string();
            }
            // Stamped under the log's lock: a line stamped earlier than another must not be
            // written after it (stdout and stderr have a pump each).
            let result = log.lock().map_err(|_| std::io::Error::other("log lock poisoned")).and_then(|mut l| {
                let line = LogLine { ts_ms: l.stamp(now_ms()), stream, line: text.to_string() };
                l.append(&line)
            });
            match result {
                Ok(()) => failed = false,
                Err(e) if !failed => {
                    failed = true;
                    eprintln!("berth task-shim: writing the task's output failed (dropping lines until it works): {e}");
                }
                Err(_) => {}
            }
        });
        let _ = done.send(());
    });
}

/// Calls `emit` with every line read (without its `\n` or `\r\n`), splitting lines longer than
/// [`MAX_LINE`] bytes at a character boundary; invalid UTF-8 is replaced.
pub(crate) fn split_lines(reader: impl Read, mut emit: impl FnMut(&str)) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut line: Vec<u8> = Vec::new();
    let mut out = |bytes: &[u8]| {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        emit(&String::from_utf8_lossy(bytes));
    };
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => &[][..],
        };
        if buf.is_empty() {
            if !line.is_empty() {
                out(&line);
            }
            return;
        }
        let (chunk, consumed, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        line.extend_from_slice(chunk);
        reader.consume(consumed);
        while line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            // Back up to a character boundary (at most 3 continuation bytes).
            while cut > MAX_LINE - 3 && line[cut] & 0xC0 == 0x80 {
                cut -= 1;
            }
            out(&line[..cut]);
            line.drain(..cut);
        }
        if complete {
            out(&line);
            line.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(input: &[u8]) -> Vec<String> {
        let mut v = Vec::new();
        split_lines(input, |l| v.push(l.to_string()));
        v
    }

    /// A task started with the rootless flags by an unprivileged user runs as PID 1 of its own
    /// namespaces, and a command entered with the rootless `nsenter` flags sees them; without
    /// the user namespace, the same start is refused. As root, the test drops to `nobody` with
    /// util-linux's `setpriv` first.
    #[test]
    fn a_rootless_agent_starts_and_enters_its_tasks_namespaces() {
        let drop_root: Vec<&str> = if rootless() {
            Vec::new()
        } else {
            vec!["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
        };
        let run = |argv: Vec<&str>| {
            let argv: Vec<&str> = drop_root.iter().copied().chain(argv).collect();
            Command::new(argv[0]).args(&argv[1..]).stdin(Stdio::null()).output().unwrap()
        };
        let script = "echo pid=$$; exec sleep 30";
        let mut start = vec!["/usr/bin/unshare"];
        start.extend(unshare_flags(true));
        start.extend(["--", "/bin/sh", "-c", script]);
        // Kept running while a command enters its namespaces.
        let argv: Vec<&str> = drop_root.iter().copied().chain(start.iter().copied()).collect();
        let mut launcher = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        let read = BufReader::new(launcher.stdout.take().unwrap()).read_line(&mut first);
        // `setpriv` execs `unshare`, which forks the task.
        let target = procfs::children(launcher.id()).first().map(u32::to_string).unwrap_or_default();
        let mut enter = vec!["/usr/bin/nsenter", "--target", target.as_str()];
        enter.extend(nsenter_flags(true));
        enter.extend(["--", "/bin/sh", "-c", "echo pid=$$ uid=$(id -u)"]);
        let entered = run(enter);
        // Ended before any assertion, so a failing test leaves no task behind.
        let _ = launcher.kill();
        let _ = launcher.wait();
        read.unwrap();
        assert_eq!(first.trim(), "pid=1", "the task is PID 1 of its namespace");
        let out = String::from_utf8_lossy(&entered.stdout);
        assert!(entered.status.success(), "nsenter failed: {}", String::from_utf8_lossy(&entered.stderr));
        assert!(out.contains("uid=0") && !out.starts_with("pid=1 "), "entered the task's namespaces: {out}");

        let mut refused = vec!["/usr/bin/unshare"];
        refused.extend(unshare_flags(false));
        refused.extend(["--", "/bin/true"]);
        assert!(!run(refused).status.success(), "without a user namespace an unprivileged start is refused");
    }

    #[test]
    fn splits_lines() {
        assert_eq!(lines_of(b"a\nb\r\n\nlast"), ["a", "b", "", "last"]);
        assert_eq!(lines_of(b""), Vec::<String>::new());
        assert_eq!(lines_of(b"x\n"), ["x"]);
        assert_eq!(lines_of(b"bad \xff byte\n"), ["bad \u{fffd} byte"]);
    }

    #[test]
    fn long_lines_are_cut_at_character_boundaries() {
        let mut input = vec![b'a'; MAX_LINE - 1];
        input.extend_from_slice("é".as_bytes()); // two bytes straddling the limit
        input.extend_from_slice(b"tail\n");
        let lines = lines_of(&input);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE - 1);
        assert_eq!(lines[1], "étail");
        let huge = vec![b'z'; MAX_LINE * 3 + 5];
        let lines = lines_of(&huge);
        assert_eq!(lines.iter().map(String::len).collect::<Vec<_>>(), [MAX_LINE, MAX_LINE, MAX_LINE, 5]);
    }

    #[test]
    fn exit_codes_and_messages() {
        let unshare = Path::new("/usr/bin/unshare");
        let code = |raw: i32, seen: bool, err: &str| exit_record(ExitStatus::from_raw(raw), seen, err, unshare);
        let r = code(3 << 8, true, "");
        assert_eq!((r.code, r.message.as_str(), r.started), (3, "exited with code 3", true));
        let r = code(9, true, "");
        assert_eq!((r.code, r.message.as_str()), (137, "killed by signal SIGKILL (9)"));
        assert_eq!(code(15, true, "").code, 143);
        let r = code(1 << 8, false, "unshare: unshare failed: Operation not permitted");
        assert!(!r.started);
        assert!(r.message.contains("namespace launcher /usr/bin/unshare failed"), "{}", r.message);
        assert!(r.message.contains("Operation not permitted"), "{}", r.message);
        let r = code(127 << 8, true, "unshare: failed to execute nope: No such file or directory");
        assert!(r.started);
        assert_eq!(r.message, "exited with code 127: unshare: failed to execute nope: No such file or directory");
        let r = code(1 << 8, true, "unshare: sigprocmask unblock failed: Invalid argument");
        assert_eq!((r.code, r.message.as_str()), (137, "killed by signal SIGKILL (9)"));
        assert_eq!(code(1 << 8, true, "unshare: sigprocmask unblock failed: Other").code, 1);
        // A task that exits before the shim saw it still counts as started.
        assert!(code(1 << 8, false, "my own error").started);
        assert_eq!(signal_name(64), "signal 64");
    }

    #[test]
    fn bad_usage() {
        assert_eq!(shim_main(vec![]), 2);
        assert_eq!(shim_main(vec!["a".into(), "b".into()]), 2);
    }

    #[test]
    fn missing_config_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(shim_main(vec![dir.path().into()]), 1);
        let rec: ExitRecord = files::read_json(&dir.path().join(EXIT)).unwrap().unwrap();
        assert_eq!(rec.code, -1);
        assert!(!rec.started);
        assert!(rec.message.contains("config.json does not exist"), "{}", rec.message);
    }
}
