//! The baselines: how long `iptables-restore` and `nft -f` take to install the rule
//! sets kube-proxy's iptables and nftables modes write for the same Services, and to
//! apply one endpoint change the way each mode does (a partial `--noflush` restore; an
//! incremental nft transaction). Each runs in its own throwaway namespace, started from
//! a thread inside it (no `ip netns exec` in the timing), from a file as kube-proxy feeds
//! it on stdin. The rules are checked after each step.

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_testbed::Netns;

use super::cluster::Synthetic;
use crate::kube_proxy;

/// The node address kube-proxy's nftables table accepts NodePorts on (none here).
const NODE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 1);
const SERVICE_CIDR: &str = "203.0.113.0/24";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// Timings of one mode.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Baseline {
    /// Rules (`-A` lines) or nft statements in the full rule set.
    pub rules: usize,
    /// Bytes of the full input.
    pub input_bytes: usize,
    /// Each full install, seconds (into an empty namespace).
    pub full_s: Vec<f64>,
    /// Each one-endpoint change, seconds.
    pub change_s: Vec<f64>,
    /// Bytes of one change's input.
    pub change_bytes: usize,
}

/// A file under the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("xlb-bench-cp-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `program args` in `ns` and returns how long it took; fails on a non-zero exit.
fn timed(ns: &Netns, program: &str, args: &[&str]) -> Result<Duration> {
    let (elapsed, out) = ns.run_in(|| {
        let start = Instant::now();
        let out = Command::new(program).args(args).output();
        (start.elapsed(), out)
    })?;
    let out = out.with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

/// Empties the namespace's iptables and nftables rules (untimed).
fn clear(ns: &Netns) -> Result<()> {
    kube_proxy::clear(ns)
}

/// Full installs (`runs` of them, each into an emptied namespace), then `changes`
/// one-endpoint changes of the Services `cluster.changed(k)` picks.
pub fn measure(mode: Mode, cluster: &Synthetic, runs: usize, changes: usize) -> Result<Baseline> {
    let ns = Netns::new(&format!("cp{}", &mode.label()[..3]))?;
    let mut services = cluster.service_ports();
    let full = match mode {
        Mode::Iptables => kube_proxy::iptables_rules(&services),
        Mode::Nftables => kube_proxy::nft_rules(&services, SERVICE_CIDR, NODE_IP),
    };
    let mut baseline = Baseline {
        rules: count_rules(mode, &full),
        input_bytes: full.len(),
        ..Baseline::default()
    };
    let file = TempFile::new(&format!("{}.full", mode.label()), &full)?;
    let path = file.0.display().to_string();
    for run in 0..runs {
        clear(&ns)?;
        let took = match mode {
            Mode::Iptables => timed(&ns, "iptables-restore", &[&path])?,
            Mode::Nftables => timed(&ns, "nft", &["-f", &path])?,
        };
        baseline.full_s.push(took.as_secs_f64());
        let present = installed(&ns, mode)?;
        if present < baseline.rules {
            bail!(
                "{} run {run}: {present} rules installed, {} expected",
                mode.label(),
                baseline.rules
            );
        }
        eprintln!(
            "  {} full install {}/{runs}: {:.2} s",
            mode.label(),
            run + 1,
            took.as_secs_f64()
        );
    }
    let mut swapped = vec![false; cluster.services];
    for k in 0..changes {
        let i = cluster.changed(k);
        let before = cluster.endpoints(i, swapped[i]);
        swapped[i] = !swapped[i];
        services[i] = cluster.service_port(i, swapped[i]);
        let after = &services[i].endpoints;
        let added: Vec<SocketAddrV4> = after
            .iter()
            .filter(|e| !before.contains(e))
            .copied()
            .collect();
        let gone: Vec<SocketAddrV4> = before
            .iter()
            .filter(|e| !after.contains(e))
            .copied()
            .collect();
        let input = match mode {
            Mode::Iptables => kube_proxy::iptables_partial(&services, &services[i], &gone),
            Mode::Nftables => kube_proxy::nft_change(&services[i], &added, &gone),
        };
        baseline.change_bytes = input.len();
        let file = TempFile::new(&format!("{}.change", mode.label()), &input)?;
        let path = file.0.display().to_string();
        let took = match mode {
            Mode::Iptables => timed(&ns, "iptables-restore", &["--noflush", &path])?,
            Mode::Nftables => timed(&ns, "nft", &["-f", &path])?,
        };
        baseline.change_s.push(took.as_secs_f64());
        check_change(&ns, mode, &added, &gone)?;
    }
    clear(&ns)?;
    Ok(baseline)
}

/// Rules in a full input: `-A` lines, or nft rules and map elements.
fn count_rules(mode: Mode, input: &str) -> usize {
    match mode {
        Mode::Iptables => input.lines().filter(|l| l.starts_with("-A ")).count(),
        Mode::Nftables => input.lines().filter(|l| l.starts_with("add rule ")).count(),
    }
}

/// Rules the namespace holds: `iptables-save` `-A` lines, or rules in `nft list`.
fn installed(ns: &Netns, mode: Mode) -> Result<usize> {
    match mode {
        Mode::Iptables => {
            let save = ns.exec("iptables-save", &[])?;
            Ok(String::from_utf8_lossy(&save.stdout)
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count())
        }
        Mode::Nftables => {
            let list = ns.exec("nft", &["-a", "list", "table", "ip", "kube-proxy"])?;
            // Rules carry a handle; chains, sets and maps end with `{` or their own line.
            Ok(String::from_utf8_lossy(&list.stdout)
                .lines()
                .filter(|l| {
                    l.contains("# handle")
                        && !l.trim_start().starts_with("chain ")
                        && !l.trim_start().starts_with("set ")
                        && !l.trim_start().starts_with("map ")
                        && !l.trim_start().starts_with("table ")
                })
                .count())
        }
    }
}

/// The namespace now DNATs to the added endpoints and no longer to the gone ones.
fn check_change(
    ns: &Netns,
    mode: Mode,
    added: &[SocketAddrV4],
    gone: &[SocketAddrV4],
) -> Result<()> {
    let text = match mode {
        Mode::Iptables => ns.exec("iptables-save", &["-t", "nat"])?.stdout,
        Mode::Nftables => {
            ns.exec("nft", &["list", "table", "ip", "kube-proxy"])?
                .stdout
        }
    };
    let text = String::from_utf8_lossy(&text);
    let dnat = |e: &SocketAddrV4| match mode {
        Mode::Iptables => format!("--to-destination {e}\n"),
        Mode::Nftables => format!("dnat to {e}\n"),
    };
    for e in added {
        if !text.contains(&dnat(e)) {
            bail!(
                "{}: no DNAT to the new endpoint {e} after the change",
                mode.label()
            );
        }
    }
    for e in gone {
        if text.contains(&dnat(e)) {
            bail!("{}: still a DNAT to the removed endpoint {e}", mode.label());
        }
    }
    Ok(())
}
