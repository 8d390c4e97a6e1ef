//! The tc egress program on the node's uplinks: replies of backends on this node.
//!
//! A pod on the node answers through the node's own routing, out of the uplink; the
//! XDP program (ingress only) never sees that reply. Here, after the kernel has routed
//! it, a reply of a tracked flow that was not source-NATed (a local backend, or
//! `externalTrafficPolicy: Local`) gets the frontend back as its source, from the same
//! reply translation XDP would use (`conntrack::reply_nat`); an ICMP error the node or
//! a local pod sends about such a flow gets its quote translated (`icmp_dnat`).
//! Everything else leaves untouched, uncounted.
//!
//! The packet is a socket buffer: headers are pulled into its linear part first, and
//! checksums are fixed with the kernel's helpers, which know whether the L4 checksum is
//! still partial (offloaded) or complete. The TTL is the kernel's: it forwarded it.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{PROTO_UDP, REVNAT_F_DSR, Reason};

use crate::{
    conntrack, icmp_dnat,
    packet::{Fragment, Packet},
    parse, service, stats,
};

/// Ethernet, one VLAN tag, IPv4 with options, a TCP header with options: all a
/// translation reads or writes.
const HEADERS: u32 = 14 + 4 + 60 + 60;

#[classifier]
#[inline(always)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[classifier] macro hands the context over by value"
)]
pub fn xlb_tc_egress(ctx: TcContext) -> i32 {
    match reply_local(&ctx) {
        Ok(service_id) => {
            let bytes = u64::from(ctx.len());
            stats::count_reason(Reason::ReplyEgress, bytes);
            stats::count_reply(service_id, bytes);
            TC_ACT_OK
        }
        // An ICMP error (the node's or a local pod's) about a flow to a local backend.
        Err(Reason::PassNotL4) => icmp_dnat::egress(&ctx),
        Err(_) => TC_ACT_OK,
    }
}

/// Translates a local backend's reply; the service id when it did.
#[inline(always)]
fn reply_local(ctx: &TcContext) -> Result<u32, Reason> {
    let want = core::cmp::min(ctx.len(), HEADERS);
    if ctx.data() + want as usize > ctx.data_end() {
        ctx.pull_data(want).map_err(|_| Reason::PassMalformed)?;
    }
    let pkt = parse::parse(ctx)?;
    if !service::from_backend(&pkt) {
        return Err(Reason::PassNotFrontend);
    }
    let entry = conntrack::reply_nat(&pkt).ok_or(Reason::PassNotFrontend)?;
    // SAFETY: a valid map value pointer; copied out at once.
    let rev = unsafe { *entry };
    if pkt.fragment == Fragment::First || !pkt.l4_complete {
        return Err(Reason::PassMalformed);
    }
    translate(ctx, &pkt, false, &rev.addr, rev.port)?;
    if rev.flags & REVNAT_F_DSR != 0 {
        crate::dsr::clamp_mss(ctx, &pkt);
    }
    Ok(rev.service_id)
}

/// Gives the source (backend -> client becomes frontend -> client) or, `dst`, the
/// destination (client -> frontend becomes client -> backend: a DSR packet delivered)
/// a new address and port (network order).
#[inline(always)]
pub fn translate(
    ctx: &TcContext,
    pkt: &Packet,
    dst: bool,
    addr: &[u8; 16],
    port: u16,
) -> Result<(), Reason> {
    let old_addr = if dst { &pkt.key.dst } else { &pkt.key.src };
    let old_port = if dst { pkt.key.dport } else { pkt.key.sport };
    let udp = pkt.key.proto == PROTO_UDP;
    let csum_off = pkt.l4() + if udp { 6 } else { 16 };
    let mangled = if udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let fail = |_| Reason::PassMalformed;
    if pkt.is_v4() {
        let old = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
        let new = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old),
            u64::from(new),
            u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
        )
        .map_err(fail)?;
        ctx.l3_csum_replace(pkt.l3() + 10, u64::from(old), u64::from(new), 4)
            .map_err(fail)?;
        ctx.store(pkt.l3() + if dst { 16 } else { 12 }, &new, 0)
            .map_err(fail)?;
    } else {
        let mut i = 0;
        while i < 16 {
            let old = u32::from_ne_bytes([
                old_addr[i],
                old_addr[i + 1],
                old_addr[i + 2],
                old_addr[i + 3],
            ]);
            let new = u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
            ctx.l4_csum_replace(
                csum_off,
                u64::from(old),
                u64::from(new),
                u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
            )
            .map_err(fail)?;
            i += 4;
        }
        ctx.store(pkt.l3() + if dst { 24 } else { 8 }, addr, 0)
            .map_err(fail)?;
    }
    // Ports are kept in wire order.
    ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(port), mangled | 2)
        .map_err(fail)?;
    ctx.store(pkt.l4() + if dst { 2 } else { 0 }, &port, 0)
        .map_err(fail)
}
