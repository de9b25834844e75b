//! Secrets and configs: versioned files that tasks mount, kept in the replicated state.
//!
//! - `/berth/secrets/<ns>/<name>` and `/berth/configs/<ns>/<name>` hold a [`FileRecord`] with
//!   the newest [`KEEP_VERSIONS`] versions. A config's data is stored as is; a secret's is sealed
//!   with AES-256-GCM (ring) under the cluster's data key, with `ns/name@version` as associated
//!   data, so a sealed value cannot be moved to another name or version.
//! - `/berth/keys/secrets` holds the data key, itself sealed under the masters' key-encryption
//!   key (KEK). The KEK never enters the replicated state: each master reads it from
//!   `DATA_DIR/pki/secrets.key` (copied there from `berth pki init`'s directory on the first
//!   start) or from `--secrets-key-file`. So neither the Raft log, the RocksDB files, a snapshot
//!   nor a backup holds a secret in plaintext, and a backup alone cannot open one.
//! - A new version of a secret or config rolls the services that mount it: their records get the
//!   new version in `file_versions` (part of the template hash) and a new spec version, in the
//!   same transaction as the file.
//! - Contents reach an agent only beside a RUNNING assignment of a task that mounts them
//!   ([`contents`]), opened by the leader as it sends.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use berth_api::pb::{
    DataKeyRecord, FileKind as PbFileKind, FileRecord, FileVersion, FileView, PutFileRequest, ServiceRecord, Task,
    agent::FileData,
};
use berth_store::KvReader;
use berth_types::{
    Command, CommandResult,
    spec::{self, FileKind, Service, volume},
    task::{RunSpec, TaskFile},
};
use prost::Message;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use tonic::Status;
use tracing::info;

use crate::node::Ctx;
use crate::objects::{self, Versioned};
use crate::tasks::{self, SERVICES_PREFIX, TASKS_PREFIX};

pub(crate) const SECRETS_PREFIX: &str = "/berth/secrets/";
pub(crate) const CONFIGS_PREFIX: &str = "/berth/configs/";
const DATA_KEY: &str = "/berth/keys/secrets";
/// The file in `DATA_DIR/pki/` (and in `berth pki init`'s directory) holding the KEK.
pub(crate) const KEY_FILE: &str = "secrets.key";
/// Versions kept per secret or config: the current one, and older ones that tasks of a rolling
/// update or a rollback may still mount.
pub(crate) const KEEP_VERSIONS: usize = 3;

/// The masters' key-encryption key.
#[derive(Clone)]
pub(crate) struct Kek {
    key: [u8; 32],
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Kek {
    /// Reads a key file: 64 hex digits (32 bytes), surrounding whitespace allowed.
    pub fn load(path: &Path) -> Result<Kek, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let bytes = hex::decode(text.trim()).map_err(|_| {
            format!(
                "{} does not hold a secrets key: expected 64 hex digits, as `berth pki init` writes",
                path.display()
            )
        })?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            format!("{} does not hold a secrets key: expected 64 hex digits (32 bytes)", path.display())
        })?;
        Ok(Kek::from_bytes(key))
    }

    pub fn from_bytes(key: [u8; 32]) -> Kek {
        let id = hex::encode(&Sha256::new().chain_update(b"berth kek id v1").chain_update(key).finalize()[..8]);
        Kek { key, id }
    }
}

/// What a master knows of the keys: its KEK (if it has one) and, once opened, the data key.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    kek: Option<Kek>,
    data_key: Mutex<Option<[u8; 32]>>,
}

impl Keys {
    pub fn new(kek: Option<Kek>) -> Keys {
        Keys { kek, data_key: Mutex::new(None) }
    }

    fn kek(&self) -> Result<&Kek, String> {
        self.kek.as_ref().ok_or_else(|| {
            "this master has no secrets key: give it `--secrets-key-file FILE`, or put the `secrets.key` that \
             `berth pki init` wrote into its DATA_DIR/pki/ (every master needs the same one), and restart it"
                .to_string()
        })
    }

    /// The data key from the replicated state, opened with the KEK; None when there is none yet.
    fn load_data_key(&self, reader: &KvReader) -> Result<Option<[u8; 32]>, String> {
        if let Some(k) = *self.data_key.lock().expect("data key lock") {
            return Ok(Some(k));
        }
        let rec = objects::get::<DataKeyRecord>(reader, DATA_KEY.as_bytes()).map_err(|s| s.message().to_string())?;
        let Some(rec) = rec else { return Ok(None) };
        let kek = self.kek()?;
        if rec.obj.kek_id != kek.id {
            return Err(format!(
                "this master's secrets key (id {}) is not the one the cluster's data key was sealed with (id {}): \
                 every master needs the same secrets.key",
                kek.id, rec.obj.kek_id
            ));
        }
        let plain = open(&kek.key, b"berth data key v1", &rec.obj.nonce, &rec.obj.wrapped_key)
            .map_err(|_| "the cluster's data key does not open with this master's secrets key".to_string())?;
        let key: [u8; 32] = plain.try_into().map_err(|_| "the cluster's data key has the wrong length".to_string())?;
        *self.data_key.lock().expect("data key lock") = Some(key);
        Ok(Some(key))
    }

    /// The data key, made (and sealed under the KEK) by the first secret.
    async fn data_key(&self, ctx: &Ctx) -> Result<[u8; 32], Status> {
        for _ in 0..5 {
            if let Some(k) = self.load_data_key(&ctx.reader).map_err(Status::failed_precondition)? {
                return Ok(k);
            }
            let kek = self.kek().map_err(Status::failed_precondition)?;
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| Status::internal("the system's random number generator failed"))?;
            let (nonce, wrapped) = seal(&kek.key, b"berth data key v1", &key)?;
            let rec =
                DataKeyRecord { wrapped_key: wrapped, nonce, kek_id: kek.id.clone(), created_at_ms: objects::now_ms() };
            let txn = objects::txn_of(vec![objects::cas_put(DATA_KEY.into(), 0, rec.encode_to_vec())]);
            match ctx.write(Command::Txn(txn)).await? {
                CommandResult::Txn(t) if t.succeeded => info!(kek = %kek.id, "made the cluster's data key for secrets"),
                // Another master made one first: read it back.
                _ => {}
            }
            ctx.read_barrier().await?;
        }
        Err(Status::unavailable("the cluster's data key could not be made; try again"))
    }
}

fn seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Status> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Status::internal("the system's random number generator failed"))?;
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| Status::internal("bad key length"))?);
    let mut data = plain.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut data)
        .map_err(|_| Status::internal("sealing failed"))?;
    Ok((nonce.to_vec(), data))
}

fn open(key: &[u8; 32], aad: &[u8], nonce: &[u8], sealed: &[u8]) -> Result<Vec<u8>, ()> {
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| ())?;
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| ())?);
    let mut data = sealed.to_vec();
    let plain = key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut data).map_err(|_| ())?;
    Ok(plain.to_vec())
}

/// What a sealed version is bound to.
fn aad(ns: &str, name: &str, version: u64) -> Vec<u8> {
    format!("berth secret {ns}/{name}@{version}").into_bytes()
}

pub(crate) fn kind_of(k: i32) -> Result<FileKind, Status> {
    match PbFileKind::try_from(k) {
        Ok(PbFileKind::Secret) => Ok(FileKind::Secret),
        Ok(PbFileKind::Config) => Ok(FileKind::Config),
        _ => Err(Status::invalid_argument("kind must be secret or config")),
    }
}

fn pb_kind(k: FileKind) -> i32 {
    match k {
        FileKind::Secret => PbFileKind::Secret as i32,
        FileKind::Config => PbFileKind::Config as i32,
    }
}

pub(crate) fn file_key(kind: FileKind, ns: &str, name: &str) -> Vec<u8> {
    let prefix = match kind {
        FileKind::Secret => SECRETS_PREFIX,
        FileKind::Config => CONFIGS_PREFIX,
    };
    format!("{prefix}{ns}/{name}").into_bytes()
}

/// The key of a file in `ServiceRecord.file_versions`: `secret/NAME` or `config/NAME`.
pub(crate) fn version_key(kind: FileKind, name: &str) -> String {
    format!("{kind}/{name}")
}

/// The secrets and configs a service's spec mounts, once each.
pub(crate) fn mounted(svc: &Service) -> Vec<(FileKind, &str)> {
    let t = &svc.spec.task;
    let mut out: Vec<(FileKind, &str)> = t
        .secrets
        .iter()
        .map(|f| (FileKind::Secret, f.source.as_str()))
        .chain(t.configs.iter().map(|f| (FileKind::Config, f.source.as_str())))
        .chain(t.image_pull_secret.iter().map(|s| (FileKind::Secret, s.as_str())))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The current version of every secret and config `svc` mounts, for its record; a missing one
/// is the caller's error.
pub(crate) fn resolve_versions(reader: &KvReader, svc: &Service) -> Result<BTreeMap<String, u64>, Status> {
    let ns = &svc.metadata.namespace;
    let mut out = BTreeMap::new();
    for (kind, name) in mounted(svc) {
        let Some(rec) = objects::get::<FileRecord>(reader, &file_key(kind, ns, name))? else {
            return Err(Status::failed_precondition(format!(
                "service {ns}/{}: {kind} `{name}` does not exist in namespace {ns}; create it first with \
                 `berth {kind} create {name} --from-file FILE`",
                svc.metadata.name
            )));
        };
        out.insert(version_key(kind, name), rec.obj.version);
    }
    Ok(out)
}

/// The files a task of `svc` mounts, at the versions its record names.
pub(crate) fn task_files(svc: &Service, versions: &BTreeMap<String, u64>) -> Vec<TaskFile> {
    let t = &svc.spec.task;
    let mut files: Vec<TaskFile> = [(FileKind::Secret, &t.secrets), (FileKind::Config, &t.configs)]
        .into_iter()
        .flat_map(|(kind, list)| {
            list.iter().map(move |f| TaskFile {
                kind,
                name: f.source.clone(),
                version: versions.get(&version_key(kind, &f.source)).copied().unwrap_or(0),
                target: f.target_path(),
                mode: f.mode_bits(kind),
            })
        })
        .collect();
    // An oci task's registry credentials travel like a secret it mounts, with no target: the
    // agent uses them for the pull and never writes them into the task.
    if let Some(name) = &t.image_pull_secret {
        files.push(TaskFile {
            kind: FileKind::Secret,
            name: name.clone(),
            version: versions.get(&version_key(FileKind::Secret, name)).copied().unwrap_or(0),
            target: String::new(),
            mode: 0o400,
        });
    }
    files
}

/// The contents of a task's files, opened for its node. Errors name the file, never its data.
pub(crate) fn contents(ctx: &Ctx, ns: &str, files: &[TaskFile]) -> Result<Vec<FileData>, String> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let rec = objects::get::<FileRecord>(&ctx.reader, &file_key(f.kind, ns, &f.name))
            .map_err(|s| s.message().to_string())?
            .ok_or_else(|| format!("{} {ns}/{} no longer exists", f.kind, f.name))?;
        let v = rec.obj.versions.iter().find(|v| v.version == f.version).ok_or_else(|| {
            format!(
                "{} {ns}/{} version {} is no longer kept (the newest {KEEP_VERSIONS} are)",
                f.kind, f.name, f.version
            )
        })?;
        let data = match f.kind {
            FileKind::Config => v.data.clone(),
            FileKind::Secret => {
                let key = ctx
                    .secrets
                    .load_data_key(&ctx.reader)?
                    .ok_or_else(|| "the cluster has no data key for secrets".to_string())?;
                open(&key, &aad(ns, &f.name, f.version), &v.nonce, &v.data)
                    .map_err(|_| format!("secret {ns}/{} version {} does not open", f.name, f.version))?
            }
        };
        out.push(FileData { id: f.id(), data });
    }
    Ok(out)
}

/// The plaintext of a record's newest version (for an unchanged-value check).
fn newest_plain(ctx: &Ctx, kind: FileKind, rec: &FileRecord) -> Option<Vec<u8>> {
    let v = rec.versions.last()?;
    match kind {
        FileKind::Config => Some(v.data.clone()),
        FileKind::Secret => {
            let key = ctx.secrets.load_data_key(&ctx.reader).ok()??;
            open(&key, &aad(&rec.namespace, &rec.name, v.version), &v.nonce, &v.data).ok()
        }
    }
}

/// Service records in `ns` whose spec mounts `kind/name` (deleting ones too: `put` skips them).
fn users(reader: &KvReader, kind: FileKind, ns: &str, name: &str) -> Result<Vec<Versioned<ServiceRecord>>, Status> {
    let mut out = Vec::new();
    for rec in objects::list::<ServiceRecord>(reader, &format!("{SERVICES_PREFIX}{ns}/"))? {
        let Ok(svc) = serde_json::from_str::<Service>(&rec.obj.spec_json) else { continue };
        if mounted(&svc).contains(&(kind, name)) {
            out.push(rec);
        }
    }
    Ok(out)
}

/// For every `kind` file, the services that mount it: `(namespace, name)` -> service names,
/// from one read of the service records.
fn users_by_file(reader: &KvReader, kind: FileKind) -> Result<BTreeMap<(String, String), Vec<String>>, Status> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for rec in objects::list::<ServiceRecord>(reader, SERVICES_PREFIX)? {
        let Ok(svc) = serde_json::from_str::<Service>(&rec.obj.spec_json) else { continue };
        for (k, name) in mounted(&svc) {
            if k == kind {
                out.entry((rec.obj.namespace.clone(), name.to_string())).or_default().push(rec.obj.name.clone());
            }
        }
    }
    Ok(out)
}

fn view(kind: FileKind, rec: &FileRecord, services: Vec<String>, rolled: Vec<String>) -> FileView {
    FileView {
        kind: pb_kind(kind),
        namespace: rec.namespace.clone(),
        name: rec.name.clone(),
        version: rec.version,
        size_bytes: rec.versions.last().map_or(0, |v| v.size_bytes),
        created_at_ms: rec.created_at_ms,
        updated_at_ms: rec.updated_at_ms,
        services,
        labels: rec.labels.clone(),
        rolled,
    }
}

/// `berth secret|config create|update`: a new record, or a new version that rolls every
/// service mounting it (health-gated by their update settings, as any update).
pub(crate) async fn put(ctx: &Ctx, r: PutFileRequest) -> Result<FileView, Status> {
    let kind = kind_of(r.kind)?;
    let ns = if r.namespace.is_empty() { spec::DEFAULT_NAMESPACE.to_string() } else { r.namespace.clone() };
    let name = r.name.as_str();
    if !volume::is_file_name(name) {
        return Err(Status::invalid_argument(format!(
            "invalid {kind} name {name:?}; allowed: {}",
            volume::FILE_NAME_ALLOWED
        )));
    }
    if r.data.is_empty() {
        return Err(Status::invalid_argument(format!("the {kind} is empty; give it a non-empty file")));
    }
    if r.data.len() > volume::MAX_FILE_BYTES {
        return Err(Status::invalid_argument(format!(
            "the {kind} is {} bytes; the most is {} KiB",
            r.data.len(),
            volume::MAX_FILE_BYTES / 1024
        )));
    }
    if kind == FileKind::Secret {
        // Fails early, before anything is written, on a master without the key.
        ctx.secrets.kek().map_err(Status::failed_precondition)?;
    }
    let key = file_key(kind, &ns, name);
    for _ in 0..5 {
        ctx.read_barrier().await?;
        let existing = objects::get::<FileRecord>(&ctx.reader, &key)?;
        match (&existing, r.create) {
            (Some(e), true) => {
                return Err(Status::already_exists(format!(
                    "{kind} {ns}/{name} already exists (version {}); give it a new value with `berth {kind} update \
                     {name} --from-file FILE`",
                    e.obj.version
                )));
            }
            (None, false) => {
                return Err(Status::not_found(format!(
                    "no {kind} {ns}/{name}: create it with `berth {kind} create {name} --from-file FILE`"
                )));
            }
            _ => {}
        }
        let now = objects::now_ms();
        if let Some(e) = &existing
            && newest_plain(ctx, kind, &e.obj).is_some_and(|p| p == r.data)
        {
            let services = users(&ctx.reader, kind, &ns, name)?.into_iter().map(|s| s.obj.name).collect();
            return Ok(view(kind, &e.obj, services, vec![]));
        }
        let version = existing.as_ref().map_or(1, |e| e.obj.version + 1);
        let (nonce, data) = match kind {
            FileKind::Config => (Vec::new(), r.data.clone()),
            FileKind::Secret => {
                let dek = ctx.secrets.data_key(ctx).await?;
                seal(&dek, &aad(&ns, name, version), &r.data)?
            }
        };
        let mut rec = existing.as_ref().map(|e| e.obj.clone()).unwrap_or(FileRecord {
            namespace: ns.clone(),
            name: name.to_string(),
            created_at_ms: now,
            ..Default::default()
        });
        rec.version = version;
        rec.updated_at_ms = now;
        if !r.labels.is_empty() {
            rec.labels = r.labels.clone();
        }
        rec.versions.push(FileVersion { version, data, nonce, size_bytes: r.data.len() as u64, created_at_ms: now });
        let excess = rec.versions.len().saturating_sub(KEEP_VERSIONS);
        rec.versions.drain(..excess);
        let mut parts =
            vec![objects::cas_put(key.clone(), existing.as_ref().map_or(0, |e| e.mod_revision), rec.encode_to_vec())];
        let mut rolled = Vec::new();
        let mut services = Vec::new();
        for s in users(&ctx.reader, kind, &ns, name)? {
            services.push(s.obj.name.clone());
            if s.obj.deleting {
                continue;
            }
            let mut n = s.obj.clone();
            n.previous_spec_json = n.spec_json.clone();
            n.previous_file_versions = n.file_versions.clone();
            n.file_versions.insert(version_key(kind, name), version);
            n.previous_version = n.version;
            n.version += 1;
            n.updated_at_ms = now;
            n.rollout = Some(berth_api::pb::Rollout {
                state: berth_api::pb::RolloutState::Updating as i32,
                message: format!("rolling out version {}: {kind} {name} changed to version {version}", n.version),
                started_at_ms: now,
                updated_at_ms: 0,
                failures: 0,
            });
            parts.push(objects::cas_put(tasks::service_key(&ns, &n.name), s.mod_revision, n.encode_to_vec()));
            rolled.push(n.name.clone());
        }
        match ctx.write(Command::Txn(objects::txn_of(parts))).await? {
            CommandResult::Txn(t) if t.succeeded => {
                info!(kind = %kind, name = %format!("{ns}/{name}"), version, rolled = ?rolled, "{kind} stored");
                return Ok(view(kind, &rec, services, rolled));
            }
            // The record or a service changed meanwhile: read again.
            _ => continue,
        }
    }
    Err(Status::aborted(format!("{kind} {ns}/{name} kept changing while it was being written; run the command again")))
}

/// `berth secret|config ls`.
pub(crate) fn list(reader: &KvReader, kind: FileKind, ns: &str) -> Result<Vec<FileView>, Status> {
    let prefix = String::from_utf8(file_key(kind, ns, "")).unwrap_or_default();
    let prefix = if ns.is_empty() { prefix.trim_end_matches('/').to_string() + "/" } else { prefix };
    let mut by_file = users_by_file(reader, kind)?;
    Ok(objects::list::<FileRecord>(reader, &prefix)?
        .into_iter()
        .map(|rec| {
            let services = by_file.remove(&(rec.obj.namespace.clone(), rec.obj.name.clone())).unwrap_or_default();
            view(kind, &rec.obj, services, vec![])
        })
        .collect())
}

/// Tasks that have not ended and mount `kind/name` of `ns`.
fn task_users(reader: &KvReader, kind: FileKind, ns: &str, name: &str) -> Result<Vec<Task>, Status> {
    let mut out = Vec::new();
    for t in objects::list::<Task>(reader, TASKS_PREFIX)? {
        let t = t.obj;
        if t.namespace != ns || tasks::is_terminal(tasks::state_of(&t)) {
            continue;
        }
        let Ok(rs) = RunSpec::decode(&t.run_spec) else { continue };
        if rs.files.iter().any(|f| f.kind == kind && f.name == name) {
            out.push(t);
        }
    }
    Ok(out)
}

/// `berth secret|config rm`: refused while a service mounts it or a task that does still runs.
pub(crate) async fn delete(ctx: &Ctx, kind: FileKind, ns: &str, name: &str) -> Result<FileView, Status> {
    let ns = if ns.is_empty() { spec::DEFAULT_NAMESPACE } else { ns };
    ctx.read_barrier().await?;
    let key = file_key(kind, ns, name);
    let rec = objects::get::<FileRecord>(&ctx.reader, &key)?
        .ok_or_else(|| Status::not_found(format!("no {kind} {ns}/{name}: list them with `berth {kind} ls`")))?;
    let services: Vec<String> = users(&ctx.reader, kind, ns, name)?.into_iter().map(|s| s.obj.name).collect();
    if !services.is_empty() {
        return Err(Status::failed_precondition(format!(
            "{kind} {ns}/{name} is mounted by service{} {}; remove it from their spec.task.{kind}s and apply them, \
             or delete them, first",
            if services.len() == 1 { "" } else { "s" },
            services.join(", ")
        )));
    }
    if kind == FileKind::Secret {
        let routes = crate::routes::routes_using_secret(&ctx.reader, ns, name)?;
        if !routes.is_empty() {
            return Err(Status::failed_precondition(format!(
                "secret {ns}/{name} holds the certificate of route{} {}; give them another secret (or no TLS) \
                 and apply them, or delete them, first",
                if routes.len() == 1 { "" } else { "s" },
                routes.join(", ")
            )));
        }
    }
    let running: Vec<String> = task_users(&ctx.reader, kind, ns, name)?.into_iter().map(|t| t.id).collect();
    if !running.is_empty() {
        return Err(Status::failed_precondition(format!(
            "{kind} {ns}/{name} is still mounted by task{} {}; wait for them to stop",
            if running.len() == 1 { "" } else { "s" },
            running.join(", ")
        )));
    }
    let txn = objects::txn_of(vec![objects::cas_delete(key, rec.mod_revision)]);
    match ctx.write(Command::Txn(txn)).await? {
        CommandResult::Txn(t) if t.succeeded => {
            info!(kind = %kind, name = %format!("{ns}/{name}"), "{kind} deleted");
            Ok(view(kind, &rec.obj, vec![], vec![]))
        }
        _ => Err(Status::aborted(format!(
            "{kind} {ns}/{name} changed while it was being deleted; run the command again"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_its_name() {
        let key = [7u8; 32];
        let (nonce, sealed) = seal(&key, &aad("default", "db", 1), b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"), "the value is not in the sealed bytes");
        assert_eq!(open(&key, &aad("default", "db", 1), &nonce, &sealed).unwrap(), b"hunter2");
        assert!(open(&[8u8; 32], &aad("default", "db", 1), &nonce, &sealed).is_err(), "another key");
        assert!(open(&key, &aad("default", "db", 2), &nonce, &sealed).is_err(), "another version");
        assert!(open(&key, &aad("other", "db", 1), &nonce, &sealed).is_err(), "another name");
    }

    #[test]
    fn a_key_file_holds_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        let kek = Kek::load(&path).unwrap();
        assert_eq!(kek.key, [0xab; 32]);
        assert_eq!(kek.id.len(), 16);
        assert!(!format!("{kek:?}").contains("abab"), "Debug never shows the key");
        std::fs::write(&path, "not hex").unwrap();
        assert!(Kek::load(&path).unwrap_err().contains("64 hex digits"));
        std::fs::write(&path, "abcd").unwrap();
        assert!(Kek::load(&path).unwrap_err().contains("32 bytes"));
    }

    #[test]
    fn task_files_carry_the_recorded_versions_and_default_targets() {
        let svc: Service = spec::parse_documents(
            "kind: Service\nmetadata: {name: db}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    command: [sh]\n    \
             secrets: [pw, {source: tls, target: /etc/tls.key, mode: 0440}]\n    configs: [{source: conf, target: /etc/app.conf}]\n",
        )
        .unwrap()
        .remove(0);
        let versions: BTreeMap<String, u64> = [("secret/pw".to_string(), 3), ("config/conf".to_string(), 2)].into();
        let files = task_files(&svc, &versions);
        assert_eq!(files[0].target, "/run/secrets/pw");
        assert_eq!((files[0].version, files[0].mode), (3, 0o400));
        assert_eq!((files[1].target.as_str(), files[1].mode), ("/etc/tls.key", 0o440));
        assert_eq!((files[2].kind, files[2].version, files[2].mode), (FileKind::Config, 2, 0o444));
        assert_eq!(files[0].id(), "secret/pw@3");
        assert_eq!(
            mounted(&svc),
            vec![(FileKind::Secret, "pw"), (FileKind::Secret, "tls"), (FileKind::Config, "conf")]
        );
    }
}
