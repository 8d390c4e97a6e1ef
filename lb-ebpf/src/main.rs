//! xlb's XDP data plane: VIP -> backend DNAT with Maglev selection, connection
//! tracking, reverse translation of replies, and FIB-based forwarding.
//!
//! The per-packet path reads as Cilium's lb.h does: parse -> lookup frontend ->
//! (conntrack hit: reuse backend | source-range check, session-affinity or Maglev
//! select + remember) -> translate -> forward; or, when a rejecting service has no
//! backend, answer the client in place (reject).
//! Every stage returns `Result<_, Reason>`; every exit counts exactly one reason.
//! The same object holds the cgroup socket programs (`sock`), which read the same maps.
#![no_std]
#![no_main]

mod affinity;
mod conntrack;
mod fib;
mod maglev;
mod maps;
mod nat;
mod packet;
mod parse;
mod reject;
mod service;
mod sock;
mod source_range;
mod stats;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{FRONTEND_F_REJECT_EMPTY, Reason};

use crate::packet::Packet;

/// The load balancer, attached to every interface of the node. Inlined into the
/// macro's entry point, as the whole packet path is: one BPF function, no calls.
#[xdp]
#[inline(always)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the #[xdp] macro hands the context over by value"
)]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    let bytes = packet::frame_len(&ctx);
    let (action, reason) = match process(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => (reason.action(), reason),
    };
    stats::count_reason(reason, bytes);
    action
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let mut pkt = parse::parse(ctx)?;
    match service::lookup_frontend(&pkt) {
        Some(frontend) => to_backend(ctx, &mut pkt, frontend),
        None => to_client(ctx, &mut pkt),
    }
}

/// Client -> frontend: choose (or keep) the backend, DNAT, forward; or refuse the flow
/// when the service has no backend and rejects.
fn to_backend(
    ctx: &XdpContext,
    pkt: &mut Packet,
    frontend: lb_common::Frontend,
) -> Result<(u32, Reason), Reason> {
    pkt.check_translatable()?;
    nat::check_ttl(ctx, pkt)?;
    let bytes = packet::frame_len(ctx);
    let chosen = match conntrack::backend_for(pkt, &frontend) {
        Ok(chosen) => chosen,
        Err(Reason::DropNoBackend) if frontend.flags & FRONTEND_F_REJECT_EMPTY != 0 => {
            return reject::refuse(ctx, pkt, bytes, frontend.service_id);
        }
        Err(reason) => return Err(reason),
    };
    nat::dnat(ctx, pkt, &chosen.backend)?;
    stats::count_service(frontend.service_id, bytes, chosen.new_flow);
    if chosen.new_flow {
        stats::count_backend_new_flow(chosen.id);
    }
    fib::forward(
        ctx,
        pkt,
        fib::Direction::ToBackend,
        fib::backend_next_hop(chosen.id),
    )
}

/// Anything else: a reply from a backend of a tracked flow is translated back to the
/// frontend the client used; everything else passes untouched.
fn to_client(ctx: &XdpContext, pkt: &mut Packet) -> Result<(u32, Reason), Reason> {
    if !service::from_backend(pkt) {
        return Err(Reason::PassNotFrontend);
    }
    let entry = conntrack::reply_nat(pkt).ok_or(Reason::PassNotFrontend)?;
    // SAFETY: a valid map value pointer; copied out at once.
    let rev = unsafe { *entry };
    pkt.check_reply_translatable()?;
    nat::check_ttl(ctx, pkt)?;
    let bytes = packet::frame_len(ctx);
    nat::rev_snat(ctx, pkt, &rev)?;
    stats::count_reply(rev.service_id, bytes);
    // SAFETY: the field of a valid map value.
    let cache = unsafe { &raw mut (*entry).next_hop };
    fib::forward(ctx, pkt, fib::Direction::ToClient, Some(cache))
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
