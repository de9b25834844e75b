//! The data dir's identity file: which master and which cluster the data belongs to.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{MasterConfig, MasterError};

pub const IDENTITY_FILE: &str = "member.json";
/// The data dir layout this build writes and the newest it can use.
pub const DATA_DIR_FORMAT: u32 = 1;

/// Makes the data dir private to this user (0700), creating it if needed. It holds the cluster
/// CA's key (in the replicated state and in `pki/`), the secrets key and RocksDB's files, which
/// RocksDB creates with the process umask: the directory's mode is what keeps them private. A
/// directory found wider is narrowed, with a warning saying what it was. Called at start and
/// then every minute, so that a later `chmod` does not stay.
pub fn secure_data_dir(dir: &Path) -> Result<(), MasterError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let bad = |reason: String| MasterError::DataDir { dir: dir.display().to_string(), reason };
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| bad(format!("cannot create it: {e}")))?;
    }
    let meta = fs::metadata(dir).map_err(|e| bad(format!("cannot read its mode: {e}")))?;
    if !meta.is_dir() {
        return Err(bad("it is not a directory".into()));
    }
    // This process's effective uid: the owner of its /proc entry.
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).map_err(|e| bad(format!("cannot read /proc/self: {e}")))?;
    if meta.uid() != uid {
        return Err(bad(format!(
            "it belongs to uid {}, and this master runs as uid {uid}: a data dir must be its own",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| bad(format!("its mode is {mode:o} and cannot be made 700: {e}")))?;
        tracing::warn!(dir = %dir.display(), "the data dir's mode was {mode:o}; made it 700 (it holds the cluster CA's key)");
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub format: u32,
    pub id: u64,
    pub listen: String,
    /// The founding members, when this data dir was founded with --initial-cluster.
    #[serde(default)]
    pub initial_cluster: Option<BTreeMap<u64, String>>,
}

impl Identity {
    fn path(dir: &Path) -> PathBuf {
        dir.join(IDENTITY_FILE)
    }

    pub fn load(dir: &Path) -> Result<Option<Identity>, MasterError> {
        let bad = |reason: String| MasterError::DataDir { dir: dir.display().to_string(), reason };
        let text = match fs::read_to_string(Self::path(dir)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(format!("cannot read {IDENTITY_FILE}: {e}"))),
        };
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe =
            serde_json::from_str(&text).map_err(|e| bad(format!("{IDENTITY_FILE} is not valid: {e}")))?;
        if probe.format > DATA_DIR_FORMAT {
            return Err(bad(format!(
                "it was written in data dir format {}, and this berth understands format {} at \
                 most: run a newer berth",
                probe.format, DATA_DIR_FORMAT
            )));
        }
        serde_json::from_str(&text).map(Some).map_err(|e| bad(format!("{IDENTITY_FILE} is not valid: {e}")))
    }

    /// Writes the identity durably (temp file, fsync, rename, fsync dir).
    pub fn store(&self, dir: &Path) -> Result<(), MasterError> {
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(self).expect("identity serializes").as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, Self::path(dir))?;
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// Reconciles the flags with what the data dir holds. Returns the identity to run with and
    /// whether this is the first start of the data dir.
    pub fn resolve(cfg: &MasterConfig) -> Result<(Identity, bool), MasterError> {
        let dir = &cfg.data_dir;
        let bad = |reason: String| MasterError::DataDir { dir: dir.display().to_string(), reason };
        match Self::load(dir)? {
            Some(mut existing) => {
                if let Some(id) = cfg.id
                    && id != existing.id
                {
                    return Err(bad(format!(
                        "it belongs to master {}, not master {id}: start with --id {} or use \
                         another --data-dir",
                        existing.id, existing.id
                    )));
                }
                if let Some(ic) = &cfg.initial_cluster
                    && existing.initial_cluster.as_ref() != Some(ic)
                {
                    return Err(bad(format!(
                        "it belongs to another cluster (founded with --initial-cluster {}): a \
                         restart needs only --data-dir; to found a new cluster use an empty \
                         --data-dir",
                        existing.initial_cluster.as_ref().map_or("<none: joined later>".to_string(), format_cluster)
                    )));
                }
                if let Some(listen) = cfg.listen
                    && listen.to_string() != existing.listen
                {
                    existing.listen = listen.to_string();
                    existing.store(dir)?;
                }
                Ok((existing, false))
            }
            None => {
                if dir.join("db").exists() {
                    return Err(bad(format!(
                        "it holds a database but no {IDENTITY_FILE}: it was not created by \
                         `berth master`, or the file was deleted; use an empty --data-dir"
                    )));
                }
                let id = cfg.id.ok_or_else(|| bad("it is empty, so this is a first start: --id is required".into()))?;
                if cfg.initial_cluster.is_none() && !cfg.join {
                    return Err(bad("it is empty, so this is a first start: give --initial-cluster to found a \
                         cluster, or --join to wait to be added with `berth member add`"
                        .into()));
                }
                let listen = match (cfg.listen, &cfg.initial_cluster) {
                    (Some(l), _) => l.to_string(),
                    (None, Some(ic)) => ic[&id].clone(),
                    (None, None) => return Err(bad("--listen is required with --join".into())),
                };
                let ident =
                    Identity { format: DATA_DIR_FORMAT, id, listen, initial_cluster: cfg.initial_cluster.clone() };
                ident.store(dir)?;
                Ok((ident, true))
            }
        }
    }
}

pub fn format_cluster(m: &BTreeMap<u64, String>) -> String {
    m.iter().map(|(id, ep)| format!("{id}={ep}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_data_dir_is_made_private_and_kept_so() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let fresh = root.path().join("a/b");
        secure_data_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        fs::set_permissions(&fresh, fs::Permissions::from_mode(0o755)).unwrap();
        secure_data_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let file = root.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(secure_data_dir(&file).unwrap_err().to_string().contains("not a directory"));
    }

    use super::*;
    use crate::parse_initial_cluster;

    #[test]
    fn refuses_wrong_id_and_foreign_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = MasterConfig::new(dir.path().to_path_buf());
        cfg.id = Some(1);
        cfg.initial_cluster = Some(parse_initial_cluster("1=127.0.0.1:1,2=127.0.0.1:2").unwrap());
        let (ident, first) = Identity::resolve(&cfg).unwrap();
        assert!(first);
        assert_eq!(ident.listen, "127.0.0.1:1");

        cfg.id = Some(2);
        let err = Identity::resolve(&cfg).unwrap_err().to_string();
        assert!(err.contains("belongs to master 1"), "{err}");

        cfg.id = Some(1);
        cfg.initial_cluster = Some(parse_initial_cluster("1=127.0.0.1:5").unwrap());
        let err = Identity::resolve(&cfg).unwrap_err().to_string();
        assert!(err.contains("another cluster"), "{err}");

        // A restart with only the data dir works.
        let restart = MasterConfig::new(dir.path().to_path_buf());
        assert!(!Identity::resolve(&restart).unwrap().1);
    }

    #[test]
    fn refuses_newer_format() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(IDENTITY_FILE), r#"{"format": 99, "id": 1, "listen": "x"}"#).unwrap();
        let err = Identity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("format 99"), "{err}");
    }
}
