//! Building lb-ebpf: it is outside the workspace because it targets `bpfel-unknown-none`
//! with nightly's `-Z build-std`, so it gets its own cargo invocation and target folder.

use std::env;
use std::io;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};

use crate::run::run;
use crate::toolchain::Toolchain;
use crate::workspace_root;

pub const TARGET: &str = "bpfel-unknown-none";

/// The lb-ebpf crate: `<root>/lb-ebpf`, or `$XLB_EBPF_DIR` (a hidden override for trying
/// the build machinery on another eBPF crate).
pub fn dir() -> Result<PathBuf> {
    let dir = env::var_os("XLB_EBPF_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| workspace_root().join("lb-ebpf"), PathBuf::from);
    let dir = dir.canonicalize().with_context(|| {
        format!(
            "eBPF crate not found at {} (XLB_EBPF_DIR overrides it)",
            dir.display()
        )
    })?;
    ensure!(
        dir.join("Cargo.toml").is_file(),
        "{} has no Cargo.toml",
        dir.display()
    );
    Ok(dir)
}

/// Builds lb-ebpf and returns the absolute path of the object. Quiet (`--quiet`) when the
/// toolchain was already complete, so a warm run prints only warnings and errors.
pub fn build(toolchain: &Toolchain, release: bool) -> Result<PathBuf> {
    let dir = dir()?;
    let mut cmd = toolchain.nightly_cargo(&dir)?;
    cmd.args(["build", "--target", TARGET, "-Z", "build-std=core"])
        // stdout is for the object path alone.
        .stdout(io::stderr());
    if release {
        cmd.arg("--release");
    }
    if !toolchain.installed {
        cmd.arg("--quiet");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    let object = dir
        .join("target")
        .join(TARGET)
        .join(profile)
        .join("lb-ebpf");
    ensure!(
        object.is_file(),
        "the eBPF build succeeded but {} is missing (is the binary named lb-ebpf?)",
        object.display()
    );
    Ok(object)
}
