//! Next hop by `bpf_fib_lookup`, then out through the devmap (or XDP_TX when the next
//! hop is behind the interface the packet came in on). An unresolved neighbour hands
//! the translated packet to the kernel, which resolves it for the packets after.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{Reason, reason::XDP_TX};

use crate::{
    maps::TX_PORTS_V1,
    packet::{Packet, store},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

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

#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, dir: Direction) -> Result<(u32, Reason), Reason> {
    // SAFETY: a plain C struct; all-zero is its documented initial state.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    let src = words(&pkt.key.src);
    let dst = words(&pkt.key.dst);
    if pkt.is_v4() {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = src[0];
        params.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = src;
        params.__bindgen_anon_4.ipv6_dst = dst;
    }
    params.l4_protocol = pkt.key.proto;
    params.sport = pkt.key.sport;
    params.dport = pkt.key.dport;
    params.__bindgen_anon_1.tot_len = pkt.ip_len;
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
            Reason::PassNoNeigh
        } else {
            Reason::PassFibOther
        });
    }
    store(ctx, 0, params.dmac)?;
    store(ctx, 6, params.smac)?;

    let (tx, redirect) = match dir {
        Direction::ToBackend => (Reason::FwdTx, Reason::FwdRedirect),
        Direction::ToClient => (Reason::ReplyTx, Reason::ReplyRedirect),
    };
    if params.ifindex == ingress {
        return Ok((XDP_TX, tx));
    }
    let action = match TX_PORTS_V1.redirect(params.ifindex, 0) {
        Ok(action) => action,
        // Not in the devmap (an interface the agent did not attach to): the slower
        // generic redirect still delivers it.
        Err(_) => {
            // SAFETY: plain helper call.
            let action = unsafe { bpf_redirect(params.ifindex, 0) };
            action as u32
        }
    };
    Ok((action, redirect))
}
