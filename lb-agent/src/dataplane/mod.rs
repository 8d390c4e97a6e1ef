//! The only module that talks to the kernel's BPF side: loading and attaching the
//! XDP program, pinning, and typed access to its maps.

mod arrays;
pub mod loader;
pub mod maps;
pub mod object;
pub mod pins;
pub mod source_ranges;
pub mod writer;

pub use loader::{Dataplane, DataplaneError, PassProgram, TestRunOutput};
