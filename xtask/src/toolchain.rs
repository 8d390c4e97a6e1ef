//! Toolchain bootstrap for the eBPF side. A fresh machine needs no hand set-up: each step
//! checks for its piece (cheaply, so a warm run stays fast and quiet) and installs it only
//! when missing, saying on stderr what it runs.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run::{probe, run};

/// The dated nightly that builds lb-ebpf (`-Z build-std` needs nightly). Pinned because
/// a fresh `nightly` moves to an LLVM newer than the one bpf-linker 0.13.0's `llvm-22`
/// feature links against; this one has LLVM 22.1.4 (rustc 1.97.0-nightly) and works with
/// it. lb-ebpf/rust-toolchain.toml names the same channel (a test checks).
pub const PINNED_NIGHTLY: &str = "nightly-2026-05-19";

/// Names another toolchain for lb-ebpf than [`PINNED_NIGHTLY`] (trying a newer nightly).
const NIGHTLY_VAR: &str = "XLB_NIGHTLY";

/// The toolchain that builds, formats and lints lb-ebpf: `$XLB_NIGHTLY` if set and not
/// empty, else [`PINNED_NIGHTLY`]. Always named explicitly (`cargo +TOOLCHAIN`):
/// `RUSTUP_AUTO_INSTALL=0` is set on these machines, so xtask installs it itself.
pub fn nightly() -> String {
    choose_nightly(env::var(NIGHTLY_VAR).ok().as_deref())
}

fn choose_nightly(var: Option<&str>) -> String {
    var.map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or(PINNED_NIGHTLY)
        .to_owned()
}
/// bpf-linker release known to work with nightly's LLVM 22 (feature `llvm-22`).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURES: &str = "llvm-22";
/// The nightly libLLVM that bpf-linker links against: `libLLVM.so.22.1-rust-*-nightly`.
const LLVM_LIB_PREFIX: &str = "libLLVM.so.22.1-rust-";
const LLVM_LIB_SUFFIX: &str = "-nightly";
/// eBPF rustflags: BTF lets `bpftool map dump` print typed keys and values; without
/// `--bpf-expand-memcpy-in-order` (bpf-linker's default) LLVM expands `memset` and `memmove`
/// of known size inline instead of calling byte-at-a-time loops.
const EBPF_RUSTFLAGS: &str =
    "-C debuginfo=2 -C link-arg=--btf -C link-arg=--disable-expand-memcpy-in-order";

/// Variables that the outer (stable) `cargo xtask` run leaves in our environment and that
/// would make a nested cargo pick the stable toolchain or the wrong target/flags.
const OUTER_CARGO_VARS: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_ENCODED_RUSTFLAGS",
];

/// What a set of system tools is for: the tests (every build checks for them), or one of
/// the benchmarks that drive external load generators and the kernel's own NAT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolUse {
    /// The tests, the demo and every benchmark: namespaces, veths, pinned maps,
    /// kube-proxy's rules as the cluster tests' baseline, HTTP requests.
    Tests,
    /// `cargo xtask bench e2e`: TCP throughput.
    BenchE2e,
    /// `cargo xtask bench e2e` and `l7`: the HTTP load generator.
    HttpLoad,
    /// `cargo xtask bench l7`: nginx, the baseline of the L7 hop.
    BenchL7,
}

impl ToolUse {
    fn describe(self) -> &'static str {
        match self {
            ToolUse::Tests => "the tests",
            ToolUse::BenchE2e => "the e2e benchmark",
            ToolUse::HttpLoad => "the HTTP benchmarks (e2e, l7)",
            ToolUse::BenchL7 => "the l7 benchmark",
        }
    }

    /// The tool sets a benchmark needs beyond the tests' (by its `cargo xtask bench` name).
    pub fn for_bench(name: &str) -> Vec<ToolUse> {
        match name {
            "e2e" => vec![ToolUse::BenchE2e, ToolUse::HttpLoad],
            "l7" => vec![ToolUse::HttpLoad, ToolUse::BenchL7],
            _ => Vec::new(),
        }
    }
}

/// Every command-line tool xtask installs when missing: (executable, Debian package, what
/// needs it). The one place to add a tool.
const SYSTEM_TOOLS: &[(&str, &str, ToolUse)] = &[
    ("bpftool", "bpftool", ToolUse::Tests),
    ("ip", "iproute2", ToolUse::Tests),
    ("ethtool", "ethtool", ToolUse::Tests),
    // kube-proxy's rules (iptables and nftables modes): the cluster tests' baseline and
    // the benchmarks' (applied only inside their own namespaces); nft also counts the
    // paths packets take through the cluster tests' router.
    ("iptables-restore", "iptables", ToolUse::Tests),
    ("nft", "nftables", ToolUse::Tests),
    // HTTP(S) requests of the L7 and cluster tests and of the L7 benchmark's route checks.
    ("curl", "curl", ToolUse::Tests),
    // HTTP load: keep-alive requests/s, latency percentiles, new connections/s.
    ("wrk", "wrk", ToolUse::HttpLoad),
    // TCP throughput.
    ("iperf3", "iperf3", ToolUse::BenchE2e),
    // The L7 baseline, run only inside the benchmark's namespaces with its own config.
    // Debian's package starts a system nginx on install unless policy-rc.d forbids it
    // (container images usually do); the benchmark neither needs nor touches that one.
    ("nginx", "nginx", ToolUse::BenchL7),
];

/// Everything the eBPF build needs, found (or installed) by [`ensure`].
pub struct Toolchain {
    /// [`nightly()`]: the toolchain every lb-ebpf cargo call names.
    pub name: String,
    /// `rustc +TOOLCHAIN --print sysroot`; its `lib` holds the libLLVM bpf-linker needs.
    pub sysroot: PathBuf,
    /// bpf-linker's own folder in the tools folder, keyed by that toolchain's build
    /// ([`linker_root`]); bpf-linker lives in its `bin`.
    pub linker_root: PathBuf,
    /// Whether a step had to install something; a warm run passes `--quiet` to cargo.
    pub installed: bool,
}

/// Makes sure the lb-ebpf toolchain ([`nightly()`]), its rust-src, a bpf-linker built
/// against its libLLVM and the system tools the tests use are present, installing what
/// is missing.
pub fn ensure() -> Result<Toolchain> {
    let name = nightly();
    let (sysroot, mut installed) = ensure_nightly(&name)?;
    installed |= ensure_rust_src(&name, &sysroot)?;
    let version = probe(Command::new("rustup").args(["run", &name, "rustc", "-vV"]))
        .with_context(|| format!("`rustup run {name} rustc -vV` fails"))?;
    let linker_root = linker_root(&tools_dir()?, &name, &version)?;
    installed |= ensure_bpf_linker(&sysroot, &linker_root)?;
    installed |= ensure_system_tools(ToolUse::Tests)?;
    Ok(Toolchain {
        name,
        sysroot,
        linker_root,
        installed,
    })
}

/// Where the bpf-linker for one toolchain lives:
/// `TOOLS/bpf-linker-VERSION/TOOLCHAIN-COMMIT-llvm-LLVM` (e.g.
/// `bpf-linker-0.13.0/nightly-2026-05-19-9eb3be26b-llvm-22.1.4`), from that toolchain's
/// `rustc -vV`. bpf-linker links the toolchain's own libLLVM, so one built for another
/// toolchain (or for an earlier build of a moving channel such as `nightly`) is never
/// picked up by mistake: its folder has another name.
fn linker_root(tools: &Path, toolchain: &str, rustc_vv: &str) -> Result<PathBuf> {
    let field = |name: &str| {
        rustc_vv
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let commit = field("commit-hash:").unwrap_or("unknown");
    let commit = commit.get(..9).unwrap_or(commit);
    let llvm = field("LLVM version:")
        .with_context(|| format!("`rustc +{toolchain} -vV` names no LLVM version:\n{rustc_vv}"))?;
    let safe = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    Ok(tools
        .join(format!("bpf-linker-{BPF_LINKER_VERSION}"))
        .join(safe(&format!("{toolchain}-{commit}-llvm-{llvm}"))))
}

impl Toolchain {
    /// `cargo +TOOLCHAIN` ([`nightly()`]) in `dir` with the eBPF build environment: its
    /// bpf-linker on PATH, its libLLVM loadable, BTF rustflags, and the outer stable run's
    /// variables gone. Every lb-ebpf cargo call (build, fmt, clippy) goes through here.
    pub fn nightly_cargo(&self, dir: &Path) -> Result<Command> {
        let mut cmd = Command::new("cargo");
        cmd.arg(format!("+{}", self.name)).current_dir(dir);
        strip_outer_cargo_env(&mut cmd);
        cmd.env("PATH", prepend_path("PATH", &self.linker_root.join("bin"))?)
            .env("LD_LIBRARY_PATH", self.ld_library_path()?)
            .env("RUSTFLAGS", EBPF_RUSTFLAGS);
        Ok(cmd)
    }

    /// Installs nightly's rustfmt and clippy when missing; a minimal profile lacks them and
    /// the lint steps run `cargo +nightly fmt` / `cargo +nightly clippy` for lb-ebpf.
    pub fn ensure_lint_components(&self) -> Result<()> {
        let nightly = &self.name;
        let bin = self.sysroot.join("bin");
        let missing: Vec<&str> = [("rustfmt", "rustfmt"), ("clippy", "cargo-clippy")]
            .into_iter()
            .filter(|(_, exe)| !bin.join(exe).is_file())
            .map(|(component, _)| component)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let list = missing.join(" ");
        say(&format!(
            "installing {list} for the {nightly} toolchain (rustup component add {list} --toolchain {nightly})"
        ));
        run(Command::new("rustup")
            .args(["component", "add"])
            .args(&missing)
            .args(["--toolchain", nightly])
            .stdout(io::stderr()))
    }

    fn ld_library_path(&self) -> Result<OsString> {
        prepend_path("LD_LIBRARY_PATH", &self.sysroot.join("lib"))
    }
}

/// Removes [`OUTER_CARGO_VARS`] from a nested cargo's environment.
pub fn strip_outer_cargo_env(cmd: &mut Command) {
    for var in OUTER_CARGO_VARS {
        cmd.env_remove(var);
    }
}

/// Prints what an install step does; all our chatter goes to stderr so stdout stays
/// reserved for results (build-ebpf's object path).
pub fn say(message: &str) {
    eprintln!("xtask: {message}");
}

/// Returns the toolchain's sysroot (installing the toolchain, with rust-src, when it is
/// missing) and whether it had to be installed.
fn ensure_nightly(nightly: &str) -> Result<(PathBuf, bool)> {
    if let Some(sysroot) = nightly_sysroot(nightly) {
        return Ok((sysroot, false));
    }
    say(&format!(
        "installing the {nightly} toolchain for lb-ebpf (rustup toolchain install {nightly} --profile minimal --component rust-src --no-self-update)"
    ));
    // --no-self-update: installing a toolchain must not also replace rustup itself.
    run(Command::new("rustup")
        .args(["toolchain", "install", nightly, "--profile", "minimal"])
        .args(["--component", "rust-src", "--no-self-update"])
        .stdout(io::stderr()))?;
    let sysroot = nightly_sysroot(nightly).with_context(|| {
        format!(
            "`rustup run {nightly} rustc --print sysroot` still fails after installing {nightly}"
        )
    })?;
    Ok((sysroot, true))
}

fn nightly_sysroot(nightly: &str) -> Option<PathBuf> {
    probe(Command::new("rustup").args(["run", nightly, "rustc", "--print", "sysroot"]))
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

fn ensure_rust_src(nightly: &str, sysroot: &Path) -> Result<bool> {
    if sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        return Ok(false);
    }
    say(&format!(
        "installing rust-src for the {nightly} toolchain (rustup component add rust-src --toolchain {nightly})"
    ));
    run(Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", nightly])
        .stdout(io::stderr()))?;
    Ok(true)
}

/// `$XLB_TOOLS_DIR`, or `$HOME/.cache/xlb/tools`: a known folder shared across runs so the
/// minute-long bpf-linker build happens once per machine.
fn tools_dir() -> Result<PathBuf> {
    let dir = if let Some(dir) = env::var_os("XLB_TOOLS_DIR").filter(|d| !d.is_empty()) {
        PathBuf::from(dir)
    } else {
        let home = env::var_os("HOME").context("neither XLB_TOOLS_DIR nor HOME is set")?;
        Path::new(&home).join(".cache/xlb/tools")
    };
    if dir.is_absolute() {
        Ok(dir)
    } else {
        Ok(env::current_dir()?.join(dir))
    }
}

/// Builds bpf-linker into `tools` (its keyed [`linker_root`]) against the libLLVM in
/// `sysroot` unless a working one is there.
fn ensure_bpf_linker(sysroot: &Path, tools: &Path) -> Result<bool> {
    let bin = tools.join("bin/bpf-linker");
    let lib = sysroot.join("lib");
    let version = || {
        probe(Command::new(&bin).arg("--version").env(
            "LD_LIBRARY_PATH",
            prepend_path("LD_LIBRARY_PATH", &lib).ok()?,
        ))
    };
    match version() {
        Some(v) if v.contains(BPF_LINKER_VERSION) => return Ok(false),
        Some(v) => say(&format!(
            "{} reports `{v}`, not {BPF_LINKER_VERSION}; reinstalling",
            bin.display()
        )),
        None if bin.exists() => say(&format!(
            "{} does not run (`--version` failed); reinstalling",
            bin.display()
        )),
        None => {}
    }

    // bpf-linker's build looks for LLVM under LLVM_PREFIX; no system LLVM 22 exists here, so
    // point it at the nightly toolchain's own libLLVM.
    let llvm = tools.join("llvm");
    let llvm_lib = llvm.join("lib");
    fs::create_dir_all(&llvm_lib)
        .with_context(|| format!("could not create {}", llvm_lib.display()))?;
    let names = fs::read_dir(&lib)
        .with_context(|| format!("could not list {}", lib.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect::<Vec<_>>();
    let target = lib.join(pick_llvm_lib(&names, &lib)?);
    let link = llvm_lib.join("libLLVM.so");
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("could not remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&target, &link)
        .with_context(|| format!("could not link {} -> {}", link.display(), target.display()))?;

    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        strip_outer_cargo_env(&mut cmd);
        // Keep the toolchain that runs xtask: the nested cargo builds a host tool.
        if let Some(toolchain) = env::var_os("RUSTUP_TOOLCHAIN") {
            cmd.env("RUSTUP_TOOLCHAIN", toolchain);
        }
        cmd.env("LLVM_PREFIX", &llvm)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", BPF_LINKER_FEATURES])
            .arg("--root")
            .arg(tools)
            // Replaces a registered but broken install (e.g. after a nightly update).
            .arg("--force")
            .stdout(io::stderr());
        if locked {
            cmd.arg("--locked");
        }
        say(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} into {} (LLVM_PREFIX={} cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features {BPF_LINKER_FEATURES} --root {}{}; about a minute)",
            tools.display(),
            llvm.display(),
            tools.display(),
            if locked { " --locked" } else { "" },
        ));
        run(&mut cmd)
    };
    if let Err(err) = install(true) {
        say(&format!("{err:#}; retrying without --locked"));
        install(false)?;
    }
    match version() {
        Some(v) if v.contains(BPF_LINKER_VERSION) => Ok(true),
        other => bail!(
            "bpf-linker was installed into {} but `{} --version` gives {other:?}, not {BPF_LINKER_VERSION}",
            tools.display(),
            bin.display()
        ),
    }
}

/// Picks `libLLVM.so.22.1-rust-*-nightly` among the nightly sysroot's `lib` entries.
fn pick_llvm_lib<'a>(names: &'a [String], lib: &Path) -> Result<&'a str> {
    if let Some(name) = names
        .iter()
        .find(|n| n.starts_with(LLVM_LIB_PREFIX) && n.ends_with(LLVM_LIB_SUFFIX))
    {
        return Ok(name);
    }
    let others: Vec<&str> = names
        .iter()
        .filter(|n| n.starts_with("libLLVM"))
        .map(String::as_str)
        .collect();
    let nightly = nightly();
    bail!(
        "no {LLVM_LIB_PREFIX}*{LLVM_LIB_SUFFIX} in {} (found: {}); bpf-linker {BPF_LINKER_VERSION} is built with --features {BPF_LINKER_FEATURES} and needs a `{nightly}` toolchain on LLVM 22 (the pinned {PINNED_NIGHTLY} has LLVM 22.1.4)",
        lib.display(),
        if others.is_empty() {
            "no libLLVM at all".to_owned()
        } else {
            others.join(", ")
        }
    )
}

/// Installs the tools `purpose` needs ([`SYSTEM_TOOLS`]) with apt-get when any is missing,
/// saying which packages; quiet when all are there.
pub fn ensure_system_tools(purpose: ToolUse) -> Result<bool> {
    let wanted = || {
        SYSTEM_TOOLS
            .iter()
            .filter(|(_, _, usage)| *usage == purpose)
    };
    let packages: Vec<&str> = wanted()
        .filter(|(tool, _, _)| find_tool(tool).is_none())
        .map(|(_, package, _)| *package)
        .collect();
    if packages.is_empty() {
        return Ok(false);
    }
    let list = packages.join(" ");
    let what = purpose.describe();
    if find_tool("apt-get").is_none() {
        bail!("{what} need {list} and apt-get is not available; install them");
    }
    if let Some(uid) = effective_uid().filter(|&uid| uid != 0) {
        bail!(
            "{what} need {list}; installing them with apt-get needs root (effective uid is {uid}): run as root (sudo -E) or install them yourself"
        );
    }
    say(&format!(
        "installing {list} for {what} (apt-get update; apt-get install -y --no-install-recommends {list})"
    ));
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(io::stderr()))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(io::stderr()))?;
    for (tool, package, _) in wanted() {
        if find_tool(tool).is_none() {
            bail!("`{tool}` is still missing after installing {package}");
        }
    }
    Ok(true)
}

/// Looks for an executable on PATH and in /usr/sbin and /sbin, which a non-root PATH
/// often lacks although that is where bpftool, ip, ethtool, iptables and nft live.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The effective uid from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `dir` followed by the current value of the list variable `var`.
fn prepend_path(var: &str, dir: &Path) -> Result<OsString> {
    let current = env::var_os(var).unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf())
        .chain(env::split_paths(&current).filter(|p| !p.as_os_str().is_empty()));
    env::join_paths(dirs).with_context(|| format!("{} cannot go into {var}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_nightly_llvm_22_library() {
        let names = [
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
        ]
        .map(String::from);
        assert_eq!(
            pick_llvm_lib(&names, Path::new("/s/lib")).unwrap(),
            "libLLVM.so.22.1-rust-1.97.0-nightly"
        );
    }

    #[test]
    fn explains_a_missing_or_different_llvm() {
        let names = ["libLLVM.so.23.1-rust-1.99.0-nightly".to_owned()];
        let err = pick_llvm_lib(&names, Path::new("/s/lib")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("libLLVM.so.23.1-rust-1.99.0-nightly"), "{msg}");
        assert!(msg.contains("llvm-22"), "{msg}");
        assert!(pick_llvm_lib(&[], Path::new("/s/lib")).is_err());
    }

    #[test]
    fn system_tools_are_grouped_by_use() {
        assert_eq!(
            ToolUse::for_bench("e2e"),
            [ToolUse::BenchE2e, ToolUse::HttpLoad]
        );
        assert_eq!(
            ToolUse::for_bench("l7"),
            [ToolUse::HttpLoad, ToolUse::BenchL7]
        );
        assert!(ToolUse::for_bench("control-plane").is_empty());
        assert!(ToolUse::for_bench("maglev").is_empty());
        assert!(ToolUse::for_bench("packet").is_empty());
        for usage in [
            ToolUse::Tests,
            ToolUse::BenchE2e,
            ToolUse::HttpLoad,
            ToolUse::BenchL7,
        ] {
            assert!(SYSTEM_TOOLS.iter().any(|(_, _, u)| *u == usage));
        }
        let mut tools: Vec<&str> = SYSTEM_TOOLS.iter().map(|(t, _, _)| *t).collect();
        tools.sort_unstable();
        tools.dedup();
        assert_eq!(tools.len(), SYSTEM_TOOLS.len(), "a tool is listed twice");
    }

    /// `rustc +nightly-2026-05-19 -vV` on these machines.
    const PINNED_VV: &str = "rustc 1.97.0-nightly (9eb3be26b 2026-05-18)
binary: rustc
commit-hash: 9eb3be26b46eccea1de7448ea9cc3c1d20bb1a35
commit-date: 2026-05-18
host: x86_64-unknown-linux-gnu
release: 1.97.0-nightly
LLVM version: 22.1.4
";

    #[test]
    fn lb_ebpf_uses_the_pinned_nightly_unless_told_otherwise() {
        assert_eq!(choose_nightly(None), "nightly-2026-05-19");
        assert_eq!(choose_nightly(Some("")), PINNED_NIGHTLY);
        assert_eq!(choose_nightly(Some("  ")), PINNED_NIGHTLY);
        assert_eq!(
            choose_nightly(Some("nightly-2026-06-01")),
            "nightly-2026-06-01"
        );
        assert_eq!(choose_nightly(Some("nightly")), "nightly");
    }

    #[test]
    fn lb_ebpf_rust_toolchain_file_names_the_pinned_nightly() {
        let file = include_str!("../../lb-ebpf/rust-toolchain.toml");
        let channel = file
            .lines()
            .find_map(|l| l.trim().strip_prefix("channel"))
            .and_then(|rest| rest.trim().strip_prefix('='))
            .map(|v| v.trim().trim_matches('"'))
            .expect("a channel line");
        assert_eq!(channel, PINNED_NIGHTLY);
        for component in ["rust-src", "rustfmt", "clippy"] {
            assert!(file.contains(&format!("\"{component}\"")), "{component}");
        }
    }

    #[test]
    fn bpf_linker_is_keyed_by_the_toolchain_build() {
        let tools = Path::new("/root/.cache/xlb/tools");
        let pinned = linker_root(tools, PINNED_NIGHTLY, PINNED_VV).unwrap();
        assert_eq!(
            pinned,
            Path::new(
                "/root/.cache/xlb/tools/bpf-linker-0.13.0/nightly-2026-05-19-9eb3be26b-llvm-22.1.4"
            )
        );
        // Never the unkeyed folder earlier versions of xtask used (TOOLS/bin/bpf-linker).
        assert_ne!(pinned, tools);
        // Another build of a moving channel, or another LLVM: another folder.
        let moved = PINNED_VV.replace("9eb3be26b46ec", "0123456789abc");
        let floating = linker_root(tools, "nightly", &moved).unwrap();
        assert_ne!(floating, pinned);
        assert!(floating.ends_with("nightly-012345678-llvm-22.1.4"));
        let llvm23 = PINNED_VV.replace("LLVM version: 22.1.4", "LLVM version: 23.0.0");
        assert_ne!(linker_root(tools, PINNED_NIGHTLY, &llvm23).unwrap(), pinned);
        // Odd toolchain names stay one path component.
        let custom = linker_root(tools, "my/tool chain", PINNED_VV).unwrap();
        assert_eq!(custom.parent().unwrap(), tools.join("bpf-linker-0.13.0"));
        // No LLVM version: no guessing.
        assert!(linker_root(tools, "x", "rustc 1.0\ncommit-hash: abc\n").is_err());
    }

    #[test]
    fn prepends_to_list_variables() {
        let joined = prepend_path("XTASK_TEST_UNSET_VAR", Path::new("/t/bin")).unwrap();
        assert_eq!(joined, OsString::from("/t/bin"));
    }
}
