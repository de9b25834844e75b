//! `kind: Network` documents: a cluster-wide overlay network that tasks join with
//! `spec.task.networks`, and the address arithmetic the allocator and the agents share.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize};

use super::{Kind, Metadata, SpecError, parse_str};

/// The smallest network prefix a `subnet` may have (the largest network).
pub const MIN_SUBNET_PREFIX: u8 = 8;
/// The largest network prefix a `subnet` may have: a /28 still gives one node a block of 16.
pub const MAX_SUBNET_PREFIX: u8 = 28;
/// The name every namespace's implicit network has.
pub const DEFAULT_NETWORK: &str = "default";
/// The most networks one service may join (one interface each in every task).
pub const MAX_NETWORKS_PER_TASK: usize = 8;

/// One `kind: Network` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Always `Network`.
    pub kind: Kind,
    /// Name, namespace, labels.
    pub metadata: Metadata,
    /// Addresses and isolation.
    #[serde(default)]
    pub spec: NetworkSpec,
}

/// `spec` of a network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// The network's IPv4 subnet, such as `10.20.0.0/16`. Omitted: the masters carve one from the
    /// cluster's address pool.
    #[serde(default, deserialize_with = "de_subnet", skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Net>,
    /// No traffic leaves the overlay: no masquerade, no default route out of the task.
    #[serde(default)]
    pub internal: bool,
    /// The prefix of each node's address block, /16 to /28 and no shorter than the subnet's (as
    /// Kubernetes' --node-cidr-mask-size). Omitted: a /24 where the subnet holds 16 of them, else
    /// 16 blocks (see [`block_prefix`]). A /16 network with /26 blocks serves 1,024 nodes of 61
    /// tasks each. It cannot change while the network exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_prefix: Option<u8>,
}

const SUBNET_ALLOWED: &str = "an IPv4 network in CIDR form with a prefix from /8 to /28, such as \"10.20.0.0/16\"";

/// Parses a subnet: CIDR form, prefix /8 to /28, no host bits set.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s.trim().parse().map_err(|_| format!("invalid subnet {s:?}; allowed: {SUBNET_ALLOWED}"))?;
    if !(MIN_SUBNET_PREFIX..=MAX_SUBNET_PREFIX).contains(&net.prefix_len()) {
        return Err(format!(
            "subnet {s} has prefix /{}; allowed: /{MIN_SUBNET_PREFIX} to /{MAX_SUBNET_PREFIX} (a /28 leaves room for \
             one node's block of 16 addresses)",
            net.prefix_len()
        ));
    }
    if net.addr() != net.network() {
        return Err(format!("subnet {s} has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

fn de_subnet<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Ipv4Net>, D::Error> {
    parse_str(deserializer, SUBNET_ALLOWED, parse_subnet).map(Some)
}

impl Network {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// JSON with every default filled in, to detect an unchanged re-apply.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"unserializable\":{:?}}}", e.to_string()))
    }

    /// Checks the values. Subnet overlaps are the allocator's to find (they depend on the other
    /// networks).
    pub fn validate(&self) -> Result<(), SpecError> {
        self.metadata.validate()?;
        if let Some(net) = self.spec.subnet {
            parse_subnet(&net.to_string()).map_err(|m| SpecError::invalid("spec.subnet", m))?;
        }
        if let Some(p) = self.spec.block_prefix {
            if !(MIN_BLOCK_PREFIX..=MAX_SUBNET_PREFIX).contains(&p) {
                return Err(SpecError::invalid(
                    "spec.block_prefix",
                    format!("block_prefix {p} is out of range; allowed: {MIN_BLOCK_PREFIX} to {MAX_SUBNET_PREFIX}"),
                ));
            }
            if let Some(net) = self.spec.subnet {
                check_block_prefix(net, p).map_err(|m| SpecError::invalid("spec.block_prefix", m))?;
            }
        }
        Ok(())
    }
}

/// The smallest `block_prefix` (the largest block) a network may ask for.
pub const MIN_BLOCK_PREFIX: u8 = 16;

/// Whether `subnet` can be cut into blocks of `/prefix`.
pub fn check_block_prefix(subnet: Ipv4Net, prefix: u8) -> Result<(), String> {
    if prefix < subnet.prefix_len() {
        return Err(format!(
            "block_prefix {prefix} asks for blocks larger than the subnet {subnet}; use {} or more",
            subnet.prefix_len()
        ));
    }
    Ok(())
}

/// The prefix of one node's address block in a network with prefix `subnet_prefix`: a /24
/// (253 tasks) where the subnet holds at least 16 of them, else 16 blocks, never smaller than a
/// /28: a /16 has 256 blocks of /24, a /20 16 of /24, a /24 16 of /28.
pub fn block_prefix(subnet_prefix: u8) -> u8 {
    (subnet_prefix + 4).clamp(24, MAX_SUBNET_PREFIX).max(subnet_prefix)
}

/// The block prefix a network record holds (`recorded`), or the subnet's default where it holds
/// none (0: records made before networks could choose).
pub fn recorded_block_prefix(subnet: Ipv4Net, recorded: u32) -> u8 {
    match u8::try_from(recorded) {
        Ok(p) if p > 0 => p.clamp(subnet.prefix_len(), MAX_SUBNET_PREFIX),
        _ => block_prefix(subnet.prefix_len()),
    }
}

/// Block `index` of `subnet` cut into blocks of `/prefix`, or `None` past the last one.
pub fn node_block(subnet: Ipv4Net, prefix: u8, index: u32) -> Option<Ipv4Net> {
    let prefix = prefix.clamp(subnet.prefix_len(), MAX_SUBNET_PREFIX);
    let count = 1u64 << (prefix - subnet.prefix_len());
    if u64::from(index) >= count {
        return None;
    }
    let base = u32::from(subnet.network()) + (index << (32 - prefix));
    Ipv4Net::new(Ipv4Addr::from(base), prefix).ok()
}

/// How many blocks of `/prefix` `subnet` holds.
pub fn block_count(subnet: Ipv4Net, prefix: u8) -> u32 {
    let prefix = prefix.clamp(subnet.prefix_len(), MAX_SUBNET_PREFIX);
    1u32 << (prefix - subnet.prefix_len())
}

/// The node's gateway in its block: the block's first host address (the bridge's address).
pub fn block_gateway(block: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(block.network()) + 1)
}

/// The task addresses a block offers: every host address after the gateway.
pub fn block_hosts(block: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let first = u32::from(block.network()) + 2;
    let last = u32::from(block.broadcast()).saturating_sub(1);
    (first..=last).map(Ipv4Addr::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_checked_with_a_hint() {
        assert_eq!(parse_subnet("10.20.0.0/16").unwrap().to_string(), "10.20.0.0/16");
        let e = parse_subnet("10.20.1.0/16").unwrap_err();
        assert!(e.contains("did you mean 10.20.0.0/16"), "{e}");
        assert!(parse_subnet("10.0.0.0/30").unwrap_err().contains("/8 to /28"));
        assert!(parse_subnet("10.0.0.0/4").unwrap_err().contains("/8 to /28"));
        assert!(parse_subnet("fd00::/64").unwrap_err().contains("IPv4"));
        assert!(parse_subnet("banana").unwrap_err().contains("CIDR"));
    }

    #[test]
    fn blocks_tile_the_subnet() {
        // The default block size, by subnet.
        let d = |s: Ipv4Net| block_prefix(s.prefix_len());
        let s16: Ipv4Net = "10.20.0.0/16".parse().unwrap();
        assert_eq!(d(s16), 24);
        assert_eq!(block_count(s16, 24), 256);
        assert_eq!(node_block(s16, 24, 0).unwrap().to_string(), "10.20.0.0/24");
        assert_eq!(node_block(s16, 24, 255).unwrap().to_string(), "10.20.255.0/24");
        assert_eq!(node_block(s16, 24, 256), None);
        // A chosen one: /26 blocks give a /16 1,024 nodes.
        assert_eq!(block_count(s16, 26), 1024);
        assert_eq!(node_block(s16, 26, 1023).unwrap().to_string(), "10.20.255.192/26");
        assert_eq!(node_block(s16, 26, 1024), None);
        let s24: Ipv4Net = "10.20.5.0/24".parse().unwrap();
        assert_eq!(d(s24), 28);
        assert_eq!(block_count(s24, 28), 16);
        assert_eq!(node_block(s24, 28, 3).unwrap().to_string(), "10.20.5.48/28");
        let s20: Ipv4Net = "10.20.16.0/20".parse().unwrap();
        assert_eq!((d(s20), block_count(s20, 24)), (24, 16));
        assert_eq!(node_block(s20, 24, 1).unwrap().to_string(), "10.20.17.0/24");
        let s28: Ipv4Net = "10.20.5.16/28".parse().unwrap();
        assert_eq!(block_count(s28, d(s28)), 1);
        let s8: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        assert_eq!(d(s8), 24);
        assert_eq!(block_count(s8, 24), 65536);
        assert!(check_block_prefix(s16, 15).unwrap_err().contains("larger than the subnet"));
        assert!(check_block_prefix(s16, 16).is_ok());
        let b = node_block(s24, 28, 3).unwrap();
        assert_eq!(block_gateway(b).to_string(), "10.20.5.49");
        let hosts: Vec<_> = block_hosts(b).collect();
        assert_eq!(hosts.first().unwrap().to_string(), "10.20.5.50");
        assert_eq!(hosts.last().unwrap().to_string(), "10.20.5.62");
        assert_eq!(hosts.len(), 13);
    }
}
