//! Handing a source-NATed packet to the kernel when XDP cannot send it itself: its next hop's
//! neighbour is not resolved yet, or its device takes no redirect (an overlay, a pod's
//! veth). The stack would drop it as a martian (its source is now this node's own
//! address), so XDP marks the frame and the tc ingress program (`xlb_tc_ingress`) sends
//! it out of the device XDP chose with `bpf_redirect_neigh`, which resolves the
//! neighbour as the kernel's own output path does (Cilium's split). Unmarked packets may
//! be DSR packets for a backend here, which `dsr::deliver` decapsulates.
//!
//! The mark travels in the frame itself, not in XDP metadata: some kernels refuse
//! `bpf_xdp_adjust_meta` to every XDP program (seen on Linux 6.18 builds), and a driver
//! without metadata support would lose it. XDP inserts an 802.1Q tag with VLAN ID 4095,
//! which IEEE 802.1Q reserves (no wire carries it and `ip link` cannot create it), and
//! writes "xl" and the egress ifindex over the source MAC, which `bpf_redirect_neigh`
//! rewrites anyway. The stack moves the tag into the socket buffer before tc ingress
//! runs; the tc program checks both, removes the tag and redirects. A mark nothing
//! consumes (no tc program) ends as a frame of a VLAN no device has, and the stack drops
//! it, as it would have dropped the translated packet.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_redirect_neigh, bpf_skb_vlan_pop, bpf_xdp_adjust_head},
    macros::classifier,
    programs::{TcContext, XdpContext},
};

/// The reserved VLAN ID the mark's tag carries.
const HANDOFF_VID: u16 = 0x0fff;
const VLAN_VID_MASK: u32 = 0x0fff;
const ETH_P_8021Q: u16 = 0x8100;
const VLAN_HLEN: usize = 4;
/// "xl", in the source MAC's first two bytes; the egress ifindex follows.
const MAGIC: [u8; 2] = *b"xl";

/// Marks the frame for `xlb_tc_ingress`, to go out of `ifindex`. Best effort: a frame
/// that cannot take the tag goes to the stack unmarked.
#[inline(always)]
pub fn to_tc(ctx: &XdpContext, ifindex: u32) {
    let start = ctx.data();
    if start + 12 + VLAN_HLEN > ctx.data_end() {
        return;
    }
    // SAFETY: bounds checked above.
    let tagged = unsafe { core::ptr::read_unaligned((start + 12) as *const [u8; 2]) }
        == ETH_P_8021Q.to_be_bytes();
    if tagged {
        // A frame that came in tagged (the one tag `parse` takes) has its tag's ID
        // replaced: the tc program pops it, so the packet leaves untagged, as a
        // redirect out of another device should.
        // SAFETY: bounds checked above.
        unsafe { mark(start, ifindex) };
        return;
    }
    // SAFETY: the context of this program run.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), -(VLAN_HLEN as i32)) } != 0 {
        return;
    }
    let start = ctx.data();
    // The frame was a whole IP packet: this holds; the verifier needs it said.
    if start + 12 + 2 * VLAN_HLEN > ctx.data_end() {
        // SAFETY: gives back the room taken above.
        unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), VLAN_HLEN as i32) };
        return;
    }
    // SAFETY: bounds checked above. The destination MAC moves to the new front; the
    // tag's four bytes land where the old source MAC ended, and the Ethertype the frame
    // had is already in place after them.
    unsafe {
        let dmac = core::ptr::read_unaligned((start + VLAN_HLEN) as *const [u8; 6]);
        core::ptr::write_unaligned(start as *mut [u8; 6], dmac);
        core::ptr::write_unaligned((start + 12) as *mut [u8; 2], ETH_P_8021Q.to_be_bytes());
        mark(start, ifindex);
    }
}

/// Writes the source MAC's mark and the tag's control information.
///
/// # Safety
/// `start` is the frame's first byte, with at least 16 bytes after it.
#[inline(always)]
unsafe fn mark(start: usize, ifindex: u32) {
    // SAFETY: the caller's bounds.
    unsafe {
        core::ptr::write_unaligned((start + 6) as *mut [u8; 2], MAGIC);
        core::ptr::write_unaligned((start + 8) as *mut [u8; 4], ifindex.to_be_bytes());
        core::ptr::write_unaligned((start + 14) as *mut [u8; 2], HANDOFF_VID.to_be_bytes());
    }
}

/// On the interfaces the XDP program is on: a packet XDP marked goes out of the device
/// it named, its neighbour resolved by the kernel; everything else goes on.
#[classifier]
#[inline(always)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] macro hands the context over by value"
)]
pub fn xlb_tc_ingress(ctx: TcContext) -> i32 {
    // SAFETY: the socket buffer of this program run.
    let (tagged, tci) = unsafe { ((*ctx.skb.skb).vlan_present, (*ctx.skb.skb).vlan_tci) };
    if tagged == 0 || tci & VLAN_VID_MASK != u32::from(HANDOFF_VID) {
        // Not marked: maybe a DSR packet for a backend here (`dsr`).
        return crate::dsr::deliver(&ctx);
    }
    let Ok(smac) = ctx.load::<[u8; 6]>(6) else {
        return crate::dsr::deliver(&ctx);
    };
    if smac[..2] != MAGIC {
        return crate::dsr::deliver(&ctx);
    }
    let ifindex = u32::from_be_bytes([smac[2], smac[3], smac[4], smac[5]]);
    // The tag would otherwise go out with the frame. Should that fail, the stack drops
    // the frame as one of a VLAN no device has.
    // SAFETY: the socket buffer of this program run.
    if unsafe { bpf_skb_vlan_pop(ctx.skb.skb) } != 0 {
        return aya_ebpf::bindings::TC_ACT_OK;
    }
    // SAFETY: plain helper call; no parameters: the kernel looks the next hop up.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
