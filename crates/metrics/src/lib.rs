//! The metrics endpoint every berth process can serve: `/metrics` in the Prometheus text format
//! (OpenMetrics when the scraper asks for it), `/healthz` (the process is alive and serving) and
//! `/readyz` (it can do its job: what that means is the process's own [`Health`]).
//!
//! Metrics are `prometheus-client` handles, registered once at start in one [`Registry`] and
//! updated where things happen; figures that already live elsewhere (Raft's, the store's) are
//! copied into gauges by [`Health::refresh`] just before each scrape, so they cost nothing between
//! scrapes. The endpoint is plain HTTP without authentication, like etcd's
//! `--listen-metrics-urls`: bind it to an address only the monitoring network reaches.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::future::BoxFuture;
pub use prometheus_client;
use prometheus_client::{
    encoding::{prometheus_text, text},
    metrics::{
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_util::sync::CancellationToken;

/// A float gauge (seconds, ratios).
pub type GaugeF = Gauge<f64, std::sync::atomic::AtomicU64>;

/// A latency histogram in seconds: 100 µs to about 13 s, doubling.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// A histogram of counts or sizes: 1 to 32,768, doubling.
pub fn count_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// A histogram of byte sizes: 1 KiB to 4 GiB, quadrupling.
pub fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1024.0, 4.0, 12))
}

/// What the endpoint asks the process it serves.
pub trait Health: Send + Sync + 'static {
    /// Brings the gauges that are read at scrape time up to date; called before every `/metrics`.
    fn refresh(&self) {}

    /// Whether the process can do its job: `Ok(what)` or `Err(why not)`, both one line for a
    /// human. It may wait a little (a master waits to apply up to the leader's commit index), and
    /// is bounded by the endpoint.
    fn ready(&self) -> BoxFuture<'_, Result<String, String>>;
}

/// The longest a `/readyz` may take before it answers "not ready".
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds the metrics address, with an error that says which flag to change.
pub async fn bind(addr: &str, flag: &str) -> Result<tokio::net::TcpListener, String> {
    let sock: std::net::SocketAddr =
        addr.parse().map_err(|e| format!("{flag} {addr:?} is not IP:PORT ({e}); for example {flag} 127.0.0.1:9101"))?;
    tokio::net::TcpListener::bind(sock)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({flag}): {e}; pick another address or port"))
}

struct Shared {
    registry: Registry,
    process: ProcessMetrics,
    health: Arc<dyn Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` fires. `registry`
/// gets the process figures (`process_*`) added.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut registry: Registry,
    health: Arc<dyn Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let process = ProcessMetrics::register(&mut registry);
    let shared = Arc::new(Shared { registry, process, health });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (StatusCode::NOT_FOUND, "not found: this endpoint serves /metrics, /healthz and /readyz\n")
        })
        .with_state(shared);
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// Encodes the registry as the scraper prefers: OpenMetrics if its Accept header names it, else
/// the Prometheus text format 0.0.4 (what every Prometheus and most tools read).
pub fn encode(registry: &Registry, openmetrics: bool) -> Result<(String, &'static str), std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    if openmetrics {
        text::encode(&mut out, registry)?;
        Ok((out, "application/openmetrics-text; version=1.0.0; charset=utf-8"))
    } else {
        prometheus_text::encode(&mut out, registry)?;
        Ok((out, prometheus_text::CONTENT_TYPE))
    }
}

async fn metrics(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    s.health.refresh();
    s.process.refresh();
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match encode(&s.registry, openmetrics) {
        Ok((body, content_type)) => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the metrics failed: {e}\n")).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    match tokio::time::timeout(READY_TIMEOUT, s.health.ready()).await {
        Ok(Ok(what)) => (StatusCode::OK, format!("ready: {what}\n")).into_response(),
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the readiness check did not finish within {READY_TIMEOUT:?}\n"),
        )
            .into_response(),
    }
}

/// Tells the service manager (systemd's `Type=notify`, through `$NOTIFY_SOCKET`) that the
/// process is ready, with a status line; does nothing when there is none. A failure is returned
/// for the caller to log: readiness is a courtesy to the supervisor, never a reason to stop.
pub fn notify_ready(status: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let msg = format!("READY=1\nSTATUS={}\n", status.replace('\n', " "));
    let bytes = path.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        // An abstract socket (systemd's default in containers and for user managers).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(msg.as_bytes(), std::path::Path::new(&path))?;
        }
    }
    Ok(())
}

/// The process's own figures, from /proc/self, refreshed at every scrape (the names node
/// exporters and Prometheus' client libraries use).
struct ProcessMetrics {
    resident: Gauge,
    cpu: GaugeF,
    open_fds: Gauge,
    threads: Gauge,
    start_time: GaugeF,
}

impl ProcessMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = ProcessMetrics {
            resident: Gauge::default(),
            cpu: GaugeF::default(),
            open_fds: Gauge::default(),
            threads: Gauge::default(),
            start_time: GaugeF::default(),
        };
        r.register("process_resident_memory_bytes", "Resident memory size in bytes", m.resident.clone());
        // A counter by nature, exposed as a gauge: it is read from /proc, never incremented here.
        r.register("process_cpu_seconds", "User and system CPU time spent, in seconds", m.cpu.clone());
        r.register("process_open_fds", "Open file descriptors", m.open_fds.clone());
        r.register("process_threads", "OS threads", m.threads.clone());
        r.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            m.start_time.clone(),
        );
        m.refresh();
        m
    }

    fn refresh(&self) {
        if let Some(s) = ProcStat::read() {
            let ticks = rustix::param::clock_ticks_per_second() as f64;
            self.cpu.set((s.utime + s.stime) as f64 / ticks);
            self.threads.set(s.threads);
            if let Some(boot) = boot_time() {
                self.start_time.set(boot as f64 + s.starttime as f64 / ticks);
            }
        }
        if let Some(kib) = status_kib("VmRSS:") {
            self.resident.set(kib * 1024);
        }
        if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(d.count() as i64);
        }
    }
}

struct ProcStat {
    utime: u64,
    stime: u64,
    threads: i64,
    starttime: u64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        let t = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which may itself hold spaces and parentheses.
        let rest: Vec<&str> = t.rsplit_once(')')?.1.split_whitespace().collect();
        // rest[0] is field 3 (state): field N is rest[N - 3].
        Some(ProcStat {
            utime: rest.get(11)?.parse().ok()?,
            stime: rest.get(12)?.parse().ok()?,
            threads: rest.get(17)?.parse().ok()?,
            starttime: rest.get(19)?.parse().ok()?,
        })
    }
}

fn status_kib(field: &str) -> Option<i64> {
    let t = std::fs::read_to_string("/proc/self/status").ok()?;
    t.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn boot_time() -> Option<u64> {
    let t = std::fs::read_to_string("/proc/stat").ok()?;
    t.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::metrics::{counter::Counter, family::Family};

    use super::*;

    struct Fixed(Result<String, String>);

    impl Health for Fixed {
        fn ready(&self) -> BoxFuture<'_, Result<String, String>> {
            Box::pin(async move { self.0.clone() })
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str, accept: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let ctype = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string))
            .unwrap_or_default();
        (code, ctype, body.to_string())
    }

    #[tokio::test]
    async fn serves_parseable_metrics_and_health() {
        let mut reg = Registry::default();
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        reg.register("berth_test_requests", "Requests", requests.clone());
        let latency = seconds_histogram();
        reg.register("berth_test_seconds", "Latency", latency.clone());
        requests.get_or_create(&vec![("method".into(), "/berth.KV/Put".into())]).inc_by(3);
        latency.observe(0.002);
        let listener = bind("127.0.0.1:0", "--metrics-listen").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, reg, Arc::new(Fixed(Err("no leader".into()))), stop.clone()));

        let (code, ctype, body) = get(addr, "/metrics", "*/*").await;
        assert_eq!(code, 200);
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
        let value = |name: &str| scrape.samples.iter().find(|s| s.metric == name).map(|s| s.value.clone());
        assert!(matches!(value("berth_test_requests_total"), Some(prometheus_parse::Value::Counter(v)) if v == 3.0));
        assert!(matches!(value("berth_test_seconds"), Some(prometheus_parse::Value::Histogram(_))), "{body}");
        assert!(matches!(value("process_resident_memory_bytes"), Some(prometheus_parse::Value::Gauge(v)) if v > 0.0));

        let (_, ctype, body) = get(addr, "/metrics", "application/openmetrics-text;version=1.0.0").await;
        assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
        assert!(body.ends_with("# EOF\n"));

        assert_eq!(get(addr, "/healthz", "*/*").await.0, 200);
        let (code, _, body) = get(addr, "/readyz", "*/*").await;
        assert_eq!((code, body.as_str()), (503, "not ready: no leader\n"));
        let (code, _, body) = get(addr, "/nope", "*/*").await;
        assert_eq!(code, 404);
        assert!(body.contains("/metrics"));

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap().unwrap();
    }

    /// The service manager's side: this test binds the socket and runs `notify_child` in a
    /// child process with NOTIFY_SOCKET set (the environment of this process stays untouched).
    #[test]
    fn readiness_reaches_the_service_manager() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let manager = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::notify_child"])
            .env("NOTIFY_SOCKET", &path)
            .env("BERTH_NOTIFY_CHILD", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        manager.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving on 127.0.0.1:7001\n");
    }

    #[test]
    fn notify_child() {
        if std::env::var_os("BERTH_NOTIFY_CHILD").is_some() {
            notify_ready("serving on\n127.0.0.1:7001").unwrap();
        } else {
            assert!(notify_ready("no manager").is_ok(), "without NOTIFY_SOCKET it does nothing");
        }
    }

    #[tokio::test]
    async fn a_bad_address_says_which_flag() {
        let e = bind("localhost:99999", "--metrics-listen").await.unwrap_err();
        assert!(e.contains("--metrics-listen") && e.contains("IP:PORT"), "{e}");
    }
}
