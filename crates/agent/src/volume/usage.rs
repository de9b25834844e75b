//! How full a volume is: `statvfs` for a filesystem of its own (a sized local volume's image, a
//! GlusterFS mount); for a plain directory (a local volume without `size`, a host path) the
//! space its files take, from a bounded walk, against its host filesystem's capacity.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Measure {
    /// A filesystem of its own, mounted here.
    Fs(PathBuf),
    /// A directory on a shared filesystem.
    Dir(PathBuf),
}

/// At most this many entries are visited per directory measured; past that the figure is what
/// was counted so far (a lower bound).
pub(crate) const WALK_LIMIT: usize = 100_000;

/// `(used, capacity)` in bytes, or `None` when it cannot be measured.
pub(crate) fn measure(m: &Measure) -> Option<(u64, u64)> {
    match m {
        Measure::Fs(p) => {
            let s = rustix::fs::statvfs(p).ok()?;
            Some((s.f_blocks.saturating_sub(s.f_bfree) * s.f_frsize, s.f_blocks * s.f_frsize))
        }
        Measure::Dir(p) => {
            let s = rustix::fs::statvfs(p).ok()?;
            let (used, _complete) = walk(p, WALK_LIMIT);
            Some((used, s.f_blocks * s.f_frsize))
        }
    }
}

/// The bytes the files under `dir` take on disk (allocated blocks, so sparse files count what
/// they hold), not following links nor crossing into other filesystems, visiting at most
/// `limit` entries; and whether every entry was visited.
pub(crate) fn walk(dir: &Path, limit: usize) -> (u64, bool) {
    let Ok(root) = std::fs::symlink_metadata(dir) else { return (0, true) };
    let dev = root.dev();
    let mut used = root.blocks() * 512;
    let mut seen = 1usize;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            if seen >= limit {
                return (used, false);
            }
            seen += 1;
            let Ok(meta) = e.metadata() else { continue };
            if meta.dev() != dev {
                continue;
            }
            used += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (used, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_counts_allocated_bytes_and_stops_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (empty, complete) = walk(dir.path(), 100);
        assert!(complete);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a"), vec![1u8; 1 << 20]).unwrap();
        // A sparse file takes (almost) nothing.
        std::fs::File::create(dir.path().join("sparse")).unwrap().set_len(1 << 30).unwrap();
        let (used, complete) = walk(dir.path(), 100);
        assert!(complete);
        assert!(used >= empty + (1 << 20) && used < empty + (2 << 20), "{used}");
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        assert!(!walk(dir.path(), 5).1);
        let (used, capacity) = measure(&Measure::Dir(dir.path().into())).unwrap();
        assert!(used >= 1 << 20 && capacity > used, "{used} of {capacity}");
        let (used, capacity) = measure(&Measure::Fs(dir.path().into())).unwrap();
        assert!(capacity >= used && capacity > 0);
        assert_eq!(measure(&Measure::Fs(dir.path().join("none"))), None);
    }
}
