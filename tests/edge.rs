//! The edge: routes by host name through real edge agents (HAProxy), TLS terminated at the edge
//! with a certificate from a secret and passed through to the tasks, redirects, the forwarded
//! headers, a task killed under load, a route change reaching every edge, the apps domain's DNS
//! and a drained edge leaving it, and the errors for bad routes. Three hosts (network
//! namespaces): two edges and one that runs the services; every address from 198.18.0.0/15.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_tests::{Cluster, apply, berth_ok, refused, wait_for};
use serde_json::Value;

const POOLS: &[&str] = &["--address-pool", "198.18.0.0/16", "--vip-pool", "198.19.0.0/20"];
const DOMAIN: &str = "apps.example.test";

/// The tasks' web server: answers JSON with its task id and the forwarded headers, `/slow`
/// streams for two seconds; over TLS when given a certificate file.
const SERVER_PY: &str = r#"
import http.server, json, os, socketserver, ssl, sys, time
port = int(sys.argv[1]); cert = sys.argv[2] if len(sys.argv) > 2 else None
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            import base64, hashlib
            key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            self.send_response(101); self.send_header("Upgrade", "websocket"); self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
            self.end_headers(); self.wfile.flush()
            while True:
                b = self.connection.recv(4096)
                if not b: return
                self.connection.sendall(b)
        if self.path.startswith("/slow"):
            self.send_response(200); self.send_header("Transfer-Encoding", "chunked"); self.end_headers()
            for i in range(20):
                c = ("%d\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c)); self.wfile.flush(); time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n"); return
        body = json.dumps({"task": os.environ.get("BERTH_TASK_ID"), "service": os.environ.get("BERTH_SERVICE"),
            "path": self.path, "xff": self.headers.get("X-Forwarded-For"),
            "proto": self.headers.get("X-Forwarded-Proto"), "host": self.headers.get("X-Forwarded-Host")}).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
srv = S(("0.0.0.0", port), H)
if cert:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

const SERVICES: &str = r#"
kind: Service
metadata: {name: blog}
spec:
  replicas: 2
  task:
    runtime: process
    command: [/usr/bin/python3, /srv/server.py, "8080"]
    configs: [{source: server-py, target: /srv/server.py}]
    ports: [{name: http, container: 8080}]
    health: {http: {port: 8080, path: /}, interval: 1s}
  placement: {constraints: ["node.name == work"]}
---
kind: Service
metadata: {name: shop}
spec:
  replicas: 1
  task:
    runtime: process
    command: [/usr/bin/python3, /srv/server.py, "8080"]
    configs: [{source: server-py, target: /srv/server.py}]
    ports: [{container: 8080}]
    health: {http: {port: 8080, path: /}, interval: 1s}
  placement: {constraints: ["node.name == work"]}
---
kind: Service
metadata: {name: vault}
spec:
  replicas: 1
  task:
    runtime: process
    command: [/usr/bin/python3, /srv/server.py, "8443", /run/secrets/vault-cert]
    configs: [{source: server-py, target: /srv/server.py}]
    secrets: [vault-cert]
    ports: [{name: https, container: 8443}]
    health: {tcp: {port: 8443}, interval: 1s}
  placement: {constraints: ["node.name == work"]}
---
kind: Route
metadata: {name: blog}
spec: {host: blog.apps.example.test, service: blog, port: http}
---
kind: Route
metadata: {name: shop}
spec:
  host: shop.apps.example.test
  service: shop
  port: 8080
  tls: {termination: edge, secret: shop-cert}
  redirect_http: true
---
kind: Route
metadata: {name: vault}
spec:
  host: vault.apps.example.test
  service: vault
  port: https
  tls: {termination: passthrough}
---
kind: Route
metadata: {name: secure}
spec:
  host: secure.apps.example.test
  service: vault
  port: 8443
  tls: {termination: reencrypt, secret: secure-cert}
"#;

fn sh(program: &str, args: &[&str], dir: &Path) -> Result<String> {
    let out =
        Command::new(program).args(args).current_dir(dir).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A test CA, and a certificate for `host` signed by it with its key, in one PEM file.
fn certificate(dir: &Path, host: &str) -> Result<std::path::PathBuf> {
    if !dir.join("ca.pem").exists() {
        sh(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=berth test CA",
            ],
            dir,
        )?;
    }
    std::fs::write(dir.join(format!("{host}.ext")), format!("subjectAltName=DNS:{host}\n"))?;
    sh(
        "openssl",
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{host}.key"),
            "-out",
            &format!("{host}.csr"),
            "-subj",
            &format!("/CN={host}"),
        ],
        dir,
    )?;
    sh(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &format!("{host}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{host}.crt"),
            "-extfile",
            &format!("{host}.ext"),
        ],
        dir,
    )?;
    let pem = format!(
        "{}{}",
        std::fs::read_to_string(dir.join(format!("{host}.crt")))?,
        std::fs::read_to_string(dir.join(format!("{host}.key")))?
    );
    let path = dir.join(format!("{host}.pem"));
    std::fs::write(&path, pem)?;
    Ok(path)
}

/// One HTTP/1.1 GET to `addr` with `Host: host`: (status, headers and body as text).
fn get(addr: &str, host: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

fn body_json(text: &str) -> Option<Value> {
    serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()
}

/// curl over TLS to `edge`, with `host` resolved to it: (HTTP version, body).
fn curl_tls(edge: &str, host: &str, ca: &Path, extra: &[&str]) -> Option<(String, String)> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--resolve", &format!("{host}:443:{edge}"), "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_version}"])
        .args(extra)
        .arg(format!("https://{host}/tls"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n')?;
    Some((version.to_string(), body.to_string()))
}

/// An A query for `name` to `server`: the addresses answered, or the response code.
fn dns_a(server: &str, name: &str) -> Result<std::result::Result<Vec<Ipv4Addr>, u8>> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(&q, server)?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf)?;
    let r = &buf[..n];
    let rcode = r[3] & 0x0f;
    if rcode != 0 {
        return Ok(Err(rcode));
    }
    let answers = u16::from_be_bytes([r[6], r[7]]);
    // Skip the question.
    let mut i = 12;
    while r[i] != 0 {
        i += 1 + r[i] as usize;
    }
    i += 5;
    let mut out = Vec::new();
    for _ in 0..answers {
        // A compressed name (a pointer), then type, class, TTL, length, data.
        i += if r[i] & 0xc0 == 0xc0 { 2 } else { bail!("an uncompressed answer name") };
        let rtype = u16::from_be_bytes([r[i], r[i + 1]]);
        let len = u16::from_be_bytes([r[i + 8], r[i + 9]]) as usize;
        i += 10;
        if rtype == 1 && len == 4 {
            out.push(Ipv4Addr::new(r[i], r[i + 1], r[i + 2], r[i + 3]));
        }
        i += len;
    }
    out.sort();
    Ok(Ok(out))
}

#[test]
fn routes_serve_host_names_through_the_edges() -> Result<()> {
    if !berth_tests::is_root() {
        eprintln!("skipped: test hosts are network namespaces, which need root");
        return Ok(());
    }
    let hosts = berth_tests::Hosts::new(3)?;
    let args: Vec<&str> = POOLS.iter().copied().chain(["--apps-domain", DOMAIN]).collect();
    let c = Cluster::start_on(3, &hosts.root_addr(), &args)?;
    let dir = c.dir.path().to_path_buf();
    let t = berth_tests::token(&c, &["--uses", "10"])?;
    let mut agents = Vec::new();
    for (i, name) in ["edge-a", "edge-b", "work"].iter().enumerate() {
        let extra: &[&str] = if i < 2 { &["--edge", "--apps-domain", DOMAIN] } else { &[] };
        agents.push(berth_tests::spawn_agent_on_with(&hosts, i, &c, &dir.join(name), name, &t, extra)?);
    }
    let (edge_a, edge_b) = (hosts.addr(0), hosts.addr(1));
    wait_for(Duration::from_secs(60), "three ready nodes that attach networks", || {
        let ns = c.berth_json(&["get", "nodes"]).ok()?;
        let ok = ns.as_array()?.iter().filter(|n| n["status"] == "ready" && n["networks"] == true).count();
        (ok == 3).then_some(())
    })?;
    let dump = |c: &Cluster| {
        eprintln!("routes: {:#}", c.berth_json(&["get", "routes"]).unwrap_or_default());
        for name in ["edge-a", "edge-b", "work"] {
            let log = std::fs::read_to_string(c.dir.path().join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("--- {name}.log (last lines, newest first)\n{}", tail.join("\n"));
            let access = std::fs::read_to_string(c.dir.path().join(name).join("edge/access.log")).unwrap_or_default();
            let tail: Vec<&str> = access.lines().rev().take(10).collect();
            eprintln!("--- {name} access.log (newest first)\n{}", tail.join("\n"));
        }
    };

    // Files the tasks and routes use.
    std::fs::write(dir.join("server.py"), SERVER_PY)?;
    berth_ok(&c, &["config", "create", "server-py", "--from-file", &dir.join("server.py").to_string_lossy()])?;
    let shop_pem = certificate(&dir, "shop.apps.example.test")?;
    let vault_pem = certificate(&dir, "vault.apps.example.test")?;
    berth_ok(&c, &["secret", "create", "shop-cert", "--from-file", &shop_pem.to_string_lossy()])?;
    berth_ok(&c, &["secret", "create", "vault-cert", "--from-file", &vault_pem.to_string_lossy()])?;
    let secure_pem = certificate(&dir, "secure.apps.example.test")?;
    berth_ok(&c, &["secret", "create", "secure-cert", "--from-file", &secure_pem.to_string_lossy()])?;

    // Bad routes: each refused with what is wrong.
    let route = |name: &str, spec: &str| format!("kind: Route\nmetadata: {{name: {name}}}\nspec: {spec}\n");
    let e = refused(&c, &dir, "ghost", &route("ghost", "{host: ghost.apps.example.test, service: nowhere, port: 80}"))?;
    assert!(e.contains("service `nowhere` does not exist in namespace default"), "{e}");
    let e = refused(&c, &dir, "outside", &route("outside", "{host: shop.example.org, service: blog, port: 80}"))?;
    assert!(e.contains("not under the apps domain apps.example.test"), "{e}");
    apply(&c, &dir, "services", SERVICES)?;
    let e = refused(
        &c,
        &dir,
        "wrongcert",
        &route(
            "wrong",
            "{host: other.apps.example.test, service: shop, port: 8080, tls: {termination: edge, secret: shop-cert}}",
        ),
    )?;
    assert!(e.contains("is for shop.apps.example.test, not for host other.apps.example.test"), "{e}");
    let e = refused(&c, &dir, "port", &route("port", "{host: port.apps.example.test, service: shop, port: 9999}"))?;
    assert!(e.contains("has no TCP port 9999") && e.contains("8080"), "{e}");
    let e = refused(&c, &dir, "taken", &route("taken", "{host: blog.apps.example.test, service: shop, port: 8080}"))?;
    assert!(e.contains("already served by route default/blog"), "{e}");

    // Plain HTTP by host name, through either edge; each host name reaches its own service.
    let blog = wait_for(Duration::from_secs(120), "blog through edge A", || {
        let (status, text) = get(&format!("{edge_a}:80"), "blog.apps.example.test", "/x")?;
        (status == 200).then(|| body_json(&text)).flatten()
    })
    .inspect_err(|_| dump(&c))?;
    assert_eq!(blog["service"], "blog");
    assert_eq!(blog["path"], "/x");
    assert_eq!(blog["xff"], hosts.root_addr().as_str(), "X-Forwarded-For is the client: {blog}");
    assert_eq!((blog["proto"].as_str(), blog["host"].as_str()), (Some("http"), Some("blog.apps.example.test")));
    let via_b = wait_for(Duration::from_secs(30), "blog through edge B", || {
        let (status, text) = get(&format!("{edge_b}:80"), "blog.apps.example.test", "/")?;
        (status == 200).then(|| body_json(&text)).flatten()
    })?;
    assert_eq!(via_b["service"], "blog");
    // Both blog tasks answer.
    let tasks: std::collections::BTreeSet<String> = (0..20)
        .filter_map(|_| get(&format!("{edge_a}:80"), "blog.apps.example.test", "/").and_then(|(_, t)| body_json(&t)))
        .filter_map(|v| v["task"].as_str().map(str::to_string))
        .collect();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    // HTTP/2 in clear text (prior knowledge), and a WebSocket through the edge.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--http2-prior-knowledge",
            "-H",
            "Host: blog.apps.example.test",
            "-w",
            "\n%{http_version}",
        ])
        .arg(format!("http://{edge_a}/h2c"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n2") && text.contains("/h2c"), "h2c: {text} {}", String::from_utf8_lossy(&out.stderr));
    let mut ws = TcpStream::connect(format!("{edge_a}:80"))?;
    ws.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        ws,
        "GET /ws HTTP/1.1\r\nHost: blog.apps.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    ws.write_all(b"ping through the edge")?;
    let mut echo = [0u8; 21];
    ws.read_exact(&mut echo)?;
    assert_eq!(&echo, b"ping through the edge");
    drop(ws);
    // An unknown host: 503 from the edge.
    assert_eq!(get(&format!("{edge_a}:80"), "nobody.apps.example.test", "/").map(|r| r.0), Some(503));

    // TLS terminated at the edge with the secret's certificate, HTTP/2 and HTTP/1.1; plain HTTP
    // to that host is redirected.
    let ca = dir.join("ca.pem");
    let (version, body) = wait_for(Duration::from_secs(30), "shop over TLS (h2)", || {
        curl_tls(&edge_a, "shop.apps.example.test", &ca, &["--http2"])
    })
    .inspect_err(|_| dump(&c))?;
    let shop: Value = serde_json::from_str(&body)?;
    assert_eq!(
        (version.as_str(), shop["service"].as_str(), shop["proto"].as_str()),
        ("2", Some("shop"), Some("https"))
    );
    let (version, _) =
        curl_tls(&edge_b, "shop.apps.example.test", &ca, &["--http1.1"]).context("shop over TLS via B")?;
    assert_eq!(version, "1.1");
    let (status, text) = get(&format!("{edge_a}:80"), "shop.apps.example.test", "/cart?id=1").context("redirect")?;
    assert_eq!(status, 301, "{text}");
    assert!(
        text.contains("location: https://shop.apps.example.test/cart?id=1")
            || text.contains("Location: https://shop.apps.example.test/cart?id=1"),
        "{text}"
    );

    // Passthrough: the TLS connection reaches the task, which holds its own certificate.
    let (_, body) = wait_for(Duration::from_secs(30), "vault over TLS passthrough", || {
        curl_tls(&edge_a, "vault.apps.example.test", &ca, &[])
    })
    .inspect_err(|_| dump(&c))?;
    let vault: Value = serde_json::from_str(&body)?;
    assert_eq!(vault["service"], "vault");
    assert_eq!(vault["proto"], Value::Null, "passthrough: the edge adds no headers");

    // Reencrypt: the edge terminates with the route's certificate and opens TLS to the task.
    let (_, body) = wait_for(Duration::from_secs(30), "secure over TLS reencrypt", || {
        curl_tls(&edge_b, "secure.apps.example.test", &ca, &[])
    })
    .inspect_err(|_| dump(&c))?;
    let secure: Value = serde_json::from_str(&body)?;
    assert_eq!((secure["service"].as_str(), secure["proto"].as_str()), (Some("vault"), Some("https")), "{secure}");

    // The apps domain's DNS: each route's host is every serving edge.
    let mut both = vec![edge_a.parse::<Ipv4Addr>()?, edge_b.parse::<Ipv4Addr>()?];
    both.sort();
    let dns_a_addr = format!("{edge_a}:53");
    wait_for(Duration::from_secs(30), "the apps domain answering with both edges", || {
        (dns_a(&dns_a_addr, "shop.apps.example.test").ok()? == Ok(both.clone())).then_some(())
    })?;
    assert_eq!(dns_a(&dns_a_addr, "nothing.apps.example.test")?, Err(3), "NXDOMAIN");
    assert_eq!(dns_a(&dns_a_addr, "example.org")?, Err(5), "REFUSED outside the zone");

    // A secret that holds a route's certificate cannot be deleted.
    let out = c.berth(&["secret", "rm", "shop-cert"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("holds the certificate of route shop"), "{e}");

    // describe route: hosts, service, endpoints, TLS expiry, edges.
    let d = c.berth_json(&["describe", "route", "shop"])?;
    assert_eq!((d["host"].as_str(), d["tls"].as_str()), (Some("shop.apps.example.test"), Some("edge")));
    assert!(d["cert_not_after_ms"].as_i64() > Some(0), "{d}");
    assert_eq!(d["endpoints"].as_array().map(Vec::len), Some(1), "{d}");
    assert_eq!(d["edges"].as_array().map(Vec::len), Some(2), "{d}");
    let table = berth_ok(&c, &["get", "routes"])?;
    assert!(table.contains("blog.apps.example.test") && table.contains("passthrough"), "{table}");

    // kill -9 of a blog task under an HTTP loop through edge A: after the convergence bound
    // (2 s) no request fails; the failures inside it are printed.
    let victim = berth_tests::tasks(&c, "blog").into_iter().find(|t| t["state"] == "running").context("a blog task")?;
    let victim_pid = victim["pid"].as_i64().context("its pid")?;
    let url = format!("{edge_a}:80");
    let start = Instant::now();
    let mut results: Vec<(f64, bool)> = Vec::new();
    let mut killed_at = None;
    while start.elapsed() < Duration::from_secs(8) {
        let t = start.elapsed().as_secs_f64();
        let ok = get(&url, "blog.apps.example.test", "/").is_some_and(|(s, _)| s == 200);
        results.push((t, ok));
        if killed_at.is_none() && t > 1.0 {
            assert!(berth_tests::signal(victim_pid, "KILL"), "kill -9 {victim_pid}");
            killed_at = Some(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed_at = killed_at.context("the kill")?;
    let within: Vec<f64> = results
        .iter()
        .filter(|(t, ok)| !ok && *t >= killed_at && *t < killed_at + 2.0)
        .map(|(t, _)| t - killed_at)
        .collect();
    let after = results.iter().filter(|(t, ok)| !ok && *t >= killed_at + 2.0).count();
    eprintln!(
        "kill -9 under load: {} requests, {} failed within 2 s of the kill (at {:?} s after it), {after} after",
        results.len(),
        within.len(),
        within
    );
    assert_eq!(after, 0, "requests failed after the convergence bound");

    // A long response survives a route change (HAProxy's reload lets old workers finish); the
    // new route reaches both edges, timed from the apply.
    let mut slow = TcpStream::connect(format!("{edge_a}:80"))?;
    write!(slow, "GET /slow HTTP/1.1\r\nHost: blog.apps.example.test\r\nConnection: close\r\n\r\n")?;
    let mut reader = BufReader::new(slow.try_clone()?);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    assert!(first.contains(" 200 "), "{first}");
    let applied = Instant::now();
    apply(&c, &dir, "news", &route("news", "{host: news.apps.example.test, service: blog, port: 8080}"))?;
    let mut served = Vec::new();
    for edge in [&edge_a, &edge_b] {
        wait_for(Duration::from_secs(10), "the new route at an edge", || {
            get(&format!("{edge}:80"), "news.apps.example.test", "/").filter(|(s, _)| *s == 200)
        })
        .inspect_err(|_| dump(&c))?;
        served.push(applied.elapsed());
    }
    eprintln!("a new route served by edge A after {:?}, by both after {:?} (from the apply)", served[0], served[1]);
    let mut rest = String::new();
    reader.read_to_string(&mut rest)?;
    assert!(rest.contains("\r\n19\n") || rest.contains("19\n\r\n0\r\n"), "the slow response was cut: {rest:?}");

    // A drained edge leaves the DNS answer.
    berth_ok(&c, &["node", "update", "edge-b", "--availability", "drain"])?;
    let only_a = vec![edge_a.parse::<Ipv4Addr>()?];
    wait_for(Duration::from_secs(30), "the drained edge to leave the answer", || {
        (dns_a(&dns_a_addr, "shop.apps.example.test").ok()? == Ok(only_a.clone())).then_some(())
    })?;

    // Deleting a route stops it at the edges.
    berth_ok(&c, &["delete", "route", "news"])?;
    wait_for(Duration::from_secs(10), "the deleted route gone", || {
        get(&format!("{edge_a}:80"), "news.apps.example.test", "/").filter(|(s, _)| *s == 503)
    })?;
    // Access logs are written.
    let access = std::fs::read_to_string(dir.join("edge-a").join("edge/access.log"))?;
    assert!(access.contains("blog"), "{access}");
    drop(agents);
    Ok(())
}
