//! Loading images from an archive instead of a registry, for air-gapped nodes: a `docker save`
//! archive (its `manifest.json`, in both the classic layout and the OCI layout Docker 25+
//! writes) or an OCI image layout (`index.json`, `blobs/sha256/...`) as a tar file.
//!
//! Every blob named by its digest is checked against it; each layer is unpacked into the same
//! content-addressed store pulls use (keyed by the digest of the blob as archived), and the
//! image is recorded under each of its tags, so a task naming one finds it on the node and
//! nothing is pulled.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest as _;

use super::{ImageRecord, Images, Layer, normalize};

/// `manifest.json` of a `docker save` archive: one entry per image.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// `index.json` of an OCI layout (the parts used).
#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    digest: String,
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// An archive unpacked into a work directory (removed on drop), its images checked.
pub struct Archive {
    _work: tempfile::TempDir,
    pub images: Vec<ArchivedImage>,
}

/// One image of an archive.
pub struct ArchivedImage {
    /// Its tags, in full form; empty when the archive names none.
    pub references: Vec<String>,
    /// `sha256:<hex>` of its manifest (of its config, for a classic `docker save` archive).
    pub digest: String,
    pub config_json: String,
    /// Bottom first.
    pub layers: Vec<ArchivedLayer>,
}

/// One layer blob of an archive, checked against its digest.
pub struct ArchivedLayer {
    pub path: PathBuf,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// Unpacks the archive at `file` under `tmp` and checks every blob against its digest.
pub fn read_archive(file: &Path, tmp: &Path) -> Result<Archive, String> {
    std::fs::create_dir_all(tmp).map_err(|e| format!("creating {} failed: {e}", tmp.display()))?;
    let work = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(tmp)
        .map_err(|e| format!("creating a work directory under {} failed: {e}", tmp.display()))?;
    let f = std::fs::File::open(file).map_err(|e| format!("opening {} failed: {e}", file.display()))?;
    tar::Archive::new(std::io::BufReader::new(f))
        .unpack(work.path())
        .map_err(|e| format!("{} is not a readable tar archive: {e}", file.display()))?;
    let dir = work.path();
    let mut images = Vec::new();
    if dir.join("manifest.json").is_file() {
        let saved: Vec<SavedImage> = read_json(&dir.join("manifest.json"))?;
        for img in saved {
            let config_path = inside(dir, &img.config)?;
            let config_digest = format!("sha256:{}", verify(&config_path)?);
            let config =
                std::fs::read_to_string(&config_path).map_err(|e| format!("reading the config failed: {e}"))?;
            // A classic archive names layers `<id>/layer.tar`: they are checked against the
            // config's diff ids (the digests of the uncompressed layers) instead.
            let diff_ids = diff_ids(&config);
            let mut layers = Vec::new();
            for (i, l) in img.layers.iter().enumerate() {
                let path = inside(dir, l)?;
                let got = format!("sha256:{}", verify(&path)?);
                if let Some(want) = diff_ids.get(i)
                    && &got != want
                    && !is_gzip(&path)
                    && !is_zstd(&path)
                {
                    return Err(format!(
                        "layer {l} is {got}, but the image's config says {want}; the archive is corrupt (its content \
                         does not match its digest)"
                    ));
                }
                layers.push(layer_at(path, got, None));
            }
            let references =
                img.repo_tags.unwrap_or_default().iter().map(|t| normalize(t)).collect::<Result<_, _>>()?;
            images.push(ArchivedImage { references, digest: config_digest, config_json: config, layers });
        }
    } else if dir.join("index.json").is_file() {
        let index: Index = read_json(&dir.join("index.json"))?;
        for m in index.manifests {
            let path = blob(dir, &m.digest)?;
            verify(&path)?;
            let manifest: Manifest = read_json(&path)?;
            let config_path = blob(dir, &manifest.config.digest)?;
            verify(&config_path)?;
            let config =
                std::fs::read_to_string(&config_path).map_err(|e| format!("reading the config failed: {e}"))?;
            let mut layers = Vec::new();
            for l in &manifest.layers {
                let path = blob(dir, &l.digest)?;
                let got = format!("sha256:{}", verify(&path)?);
                layers.push(layer_at(path, got, Some(&l.media_type)));
            }
            let name = m
                .annotations
                .get("io.containerd.image.name")
                .or(m.annotations.get("org.opencontainers.image.ref.name"));
            let references = match name.filter(|n| n.contains(':') || n.contains('/')) {
                Some(n) => vec![normalize(n)?],
                None => Vec::new(),
            };
            images.push(ArchivedImage { references, digest: m.digest.clone(), config_json: config, layers });
        }
    } else {
        return Err(format!(
            "{} has neither manifest.json (docker save) nor index.json (an OCI layout)",
            file.display()
        ));
    }
    if images.is_empty() {
        return Err(format!("{} holds no image", file.display()));
    }
    Ok(Archive { _work: work, images })
}

/// A layer blob at `path` whose content is `digest`; its media type as the archive says, or
/// from its first bytes.
fn layer_at(path: PathBuf, digest: String, media_type: Option<&str>) -> ArchivedLayer {
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let media_type = match media_type.filter(|m| !m.is_empty()) {
        Some(m) => m.to_string(),
        None if is_gzip(&path) => "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        None if is_zstd(&path) => "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        None => "application/vnd.oci.image.layer.v1.tar".into(),
    };
    ArchivedLayer { path, digest, media_type, size }
}

impl Images {
    /// Imports every image in the archive at `file` into this node's store; the references
    /// recorded (an image the archive names no tag for is recorded by its digest).
    pub fn import(&self, file: &Path) -> Result<Vec<String>, String> {
        let archive = read_archive(file, &self.inner.root.join("tmp"))?;
        let mut imported = Vec::new();
        for img in &archive.images {
            let mut layers = Vec::new();
            let mut size = 0;
            for l in &img.layers {
                let compression = super::unpack::Compression::of_media_type(&l.media_type)?;
                let dir = self.store_unpacked(&l.digest, &l.path, compression)?;
                size += super::dir_size(&dir);
                layers.push(Layer { digest: l.digest.clone(), media_type: l.media_type.clone(), size: l.size });
            }
            let reference = img.references.first().cloned().unwrap_or_else(|| img.digest.clone());
            let rec = ImageRecord::stored(&reference, &img.digest, layers, &img.config_json, size)?;
            self.write_record(&rec)?;
            for r in &img.references {
                self.set_ref(r, &img.digest)?;
                imported.push(r.clone());
            }
            if img.references.is_empty() {
                imported.push(img.digest.clone());
            }
        }
        Ok(imported)
    }
}

/// Whether a file starts with gzip's magic bytes.
fn is_gzip(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == [0x1f, 0x8b]
}

/// Whether a file starts with zstd's frame magic.
fn is_zstd(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == [0x28, 0xb5, 0x2f, 0xfd]
}

/// `rootfs.diff_ids` of an image config.
fn diff_ids(config: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(config)
        .ok()
        .and_then(|v| v["rootfs"]["diff_ids"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| d.as_str().map(str::to_string))
        .collect()
}

/// A path named by the archive, which must stay inside it.
fn inside(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let rel = Path::new(name);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("the archive names {name:?}, outside itself; refusing it"));
    }
    Ok(dir.join(rel))
}

/// The blob of `digest` in an OCI layout.
fn blob(dir: &Path, digest: &str) -> Result<PathBuf, String> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| format!("digest {digest} is not sha256"))?;
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("digest {digest} is malformed"));
    }
    Ok(dir.join("blobs/sha256").join(hex))
}

/// The SHA-256 of a file (hex); when the file is named by a digest (`blobs/sha256/<hex>`, or
/// `<hex>.json` in a classic `docker save`), it must match.
fn verify(path: &Path) -> Result<String, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("opening {} failed: {e}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| format!("reading {} failed: {e}", path.display()))?;
    let hex = hex::encode(h.finalize());
    let named = path.file_name().and_then(|n| n.to_str()).map(|n| n.trim_end_matches(".json")).unwrap_or_default();
    if named.len() == 64 && named.chars().all(|c| c.is_ascii_hexdigit()) && named != hex {
        return Err(format!(
            "{} does not match its digest (its content is sha256:{hex}); the archive is corrupt",
            path.display()
        ));
    }
    Ok(hex)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {} failed: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} does not parse: {e}", path.display()))
}
