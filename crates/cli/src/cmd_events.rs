//! `berth events`: the cluster's events (node up and down, task failures and fences, rollouts,
//! leader elections, members, tokens), read from the replicated state, and followed with a watch.

use anyhow::Result;
use berth_api::pb;
use berth_types::event::{self, ClusterEvent, EVENT_TYPES, EVENTS_PREFIX};
use clap::Args;

use crate::{
    Global,
    client::{Call, Client},
    output::Format,
};

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Events from this long ago (e.g. 10m) or from this time (RFC 3339); default: all kept
    /// (the last hour, at most 10,000).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events of this type (repeat for more), e.g. NodeDown, TaskFailed, RolledBack.
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_type)]
    pub types: Vec<String>,
    /// Keep printing new events.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

fn parse_type(s: &str) -> std::result::Result<String, String> {
    EVENT_TYPES
        .iter()
        .find(|t| t.eq_ignore_ascii_case(s))
        .map(|t| t.to_string())
        .ok_or_else(|| format!("{s:?} is not an event type; the types are {}", EVENT_TYPES.join(", ")))
}

/// Events kept in the cluster from `since_ms` on, oldest first, and the revision they were read at.
pub(crate) async fn list(client: &Client, since_ms: i64) -> Result<(Vec<ClusterEvent>, i64)> {
    let req = pb::RangeRequest {
        key: event::key_at(since_ms).into_bytes(),
        range_end: berth_types::prefix_end(EVENTS_PREFIX.as_bytes()),
        ..Default::default()
    };
    let resp = client
        .call(Call::Idempotent, |ch| {
            let req = req.clone();
            async move { Client::kv(ch).range(req).await.map(|r| r.into_inner()) }
        })
        .await?;
    let revision = resp.header.map_or(0, |h| h.revision);
    let events = resp.kvs.iter().filter_map(|kv| decode(&kv.key, &kv.value)).collect();
    Ok((events, revision))
}

/// An event as stored; one this client cannot read (a newer version's) is skipped with a note.
fn decode(key: &[u8], value: &[u8]) -> Option<ClusterEvent> {
    match serde_json::from_slice(value) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!(
                "warning: skipping event {}: {e} (written by a newer berth? upgrade this client)",
                String::from_utf8_lossy(key)
            );
            None
        }
    }
}

pub(crate) fn time_of(ms: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64))
        .to_string()
}

fn object_of(e: &ClusterEvent) -> String {
    if e.namespace.is_empty() {
        format!("{}/{}", e.object, e.name)
    } else {
        format!("{}/{}/{}", e.object, e.namespace, e.name)
    }
}

pub(crate) fn rows(events: &[&ClusterEvent]) -> Vec<Vec<String>> {
    events.iter().map(|e| vec![time_of(e.at_ms), e.kind.clone(), object_of(e), e.message.clone()]).collect()
}

pub(crate) const HEADERS: [&str; 4] = ["TIME", "TYPE", "OBJECT", "MESSAGE"];

pub async fn run(a: EventsArgs, g: &Global) -> Result<()> {
    let client = crate::config::client(g)?;
    let since = a.since.as_deref().map(crate::cmd_access::since_ms).transpose()?.unwrap_or(0);
    let wanted = |e: &ClusterEvent| a.types.is_empty() || a.types.contains(&e.kind);
    let (events, revision) = list(&client, since).await?;
    let shown: Vec<&ClusterEvent> = events.iter().filter(|e| wanted(e)).collect();
    match g.output {
        Format::Json | Format::Yaml if !a.follow => crate::output::print(g.output, &shown, |_| {}),
        // Followed, JSON is one event per line (as `kubectl get events -w -o json` streams them).
        Format::Json | Format::Yaml => {
            for e in &shown {
                println!("{}", serde_json::to_string(e)?);
            }
        }
        Format::Table | Format::Wide => crate::output::table(&HEADERS, &rows(&shown)),
    }
    if !a.follow {
        return Ok(());
    }
    follow(&client, revision + 1, g.output, &wanted).await
}

/// Prints every new event from `from` on, resuming after a master fails without missing or
/// repeating one.
async fn follow(client: &Client, from: i64, format: Format, wanted: &dyn Fn(&ClusterEvent) -> bool) -> Result<()> {
    let (key, end) = (EVENTS_PREFIX.as_bytes().to_vec(), berth_types::prefix_end(EVENTS_PREFIX.as_bytes()));
    crate::cmd_kv::follow(client, key, end, from, |e| {
        // Deletions are retention trimming old events: nothing to show.
        if e.r#type == pb::event::EventType::Delete as i32 {
            return Ok(());
        }
        let kv = e.kv.unwrap_or_default();
        let Some(ev) = decode(&kv.key, &kv.value).filter(|ev| wanted(ev)) else { return Ok(()) };
        match format {
            Format::Table | Format::Wide => println!("{}", rows(&[&ev]).remove(0).join("  ")),
            _ => println!("{}", serde_json::to_string(&ev)?),
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_checked_and_named() {
        assert_eq!(parse_type("nodedown").unwrap(), "NodeDown");
        let e = parse_type("NodeExploded").unwrap_err();
        assert!(e.contains("NodeDown") && e.contains("RolledBack"), "{e}");
    }
}
