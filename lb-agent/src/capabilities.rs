//! The Linux capabilities `lb-agent run` needs, so that a load failing for lack of one
//! says which (the kernel only says "Operation not permitted" or prints a verifier log).
//! deploy/'s DaemonSet adds exactly [`RUN`] and, for the L7 hop on ports 80 and 443,
//! [`NET_BIND_SERVICE`]; deploy/README.md has the measurements.

/// One capability: its bit in `CapEff` (linux/capability.h) and why the agent needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub bit: u32,
    /// As Kubernetes spells it in `capabilities.add` (without `CAP_`).
    pub name: &'static str,
    pub why: &'static str,
}

/// Implies every other capability in [`RUN`] (and much more): the kernel accepts it
/// wherever it asks for CAP_BPF, CAP_PERFMON or CAP_NET_ADMIN in what the agent does.
pub const SYS_ADMIN: Capability = Capability {
    bit: 21,
    name: "SYS_ADMIN",
    why: "implies the others; kernels before 5.8 know only this one",
};

/// What `lb-agent run` needs on Linux 5.8+ (measured on 6.18; see deploy/README.md).
pub const RUN: &[Capability] = &[
    Capability {
        bit: 39,
        name: "BPF",
        why: "creating maps and loading the program",
    },
    Capability {
        bit: 12,
        name: "NET_ADMIN",
        why: "the devmap, the XDP program type and attaching it to interfaces",
    },
    Capability {
        bit: 38,
        name: "PERFMON",
        why: "the verifier rejects the program's packet pointer arithmetic without it",
    },
];

/// What the L7 hop adds when a listener's port is below 1024 (80 and 443 in deploy/).
/// CAP_SYS_ADMIN does not imply it.
pub const NET_BIND_SERVICE: Capability = Capability {
    bit: 10,
    name: "NET_BIND_SERVICE",
    why: "the L7 hop's listeners on ports below 1024",
};

/// Adds to a failed bind of the L7 listeners (`ports`) that CAP_NET_BIND_SERVICE is
/// missing, when a port needs it and the process lacks it.
pub fn explain_bind(err: anyhow::Error, ports: &[u16]) -> anyhow::Error {
    let Some(low) = ports.iter().find(|p| **p < 1024) else {
        return err;
    };
    match effective() {
        Ok(mask) if mask & (1 << NET_BIND_SERVICE.bit) == 0 => err.context(format!(
            "missing capability CAP_NET_BIND_SERVICE ({}); --l7 listens on port {low}",
            NET_BIND_SERVICE.why
        )),
        _ => err,
    }
}

/// The capabilities of [`RUN`] that `effective` (a `CapEff` mask) lacks; none when it
/// holds CAP_SYS_ADMIN.
pub fn missing(effective: u64) -> Vec<Capability> {
    let has = |c: &Capability| effective & (1 << c.bit) != 0;
    if has(&SYS_ADMIN) {
        return Vec::new();
    }
    RUN.iter().filter(|c| !has(c)).copied().collect()
}

/// This thread's effective capability mask, from `/proc/thread-self/status`.
pub fn effective() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| std::io::Error::other("no CapEff line in /proc/thread-self/status"))
}

/// Adds to `err` (from loading or attaching) which capabilities the agent lacks, if any.
pub fn explain(err: anyhow::Error) -> anyhow::Error {
    match effective() {
        Ok(mask) => match describe_missing(&missing(mask)) {
            Some(message) => err.context(message),
            None => err,
        },
        Err(_) => err,
    }
}

fn describe_missing(missing: &[Capability]) -> Option<String> {
    if missing.is_empty() {
        return None;
    }
    let list: Vec<String> = missing
        .iter()
        .map(|c| format!("CAP_{} ({})", c.name, c.why))
        .collect();
    let all: Vec<String> = RUN.iter().map(|c| format!("CAP_{}", c.name)).collect();
    Some(format!(
        "missing capability {}; lb-agent run needs {} (or CAP_SYS_ADMIN)",
        list.join(", "),
        all.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(caps: &[Capability]) -> u64 {
        caps.iter().fold(0, |m, c| m | (1 << c.bit))
    }

    #[test]
    fn the_full_set_or_sys_admin_lacks_nothing() {
        assert!(missing(mask(RUN)).is_empty());
        assert!(missing(mask(&[SYS_ADMIN])).is_empty());
        assert_eq!(missing(0), RUN);
    }

    #[test]
    fn names_each_missing_capability() {
        for dropped in RUN {
            let rest: Vec<Capability> = RUN.iter().filter(|c| *c != dropped).copied().collect();
            assert_eq!(missing(mask(&rest)), [*dropped]);
            let message = describe_missing(&[*dropped]).expect("a message");
            assert!(
                message.starts_with(&format!("missing capability CAP_{} (", dropped.name)),
                "{message}"
            );
        }
    }

    #[test]
    fn bits_match_linux_capability_h() {
        // CAP_NET_BIND_SERVICE 10, CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39.
        let bits: Vec<(&str, u32)> = RUN.iter().map(|c| (c.name, c.bit)).collect();
        assert_eq!(bits, [("BPF", 39), ("NET_ADMIN", 12), ("PERFMON", 38)]);
        assert_eq!(SYS_ADMIN.bit, 21);
        assert_eq!(NET_BIND_SERVICE.bit, 10);
    }

    #[test]
    fn reads_this_threads_mask() {
        // Whatever the test runs with, the line exists and parses.
        effective().expect("CapEff");
    }
}
