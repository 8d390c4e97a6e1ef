//! Refusing a new flow to a service without backends, as kube-proxy's REJECT does: a
//! TCP segment gets a reset (RFC 793, "Reset Generation"), a UDP datagram an ICMP port
//! unreachable (RFC 792; `ICMPv6`, RFC 4443) quoting its IP header and UDP header. The
//! answer is built in the frame itself (fresh headers, checksums computed from scratch)
//! and sent back out of the interface the packet came in on, to the MAC it came from.
//!
//! Not answered (dropped, `drop_no_backend`): a reset (never a reset for a reset), a
//! source that must not get errors (multicast, broadcast, unspecified, loopback), and
//! IPv4 UDP with IP options.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    PROTO_TCP, Reason,
    csum::{finish, sum_words},
    reason::XDP_TX,
};

use crate::{
    packet::{self, Packet, load, store},
    stats,
};

/// TTL / hop limit of the answers (a fresh packet, as the kernel's default).
const TTL: u8 = 64;
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes after the client's IP header: its UDP header.
const QUOTED_L4: usize = 8;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// ICMP destination unreachable, port unreachable.
const ICMP_PORT_UNREACHABLE: [u8; 2] = [3, 3];
/// `ICMPv6` destination unreachable, port unreachable.
const ICMPV6_PORT_UNREACHABLE: [u8; 2] = [1, 4];
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Answers the client's packet in place: `XDP_TX` with the reason, or `Err` (drop) when
/// it must not be answered. `frame_len` is the frame's length as it came in.
#[inline(always)]
pub fn refuse(
    ctx: &XdpContext,
    pkt: &Packet,
    frame_len: u64,
    service_id: u32,
) -> Result<(u32, Reason), Reason> {
    if !answerable(pkt) {
        return Err(Reason::DropNoBackend);
    }
    // First, at a constant offset: LLVM may drop this bounds check when a later check
    // at a variable offset implies it, but the verifier follows only its own.
    let macs = load::<[u8; 12]>(ctx, 0).ok_or(Reason::DropMalformed)?;
    let reason = if pkt.key.proto == PROTO_TCP {
        tcp_reset(ctx, pkt, &macs, frame_len)?;
        Reason::RejectTcpReset
    } else {
        port_unreachable(ctx, pkt, &macs, frame_len)?;
        Reason::RejectIcmpUnreachable
    };
    stats::count_rejected(service_id);
    Ok((XDP_TX, reason))
}

/// Whether the client's address may receive an error (RFC 1122 3.2.2, RFC 4443 2.4):
/// not unspecified, loopback, multicast or broadcast.
#[inline(always)]
fn answerable(pkt: &Packet) -> bool {
    let a = &pkt.key.src;
    if pkt.is_v4() {
        a[0] != 0 && a[0] != 127 && a[0] < 224
    } else {
        let loopback = u128::from_be_bytes(*a) == 1;
        a[0] != 0xff && u128::from_ne_bytes(*a) != 0 && !loopback
    }
}

/// RFC 793: a segment with ACK gets `<SEQ=SEG.ACK><CTL=RST>`, one without gets
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>` (SYN and FIN count in SEG.LEN). Options
/// and payload are cut; IPv4 options too.
#[inline(always)]
fn tcp_reset(
    ctx: &XdpContext,
    pkt: &Packet,
    macs: &[u8; 12],
    frame_len: u64,
) -> Result<(), Reason> {
    let (l3, l4) = (pkt.l3(), pkt.l4());
    // Sequence and acknowledgment numbers, data offset, flags: read before any write.
    let seg = load::<[u8; 10]>(ctx, l4 + 4).ok_or(Reason::DropMalformed)?;
    let flags = seg[9];
    if flags & TCP_RST != 0 {
        return Err(Reason::DropNoBackend);
    }
    let (seq, ack, out_flags) = if flags & TCP_ACK != 0 {
        ([seg[4], seg[5], seg[6], seg[7]], [0; 4], TCP_RST)
    } else {
        let doff = usize::from(seg[8] >> 4) * 4;
        // Parsing checked that the header lies inside the IP packet, so no underflow.
        let data = usize::from(pkt.ip_len)
            .wrapping_sub(l4 - l3)
            .wrapping_sub(doff) as u32;
        let len = data + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        let ack = u32::from_be_bytes([seg[0], seg[1], seg[2], seg[3]]).wrapping_add(len);
        ([0; 4], ack.to_be_bytes(), TCP_RST | TCP_ACK)
    };
    turn_macs(ctx, macs)?;
    let pseudo = ip_header(ctx, pkt, PROTO_TCP, TCP_HLEN as u16)?;
    let tcp = l3 + ip_hlen(pkt);
    // Ports are kept in wire order: their in-memory bytes are the wire bytes.
    let from = pkt.key.dport.to_ne_bytes();
    let to = pkt.key.sport.to_ne_bytes();
    let ports = [from[0], from[1], to[0], to[1]];
    // Data offset 5 (no options), flags, window 0.
    let ctl = [0x50, out_flags, 0, 0];
    let check =
        finish(pseudo + sum_words(&ports) + sum_words(&seq) + sum_words(&ack) + sum_words(&ctl));
    store(ctx, tcp, ports)?;
    store(ctx, tcp + 4, seq)?;
    store(ctx, tcp + 8, ack)?;
    store(ctx, tcp + 12, ctl)?;
    let c = check.to_be_bytes();
    // Checksum, urgent pointer 0.
    store(ctx, tcp + 16, [c[0], c[1], 0, 0])?;
    truncate(ctx, frame_len, tcp + TCP_HLEN)
}

/// A new IP and ICMP header in front of the client's IP header and UDP header, which
/// stay where they are as the quote; everything after them is cut.
#[inline(always)]
fn port_unreachable(
    ctx: &XdpContext,
    pkt: &Packet,
    macs: &[u8; 12],
    frame_len: u64,
) -> Result<(), Reason> {
    let l3 = pkt.l3();
    let v4 = pkt.is_v4();
    if v4 && pkt.l4() != l3 + IPV4_HLEN {
        return Err(Reason::DropNoBackend);
    }
    let quoted_sum = if v4 {
        packet::sum_words::<{ IPV4_HLEN + QUOTED_L4 }>(ctx, l3)
    } else {
        packet::sum_words::<{ IPV6_HLEN + QUOTED_L4 }>(ctx, l3)
    }
    .ok_or(Reason::DropMalformed)?;
    // Parsing allows one VLAN tag; constant offsets keep the verifier's bounds simple.
    let tagged = l3 > ETH_HLEN;
    let tag = if tagged {
        Some(load::<[u8; 4]>(ctx, ETH_HLEN - 2).ok_or(Reason::DropMalformed)?)
    } else {
        None
    };
    let ethertype_at = if tagged { ETH_HLEN + 2 } else { ETH_HLEN - 2 };
    let ethertype = load::<[u8; 2]>(ctx, ethertype_at).ok_or(Reason::DropMalformed)?;
    let hlen = ip_hlen(pkt);
    let headers = hlen + ICMP_HLEN;
    // SAFETY: helper call on this program's context; packet pointers are re-read after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(headers as i32)) } != 0 {
        return Err(Reason::DropNoBackend);
    }
    // The Ethernet header (and VLAN tag) moves to the new front, turned around.
    turn_macs(ctx, macs)?;
    if let Some(tag) = tag {
        store(ctx, ETH_HLEN - 2, tag)?;
    }
    store(ctx, ethertype_at, ethertype)?;
    let quoted = hlen + QUOTED_L4;
    let (proto, type_code) = if v4 {
        (PROTO_ICMP, ICMP_PORT_UNREACHABLE)
    } else {
        (PROTO_ICMPV6, ICMPV6_PORT_UNREACHABLE)
    };
    let pseudo = ip_header(ctx, pkt, proto, (ICMP_HLEN + quoted) as u16)?;
    // `ICMPv6` covers a pseudo-header, ICMP does not.
    let sum = quoted_sum + sum_words(&type_code) + if v4 { 0 } else { pseudo };
    let c = finish(sum).to_be_bytes();
    // Type, code, checksum, 4 unused bytes.
    store(
        ctx,
        l3 + hlen,
        [type_code[0], type_code[1], c[0], c[1], 0, 0, 0, 0],
    )?;
    truncate(ctx, frame_len + headers as u64, l3 + headers + quoted)
}

#[inline(always)]
fn ip_hlen(pkt: &Packet) -> usize {
    if pkt.is_v4() { IPV4_HLEN } else { IPV6_HLEN }
}

/// Back to where the frame came from: the frame's source MAC (of `macs`, its first 12
/// bytes as received) becomes the destination.
#[inline(always)]
fn turn_macs(ctx: &XdpContext, macs: &[u8; 12]) -> Result<(), Reason> {
    store(
        ctx,
        0,
        [macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]],
    )?;
    store(
        ctx,
        6,
        [macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]],
    )
}

/// Writes a fresh IP header (no options) at the packet's L3 offset, from the frontend
/// to the client, carrying `payload` bytes of `proto`; returns the unfolded sum of the
/// pseudo-header its TCP or `ICMPv6` checksum covers.
#[inline(always)]
fn ip_header(ctx: &XdpContext, pkt: &Packet, proto: u8, payload: u16) -> Result<u32, Reason> {
    let l3 = pkt.l3();
    let (src, dst) = (&pkt.key.dst, &pkt.key.src);
    let pseudo_rest = u32::from(proto) + u32::from(payload);
    if pkt.is_v4() {
        let s = [src[0], src[1], src[2], src[3]];
        let d = [dst[0], dst[1], dst[2], dst[3]];
        let len = (IPV4_HLEN as u16 + payload).to_be_bytes();
        // Version 4, IHL 5, TOS 0, length, id 0, don't fragment (as the kernel sends its
        // resets and ICMP errors), TTL, protocol.
        let head = [0x45, 0, len[0], len[1], 0, 0, 0x40, 0, TTL, proto];
        let addrs = sum_words(&s) + sum_words(&d);
        let check = finish(sum_words(&head) + addrs);
        store(ctx, l3, head)?;
        store(ctx, l3 + 10, check.to_be_bytes())?;
        store(ctx, l3 + 12, s)?;
        store(ctx, l3 + 16, d)?;
        Ok(addrs + pseudo_rest)
    } else {
        let len = payload.to_be_bytes();
        // Version 6, traffic class 0, flow label 0, payload length, next header, hops.
        store(ctx, l3, [0x60, 0, 0, 0, len[0], len[1], proto, TTL])?;
        store(ctx, l3 + 8, *src)?;
        store(ctx, l3 + 24, *dst)?;
        Ok(sum_words(src) + sum_words(dst) + pseudo_rest)
    }
}

/// Cuts the frame, now `frame_len` bytes long, to `len` bytes. The caller's length, not
/// `data_end - data` again: LLVM would fold that into arithmetic on `data_end`, which
/// the verifier refuses.
#[inline(always)]
fn truncate(ctx: &XdpContext, frame_len: u64, len: usize) -> Result<(), Reason> {
    let delta = len as i64 - frame_len as i64;
    // SAFETY: helper call on this program's context; it only shrinks the frame here.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return Err(Reason::DropNoBackend);
    }
    Ok(())
}
