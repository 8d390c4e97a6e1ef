//! Project automation for xlb: `cargo xtask <command>` (alias in .cargo/config.toml).
//! It bootstraps the nightly/bpf-linker toolchain the XDP program needs, builds the eBPF
//! object and hands its path to the host crates through `XLB_EBPF_OBJECT`.

mod ebpf;
mod privilege;
mod roles;
mod run;
mod test;
mod toolchain;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::run::run;

/// lb-agent's build script embeds the object named by this variable; tests and binaries
/// also read it at run time.
pub const EBPF_OBJECT_VAR: &str = "XLB_EBPF_OBJECT";

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test and run xlb"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the XDP program (lb-ebpf), installing missing toolchain pieces; prints the
    /// object's absolute path as the last line of stdout.
    BuildEbpf {
        #[arg(long)]
        release: bool,
    },
    /// Build the eBPF object (release) and the workspace that embeds it.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// The project's test command: privilege check, eBPF build, lints, `cargo test`.
    /// Needs root: the tests attach XDP programs and create network namespaces.
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test --workspace`, after `--`.
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Run a benchmark: builds `xlb-bench` (lb-bench) and `lb-agent` (release), then
    /// `xlb-bench <NAME> [ARGS]`.
    Bench {
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build (release) the agent and the demo (lb-testbed's `xlb-demo`), then run
    /// `xlb-demo [ARGS]`: namespaces, the agent from examples/xlb.yaml, traffic through
    /// two VIPs, a readable result.
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_command(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` gives the context chain without anyhow's backtrace, which only shows
            // xtask's own frames (`RUST_BACKTRACE=1` is common in CI).
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(command: Cmd) -> Result<()> {
    match command {
        Cmd::BuildEbpf { release } => {
            let object = build_ebpf(release)?;
            println!("{}", object.display());
        }
        Cmd::Build { release } => {
            build(release)?;
        }
        Cmd::Test { no_lint, extra } => test::test(no_lint, &extra)?,
        Cmd::Bench { name, args } => {
            let object = build_ebpf(true)?;
            for tools in toolchain::ToolUse::for_bench(&name) {
                toolchain::ensure_system_tools(tools)?;
            }
            // Both binaries: the e2e and l7 benchmarks run the agent (`lb-agent run`) beside it.
            run(host_cargo()
                .args([
                    "build",
                    "--release",
                    "-p",
                    "lb-agent",
                    "-p",
                    "lb-bench",
                    "--bins",
                ])
                .env(EBPF_OBJECT_VAR, &object))?;
            run(Command::new(target_dir().join("release/xlb-bench"))
                .arg(name)
                .args(args)
                .env(EBPF_OBJECT_VAR, object))?;
        }
        Cmd::Demo { args } => {
            let object = build(true)?;
            run(Command::new(target_dir().join("release/xlb-demo"))
                .args(args)
                .env(EBPF_OBJECT_VAR, object))?;
        }
    }
    Ok(())
}

/// The workspace root: xtask's parent, fixed at compile time so it works from any cwd.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// `cargo` in the workspace root for host builds; it keeps the toolchain that runs xtask.
pub fn host_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// Where the host build puts binaries: `$CARGO_TARGET_DIR` or `<root>/target`.
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Ensures the toolchain, then builds lb-ebpf; returns the object path.
fn build_ebpf(release: bool) -> Result<PathBuf> {
    let toolchain = toolchain::ensure()?;
    ebpf::build(&toolchain, release)
}

/// build-ebpf --release, then `cargo build --workspace` embedding that object.
fn build(release: bool) -> Result<PathBuf> {
    let object = build_ebpf(true)?;
    let mut cmd = host_cargo();
    cmd.args(["build", "--workspace"])
        .env(EBPF_OBJECT_VAR, &object);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(object)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(std::iter::once("cargo xtask").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn passes_hyphenated_arguments_through() {
        let Cmd::Bench { name, args } = parse(&["bench", "conn-rate", "--secs", "5", "-v"]) else {
            panic!("not bench");
        };
        assert_eq!(name, "conn-rate");
        assert_eq!(args, ["--secs", "5", "-v"]);

        let Cmd::Demo { args } = parse(&["demo", "--backends", "3"]) else {
            panic!("not demo");
        };
        assert_eq!(args, ["--backends", "3"]);

        let Cmd::Test { no_lint, extra } = parse(&["test", "--no-lint", "--", "-p", "lb-agent"])
        else {
            panic!("not test");
        };
        assert!(no_lint);
        assert_eq!(extra, ["-p", "lb-agent"]);
    }
}
