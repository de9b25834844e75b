//! What a failed call tells a client, carried in gRPC status metadata rather than in message
//! text: "not the leader" with the leader's endpoint, "nothing was done, ask any master", and
//! "the outcome is unknown". Clients decide whether to retry from these, never from the wording.

/// gRPC metadata key that carries the endpoint of the leader a client should retry on.
pub const LEADER_HINT_KEY: &str = "x-berth-leader";
/// Message prefix of a not-leader status.
pub const NOT_LEADER_PREFIX: &str = "not the leader";
/// gRPC metadata key saying what a failed request did: [`NOT_APPLIED`] or [`OUTCOME_UNKNOWN`].
pub const OUTCOME_KEY: &str = "x-berth-outcome";
/// The master did nothing with the request (it was never proposed nor forwarded): any request,
/// writes included, may be sent again, to this master or another.
pub const NOT_APPLIED: &str = "not-applied";
/// The request may or may not have taken effect (a write was proposed or forwarded, then the
/// answer was lost): only an idempotent request may be sent again.
pub const OUTCOME_UNKNOWN: &str = "unknown";

/// What a failed request is known to have done, as the master that answered said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing: safe to send again anywhere.
    NotApplied,
    /// It may have been applied.
    Unknown,
}

/// Marks `status` with what the request did.
pub fn with_outcome(mut status: tonic::Status, outcome: Outcome) -> tonic::Status {
    let v = match outcome {
        Outcome::NotApplied => NOT_APPLIED,
        Outcome::Unknown => OUTCOME_UNKNOWN,
    };
    status.metadata_mut().insert(OUTCOME_KEY, tonic::metadata::MetadataValue::from_static(v));
    status
}

/// `Unavailable`, marked "not applied": the master refused the request before acting on it
/// (no leader, no leader heard from recently, no read index); another master may answer.
pub fn not_applied(message: impl Into<String>) -> tonic::Status {
    with_outcome(tonic::Status::unavailable(message), Outcome::NotApplied)
}

/// `Unavailable`, marked "outcome unknown": a write was proposed or forwarded and its answer lost.
pub fn outcome_unknown(message: impl Into<String>) -> tonic::Status {
    with_outcome(tonic::Status::unavailable(message), Outcome::Unknown)
}

/// What the master that produced `status` said the request did, if it said.
pub fn outcome(status: &tonic::Status) -> Option<Outcome> {
    match status.metadata().get(OUTCOME_KEY).and_then(|v| v.to_str().ok())? {
        NOT_APPLIED => Some(Outcome::NotApplied),
        OUTCOME_UNKNOWN => Some(Outcome::Unknown),
        _ => None,
    }
}

/// A status saying "this master is not the leader", with the leader's endpoint when known. The
/// request was not acted on.
pub fn not_leader(leader: Option<(u64, &str)>) -> tonic::Status {
    let msg = match leader {
        Some((id, ep)) => format!("{NOT_LEADER_PREFIX}; retry on master {id} at {ep}"),
        None => format!("{NOT_LEADER_PREFIX}, and no leader is known yet; retry shortly"),
    };
    let mut status = not_applied(msg);
    if let Some((_, ep)) = leader
        && let Ok(v) = ep.parse()
    {
        status.metadata_mut().insert(LEADER_HINT_KEY, v);
    }
    status
}

/// The leader endpoint carried by a status, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    status.metadata().get(LEADER_HINT_KEY).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_round_trips() {
        let s = not_leader(Some((2, "127.0.0.1:7001")));
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(leader_hint(&s).as_deref(), Some("127.0.0.1:7001"));
        assert!(s.message().contains("master 2"));
        assert_eq!(outcome(&s), Some(Outcome::NotApplied));
        assert_eq!(leader_hint(&not_leader(None)), None);
        assert_eq!(outcome(&not_leader(None)), Some(Outcome::NotApplied));
    }

    #[test]
    fn outcomes_survive_the_wire() {
        // What a client sees is rebuilt from the response headers.
        for (s, want) in [
            (not_applied("no leader"), Some(Outcome::NotApplied)),
            (outcome_unknown("forward broke"), Some(Outcome::Unknown)),
            (tonic::Status::unavailable("plain"), None),
        ] {
            let mut headers = tonic::codegen::http::HeaderMap::new();
            s.add_header(&mut headers).unwrap();
            let back = tonic::Status::from_header_map(&headers).unwrap();
            assert_eq!(outcome(&back), want, "{s:?}");
            assert_eq!(back.code(), s.code());
        }
    }
}
