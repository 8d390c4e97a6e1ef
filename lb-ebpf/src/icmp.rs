//! ICMP errors about a source-NATed flow, so path MTU discovery works through a VIP.
//!
//! A router on the way to a remote backend (fragmentation needed, packet too big, time
//! exceeded) or the backend itself (unreachable) answers node:port, quoting the
//! translated packet node:port -> backend:port. Its reverse is the flow's `SNAT_V1` key;
//! the error goes on to the client as the client's own packet would have drawn it: the
//! outer destination becomes the client, the quoted source client:port, the quoted
//! destination frontend:port, with the quoted IP header, quoted L4 (where quoted: as
//! Linux's NAT, incrementally) and ICMP checksums updated. The outer source (the router)
//! and the MTU stay: the SNAT adds no header. Outer and quoted IPv4 headers without
//! options only (routers send none); anything else goes to the kernel untouched.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason, csum::CsumDelta};

use crate::{
    fib, icmp_dnat,
    maps::SNAT_V1,
    packet::{Frame, load, store},
    parse, snat,
};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const ICMP_HLEN: usize = 8;
/// ICMP destination unreachable (fragmentation needed among its codes), time exceeded.
const ICMP_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// `ICMPv6` destination unreachable, packet too big, time exceeded.
const ICMPV6_UNREACH: u8 = 1;
const ICMPV6_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const IP_OFFSET: u16 = 0x1fff;

/// Where the parts of an error lie: outer IP header, ICMP header, quoted IP header and
/// quoted L4 header, and the end of the outer IP packet.
pub struct Layout {
    pub l3: usize,
    pub icmp: usize,
    pub inner: usize,
    pub inner_l4: usize,
    pub ip_end: usize,
    pub ip_len: u16,
}

/// Translates an ICMP error about a source-NATed flow and sends it to the client, or
/// one about a flow translated at the destination only (`icmp_dnat`) to the client or
/// the backend; `PassNotL4` (the kernel's) for any other packet that is not TCP or UDP.
#[inline(always)]
pub fn error(ctx: &XdpContext) -> (u32, Reason) {
    match parse::l3(ctx) {
        Ok((true, l3)) => match translate::<true>(ctx, l3) {
            (_, Reason::PassNotL4) => icmp_dnat::forwarded::<true>(ctx, l3),
            verdict => verdict,
        },
        Ok((false, l3)) => match translate::<false>(ctx, l3) {
            (_, Reason::PassNotL4) => icmp_dnat::forwarded::<false>(ctx, l3),
            verdict => verdict,
        },
        Err(reason) => (reason.action(), reason),
    }
}

/// One BPF function per family: the two in one spill past the stack's limit. Returns a
/// plain pair: the kernel rejects the BTF of a `Result` (a union member at a non-zero
/// offset).
#[inline(never)]
fn translate<const V4: bool>(ctx: &XdpContext, l3: usize) -> (u32, Reason) {
    crate::verdict(translate_family::<V4>(ctx, l3))
}

#[inline(always)]
fn translate_family<const V4: bool>(ctx: &XdpContext, l3: usize) -> Result<(u32, Reason), Reason> {
    let v4 = V4;
    let at = layout(ctx, v4, l3).ok_or(Reason::PassNotL4)?;
    let (family, addr_off, alen) = if v4 {
        (FAMILY_V4, 12, 4)
    } else {
        (FAMILY_V6, 8, 16)
    };
    let node = snat::node_addr(family).ok_or(Reason::PassNotL4)?;
    let proto = load::<u8>(ctx, at.inner + if v4 { 9 } else { 6 }).ok_or(Reason::PassNotL4)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotL4);
    }
    let ports = load::<[u16; 2]>(ctx, at.inner_l4).ok_or(Reason::PassNotL4)?;
    // Outer destination and quoted source: the node; quoted destination: the backend.
    if !is_addr(ctx, at.l3 + addr_off + alen, v4, node)
        || !is_addr(ctx, at.inner + addr_off, v4, node)
    {
        return Err(Reason::PassNotL4);
    }
    let key = snat::scratch_key(FlowKey {
        family,
        proto,
        sport: ports[1],
        dport: ports[0],
        ..FlowKey::default()
    })
    .ok_or(Reason::PassNotL4)?;
    key.dst = *node;
    read_addr(ctx, at.inner + addr_off + alen, v4, &mut key.src).ok_or(Reason::PassNotL4)?;
    let entry = SNAT_V1.get_ptr_mut(&*key).ok_or(Reason::PassNotL4)?;
    // SAFETY: a valid map value pointer; read in place.
    let (client, cport, frontend, fport, cache) = unsafe {
        (
            &(*entry).client,
            (*entry).client_port,
            &(*entry).frontend,
            (*entry).frontend_port,
            &raw mut (*entry).next_hop,
        )
    };
    check_ttl(ctx, at.l3, v4)?;

    // The quoted packet: addresses and ports (the quoted L4 checksum covers both).
    let mut addrs = CsumDelta::new();
    put_addr(ctx, at.inner + addr_off, v4, node, client, &mut addrs)?;
    put_addr(
        ctx,
        at.inner + addr_off + alen,
        v4,
        &key.src,
        frontend,
        &mut addrs,
    )?;
    let mut l4 = addrs;
    l4.replace_bytes(&ports[0].to_ne_bytes(), &cport.to_ne_bytes());
    l4.replace_bytes(&ports[1].to_ne_bytes(), &fport.to_ne_bytes());
    store(ctx, at.inner_l4, [cport, fport])?;
    // The ICMP checksum covers every quoted byte that changes.
    let mut icmp = l4;
    quoted_checksums(ctx, &at, v4, proto, addrs, l4, &mut icmp)?;

    outer_to_client(ctx, at.l3, v4, node, client, &mut icmp)?;
    let check = load::<[u8; 2]>(ctx, at.icmp + 2).ok_or(Reason::PassMalformed)?;
    store(
        ctx,
        at.icmp + 2,
        icmp.apply(u16::from_be_bytes(check)).to_be_bytes(),
    )?;

    // The next hop to the client, looked up for the error as it now is (in the scratch
    // key: the backend's address in it is no longer needed).
    read_addr(ctx, at.l3 + addr_off, v4, &mut key.src).ok_or(Reason::PassMalformed)?;
    key.dst = *client;
    key.proto = if v4 { PROTO_ICMP } else { PROTO_ICMPV6 };
    key.sport = 0;
    key.dport = 0;
    // The outer source is the router's, not the node's: the kernel may forward it.
    let (action, _) = fib::forward(
        ctx,
        key,
        at.ip_len,
        fib::Direction::ToClient,
        Some(cache),
        false,
    )?;
    Ok((action, Reason::ReplyIcmp))
}

/// The quote's own checksums after its addresses and ports were rewritten: the quoted
/// IPv4 header's by `addrs` (the addresses' change), the quoted TCP/UDP checksum by
/// `l4` (addresses and ports: its pseudo-header covers both) where the quote holds it,
/// as Linux's NAT updates it; each changed checksum goes into `icmp`, the ICMP
/// checksum's delta. A zero UDP checksum over IPv4 means "none" and stays zero.
#[inline(always)]
pub fn quoted_checksums(
    ctx: &impl Frame,
    at: &Layout,
    v4: bool,
    proto: u8,
    addrs: CsumDelta,
    l4: CsumDelta,
    icmp: &mut CsumDelta,
) -> Result<(), Reason> {
    if v4 {
        let old = load::<[u8; 2]>(ctx, at.inner + 10).ok_or(Reason::PassMalformed)?;
        let new = addrs.apply(u16::from_be_bytes(old)).to_be_bytes();
        icmp.replace_bytes(&old, &new);
        store(ctx, at.inner + 10, new)?;
    }
    let csum_off = at.inner_l4 + if proto == PROTO_UDP { 6 } else { 16 };
    if csum_off + 2 <= at.ip_end
        && let Some(old) = load::<[u8; 2]>(ctx, csum_off)
    {
        let check = u16::from_be_bytes(old);
        if !(proto == PROTO_UDP && v4 && check == 0) {
            let mut updated = l4.apply(check);
            if proto == PROTO_UDP && updated == 0 {
                updated = 0xffff;
            }
            icmp.replace_bytes(&old, &updated.to_be_bytes());
            store(ctx, csum_off, updated.to_be_bytes())?;
        }
    }
    Ok(())
}

/// The outer header of the error: to the client, one hop on. `ICMPv6`'s checksum
/// covers the destination (pseudo-header; added to `icmp`), the IPv4 header's checksum
/// the TTL as well.
#[inline(always)]
fn outer_to_client(
    ctx: &XdpContext,
    l3: usize,
    v4: bool,
    node: &[u8; 16],
    client: &[u8; 16],
    icmp: &mut CsumDelta,
) -> Result<(), Reason> {
    let mut outer = CsumDelta::new();
    put_addr(
        ctx,
        l3 + if v4 { 16 } else { 24 },
        v4,
        node,
        client,
        &mut outer,
    )?;
    if v4 {
        let ttl_proto = load::<[u8; 2]>(ctx, l3 + 8).ok_or(Reason::PassMalformed)?;
        let decremented = [ttl_proto[0].wrapping_sub(1), ttl_proto[1]];
        outer.replace_bytes(&ttl_proto, &decremented);
        store(ctx, l3 + 8, decremented)?;
        let check = load::<[u8; 2]>(ctx, l3 + 10).ok_or(Reason::PassMalformed)?;
        store(
            ctx,
            l3 + 10,
            outer.apply(u16::from_be_bytes(check)).to_be_bytes(),
        )?;
    } else {
        let nh_hop = load::<[u8; 2]>(ctx, l3 + 6).ok_or(Reason::PassMalformed)?;
        store(ctx, l3 + 6, [nh_hop[0], nh_hop[1].wrapping_sub(1)])?;
        icmp.add(outer);
    }
    Ok(())
}

/// The offsets of an ICMP error of a kind worth translating, with a quoted IP header
/// of the same family (first fragment or whole) and room for its ports; `None` else.
#[inline(always)]
pub fn layout(ctx: &impl Frame, v4: bool, l3: usize) -> Option<Layout> {
    let (icmp, ip_len, inner_l4) = if v4 {
        let head = load::<[u8; IPV4_HLEN]>(ctx, l3)?;
        if head[0] != 0x45 || head[9] != PROTO_ICMP {
            return None;
        }
        if u16::from_be_bytes([head[6], head[7]]) & IP_OFFSET != 0 {
            return None;
        }
        let icmp = l3 + IPV4_HLEN;
        let kind = load::<u8>(ctx, icmp)?;
        if kind != ICMP_UNREACH && kind != ICMP_TIME_EXCEEDED {
            return None;
        }
        let inner = load::<[u8; IPV4_HLEN]>(ctx, icmp + ICMP_HLEN)?;
        if inner[0] != 0x45 || u16::from_be_bytes([inner[6], inner[7]]) & IP_OFFSET != 0 {
            return None;
        }
        (
            icmp,
            u16::from_be_bytes([head[2], head[3]]),
            icmp + ICMP_HLEN + IPV4_HLEN,
        )
    } else {
        let head = load::<[u8; 8]>(ctx, l3)?;
        if head[0] >> 4 != 6 || head[6] != PROTO_ICMPV6 {
            return None;
        }
        let icmp = l3 + IPV6_HLEN;
        let kind = load::<u8>(ctx, icmp)?;
        if kind != ICMPV6_UNREACH && kind != ICMPV6_TOO_BIG && kind != ICMPV6_TIME_EXCEEDED {
            return None;
        }
        if load::<u8>(ctx, icmp + ICMP_HLEN)? >> 4 != 6 {
            return None;
        }
        let payload = u16::from_be_bytes([head[4], head[5]]);
        (
            icmp,
            payload.checked_add(IPV6_HLEN as u16)?,
            icmp + ICMP_HLEN + IPV6_HLEN,
        )
    };
    let ip_end = l3 + usize::from(ip_len);
    // The quoted ports lie inside the outer packet and the frame.
    load::<[u8; 4]>(ctx, inner_l4)?;
    if inner_l4 + 4 > ip_end || !ctx.holds(ip_end) {
        return None;
    }
    Some(Layout {
        l3,
        icmp,
        inner: icmp + ICMP_HLEN,
        inner_l4,
        ip_end,
        ip_len,
    })
}

/// Reads the address of the family at `off` into `addr` (as a `FlowKey` holds it).
#[inline(always)]
pub fn read_addr(ctx: &impl Frame, off: usize, v4: bool, addr: &mut [u8; 16]) -> Option<()> {
    if v4 {
        *addr = [0; 16];
        addr[..4].copy_from_slice(&load::<[u8; 4]>(ctx, off)?);
    } else {
        *addr = load::<[u8; 16]>(ctx, off)?;
    }
    Some(())
}

/// Whether the address of the family at `off` is `addr`.
#[inline(always)]
pub fn is_addr(ctx: &impl Frame, off: usize, v4: bool, addr: &[u8; 16]) -> bool {
    if v4 {
        load::<[u8; 4]>(ctx, off).is_some_and(|a| a == [addr[0], addr[1], addr[2], addr[3]])
    } else {
        load::<[u8; 16]>(ctx, off).is_some_and(|a| a == *addr)
    }
}

/// Writes `new` over the address `old` at `off`, adding the change to `delta`.
#[inline(always)]
pub fn put_addr(
    ctx: &impl Frame,
    off: usize,
    v4: bool,
    old: &[u8; 16],
    new: &[u8; 16],
    delta: &mut CsumDelta,
) -> Result<(), Reason> {
    if v4 {
        let old: [u8; 4] = [old[0], old[1], old[2], old[3]];
        let new: [u8; 4] = [new[0], new[1], new[2], new[3]];
        delta.replace_bytes(&old, &new);
        store(ctx, off, new)
    } else {
        addr6_delta(old, new, delta);
        store(ctx, off, *new)
    }
}

/// Adds the change of an IPv6 address to `delta`. Its own BPF function: inlined, its
/// sixteen-byte sums spill the caller past the stack's limit.
#[inline(never)]
fn addr6_delta(old: &[u8; 16], new: &[u8; 16], delta: &mut CsumDelta) {
    delta.replace_bytes(old, new);
}

/// As `nat::check_ttl`: an error that would expire here is the kernel's to answer.
#[inline(always)]
pub fn check_ttl(ctx: &impl Frame, l3: usize, v4: bool) -> Result<(), Reason> {
    let (off, index) = if v4 { (l3 + 8, 0) } else { (l3 + 6, 1) };
    match load::<[u8; 2]>(ctx, off) {
        Some(word) if word[index] > 1 => Ok(()),
        Some(_) => Err(Reason::PassTtlExceeded),
        None => Err(Reason::PassMalformed),
    }
}
