//! The web console on a real `berth dev` cluster (3 masters, 3 agents), served by a follower:
//!
//! - its API with curl: a client certificate from the cluster CA logs in by itself, no
//!   credentials get 401, a change without the console's header is refused, a wrong token is
//!   refused, and a view-only user's token may read but not scale;
//! - the page in headless Chromium (tests/console/drive.py): it logs in with a token issued by
//!   `berth console token create`, sees 3 masters and 3 ready nodes, scales a service from the
//!   service's page, reads a task's live log and drains a node. The new scale and the drain are
//!   then read back with the CLI.
//!   Screenshots are kept in `$BERTH_ARTIFACTS/console` (default `<target dir>/artifacts/console`).

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use berth_tests::{Dev, wait_for};
use serde_json::Value;

const TICKER: &str = r#"
kind: Service
metadata: {name: ticker}
spec:
  replicas: 1
  task:
    runtime: process
    command: ["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.5; done"]
"#;

/// Where the screenshots go.
fn artifacts() -> PathBuf {
    if let Ok(d) = std::env::var("BERTH_ARTIFACTS") {
        return PathBuf::from(d).join("console");
    }
    // The test binary is <target>/debug/deps/console-<hash>.
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors().nth(3).expect("a target dir").join("artifacts").join("console")
}

fn ok(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!("{what}: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One call to the console's API with curl: (HTTP status, JSON body).
struct Curl {
    base: String,
    ca: PathBuf,
}

impl Curl {
    fn call(&self, method: &str, path: &str, extra: &[&str]) -> Result<(u16, Value)> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "20", "-X", method, "-w", "\n%{http_code}", "--cacert"])
            .arg(&self.ca)
            .args(extra)
            .arg(format!("{}{path}", self.base))
            .stdin(Stdio::null())
            .output()
            .context("running curl")?;
        let text = ok(&out, &format!("curl {method} {path}"))?;
        let (body, code) = text.rsplit_once('\n').ok_or_else(|| anyhow!("no status from curl: {text}"))?;
        let json = if body.trim().is_empty() { Value::Null } else { serde_json::from_str(body)? };
        Ok((code.trim().parse()?, json))
    }
}

#[test]
fn the_console_logs_in_shows_the_cluster_and_scales_a_service() -> Result<()> {
    let dev = Dev::start("berth-console-", 3)?;
    let root = dev.root();
    let cluster = dev.cluster()?;
    let status = dev.berth_json(&["cluster", "status"])?;
    let leader = status["leader"].as_u64().ok_or_else(|| anyhow!("no leader: {status}"))?;
    // A follower's console: what it shows and does goes through its forwarding to the leader.
    let follower = cluster["masters"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"].as_u64() != Some(leader)))
        .ok_or_else(|| anyhow!("no follower in {cluster}"))?;
    let console = follower["console"].as_str().ok_or_else(|| anyhow!("no console address in {follower}"))?;
    let base = format!("https://{console}");
    let pki = root.join("pki");
    let curl = Curl { base: base.clone(), ca: pki.join("ca.crt") };

    let spec = dev.dir.path().join("ticker.yaml");
    std::fs::write(&spec, TICKER)?;
    ok(&dev.berth(&["apply", "-f", &spec.to_string_lossy()]), "apply ticker")?;

    // A client certificate from the cluster CA logs in by itself.
    let (cert, key) = (pki.join("admin.crt"), pki.join("admin.key"));
    let admin_cert = ["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()];
    let (code, who) = curl.call("GET", "/api/whoami", &admin_cert)?;
    assert_eq!((code, who["identity"].as_str(), who["via"].as_str()), (200, Some("admin/admin"), Some("certificate")));
    // Nothing: 401, saying how to log in.
    let (code, e) = curl.call("GET", "/api/nodes", &[])?;
    assert_eq!(code, 401, "{e}");
    assert!(e["error"].as_str().unwrap_or("").contains("berth console token create"), "{e}");
    // A change without the console's header is refused, certificate or not.
    let (code, e) = curl.call(
        "POST",
        "/api/services/default/ticker/scale",
        &[&admin_cert[..], &["-d", r#"{"replicas":5}"#]].concat(),
    )?;
    assert_eq!(code, 403, "{e}");
    assert!(e["error"].as_str().unwrap_or("").contains("X-Berth-Console"), "{e}");
    let header = ["-H", "X-Berth-Console: 1", "-H", "Content-Type: application/json"];
    // A malformed body says what the call takes.
    let (code, e) = curl.call(
        "POST",
        "/api/services/default/ticker/scale",
        &[&admin_cert[..], &header[..], &["-d", r#"{"replica":5}"#]].concat(),
    )?;
    assert_eq!(code, 400, "{e}");
    assert!(e["error"].as_str().unwrap_or("").contains(r#"{"replicas": 3}"#), "{e}");
    // A wrong token: one answer for an unknown id and a wrong secret.
    let wrong = format!(r#"{{"token":"BERTHC-1-abcdefgh.{}"}}"#, "x".repeat(32));
    let (code, e) = curl.call("POST", "/api/login", &[&header[..], &["-d", &wrong]].concat())?;
    assert_eq!(code, 401, "{e}");

    // A view-only user's token reads, and may not scale: the console has the user's rights.
    let viewer = dev.dir.path().join("viewer");
    ok(&dev.berth(&["user", "add", "viewer", "--role", "view", "--out", viewer.to_str().unwrap()]), "user add")?;
    let view_token = ok(&dev.berth(&["console", "token", "create", "--user", "viewer", "--ttl", "10m"]), "token")?;
    let jar = dev.dir.path().join("viewer.cookies");
    let jar = jar.to_str().unwrap();
    let login = format!(r#"{{"token":"{}"}}"#, view_token.trim());
    let (code, who) = curl.call("POST", "/api/login", &[&header[..], &["-c", jar, "-d", &login]].concat())?;
    assert_eq!((code, who["identity"].as_str()), (200, Some("user/viewer")), "{who}");
    let (code, svcs) = curl.call("GET", "/api/services", &["-b", jar])?;
    assert_eq!(code, 200, "{svcs}");
    assert_eq!(svcs["services"][0]["name"], "ticker");
    let (code, e) = curl.call(
        "POST",
        "/api/services/default/ticker/scale",
        &[&header[..], &["-b", jar, "-d", r#"{"replicas":5}"#]].concat(),
    )?;
    assert_eq!(code, 403, "a viewer scaled a service: {e}");
    // A revoked token is refused at its next request.
    let tokens = dev.berth_json(&["console", "token", "ls"])?;
    let id = tokens
        .as_array()
        .and_then(|t| t.iter().find(|t| t["identity"] == "user/viewer"))
        .and_then(|t| t["id"].as_str())
        .ok_or_else(|| anyhow!("the viewer's token is not listed: {tokens}"))?
        .to_string();
    ok(&dev.berth(&["console", "token", "revoke", &id]), "token revoke")?;
    wait_for(Duration::from_secs(10), "the revoked token to be refused by the follower", || {
        (curl.call("GET", "/api/services", &["-b", jar]).ok()?.0 == 401).then_some(())
    })?;

    // The page, in Chromium, as an operator with a token an admin issued.
    ok(
        &dev.berth(&[
            "user",
            "add",
            "ops",
            "--role",
            "cluster-admin",
            "--out",
            dev.dir.path().join("ops").to_str().unwrap(),
        ]),
        "user add ops",
    )?;
    let token =
        ok(&dev.berth(&["console", "token", "create", "--user", "ops", "--description", "console test"]), "token")?;
    let out_dir = artifacts();
    let _ = std::fs::remove_dir_all(&out_dir);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("console").join("drive.py");
    let drive = Command::new("python3")
        .arg(&script)
        .args(["--url", &format!("{base}/"), "--token", token.trim()])
        .arg("--ca")
        .arg(pki.join("ca.crt"))
        .args(["--service", "default/ticker", "--replicas", "3", "--nodes", "3", "--masters", "3"])
        .args(["--log-text", "tick", "--drain", "agent-1"])
        .arg("--out")
        .arg(&out_dir)
        .stdin(Stdio::null())
        .output()
        .context("running tests/console/drive.py")?;
    let seen = ok(&drive, "the console in Chromium")?;
    eprintln!("console in Chromium: {seen}screenshots in {}", out_dir.display());
    let seen: Value = serde_json::from_str(seen.trim())?;
    assert_eq!(seen["nodes"], 3, "{seen}");
    assert_eq!(seen["scaled_to"], 3, "{seen}");
    assert!(seen["screenshots"].as_array().is_some_and(|s| s.len() == 8), "{seen}");
    for s in seen["screenshots"].as_array().unwrap() {
        let len = std::fs::metadata(s.as_str().unwrap())?.len();
        assert!(len > 10_000, "{s} is {len} bytes: not a page");
    }

    // The change is in the cluster, as the CLI reads it.
    let svc = dev.berth_json(&["get", "services"])?;
    let ticker = svc
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "ticker"))
        .ok_or_else(|| anyhow!("no ticker in {svc}"))?;
    assert_eq!(ticker["desired"], 3, "{ticker}");
    let nodes = dev.berth_json(&["get", "nodes"])?;
    let drained: Vec<&str> = nodes
        .as_array()
        .map(|n| n.iter().filter(|n| n["availability"] == "drain").filter_map(|n| n["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(drained, ["agent-1"], "{nodes}");
    // Pausing a rollout that is over is refused with the CLI's reason, as a conflict.
    wait_for(Duration::from_secs(60), "the scale's rollout to complete", || {
        let svc = dev.berth_json(&["get", "services"]).ok()?;
        (svc[0]["rollout"]["state"] == "completed").then_some(())
    })?;
    let (code, e) = curl.call(
        "POST",
        "/api/services/default/ticker/rollout",
        &[&admin_cert[..], &header[..], &["-d", r#"{"action":"pause"}"#]].concat(),
    )?;
    assert_eq!(code, 409, "{e}");
    assert!(e["error"].as_str().unwrap_or("").contains("no rollout is in progress to pause"), "{e}");
    // And so is who made it: the audit log names the token's user.
    let audit = ok(&dev.berth(&["audit", "--identity", "user/ops", "-o", "json"]), "audit")?;
    assert!(
        audit.lines().any(|l| l.contains("\"ticker\"") && l.contains("\"update\"")),
        "no audit record of user/ops scaling ticker:\n{audit}"
    );
    Ok(())
}
