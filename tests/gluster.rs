//! A GlusterFS server of the tests' own, shared by the agent's storage tests
//! (`crates/agent/tests/storage.rs`, through `#[path]`) and the cluster tests
//! (`tests/glusterfs.rs`, through the harness): `glusterd` from Debian's `glusterfs-server` in
//! a network namespace and a private mount namespace, one brick, one volume.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const PATIENCE: Duration = Duration::from_secs(30);

/// Whether this process runs as root (effective uid 0, from /proc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2)) == Some("0"))
}

/// A GlusterFS server of its own: `glusterd` in a network namespace (and a private mount
/// namespace, so its state and sockets stay in `work`), one brick, one volume, reached from
/// the host over a veth pair with addresses from 198.18.0.0/15.
pub struct GlusterServer {
    netns: String,
    host_if: String,
    /// The server's address, as a mount names it.
    pub addr: String,
    work: TempDir,
    glusterd: std::process::Child,
}

impl GlusterServer {
    /// Starts a server with one volume, or None (having said why) without root or GlusterFS.
    pub fn start(volume: &str) -> Option<GlusterServer> {
        if !is_root() {
            eprintln!("skipped: a GlusterFS mount needs root");
            return None;
        }
        if !Path::new("/usr/sbin/glusterd").exists() || !Path::new("/sbin/mount.glusterfs").exists() {
            eprintln!(
                "skipped: glusterd or mount.glusterfs is not installed (apt-get install glusterfs-server glusterfs-client)"
            );
            return None;
        }
        static N: AtomicUsize = AtomicUsize::new(0);
        let (pid, n) = (std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let netns = format!("berth-gl-{pid}-{n}");
        let host_if = format!("bg{}h{n}", pid % 100_000);
        let peer_if = format!("bg{}n{n}", pid % 100_000);
        let net = format!("198.19.{}.{}", pid % 250, (n * 8) % 256);
        let base: Vec<u8> = net.split('.').map(|o| o.parse().unwrap()).collect();
        let host_addr = format!("{}.{}.{}.{}", base[0], base[1], base[2], base[3] + 1);
        let addr = format!("{}.{}.{}.{}", base[0], base[1], base[2], base[3] + 2);
        let work = tempfile::Builder::new().prefix("berth-gluster-").tempdir().unwrap();
        for d in ["lib", "log", "brick"] {
            std::fs::create_dir(work.path().join(d)).unwrap();
        }
        let sh = |cmd: &str| {
            let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
            assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        };
        sh(&format!("ip netns add {netns}"));
        sh(&format!("ip link add {host_if} type veth peer name {peer_if}"));
        sh(&format!("ip link set {peer_if} netns {netns}"));
        sh(&format!("ip addr add {host_addr}/29 dev {host_if} && ip link set {host_if} up"));
        sh(&format!(
            "ip netns exec {netns} sh -c 'ip addr add {addr}/29 dev {peer_if} && ip link set {peer_if} up && ip link set lo up'"
        ));
        let w = work.path().display().to_string();
        let script = format!(
            "mount --make-rprivate / && mount -t tmpfs tmpfs /run && mkdir -p /run/gluster && \
             mount --bind {w}/lib /var/lib/glusterd && mount --bind {w}/log /var/log/glusterfs && \
             exec glusterd -N --log-file={w}/glusterd.log"
        );
        let glusterd = Command::new("ip")
            .args(["netns", "exec", &netns, "unshare", "--mount", "sh", "-c", &script])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = GlusterServer { netns, host_if, addr, work, glusterd };
        let deadline = Instant::now() + PATIENCE;
        while !server.gluster(&["volume", "list"]).0 {
            assert!(Instant::now() < deadline, "glusterd did not start; see {w}/glusterd.log");
            std::thread::sleep(Duration::from_millis(100));
        }
        let brick = format!("{}:{w}/brick", server.addr);
        let (ok, out) = server.gluster(&["volume", "create", volume, &brick, "force"]);
        assert!(ok, "gluster volume create: {out}");
        let (ok, out) = server.gluster(&["volume", "start", volume]);
        assert!(ok, "gluster volume start: {out}");
        Some(server)
    }

    /// Runs the `gluster` CLI against this server: whether it succeeded, and its output.
    pub fn gluster(&self, args: &[&str]) -> (bool, String) {
        let pid = self.glusterd.id().to_string();
        let out = Command::new("nsenter")
            .args(["-t", &pid, "-m", "-n", "gluster", "--mode=script"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    /// The brick: where the volume's files are on the server.
    pub fn brick(&self) -> PathBuf {
        self.work.path().join("brick")
    }

    /// Makes the server drop every packet to its management port: a mount then hangs.
    pub fn drop_packets(&self) {
        let ns = &self.netns;
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns exec {ns} nft add table inet berth_test && \
                 ip netns exec {ns} nft add chain inet berth_test in '{{ type filter hook input priority 0; }}' && \
                 ip netns exec {ns} nft add rule inet berth_test in tcp dport 24007 drop"
            ))
            .status()
            .unwrap()
            .success();
        assert!(ok, "nft in the server's namespace");
    }
}

impl Drop for GlusterServer {
    fn drop(&mut self) {
        // glusterd and its brick processes: everything in the namespace.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.netns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = self.glusterd.kill();
        let _ = self.glusterd.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
    }
}
