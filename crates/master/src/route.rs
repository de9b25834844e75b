//! How a client request reaches the leader: proposed here when this master leads, else forwarded
//! (writes) or confirmed with the leader's read index (linearizable reads).
//!
//! A follower sends neither to a leader it has not heard from recently. A frozen leader (SIGSTOP,
//! a stalled VM) still holds its connections open, so a write forwarded to it waits until it
//! resumes, while the other masters elect a new leader within about a second. So every
//! AppendEntries (heartbeats included) that a follower accepts records the time it heard from its
//! sender, and a request is routed only to a leader heard from within a few heartbeat intervals;
//! otherwise it waits, bounded, until a leader is heard from again: the old one resumes, or a new
//! one is elected. A request refused before being proposed or forwarded is marked "not applied"
//! (the client may send it anywhere again); a write whose answer was lost after it left is
//! "outcome unknown" and never retried here.

use std::time::Duration;

use berth_api::{not_applied, outcome_unknown, pb};
use berth_types::{Command, CommandResult};
use openraft::{Instant as _, async_runtime::WatchReceiver};
use tokio::{sync::watch, time::Instant};
use tonic::Status;

use crate::{
    network::{ForwardError, decode, encode},
    node::{COMMIT_TIMEOUT, Ctx, command_result},
    proposer::{CmdResult, ProposeError},
};

/// A leader is "live" if heard from within this many heartbeat intervals.
const CONTACT_HEARTBEATS: u32 = 4;
/// How long a request may wait for a live leader, in election timeouts (at the default 200 ms:
/// 2 s, about two failovers).
const ROUTE_WAIT_ELECTIONS: u32 = 10;
/// Bound on one ReadIndex call to the leader, in election timeouts.
const READ_INDEX_ELECTIONS: u32 = 2;
/// How long a follower waits to apply up to the leader's read index.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// When this master last accepted an AppendEntries, and from which master.
pub(crate) struct LeaderContact {
    last: watch::Sender<Option<(u64, Instant)>>,
    /// When a held request was last logged (at most one line a second).
    logged: std::sync::Mutex<Option<Instant>>,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact { last: watch::Sender::new(None), logged: std::sync::Mutex::new(None) }
    }
}

impl LeaderContact {
    /// Records that master `id` was just heard from as leader (its AppendEntries was accepted).
    pub fn heard_from(&self, id: u64) {
        self.last.send_replace(Some((id, Instant::now())));
    }

    fn last(&self) -> Option<(u64, Instant)> {
        *self.last.borrow()
    }

    /// Whether to log that a request is held (once a second at most, whatever the load).
    fn should_log(&self) -> bool {
        let mut logged = self.logged.lock().expect("log time lock");
        let now = Instant::now();
        if logged.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        *logged = Some(now);
        true
    }
}

/// Whether a leader may take requests: it is the only voter, or a majority acknowledged one of
/// its messages within `window` (`acked_ago`: how long ago, None if never).
fn has_quorum_contact(sole_voter: bool, acked_ago: Option<Duration>, window: Duration) -> bool {
    sole_voter || acked_ago.is_some_and(|ago| ago <= window)
}

/// Whether `leader` was heard from within `window` of `now`, given the last contact.
fn is_live(last: Option<(u64, Instant)>, leader: u64, now: Instant, window: Duration) -> bool {
    last.is_some_and(|(id, at)| id == leader && now.saturating_duration_since(at) <= window)
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// This master leads.
    Local,
    /// The leader's id and endpoint; it was heard from recently.
    Leader(u64, String),
}

impl Ctx {
    fn contact_window(&self) -> Duration {
        self.heartbeat_interval * CONTACT_HEARTBEATS
    }

    /// This master leads and a majority acknowledged it within the leader lease (the maximum
    /// election timeout; after that the others may have elected a new leader). A leader cut off
    /// from the majority would otherwise hold every write until the commit timeout.
    fn leads_with_quorum(&self) -> bool {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        if !(m.state == openraft::ServerState::Leader && m.current_leader == Some(self.id)) {
            return false;
        }
        let mut voters = m.membership_config.membership().voter_ids();
        let sole_voter = voters.next() == Some(self.id) && voters.next().is_none();
        let acked_ago = m.last_quorum_acked.as_ref().map(|t| t.elapsed());
        has_quorum_contact(sole_voter, acked_ago, self.election_timeout * 2)
    }

    /// The live leader right now, without waiting: this master if it leads with a majority's
    /// recent acknowledgement, else the leader it heard from within the contact window.
    pub(crate) fn live_leader_now(&self) -> Option<u64> {
        if self.leads_with_quorum() {
            return Some(self.id);
        }
        let (id, _) = self.leader()?;
        (id != self.id && is_live(self.leader_contact.last(), id, Instant::now(), self.contact_window())).then_some(id)
    }

    fn route_wait(&self) -> Duration {
        self.election_timeout * ROUTE_WAIT_ELECTIONS
    }

    /// Until when a request may wait for a live leader: the route wait, or less if its client
    /// gives up sooner.
    fn route_deadline(&self) -> Instant {
        crate::deadline::bounded(Instant::now() + self.route_wait())
    }

    /// The leader to send a request to: this master (if a majority hears it), or a leader heard
    /// from recently. Waits (until `deadline`) while no leader is known, the known one is silent,
    /// or this leader has no majority.
    pub(crate) async fn live_leader(&self, deadline: Instant) -> Result<Route, Status> {
        if self.leads_with_quorum() {
            return Ok(Route::Local);
        }
        let mut contact = self.leader_contact.last.subscribe();
        let mut metrics = self.raft.metrics();
        let started = Instant::now();
        let mut logged = false;
        loop {
            let leading = self.is_leader();
            if leading && self.leads_with_quorum() {
                return Ok(Route::Local);
            }
            let leader = self.leader();
            if !leading
                && let Some((id, addr)) = &leader
                && is_live(self.leader_contact.last(), *id, Instant::now(), self.contact_window())
            {
                return Ok(Route::Leader(*id, addr.clone()));
            }
            if !logged && self.leader_contact.should_log() {
                let silent = self.leader_contact.last().map(|(_, at)| at.elapsed());
                tracing::info!(
                    leader = ?leader.as_ref().map(|(id, _)| *id),
                    last_contact_ago = ?silent,
                    "holding client requests until a leader is heard from (at most {:?})",
                    self.route_wait()
                );
            }
            logged = true;
            tokio::select! {
                r = contact.changed() => {
                    if r.is_err() {
                        return Err(Status::unavailable("master is stopping"));
                    }
                }
                r = metrics.changed() => {
                    if r.is_err() {
                        return Err(Status::unavailable("master is stopping: Raft has stopped"));
                    }
                }
                // Quorum acknowledgements arrive with metrics updates; this only bounds the wait
                // should one be coalesced away.
                _ = tokio::time::sleep(self.heartbeat_interval), if leading => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let waited = Instant::now().saturating_duration_since(started);
                    let why = match (leader, self.leader_contact.last()) {
                        _ if leading => "this master leads but has not heard from a majority of masters (they may \
                                         be down or cut off)"
                            .to_string(),
                        (None, _) => "no leader is known: fewer than a majority of masters may be reachable".to_string(),
                        (Some((id, addr)), Some((from, at))) if from == id => format!(
                            "leader {id} at {addr} was last heard from {:?} ago (it may be frozen or cut off) and no \
                             new leader was elected",
                            at.elapsed()
                        ),
                        (Some((id, addr)), _) => format!("leader {id} at {addr} has not been heard from"),
                    };
                    return Err(not_applied(format!(
                        "{why} within {waited:?}; nothing was done, so the request may be sent again (see \
                         `berth cluster status`)"
                    )));
                }
            }
        }
    }

    /// Proposes a command: locally when leader, else forwarded to a live leader. Retries only
    /// where the write certainly did not happen.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, Status> {
        self.limits.check_command(&cmd).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A write made on a client's behalf carries that call's audit record.
        let cmd = crate::audit::stamp(cmd);
        let deadline = self.route_deadline();
        let mut hint = None;
        loop {
            let res = match self.live_leader(deadline).await? {
                Route::Local => {
                    // Answer before the client gives up, with what is known.
                    let started = Instant::now();
                    let commit_by = crate::deadline::bounded(started + COMMIT_TIMEOUT);
                    match tokio::time::timeout_at(commit_by, self.proposer.propose(cmd.clone())).await {
                        Ok(r) => r,
                        Err(_) => {
                            return Err(outcome_unknown(format!(
                                "the write was not committed within {:?}: a majority of masters is \
                                 probably unreachable (see `berth cluster status`); it may still be applied if \
                                 they return, so read it back before retrying",
                                started.elapsed()
                            )));
                        }
                    }
                }
                Route::Leader(lid, addr) => self.forward(lid, &addr, &cmd).await?,
            };
            match res {
                Ok(r) => return command_result(r),
                Err(ProposeError::NotLeader { leader }) => {
                    hint = leader.or(hint);
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    // Leadership is moving: wait for this master to learn of the new leader.
                    let old = self.metrics().current_leader;
                    let _ = self
                        .raft
                        .wait(Some((self.election_timeout * 2).min(left)))
                        .metrics(|m| m.current_leader.is_some() && m.current_leader != old, "leader change")
                        .await;
                }
                Err(ProposeError::OutcomeUnknown(msg)) => return Err(outcome_unknown(msg)),
                Err(ProposeError::Fatal(msg)) => return Err(Status::unavailable(format!("master is stopping: {msg}"))),
            }
        }
        Err(berth_api::not_leader(hint.as_ref().map(|(i, e)| (*i, e.as_str()))))
    }

    async fn forward(&self, leader: u64, addr: &str, cmd: &Command) -> Result<Result<CmdResult, ProposeError>, Status> {
        let req = pb::raft::RaftRequest { header: Some(self.peers.header(leader)), payload: encode(cmd), id: 0 };
        let answer = self.peers.forward(addr, req);
        let answered = match crate::deadline::answer_by() {
            Some(by) => tokio::time::timeout_at(by, answer).await,
            None => Ok(answer.await),
        };
        let Ok(answered) = answered else {
            // It may be queued or on its way: it could still be applied.
            return Err(outcome_unknown(format!(
                "the write was forwarded to leader {leader} at {addr}, which did not answer in time (frozen, \
                 cut off from a majority, or slow); it may still be applied, so read it back before retrying"
            )));
        };
        match answered {
            Ok(payload) => decode(&payload).map_err(Status::internal),
            // Never sent: asking again (once the leader is known again) is safe.
            Err(ForwardError::NotSent(s)) => {
                tracing::debug!(leader, %addr, "forwarding: no stream to the leader: {}", s.message());
                Ok(Err(ProposeError::NotLeader { leader: None }))
            }
            Err(ForwardError::Broken(why)) => Err(outcome_unknown(format!(
                "forwarding the write to leader {leader} at {addr} failed, so its outcome is \
                 unknown: {why}; read it back before retrying"
            ))),
        }
    }

    /// Makes a following read linearizable: waits until this master has applied everything the
    /// leader had committed when the read arrived (read-index). Nothing is written, so every
    /// failure is "not applied".
    pub async fn read_barrier(&self) -> Result<(), Status> {
        let deadline = self.route_deadline();
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.live_leader(deadline).await? {
                Route::Local => {
                    let read = self.raft.ensure_linearizable(openraft::ReadPolicy::ReadIndex);
                    match tokio::time::timeout(left, read).await {
                        Ok(Ok(_)) => return Ok(()),
                        Ok(Err(e)) if e.forward_to_leader().is_some() => continue,
                        Ok(Err(e)) => return Err(not_applied(format!("linearizable read failed: {e}"))),
                        Err(_) => last_error = "this leader could not confirm its leadership".into(),
                    }
                }
                Route::Leader(lid, addr) => match self.read_index(lid, &addr).await {
                    Ok(idx) => {
                        return self
                            .raft
                            .wait(Some(
                                crate::deadline::bounded(Instant::now() + APPLY_WAIT)
                                    .saturating_duration_since(Instant::now()),
                            ))
                            .applied_index_at_least(Some(idx), "read index")
                            .await
                            .map(|_| ())
                            .map_err(|e| not_applied(format!("this master is not catching up with the leader: {e}")));
                    }
                    Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled) => {
                        last_error = s.message().to_string();
                        // Wait for a new leader, or fresh contact with this one (`live_leader`).
                        let old = Some(lid);
                        let _ = self
                            .raft
                            .wait(Some((self.election_timeout * 2).min(left)))
                            .metrics(|m| m.current_leader != old, "leader change")
                            .await;
                    }
                    Err(s) => return Err(s),
                },
            }
        }
        Err(not_applied(format!(
            "no leader could confirm the read within {:?} ({last_error}); retry shortly",
            self.route_wait()
        )))
    }

    /// The leader's read index, bounded in time: a leader that froze after it was last heard
    /// from never answers.
    async fn read_index(&self, leader: u64, addr: &str) -> Result<u64, Status> {
        let ch = self.peers.channel(addr).map_err(Status::unavailable)?;
        let mut client = pb::raft::raft_client::RaftClient::new(ch);
        let bound = self.election_timeout * READ_INDEX_ELECTIONS;
        let mut req = tonic::Request::new(pb::raft::ReadIndexRequest { header: Some(self.peers.header(leader)) });
        req.set_timeout(bound);
        // The header bounds the call once connected; connecting (TLS to a frozen master) is
        // bounded only by this.
        match tokio::time::timeout(bound, client.read_index(req)).await {
            // A status tonic made here from a broken connection (the leader died while it was
            // asked: "transport error", code Unknown) keeps its cause: the leader is unreachable,
            // which the caller waits out like any other, rather than a refusal to pass on.
            Ok(Err(s)) if std::error::Error::source(&s).is_some() => {
                Err(Status::unavailable(format!("leader {leader} at {addr} is unreachable: {}", s.message())))
            }
            Ok(r) => r.map(|r| r.into_inner().read_index),
            Err(_) => Err(Status::cancelled(format!("leader {leader} at {addr} did not answer within {bound:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_is_live_only_if_heard_from_recently() {
        let now = Instant::now();
        let w = Duration::from_millis(200);
        assert!(is_live(Some((1, now - Duration::from_millis(50))), 1, now, w));
        assert!(is_live(Some((1, now - w)), 1, now, w));
        // Silent for longer than the window: frozen or cut off.
        assert!(!is_live(Some((1, now - Duration::from_millis(201))), 1, now, w));
        // Heard from another master (the old leader, or a leader this master does not know yet).
        assert!(!is_live(Some((2, now)), 1, now, w));
        assert!(!is_live(None, 1, now, w));
    }

    #[test]
    fn a_leader_takes_requests_only_while_a_majority_hears_it() {
        let w = Duration::from_millis(400);
        assert!(has_quorum_contact(false, Some(Duration::from_millis(60)), w));
        assert!(!has_quorum_contact(false, Some(Duration::from_millis(401)), w), "cut off from the majority");
        assert!(!has_quorum_contact(false, None, w), "not acknowledged yet");
        assert!(has_quorum_contact(true, None, w), "a single-master cluster is its own majority");
    }

    #[tokio::test]
    async fn contact_wakes_waiters() {
        let c = LeaderContact::default();
        let mut rx = c.last.subscribe();
        c.heard_from(3);
        rx.changed().await.unwrap();
        let (id, at) = c.last().unwrap();
        assert_eq!(id, 3);
        assert!(at.elapsed() < Duration::from_secs(1));
    }
}
