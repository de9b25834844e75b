//! Raft between masters, client side: openraft's network traits over the internal gRPC service.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use berth_api::pb::raft::{RaftHeader, RaftRequest, RaftResponse, SnapshotChunk, raft_client::RaftClient};
use berth_store::{SnapshotFile, TypeConfig};
use openraft::{
    OptionalSend, RaftNetworkFactory, RaftNetworkV2,
    alias::{SnapshotOf, VoteOf},
    errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable},
    network::RPCOption,
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
        VoteRequest, VoteResponse,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};

/// Bound on one decoded Raft message. AppendEntries carries at most a few hundred entries of at
/// most ~1 MiB each; anything bigger is corrupt or hostile.
pub const WIRE_LIMIT: usize = 512 * 1024 * 1024;
/// Snapshot data is streamed in chunks of this size, never as one message.
pub(crate) const SNAPSHOT_CHUNK: usize = 1024 * 1024;
/// Bound on opening a ProposeStream to the leader (connecting included). The request is sent
/// only once the stream is open, so a timeout here leaves the write unsent.
const FORWARD_OPEN_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("bincode encoding to a Vec")
}

/// Decodes a Raft wire message (bincode, at most `WIRE_LIMIT` bytes allocated).
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(b, bincode::config::standard().with_limit::<WIRE_LIMIT>())
        .map(|(v, _)| v)
        .map_err(|e| format!("undecodable Raft message: {e}"))
}

/// The cluster id this master knows ("" until the bootstrap has been applied).
#[derive(Clone, Default)]
pub(crate) struct ClusterIdCell(Arc<RwLock<String>>);

impl ClusterIdCell {
    pub fn get(&self) -> String {
        self.0.read().expect("cluster id lock").clone()
    }
    pub fn set(&self, id: &str) {
        *self.0.write().expect("cluster id lock") = id.to_string();
    }
}

/// Connections to the other masters, shared by the Raft network and the API forwarders.
pub(crate) struct Peers {
    pub self_id: u64,
    pub cluster_id: ClusterIdCell,
    pki: Arc<crate::tls::MasterPki>,
    channels: Mutex<HashMap<String, Channel>>,
    forwarders: Mutex<HashMap<String, tokio::sync::mpsc::Sender<ForwardJob>>>,
    /// The leader this master found gone, and when: its vote requests say so for a while
    /// ([`crate::failover`]).
    leader_gone: Mutex<Option<(u64, std::time::Instant)>>,
}

/// How long vote requests keep saying that a leader was found gone.
const LEADER_GONE_FOR: Duration = Duration::from_secs(2);

/// Why a forwarded write has no answer.
pub(crate) enum ForwardError {
    /// The stream to the leader could not be opened: the write was never sent (safe to retry).
    NotSent(tonic::Status),
    /// The stream broke after the write was sent: its outcome is unknown.
    Broken(String),
}

pub(crate) struct ForwardJob {
    request: RaftRequest,
    reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, ForwardError>>,
}

/// Owns one ProposeStream to a leader: sends each job with a fresh id and routes the answers,
/// which come back in completion order, to their callers. When the stream breaks, every write
/// still waiting is answered "outcome unknown", and the next job opens a new stream.
async fn run_forwarder(ch: Channel, mut jobs: tokio::sync::mpsc::Receiver<ForwardJob>) {
    use futures::StreamExt;
    let mut stream: Option<(
        tokio::sync::mpsc::Sender<RaftRequest>,
        tonic::Streaming<berth_api::pb::raft::RaftResponse>,
    )> = None;
    let mut pending: HashMap<u64, tokio::sync::oneshot::Sender<Result<Vec<u8>, ForwardError>>> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        let job = match &mut stream {
            None => match jobs.recv().await {
                Some(j) => j,
                None => return,
            },
            Some((_, answers)) => tokio::select! {
                j = jobs.recv() => match j {
                    Some(j) => j,
                    None => {
                        // Retired (new certificates, or the master is stopping): answer what
                        // is in flight before going.
                        while !pending.is_empty() {
                            match answers.next().await {
                                Some(Ok(resp)) => {
                                    if let Some(tx) = pending.remove(&resp.id) {
                                        let _ = tx.send(Ok(resp.payload));
                                    }
                                }
                                _ => break,
                            }
                        }
                        for (_, tx) in pending.drain() {
                            let _ = tx.send(Err(ForwardError::Broken("the stream to the leader closed".into())));
                        }
                        return;
                    }
                },
                a = answers.next() => {
                    match a {
                        Some(Ok(resp)) => {
                            if let Some(tx) = pending.remove(&resp.id) {
                                let _ = tx.send(Ok(resp.payload));
                            }
                        }
                        other => {
                            let why = match other {
                                Some(Err(s)) => s.message().to_string(),
                                _ => "the leader closed the stream".to_string(),
                            };
                            for (_, tx) in pending.drain() {
                                let _ = tx.send(Err(ForwardError::Broken(why.clone())));
                            }
                            stream = None;
                        }
                    }
                    continue;
                }
            },
        };
        if stream.is_none() {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            let mut client =
                RaftClient::new(ch.clone()).max_decoding_message_size(WIRE_LIMIT).max_encoding_message_size(WIRE_LIMIT);
            // Opening may mean connecting, and TLS to a frozen leader never completes: bounded.
            let open = client.propose_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            match tokio::time::timeout(FORWARD_OPEN_TIMEOUT, open).await {
                Ok(Ok(r)) => stream = Some((tx, r.into_inner())),
                Ok(Err(s)) => {
                    let _ = job.reply.send(Err(ForwardError::NotSent(s)));
                    continue;
                }
                Err(_) => {
                    let why = format!("no stream to the leader within {FORWARD_OPEN_TIMEOUT:?}");
                    let _ = job.reply.send(Err(ForwardError::NotSent(tonic::Status::unavailable(why))));
                    continue;
                }
            }
        }
        next_id += 1;
        let mut request = job.request;
        request.id = next_id;
        let (tx, _) = stream.as_ref().expect("opened above");
        if tx.send(request).await.is_err() {
            let _ = job.reply.send(Err(ForwardError::Broken("the stream to the leader closed".into())));
            for (_, tx) in pending.drain() {
                let _ = tx.send(Err(ForwardError::Broken("the stream to the leader closed".into())));
            }
            stream = None;
            continue;
        }
        pending.insert(next_id, job.reply);
    }
}

impl Peers {
    pub fn new(self_id: u64, cluster_id: ClusterIdCell, pki: Arc<crate::tls::MasterPki>) -> Arc<Self> {
        Arc::new(Peers {
            self_id,
            cluster_id,
            pki,
            channels: Mutex::new(HashMap::new()),
            forwarders: Mutex::new(HashMap::new()),
            leader_gone: Mutex::new(None),
        })
    }

    /// Records that leader `id`'s process is gone (this master saw its address refuse a connection).
    pub fn note_leader_gone(&self, id: u64) {
        *self.leader_gone.lock().expect("leader_gone lock") = Some((id, std::time::Instant::now()));
    }

    /// The leader recently found gone, if any.
    fn leader_gone(&self) -> Option<u64> {
        let g = self.leader_gone.lock().expect("leader_gone lock");
        g.filter(|(_, at)| at.elapsed() < LEADER_GONE_FOR).map(|(id, _)| id)
    }

    /// Forwards a write (a header and an encoded command) to the leader at `addr` over that
    /// leader's ProposeStream and returns the encoded answer.
    pub async fn forward(&self, addr: &str, request: RaftRequest) -> Result<Vec<u8>, ForwardError> {
        let sender = {
            let mut map = self.forwarders.lock().expect("forwarder map lock");
            match map.get(addr) {
                Some(s) => s.clone(),
                None => {
                    let ch = self.channel(addr).map_err(|e| ForwardError::NotSent(tonic::Status::unavailable(e)))?;
                    let (tx, rx) = tokio::sync::mpsc::channel(1024);
                    tokio::spawn(run_forwarder(ch, rx));
                    map.insert(addr.to_string(), tx.clone());
                    tx
                }
            }
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        sender
            .send(ForwardJob { request, reply })
            .await
            .map_err(|_| ForwardError::NotSent(tonic::Status::unavailable("the forwarder stopped")))?;
        answer.await.map_err(|_| ForwardError::Broken("the forwarder stopped".into()))?
    }

    /// Drops every cached channel, so new connections present the renewed certificate.
    pub fn reset_channels(&self) {
        self.channels.lock().expect("channel map lock").clear();
        self.forwarders.lock().expect("forwarder map lock").clear();
    }

    /// A lazily connecting channel to `addr`, reused across calls.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut map = self.channels.lock().expect("channel map lock");
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| format!("bad master address {addr:?}: {e}"))?
            .tls_config(self.pki.client_tls())
            .map_err(|e| format!("TLS configuration for {addr}: {e}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        let ch = ep.connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    pub fn header(&self, to: u64) -> RaftHeader {
        RaftHeader {
            cluster_id: self.cluster_id.get(),
            from: self.self_id,
            to,
            version: berth_api::version::VERSION.to_string(),
        }
    }
}

pub(crate) struct NetworkFactory {
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &openraft::BasicNode) -> PeerClient {
        PeerClient { target, addr: node.addr.clone(), peers: self.peers.clone(), append_stream: None }
    }
}

type Answers = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftResponse, tonic::Status>> + Send + Sync>>;

/// An open AppendStream: requests go in through `tx`, answers come back in order on `rx`, one
/// request at a time.
///
/// A caller may drop an exchange half-way: openraft's heartbeat worker wraps each call in a
/// timeout of one heartbeat interval. The answer to that request still arrives later, and must
/// never be taken for the next request's: a heartbeat that the follower answered before it
/// voted for a new leader would then confirm a deposed leader's reads. So a stream with an
/// abandoned exchange is never used again, and every answer must carry its request's id.
struct AppendStream {
    tx: tokio::sync::mpsc::Sender<RaftRequest>,
    rx: Answers,
    last_id: u64,
    /// Set from sending a request until its answer is read; still set if the exchange was dropped.
    in_flight: bool,
}

impl AppendStream {
    fn new(tx: tokio::sync::mpsc::Sender<RaftRequest>, rx: Answers) -> Self {
        AppendStream { tx, rx, last_id: 0, in_flight: false }
    }

    /// Whether the next request's answer is certain to be the next message on the stream.
    fn usable(&self) -> bool {
        !self.in_flight
    }

    /// Sends one request and returns its answer's payload.
    async fn exchange(&mut self, mut request: RaftRequest) -> Result<Vec<u8>, RPCError<TypeConfig>> {
        use futures::StreamExt;
        if self.in_flight {
            return Err(RPCError::Unreachable(Unreachable::from_string(
                "the append stream has an abandoned request outstanding",
            )));
        }
        self.last_id += 1;
        request.id = self.last_id;
        self.in_flight = true;
        self.tx
            .send(request)
            .await
            .map_err(|_| RPCError::Unreachable(Unreachable::from_string("the append stream closed")))?;
        match self.rx.next().await {
            Some(Ok(resp)) if resp.id == self.last_id => {
                self.in_flight = false;
                Ok(resp.payload)
            }
            Some(Ok(resp)) => Err(RPCError::Network(NetworkError::from_string(format!(
                "the append stream answered request {} where request {} was expected",
                resp.id, self.last_id
            )))),
            Some(Err(st)) => Err(status_to_rpc_error(st)),
            None => Err(RPCError::Unreachable(Unreachable::from_string("the append stream ended"))),
        }
    }
}

pub(crate) struct PeerClient {
    target: u64,
    addr: String,
    peers: Arc<Peers>,
    /// openraft calls `append_entries` on one client one at a time, so answers match requests in
    /// order. Any error, timeout or abandoned call drops the stream (a late answer must never be
    /// taken for the next request's); the next call opens a new one.
    append_stream: Option<AppendStream>,
}

fn status_to_rpc_error(s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
            RPCError::Unreachable(Unreachable::from_string(s.to_string()))
        }
        _ => RPCError::Network(NetworkError::from_string(s.to_string())),
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Vote,
    PreVote,
    TransferLeader,
}

impl PeerClient {
    fn client(&self) -> Result<RaftClient<Channel>, RPCError<TypeConfig>> {
        let ch = self.peers.channel(&self.addr).map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))?;
        Ok(RaftClient::new(ch).max_decoding_message_size(WIRE_LIMIT).max_encoding_message_size(WIRE_LIMIT))
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: Rpc,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let mut client = self.client()?;
        let mut request = tonic::Request::new(RaftRequest {
            header: Some(self.peers.header(self.target)),
            payload: encode(req),
            id: 0,
        });
        request.set_timeout(ttl);
        if matches!(rpc, Rpc::Vote)
            && let Some(gone) = self.peers.leader_gone()
            && let Ok(v) = gone.to_string().parse()
        {
            request.metadata_mut().insert(crate::failover::LEADER_GONE_HEADER, v);
        }
        let fut = async {
            match rpc {
                Rpc::Vote => client.vote(request).await,
                Rpc::PreVote => client.pre_vote(request).await,
                Rpc::TransferLeader => client.transfer_leader(request).await,
            }
        };
        let resp = match tokio::time::timeout(ttl, fut).await {
            Ok(r) => r.map_err(status_to_rpc_error)?,
            Err(_) => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "master {} at {} did not answer within {ttl:?}",
                    self.target, self.addr
                ))));
            }
        };
        let res: Result<Resp, String> =
            decode(&resp.into_inner().payload).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        res.map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }
}

impl PeerClient {
    /// Sends one AppendEntries on this peer's stream (opening it if needed) and returns the
    /// answer's payload.
    async fn append_streamed(&mut self, request: RaftRequest) -> Result<Vec<u8>, RPCError<TypeConfig>> {
        if self.append_stream.as_ref().is_some_and(|s| !s.usable()) {
            // The previous call was dropped before its answer came: that answer may still be on
            // its way, so start afresh.
            self.append_stream = None;
        }
        if self.append_stream.is_none() {
            let mut client = self.client()?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let rx = client
                .append_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(status_to_rpc_error)?
                .into_inner();
            self.append_stream = Some(AppendStream::new(tx, Box::pin(rx)));
        }
        self.append_stream.as_mut().expect("opened above").exchange(request).await
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // A large batch may take longer than a heartbeat to ship; give it room.
        let ttl = option.hard_ttl().max(Duration::from_secs(2));
        let request = RaftRequest { header: Some(self.peers.header(self.target)), payload: encode(&rpc), id: 0 };
        let res = tokio::time::timeout(ttl, self.append_streamed(request)).await;
        let payload = match res {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                self.append_stream = None;
                return Err(e);
            }
            Err(_) => {
                self.append_stream = None;
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "master {} at {} did not answer within {ttl:?}",
                    self.target, self.addr
                ))));
            }
        };
        let res: Result<AppendEntriesResponse<TypeConfig>, String> =
            decode(&payload).map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        res.map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::PreVote, &rpc, option.hard_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(Rpc::TransferLeader, &req, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client().map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        let mut file = tokio::fs::File::open(&snapshot.snapshot.path)
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let header = self.peers.header(self.target);
        let first = SnapshotChunk {
            header: Some(header),
            vote: encode(&vote),
            meta: encode(&snapshot.meta),
            data: vec![],
            done: false,
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        let reader = async move {
            if tx.send(first).await.is_err() {
                return Ok(());
            }
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read(&mut buf[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                let done = filled < SNAPSHOT_CHUNK;
                let chunk = SnapshotChunk { header: None, vote: vec![], meta: vec![], data: buf, done };
                if tx.send(chunk).await.is_err() || done {
                    return Ok::<(), std::io::Error>(());
                }
            }
        };
        let send = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
        let work = async {
            let (read_res, resp) = tokio::join!(reader, send);
            read_res.map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
            let resp = resp.map_err(|s| StreamingError::from(status_to_rpc_error(s)))?;
            let res: Result<SnapshotResponse<TypeConfig>, String> = decode(&resp.into_inner().payload)
                .map_err(|e| StreamingError::Network(NetworkError::from_string(e)))?;
            res.map_err(|e| StreamingError::Network(NetworkError::from_string(e)))
        };
        tokio::select! {
            r = work => r,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    fn request(tag: &str) -> RaftRequest {
        RaftRequest { header: None, payload: tag.as_bytes().to_vec(), id: 0 }
    }

    /// An AppendStream whose far end is in the test's hands: it sees each request and decides
    /// what to answer, and when.
    fn stream() -> (AppendStream, mpsc::Receiver<RaftRequest>, mpsc::Sender<RaftResponse>) {
        let (tx, server_rx) = mpsc::channel(4);
        let (server_tx, rx) = mpsc::channel::<RaftResponse>(4);
        let answers = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok);
        (AppendStream::new(tx, Box::pin(answers)), server_rx, server_tx)
    }

    #[tokio::test]
    async fn an_abandoned_exchange_never_answers_the_next_request() {
        // openraft's heartbeat worker drops a call that outlives its timeout. The follower's
        // answer to it (given before it voted for a new leader) arrives later, and once was read
        // as the answer to the next heartbeat: a deposed leader confirmed its leadership and
        // served a stale read (pause-leader, found by the chaos suite).
        let (mut s, mut server_rx, server_tx) = stream();
        {
            let call = s.exchange(request("first"));
            tokio::pin!(call);
            let seen = tokio::select! {
                r = &mut call => panic!("answered before the far end had replied: {r:?}"),
                seen = server_rx.recv() => seen.expect("the request reached the far end"),
            };
            assert_eq!(seen.payload, b"first");
            // The caller gives up here, as a timeout would.
        }
        server_tx.send(RaftResponse { payload: b"answer to first".to_vec(), id: 1 }).await.unwrap();
        assert!(!s.usable(), "a stream with an abandoned exchange must be replaced");
        let err = s.exchange(request("second")).await.expect_err("the stale answer must not be returned");
        assert!(err.to_string().contains("abandoned"), "{err}");
    }

    #[tokio::test]
    async fn an_answer_with_another_requests_id_is_refused() {
        let (mut s, mut server_rx, server_tx) = stream();
        let far_end = tokio::spawn(async move {
            let first = server_rx.recv().await.unwrap();
            server_tx.send(RaftResponse { payload: b"one".to_vec(), id: first.id }).await.unwrap();
            let second = server_rx.recv().await.unwrap();
            server_tx.send(RaftResponse { payload: b"stale".to_vec(), id: second.id - 1 }).await.unwrap();
        });
        assert_eq!(s.exchange(request("a")).await.unwrap(), b"one");
        let err = s.exchange(request("b")).await.expect_err("an answer to request 1 is not one to request 2");
        assert!(err.to_string().contains("answered request 1 where request 2 was expected"), "{err}");
        far_end.await.unwrap();
    }
}
