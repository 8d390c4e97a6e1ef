//! What `cargo xtask test` needs from the system before it builds anything: the tests
//! attach XDP programs, pin maps and create network namespaces, so a missing privilege must
//! fail loudly up front instead of surfacing as skipped or mysterious test failures.

use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run::run;
use crate::toolchain::say;

/// Capabilities the tests use, as (bit number, name).
const REQUIRED_CAPS: &[(u32, &str)] = &[
    (21, "CAP_SYS_ADMIN"),
    (12, "CAP_NET_ADMIN"),
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
];
const BPFFS: &str = "/sys/fs/bpf";

/// Fails, naming each missing capability, unless this process has every capability in
/// [`REQUIRED_CAPS`]; then mounts bpffs at /sys/fs/bpf when it is not mounted.
pub fn ensure_test_privileges() -> Result<()> {
    let status =
        fs::read_to_string("/proc/self/status").context("could not read /proc/self/status")?;
    let cap_eff = parse_cap_eff(&status)?;
    let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let missing = missing_caps(cap_eff, last_cap);
    if !missing.is_empty() {
        let lines: Vec<String> = missing
            .iter()
            .map(|cap| {
                format!(
                    "missing capability {cap}: the XDP and namespace tests need it; run as root (sudo -E cargo xtask test)"
                )
            })
            .collect();
        bail!(
            "this process lacks privileges the tests need (CapEff {cap_eff:016x}):\n  {}",
            lines.join("\n  ")
        );
    }

    let mounts = fs::read_to_string("/proc/mounts").context("could not read /proc/mounts")?;
    if !bpffs_mounted(&mounts) {
        say(&format!(
            "mounting bpffs at {BPFFS} for pinned maps (mount -t bpf bpf {BPFFS})"
        ));
        fs::create_dir_all(BPFFS).with_context(|| format!("could not create {BPFFS}"))?;
        run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    }
    Ok(())
}

/// The effective capability mask from the text of `/proc/self/status`.
fn parse_cap_eff(status: &str) -> Result<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .context("no CapEff line in /proc/self/status")?
        .trim();
    u64::from_str_radix(hex, 16).with_context(|| format!("bad CapEff value {hex:?}"))
}

/// Names of the required capabilities absent from `cap_eff`. Kernels older than 5.8 know
/// no `CAP_BPF`/`CAP_PERFMON` (`last_cap` below their bit): there `CAP_SYS_ADMIN` covers them.
fn missing_caps(cap_eff: u64, last_cap: Option<u32>) -> Vec<&'static str> {
    REQUIRED_CAPS
        .iter()
        .filter(|&&(bit, _)| last_cap.is_none_or(|last| bit <= last))
        .filter(|&&(bit, _)| cap_eff & (1 << bit) == 0)
        .map(|&(_, name)| name)
        .collect()
}

/// Whether the top-most mount at /sys/fs/bpf (the last one listed in /proc/mounts; sysfs
/// is usually listed under it) is a bpf filesystem.
fn bpffs_mounted(mounts: &str) -> bool {
    mounts
        .lines()
        .rev()
        .find_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            (fields.next()? == BPFFS).then(|| fields.next())
        })
        .flatten()
        == Some("bpf")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root on Linux 6.x: all 41 capabilities (0..=40).
    const ROOT: u64 = 0x0000_01ff_ffff_ffff;

    #[test]
    fn parses_cap_eff_from_status() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status).unwrap(), ROOT);
        assert!(parse_cap_eff("Name:\tcat\n").is_err());
        assert!(parse_cap_eff("CapEff:\tzz\n").is_err());
    }

    #[test]
    fn root_has_everything() {
        assert!(missing_caps(ROOT, Some(40)).is_empty());
    }

    #[test]
    fn names_each_missing_capability() {
        let without_bpf = ROOT & !(1 << 39);
        assert_eq!(missing_caps(without_bpf, Some(40)), ["CAP_BPF"]);
        assert_eq!(
            missing_caps(0, Some(40)),
            ["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"]
        );
        // Unknown kernel (no cap_last_cap): require all four.
        assert_eq!(missing_caps(ROOT & !(1 << 38), None), ["CAP_PERFMON"]);
    }

    #[test]
    fn old_kernels_need_only_sys_admin_and_net_admin() {
        let pre_5_8_root = (1u64 << 38) - 1;
        assert!(missing_caps(pre_5_8_root, Some(37)).is_empty());
        assert_eq!(missing_caps(1 << 12, Some(37)), ["CAP_SYS_ADMIN"]);
    }

    #[test]
    fn finds_bpffs_in_proc_mounts() {
        let with = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n";
        let without = "sysfs /sys sysfs rw 0 0\ntmpfs /sys/fs/bpf tmpfs rw 0 0\n";
        let stacked = "sysfs /sys/fs/bpf sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n";
        let covered = "bpf /sys/fs/bpf bpf rw 0 0\ntmpfs /sys/fs/bpf tmpfs rw 0 0\n";
        assert!(bpffs_mounted(with));
        assert!(bpffs_mounted(stacked));
        assert!(!bpffs_mounted(without));
        assert!(!bpffs_mounted(covered));
        assert!(!bpffs_mounted(""));
    }
}
