//! The only module that talks to the kernel's BPF side: loading and attaching the
//! XDP program, pinning, and typed access to its maps.

mod arrays;
mod batch;
pub mod egress;
#[cfg(test)]
mod fake;
mod grace;
pub mod loader;
pub mod lock;
pub mod maps;
pub mod object;
pub mod pins;
pub mod snat;
pub mod sockets;
pub mod source_ranges;
pub mod stats;
pub mod store;
mod sys;
pub mod tables;
pub mod writer;

pub use loader::{Dataplane, DataplaneError};
pub use sys::BpfError;
