//! Where the eBPF object comes from: the file named by `XLB_EBPF_OBJECT` at run time,
//! else the copy embedded at build time. Never a hard-coded target path.

use std::borrow::Cow;
use std::path::PathBuf;

use super::DataplaneError;

/// Environment variable naming the object built by `cargo xtask build-ebpf`.
pub const OBJECT_ENV: &str = "XLB_EBPF_OBJECT";

#[cfg(xlb_embedded_object)]
static EMBEDDED: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("XLB_EMBEDDED_OBJECT")));
#[cfg(not(xlb_embedded_object))]
static EMBEDDED: Option<&[u8]> = None;

/// The object's bytes, from `explicit` (a CLI flag), the environment, or the binary.
pub fn object_bytes(explicit: Option<&PathBuf>) -> Result<Cow<'static, [u8]>, DataplaneError> {
    let from_env = std::env::var_os(OBJECT_ENV).map(PathBuf::from);
    if let Some(path) = explicit.cloned().or(from_env) {
        return std::fs::read(&path)
            .map(Cow::Owned)
            .map_err(|source| DataplaneError::Object {
                path: path.display().to_string(),
                source,
            });
    }
    EMBEDDED.map(Cow::Borrowed).ok_or(DataplaneError::NoObject)
}
