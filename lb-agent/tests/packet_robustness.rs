//! Robustness: well over 100,000 generated and mutated frames (every truncation
//! length, random header fields, bad IHL, fragments, IPv6 extension headers, broken
//! checksums) through the XDP program by `BPF_PROG_TEST_RUN`. Whatever comes in:
//! - the verdict is one of PASS / DROP / TX / REDIRECT (never `XDP_ABORTED`);
//! - a frame that leaves changed was translated: client -> a backend *of the frontend
//!   it was addressed to*, or backend -> the frontend of that backend's service;
//! - a translated frame whose input had valid checksums has valid checksums;
//! - a frame sent back (a reject: services without backends that refuse) goes to the
//!   sender from the frontend it addressed, is a reset (never for a reset) or an ICMP
//!   port unreachable quoting the input's headers, with valid checksums.
//!
//! The verifier accepting the program is checked by loading it. The RNG seed is fixed
//! (override with `XLB_FUZZ_SEED`) so a failure reproduces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::FRONTEND_F_REJECT_EMPTY;
use lb_common::reason::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};
use lb_testbed::frames::{Frame, L4, verify_checksums};
use lb_testbed::node::*;
use lb_testbed::xdp;
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng, seq::IndexedRandom};

const MIN_FRAMES: u64 = 100_000;
const ETH_HLEN: usize = 14;

/// (address, port, proto) as seen in a frame.
type Endpoint = (IpAddr, u16, u8);

/// The 5-tuple of a frame by plain offsets (lenient: no checksum or length checks).
fn tuple(f: &[u8]) -> Option<(Endpoint, Endpoint)> {
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 = 18;
    }
    let (src, dst, proto, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(f.get(l3)? & 0x0f) * 4;
            let a: [u8; 4] = f.get(l3 + 12..l3 + 16)?.try_into().ok()?;
            let b: [u8; 4] = f.get(l3 + 16..l3 + 20)?.try_into().ok()?;
            (
                IpAddr::V4(a.into()),
                IpAddr::V4(b.into()),
                *f.get(l3 + 9)?,
                l3 + ihl,
            )
        }
        0x86dd => {
            let a: [u8; 16] = f.get(l3 + 8..l3 + 24)?.try_into().ok()?;
            let b: [u8; 16] = f.get(l3 + 24..l3 + 40)?.try_into().ok()?;
            (
                IpAddr::V6(a.into()),
                IpAddr::V6(b.into()),
                *f.get(l3 + 6)?,
                l3 + 40,
            )
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*f.get(l4)?, *f.get(l4 + 1)?]);
    let dport = u16::from_be_bytes([*f.get(l4 + 2)?, *f.get(l4 + 3)?]);
    Some(((src, sport, proto), (dst, dport, proto)))
}

struct Oracle {
    services: Vec<Service>,
}

impl Oracle {
    fn service_of_frontend(&self, e: Endpoint) -> Option<&Service> {
        self.services.iter().find(|s| s.frontend == e)
    }

    fn is_backend_of(s: &Service, e: Endpoint) -> bool {
        e.2 == s.frontend.2 && s.backends.iter().any(|b| (b.1, b.2) == (e.0, e.1))
    }

    /// Checks one run; returns a description of what went wrong.
    fn judge(&self, input: &[u8], action: u32, output: &[u8]) -> Result<(), String> {
        if ![XDP_PASS, XDP_DROP, XDP_TX, XDP_REDIRECT].contains(&action) {
            return Err(format!("verdict {action}"));
        }
        if action == XDP_DROP || output == input {
            return Ok(());
        }
        if let Some((_, idst)) = tuple(input)
            && self
                .service_of_frontend(idst)
                .is_some_and(|s| s.flags & FRONTEND_F_REJECT_EMPTY != 0)
        {
            return judge_reject(input, action, output);
        }
        if output.len() != input.len() {
            return Err("length changed".into());
        }
        let (isrc, idst) = tuple(input).ok_or("changed a frame that is not TCP/UDP over IP")?;
        let (osrc, odst) = tuple(output).ok_or("output lost its 5-tuple")?;
        if odst != idst {
            // Forward translation: only for a frontend, only to its backends.
            let svc = self
                .service_of_frontend(idst)
                .ok_or_else(|| format!("rewrote {idst:?}, which is no frontend"))?;
            if !Self::is_backend_of(svc, odst) {
                return Err(format!(
                    "sent to {odst:?}, not a backend of service {}",
                    svc.id
                ));
            }
            if osrc != isrc {
                return Err("forward translation changed the source".into());
            }
        } else if osrc != isrc {
            // Reply translation: from a backend, to that backend's frontend.
            let svc = self
                .service_of_frontend(osrc)
                .ok_or_else(|| format!("reply source {osrc:?} is no frontend"))?;
            if !Self::is_backend_of(svc, isrc) {
                return Err(format!(
                    "reply from {isrc:?}, not a backend of service {}",
                    svc.id
                ));
            }
        }
        if action == XDP_PASS && output[..12] != input[..12] {
            return Err("passed to the kernel with rewritten MACs".into());
        }
        if verify_checksums(input).is_ok() {
            verify_checksums(output).map_err(|e| format!("translated frame: {e}"))?;
        }
        Ok(())
    }
}

/// A refusal: sent back to the sender (a redirect back out of the interface it came in
/// on, which is in the devmap), from the address it sent to; a reset for TCP (never for
/// a reset), ICMP port unreachable quoting the input's IP header and first 8 bytes for
/// UDP; valid checksums.
fn judge_reject(input: &[u8], action: u32, output: &[u8]) -> Result<(), String> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    if action != XDP_REDIRECT {
        return Err(format!(
            "a rejecting frontend changed a frame with verdict {action}"
        ));
    }
    let out = SlicedPacket::from_ethernet(output).map_err(|e| format!("answer: {e}"))?;
    let addrs = |p: &SlicedPacket<'_>| match &p.net {
        Some(NetSlice::Ipv4(ip)) => Some((
            IpAddr::from(ip.header().source()),
            IpAddr::from(ip.header().destination()),
        )),
        Some(NetSlice::Ipv6(ip)) => Some((
            IpAddr::from(ip.header().source()),
            IpAddr::from(ip.header().destination()),
        )),
        None => None,
    };
    // The input is read leniently (it may be damaged), by offsets.
    let ((client, client_port, _), (vip, vip_port, _)) =
        tuple(input).ok_or("input without ports")?;
    if addrs(&out) != Some((vip, client)) {
        return Err(format!("answer {:?} is not {vip} -> {client}", addrs(&out)));
    }
    if output[..6] != input[6..12] || output[6..12] != input[..6] {
        return Err("answer not sent back to the sender's MAC".into());
    }
    match &out.transport {
        Some(TransportSlice::Tcp(o)) => {
            if tcp_flags(input).is_some_and(|f| f & 0x04 != 0) {
                return Err("answered a reset".into());
            }
            if !o.rst() || (o.source_port(), o.destination_port()) != (vip_port, client_port) {
                return Err("answer is not a reset of the segment's connection".into());
            }
        }
        Some(TransportSlice::Icmpv4(o)) => {
            if o.icmp_type()
                != etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                )
            {
                return Err(format!("ICMP {:?}", o.icmp_type()));
            }
            quoted(input, o.payload())?;
        }
        Some(TransportSlice::Icmpv6(o)) => {
            if o.icmp_type()
                != etherparse::Icmpv6Type::DestinationUnreachable(
                    etherparse::icmpv6::DestUnreachableCode::Port,
                )
            {
                return Err(format!("ICMPv6 {:?}", o.icmp_type()));
            }
            quoted(input, o.payload())?;
        }
        _ => return Err("answer is neither a reset nor ICMP".into()),
    }
    verify_checksums(output).map_err(|e| format!("answer: {e}"))
}

/// Frames the program answered in place (rejecting services).
fn answered(dp: &lb_agent::dataplane::Dataplane) -> u64 {
    dp.reason_stats()
        .expect("reason counters")
        .iter()
        .filter(|(r, _)| {
            matches!(
                r,
                lb_common::Reason::RejectTcpReset | lb_common::Reason::RejectIcmpUnreachable
            )
        })
        .map(|(_, s)| s.packets)
        .sum()
}

/// The TCP flags of a frame, by offsets.
fn tcp_flags(f: &[u8]) -> Option<u8> {
    let l3 = if f.get(12..14) == Some(&[0x81, 0x00]) {
        18
    } else {
        14
    };
    let l4 = if f.get(l3)? >> 4 == 4 {
        l3 + usize::from(f.get(l3)? & 0x0f) * 4
    } else {
        l3 + 40
    };
    f.get(l4 + 13).copied()
}

/// The quote is the input's IP header and UDP header, byte for byte.
fn quoted(input: &[u8], quote: &[u8]) -> Result<(), String> {
    let l3 = if input.get(12..14) == Some(&[0x81, 0x00]) {
        18
    } else {
        14
    };
    if input.get(l3..l3 + quote.len()) == Some(quote) && quote.len() >= 28 {
        Ok(())
    } else {
        Err("the ICMP error does not quote the datagram's headers".into())
    }
}

/// Services without backends that reject, on their own VIPs (TCP and UDP, both
/// families).
fn reject_services() -> Vec<Service> {
    let v4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 90));
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x90));
    let (tcp, udp) = (lb_common::PROTO_TCP, lb_common::PROTO_UDP);
    [
        (20, v4, 80, tcp),
        (21, v4, 53, udp),
        (22, v6, 80, tcp),
        (23, v6, 53, udp),
    ]
    .into_iter()
    .map(|(id, vip, port, proto)| {
        let mut s = Service::new(id, (vip, port, proto), vec![]);
        s.flags = FRONTEND_F_REJECT_EMPTY;
        s
    })
    .collect()
}

/// A random well-formed frame: to a frontend, to a non-frontend, or a reply.
fn random_frame(rng: &mut StdRng, svcs: &[Service], replies: &[Frame]) -> Frame {
    let choice = rng.random_range(0..10);
    if choice < 2 && !replies.is_empty() {
        return replies.choose(rng).expect("non-empty").clone();
    }
    let svc = svcs.choose(rng).expect("services");
    let (vip, port, proto) = svc.frontend;
    let v4 = vip.is_ipv4();
    let src = if rng.random_bool(0.8) {
        if v4 { client_v4() } else { client_v6() }
    } else if v4 {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, rng.random()))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, rng.random()))
    };
    let dst = if choice < 8 {
        vip
    } else if v4 {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.random()))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, rng.random()))
    };
    let dport = if choice == 9 { rng.random() } else { port };
    let sport = rng.random_range(1024..65535);
    let mut f = if (proto == lb_common::PROTO_TCP) ^ (choice == 7) {
        Frame::tcp(src, sport, dst, dport)
    } else {
        Frame::udp(src, sport, dst, dport)
    };
    if let L4::Tcp { syn, .. } = &mut f.l4 {
        *syn = rng.random_bool(0.5);
    }
    f = f.macs(CLIENT_MAC, LB_CLIENT_MAC);
    f.ttl = rng.random_range(0..=255);
    if rng.random_bool(0.1) {
        f.vlan = Some(rng.random_range(1..4095));
    }
    if v4 && rng.random_bool(0.1) {
        let words = rng.random_range(1..=10);
        f.ipv4_options = vec![1; words * 4]; // NOPs
    }
    if v4 && proto == lb_common::PROTO_UDP && rng.random_bool(0.2) {
        f.udp_no_checksum = true;
    }
    let len = rng.random_range(0..200);
    f.payload = (0..len).map(|_| rng.random()).collect();
    f
}

/// Damages a frame's bytes in one of several ways.
fn mutate(rng: &mut StdRng, mut b: Vec<u8>) -> Vec<u8> {
    let ip = if b.get(12..14) == Some(&[0x81, 0x00]) {
        18
    } else {
        14
    };
    match rng.random_range(0..8) {
        0 => {
            let n = rng.random_range(ETH_HLEN..=b.len());
            b.truncate(n);
        }
        1 => {
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..b.len().min(ip + 60));
                b[i] = rng.random();
            }
        }
        2 if b.len() > ip => {
            // Bad IHL (0..4, or larger than the frame).
            b[ip] = (b[ip] & 0xf0) | rng.random_range(0..16);
        }
        3 if b.len() > ip + 8 && b[ip] >> 4 == 4 => {
            // Fragment bits and offsets.
            let v: u16 = rng.random::<u16>() & 0x3fff;
            b[ip + 6..ip + 8].copy_from_slice(&v.to_be_bytes());
            reseal_v4(&mut b, ip);
        }
        4 if b.len() > ip + 8 && b[ip] >> 4 == 6 => {
            // IPv6 extension headers / fragment header as next header.
            b[ip + 6] = *[0u8, 43, 44, 50, 51, 60, 58, 59].choose(rng).expect("list");
        }
        5 if b.len() > ip + 4 => {
            // IP length field lies.
            let v: u16 = rng.random();
            b[ip + 2..ip + 4].copy_from_slice(&v.to_be_bytes());
            if b[ip] >> 4 == 4 {
                reseal_v4(&mut b, ip);
            }
        }
        6 => {
            // Random bytes after the IP header start, checksums resealed for IPv4.
            let i = rng
                .random_range(ip..b.len().max(ip + 1))
                .min(b.len().saturating_sub(1));
            if !b.is_empty() {
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        _ => {
            let extra = rng.random_range(0..40);
            b.extend((0..extra).map(|_| rng.random::<u8>()));
        }
    }
    b
}

fn reseal_v4(b: &mut [u8], ip: usize) {
    let ihl = usize::from(b[ip] & 0x0f) * 4;
    if ihl < 20 || b.len() < ip + ihl {
        return;
    }
    b[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let c = lb_common::csum::checksum(&b[ip..ip + ihl], 0);
    b[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
}

#[test]
fn hundred_thousand_frames_keep_the_invariants() {
    let seed: u64 = std::env::var("XLB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x786c_6200);
    let router = Router::new("fuzz");
    let client_if = router.ns.ifindex("cl").expect("ifindex");
    let backend_if = router.ns.ifindex("bk").expect("ifindex");
    router
        .ns
        .run_in(|| {
            let mut dp = load_dataplane();
            let mut svcs = services();
            svcs.extend(reject_services());
            for s in &svcs {
                s.install(&mut dp);
            }
            let oracle = Oracle { services: svcs };
            let mut rng = StdRng::seed_from_u64(seed);
            let mut runs = 0u64;
            let mut translated = 0u64;
            let mut replies: Vec<Frame> = Vec::new();
            let run = |input: &[u8], ingress: u32, runs: &mut u64| -> Vec<u8> {
                let out = xdp::test_run(&dp, input, Some(ingress)).unwrap_or_else(|e| {
                    panic!("seed {seed}: test run failed on {input:02x?}: {e}")
                });
                *runs += 1;
                if let Err(why) = oracle.judge(input, out.action, &out.frame) {
                    panic!(
                        "seed {seed}: {why}\n  in: {input:02x?}\n out: {:02x?} (verdict {})",
                        out.frame, out.action
                    );
                }
                out.frame
            };

            // Every truncation length of a few base frames.
            let bases = [
                Frame::tcp(client_v4(), 40_000, vip_v4(), 80).syn(),
                Frame::udp(client_v4(), 40_000, vip_v4(), 53),
                Frame::tcp(client_v6(), 40_000, vip_v6(), 80),
                Frame::udp(client_v6(), 40_000, vip_v6(), 53),
            ];
            for base in &bases {
                let mut tagged = base.clone().macs(CLIENT_MAC, LB_CLIENT_MAC);
                for vlan in [None, Some(7)] {
                    tagged.vlan = vlan;
                    let bytes = tagged.build();
                    // The kernel's test run refuses frames shorter than an Ethernet
                    // header (no driver delivers one either).
                    for n in ETH_HLEN..=bytes.len() {
                        run(&bytes[..n], client_if, &mut runs);
                    }
                }
            }

            while runs < MIN_FRAMES {
                let f = random_frame(&mut rng, &oracle.services, &replies);
                let from_backend = f.src_mac != CLIENT_MAC;
                let ingress = if from_backend { backend_if } else { client_if };
                let mut bytes = f.build();
                if rng.random_bool(0.5) {
                    bytes = mutate(&mut rng, bytes);
                }
                let out = run(&bytes, ingress, &mut runs);
                if out != bytes {
                    translated += 1;
                }
                // Remember replies for flows that went to a backend, to exercise the
                // reverse path (with its own mutations next time round).
                if !from_backend
                    && out != bytes
                    && replies.len() < 4096
                    && let (Some((_, (bip, bport, _))), Some(svc)) = (
                        tuple(&out),
                        oracle.service_of_frontend(tuple(&bytes).expect("tuple").1),
                    )
                {
                    let n = match bip {
                        IpAddr::V4(v) => v.octets()[3],
                        IpAddr::V6(v) => v.octets()[15],
                    };
                    if svc.backends.iter().any(|b| b.1 == bip) {
                        replies.push(reply_from(&f, bip, bport, n));
                    }
                }
                if rng.next_u32() % 1000 == 0 {
                    replies.clear();
                }
            }
            assert!(runs >= MIN_FRAMES);
            // The generator is not degenerate: plenty of frames were translated.
            assert!(
                translated > runs / 10,
                "only {translated} of {runs} frames were translated"
            );
            let answered = answered(&dp);
            assert!(
                answered > runs / 50,
                "only {answered} of {runs} frames were answered by rejecting services"
            );
            eprintln!("{runs} frames, {translated} translated, {answered} answered, seed {seed}");
        })
        .expect("run in the router namespace");
}
