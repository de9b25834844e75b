//! How "not the leader" travels in a gRPC status, so that clients can follow the hint.

/// gRPC metadata key that carries the endpoint of the leader a client should retry on.
pub const LEADER_HINT_KEY: &str = "x-berth-leader";
/// Message prefix of a not-leader status.
pub const NOT_LEADER_PREFIX: &str = "not the leader";

/// A status saying "this master is not the leader", with the leader's endpoint when known.
pub fn not_leader(leader: Option<(u64, &str)>) -> tonic::Status {
    let msg = match leader {
        Some((id, ep)) => format!("{NOT_LEADER_PREFIX}; retry on master {id} at {ep}"),
        None => format!("{NOT_LEADER_PREFIX}, and no leader is known yet; retry shortly"),
    };
    let mut status = tonic::Status::unavailable(msg);
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
        assert_eq!(leader_hint(&not_leader(None)), None);
    }
}
