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
}

impl LbMode {
    pub const fn name(self) -> &'static str {
        match self {
            LbMode::Snat => "snat",
            LbMode::Dnat => "dnat",
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

    /// `snat` or `dnat`; `dsr` and `hybrid` are named as not built yet.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "snat" => Ok(LbMode::Snat),
            "dnat" => Ok(LbMode::Dnat),
            "dsr" | "hybrid" => Err(format!(
                "{text:?} is not built yet in xlb (only \"snat\" and \"dnat\" are)"
            )),
            other => Err(format!("must be \"snat\" or \"dnat\", got {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_built_modes_and_names_the_others() {
        assert_eq!("snat".parse(), Ok(LbMode::Snat));
        assert_eq!("dnat".parse(), Ok(LbMode::Dnat));
        assert_eq!(LbMode::default(), LbMode::Snat);
        for not_yet in ["dsr", "hybrid"] {
            let err = not_yet.parse::<LbMode>().expect_err(not_yet);
            assert!(err.contains("not built yet"), "{err}");
        }
        let err = "SNAT".parse::<LbMode>().expect_err("case");
        assert!(err.contains("\"SNAT\""), "{err}");
    }
}
