//! DSR and path MTU discovery: a client's packet that fits every link on its way to the
//! receiving node but not the next hop once encapsulated (its length plus 20 bytes for
//! IPv4, 40 for IPv6, over the route's MTU) is answered here with ICMP "fragmentation
//! needed" (IPv4 with DF) or `ICMPv6` "packet too big", as a router on the path would:
//! from the frontend (the address the client sent to), quoting the client's packet as
//! it sent it, advertising the next hop's MTU less the outer header. The client's
//! socket learns the MTU and sends smaller packets that fit once encapsulated (TCP
//! whose MSS was not clamped enough, UDP).
//!
//! The FIB says when: `bpf_fib_lookup` with the outer packet's length returns
//! `BPF_FIB_LKUP_RET_FRAG_NEEDED` and the route's MTU in `mtu_result`. The forward
//! path counts that as `pass_fib_other` with the encapsulated packet still in the frame;
//! the XDP entry then hands the frame here, in a program of its own reached by tail
//! call (`slow_path`, with the whole stack to itself), which recognises the encapsulation
//! (outer protocol 4 or 41 from this node's own address), asks the FIB again for the
//! MTU, strips the outer header and builds the answer in place (`reject::too_big`).
//! Anything else keeps the verdict it had.
//!
//! IPv4 without DF is dropped (`drop_dsr_too_big`), as Katran drops it: the outer
//! header may not be fragmented (the receiving side decapsulates before any
//! reassembly), and an ICMP error for a packet that allows fragmentation tells a
//! sender nothing it acts on.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_FRAG_NEEDED, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6, Reason,
    dsr::{DSR_OVERHEAD_V4, DSR_OVERHEAD_V6, IPPROTO_IPIP, IPPROTO_IPV6},
    reason::XDP_PASS,
};

use crate::{
    packet::{self, load, store},
    parse, reject, snat,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const IP_DF: u8 = 0x40;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The XDP entry's hook for a forward that ended in `pass_fib_other`: a DSR packet too
/// big for its next hop is answered (`dsr_icmp_too_big`) or dropped
/// (`drop_dsr_too_big`); anything else goes on to the kernel as it was.
#[inline(always)]
pub fn too_big(ctx: &XdpContext) -> (u32, Reason) {
    match answer(ctx) {
        Ok(verdict) => verdict,
        Err(reason) => (reason.action(), reason),
    }
}

#[inline(always)]
fn answer(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let unchanged = Ok((XDP_PASS, Reason::PassFibOther));
    let frame_len = packet::frame_len(ctx);
    // SAFETY: a plain C struct; all-zero is its documented initial state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    let ethertype = load::<[u8; 2]>(ctx, ETH_HLEN - 2).ok_or(Reason::PassFibOther)?;
    // The outer header xlb built (`dsr::encapsulate`): no options, this node's address
    // as its source. Then the inner header's "don't fragment" and the inner ports, which
    // the forward path's lookup hashed (a multipath route's legs may differ in MTU).
    let (overhead, df) = if ethertype == ETH_P_IP {
        let outer = load::<[u8; 20]>(ctx, ETH_HLEN).ok_or(Reason::PassFibOther)?;
        let node = snat::node_addr(FAMILY_V4).ok_or(Reason::PassFibOther)?;
        if outer[0] != 0x45 || outer[9] != IPPROTO_IPIP || outer[12..16] != node[..4] {
            return unchanged;
        }
        let inner = load::<[u8; 24]>(ctx, ETH_HLEN + 20).ok_or(Reason::PassFibOther)?;
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src =
            u32::from_ne_bytes([outer[12], outer[13], outer[14], outer[15]]);
        params.__bindgen_anon_4.ipv4_dst =
            u32::from_ne_bytes([outer[16], outer[17], outer[18], outer[19]]);
        params.__bindgen_anon_1.tot_len = u16::from_be_bytes([outer[2], outer[3]]);
        params.l4_protocol = inner[9];
        if inner[0] == 0x45 {
            params.sport = u16::from_ne_bytes([inner[20], inner[21]]);
            params.dport = u16::from_ne_bytes([inner[22], inner[23]]);
        }
        (DSR_OVERHEAD_V4, inner[6] & IP_DF != 0)
    } else if ethertype == ETH_P_IPV6 {
        let first = load::<[u8; 8]>(ctx, ETH_HLEN).ok_or(Reason::PassFibOther)?;
        let src = load::<[u8; 16]>(ctx, ETH_HLEN + 8).ok_or(Reason::PassFibOther)?;
        let node = snat::node_addr(FAMILY_V6).ok_or(Reason::PassFibOther)?;
        if first[0] >> 4 != 6 || first[6] != IPPROTO_IPV6 || src != *node {
            return unchanged;
        }
        let dst = load::<[u8; 16]>(ctx, ETH_HLEN + 24).ok_or(Reason::PassFibOther)?;
        let inner = load::<[u8; 44]>(ctx, ETH_HLEN + 40).ok_or(Reason::PassFibOther)?;
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = addr6(&src);
        params.__bindgen_anon_4.ipv6_dst = addr6(&dst);
        let payload = u16::from_be_bytes([first[4], first[5]]);
        params.__bindgen_anon_1.tot_len = payload.saturating_add(40);
        params.l4_protocol = inner[6];
        params.sport = u16::from_ne_bytes([inner[40], inner[41]]);
        params.dport = u16::from_ne_bytes([inner[42], inner[43]]);
        // IPv6 is never fragmented on the way.
        (DSR_OVERHEAD_V6, true)
    } else {
        return unchanged;
    };
    params.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &raw mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        return unchanged;
    }
    if !df {
        return Err(Reason::DropDsrTooBig);
    }
    // SAFETY: the helper wrote the route's MTU over the length it was given.
    let mtu = unsafe { params.__bindgen_anon_1.mtu_result }.saturating_sub(overhead);
    strip(ctx, overhead)?;
    let pkt = parse::parse(ctx).map_err(|_| Reason::DropDsrTooBig)?;
    let back = reject::too_big(ctx, &pkt, frame_len - u64::from(overhead), mtu)?;
    Ok((back, Reason::DsrIcmpTooBig))
}

/// The address as `bpf_fib_lookup` holds it: four words in memory order.
#[inline(always)]
fn addr6(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Removes the outer header, the Ethernet header moved in front of the client's packet
/// as it arrived (the answer turns its MACs around).
#[inline(always)]
fn strip(ctx: &XdpContext, overhead: u16) -> Result<(), Reason> {
    let (macs, mac_tail) = (
        load::<u64>(ctx, 0).ok_or(Reason::DropDsrTooBig)?,
        load::<u32>(ctx, 8).ok_or(Reason::DropDsrTooBig)?,
    );
    let ethertype = load::<u16>(ctx, 12).ok_or(Reason::DropDsrTooBig)?;
    // SAFETY: helper call on this program's context; packet pointers are re-read after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, i32::from(overhead)) } != 0 {
        return Err(Reason::DropDsrTooBig);
    }
    store(ctx, 0, macs)?;
    store(ctx, 8, mac_tail)?;
    store(ctx, 12, ethertype)
}
