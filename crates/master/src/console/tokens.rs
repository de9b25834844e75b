//! Console tokens: logins for the web console that an admin issues (`berth console token
//! create`), stored at `/berth/console/tokens/<id>` with the secret's SHA-256. The console acts
//! with the rights of the identity the token names, so issuing one for a user is as strong as
//! adding the user: it needs `create` on `users` (list and revoke: `list` and `delete`).

use std::time::Duration;

use berth_api::pb;
use berth_pki::{ConsoleToken, Identity};
use berth_types::Command;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::{
    access_service::txn_ok,
    authz::{self, Caller, USERS, UserRecord},
    node::Ctx,
    objects::{cas_put, now_ms, txn_of},
};

pub(crate) const TOKENS: &str = "/berth/console/tokens/";

/// Valid this long unless the issuer says otherwise.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(8 * 3600);
/// The longest a console token may live.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A console token as stored (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRecord {
    pub id: String,
    /// `ROLE/ID`: `user/<name>` or `admin/<name>`.
    pub identity: String,
    pub secret_sha256: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub by: String,
    #[serde(default)]
    pub description: String,
}

impl TokenRecord {
    fn view(&self) -> pb::ConsoleToken {
        pb::ConsoleToken {
            id: self.id.clone(),
            identity: self.identity.clone(),
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            by: self.by.clone(),
            description: self.description.clone(),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Issues a token for `r.user` (or the caller). The caller's right to do so was checked.
pub(crate) async fn create(
    ctx: &Ctx,
    caller: &Caller,
    r: pb::ConsoleTokenCreateRequest,
) -> Result<pb::ConsoleTokenCreateResponse, Status> {
    let ttl = match r.ttl_secs {
        0 => DEFAULT_TTL,
        s => Duration::from_secs(s),
    };
    if ttl > MAX_TTL {
        return Err(Status::invalid_argument("a console token is valid for 30 days at most (--ttl 720h)"));
    }
    if r.description.len() > 256 {
        return Err(Status::invalid_argument("the description is longer than 256 characters"));
    }
    let identity = if r.user.is_empty() {
        if !matches!(caller.identity.role, berth_pki::Role::Admin | berth_pki::Role::User) {
            return Err(Status::invalid_argument(format!(
                "{} cannot log in to the console: name a user with --user",
                caller.identity
            )));
        }
        caller.identity.clone()
    } else {
        berth_types::spec::access::check_user_name("user", &r.user)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        ctx.read_barrier().await?;
        if ctx.reader.get(format!("{USERS}{}", r.user).as_bytes()).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!(
                "there is no user {:?}: add it first (`berth user add {}`), see `berth user ls`",
                r.user, r.user
            )));
        }
        Identity::user(&r.user)
    };
    let token = ConsoleToken::generate();
    let created_ms = now_ms();
    let rec = TokenRecord {
        id: token.id.clone(),
        identity: identity.to_string(),
        secret_sha256: token.secret_hash(),
        created_ms,
        expires_ms: created_ms + ttl.as_millis() as i64,
        by: caller.identity.to_string(),
        description: r.description,
    };
    let put = cas_put(
        format!("{TOKENS}{}", token.id).into_bytes(),
        0,
        serde_json::to_vec(&rec).expect("a token record serializes"),
    );
    txn_ok(ctx.write(Command::Txn(txn_of(vec![put]))).await?, "the console token")?;
    tracing::info!(id = rec.id, identity = rec.identity, "console token issued");
    Ok(pb::ConsoleTokenCreateResponse { header: Some(ctx.header()), token: token.encode(), record: Some(rec.view()) })
}

/// Every token kept, expired ones included (they say so by their time).
pub(crate) async fn list(ctx: &Ctx) -> Result<pb::ConsoleTokenListResponse, Status> {
    ctx.read_barrier().await?;
    let mut tokens = Vec::new();
    for (id, value) in authz::range_prefix(&ctx.reader, TOKENS).map_err(internal)? {
        match serde_json::from_slice::<TokenRecord>(&value) {
            Ok(t) => tokens.push(t.view()),
            Err(e) => tracing::warn!(id, "ignoring a console token record that does not parse: {e}"),
        }
    }
    Ok(pb::ConsoleTokenListResponse { header: Some(ctx.header()), tokens })
}

pub(crate) async fn revoke(ctx: &Ctx, id: &str) -> Result<pb::ConsoleTokenRevokeResponse, Status> {
    ctx.read_barrier().await?;
    let key = format!("{TOKENS}{id}");
    let Some(kv) = ctx.reader.get(key.as_bytes()).map_err(internal)? else {
        return Err(Status::not_found(format!("there is no console token {id:?} (see `berth console token ls`)")));
    };
    let del = (
        berth_types::Compare {
            key: key.clone().into_bytes(),
            op: berth_types::CompareOp::Equal,
            target: berth_types::CompareTarget::ModRevision(kv.mod_revision),
        },
        crate::objects::delete(key.into_bytes()),
    );
    txn_ok(ctx.write(Command::Txn(txn_of(vec![del]))).await?, "the console token")?;
    tracing::info!(id, "console token revoked");
    Ok(pb::ConsoleTokenRevokeResponse { header: Some(ctx.header()) })
}

/// Why a presented token does not log in. Unknown ids and wrong secrets get one answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Refused {
    #[error("{0}")]
    Malformed(String),
    #[error("unknown or wrong console token: ask an admin for one (`berth console token create`)")]
    Unknown,
    #[error("this console token expired; ask an admin for a new one (`berth console token create`)")]
    Expired,
    #[error("{0} no longer exists, so its console tokens are void")]
    UserGone(String),
}

/// The identity a token logs in as, checked against this master's copy of the state (a token
/// issued through another master a moment ago may need a retry; a revoked one is refused as
/// soon as the revocation is applied here).
pub(crate) fn authenticate(ctx: &Ctx, presented: &str) -> Result<(Identity, TokenRecord), Refused> {
    let token = ConsoleToken::parse(presented).map_err(|e| Refused::Malformed(e.to_string()))?;
    let rec = ctx
        .reader
        .get(format!("{TOKENS}{}", token.id).as_bytes())
        .ok()
        .flatten()
        .and_then(|kv| serde_json::from_slice::<TokenRecord>(&kv.value).ok())
        .ok_or(Refused::Unknown)?;
    if !berth_pki::token::secret_matches(&token.secret, &rec.secret_sha256) {
        return Err(Refused::Unknown);
    }
    if now_ms() >= rec.expires_ms {
        return Err(Refused::Expired);
    }
    let identity: Identity = rec.identity.parse().map_err(|_| Refused::Unknown)?;
    // A user removed (and perhaps added again since) voids the tokens issued before.
    if let berth_pki::Role::User = identity.role {
        let user = ctx
            .reader
            .get(format!("{USERS}{}", identity.id).as_bytes())
            .ok()
            .flatten()
            .and_then(|kv| serde_json::from_slice::<UserRecord>(&kv.value).ok());
        match user {
            Some(u) if u.created_ms <= rec.created_ms => {}
            _ => return Err(Refused::UserGone(identity.to_string())),
        }
    }
    Ok((identity, rec))
}
