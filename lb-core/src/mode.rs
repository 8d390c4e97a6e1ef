//! How a service's new flows are translated (Cilium's `--bpf-lb-mode`, per node with a
//! per-Service override): the global `--lb-mode`, the Kubernetes annotation
//! `xlb.dev/lb-mode` and a config file service's `lbMode` all parse through here.

use std::fmt;
use std::str::FromStr;

/// The translation of a service's new flows to backends on other nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LbMode {
    /// Source to this node's address and a port it allocates, as kube-proxy's
    /// masquerade: replies come back through this node whatever the backend's routes.
    #[default]
    Snat,
    /// Destination only: the backend sees the client's address, and its replies must be
    /// routed back through this node (it is the backends' gateway), as in IPVS NAT mode.
    Dnat,
    /// Direct server return: the packet goes untranslated, encapsulated, to the
    /// backend's node, which translates and delivers it; the backend sees the client's
    /// address and answers the client directly (Cilium's DSR, Katran).
    Dsr,
    /// DSR for TCP, SNAT for UDP (Cilium's hybrid).
    Hybrid,
}

impl LbMode {
    pub const fn name(self) -> &'static str {
        match self {
            LbMode::Snat => "snat",
            LbMode::Dnat => "dnat",
            LbMode::Dsr => "dsr",
            LbMode::Hybrid => "hybrid",
        }
    }

    /// What a new flow of `protocol` to a backend on another node gets in this mode:
    /// (source-NATed, encapsulated).
    pub const fn translation(self, protocol: crate::config::Protocol) -> (bool, bool) {
        let tcp = matches!(protocol, crate::config::Protocol::Tcp);
        match self {
            LbMode::Snat => (true, false),
            LbMode::Dnat => (false, false),
            LbMode::Dsr => (false, true),
            LbMode::Hybrid => (!tcp, tcp),
        }
    }
}

impl fmt::Display for LbMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LbMode {
    type Err = String;

    /// `snat`, `dnat`, `dsr` or `hybrid`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "snat" => Ok(LbMode::Snat),
            "dnat" => Ok(LbMode::Dnat),
            "dsr" => Ok(LbMode::Dsr),
            "hybrid" => Ok(LbMode::Hybrid),
            other => Err(format!(
                "must be \"snat\", \"dsr\", \"hybrid\" or \"dnat\", got {other:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_mode_and_names_a_bad_one() {
        for mode in [LbMode::Snat, LbMode::Dnat, LbMode::Dsr, LbMode::Hybrid] {
            assert_eq!(mode.name().parse(), Ok(mode));
        }
        assert_eq!(LbMode::default(), LbMode::Snat);
        let err = "SNAT".parse::<LbMode>().expect_err("case");
        assert!(err.contains("\"SNAT\""), "{err}");
    }

    #[test]
    fn hybrid_is_dsr_for_tcp_and_snat_for_udp() {
        use crate::config::Protocol::{Tcp, Udp};
        assert_eq!(LbMode::Hybrid.translation(Tcp), (false, true));
        assert_eq!(LbMode::Hybrid.translation(Udp), (true, false));
        assert_eq!(LbMode::Dsr.translation(Udp), (false, true));
        assert_eq!(LbMode::Snat.translation(Tcp), (true, false));
        assert_eq!(LbMode::Dnat.translation(Tcp), (false, false));
    }
}
