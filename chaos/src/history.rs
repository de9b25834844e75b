//! The operation history, in Jepsen's shape: every client operation is recorded once when it is
//! invoked and once when it completes, as `ok` (it happened), `fail` (it certainly did not
//! happen) or `info` (its outcome is unknown: it may or may not have happened).

use serde::{Deserialize, Serialize};

/// How an event ends an operation, or `Invoke` for its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// A register operation on one key. Values are unique per write, never 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "lowercase")]
pub enum KvOp {
    /// On invoke `value` is None; on `ok` it is what was read (None: the key was absent).
    Read { value: Option<u64> },
    /// Unconditional put.
    Write { value: u64 },
    /// Put `to` if the current value is `from`. On `ok`, `succeeded` says whether it swapped.
    Cas { from: u64, to: u64, succeeded: Option<bool> },
}

/// One line of the history file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the history.
    pub index: u64,
    /// The logical client. A client whose operation ended `info` continues as a new process, as
    /// in Jepsen, so that a process never has two operations open.
    pub process: u64,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub key: String,
    #[serde(flatten)]
    pub op: KvOp,
    /// Nanoseconds since the run started.
    pub time_ns: u64,
    /// What went wrong, for `fail` and `info`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A completed (or never completed) operation, as the checkers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub process: u64,
    pub key: String,
    /// Invocation time (ns since start).
    pub call: u64,
    /// Completion time, None for `info` (the operation may take effect at any time after `call`).
    pub ret: Option<u64>,
    /// The operation with its result filled in (`Read.value`, `Cas.succeeded`) when `ok`.
    pub op: KvOp,
    pub outcome: Kind,
}

/// Pairs each invoke with its completion. Operations never completed count as `info`.
pub fn pair(events: &[Event]) -> Vec<Operation> {
    let mut open: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut ops: Vec<Operation> = Vec::new();
    for e in events {
        match e.kind {
            Kind::Invoke => {
                open.insert(e.process, ops.len());
                ops.push(Operation {
                    process: e.process,
                    key: e.key.clone(),
                    call: e.time_ns,
                    ret: None,
                    op: e.op.clone(),
                    outcome: Kind::Info,
                });
            }
            kind => {
                if let Some(i) = open.remove(&e.process) {
                    let o = &mut ops[i];
                    o.outcome = kind;
                    if kind != Kind::Info {
                        o.ret = Some(e.time_ns);
                    }
                    if kind == Kind::Ok {
                        o.op = e.op.clone();
                    }
                }
            }
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_in_jepsen_shape() {
        let e = Event {
            index: 3,
            process: 1,
            kind: Kind::Ok,
            key: "k1".into(),
            op: KvOp::Cas { from: 4, to: 7, succeeded: Some(true) },
            time_ns: 12,
            error: String::new(),
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"index":3,"process":1,"type":"ok","key":"k1","f":"cas","from":4,"to":7,"succeeded":true,"time_ns":12}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
    }

    #[test]
    fn pairing_keeps_results_and_marks_unfinished_ops_info() {
        let ev = |index, process, kind, op, time_ns| Event {
            index,
            process,
            kind,
            key: "k".into(),
            op,
            time_ns,
            error: String::new(),
        };
        let h = vec![
            ev(0, 1, Kind::Invoke, KvOp::Read { value: None }, 1),
            ev(1, 2, Kind::Invoke, KvOp::Write { value: 5 }, 2),
            ev(2, 1, Kind::Ok, KvOp::Read { value: Some(5) }, 3),
        ];
        let ops = pair(&h);
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].ret, Some(3));
        assert_eq!(ops[0].op, KvOp::Read { value: Some(5) });
        assert_eq!(ops[1].outcome, Kind::Info);
        assert_eq!(ops[1].ret, None);
    }
}
