//! The `berth` binary: argument parsing, config files and output formatting. The only crate that
//! knows clap; everything it runs lives in the library crates.

mod bench;
mod bench_cluster;
mod client;
mod cmd_cluster;
mod cmd_kv;
mod config;
mod dev;
mod output;

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::output::Format;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "berth: a container orchestrator whose control plane needs no etcd",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

/// Flags accepted before or after any subcommand.
#[derive(Args, Clone, Debug)]
pub struct Global {
    /// Client config file (the berth.toml that `berth dev` writes).
    #[arg(long, global = true, env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Master endpoints, HOST:PORT,HOST:PORT,... (overrides --config).
    #[arg(long, global = true, env = "BERTH_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Output format of read commands.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a master.
    Master(MasterArgs),
    /// Run a local HA cluster: every master a child process, until Ctrl-C.
    Dev(dev::DevArgs),
    /// Read and write keys.
    #[command(subcommand)]
    Kv(cmd_kv::KvCmd),
    /// Cluster state.
    #[command(subcommand)]
    Cluster(cmd_cluster::ClusterCmd),
    /// Master membership.
    #[command(subcommand)]
    Member(cmd_cluster::MemberCmd),
    /// Backups and disaster recovery.
    #[command(subcommand)]
    Snapshot(cmd_cluster::SnapshotCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

#[derive(Args, Debug)]
struct MasterArgs {
    /// This master's id (first start only; a restart reads it from --data-dir).
    #[arg(long)]
    id: Option<u64>,
    /// Address for gRPC (clients and the other masters). Defaults to this master's entry in
    /// --initial-cluster, or on a restart to the address recorded in --data-dir.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Where this master keeps its Raft log, state and snapshots.
    #[arg(long)]
    data_dir: PathBuf,
    /// The founding members, ID=HOST:PORT,... (first start of a new cluster only).
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Start empty and wait to be added with `berth member add` (a new member of a running cluster).
    #[arg(long)]
    join: bool,
    /// How often the leader sends heartbeats.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    heartbeat_interval: Duration,
    /// Minimum election timeout (the maximum is twice this).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "300ms")]
    election_timeout: Duration,
    /// Snapshot the state and purge the log after this many entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_logs: u64,
    /// Largest value a client may write, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_value_bytes: usize,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,h2=warn,tower=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Cancels the token on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        t.cancel();
    });
    token
}

async fn run_master(a: MasterArgs) -> Result<()> {
    let mut cfg = berth_master::MasterConfig::new(a.data_dir);
    cfg.id = a.id;
    cfg.listen = a.listen;
    cfg.initial_cluster = a.initial_cluster.as_deref().map(berth_master::parse_initial_cluster).transpose()?;
    cfg.join = a.join;
    cfg.heartbeat_interval = a.heartbeat_interval;
    cfg.election_timeout = a.election_timeout;
    cfg.snapshot_logs = a.snapshot_logs;
    cfg.max_value_bytes = a.max_value_bytes;
    berth_master::run_master(cfg, shutdown_on_signals()).await?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("building the tokio runtime");
    let res = rt.block_on(async move {
        match cli.command {
            Cmd::Master(a) => {
                init_tracing();
                run_master(a).await
            }
            Cmd::Dev(a) => dev::run(a, &cli.global).await,
            Cmd::Kv(c) => cmd_kv::run(c, &cli.global).await,
            Cmd::Cluster(c) => cmd_cluster::run_cluster(c, &cli.global).await,
            Cmd::Member(c) => cmd_cluster::run_member(c, &cli.global).await,
            Cmd::Snapshot(c) => cmd_cluster::run_snapshot(c, &cli.global).await,
            Cmd::Bench(c) => bench::run(c, &cli.global).await,
        }
    });
    if let Err(e) = res {
        eprintln!("error: {}", output::describe(&e));
        std::process::exit(1);
    }
}
