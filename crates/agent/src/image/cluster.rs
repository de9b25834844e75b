//! Images the cluster holds (`berth image import`), for nodes that cannot reach a registry. An
//! oci task's RUNNING assignment carries its image when the masters hold it
//! (`Assignment.image`); the node fetches each layer blob it lacks from the leader over its
//! session's connection (one QUIC stream per blob: `BlobRequest`, then `BlobChunk`s), checks it
//! against its digest, and unpacks it into the same content-addressed store pulls use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_api::pb::agent::{AgentFrame, BlobRequest, ClusterImage, MasterFrame, agent_frame, master_frame};
use berth_channel::{FrameReader, FrameWriter};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;
use tracing::info;

use super::{ImageRecord, Images, Layer, human, temp_blob, unpack};

/// How long a fetch waits for a session with the leader before it gives up (the task fails and
/// the restart policy tries again).
const SESSION_PATIENCE: Duration = Duration::from_secs(30);

/// What the session tells the task manager about cluster images: each task's image as its
/// assignment carried it, and the connection to fetch blobs over. Cheap to clone.
#[derive(Clone, Default)]
pub struct ClusterSource {
    inner: Arc<Mutex<SourceInner>>,
    connected: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct SourceInner {
    conn: Option<quinn::Connection>,
    images: HashMap<String, ClusterImage>,
}

impl ClusterSource {
    /// The session's connection to the leader (`None` once it ended).
    pub fn set_connection(&self, conn: Option<quinn::Connection>) {
        let some = conn.is_some();
        self.inner.lock().expect("source lock").conn = conn;
        if some {
            self.connected.notify_waiters();
        }
    }

    /// What an assignment of `task` said of its image (`None`: the cluster does not hold it).
    pub fn remember(&self, task: &str, image: Option<&ClusterImage>) {
        let mut inner = self.inner.lock().expect("source lock");
        match image {
            Some(i) => inner.images.insert(task.to_string(), i.clone()),
            None => inner.images.remove(task),
        };
    }

    /// Keeps only the tasks a COMPLETE set named.
    pub fn retain(&self, tasks: &std::collections::HashSet<&str>) {
        self.inner.lock().expect("source lock").images.retain(|t, _| tasks.contains(t.as_str()));
    }

    /// The cluster's copy of `task`'s image, if its assignment carried one.
    pub fn image_for(&self, task: &str) -> Option<ClusterImage> {
        self.inner.lock().expect("source lock").images.get(task).cloned()
    }

    async fn connection(&self) -> Result<quinn::Connection, String> {
        let deadline = tokio::time::Instant::now() + SESSION_PATIENCE;
        loop {
            let waiting = self.connected.notified();
            if let Some(c) = self.inner.lock().expect("source lock").conn.clone().filter(|c| c.close_reason().is_none())
            {
                return Ok(c);
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                return Err(format!(
                    "no session with the leader within {SESSION_PATIENCE:?} to fetch the image from the cluster"
                ));
            }
        }
    }

    /// Fetches blob `digest` into `dest`, checked against the digest; its size.
    pub async fn fetch_blob(&self, digest: &str, dest: &Path) -> Result<u64, String> {
        let conn = self.connection().await?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| format!("opening a stream to the leader for blob {digest} failed: {e}"))?;
        let mut writer = FrameWriter::new(send);
        let mut reader = FrameReader::new(recv);
        let request = AgentFrame { body: Some(agent_frame::Body::BlobRequest(BlobRequest { digest: digest.into() })) };
        writer.send(&request).await.map_err(|e| format!("asking the leader for blob {digest} failed: {e}"))?;
        let _ = writer.finish().await;
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| format!("creating {} failed: {e}; check free space", dest.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        loop {
            let frame = reader
                .recv::<MasterFrame>()
                .await
                .map_err(|e| format!("fetching blob {digest} from the leader broke off: {e}"))?
                .ok_or_else(|| format!("the leader closed the stream of blob {digest} before its end"))?;
            let Some(master_frame::Body::BlobChunk(chunk)) = frame.body else {
                return Err(format!("the leader answered the request for blob {digest} with something else"));
            };
            if !chunk.error.is_empty() {
                return Err(format!("the cluster could not send blob {digest}: {}", chunk.error));
            }
            hasher.update(&chunk.data);
            size += chunk.data.len() as u64;
            file.write_all(&chunk.data)
                .await
                .map_err(|e| format!("writing {} failed: {e}; check free space", dest.display()))?;
            if chunk.end {
                break;
            }
        }
        file.flush().await.map_err(|e| format!("writing {} failed: {e}", dest.display()))?;
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != digest {
            return Err(format!("blob {digest} arrived from the cluster as {got}; refusing it"));
        }
        Ok(size)
    }
}

impl Images {
    /// Stores the cluster's image `image` under `key`: each layer it lacks fetched from the
    /// leader and unpacked.
    pub(super) async fn load_from_cluster(
        &self,
        key: &str,
        image: &ClusterImage,
        source: &ClusterSource,
        progress: &(dyn Fn(String) + Send + Sync),
    ) -> Result<ImageRecord, String> {
        if image.layers.is_empty() {
            return Err(format!("the cluster's image {key} has no layers"));
        }
        let total: u64 = image.layers.iter().map(|l| l.size).sum();
        let mut size = 0;
        let mut fetched = 0;
        let mut layers = Vec::with_capacity(image.layers.len());
        for (i, l) in image.layers.iter().enumerate() {
            progress(format!(
                "loading image {key} from the cluster: layer {}/{} ({} of {} fetched)",
                i + 1,
                image.layers.len(),
                human(fetched),
                human(total)
            ));
            let layer = Layer { digest: l.digest.clone(), media_type: l.media_type.clone(), size: l.size };
            let dir = self.layer_dir(&layer.digest);
            if dir.is_dir() {
                size += super::dir_size(&dir);
            } else {
                let compression = unpack::Compression::of_media_type(&layer.media_type)?;
                let tmp = self.inner.root.join("tmp");
                std::fs::create_dir_all(&tmp).map_err(|e| format!("creating {} failed: {e}", tmp.display()))?;
                let blob = temp_blob(&tmp, &layer.digest)?;
                let got = source.fetch_blob(&layer.digest, &blob).await;
                let stored = match got {
                    Ok(_) => {
                        let (store, digest, b) = (self.clone(), layer.digest.clone(), blob.to_path_buf());
                        tokio::task::spawn_blocking(move || store.store_unpacked(&digest, &b, compression))
                            .await
                            .map_err(|e| format!("unpacking a layer failed: {e}"))
                            .and_then(|r| r)
                    }
                    Err(e) => Err(e),
                };
                let _ = std::fs::remove_file(&blob);
                size += super::dir_size(&stored?);
            }
            fetched += l.size;
            layers.push(layer);
        }
        progress(format!("pulled image {key} from the cluster: {} layers, {}", layers.len(), human(total)));
        let rec = ImageRecord::stored(key, &image.digest, layers, &image.config_json, size)?;
        self.write_record(&rec)?;
        self.set_ref(key, &image.digest)?;
        info!(image = key, digest = %image.digest, size, "image loaded from the cluster");
        Ok(rec)
    }
}
