//! The tc egress program (`lb-ebpf/src/egress.rs`) on each interface the XDP program is
//! on: it translates back the replies of backends on this node, which leave through the
//! node's routing and never cross XDP. Attached as a TCX link (Linux 6.6+) pinned as
//! `egress_<interface>` beside the XDP link, adopted by a restarted agent with one
//! `bpf_link_update` (replies are never left untranslated), and detached with it.

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
const EGRESS_PREFIX: &str = "egress_";

/// Where the egress link of `interface` is pinned.
pub fn egress_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{EGRESS_PREFIX}{interface}"))
}

impl Dataplane {
    pub(super) fn egress_mut(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        let program = self
            .ebpf
            .as_mut()
            .and_then(|ebpf| ebpf.program_mut(EGRESS_PROGRAM))
            .ok_or(DataplaneError::Program {
                name: EGRESS_PROGRAM,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
        program
            .try_into()
            .map_err(|source| DataplaneError::Program {
                name: EGRESS_PROGRAM,
                source,
            })
    }

    /// The loaded egress program, for the test harness (`BPF_PROG_TEST_RUN`).
    pub fn egress_program(&self) -> Result<&SchedClassifier, DataplaneError> {
        self.ebpf
            .as_ref()
            .and_then(|ebpf| ebpf.program(EGRESS_PROGRAM))
            .ok_or(DataplaneError::Program {
                name: EGRESS_PROGRAM,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                name: EGRESS_PROGRAM,
                source,
            })
    }

    /// Runs the egress program on `interface`'s egress through a link pinned under
    /// `dir`: an existing pin gets the new program atomically, else it is attached
    /// (TCX) and pinned.
    pub fn attach_egress_pinned(
        &mut self,
        interface: &str,
        dir: &Path,
    ) -> Result<(), DataplaneError> {
        let path = egress_path(dir, interface);
        if path.exists() {
            match self.adopt_egress(&path) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(interface, "pinned egress link unusable ({e}); attaching anew");
                    std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                }
            }
        }
        let prog = self.egress_mut()?;
        let id = prog
            .attach_with_options(
                interface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| DataplaneError::Interface {
                name: interface.to_owned(),
                reason: format!("tc egress (TCX) attach failed: {source}; needs Linux 6.6+"),
            })?;
        let link = prog
            .take_link(id)
            .map_err(|source| DataplaneError::Program {
                name: EGRESS_PROGRAM,
                source,
            })?;
        let fd_link: FdLink = link.try_into().map_err(|e| pin_err(&path, e))?;
        fd_link.pin(&path).map_err(|e| pin_err(&path, e))?;
        Ok(())
    }

    fn adopt_egress(&mut self, path: &Path) -> Result<(), DataplaneError> {
        let pinned = PinnedLink::from_pin(path).map_err(|e| pin_err(path, e))?;
        let link = FdLink::from(pinned)
            .try_into()
            .map_err(|e| pin_err(path, e))?;
        self.egress_mut()?
            .attach_to_link(link)
            .map_err(|source| DataplaneError::Program {
                name: EGRESS_PROGRAM,
                source,
            })?;
        Ok(())
    }
}

/// Detaches the egress program from `interface` and removes its pin, when there is
/// one (through the pin: no CAP_SYS_ADMIN needed).
pub fn detach_egress(dir: &Path, interface: &str) -> Result<bool, DataplaneError> {
    let path = egress_path(dir, interface);
    if !path.exists() {
        return Ok(false);
    }
    let link = sys::obj_get(&path).map_err(|e| pin_err(&path, e))?;
    sys::link_detach(link.as_fd()).map_err(|e| pin_err(&path, e))?;
    std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
    Ok(true)
}
