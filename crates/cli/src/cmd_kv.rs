//! `berth kv ...`

use anyhow::{Result, anyhow, bail};
use berth_api::pb::{self, compare, request_op, response_op};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::{
    Global,
    client::{Call, Client, explain},
    output::{self, Format},
};

#[derive(Subcommand)]
pub enum KvCmd {
    /// Write a key.
    Put(PutArgs),
    /// Read a key, or every key under a prefix.
    Get(GetArgs),
    /// Delete a key, or every key under a prefix.
    Del(DelArgs),
    /// Print changes to a key or prefix as they happen.
    Watch(WatchArgs),
    /// Forget the history at and below a revision.
    Compact(CompactArgs),
}

#[derive(Args)]
pub struct PutArgs {
    key: String,
    value: String,
    /// Write only if the key's mod_revision is N (optimistic concurrency).
    #[arg(long, conflicts_with = "if_absent")]
    if_mod_revision: Option<i64>,
    /// Write only if the key does not exist.
    #[arg(long)]
    if_absent: bool,
}

#[derive(Args)]
pub struct GetArgs {
    key: String,
    /// Treat KEY as a prefix.
    #[arg(long)]
    prefix: bool,
    /// Read at this revision (0 = current).
    #[arg(long, default_value_t = 0)]
    revision: i64,
    /// Serve from any master's local state without a read-index round (may be stale).
    #[arg(long)]
    serializable: bool,
    /// At most this many keys (0 = no limit).
    #[arg(long, default_value_t = 0)]
    limit: i64,
}

#[derive(Args)]
pub struct DelArgs {
    key: String,
    #[arg(long)]
    prefix: bool,
}

#[derive(Args)]
pub struct WatchArgs {
    key: String,
    #[arg(long)]
    prefix: bool,
    /// Replay history from this revision first (0 = only new changes).
    #[arg(long, default_value_t = 0)]
    from_revision: i64,
}

#[derive(Args)]
pub struct CompactArgs {
    revision: i64,
}

#[derive(Serialize)]
struct KvOut {
    key: String,
    value: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
}

impl From<pb::KeyValue> for KvOut {
    fn from(kv: pb::KeyValue) -> Self {
        KvOut {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: String::from_utf8_lossy(&kv.value).into_owned(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

fn range_end(key: &str, prefix: bool) -> Vec<u8> {
    if prefix { berth_types::prefix_end(key.as_bytes()) } else { vec![] }
}

pub async fn run(cmd: KvCmd, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    match cmd {
        KvCmd::Put(a) => {
            let put = pb::RequestOp {
                request: Some(request_op::Request::RequestPut(pb::PutRequest {
                    key: a.key.clone().into_bytes(),
                    value: a.value.into_bytes(),
                    prev_kv: false,
                })),
            };
            let guard = match (a.if_mod_revision, a.if_absent) {
                (Some(rev), _) => Some(pb::Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: a.key.clone().into_bytes(),
                    target_union: Some(compare::TargetUnion::ModRevision(rev)),
                }),
                (None, true) => Some(pb::Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Create as i32,
                    key: a.key.clone().into_bytes(),
                    target_union: Some(compare::TargetUnion::CreateRevision(0)),
                }),
                (None, false) => None,
            };
            let get_current = pb::RequestOp {
                request: Some(request_op::Request::RequestRange(pb::RangeRequest {
                    key: a.key.clone().into_bytes(),
                    ..Default::default()
                })),
            };
            let req =
                pb::TxnRequest { compare: guard.into_iter().collect(), success: vec![put], failure: vec![get_current] };
            let resp = client
                .call(Call::Once, |ch| {
                    let req = req.clone();
                    async move { Client::kv(ch).txn(req).await.map(|r| r.into_inner()) }
                })
                .await
                .map_err(|s| explain(s, &format!("check with `berth kv get {}` before writing again", a.key)))?;
            let revision = resp.header.as_ref().map_or(0, |h| h.revision);
            if !resp.succeeded {
                let current = resp
                    .responses
                    .into_iter()
                    .find_map(|r| match r.response {
                        Some(response_op::Response::ResponseRange(rr)) => Some(rr.kvs),
                        _ => None,
                    })
                    .unwrap_or_default();
                let why = match current.first() {
                    Some(kv) => format!("the key exists with mod_revision {}", kv.mod_revision),
                    None => "the key does not exist".to_string(),
                };
                bail!(
                    "not written: the condition did not hold ({why}); read the key and retry with its current mod_revision"
                );
            }
            #[derive(Serialize)]
            struct PutOut {
                key: String,
                revision: i64,
            }
            output::print(g.output, &PutOut { key: a.key, revision }, |o| println!("OK revision={}", o.revision));
        }
        KvCmd::Get(a) => {
            let req = pb::RangeRequest {
                key: a.key.clone().into_bytes(),
                range_end: range_end(&a.key, a.prefix),
                revision: a.revision,
                serializable: a.serializable,
                limit: a.limit,
                ..Default::default()
            };
            let resp = client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { Client::kv(ch).range(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            #[derive(Serialize)]
            struct GetOut {
                revision: i64,
                count: i64,
                more: bool,
                kvs: Vec<KvOut>,
            }
            let out = GetOut {
                revision: resp.header.as_ref().map_or(0, |h| h.revision),
                count: resp.count,
                more: resp.more,
                kvs: resp.kvs.into_iter().map(KvOut::from).collect(),
            };
            if out.kvs.is_empty() && !a.prefix && g.output == Format::Table {
                bail!("key {:?} not found (at revision {})", a.key, out.revision);
            }
            output::print(g.output, &out, |o| {
                let rows: Vec<Vec<String>> = o
                    .kvs
                    .iter()
                    .map(|kv| {
                        vec![kv.key.clone(), kv.value.clone(), kv.mod_revision.to_string(), kv.version.to_string()]
                    })
                    .collect();
                output::table(&["KEY", "VALUE", "MOD_REVISION", "VERSION"], &rows);
            });
        }
        KvCmd::Del(a) => {
            let req = pb::DeleteRangeRequest {
                key: a.key.clone().into_bytes(),
                range_end: range_end(&a.key, a.prefix),
                prev_kv: false,
            };
            let resp = client
                .call(Call::Idempotent, |ch| {
                    let req = req.clone();
                    async move { Client::kv(ch).delete_range(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            #[derive(Serialize)]
            struct DelOut {
                deleted: i64,
                revision: i64,
            }
            let out = DelOut { deleted: resp.deleted, revision: resp.header.map_or(0, |h| h.revision) };
            output::print(g.output, &out, |o| println!("deleted {} revision={}", o.deleted, o.revision));
        }
        KvCmd::Watch(a) => watch(&client, a, g.output).await?,
        KvCmd::Compact(a) => {
            if a.revision <= 0 {
                bail!("compact revision must be positive");
            }
            client
                .call(Call::Once, |ch| async move {
                    Client::kv(ch).compact(pb::CompactionRequest { revision: a.revision }).await.map(|r| r.into_inner())
                })
                .await
                .map_err(|s| explain(s, "running the compaction again is refused harmlessly if it was applied"))?;
            output::done(g.output, serde_json::json!({ "compacted": a.revision }), || {
                format!("compacted up to revision {}", a.revision)
            });
        }
    }
    Ok(())
}

async fn watch(client: &Client, a: WatchArgs, format: Format) -> Result<()> {
    follow(client, a.key.clone().into_bytes(), range_end(&a.key, a.prefix), a.from_revision, |e| {
        let kind = if e.r#type == pb::event::EventType::Delete as i32 { "DELETE" } else { "PUT" };
        let kv = KvOut::from(e.kv.unwrap_or_default());
        match format {
            Format::Table => println!("{kind} {} {} (revision {})", kv.key, kv.value, kv.mod_revision),
            _ => {
                #[derive(Serialize)]
                struct Ev<'a> {
                    r#type: &'a str,
                    #[serde(flatten)]
                    kv: KvOut,
                }
                println!("{}", serde_json::to_string(&Ev { r#type: kind, kv })?);
            }
        }
        Ok(())
    })
    .await
}

/// Calls `on_event` for every change of `[key, range_end)` from revision `from` on (0: from now),
/// forever: after a master fails the watch resumes from the last revision seen, so nothing is
/// missed or repeated. Ends with an error when the watch is canceled (compacted past `from`).
pub(crate) async fn follow(
    client: &Client,
    key: Vec<u8>,
    range_end: Vec<u8>,
    mut from: i64,
    mut on_event: impl FnMut(pb::Event) -> Result<()>,
) -> Result<()> {
    loop {
        let req =
            pb::WatchRequest { key: key.clone(), range_end: range_end.clone(), start_revision: from, prev_kv: false };
        let mut stream = client
            .call(Call::Idempotent, |ch| {
                let req = req.clone();
                async move { Client::kv(ch).watch(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => break,
            };
            if msg.canceled {
                return Err(anyhow!(
                    "watch canceled: {}{}",
                    msg.cancel_reason,
                    if msg.compact_revision > 0 { "; run the command again to start from now" } else { "" }
                ));
            }
            for e in msg.events {
                from = from.max(e.kv.as_ref().map_or(0, |kv| kv.mod_revision) + 1);
                on_event(e)?;
            }
            if from == 0
                && let Some(h) = msg.header
            {
                from = h.revision + 1;
            }
        }
        eprintln!("watch stream ended; resuming from revision {from}");
    }
}
