//! Snapshot files: a consistent copy of the current key-values plus the metadata openraft needs.
//!
//! Layout: `BERTHSN2` | u32 header length | header record | (u32 length | KeyValue record)* |
//! u32 0 | u64 key count | (u32 length | audit key + audit records)* | u32 0 | u64 next audit
//! seq | SHA-256 of every preceding byte. Files of the first format (`BERTHSNP`) end after the
//! key count, with no audit log, and are still read. Files are written to a temporary
//! name, fsynced, renamed into place and the directory fsynced, so a crash never leaves half a
//! snapshot under a real name. The same format is the backup that `berth snapshot save` writes.

use std::{
    fs::{self, File},
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
};

use berth_types::KeyValue;
use openraft::alias::{LogIdOf, SnapshotMetaOf, StoredMembershipOf};
use rocksdb::{DB, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    StoreError, TypeConfig,
    db::{CF_AUDIT, CF_HIST, CF_KV, CF_SM, cf},
    envelope::{decode, encode},
    mvcc::{
        Counters, SM_CA, SM_CLUSTER_ID, SM_COUNTERS, SM_HISTORY_FLOOR, SM_REMOVED, View, read_ca, read_cluster_id,
        read_counters, read_removed,
    },
};

const MAGIC: &[u8; 8] = b"BERTHSN2";
/// The first format: no audit section.
const MAGIC_V1: &[u8; 8] = b"BERTHSNP";
pub(crate) const SM_APPLIED: &[u8] = b"applied";
pub(crate) const SM_MEMBERSHIP: &[u8] = b"membership";
/// No record in a snapshot may be larger than this (a key-value is at most ~1 MiB + 4 KiB).
const MAX_RECORD: u32 = 64 * 1024 * 1024;

/// A snapshot on disk. openraft hands this around as the snapshot's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub path: PathBuf,
}

/// What a snapshot file says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub meta: SnapshotMetaOf<TypeConfig>,
    pub counters: Counters,
    pub cluster_id: Option<String>,
    /// Ids of removed masters, which must stay refused after a snapshot install.
    pub removed_members: std::collections::BTreeSet<u64>,
    /// The cluster CA, so that a master that catches up by snapshot can sign certificates.
    /// Backups streamed to clients leave it out (the CA key never leaves the masters).
    pub ca: Option<berth_types::ClusterCa>,
}

pub(crate) fn read_applied(v: &dyn View) -> Result<Option<LogIdOf<TypeConfig>>, StoreError> {
    Ok(v.get(CF_SM, SM_APPLIED)?
        .map(|b| decode::<Option<LogIdOf<TypeConfig>>>(&b, "applied log id"))
        .transpose()?
        .flatten())
}

pub(crate) fn read_membership(v: &dyn View) -> Result<StoredMembershipOf<TypeConfig>, StoreError> {
    Ok(v.get(CF_SM, SM_MEMBERSHIP)?.map(|b| decode(&b, "membership")).transpose()?.unwrap_or_default())
}

/// `snap-<index>-<term>-<nanos>.snap`: names sort by log index, and never repeat.
fn file_name(header: &SnapshotHeader) -> String {
    let index = header.meta.last_log_id.as_ref().map_or(0, |l| l.index);
    let term = header.meta.last_log_id.as_ref().map_or(0, |l| l.leader_id.term);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("snap-{index:020}-{term:010}-{nanos}.snap")
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// What a snapshot carries besides the key space.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// For other masters (Raft): everything, the CA included.
    Replication,
    /// A backup for a client: the CA key never leaves the masters, so it is left out.
    Backup,
}

/// Writes the snapshot of `view` into `dir` (temp file, fsync, rename, fsync dir) and returns its
/// path and header.
pub(crate) fn write_snapshot(
    view: &dyn View,
    dir: &Path,
    purpose: Purpose,
) -> Result<(PathBuf, SnapshotHeader), StoreError> {
    fs::create_dir_all(dir)?;
    let header = SnapshotHeader {
        meta: SnapshotMetaOf::<TypeConfig> {
            last_log_id: read_applied(view)?,
            last_membership: read_membership(view)?,
        },
        counters: read_counters(view)?,
        cluster_id: read_cluster_id(view)?,
        removed_members: read_removed(view)?,
        ca: if purpose == Purpose::Replication { read_ca(view)? } else { None },
    };
    let name = file_name(&header);
    let tmp = dir.join(format!("{name}.tmp"));
    let final_path = dir.join(&name);

    // Replication snapshots carry the CA key: owner-only, like the rest of the data dir.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?
    };
    let mut w = HashingWriter { inner: BufWriter::with_capacity(1 << 20, file), hasher: Sha256::new() };
    w.write_all(MAGIC)?;
    write_record(&mut w, &encode(&header))?;
    let mut count = 0u64;
    let mut err = None;
    view.scan(CF_KV, &[], &mut |_, v| {
        // Values are stored as envelope(KeyValue): copy them through unchanged.
        if let Err(e) = write_record(&mut w, v) {
            err = Some(e);
            return Ok(false);
        }
        count += 1;
        Ok(true)
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    w.write_all(&0u32.to_be_bytes())?;
    w.write_all(&count.to_be_bytes())?;
    view.scan(CF_AUDIT, &[], &mut |k, v| {
        let mut rec = Vec::with_capacity(k.len() + v.len());
        rec.extend_from_slice(k);
        rec.extend_from_slice(v);
        if let Err(e) = write_record(&mut w, &rec) {
            err = Some(e);
            return Ok(false);
        }
        Ok(true)
    })?;
    if let Some(e) = err {
        return Err(e.into());
    }
    w.write_all(&0u32.to_be_bytes())?;
    w.write_all(&crate::audit::read_next(view)?.to_be_bytes())?;
    let digest = w.hasher.finalize_reset();
    let mut inner = w.inner;
    inner.write_all(&digest)?;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &final_path)?;
    fsync_dir(dir)?;
    Ok((final_path, header))
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_record(w: &mut impl Write, rec: &[u8]) -> std::io::Result<()> {
    w.write_all(&(rec.len() as u32).to_be_bytes())?;
    w.write_all(rec)
}

struct HashingReader<R: Read> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(buf)?;
        self.hasher.update(&*buf);
        Ok(())
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
}

/// What a snapshot holds besides its header and key-values.
#[derive(Default)]
struct Contents {
    /// The `seq` of the next audit record.
    audit_next: u64,
}

/// Reads a snapshot, calling `f` with every key-value and `audit` with every stored group of
/// audit records (its key and value), and checks its trailer and checksum. Nothing should be
/// committed from their results before this returns Ok.
fn read_snapshot(
    path: &Path,
    mut f: impl FnMut(&[u8], KeyValue) -> Result<(), StoreError>,
    mut audit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(SnapshotHeader, Contents), StoreError> {
    let bad = |reason: String| StoreError::BadSnapshot { path: path.display().to_string(), reason };
    let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut r = HashingReader { inner: BufReader::with_capacity(1 << 20, file), hasher: Sha256::new() };
    let mut magic = [0u8; 8];
    r.exact(&mut magic).map_err(|e| bad(format!("too short to be a snapshot: {e}")))?;
    if &magic != MAGIC && &magic != MAGIC_V1 {
        return Err(bad("not a berth snapshot (wrong magic bytes)".into()));
    }
    let read_rec = |r: &mut HashingReader<_>, len: u32| -> Result<Vec<u8>, StoreError> {
        if len > MAX_RECORD {
            return Err(bad(format!("record of {len} bytes is over the {MAX_RECORD}-byte limit")));
        }
        let mut buf = vec![0u8; len as usize];
        r.exact(&mut buf).map_err(|e| bad(format!("truncated: {e}")))?;
        Ok(buf)
    };
    let len = r.u32().map_err(|e| bad(format!("truncated header: {e}")))?;
    let header: SnapshotHeader = decode(&read_rec(&mut r, len)?, "snapshot header")?;
    let mut count = 0u64;
    loop {
        let len = r.u32().map_err(|e| bad(format!("truncated after {count} keys: {e}")))?;
        if len == 0 {
            break;
        }
        let rec = read_rec(&mut r, len)?;
        let kv: KeyValue = decode(&rec, "snapshot key-value")?;
        f(&rec, kv)?;
        count += 1;
    }
    let mut n = [0u8; 8];
    r.exact(&mut n).map_err(|e| bad(format!("truncated trailer: {e}")))?;
    if u64::from_be_bytes(n) != count {
        return Err(bad(format!("trailer says {} keys, found {count}", u64::from_be_bytes(n))));
    }
    let mut contents = Contents::default();
    if &magic == MAGIC {
        let mut groups = 0u64;
        loop {
            let len = r.u32().map_err(|e| bad(format!("truncated after {groups} audit groups: {e}")))?;
            if len == 0 {
                break;
            }
            let rec = read_rec(&mut r, len)?;
            let Some((key, value)) = rec.split_first_chunk::<8>() else {
                return Err(bad(format!("audit group of {len} bytes has no key")));
            };
            crate::audit::decode_entry(value)?;
            audit(key, value)?;
            groups += 1;
        }
        r.exact(&mut n).map_err(|e| bad(format!("truncated audit trailer: {e}")))?;
        contents.audit_next = u64::from_be_bytes(n);
    }
    let digest = r.hasher.finalize_reset();
    let mut stored = [0u8; 32];
    r.inner.read_exact(&mut stored).map_err(|e| bad(format!("missing checksum: {e}")))?;
    if stored[..] != digest[..] {
        return Err(bad("checksum mismatch: the file is corrupt".into()));
    }
    Ok((header, contents))
}

/// Reads only the header of a snapshot file (and validates the whole file).
pub fn read_header(path: &Path) -> Result<SnapshotHeader, StoreError> {
    Ok(read_snapshot(path, |_, _| Ok(()), |_, _| Ok(()))?.0)
}

/// Replaces the whole state machine in `db` with the snapshot's contents, in one synced
/// WriteBatch. `applied` and `membership` override the snapshot's own (restore uses none).
pub(crate) fn load_into_db(
    db: &DB,
    path: &Path,
    applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    cluster_id: Option<String>,
) -> Result<SnapshotHeader, StoreError> {
    let restoring = cluster_id.is_some();
    let mut batch = WriteBatch::default();
    let kv_cf = cf(db, CF_KV);
    // Keys are at most 4 KiB (validated on write), so this bound is above every key.
    batch.delete_range_cf(kv_cf, Vec::<u8>::new(), vec![0xffu8; 64 * 1024]);
    batch.delete_range_cf(cf(db, CF_HIST), vec![0u8; 12], vec![0xffu8; 13]);
    let audit_cf = cf(db, CF_AUDIT);
    batch.delete_range_cf(audit_cf, vec![0u8; 8], vec![0xffu8; 9]);
    // Both readers put into the one batch (no copy of the audit log on the side).
    let batch = std::cell::RefCell::new(batch);
    let (header, contents) = read_snapshot(
        path,
        |rec, kv| {
            batch.borrow_mut().put_cf(kv_cf, &kv.key, rec);
            Ok(())
        },
        |key, value| {
            batch.borrow_mut().put_cf(audit_cf, key, value);
            Ok(())
        },
    )?;
    let mut batch = batch.into_inner();
    // The cluster's compaction point comes with the snapshot, so that later `Compact` commands
    // apply here as on the other masters; the history before the snapshot is gone all the same.
    let sm = cf(db, CF_SM);
    batch.put_cf(sm, SM_COUNTERS, encode(&header.counters));
    batch.put_cf(sm, SM_HISTORY_FLOOR, encode(&header.counters.revision));
    batch.put_cf(sm, SM_APPLIED, encode(&applied));
    batch.put_cf(sm, SM_MEMBERSHIP, encode(&membership));
    batch.put_cf(sm, SM_REMOVED, encode(&header.removed_members));
    batch.put_cf(sm, crate::audit::SM_AUDIT_NEXT, encode(&contents.audit_next));
    // A restore seeds a new cluster, which has its own CA: only a snapshot install keeps one.
    match (&header.ca, restoring) {
        (Some(ca), false) => batch.put_cf(sm, SM_CA, encode(ca)),
        _ => batch.delete_cf(sm, SM_CA),
    }
    match cluster_id.or_else(|| header.cluster_id.clone()) {
        Some(id) => batch.put_cf(sm, SM_CLUSTER_ID, encode(&id)),
        None => batch.delete_cf(sm, SM_CLUSTER_ID),
    }
    let mut o = WriteOptions::default();
    o.set_sync(true);
    db.write_opt(batch, &o)?;
    Ok(header)
}

/// Disaster recovery: seeds the empty data dir `data_dir` with the key-values of a backup, as a
/// new cluster with id `cluster_id`. The Raft log starts empty; membership comes from the
/// bootstrap of the new cluster.
pub fn restore_into(backup: &Path, data_dir: &Path, cluster_id: String) -> Result<SnapshotHeader, StoreError> {
    let db = crate::db::open(&data_dir.join("db"))?;
    if crate::mvcc::read_counters(&*db)?.revision != 0 || read_applied(&*db)?.is_some() {
        return Err(StoreError::NotEmpty { dir: data_dir.display().to_string() });
    }
    load_into_db(&db, backup, None, Default::default(), Some(cluster_id))
}

/// Snapshot files in `dir`, newest (highest log index) last. Leftover temp files are removed.
pub(crate) fn list(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for e in entries {
        let p = e?.path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("snap") => out.push(p),
            Some("tmp" | "incoming") => {
                let _ = fs::remove_file(&p);
            }
            _ => {}
        }
    }
    out.sort();
    Ok(out)
}

/// Keeps the newest two snapshots (one may still be streaming to a follower).
pub(crate) fn prune(dir: &Path) -> Result<(), StoreError> {
    let files = list(dir)?;
    if files.len() > 2 {
        for p in &files[..files.len() - 2] {
            let _ = fs::remove_file(p);
        }
    }
    Ok(())
}

/// Puts a received or foreign snapshot file into `dir` under a proper name, durably.
pub(crate) fn adopt(src: &Path, dir: &Path, header: &SnapshotHeader) -> Result<PathBuf, StoreError> {
    fs::create_dir_all(dir)?;
    let dst = dir.join(file_name(header));
    if src.parent() == Some(dir) && src.extension().is_some_and(|x| x == "incoming") {
        fs::rename(src, &dst)?;
    } else {
        let tmp = dst.with_extension("snap.tmp");
        fs::copy(src, &tmp)?;
        File::open(&tmp)?.sync_all()?;
        fs::rename(&tmp, &dst)?;
    }
    fsync_dir(dir)?;
    Ok(dst)
}
