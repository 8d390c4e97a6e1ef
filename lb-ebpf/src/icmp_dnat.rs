//! ICMP errors about flows translated at the destination only (a backend on this node,
//! `externalTrafficPolicy: Local`, `--lb-mode dnat`), both ways, so path MTU discovery
//! works through a VIP whichever side the smaller link is on.
//!
//! - To the client: an error about the translated packet client:port -> backend:port
//!   (from the node forwarding it to a local pod over a smaller link, from the pod, from
//!   a router in between) quotes the backend; its reverse is the flow's reply key
//!   (`conntrack::reply_entry`).
//!   The quoted destination becomes frontend:port, and an outer source that is the
//!   backend the frontend (as the backend's replies get). The node's own errors, and
//!   those of its pods, leave through the uplink's tc egress program (`egress`); XDP
//!   translates the ones that pass through the node (`forwarded`).
//! - To the backend (XDP): an error about a reply frontend:port -> client:port (from a
//!   router on the client's side, sent to the frontend) quotes the frontend; its reverse
//!   is the flow's forward key (`conntrack::forward_state`). The quoted source becomes backend:port, the outer
//!   destination the backend; for a source-NATed flow the quoted destination becomes
//!   node:port too, as the backend sent its reply.
//!
//! Checksums are updated incrementally as in `icmp` (quoted IPv4 header, quoted TCP/UDP
//! where the quote holds it, ICMP with `ICMPv6`'s pseudo-header, outer IPv4 header).
//! Anything else goes on untouched.

use aya_ebpf::{
    bindings::TC_ACT_OK,
    programs::{TcContext, XdpContext},
};
use lb_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, NextHop, PROTO_TCP, PROTO_UDP, Reason, csum::CsumDelta,
};

use crate::{
    conntrack, fib,
    icmp::{
        Layout, PROTO_ICMP, PROTO_ICMPV6, check_ttl, is_addr, layout, put_addr, quoted_checksums,
        read_addr,
    },
    packet::{Frame, load, store},
    parse, service, snat, stats,
};

/// Ethernet, one VLAN tag, an IPv6 header, ICMP, a quoted IPv6 header and the quoted
/// TCP header up to its checksum: all the translation reads or writes.
const HEADERS: u32 = 14 + 4 + 40 + 8 + 40 + 18;

/// Where a translated error goes: to the client of the flow (with the reply flow's
/// next-hop cache), or to its backend. Every field is set either way: the payload of
/// an enum variant would leave register halves undefined, which the verifier rejects.
struct Toward {
    client: bool,
    cache: *mut NextHop,
    backend_id: u32,
}

/// The tc egress program's part: an error the node sends or forwards out of the uplink
/// about a flow to a local backend, translated for the client (`reply_icmp`).
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let want = core::cmp::min(ctx.len(), HEADERS);
    if ctx.data() + want as usize > ctx.data_end() && ctx.pull_data(want).is_err() {
        return TC_ACT_OK;
    }
    let translated = match parse::l3(ctx) {
        Ok((true, l3)) => translate::<true>(ctx, l3, false),
        Ok((false, l3)) => translate::<false>(ctx, l3, false),
        Err(reason) => Err(reason),
    };
    if let Ok((Toward { client: true, .. }, _)) = translated {
        stats::count_reason(Reason::ReplyIcmp, u64::from(ctx.len()));
    }
    TC_ACT_OK
}

/// The XDP program's part (one BPF function per family, as `icmp`'s): an error passing
/// through the node, translated and sent on to the client (`reply_icmp`) or to the
/// backend (`fwd_icmp`); `PassNotL4` when it is about no such flow.
#[inline(never)]
pub fn forwarded<const V4: bool>(ctx: &XdpContext, l3: usize) -> (u32, Reason) {
    crate::verdict(forward::<V4>(ctx, l3))
}

#[inline(always)]
fn forward<const V4: bool>(ctx: &XdpContext, l3: usize) -> Result<(u32, Reason), Reason> {
    let (toward, ip_len) = translate::<V4>(ctx, l3, true)?;
    let (addr_off, alen) = if V4 { (12, 4) } else { (8, 16) };
    let key = snat::scratch_key(FlowKey {
        family: if V4 { FAMILY_V4 } else { FAMILY_V6 },
        proto: if V4 { PROTO_ICMP } else { PROTO_ICMPV6 },
        ..FlowKey::default()
    })
    .ok_or(Reason::PassMalformed)?;
    read_addr(ctx, l3 + addr_off, V4, &mut key.src).ok_or(Reason::PassMalformed)?;
    read_addr(ctx, l3 + addr_off + alen, V4, &mut key.dst).ok_or(Reason::PassMalformed)?;
    // The outer source is not this node's: the kernel may forward it.
    let (action, reason) = if toward.client {
        (
            fib::forward(
                ctx,
                key,
                ip_len,
                fib::Direction::ToClient,
                Some(toward.cache),
                false,
            )?
            .0,
            Reason::ReplyIcmp,
        )
    } else {
        (
            fib::forward(
                ctx,
                key,
                ip_len,
                fib::Direction::ToBackend,
                fib::backend_next_hop(toward.backend_id),
                false,
            )?
            .0,
            Reason::FwdIcmp,
        )
    };
    Ok((action, reason))
}

/// Translates an error about a destination-translated flow in place; where it goes and
/// its outer IP length. `hop`: the error passes through the node (XDP): it may go either
/// way, and its TTL or hop limit goes down by one; leaving it (tc egress), only errors
/// for a client are translated, and the kernel has done the rest.
#[inline(always)]
fn translate<const V4: bool>(
    ctx: &impl Frame,
    l3: usize,
    hop: bool,
) -> Result<(Toward, u16), Reason> {
    let v4 = V4;
    let at = layout(ctx, v4, l3).ok_or(Reason::PassNotL4)?;
    let (family, addr_off, alen) = if v4 {
        (FAMILY_V4, 12, 4)
    } else {
        (FAMILY_V6, 8, 16)
    };
    let proto = load::<u8>(ctx, at.inner + if v4 { 9 } else { 6 }).ok_or(Reason::PassNotL4)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotL4);
    }
    let ports = load::<[u16; 2]>(ctx, at.inner_l4).ok_or(Reason::PassNotL4)?;
    // The quoted packet reversed: a reply's key (to the client) or a client's (to the
    // backend).
    let mut key = FlowKey {
        family,
        proto,
        sport: ports[1],
        dport: ports[0],
        ..FlowKey::default()
    };
    read_addr(ctx, at.inner + addr_off + alen, v4, &mut key.src).ok_or(Reason::PassNotL4)?;
    read_addr(ctx, at.inner + addr_off, v4, &mut key.dst).ok_or(Reason::PassNotL4)?;
    // Either way the error goes to the quoted source: the client, or the frontend.
    if !is_addr(ctx, at.l3 + addr_off + alen, v4, &key.dst) {
        return Err(Reason::PassNotL4);
    }
    if hop {
        check_ttl(ctx, at.l3, v4)?;
    }
    let mut icmp = CsumDelta::new();
    let mut outer = CsumDelta::new();
    let toward = if let Some(rev) = conntrack::reply_entry(&key) {
        // SAFETY: a valid map value pointer; copied out at once, but for the next-hop
        // cache, which stays in the LRU entry.
        let (frontend, port, cache) =
            unsafe { ((*rev).addr, (*rev).port, &raw mut (*rev).next_hop) };
        quoted_end(ctx, &at, v4, proto, false, &frontend, port, &mut icmp)?;
        // An error from the backend itself comes from the frontend, as its replies do.
        if is_addr(ctx, at.l3 + addr_off, v4, &key.src) {
            put_addr(ctx, at.l3 + addr_off, v4, &key.src, &frontend, &mut outer)?;
        }
        Toward {
            client: true,
            cache,
            backend_id: 0,
        }
    } else if hop {
        let flow = conntrack::forward_state(&key).ok_or(Reason::PassNotL4)?;
        let backend = service::backend(flow.backend_id, flow.service_id)
            .filter(|b| b.family == family)
            .ok_or(Reason::PassNotL4)?;
        if flow.nat_port != 0 {
            let node = snat::node_addr(family).ok_or(Reason::PassNotL4)?;
            quoted_end(ctx, &at, v4, proto, false, node, flow.nat_port, &mut icmp)?;
        }
        quoted_end(
            ctx,
            &at,
            v4,
            proto,
            true,
            &backend.addr,
            backend.port,
            &mut icmp,
        )?;
        put_addr(
            ctx,
            at.l3 + addr_off + alen,
            v4,
            &key.dst,
            &backend.addr,
            &mut outer,
        )?;
        Toward {
            client: false,
            cache: core::ptr::null_mut(),
            backend_id: flow.backend_id,
        }
    } else {
        // Leaving the node, only an error for a client is ours.
        return Err(Reason::PassNotL4);
    };
    finish(ctx, &at, v4, hop, outer, icmp)?;
    Ok((toward, at.ip_len))
}

/// The outer header and the ICMP checksum, once the quote and addresses are written:
/// the TTL or hop limit one lower when the error passes through (`hop`), the outer IPv4
/// header's checksum after `outer`, the ICMP checksum after `icmp` (and, for `ICMPv6`,
/// `outer` too: its pseudo-header covers the addresses).
#[inline(always)]
fn finish(
    ctx: &impl Frame,
    at: &Layout,
    v4: bool,
    hop: bool,
    mut outer: CsumDelta,
    mut icmp: CsumDelta,
) -> Result<(), Reason> {
    let l3 = at.l3;
    if v4 {
        if hop {
            let ttl_proto = load::<[u8; 2]>(ctx, l3 + 8).ok_or(Reason::PassMalformed)?;
            let decremented = [ttl_proto[0].wrapping_sub(1), ttl_proto[1]];
            outer.replace_bytes(&ttl_proto, &decremented);
            store(ctx, l3 + 8, decremented)?;
        }
        let check = load::<[u8; 2]>(ctx, l3 + 10).ok_or(Reason::PassMalformed)?;
        store(
            ctx,
            l3 + 10,
            outer.apply(u16::from_be_bytes(check)).to_be_bytes(),
        )?;
    } else {
        if hop {
            let nh_hop = load::<[u8; 2]>(ctx, l3 + 6).ok_or(Reason::PassMalformed)?;
            store(ctx, l3 + 6, [nh_hop[0], nh_hop[1].wrapping_sub(1)])?;
        }
        icmp.add(outer);
    }
    let check = load::<[u8; 2]>(ctx, at.icmp + 2).ok_or(Reason::PassMalformed)?;
    store(
        ctx,
        at.icmp + 2,
        icmp.apply(u16::from_be_bytes(check)).to_be_bytes(),
    )?;
    Ok(())
}

/// Rewrites one end of the quoted packet (`src`: its source, else its destination) to
/// `addr`:`port` (network order), with the quoted IPv4 header's checksum and the quoted
/// TCP/UDP checksum (where the quote holds it; as Linux's NAT, incrementally) following;
/// every byte that changes goes into `icmp`, the ICMP checksum's delta.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one end of a quoted packet")]
fn quoted_end(
    ctx: &impl Frame,
    at: &Layout,
    v4: bool,
    proto: u8,
    src: bool,
    addr: &[u8; 16],
    port: u16,
    icmp: &mut CsumDelta,
) -> Result<(), Reason> {
    let (addr_off, alen) = if v4 { (12, 4) } else { (8, 16) };
    let off = at.inner + addr_off + if src { 0 } else { alen };
    let mut old = [0u8; 16];
    read_addr(ctx, off, v4, &mut old).ok_or(Reason::PassMalformed)?;
    let mut addrs = CsumDelta::new();
    put_addr(ctx, off, v4, &old, addr, &mut addrs)?;
    let port_off = at.inner_l4 + if src { 0 } else { 2 };
    let old_port = load::<u16>(ctx, port_off).ok_or(Reason::PassMalformed)?;
    store(ctx, port_off, port)?;
    let mut l4 = addrs;
    l4.replace_bytes(&old_port.to_ne_bytes(), &port.to_ne_bytes());
    icmp.add(l4);
    quoted_checksums(ctx, at, v4, proto, addrs, l4, icmp)
}
