//! Handing a source-NATed packet to the kernel when XDP cannot send it itself: its next hop's
//! neighbour is not resolved yet, or its device takes no redirect (an overlay, a pod's
//! veth). The stack would drop it as a martian (its source is now this node's own
//! address), so XDP leaves the egress ifindex in the packet's metadata and the tc
//! ingress program (`xlb_tc_ingress`) sends it there with `bpf_redirect_neigh`, which
//! resolves the neighbour as the kernel's own output path does (Cilium's split). Unmarked
//! packets may be DSR packets for a backend here, which `dsr::deliver` decapsulates.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_redirect_neigh, bpf_xdp_adjust_meta},
    macros::classifier,
    programs::{TcContext, XdpContext},
};

/// Marks the metadata as xlb's ("xlbh").
const MAGIC: u32 = 0x786c_6268;
const META_LEN: usize = 8;

/// Leaves `ifindex` in the frame's metadata for `xlb_tc_ingress`. Best effort: a driver
/// without metadata support leaves the packet to the stack as it is.
#[inline(always)]
pub fn to_tc(ctx: &XdpContext, ifindex: u32) {
    // SAFETY: the context of this program run.
    if unsafe { bpf_xdp_adjust_meta(ctx.as_ptr().cast(), -(META_LEN as i32)) } != 0 {
        return;
    }
    let meta = ctx.metadata();
    if meta + META_LEN > ctx.data() {
        return;
    }
    // SAFETY: bounds checked above (the verifier checks data_meta + 8 <= data).
    unsafe {
        core::ptr::write_unaligned(meta as *mut u32, MAGIC);
        core::ptr::write_unaligned((meta + 4) as *mut u32, ifindex);
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
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    let data = ctx.data();
    if meta + META_LEN > data {
        // Not marked: maybe a DSR packet for a backend here (`dsr`).
        return crate::dsr::deliver(&ctx);
    }
    // SAFETY: bounds checked above.
    let (magic, ifindex) = unsafe {
        (
            core::ptr::read_unaligned(meta as *const u32),
            core::ptr::read_unaligned((meta + 4) as *const u32),
        )
    };
    if magic != MAGIC {
        return crate::dsr::deliver(&ctx);
    }
    // Consumed: a socket buffer keeps its metadata when it is sent on, and the next
    // node's tc ingress (over veth, a bridge) would otherwise take it for its own mark.
    // SAFETY: bounds checked above; tc may write the metadata.
    unsafe { core::ptr::write_unaligned(meta as *mut u32, 0) };
    // SAFETY: plain helper call; no parameters: the kernel looks the next hop up.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
