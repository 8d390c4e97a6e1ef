//! Ethernet (+ one 802.1Q/802.1ad tag) -> IPv4 (honouring IHL) or IPv6 -> TCP/UDP.
//! Anything else is `Err(Pass*)`: the program returns it to the kernel untouched.

use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, Reason};

use crate::packet::{Fragment, Frame, Packet, load};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV6_HLEN: usize = 40;
const IPPROTO_FRAGMENT: u8 = 44;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[inline(always)]
fn be16(ctx: &impl Frame, off: usize) -> Result<u16, Reason> {
    load::<[u8; 2]>(ctx, off)
        .map(u16::from_be_bytes)
        .ok_or(Reason::PassMalformed)
}

#[inline(always)]
pub fn parse(ctx: &impl Frame) -> Result<Packet, Reason> {
    let mut pkt = Packet::default();
    parse_into(ctx, &mut pkt)?;
    Ok(pkt)
}

/// [`parse`] into a packet the caller holds: the key's addresses go into it in word
/// stores, where a `Packet` returned by value is copied a byte at a time.
#[inline(always)]
pub fn parse_into(ctx: &impl Frame, pkt: &mut Packet) -> Result<(), Reason> {
    let (l3, ethertype) = l2(ctx)?;
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3, pkt),
        ETH_P_IPV6 => parse_v6(ctx, l3, pkt),
        _ => Err(Reason::PassNotIp),
    }
}

/// Whether the frame carries IPv4 (else IPv6), and the offset of its IP header.
#[inline(always)]
pub fn l3(ctx: &impl Frame) -> Result<(bool, usize), Reason> {
    let (l3, ethertype) = l2(ctx)?;
    match ethertype {
        ETH_P_IP => Ok((true, l3)),
        ETH_P_IPV6 => Ok((false, l3)),
        _ => Err(Reason::PassNotIp),
    }
}

/// The offset of the IP header and the ethertype, after one optional VLAN tag.
#[inline(always)]
pub fn l2(ctx: &impl Frame) -> Result<(usize, u16), Reason> {
    let mut ethertype = be16(ctx, 12)?;
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(ctx, ETH_HLEN + 2)?;
        l3 += VLAN_HLEN;
    }
    Ok((l3, ethertype))
}

#[inline(always)]
fn parse_v4(ctx: &impl Frame, l3: usize, pkt: &mut Packet) -> Result<(), Reason> {
    let vihl = load::<u8>(ctx, l3).ok_or(Reason::PassMalformed)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(Reason::PassMalformed);
    }
    let ip_len = be16(ctx, l3 + 2)?;
    let proto = load::<u8>(ctx, l3 + 9).ok_or(Reason::PassMalformed)?;
    let frag = be16(ctx, l3 + 6)?;
    let src = load::<u32>(ctx, l3 + 12).ok_or(Reason::PassMalformed)?;
    let dst = load::<u32>(ctx, l3 + 16).ok_or(Reason::PassMalformed)?;
    if usize::from(ip_len) < ihl || !ctx.holds(l3 + usize::from(ip_len)) {
        return Err(Reason::PassMalformed);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotL4);
    }
    if frag & IP_OFFSET != 0 {
        // No L4 header: cannot be attributed to a flow.
        return Err(Reason::PassFragment);
    }
    let fragment = if frag & IP_MF != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    pkt.key.family = FAMILY_V4;
    pkt.key.proto = proto;
    pkt.key.set_addr_words([src, 0, 0, 0], [dst, 0, 0, 0]);
    finish_l4(
        ctx,
        l3,
        l3 + ihl,
        l3 + usize::from(ip_len),
        ip_len,
        fragment,
        pkt,
    )
}

#[inline(always)]
fn parse_v6(ctx: &impl Frame, l3: usize, pkt: &mut Packet) -> Result<(), Reason> {
    let version = load::<u8>(ctx, l3).ok_or(Reason::PassMalformed)?;
    if version >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let payload_len = be16(ctx, l3 + 4)?;
    let next_header = load::<u8>(ctx, l3 + 6).ok_or(Reason::PassMalformed)?;
    let src = load::<[u32; 4]>(ctx, l3 + 8).ok_or(Reason::PassMalformed)?;
    let dst = load::<[u32; 4]>(ctx, l3 + 24).ok_or(Reason::PassMalformed)?;
    let ip_end = l3 + IPV6_HLEN + usize::from(payload_len);
    if !ctx.holds(ip_end) {
        return Err(Reason::PassMalformed);
    }
    if next_header == IPPROTO_FRAGMENT {
        return Err(Reason::PassFragment);
    }
    if next_header != PROTO_TCP && next_header != PROTO_UDP {
        // ICMPv6, other protocols and extension headers go to the kernel.
        return Err(Reason::PassNotL4);
    }
    pkt.key.family = FAMILY_V6;
    pkt.key.proto = next_header;
    pkt.key.set_addr_words(src, dst);
    let ip_len = payload_len.saturating_add(IPV6_HLEN as u16);
    finish_l4(ctx, l3, l3 + IPV6_HLEN, ip_end, ip_len, Fragment::None, pkt)
}

/// Reads the ports and decides whether the L4 header is complete.
#[inline(always)]
fn finish_l4(
    ctx: &impl Frame,
    l3: usize,
    l4: usize,
    ip_end: usize,
    ip_len: u16,
    fragment: Fragment,
    pkt: &mut Packet,
) -> Result<(), Reason> {
    let ports = load::<[u16; 2]>(ctx, l4).ok_or(Reason::PassMalformed)?;
    pkt.key.sport = ports[0];
    pkt.key.dport = ports[1];
    // Loads before comparisons with `ip_end`, so no bounds check is derived away.
    let l4_complete = if pkt.key.proto == PROTO_TCP {
        match load::<[u8; TCP_HLEN]>(ctx, l4) {
            Some(tcp) => {
                let doff = usize::from(tcp[12] >> 4) * 4;
                doff >= TCP_HLEN && l4 + doff <= ip_end
            }
            None => false,
        }
    } else {
        load::<[u8; UDP_HLEN]>(ctx, l4).is_some() && l4 + UDP_HLEN <= ip_end
    };
    pkt.set_layout(l3, l4, ip_len, fragment, l4_complete);
    Ok(())
}
