//! `berth-task-shim <task dir>`: the process runtime's per-task supervisor as its own binary,
//! for the agent crate's tests. Production uses the `berth` binary's `task-shim` subcommand,
//! which runs the same [`berth_agent::driver::process::shim_main`].

fn main() {
    std::process::exit(berth_agent::driver::process::shim_main(std::env::args_os().skip(1).collect()));
}
