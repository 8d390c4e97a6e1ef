//! Packets in, packets out for DSR, run through `BPF_PROG_TEST_RUN` in a namespace that
//! plays the node (as `snat_fixtures.rs`): the receiving node's XDP program encapsulates
//! a flow for a remote backend (IPIP / IPv6-in-IPv6, the backend's port in the outer
//! header), the backend's node's tc ingress program decapsulates and translates it, and
//! its tc egress program gives the reply the frontend back. Expected frames are built
//! from fields (the outer header by hand, checksums from scratch). Needs root.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    BACKEND_F_LOCAL, Backend, FRONTEND_F_DSR, PROTO_TCP, REVNAT_F_DSR, Reason, csum,
    dsr::{DSR_OUTER_TTL, IPPROTO_IPIP, IPPROTO_IPV6},
    reason::{XDP_DROP, XDP_REDIRECT},
};
use lb_testbed::frames::{Frame, L4, verify_checksums};
use lb_testbed::node::*;
use lb_testbed::xdp;

/// tc verdicts.
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

struct Node {
    dp: lb_agent::dataplane::Dataplane,
    client_if: u32,
}

impl Node {
    fn reason(&self, reason: Reason) -> u64 {
        reason_packets(&self.dp, reason)
    }
}

/// A fresh node with the standard services in DSR mode and its addresses configured.
fn with_node(tag: &str, body: impl FnOnce(&mut Node, &[Service]) + Send) {
    let router = Router::new(tag);
    let client_if = router.ns.ifindex("cl").expect("ifindex");
    router
        .ns
        .run_in(|| {
            let mut node = Node {
                dp: load_dataplane(),
                client_if,
            };
            node.dp
                .set_snat_config(&node_config(61_000, 65_535))
                .expect("node addresses");
            let mut svcs = services();
            for s in &mut svcs {
                s.flags |= FRONTEND_F_DSR;
                s.install(&mut node.dp);
            }
            body(&mut node, &svcs);
        })
        .expect("run in the router namespace");
}

/// The first client frame (from source port `sport` on) whose flow Maglev sends to a
/// backend whose MAC the node knows, with that backend and its port.
fn client_frame(svc: &Service, mut sport: u16, syn: bool) -> (Frame, IpAddr, u16) {
    loop {
        let (vip, port, proto) = svc.frontend;
        let src = if vip.is_ipv4() {
            client_v4()
        } else {
            client_v6()
        };
        let mut f = if proto == PROTO_TCP {
            Frame::tcp(src, sport, vip, port)
        } else {
            Frame::udp(src, sport, vip, port)
        };
        if syn {
            f = f.syn();
        }
        f.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        let f = f.macs(CLIENT_MAC, LB_CLIENT_MAC);
        let (_, backend, bport) = svc.expected_backend(&f);
        if RESOLVED_BACKENDS.contains(&last_octet(backend)) {
            return (f, backend, bport);
        }
        sport += 1;
    }
}

/// `inner` (untouched, its MACs replaced) inside the outer header from `node` to
/// `backend` carrying `bport`, between the MACs `(src, dst)`.
fn encapsulated(
    inner: &Frame,
    node: IpAddr,
    backend: IpAddr,
    bport: u16,
    macs: ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    let bytes = inner.build();
    let ip = &bytes[14..];
    let mut out = Vec::new();
    out.extend_from_slice(&macs.1);
    out.extend_from_slice(&macs.0);
    out.extend_from_slice(&bytes[12..14]);
    let len = u16::try_from(ip.len()).expect("short");
    match (node, backend) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut hdr = vec![0x45, ip[1]];
            hdr.extend_from_slice(&(len + 20).to_be_bytes());
            hdr.extend_from_slice(&bport.to_be_bytes());
            hdr.extend_from_slice(&[0x40, 0, DSR_OUTER_TTL, IPPROTO_IPIP, 0, 0]);
            hdr.extend_from_slice(&s.octets());
            hdr.extend_from_slice(&d.octets());
            let check = csum::checksum(&hdr, 0);
            hdr[10..12].copy_from_slice(&check.to_be_bytes());
            out.extend_from_slice(&hdr);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            // Traffic class copied, flow label = the port.
            let tc = (ip[0] << 4) | (ip[1] >> 4);
            out.extend_from_slice(&[0x60 | (tc >> 4), tc << 4]);
            out.extend_from_slice(&bport.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[IPPROTO_IPV6, DSR_OUTER_TTL]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => panic!("families differ"),
    }
    out.extend_from_slice(ip);
    out
}

/// One service's flow through both nodes: encapsulated by the receiving node (a new
/// flow and a later packet of it alike), decapsulated and translated by the backend's
/// node, its reply given the frontend back there.
fn round_trip(node: &Node, svc: &Service, sport: u16, what: &str) {
    let (f, backend, bport) = client_frame(svc, sport, true);
    let n = last_octet(backend);
    let macs = (LB_BACKEND_MAC, backend_mac(n));
    let want = encapsulated(&f, node_addr_for(backend), backend, bport, macs);
    for (packet, frame) in [
        ("new flow", f.clone()),
        ("established", f.clone().established()),
    ] {
        let want = encapsulated(&frame, node_addr_for(backend), backend, bport, macs);
        let out = xdp::test_run(&node.dp, &frame.build(), Some(node.client_if))
            .unwrap_or_else(|e| panic!("{what} {packet}: {e}"));
        assert_eq!(out.action, XDP_REDIRECT, "{what} {packet}: verdict");
        assert!(
            out.frame == want,
            "{what} {packet}: encapsulation differs\n got: {:02x?}\nwant: {want:02x?}",
            out.frame
        );
    }
    assert!(
        node.dp
            .rev_nat(&flow_key(&reply_from(&f, backend, bport, n)))
            .expect("map")
            .is_none(),
        "{what}: the receiving node keeps no reply translation"
    );

    // At the backend's node (this namespace plays it too): the tc ingress program.
    let before = node.reason(Reason::DsrDelivered);
    let arrived = want;
    let out = xdp::test_run_ingress(&node.dp, &arrived).expect("tc ingress run");
    assert_eq!(out.action, TC_ACT_OK, "{what}: delivered");
    let mut delivered = dnat(&f, backend, bport, macs);
    delivered.ttl = f.ttl;
    assert!(
        out.frame == delivered.build(),
        "{what}: decapsulation differs\n got: {:02x?}\nwant: {:02x?}",
        out.frame,
        delivered.build()
    );
    verify_checksums(&out.frame).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        node.reason(Reason::DsrDelivered),
        before + 1,
        "{what}: counted"
    );
    let reply = reply_from(&f, backend, bport, n);
    let rev = node
        .dp
        .rev_nat(&flow_key(&reply))
        .expect("map")
        .expect("the backend's node remembers the reply translation");
    assert_eq!(rev.addr, addr16(svc.frontend.0), "{what}");
    assert_eq!(rev.port, svc.frontend.1.to_be(), "{what}");
    assert_eq!(rev.flags, REVNAT_F_DSR, "{what}");
    assert_eq!(rev.service_id, svc.id, "{what}: this node has the frontend");

    // The pod's reply leaves with the frontend as its source, to the client directly.
    let out = xdp::test_run_egress(&node.dp, &reply.build()).expect("egress run");
    let mut back = reply.clone();
    back.src = svc.frontend.0;
    let (_, dport) = reply.ports();
    back.set_ports(svc.frontend.1, dport);
    assert!(out.frame == back.build(), "{what}: reply differs");
    verify_checksums(&out.frame).unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn dsr_encapsulates_decapsulates_and_translates_replies() {
    with_node("dsr", |node, svcs| {
        round_trip(node, &svcs[0], 40_001, "IPv4 TCP");
        round_trip(node, &svcs[1], 40_101, "IPv4 UDP");
        round_trip(node, &svcs[2], 40_201, "IPv6 TCP");
        round_trip(node, &svcs[3], 40_301, "IPv6 UDP");
    });
}

#[test]
fn local_backends_are_not_encapsulated_and_strangers_are_not_decapsulated() {
    with_node("dsrlocal", |node, svcs| {
        // Every backend of service 1 on this node: DNAT, as without DSR.
        for (id, ip, port) in &svcs[0].backends {
            node.dp
                .set_backend(
                    *id,
                    Backend {
                        addr: addr16(*ip),
                        port: port.to_be(),
                        family: lb_common::FAMILY_V4,
                        flags: BACKEND_F_LOCAL,
                        service_id: 1,
                    },
                )
                .expect("backend");
        }
        let (f, backend, bport) = client_frame(&svcs[0], 41_001, true);
        let macs = (LB_BACKEND_MAC, backend_mac(last_octet(backend)));
        let out = xdp::test_run(&node.dp, &f.build(), Some(node.client_if)).expect("run");
        assert_eq!(out.action, XDP_REDIRECT);
        assert!(
            out.frame == dnat(&f, backend, bport, macs).build(),
            "plain DNAT"
        );

        // IPIP to an address that is no backend: left to the kernel untouched.
        let (g, _, _) = client_frame(&svcs[1], 41_101, false);
        let stranger = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
        let tunnel = encapsulated(&g, node_v4(), stranger, 5353, macs);
        let out = xdp::test_run_ingress(&node.dp, &tunnel).expect("tc ingress run");
        assert_eq!(out.action, TC_ACT_OK);
        assert_eq!(out.frame, tunnel, "untouched");

        // IPIP to a backend whose inner packet is cut short: dropped, counted.
        let (h, backend, bport) = client_frame(&svcs[1], 41_201, false);
        let mut cut = encapsulated(&h, node_v4(), backend, bport, macs);
        cut.truncate(14 + 20 + 20 + 4);
        // The outer length says what is left, the inner one more.
        let outer_len = u16::try_from(cut.len() - 14).expect("short");
        cut[16..18].copy_from_slice(&outer_len.to_be_bytes());
        cut[24..26].copy_from_slice(&[0, 0]);
        let check = csum::checksum(&cut[14..34], 0);
        cut[24..26].copy_from_slice(&check.to_be_bytes());
        let before = node.reason(Reason::DropDsrMalformed);
        let out = xdp::test_run_ingress(&node.dp, &cut).expect("tc ingress run");
        assert_eq!(out.action, TC_ACT_SHOT, "dropped");
        assert_eq!(node.reason(Reason::DropDsrMalformed), before + 1, "counted");
    });
}

/// `frame` (TCP, a 4-byte payload) as a SYN-ACK whose payload is its MSS option.
fn syn_ack_with_mss(frame: &Frame, mss: u16) -> Vec<u8> {
    let mut f = frame.clone();
    let [hi, lo] = mss.to_be_bytes();
    f.payload = vec![2, 4, hi, lo];
    if let L4::Tcp { syn, .. } = &mut f.l4 {
        *syn = true;
    }
    let mut bytes = f.build();
    let l4 = if f.src.is_ipv4() { 14 + 20 } else { 14 + 40 };
    let old = u16::from_be_bytes([bytes[l4 + 12], bytes[l4 + 13]]);
    // Data offset 6 (the option), SYN and ACK.
    bytes[l4 + 12] = 0x60;
    bytes[l4 + 13] |= 0x12;
    let new = u16::from_be_bytes([bytes[l4 + 12], bytes[l4 + 13]]);
    let mut d = csum::CsumDelta::new();
    d.replace_u16(old, new);
    let check = d.apply(u16::from_be_bytes([bytes[l4 + 16], bytes[l4 + 17]]));
    bytes[l4 + 16..l4 + 18].copy_from_slice(&check.to_be_bytes());
    verify_checksums(&bytes).expect("a well-formed SYN-ACK");
    bytes
}

/// A DSR flow's SYN-ACK leaves with its MSS clamped to what fits the device's MTU once
/// the client's segments are encapsulated (IPv4: 1500 - 20 - 40; IPv6: 1500 - 40 - 60);
/// a smaller one and other flows' are left alone.
#[test]
fn dsr_syn_acks_get_the_mss_that_fits_encapsulated() {
    with_node("dsrmss", |node, svcs| {
        // The device the test runs see as the socket buffer's.
        let lo = std::process::Command::new("ip")
            .args(["link", "set", "lo", "mtu", "1500"])
            .status()
            .expect("ip");
        assert!(lo.success(), "lo mtu");
        for (svc, sport, clamped) in [(&svcs[0], 45_001, 1440), (&svcs[2], 45_101, 1400)] {
            let (f, backend, bport) = client_frame(svc, sport, true);
            let n = last_octet(backend);
            let macs = (LB_BACKEND_MAC, backend_mac(n));
            let tunnel = encapsulated(&f, node_addr_for(backend), backend, bport, macs);
            let out = xdp::test_run_ingress(&node.dp, &tunnel).expect("tc ingress run");
            assert_eq!(out.action, TC_ACT_OK);
            let reply = reply_from(&f, backend, bport, n);
            let l4 = if f.src.is_ipv4() { 14 + 20 } else { 14 + 40 };
            for (announced, want) in [(1460, clamped), (1200, 1200)] {
                let syn_ack = syn_ack_with_mss(&reply, announced);
                let out = xdp::test_run_egress(&node.dp, &syn_ack).expect("egress run");
                assert_eq!(out.action, TC_ACT_OK);
                verify_checksums(&out.frame).expect("checksums");
                let mss = u16::from_be_bytes([out.frame[l4 + 22], out.frame[l4 + 23]]);
                assert_eq!(mss, want, "{:?} MSS {announced}", svc.frontend);
                assert_eq!(
                    out.frame[l4..l4 + 2],
                    svc.frontend.1.to_be_bytes(),
                    "translated"
                );
            }
        }
        // A local backend's flow (not DSR) keeps its MSS.
        let (f, backend, bport) = client_frame(&svcs[0], 45_201, true);
        let mut plain = Service::new(svcs[0].id, svcs[0].frontend, svcs[0].backends.clone());
        plain.flags = 0;
        plain.install(&mut node.dp);
        let out = xdp::test_run(&node.dp, &f.build(), Some(node.client_if)).expect("run");
        assert_eq!(out.action, XDP_REDIRECT);
        let reply = reply_from(&f, backend, bport, last_octet(backend));
        let out = xdp::test_run_egress(&node.dp, &syn_ack_with_mss(&reply, 1460)).expect("egress");
        assert_eq!(u16::from_be_bytes([out.frame[56], out.frame[57]]), 1460);
    });
}

/// The client reuses a source port towards another frontend of the same pod (another
/// Service, or the same one's NodePort): the backend's node must give the new flow's
/// replies the new frontend, not keep the reply translation the earlier flow left.
#[test]
fn a_reused_client_port_towards_another_frontend_gets_that_frontend_back() {
    with_node("dsr-reuse", |node, svcs| {
        let first = &svcs[0];
        let mut second = Service::new(
            90,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 90)), 80, PROTO_TCP),
            first
                .backends
                .iter()
                .map(|(id, ip, port)| (id + 900, *ip, *port))
                .collect(),
        );
        second.flags |= FRONTEND_F_DSR;
        second.install(&mut node.dp);

        let (f, backend, bport) = client_frame(first, 41_001, true);
        let macs = (LB_BACKEND_MAC, backend_mac(last_octet(backend)));
        let (sport, _) = f.ports();
        let mut g = f.clone();
        g.dst = second.frontend.0;
        g.set_ports(sport, second.frontend.1);
        let reply = reply_from(&f, backend, bport, last_octet(backend));
        for (what, frame, svc) in [("first", &f, first), ("second", &g, &second)] {
            let arrived = encapsulated(frame, node_addr_for(backend), backend, bport, macs);
            let out = xdp::test_run_ingress(&node.dp, &arrived).expect("tc ingress run");
            assert_eq!(out.action, TC_ACT_OK, "{what}: delivered");
            let out = xdp::test_run_egress(&node.dp, &reply.build()).expect("egress run");
            let mut back = reply.clone();
            back.src = svc.frontend.0;
            let (_, dport) = reply.ports();
            back.set_ports(svc.frontend.1, dport);
            assert!(
                out.frame == back.build(),
                "{what} flow's reply differs\n got: {:02x?}\nwant: {:02x?}",
                out.frame,
                back.build()
            );
        }
    });
}

/// A kept flow keeps the mode it was forwarded in when its service turns DSR: its SYN
/// again (its frontend looked up anew) is translated as before, not encapsulated, and
/// is no new flow; a new connection is encapsulated.
#[test]
fn a_kept_flows_syn_keeps_its_mode_when_the_service_turns_dsr() {
    with_node("dsr-mode", |node, svcs| {
        let mut svc = Service::new(
            91,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 91)), 80, PROTO_TCP),
            svcs[0]
                .backends
                .iter()
                .map(|(id, ip, port)| (id + 910, *ip, *port))
                .collect(),
        );
        svc.install(&mut node.dp);
        let (f, backend, bport) = client_frame(&svc, 41_200, true);
        let macs = (LB_BACKEND_MAC, backend_mac(last_octet(backend)));
        let translated = dnat(&f, backend, bport, macs).build();
        let new_flows = |node: &Node| node.dp.service_stats(91).expect("service stats").new_flows;

        let out = xdp::test_run(&node.dp, &f.build(), Some(node.client_if)).expect("run");
        assert_eq!(out.action, XDP_REDIRECT, "first SYN forwarded");
        assert!(out.frame == translated, "first SYN translated");

        svc.flags |= FRONTEND_F_DSR;
        svc.install(&mut node.dp);
        let before = new_flows(node);
        let out = xdp::test_run(&node.dp, &f.build(), Some(node.client_if)).expect("run");
        assert_eq!(out.action, XDP_REDIRECT, "its SYN again forwarded");
        assert!(
            out.frame == translated,
            "its SYN again translated as before, not encapsulated"
        );
        assert_eq!(new_flows(node), before, "the flow is kept, not new");

        let (g, backend, bport) = client_frame(&svc, 42_200, true);
        let macs = (LB_BACKEND_MAC, backend_mac(last_octet(backend)));
        let out = xdp::test_run(&node.dp, &g.build(), Some(node.client_if)).expect("run");
        assert_eq!(out.action, XDP_REDIRECT, "a new connection forwarded");
        assert!(
            out.frame == encapsulated(&g, node_addr_for(backend), backend, bport, macs),
            "a new connection encapsulated"
        );
    });
}

/// What the node must send back for `client` (whole, as the client sent it), too big to
/// encapsulate for a next hop of `mtu`: ICMP "fragmentation needed" / `ICMPv6` "packet
/// too big" from the frontend to the client, advertising `mtu` less the outer header,
/// quoting the client's IP header and the 8 bytes after it; back to the client's MAC.
fn too_big_answer(client: &[u8], mtu: u16) -> Vec<u8> {
    let ip = &client[14..];
    let v4 = ip[0] >> 4 == 4;
    let mut out = Vec::new();
    out.extend_from_slice(&client[6..12]);
    out.extend_from_slice(&client[0..6]);
    out.extend_from_slice(&client[12..14]);
    if v4 {
        let quote = &ip[..28];
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&(mtu - 20).to_be_bytes());
        icmp.extend_from_slice(quote);
        let check = csum::checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        let len = u16::try_from(20 + icmp.len()).expect("short");
        let mut hdr = vec![0x45, 0];
        hdr.extend_from_slice(&len.to_be_bytes());
        hdr.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
        hdr.extend_from_slice(&ip[16..20]);
        hdr.extend_from_slice(&ip[12..16]);
        let check = csum::checksum(&hdr, 0);
        hdr[10..12].copy_from_slice(&check.to_be_bytes());
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&icmp);
    } else {
        let quote = &ip[..48];
        let mut icmp = vec![2, 0, 0, 0];
        icmp.extend_from_slice(&u32::from(mtu - 40).to_be_bytes());
        icmp.extend_from_slice(quote);
        let len = u16::try_from(icmp.len()).expect("short");
        let (src, dst) = (&ip[24..40], &ip[8..24]);
        let mut pseudo = src.to_vec();
        pseudo.extend_from_slice(dst);
        pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&icmp);
        let check = csum::checksum(&pseudo, 0);
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[58, 64]);
        out.extend_from_slice(src);
        out.extend_from_slice(dst);
        out.extend_from_slice(&icmp);
    }
    out
}

/// A client frame of `svc` whose IP packet is `ip_len` bytes long.
fn sized_frame(svc: &Service, sport: u16, ip_len: usize) -> (Frame, IpAddr, u16) {
    let (mut f, _, _) = client_frame(svc, sport, false);
    let headers =
        if f.src.is_ipv4() { 20 } else { 40 } + if svc.frontend.2 == PROTO_TCP { 20 } else { 8 };
    f.payload = vec![b'x'; ip_len - headers];
    let (_, backend, bport) = svc.expected_backend(&f);
    (f, backend, bport)
}

/// A client's packet that fits the 1500-byte link to the backends only without the
/// outer header: answered with ICMP "fragmentation needed" (IPv4, DF set) or `ICMPv6`
/// "packet too big" advertising 1480 / 1460, quoting it, from the frontend, back out of
/// the client's interface (`dsr_icmp_too_big`); one byte less is encapsulated as usual.
/// IPv4 without DF is dropped (`drop_dsr_too_big`).
#[test]
fn dsr_packets_too_big_to_encapsulate_get_an_icmp_error() {
    with_node("dsr-toobig", |node, svcs| {
        for (svc, sport) in [
            (&svcs[0], 46_001),
            (&svcs[1], 46_101),
            (&svcs[2], 46_201),
            (&svcs[3], 46_301),
        ] {
            let what = format!("{:?}", svc.frontend);
            let overhead = if svc.frontend.0.is_ipv4() { 20 } else { 40 };
            // Fits: encapsulated to exactly the link's MTU.
            let (f, backend, bport) = sized_frame(svc, sport, 1500 - overhead);
            let macs = (LB_BACKEND_MAC, backend_mac(last_octet(backend)));
            let out = xdp::test_run(&node.dp, &f.build(), Some(node.client_if))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(out.action, XDP_REDIRECT, "{what}: fits");
            assert!(
                out.frame == encapsulated(&f, node_addr_for(backend), backend, bport, macs),
                "{what}: encapsulated"
            );

            // One byte more each: too big once encapsulated.
            let (g, _, _) = sized_frame(svc, sport + 1, 1500);
            let bytes = g.build();
            let before = node.reason(Reason::DsrIcmpTooBig);
            let out = xdp::test_run(&node.dp, &bytes, Some(node.client_if))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(out.action, XDP_REDIRECT, "{what}: answered");
            let want = too_big_answer(&bytes, 1500);
            assert!(
                out.frame == want,
                "{what}: answer differs\n got: {:02x?}\nwant: {want:02x?}",
                out.frame
            );
            verify_checksums(&out.frame).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(node.reason(Reason::DsrIcmpTooBig), before + 1, "{what}");

            if svc.frontend.0.is_ipv4() {
                // Without "don't fragment": dropped, counted.
                let mut no_df = bytes.clone();
                no_df[20] &= !0x40;
                no_df[24..26].copy_from_slice(&[0, 0]);
                let check = csum::checksum(&no_df[14..34], 0);
                no_df[24..26].copy_from_slice(&check.to_be_bytes());
                let before = node.reason(Reason::DropDsrTooBig);
                let out = xdp::test_run(&node.dp, &no_df, Some(node.client_if))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(out.action, XDP_DROP, "{what}: no DF");
                assert_eq!(node.reason(Reason::DropDsrTooBig), before + 1, "{what}");
            }
        }
    });
}
