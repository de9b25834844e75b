//! Fast failover: a follower whose leader's process is gone campaigns at once, instead of waiting
//! out the leader lease and then an election timeout (about 0.6-0.8 s with the defaults).
//!
//! The signal is the leader's AppendStream to this follower ending: when a master process dies,
//! its kernel closes its connections, so the stream breaks within a round trip. A stream also ends
//! for harmless reasons (a slow answer makes the leader open a new one), so the break is only a
//! cue to look: the follower connects to the leader's Raft address, and only a refused connection
//! counts as proof that no master listens there. A leader that is alive but slow or cut off
//! proves nothing and is left to the normal election timeout, so steady load and fsync tails
//! cause no election.
//!
//! The follower then starts a real election. Its vote requests say that the leader is gone; each
//! voter checks that for itself (the same refused connection to the leader it follows) before it
//! lets the request past its own leader lease. A voter that still reaches the leader keeps its
//! lease and refuses, as without this path. Followers campaign in the order of their ids, one
//! heartbeat interval apart, so that two of them do not split the vote.

use std::{sync::Arc, time::Duration};

use tracing::{debug, info};

use crate::node::Ctx;

/// The gRPC metadata key on a vote request that says which leader the candidate found gone.
pub(crate) const LEADER_GONE_HEADER: &str = "berth-leader-gone";

/// How long a connection attempt to the leader may take; a refusal on a live host is immediate.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// Whether no process listens on `addr` any more: the connection is refused.
pub(crate) async fn nobody_listens(addr: &str) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        // Connected (alive), or no answer (a partition or a dead host: the lease decides).
        _ => false,
    }
}

/// Whether `leader` is the leader this master follows and its process is gone.
pub(crate) async fn leader_is_gone(ctx: &Ctx, leader: u64) -> bool {
    match ctx.leader() {
        Some((id, addr)) if id == leader && id != ctx.id => nobody_listens(&addr).await,
        _ => false,
    }
}

/// Called when master `from`'s AppendStream to this master has ended. If `from` is the leader
/// this master follows and its process is gone, campaigns (after the followers ranked before
/// this one had their turn).
pub(crate) async fn append_stream_ended(ctx: Arc<Ctx>, from: u64) {
    if !leader_is_gone(&ctx, from).await {
        return;
    }
    let m = ctx.metrics();
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().filter(|id| *id != from).collect();
    let Some(rank) = voters.iter().position(|id| *id == ctx.id) else { return };
    if rank > 0 {
        // Give the followers before this one a head start; go on only if none has won by then.
        tokio::time::sleep(ctx.heartbeat_interval * 2 * rank as u32).await;
        if !leader_is_gone(&ctx, from).await {
            return;
        }
    }
    info!(leader = from, "the leader's process is gone (its connection was refused): campaigning now");
    ctx.peers.note_leader_gone(from);
    if let Err(e) = ctx.raft.trigger().elect(false).await {
        debug!("could not start an election: {e}");
    }
}
