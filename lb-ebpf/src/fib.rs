//! Next hop by `bpf_fib_lookup`, then out through the devmap (or `XDP_TX` when the next
//! hop is behind the interface the packet came in on). An unresolved neighbour hands
//! the translated packet to the kernel, which resolves it for the packets after.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, FlowKey, NextHop, Reason,
    maps::NEXTHOP_TTL_JIFFIES,
    reason::{XDP_PASS, XDP_TX},
};

use crate::{
    handoff,
    maps::{NEXTHOPS_V1, TX_PORTS_V1},
    packet::store,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[derive(Clone, Copy)]
pub enum Direction {
    ToBackend,
    ToClient,
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

/// The next-hop cache slot of a backend.
#[inline(always)]
pub fn backend_next_hop(backend_id: u32) -> Option<*mut NextHop> {
    NEXTHOPS_V1.get_ptr_mut(backend_id)
}

/// Sends the (translated) packet on: by the cached next hop while it is fresh and the
/// packet no longer than the path has carried, else by a FIB lookup that refreshes it.
#[inline(always)]
/// `snated`: the packet's source is now this node's address; where XDP cannot send it,
/// it is handed to the tc ingress program (`handoff`) rather than to the stack's
/// forwarding, which would drop it as a martian.
pub fn forward(
    ctx: &XdpContext,
    key: &FlowKey,
    ip_len: u16,
    dir: Direction,
    cache: Option<*mut NextHop>,
    snated: bool,
) -> Result<(u32, Reason), Reason> {
    // SAFETY: plain helper call (inlined by the verifier: one load of `jiffies`).
    let now = unsafe { bpf_jiffies64() } as u32;
    if let Some(cache) = cache {
        // SAFETY: a valid map value pointer; copied out at once.
        let hop = unsafe { *cache };
        // Fresh: the deadline lies at most `NEXTHOP_TTL_JIFFIES` ahead. Compared
        // wrapping, so a deadline long past reads as expired, not as a wrapped future.
        let ahead = hop.expires_jiffies.wrapping_sub(now);
        if ahead != 0 && ahead <= NEXTHOP_TTL_JIFFIES && ip_len <= hop.max_len {
            return send(ctx, &hop, dir, snated);
        }
    }
    let hop = lookup(ctx, key, ip_len, now, snated)?;
    if let Some(cache) = cache {
        // SAFETY: as above. Concurrent writers store the same kind of value; a reader
        // racing a refresh sees the old or the new next hop.
        unsafe { *cache = hop };
    }
    send(ctx, &hop, dir, snated)
}

#[inline(always)]
fn lookup(
    ctx: &XdpContext,
    key: &FlowKey,
    ip_len: u16,
    now_jiffies: u32,
    snated: bool,
) -> Result<NextHop, Reason> {
    // SAFETY: a plain C struct; all-zero is its documented initial state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    let src = words(&key.src);
    let dst = words(&key.dst);
    if key.family == FAMILY_V4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src[0];
        params.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
    }
    params.l4_protocol = key.proto;
    params.sport = key.sport;
    params.dport = key.dport;
    params.__bindgen_anon_1.tot_len = ip_len;
    let ingress = ctx.ingress_ifindex() as u32;
    params.ifindex = ingress;

    // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &raw mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return Err(if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
            if snated {
                handoff::to_tc(ctx, params.ifindex);
            }
            Reason::PassNoNeigh
        } else {
            Reason::PassFibOther
        });
    }
    Ok(NextHop {
        // SAFETY: plain helper call; here only, on the way through the FIB.
        refreshed_ns: unsafe { bpf_ktime_get_coarse_ns() },
        ifindex: params.ifindex,
        max_len: ip_len,
        smac: params.smac,
        dmac: params.dmac,
        _pad: [0; 2],
        // 0 reads as expired.
        expires_jiffies: now_jiffies.wrapping_add(NEXTHOP_TTL_JIFFIES).max(1),
    })
}

/// Out through the next hop: a devmap redirect when its device is one the agent
/// attached to (and so takes redirects; the interface the packet came in on included),
/// `XDP_TX` when it is behind the interface the packet came in on but that is outside
/// the devmap, else the kernel's stack, which forwards the translated packet itself (a
/// pod's veth without NAPI, an overlay device, a driver without XDP transmit).
#[inline(always)]
fn send(
    ctx: &XdpContext,
    hop: &NextHop,
    dir: Direction,
    snated: bool,
) -> Result<(u32, Reason), Reason> {
    let ingress = ctx.ingress_ifindex() as u32;
    let (tx, redirect, stack) = match dir {
        Direction::ToBackend => (Reason::FwdTx, Reason::FwdRedirect, Reason::FwdStack),
        Direction::ToClient => (Reason::ReplyTx, Reason::ReplyRedirect, Reason::ReplyStack),
    };
    // Back out of the interface the packet came in on goes through the devmap as well
    // when the device is there: a veth sends `XDP_TX` frames on to its peer only when
    // the peer runs an XDP program (the kernel's `veth_xdp_flush`), else they wait in
    // its ring until other traffic wakes it (seconds), whereas a redirect is flushed at
    // the end of the poll. A real NIC transmits both alike.
    let verdict = if let Ok(action) = TX_PORTS_V1.redirect(hop.ifindex, 0) {
        (action, if hop.ifindex == ingress { tx } else { redirect })
    } else if hop.ifindex == ingress {
        (XDP_TX, tx)
    } else {
        // The frame keeps the MACs it arrived with: it is addressed to this node.
        if snated {
            handoff::to_tc(ctx, hop.ifindex);
        }
        return Ok((XDP_PASS, stack));
    };
    store(ctx, 0, hop.dmac)?;
    store(ctx, 6, hop.smac)?;
    Ok(verdict)
}
