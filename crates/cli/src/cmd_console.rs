//! `berth console token create|ls|revoke`: logins for the web console (`berth master
//! --console-listen`), issued by an admin.

use std::time::Duration;

use anyhow::Result;
use berth_api::pb;
use clap::Subcommand;
use serde::Serialize;

use crate::{
    Global,
    client::{Call, Client},
    cmd_nodes::fmt_time_ms,
    output,
};

#[derive(Subcommand)]
pub enum ConsoleCmd {
    /// Console tokens: what a browser logs in with when it has no client certificate.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Issue a token and print it (once: only its hash is stored). The console acts with the
    /// user's rights.
    Create {
        /// The user it logs in as (`berth user add`); omitted: you.
        #[arg(long)]
        user: Option<String>,
        /// How long it stays valid (at most 30 days).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "8h")]
        ttl: Duration,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// The tokens kept: id, identity, expiry (never the secret).
    #[command(alias = "list")]
    Ls,
    /// Revoke a token: a browser logged in with it is logged out at its next request.
    Revoke { id: String },
}

#[derive(Serialize)]
struct TokenOut {
    id: String,
    identity: String,
    created: String,
    expires: String,
    expired: bool,
    by: String,
    description: String,
}

pub async fn run(cmd: ConsoleCmd, g: &Global) -> Result<()> {
    let ConsoleCmd::Token(cmd) = cmd;
    let client = crate::config::client(g)?;
    match cmd {
        TokenCmd::Create { user, ttl, description } => {
            let req = pb::ConsoleTokenCreateRequest {
                user: user.unwrap_or_default(),
                ttl_secs: ttl.as_secs().max(1),
                description,
            };
            let r = client
                .call(Call::Once, |ch| {
                    let req = req.clone();
                    async move { Client::access(ch).console_token_create(req).await.map(|r| r.into_inner()) }
                })
                .await
                .map_err(|s| {
                    crate::client::explain(
                        s,
                        "a token may have been issued: see `berth console token ls`, and revoke an unwanted one",
                    )
                })?;
            let rec = r.record.unwrap_or_default();
            // The table form is the token alone, for `TOKEN=$(...)`.
            output::done(
                g.output,
                serde_json::json!({ "token": r.token, "id": rec.id, "identity": rec.identity, "expires_ms": rec.expires_ms }),
                || r.token.clone(),
            );
        }
        TokenCmd::Ls => {
            let r = client
                .call(Call::Idempotent, |ch| async move {
                    Client::access(ch).console_token_list(pb::ConsoleTokenListRequest {}).await
                })
                .await?
                .into_inner();
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            let out: Vec<TokenOut> = r
                .tokens
                .into_iter()
                .map(|t| TokenOut {
                    expired: t.expires_ms <= now,
                    id: t.id,
                    identity: t.identity,
                    created: fmt_time_ms(t.created_ms),
                    expires: fmt_time_ms(t.expires_ms),
                    by: t.by,
                    description: t.description,
                })
                .collect();
            output::print(g.output, &out, |out| {
                let rows = out
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.identity.clone(),
                            if t.expired { format!("expired {}", t.expires) } else { t.expires.clone() },
                            t.by.clone(),
                            t.description.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                output::table(&["ID", "IDENTITY", "EXPIRES", "BY", "DESCRIPTION"], &rows);
            });
        }
        TokenCmd::Revoke { id } => {
            client
                .call(Call::Idempotent, |ch| {
                    let id = id.clone();
                    async move { Client::access(ch).console_token_revoke(pb::ConsoleTokenRevokeRequest { id }).await }
                })
                .await?;
            output::done(g.output, serde_json::json!({ "revoked": id }), || format!("console token {id} revoked"));
        }
    }
    Ok(())
}
