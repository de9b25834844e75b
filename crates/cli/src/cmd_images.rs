//! `berth image import|ls|rm`: images for clusters without a registry. By default they work on
//! the cluster (the masters keep the image in the replicated state and hand it to the nodes
//! that run its tasks); `--local` works on the image store of the node the command runs on.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use berth_api::pb::{self, ImageBlobChunk, PutImageRequest, agent::ClusterImageLayer};
use clap::Subcommand;
use serde::Serialize;

use crate::Global;
use crate::client::{Call, Client};
use crate::output::{self, human_bytes};

/// The size of one chunk sent to the masters.
const SEND_CHUNK: usize = 512 * 1024;
/// How long one attempt at sending a blob may take.
const BLOB_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Load the images of a `docker save` archive or an OCI image layout (a tar file) into the
    /// cluster; tasks naming their tags then run on any node without a registry (each node
    /// fetches what it lacks from the masters). With --local: into this node's store only.
    Import {
        /// The archive.
        file: PathBuf,
        /// Into the image store of the node this runs on (the agent's --data-dir), not the cluster.
        #[arg(long)]
        local: bool,
        /// The agent's data directory on this node (with --local).
        #[arg(long, env = "BERTH_AGENT_DATA_DIR", default_value = "/var/lib/berth/agent")]
        data_dir: PathBuf,
    },
    /// List the images the cluster holds (with --local: the images on this node).
    Ls {
        #[arg(long)]
        local: bool,
        #[arg(long, env = "BERTH_AGENT_DATA_DIR", default_value = "/var/lib/berth/agent")]
        data_dir: PathBuf,
    },
    /// Remove images from the cluster (nodes keep copies their tasks use; their garbage
    /// collection removes the rest).
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
}

#[derive(Serialize)]
struct ImageOut {
    reference: String,
    digest: String,
    layers: usize,
    size_bytes: u64,
    imported_at_ms: i64,
}

fn local_store(dir: &Path) -> berth_agent::image::Images {
    berth_agent::image::Images::new(dir.join("images"), Vec::new(), berth_agent::image::DEFAULT_GC_THRESHOLD)
}

pub async fn run(cmd: ImageCmd, g: &Global) -> Result<()> {
    match cmd {
        ImageCmd::Import { file, local: true, data_dir } => {
            let refs = local_store(&data_dir)
                .import(&file)
                .map_err(|e| anyhow::anyhow!("importing {} into this node: {e}", file.display()))?;
            let refs: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
            crate::output::print(g.output, &serde_json::json!({ "imported": refs }), |_| {
                for r in &refs {
                    println!("imported {r} into this node");
                }
            });
            Ok(())
        }
        ImageCmd::Import { file, local: false, .. } => import(&file, g).await,
        ImageCmd::Ls { local: true, data_dir } => {
            let out: Vec<ImageOut> = local_store(&data_dir)
                .list()
                .into_iter()
                .map(|i| ImageOut {
                    reference: i.reference,
                    digest: i.digest,
                    layers: i.layers.len(),
                    size_bytes: i.size,
                    imported_at_ms: i.pulled_at_ms,
                })
                .collect();
            print_images(g, &out, "no images on this node");
            Ok(())
        }
        ImageCmd::Ls { local: false, .. } => {
            let client = crate::config::client(g)?;
            let images = client
                .call(Call::Idempotent, |ch| async move {
                    Client::control(ch).list_images(pb::ListImagesRequest {}).await.map(|r| r.into_inner().images)
                })
                .await?;
            let out: Vec<ImageOut> = images.iter().map(out_of).collect();
            print_images(g, &out, "the cluster holds no images: load some with `berth image import FILE`");
            Ok(())
        }
        ImageCmd::Rm { references } => {
            let client = crate::config::client(g)?;
            let mut failed = 0;
            let mut removed = Vec::new();
            for reference in references {
                let req = pb::ImageRef { reference: reference.clone() };
                let res = client
                    .call(Call::Idempotent, |ch| {
                        let req = req.clone();
                        async move { Client::control(ch).delete_image(req).await.map(|r| r.into_inner().images) }
                    })
                    .await;
                match res {
                    Ok(images) => removed.extend(images.into_iter().map(|i| i.reference)),
                    Err(e) => {
                        eprintln!("error: {reference}: {}", e.message());
                        failed += 1;
                    }
                }
            }
            crate::output::print(g.output, &serde_json::json!({ "removed": removed }), |_| {
                for r in &removed {
                    println!("removed {r}");
                }
            });
            if failed > 0 {
                bail!("{failed} image(s) not removed");
            }
            Ok(())
        }
    }
}

fn out_of(i: &pb::ImageView) -> ImageOut {
    ImageOut {
        reference: i.reference.clone(),
        digest: i.digest.clone(),
        layers: i.layers.len(),
        size_bytes: i.size,
        imported_at_ms: i.imported_at_ms,
    }
}

fn print_images(g: &Global, out: &Vec<ImageOut>, none: &str) {
    output::emit(g.output, out, |out| {
        if out.is_empty() {
            eprintln!("{none}");
            return;
        }
        let rows: Vec<Vec<String>> = out
            .iter()
            .map(|i| vec![i.reference.clone(), i.digest.clone(), i.layers.to_string(), human_bytes(i.size_bytes)])
            .collect();
        output::table(&["REFERENCE", "DIGEST", "LAYERS", "SIZE"], &rows);
    });
}

/// Sends every image of the archive to the cluster: each layer blob the cluster lacks, then the
/// image's record under its tags.
async fn import(file: &Path, g: &Global) -> Result<()> {
    let tmp = std::env::temp_dir().join("berth-image-import");
    let archive = berth_agent::image::read_archive(file, &tmp).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(img) = archive.images.iter().find(|i| i.references.is_empty()) {
        bail!(
            "image {} in {} has no tag, and the cluster keeps images by tag: tag it before saving it (`docker tag`, \
             then `docker save NAME:TAG`)",
            img.digest,
            file.display()
        );
    }
    let mut client = crate::config::client(g)?;
    // A layer of hundreds of MiB takes minutes to send and commit in chunks: one attempt may
    // take that long (the default bounds suit small requests).
    client.attempt_timeout = BLOB_ATTEMPT_TIMEOUT;
    client.patience = BLOB_ATTEMPT_TIMEOUT * 2;
    for img in &archive.images {
        for (i, layer) in img.layers.iter().enumerate() {
            eprintln!(
                "{}: sending layer {}/{} ({}, {})",
                img.references[0],
                i + 1,
                img.layers.len(),
                layer.digest,
                human_bytes(layer.size)
            );
            let (digest, path, size) = (layer.digest.clone(), layer.path.clone(), layer.size);
            let res = client
                .call(Call::Idempotent, |ch| {
                    let (digest, path) = (digest.clone(), path.clone());
                    async move {
                        let chunks = blob_chunks(&path, digest, size)
                            .map_err(|e| tonic::Status::internal(format!("reading the archive failed: {e}")))?;
                        Client::control(ch).put_image_blob(chunks).await.map(|r| r.into_inner())
                    }
                })
                .await
                .with_context(|| format!("sending layer {} of {}", layer.digest, img.references[0]))?;
            if res.existed {
                eprintln!("  the cluster holds it already");
            }
        }
        let req = PutImageRequest {
            references: img.references.clone(),
            digest: img.digest.clone(),
            config_json: img.config_json.clone(),
            layers: img
                .layers
                .iter()
                .map(|l| ClusterImageLayer { digest: l.digest.clone(), media_type: l.media_type.clone(), size: l.size })
                .collect(),
        };
        let images = client
            .call(Call::Idempotent, |ch| {
                let req = req.clone();
                async move { Client::control(ch).put_image(req).await.map(|r| r.into_inner().images) }
            })
            .await
            .with_context(|| format!("recording {}", img.references.join(", ")))?;
        let out: Vec<ImageOut> = images.iter().map(out_of).collect();
        crate::output::print(g.output, &out, |_| {
            for i in &images {
                println!(
                    "imported {} ({}, {} layers, {}) into the cluster",
                    i.reference,
                    i.digest,
                    i.layers.len(),
                    human_bytes(i.size)
                );
            }
        });
    }
    Ok(())
}

/// The blob at `path` as the chunks of a `PutImageBlob` stream, read as they are sent.
fn blob_chunks(
    path: &Path,
    digest: String,
    size: u64,
) -> std::io::Result<impl futures::Stream<Item = ImageBlobChunk> + Send + 'static> {
    let file = std::fs::File::open(path)?;
    Ok(futures::stream::unfold((file, Some(digest)), move |(mut file, first)| async move {
        let mut buf = vec![0u8; SEND_CHUNK];
        let mut n = 0;
        while n < buf.len() {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                // The stream ends short; the masters find the blob does not match its digest.
                Err(_) => break,
            }
        }
        if n == 0 && first.is_none() {
            return None;
        }
        buf.truncate(n);
        let chunk = match first {
            Some(d) => ImageBlobChunk { digest: d, data: buf, size },
            None => ImageBlobChunk { digest: String::new(), data: buf, size: 0 },
        };
        Some((chunk, (file, None)))
    }))
}
