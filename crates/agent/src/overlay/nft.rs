//! The agent's nftables table (see the module docs of `overlay`).
