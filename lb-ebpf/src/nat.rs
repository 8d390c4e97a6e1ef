//! Address and port translation with incremental checksums (RFC 1624), IPv4 and IPv6.
//! Forwarding is a router hop, so the TTL / hop limit is decremented as well.

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, PROTO_UDP, Reason, csum::CsumDelta};

use crate::packet::{Packet, load, store};

/// Which end of the flow a translation rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

/// Refuses to forward a packet whose TTL / hop limit would expire here; the kernel
/// then answers with ICMP time exceeded, as any router would.
#[inline(always)]
pub fn check_ttl(ctx: &XdpContext, pkt: &Packet) -> Result<(), Reason> {
    match load::<[u8; 2]>(ctx, ttl_word(pkt)) {
        Some(word) if word[ttl_index(pkt)] > 1 => Ok(()),
        Some(_) => Err(Reason::PassTtlExceeded),
        None => Err(Reason::PassMalformed),
    }
}

/// The 16-bit word holding the TTL (IPv4: TTL, protocol) or hop limit (IPv6: next
/// header, hop limit). Accessed as two bytes: a one-byte access at a variable offset
/// compiles to a bounds check the verifier cannot use.
#[inline(always)]
fn ttl_word(pkt: &Packet) -> usize {
    if pkt.is_v4() {
        pkt.l3() + 8
    } else {
        pkt.l3() + 6
    }
}

#[inline(always)]
fn ttl_index(pkt: &Packet) -> usize {
    usize::from(!pkt.is_v4())
}

/// An address (as words in memory order, `FlowKey::src_words`) and port (network byte
/// order) one side of the packet gets.
pub type Endpoint = ([u32; 4], u16);

/// The TCP flags byte of a TCP packet (0 for UDP).
#[inline(always)]
pub fn tcp_flags(ctx: &XdpContext, pkt: &Packet) -> u8 {
    if pkt.key.proto != PROTO_TCP {
        return 0;
    }
    load::<[u8; 2]>(ctx, pkt.l4() + 12).map_or(0, |w| w[1])
}

/// Rewrites the address of one side in the IP header, adding the change to the L4
/// (pseudo-header) and, for IPv4, the IP header checksum deltas.
#[inline(always)]
fn rewrite_addr(
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    addr: [u32; 4],
    l4: &mut CsumDelta,
    ip: &mut CsumDelta,
) -> Result<(), Reason> {
    let old = if side == Side::Dst {
        pkt.key.dst_words()
    } else {
        pkt.key.src_words()
    };
    if pkt.is_v4() {
        l4.replace_word(old[0], addr[0]);
        ip.replace_word(old[0], addr[0]);
        let addr_off = pkt.l3() + if side == Side::Dst { 16 } else { 12 };
        store(ctx, addr_off, addr[0])
    } else {
        for i in 0..4 {
            l4.replace_word(old[i], addr[i]);
        }
        let addr_off = pkt.l3() + if side == Side::Dst { 24 } else { 8 };
        store(ctx, addr_off, addr)
    }
}

/// Rewrites the port of one side, adding the change to the L4 checksum delta. Ports are
/// kept in wire order, so their in-memory bytes are the wire bytes.
#[inline(always)]
fn rewrite_port(
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    port: u16,
    l4: &mut CsumDelta,
) -> Result<(), Reason> {
    let (old_port, port_off) = if side == Side::Dst {
        (pkt.key.dport, pkt.l4() + 2)
    } else {
        (pkt.key.sport, pkt.l4())
    };
    l4.replace_bytes(&old_port.to_ne_bytes(), &port.to_ne_bytes());
    store(ctx, port_off, port)
}

/// Gives the source and/or destination a new address and port, decrements the TTL /
/// hop limit once, and updates the checksums incrementally. Every translation is one
/// call: client -> frontend to client -> backend (DNAT), or node:port -> backend (and
/// SNAT); backend -> client to frontend -> client, or backend -> node:port to frontend
/// -> client. One inlined copy per direction keeps the program inside its stack.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    pkt: &mut Packet,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
) -> Result<(), Reason> {
    let mut l4 = CsumDelta::new();
    let mut ip = CsumDelta::new();
    if let Some((addr, _)) = src {
        rewrite_addr(ctx, pkt, Side::Src, addr, &mut l4, &mut ip)?;
    }
    if let Some((addr, _)) = dst {
        rewrite_addr(ctx, pkt, Side::Dst, addr, &mut l4, &mut ip)?;
    }
    if pkt.is_v4() {
        // TTL shares a 16-bit word with the protocol.
        let ttl_proto = load::<[u8; 2]>(ctx, ttl_word(pkt)).ok_or(Reason::DropMalformed)?;
        let decremented = [ttl_proto[0].wrapping_sub(1), ttl_proto[1]];
        ip.replace_bytes(&ttl_proto, &decremented);
        store(ctx, ttl_word(pkt), decremented)?;
        let check = load::<[u8; 2]>(ctx, pkt.l3() + 10).ok_or(Reason::DropMalformed)?;
        let check = ip.apply(u16::from_be_bytes(check));
        store(ctx, pkt.l3() + 10, check.to_be_bytes())?;
    } else {
        let nh_hop = load::<[u8; 2]>(ctx, ttl_word(pkt)).ok_or(Reason::DropMalformed)?;
        store(ctx, ttl_word(pkt), [nh_hop[0], nh_hop[1].wrapping_sub(1)])?;
    }
    if let Some((_, port)) = src {
        rewrite_port(ctx, pkt, Side::Src, port, &mut l4)?;
    }
    if let Some((_, port)) = dst {
        rewrite_port(ctx, pkt, Side::Dst, port, &mut l4)?;
    }

    let udp = pkt.key.proto == PROTO_UDP;
    let csum_off = pkt.l4() + if udp { 6 } else { 16 };
    let check = load::<[u8; 2]>(ctx, csum_off).ok_or(Reason::DropMalformed)?;
    let check = u16::from_be_bytes(check);
    // A zero UDP checksum over IPv4 means "none" and stays zero.
    if !(udp && pkt.is_v4() && check == 0) {
        let mut updated = l4.apply(check);
        if udp && updated == 0 {
            // In UDP, 0 means "no checksum"; a computed zero is sent as all ones.
            updated = 0xffff;
        }
        store(ctx, csum_off, updated.to_be_bytes())?;
    }

    if let Some((addr, port)) = src {
        pkt.key.set_src_words(addr);
        pkt.key.sport = port;
    }
    if let Some((addr, port)) = dst {
        pkt.key.set_dst_words(addr);
        pkt.key.dport = port;
    }
    Ok(())
}
