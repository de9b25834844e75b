//! The audit log: every mutating client call and every denied one, with who made it, the verb,
//! the resource, its namespace and name, the outcome and the revision it made.
//!
//! - A call that writes sends its transactions as `Command::Audited`, with its record: applying
//!   them adds each record's revision and outcome (`ok`, or `conflict` when a compare failed)
//!   and writes the records of one Raft log entry under one key (`/berth/audit/<ms>-r<revision>`,
//!   JSON lines), in the same RocksDB write as the changes. An acknowledged change always has its
//!   record, and an entry of many writes (the proposer packs them) costs one key.
//! - A call that writes nothing (denied, invalid, unchanged) is queued and committed in batches
//!   by each master (`run_queue`); under a flood of denied calls the queue is bounded and counts
//!   what it had to drop, in a record of its own.
//! - The leader bounds the log (`retain`): records older than the retention, and the oldest past
//!   [`MAX_RECORDS`], are deleted; the history window compacts them away.
//! - Each master appends every committed record to `<data-dir>/audit.log` as a JSON line
//!   (`follow_file`), rotated at 64 MiB.
//!
//! Records never carry a request's body: a secret's value cannot appear in them.

use std::{
    future::Future,
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use berth_types::{Command, CommandResult, DeleteRange, Put, RequestOp, spec::access::Resource, spec::access::Verb};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, warn};

use crate::{authz::Caller, node::Ctx};

pub(crate) const PREFIX: &str = berth_types::AUDIT_PREFIX;
/// The most audit keys kept (the changes of one log entry share one); the oldest beyond go.
pub(crate) const MAX_RECORDS: usize = 100_000;
/// How long records are kept.
pub(crate) const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Records queued (calls that wrote nothing) before new ones are counted as dropped.
const QUEUE: usize = 10_000;
/// Records per queued batch (one transaction).
const BATCH: usize = 100;
const FILE: &str = "audit.log";
const ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// One record, as stored (JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct AuditRecord {
    pub at_ms: i64,
    pub identity: String,
    pub verb: String,
    pub resource: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `ok`, `conflict: ...`, `denied: ...` or `error: ...` (added when applied, for a change).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outcome: String,
    /// The master that took the call.
    pub master: u64,
    /// The revision of the change (the record's own): set when read back, not stored.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The audit state of one master: its queue and the numbering of its records' keys.
pub(crate) struct AuditLog {
    tx: mpsc::Sender<AuditRecord>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<AuditRecord>>>,
    dropped: AtomicU64,
    seq: AtomicU64,
}

impl AuditLog {
    pub(crate) fn new() -> AuditLog {
        let (tx, rx) = mpsc::channel(QUEUE);
        // Keys are `<ms>-<master>-<seq>`: a random start keeps a restarted master's keys apart
        // from its previous run's within the same millisecond.
        let start = (uuid::Uuid::new_v4().as_u64_pair().0 & 0xffff_ffff) << 20;
        AuditLog { tx, rx: std::sync::Mutex::new(Some(rx)), dropped: AtomicU64::new(0), seq: AtomicU64::new(start) }
    }

    fn key(&self, rec: &AuditRecord) -> Vec<u8> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{PREFIX}{:013}-{}-{seq:016x}", rec.at_ms.max(0), rec.master).into_bytes()
    }

    /// Queues a record of a call that wrote nothing.
    fn queue(&self, rec: AuditRecord) {
        if self.tx.try_send(rec).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The call being served, for the writes made on its behalf (`stamp`).
struct Call {
    record: AuditRecord,
    written: AtomicBool,
}

tokio::task_local! {
    static CALL: Arc<Call>;
}

fn record(ctx: &Ctx, caller: &Caller, verb: Verb, res: Resource, ns: &str, name: &str) -> AuditRecord {
    AuditRecord {
        at_ms: crate::objects::now_ms(),
        identity: caller.identity.to_string(),
        verb: verb.to_string(),
        resource: res.to_string(),
        namespace: ns.to_string(),
        name: truncate(name, 256),
        outcome: String::new(),
        master: ctx.id,
        revision: 0,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Checks a call that only reads; a denial is recorded.
pub(crate) async fn authorize(
    ctx: &Ctx,
    caller: &Caller,
    verb: Verb,
    res: Resource,
    ns: Option<&str>,
    name: &str,
) -> Result<(), Status> {
    if ctx.rbac.check(caller, verb, res, ns).is_ok() {
        return Ok(());
    }
    fresh_rbac(ctx).await;
    ctx.rbac.check(caller, verb, res, ns).inspect_err(|e| denied(ctx, caller, verb, res, ns.unwrap_or(""), name, e))
}

/// Before a refusal: this master may not have applied a grant the caller already holds (a user
/// added through another master a moment ago), so a denial is decided on roles and bindings read
/// after a read barrier (everything the leader had committed), not on the copy the watch keeps.
async fn fresh_rbac(ctx: &Ctx) {
    if ctx.read_barrier().await.is_ok() {
        crate::authz::refresh(ctx);
    }
}

/// Records a refused call.
fn denied(ctx: &Ctx, caller: &Caller, verb: Verb, res: Resource, ns: &str, name: &str, e: &Status) {
    let mut rec = record(ctx, caller, verb, res, ns, name);
    rec.outcome = format!("denied: {}", e.message());
    ctx.audit.queue(rec);
}

/// Which namespaces a list or watch across namespaces may show; a refusal is recorded.
pub(crate) async fn namespaces(
    ctx: &Ctx,
    caller: &Caller,
    verb: Verb,
    res: Resource,
) -> Result<crate::authz::Namespaces, Status> {
    if let Ok(n) = ctx.rbac.namespaces(caller, verb, res) {
        return Ok(n);
    }
    fresh_rbac(ctx).await;
    ctx.rbac.namespaces(caller, verb, res).inspect_err(|e| denied(ctx, caller, verb, res, "", "", e))
}

/// Serves a mutating call: checks it, runs it with its writes stamped with its record, and
/// records it once more if it wrote nothing or failed.
pub(crate) async fn mutate<T>(
    ctx: &Ctx,
    caller: &Caller,
    verb: Verb,
    res: Resource,
    ns: Option<&str>,
    name: &str,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    authorize(ctx, caller, verb, res, ns, name).await?;
    let rec = record(ctx, caller, verb, res, ns.unwrap_or(""), name);
    let c = Arc::new(Call { record: rec, written: AtomicBool::new(false) });
    let out = CALL.scope(c.clone(), call).await;
    let written = c.written.load(Ordering::Relaxed);
    match &out {
        Ok(_) if written => {}
        Ok(_) => {
            let mut rec = c.record.clone();
            // Succeeded without a record of its own: a call that changed nothing (an unchanged
            // apply, a dry run) or changed what is not a key (a membership change).
            rec.outcome = "ok".into();
            ctx.audit.queue(rec);
        }
        Err(e) => {
            let mut rec = c.record.clone();
            rec.outcome = format!("error: {:?}: {}", e.code(), truncate(e.message(), 512));
            ctx.audit.queue(rec);
        }
    }
    out
}

/// Makes a write made on the current call's behalf carry the call's record
/// (`Command::Audited`); applying it adds the revision and the outcome.
pub(crate) fn stamp(cmd: Command) -> Command {
    let Ok(call) = CALL.try_with(Arc::clone) else { return cmd };
    let Command::Txn(txn) = cmd else { return cmd };
    let at_ms = crate::objects::now_ms();
    call.written.store(true, Ordering::Relaxed);
    Command::Audited { txn, at_ms, record: stamped_json(&call.record, at_ms) }
}

/// A change's record as it travels (every write pays for it): `rec`'s JSON with `at_ms`, and
/// without outcome and revision, which applying adds. Serialized from borrowed fields, not from
/// a copy of the record.
fn stamped_json(rec: &AuditRecord, at_ms: i64) -> Vec<u8> {
    #[derive(Serialize)]
    struct Stamped<'a> {
        at_ms: i64,
        identity: &'a str,
        verb: &'a str,
        resource: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        namespace: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        name: &'a str,
        master: u64,
    }
    let s = Stamped {
        at_ms,
        identity: &rec.identity,
        verb: &rec.verb,
        resource: &rec.resource,
        namespace: &rec.namespace,
        name: &rec.name,
        master: rec.master,
    };
    serde_json::to_vec(&s).expect("an audit record serializes")
}

/// Commits the queued records in batches, until `token`.
pub(crate) async fn run_queue(ctx: Arc<Ctx>, token: CancellationToken) {
    let Some(mut rx) = ctx.audit.rx.lock().expect("audit lock").take() else { return };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        batch.clear();
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = token.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        let dropped = ctx.audit.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            batch.push(AuditRecord {
                at_ms: crate::objects::now_ms(),
                identity: format!("master/{}", ctx.id),
                verb: "drop".into(),
                resource: "audit".into(),
                outcome: format!("{dropped} records of calls that changed nothing were dropped: the queue was full"),
                master: ctx.id,
                ..Default::default()
            });
        }
        let ops: Vec<RequestOp> = batch
            .iter()
            .map(|rec| {
                RequestOp::Put(Put {
                    key: ctx.audit.key(rec),
                    value: serde_json::to_vec(rec).expect("an audit record serializes"),
                    prev_kv: false,
                })
            })
            .collect();
        let txn = berth_types::Txn { compare: vec![], success: ops, failure: vec![] };
        // A few tries over a leader change; then the batch is given up (logged), as a write of
        // the client's own would be after its deadline.
        let mut tries = 0;
        loop {
            match ctx.write(Command::Txn(txn.clone())).await {
                Ok(_) => break,
                Err(e) if tries < 5 && !token.is_cancelled() => {
                    tries += 1;
                    debug!("audit records not committed yet: {}", e.message());
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => {
                    warn!(records = batch.len(), "audit records could not be committed: {}", e.message());
                    break;
                }
            }
        }
    }
}

/// Whether a batch of watch events is only audit records (which the controllers, the indexes and
/// the service watches skip).
pub(crate) fn only_audit(events: &[(berth_types::Revision, berth_types::Event)]) -> bool {
    events.iter().all(|(_, e)| e.kv.key.starts_with(PREFIX.as_bytes()))
}

/// The records from `since_ms` on, oldest first, each with its revision.
pub(crate) fn read(reader: &berth_store::KvReader, since_ms: i64) -> Result<(Vec<AuditRecord>, i64), Status> {
    let q = berth_types::RangeQuery {
        key: format!("{PREFIX}{:013}", since_ms.max(0)).into_bytes(),
        range_end: berth_types::prefix_end(PREFIX.as_bytes()),
        ..Default::default()
    };
    let (res, counters) = reader.range(&q).map_err(|e| Status::internal(e.to_string()))?;
    let mut out: Vec<AuditRecord> = res.kvs.iter().flat_map(decode).collect();
    out.sort_by_key(|r| (r.revision, r.at_ms));
    Ok((out, counters.revision))
}

/// Whether a stored value is an entry.s records (JSON lines, each with its revision) rather than
/// one record of a call that changed nothing (a JSON object, whose revision is its key's).
fn is_entry(value: &[u8]) -> bool {
    value.ends_with(b"\n")
}

/// The records one key holds.
pub(crate) fn decode(kv: &berth_types::KeyValue) -> Vec<AuditRecord> {
    if is_entry(&kv.value) {
        return kv
            .value
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice::<AuditRecord>(l).ok())
            .collect();
    }
    serde_json::from_slice::<AuditRecord>(&kv.value)
        .ok()
        .map(|mut rec| {
            rec.revision = kv.mod_revision;
            rec
        })
        .into_iter()
        .collect()
}

/// On the leader: deletes records past the retention or the count bound, every minute, until
/// `leading` is cancelled.
pub(crate) async fn retain(ctx: Arc<Ctx>, leading: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = leading.cancelled() => return,
        }
        if let Err(e) = retain_once(&ctx, MAX_RECORDS, RETENTION).await {
            warn!("audit retention: {e}");
        }
    }
}

pub(crate) async fn retain_once(ctx: &Ctx, max: usize, retention: Duration) -> Result<(), String> {
    let cutoff = crate::objects::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let mut end = format!("{PREFIX}{:013}", cutoff.max(0)).into_bytes();
    // Past the count bound: the key of the oldest record to keep.
    let all = berth_types::RangeQuery {
        key: PREFIX.as_bytes().to_vec(),
        range_end: berth_types::prefix_end(PREFIX.as_bytes()),
        count_only: true,
        ..Default::default()
    };
    let (res, _) = ctx.reader.range(&all).map_err(|e| e.to_string())?;
    let count = usize::try_from(res.count).unwrap_or(0);
    if count > max {
        let excess = count - max;
        let q = berth_types::RangeQuery {
            keys_only: true,
            count_only: false,
            limit: i64::try_from(excess + 1).unwrap_or(i64::MAX),
            ..all
        };
        let (res, _) = ctx.reader.range(&q).map_err(|e| e.to_string())?;
        if let Some(first_kept) = res.kvs.get(excess) {
            end = end.max(first_kept.key.clone());
        }
    }
    let txn = berth_types::Txn {
        compare: vec![],
        success: vec![RequestOp::DeleteRange(DeleteRange {
            key: PREFIX.as_bytes().to_vec(),
            range_end: end,
            prev_kv: false,
        })],
        failure: vec![],
    };
    match ctx.write(Command::Txn(txn)).await.map_err(|e| e.message().to_string())? {
        CommandResult::Txn(t) => {
            if let Some(berth_types::OpResult::DeleteRange(d)) = t.responses.first()
                && d.deleted > 0
            {
                debug!(deleted = d.deleted, "audit records past retention deleted");
            }
            Ok(())
        }
        other => Err(format!("unexpected result {other:?}")),
    }
}

/// Appends every committed record to `<data-dir>/audit.log` as a JSON line, until `token`.
pub(crate) async fn follow_file(ctx: Arc<Ctx>, token: CancellationToken) {
    let path = ctx.data_dir.join(FILE);
    loop {
        match follow_file_once(&ctx, &path, &token).await {
            Ok(()) => return,
            Err(e) => {
                warn!(file = %path.display(), "audit file: {e}; retrying in a second");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = token.cancelled() => return,
                }
            }
        }
    }
}

async fn follow_file_once(ctx: &Ctx, path: &Path, token: &CancellationToken) -> Result<(), String> {
    let mut last = last_revision(path).map_err(|e| format!("cannot read its last line: {e}"))?;
    let mut file = AuditFile::open(path.to_path_buf()).map_err(|e| format!("cannot open it: {e}"))?;
    loop {
        // Catch up from the state (after a restart, or a watch that fell behind), then follow.
        let (records, revision) = read(&ctx.reader, 0).map_err(|e| e.message().to_string())?;
        for rec in records {
            if rec.revision > last {
                file.append(&rec).map_err(|e| format!("cannot write: {e}"))?;
                last = last.max(rec.revision);
            }
        }
        file.flush().map_err(|e| format!("cannot write: {e}"))?;
        let prefix = PREFIX.as_bytes().to_vec();
        let mut watcher = ctx
            .reader
            .watch(prefix.clone(), berth_types::prefix_end(&prefix), revision + 1)
            .map_err(|e| format!("cannot watch the audit records: {e}"))?;
        // Written out at most every 200 ms (and at a stop), not once per applied entry.
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        loop {
            let next = tokio::select! {
                n = watcher.next() => n,
                _ = tick.tick(), if dirty => {
                    file.flush().map_err(|e| format!("cannot write: {e}"))?;
                    dirty = false;
                    continue;
                }
                _ = token.cancelled() => {
                    file.flush().map_err(|e| format!("cannot write: {e}"))?;
                    return Ok(());
                }
            };
            match next {
                Ok(berth_store::WatchEvents::Events(events)) => {
                    for (_, e) in events.iter().filter(|(_, e)| e.kind == berth_types::EventKind::Put) {
                        // A key's revision is above every record it holds.
                        if e.kv.mod_revision <= last {
                            continue;
                        }
                        if is_entry(&e.kv.value) {
                            file.append_lines(&e.kv.value).map_err(|e| format!("cannot write: {e}"))?;
                        } else {
                            file.append_stored(&e.kv.value, e.kv.mod_revision)
                                .map_err(|e| format!("cannot write: {e}"))?;
                        }
                        last = e.kv.mod_revision;
                        dirty = true;
                    }
                }
                Ok(_) | Err(_) => {
                    file.flush().map_err(|e| format!("cannot write: {e}"))?;
                    break;
                }
            }
        }
    }
}

/// The revision of the last line of the file (0 when there is none).
fn last_revision(path: &Path) -> std::io::Result<i64> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let from = len.saturating_sub(64 * 1024);
    f.seek(std::io::SeekFrom::Start(from))?;
    let mut tail = String::new();
    f.take(64 * 1024).read_to_string(&mut tail).ok();
    Ok(tail.lines().rev().find_map(|l| serde_json::from_str::<AuditRecord>(l).ok()).map_or(0, |r| r.revision))
}

struct AuditFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    len: u64,
}

impl AuditFile {
    fn open(path: PathBuf) -> std::io::Result<AuditFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
        let len = f.metadata()?.len();
        Ok(AuditFile { path, out: std::io::BufWriter::new(f), len })
    }

    fn rotate_if_full(&mut self) -> std::io::Result<()> {
        if self.len >= ROTATE_BYTES {
            self.out.flush()?;
            let old = self.path.with_extension("log.1");
            std::fs::rename(&self.path, old)?;
            *self = AuditFile::open(self.path.clone())?;
        }
        Ok(())
    }

    fn append(&mut self, rec: &AuditRecord) -> std::io::Result<()> {
        self.rotate_if_full()?;
        let mut line = serde_json::to_vec(rec).expect("an audit record serializes");
        line.push(b'\n');
        self.out.write_all(&line)?;
        self.len += line.len() as u64;
        Ok(())
    }

    /// Appends an entry.s records as stored: JSON lines that carry their revisions.
    fn append_lines(&mut self, lines: &[u8]) -> std::io::Result<()> {
        self.rotate_if_full()?;
        self.out.write_all(lines)?;
        self.len += lines.len() as u64;
        Ok(())
    }

    /// Appends a record as stored (a JSON object without its revision) with `"revision":REV`
    /// added, without decoding it: the file keeps up with every write of the cluster.
    fn append_stored(&mut self, stored: &[u8], revision: i64) -> std::io::Result<()> {
        let Some(body) = stored.strip_prefix(b"{").filter(|b| b.ends_with(b"}") && b.len() > 1) else {
            return Ok(());
        };
        self.rotate_if_full()?;
        let head = format!("{{\"revision\":{revision},");
        self.out.write_all(head.as_bytes())?;
        self.out.write_all(body)?;
        self.out.write_all(b"\n")?;
        self.len += (head.len() + body.len() + 1) as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record a write carries is the record's own JSON (with its time), field for field.
    #[test]
    fn a_stamped_record_is_the_records_json() {
        let mut rec = AuditRecord {
            at_ms: 5,
            identity: "user/a".into(),
            verb: "update".into(),
            resource: "kv".into(),
            name: "k".into(),
            master: 2,
            ..Default::default()
        };
        for ns in ["", "prod"] {
            rec.namespace = ns.into();
            assert_eq!(stamped_json(&rec, 5), serde_json::to_vec(&rec).unwrap(), "namespace {ns:?}");
        }
    }

    #[test]
    fn the_file_resumes_after_its_last_line_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert_eq!(last_revision(&path).unwrap(), 0);
        let mut f = AuditFile::open(path.clone()).unwrap();
        for rev in 1..=3 {
            f.append(&AuditRecord { revision: rev, outcome: "ok".into(), ..Default::default() }).unwrap();
        }
        f.flush().unwrap();
        assert_eq!(last_revision(&path).unwrap(), 3);
        f.len = ROTATE_BYTES;
        f.append(&AuditRecord { revision: 4, ..Default::default() }).unwrap();
        f.flush().unwrap();
        assert_eq!(last_revision(&path).unwrap(), 4);
        assert_eq!(last_revision(&path.with_extension("log.1")).unwrap(), 3);
        let stored = serde_json::to_vec(&AuditRecord { outcome: "ok".into(), ..Default::default() }).unwrap();
        f.append_stored(&stored, 9).unwrap();
        f.flush().unwrap();
        assert_eq!(last_revision(&path).unwrap(), 9);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("ééé", 3), "é...");
    }
}
