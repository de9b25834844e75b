//! A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution registry) on
//! a free loopback port with its storage in a temp dir, holding the test image
//! (`deploy/test-image.sh`: FROM scratch, Debian's static busybox), pushed with the docker CLI.
//! Loopback registries need no TLS for Docker nor for berth. Dropped: the registry is killed
//! and the pushed tag removed from the local daemon.

#![allow(dead_code)]

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
    /// The user and password it requires, if any.
    login: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry and waits until it answers `GET /v2/`.
    pub fn start() -> Registry {
        Registry::start_inner(None)
    }

    /// A registry that requires `user` and `password` (htpasswd, bcrypt), for pulls too.
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Registry::start_inner(Some((user.to_string(), password.to_string())))
    }

    fn start_inner(login: Option<(String, String)>) -> Registry {
        let dir = tempfile::Builder::new().prefix("berth-registry-").tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: \"{addr}\"}}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = &login {
            // bcrypt, as the registry's htpasswd wants, from the host's crypt(3).
            let out = Command::new("/usr/bin/python3")
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                    password,
                ])
                .output()
                .unwrap();
            let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
            assert!(hash.starts_with("$2"), "bcrypt from python3: {hash:?}");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
            text.push_str(&format!("auth:\n  htpasswd: {{realm: berth-test, path: {}}}\n", file.display()));
        }
        std::fs::write(&config, text).unwrap();
        assert!(
            Command::new("docker-registry").arg("--version").output().is_ok(),
            "docker-registry is not installed (apt-get install docker-registry; deploy/sandbox-prereqs.sh installs it)"
        );
        // Through a shell that stops the registry once its stdin closes: a registry shared by a
        // whole test binary lives in a static, which is never dropped, and the kernel closes the
        // pipe when the test process exits however it ends.
        let child = Command::new("sh")
            .args(["-c", "docker-registry serve \"$0\" </dev/null >/dev/null 2>&1 & p=$!; read _; kill $p; wait $p"])
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh");
        let reg = Registry { child, addr, _dir: dir, pushed: Vec::new(), login };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !reg.answers() {
            assert!(Instant::now() < deadline, "the registry at {} did not answer within 20 s", reg.addr);
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
        // With auth, 401 is its answer to an anonymous client.
        s.read(&mut buf).is_ok_and(|n| {
            let head = String::from_utf8_lossy(&buf[..n]);
            head.contains(" 200") || head.contains(" 401")
        })
    }

    /// Pushes the local image `local` as `repo:tag`; the full reference. The test image is
    /// built first when the daemon lacks it.
    pub fn push(&mut self, local: &str, repo_tag: &str) -> String {
        if local == TEST_IMAGE {
            ensure_test_image();
        }
        let reference = format!("{}/{repo_tag}", self.addr);
        let ok = |c: &mut Command| c.stdout(Stdio::null()).status().is_ok_and(|s| s.success());
        assert!(ok(Command::new("docker").args(["tag", local, &reference])), "docker tag {local} {reference}");
        self.pushed.push(reference.clone());
        if let Some((user, password)) = &self.login {
            use std::io::Write;
            let mut login = Command::new("docker")
                .args(["login", &self.addr, "-u", user, "--password-stdin"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            login.stdin.take().unwrap().write_all(password.as_bytes()).unwrap();
            assert!(login.wait().unwrap().success(), "docker login {}", self.addr);
        }
        let pushed = ok(Command::new("docker").args(["push", "-q", &reference]));
        if self.login.is_some() {
            let _ = Command::new("docker").args(["logout", &self.addr]).stdout(Stdio::null()).status();
        }
        assert!(pushed, "docker push {reference}");
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

/// Builds [`TEST_IMAGE`] with `deploy/test-image.sh` (found above this crate) unless the
/// daemon has it.
pub fn ensure_test_image() {
    let have = Command::new("docker")
        .args(["image", "inspect", TEST_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if have.is_ok_and(|s| s.success()) {
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("deploy/test-image.sh"))
        .find(|p| p.is_file())
        .expect("deploy/test-image.sh above this crate");
    let ok = Command::new("bash").arg(&script).status().is_ok_and(|s| s.success());
    assert!(ok, "{} failed", script.display());
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Closing the shell's stdin stops the registry and then the shell.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
        for r in &self.pushed {
            let _ = Command::new("docker").args(["rmi", "-f", r]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}
