//! Test hosts in network namespaces, so that partitions are real: every master (and every real
//! agent) gets its own namespace and address, joined by a veth pair to a bridge. The bridge lives
//! in a namespace of its own, so the host's firewall (Docker's FORWARD policy, br_netfilter) never
//! sees the traffic. The suite's own clients reach the hosts from the root namespace through one
//! more veth pair into that bridge.
//!
//! Faults are nftables rules in a host's namespace (table `inet chaos`): dropping packets to or
//! from given peers, one way or both, or at random. Healing flushes the table.
//!
//! Every namespace, link and rule is created by this run and removed when [`Net`] is dropped.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context, Result, bail};

/// One host: a namespace with one address.
#[derive(Clone, Debug)]
pub struct Host {
    /// The namespace's name.
    pub ns: String,
    pub ip: Ipv4Addr,
}

pub struct Net {
    /// Short and unique per run: namespace and link names derive from it.
    tag: String,
    /// The third octet of this run's subnet 198.18.<subnet>.0/24 (198.18.0.0/15 is set aside for
    /// benchmarking, RFC 2544, so test traffic never meets a real network's addresses).
    subnet: u8,
    switch: String,
    hosts: Vec<Host>,
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether this process may create namespaces (root, and `ip` and `nft` installed).
pub fn available() -> std::result::Result<(), String> {
    if !nix_is_root() {
        return Err("not running as root".into());
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(format!("`{tool}` is not installed (apt-get install iproute2 nftables)"));
        }
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

impl Net {
    /// Creates the switch namespace with its bridge, and the root namespace's port on it.
    pub fn create(seed: u64) -> Result<Net> {
        // A subnet and tag per run, from the pid, so that two suites on one machine do not collide.
        let pid = std::process::id();
        let subnet = (pid % 200) as u8 + 20;
        let tag = format!("bc{:x}", (pid as u64 ^ seed) & 0xffff);
        let net = Net { switch: format!("{tag}sw"), tag, subnet, hosts: Vec::new() };
        // Leftovers of a killed earlier run with the same tag: remove them first.
        net.teardown();
        let sw = net.switch.clone();
        run(&["ip", "netns", "add", &sw])?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        run(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        let root = format!("{}r", net.tag);
        run(&["ip", "link", "add", &root, "type", "veth", "peer", "name", "p0", "netns", &sw])?;
        run(&["ip", "-n", &sw, "link", "set", "p0", "master", "br0", "up"])?;
        run(&["ip", "addr", "add", &format!("{}/24", net.ip(1)), "dev", &root])?;
        run(&["ip", "link", "set", &root, "up"])?;
        Ok(net)
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, host)
    }

    /// Adds host number `n` (1..=200) with address 198.18.<subnet>.<10+n>.
    pub fn add_host(&mut self, n: u8) -> Result<Host> {
        let host = Host { ns: format!("{}h{n}", self.tag), ip: self.ip(10 + n) };
        let port = format!("p{n}");
        let sw = self.switch.clone();
        run(&["ip", "netns", "add", &host.ns])?;
        run(&["ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &host.ns])?;
        run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
        run(&["ip", "-n", &host.ns, "addr", "add", &format!("{}/24", host.ip), "dev", "eth0"])?;
        run(&["ip", "-n", &host.ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &host.ns, "link", "set", "lo", "up"])?;
        let table = "add table inet chaos\n\
             add chain inet chaos input { type filter hook input priority 0; policy accept; }\n\
             add chain inet chaos output { type filter hook output priority 0; policy accept; }\n";
        nft(&host.ns, table)?;
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// The command prefix that runs a program inside `host`'s network namespace. `nsenter` enters
    /// the network namespace only; `ip netns exec` would also remount /sys and so hide the cgroup
    /// hierarchy that the agents' process runtime needs. Both exec the program, so its pid is the
    /// one the suite signals.
    pub fn exec_prefix(host: &Host) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", host.ns), "--".into()]
    }

    /// Drops every packet between `host` and each of `peers`, both ways.
    pub fn cut(&self, host: &Host, peers: &[Ipv4Addr]) -> Result<()> {
        let mut rules = String::new();
        for p in peers {
            rules += &format!("add rule inet chaos input ip saddr {p} drop\n");
            rules += &format!("add rule inet chaos output ip daddr {p} drop\n");
        }
        nft(&host.ns, &rules)
    }

    /// Drops what `host` sends to `peer`; what `peer` sends still arrives.
    pub fn cut_outbound(&self, host: &Host, peer: Ipv4Addr) -> Result<()> {
        nft(&host.ns, &format!("add rule inet chaos output ip daddr {peer} drop\n"))
    }

    /// Drops `percent`% of the packets `host` receives, at random.
    pub fn drop_random(&self, host: &Host, percent: u8) -> Result<()> {
        nft(&host.ns, &format!("add rule inet chaos input iifname \"eth0\" numgen random mod 100 < {percent} drop\n"))
    }

    /// Removes every fault rule on `host`.
    pub fn heal(&self, host: &Host) -> Result<()> {
        nft(&host.ns, "flush table inet chaos\n")
    }

    pub fn heal_all(&self) -> Result<()> {
        for h in &self.hosts {
            self.heal(h)?;
        }
        Ok(())
    }

    fn teardown(&self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new(args[0]).args(&args[1..]).output();
        };
        for h in &self.hosts {
            quiet(&["ip", "netns", "del", &h.ns]);
        }
        // Hosts of an earlier run with this tag that this process does not know of.
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&format!("{}h", self.tag)) {
                    quiet(&["ip", "netns", "del", name]);
                }
            }
        }
        quiet(&["ip", "link", "del", &format!("{}r", self.tag)]);
        quiet(&["ip", "netns", "del", &self.switch]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Applies an nft script inside a namespace.
fn nft(ns: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {ns} refused {script:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
