//! Recording cluster events ([`berth_types::event`]) and keeping them bounded.
//!
//! An event that comes with a change of state is one more put in the change's own transaction
//! (a node going down, a task's failure, a rollout's step), so it is recorded exactly when the
//! change commits. Events with no such change (a new leader, a member added or removed, a token
//! used) are written on their own after the fact. The leader deletes events older than
//! [`RETENTION`] and the oldest beyond [`MAX_EVENTS`].

use std::{sync::Arc, time::Duration};

use berth_types::{
    Command, Put, RangeQuery, RequestOp, Txn,
    event::{self, ClusterEvent, EVENTS_PREFIX},
    prefix_end,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::node::Ctx;

/// How long events are kept (Kubernetes keeps them an hour by default).
pub(crate) const RETENTION: Duration = Duration::from_secs(3600);
/// The most events kept; the oldest go first.
pub(crate) const MAX_EVENTS: usize = 10_000;
/// How often the leader trims them.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// A new event recorded by master `master` now.
pub(crate) fn new(master: u64, kind: &str, object: &str, namespace: &str, name: &str, message: String) -> ClusterEvent {
    ClusterEvent {
        at_ms: crate::objects::now_ms(),
        kind: kind.to_string(),
        object: object.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        message,
        master,
    }
}

/// The put that records `e`, for a transaction's success ops.
pub(crate) fn put(e: &ClusterEvent) -> RequestOp {
    let value = serde_json::to_vec(e).expect("an event encodes as JSON");
    RequestOp::Put(Put { key: e.key(uuid::Uuid::new_v4().as_u128() as u32).into_bytes(), value, prev_kv: false })
}

/// `txn` with `events` recorded when it succeeds.
pub(crate) fn with(mut txn: Txn, events: &[ClusterEvent]) -> Txn {
    txn.success.extend(events.iter().map(put));
    txn
}

/// Records `e` on its own (for events that come with no change of state). A failure is logged:
/// an event is a record of what happened, never a reason to fail what happened.
pub(crate) async fn emit(ctx: &Ctx, e: ClusterEvent) {
    let txn = Txn { compare: vec![], success: vec![put(&e)], failure: vec![] };
    if let Err(s) = ctx.write(Command::Txn(txn)).await {
        info!(event = %e.kind, name = %e.name, "event not recorded: {}", s.message());
    }
}

/// While this master leads: deletes events past [`RETENTION`] or beyond [`MAX_EVENTS`].
pub(crate) async fn retain(ctx: Arc<Ctx>, leading: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TRIM_EVERY) => {}
            _ = leading.cancelled() => return,
        }
        if let Err(e) = trim(&ctx).await {
            debug!("trimming events: {e}");
        }
    }
}

async fn trim(ctx: &Ctx) -> Result<(), String> {
    let cutoff = crate::objects::now_ms() - RETENTION.as_millis() as i64;
    let cutoff_key = event::key_at(cutoff).into_bytes();
    let q = RangeQuery {
        key: EVENTS_PREFIX.as_bytes().to_vec(),
        range_end: prefix_end(EVENTS_PREFIX.as_bytes()),
        keys_only: true,
        ..Default::default()
    };
    let (all, _) = ctx.reader.range(&q).map_err(|e| e.to_string())?;
    let keys: Vec<&[u8]> = all.kvs.iter().map(|kv| kv.key.as_slice()).collect();
    let Some(below) = trim_below(&keys, &cutoff_key, MAX_EVENTS) else { return Ok(()) };
    let del = RequestOp::DeleteRange(berth_types::DeleteRange {
        key: EVENTS_PREFIX.as_bytes().to_vec(),
        range_end: below,
        prev_kv: false,
    });
    ctx.write(Command::Txn(Txn { compare: vec![], success: vec![del], failure: vec![] }))
        .await
        .map_err(|s| s.message().to_string())?;
    Ok(())
}

/// Where to delete events up to (exclusive), given every event key in order: below the time
/// cutoff, and below the oldest of the newest `max`; None when nothing goes.
fn trim_below(keys: &[&[u8]], cutoff: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut below = cutoff.to_vec();
    if keys.len() > max {
        let keep_from = keys[keys.len() - max];
        if keep_from > below.as_slice() {
            below = keep_from.to_vec();
        }
    }
    keys.first().is_some_and(|k| *k < below.as_slice()).then_some(below)
}

/// The rollout event for a service whose rollout enters `state`.
pub(crate) fn rollout_kind(state: berth_api::pb::RolloutState) -> Option<&'static str> {
    use berth_api::pb::RolloutState as R;
    match state {
        R::Updating => Some(event::ROLLOUT_STARTED),
        R::Paused => Some(event::ROLLOUT_PAUSED),
        R::RollingBack => Some(event::ROLLBACK_STARTED),
        R::RolledBack => Some(event::ROLLED_BACK),
        R::Completed => Some(event::ROLLOUT_COMPLETED),
        R::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_events_and_the_oldest_beyond_the_bound_go() {
        let key = |ms: i64| event::key_at(ms).into_bytes();
        let keys: Vec<Vec<u8>> = (1..=5).map(|ms| key(ms * 1000)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        assert_eq!(trim_below(&refs, &key(500), 10), None, "nothing old, under the bound");
        assert_eq!(trim_below(&refs, &key(2500), 10), Some(key(2500)), "older than the cutoff");
        assert_eq!(trim_below(&refs, &key(500), 2), Some(key(4000)), "the newest two stay");
        assert_eq!(trim_below(&refs, &key(4500), 2), Some(key(4500)), "the stricter bound wins");
        assert_eq!(trim_below(&[], &key(4500), 2), None);
    }
}
