//! The task's init: PID 1 of its PID namespace, as tini and catatonit are for containers.
//!
//! The kernel drops every signal sent to a namespace's init for which that process installed
//! no handler. A program run directly as PID 1 (a shell script, Python's `http.server`) would
//! therefore ignore SIGTERM, and every stop would wait out the whole grace period. Instead the
//! shim starts `<shim> --init -- argv` as PID 1, which:
//!
//! - blocks every catchable signal and takes them synchronously (`sigwait`);
//! - starts the program (PID 2) with an empty signal mask and default dispositions (through
//!   `<shim> --exec`, which clears the mask it inherits, then execs the program);
//! - forwards every signal it receives, except SIGCHLD, to the program;
//! - reaps every child that ends, re-parented orphans included, so no zombie accumulates;
//! - exits as soon as the program ends, with its exit code (128+N for signal N). The kernel then
//!   kills whatever else still runs in the namespace, so one ended program leaves nothing behind.
//!
//! It runs before any thread or async runtime exists (the shim's entry point dispatches to it
//! first), so blocking signals in this one thread blocks them for the process.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// The argument that makes the shim act as the task's init: `<shim> --init -- argv...`.
pub(crate) const INIT_FLAG: &str = "--init";
/// The argument that makes the shim clear its signal mask and exec `argv`: how the init starts
/// the program, since a child inherits the mask of the thread that spawns it.
pub(crate) const EXEC_FLAG: &str = "--exec";

/// `--resolv-conf FILE` after `--init`: the init bind-mounts FILE over /etc/resolv.conf in the
/// task's mount namespace before starting the program.
pub(crate) const RESOLV_FLAG: &str = "--resolv-conf";

/// `--mounts FILE` after `--init`: the init makes the binds FILE lists (`mounts::InitMounts`) in
/// the task's mount namespace before starting the program.
pub(crate) const MOUNTS_FLAG: &str = "--mounts";

/// How the init's own error lines start (the shim reports them as the task's end).
pub(crate) const SAYS: &str = "berth init: ";

/// Exit code when the program cannot be executed (as a shell reports it).
const EXEC_FAILED: i32 = 127;

/// Runs `argv` as the namespace's init would; returns the exit code to exit with.
pub(crate) fn init_main(
    argv: &[OsString],
    resolv_conf: Option<&std::path::Path>,
    mounts: Option<&std::path::Path>,
) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("usage: task-shim --init -- PROGRAM [ARGS...] (started by the shim, not by hand)");
        return 2;
    };
    // The mount namespace is the task's own (unshare --mount makes its mounts private), so this
    // changes nothing outside it.
    if let Some(file) = resolv_conf
        && let Err(e) =
            nix::mount::mount(Some(file), "/etc/resolv.conf", None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
    {
        eprintln!("berth init: giving the task its resolv.conf ({}) failed: {e}", file.display());
        return EXEC_FAILED;
    }
    if let Some(file) = mounts {
        let made = super::files::read_json::<super::mounts::InitMounts>(file)
            .map_err(|e| format!("reading the task's mounts failed: {e}"))
            .and_then(|m| m.ok_or_else(|| format!("{} is missing", file.display())))
            .and_then(|m| super::mounts::apply(&m));
        if let Err(e) = made {
            eprintln!("{SAYS}{e}");
            return EXEC_FAILED;
        }
    }
    // Every standard signal is blocked before the program exists, so none is lost: they wait
    // pending until `sigwait` takes them. Real-time signals stay unblocked; with no handler, the
    // kernel drops them for an init.
    let mut set = SigSet::empty();
    for sig in Signal::iterator() {
        set.add(sig);
    }
    if let Err(e) = set.thread_block() {
        eprintln!("berth init: blocking signals failed: {e}");
        return EXEC_FAILED;
    }
    // A child inherits the spawning thread's signal mask, and this one blocks everything: the
    // program is started through `<shim> --exec`, which clears the mask and then becomes the
    // program (same pid).
    let me: Vec<OsString> = std::env::args_os().take_while(|a| a != INIT_FLAG).collect();
    let Some((shim, shim_args)) = me.split_first() else {
        eprintln!("berth init: cannot tell how this program was started");
        return EXEC_FAILED;
    };
    let child = match Command::new(shim).args(shim_args).arg(EXEC_FLAG).arg("--").arg(program).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("berth init: cannot start {}: {e}", shim.to_string_lossy());
            return EXEC_FAILED;
        }
    };
    supervise(Pid::from_raw(child.id() as i32), &set)
}

/// `<shim> --exec -- argv`: clears the signal mask and replaces this process with `argv`.
/// Returns only when that fails, with the code a shell would give.
pub(crate) fn exec_main(argv: &[OsString]) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("usage: task-shim --exec -- PROGRAM [ARGS...] (started by the task's init, not by hand)");
        return 2;
    };
    if let Err(e) = SigSet::empty().thread_set_mask() {
        eprintln!("berth init: clearing the signal mask failed: {e}");
        return EXEC_FAILED;
    }
    let e = Command::new(program).args(args).exec();
    eprintln!("berth init: cannot execute {}: {e}", program.to_string_lossy());
    if e.kind() == std::io::ErrorKind::NotFound { EXEC_FAILED } else { 126 }
}

/// Forwards signals to `child` and reaps children until `child` has ended.
fn supervise(child: Pid, set: &SigSet) -> i32 {
    loop {
        // Children that ended (the program, and orphans re-parented to us) are reaped first:
        // their SIGCHLD may have been taken already.
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return code,
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return 128 + sig as i32,
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) => {}
            Ok(sig) => {
                let _ = kill(child, sig);
            }
            Err(e) => {
                eprintln!("berth init: waiting for signals failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// A wait status as a shell reports it: the exit code, or 128+N for signal N.
#[cfg(test)]
fn code_of(status: WaitStatus) -> i32 {
    match status {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
        _ => EXEC_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_read_as_a_shell_reads_them() {
        let pid = Pid::from_raw(7);
        assert_eq!(code_of(WaitStatus::Exited(pid, 3)), 3);
        assert_eq!(code_of(WaitStatus::Exited(pid, 0)), 0);
        assert_eq!(code_of(WaitStatus::Signaled(pid, Signal::SIGTERM, false)), 128 + 15);
        assert_eq!(code_of(WaitStatus::Signaled(pid, Signal::SIGKILL, true)), 128 + 9);
    }
}
