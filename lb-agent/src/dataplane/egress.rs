//! The tc programs on each interface the XDP program is on, as TCX links (Linux 6.6+)
//! pinned beside the XDP link, adopted by a restarted agent with one `bpf_link_update`,
//! and detached with it:
//! - egress (`lb-ebpf/src/egress.rs`, `egress_<interface>`): translates back the
//!   replies of backends on this node, which leave through the node's routing and never
//!   cross XDP;
//! - ingress (`lb-ebpf/src/handoff.rs`, `ingress_<interface>`): sends on the source-NATed
//!   packets XDP could not (unresolved neighbour, a device without redirects).

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};

use super::pins::pin_err;
use super::sys;
use super::{Dataplane, DataplaneError};

/// The egress program's name in the object.
pub const EGRESS_PROGRAM: &str = "xlb_tc_egress";
/// The ingress program's name in the object.
pub const INGRESS_PROGRAM: &str = "xlb_tc_ingress";

/// The pin prefix of the ingress link.
pub const INGRESS_PREFIX: &str = "ingress_";

/// The two tc hooks: program, attach type and pin prefix.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (EGRESS_PROGRAM, TcAttachType::Egress, "egress_"),
    (INGRESS_PROGRAM, TcAttachType::Ingress, INGRESS_PREFIX),
];

/// Where the tc link `prefix` of `interface` is pinned. bpffs refuses names with a dot
/// (`flannel.1`, a VLAN's `eth0.100`), so a dot is written `%2E` (`pin_name`).
fn tc_path(dir: &Path, prefix: &str, interface: &str) -> PathBuf {
    dir.join(format!("{prefix}{}", pin_name(interface)))
}

/// `interface` as a bpffs name allows it: every `.` as `%2E`.
pub fn pin_name(interface: &str) -> String {
    interface.replace('.', "%2E")
}

/// The interface a pin name made by `pin_name` stands for.
pub fn interface_of(pin_name: &str) -> String {
    pin_name.replace("%2E", ".")
}

impl Dataplane {
    pub(super) fn tc_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DataplaneError> {
        let program = self
            .ebpf
            .as_mut()
            .and_then(|ebpf| ebpf.program_mut(name))
            .ok_or(DataplaneError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
        program
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Loads both tc programs (the verifier runs here).
    pub(super) fn load_tc(&mut self) -> Result<(), DataplaneError> {
        for (name, _, _) in HOOKS {
            self.tc_mut(name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(())
    }

    /// The loaded egress program, for the test harness (`BPF_PROG_TEST_RUN`).
    pub fn egress_program(&self) -> Result<&SchedClassifier, DataplaneError> {
        self.tc_program(EGRESS_PROGRAM)
    }

    /// The loaded tc ingress program, for the test harness (`BPF_PROG_TEST_RUN`).
    pub fn ingress_program(&self) -> Result<&SchedClassifier, DataplaneError> {
        self.tc_program(INGRESS_PROGRAM)
    }

    fn tc_program(&self, name: &'static str) -> Result<&SchedClassifier, DataplaneError> {
        self.ebpf
            .as_ref()
            .and_then(|ebpf| ebpf.program(name))
            .ok_or(DataplaneError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Runs both tc programs on `interface` through links pinned under `dir`: an
    /// existing pin gets the new program atomically, else it is attached (TCX) and
    /// pinned.
    pub fn attach_tc_pinned(&mut self, interface: &str, dir: &Path) -> Result<(), DataplaneError> {
        self.attach_hooks(interface, dir, &HOOKS)
    }

    /// Runs the tc ingress program alone on `interface` (`--decap-interface`: a device
    /// DSR packets arrive on without crossing XDP, an overlay's), pinned as for
    /// `attach_tc_pinned`.
    pub fn attach_decap_pinned(
        &mut self,
        interface: &str,
        dir: &Path,
    ) -> Result<(), DataplaneError> {
        self.attach_hooks(interface, dir, &HOOKS[1..])
    }

    fn attach_hooks(
        &mut self,
        interface: &str,
        dir: &Path,
        hooks: &[(&'static str, TcAttachType, &str)],
    ) -> Result<(), DataplaneError> {
        for &(name, hook, prefix) in hooks {
            let path = tc_path(dir, prefix, interface);
            if path.exists() {
                match self.adopt_tc(name, &path) {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!(
                            interface,
                            "pinned {name} link unusable ({e}); attaching anew"
                        );
                        std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                    }
                }
            }
            let prog = self.tc_mut(name)?;
            let id = prog
                .attach_with_options(
                    interface,
                    hook,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|source| DataplaneError::Interface {
                    name: interface.to_owned(),
                    reason: format!(
                        "tc {hook:?} (TCX) attach of {name} failed: {source}; needs Linux 6.6+"
                    ),
                })?;
            let link = prog
                .take_link(id)
                .map_err(|source| DataplaneError::Program { name, source })?;
            let fd_link: FdLink = link.try_into().map_err(|e| pin_err(&path, e))?;
            fd_link.pin(&path).map_err(|e| pin_err(&path, e))?;
        }
        Ok(())
    }

    fn adopt_tc(&mut self, name: &'static str, path: &Path) -> Result<(), DataplaneError> {
        let pinned = PinnedLink::from_pin(path).map_err(|e| pin_err(path, e))?;
        let link = FdLink::from(pinned)
            .try_into()
            .map_err(|e| pin_err(path, e))?;
        self.tc_mut(name)?
            .attach_to_link(link)
            .map_err(|source| DataplaneError::Program { name, source })?;
        Ok(())
    }
}

/// Detaches both tc programs from `interface` and removes their pins, where there are
/// some (through the pins: no CAP_SYS_ADMIN needed).
pub fn detach_tc(dir: &Path, interface: &str) -> Result<(), DataplaneError> {
    for (_, _, prefix) in HOOKS {
        let path = tc_path(dir, prefix, interface);
        if !path.exists() {
            continue;
        }
        let link = sys::obj_get(&path).map_err(|e| pin_err(&path, e))?;
        sys::link_detach(link.as_fd()).map_err(|e| pin_err(&path, e))?;
        std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_have_no_dots_and_map_back() {
        for interface in ["eth0", "flannel.1", "eth0.100.2"] {
            let name = pin_name(interface);
            assert!(!name.contains('.'), "{name}");
            assert_eq!(interface_of(&name), interface);
        }
        assert_eq!(pin_name("eth0"), "eth0", "undotted names as before");
    }
}
