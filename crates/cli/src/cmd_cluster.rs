//! `berth cluster`, `berth member` and `berth snapshot`.

use std::{io::Write, path::PathBuf};

use anyhow::{Context, Result, bail};
use berth_api::pb;
use clap::{Args, Subcommand};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{
    Global,
    client::{Call, Client, explain},
    output::{self, human_bytes},
};

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Leader, term, and every member's role, log and applied index and database size.
    Status,
    /// Hand leadership to another voter.
    TransferLeader {
        /// Target master id (default: any other voter).
        #[arg(long)]
        to: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum MemberCmd {
    /// List the members.
    List,
    /// Add a master as a learner; it catches up, then `member promote` makes it a voter.
    Add {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        endpoint: String,
        /// Promote to voter as soon as it has caught up.
        #[arg(long)]
        promote: bool,
    },
    /// Issue the certificate of a master about to be added and write it, with the CA
    /// certificate, into --out. Copy that directory to the new master's host and start it with
    /// `berth master --id N --listen HOST:PORT --join --pki-dir DIR`, then `berth member add`.
    Certificate {
        #[arg(long)]
        id: u64,
        /// The address the new master will listen on.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Remove a master. Its id can never be used again.
    Remove { id: u64 },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Save a consistent backup of the cluster's state from any master.
    Save { file: PathBuf },
    /// Seed a new master's data dir from a backup: disaster recovery after losing quorum. Run it
    /// for every master of the new cluster, then start each with `berth master --data-dir DIR`.
    Restore(RestoreArgs),
}

#[derive(Args)]
pub struct RestoreArgs {
    file: PathBuf,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    id: u64,
    #[arg(long)]
    initial_cluster: String,
}

#[derive(Serialize)]
struct MemberOut {
    id: u64,
    endpoint: String,
    role: String,
    voter: bool,
    last_log_index: u64,
    applied_index: u64,
    db_size_bytes: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
}

impl From<pb::Member> for MemberOut {
    fn from(m: pb::Member) -> Self {
        MemberOut {
            id: m.id,
            endpoint: m.endpoint,
            role: m.role,
            voter: m.voter,
            last_log_index: m.last_log_index,
            applied_index: m.applied_index,
            db_size_bytes: m.db_size_bytes,
            version: m.version,
            error: m.error,
        }
    }
}

#[derive(Serialize)]
struct StatusOut {
    leader: u64,
    term: u64,
    cluster_id: String,
    members: Vec<MemberOut>,
}

fn print_members(g: &Global, leader: u64, members: Vec<pb::Member>) {
    #[derive(Serialize)]
    struct ListMember {
        id: u64,
        endpoint: String,
        role: String,
        voter: bool,
    }
    #[derive(Serialize)]
    struct ListOut {
        leader: u64,
        members: Vec<ListMember>,
    }
    let members = members
        .into_iter()
        .map(|m| ListMember { id: m.id, endpoint: m.endpoint, role: m.role, voter: m.voter })
        .collect();
    let out = ListOut { leader, members };
    output::print(g.output, &out, |o| {
        let rows: Vec<Vec<String>> = o
            .members
            .iter()
            .map(|m| vec![m.id.to_string(), m.endpoint.clone(), m.role.clone(), m.voter.to_string()])
            .collect();
        output::table(&["ID", "ENDPOINT", "ROLE", "VOTER"], &rows);
    });
}

/// The cluster's status: leader, term, and every member's figures as it reports them.
async fn status(client: &Client) -> Result<pb::StatusResponse> {
    Ok(client
        .call(Call::Idempotent, |ch| async move {
            Client::cluster(ch).status(pb::StatusRequest {}).await.map(|r| r.into_inner())
        })
        .await?)
}

/// `berth version`: this client's version, then every master's, as the cluster reports them.
pub async fn run_version(g: &Global) -> Result<()> {
    #[derive(Serialize)]
    struct VersionOut {
        client: &'static str,
        masters: Vec<MemberOut>,
    }
    let client_version = env!("CARGO_PKG_VERSION");
    let status = match crate::config::client(g) {
        Ok(client) => status(&client).await,
        Err(e) => Err(e),
    };
    let r = match status {
        Ok(r) => r,
        Err(e) => {
            // The client's own version is known whatever the cluster says.
            println!("client: {client_version}");
            return Err(e.context("cannot ask the cluster for its masters' versions"));
        }
    };
    let out = VersionOut { client: client_version, masters: r.members.into_iter().map(Into::into).collect() };
    output::print(g.output, &out, |o| {
        println!("client: {}", o.client);
        for m in &o.masters {
            let version = if m.version.is_empty() { format!("unknown ({})", m.error) } else { m.version.clone() };
            println!("master {} ({}, {}): {version}", m.id, m.endpoint, m.role);
        }
    });
    Ok(())
}

pub async fn run_cluster(cmd: ClusterCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        ClusterCmd::Status => {
            let r = status(&client).await?;
            let out = StatusOut {
                leader: r.leader,
                term: r.term,
                cluster_id: r.header.map(|h| h.cluster_id).unwrap_or_default(),
                members: r.members.into_iter().map(Into::into).collect(),
            };
            output::print(g.output, &out, |o| {
                println!("leader: {}  term: {}  cluster: {}", o.leader, o.term, o.cluster_id);
                let rows: Vec<Vec<String>> = o
                    .members
                    .iter()
                    .map(|m| {
                        vec![
                            m.id.to_string(),
                            m.endpoint.clone(),
                            m.role.clone(),
                            m.last_log_index.to_string(),
                            m.applied_index.to_string(),
                            human_bytes(m.db_size_bytes),
                            m.error.clone(),
                        ]
                    })
                    .collect();
                output::table(&["ID", "ENDPOINT", "ROLE", "LAST_LOG", "APPLIED", "DB_SIZE", "ERROR"], &rows);
            });
        }
        ClusterCmd::TransferLeader { to } => {
            let r = client
                .call(Call::Once, |ch| async move {
                    Client::cluster(ch)
                        .transfer_leader(pb::TransferLeaderRequest { target: to.unwrap_or(0) })
                        .await
                        .map(|r| r.into_inner())
                })
                .await
                .map_err(|s| explain(s, "see who leads with `berth cluster status`"))?;
            output::done(g.output, serde_json::json!({ "leader": r.leader }), || {
                format!("leader is now master {}", r.leader)
            });
        }
    }
    Ok(())
}

pub async fn run_member(cmd: MemberCmd, g: &Global) -> Result<()> {
    let mut client = crate::config::client(g)?;
    match cmd {
        MemberCmd::List => {
            let r = client
                .call(Call::Idempotent, |ch| async move {
                    Client::cluster(ch).member_list(pb::MemberListRequest {}).await.map(|r| r.into_inner())
                })
                .await?;
            print_members(g, r.leader, r.members);
        }
        MemberCmd::Certificate { id, endpoint, out } => {
            // The key is made here and never sent: the master signs its CSR.
            let (csr_pem, key_pem) = berth_pki::generate_csr(&format!("master/{id}"))?;
            let r = client
                .call(Call::Idempotent, |ch| {
                    let (endpoint, csr_pem) = (endpoint.clone(), csr_pem.clone());
                    async move {
                        Client::cluster(ch)
                            .member_certificate(pb::MemberCertificateRequest { id, endpoint, csr_pem })
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await?;
            crate::cmd_pki::write_files(
                &out,
                &[("ca.crt", &r.ca_pem, false), ("master.crt", &r.cert_pem, false), ("master.key", &key_pem, true)],
            )?;
            output::done(g.output, serde_json::json!({ "id": id, "dir": out }), || {
                format!("wrote the credentials of master {id} into {}", out.display())
            });
        }
        MemberCmd::Add { id, endpoint, promote } => {
            // Catching up may take a while on a big state.
            client.patience = std::time::Duration::from_secs(120);
            client.attempt_timeout = client.patience;
            let r = client
                .call(Call::Once, |ch| {
                    let endpoint = endpoint.clone();
                    async move {
                        Client::cluster(ch)
                            .member_add(pb::MemberAddRequest { id, endpoint, promote })
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await
                .map_err(|s| explain(s, "see the membership with `berth member list` before trying again"))?;
            eprintln!("added master {id}{}", if promote { " as a voter" } else { " as a learner" });
            print_members(g, r.header.as_ref().map_or(0, |h| h.member_id), r.members);
        }
        MemberCmd::Promote { id } => {
            let r = client
                .call(Call::Once, |ch| async move {
                    Client::cluster(ch).member_promote(pb::MemberPromoteRequest { id }).await.map(|r| r.into_inner())
                })
                .await
                .map_err(|s| explain(s, "see the membership with `berth member list` before trying again"))?;
            eprintln!("master {id} is now a voter");
            print_members(g, r.header.as_ref().map_or(0, |h| h.member_id), r.members);
        }
        MemberCmd::Remove { id } => {
            let r = client
                .call(Call::Once, |ch| async move {
                    Client::cluster(ch).member_remove(pb::MemberRemoveRequest { id }).await.map(|r| r.into_inner())
                })
                .await
                .map_err(|s| explain(s, "see the membership with `berth member list` before trying again"))?;
            eprintln!("removed master {id}; its id can never be used again");
            print_members(g, r.header.as_ref().map_or(0, |h| h.member_id), r.members);
        }
    }
    Ok(())
}

pub async fn run_snapshot(cmd: SnapshotCmd, g: &Global) -> Result<()> {
    match cmd {
        SnapshotCmd::Save { file } => {
            let mut client = crate::config::client(g)?;
            // The master builds the backup before its first chunk.
            client.attempt_timeout = std::time::Duration::from_secs(300);
            let mut stream = client
                .call(Call::Idempotent, |ch| async move {
                    Client::cluster(ch).snapshot(pb::SnapshotRequest {}).await.map(|r| r.into_inner())
                })
                .await?;
            let tmp = file.with_extension("part");
            let mut out = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            let mut expected = None;
            while let Some(chunk) = stream.message().await? {
                out.write_all(&chunk.blob)?;
                hasher.update(&chunk.blob);
                total += chunk.blob.len() as u64;
                if chunk.done {
                    expected = Some(chunk.sha256);
                }
            }
            let Some(expected) = expected else {
                let _ = std::fs::remove_file(&tmp);
                bail!("the backup stream ended early; nothing was saved, retry");
            };
            let got = hex::encode(hasher.finalize());
            if got != expected {
                let _ = std::fs::remove_file(&tmp);
                bail!("backup checksum mismatch (got {got}, master sent {expected}); nothing was saved, retry");
            }
            out.sync_all()?;
            std::fs::rename(&tmp, &file)?;
            let header = berth_store::read_header(&file)?;
            let value = serde_json::json!({
                "file": file,
                "bytes": total,
                "revision": header.counters.revision,
                "sha256": got,
            });
            output::done(g.output, value, || {
                format!(
                    "saved {} ({}) at revision {}, sha256 {got}",
                    file.display(),
                    human_bytes(total),
                    header.counters.revision
                )
            });
        }
        SnapshotCmd::Restore(a) => {
            let ic = berth_master::parse_initial_cluster(&a.initial_cluster)?;
            if !ic.contains_key(&a.id) {
                bail!("--initial-cluster does not list --id {}", a.id);
            }
            if a.data_dir.exists() && std::fs::read_dir(&a.data_dir)?.next().is_some() {
                bail!("{} is not empty: restore needs a new, empty data dir", a.data_dir.display());
            }
            let header = berth_store::read_header(&a.file)?;
            // Every member restored from the same backup into the same new cluster gets the same
            // id, derived from the backup and the new membership.
            let mut h = Sha256::new();
            h.update(std::fs::read(&a.file)?);
            h.update(a.initial_cluster.as_bytes());
            let digest = hex::encode(h.finalize());
            let cluster_id = format!("restored-{}", &digest[..32]);
            berth_store::restore_into(&a.file, &a.data_dir, cluster_id.clone())?;
            let ident =
                berth_master::Identity { format: 1, id: a.id, listen: ic[&a.id].clone(), initial_cluster: Some(ic) };
            ident.store(&a.data_dir)?;
            let value = serde_json::json!({
                "revision": header.counters.revision,
                "data_dir": a.data_dir,
                "id": a.id,
                "cluster_id": cluster_id,
            });
            output::done(g.output, value, || {
                format!(
                    "restored the state at revision {} into {} as master {} of new cluster {cluster_id}; start it with: \
                     berth master --data-dir {}",
                    header.counters.revision,
                    a.data_dir.display(),
                    a.id,
                    a.data_dir.display()
                )
            });
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum CertCmd {
    /// Revoke one certificate (SERIAL, hex as `openssl x509 -noout -serial` prints it) or every
    /// certificate of an identity issued until now (ROLE/ID, e.g. admin/alice). Every master
    /// refuses it from then on, on connections already open too.
    Revoke {
        target: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The revocations: what, when, by whom, why.
    Revoked,
}

pub async fn run_cert(cmd: CertCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        CertCmd::Revoke { target, reason } => {
            let r = client
                .call(Call::Idempotent, |ch| {
                    let req = pb::RevokeCertificateRequest { target: target.clone(), reason: reason.clone() };
                    async move { Client::cluster(ch).revoke_certificate(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            let value = serde_json::json!({ "target": target, "newly_revoked": r.revoked });
            output::done(g.output, value, || {
                if r.revoked { format!("revoked {target}") } else { format!("{target} was revoked already") }
            });
        }
        CertCmd::Revoked => {
            let r = client
                .call(Call::Idempotent, |ch| async move {
                    Client::cluster(ch).list_revoked(pb::ListRevokedRequest {}).await.map(|r| r.into_inner())
                })
                .await?;
            #[derive(Serialize)]
            struct Out {
                target: String,
                at: String,
                by: String,
                reason: String,
            }
            let out: Vec<Out> = r
                .revocations
                .into_iter()
                .map(|v| Out {
                    target: v.target,
                    at: humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(v.at_ms.max(0) as u64),
                    )
                    .to_string(),
                    by: v.by,
                    reason: v.reason,
                })
                .collect();
            output::print(g.output, &out, |o| {
                let rows: Vec<Vec<String>> =
                    o.iter().map(|v| vec![v.target.clone(), v.at.clone(), v.by.clone(), v.reason.clone()]).collect();
                output::table(&["REVOKED", "AT", "BY", "REASON"], &rows);
            });
        }
    }
    Ok(())
}
