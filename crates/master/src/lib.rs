//! A berth master: one RocksDB-backed openraft node, the gRPC services on one port (the client
//! KV and Cluster APIs and the internal Raft service), write batching and forwarding.
//!
//! The service library takes a plain [`MasterConfig`]; it knows nothing of clap or the CLI.
//! It may depend on every lower crate (types, api, store); nothing depends on it but the CLI.

mod access_service;
mod assign;
mod audit;
mod authz;
mod ca_rotation;
mod cluster_service;
mod config;
mod console;
mod control_service;
mod controller;
mod deadline;
mod dispatcher;
mod endpoints;
mod error;
mod events;
mod failover;
mod identity;
mod images;
mod ipam;
mod joins;
mod kv_service;
mod metrics;
mod network;
mod networks;
mod node;
mod nodes_service;
mod objects;
mod ports;
mod proposer;
mod quotas;
mod raft_service;
mod revocation;
mod route;
mod routes;
mod secrets;
mod streams;
mod tasks;
mod tls;
mod updater;
mod volumes;

pub use config::{
    DEFAULT_AGENT_HEARTBEAT_INTERVAL, DEFAULT_CERT_VALIDITY, DEFAULT_NODE_DOWN_GRACE, MasterConfig,
    parse_initial_cluster,
};
pub use endpoints::PART_BYTES as NETWORK_UPDATE_PART_BYTES;
pub use error::MasterError;
pub use identity::{IDENTITY_FILE, Identity};
pub use ipam::Pools;
pub use network::{WIRE_LIMIT as RAFT_WIRE_LIMIT, decode as decode_raft_message};
pub use node::run_master;
pub use tls::{MasterPki, client_tls, issue_master};
