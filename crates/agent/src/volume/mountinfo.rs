//! `/proc/self/mountinfo`: what is mounted where, read without touching the mounts themselves
//! (a `stat` of a FUSE mount whose server is gone can hang; reading this file never does).

use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// `ext4`, `tmpfs`, `fuse.glusterfs`...
    pub fstype: String,
    /// What is mounted (`/dev/loop3`, `server:/volume`, `tmpfs`).
    pub source: String,
    /// The filesystem's own options (for a cgroup v1 mount, its controllers).
    pub super_options: Vec<String>,
}

/// Parses mountinfo text (see proc(5)); lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let mut rest = after.split(' ');
            let fstype = rest.next()?;
            let source = rest.next().unwrap_or("");
            let super_options = rest.next().unwrap_or("").split(',').map(str::to_string).collect();
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: unescape(fstype),
                source: unescape(source),
                super_options,
            })
        })
        .collect()
}

/// The mounts of this process's mount namespace.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse(&t))
}

/// The mount on top at exactly `path` (the last one mounted there), if any.
pub fn at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

/// Whether something is mounted at exactly `path`; false when mountinfo cannot be read.
pub fn is_mounted(path: &Path) -> bool {
    read().is_ok_and(|m| at(&m, path).is_some())
}

/// The kernel writes space, tab, newline and backslash as `\ooo` octal escapes.
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
45 27 254:0 /var/lib/docker /var/lib/docker rw,relatime shared:1 - ext4 /dev/vda rw
51 27 0:41 / /var/lib/berth/volumes/default/shared/gluster rw,relatime - fuse.glusterfs 198.18.200.2:/gv1 rw,user_id=0
52 27 7:3 / /var/lib/berth/volumes/default/db/data rw,relatime - ext4 /dev/loop3 rw
53 27 0:50 / /tmp/with\\040space rw - tmpfs tmpfs rw
54 52 0:51 / /var/lib/berth/volumes/default/db/data rw - tmpfs over rw
garbage line
";

    #[test]
    fn parses_mount_points_types_and_sources() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 6);
        assert_eq!(m[2].fstype, "fuse.glusterfs");
        assert_eq!(m[2].source, "198.18.200.2:/gv1");
        assert_eq!(m[2].mount_point, Path::new("/var/lib/berth/volumes/default/shared/gluster"));
        assert_eq!(m[4].mount_point, Path::new("/tmp/with space"));
        // The mount on top wins.
        let top = at(&m, Path::new("/var/lib/berth/volumes/default/db/data")).unwrap();
        assert_eq!((top.fstype.as_str(), top.source.as_str()), ("tmpfs", "over"));
        assert!(at(&m, Path::new("/var/lib/berth/volumes")).is_none());
    }

    #[test]
    fn this_process_sees_its_root() {
        let m = read().unwrap();
        assert!(at(&m, Path::new("/")).is_some());
    }
}
