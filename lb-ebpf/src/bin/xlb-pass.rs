//! A program that only returns `XDP_PASS`, in an object of its own so the shipped agent
//! never carries it: the test harness attaches it to veth peers of test topologies (a
//! veth hands frames that XDP redirects into it to its peer at once only when that peer
//! runs XDP too), and `cargo xtask bench packet` times xlb against it in the same run.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action::XDP_PASS, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
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
