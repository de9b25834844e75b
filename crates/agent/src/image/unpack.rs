//! Unpacking one image layer (a tar stream, plain, gzip or zstd) into a directory that
//! overlayfs can use as a lower layer: OCI whiteouts become overlay whiteouts.
//!
//! - `.wh.NAME` (NAME was deleted by this layer) becomes a 0:0 character device `NAME`;
//! - `.wh..wh..opq` (the directory's lower contents are hidden) becomes the
//!   `trusted.overlay.opaque=y` attribute on the directory.
//!
//! Entries keep their modes and times, and their owners as the task's user namespace maps them
//! (`sandbox::host_id`: an image's root-owned files belong to host uid 1000000, the task's root,
//! so a task running as root can write them as it could in Docker); an entry that would land outside the layer
//! directory (`..`, absolute paths, through a symlink) is refused by the tar crate's
//! `unpack_in`, and the layer fails.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The prefix of a whiteout entry's file name.
const WHITEOUT: &str = ".wh.";
/// The name of an opaque-directory marker.
const OPAQUE: &str = ".wh..wh..opq";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type names; an error for one berth cannot unpack.
    pub fn of_media_type(media_type: &str) -> Result<Compression, String> {
        if media_type.ends_with("tar+gzip") || media_type.ends_with("tar.gzip") || media_type.ends_with(".tar.gz") {
            Ok(Compression::Gzip)
        } else if media_type.ends_with("tar+zstd") || media_type.ends_with(".tar.zst") {
            Ok(Compression::Zstd)
        } else if media_type.ends_with(".tar")
            || media_type.ends_with("layer.v1.tar")
            || media_type.ends_with("rootfs.diff.tar")
        {
            Ok(Compression::None)
        } else {
            Err(format!(
                "layer media type {media_type} is not supported (berth unpacks tar, tar+gzip and tar+zstd \
                 layers); rebuild the image with gzip layers"
            ))
        }
    }
}

/// Unpacks `blob` into `dir` (which must exist and be empty). Returns the number of entries.
pub fn unpack(blob: impl Read, compression: Compression, dir: &Path) -> Result<u64, String> {
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(blob)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(blob)
                .map_err(|e| format!("the layer is not a zstd stream: {e}"))?,
        ),
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    // Owners are set below, shifted into the tasks' user namespace.
    let chown = rustix::process::geteuid().is_root();
    archive.set_preserve_ownerships(false);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut count = 0;
    for entry in archive.entries().map_err(|e| format!("reading the layer failed: {e}"))? {
        let mut entry = entry.map_err(|e| format!("reading the layer failed: {e}"))?;
        let path = entry.path().map_err(|e| format!("a layer entry has an unreadable path: {e}"))?.into_owned();
        let rel =
            clean(&path).ok_or_else(|| format!("the layer entry {} leaves the layer; refusing it", path.display()))?;
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name == OPAQUE {
            let parent = dir.join(rel.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&parent).map_err(|e| format!("creating {} failed: {e}", parent.display()))?;
            rustix::fs::setxattr(&parent, "trusted.overlay.opaque", b"y", rustix::fs::XattrFlags::empty())
                .map_err(|e| format!("marking {} opaque failed: {e}", parent.display()))?;
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            let parent = dir.join(rel.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&parent).map_err(|e| format!("creating {} failed: {e}", parent.display()))?;
            let at = parent.join(hidden);
            let _ = std::fs::remove_file(&at);
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &at,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::empty(),
                rustix::fs::makedev(0, 0),
            )
            .map_err(|e| format!("making the whiteout {} failed (unpacking images needs root): {e}", at.display()))?;
        } else if !entry.unpack_in(dir).map_err(|e| format!("unpacking {} failed: {}", rel.display(), chain(&e)))? {
            return Err(format!("the layer entry {} leaves the layer; refusing it", path.display()));
        } else if chown && !rel.as_os_str().is_empty() && !entry.header().entry_type().is_hard_link() {
            // A hard link shares its target's inode, which has its owner already (a chown
            // through it would clear the target's set-id bits).
            shift_owner(&dir.join(&rel), entry.header()).map_err(|e| format!("unpacking {}: {e}", rel.display()))?;
        }
        count += 1;
    }
    if chown {
        shift_implicit_dirs(dir)?;
    }
    Ok(count)
}

/// The directories the unpack made without an entry of their own (the layer's root, parents of
/// entries and of whiteouts) are the agent's, host root's, which a task's namespace does not
/// map: they become the task root's, as the layer's own root-owned entries did.
fn shift_implicit_dirs(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let root = crate::sandbox::ROOT_HOST_ID;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let meta = std::fs::symlink_metadata(&d).map_err(|e| format!("reading {} failed: {e}", d.display()))?;
        if meta.uid() == 0 || meta.gid() == 0 {
            let uid = if meta.uid() == 0 { root } else { meta.uid() };
            let gid = if meta.gid() == 0 { root } else { meta.gid() };
            rustix::fs::chownat(
                rustix::fs::CWD,
                &d,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| format!("setting the owner of {} failed: {e}", d.display()))?;
        }
        for e in std::fs::read_dir(&d).map_err(|e| format!("reading {} failed: {e}", d.display()))?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    Ok(())
}

/// Gives the unpacked entry at `at` its header's owner as a sandboxed task sees it (uid and gid 0
/// become [`crate::sandbox::ROOT_HOST_ID`]; ids above the mapped range stay, unmapped), then its
/// mode again: a chown clears the set-id bits.
fn shift_owner(at: &Path, header: &tar::Header) -> Result<(), String> {
    let uid = header.uid().map_err(|e| format!("its owner is unreadable: {e}"))? as u32;
    let gid = header.gid().map_err(|e| format!("its group is unreadable: {e}"))? as u32;
    let shift = |id: u32| if id <= berth_types::spec::security::MAX_ID { crate::sandbox::host_id(id) } else { id };
    let (uid, gid) = (shift(uid), shift(gid));
    rustix::fs::chownat(
        rustix::fs::CWD,
        at,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| format!("setting its owner to {uid}:{gid} failed: {e}"))?;
    let kind = header.entry_type();
    if !kind.is_symlink()
        && !kind.is_hard_link()
        && let Ok(mode) = header.mode()
    {
        rustix::fs::chmodat(
            rustix::fs::CWD,
            at,
            rustix::fs::Mode::from_raw_mode(mode & 0o7777),
            rustix::fs::AtFlags::empty(),
        )
        .map_err(|e| format!("setting its mode failed: {e}"))?;
    }
    Ok(())
}

/// An error with its causes (the tar crate wraps the one that says what went wrong).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

/// `path` without a leading `/` or `./`; `None` when it has `..`.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn media_types() {
        assert_eq!(Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+gzip"), Ok(Compression::Gzip));
        assert_eq!(
            Compression::of_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Ok(Compression::Gzip)
        );
        assert_eq!(Compression::of_media_type("application/vnd.oci.image.layer.v1.tar"), Ok(Compression::None));
        assert_eq!(Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+zstd"), Ok(Compression::Zstd));
        assert!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+bzip2").unwrap_err().contains("gzip")
        );
    }

    #[test]
    fn files_and_whiteouts_unpack_for_overlayfs() {
        if !rustix::process::geteuid().is_root() {
            return; // whiteouts are device nodes: root only
        }
        let tmp = tempfile::tempdir().unwrap();
        let blob = layer(&[("etc/app.conf", b"x=1"), ("./var/.wh.gone", b""), ("data/.wh..wh..opq", b"")]);
        assert_eq!(unpack(&blob[..], Compression::None, tmp.path()).unwrap(), 3);
        assert_eq!(std::fs::read_to_string(tmp.path().join("etc/app.conf")).unwrap(), "x=1");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(tmp.path().join("etc/app.conf")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (crate::sandbox::ROOT_HOST_ID, crate::sandbox::ROOT_HOST_ID));
        assert_eq!(meta.mode() & 0o7777, 0o644);
        // The parents the archive did not list belong to the task's root too.
        let etc = std::fs::metadata(tmp.path().join("etc")).unwrap();
        assert_eq!(etc.uid(), crate::sandbox::ROOT_HOST_ID);
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(tmp.path().join("var/gone")).unwrap().file_type().is_char_device());
        let mut buf = [0u8; 4];
        let n = rustix::fs::getxattr(tmp.path().join("data"), "trusted.overlay.opaque", &mut buf).unwrap();
        assert_eq!(&buf[..n], b"y");
    }

    #[test]
    fn gzip_layers_unpack() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer(&[("hello", b"world")])).unwrap();
        unpack(&gz.finish().unwrap()[..], Compression::Gzip, tmp.path()).unwrap();
        assert_eq!(std::fs::read_to_string(tmp.path().join("hello")).unwrap(), "world");
    }

    #[test]
    fn zstd_layers_unpack() {
        let tmp = tempfile::tempdir().unwrap();
        let blob = ruzstd::encoding::compress_to_vec(
            &layer(&[("hello", b"zstd world")])[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        unpack(&blob[..], Compression::Zstd, tmp.path()).unwrap();
        assert_eq!(std::fs::read_to_string(tmp.path().join("hello")).unwrap(), "zstd world");
        let e = unpack(&b"not zstd at all"[..], Compression::Zstd, tmp.path()).unwrap_err();
        assert!(e.contains("zstd"), "{e}");
    }

    #[test]
    fn escaping_entries_are_refused() {
        assert_eq!(clean(Path::new("/a/./b")), Some(PathBuf::from("a/b")));
        assert_eq!(clean(Path::new("a/../../etc")), None);
    }
}
