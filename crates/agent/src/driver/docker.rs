//! The docker runtime (being written).
