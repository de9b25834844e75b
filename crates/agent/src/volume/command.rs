//! Running the system's helpers (`mount`, `mkfs.ext4`) with a bound on their time: each runs in
//! a process group of its own, which is killed whole when the bound passes, so a helper that
//! hangs (a mount helper waiting on an unreachable server) never wedges the agent.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// How a helper ended.
#[derive(Debug)]
pub(crate) enum Ran {
    /// It exited 0.
    Ok,
    /// It exited with this code (or -1 for a signal); what it wrote, trimmed.
    Failed { code: i32, output: String },
    /// It was still running after the bound and was killed.
    TimedOut { output: String },
}

impl Ran {
    /// What a failed or timed-out run said, in a few hundred characters.
    pub(crate) fn said(&self) -> String {
        match self {
            Ran::Ok => String::new(),
            Ran::Failed { code, output } if output.trim().is_empty() => format!("it exited with code {code}"),
            Ran::Failed { output, .. } | Ran::TimedOut { output } => tail(output, 400),
        }
    }
}

/// Runs `program args` with a cleared, minimal environment and no stdin; kills its process
/// group after `timeout`. `Err` when it cannot be started at all (say, not installed).
pub(crate) async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<Ran, String> {
    let path = find(program).ok_or_else(|| format!("`{program}` is not installed on this node"))?;
    let mut child = tokio::process::Command::new(&path)
        .args(args)
        .env_clear()
        .env("PATH", crate::driver::process::DEFAULT_PATH)
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {} failed: {e}", path.display()))?;
    let pgid = child.id();
    // Output is read beside the wait (a helper that fills a pipe would never exit), into buffers
    // taken once it has exited: a daemon it started may hold the pipes open for good.
    let out = collect(child.stdout.take());
    let err = collect(child.stderr.take());
    let output = move || async move {
        let (o, e) = tokio::join!(out.finish(), err.finish());
        [e, o].into_iter().filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n")
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(Ran::Ok),
        Ok(Ok(status)) => Ok(Ran::Failed { code: status.code().unwrap_or(-1), output: output().await }),
        Ok(Err(e)) => Err(format!("waiting for {} failed: {e}", path.display())),
        Err(_) => {
            if let Some(pgid) = pgid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            Ok(Ran::TimedOut { output: output().await })
        }
    }
}

/// A pipe being read (up to 64 KiB) into a buffer in the background.
struct Collected {
    buf: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Collected {
    /// What was read, once the reader reached the end of the pipe: the helper has exited, but a
    /// daemon it started may hold the pipe open for good, so the wait is bounded.
    async fn finish(self) -> String {
        if let Some(r) = self.reader {
            let _ = tokio::time::timeout(Duration::from_millis(200), r).await;
        }
        String::from_utf8_lossy(&self.buf.lock().expect("output lock")).trim().to_string()
    }
}

fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(pipe: Option<R>) -> Collected {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = pipe.map(|mut pipe| {
        let b = buf.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut chunk = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut chunk).await {
                let mut b = b.lock().expect("output lock");
                if n == 0 || b.len() >= 64 << 10 {
                    return;
                }
                b.extend_from_slice(&chunk[..n]);
            }
        })
    });
    Collected { buf, reader }
}

/// `program` in the default PATH.
fn find(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| program.into());
    }
    crate::driver::process::DEFAULT_PATH.split(':').map(|d| Path::new(d).join(program)).find(|p| p.exists())
}

/// The last `max` characters of `text`, on a line boundary when one is near.
pub(crate) fn tail(text: &str, max: usize) -> String {
    let t = text.trim();
    if t.len() <= max {
        return t.to_string();
    }
    let mut start = t.len() - max;
    while !t.is_char_boundary(start) {
        start += 1;
    }
    let cut = &t[start..];
    cut.find('\n').map_or(cut, |i| &cut[i + 1..]).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exits_failures_and_timeouts() {
        assert!(matches!(run("true", &[], Duration::from_secs(5)).await, Ok(Ran::Ok)));
        match run("sh", &["-c", "echo out; echo err >&2; exit 3"], Duration::from_secs(5)).await {
            Ok(Ran::Failed { code: 3, output }) => assert_eq!(output, "err\nout"),
            other => panic!("{other:?}"),
        }
        let t = std::time::Instant::now();
        // The group is killed: the backgrounded sleep too, which holds the pipes open.
        match run("sh", &["-c", "sleep 30 & sleep 30"], Duration::from_millis(300)).await {
            Ok(Ran::TimedOut { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(run("no-such-helper-berth", &[], Duration::from_secs(1)).await.unwrap_err().contains("not installed"));
    }

    #[test]
    fn tails_end_on_whole_lines() {
        assert_eq!(tail("a\nb\nc", 100), "a\nb\nc");
        assert_eq!(tail("first line\nsecond\nthird", 10), "third");
        assert_eq!(tail("éééé", 3), "é");
    }
}
