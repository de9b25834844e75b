//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution registry) on
//! a free loopback port with its storage in a temp dir, holding the test image
//! (`deploy/test-image.sh`: FROM scratch, Debian's static busybox), pushed with the docker CLI.
//! Loopback registries need no TLS for Docker nor for berth. Dropped: the registry is killed
//! and the pushed tag removed from the local daemon.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test image in the local Docker daemon.
pub const TEST_IMAGE: &str = "berth-test/busybox:1";

pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _dir: tempfile::TempDir,
    pushed: Vec<String>,
}

impl Registry {
    /// Starts a registry and waits until it answers `GET /v2/`.
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new().prefix("berth-registry-").tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: \"{addr}\"}}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry; deploy/sandbox-prereqs.sh installs it)");
        let mut reg = Registry { child, addr, _dir: dir, pushed: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !reg.answers() {
            assert!(Instant::now() < deadline, "the registry at {} did not answer within 20 s", reg.addr);
            assert!(reg.child.try_wait().unwrap().is_none(), "the registry exited at start");
            std::thread::sleep(Duration::from_millis(20));
        }
        reg
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).as_bytes()).is_err() {
            return false;
        }
        let mut buf = [0u8; 32];
        s.read(&mut buf).is_ok_and(|n| String::from_utf8_lossy(&buf[..n]).contains(" 200"))
    }

    /// Pushes the local image `local` as `repo:tag`; the full reference.
    pub fn push(&mut self, local: &str, repo_tag: &str) -> String {
        let reference = format!("{}/{repo_tag}", self.addr);
        let ok = |c: &mut Command| c.stdout(Stdio::null()).status().is_ok_and(|s| s.success());
        assert!(ok(Command::new("docker").args(["tag", local, &reference])), "docker tag {local} {reference}");
        self.pushed.push(reference.clone());
        assert!(ok(Command::new("docker").args(["push", "-q", &reference])), "docker push {reference}");
        reference
    }

    /// The manifest digest the registry holds for `repo:tag` (`sha256:...`).
    pub fn digest(&self, reference: &str) -> String {
        let out = Command::new("docker")
            .args(["inspect", "--format", "{{index .RepoDigests 0}}", reference])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        text.rsplit_once('@').map(|(_, d)| d.to_string()).unwrap_or_else(|| panic!("no digest for {reference}: {text}"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in &self.pushed {
            let _ = Command::new("docker").args(["rmi", "-f", r]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}
