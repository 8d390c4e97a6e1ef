//! SNAT port choice and reservation lifetimes, shared by the kernel (which allocates)
//! and the tests (which predict the port a flow gets).
//!
//! A new flow to a remote backend tries up to `SNAT_ATTEMPTS` ports of the node's range:
//! first the one at its flow hash, then ports drawn from the hash mixed with the
//! attempt's number (in a range no larger than the attempts, consecutive ones, so that
//! every port is tried); the first whose reservation (the `SNAT_V1` entry of backend ->
//! node address:port) is free, or stale, is taken. Every draw is independent of the
//! others and of other flows' (two may coincide), so a flow is refused only when all of
//! its attempts hit held ports: with a share `p` of the range held, one flow in `1 / p^8` (one
//! in 700 at 44 %, one in 60 at 60 %, one in 17 at 70 %). Attempts a fixed step apart
//! (an eighth of the range) made every flow whose first port fell in one of `range / 8`
//! groups compete for that group's eight ports: a group filled, and refused flows, with
//! under half of the range held. Consecutive attempts do worse: runs of held ports grow
//! where linear probes land. A port is unique per backend address and port, as Linux's
//! NAT keeps reply tuples unique, so every backend has the whole range.
//!
//! How long a closed TCP flow keeps its port depends on who closed it. The side that
//! sends the first FIN keeps the connection in `TIME_WAIT`; when that is the client, or
//! an RST ended it, the backend keeps nothing, and the port is free 10 s after the
//! last packet (Cilium's `bpf-ct-timeout-regular-tcp-fin`). When the backend closed
//! first, its `TIME_WAIT` socket takes a new SYN from the same address and port when
//! the SYN's timestamp is newer (its sequence number, without timestamps: Linux's
//! `tcp_timewait_state_process`), and otherwise answers with an ACK that makes the
//! client reset it and send its SYN again one second later (a backend with
//! `tcp_rfc1337=1` ignores that reset, and the client waits out the `TIME_WAIT`): such
//! a port is held for 120 s while other ports are free, and given to a new flow none of
//! whose attempts is free 10 s after the close, the longest idle first.
//!
//! What the node cannot see: FINs that cross (the backend sent its own before the
//! client's arrived) leave both ends in `TIME_WAIT` but count as the client's close
//! (the flow that gets the port next may need a SYN retransmission); and an RST the
//! receiver drops (outside its window, as a stray or forged one is) counts as the end
//! of the connection until another packet passes, so a connection still open and idle
//! 10 s after it loses its port.

use crate::{
    PROTO_TCP, SNAT_STATE_BACKEND_WAITS, SNAT_STATE_CLOSING, SNAT_STATE_FIN_BACKEND,
    SNAT_STATE_FIN_CLIENT, SNAT_STATE_RESET,
};

/// Ports tried for a new flow before it is dropped as `drop_snat_exhausted`. The
/// verifier walks every attempt as its own copy of the loop body, and load time is what
/// an agent restart waits for: here 32 attempts made the object take 4.3 s to load, 8
/// about 1.9 s, 4 about 2.0 s against 1.1 s without SNAT on a busy machine (`bpftool prog
/// loadall`). Four consecutive ports from the flow hash refused about one new flow in
/// a thousand with under a tenth of a backend's range held (`xlb-bench e2e --topology
/// cluster`, 800 new connections/s): runs of held ports grow where linear probes land.
pub const SNAT_ATTEMPTS: u32 = 8;

const NS_PER_S: u64 = 1_000_000_000;
/// An open TCP flow's reservation survives this long without a packet: kube-proxy's
/// `conntrack.tcpEstablishedTimeout` (24 h).
pub const SNAT_TCP_IDLE_NS: u64 = 86_400 * NS_PER_S;
/// After a FIN, when the backend closed first or only one side has closed, and after a
/// packet that followed an RST: the kernel's `nf_conntrack_tcp_timeout_time_wait`
/// (120 s), so a backend's `TIME_WAIT` socket is gone before the port is given to
/// another client while other ports are free.
pub const SNAT_TCP_CLOSING_NS: u64 = 120 * NS_PER_S;
/// After a close that left the backend nothing to wait for (the client's FIN first,
/// then the backend's; or an RST as the last packet): time for the last ACK and stray
/// retransmissions (Cilium's `bpf-ct-timeout-regular-tcp-fin`, 10 s; conntrack gives
/// its CLOSE state, after an RST, as long).
pub const SNAT_TCP_CLOSED_NS: u64 = 10 * NS_PER_S;
/// UDP: the kernel's `nf_conntrack_udp_timeout_stream` (120 s).
pub const SNAT_UDP_IDLE_NS: u64 = 120 * NS_PER_S;

/// The port (host byte order) of attempt `attempt` (below `SNAT_ATTEMPTS`) for a flow of
/// hash `hash`, in `min..=max`: attempt 0 at `hash % size`, the others drawn from
/// `hash` mixed with the attempt (every port of a range no larger than the attempts).
#[inline(always)]
pub const fn snat_port(hash: u32, attempt: u32, min: u16, max: u16) -> u16 {
    let size = (max as u32).saturating_sub(min as u32) + 1;
    let offset = if size <= SNAT_ATTEMPTS {
        (hash % size + attempt) % size
    } else if attempt == 0 {
        hash % size
    } else {
        draw(hash, attempt) % size
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "offset < size <= 65536 - min"
    )]
    let port = min + offset as u16;
    port
}

/// `hash` and `attempt` mixed (the 32-bit finalizer of `MurmurHash3`, public domain):
/// each attempt an independent draw, whatever the other flows' hashes.
#[inline(always)]
const fn draw(hash: u32, attempt: u32) -> u32 {
    let mut h = hash ^ attempt.wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A reservation's `SNAT_STATE_*` after a packet with `tcp_flags` (0 for UDP), from
/// the client (`from_client`) or the backend. A client's SYN opens the connection again
/// (a new connection on the same addresses and ports, or the retry after an RST); an
/// RST counts only while it is the last word: a packet after it shows the connection
/// (or its peer's retransmissions) still there, and the port is held as closing.
#[inline(always)]
pub const fn snat_state_after(state: u8, tcp_flags: u8, from_client: bool) -> u8 {
    if from_client && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN {
        return 0;
    }
    let mut state = state & !SNAT_STATE_RESET;
    if tcp_flags & TCP_RST != 0 {
        state |= SNAT_STATE_CLOSING | SNAT_STATE_RESET;
    }
    if tcp_flags & TCP_FIN != 0 {
        state |= SNAT_STATE_CLOSING;
        if from_client {
            state |= SNAT_STATE_FIN_CLIENT;
        } else {
            if state & SNAT_STATE_FIN_CLIENT == 0 {
                state |= SNAT_STATE_BACKEND_WAITS;
            }
            state |= SNAT_STATE_FIN_BACKEND;
        }
    }
    state
}

/// Both ends sent their FIN.
#[inline(always)]
const fn both_fins(state: u8) -> bool {
    let fins = SNAT_STATE_FIN_CLIENT | SNAT_STATE_FIN_BACKEND;
    state & fins == fins
}

/// How long a reservation of protocol `proto` in `state` may sit idle before its port
/// may be given to another flow.
#[inline(always)]
pub const fn snat_idle_ns(proto: u8, state: u8) -> u64 {
    if proto != PROTO_TCP {
        SNAT_UDP_IDLE_NS
    } else if state & SNAT_STATE_RESET != 0
        || (both_fins(state) && state & SNAT_STATE_BACKEND_WAITS == 0)
    {
        SNAT_TCP_CLOSED_NS
    } else if state & SNAT_STATE_CLOSING != 0 {
        SNAT_TCP_CLOSING_NS
    } else {
        SNAT_TCP_IDLE_NS
    }
}

/// Whether a reservation held only for its backend's `TIME_WAIT` (both FINs seen, the
/// backend's first, no packet for `idle_ns`) may go to a new flow none of whose
/// attempts found a free port: the new SYN reopens the backend's connection, or costs
/// the client one retransmission, where the alternative is a refused connection.
#[inline(always)]
pub const fn snat_reusable_when_full(proto: u8, state: u8, idle_ns: u64) -> bool {
    proto == PROTO_TCP && both_fins(state) && idle_ns > SNAT_TCP_CLOSED_NS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_stay_in_range() {
        assert_eq!(snat_port(0, 0, 61_000, 65_535), 61_000);
        assert_eq!(snat_port(4_535, 0, 61_000, 65_535), 65_535);
        assert_eq!(snat_port(9, 0, 0, 65_535), 9, "the whole port space");
        assert_eq!(snat_port(12, 5, 100, 100), 100, "one port");
        for (min, max) in [(61_000, 65_535), (1, 65_535), (1_024, 1_100), (0, 65_535)] {
            for hash in [0, 1, 7, 4_535, 1_000_003, u32::MAX] {
                for attempt in 0..SNAT_ATTEMPTS {
                    let port = snat_port(hash, attempt, min, max);
                    assert!((min..=max).contains(&port), "{min}-{max} {hash} {attempt}");
                }
            }
        }
    }

    #[test]
    fn small_ranges_are_tried_whole() {
        for (min, max) in [(40_000, 40_001), (61_000, 61_007)] {
            for hash in [0, 1, 7, 4_535, u32::MAX] {
                let mut ports = [0u16; SNAT_ATTEMPTS as usize];
                for (attempt, port) in (0..SNAT_ATTEMPTS).zip(ports.iter_mut()) {
                    *port = snat_port(hash, attempt, min, max);
                }
                ports.sort_unstable();
                let distinct = 1 + ports.windows(2).filter(|w| w[0] != w[1]).count();
                let size = usize::from(max - min) + 1;
                assert_eq!(distinct, size.min(ports.len()), "{min}-{max} {hash}");
            }
        }
    }

    /// Flows whose first ports coincide draw their other attempts apart.
    #[test]
    fn flows_that_share_a_first_port_share_no_other() {
        let size = 4_536;
        let (a, b) = (1_234, 1_234 + size);
        assert_eq!(
            snat_port(a, 0, 61_000, 65_535),
            snat_port(b, 0, 61_000, 65_535)
        );
        let shared = (1..SNAT_ATTEMPTS)
            .filter(|&i| snat_port(a, i, 61_000, 65_535) == snat_port(b, i, 61_000, 65_535))
            .count();
        assert_eq!(shared, 0);
    }

    /// One backend's flows filling the default range (4,536 ports) the way the kernel
    /// allocates (the first free attempt, no reservation ever freed), flow hashes from a
    /// fixed generator: no flow is refused before 40 % of the range is held, and 24 are
    /// before 70 %. (Attempts a fixed eighth of the range apart refused 8 flows before
    /// 31 %, and 152 before 70 %.)
    #[test]
    fn a_range_fills_before_flows_are_refused() {
        const SIZE: usize = 4_536;
        let (min, max) = (61_000u16, 65_535u16);
        assert_eq!(usize::from(max - min) + 1, SIZE);
        let mut held = [false; SIZE];
        let (mut taken, mut refused_by_40, mut refused_by_70) = (0usize, 0u32, 0u32);
        let mut x = 0x2545_f491_u32;
        while taken * 10 < SIZE * 7 {
            // xorshift32: a fixed sequence of flow hashes.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let free = (0..SNAT_ATTEMPTS)
                .map(|i| usize::from(snat_port(x, i, min, max) - min))
                .find(|&p| !held[p]);
            match free {
                Some(p) => {
                    held[p] = true;
                    taken += 1;
                }
                None if taken * 10 < SIZE * 4 => refused_by_40 += 1,
                None => refused_by_70 += 1,
            }
        }
        assert_eq!(
            refused_by_40, 0,
            "refused with under 40 % of the range held"
        );
        assert!(
            refused_by_70 < 40,
            "{refused_by_70} flows refused from 40 % to 70 % held"
        );
    }

    #[test]
    fn closing_tcp_frees_sooner() {
        assert!(snat_idle_ns(PROTO_TCP, SNAT_STATE_CLOSING) < snat_idle_ns(PROTO_TCP, 0));
        assert_eq!(snat_idle_ns(crate::PROTO_UDP, 0), SNAT_UDP_IDLE_NS);
    }

    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const ACK: u8 = TCP_ACK;
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
    const RST: u8 = TCP_RST;

    /// The state after `packets` (flags, from the client?), from a new reservation.
    fn after(packets: &[(u8, bool)]) -> u8 {
        packets.iter().fold(0, |state, &(flags, client)| {
            snat_state_after(state, flags, client)
        })
    }

    #[test]
    fn who_closed_first_sets_how_long_the_port_is_held() {
        let open = [(SYN, true), (SYN_ACK, false), (ACK, true), (ACK, false)];
        let opened = after(&open);
        assert_eq!(opened, 0);
        assert_eq!(snat_idle_ns(PROTO_TCP, opened), SNAT_TCP_IDLE_NS);

        // The client closes first: the backend keeps nothing once it has its last ACK.
        let client_first =
            after(&[&open[..], &[(FIN_ACK, true), (FIN_ACK, false), (ACK, true)]].concat());
        assert_eq!(snat_idle_ns(PROTO_TCP, client_first), SNAT_TCP_CLOSED_NS);
        assert!(!snat_reusable_when_full(PROTO_TCP, client_first, 0));

        // Half closed by the client: the backend may still send.
        let half = after(&[&open[..], &[(FIN_ACK, true), (ACK, false)]].concat());
        assert_eq!(snat_idle_ns(PROTO_TCP, half), SNAT_TCP_CLOSING_NS);
        assert!(!snat_reusable_when_full(
            PROTO_TCP,
            half,
            SNAT_TCP_CLOSING_NS
        ));

        // The backend closes first: its `TIME_WAIT` holds the port, unless none is free.
        let backend_first = after(
            &[
                &open[..],
                &[(FIN_ACK, false), (FIN_ACK, true), (ACK, false)],
            ]
            .concat(),
        );
        assert_ne!(backend_first & SNAT_STATE_BACKEND_WAITS, 0);
        assert_eq!(snat_idle_ns(PROTO_TCP, backend_first), SNAT_TCP_CLOSING_NS);
        assert!(!snat_reusable_when_full(
            PROTO_TCP,
            backend_first,
            SNAT_TCP_CLOSED_NS
        ));
        assert!(snat_reusable_when_full(
            PROTO_TCP,
            backend_first,
            SNAT_TCP_CLOSED_NS + 1
        ));
        // A retransmitted FIN of the client's does not change who was first.
        assert_eq!(
            snat_state_after(backend_first, FIN_ACK, true),
            backend_first
        );

        // An RST ends it at both ends ...
        let reset = after(&[&open[..], &[(RST, false)]].concat());
        assert_eq!(snat_idle_ns(PROTO_TCP, reset), SNAT_TCP_CLOSED_NS);
        // ... unless the connection goes on after it (an RST out of the window).
        let went_on = snat_state_after(reset, ACK, true);
        assert_eq!(snat_idle_ns(PROTO_TCP, went_on), SNAT_TCP_CLOSING_NS);

        // The client's SYN opens the connection again; the backend's SYN-ACK does not.
        assert_eq!(snat_state_after(backend_first, SYN, true), 0);
        assert_eq!(snat_state_after(reset, SYN, true), 0);
        assert_eq!(
            snat_state_after(backend_first, SYN_ACK, false),
            backend_first
        );

        // UDP: no flags, no change.
        assert_eq!(snat_state_after(0, 0, true), 0);
        assert!(!snat_reusable_when_full(
            crate::PROTO_UDP,
            backend_first,
            u64::MAX
        ));
    }
}
