//! Cluster events: what happened to nodes, tasks, rollouts, the leader, members and tokens, as
//! `berth events` and `berth describe` show them. Stored in the replicated state under
//! [`EVENTS_PREFIX`], one key per event, ordered by time, and kept for a bounded time and count.

use serde::{Deserialize, Serialize};

/// Where events live: `/berth/events/<at_ms, 13 digits>-<8 hex>`, so a range is in time order.
pub const EVENTS_PREFIX: &str = "/berth/events/";

/// Every event type, for `--type` and the docs.
pub const EVENT_TYPES: &[&str] = &[
    NODE_UP,
    NODE_DOWN,
    TASK_FAILED,
    TASK_FENCED,
    ROLLOUT_STARTED,
    ROLLOUT_PAUSED,
    ROLLOUT_RESUMED,
    ROLLBACK_STARTED,
    ROLLED_BACK,
    ROLLOUT_COMPLETED,
    LEADER_ELECTED,
    MEMBER_ADDED,
    MEMBER_REMOVED,
    TOKEN_USED,
];

pub const NODE_UP: &str = "NodeUp";
pub const NODE_DOWN: &str = "NodeDown";
pub const TASK_FAILED: &str = "TaskFailed";
pub const TASK_FENCED: &str = "TaskFenced";
pub const ROLLOUT_STARTED: &str = "RolloutStarted";
pub const ROLLOUT_PAUSED: &str = "RolloutPaused";
pub const ROLLOUT_RESUMED: &str = "RolloutResumed";
pub const ROLLBACK_STARTED: &str = "RollbackStarted";
pub const ROLLED_BACK: &str = "RolledBack";
pub const ROLLOUT_COMPLETED: &str = "RolloutCompleted";
pub const LEADER_ELECTED: &str = "LeaderElected";
pub const MEMBER_ADDED: &str = "MemberAdded";
pub const MEMBER_REMOVED: &str = "MemberRemoved";
pub const TOKEN_USED: &str = "TokenUsed";

/// One event. Unknown fields are refused, so a record from a newer version is an error, not a
/// half-read event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterEvent {
    /// When it happened (ms since the epoch, the recording master's clock).
    pub at_ms: i64,
    /// One of [`EVENT_TYPES`].
    #[serde(rename = "type")]
    pub kind: String,
    /// What it happened to: `node`, `task`, `service`, `master` or `token`.
    pub object: String,
    /// The object's namespace (services and tasks), else empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The object's name or id.
    pub name: String,
    /// What happened, for a human.
    pub message: String,
    /// The master that recorded it.
    pub master: u64,
}

impl ClusterEvent {
    /// The event's key: its time, then `suffix` (8 hex digits that keep same-millisecond events
    /// apart).
    pub fn key(&self, suffix: u32) -> String {
        format!("{EVENTS_PREFIX}{:013}-{suffix:08x}", self.at_ms.max(0))
    }

    /// Whether the event concerns `object` `namespace/name`; a service's events include its
    /// tasks' (a task id is `<service>.<slot>.<random>`).
    pub fn concerns(&self, object: &str, namespace: &str, name: &str) -> bool {
        if self.namespace != namespace {
            return false;
        }
        (self.object == object && self.name == name)
            || (object == "service"
                && self.object == "task"
                && self.name.strip_prefix(name).is_some_and(|rest| rest.starts_with('.')))
    }
}

/// The first key of events at or after `at_ms`.
pub fn key_at(at_ms: i64) -> String {
    format!("{EVENTS_PREFIX}{:013}", at_ms.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_time_and_round_trip() {
        let e = |at_ms| ClusterEvent {
            at_ms,
            kind: NODE_DOWN.into(),
            object: "node".into(),
            namespace: String::new(),
            name: "n1".into(),
            message: "no heartbeat for 10s".into(),
            master: 1,
        };
        assert!(e(999).key(7) < e(1000).key(0));
        assert!(key_at(1000) <= e(1000).key(0) && e(999).key(u32::MAX) < key_at(1000));
        let json = serde_json::to_string(&e(5)).unwrap();
        assert!(json.contains(r#""type":"NodeDown""#) && !json.contains("namespace"), "{json}");
        assert_eq!(serde_json::from_str::<ClusterEvent>(&json).unwrap(), e(5));
        let mut t = e(6);
        (t.object, t.namespace, t.name) = ("task".into(), "default".into(), "web.1.0123456789".into());
        assert!(t.concerns("service", "default", "web") && t.concerns("task", "default", "web.1.0123456789"));
        assert!(!t.concerns("service", "default", "we") && !t.concerns("service", "other", "web"));
        let newer = json.replace("\"master\"", "\"colour\":\"red\",\"master\"");
        assert!(serde_json::from_str::<ClusterEvent>(&newer).is_err(), "unknown fields are refused");
    }
}
