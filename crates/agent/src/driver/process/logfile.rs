//! The task's output: JSON lines (`{"ts_ms":..,"stream":"stdout","line":".."}`) in
//! `output.log`, rotated to `output.log.1` (newest) .. `output.log.<keep>` (oldest) when the
//! current file would pass `max_bytes`.
//!
//! The shim writes with [`RotatingLog`]; the runtime reads with [`read_initial`] and follows
//! with [`Follower`], which notices a rotation by the file's inode changing under its name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::driver::runtime::{LogLine, LogQuery};

/// Default rotation size.
pub(crate) const MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default number of rotated files kept.
pub(crate) const KEEP: usize = 3;
/// Longer lines are split into pieces of this many bytes.
pub(crate) const MAX_LINE: usize = 16 * 1024;

/// `output.log.<n>`.
pub(crate) fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{n}"));
    path.with_file_name(name)
}

/// The writer (in the shim).
#[derive(Debug)]
pub(crate) struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    size: u64,
    /// The last timestamp handed out by [`RotatingLog::stamp`].
    last_ts: i64,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl RotatingLog {
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<RotatingLog> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog { path: path.to_path_buf(), max_bytes: max_bytes.max(1), keep, file, size, last_ts: 0 })
    }

    /// The timestamp for the next line, given the wall clock's `now_ms`: never earlier than the
    /// last one, so that lines from stdout and stderr (and a wall clock stepped back) still land
    /// in the file in time order. Call it under the same lock as [`RotatingLog::append`].
    pub fn stamp(&mut self, now_ms: i64) -> i64 {
        self.last_ts = self.last_ts.max(now_ms);
        self.last_ts
    }

    /// Appends one line (one `write`, so a reader never sees half a line except at the end of
    /// a file being written), rotating first when the file would grow past the limit.
    pub fn append(&mut self, line: &LogLine) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            for n in (1..self.keep).rev() {
                match fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            fs::rename(&self.path, rotated(&self.path, 1))?;
            self.file = open_append(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// Splits off the complete lines of `buf` (parsed; unparsable ones skipped), leaving a trailing
/// partial line in it.
pub(crate) fn take_lines(buf: &mut Vec<u8>) -> Vec<LogLine> {
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else { return Vec::new() };
    let lines = buf[..end]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<LogLine>(l).ok())
        .collect();
    buf.drain(..=end);
    lines
}

/// Lines matching `since_ms`, then the last `tail` of them.
pub(crate) fn select(mut lines: Vec<LogLine>, query: &LogQuery) -> Vec<LogLine> {
    if let Some(since) = query.since_ms {
        lines.retain(|l| l.ts_ms >= since);
    }
    if let Some(tail) = query.tail {
        let skip = lines.len().saturating_sub(tail);
        lines.drain(..skip);
    }
    lines
}

/// Follows the current log file across rotations.
#[derive(Debug)]
pub(crate) struct Follower {
    path: PathBuf,
    file: Option<(File, u64)>,
    pending: Vec<u8>,
}

fn inode_of(path: &Path) -> io::Result<Option<u64>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.ino())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A log's files newest first (the current one, then `.1`, `.2`...) with their inodes (`None`:
/// no current file).
type Chain = Vec<(PathBuf, Option<u64>)>;

/// The [`Chain`] of `path`, or `None` when a rotation happened while listing it (an inode seen
/// twice).
fn chain(path: &Path) -> io::Result<Option<Chain>> {
    let mut chain = vec![(path.to_path_buf(), inode_of(path)?)];
    for n in 1.. {
        let p = rotated(path, n);
        match inode_of(&p)? {
            Some(ino) => chain.push((p, Some(ino))),
            None => break,
        }
    }
    let mut inodes: Vec<u64> = chain.iter().filter_map(|(_, ino)| *ino).collect();
    inodes.sort_unstable();
    let before = inodes.len();
    inodes.dedup();
    Ok((inodes.len() == before).then_some(chain))
}

/// Opens `path` if it still is the file with inode `ino`.
fn open_if(path: &Path, ino: u64) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) if f.metadata()?.ino() == ino => Ok(Some(f)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Follower {
    /// Opens the current file (if it exists yet) at its start.
    pub fn open(path: &Path) -> Follower {
        let file = File::open(path).ok().and_then(|f| Some((f.metadata().ok()?.ino(), f))).map(|(ino, f)| (f, ino));
        Follower { path: path.to_path_buf(), file, pending: Vec::new() }
    }

    /// The inode of the file being read.
    pub fn inode(&self) -> Option<u64> {
        self.file.as_ref().map(|(_, ino)| *ino)
    }

    /// Reads what was appended since the last call. When the file was rotated away, drains it
    /// and goes on with the next newer file (the rotated ones first if several rotations
    /// happened since the last call), up to the current one.
    pub fn poll(&mut self) -> io::Result<Vec<LogLine>> {
        let mut out = Vec::new();
        loop {
            self.read_to_end(&mut out)?;
            let current = inode_of(&self.path)?;
            if current.is_none() || current == self.inode() {
                return Ok(out);
            }
            // Rotated (or created): drain the old file, whose writes all happened before the
            // rename we just observed, then start on the next one.
            self.read_to_end(&mut out)?;
            self.pending.clear(); // a rotated file's unfinished last line stays unfinished
            match self.next_file()? {
                Some(next) => self.file = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Reads the file being followed to its end (from its start again if it was truncated).
    fn read_to_end(&mut self, out: &mut Vec<LogLine>) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        if let Some((file, _)) = &mut self.file {
            if file.metadata()?.len() < file.stream_position()? {
                file.seek(SeekFrom::Start(0))?;
                self.pending.clear();
            }
            file.read_to_end(&mut self.pending)?;
            out.extend(take_lines(&mut self.pending));
        }
        Ok(())
    }

    /// The file written after the one being followed: the rotated file just newer than it, or
    /// the current file. If it was deleted (rotated past the number kept), the oldest file left.
    fn next_file(&self) -> io::Result<Option<(File, u64)>> {
        for _ in 0..10 {
            let Some(chain) = chain(&self.path)? else { continue };
            let mine = self.inode().and_then(|m| chain.iter().position(|(_, ino)| *ino == Some(m)));
            let next = match mine {
                Some(0) => return Ok(None),
                Some(i) => i - 1,
                None => chain.len() - 1,
            };
            let (path, Some(ino)) = &chain[next] else { return Ok(None) };
            if let Some(f) = open_if(path, *ino)? {
                return Ok(Some((f, *ino)));
            }
            // Renamed meanwhile: look again.
        }
        Ok(Follower::open(&self.path).file)
    }

    /// The files older than the one being followed, newest first, opened.
    fn older_files(&self) -> io::Result<Vec<File>> {
        let Some(mine) = self.inode() else { return Ok(Vec::new()) };
        'again: for _ in 0..10 {
            let Some(chain) = chain(&self.path)? else { continue };
            // Not found: it was rotated past the number kept, and so were all older ones.
            let Some(pos) = chain.iter().position(|(_, ino)| *ino == Some(mine)) else { return Ok(Vec::new()) };
            let mut files = Vec::new();
            for (path, ino) in &chain[pos + 1..] {
                match ino.map(|ino| open_if(path, ino)).transpose()?.flatten() {
                    Some(f) => files.push(f),
                    None => continue 'again,
                }
            }
            return Ok(files);
        }
        Err(io::Error::other(format!("{} kept rotating while being read", self.path.display())))
    }
}

/// The lines already written (rotated files included, oldest first) selected by `query`, and a
/// follower positioned right after them.
pub(crate) fn read_initial(path: &Path, query: &LogQuery) -> io::Result<(Vec<LogLine>, Follower)> {
    let matches = |lines: &[LogLine]| lines.iter().filter(|l| query.since_ms.is_none_or(|s| l.ts_ms >= s)).count();
    let mut follower = Follower::open(path);
    let mut newest = follower.poll_current()?;
    let mut count = matches(&newest);
    let mut older: Vec<Vec<LogLine>> = Vec::new();
    for mut f in follower.older_files()? {
        if query.tail.is_some_and(|t| count >= t) {
            break; // the newer files hold enough
        }
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        buf.push(b'\n');
        let lines = take_lines(&mut buf);
        count += matches(&lines);
        older.push(lines);
    }
    let mut all: Vec<LogLine> = older.into_iter().rev().flatten().collect();
    all.append(&mut newest);
    Ok((select(all, query), follower))
}

impl Follower {
    /// Reads the current file to its end without looking for a rotation.
    fn poll_current(&mut self) -> io::Result<Vec<LogLine>> {
        let mut out = Vec::new();
        self.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Rewinds to the start of the current file (tests).
    #[cfg(test)]
    fn rewind(&mut self) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        if let Some((file, _)) = &mut self.file {
            file.seek(SeekFrom::Start(0))?;
        }
        self.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::runtime::LogStream;

    fn line(i: usize) -> LogLine {
        LogLine {
            ts_ms: 1000 + i as i64,
            stream: if i.is_multiple_of(2) { LogStream::Stdout } else { LogStream::Stderr },
            line: format!("line {i:04}"),
        }
    }

    #[test]
    fn stamps_never_go_back() {
        // The two pumps each read the clock; a line stamped earlier once landed after a later one
        // (the process runtime's conformance test saw lines out of order).
        let dir = tempfile::tempdir().unwrap();
        let mut log = RotatingLog::open(&dir.path().join("out"), 1 << 20, 1).unwrap();
        assert_eq!(log.stamp(100), 100);
        assert_eq!(log.stamp(99), 100, "an earlier clock reading does not go back");
        assert_eq!(log.stamp(101), 101);
    }

    fn numbers(lines: &[LogLine]) -> Vec<usize> {
        lines.iter().map(|l| l.line[5..].parse().unwrap()).collect()
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let one = serde_json::to_vec(&line(0)).unwrap().len() as u64 + 1;
        // Ten lines per file, three old files: 40 lines fit, 100 are written.
        let mut log = RotatingLog::open(&path, one * 10, 3).unwrap();
        for i in 0..100 {
            log.append(&line(i)).unwrap();
        }
        let mut names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["output.log", "output.log.1", "output.log.2", "output.log.3"]);
        for (name, first) in [("output.log", 90), ("output.log.1", 80), ("output.log.3", 60)] {
            let mut buf = fs::read(dir.path().join(name)).unwrap();
            assert!(fs::metadata(dir.path().join(name)).unwrap().len() <= one * 10);
            assert_eq!(numbers(&take_lines(&mut buf)), (first..first + 10).collect::<Vec<_>>(), "{name}");
        }

        let (all, _) = read_initial(&path, &LogQuery::default()).unwrap();
        assert_eq!(numbers(&all), (60..100).collect::<Vec<_>>());
        // `tail` within the current file does not need the old ones; across files it does.
        let (tail, _) = read_initial(&path, &LogQuery { tail: Some(5), ..Default::default() }).unwrap();
        assert_eq!(numbers(&tail), (95..100).collect::<Vec<_>>());
        let (tail, _) = read_initial(&path, &LogQuery { tail: Some(25), ..Default::default() }).unwrap();
        assert_eq!(numbers(&tail), (75..100).collect::<Vec<_>>());
        let since = LogQuery { since_ms: Some(1085), tail: Some(3), follow: false };
        assert_eq!(numbers(&read_initial(&path, &since).unwrap().0), vec![97, 98, 99]);
        let since = LogQuery { since_ms: Some(1095), ..Default::default() };
        assert_eq!(numbers(&read_initial(&path, &since).unwrap().0), (95..100).collect::<Vec<_>>());

        // A reopened writer continues the current file's size.
        let log = RotatingLog::open(&path, one * 10, 3).unwrap();
        assert_eq!(log.size, one * 10);
    }

    #[test]
    fn keep_zero_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let mut log = RotatingLog::open(&path, 200, 0).unwrap();
        for i in 0..50 {
            log.append(&line(i)).unwrap();
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(fs::metadata(&path).unwrap().len() <= 200);
    }

    #[test]
    fn follower_crosses_rotations_without_losing_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let mut follower = Follower::open(&path);
        assert!(follower.poll().unwrap().is_empty(), "no file yet");
        let one = serde_json::to_vec(&line(0)).unwrap().len() as u64 + 1;
        let mut log = RotatingLog::open(&path, one * 4, 3).unwrap();
        let mut seen = Vec::new();
        for i in 0..30 {
            log.append(&line(i)).unwrap();
            // Poll every third line: rotations happen between polls.
            if i % 3 == 2 {
                seen.extend(follower.poll().unwrap());
            }
        }
        seen.extend(follower.poll().unwrap());
        assert_eq!(numbers(&seen), (0..30).collect::<Vec<_>>());
        follower.rewind().unwrap();
        assert_eq!(follower.poll().unwrap().len(), 2, "the current file holds lines 28 and 29");
    }

    #[test]
    fn follower_catches_up_over_many_rotations_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let one = serde_json::to_vec(&line(0)).unwrap().len() as u64 + 1;
        let mut log = RotatingLog::open(&path, one * 4, 10).unwrap();
        log.append(&line(0)).unwrap();
        let mut follower = Follower::open(&path);
        let mut seen = follower.poll().unwrap();
        // Seven rotations before the next poll: read through .7 .. .1 and the current file.
        for i in 1..30 {
            log.append(&line(i)).unwrap();
        }
        seen.extend(follower.poll().unwrap());
        assert_eq!(numbers(&seen), (0..30).collect::<Vec<_>>());
        // More rotations than files kept: the follower drains its own (deleted) file, skips the
        // lost ones and reads the three files kept.
        let path = dir.path().join("k.log");
        let mut log = RotatingLog::open(&path, one * 4, 2).unwrap();
        log.append(&line(0)).unwrap();
        let mut follower = Follower::open(&path);
        let mut seen = follower.poll().unwrap();
        for i in 1..30 {
            log.append(&line(i)).unwrap();
        }
        seen.extend(follower.poll().unwrap());
        assert_eq!(numbers(&seen), [0, 1, 2, 3].into_iter().chain(20..30).collect::<Vec<_>>());

        // keep = 0 truncates in place; the follower starts over.
        let path = dir.path().join("t.log");
        let mut log = RotatingLog::open(&path, one * 4, 0).unwrap();
        let mut follower = Follower::open(&path);
        for i in 0..4 {
            log.append(&line(i)).unwrap();
        }
        assert_eq!(follower.poll().unwrap().len(), 4);
        log.append(&line(4)).unwrap(); // truncates first
        assert_eq!(numbers(&follower.poll().unwrap()), vec![4]);
    }

    #[test]
    fn partial_lines_wait_for_their_newline_and_garbage_is_skipped() {
        let mut buf = b"{\"ts_ms\":1,\"stream\":\"stdout\",\"line\":\"a\"}\nnot json\n{\"ts_ms\":2,".to_vec();
        let lines = take_lines(&mut buf);
        assert_eq!(lines, vec![LogLine { ts_ms: 1, stream: LogStream::Stdout, line: "a".into() }]);
        assert_eq!(buf, b"{\"ts_ms\":2,");
        buf.extend_from_slice(b"\"stream\":\"stderr\",\"line\":\"b\"}\n");
        assert_eq!(take_lines(&mut buf)[0].stream, LogStream::Stderr);
        assert!(buf.is_empty());
        assert!(take_lines(&mut b"no newline".to_vec()).is_empty());
    }

    #[test]
    fn rotated_names() {
        assert_eq!(rotated(Path::new("/t/output.log"), 2), PathBuf::from("/t/output.log.2"));
    }
}
