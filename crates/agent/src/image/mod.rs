//! The node's images for `runtime: oci` tasks: pulled from OCI registries with the distribution
//! API (`oci-client`), stored once per node by content, and turned into each task's root
//! filesystem with overlayfs.
//!
//! Layout under the agent's data directory (`images/`):
//!
//! | path | content |
//! |---|---|
//! | `layers/<sha256 hex>/` | one layer, unpacked for overlayfs (whiteouts converted), by the digest of its blob |
//! | `manifests/<sha256 hex>.json` | an image: its manifest digest, layers (bottom first), config, size, last use |
//! | `refs.json` | image reference (`registry/repo:tag` or `...@sha256:...`) -> manifest digest |
//! | `tmp/` | blobs being downloaded and layers being unpacked (renamed into place when whole) |
//!
//! A layer or image is written under a temporary name and renamed, so a crash leaves no half
//! layer. Digests are verified: every blob against its descriptor (by `oci-client`), the
//! manifest against the reference's digest when it names one.
//!
//! Pull policy: a reference already present is not pulled again (as the docker runtime and
//! Kubernetes' `IfNotPresent`); pin by digest to be exact. Registries on loopback addresses are
//! spoken to over plain HTTP (as Docker does); others over HTTPS unless the agent lists them in
//! `--insecure-registry`.

mod cluster;
mod import;
pub mod unpack;

pub use cluster::ClusterSource;
pub use import::{Archive, ArchivedImage, ArchivedLayer, read_archive};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// What an image's config says about how to run it (the parts berth uses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `NAME=value` pairs.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    pub media_type: String,
    /// The blob's size in bytes.
    pub size: u64,
}

/// An image on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference it was first stored under.
    pub reference: String,
    /// `sha256:<hex>` of its manifest.
    pub digest: String,
    /// Bottom first.
    pub layers: Vec<Layer>,
    pub config: ImageConfig,
    /// Bytes of its unpacked layers.
    pub size: u64,
    pub pulled_at_ms: i64,
    pub last_used_ms: i64,
}

impl ImageRecord {
    /// An image just stored (pulled or imported) from its layers and its config document.
    fn stored(
        reference: &str,
        digest: &str,
        layers: Vec<Layer>,
        config_json: &str,
        size: u64,
    ) -> Result<ImageRecord, String> {
        let now = crate::driver::now_ms();
        Ok(ImageRecord {
            reference: reference.to_string(),
            digest: digest.to_string(),
            layers,
            config: parse_config(config_json)?,
            size,
            pulled_at_ms: now,
            last_used_ms: now,
        })
    }
}

/// Registry credentials.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl Credentials {
    /// Credentials from a secret's contents: `{"username": ..., "password": ...}` (JSON) or
    /// `username:password`.
    pub fn parse(bytes: &[u8]) -> Result<Credentials, String> {
        #[derive(Deserialize)]
        struct Json {
            username: String,
            password: String,
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "the registry credentials are not UTF-8 text".to_string())?;
        if let Ok(j) = serde_json::from_str::<Json>(text) {
            return Ok(Credentials { username: j.username, password: j.password });
        }
        match text.trim_end_matches(['\n', '\r']).split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials { username: u.into(), password: p.into() }),
            _ => Err("the registry credentials secret must hold `username:password` or \
                 {\"username\": ..., \"password\": ...}"
                .into()),
        }
    }
}

/// Where a missing image comes from.
pub enum Source<'a> {
    /// Its registry, with these credentials if any.
    Registry(Option<&'a Credentials>),
    /// The masters (`berth image import`), over the session's connection.
    Cluster(&'a berth_api::pb::agent::ClusterImage, &'a ClusterSource),
}

/// The node's image store. Cheap to clone.
#[derive(Clone)]
pub struct Images {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// Registries (`host:port`) spoken to over plain HTTP besides loopback ones.
    insecure: Vec<String>,
    /// Store past this many bytes: unused images are removed, least recently used first.
    gc_threshold: u64,
    /// One pull per reference at a time (others wait and then find it stored).
    pulls: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `refs.json` and records are rewritten under this.
    meta: Mutex<()>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images").field("root", &self.inner.root).finish()
    }
}

/// How stale an image's recorded last use may get before a start records it again.
const LAST_USED_PRECISION_MS: i64 = 60_000;

/// The default `--image-gc-threshold`: 10 GiB.
pub const DEFAULT_GC_THRESHOLD: u64 = 10 << 30;

impl Images {
    /// A store at `root` (created on first use).
    pub fn new(root: PathBuf, insecure: Vec<String>, gc_threshold: u64) -> Images {
        Images {
            inner: Arc::new(Inner {
                root,
                insecure,
                gc_threshold,
                pulls: Mutex::new(HashMap::new()),
                meta: Mutex::new(()),
            }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The unpacked directory of a layer.
    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.inner.root.join("layers").join(hex_of(digest))
    }

    /// The layer directories of `image` for overlayfs's `lowerdir`: topmost first.
    pub fn lower_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        image.layers.iter().rev().map(|l| self.layer_dir(&l.digest)).collect()
    }

    /// The image stored under `reference`, if any.
    pub fn get(&self, reference: &str) -> Option<ImageRecord> {
        let key = normalize(reference).ok()?;
        let digest = self.refs().get(&key)?.clone();
        self.record(&digest)
    }

    /// Every image on this node.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut v: Vec<ImageRecord> = std::fs::read_dir(self.inner.root.join("manifests"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        v.sort_by(|a: &ImageRecord, b| a.reference.cmp(&b.reference));
        v
    }

    /// The image `reference`, pulled when it is not stored yet. `progress` hears what the pull
    /// is doing (for the task's status). Marks the image used now.
    pub async fn ensure(
        &self,
        reference: &str,
        auth: Option<&Credentials>,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<ImageRecord, String> {
        self.ensure_from(reference, Source::Registry(auth), progress).await
    }

    /// [`Images::ensure`] from `source`. An image the cluster holds replaces one stored under
    /// the same reference with another digest (the operator imported it on purpose).
    pub async fn ensure_from(
        &self,
        reference: &str,
        source: Source<'_>,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<ImageRecord, String> {
        let key = normalize(reference)?;
        let lock = {
            let mut pulls = self.inner.pulls.lock().expect("pulls lock");
            pulls.entry(key.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(mut rec) = self.get(&key)
            && !matches!(source, Source::Cluster(img, _) if img.digest != rec.digest)
        {
            // For garbage collection's "least recently used": a minute's precision is plenty,
            // and spares every start a synced write.
            let now = crate::driver::now_ms();
            if now - rec.last_used_ms > LAST_USED_PRECISION_MS {
                rec.last_used_ms = now;
                self.write_record(&rec)?;
            }
            return Ok(rec);
        }
        let rec = match source {
            Source::Registry(auth) => self.pull(&key, auth, progress).await?,
            Source::Cluster(img, from) => self.load_from_cluster(&key, img, from, progress).await?,
        };
        self.gc(&BTreeSet::from([rec.digest.clone()]));
        Ok(rec)
    }

    async fn pull(
        &self,
        key: &str,
        auth: Option<&Credentials>,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<ImageRecord, String> {
        let reference: Reference = key.parse().map_err(|e| format!("image {key:?} is not a valid reference: {e}"))?;
        let registry = reference.resolve_registry().to_string();
        let client = self.client(&registry);
        let auth = match auth {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let hint = |e: &dyn std::fmt::Display| {
            format!(
                "pulling image {key} from {registry} failed: {e}; check the image name and tag (or digest), that the \
                 registry is reachable, and its credentials (spec.task.image_pull_secret)"
            )
        };
        progress(format!("pulling image {key}: manifest"));
        let (manifest, digest, config) =
            client.pull_manifest_and_config(&reference, &auth).await.map_err(|e| hint(&e))?;
        if let Some(want) = reference.digest()
            && want != digest
        {
            return Err(format!(
                "pulling image {key}: the registry served manifest {digest}, not the {want} the reference names; \
                 refusing it"
            ));
        }
        let layers = layers_of(&manifest)?;
        let total: u64 = layers.iter().map(|l| l.size).sum();
        let mut size = 0;
        let mut fetched = 0u64;
        for (i, layer) in layers.iter().enumerate() {
            progress(format!(
                "pulling image {key}: layer {}/{} ({} of {} fetched)",
                i + 1,
                layers.len(),
                human(fetched),
                human(total)
            ));
            size += self.fetch_layer(&client, &reference, layer, &hint).await?;
            fetched += layer.size;
        }
        progress(format!("pulled image {key}: {} layers, {}", layers.len(), human(total)));
        let rec = ImageRecord::stored(key, &digest, layers, &config, size)?;
        self.write_record(&rec)?;
        self.set_ref(key, &digest)?;
        info!(image = key, %digest, size, "image pulled");
        Ok(rec)
    }

    /// Downloads and unpacks one layer unless it is stored; its unpacked size.
    async fn fetch_layer(
        &self,
        client: &Client,
        reference: &Reference,
        layer: &Layer,
        hint: &(dyn Fn(&dyn std::fmt::Display) -> String + Send + Sync),
    ) -> Result<u64, String> {
        let dir = self.layer_dir(&layer.digest);
        if dir.is_dir() {
            return Ok(dir_size(&dir));
        }
        let compression = unpack::Compression::of_media_type(&layer.media_type)?;
        let tmp = self.inner.root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| format!("creating {} failed: {e}", tmp.display()))?;
        let blob = temp_blob(&tmp, &layer.digest)?;
        let file = tokio::fs::File::create(&blob)
            .await
            .map_err(|e| format!("creating {} failed: {e}; check free space", blob.display()))?;
        let descriptor = oci_client::manifest::OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size as i64,
            ..Default::default()
        };
        // oci-client checks the blob against its digest as it streams.
        if let Err(e) = client.pull_blob(reference, &descriptor, file).await {
            let _ = std::fs::remove_file(&blob);
            return Err(hint(&e));
        }
        let (store, digest, b) = (self.clone(), layer.digest.clone(), blob.to_path_buf());
        let stored = tokio::task::spawn_blocking(move || store.store_unpacked(&digest, &b, compression))
            .await
            .map_err(|e| format!("unpacking a layer failed: {e}"))
            .and_then(|r| r);
        let _ = std::fs::remove_file(&blob);
        stored.map(|dir| dir_size(&dir))
    }

    /// Unpacks the layer blob at `blob` into the store as `digest`: under a temporary name,
    /// renamed into place when whole (a copy another pull or import stored first is kept).
    /// The layer's directory.
    fn store_unpacked(&self, digest: &str, blob: &Path, compression: unpack::Compression) -> Result<PathBuf, String> {
        let dir = self.layer_dir(digest);
        if dir.is_dir() {
            return Ok(dir);
        }
        let stamp = format!("{}-{}", std::process::id(), crate::driver::now_ms());
        let unpacked = self.inner.root.join("tmp").join(format!("{}.{stamp}.layer", hex_of(digest)));
        let result = std::fs::create_dir_all(&unpacked)
            .map_err(|e| format!("creating {} failed: {e}", unpacked.display()))
            .and_then(|()| std::fs::File::open(blob).map_err(|e| format!("opening {} failed: {e}", blob.display())))
            .and_then(|f| unpack::unpack(std::io::BufReader::new(f), compression, &unpacked));
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&unpacked);
            return Err(format!("unpacking layer {digest} failed: {e}"));
        }
        std::fs::create_dir_all(self.inner.root.join("layers"))
            .map_err(|e| format!("creating the layers dir failed: {e}"))?;
        match std::fs::rename(&unpacked, &dir) {
            Ok(()) => Ok(dir),
            Err(_) if dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&unpacked);
                Ok(dir)
            }
            Err(e) => Err(format!("storing layer {digest} failed: {e}")),
        }
    }

    fn client(&self, registry: &str) -> Client {
        let plain = is_loopback(registry) || self.inner.insecure.iter().any(|r| r == registry);
        let protocol =
            if plain { oci_client::client::ClientProtocol::Http } else { oci_client::client::ClientProtocol::Https };
        Client::new(oci_client::client::ClientConfig { protocol, ..Default::default() })
    }

    /// Removes images no task uses (`in_use`: manifest digests) while the store is larger than
    /// the threshold, least recently used first, then every layer no image needs.
    pub fn gc(&self, in_use: &BTreeSet<String>) -> Vec<String> {
        let mut images = self.list();
        let mut total: u64 = images.iter().map(|i| i.size).sum();
        let mut removed = Vec::new();
        if total > self.inner.gc_threshold {
            images.sort_by_key(|i| i.last_used_ms);
            let candidates: Vec<ImageRecord> = images.iter().filter(|i| !in_use.contains(&i.digest)).cloned().collect();
            for img in candidates {
                if total <= self.inner.gc_threshold {
                    break;
                }
                if self.forget(&img.digest).is_ok() {
                    total = total.saturating_sub(img.size);
                    removed.push(img.reference.clone());
                    images.retain(|i| i.digest != img.digest);
                }
            }
        }
        let needed: BTreeSet<String> = images.iter().flat_map(|i| i.layers.iter().map(|l| hex_of(&l.digest))).collect();
        for e in std::fs::read_dir(self.inner.root.join("layers")).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !needed.contains(&name)
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                warn!(layer = %name, "removing an unused layer failed: {err}");
            }
        }
        if !removed.is_empty() {
            info!(?removed, "images garbage-collected");
        }
        removed
    }

    /// Removes an image's record and every reference to it (its layers go in the next `gc`).
    fn forget(&self, digest: &str) -> Result<(), String> {
        let _meta = self.inner.meta.lock().expect("meta lock");
        let mut refs = self.refs();
        refs.retain(|_, d| d != digest);
        self.write_refs(&refs)?;
        std::fs::remove_file(self.record_path(digest)).map_err(|e| format!("removing image {digest} failed: {e}"))
    }

    fn refs(&self) -> BTreeMap<String, String> {
        std::fs::read(self.inner.root.join("refs.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write_refs(&self, refs: &BTreeMap<String, String>) -> Result<(), String> {
        write_json(&self.inner.root.join("refs.json"), refs)
    }

    fn set_ref(&self, key: &str, digest: &str) -> Result<(), String> {
        let _meta = self.inner.meta.lock().expect("meta lock");
        let mut refs = self.refs();
        refs.insert(key.to_string(), digest.to_string());
        self.write_refs(&refs)
    }

    fn record_path(&self, digest: &str) -> PathBuf {
        self.inner.root.join("manifests").join(format!("{}.json", hex_of(digest)))
    }

    fn record(&self, digest: &str) -> Option<ImageRecord> {
        std::fs::read(self.record_path(digest)).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }

    fn write_record(&self, rec: &ImageRecord) -> Result<(), String> {
        write_json(&self.record_path(&rec.digest), rec)
    }
}

/// A reference in its full form (`docker.io/library/busybox:latest`, or the registry and
/// repository given), so two spellings of one image share a record.
pub fn normalize(reference: &str) -> Result<String, String> {
    let r: Reference =
        reference.trim().parse().map_err(|e| format!("image {reference:?} is not a valid image reference: {e}"))?;
    Ok(r.whole())
}

/// Whether a registry address is on a loopback address (`127.0.0.1:5000`, `localhost:5000`,
/// `[::1]:5000`).
fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, p)| if p.parse::<u16>().is_ok() { h } else { registry });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn layers_of(manifest: &OciImageManifest) -> Result<Vec<Layer>, String> {
    if manifest.layers.is_empty() {
        return Err("the image has no layers".into());
    }
    Ok(manifest
        .layers
        .iter()
        .map(|d| Layer { digest: d.digest.clone(), media_type: d.media_type.clone(), size: d.size.max(0) as u64 })
        .collect())
}

/// The runnable parts of an image config (`config` of the OCI image configuration).
fn parse_config(json: &str) -> Result<ImageConfig, String> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct Run {
        #[serde(default)]
        entrypoint: Option<Vec<String>>,
        #[serde(default)]
        cmd: Option<Vec<String>>,
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
    }
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        config: Option<Run>,
    }
    let c: Config = serde_json::from_str(json).map_err(|e| format!("the image's config does not parse: {e}"))?;
    let r = c.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: r.entrypoint.unwrap_or_default(),
        cmd: r.cmd.unwrap_or_default(),
        env: r.env.unwrap_or_default(),
        working_dir: r.working_dir.filter(|w| !w.is_empty()),
    })
}

/// The hex part of `sha256:<hex>`.
fn hex_of(digest: &str) -> String {
    digest.rsplit(':').next().unwrap_or(digest).to_string()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("creating {} failed: {e}", parent.display()))?;
    }
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    crate::driver::process::write_atomic(path, &bytes).map_err(|e| format!("writing {} failed: {e}", path.display()))
}

/// A fresh file under `tmp` for a blob being fetched: a unique name (two fetches of one layer
/// never share a file), removed when dropped (also when the fetch's future is).
fn temp_blob(tmp: &Path, digest: &str) -> Result<tempfile::TempPath, String> {
    tempfile::Builder::new()
        .prefix(&format!("{}.", hex_of(digest)))
        .suffix(".blob")
        .tempfile_in(tmp)
        .map(tempfile::NamedTempFile::into_temp_path)
        .map_err(|e| format!("creating a file under {} failed: {e}; check free space", tmp.display()))
}

/// Bytes of the regular files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

fn human(bytes: u64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    format!("{:.1} MiB", bytes as f64 / MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize() {
        assert_eq!(normalize("busybox").unwrap(), "docker.io/library/busybox:latest");
        assert_eq!(normalize("127.0.0.1:5000/berth-test/busybox:1").unwrap(), "127.0.0.1:5000/berth-test/busybox:1");
        assert!(normalize("Bad Image").is_err());
    }

    /// The masters find a task's imported image by `berth_types::image::normalize_reference`;
    /// the node keeps it under this one (oci-client's): they must agree.
    #[test]
    fn the_masters_normalize_references_as_the_node_does() {
        let d = format!("sha256:{}", "0123456789abcdef".repeat(4));
        for r in [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "me/app:v2".into(),
            "index.docker.io/me/app".into(),
            "docker.io/library/busybox:latest".into(),
            "127.0.0.1:5000/berth-test/busybox:1".into(),
            "localhost:5000/a/b/c:x_y.z-1".into(),
            "registry.example.com/team/app".into(),
            "localhost/app".into(),
            format!("reg.example:5000/app@{d}"),
            format!("busybox@{d}"),
            format!("busybox:1@{d}"),
        ] {
            assert_eq!(normalize(&r), berth_types::image::normalize_reference(&r), "{r}");
        }
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        assert!(is_loopback("127.0.0.1:5000") && is_loopback("localhost:5000") && is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example.com") && !is_loopback("198.18.0.1:5000"));
    }

    #[test]
    fn credentials_parse_both_ways() {
        let c = Credentials::parse(b"alice:s3cret\n").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "s3cret"));
        let c = Credentials::parse(br#"{"username": "bob", "password": "pw"}"#).unwrap();
        assert_eq!(c.username, "bob");
        assert!(Credentials::parse(b"nopassword").is_err());
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn configs_parse() {
        let c = parse_config(r#"{"config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "x"], "Env": ["PATH=/bin"], "WorkingDir": "/srv"}}"#).unwrap();
        assert_eq!(c.entrypoint, ["/bin/sh"]);
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(parse_config("{}").unwrap(), ImageConfig::default());
    }
}
