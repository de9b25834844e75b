//! The edge router's HAProxy: its configuration, rendered from the routes and their endpoints
//! (pure, unit-tested), and the process, which the agent starts in master-worker mode and
//! reloads with SIGUSR2 (hitless: the new workers take the listening sockets, the old ones
//! finish the connections they hold), as OpenShift's router does.
//!
//! ```text
//! frontend http          :80   plain HTTP (HTTP/1.1, h2c, WebSocket) by Host and path prefix;
//!                              redirect_http routes answer 301 to https
//! frontend https         :443  TCP: TLS passthrough routes by SNI, the rest to https-term
//!                              (only with passthrough routes)
//! frontend https-term    :443  TLS terminated with each route's certificate (crt-list, by SNI),
//!                              (or a unix socket behind `https`) ALPN h2 and http/1.1, then by
//!                              Host and path prefix
//! backend r-<ns>-<name>        HTTP to the service's endpoints (TLS again for reencrypt)
//! backend p-<ns>-<name>        TCP to the service's endpoints (passthrough)
//! ```
//!
//! Every HTTP request gets `X-Forwarded-For` (the client), `X-Forwarded-Proto` and
//! `X-Forwarded-Host`; a request whose connection to an endpoint fails is sent to another one
//! (`retry-on conn-failure` with `redispatch`: nothing of it reached the first, so this is safe
//! for any method), and one whose endpoint closed its connection without answering
//! (`empty-response`: a task killed under it) is sent again only when its method is idempotent:
//! HAProxy's L7 retries do not look at the method, so every HTTP frontend disables them for the
//! others (`IDEMPOTENT_ONLY`). A slow endpoint is not retried (no `response-timeout`): that
//! would double its load just when it is overloaded. Access logs go to HAProxy's standard output,
//! which the agent appends to `access.log`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A route with what the edge needs to serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderRoute {
    /// namespace/name
    pub key: String,
    pub host: String,
    pub path: String,
    /// "" (plain HTTP), edge, passthrough or reencrypt.
    pub termination: String,
    pub redirect_http: bool,
    /// The certificate file (edge, reencrypt).
    pub cert_file: Option<PathBuf>,
    /// address:port of every endpoint.
    pub endpoints: Vec<SocketAddr>,
}

/// Where the router listens and keeps its files.
#[derive(Clone, Debug)]
pub struct Listen {
    pub http: SocketAddr,
    pub https: SocketAddr,
    /// The run directory (tmpfs): sockets, crt-list.
    pub run_dir: PathBuf,
}

fn backend_name(prefix: &str, key: &str) -> String {
    let safe: String =
        key.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' }).collect();
    format!("{prefix}-{safe}")
}

/// `-m str` operands: hosts and paths are checked by the spec (no spaces, quotes or `#`).
fn acl_value(s: &str) -> String {
    s.replace('\\', "\\\\").replace(' ', "\\ ")
}

/// The HTTP routing rules of one frontend: redirects first, then the longest path prefix wins.
/// The rule that keeps a request with a non-idempotent method (POST, PATCH, CONNECT, any unknown
/// one) from being sent again after its endpoint received it (RFC 9110 §9.2.2).
const IDEMPOTENT_ONLY: &str = "http-request disable-l7-retry unless { method GET HEAD OPTIONS PUT DELETE TRACE }";

fn http_rules(out: &mut String, routes: &[&RenderRoute], redirect: bool) {
    let mut sorted: Vec<&&RenderRoute> = routes.iter().collect();
    sorted.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(a.key.cmp(&b.key)));
    let cond = |r: &RenderRoute| {
        format!(
            "{{ req.hdr(host),field(1,:) -i {} }}{}",
            acl_value(&r.host),
            if r.path == "/" { String::new() } else { format!(" {{ path_beg {} }}", acl_value(&r.path)) }
        )
    };
    // HAProxy runs every http-request rule before any use_backend: write them in that order.
    for r in sorted.iter().filter(|r| redirect && r.redirect_http) {
        let _ = writeln!(out, "    http-request redirect scheme https code 301 if {}", cond(r));
    }
    for r in sorted.iter().filter(|r| !(redirect && r.redirect_http)) {
        let _ = writeln!(out, "    use_backend {} if {}", backend_name("r", &r.key), cond(r));
    }
}

/// The whole configuration, and the crt-list's text.
pub fn render(listen: &Listen, routes: &[RenderRoute]) -> (String, String) {
    let mut c = String::new();
    let run = listen.run_dir.display();
    let _ = write!(
        c,
        "# Written by berth's agent: every change replaces it and reloads HAProxy.\n\
         global\n\
         \x20   log stdout format raw local0 info\n\
         \x20   stats socket {run}/admin.sock mode 600 level admin expose-fd listeners\n\
         \x20   hard-stop-after 30m\n\
         \x20   ssl-default-bind-options ssl-min-ver TLSv1.2\n\
         \x20   tune.ssl.default-dh-param 2048\n\n\
         defaults\n\
         \x20   mode http\n\
         \x20   log global\n\
         \x20   option httplog\n\
         \x20   option dontlognull\n\
         \x20   timeout connect 2s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         \x20   timeout tunnel 1h\n\
         \x20   timeout http-request 10s\n\
         \x20   timeout http-keep-alive 30s\n\
         \x20   retries 3\n\
         \x20   retry-on conn-failure empty-response\n\
         \x20   option redispatch 1\n\
         \x20   http-reuse safe\n\n"
    );
    let http: Vec<&RenderRoute> = routes.iter().filter(|r| r.termination != "passthrough").collect();
    let _ = write!(
        c,
        "frontend http\n\
         \x20   bind {}\n\
         \x20   option forwardfor\n\
         \x20   http-request set-header X-Forwarded-Proto http\n\
         \x20   http-request set-header X-Forwarded-Host %[req.hdr(host)]\n\
         \x20   {IDEMPOTENT_ONLY}\n",
        listen.http
    );
    http_rules(&mut c, &http, true);
    c.push('\n');
    let passthrough: Vec<&RenderRoute> = routes.iter().filter(|r| r.termination == "passthrough").collect();
    let terminated: Vec<&RenderRoute> = routes
        .iter()
        .filter(|r| matches!(r.termination.as_str(), "edge" | "reencrypt") && r.cert_file.is_some())
        .collect();
    let mut crt_list = String::new();
    // TLS terminated here is bound on the port itself, unless passthrough routes need the port
    // first: then a TCP frontend routes them by SNI and hands the rest to the TLS frontend over a
    // unix socket (an extra hop, taken only when needed).
    let tls_bind = if passthrough.is_empty() {
        format!("{}", listen.https)
    } else {
        format!("unix@{run}/https.sock accept-proxy")
    };
    if !passthrough.is_empty() {
        let _ = write!(
            c,
            "frontend https\n\
             \x20   mode tcp\n\
             \x20   option tcplog\n\
             \x20   bind {}\n\
             \x20   tcp-request inspect-delay 5s\n\
             \x20   tcp-request content accept if {{ req.ssl_hello_type 1 }}\n",
            listen.https
        );
        for r in &passthrough {
            let _ = writeln!(
                c,
                "    use_backend {} if {{ req.ssl_sni -m str {} }}",
                backend_name("p", &r.key),
                acl_value(&r.host)
            );
        }
        if !terminated.is_empty() {
            let _ = write!(
                c,
                "    default_backend https-term\n\n\
                 backend https-term\n\
                 \x20   mode tcp\n\
                 \x20   server term unix@{run}/https.sock send-proxy-v2\n"
            );
        }
        c.push('\n');
    }
    if !terminated.is_empty() {
        let _ = write!(
            c,
            "frontend https-term\n\
             \x20   bind {tls_bind} ssl crt-list {run}/crt-list alpn h2,http/1.1\n\
             \x20   option forwardfor\n\
                 \x20   http-request set-header X-Forwarded-Proto https\n\
             \x20   http-request set-header X-Forwarded-Host %[req.hdr(host)]\n\
             \x20   {IDEMPOTENT_ONLY}\n"
        );
        http_rules(&mut c, &terminated, false);
        for r in &terminated {
            if let Some(f) = &r.cert_file {
                let _ = writeln!(crt_list, "{} [alpn h2,http/1.1] {}", f.display(), r.host);
            }
        }
        c.push('\n');
    }
    for r in routes {
        if r.termination == "passthrough" {
            let _ = write!(c, "backend {}\n    mode tcp\n    balance roundrobin\n", backend_name("p", &r.key));
            for (i, e) in r.endpoints.iter().enumerate() {
                let _ = writeln!(c, "    server e{i} {e}");
            }
        } else {
            let _ = write!(c, "backend {}\n    balance roundrobin\n", backend_name("r", &r.key));
            let tls = if r.termination == "reencrypt" {
                format!(" ssl verify none sni str({}) alpn http/1.1", r.host)
            } else {
                String::new()
            };
            for (i, e) in r.endpoints.iter().enumerate() {
                let _ = writeln!(c, "    server e{i} {e}{tls}");
            }
        }
        c.push('\n');
    }
    (c, crt_list)
}

/// The HAProxy master process the agent runs (or adopted after a restart).
pub struct Process {
    program: PathBuf,
    config: PathBuf,
    pid_file: PathBuf,
    log_file: PathBuf,
    /// The master's CLI socket (`-S`): how a reload is known to have happened.
    master_socket: PathBuf,
    pid: Option<i32>,
}

impl Process {
    /// A process not started yet; adopts one a previous agent left running with the same
    /// configuration file.
    pub fn new(program: PathBuf, config: PathBuf, pid_file: PathBuf, log_file: PathBuf) -> Process {
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            .filter(|pid| is_ours(*pid, &config));
        let master_socket = config.with_file_name("master.sock");
        Process { program, config, pid_file, log_file, master_socket, pid }
    }

    /// How many times the master has reloaded (its `show proc` line), if it answers.
    fn reloads(&self) -> Option<u64> {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.master_socket).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_millis(300))).ok()?;
        s.write_all(b"show proc\n").ok()?;
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        // The master keeps the connection open: read until its process list is complete.
        while !text.contains("# workers") {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        text.lines().find(|l| l.split_whitespace().nth(1) == Some("master"))?.split_whitespace().nth(2)?.parse().ok()
    }

    /// SIGUSR2 to the master, then waits until it has reloaded: a signal that arrives while the
    /// master is still re-executing itself for the previous reload is lost, so each reload is
    /// confirmed (and the signal sent again if it was lost) before the configuration changes
    /// again.
    fn reload(&self, pid: i32) -> Result<(), String> {
        let before = self.reloads();
        for _ in 0..3 {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGUSR2)
                .map_err(|e| format!("reloading HAProxy (pid {pid}): {e}"))?;
            let Some(before) = before else {
                // A master without its CLI socket (started by hand): nothing to confirm with.
                return Ok(());
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while std::time::Instant::now() < deadline {
                if self.reloads().is_some_and(|n| n > before) {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        Err(format!("HAProxy (pid {pid}) did not reload after three signals; see {}", self.log_file.display()))
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid.filter(|p| is_ours(*p, &self.config))
    }

    /// Checks a configuration with `haproxy -c` (it loads the certificates too).
    pub fn check(&self, config: &Path) -> Result<(), String> {
        let out = Command::new(&self.program)
            .args(["-c", "-q", "-f"])
            .arg(config)
            .output()
            .map_err(|e| spawn_error(&self.program, &e))?;
        if out.status.success() {
            Ok(())
        } else {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stdout));
            Err(text.trim().to_string())
        }
    }

    /// Starts HAProxy with the configuration file, or reloads the running one (SIGUSR2).
    pub fn start_or_reload(&mut self) -> Result<(), String> {
        if let Some(pid) = self.pid() {
            return self.reload(pid);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(|e| format!("{}: {e}", self.log_file.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(&self.program)
            .arg("-W")
            .arg("-f")
            .arg(&self.config)
            .arg("-p")
            .arg(&self.pid_file)
            .arg("-S")
            .arg(&self.master_socket)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // Its own process group: the agent's signals (Ctrl-C in `berth dev`) do not stop it,
            // and it keeps serving while the agent restarts, as tasks do.
            .process_group(0)
            .spawn()
            .map_err(|e| spawn_error(&self.program, &e))?;
        let pid = child.id() as i32;
        // HAProxy fails at once when it cannot bind or load what the check did not catch: give
        // it a moment, and report its own words when it exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().filter(|l| l.contains("ALERT")).take(3).collect();
                return Err(format!("HAProxy exited at start ({status}): {}", tail.join(" | ")));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.pid = Some(pid);
        // Reaped by a thread of its own; the edge checks `pid()` before each reload.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }
}

fn spawn_error(program: &Path, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        format!("{} is not installed: the edge router needs HAProxy (apt-get install haproxy)", program.display())
    } else {
        format!("running {}: {e}", program.display())
    }
}

/// Whether `pid` is a HAProxy running with `config` (a pid file can outlive its process).
fn is_ours(pid: i32, config: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_haproxy = args.first().is_some_and(|a| a.ends_with(b"haproxy"));
    let config = config.as_os_str().as_encoded_bytes();
    // A zombie has an empty cmdline.
    is_haproxy && args.contains(&config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(key: &str, host: &str, path: &str, termination: &str) -> RenderRoute {
        RenderRoute {
            key: key.into(),
            host: host.into(),
            path: path.into(),
            termination: termination.into(),
            redirect_http: false,
            cert_file: matches!(termination, "edge" | "reencrypt").then(|| PathBuf::from(format!("/run/c/{key}.pem"))),
            endpoints: vec!["198.18.1.11:8080".parse().unwrap(), "198.18.2.11:8080".parse().unwrap()],
        }
    }

    /// True (and says so) when HAProxy is not installed: the tests that run it are skipped.
    fn haproxy_missing() -> bool {
        let missing = Command::new("haproxy").arg("-v").output().is_err();
        if missing {
            eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy)");
        }
        missing
    }

    /// Kills the process group of a HAProxy a test started, when the test ends (or fails).
    struct Stop(i32);

    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGKILL);
        }
    }

    fn listen() -> Listen {
        Listen { http: "0.0.0.0:80".parse().unwrap(), https: "0.0.0.0:443".parse().unwrap(), run_dir: "/run/e".into() }
    }

    #[test]
    fn plain_routes_only_have_an_http_frontend() {
        let (cfg, crt) = render(
            &listen(),
            &[route("default/a", "a.apps.test", "/", ""), route("default/b", "a.apps.test", "/api", "")],
        );
        assert!(crt.is_empty());
        assert!(!cfg.contains("frontend https"), "{cfg}");
        // The longer prefix first.
        let b = cfg
            .find("use_backend r-default-b if { req.hdr(host),field(1,:) -i a.apps.test } { path_beg /api }")
            .unwrap();
        let a = cfg.find("use_backend r-default-a if { req.hdr(host),field(1,:) -i a.apps.test }\n").unwrap();
        assert!(b < a, "{cfg}");
        assert!(cfg.contains("    server e1 198.18.2.11:8080\n"), "{cfg}");
        assert!(cfg.contains("retry-on conn-failure"), "{cfg}");
    }

    /// The rendered configuration is one HAProxy accepts, certificates included.
    #[test]
    fn haproxy_accepts_the_configuration() {
        if haproxy_missing() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["shop.apps.test".to_string()]).unwrap().self_signed(&key).unwrap();
        let pem = dir.path().join("shop.pem");
        std::fs::write(&pem, format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
        let mut edge = route("default/shop", "shop.apps.test", "/", "edge");
        edge.cert_file = Some(pem.clone());
        edge.redirect_http = true;
        let mut re = route("default/re", "shop.apps.test", "/re", "reencrypt");
        re.cert_file = Some(pem);
        let listen = Listen {
            http: "127.0.0.1:18080".parse().unwrap(),
            https: "127.0.0.1:18443".parse().unwrap(),
            run_dir: dir.path().to_path_buf(),
        };
        let routes = [
            edge,
            re,
            route("default/db", "db.apps.test", "/", "passthrough"),
            route("default/plain", "plain.apps.test", "/", ""),
            RenderRoute { endpoints: vec![], ..route("default/none", "none.apps.test", "/", "") },
        ];
        let (cfg, crt) = render(&listen, &routes);
        std::fs::write(dir.path().join("crt-list"), crt).unwrap();
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, &cfg).unwrap();
        let p = Process::new("haproxy".into(), file.clone(), dir.path().join("pid"), dir.path().join("log"));
        p.check(&file).unwrap_or_else(|e| panic!("{e}\n{cfg}"));
        // Without warnings either.
        let out = Command::new("haproxy").arg("-c").arg("-f").arg(&file).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!text.contains("WARNING") && !text.contains("ALERT"), "{text}\n{cfg}");
    }

    /// Reloads in quick succession each take effect (a SIGUSR2 that arrives while the master is
    /// still re-executing itself is lost, so each one is confirmed): the last configuration is
    /// the one served.
    #[test]
    fn rapid_reloads_all_take_effect() {
        if haproxy_missing() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let file = dir.path().join("haproxy.cfg");
        let config = |n: u32| {
            format!(
                "defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n\
                 frontend f\n    bind 127.0.0.1:{port}\n    http-request return status 200 content-type text/plain \
                 string gen-{n}\n"
            )
        };
        let mut p = Process::new("haproxy".into(), file.clone(), dir.path().join("pid"), dir.path().join("log"));
        let get = || -> Option<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text)
        };
        std::fs::write(&file, config(0)).unwrap();
        p.start_or_reload().unwrap();
        let _stop = Stop(p.pid().unwrap());
        for n in 1..=5 {
            std::fs::write(&file, config(n)).unwrap();
            p.start_or_reload().unwrap();
        }
        assert_eq!(p.reloads(), Some(5));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = get().unwrap_or_default();
            if text.contains("gen-5") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the last configuration is not served: {text}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A request whose endpoint closes the connection without answering is sent again when its
    /// method is idempotent, and never when it is not (a POST reaches the task once).
    #[test]
    fn only_idempotent_requests_are_sent_again() {
        use std::io::{Read, Write};
        if haproxy_missing() {
            return;
        }
        // The endpoint: reads a request's head, notes its method, closes without answering.
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = backend.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let noted = seen.clone();
        std::thread::spawn(move || {
            for conn in backend.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let method = String::from_utf8_lossy(&head).split(' ').next().unwrap_or_default().to_string();
                if !method.is_empty() {
                    noted.lock().unwrap().push(method);
                }
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen = Listen {
            http: format!("127.0.0.1:{port}").parse().unwrap(),
            https: "127.0.0.1:1".parse().unwrap(),
            run_dir: dir.path().to_path_buf(),
        };
        let r = RenderRoute { endpoints: vec![endpoint], ..route("default/r", "r.apps.test", "/", "") };
        let (cfg, _) = render(&listen, &[r]);
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, &cfg).unwrap();
        let mut p = Process::new("haproxy".into(), file, dir.path().join("pid"), dir.path().join("log"));
        p.start_or_reload().unwrap_or_else(|e| panic!("{e}\n{cfg}"));
        let _stop = Stop(p.pid().unwrap());
        let status = |request: &str| -> String {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                    let mut text = String::new();
                    if s.write_all(request.as_bytes()).is_ok() && s.read_to_string(&mut text).is_ok() {
                        return text.lines().next().unwrap_or_default().to_string();
                    }
                }
                assert!(std::time::Instant::now() < deadline, "HAProxy does not answer on port {port}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        };
        let post = "POST / HTTP/1.1\r\nHost: r.apps.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
        assert!(status(post).contains(" 502 "), "a POST the endpoint dropped is a 502");
        let posts = seen.lock().unwrap().iter().filter(|m| *m == "POST").count();
        assert_eq!(posts, 1, "a POST reached the endpoint {posts} times: it was sent again\n{cfg}");
        assert!(status("GET / HTTP/1.1\r\nHost: r.apps.test\r\nConnection: close\r\n\r\n").contains(" 502 "));
        let gets = seen.lock().unwrap().iter().filter(|m| *m == "GET").count();
        assert_eq!(gets, 4, "a GET is sent again up to `retries 3` times");
    }

    #[test]
    fn tls_without_passthrough_binds_the_port() {
        let (cfg, _) = render(&listen(), &[route("default/shop", "shop.apps.test", "/", "edge")]);
        assert!(!cfg.contains("mode tcp"), "{cfg}");
        assert!(cfg.contains("bind 0.0.0.0:443 ssl crt-list /run/e/crt-list alpn h2,http/1.1"), "{cfg}");
    }

    #[test]
    fn tls_routes() {
        let mut edge = route("default/shop", "shop.apps.test", "/", "edge");
        edge.redirect_http = true;
        let pass = route("default/db", "db.apps.test", "/", "passthrough");
        let re = route("default/re", "re.apps.test", "/", "reencrypt");
        let (cfg, crt) = render(&listen(), &[edge, pass, re]);
        assert!(
            cfg.contains(
                "http-request redirect scheme https code 301 if { req.hdr(host),field(1,:) -i shop.apps.test }"
            ),
            "{cfg}"
        );
        assert!(cfg.contains("use_backend p-default-db if { req.ssl_sni -m str db.apps.test }"), "{cfg}");
        assert!(cfg.contains("backend p-default-db\n    mode tcp"), "{cfg}");
        assert!(cfg.contains("server e0 198.18.1.11:8080 ssl verify none sni str(re.apps.test)"), "{cfg}");
        assert_eq!(
            crt,
            "/run/c/default/shop.pem [alpn h2,http/1.1] shop.apps.test\n/run/c/default/re.pem [alpn h2,http/1.1] re.apps.test\n"
        );
        // Passthrough hosts are not served over plain HTTP.
        assert!(!cfg.contains("r-default-db"), "{cfg}");
    }
}
