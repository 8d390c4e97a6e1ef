//! The XDP entry's rare paths, each an XDP program of its own that the entry reaches by
//! tail call (`SLOW_PATHS_V1`, filled by the agent): an ICMP error about a translated
//! flow (`icmp`) and a DSR packet too big for its next hop (`dsr_mtu`). A tail call
//! replaces the entry's frame, so each path has the whole stack, and the entry keeps
//! its common path (a frontend's or a backend's packet) in one frame, with no call to a
//! BPF function and the return it costs.

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{
    Reason,
    maps::{SLOW_PATH_ICMP_ERROR, SLOW_PATH_TOO_BIG},
};

use crate::{
    dsr_mtu, icmp,
    maps::{ARRIVED_BYTES_V1, SLOW_PATHS_V1},
    stats,
};

/// Hands the packet to its slow path when `verdict` asks for one; returns only when
/// there is none or the tail call failed (an empty slot: no agent filled it), with the
/// verdict as it was: the packet goes on to the kernel untranslated.
#[inline(always)]
pub fn take(ctx: &XdpContext, verdict: (u32, Reason), bytes: u64) -> (u32, Reason) {
    let slot = match verdict.1 {
        // An ICMP error about a translated flow goes on translated.
        Reason::PassNotL4 => SLOW_PATH_ICMP_ERROR,
        // A DSR packet too big for its next hop once encapsulated is answered.
        Reason::PassFibOther => SLOW_PATH_TOO_BIG,
        _ => return verdict,
    };
    if let Some(arrived) = ARRIVED_BYTES_V1.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; the tail-called program runs on this CPU next.
        unsafe { *arrived = bytes };
    }
    // SAFETY: the slot holds one of this object's XDP programs, or nothing.
    unsafe { SLOW_PATHS_V1.tail_call(ctx, slot) };
    verdict
}

/// A slow path's verdict, counted as the entry counts its own: its reason, with the
/// length the frame arrived with (this CPU's slot, written by the entry just before the
/// tail call). Returns the action.
#[inline(always)]
fn counted((action, reason): (u32, Reason)) -> u32 {
    let arrived = ARRIVED_BYTES_V1.get(0).copied().unwrap_or(0);
    stats::count_reason(reason, arrived);
    action
}

/// `SLOW_PATH_ICMP_ERROR`.
#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands the context over by value"
)]
pub fn xlb_icmp_error(ctx: XdpContext) -> u32 {
    counted(icmp::error(&ctx))
}

/// `SLOW_PATH_TOO_BIG`.
#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands the context over by value"
)]
pub fn xlb_too_big(ctx: XdpContext) -> u32 {
    counted(dsr_mtu::too_big(&ctx))
}
