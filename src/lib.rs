//! xfer: move files between machines over TCP and prove they arrived intact.
//!
//! The binary is a thin shell over this library, so tests and benchmarks can drive a sender or a
//! receiver in-process and speak the wire format directly. ARCHITECTURE.md is the map.

pub mod cache;
pub mod cli;
pub mod code;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
#[cfg(test)]
mod limits_doc;
pub mod progress;
pub mod protocol;
pub mod recv;
pub mod sanitize;
pub mod send;
pub mod store;
pub mod transport;
pub mod trust;
