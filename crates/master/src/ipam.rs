//! Address management, pure: which subnet, VXLAN VNI, node block and service VIP to hand out,
//! given what is allocated. The callers (`control_service` for networks and VIPs, `controller`
//! for node blocks) read the allocations from the replicated state and write the decision in a
//! transaction that compares what they read, so two leaders never hand out the same thing.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr};

use berth_types::spec::network::{block_count, parse_subnet};
use ipnet::Ipv4Net;

/// The first VNI handed out (below it: room for VNIs a host configured by hand).
pub(crate) const FIRST_VNI: u32 = 4096;
/// The largest VXLAN network identifier (24 bits).
pub(crate) const MAX_VNI: u32 = (1 << 24) - 1;

/// The cluster's address pools: networks without a `subnet` are carved from `address`, in
/// subnets of `/network_prefix`; service VIPs come from `vip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pools {
    /// Where network subnets come from.
    pub address: Ipv4Net,
    /// The prefix of each carved subnet.
    pub network_prefix: u8,
    /// Where service virtual IPs come from.
    pub vip: Ipv4Net,
}

impl Pools {
    /// Checks the pools: valid prefixes, a network size inside the pool, no overlap.
    pub fn new(address: Ipv4Net, network_prefix: Option<u8>, vip: Ipv4Net) -> Result<Pools, String> {
        let address = address.trunc();
        let vip = vip.trunc();
        // By default 16 networks at least, and /16s where the pool is big enough.
        let network_prefix = network_prefix.unwrap_or_else(|| (address.prefix_len() + 4).clamp(16, 28));
        parse_subnet(&Ipv4Net::new(address.network(), network_prefix).map_err(|e| e.to_string())?.to_string())
            .map_err(|e| format!("network size /{network_prefix}: {e}"))?;
        if network_prefix < address.prefix_len() {
            return Err(format!(
                "network size /{network_prefix} is larger than the address pool {address}; choose /{} or smaller",
                address.prefix_len()
            ));
        }
        if vip.prefix_len() > 30 {
            return Err(format!("the VIP pool {vip} is too small; allowed: /30 or larger"));
        }
        if overlaps(address, vip) {
            return Err(format!(
                "the address pool {address} and the VIP pool {vip} overlap; give them separate ranges"
            ));
        }
        Ok(Pools { address, network_prefix, vip })
    }
}

/// Two networks share an address.
pub(crate) fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why nothing could be allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IpamError {
    /// A requested subnet shares addresses with another network or the VIP pool.
    Overlap { subnet: Ipv4Net, other: String },
    /// The pool has no free subnet of the size carved.
    PoolExhausted { pool: Ipv4Net, prefix: u8, networks: usize },
    /// Every VNI is taken.
    VniExhausted,
    /// Every VIP is taken.
    VipExhausted { pool: Ipv4Net },
    /// Every block of a network is taken by other nodes.
    BlocksExhausted { network: String, subnet: Ipv4Net },
}

impl fmt::Display for IpamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpamError::Overlap { subnet, other } => {
                write!(f, "subnet {subnet} overlaps {other}; choose a subnet that shares no address with it")
            }
            IpamError::PoolExhausted { pool, prefix, networks } => write!(
                f,
                "the address pool {pool} has no free /{prefix} left ({networks} networks hold addresses); delete \
                 unused networks, give this network an explicit `subnet` outside the pool, or start the masters \
                 with a larger --address-pool"
            ),
            IpamError::VniExhausted => write!(f, "every VXLAN VNI ({FIRST_VNI} to {MAX_VNI}) is in use"),
            IpamError::VipExhausted { pool } => write!(
                f,
                "the VIP pool {pool} has no free address; delete unused services, use `endpoint_mode: dnsrr`, or \
                 start the masters with a larger --vip-pool"
            ),
            IpamError::BlocksExhausted { network, subnet } => write!(
                f,
                "network {network} ({subnet}) has no free node block: every block is held by another node; give the \
                 network a larger subnet, or smaller blocks with a longer `block_prefix` (set when it is created)"
            ),
        }
    }
}

/// The subnet for a new network: `requested` if it is free, else the first free
/// `/network_prefix` of the address pool. `taken` lists every existing network's subnet with
/// its name (for the message).
pub(crate) fn allocate_subnet(
    pools: &Pools,
    taken: &[(String, Ipv4Net)],
    requested: Option<Ipv4Net>,
) -> Result<Ipv4Net, IpamError> {
    if let Some(subnet) = requested {
        if let Some((name, _)) = taken.iter().find(|(_, t)| overlaps(*t, subnet)) {
            return Err(IpamError::Overlap { subnet, other: format!("network {name}") });
        }
        if overlaps(pools.vip, subnet) {
            return Err(IpamError::Overlap { subnet, other: format!("the VIP pool {}", pools.vip) });
        }
        return Ok(subnet);
    }
    let size = 1u64 << (32 - pools.network_prefix);
    let first = u64::from(u32::from(pools.address.network()));
    let end = u64::from(u32::from(pools.address.broadcast())) + 1;
    let mut at = first;
    while at < end {
        let candidate = Ipv4Net::new(Ipv4Addr::from(at as u32), pools.network_prefix).map_err(|_| {
            IpamError::PoolExhausted { pool: pools.address, prefix: pools.network_prefix, networks: taken.len() }
        })?;
        match taken.iter().filter(|(_, t)| overlaps(*t, candidate)).map(|(_, t)| t).max_by_key(|t| t.broadcast()) {
            None => return Ok(candidate),
            // Skip past whatever overlaps, aligned to the carving size.
            Some(t) => {
                let past = u64::from(u32::from(t.broadcast())) + 1;
                at = past.div_ceil(size) * size;
            }
        }
    }
    Err(IpamError::PoolExhausted { pool: pools.address, prefix: pools.network_prefix, networks: taken.len() })
}

/// The lowest free VNI.
pub(crate) fn allocate_vni(taken: &BTreeSet<u32>) -> Result<u32, IpamError> {
    (FIRST_VNI..=MAX_VNI).find(|v| !taken.contains(v)).ok_or(IpamError::VniExhausted)
}

/// The lowest free block index of `subnet`.
pub(crate) fn allocate_block(
    network: &str,
    subnet: Ipv4Net,
    prefix: u8,
    taken: &BTreeSet<u32>,
) -> Result<u32, IpamError> {
    (0..block_count(subnet, prefix))
        .find(|b| !taken.contains(b))
        .ok_or_else(|| IpamError::BlocksExhausted { network: network.to_string(), subnet })
}

/// The lowest free VIP of the pool (network and broadcast addresses excluded).
pub(crate) fn allocate_vip(pool: Ipv4Net, taken: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
    pool.hosts().find(|a| !taken.contains(a)).ok_or(IpamError::VipExhausted { pool })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn pools() -> Pools {
        Pools::new(net("198.18.0.0/16"), None, net("198.19.0.0/20")).unwrap()
    }

    #[test]
    fn pools_are_checked() {
        assert_eq!(pools().network_prefix, 20);
        assert_eq!(Pools::new(net("10.128.0.0/9"), None, net("10.96.0.0/12")).unwrap().network_prefix, 16);
        let e = Pools::new(net("10.0.0.0/8"), None, net("10.96.0.0/12")).unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        let e = Pools::new(net("10.0.0.0/16"), Some(12), net("10.96.0.0/12")).unwrap_err();
        assert!(e.contains("larger than the address pool"), "{e}");
        let e = Pools::new(net("10.0.0.0/16"), Some(30), net("10.96.0.0/12")).unwrap_err();
        assert!(e.contains("/8 to /28"), "{e}");
    }

    #[test]
    fn subnets_are_carved_in_order_around_explicit_ones() {
        let p = pools();
        let mut taken: Vec<(String, Ipv4Net)> = Vec::new();
        let a = allocate_subnet(&p, &taken, None).unwrap();
        assert_eq!(a, net("198.18.0.0/20"));
        taken.push(("default/a".into(), a));
        // An explicit subnet in the middle of the pool is skipped over.
        let explicit = allocate_subnet(&p, &taken, Some(net("198.18.20.0/24"))).unwrap();
        taken.push(("default/x".into(), explicit));
        assert_eq!(allocate_subnet(&p, &taken, None).unwrap(), net("198.18.32.0/20"));
        // Overlaps are refused with the other network's name.
        let e = allocate_subnet(&p, &taken, Some(net("198.18.0.0/16"))).unwrap_err();
        assert!(e.to_string().contains("network default/a"), "{e}");
        let e = allocate_subnet(&p, &taken, Some(net("198.19.0.0/24"))).unwrap_err();
        assert!(e.to_string().contains("the VIP pool"), "{e}");
        // Outside the pool is fine when nothing overlaps (as Swarm allows).
        assert_eq!(allocate_subnet(&p, &taken, Some(net("10.9.0.0/24"))).unwrap(), net("10.9.0.0/24"));
    }

    #[test]
    fn an_exhausted_pool_says_what_to_do() {
        let p = pools();
        let mut taken = Vec::new();
        for i in 0..16 {
            let s = allocate_subnet(&p, &taken, None).unwrap();
            taken.push((format!("default/n{i}"), s));
        }
        let e = allocate_subnet(&p, &taken, None).unwrap_err();
        assert!(matches!(e, IpamError::PoolExhausted { networks: 16, .. }));
        assert!(e.to_string().contains("--address-pool"), "{e}");
        // Freeing one makes room again, at the freed place.
        taken.remove(3);
        assert_eq!(allocate_subnet(&p, &taken, None).unwrap(), net("198.18.48.0/20"));
    }

    #[test]
    fn vnis_blocks_and_vips_take_the_lowest_free() {
        let mut vnis = BTreeSet::new();
        assert_eq!(allocate_vni(&vnis).unwrap(), FIRST_VNI);
        vnis.extend([FIRST_VNI, FIRST_VNI + 1, FIRST_VNI + 3]);
        assert_eq!(allocate_vni(&vnis).unwrap(), FIRST_VNI + 2);

        let s = net("198.18.0.0/24");
        let mut blocks: BTreeSet<u32> = (0..15).collect();
        assert_eq!(allocate_block("default/a", s, 28, &blocks).unwrap(), 15);
        blocks.insert(15);
        let e = allocate_block("default/a", s, 28, &blocks).unwrap_err();
        assert!(e.to_string().contains("larger subnet"), "{e}");

        let pool = net("198.19.0.0/30");
        let mut vips = BTreeSet::new();
        assert_eq!(allocate_vip(pool, &vips).unwrap(), "198.19.0.1".parse::<Ipv4Addr>().unwrap());
        vips.insert("198.19.0.1".parse().unwrap());
        vips.insert("198.19.0.2".parse().unwrap());
        assert!(allocate_vip(pool, &vips).unwrap_err().to_string().contains("--vip-pool"));
    }
}
