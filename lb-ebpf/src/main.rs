//! xlb's XDP data plane: VIP -> backend DNAT with Maglev selection, connection
//! tracking, reverse translation of replies, and FIB-based forwarding.
//!
//! The per-packet path reads as Cilium's lb.h does: parse -> pre-filter -> (conntrack
//! hit: reuse backend and the frontend the entry remembers | lookup frontend,
//! source-range check, session-affinity or Maglev select + remember) -> translate (or
//! encapsulate, DSR) -> forward; or, when a rejecting service has no backend, answer
//! the client in place (reject).
//! Every stage returns `Result<_, Reason>`; every exit counts exactly one reason.
//! Rare paths (ICMP errors, DSR packets too big) are programs of their own, tail-called
//! (`slow_path`). The same object holds the cgroup socket programs (`sock`), which read
//! the same maps.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod affinity;
mod conntrack;
mod dsr;
mod dsr_mtu;
mod egress;
mod fib;
mod handoff;
mod icmp;
mod icmp_dnat;
mod maglev;
mod maps;
mod nat;
mod packet;
mod parse;
mod reject;
mod service;
mod slow_path;
mod snat;
mod sock;
mod source_range;
mod stats;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{FRONTEND_F_REJECT_EMPTY, Reason};

use crate::packet::Packet;

/// The load balancer, attached to every interface of the node. Parses and
/// pre-filters: a packet neither to a frontend nor from a backend (most of a node's
/// traffic) passes at once. The rest of the common path is inlined into this one frame
/// (no BPF function call, whose return costs); the rare paths are programs of their own
/// (`slow_path`), reached by tail call.
#[xdp]
#[inline(always)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands the context over by value"
)]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    let bytes = packet::frame_len(&ctx);
    let mut pkt = Packet::default();
    let verdict = match parse::parse_into(&ctx, &mut pkt) {
        Err(reason) => (reason.action(), reason),
        Ok(()) => match service::ours(&pkt) {
            Some(ours) => process(&ctx, &pkt, ours),
            // Neither to a frontend nor from a backend (most of a node's traffic).
            None => (Reason::PassNotFrontend.action(), Reason::PassNotFrontend),
        },
    };
    let (action, reason) = slow_path::take(&ctx, verdict, bytes);
    stats::count_reason(reason, bytes);
    action
}

/// A frontend's or a backend's packet.
#[inline(always)]
fn process(ctx: &XdpContext, parsed: &Packet, ours: service::Ours) -> (u32, Reason) {
    // Stages work on a copy: on the parsed packet itself, LLVM shares a stack slot
    // between a map pointer and a scalar, and the verifier rejects the program ("R1
    // bitwise operator &= on pointer prohibited").
    let mut pkt = *parsed;
    verdict(pipeline(ctx, &mut pkt, ours))
}

/// The action and the reason to count of a stage's outcome.
#[inline(always)]
#[must_use]
pub fn verdict(outcome: Result<(u32, Reason), Reason>) -> (u32, Reason) {
    match outcome {
        Ok(verdict) => verdict,
        Err(reason) => (reason.action(), reason),
    }
}

#[inline(always)]
fn pipeline(
    ctx: &XdpContext,
    pkt: &mut Packet,
    ours: service::Ours,
) -> Result<(u32, Reason), Reason> {
    if ours == service::Ours::ToFrontend {
        // An established flow's entry remembers its frontend's service and flags: no
        // frontend lookup. Its flow then outlives the frontend while its backend serves
        // the service, as conntrack entries do under kube-proxy.
        let tcp_flags = nat::tcp_flags(ctx, pkt);
        let tracked = conntrack::tracked(pkt, tcp_flags);
        let frontend = match tracked.kept.as_ref().and_then(conntrack::Kept::frontend) {
            Some(remembered) => Some(remembered),
            None => service::frontend(pkt),
        };
        if let Some(frontend) = frontend {
            return to_backend(ctx, pkt, frontend, tracked, tcp_flags);
        }
    }
    to_client(ctx, pkt, ours)
}

/// Client -> frontend: choose (or keep) the backend, DNAT, forward; or refuse the flow
/// when the service has no backend and rejects; or encapsulate it untranslated to a
/// backend on another node (DSR).
#[inline(always)]
fn to_backend(
    ctx: &XdpContext,
    pkt: &mut Packet,
    frontend: lb_common::Frontend,
    tracked: conntrack::Tracked,
    tcp_flags: u8,
) -> Result<(u32, Reason), Reason> {
    pkt.check_translatable()?;
    nat::check_ttl(ctx, pkt)?;
    let bytes = packet::frame_len(ctx);
    let chosen = match conntrack::backend_for(pkt, &frontend, tracked, tcp_flags) {
        Ok(chosen) => chosen,
        Err(Reason::DropNoBackend) if frontend.flags & FRONTEND_F_REJECT_EMPTY != 0 => {
            return reject::refuse(ctx, pkt, bytes, frontend.service_id);
        }
        Err(reason) => return Err(reason),
    };
    let dsr = dsr::wanted(&chosen);
    if dsr {
        // Untranslated, inside an outer header to the backend; `pkt` now describes
        // the outer header.
        dsr::encapsulate(ctx, pkt, &chosen)?;
    } else {
        let snat = match chosen.snat {
            Some(port) => Some((
                snat::node_addr_words(pkt.key.family).ok_or(Reason::DropNoSnatAddress)?,
                port,
            )),
            None => None,
        };
        nat::rewrite(
            ctx,
            pkt,
            snat,
            Some((chosen.backend.addr_words(), chosen.backend.port)),
        )?;
    }
    stats::count_service(frontend.service_id, bytes, chosen.new_flow);
    if chosen.new_flow {
        stats::count_backend_new_flow(chosen.id);
    }
    // Source-NATed or encapsulated, the packet's source is this node's own address:
    // where XDP cannot send it, the tc ingress program does (`handoff`).
    fib::forward(
        ctx,
        &pkt.key,
        pkt.ip_len,
        fib::Direction::ToBackend,
        fib::backend_next_hop(chosen.id),
        chosen.snat.is_some() || dsr,
    )
}

/// Anything else: a reply from a backend of a tracked flow is translated back to the
/// frontend the client used (and, source-NATed, to the client); everything else passes
/// untouched.
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    pkt: &mut Packet,
    ours: service::Ours,
) -> Result<(u32, Reason), Reason> {
    if ours == service::Ours::ToFrontend && !service::from_backend(pkt) {
        return Err(Reason::PassNotFrontend);
    }
    // source-NATed (backend -> node:port): to frontend -> client; else backend -> client:
    // to frontend -> client. Either way the entry caches the next hop to the client.
    let snat_reply = snat::reply(pkt, nat::tcp_flags(ctx, pkt));
    let (src, dst, service_id, cache) = if let Some(entry) = snat_reply {
        // SAFETY: a valid map value pointer; read in place (LRU values are not freed
        // while the program runs).
        unsafe {
            (
                ((*entry).frontend_words(), (*entry).frontend_port),
                Some(((*entry).client_words(), (*entry).client_port)),
                (*entry).service_id,
                &raw mut (*entry).next_hop,
            )
        }
    } else {
        let entry = conntrack::reply_nat(pkt).ok_or(Reason::PassNotFrontend)?;
        // SAFETY: as above.
        unsafe {
            (
                ((*entry).addr_words(), (*entry).port),
                None,
                (*entry).service_id,
                &raw mut (*entry).next_hop,
            )
        }
    };
    pkt.check_reply_translatable()?;
    nat::check_ttl(ctx, pkt)?;
    let bytes = packet::frame_len(ctx);
    nat::rewrite(ctx, pkt, Some(src), dst)?;
    stats::count_reply(service_id, bytes);
    // A source-NATed reply may now come from the node's own address (a NodePort).
    fib::forward(
        ctx,
        &pkt.key,
        pkt.ip_len,
        fib::Direction::ToClient,
        Some(cache),
        snat_reply.is_some(),
    )
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
