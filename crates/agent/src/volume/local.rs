//! `driver: local` volumes: `<volumes dir>/<namespace>/<name>/data`.
//!
//! - Without `size`: `data` is a plain directory, made on first use.
//! - With `size`: `image` beside it is a sparse file of that size holding an ext4 filesystem
//!   (made once, `mkfs.ext4 -q -F -m 0`, no blocks reserved for root: tasks run as root), loop-
//!   mounted at `data`. The filesystem's size is the quota: a write past it fails with ENOSPC.
//!   Already mounted (an agent restart, another task): reused as is. Needs root.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use super::command::{self, Ran};
use super::{StorageError, mountinfo};

/// The file holding a sized volume's filesystem.
pub(crate) const IMAGE: &str = "image";
/// Where the volume's data is (the image's mount point, or the plain directory).
pub(crate) const DATA: &str = "data";
/// How long `mkfs.ext4` may take.
const MKFS_TIMEOUT: Duration = Duration::from_secs(120);

/// The volume's data directory, made or mounted as its `size` says. A volume that already has
/// an image keeps using it, with or without `size`.
pub(crate) async fn prepare(
    volume: &str,
    dir: &Path,
    size: Option<u64>,
    mount_timeout: Duration,
) -> Result<PathBuf, StorageError> {
    let image = dir.join(IMAGE);
    let has_image = image.exists();
    match size {
        None if !has_image => plain(dir),
        _ => sized(volume, dir, size, mount_timeout).await,
    }
}

fn plain(dir: &Path) -> Result<PathBuf, StorageError> {
    let data = dir.join(DATA);
    std::fs::create_dir_all(&data).map_err(|e| StorageError::io("creating the volume directory", &data, e))?;
    Ok(data)
}

async fn sized(volume: &str, dir: &Path, size: Option<u64>, mount_timeout: Duration) -> Result<PathBuf, StorageError> {
    let data = dir.join(DATA);
    let image = dir.join(IMAGE);
    let mounts = mountinfo::read().map_err(|e| StorageError::io("reading", "/proc/self/mountinfo", e))?;
    if mountinfo::at(&mounts, &data).is_some() {
        return Ok(data); // mounted before (an agent restart, another task): reuse
    }
    if !rustix::process::geteuid().is_root() {
        return Err(StorageError::NeedsRoot {
            volume: volume.to_string(),
            what: "a local volume with `size` needs an agent running as root (loop devices); remove `size` or run \
                   the agent as root",
        });
    }
    std::fs::create_dir_all(&data).map_err(|e| StorageError::io("creating the volume directory", &data, e))?;
    if !image.exists() {
        let Some(size) = size else {
            return Err(StorageError::local(volume, "its filesystem image has gone"));
        };
        // A plain directory with data in it is not silently hidden under a new filesystem.
        let used = std::fs::read_dir(&data)
            .map_err(|e| StorageError::io("reading the volume directory", &data, e))?
            .next()
            .is_some();
        if used {
            return Err(StorageError::local(
                volume,
                format!(
                    "{} already holds data as a plain directory (the volume was used without `size`); remove \
                     `size`, or move that data away",
                    data.display()
                ),
            ));
        }
        make_image(volume, &image, size).await?;
    } else if let (Some(size), Ok(meta)) = (size, std::fs::metadata(&image))
        && meta.len() != size
    {
        warn!(volume, image = %image.display(), have = meta.len(), want = size, "the volume keeps the size it was made with");
    }
    let (image_s, data_s) = (image.to_string_lossy(), data.to_string_lossy());
    let mounted = command::run("mount", &["-o", "loop", &image_s, &data_s], mount_timeout).await;
    let fail = |detail: String| StorageError::local(volume, format!("mounting its filesystem image failed: {detail}"));
    match mounted.map_err(&fail)? {
        Ran::Ok => {
            info!(volume, data = %data.display(), "mounted the local volume's filesystem");
            Ok(data)
        }
        r @ Ran::Failed { .. } => Err(fail(r.said())),
        r @ Ran::TimedOut { .. } => {
            let _ = super::unmount(&data);
            Err(fail(format!("`mount -o loop` did not finish within {mount_timeout:?} {}", r.said())))
        }
    }
}

/// A sparse file of `size` bytes with an ext4 filesystem, made under a temporary name and
/// renamed into place, so a half-made image is never mounted.
async fn make_image(volume: &str, image: &Path, size: u64) -> Result<(), StorageError> {
    let tmp = image.with_extension("tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(StorageError::io("removing", &tmp, e)),
    }
    let file = std::fs::File::create(&tmp).map_err(|e| StorageError::io("creating", &tmp, e))?;
    file.set_len(size).map_err(|e| StorageError::io("sizing", &tmp, e))?;
    drop(file);
    let tmp_s = tmp.to_string_lossy();
    let made = command::run("mkfs.ext4", &["-q", "-F", "-m", "0", "-E", "nodiscard", &tmp_s], MKFS_TIMEOUT).await;
    let fail = |detail: String| {
        let _ = std::fs::remove_file(&tmp);
        StorageError::local(
            volume,
            format!("making its filesystem failed: {detail}; check that e2fsprogs (mkfs.ext4) is installed"),
        )
    };
    match made.map_err(fail)? {
        Ran::Ok => {}
        r @ Ran::Failed { .. } => return Err(fail(r.said())),
        Ran::TimedOut { .. } => return Err(fail(format!("mkfs.ext4 did not finish within {MKFS_TIMEOUT:?}"))),
    }
    std::fs::rename(&tmp, image).map_err(|e| StorageError::io("renaming the filesystem image to", image, e))?;
    info!(volume, image = %image.display(), size, "made the local volume's filesystem");
    Ok(())
}
