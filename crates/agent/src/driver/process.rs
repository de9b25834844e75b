//! The process runtime (being written).
