//! DSR (direct server return): the node that receives a flow for a backend on another
//! node sends the client's packet there untranslated, encapsulated (IPIP / IPv6-in-IPv6,
//! see `lb_common::dsr`), from its own address to the backend's; xlb on the backend's
//! node strips the outer header, translates the destination to the backend, remembers
//! the reply translation and delivers. The backend's reply leaves that node with the
//! frontend as its source (the tc egress program) and goes to the client directly.
//!
//! Nothing is shared between nodes: every node holds the same Maglev table, so a flow
//! the router moves to another node mid-stream is encapsulated to the same backend,
//! whose node still holds its reply translation.
//!
//! Decapsulation runs in the tc ingress program of the same interfaces (XDP passes the
//! encapsulated packet, `pass_not_l4`): the XDP program's 512-byte stack has no room
//! for a second translation path beside the first.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_check_mtu, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    ADDR_F_BACKEND, BACKEND_F_LOCAL, FAMILY_V4, FAMILY_V6, FRONTEND_F_DSR, PROTO_TCP, Reason,
    csum::{finish, word, words},
    dsr::{
        DSR_OUTER_TTL, DSR_OVERHEAD_V4, DSR_OVERHEAD_V6, IPPROTO_IPIP, IPPROTO_IPV6, dsr_mss,
        dsr_overhead,
    },
};

use crate::{
    conntrack::{self, Chosen},
    egress,
    maps::KEY_SCRATCH_V1,
    packet::{Frame, Packet, load, store},
    parse, service, snat, stats,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IP_DF: u16 = 0x4000;
const IP_MF_OFFSET: u16 = 0x3fff;
/// Ethernet, the larger outer header, IPv4 with options, a TCP header with options.
const TC_HEADERS: u32 = 14 + 40 + 60 + 60;

/// Whether the chosen backend is reached by DSR: a DSR flow (`Chosen::frontend_flags`),
/// a backend elsewhere, and not a flow that was source-NATed before the service's mode
/// changed (it keeps its port while the reservation lasts).
#[inline(always)]
pub fn wanted(chosen: &Chosen) -> bool {
    chosen.frontend_flags & FRONTEND_F_DSR != 0
        && chosen.backend.flags & BACKEND_F_LOCAL == 0
        && chosen.snat.is_none()
}

/// A big-endian word of the frame.
#[inline(always)]
fn be32(ctx: &XdpContext, off: usize) -> Result<u32, Reason> {
    load::<[u8; 4]>(ctx, off)
        .map(u32::from_be_bytes)
        .ok_or(Reason::DropDsrEncap)
}

#[inline(always)]
fn put32(ctx: &XdpContext, off: usize, value: u32) -> Result<(), Reason> {
    store(ctx, off, value.to_be_bytes())
}

/// Puts `pkt` (client -> frontend, untranslated) inside an outer header from this node
/// to `chosen`'s backend; `pkt` then describes the outer header for the FIB (its
/// addresses and length; its offsets and ports stay the inner's). The caller forwards
/// it, handing it to tc where XDP cannot send it (its source is this node's own
/// address, as a source-NATed packet's).
#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, pkt: &mut Packet, chosen: &Chosen) -> Result<(), Reason> {
    let family = pkt.key.family;
    let node = snat::node_addr(family).ok_or(Reason::DropNoSnatAddress)?;
    if pkt.l3() != ETH_HLEN {
        return Err(Reason::DropDsrEncap);
    }
    let overhead = dsr_overhead(family);
    let outer_len = pkt.ip_len.saturating_add(overhead);
    // Read before the head moves: the Ethernet header and the inner's first word (its
    // TOS / traffic class goes outside, as RFC 2003 and RFC 2473 copy it).
    let (macs, mac_tail, ethertype) = (
        load::<u64>(ctx, 0).ok_or(Reason::DropDsrEncap)?,
        load::<u32>(ctx, 8).ok_or(Reason::DropDsrEncap)?,
        load::<u16>(ctx, 12).ok_or(Reason::DropDsrEncap)?,
    );
    let first = be32(ctx, ETH_HLEN)?;
    // SAFETY: helper call on this program's context; packet pointers are re-read after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -i32::from(overhead)) } != 0 {
        return Err(Reason::DropDsrEncap);
    }
    store(ctx, 0, macs)?;
    store(ctx, 8, mac_tail)?;
    store(ctx, 12, ethertype)?;
    // The backend's port, as it is on the wire, travels in the outer header.
    let port = u32::from(u16::from_be(chosen.backend.port));
    let dst = &chosen.backend.addr;
    if family == FAMILY_V4 {
        let tos = (first >> 16) & 0xff;
        let w0 = 0x4500_0000 | tos << 16 | u32::from(outer_len);
        let w1 = port << 16 | u32::from(IP_DF);
        let w2 = u32::from(DSR_OUTER_TTL) << 24 | u32::from(IPPROTO_IPIP) << 16;
        let (s, d) = (word(node, 0), word(dst, 0));
        let check = finish(words(w0) + words(w1) + words(w2) + words(s) + words(d));
        put32(ctx, ETH_HLEN, w0)?;
        put32(ctx, ETH_HLEN + 4, w1)?;
        put32(ctx, ETH_HLEN + 8, w2 | u32::from(check))?;
        put32(ctx, ETH_HLEN + 12, s)?;
        put32(ctx, ETH_HLEN + 16, d)?;
    } else {
        let traffic_class = first & 0x0ff0_0000;
        put32(ctx, ETH_HLEN, 0x6000_0000 | traffic_class | port)?;
        put32(
            ctx,
            ETH_HLEN + 4,
            u32::from(pkt.ip_len) << 16 | u32::from(IPPROTO_IPV6) << 8 | u32::from(DSR_OUTER_TTL),
        )?;
        store(ctx, ETH_HLEN + 8, *node)?;
        store(ctx, ETH_HLEN + 24, *dst)?;
    }
    pkt.key.src = *node;
    pkt.key.dst = *dst;
    pkt.ip_len = outer_len;
    Ok(())
}

/// The outer header of an encapsulated packet addressed to a backend (at `l3`, of
/// `ethertype`): its length; the backend and its port (network order) are left in the
/// per-CPU key slot as the source of the reply's key. `None` for anything else.
#[inline(always)]
fn outer(ctx: &impl Frame, l3: usize, ethertype: u16) -> Option<u16> {
    let key = KEY_SCRATCH_V1.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used by this program run alone.
    let key = unsafe { &mut *key };
    let overhead = if ethertype == ETH_P_IP {
        let hdr = load::<[u8; 20]>(ctx, l3)?;
        // Built by xlb: no options, not fragmented.
        let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
        if hdr[0] != 0x45 || hdr[9] != IPPROTO_IPIP || frag & IP_MF_OFFSET != 0 {
            return None;
        }
        key.src = [0; 16];
        key.src[..4].copy_from_slice(&[hdr[16], hdr[17], hdr[18], hdr[19]]);
        key.sport = u16::from_ne_bytes([hdr[4], hdr[5]]);
        DSR_OVERHEAD_V4
    } else if ethertype == ETH_P_IPV6 {
        let first = load::<[u8; 8]>(ctx, l3)?;
        if first[0] >> 4 != 6 || first[6] != IPPROTO_IPV6 {
            return None;
        }
        key.src = load::<[u8; 16]>(ctx, l3 + 24)?;
        key.sport = u16::from_ne_bytes([first[2], first[3]]);
        DSR_OVERHEAD_V6
    } else {
        return None;
    };
    service::may_be(&key.src, ADDR_F_BACKEND).then_some(overhead)
}

/// In the tc ingress program: an encapsulated packet for a backend on this node loses
/// its outer header, gets the backend as its destination (the client stays its source)
/// and goes on to the kernel, which routes it to the pod; the reply translation is
/// remembered for the tc egress program. Anything else goes on untouched, uncounted.
#[inline(always)]
pub fn deliver(ctx: &TcContext) -> i32 {
    match try_deliver(ctx) {
        Ok(None) => TC_ACT_OK,
        Ok(Some(service_id)) => {
            let bytes = u64::from(ctx.len());
            stats::count_reason(Reason::DsrDelivered, bytes);
            stats::count_service(service_id, bytes, false);
            TC_ACT_OK
        }
        Err(reason) => {
            stats::count_reason(reason, u64::from(ctx.len()));
            TC_ACT_SHOT
        }
    }
}

/// `Ok(None)`: not an encapsulated packet for a backend here; `Ok(Some(service))`:
/// delivered (service 0 when this node does not hold the frontend: a `NodePort` of
/// another node).
#[inline(always)]
fn try_deliver(ctx: &TcContext) -> Result<Option<u32>, Reason> {
    let want = core::cmp::min(ctx.len(), TC_HEADERS);
    if ctx.data() + want as usize > ctx.data_end() && ctx.pull_data(want).is_err() {
        return Ok(None);
    }
    let Ok((l3, ethertype)) = parse::l2(ctx) else {
        return Ok(None);
    };
    let Some(overhead) = outer(ctx, l3, ethertype) else {
        return Ok(None);
    };
    if l3 != ETH_HLEN {
        return Err(Reason::DropDsrMalformed);
    }
    // A GRO aggregate keeps its segment size: without `FIXED_GSO` the kernel grows it by
    // the outer header's length, and the forwarded segments would be that much larger
    // than the client sent them (and than the path MTU it learnt).
    ctx.adjust_room(
        -i32::from(overhead),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Reason::DropDsrMalformed)?;
    let want = core::cmp::min(ctx.len(), TC_HEADERS);
    if ctx.data() + want as usize > ctx.data_end() {
        ctx.pull_data(want).map_err(|_| Reason::DropDsrMalformed)?;
    }
    let pkt = parse::parse(ctx).map_err(|_| Reason::DropDsrMalformed)?;
    if pkt.key.family
        != if overhead == DSR_OVERHEAD_V4 {
            FAMILY_V4
        } else {
            FAMILY_V6
        }
    {
        return Err(Reason::DropDsrMalformed);
    }
    pkt.check_translatable()
        .map_err(|_| Reason::DropDsrMalformed)?;
    let service_id = service::lookup_frontend(&pkt).map_or(0, |f| f.service_id);
    let key = KEY_SCRATCH_V1
        .get_ptr_mut(0)
        .ok_or(Reason::DropDsrMalformed)?;
    // SAFETY: this CPU's slot, filled by `outer` in this program run.
    let key = unsafe { &mut *key };
    key.dst = pkt.key.src;
    key.dport = pkt.key.sport;
    key.proto = pkt.key.proto;
    key.family = pkt.key.family;
    key._pad = [0; 2];
    conntrack::record_dsr_reply(&pkt, key, service_id);
    egress::translate(ctx, &pkt, true, &key.src, key.sport)
        .map_err(|_| Reason::DropDsrMalformed)?;
    Ok(Some(service_id))
}

/// TCP SYN and ACK.
const TCP_SYN_ACK: u8 = 0x12;
/// TCP option kind and length of the MSS option.
const TCP_OPT_MSS: [u8; 2] = [2, 4];

/// In the tc egress program, on a DSR-delivered flow's reply: a SYN-ACK announcing an
/// MSS larger than the client's segments can be once encapsulated on a link of this
/// device's MTU gets that MSS (`lb_common::dsr::dsr_mss`), so the client never sends a
/// segment the receiving node cannot encapsulate. Only an MSS option first among the
/// options is read (where Linux and the BSDs put it); anything else goes on as it is.
#[inline(always)]
pub fn clamp_mss(ctx: &TcContext, pkt: &Packet) {
    if pkt.key.proto != PROTO_TCP {
        return;
    }
    let l4 = pkt.l4();
    let Some(hdr) = load::<[u8; 24]>(ctx, l4) else {
        return;
    };
    if hdr[13] & TCP_SYN_ACK != TCP_SYN_ACK || hdr[12] >> 4 < 6 || [hdr[20], hdr[21]] != TCP_OPT_MSS
    {
        return;
    }
    let mut mtu: u32 = 0;
    // SAFETY: helper call on this program's socket buffer; ifindex 0 is its device, whose
    // MTU the helper leaves in `mtu` whatever it returns.
    unsafe { bpf_check_mtu(ctx.skb.skb.cast(), 0, &raw mut mtu, 0, 0) };
    let max = dsr_mss(pkt.key.family, u16::try_from(mtu).unwrap_or(u16::MAX));
    let mss = u16::from_be_bytes([hdr[22], hdr[23]]);
    if max == 0 || mss <= max {
        return;
    }
    let old = u16::from_ne_bytes([hdr[22], hdr[23]]);
    let new = max.to_be();
    if ctx
        .l4_csum_replace(l4 + 16, u64::from(old), u64::from(new), 2)
        .is_ok()
    {
        let _ = ctx.store(l4 + 22, &new, 0);
    }
}
