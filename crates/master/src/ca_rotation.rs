//! CA rotation (`berth ca rotate`), in the manner of SwarmKit's: a new cluster CA is trusted
//! beside the old one while every master and every live agent moves onto it, then the old one is
//! retired. No task stops and no session closes: agents renew over their open sessions, and
//! masters swap the certificates new handshakes see.
//!
//! The state is `/berth/ca/rotation` (public: the trusted certificates, the phase, what the
//! rotation waits for) and the CA key in the state machine's metadata (never in the key space),
//! both changed by one `Command::RotateCa`. Each master acknowledges what it trusts and presents
//! under `/berth/ca/masters/<id>`; agents report theirs in every heartbeat.
//!
//! 1. `trust`: the new CA signs from now on. Masters trust both CAs. Agents get both in their
//!    next heartbeat ack and renew onto the new CA. The leader waits until every master trusts
//!    both and every agent that is not down holds both and a certificate of the new CA.
//! 2. `switch`: masters reissue their own certificates from the new CA (everyone already trusts
//!    it). The leader waits until every master presents one.
//! 3. `done`: the old CA is dropped from every trust list. Certificates it issued (a user's
//!    not reissued, a node that was down the whole time) are refused from then on; join tokens
//!    made before the rotation pin the old CA and stop working once masters switch.

use std::{sync::Arc, time::Duration};

use berth_api::pb;
use berth_pki::{CertificateAuthority, Role};
use berth_types::{ClusterCa, Command, CommandResult};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

use crate::{authz::Caller, node::Ctx, objects};

pub(crate) const PREFIX: &str = "/berth/ca/";
const ROTATION: &str = "/berth/ca/rotation";
const MASTERS: &str = "/berth/ca/masters/";

/// How long the certificate `berth ca rotate` issues its caller lives.
const CALLER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Most names the rotation record lists as pending (the count says how many more).
const MAX_PENDING_LISTED: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    Trust,
    Switch,
    Done,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Trust => "trust",
            Phase::Switch => "switch",
            Phase::Done => "done",
        }
    }
}

/// `/berth/ca/rotation`, JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Rotation {
    pub phase: Phase,
    /// The CAs to trust, PEM each: the new one first.
    pub trusted: Vec<String>,
    /// The digest of the CA that signs (the new one) and of the one it replaces.
    pub signing: String,
    pub old: String,
    pub started_ms: i64,
    pub by: String,
    #[serde(default)]
    pub finished_ms: i64,
    /// What the phase waits for.
    #[serde(default)]
    pub pending: Vec<String>,
}

impl Rotation {
    fn bundle(&self) -> String {
        self.trusted.concat()
    }
}

/// `/berth/ca/masters/<id>`: what a master trusts and presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MasterState {
    /// `bundle_digest` of its trust list.
    trusts: String,
    /// Digest of the CA that issued its certificate.
    presents: String,
}

fn read_json<T: for<'de> Deserialize<'de>>(ctx: &Ctx, key: &str) -> Result<Option<(T, i64)>, String> {
    let Some(kv) = ctx.reader.get(key.as_bytes()).map_err(|e| e.to_string())? else { return Ok(None) };
    let v = serde_json::from_slice(&kv.value).map_err(|e| format!("{key} does not parse: {e}"))?;
    Ok(Some((v, kv.mod_revision)))
}

pub(crate) fn read(ctx: &Ctx) -> Result<Option<(Rotation, i64)>, String> {
    read_json(ctx, ROTATION)
}

/// Starts a rotation. With a CSR, the caller gets a certificate of the new CA (for a user, its
/// serial joins the user's record in the same write, so `berth user rm` revokes it too).
pub(crate) async fn start(ctx: &Ctx, caller: &Caller, csr_pem: &str) -> Result<pb::CaRotateResponse, Status> {
    ctx.read_barrier().await?;
    let existing = read(ctx).map_err(Status::internal)?;
    if let Some((rot, _)) = &existing
        && rot.phase != Phase::Done
    {
        return Err(Status::failed_precondition(format!(
            "a CA rotation is under way (phase {}, started by {}, waiting for {}); see `berth ca status`, and \
             rotate again once it is done",
            rot.phase.as_str(),
            rot.by,
            if rot.pending.is_empty() { "nothing".to_string() } else { rot.pending.join(", ") }
        )));
    }
    let Some(current) = ctx.reader.ca().map_err(|e| Status::internal(e.to_string()))? else {
        return Err(Status::unavailable("the cluster CA is not recorded yet; retry in a few seconds"));
    };
    let old = CertificateAuthority::from_pem(&current.cert_pem, &current.key_pem)
        .map_err(|e| Status::internal(format!("the recorded CA: {e}")))?;
    let new = old.successor().map_err(|e| Status::internal(e.to_string()))?;
    let rot = Rotation {
        phase: Phase::Trust,
        trusted: vec![new.cert_pem().to_string(), old.cert_pem().to_string()],
        signing: new.digest().to_string(),
        old: old.digest().to_string(),
        started_ms: objects::now_ms(),
        by: caller.identity.to_string(),
        finished_ms: 0,
        pending: Vec::new(),
    };
    let mut parts = vec![objects::cas_put(
        ROTATION.as_bytes().to_vec(),
        existing.as_ref().map_or(0, |(_, rev)| *rev),
        serde_json::to_vec(&rot).expect("a rotation serializes"),
    )];
    let mut cert_pem = String::new();
    if !csr_pem.trim().is_empty() {
        cert_pem = new
            .sign_csr(csr_pem, &caller.identity, CALLER_VALIDITY)
            .map_err(|e| Status::invalid_argument(format!("the certificate signing request: {e}")))?;
        if caller.identity.role == Role::User {
            parts.push(crate::access_service::add_serial(ctx, &caller.identity.id, &cert_pem)?);
        }
    }
    let cmd = Command::RotateCa {
        ca: ClusterCa { cert_pem: new.cert_pem().to_string(), key_pem: new.key_pem().to_string() },
        expect_cert_pem: current.cert_pem,
        txn: objects::txn_of(parts),
    };
    match ctx.write(cmd).await? {
        CommandResult::Txn(t) if t.succeeded => {}
        _ => return Err(Status::aborted("the CA or the rotation changed meanwhile; run the command again")),
    }
    info!(by = %caller.identity, new = %new.digest(), old = %old.digest(), "CA rotation started");
    Ok(pb::CaRotateResponse {
        header: Some(ctx.header()),
        ca_digest: new.digest().to_string(),
        ca_pem: rot.bundle(),
        cert_pem,
    })
}

pub(crate) fn status(ctx: &Ctx) -> Result<pb::CaStatusResponse, Status> {
    let signing_digest = ctx.pki.digest().to_string();
    let trusted_digests = berth_pki::bundle_cert_digests(&ctx.pki.ca_pem())
        .map_err(|e| Status::internal(e.to_string()))?
        .iter()
        .map(|d| d.to_string())
        .collect();
    let mut out =
        pb::CaStatusResponse { header: Some(ctx.header()), signing_digest, trusted_digests, ..Default::default() };
    if let Some((rot, _)) = read(ctx).map_err(Status::internal)? {
        out.phase = rot.phase.as_str().to_string();
        out.started_ms = rot.started_ms;
        out.finished_ms = rot.finished_ms;
        out.pending = rot.pending;
        out.by = rot.by;
    }
    Ok(out)
}

/// On every master, when `/berth/ca/` changes and at start: takes the rotation's trust list and
/// signing CA, presents a certificate of the new CA from `switch` on, and acknowledges.
pub(crate) fn sync(ctx: &Arc<Ctx>) {
    let rot = match read(ctx) {
        Ok(Some((rot, _))) => rot,
        Ok(None) => return,
        Err(e) => return warn!("cannot read the CA rotation: {e}"),
    };
    let signing = match ctx.reader.ca() {
        Ok(Some(ca)) => ca,
        Ok(None) => return,
        Err(e) => return warn!("cannot read the cluster CA: {e}"),
    };
    match ctx.pki.sync(&rot.bundle(), &signing, rot.phase != Phase::Trust) {
        Ok(synced) if synced.any() => reload_tls(ctx),
        Ok(_) => {}
        Err(e) => return warn!("cannot follow the CA rotation: {e}"),
    }
    let mine = MasterState {
        trusts: ctx.pki.bundle_digest(),
        presents: ctx.pki.cert_ca_digest().map(|d| d.to_string()).unwrap_or_default(),
    };
    let key = format!("{MASTERS}{}", ctx.id);
    let stored = read_json::<MasterState>(ctx, &key).ok().flatten();
    if stored.as_ref().is_some_and(|(s, _)| *s == mine) {
        return;
    }
    let rev = stored.map_or(0, |(_, rev)| rev);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let value = serde_json::to_vec(&mine).expect("a master's CA state serializes");
        let txn = objects::txn_of(vec![objects::cas_put(key.into_bytes(), rev, value)]);
        if let Err(e) = ctx.write(Command::Txn(txn)).await {
            // The next change under /berth/ca/, or the leader's next look, tries again.
            info!("recording this master's CA state failed: {}", e.message());
        }
    });
}

/// New handshakes use the current certificates and trust: gRPC builds its configuration per
/// connection; the peers' channels and the agents' endpoint are rebuilt here.
pub(crate) fn reload_tls(ctx: &Ctx) {
    ctx.peers.reset_channels();
    if let Some(ep) = ctx.quic.get() {
        match ctx
            .pki
            .quic_server_config()
            .and_then(|tls| berth_channel::server_config(tls).map_err(|e| crate::MasterError::Pki(e.to_string())))
        {
            Ok(cfg) => ep.set_server_config(Some(cfg)),
            Err(e) => warn!("the agents' endpoint keeps its old TLS configuration: {e}"),
        }
    }
}

/// The leader moves a rotation through its phases once what each phase waits for is done.
pub(crate) async fn drive(ctx: Arc<Ctx>, token: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = token.cancelled() => return,
        }
        if let Err(e) = step(&ctx).await {
            info!("CA rotation: {e}");
        }
    }
}

async fn step(ctx: &Arc<Ctx>) -> Result<(), String> {
    let Some((mut rot, rev)) = read(ctx)? else { return Ok(()) };
    if rot.phase == Phase::Done {
        return Ok(());
    }
    // A master that missed its acknowledgement (its write failed) gets another go.
    sync(ctx);
    let bundle = berth_pki::bundle_digest(&rot.bundle()).map_err(|e| e.to_string())?.to_string();
    let mut pending = Vec::new();
    let members: Vec<u64> = ctx.metrics().membership_config.membership().nodes().map(|(id, _)| *id).collect();
    for id in members {
        let ok = read_json::<MasterState>(ctx, &format!("{MASTERS}{id}"))?
            .is_some_and(|(m, _)| m.trusts == bundle && (rot.phase == Phase::Trust || m.presents == rot.signing));
        if !ok {
            pending.push(format!("master {id}"));
        }
    }
    if rot.phase == Phase::Trust {
        let nodes =
            objects::list::<pb::Node>(&ctx.reader, objects::NODES_PREFIX).map_err(|e| e.message().to_string())?;
        for n in nodes {
            if n.obj.status == pb::NodeStatus::Down as i32 {
                continue;
            }
            if ctx.liveness.ca_report(&n.obj.id) != Some((bundle.clone(), rot.signing.clone())) {
                pending.push(format!("node {}", n.obj.name));
            }
        }
    }
    let next = if pending.is_empty() {
        match rot.phase {
            Phase::Trust => {
                info!("CA rotation: every master and live node trusts the new CA; masters switch to it");
                rot.phase = Phase::Switch;
            }
            Phase::Switch | Phase::Done => {
                info!("CA rotation: every master presents the new CA; the old CA is retired");
                rot.phase = Phase::Done;
                rot.trusted.truncate(1);
                rot.finished_ms = objects::now_ms();
            }
        }
        rot.pending.clear();
        rot
    } else {
        let more = pending.len().saturating_sub(MAX_PENDING_LISTED);
        pending.truncate(MAX_PENDING_LISTED);
        if more > 0 {
            pending.push(format!("{more} more"));
        }
        if pending == rot.pending {
            return Ok(());
        }
        rot.pending = pending;
        rot
    };
    let value = serde_json::to_vec(&next).expect("a rotation serializes");
    let txn = objects::txn_of(vec![objects::cas_put(ROTATION.as_bytes().to_vec(), rev, value)]);
    ctx.write(Command::Txn(txn)).await.map_err(|e| e.message().to_string())?;
    Ok(())
}
