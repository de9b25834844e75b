//! Master configuration, validated before anything starts.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use crate::MasterError;

/// Everything a master needs to start. Built by the CLI from flags and the data dir.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// This master's id. `None` on a restart: it is read from the data dir.
    pub id: Option<u64>,
    /// Address to serve gRPC on. `None` on a restart: the address recorded in the data dir.
    pub listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Every founding member, by id. Only used the first time a data dir is initialised.
    pub initial_cluster: Option<BTreeMap<u64, String>>,
    /// Start empty and wait to be added with `berth member add` (for a new member).
    pub join: bool,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    /// Take a Raft snapshot (and purge the log) after this many entries.
    pub snapshot_logs: u64,
    /// Largest value a client may write.
    pub max_value_bytes: usize,
    /// First start only: `berth pki init`'s output (CA certificate and key) for a founding
    /// master, or `berth member add --pki-out`'s (CA certificate, master certificate and key) for
    /// a master added later.
    pub pki_dir: Option<PathBuf>,
    /// The key-encryption key for secrets (64 hex digits); default `DATA_DIR/pki/secrets.key`.
    pub secrets_key_file: Option<PathBuf>,
    /// Lifetime of the certificates this master issues (its own and agents'); renewed at a random
    /// point between 50% and 80% of it.
    pub cert_validity: Duration,
    /// A node whose agent has not been heard from for this long is declared down.
    pub node_down_grace: Duration,
    /// How often agents send heartbeats (the leader tells them).
    pub agent_heartbeat_interval: Duration,
    /// The address pools a new cluster records (`--address-pool`, `--vip-pool`); `None`: no
    /// networks unless the cluster already has pools.
    pub pools: Option<crate::ipam::Pools>,
    /// The size network updates to agents are split at (parts of at most about this many bytes);
    /// the default keeps each part a quarter of the frame limit. Lowered by tests to send every
    /// update in parts.
    pub network_update_part_bytes: usize,
    /// Route hosts must fall under one of these domains (`--apps-domain`, then the domains a
    /// cluster admin allows besides with `--allow-route-domain`); empty: any host.
    pub route_domains: Vec<String>,
    /// Serve `/metrics`, `/healthz` and `/readyz` over plain HTTP here (`--metrics-listen`).
    pub metrics_listen: Option<String>,
    /// Serve the web console over HTTPS here (`--console-listen`).
    pub console_listen: Option<String>,
}

/// SwarmKit declares a node down after ~15 s of silence (5 s heartbeats x 3); with 1 s
/// heartbeats, 10 s rides out several lost heartbeats and a leader failover (agents reconnect in
/// 1-3 s) while still noticing a dead host quickly.
pub const DEFAULT_NODE_DOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_AGENT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// 90 days, renewed between day 45 and day 72.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);

/// Defaults chosen by measurement (BENCHMARKS.md, "Failover and stability", and CHAOS.md).
/// openraft lets a follower campaign only after the leader lease (= the maximum election timeout)
/// plus its own random election timeout, so failover takes about 3 x the minimum election
/// timeout. With 50 ms heartbeats and a 200-400 ms election window the first write commits
/// 0.6-0.85 s after kill -9 of the leader (300-600 ms gave 0.9-1.26 s; 1 s / 2 s gave 3.5-4 s),
/// and the chaos suite's steady load and `berth bench stability` saw no leader change.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);
pub const DEFAULT_ELECTION_TIMEOUT: Duration = Duration::from_millis(200);

impl MasterConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        MasterConfig {
            id: None,
            listen: None,
            data_dir,
            initial_cluster: None,
            join: false,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            election_timeout: DEFAULT_ELECTION_TIMEOUT,
            snapshot_logs: 10_000,
            max_value_bytes: berth_types::Limits::default().max_value_bytes,
            pki_dir: None,
            secrets_key_file: None,
            cert_validity: DEFAULT_CERT_VALIDITY,
            node_down_grace: DEFAULT_NODE_DOWN_GRACE,
            agent_heartbeat_interval: DEFAULT_AGENT_HEARTBEAT_INTERVAL,
            pools: None,
            route_domains: Vec::new(),
            network_update_part_bytes: crate::endpoints::PART_BYTES,
            metrics_listen: None,
            console_listen: None,
        }
    }

    pub fn validate(&self) -> Result<(), MasterError> {
        if self.election_timeout < self.heartbeat_interval * 3 {
            return Err(MasterError::Config(format!(
                "--election-timeout ({:?}) must be at least 3 x --heartbeat-interval ({:?}), or \
                 followers start elections between heartbeats",
                self.election_timeout, self.heartbeat_interval
            )));
        }
        if self.node_down_grace < self.agent_heartbeat_interval * 3 {
            return Err(MasterError::Config(format!(
                "--node-down-grace ({:?}) must be at least 3 x the agent heartbeat interval ({:?})",
                self.node_down_grace, self.agent_heartbeat_interval
            )));
        }
        if self.cert_validity < Duration::from_secs(60) {
            return Err(MasterError::Config("--cert-validity must be at least 1m".into()));
        }
        if self.heartbeat_interval < Duration::from_millis(10) {
            return Err(MasterError::Config("--heartbeat-interval must be at least 10ms".into()));
        }
        if let Some(ic) = &self.initial_cluster {
            if let Some(id) = self.id
                && !ic.contains_key(&id)
            {
                return Err(MasterError::Config(format!(
                    "--initial-cluster does not list this master's id {id}: add {id}=HOST:PORT to it"
                )));
            }
            if self.join {
                return Err(MasterError::Config(
                    "--join and --initial-cluster exclude each other: --initial-cluster founds a \
                     new cluster, --join waits to be added to a running one"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>, MasterError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, ep) = part
            .split_once('=')
            .ok_or_else(|| MasterError::Config(format!("initial cluster entry {part:?} is not ID=HOST:PORT")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| MasterError::Config(format!("initial cluster entry {part:?}: id {id:?} is not a number")))?;
        if id == 0 {
            return Err(MasterError::Config("master id 0 is reserved; use ids from 1".into()));
        }
        let ep = ep.trim();
        if ep.parse::<SocketAddr>().is_err() && !ep.contains(':') {
            return Err(MasterError::Config(format!("initial cluster entry {part:?}: {ep:?} is not HOST:PORT")));
        }
        if out.insert(id, ep.to_string()).is_some() {
            return Err(MasterError::Config(format!("initial cluster lists id {id} twice")));
        }
    }
    if out.is_empty() {
        return Err(MasterError::Config("initial cluster is empty".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_initial_cluster() {
        let m = parse_initial_cluster("1=127.0.0.1:1, 2=127.0.0.1:2").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[&2], "127.0.0.1:2");
        assert!(parse_initial_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_initial_cluster("x=a:1").is_err());
        assert!(parse_initial_cluster("0=a:1").is_err());
        assert!(parse_initial_cluster("").is_err());
    }

    #[test]
    fn election_timeout_must_cover_heartbeats() {
        let mut c = MasterConfig::new("/tmp/x".into());
        c.election_timeout = Duration::from_millis(100);
        assert!(c.validate().is_err());
    }
}
