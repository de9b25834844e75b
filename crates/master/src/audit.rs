//! The audit log: every mutating client call and every denied one, with who made it, the verb,
//! the resource, its namespace and name, the outcome and the revision it made.
//!
//! - A call that writes sends its transactions as `Command::Stamped`, with its record: applying
//!   them gives each record its `seq`, revision and outcome (`ok`, or `conflict` when a compare
//!   failed), and stores the records of one Raft log entry together, once, outside the key space
//!   (the store's audit log), in the same RocksDB write as the changes. An acknowledged change
//!   always has its record, and the record costs no key, no history copy and no watch event.
//! - A call that writes nothing (denied, invalid, unchanged) is queued and committed in batches
//!   by each master (`run_queue`, `Command::Audit`); under a flood of denied calls the queue is
//!   bounded and counts what it had to drop, in a record of its own.
//! - The leader bounds the log (`retain`, `Command::TrimAudit`): records older than the
//!   retention, and the oldest past [`MAX_RECORDS`], are dropped.
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

use berth_types::{AuditRecord, Command, DeleteRange, RequestOp, spec::access::Resource, spec::access::Verb};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, warn};

use crate::{authz::Caller, node::Ctx};

pub(crate) const PREFIX: &str = berth_types::AUDIT_PREFIX;
/// The most audit records kept; the oldest beyond go (whole log entries' worth).
pub(crate) const MAX_RECORDS: usize = 100_000;
/// How long records are kept.
pub(crate) const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Records queued (calls that wrote nothing) before new ones are counted as dropped.
const QUEUE: usize = 10_000;
/// Records per queued batch (one transaction).
const BATCH: usize = 100;
const FILE: &str = "audit.log";
const ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// A record's JSON line (the audit file).
#[derive(Serialize, Deserialize)]
struct Line<'a> {
    seq: u64,
    at_ms: i64,
    identity: &'a str,
    verb: &'a str,
    resource: &'a str,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    namespace: &'a str,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    name: &'a str,
    outcome: &'a str,
    master: u64,
    revision: i64,
}

/// Writes `r`'s JSON line into `out` (emptied first).
fn json_line(r: &AuditRecord, out: &mut Vec<u8>) {
    let line = Line {
        seq: r.seq,
        at_ms: r.at_ms,
        identity: &r.identity,
        verb: &r.verb,
        resource: &r.resource,
        namespace: &r.namespace,
        name: &r.name,
        outcome: &r.outcome,
        master: r.master,
        revision: r.revision,
    };
    out.clear();
    serde_json::to_writer(&mut *out, &line).expect("an audit record serializes");
    out.push(b'\n');
}

/// The audit state of one master: its queue of records of calls that changed nothing.
pub(crate) struct AuditLog {
    tx: mpsc::Sender<AuditRecord>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<AuditRecord>>>,
    dropped: AtomicU64,
}

impl AuditLog {
    pub(crate) fn new() -> AuditLog {
        let (tx, rx) = mpsc::channel(QUEUE);
        AuditLog { tx, rx: std::sync::Mutex::new(Some(rx)), dropped: AtomicU64::new(0) }
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
        ..Default::default()
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
/// (`Command::Stamped`); applying it adds the seq, the revision and the outcome.
pub(crate) fn stamp(cmd: Command) -> Command {
    let Ok(call) = CALL.try_with(Arc::clone) else { return cmd };
    let Command::Txn(txn) = cmd else { return cmd };
    call.written.store(true, Ordering::Relaxed);
    Command::Stamped { txn, record: AuditRecord { at_ms: crate::objects::now_ms(), ..call.record.clone() } }
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
        let count = batch.len();
        let cmd = Command::Audit { records: std::mem::take(&mut batch) };
        // A few tries over a leader change; then the batch is given up (logged), as a write of
        // the client's own would be after its deadline.
        let mut tries = 0;
        loop {
            match ctx.write(cmd.clone()).await {
                Ok(_) => break,
                Err(e) if tries < 5 && !token.is_cancelled() => {
                    tries += 1;
                    debug!("audit records not committed yet: {}", e.message());
                    tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                }
                Err(e) => {
                    warn!(records = count, "audit records could not be committed: {}", e.message());
                    break;
                }
            }
        }
    }
}

/// The records made from `since_ms` on, oldest first.
pub(crate) fn read(reader: &berth_store::KvReader, since_ms: i64) -> Result<Vec<AuditRecord>, Status> {
    reader.audit_since(since_ms).map_err(|e| Status::internal(format!("cannot read the audit log: {e}")))
}

/// The records from `seq` on (at least `limit` of them when there are), oldest first.
pub(crate) fn read_from(reader: &berth_store::KvReader, seq: u64, limit: usize) -> Result<Vec<AuditRecord>, Status> {
    reader.audit_from(seq, limit).map_err(|e| Status::internal(format!("cannot read the audit log: {e}")))
}

/// Follows the audit log from a `seq` on: every new record once, in order, as the state machine
/// hands them over, or read from the store when this follower missed some (it lagged, it started
/// behind, or a snapshot replaced the log).
pub(crate) struct Follower {
    rx: tokio::sync::broadcast::Receiver<Arc<berth_store::AuditAppended>>,
    reader: berth_store::KvReader,
    next: u64,
    behind: bool,
}

/// Records a [`Follower`] hands over: shared with the state machine, or read from the store.
pub(crate) enum Records {
    Applied(Arc<berth_store::AuditAppended>, usize),
    Read(Vec<AuditRecord>),
}

impl Records {
    pub(crate) fn iter(&self) -> impl Iterator<Item = &AuditRecord> {
        let (applied, read) = match self {
            Records::Applied(a, skip) => (&a.records[*skip..], &[][..]),
            Records::Read(r) => (&[][..], &r[..]),
        };
        applied.iter().chain(read)
    }
}

impl Follower {
    /// Subscribes first, so that nothing applied from here on is missed; what was applied
    /// before is read from the store.
    pub(crate) fn new(reader: &berth_store::KvReader, next: u64) -> Follower {
        Follower { rx: reader.audit_subscribe(), reader: reader.clone(), next, behind: true }
    }

    /// Goes on from `seq`, when that is further on.
    pub(crate) fn skip_to(&mut self, seq: u64) {
        self.next = self.next.max(seq);
    }

    /// The next records, waiting for them; `None` when the master is stopping.
    pub(crate) async fn next(&mut self) -> Result<Option<Records>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            if self.behind {
                let read = read_from(&self.reader, self.next, 4096)?;
                if let Some(last) = read.last() {
                    self.next = last.seq + 1;
                    return Ok(Some(Records::Read(read)));
                }
                self.behind = false;
            }
            match self.rx.recv().await {
                Ok(a) if a.next <= self.next => {}
                Ok(a) => {
                    let first = a.records.first().map_or(a.next, |r| r.seq);
                    if first > self.next {
                        self.behind = true;
                        continue;
                    }
                    let skip = usize::try_from(self.next - first).unwrap_or(usize::MAX).min(a.records.len());
                    self.next = a.next;
                    return Ok(Some(Records::Applied(a, skip)));
                }
                Err(RecvError::Lagged(_)) => self.behind = true,
                Err(RecvError::Closed) => return Ok(None),
            }
        }
    }
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
    let (first, next) = ctx.reader.audit_bounds().map_err(|e| e.to_string())?;
    let mut below = ctx.reader.audit_first_since(cutoff).map_err(|e| e.to_string())?;
    let max = u64::try_from(max).unwrap_or(u64::MAX);
    if next - first > max {
        below = below.max(next - max);
    }
    if below > first {
        ctx.write(Command::TrimAudit { below_seq: below }).await.map_err(|e| e.message().to_string())?;
        debug!(below, "audit records past retention dropped");
    }
    drop_legacy_keys(ctx).await
}

/// Earlier versions kept the records under [`PREFIX`] in the key space: they go.
async fn drop_legacy_keys(ctx: &Ctx) -> Result<(), String> {
    let prefix = PREFIX.as_bytes().to_vec();
    let end = berth_types::prefix_end(&prefix);
    let q =
        berth_types::RangeQuery { key: prefix.clone(), range_end: end.clone(), count_only: true, ..Default::default() };
    let (res, _) = ctx.reader.range(&q).map_err(|e| e.to_string())?;
    if res.count == 0 {
        return Ok(());
    }
    let delete = RequestOp::DeleteRange(DeleteRange { key: prefix, range_end: end, prev_kv: false });
    let txn = berth_types::Txn { compare: vec![], success: vec![delete], failure: vec![] };
    ctx.write(Command::Txn(txn)).await.map_err(|e| e.message().to_string())?;
    debug!(keys = res.count, "audit records of an earlier version deleted from the key space");
    Ok(())
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
    let next = last_seq(path).map_err(|e| format!("cannot read its last line: {e}"))?.map_or(0, |s| s + 1);
    let mut file = AuditFile::open(path.to_path_buf()).map_err(|e| format!("cannot open it: {e}"))?;
    let mut follower = Follower::new(&ctx.reader, next);
    // Written out at most every 200 ms (and at a stop), not once per applied entry.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = false;
    loop {
        tokio::select! {
            r = follower.next() => match r.map_err(|e| e.message().to_string())? {
                Some(records) => {
                    for rec in records.iter() {
                        file.append(rec).map_err(|e| format!("cannot write: {e}"))?;
                    }
                    dirty = true;
                }
                None => {
                    file.flush().map_err(|e| format!("cannot write: {e}"))?;
                    return Ok(());
                }
            },
            _ = tick.tick(), if dirty => {
                file.flush().map_err(|e| format!("cannot write: {e}"))?;
                dirty = false;
            }
            _ = token.cancelled() => {
                file.flush().map_err(|e| format!("cannot write: {e}"))?;
                return Ok(());
            }
        }
    }
}

/// The seq of the file's last record, or of the rotated file's when it has none yet.
fn last_seq(path: &Path) -> std::io::Result<Option<u64>> {
    match last_seq_of(path)? {
        Some(seq) => Ok(Some(seq)),
        None => last_seq_of(&path.with_extension("log.1")),
    }
}

fn last_seq_of(path: &Path) -> std::io::Result<Option<u64>> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let from = len.saturating_sub(64 * 1024);
    f.seek(std::io::SeekFrom::Start(from))?;
    let mut tail = String::new();
    f.take(64 * 1024).read_to_string(&mut tail).ok();
    Ok(tail.lines().rev().find_map(|l| serde_json::from_str::<Seq>(l).ok()).map(|s| s.seq))
}

struct AuditFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    len: u64,
    /// The line being written (kept, so that a line costs no allocation).
    line: Vec<u8>,
}

impl AuditFile {
    fn open(path: PathBuf) -> std::io::Result<AuditFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
        let len = f.metadata()?.len();
        Ok(AuditFile { path, out: std::io::BufWriter::new(f), len, line: Vec::with_capacity(512) })
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
        json_line(rec, &mut self.line);
        self.out.write_all(&self.line)?;
        self.len += self.line.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_resumes_after_its_last_line_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert_eq!(last_seq(&path).unwrap(), None);
        let mut f = AuditFile::open(path.clone()).unwrap();
        for seq in 0..=3 {
            f.append(&AuditRecord { seq, outcome: "ok".into(), ..Default::default() }).unwrap();
        }
        f.flush().unwrap();
        assert_eq!(last_seq(&path).unwrap(), Some(3));
        f.len = ROTATE_BYTES;
        f.append(&AuditRecord { seq: 4, ..Default::default() }).unwrap();
        f.flush().unwrap();
        assert_eq!(last_seq(&path).unwrap(), Some(4));
        assert_eq!(last_seq(&path.with_extension("log.1")).unwrap(), Some(3));
        // Rotated, and nothing written since: the rotated file says where to go on from.
        f.len = ROTATE_BYTES;
        f.rotate_if_full().unwrap();
        assert_eq!(last_seq(&path).unwrap(), Some(4));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut buf = Vec::new();
        json_line(
            &AuditRecord {
                seq: 9,
                identity: "user/a".into(),
                namespace: String::new(),
                revision: 7,
                ..Default::default()
            },
            &mut buf,
        );
        let line: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            (line["seq"].as_u64(), line["identity"].as_str(), line["revision"].as_i64()),
            (Some(9), Some("user/a"), Some(7))
        );
        assert!(line.get("namespace").is_none(), "empty fields are left out: {line}");
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("ééé", 3), "é...");
    }
}
