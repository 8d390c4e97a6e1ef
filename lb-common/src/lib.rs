//! Types shared by the XDP program and the agent: map keys and values, map names and
//! sizes, drop/pass reasons, and the two pieces of arithmetic both sides must agree on
//! (the flow hash and the incremental checksum).
//!
//! Everything here is `no_std`, `#[repr(C)]` and plain bytes with explicit padding, so
//! a map value means the same thing in the kernel, in the agent and in `bpftool map dump`.
#![no_std]

pub mod csum;
pub mod dsr;
pub mod hash;
pub mod maps;
pub mod reason;
pub mod snat;
pub mod sock;
pub mod types;

pub use reason::Reason;
pub use types::*;
