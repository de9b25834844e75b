//! The hosts `berth dev` gives its agents when run as root: each agent in a network namespace of
//! its own, with its own underlay address, so that the overlay between agents really crosses
//! hosts (VXLAN between addresses, a bridge and a DNS server per host).
//!
//! Layout (all addresses from 198.18.0.0/15, which is set aside for benchmarking):
//! - a switch: namespace `berth-dev-sw` holding bridge `br0`. The hosts' traffic crosses no
//!   firewall of the root namespace (Docker's included) on its way between them;
//! - host i (1-based, agent-i's): namespace `berth-dev-<i>`, its `eth0` on the switch as
//!   198.19.254.(10 + i)/24;
//! - the root namespace on the switch as 198.19.254.1/24 (interface `berthdev0`): the masters
//!   listen there, and the machine reaches every host's address.
//!
//! The namespaces outlive `berth dev` (tasks outlive their agents, and their traffic crosses these
//! hosts); `berth dev --remove-hosts` deletes them. This is set-up, done once, with iproute2's `ip`.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// The switch's namespace.
const SWITCH: &str = "berth-dev-sw";
/// The root namespace's port on the switch.
const ROOT_PORT: &str = "berthdev0";
/// The underlay's /24 (the first three octets).
const UNDERLAY: &str = "198.19.254";

/// The overlay's address pool and the VIP pool that `berth dev` gives its masters when it builds
/// hosts (disjoint from the underlay above).
/// The dev cluster's apps domain: route hosts under it, answered by agent-1's edge.
pub const APPS_DOMAIN: &str = "apps.berth.test";
pub const ADDRESS_POOL: &str = "198.18.0.0/16";
pub const VIP_POOL: &str = "198.19.0.0/20";

/// Whether `berth dev` can build hosts: root, and iproute2 and nsenter installed.
pub fn available() -> std::result::Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not running as root".into());
    }
    for tool in ["ip", "nsenter"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(format!("`{tool}` is not installed"));
        }
    }
    Ok(())
}

/// The root namespace's address on the switch (where the masters listen).
pub fn root_addr() -> String {
    format!("{UNDERLAY}.1")
}

/// Host i's (1-based) namespace.
pub fn ns(i: usize) -> String {
    format!("berth-dev-{i}")
}

/// Host i's (1-based) underlay address.
pub fn addr(i: usize) -> String {
    format!("{UNDERLAY}.{}", 10 + i)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

/// Makes the switch and hosts 1..=count, keeping those that exist (a resumed cluster's).
pub fn ensure(count: usize) -> Result<()> {
    if !exists(SWITCH) {
        ip(&["netns", "add", SWITCH])?;
        ip(&["-n", SWITCH, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", SWITCH, "link", "set", "br0", "up"])?;
    }
    let root_up = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", ROOT_PORT])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{}/24", root_addr())));
    if !root_up {
        let _ = ip(&["link", "del", ROOT_PORT]);
        ip(&["link", "add", ROOT_PORT, "type", "veth", "peer", "name", "rootport", "netns", SWITCH])?;
        ip(&["-n", SWITCH, "link", "set", "rootport", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{}/24", root_addr()), "dev", ROOT_PORT])?;
        ip(&["link", "set", ROOT_PORT, "up"])?;
    }
    for i in 1..=count {
        let host = ns(i);
        if exists(&host) {
            continue;
        }
        let port = format!("h{i}");
        ip(&["netns", "add", &host])?;
        ip(&["-n", SWITCH, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &host])?;
        ip(&["-n", SWITCH, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &host, "addr", "add", &format!("{}/24", addr(i)), "dev", "eth0"])?;
        ip(&["-n", &host, "link", "set", "eth0", "up"])?;
        ip(&["-n", &host, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Deletes every host and the switch (`berth dev --remove-hosts`). Tasks still attached lose
/// their network.
pub fn remove() -> Result<usize> {
    let mut removed = 0;
    let list = std::fs::read_dir("/run/netns").map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    for entry in list {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("berth-dev-") && name != SWITCH {
            ip(&["netns", "del", &name])?;
            removed += 1;
        }
    }
    if exists(SWITCH) {
        // The root namespace's port goes with its peer on the switch.
        ip(&["netns", "del", SWITCH])?;
    }
    Ok(removed)
}
