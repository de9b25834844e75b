//! `berth user`, `berth role` and `berth audit`: who may do what, and what was done.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use berth_api::pb;
use clap::Subcommand;
use serde::Serialize;

use crate::{
    Global,
    client::{Call, Client},
    output,
};

#[derive(Subcommand)]
pub enum UserCmd {
    /// Add a user with a role, and write its credentials: a key made here (or your own, with
    /// --csr), its certificate, the cluster CA and a berth.toml that uses them.
    Add {
        /// A DNS label; the certificate names user/NAME.
        name: String,
        /// cluster-admin, admin, edit, view, or a `kind: Role` of your own.
        #[arg(long, required_unless_present = "renew")]
        role: Option<String>,
        /// Issue an existing user another certificate, from the CA that signs now (after `berth
        /// ca rotate`, or before the old one expires); its roles stay as they are.
        #[arg(long, conflicts_with_all = ["role", "namespace"])]
        renew: bool,
        /// Where the role applies (admin, edit and view are meant for one namespace); omitted:
        /// everywhere.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// The user's own certificate signing request (PEM): its key never leaves the user.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Directory for the credentials (default ./NAME).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Lifetime of the certificate.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "365d")]
        validity: Duration,
    },
    /// The users, their roles and their certificates.
    Ls,
    /// Remove a user: its certificates are revoked and its own bindings deleted.
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Replace the cluster CA: the new one is trusted beside the old one while masters and agents
    /// renew onto it (no task restarts, no session closes), then the old one is retired. You
    /// get a certificate of the new CA in --out; other users need `berth user add NAME --renew`
    /// before the old CA is retired, and join tokens must be made again.
    Rotate {
        /// Directory for your new credentials (key, certificate, CAs, berth.toml).
        #[arg(long, default_value = "ca-rotated")]
        out: PathBuf,
        /// Return once the rotation has started, without waiting for it to finish.
        #[arg(long)]
        detach: bool,
        /// How long to wait for the rotation to finish.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        timeout: Duration,
    },
    /// Where a CA rotation stands: its phase and what it waits for.
    Status,
}

#[derive(Subcommand)]
pub enum RoleCmd {
    /// The roles (built-in and applied) and their bindings.
    Ls,
    /// Delete a role (not bound anywhere), or a binding with --binding.
    Rm {
        name: String,
        #[arg(long)]
        binding: bool,
    },
}

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Records from this long ago (e.g. 1h) or from this time (RFC 3339); default: all kept.
    #[arg(long)]
    pub since: Option<String>,
    /// Only this identity's records (ROLE/ID, e.g. user/alice).
    #[arg(long)]
    pub identity: Option<String>,
    /// Keep printing new records.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

fn time_of(ms: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)).to_string()
}

/// The endpoints this command used, for the new user's berth.toml.
fn endpoints(g: &Global) -> Vec<String> {
    if !g.endpoints.is_empty() {
        return g.endpoints.clone();
    }
    g.config.as_deref().and_then(|p| crate::config::ClientConfig::load(p).ok()).map(|c| c.endpoints).unwrap_or_default()
}

pub async fn run_user(cmd: UserCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        UserCmd::Add { name, role, renew, namespace, csr, out, validity } => {
            let (csr_pem, key_pem) = match &csr {
                Some(p) => {
                    (std::fs::read_to_string(p).with_context(|| format!("cannot read the CSR {}", p.display()))?, None)
                }
                None => {
                    let (csr, key) = berth_pki::generate_csr(&format!("user/{name}"))?;
                    (csr, Some(key))
                }
            };
            let out = out.unwrap_or_else(|| PathBuf::from(&name));
            if out.join(format!("{name}.crt")).exists() {
                bail!("{} already holds {name}.crt: give another --out", out.display());
            }
            let req = pb::UserAddRequest {
                name: name.clone(),
                role: role.clone().unwrap_or_default(),
                namespace: namespace.clone().unwrap_or_default(),
                csr_pem,
                validity_secs: validity.as_secs(),
                renew,
            };
            // Not repeated blindly: a second add of the same name is refused as existing.
            let r = client
                .call(Call::Once, |ch| {
                    let req = req.clone();
                    async move { Client::access(ch).user_add(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            let crt = format!("{name}.crt");
            let key = format!("{name}.key");
            let toml = toml::to_string(&crate::config::ClientConfig {
                endpoints: endpoints(g),
                ca_cert: Some("ca.crt".into()),
                cert: Some(crt.clone().into()),
                key: Some(key.clone().into()),
            })?;
            let mut files = vec![("ca.crt", r.ca_pem.as_str(), false), (crt.as_str(), r.cert_pem.as_str(), false)];
            if let Some(k) = &key_pem {
                files.push((key.as_str(), k.as_str(), true));
            }
            files.push(("berth.toml", toml.as_str(), false));
            crate::cmd_pki::write_files(&out, &files)?;
            if renew {
                let value = serde_json::json!({ "user": name, "serial": r.serial, "dir": out, "renewed": true });
                output::done(g.output, value, || {
                    format!(
                        "user {name} has a new certificate (serial {}); its credentials are in {}{}: use them with \
                         `berth --config {}/berth.toml ...`",
                        r.serial,
                        out.display(),
                        if key_pem.is_none() { " (with the key you made the CSR from)" } else { "" },
                        out.display()
                    )
                });
                return Ok(());
            }
            let role = role.unwrap_or_default();
            let value = serde_json::json!({
                "user": name,
                "role": role,
                "namespace": namespace,
                "binding": r.binding,
                "serial": r.serial,
                "dir": out,
            });
            let scope = namespace.map_or("everywhere".to_string(), |ns| format!("in namespace {ns}"));
            output::done(g.output, value, || {
                format!(
                    "user {name} added with role {role} {scope} (binding {}, certificate serial {}); its credentials \
                     are in {}{}: use them with `berth --config {}/berth.toml ...`",
                    r.binding,
                    r.serial,
                    out.display(),
                    if key_pem.is_none() { " (with the key you made the CSR from)" } else { "" },
                    out.display()
                )
            });
        }
        UserCmd::Ls => {
            let r = client
                .call(Call::Idempotent, |ch| async move {
                    Client::access(ch).user_list(pb::UserListRequest {}).await.map(|r| r.into_inner())
                })
                .await?;
            #[derive(Serialize)]
            struct Out {
                name: String,
                roles: Vec<String>,
                created: String,
                by: String,
                serials: Vec<String>,
            }
            let out: Vec<Out> = r
                .users
                .into_iter()
                .map(|u| Out {
                    roles: u
                        .bindings
                        .iter()
                        .map(|b| {
                            if b.namespace.is_empty() {
                                b.role.clone()
                            } else {
                                format!("{} in {}", b.role, b.namespace)
                            }
                        })
                        .collect(),
                    name: u.name,
                    created: time_of(u.created_ms),
                    by: u.by,
                    serials: u.serials,
                })
                .collect();
            output::print(g.output, &out, |o| {
                let rows: Vec<Vec<String>> = o
                    .iter()
                    .map(|u| vec![u.name.clone(), u.roles.join(", "), u.created.clone(), u.by.clone()])
                    .collect();
                output::table(&["USER", "ROLES", "CREATED", "BY"], &rows);
            });
        }
        UserCmd::Rm { name } => {
            let r = client
                .call(Call::Once, |ch| {
                    let req = pb::UserRemoveRequest { name: name.clone() };
                    async move { Client::access(ch).user_remove(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            let value = serde_json::json!({ "removed": name, "revoked": r.revoked, "bindings_deleted": r.bindings });
            output::done(g.output, value, || {
                format!(
                    "user {name} removed; certificates revoked: {}; bindings deleted: {}",
                    if r.revoked.is_empty() { "none".into() } else { r.revoked.join(", ") },
                    if r.bindings.is_empty() { "none".into() } else { r.bindings.join(", ") }
                )
            });
        }
    }
    Ok(())
}

async fn ca_status(client: &Client) -> Result<pb::CaStatusResponse> {
    Ok(client
        .call(Call::Idempotent, |ch| async move {
            Client::access(ch).ca_status(pb::CaStatusRequest {}).await.map(|r| r.into_inner())
        })
        .await?)
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(16)]
}

pub async fn run_ca(cmd: CaCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        CaCmd::Rotate { out, detach, timeout } => {
            if out.join("client.crt").exists() {
                bail!("{} already holds client.crt: give another --out", out.display());
            }
            let (csr_pem, key_pem) = berth_pki::generate_csr("berth-client")?;
            // The key and the config are written first: once the rotation has started, a
            // failure to write them (a full disk) would leave a certificate with no key.
            let toml = toml::to_string(&crate::config::ClientConfig {
                endpoints: endpoints(g),
                ca_cert: Some("ca.crt".into()),
                cert: Some("client.crt".into()),
                key: Some("client.key".into()),
            })?;
            crate::cmd_pki::write_files(
                &out,
                &[("client.key", key_pem.as_str(), true), ("berth.toml", toml.as_str(), false)],
            )?;
            // Not repeated blindly: a second call while one rotation runs is refused.
            let r = client
                .call(Call::Once, |ch| {
                    let req = pb::CaRotateRequest { csr_pem: csr_pem.clone() };
                    async move { Client::access(ch).ca_rotate(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            crate::cmd_pki::write_files(
                &out,
                &[("ca.crt", r.ca_pem.as_str(), false), ("client.crt", r.cert_pem.as_str(), false)],
            )
            .with_context(|| {
                format!(
                    "the rotation has started, but your new certificate could not be written; it is:\n{}",
                    r.cert_pem
                )
            })?;
            println!(
                "CA rotation started: the new CA is {}. Your credentials from it are in {}: use `berth --config \
                 {}/berth.toml ...`; the old ones stop working when the old CA is retired.",
                r.ca_digest,
                out.display(),
                out.display()
            );
            if detach {
                println!("follow it with `berth ca status`");
                return Ok(());
            }
            // From here on with the new credentials: they trust both CAs, and the masters
            // present certificates of the new one once they switch.
            let fresh =
                Global { config: Some(out.join("berth.toml")), ca_cert: None, cert: None, key: None, ..g.clone() };
            let client = crate::config::client(&fresh)?;
            let deadline = std::time::Instant::now() + timeout;
            let mut last = String::new();
            loop {
                let s = match ca_status(&client).await {
                    Ok(s) => s,
                    // A master may not trust the new CA for a moment (it has not applied the
                    // rotation yet): asked again.
                    Err(e) => {
                        if std::time::Instant::now() > deadline {
                            return Err(e);
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let line = if s.pending.is_empty() {
                    format!("phase {}", s.phase)
                } else {
                    format!("phase {}: waiting for {}", s.phase, s.pending.join(", "))
                };
                if line != last {
                    println!("{line}");
                    last = line;
                }
                if s.phase == "done" {
                    println!(
                        "CA rotation done: the old CA is retired; every master and agent uses {}. Make join tokens \
                         again (`berth token create`) and renew users (`berth user add NAME --renew`).",
                        short(&s.signing_digest)
                    );
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "the rotation did not finish within {}; it goes on: see `berth ca status` (a master or \
                         node that is down holds it back: bring it back, or remove it)",
                        humantime::format_duration(timeout)
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        CaCmd::Status => {
            let s = ca_status(&client).await?;
            #[derive(Serialize)]
            struct Out {
                phase: String,
                signing: String,
                trusted: Vec<String>,
                started: Option<String>,
                finished: Option<String>,
                by: String,
                pending: Vec<String>,
            }
            let o = Out {
                phase: if s.phase.is_empty() { "never rotated".into() } else { s.phase.clone() },
                signing: s.signing_digest.clone(),
                trusted: s.trusted_digests.clone(),
                started: (s.started_ms > 0).then(|| time_of(s.started_ms)),
                finished: (s.finished_ms > 0).then(|| time_of(s.finished_ms)),
                by: s.by.clone(),
                pending: s.pending.clone(),
            };
            output::print(g.output, &o, |o| {
                println!("phase:       {}", o.phase);
                println!("signing CA:  {}", o.signing);
                println!("trusted CAs: {}", o.trusted.join(", "));
                if let Some(st) = &o.started {
                    println!("started:     {st} by {}", o.by);
                }
                if let Some(f) = &o.finished {
                    println!("old CA retired: {f}");
                }
                if !o.pending.is_empty() {
                    println!("waiting for: {}", o.pending.join(", "));
                }
            });
        }
    }
    Ok(())
}

pub async fn run_role(cmd: RoleCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        RoleCmd::Ls => {
            let r = client
                .call(Call::Idempotent, |ch| async move {
                    Client::access(ch).role_list(pb::RoleListRequest {}).await.map(|r| r.into_inner())
                })
                .await?;
            #[derive(Serialize)]
            struct Rule {
                verbs: Vec<String>,
                resources: Vec<String>,
            }
            #[derive(Serialize)]
            struct Role {
                name: String,
                builtin: bool,
                rules: Vec<Rule>,
            }
            #[derive(Serialize)]
            struct Binding {
                name: String,
                role: String,
                users: Vec<String>,
                namespace: String,
            }
            #[derive(Serialize)]
            struct Out {
                roles: Vec<Role>,
                bindings: Vec<Binding>,
            }
            let out = Out {
                roles: r
                    .roles
                    .into_iter()
                    .map(|r| Role {
                        name: r.name,
                        builtin: r.builtin,
                        rules: r.rules.into_iter().map(|x| Rule { verbs: x.verbs, resources: x.resources }).collect(),
                    })
                    .collect(),
                bindings: r
                    .bindings
                    .into_iter()
                    .map(|b| Binding { name: b.name, role: b.role, users: b.users, namespace: b.namespace })
                    .collect(),
            };
            output::print(g.output, &out, |o| {
                let rows: Vec<Vec<String>> = o
                    .roles
                    .iter()
                    .map(|r| {
                        let rules: Vec<String> = r
                            .rules
                            .iter()
                            .map(|x| format!("{} {}", x.verbs.join(","), x.resources.join(",")))
                            .collect();
                        vec![r.name.clone(), if r.builtin { "built-in" } else { "applied" }.into(), rules.join("; ")]
                    })
                    .collect();
                output::table(&["ROLE", "KIND", "RULES"], &rows);
                println!();
                let rows: Vec<Vec<String>> = o
                    .bindings
                    .iter()
                    .map(|b| {
                        let ns = if b.namespace.is_empty() { "(everywhere)".to_string() } else { b.namespace.clone() };
                        vec![b.name.clone(), b.role.clone(), ns, b.users.join(", ")]
                    })
                    .collect();
                output::table(&["BINDING", "ROLE", "NAMESPACE", "USERS"], &rows);
            });
        }
        RoleCmd::Rm { name, binding } => {
            let kind = if binding { "RoleBinding" } else { "Role" };
            client
                .call(Call::Idempotent, |ch| {
                    let req = pb::RoleDeleteRequest { kind: kind.into(), name: name.clone() };
                    async move { Client::access(ch).role_delete(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            output::done(g.output, serde_json::json!({ "kind": kind, "deleted": name }), || {
                format!("{kind} {name} deleted")
            });
        }
    }
    Ok(())
}

/// `--since`: a duration ago, or an RFC 3339 time.
pub(crate) fn since_ms(text: &str) -> Result<i64> {
    let now = std::time::SystemTime::now();
    let at = match humantime::parse_duration(text) {
        Ok(d) => now.checked_sub(d).unwrap_or(std::time::UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(text).with_context(|| {
            format!("--since {text:?} is neither a duration (e.g. 1h) nor a time (e.g. 2026-12-07T10:00:00Z)")
        })?,
    };
    Ok(at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
}

pub async fn run_audit(a: AuditArgs, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let req = pb::AuditRequest {
        since_ms: a.since.as_deref().map(since_ms).transpose()?.unwrap_or(0),
        identity: a.identity.clone().unwrap_or_default(),
        follow: a.follow,
    };
    let mut stream = client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { Client::access(ch).audit(req).await.map(|r| r.into_inner()) }
        })
        .await?;
    let json = matches!(g.output, output::Format::Json);
    if !json {
        println!("{:<20}  {:<24}  {:<7}  {:<28}  {:>9}  OUTCOME", "TIME", "IDENTITY", "VERB", "RESOURCE", "REVISION");
    }
    while let Some(e) =
        stream.message().await.map_err(|s| anyhow::anyhow!("the audit stream ended: {}", s.message()))?
    {
        if json {
            #[derive(Serialize)]
            struct Out<'a> {
                at: String,
                identity: &'a str,
                verb: &'a str,
                resource: &'a str,
                namespace: &'a str,
                name: &'a str,
                outcome: &'a str,
                revision: i64,
                master: u64,
                seq: u64,
            }
            let o = Out {
                at: time_of(e.at_ms),
                identity: &e.identity,
                verb: &e.verb,
                resource: &e.resource,
                namespace: &e.namespace,
                name: &e.name,
                outcome: &e.outcome,
                revision: e.revision,
                master: e.master,
                seq: e.seq,
            };
            println!("{}", serde_json::to_string(&o)?);
        } else {
            let mut what = e.resource.clone();
            if !e.namespace.is_empty() {
                what = format!("{what}/{}", e.namespace);
            }
            if !e.name.is_empty() {
                what = format!("{what}/{}", e.name);
            }
            println!(
                "{:<20}  {:<24}  {:<7}  {:<28}  {:>9}  {}",
                time_of(e.at_ms),
                e.identity,
                e.verb,
                what,
                e.revision,
                e.outcome
            );
        }
    }
    Ok(())
}

/// `berth get namespaces`: usage against quota, "used/limit" (or just "used" without a limit).
pub async fn run_get_namespaces(g: &Global) -> Result<()> {
    use berth_types::spec::{
        Cpu, Memory,
        namespace::{Quota, Usage},
    };
    let client = crate::config::client(g)?;
    let r = client
        .call(Call::Idempotent, |ch| async move {
            Client::control(ch).list_namespaces(pb::ListNamespacesRequest {}).await.map(|r| r.into_inner())
        })
        .await?;
    #[derive(Serialize)]
    struct Out {
        name: String,
        declared: bool,
        quota: Quota,
        usage: Usage,
    }
    let mut out = Vec::new();
    for n in r.namespaces {
        let quota: Quota =
            if n.quota_json.is_empty() { Quota::default() } else { serde_json::from_str(&n.quota_json)? };
        let usage: Usage = serde_json::from_str(&n.usage_json)?;
        out.push(Out { name: n.name, declared: n.declared, quota, usage });
    }
    output::print(g.output, &out, |o| {
        let of = |used: String, limit: Option<String>| match limit {
            Some(l) => format!("{used}/{l}"),
            None => used,
        };
        let rows: Vec<Vec<String>> = o
            .iter()
            .map(|n| {
                let (q, u) = (&n.quota, &n.usage);
                vec![
                    n.name.clone(),
                    of(Cpu(u.cpu).to_string(), q.cpu.map(|c| c.to_string())),
                    of(Memory(u.memory).to_string(), q.memory.map(|m| m.to_string())),
                    of(u.tasks.to_string(), q.tasks.map(|x| x.to_string())),
                    of(u.services.to_string(), q.services.map(|x| x.to_string())),
                    of(u.volumes.to_string(), q.volumes.map(|x| x.to_string())),
                    of(u.secrets.to_string(), q.secrets.map(|x| x.to_string())),
                ]
            })
            .collect();
        output::table(&["NAMESPACE", "CPU", "MEMORY", "TASKS", "SERVICES", "VOLUMES", "SECRETS"], &rows);
    });
    Ok(())
}
