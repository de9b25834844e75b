//! The workloads: KV clients doing reads, writes and compare-and-swaps on a few keys (recorded as
//! a Jepsen-shaped history), a writer of unique keys (for lost writes), a watcher that records the
//! watch stream and resumes it after every failure, the failover probe, and the service workload.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use berth_api::pb;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::history::{Event, Kind, KvOp};

/// The register keys live under this prefix, the set workload's under `SET_PREFIX`.
pub const PREFIX: &str = "chaos/";
pub const SET_PREFIX: &str = "chaos/set/";
/// Per-operation deadline of the KV clients.
const OP_TIMEOUT: Duration = Duration::from_millis(1500);

/// Records history events, in memory and as JSON lines.
pub struct Recorder {
    pub start: Instant,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
    pub events: Mutex<Vec<Event>>,
    /// Acknowledged writes with the revision the cluster gave them: (key, value, revision).
    pub acked: Mutex<Vec<(String, u64, i64)>>,
}

impl Recorder {
    pub fn new(path: &Path, start: Instant) -> Result<Arc<Recorder>> {
        Ok(Arc::new(Recorder {
            start,
            file: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
            events: Mutex::new(Vec::new()),
            acked: Mutex::new(Vec::new()),
        }))
    }

    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn record(&self, process: u64, kind: Kind, key: &str, op: KvOp, error: String) {
        let mut events = self.events.lock().expect("history lock");
        let e = Event { index: events.len() as u64, process, kind, key: key.into(), op, time_ns: self.now_ns(), error };
        let mut f = self.file.lock().expect("history file lock");
        let _ = serde_json::to_writer(&mut *f, &e);
        let _ = f.write_all(b"\n");
        events.push(e);
    }

    pub fn flush(&self) {
        let _ = self.file.lock().expect("history file lock").flush();
    }
}

/// Whether a failed write certainly did not happen: the request never reached a master
/// (connection refused), or every master it reached refused it as not the leader before
/// proposing it. Anything else (a timeout, a broken stream, an unknown commit) may have happened.
pub fn definitely_failed(s: &tonic::Status) -> bool {
    let m = s.message();
    m.starts_with(berth_api::NOT_LEADER_PREFIX) && !m.contains("may")
        || m.contains("Connection refused")
        || s.code() == tonic::Code::InvalidArgument
}

fn kv(ch: Channel) -> pb::kv_client::KvClient<Channel> {
    pb::kv_client::KvClient::new(ch)
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(OP_TIMEOUT);
    r
}

async fn timed<T>(f: impl std::future::Future<Output = Result<T, tonic::Status>>) -> Result<T, tonic::Status> {
    match tokio::time::timeout(OP_TIMEOUT + Duration::from_millis(200), f).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer within the operation deadline")),
    }
}

fn parse_value(kv: Option<&pb::KeyValue>) -> Option<u64> {
    kv.and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse().ok())
}

/// Shared by every KV client: where to connect, and the source of unique values.
pub struct KvShared {
    pub channels: Vec<Channel>,
    pub keys: usize,
    pub values: AtomicU64,
    pub stop: AtomicBool,
    pub rec: Arc<Recorder>,
}

/// One KV client: random operations on random keys until `stop`, at most one open at a time.
pub async fn kv_client(shared: Arc<KvShared>, client: u64, clients: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ (client.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut process = client;
    let mut ep = rng.random_range(0..shared.channels.len());
    let mut last_seen: BTreeMap<String, u64> = BTreeMap::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let key = format!("{PREFIX}k{}", rng.random_range(0..shared.keys));
        let roll: u32 = rng.random_range(0..10);
        let mut c = kv(shared.channels[ep].clone());
        let rec = &shared.rec;
        let op = if roll < 4 {
            KvOp::Read { value: None }
        } else if roll < 8 {
            KvOp::Write { value: shared.values.fetch_add(1, Ordering::Relaxed) }
        } else {
            let from = last_seen.get(&key).copied().unwrap_or(1);
            KvOp::Cas { from, to: shared.values.fetch_add(1, Ordering::Relaxed), succeeded: None }
        };
        rec.record(process, Kind::Invoke, &key, op.clone(), String::new());
        let outcome: Result<(KvOp, Option<i64>), tonic::Status> = match op {
            KvOp::Read { .. } => {
                timed(c.range(request(pb::RangeRequest { key: key.clone().into_bytes(), ..Default::default() })))
                    .await
                    .map(|r| (KvOp::Read { value: parse_value(r.into_inner().kvs.first()) }, None))
            }
            KvOp::Write { value } => timed(c.put(request(pb::PutRequest {
                key: key.clone().into_bytes(),
                value: value.to_string().into_bytes(),
                prev_kv: false,
            })))
            .await
            .map(|r| (KvOp::Write { value }, r.into_inner().header.map(|h| h.revision))),
            KvOp::Cas { from, to, .. } => {
                let txn = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: pb::compare::CompareResult::Equal as i32,
                        target: pb::compare::CompareTarget::Value as i32,
                        key: key.clone().into_bytes(),
                        target_union: Some(pb::compare::TargetUnion::Value(from.to_string().into_bytes())),
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: key.clone().into_bytes(),
                            value: to.to_string().into_bytes(),
                            prev_kv: false,
                        })),
                    }],
                    failure: vec![],
                };
                timed(c.txn(request(txn))).await.map(|r| {
                    let r = r.into_inner();
                    let rev = r.succeeded.then(|| r.header.map(|h| h.revision)).flatten();
                    (KvOp::Cas { from, to, succeeded: Some(r.succeeded) }, rev)
                })
            }
        };
        match outcome {
            Ok((done, rev)) => {
                match &done {
                    KvOp::Read { value: Some(v) } => {
                        last_seen.insert(key.clone(), *v);
                    }
                    KvOp::Write { value } | KvOp::Cas { to: value, succeeded: Some(true), .. } => {
                        last_seen.insert(key.clone(), *value);
                        if let Some(rev) = rev {
                            rec.acked.lock().expect("acked lock").push((key.clone(), *value, rev));
                        }
                    }
                    _ => {}
                }
                rec.record(process, Kind::Ok, &key, done, String::new());
            }
            Err(s) => {
                let certain = matches!(op, KvOp::Read { .. }) || definitely_failed(&s);
                let kind = if certain { Kind::Fail } else { Kind::Info };
                rec.record(process, kind, &key, op, format!("{:?}: {}", s.code(), s.message()));
                if kind == Kind::Info {
                    // As in Jepsen: the process whose operation is in doubt is replaced by a new one.
                    process += clients;
                }
                ep = rng.random_range(0..shared.channels.len());
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..25))).await;
    }
}

/// The set workload: puts unique keys one after another; returns each key's outcome.
pub async fn set_writer(channels: Vec<Channel>, stop: Arc<AtomicBool>) -> Vec<(u64, Kind)> {
    let mut out = Vec::new();
    let mut ep = 0;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let mut c = kv(channels[ep % channels.len()].clone());
        let r = timed(c.put(request(pb::PutRequest {
            key: format!("{SET_PREFIX}{n:08}").into_bytes(),
            value: n.to_string().into_bytes(),
            prev_kv: false,
        })))
        .await;
        let kind = match r {
            Ok(_) => Kind::Ok,
            Err(s) if definitely_failed(&s) => Kind::Fail,
            Err(_) => Kind::Info,
        };
        if kind != Kind::Ok {
            ep += 1;
        }
        out.push((n, kind));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out
}

/// One event as the watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: i64,
    pub key: String,
    pub value: String,
    pub delete: bool,
}

#[derive(Default, Debug, Serialize)]
pub struct WatchLog {
    pub events: Vec<WatchEvent>,
    /// How many times the stream broke and was resumed from the next revision.
    pub resumes: u64,
    /// Errors that ended a stream (canceled watches, compaction).
    pub errors: Vec<String>,
}

/// Watches `PREFIX` from `start_revision` on, resuming on another master after every break,
/// until `stop` is set and the stream has caught up with `until` (if given).
pub async fn watcher(
    channels: Vec<Channel>,
    start_revision: i64,
    stop: Arc<AtomicBool>,
    until: Arc<AtomicU64>,
    file: PathBuf,
) -> WatchLog {
    let mut log = WatchLog::default();
    let mut next = start_revision;
    let mut ep = 0usize;
    let mut out = std::fs::File::create(&file).ok().map(std::io::BufWriter::new);
    let done = |next: i64| stop.load(Ordering::Relaxed) && next > until.load(Ordering::Relaxed) as i64;
    while !done(next) {
        let mut c = kv(channels[ep % channels.len()].clone());
        ep += 1;
        let req = pb::WatchRequest {
            key: PREFIX.as_bytes().to_vec(),
            range_end: range_end(PREFIX),
            start_revision: next,
            prev_kv: false,
        };
        let stream = match tokio::time::timeout(Duration::from_secs(2), c.watch(req)).await {
            Ok(Ok(s)) => s.into_inner(),
            _ => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut stream = stream;
        let mut quiet = 0;
        loop {
            if done(next) {
                break;
            }
            let msg = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            let resp = match msg {
                // Once the workload has stopped, a silent stream is resumed elsewhere.
                Err(_) if stop.load(Ordering::Relaxed) => {
                    quiet += 1;
                    if quiet >= 10 {
                        break;
                    }
                    continue;
                }
                Err(_) => continue,
                Ok(Ok(Some(r))) => {
                    quiet = 0;
                    r
                }
                Ok(Ok(None)) | Ok(Err(_)) => break,
            };
            if resp.canceled {
                // A compaction past our position loses events; any other cancel (a master that
                // installed a snapshot) asks us to resume from our next revision, which we do.
                if resp.compact_revision > 0 {
                    log.errors.push(format!(
                        "watch canceled: {} (compacted at {})",
                        resp.cancel_reason, resp.compact_revision
                    ));
                }
                break;
            }
            for e in resp.events {
                let Some(kv) = e.kv else { continue };
                let ev = WatchEvent {
                    revision: kv.mod_revision,
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    value: String::from_utf8_lossy(&kv.value).into_owned(),
                    delete: e.r#type == pb::event::EventType::Delete as i32,
                };
                next = next.max(ev.revision + 1);
                if let Some(f) = out.as_mut() {
                    let _ = serde_json::to_writer(&mut *f, &ev);
                    let _ = f.write_all(b"\n");
                }
                log.events.push(ev);
            }
        }
        if !done(next) {
            log.resumes += 1;
        }
    }
    if let Some(mut f) = out {
        let _ = f.flush();
    }
    log
}

pub fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// The failover probe: from now until the first acknowledged put through any of `channels`,
/// each attempt bounded by 100 ms, 5 ms between rounds (the same rule as the etcd measurement).
pub async fn first_write(channels: &[Channel], key: &str, give_up: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut clients: Vec<_> = channels.iter().cloned().map(kv).collect();
    while start.elapsed() < give_up {
        for c in clients.iter_mut() {
            let mut req = tonic::Request::new(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"x".to_vec(),
                prev_kv: false,
            });
            req.set_timeout(Duration::from_millis(100));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), c.put(req)).await {
                return Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Reads every key-value under `prefix` linearizably, through any master. Returns the values and
/// the revision of the read.
pub async fn read_prefix(channels: &[Channel], prefix: &str) -> Result<(BTreeMap<String, String>, i64)> {
    let mut last = None;
    for _ in 0..40 {
        for ch in channels {
            let mut req = tonic::Request::new(pb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: range_end(prefix),
                ..Default::default()
            });
            req.set_timeout(Duration::from_secs(5));
            match kv(ch.clone()).range(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let rev = r.header.map(|h| h.revision).unwrap_or(0);
                    let map = r
                        .kvs
                        .into_iter()
                        .map(|kv| {
                            (
                                String::from_utf8_lossy(&kv.key).into_owned(),
                                String::from_utf8_lossy(&kv.value).into_owned(),
                            )
                        })
                        .collect();
                    return Ok((map, rev));
                }
                Err(e) => last = Some(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("no master answered a linearizable read of {prefix}: {last:?}")
}

/// Puts `chaos/end` through any master and returns the revision it was committed at.
pub async fn sentinel(channels: &[Channel]) -> Result<i64> {
    let mut last = None;
    for _ in 0..40 {
        for ch in channels {
            let mut req = tonic::Request::new(pb::PutRequest {
                key: format!("{PREFIX}end").into_bytes(),
                value: b"end".to_vec(),
                prev_kv: false,
            });
            req.set_timeout(Duration::from_secs(5));
            match kv(ch.clone()).put(req).await {
                Ok(r) => return Ok(r.into_inner().header.map(|h| h.revision).unwrap_or(0)),
                Err(e) => last = Some(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("no master acknowledged the final write: {last:?}")
}

/// One key as a master holds it: (key, value, create revision, mod revision, version).
pub type KeyRecord = (Vec<u8>, Vec<u8>, i64, i64, i64);
/// One master's whole key space as it stood at a revision.
pub type Keyspace = Vec<KeyRecord>;

/// What one master answered to [`replica_keyspace`].
pub enum ReplicaRead {
    Read(Keyspace),
    /// The revision is below this master's compaction point (it installed a snapshot since).
    Compacted,
}

/// Reads every key of one master's own state (serializable, so no other master is asked) at
/// revision `at`, once that master has applied it. Pages through the key space 500 keys at a time.
pub async fn replica_keyspace(ch: &Channel, at: i64, wait: Duration) -> Result<ReplicaRead> {
    let mut client = kv(ch.clone()).max_decoding_message_size(64 << 20);
    let deadline = Instant::now() + wait;
    // Wait until this master's own state has reached `at`.
    loop {
        let mut req = tonic::Request::new(pb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            serializable: true,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(2));
        let reached = client.range(req).await.map(|r| r.into_inner().header.map_or(0, |h| h.revision));
        match reached {
            Ok(rev) if rev >= at => break,
            other if Instant::now() > deadline => {
                anyhow::bail!("it had not applied revision {at} after {wait:?} (last answer: {other:?})")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut out = Keyspace::new();
    let mut from = vec![0u8];
    loop {
        let mut req = tonic::Request::new(pb::RangeRequest {
            key: from.clone(),
            range_end: vec![0],
            limit: 500,
            revision: at,
            serializable: true,
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(10));
        let r = match client.range(req).await {
            Ok(r) => r.into_inner(),
            // The master has applied `at` (waited for above), so an out-of-range answer can only
            // mean compacted (berth maps both revision errors to OUT_OF_RANGE).
            Err(s) if s.code() == tonic::Code::OutOfRange => return Ok(ReplicaRead::Compacted),
            Err(s) => anyhow::bail!("reading its key space at revision {at} failed: {s}"),
        };
        let more = r.more;
        for kv in r.kvs {
            from = kv.key.clone();
            from.push(0);
            out.push((kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version));
        }
        if !more {
            return Ok(ReplicaRead::Read(out));
        }
    }
}
