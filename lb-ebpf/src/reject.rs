//! Refusing a new flow to a service without backends, as kube-proxy's REJECT does: a
//! TCP segment gets a reset (RFC 793, "Reset Generation"), a UDP datagram an ICMP port
//! unreachable (RFC 792; `ICMPv6`, RFC 4443) quoting its IP header and UDP header. The
//! answer is built in the frame itself (fresh headers, checksums computed from scratch)
//! and sent back out of the interface the packet came in on, to the MAC it came from:
//! through the devmap when that interface is in it, as `fib` sends (a veth passes
//! `XDP_TX` frames on only to a peer that runs XDP; a redirect is flushed at the end of
//! the poll), else by `XDP_TX`. The same builder answers a DSR packet too large to
//! encapsulate for its next hop (`dsr_mtu`) with ICMP "fragmentation needed" /
//! `ICMPv6` "packet too big" (RFC 1191, RFC 8201).
//!
//! Not answered (dropped, `drop_no_backend`): a reset (never a reset for a reset), a
//! source that must not get errors (multicast, broadcast, unspecified, loopback), and
//! IPv4 UDP with IP options. Unlike the kernel, which drops them unanswered, a segment
//! with a bad checksum or a datagram whose UDP length disagrees with its IP length is
//! answered too: checking costs stack the program does not have (440 of 512 bytes in
//! use; one such check overflowed it), and the answer carries only what the sender
//! sent.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    PROTO_TCP, Reason,
    csum::{finish, word, words},
    reason::XDP_TX,
};

use crate::{
    maps::TX_PORTS_V1,
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
/// What an ICMP error quotes after the client's IP header: 8 bytes (RFC 792), its UDP
/// header or its TCP ports and sequence number, all a sender needs to find the socket.
const QUOTED_L4: usize = 8;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Answers the client's packet in place: a redirect back out of the interface it came
/// in on (`XDP_TX` when that is not in the devmap) with the reason, or `Err` (drop) when
/// it must not be answered. `frame_len` is the frame's length as it came in.
///
/// Header fields are written as words from registers, never built as arrays: built as
/// arrays, this code cost every packet that passes about 10 ns in `xtask bench packet`.
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
    let macs = macs(ctx)?;
    let reason = if pkt.key.proto == PROTO_TCP {
        tcp_reset(ctx, pkt, frame_len)?;
        Reason::RejectTcpReset
    } else {
        icmp_error(
            ctx,
            pkt,
            frame_len,
            PORT_UNREACHABLE,
            0,
            Reason::DropNoBackend,
        )?;
        Reason::RejectIcmpUnreachable
    };
    stats::count_rejected(service_id);
    Ok((send_back(ctx, macs)?, reason))
}

/// DSR (`dsr_mtu`): answers the client's packet, too large to encapsulate for the
/// next hop, with ICMP "fragmentation needed" (IPv4) or `ICMPv6` "packet too big",
/// advertising `mtu`, sent back as `refuse` sends; `Err` (`drop_dsr_too_big`) when it
/// must not be answered.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, frame_len: u64, mtu: u16) -> Result<u32, Reason> {
    if !answerable(pkt) {
        return Err(Reason::DropDsrTooBig);
    }
    let macs = macs(ctx)?;
    icmp_error(
        ctx,
        pkt,
        frame_len,
        TOO_BIG,
        u32::from(mtu),
        Reason::DropDsrTooBig,
    )?;
    send_back(ctx, macs)
}

/// A MAC address as two words from registers: its first four bytes and its last two.
type Mac = (u32, u16);
/// A frame's destination and source MACs.
type Macs = (Mac, Mac);

/// The frame's destination and source MACs. Read first, at constant offsets: LLVM may
/// drop these bounds checks when a later check at a variable offset implies them, but
/// the verifier follows only its own.
#[inline(always)]
fn macs(ctx: &XdpContext) -> Result<Macs, Reason> {
    Ok((
        (be32(ctx, 0)?, be16(ctx, 4)?),
        (be32(ctx, 6)?, be16(ctx, 10)?),
    ))
}

/// Back to where the frame came from: the MACs turned around, out of the interface it
/// came in on.
#[inline(always)]
fn send_back(ctx: &XdpContext, (dst_mac, src_mac): Macs) -> Result<u32, Reason> {
    put32(ctx, 0, src_mac.0)?;
    put16(ctx, 4, src_mac.1)?;
    put32(ctx, 6, dst_mac.0)?;
    put16(ctx, 10, dst_mac.1)?;
    Ok(TX_PORTS_V1
        .redirect(ctx.ingress_ifindex() as u32, 0)
        .unwrap_or(XDP_TX))
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
fn tcp_reset(ctx: &XdpContext, pkt: &Packet, frame_len: u64) -> Result<(), Reason> {
    let (l3, l4) = (pkt.l3(), pkt.l4());
    // Sequence and acknowledgment numbers, data offset and flags: read before any write.
    let seq = be32(ctx, l4 + 4)?;
    let ack = be32(ctx, l4 + 8)?;
    let doff_flags = be16(ctx, l4 + 12)?;
    let flags = (doff_flags & 0xff) as u8;
    if flags & TCP_RST != 0 {
        return Err(Reason::DropNoBackend);
    }
    let (out_seq, out_ack, out_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let doff = usize::from(doff_flags >> 12) * 4;
        // Parsing checked that the header lies inside the IP packet, so no underflow.
        let data = usize::from(pkt.ip_len)
            .wrapping_sub(l4 - l3)
            .wrapping_sub(doff) as u32;
        let len = data + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let pseudo = ip_header(ctx, pkt, PROTO_TCP, TCP_HLEN as u16)?;
    let tcp = l3 + ip_hlen(pkt);
    // Ports are kept in wire order: their in-memory bytes are the wire bytes.
    let ports =
        u32::from(u16::from_be(pkt.key.dport)) << 16 | u32::from(u16::from_be(pkt.key.sport));
    // Data offset 5 (no options), flags, window 0.
    let ctl = 0x5000_0000 | u32::from(out_flags) << 16;
    let check = finish(pseudo + words(ports) + words(out_seq) + words(out_ack) + words(ctl));
    put32(ctx, tcp, ports)?;
    put32(ctx, tcp + 4, out_seq)?;
    put32(ctx, tcp + 8, out_ack)?;
    put32(ctx, tcp + 12, ctl)?;
    // Checksum, urgent pointer 0.
    put32(ctx, tcp + 16, u32::from(check) << 16)?;
    truncate(ctx, frame_len, tcp + TCP_HLEN, Reason::DropNoBackend)
}

/// An ICMP error's (type, code) pair, as a big-endian word: `ICMP` for IPv4, `ICMPv6`.
#[derive(Clone, Copy)]
struct ErrorKind {
    v4: u16,
    v6: u16,
}

/// Destination unreachable, port unreachable (ICMP 3/3, `ICMPv6` 1/4).
const PORT_UNREACHABLE: ErrorKind = ErrorKind {
    v4: 0x0303,
    v6: 0x0104,
};
/// ICMP destination unreachable, fragmentation needed (3/4, RFC 1191: the next-hop MTU
/// in the low half of the second word); `ICMPv6` packet too big (2/0, RFC 4443: the
/// MTU is the second word).
const TOO_BIG: ErrorKind = ErrorKind {
    v4: 0x0304,
    v6: 0x0200,
};

/// A new IP and ICMP header in front of the client's IP header and the first 8 bytes
/// after it (its UDP header, or its TCP ports and sequence number), which stay where
/// they are as the quote; everything after them is cut. `rest`: the ICMP header's
/// second word; `fail`: the reason when it cannot be built.
#[inline(always)]
fn icmp_error(
    ctx: &XdpContext,
    pkt: &Packet,
    frame_len: u64,
    kind: ErrorKind,
    rest: u32,
    fail: Reason,
) -> Result<(), Reason> {
    let l3 = pkt.l3();
    let v4 = pkt.is_v4();
    if v4 && pkt.l4() != l3 + IPV4_HLEN {
        return Err(fail);
    }
    let quoted_sum = if v4 {
        packet::sum_words::<{ IPV4_HLEN + QUOTED_L4 }>(ctx, l3)
    } else {
        packet::sum_words::<{ IPV6_HLEN + QUOTED_L4 }>(ctx, l3)
    }
    .ok_or(Reason::DropMalformed)?;
    // Parsing allows one VLAN tag; constant offsets keep the verifier's bounds simple.
    let tagged = l3 > ETH_HLEN;
    let tag = if tagged { be32(ctx, ETH_HLEN - 2)? } else { 0 };
    let ethertype_at = if tagged { ETH_HLEN + 2 } else { ETH_HLEN - 2 };
    let ethertype = be16(ctx, ethertype_at)?;
    let hlen = ip_hlen(pkt);
    let headers = hlen + ICMP_HLEN;
    // SAFETY: helper call on this program's context; packet pointers are re-read after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(headers as i32)) } != 0 {
        return Err(fail);
    }
    // The Ethernet header moves to the new front (the caller turns its MACs around).
    if tagged {
        put32(ctx, ETH_HLEN - 2, tag)?;
    }
    put16(ctx, ethertype_at, ethertype)?;
    let quoted = hlen + QUOTED_L4;
    let (proto, type_code) = if v4 {
        (PROTO_ICMP, kind.v4)
    } else {
        (PROTO_ICMPV6, kind.v6)
    };
    let pseudo = ip_header(ctx, pkt, proto, (ICMP_HLEN + quoted) as u16)?;
    // `ICMPv6` covers a pseudo-header, ICMP does not.
    let sum = quoted_sum + u32::from(type_code) + words(rest) + if v4 { 0 } else { pseudo };
    // Type, code, checksum; then the second word.
    put32(
        ctx,
        l3 + hlen,
        u32::from(type_code) << 16 | u32::from(finish(sum)),
    )?;
    put32(ctx, l3 + hlen + 4, rest)?;
    truncate(ctx, frame_len + headers as u64, l3 + headers + quoted, fail)
}

#[inline(always)]
fn ip_hlen(pkt: &Packet) -> usize {
    if pkt.is_v4() { IPV4_HLEN } else { IPV6_HLEN }
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
        let (s, d) = (word(src, 0), word(dst, 0));
        // Version 4, IHL 5, TOS 0, length; id 0, don't fragment (as the kernel sends its
        // resets and ICMP errors); TTL, protocol.
        let first = 0x4500_0000 | (IPV4_HLEN as u32 + u32::from(payload));
        let second = 0x0000_4000;
        let third = u32::from(TTL) << 24 | u32::from(proto) << 16;
        let check = finish(words(first) + words(second) + words(third) + words(s) + words(d));
        put32(ctx, l3, first)?;
        put32(ctx, l3 + 4, second)?;
        put32(ctx, l3 + 8, third | u32::from(check))?;
        put32(ctx, l3 + 12, s)?;
        put32(ctx, l3 + 16, d)?;
        Ok(words(s) + words(d) + pseudo_rest)
    } else {
        // Version 6, traffic class 0, flow label 0; payload length, next header, hops.
        put32(ctx, l3, 0x6000_0000)?;
        put32(
            ctx,
            l3 + 4,
            u32::from(payload) << 16 | u32::from(proto) << 8 | u32::from(TTL),
        )?;
        let mut sum = pseudo_rest;
        let mut i = 0;
        while i < 16 {
            let (s, d) = (word(src, i), word(dst, i));
            put32(ctx, l3 + 8 + i, s)?;
            put32(ctx, l3 + 24 + i, d)?;
            sum += words(s) + words(d);
            i += 4;
        }
        Ok(sum)
    }
}

#[inline(always)]
fn be32(ctx: &XdpContext, off: usize) -> Result<u32, Reason> {
    load::<[u8; 4]>(ctx, off)
        .map(u32::from_be_bytes)
        .ok_or(Reason::DropMalformed)
}

#[inline(always)]
fn be16(ctx: &XdpContext, off: usize) -> Result<u16, Reason> {
    load::<[u8; 2]>(ctx, off)
        .map(u16::from_be_bytes)
        .ok_or(Reason::DropMalformed)
}

#[inline(always)]
fn put32(ctx: &XdpContext, off: usize, value: u32) -> Result<(), Reason> {
    store(ctx, off, value.to_be_bytes())
}

#[inline(always)]
fn put16(ctx: &XdpContext, off: usize, value: u16) -> Result<(), Reason> {
    store(ctx, off, value.to_be_bytes())
}

/// Cuts the frame, now `frame_len` bytes long, to `len` bytes. The caller's length, not
/// `data_end - data` again: LLVM would fold that into arithmetic on `data_end`, which
/// the verifier refuses.
#[inline(always)]
fn truncate(ctx: &XdpContext, frame_len: u64, len: usize, fail: Reason) -> Result<(), Reason> {
    let delta = len as i64 - frame_len as i64;
    // SAFETY: helper call on this program's context; it only shrinks the frame here.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return Err(fail);
    }
    Ok(())
}
