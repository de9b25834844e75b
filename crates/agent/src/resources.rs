//! What this host offers: CPU, memory and disk.

use std::path::Path;

use berth_api::pb::agent::Resources;

/// Detects the host's resources. Unknown values are 0 (and logged).
pub fn detect(data_dir: &Path) -> Resources {
    let cpu_millis = std::thread::available_parallelism().map(|n| n.get() as u64 * 1000).unwrap_or_else(|e| {
        tracing::warn!("cannot count the CPUs: {e}");
        0
    });
    let memory_bytes =
        std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| mem_total(&text)).unwrap_or_else(|| {
            tracing::warn!("cannot read MemTotal from /proc/meminfo");
            0
        });
    let disk_bytes = disk_total(data_dir).unwrap_or_else(|e| {
        tracing::warn!("cannot measure the filesystem holding {}: {e}", data_dir.display());
        0
    });
    Resources { cpu_millis, memory_bytes, disk_bytes }
}

/// `MemTotal` of /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let factor = match words.next() {
        Some("kB") | Some("KB") | Some("kb") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(factor)
}

/// Total size of the filesystem holding `dir` (or its nearest existing ancestor: the data
/// directory does not exist before the first join).
fn disk_total(dir: &Path) -> std::io::Result<u64> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p,
            _ => {
                probe = Path::new(".");
                break;
            }
        }
    }
    let st = rustix::fs::statvfs(probe)?;
    Ok(st.f_blocks.saturating_mul(st.f_frsize))
}

/// The host name (the default node name).
pub fn hostname() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().trim().to_string();
    if name.is_empty() { "node".to_string() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:       16318412 kB\nMemFree:         1234 kB\n";
        assert_eq!(mem_total(text), Some(16318412 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn detects_something_on_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let r = detect(&dir.path().join("not/yet/created"));
        assert!(r.cpu_millis >= 1000, "{r:?}");
        assert!(r.memory_bytes > 0, "{r:?}");
        assert!(r.disk_bytes > 0, "{r:?}");
        assert!(!hostname().is_empty());
    }
}
