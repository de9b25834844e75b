//! Images imported into the cluster (`berth image import FILE`), for nodes that cannot reach a
//! registry. The masters keep them in the replicated state, so they survive the loss of any
//! master like every other object, and hand them to the nodes that run tasks of them:
//!
//! - `/berth/images/chunks/<hex>/<upload>/<index>`: a blob's bytes, in chunks of
//!   [`CHUNK_BYTES`], under an id of their upload (so a failed upload removes only its own
//!   chunks, never those of another upload of the same blob running at the same time);
//! - `/berth/images/blobs/<hex>`: an `ImageBlobRecord` naming the upload, written once every
//!   chunk is stored and the whole blob matched its digest (so a blob cut off mid-upload is
//!   never used);
//! - `/berth/images/refs/<reference>`: an `ImageView` (full-form reference, manifest digest,
//!   config, layers), written only while every layer's blob record exists.
//!
//! A RUNNING assignment of an oci task whose image (normalized) is recorded here carries it
//! (`Assignment.image`); the agent fetches the blobs it lacks from the leader over its session's
//! connection (`serve_blob`) instead of pulling from a registry.

use std::collections::BTreeSet;
use std::sync::Arc;

use berth_api::pb::{
    ImageBlobChunk, ImageBlobRecord, ImageBlobResponse, ImageView, PutImageRequest,
    agent::{AgentFrame, BlobChunk, ClusterImage, MasterFrame, agent_frame, master_frame},
};
use berth_channel::{FrameReader, FrameWriter};
use berth_store::KvReader;
use berth_types::{Command, CommandResult, Put, RequestOp, Txn, image::normalize_reference};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};
use tracing::{info, warn};

use crate::node::Ctx;
use crate::objects;

const BLOBS: &str = "/berth/images/blobs/";
const CHUNKS: &str = "/berth/images/chunks/";
const REFS: &str = "/berth/images/refs/";

/// The size of one stored chunk (and of one frame to an agent): well under the state's value
/// limit (1 MiB) and the channel's frame limit (4 MiB).
pub(crate) const CHUNK_BYTES: usize = 512 * 1024;

fn blob_key(hex: &str) -> Vec<u8> {
    format!("{BLOBS}{hex}").into_bytes()
}

/// Every upload's chunks of blob `hex` (`upload` empty), or one upload's.
fn chunk_prefix(hex: &str, upload: &str) -> String {
    if upload.is_empty() { format!("{CHUNKS}{hex}/") } else { format!("{CHUNKS}{hex}/{upload}/") }
}

fn chunk_key(hex: &str, upload: &str, index: u32) -> Vec<u8> {
    format!("{}{index:08}", chunk_prefix(hex, upload)).into_bytes()
}

fn ref_key(reference: &str) -> Vec<u8> {
    format!("{REFS}{reference}").into_bytes()
}

/// The hex of a `sha256:<hex>` digest, checked.
fn hex_of(digest: &str) -> Result<&str, Status> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .ok_or_else(|| Status::invalid_argument(format!("{digest:?} is not a sha256 digest (sha256:<64 hex digits>)")))
}

async fn put(ctx: &Ctx, key: Vec<u8>, value: Vec<u8>) -> Result<(), Status> {
    let txn =
        Txn { compare: vec![], success: vec![RequestOp::Put(Put { key, value, prev_kv: false })], failure: vec![] };
    ctx.write(Command::Txn(txn)).await.map(|_| ())
}

/// A random id for one upload of a blob.
fn upload_id() -> Result<String, Status> {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| Status::internal("the system's random number generator failed"))?;
    Ok(hex::encode(id))
}

/// Removes what one upload of the blob `hex` wrote before it failed.
async fn discard_chunks(ctx: &Ctx, hex: &str, upload: &str) {
    let txn =
        Txn { compare: vec![], success: vec![objects::delete_prefix(&chunk_prefix(hex, upload))], failure: vec![] };
    if let Err(e) = ctx.write(Command::Txn(txn)).await {
        warn!(blob = hex, "the chunks of a failed upload were not removed: {}", e.message());
    }
}

/// Discards an upload's chunks unless disarmed: also when the request's future is dropped (the
/// client went away or gave up), which would skip any cleanup written after an await.
struct UploadGuard {
    ctx: Arc<Ctx>,
    hex: String,
    upload: String,
    armed: bool,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if self.armed {
            let (ctx, hex, upload) = (self.ctx.clone(), self.hex.clone(), self.upload.clone());
            tokio::spawn(async move { discard_chunks(&ctx, &hex, &upload).await });
        }
    }
}

/// The key an upload writes first, under its own chunks: its blob record is written only while
/// it exists, so an upload whose chunks a delete removed meanwhile is never recorded.
fn marker_key(hex: &str, upload: &str) -> Vec<u8> {
    format!("{}marker", chunk_prefix(hex, upload)).into_bytes()
}

/// `PutImageBlob`: stores a blob streamed in chunks, checked against its digest.
pub(crate) async fn put_blob(
    ctx: Arc<Ctx>,
    mut stream: Streaming<ImageBlobChunk>,
) -> Result<ImageBlobResponse, Status> {
    let first = stream
        .next()
        .await
        .ok_or_else(|| Status::invalid_argument("no blob was sent"))?
        .map_err(|e| Status::cancelled(format!("the upload broke off: {e}")))?;
    let digest = first.digest.clone();
    let declared = first.size;
    let hex = hex_of(&digest)?.to_string();
    ctx.read_barrier().await?;
    if let Some(rec) = objects::get::<ImageBlobRecord>(&ctx.reader, &blob_key(&hex))? {
        // Stored already: nothing to write; the rest of the stream is not needed.
        return Ok(ImageBlobResponse { header: Some(ctx.header()), digest, size: rec.obj.size, existed: true });
    }
    let upload = upload_id()?;
    let mut guard = UploadGuard { ctx: ctx.clone(), hex: hex.clone(), upload: upload.clone(), armed: true };
    put(&ctx, marker_key(&hex, &upload), Vec::new()).await?;
    ctx.read_barrier().await?;
    let Some(marker) = objects::revision(&ctx.reader, &marker_key(&hex, &upload))? else {
        return Err(Status::aborted("the upload's marker vanished as it was written; send the image again"));
    };
    // Within the state's value limit, should a master run with a smaller one.
    let chunk_bytes = CHUNK_BYTES.min(ctx.limits.max_value_bytes.saturating_sub(4096)).max(4096);
    let mut hasher = Sha256::new();
    let mut buf: Vec<u8> = Vec::with_capacity(chunk_bytes);
    let mut size = 0u64;
    let mut chunks = 0u32;
    let mut next = Some(Ok(first));
    loop {
        let done = match next.take() {
            Some(Ok(c)) => {
                hasher.update(&c.data);
                size += c.data.len() as u64;
                buf.extend_from_slice(&c.data);
                false
            }
            Some(Err(e)) => return Err(Status::cancelled(format!("the upload of {digest} broke off: {e}"))),
            None => true,
        };
        while buf.len() >= chunk_bytes || (done && !buf.is_empty()) {
            let rest = buf.split_off(buf.len().min(chunk_bytes));
            put(&ctx, chunk_key(&hex, &upload, chunks), std::mem::replace(&mut buf, rest)).await?;
            chunks += 1;
        }
        if done {
            break;
        }
        next = stream.next().await;
    }
    let got = hex::encode(hasher.finalize());
    if got != hex || (declared != 0 && declared != size) {
        return Err(Status::invalid_argument(format!(
            "the blob sent as {digest} ({declared} bytes) arrived as sha256:{got} ({size} bytes): it was corrupted \
             or cut off; nothing was kept, send it again"
        )));
    }
    // Recorded only if no other upload recorded it first and this upload's chunks are all
    // still there.
    let rec = ImageBlobRecord { size, chunks, stored_at_ms: objects::now_ms(), upload: upload.clone() };
    let (c, op) = objects::cas_put(blob_key(&hex), 0, rec.encode_to_vec());
    let still = berth_types::Compare {
        key: marker_key(&hex, &upload),
        op: berth_types::CompareOp::Equal,
        target: berth_types::CompareTarget::ModRevision(marker),
    };
    match ctx.write(Command::Txn(Txn { compare: vec![c, still], success: vec![op], failure: vec![] })).await? {
        CommandResult::Txn(t) if t.succeeded => {
            guard.armed = false;
            info!(blob = %digest, size, chunks, "image blob stored");
            Ok(ImageBlobResponse { header: Some(ctx.header()), digest, size, existed: false })
        }
        _ => match objects::get::<ImageBlobRecord>(&ctx.reader, &blob_key(&hex))? {
            // Another upload of the same blob won: this one's chunks go (the guard).
            Some(rec) => {
                Ok(ImageBlobResponse { header: Some(ctx.header()), digest, size: rec.obj.size, existed: true })
            }
            None => Err(Status::aborted(format!(
                "blob {digest} was removed while it was being sent (`berth image rm`?); send the image again"
            ))),
        },
    }
}

/// The image of a reference, if the cluster holds it.
fn get(reader: &KvReader, reference: &str) -> Result<Option<objects::Versioned<ImageView>>, Status> {
    objects::get::<ImageView>(reader, &ref_key(reference))
}

/// Compared and rewritten by every change of image records, so that deciding which blobs no
/// image uses any more (a delete, a tag moved to another image) and recording an image that uses
/// a blob never interleave.
const GENERATION: &str = "/berth/images/generation";

/// The compare-and-put that moves [`GENERATION`] on.
fn next_generation(ctx: &Ctx) -> Result<(berth_types::Compare, RequestOp), Status> {
    let rev = objects::revision(&ctx.reader, GENERATION.as_bytes())?.unwrap_or(0);
    Ok(objects::cas_put(GENERATION.as_bytes().to_vec(), rev, objects::now_ms().to_string().into_bytes()))
}

/// The deletes of blob `hex`'s record and of every upload's chunks of it.
fn delete_blob(hex: &str) -> [RequestOp; 2] {
    [objects::delete(blob_key(hex)), objects::delete_prefix(&chunk_prefix(hex, ""))]
}

/// The blobs (digests) the images under `REFS` use, leaving out the references in `except`.
fn blobs_in_use(reader: &KvReader, except: &BTreeSet<String>) -> Result<BTreeSet<String>, Status> {
    Ok(objects::list::<ImageView>(reader, REFS)?
        .into_iter()
        .filter(|v| !except.contains(&v.obj.reference))
        .flat_map(|v| v.obj.layers.into_iter().map(|l| l.digest))
        .collect())
}

fn too_many_ops(what: &str, ops: usize, max: usize) -> Status {
    Status::invalid_argument(format!(
        "{what} needs {ops} operations in one transaction, more than the {max} a transaction holds; use fewer \
         references per import, or images with fewer layers"
    ))
}

/// `PutImage`: records an image under each of its references, once all its layers are stored.
/// A reference that named another image moves; blobs no image uses any more then go.
pub(crate) async fn put_image(ctx: &Ctx, r: PutImageRequest) -> Result<Vec<ImageView>, Status> {
    if r.references.is_empty() {
        return Err(Status::invalid_argument("an image needs at least one reference (name:tag) to be recorded under"));
    }
    let references = r
        .references
        .iter()
        .map(|s| normalize_reference(s).map_err(Status::invalid_argument))
        .collect::<Result<BTreeSet<String>, Status>>()?;
    hex_of(&r.digest)?;
    if r.layers.is_empty() {
        return Err(Status::invalid_argument("the image has no layers"));
    }
    if serde_json::from_str::<serde_json::Value>(&r.config_json).is_err() {
        return Err(Status::invalid_argument("the image's config is not a JSON document"));
    }
    let max_ops = ctx.limits.max_txn_ops;
    for _ in 0..5 {
        ctx.read_barrier().await?;
        let mut compare = Vec::new();
        let mut ops = Vec::new();
        let mut size = 0;
        for l in &r.layers {
            let hex = hex_of(&l.digest)?;
            let rec = objects::get::<ImageBlobRecord>(&ctx.reader, &blob_key(hex))?.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "layer {} is not stored in the cluster; send its blob first (`berth image import` does)",
                    l.digest
                ))
            })?;
            if rec.obj.size != l.size {
                return Err(Status::invalid_argument(format!(
                    "layer {} is {} bytes in the cluster but the image says {}",
                    l.digest, rec.obj.size, l.size
                )));
            }
            size += l.size;
            // The blob must still be there when the image is recorded.
            compare.push(berth_types::Compare {
                key: blob_key(hex),
                op: berth_types::CompareOp::Equal,
                target: berth_types::CompareTarget::ModRevision(rec.mod_revision),
            });
        }
        let now = objects::now_ms();
        let mut views = Vec::new();
        let mut replaced = BTreeSet::new();
        for reference in &references {
            let view = ImageView {
                reference: reference.clone(),
                digest: r.digest.clone(),
                config_json: r.config_json.clone(),
                layers: r.layers.clone(),
                imported_at_ms: now,
                size,
            };
            let existing = get(&ctx.reader, reference)?;
            if existing.as_ref().is_some_and(|e| e.obj.digest != r.digest) {
                replaced.insert(reference.clone());
            }
            let (c, op) = objects::cas_put(
                ref_key(reference),
                existing.as_ref().map_or(0, |v| v.mod_revision),
                view.encode_to_vec(),
            );
            compare.push(c);
            ops.push(op);
            views.push(view);
        }
        // The blobs of the images whose tags moved here, unless another image (or this one)
        // uses them.
        let mut gone = BTreeSet::new();
        if !replaced.is_empty() {
            let mut kept = blobs_in_use(&ctx.reader, &replaced)?;
            kept.extend(r.layers.iter().map(|l| l.digest.clone()));
            for reference in &replaced {
                if let Some(old) = get(&ctx.reader, reference)? {
                    gone.extend(old.obj.layers.into_iter().map(|l| l.digest).filter(|d| !kept.contains(d)));
                }
            }
        }
        for d in &gone {
            ops.extend(delete_blob(hex_of(d)?));
        }
        let (c, op) = next_generation(ctx)?;
        compare.push(c);
        ops.push(op);
        if compare.len() + ops.len() > max_ops {
            return Err(too_many_ops("recording this image", compare.len() + ops.len(), max_ops));
        }
        match ctx.write(Command::Txn(Txn { compare, success: ops, failure: vec![] })).await? {
            CommandResult::Txn(t) if t.succeeded => {
                info!(references = ?references, digest = %r.digest, size, blobs_removed = gone.len(), "image recorded");
                return Ok(views);
            }
            _ => continue,
        }
    }
    Err(Status::aborted("the image's records kept changing while it was being recorded; run the command again"))
}

/// `berth image ls`.
pub(crate) fn list(reader: &KvReader) -> Result<Vec<ImageView>, Status> {
    Ok(objects::list::<ImageView>(reader, REFS)?.into_iter().map(|v| v.obj).collect())
}

/// `DeleteImage`: removes the reference, and the blobs no other reference's image uses. Nodes
/// keep the copies they stored (their own garbage collection removes them once unused).
pub(crate) async fn delete(ctx: &Ctx, reference: &str) -> Result<ImageView, Status> {
    let reference = normalize_reference(reference).map_err(Status::invalid_argument)?;
    let max_ops = ctx.limits.max_txn_ops;
    for _ in 0..5 {
        ctx.read_barrier().await?;
        let Some(img) = get(&ctx.reader, &reference)? else {
            return Err(Status::not_found(format!("the cluster holds no image {reference} (see `berth image ls`)")));
        };
        let kept = blobs_in_use(&ctx.reader, &BTreeSet::from([reference.clone()]))?;
        let gone: BTreeSet<&str> =
            img.obj.layers.iter().map(|l| l.digest.as_str()).filter(|d| !kept.contains(*d)).collect();
        let (c_ref, op_ref) = objects::cas_delete(ref_key(&reference), img.mod_revision);
        let (c_gen, op_gen) = next_generation(ctx)?;
        let mut ops = vec![op_ref, op_gen];
        for d in &gone {
            ops.extend(delete_blob(hex_of(d)?));
        }
        if 2 + ops.len() > max_ops {
            return Err(too_many_ops("removing this image", 2 + ops.len(), max_ops));
        }
        match ctx.write(Command::Txn(Txn { compare: vec![c_ref, c_gen], success: ops, failure: vec![] })).await? {
            CommandResult::Txn(t) if t.succeeded => {
                info!(reference = %reference, blobs_removed = gone.len(), "image removed");
                return Ok(img.obj);
            }
            _ => continue,
        }
    }
    Err(Status::aborted("the image's records kept changing; run the command again"))
}

/// The cluster's copy of a task's image, for its assignment: `None` when the task is not an oci
/// task or the cluster does not hold its image (the node pulls it from its registry).
pub(crate) fn for_task(reader: &KvReader, spec: &berth_types::task::RunSpec) -> Option<ClusterImage> {
    if spec.task.runtime != berth_types::spec::Runtime::Oci {
        return None;
    }
    let reference = normalize_reference(spec.task.image.as_deref()?).ok()?;
    let img = match get(reader, &reference) {
        Ok(img) => img?.obj,
        Err(e) => {
            warn!(image = %reference, "reading the cluster's image record failed: {}", e.message());
            return None;
        }
    };
    Some(ClusterImage {
        reference: img.reference,
        digest: img.digest,
        config_json: img.config_json,
        layers: img.layers,
    })
}

/// Answers one agent's `BlobRequest` on its own stream: the blob's chunks in order, the last
/// with `end` (or one with `end` and the error).
pub(crate) async fn serve_blob(reader: &KvReader, mut writer: FrameWriter, mut frames: FrameReader) {
    let request = match frames.recv::<AgentFrame>().await {
        Ok(Some(AgentFrame { body: Some(agent_frame::Body::BlobRequest(r)) })) => r,
        Ok(_) => return,
        Err(e) => {
            warn!("a blob stream from an agent was unreadable: {e}");
            return;
        }
    };
    let send = |c: BlobChunk| MasterFrame { body: Some(master_frame::Body::BlobChunk(c)) };
    let fail = |error: String| send(BlobChunk { end: true, error, ..Default::default() });
    let result: Result<(), String> = async {
        let hex = hex_of(&request.digest).map_err(|s| s.message().to_string())?;
        let rec = objects::get::<ImageBlobRecord>(reader, &blob_key(hex))
            .map_err(|s| s.message().to_string())?
            .ok_or_else(|| format!("the cluster holds no blob {} (was its image removed?)", request.digest))?
            .obj;
        for i in 0..rec.chunks {
            let data = reader
                .get(&chunk_key(hex, &rec.upload, i))
                .map_err(|e| format!("reading blob {} failed: {e}", request.digest))?
                .ok_or_else(|| format!("chunk {i} of blob {} is missing", request.digest))?
                .value;
            let last = i + 1 == rec.chunks;
            let chunk = BlobChunk { data, end: last, error: String::new(), size: if i == 0 { rec.size } else { 0 } };
            writer.send(&send(chunk)).await.map_err(|e| format!("sending blob {} failed: {e}", request.digest))?;
        }
        if rec.chunks == 0 {
            writer.send(&send(BlobChunk { end: true, ..Default::default() })).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        warn!(blob = %request.digest, "a blob was not sent to an agent: {e}");
        let _ = writer.send(&fail(e)).await;
    }
    let _ = writer.finish().await;
}
