//! Health probes, whatever the runtime: an HTTP GET, a TCP connect or a command, each bounded by
//! the check's `timeout`, and [`HealthTracker`], which turns probe results into a health state
//! (start period, consecutive failures).
//!
//! The caller supplies the address (the runtime's `probe_addr`) and, for `exec` checks, a
//! function running a command in the task (the runtime's `exec`).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use berth_types::spec::{HealthCheck, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// Runs `check`'s probe once against `addr`, within `check.timeout`. `exec` runs a command in the
/// task with a timeout and returns its exit code (only called for `exec` checks).
///
/// `Ok(())` means healthy; the error says what failed (status code, connection refused, timeout,
/// exit code).
pub async fn probe<F, Fut>(check: &HealthCheck, addr: IpAddr, exec: F) -> Result<(), String>
where
    F: FnOnce(Vec<String>, Duration) -> Fut,
    Fut: Future<Output = Result<i32, String>>,
{
    let timeout = check.timeout;
    let Some(which) = check.probe() else {
        return Err("the health check must set exactly one of `http`, `tcp` or `exec`".to_string());
    };
    let (what, result) = match which {
        Probe::Http(h) => {
            let what = format!("HTTP GET http://{}{}", SocketAddr::new(addr, h.port), h.path);
            (what, bounded(timeout, http_get(SocketAddr::new(addr, h.port), &h.path)).await)
        }
        Probe::Tcp(t) => {
            let target = SocketAddr::new(addr, t.port);
            let what = format!("TCP connect to {target}");
            let connect = async { TcpStream::connect(target).await.map(drop).map_err(|e| io_reason(&e)) };
            (what, bounded(timeout, connect).await)
        }
        Probe::Exec(e) => {
            let what = format!("exec `{}`", e.command.join(" "));
            let run = async {
                match exec(e.command.clone(), timeout).await? {
                    0 => Ok(()),
                    code => Err(format!("exit code {code}")),
                }
            };
            (what, bounded(timeout, run).await)
        }
    };
    result.map_err(|why| format!("{what}: {why}"))
}

/// `fut`, or a timeout error after `timeout`.
async fn bounded<Fut>(timeout: Duration, fut: Fut) -> Result<(), String>
where
    Fut: Future<Output = Result<(), String>>,
{
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}", fmt_duration(timeout))),
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`: healthy on a 2xx or 3xx status.
async fn http_get(target: SocketAddr, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(target).await.map_err(|e| io_reason(&e))?;
    let host = match target {
        SocketAddr::V4(v4) => format!("{}:{}", v4.ip(), v4.port()),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    };
    let path = if path.is_empty() { "/" } else { path };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: berth-health-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending the request: {}", io_reason(&e)))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    let line_end = loop {
        if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
            break pos;
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err("the answer has no HTTP status line".to_string());
        }
        let n = stream.read(&mut chunk).await.map_err(|e| format!("reading the answer: {}", io_reason(&e)))?;
        if n == 0 {
            if buf.is_empty() {
                return Err("the connection was closed without an answer".to_string());
            }
            break buf.len();
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let line = String::from_utf8_lossy(&buf[..line_end]);
    let code = parse_status_line(&line)
        .ok_or_else(|| format!("not an HTTP answer: {:?}", line.chars().take(80).collect::<String>()))?;
    match code {
        200..=399 => Ok(()),
        code => Err(format!("status {code}")),
    }
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..=599).contains(c))
}

/// "connection refused" rather than "Connection refused (os error 111)".
fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".to_string(),
        ConnectionReset => "connection reset".to_string(),
        ConnectionAborted => "connection aborted".to_string(),
        TimedOut => "timed out".to_string(),
        HostUnreachable => "host unreachable".to_string(),
        NetworkUnreachable => "network unreachable".to_string(),
        _ => e.to_string(),
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// A task's health as its probes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No verdict yet: no probe succeeded, and not enough failures counted.
    Starting,
    /// The last probe succeeded.
    Healthy,
    /// `retries` consecutive probes failed (after the start period).
    Unhealthy,
}

/// Turns probe results into a [`Health`]:
/// - during `start_period` (from the task's start) failures do not count;
/// - a success makes the task healthy and resets the failure count;
/// - `retries` consecutive counted failures make it unhealthy (a `retries` of 0 counts as 1).
#[derive(Debug, Clone)]
pub struct HealthTracker {
    retries: u32,
    start_period: Duration,
    started: Instant,
    failures: u32,
    state: Health,
    last_error: Option<String>,
}

impl HealthTracker {
    /// A tracker for a task started at `started`.
    pub fn new(check: &HealthCheck, started: Instant) -> Self {
        HealthTracker {
            retries: check.retries.max(1),
            start_period: check.start_period,
            started,
            failures: 0,
            state: Health::Starting,
            last_error: None,
        }
    }

    /// Records one probe result observed at `now`; returns the new state when it changed.
    pub fn record(&mut self, now: Instant, result: Result<(), String>) -> Option<Health> {
        let before = self.state;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.last_error = None;
                self.state = Health::Healthy;
            }
            Err(e) => {
                self.last_error = Some(e);
                if self.in_start_period(now) {
                    return None;
                }
                self.failures = self.failures.saturating_add(1);
                if self.failures >= self.retries {
                    self.state = Health::Unhealthy;
                }
            }
        }
        (self.state != before).then_some(self.state)
    }

    /// Whether failures at `now` are still forgiven.
    pub fn in_start_period(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.started) < self.start_period
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Consecutive failures counted so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Why the last probe failed, if the last probe failed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use berth_types::spec::{ExecProbe, HttpProbe, TcpProbe};
    use tokio::net::TcpListener;

    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn check(http: Option<HttpProbe>, tcp: Option<TcpProbe>, exec: Option<ExecProbe>) -> HealthCheck {
        HealthCheck {
            http,
            tcp,
            exec,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            retries: 3,
            start_period: Duration::ZERO,
        }
    }

    fn http(port: u16, path: &str) -> HealthCheck {
        check(Some(HttpProbe { port, path: path.to_string() }), None, None)
    }

    fn tcp(port: u16) -> HealthCheck {
        check(None, Some(TcpProbe { port }), None)
    }

    fn exec_check(command: &[&str]) -> HealthCheck {
        check(None, None, Some(ExecProbe { command: command.iter().map(|s| s.to_string()).collect() }))
    }

    async fn no_exec(_: Vec<String>, _: Duration) -> Result<i32, String> {
        panic!("exec called for a network probe")
    }

    /// A real HTTP server answering every request with `status`; it records request lines.
    async fn http_server(status: &'static str) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 512];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
                    let body = "ok\n";
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        (port, rx)
    }

    /// A port nothing listens on.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn http_2xx_and_3xx_are_healthy() {
        for status in ["200 OK", "204 No Content", "301 Moved Permanently", "399 Whatever"] {
            let (port, mut requests) = http_server(status).await;
            probe(&http(port, "/healthz?x=1"), LOCAL, no_exec).await.unwrap_or_else(|e| panic!("{status}: {e}"));
            let request = requests.recv().await.unwrap();
            assert!(request.starts_with("GET /healthz?x=1 HTTP/1.1\r\n"), "{request}");
            assert!(request.contains(&format!("Host: 127.0.0.1:{port}\r\n")), "{request}");
            assert!(request.contains("Connection: close\r\n"), "{request}");
        }
    }

    #[tokio::test]
    async fn http_error_status_is_unhealthy_with_the_code() {
        for (status, code) in [("500 Internal Server Error", "500"), ("404 Not Found", "404"), ("199 Odd", "199")] {
            let (port, _requests) = http_server(status).await;
            let err = probe(&http(port, "/"), LOCAL, no_exec).await.unwrap_err();
            assert!(err.contains(&format!("status {code}")), "{err}");
            assert!(err.contains(&format!("http://127.0.0.1:{port}/")), "{err}");
        }
    }

    #[tokio::test]
    async fn http_refused_and_silent_servers_fail() {
        let port = closed_port().await;
        let err = probe(&http(port, "/"), LOCAL, no_exec).await.unwrap_err();
        assert!(err.contains("connection refused"), "{err}");

        // Accepts, never answers: bounded by the check's timeout.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = Instant::now();
        let err = probe(&http(port, "/"), LOCAL, no_exec).await.unwrap_err();
        assert!(err.contains("timed out after 500ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(listener);

        // Answers garbage, then closes.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let _ = conn.write_all(b"SSH-2.0-nope\r\n").await;
        });
        let err = probe(&http(port, "/"), LOCAL, no_exec).await.unwrap_err();
        assert!(err.contains("not an HTTP answer"), "{err}");
    }

    #[tokio::test]
    async fn tcp_connect() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        probe(&tcp(port), LOCAL, no_exec).await.unwrap();
        drop(listener);
        let err = probe(&tcp(port), LOCAL, no_exec).await.unwrap_err();
        assert!(err.contains("connection refused"), "{err}");
        assert!(err.contains(&format!("TCP connect to 127.0.0.1:{port}")), "{err}");
    }

    #[tokio::test]
    async fn exec_exit_code_decides() {
        let ok = exec_check(&["true"]);
        probe(&ok, LOCAL, |argv, timeout| async move {
            assert_eq!(argv, ["true"]);
            assert_eq!(timeout, Duration::from_millis(500));
            Ok(0)
        })
        .await
        .unwrap();
        let err = probe(&exec_check(&["false"]), LOCAL, |_, _| async { Ok(3) }).await.unwrap_err();
        assert!(err.contains("exit code 3"), "{err}");
        assert!(err.contains("exec `false`"), "{err}");
        let err =
            probe(&exec_check(&["x"]), LOCAL, |_, _| async { Err("no such container".to_string()) }).await.unwrap_err();
        assert!(err.contains("no such container"), "{err}");
        // An exec that overruns is cut at the timeout even if the runtime ignores it.
        let err = probe(&exec_check(&["sleep"]), LOCAL, |_, _| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(0)
        })
        .await
        .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }

    #[tokio::test]
    async fn a_check_without_a_probe_is_refused() {
        let err = probe(&check(None, None, None), LOCAL, no_exec).await.unwrap_err();
        assert!(err.contains("exactly one"), "{err}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line("HTTP/1.0 302"), Some(302));
        assert_eq!(parse_status_line("HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status_line("FTP 200"), None);
        assert_eq!(parse_status_line(""), None);
    }

    #[test]
    fn tracker_counts_consecutive_failures() {
        let t0 = Instant::now();
        let mut t = HealthTracker::new(&tcp(1), t0);
        let fail = || Err("connection refused".to_string());
        assert_eq!(t.state(), Health::Starting);
        assert_eq!(t.record(t0, fail()), None);
        assert_eq!(t.record(t0, fail()), None);
        assert_eq!(t.failures(), 2);
        assert_eq!(t.record(t0, Ok(())), Some(Health::Healthy));
        assert_eq!(t.failures(), 0);
        assert_eq!(t.record(t0, fail()), None);
        assert_eq!(t.record(t0, fail()), None);
        assert_eq!(t.last_error(), Some("connection refused"));
        assert_eq!(t.record(t0, fail()), Some(Health::Unhealthy));
        assert_eq!(t.record(t0, fail()), None);
        assert_eq!(t.record(t0, Ok(())), Some(Health::Healthy));
        assert_eq!(t.last_error(), None);
    }

    #[test]
    fn tracker_forgives_failures_in_the_start_period() {
        let t0 = Instant::now();
        let mut c = tcp(1);
        c.start_period = Duration::from_secs(10);
        c.retries = 1;
        let mut t = HealthTracker::new(&c, t0);
        for s in 0..10 {
            assert_eq!(t.record(t0 + Duration::from_secs(s), Err("refused".into())), None);
        }
        assert_eq!(t.failures(), 0);
        assert_eq!(t.state(), Health::Starting);
        assert!(t.in_start_period(t0 + Duration::from_millis(9_999)));
        assert!(!t.in_start_period(t0 + Duration::from_secs(10)));
        assert_eq!(t.record(t0 + Duration::from_secs(10), Err("refused".into())), Some(Health::Unhealthy));

        // A success inside the start period counts at once.
        let mut t = HealthTracker::new(&c, t0);
        assert_eq!(t.record(t0, Ok(())), Some(Health::Healthy));
    }

    #[test]
    fn zero_retries_count_as_one() {
        let t0 = Instant::now();
        let mut c = tcp(1);
        c.retries = 0;
        let mut t = HealthTracker::new(&c, t0);
        assert_eq!(t.record(t0, Err("x".into())), Some(Health::Unhealthy));
    }
}
