//! The `berth` binary: argument parsing, config files and output formatting. The only crate that
//! knows clap; everything it runs lives in the library crates.

mod bench;
mod bench_cluster;
mod bench_overlay;
mod client;
mod cmd_access;
mod cmd_cluster;
mod cmd_console;
mod cmd_events;
mod cmd_images;
mod cmd_kv;
mod cmd_networks;
mod cmd_nodes;
mod cmd_pki;
mod cmd_routes;
mod cmd_services;
mod cmd_storage;
mod config;
mod dev;
mod dev_hosts;
mod output;
mod progress;
mod wait;

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
    /// The cluster CA certificate (PEM), to verify the masters.
    #[arg(long, global = true, env = "BERTH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// This client's certificate (PEM), e.g. the admin.crt of `berth pki init`.
    #[arg(long = "cert", id = "client_cert", global = true, env = "BERTH_CERT")]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long = "key", id = "client_key", global = true, env = "BERTH_KEY")]
    pub key: Option<PathBuf>,
    /// Output format of read commands.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a master.
    Master(MasterArgs),
    /// Run a node agent: join with a token once, then keep a session with the leader.
    Agent(AgentArgs),
    /// Run a local HA cluster: masters and agents as child processes, until Ctrl-C.
    Dev(dev::DevArgs),
    /// The cluster CA and admin credentials.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Bootstrap tokens for adding hosts.
    #[command(subcommand)]
    Token(cmd_nodes::TokenCmd),
    /// Secrets tasks mount as files: stored encrypted, never printed.
    #[command(subcommand)]
    Secret(cmd_storage::FileCmd),
    /// Configs tasks mount as files.
    #[command(subcommand)]
    Config(cmd_storage::FileCmd),
    /// Images for `runtime: oci` tasks: in the cluster, for nodes without a registry (or, with
    /// --local, on this node).
    #[command(subcommand)]
    Image(cmd_images::ImageCmd),
    /// Create or update services, networks and volumes from YAML/JSON files.
    Apply(cmd_services::ApplyArgs),
    /// List services, tasks or nodes.
    #[command(subcommand)]
    Get(cmd_services::GetCmd),
    /// Show one object in detail.
    #[command(subcommand)]
    Describe(cmd_services::DescribeCmd),
    /// Set the number of replicas of services: `berth scale web=3 api=2`.
    Scale(cmd_services::ScaleArgs),
    /// Follow, pause, resume or undo a service's rollout.
    #[command(subcommand)]
    Rollout(cmd_services::RolloutCmd),
    /// Delete objects.
    #[command(subcommand)]
    Delete(cmd_services::DeleteCmd),
    /// Print the logs of a service's tasks or of one task.
    Logs(cmd_services::LogsArgs),
    /// Change or remove a node.
    #[command(subcommand)]
    Node(cmd_nodes::NodeCmd),
    /// Read and write keys.
    #[command(subcommand)]
    Kv(cmd_kv::KvCmd),
    /// Cluster state.
    #[command(subcommand)]
    Cluster(cmd_cluster::ClusterCmd),
    /// Master membership.
    #[command(subcommand)]
    Member(cmd_cluster::MemberCmd),
    /// Certificates: revoke one, or an identity's; list the revocations.
    #[command(subcommand)]
    Cert(cmd_cluster::CertCmd),
    /// Backups and disaster recovery.
    #[command(subcommand)]
    Snapshot(cmd_cluster::SnapshotCmd),
    /// Users: add one with a role (its certificate from a key made here), list, remove.
    #[command(subcommand)]
    User(cmd_access::UserCmd),
    /// Roles and their bindings (applied as `kind: Role` / `kind: RoleBinding` documents).
    #[command(subcommand)]
    Role(cmd_access::RoleCmd),
    /// The cluster CA: rotate it (a new CA, the old one retired once everything moved).
    #[command(subcommand)]
    Ca(cmd_access::CaCmd),
    /// The audit log: every change and every refused call, who made it and what came of it.
    Audit(cmd_access::AuditArgs),
    /// Cluster events: nodes up and down, task failures, rollouts, leader elections, members,
    /// tokens used (kept an hour, at most 10,000).
    Events(cmd_events::EventsArgs),
    /// The web console (`berth master --console-listen`): issue, list and revoke its login tokens.
    #[command(subcommand)]
    Console(cmd_console::ConsoleCmd),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// This client's version and every master's.
    Version,
    /// Print the shell completion script: `berth completion bash > /etc/bash_completion.d/berth`,
    /// `berth completion zsh > "${fpath[1]}/_berth"`, `berth completion fish >
    /// ~/.config/fish/completions/berth.fish`.
    Completion(CompletionArgs),
    /// Write the man pages (berth.1, and berth-SUBCOMMAND.1 for each subcommand) into a
    /// directory: `berth man --out /usr/local/share/man/man1`.
    Man(ManArgs),
}

#[derive(Args)]
struct CompletionArgs {
    /// The shell: bash, zsh, fish (or elvish, powershell).
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Args)]
struct ManArgs {
    /// The directory to write them into (created if missing).
    #[arg(long, default_value = "man")]
    out: PathBuf,
}

/// Writes `shell`'s completion script for berth's commands and flags into `out`.
fn completion(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "berth", out);
}

/// Prints `shell`'s completion script. A reader that stops early (`| head`) is not an error.
fn print_completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write;
    let mut script = Vec::new();
    completion(shell, &mut script);
    match std::io::stdout().lock().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("cannot write the completion script to standard output: {e}"))
        }
        _ => Ok(()),
    }
}

/// Writes berth's man pages into `dir`: one for berth, one for each subcommand at every depth.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create the cluster CA and an admin certificate (run once, on a master host, before the
    /// first start of the founding masters; give each of them the directory with --pki-dir).
    Init(cmd_pki::PkiInitArgs),
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Masters to join through, HOST:PORT,... (their gRPC port; QUIC uses the same number over UDP).
    #[arg(long, value_delimiter = ',', required = true)]
    join: Vec<String>,
    /// Bootstrap token from `berth token create` (first start only). On the command line it is
    /// visible to every user of the host (`ps`): prefer BERTH_JOIN_TOKEN or --token-file.
    #[arg(long, env = "BERTH_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the bootstrap token (first start only).
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// Where the agent keeps its identity, certificates and state.
    #[arg(long)]
    data_dir: PathBuf,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Node labels, k=v,...
    #[arg(long, value_delimiter = ',', value_parser = cmd_nodes::parse_label)]
    labels: Vec<(String, String)>,
    /// Address other hosts reach this one on.
    #[arg(long)]
    advertise_addr: Option<std::net::IpAddr>,
    /// Run N simulated agents in this process (for scale tests): each its own identity, QUIC
    /// connection and heartbeats, with a driver that only pretends to run tasks.
    #[arg(long)]
    simulate: Option<usize>,
    /// With --simulate: the simulated agents take part in networks (in memory, no kernel state)
    /// and log each change of their endpoints to DATA_DIR/endpoints.jsonl (benchmarks).
    #[arg(long, requires = "simulate")]
    simulate_networks: bool,
    /// The DNS domain under which tasks find services: `NAME.NAMESPACE.svc.<domain>`.
    #[arg(long, default_value = "berth.internal", value_parser = parse_cluster_domain)]
    cluster_domain: String,
    /// Lets `driver: host` volumes use paths under this absolute PREFIX on this node (repeat
    /// for more; compared by whole path components). Without any, host volumes are refused.
    #[arg(long = "allow-host-path", value_name = "PREFIX", value_parser = parse_host_path_prefix)]
    allow_host_paths: Vec<PathBuf>,
    /// Lets tasks ask for `privileged: true`: no sandbox (host root, every capability, no
    /// seccomp filter, the host's filesystem). Without it such tasks are refused.
    #[arg(long)]
    allow_privileged: bool,
    /// The OCI runtime (runc or crun) sandboxed process tasks run through; default: the first
    /// of runc and crun found.
    #[arg(long, value_name = "PATH")]
    oci_runtime: Option<PathBuf>,
    /// Pulls images from this registry (HOST:PORT) over plain HTTP (repeat for more);
    /// registries on loopback addresses always are.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Removes unused images, least recently used first, once the node's images take more than
    /// this (e.g. 10Gi).
    #[arg(long, value_name = "SIZE", default_value = "10Gi", value_parser = parse_size)]
    image_gc_threshold: u64,
    /// Run an edge router on this node: it serves the cluster's routes with HAProxy (needs root
    /// and networks, like the overlay). A node labelled role=edge is one too.
    #[arg(long)]
    edge: bool,
    /// Where an edge serves routes over plain HTTP.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:80")]
    edge_http: std::net::SocketAddr,
    /// Where an edge serves routes over TLS.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:443")]
    edge_https: std::net::SocketAddr,
    /// On an edge: answer DNS for this zone (each route's host -> the serving edges).
    #[arg(long, value_name = "DOMAIN")]
    apps_domain: Option<String>,
    /// Where the apps domain's DNS listens (UDP; default: the advertise address, port 53).
    #[arg(long, value_name = "ADDR:PORT", requires = "apps_domain")]
    apps_dns: Option<std::net::SocketAddr>,
    /// The HAProxy program the edge router runs.
    #[arg(long, value_name = "PATH", default_value = "haproxy")]
    haproxy: PathBuf,
    /// Serve /metrics (Prometheus), /healthz and /readyz (in session with the leader) over
    /// plain HTTP on IP:PORT; bind it where only your monitoring reaches.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<String>,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    berth_types::spec::Memory::parse(s).map(|m| m.bytes()).map_err(|e| format!("{s:?}: {e}; give a size such as 10Gi"))
}

fn parse_host_path_prefix(s: &str) -> std::result::Result<PathBuf, String> {
    berth_agent::volume::paths::normalize(std::path::Path::new(s))
        .ok_or_else(|| format!("{s:?} is not an absolute path; give a prefix such as /srv/data"))
}

fn parse_cluster_domain(s: &str) -> std::result::Result<String, String> {
    berth_agent::overlay::dns::normalize_domain(s)
        .map_err(|_| format!("{s:?} is not a DNS domain: give dot-separated labels of letters, digits and `-`"))
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
    #[arg(long, value_parser = humantime::parse_duration, default_value = "200ms")]
    election_timeout: Duration,
    /// Snapshot the state and purge the log after this many entries.
    #[arg(long, default_value_t = 10_000)]
    snapshot_logs: u64,
    /// Largest value a client may write, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_value_bytes: usize,
    /// First start only: the directory `berth pki init` wrote (founding masters) or
    /// `berth member certificate` wrote (a master added later).
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// The key that seals the cluster's secrets at rest (64 hex digits; every master needs the
    /// same). Default: DATA_DIR/pki/secrets.key, copied there from --pki-dir on the first start.
    #[arg(long)]
    secrets_key_file: Option<PathBuf>,
    /// Lifetime of the certificates this master issues; each is renewed at a random 50-80% of it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "90days")]
    cert_validity: Duration,
    /// A node whose agent is silent for this long is declared down.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    node_down_grace: Duration,
    /// How often agents send heartbeats.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    agent_heartbeat_interval: Duration,
    /// Where network subnets come from, such as 10.128.0.0/9: turns networks on for a cluster
    /// that has no pools yet (a cluster keeps the pools it recorded first). Without it (and
    /// without recorded pools) tasks use their host's network.
    #[arg(long, requires = "vip_pool")]
    address_pool: Option<ipnet::Ipv4Net>,
    /// The prefix of each network carved from --address-pool (default: /16, or pool + 4 bits for a
    /// pool smaller than /12).
    #[arg(long, requires = "address_pool", value_parser = clap::value_parser!(u8).range(8..=28))]
    network_size: Option<u8>,
    /// Where service virtual IPs come from, such as 10.96.0.0/12; must not overlap --address-pool.
    #[arg(long, requires = "address_pool")]
    vip_pool: Option<ipnet::Ipv4Net>,
    /// Network updates to agents are sent in parts of about this many bytes (tests lower it to
    /// exercise the parts on small updates).
    #[arg(long, hide = true, default_value_t = berth_master::NETWORK_UPDATE_PART_BYTES)]
    network_update_part_bytes: usize,
    /// The cluster's apps domain, such as apps.example.test: every route's host must fall under
    /// it (give every master the same).
    #[arg(long)]
    apps_domain: Option<String>,
    /// A domain route hosts may fall under besides the apps domain (the cluster admin's
    /// allowance; repeatable).
    #[arg(long = "allow-route-domain", requires = "apps_domain")]
    allow_route_domains: Vec<String>,
    /// Serve /metrics (Prometheus), /healthz and /readyz (a live leader, and applied up to its
    /// commit index) over plain HTTP on IP:PORT; bind it where only your monitoring reaches.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<String>,
    /// Serve the web console over HTTPS on IP:PORT (this master's certificate; log in with a
    /// client certificate from the cluster CA or a `berth console token create` token).
    #[arg(long, value_name = "IP:PORT")]
    console_listen: Option<String>,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,openraft=warn,h2=warn,tower=warn,hickory_server=warn,netlink_proto=error",
        )
    });
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
    cfg.pki_dir = a.pki_dir;
    cfg.secrets_key_file = a.secrets_key_file;
    cfg.cert_validity = a.cert_validity;
    cfg.node_down_grace = a.node_down_grace;
    cfg.agent_heartbeat_interval = a.agent_heartbeat_interval;
    cfg.network_update_part_bytes = a.network_update_part_bytes;
    cfg.route_domains = a.apps_domain.into_iter().chain(a.allow_route_domains).collect();
    cfg.metrics_listen = a.metrics_listen;
    cfg.console_listen = a.console_listen;
    if let (Some(address), Some(vip)) = (a.address_pool, a.vip_pool) {
        cfg.pools = Some(
            berth_master::Pools::new(address, a.network_size, vip)
                .map_err(|e| anyhow::anyhow!("--address-pool/--network-size/--vip-pool: {e}"))?,
        );
    }
    berth_master::run_master(cfg, shutdown_on_signals()).await?;
    Ok(())
}

/// The join token from --token-file, BERTH_JOIN_TOKEN or --token (one of them at most).
fn join_token(a: &AgentArgs) -> Result<Option<String>> {
    let on_command_line = std::env::args().any(|x| x == "--token" || x.starts_with("--token="));
    match (&a.token_file, &a.token) {
        (Some(_), Some(_)) => anyhow::bail!(
            "the join token was given twice (--token-file and {}): give it one way",
            if on_command_line { "--token" } else { "BERTH_JOIN_TOKEN" }
        ),
        (Some(f), None) => {
            let text = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?;
            let t = text.trim();
            if t.is_empty() {
                anyhow::bail!(
                    "--token-file {} is empty: write the token `berth token create` printed into it",
                    f.display()
                );
            }
            Ok(Some(t.to_string()))
        }
        (None, t) => {
            if t.is_some() && on_command_line {
                eprintln!(
                    "warning: --token on the command line can be read by every user of this host (ps): \
                     prefer BERTH_JOIN_TOKEN=... or --token-file"
                );
            }
            Ok(t.clone())
        }
    }
}

async fn run_agent(a: AgentArgs) -> Result<()> {
    let token = join_token(&a)?;
    let cfg = berth_agent::AgentConfig {
        join: a.join,
        token,
        data_dir: a.data_dir,
        name: a.name,
        labels: a.labels.into_iter().collect(),
        advertise_addr: a.advertise_addr,
        simulate: a.simulate,
        cluster_domain: Some(a.cluster_domain),
        simulate_networks: a.simulate_networks,
        allow_host_paths: a.allow_host_paths,
        allow_privileged: a.allow_privileged,
        oci_runtime: a.oci_runtime,
        insecure_registries: a.insecure_registries,
        image_gc_threshold: Some(a.image_gc_threshold),
        edge: berth_agent::EdgeSettings {
            enabled: a.edge,
            http: a.edge_http,
            https: a.edge_https,
            apps_domain: a.apps_domain,
            dns: a.apps_dns,
            haproxy: a.haproxy,
        },
        metrics_listen: a.metrics_listen,
    };
    berth_agent::run(cfg, shutdown_on_signals()).await?;
    Ok(())
}

fn main() {
    // `berth task-shim DIR`: the process runtime's per-task supervisor, started by the agent with
    // this executable. Handled before clap and before any tokio runtime exists (it forks).
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == berth_agent::driver::process::SHIM_SUBCOMMAND) {
        std::process::exit(berth_agent::driver::process::shim_main(args.collect()));
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("building the tokio runtime");
    let res = rt.block_on(async move {
        match cli.command {
            Cmd::Master(a) => {
                init_tracing();
                run_master(a).await
            }
            Cmd::Agent(a) => {
                init_tracing();
                run_agent(a).await
            }
            Cmd::Dev(a) => dev::run(a, &cli.global).await,
            Cmd::Pki(PkiCmd::Init(a)) => cmd_pki::init(&a).map(|()| {
                println!(
                    "wrote ca.crt, ca.key, admin.crt, admin.key and secrets.key into {}. Start each founding \
                     master once with --pki-dir {} (copy the directory to master hosts only: ca.key signs every \
                     certificate and secrets.key seals every secret), and use ca.crt, admin.crt and admin.key as \
                     the client credentials.",
                    a.out.display(),
                    a.out.display()
                )
            }),
            Cmd::Token(c) => cmd_nodes::run_token(c, &cli.global).await,
            Cmd::Secret(c) => cmd_storage::run_file(berth_api::pb::FileKind::Secret, c, &cli.global).await,
            Cmd::Config(c) => cmd_storage::run_file(berth_api::pb::FileKind::Config, c, &cli.global).await,
            Cmd::Image(c) => cmd_images::run(c, &cli.global).await,
            Cmd::Apply(a) => cmd_services::run_apply(a, &cli.global).await,
            Cmd::Get(c) => cmd_services::run_get(c, &cli.global).await,
            Cmd::Describe(c) => cmd_services::run_describe(c, &cli.global).await,
            Cmd::Scale(a) => cmd_services::run_scale(a, &cli.global).await,
            Cmd::Rollout(c) => cmd_services::run_rollout(c, &cli.global).await,
            Cmd::Delete(c) => cmd_services::run_delete(c, &cli.global).await,
            Cmd::Logs(a) => cmd_services::run_logs(a, &cli.global).await,
            Cmd::Node(c) => cmd_nodes::run_node(c, &cli.global).await,
            Cmd::Kv(c) => cmd_kv::run(c, &cli.global).await,
            Cmd::Cluster(c) => cmd_cluster::run_cluster(c, &cli.global).await,
            Cmd::Member(c) => cmd_cluster::run_member(c, &cli.global).await,
            Cmd::Cert(c) => cmd_cluster::run_cert(c, &cli.global).await,
            Cmd::Snapshot(c) => cmd_cluster::run_snapshot(c, &cli.global).await,
            Cmd::User(c) => cmd_access::run_user(c, &cli.global).await,
            Cmd::Ca(c) => cmd_access::run_ca(c, &cli.global).await,
            Cmd::Role(c) => cmd_access::run_role(c, &cli.global).await,
            Cmd::Audit(a) => cmd_access::run_audit(a, &cli.global).await,
            Cmd::Events(a) => cmd_events::run(a, &cli.global).await,
            Cmd::Console(c) => cmd_console::run(c, &cli.global).await,
            Cmd::Bench(c) => bench::run(c, &cli.global).await,
            Cmd::Version => cmd_cluster::run_version(&cli.global).await,
            Cmd::Completion(a) => print_completion(a.shell),
            Cmd::Man(a) => man_pages(&a.out).map(|()| println!("wrote the man pages into {}", a.out.display())),
        }
    });
    if let Err(e) = res {
        eprintln!("error: {}", output::describe(&e));
        // A write that may or may not have been applied: neither success nor plain failure.
        let unknown = e.downcast_ref::<client::OutcomeUnknown>().is_some();
        std::process::exit(if unknown { 3 } else { 1 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: clap_complete::Shell) -> String {
        let mut out = Vec::new();
        completion(shell, &mut out);
        String::from_utf8(out).expect("a completion script is text")
    }

    // Each shell's script completes berth's subcommands and their flags, and the shell itself
    // accepts it (bash and zsh check its syntax, where they are installed).
    #[test]
    fn completion_scripts_name_the_subcommands_and_parse() {
        let bash = script(clap_complete::Shell::Bash);
        assert!(bash.contains("complete -F _berth") && bash.contains("rollout") && bash.contains("--endpoints"));
        let zsh = script(clap_complete::Shell::Zsh);
        assert!(zsh.starts_with("#compdef berth") && zsh.contains("audit"));
        let fish = script(clap_complete::Shell::Fish);
        assert!(fish.contains("complete -c berth") && fish.contains("snapshot"));
        for (shell, text) in [("bash", &bash), ("zsh", &zsh)] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("berth-completion");
            std::fs::write(&file, text).unwrap();
            match std::process::Command::new(shell).arg("-n").arg(&file).output() {
                Ok(out) => assert!(out.status.success(), "{shell} -n: {}", String::from_utf8_lossy(&out.stderr)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => eprintln!("{shell} is not installed"),
                Err(e) => panic!("{shell}: {e}"),
            }
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man1");
        man_pages(&out).unwrap();
        let page = std::fs::read_to_string(out.join("berth.1")).unwrap();
        assert!(page.contains(".TH berth 1") && page.contains("rollout"), "{page}");
        for sub in ["berth-get.1", "berth-rollout-undo.1", "berth-audit.1", "berth-completion.1"] {
            assert!(out.join(sub).exists(), "{sub} is missing");
        }
        // A file where the directory should be: a clear error.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = man_pages(&file).unwrap_err();
        assert!(format!("{err:#}").contains("cannot create"), "{err:#}");
    }
}
