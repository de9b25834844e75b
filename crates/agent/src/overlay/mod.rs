//! The node's side of networks: the overlay data plane the agent owns on its host.
//!
//! - `link`: network namespaces, bridges, VXLAN devices, veth pairs, addresses, routes and
//!   VXLAN forwarding/neighbour entries, over netlink (`rtnetlink`);
//! - `nft`: the agent's nftables table: virtual-IP load balancing with verdict maps, isolation
//!   between networks, masquerade for egress, published host ports;
//! - `dns`: service discovery by DNS (`hickory-server`) for the tasks on this node.

pub mod dns;
pub mod link;
pub mod nft;
pub mod node;
