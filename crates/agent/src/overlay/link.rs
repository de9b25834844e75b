//! Namespaces, bridges, VXLAN devices and veth pairs over netlink (see the module docs of `overlay`).
