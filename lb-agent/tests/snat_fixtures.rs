//! Packets in, packets out for SNAT mode, local backends, devices outside the devmap and
//! the tc egress program, run through `BPF_PROG_TEST_RUN` in a namespace that plays the
//! node (as `packet_fixtures.rs`). Expected frames are rebuilt from fields by etherparse
//! (checksums from scratch), and the SNAT port is predicted by the same function the
//! program uses (`lb_common::snat::snat_port` over the flow hash). Needs root.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    BACKEND_F_LOCAL, Backend, FAMILY_V4, FRONTEND_F_SNAT, PROTO_TCP, Reason,
    SNAT_STATE_BACKEND_WAITS, SNAT_STATE_CLOSING, SNAT_STATE_FIN_BACKEND, SNAT_STATE_FIN_CLIENT,
    SNAT_STATE_RESET, SnatEntry, hash,
    reason::{XDP_DROP, XDP_PASS, XDP_REDIRECT},
    snat::{SNAT_TCP_CLOSED_NS, SNAT_UDP_IDLE_NS, snat_port},
};
use lb_testbed::frames::{Frame, verify_checksums};
use lb_testbed::node::*;
use lb_testbed::xdp;

/// A pod behind a device of the node that is not in the devmap (`pd`).
fn pod_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 201))
}
const POD_MAC: &str = "02:00:00:00:03:01";
const PORT_MIN: u16 = 61_000;
const PORT_MAX: u16 = 65_535;
const TO_CLIENT: ([u8; 6], [u8; 6]) = (LB_CLIENT_MAC, CLIENT_MAC);

struct Node {
    dp: lb_agent::dataplane::Dataplane,
    client_if: u32,
    backend_if: u32,
}

impl Node {
    fn run(&self, what: &str, frame: &Frame, from_client: bool) -> (u32, Vec<u8>) {
        let ingress = if from_client {
            self.client_if
        } else {
            self.backend_if
        };
        let out = xdp::test_run(&self.dp, &frame.build(), Some(ingress))
            .unwrap_or_else(|e| panic!("{what}: test run failed: {e}"));
        (out.action, out.frame)
    }

    /// Runs `frame`; the verdict and the output must be `action` and `want`.
    fn check(&self, what: &str, frame: &Frame, from_client: bool, action: u32, want: &Frame) {
        let (got, out) = self.run(what, frame, from_client);
        assert_eq!(got, action, "{what}: verdict");
        assert!(
            out == want.build(),
            "{what}: output differs\n got: {out:02x?}\nwant: {:02x?}",
            want.build()
        );
        verify_checksums(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    fn reason(&self, reason: Reason) -> u64 {
        reason_packets(&self.dp, reason)
    }

    fn configure(&mut self, port_min: u16, port_max: u16) {
        self.dp
            .set_snat_config(&node_config(port_min, port_max))
            .expect("snat config");
    }
}

/// Services of the SNAT fixtures: the standard ones, each frontend with `FRONTEND_F_SNAT`.
fn snat_services() -> Vec<Service> {
    let mut svcs = services();
    for s in &mut svcs {
        s.flags |= FRONTEND_F_SNAT;
    }
    svcs
}

/// A fresh node with the SNAT services installed and the default port range.
fn with_node(tag: &str, body: impl FnOnce(&mut Node, &mut Vec<Service>) + Send) {
    let router = Router::new(tag);
    let client_if = router.ns.ifindex("cl").expect("ifindex");
    let backend_if = router.ns.ifindex("bk").expect("ifindex");
    // A pod's veth: routed, its neighbour known, but not a redirect port.
    for cmd in [
        "link add pd type veth peer name pdp",
        "link set pd up",
        "link set pdp up",
        "route add 192.0.2.200/29 dev pd",
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        router.ns.ip(&args).expect("pod veth");
    }
    router
        .ns
        .ip(&[
            "neigh",
            "replace",
            &pod_v4().to_string(),
            "lladdr",
            POD_MAC,
            "dev",
            "pd",
            "nud",
            "permanent",
        ])
        .expect("pod neighbour");
    router
        .ns
        .run_in(|| {
            let mut node = Node {
                dp: load_dataplane(),
                client_if,
                backend_if,
            };
            node.configure(PORT_MIN, PORT_MAX);
            let mut svcs = snat_services();
            for s in &svcs {
                s.install(&mut node.dp);
            }
            body(&mut node, &mut svcs);
        })
        .expect("run in the router namespace");
}

fn client_frame(svc: &Service, sport: u16) -> Frame {
    let (vip, port, proto) = svc.frontend;
    let src = if vip.is_ipv4() {
        client_v4()
    } else {
        client_v6()
    };
    let f = if proto == PROTO_TCP {
        Frame::tcp(src, sport, vip, port).syn()
    } else {
        Frame::udp(src, sport, vip, port)
    };
    f.macs(CLIENT_MAC, LB_CLIENT_MAC)
}

fn node_of(frame: &Frame) -> IpAddr {
    node_addr_for(frame.src)
}

/// The port attempt `attempt` gives the client flow `frame` in `min..=max`.
fn predicted_port(frame: &Frame, attempt: u32, min: u16, max: u16) -> u16 {
    snat_port(hash::flow_hash(&flow_key(frame)), attempt, min, max)
}

/// The source MAC of a frame XDP hands to the tc ingress program: "xl", then the
/// egress ifindex.
fn handoff_mac(ifindex: u32) -> [u8; 6] {
    let i = ifindex.to_be_bytes();
    [b'x', b'l', i[0], i[1], i[2], i[3]]
}

/// `frame` after SNAT to node:`nat_port` and DNAT to backend:`port`, towards the backend.
fn snat_out(frame: &Frame, backend: IpAddr, port: u16, nat_port: u16) -> Frame {
    let mut out = dnat(
        frame,
        backend,
        port,
        (LB_BACKEND_MAC, backend_mac(last_octet(backend))),
    );
    out.src = node_of(frame);
    out.set_ports(nat_port, port);
    out
}

/// The backend's reply to the source-NATed `out`.
fn reply_to(out: &Frame) -> Frame {
    let (sport, dport) = out.ports();
    let mut r = out.clone().established();
    r.src = out.dst;
    r.dst = out.src;
    r.set_ports(dport, sport);
    r.ttl = 64;
    r.payload = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    r.macs(backend_mac(last_octet(out.dst)), LB_BACKEND_MAC)
}

/// The reply as the client must get it: from the frontend, to the client's own port.
fn reply_back(reply: &Frame, client: &Frame) -> Frame {
    let mut want = reply.clone();
    want.src = client.dst;
    want.dst = client.src;
    let (cport, vport) = client.ports();
    want.set_ports(vport, cport);
    want.ttl -= 1;
    want.src_mac = TO_CLIENT.0;
    want.dst_mac = TO_CLIENT.1;
    want
}

/// A new source-NATed flow, the same flow again, and the reply, for one service.
fn snat_round_trip(node: &Node, svc: &Service, sport: u16, what: &str) -> u16 {
    let f = client_frame(svc, sport);
    let (_, backend, bport) = svc.expected_backend(&f);
    let nat_port = predicted_port(&f, 0, PORT_MIN, PORT_MAX);
    let out = snat_out(&f, backend, bport, nat_port);
    node.check(what, &f, true, XDP_REDIRECT, &out);
    let tracked = node
        .dp
        .flow(&flow_key(&f))
        .expect("conntrack")
        .expect("tracked");
    assert_eq!(
        tracked.nat_port,
        nat_port.to_be(),
        "{what}: conntrack names the port"
    );
    let entry = node
        .dp
        .snat_entry(&flow_key(&reply_to(&out)))
        .expect("snat map")
        .expect("reservation");
    assert_eq!(entry.client, addr16(f.src), "{what}: reservation's client");
    assert_eq!(entry.client_port, sport.to_be());
    assert_eq!(entry.service_id, svc.id);

    let mut again = f.clone().established();
    again.payload = b"more".to_vec();
    node.check(
        what,
        &again,
        true,
        XDP_REDIRECT,
        &snat_out(&again, backend, bport, nat_port),
    );

    let reply = reply_to(&out);
    node.check(what, &reply, false, XDP_REDIRECT, &reply_back(&reply, &f));
    nat_port
}

#[test]
fn snat_forward_and_reply_ipv4_ipv6_tcp_udp() {
    with_node("snat", |node, svcs| {
        let before = node.dp.service_stats(1).expect("stats").reply_packets;
        snat_round_trip(node, &svcs[0], 40_001, "IPv4 TCP, SNAT");
        assert_eq!(
            node.dp.service_stats(1).expect("stats").reply_packets,
            before + 1,
            "the reply is counted for the service"
        );
        snat_round_trip(node, &svcs[1], 40_002, "IPv4 UDP, SNAT");
        snat_round_trip(node, &svcs[2], 40_003, "IPv6 TCP, SNAT");
        snat_round_trip(node, &svcs[3], 40_004, "IPv6 UDP, SNAT");

        // A packet to the node's address on a SNAT port that no flow holds: untouched.
        let stray = Frame::tcp(backend_v4(11), 8080, node_v4(), 61_234)
            .macs(backend_mac(11), LB_BACKEND_MAC);
        let (action, out) = node.run("unknown SNAT port", &stray, false);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, stray.build());
    });
}

/// One client port to two source-NATed frontends whose flows reach the same backend:
/// the backend sees two connections (two SNAT ports), so both flows keep their own
/// state (the second in the `CONNTRACK`/`REVNAT` pair), and neither is taken for a new
/// flow again.
#[test]
fn one_client_port_two_snat_frontends_one_backend() {
    with_node("snat2fe", |node, svcs| {
        let a = &svcs[0];
        let fa = client_frame(a, 40_700);
        let (_, backend, bport) = a.expected_backend(&fa);
        let mut b = Service::new(8, (vip_v4(), 8081, PROTO_TCP), vec![(81, backend, bport)]);
        b.flags |= FRONTEND_F_SNAT;
        b.install(&mut node.dp);
        let port_a = snat_round_trip(node, a, 40_700, "first frontend");
        let port_b = snat_round_trip(node, &b, 40_700, "second frontend, same backend");
        assert_ne!(port_a, port_b, "two connections at the backend");
        for (svc, port) in [(a, port_a), (&b, port_b)] {
            let mut again = client_frame(svc, 40_700).established();
            again.payload = b"both at once".to_vec();
            let before = node.dp.service_stats(svc.id).expect("stats").new_flows;
            node.check(
                "each flow keeps its port",
                &again,
                true,
                XDP_REDIRECT,
                &snat_out(&again, backend, bport, port),
            );
            assert_eq!(
                node.dp.service_stats(svc.id).expect("stats").new_flows,
                before,
                "{:?}: still the same flow",
                svc.frontend
            );
        }
    });
}

#[test]
fn a_taken_port_makes_the_flow_take_the_next_one() {
    with_node("snatcoll", |node, svcs| {
        let f = client_frame(&svcs[0], 42_001);
        let (_, backend, bport) = svcs[0].expected_backend(&f);
        let first = predicted_port(&f, 0, PORT_MIN, PORT_MAX);
        // Another client's fresh flow holds the first port towards that backend.
        let other = reply_to(&snat_out(&f, backend, bport, first));
        let now = coarse_now_ns();
        node.dp
            .set_snat_entry(
                &flow_key(&other),
                &SnatEntry {
                    client: addr16(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 3))),
                    frontend: addr16(vip_v4()),
                    client_port: 50_000u16.to_be(),
                    frontend_port: 80u16.to_be(),
                    family: FAMILY_V4,
                    service_id: 1,
                    last_seen_ns: now,
                    ..SnatEntry::default()
                },
            )
            .expect("reservation");
        let second = predicted_port(&f, 1, PORT_MIN, PORT_MAX);
        assert_ne!(first, second);
        node.check(
            "collision",
            &f,
            true,
            XDP_REDIRECT,
            &snat_out(&f, backend, bport, second),
        );
        // The other client's reservation is untouched.
        let held = node
            .dp
            .snat_entry(&flow_key(&other))
            .expect("map")
            .expect("still there");
        assert_eq!(held.client_port, 50_000u16.to_be());

        // A stale reservation (UDP, idle longer than its timeout) is taken over.
        let u = client_frame(&svcs[1], 42_002);
        let (_, ubackend, ubport) = svcs[1].expected_backend(&u);
        let ufirst = predicted_port(&u, 0, PORT_MIN, PORT_MAX);
        let stale = reply_to(&snat_out(&u, ubackend, ubport, ufirst));
        node.dp
            .set_snat_entry(
                &flow_key(&stale),
                &SnatEntry {
                    client: addr16(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 3))),
                    frontend: addr16(vip_v4()),
                    client_port: 50_001u16.to_be(),
                    frontend_port: 53u16.to_be(),
                    family: FAMILY_V4,
                    service_id: 2,
                    last_seen_ns: now.saturating_sub(SNAT_UDP_IDLE_NS + 5_000_000_000),
                    ..SnatEntry::default()
                },
            )
            .expect("stale reservation");
        node.check(
            "stale reservation taken over",
            &u,
            true,
            XDP_REDIRECT,
            &snat_out(&u, ubackend, ubport, ufirst),
        );
        let taken = node
            .dp
            .snat_entry(&flow_key(&stale))
            .expect("map")
            .expect("entry");
        assert_eq!(taken.client_port, 42_002u16.to_be(), "now this flow's");
    });
}

#[test]
fn exhaustion_is_dropped_and_counted_while_other_backends_and_services_work() {
    with_node("snatfull", |node, svcs| {
        // Two ports only.
        node.configure(PORT_MIN, PORT_MIN + 1);
        // Service 6 has one backend: every flow goes to it.
        let svc = &svcs[5];
        let mut held = Vec::new();
        let mut sport = 43_000;
        while held.len() < 2 {
            let mut f = client_frame(svc, sport);
            // The second comes in tagged (VLAN 100): its tag's ID becomes the mark, so
            // the hand-off frame is the same as the untagged one's.
            if !held.is_empty() {
                f.vlan = Some(100);
            }
            sport += 1;
            let (action, out) = node.run("filling the range", &f, true);
            // Backend 13 has no neighbour entry: translated, then handed to the tc
            // ingress program by the mark (`handoff`): the frame keeps its destination
            // MAC, carries "xl" and the egress ifindex as its source MAC, and is tagged
            // with the reserved VLAN ID 4095.
            assert_eq!(action, XDP_PASS, "flow {sport} gets a port");
            // Ethernet, the tag, IPv4 without options: the TCP source port at 18 + 20.
            let port = u16::from_be_bytes([out[38], out[39]]);
            let mut want = snat_out(&f, backend_v4(13), 8080, port);
            want.dst_mac = f.dst_mac;
            want.src_mac = handoff_mac(node.backend_if);
            want.vlan = Some(4095);
            assert!(
                out == want.build(),
                "flow {sport}: hand-off frame differs\n got: {out:02x?}\nwant: {:02x?}",
                want.build()
            );
            verify_checksums(&out).expect("checksums");
            held.push(port);
        }
        held.sort_unstable();
        assert_eq!(held, vec![PORT_MIN, PORT_MIN + 1], "both ports in use");
        let before = node.reason(Reason::DropSnatExhausted);
        let f = client_frame(svc, 43_100);
        let (action, out) = node.run("range exhausted", &f, true);
        assert_eq!(action, XDP_DROP, "no port left for backend 13");
        assert_eq!(out, f.build(), "dropped untouched");
        assert_eq!(
            node.reason(Reason::DropSnatExhausted),
            before + 1,
            "counted"
        );
        assert!(
            node.dp.flow(&flow_key(&f)).expect("conntrack").is_none(),
            "no conntrack entry for a dropped flow"
        );
        // Other backends have the whole range: another service still works.
        let g = client_frame(&svcs[0], 43_200);
        let (_, backend, bport) = svcs[0].expected_backend(&g);
        let port = predicted_port(&g, 0, PORT_MIN, PORT_MIN + 1);
        node.check(
            "another service during exhaustion",
            &g,
            true,
            XDP_REDIRECT,
            &snat_out(&g, backend, bport, port),
        );
    });
}

const TEN_S_AGO: u64 = SNAT_TCP_CLOSED_NS + 1_000_000_000;
const FINS: u8 = SNAT_STATE_CLOSING | SNAT_STATE_FIN_CLIENT | SNAT_STATE_FIN_BACKEND;

/// Flows of service 1 to one of its backends, through a node with a small port range,
/// for the tests of closed flows' ports.
struct Closing<'a> {
    node: &'a mut Node,
    svc: &'a Service,
    backend: IpAddr,
    bport: u16,
}

impl<'a> Closing<'a> {
    /// One port: every flow to the backend wants it.
    fn new(node: &'a mut Node, svcs: &'a [Service]) -> Self {
        node.configure(PORT_MIN, PORT_MIN);
        let svc = &svcs[0];
        let (_, backend, bport) = svc.expected_backend(&client_frame(svc, 44_001));
        Closing {
            node,
            svc,
            backend,
            bport,
        }
    }

    /// A new flow from the first client port from `from` whose flow goes to the backend.
    fn flow(&self, from: u16) -> Frame {
        (from..from + 1_000)
            .map(|p| client_frame(self.svc, p))
            .find(|f| self.svc.expected_backend(f).1 == self.backend)
            .expect("a flow to the backend")
    }

    fn out(&self, f: &Frame, port: u16) -> Frame {
        snat_out(f, self.backend, self.bport, port)
    }

    /// `f` (a client's packet) leaves from `port`.
    fn forward(&self, what: &str, f: &Frame, port: u16) {
        self.node
            .check(what, f, true, XDP_REDIRECT, &self.out(f, port));
    }

    /// The backend's answer to `f` on `port`, made by `how` (`Frame::fin`, `Frame::rst`),
    /// reaches the client.
    fn backend_sends(&self, what: &str, f: &Frame, port: u16, how: fn(Frame) -> Frame) {
        let reply = how(reply_to(&self.out(f, port)));
        self.node
            .check(what, &reply, false, XDP_REDIRECT, &reply_back(&reply, f));
    }

    /// The state of `f`'s reservation of `port`.
    fn state(&self, f: &Frame, port: u16) -> u8 {
        let (_, entry) = self.reservation(f, port);
        assert_eq!(entry.client_port, f.ports().0.to_be(), "the flow's own");
        entry.state
    }

    /// The reservation of `port` for `f`'s backend: its key and its entry.
    fn reservation(&self, f: &Frame, port: u16) -> (lb_common::FlowKey, SnatEntry) {
        let key = flow_key(&reply_to(&self.out(f, port)));
        let entry = self
            .node
            .dp
            .snat_entry(&key)
            .expect("snat map")
            .expect("reservation");
        (key, entry)
    }

    /// The reservation of `f` on `port` as if its last packet were over 10 s ago.
    fn age(&mut self, f: &Frame, port: u16) {
        self.age_by(f, port, TEN_S_AGO);
    }

    /// The reservation of `f` on `port` as if its last packet were `ago_ns` ago.
    fn age_by(&mut self, f: &Frame, port: u16, ago_ns: u64) {
        let (key, mut entry) = self.reservation(f, port);
        entry.last_seen_ns = coarse_now_ns() - ago_ns;
        self.node.dp.set_snat_entry(&key, &entry).expect("aged");
    }

    /// `f` is dropped for want of a port, and counted.
    fn dropped(&self, what: &str, f: &Frame) {
        let before = self.node.reason(Reason::DropSnatExhausted);
        let (action, _) = self.node.run(what, f, true);
        assert_eq!(action, XDP_DROP, "{what}");
        assert_eq!(
            self.node.reason(Reason::DropSnatExhausted),
            before + 1,
            "{what}"
        );
    }
}

/// A flow the client closed first (its FIN, then the backend's), or that an RST ended,
/// leaves the backend nothing: its port is free 10 s after its last packet, driven by
/// the flows' own FINs and RSTs through the program (`snat_state_after`).
#[test]
fn a_flow_the_client_closed_or_reset_frees_its_port_10_s_later() {
    with_node("snatcfirst", |node, svcs| {
        let mut t = Closing::new(node, svcs);
        let first = t.flow(44_001);
        t.forward("first opens", &first, PORT_MIN);
        let fin = first.clone().established().fin();
        t.forward("first's FIN", &fin, PORT_MIN);
        t.backend_sends("the backend's FIN", &first, PORT_MIN, Frame::fin);
        assert_eq!(t.state(&first, PORT_MIN), FINS);
        let second = t.flow(first.ports().0 + 1);
        t.dropped("second, within 10 s of the close", &second);
        t.age(&first, PORT_MIN);
        t.forward("second, 10 s after the close", &second, PORT_MIN);
        assert_eq!(t.state(&second, PORT_MIN), 0, "second's SYN opened it");

        t.backend_sends("the backend's RST", &second, PORT_MIN, Frame::rst);
        assert_eq!(
            t.state(&second, PORT_MIN),
            SNAT_STATE_CLOSING | SNAT_STATE_RESET
        );
        let third = t.flow(second.ports().0 + 1);
        t.dropped("third, within 10 s of the RST", &third);
        t.age(&second, PORT_MIN);
        t.forward("third, 10 s after the RST", &third, PORT_MIN);
    });
}

/// A flow the backend closed first (its FIN, then the client's) leaves the backend in
/// `TIME_WAIT`: its port is held while another port is free, and given to a new flow
/// none of whose ports is free 10 s after the close.
#[test]
fn a_flow_the_backend_closed_keeps_its_port_until_none_other_is_free() {
    with_node("snatbfirst", |node, svcs| {
        let mut t = Closing::new(node, svcs);
        let first = t.flow(44_001);
        t.forward("first opens", &first, PORT_MIN);
        t.backend_sends("the backend's FIN", &first, PORT_MIN, Frame::fin);
        let fin = first.clone().established().fin();
        t.forward("first's FIN", &fin, PORT_MIN);
        assert_eq!(t.state(&first, PORT_MIN), FINS | SNAT_STATE_BACKEND_WAITS);
        t.dropped("second, within 10 s of the close", &t.flow(44_100));
        t.age(&first, PORT_MIN);
        // With a second port free, a new flow takes that one, even when its first try
        // is the closed one.
        t.node.configure(PORT_MIN, PORT_MIN + 1);
        let second = (44_100..45_100)
            .map(|p| t.flow(p))
            .find(|f| predicted_port(f, 0, PORT_MIN, PORT_MIN + 1) == PORT_MIN)
            .expect("a flow whose first try is the closed port");
        t.forward("second, a free port", &second, PORT_MIN + 1);
        assert_eq!(
            t.state(&first, PORT_MIN),
            FINS | SNAT_STATE_BACKEND_WAITS,
            "first's untouched"
        );
        // With none free, the next flow takes the closed one.
        let third = t.flow(second.ports().0 + 1);
        t.forward("third, the closed port", &third, PORT_MIN);
        t.dropped("fourth, both ports open", &t.flow(third.ports().0 + 1));
    });
}

/// Of the ports held for their backends' `TIME_WAIT`, a flow that finds none free takes
/// the one idle longest (the likeliest to have left it), whatever its tries' order.
#[test]
fn of_the_closed_ports_the_longest_idle_goes_first() {
    with_node("snatoldest", |node, svcs| {
        let mut t = Closing::new(node, svcs);
        t.node.configure(PORT_MIN, PORT_MIN + 1);
        let mut closed: Vec<(Frame, u16)> = Vec::new();
        let mut from = 44_001;
        while closed.len() < 2 {
            let f = t.flow(from);
            from = f.ports().0 + 1;
            let port = if closed.is_empty() {
                predicted_port(&f, 0, PORT_MIN, PORT_MIN + 1)
            } else {
                // The other port: the first is held.
                if closed[0].1 == PORT_MIN {
                    PORT_MIN + 1
                } else {
                    PORT_MIN
                }
            };
            t.forward("opens", &f, port);
            t.backend_sends("the backend's FIN", &f, port, Frame::fin);
            t.forward("the client's FIN", &f.clone().established().fin(), port);
            closed.push((f, port));
        }
        // The first closed 12 s ago, the second 50 s ago.
        t.age_by(&closed[0].0, closed[0].1, TEN_S_AGO + 1_000_000_000);
        t.age_by(&closed[1].0, closed[1].1, 50_000_000_000);
        let next = (from..from + 1_000)
            .map(|p| t.flow(p))
            .find(|f| predicted_port(f, 0, PORT_MIN, PORT_MIN + 1) == closed[0].1)
            .expect("a flow whose first try is the port idle 12 s");
        t.forward("the port idle 50 s", &next, closed[1].1);
    });
}

#[test]
fn local_backends_are_not_snated_and_their_replies_are_translated_at_egress() {
    with_node("snatlocal", |node, svcs| {
        // Backend 11 of service 1 is on this node.
        for (id, ip, port) in &svcs[0].backends {
            node.dp
                .set_backend(
                    *id,
                    Backend {
                        addr: addr16(*ip),
                        port: port.to_be(),
                        family: FAMILY_V4,
                        flags: if last_octet(*ip) == 11 {
                            BACKEND_F_LOCAL
                        } else {
                            0
                        },
                        service_id: 1,
                    },
                )
                .expect("backend");
        }
        let mut sport = 44_000;
        let f = loop {
            let f = client_frame(&svcs[0], sport);
            if last_octet(svcs[0].expected_backend(&f).1) == 11 {
                break f;
            }
            sport += 1;
        };
        let want = dnat(&f, backend_v4(11), 8080, (LB_BACKEND_MAC, backend_mac(11)));
        node.check("local backend: DNAT only", &f, true, XDP_REDIRECT, &want);
        assert_eq!(
            node.dp
                .flow(&flow_key(&f))
                .expect("conntrack")
                .expect("tracked")
                .nat_port,
            0,
            "not source-NATed"
        );

        // Its reply leaves through the node's routing: the tc egress program gives it
        // the VIP back (no TTL change: the kernel forwarded it already).
        let reply = reply_from(&f, backend_v4(11), 8080, 11);
        let before = node.reason(Reason::ReplyEgress);
        let out = xdp::test_run_egress(&node.dp, &reply.build()).expect("egress run");
        assert_eq!(out.action, 0, "TC_ACT_OK");
        let mut back = reply.clone();
        back.src = vip_v4();
        let (_, dport) = reply.ports();
        back.set_ports(80, dport);
        assert!(
            out.frame == back.build(),
            "egress output differs\n got: {:02x?}\nwant: {:02x?}",
            out.frame,
            back.build()
        );
        verify_checksums(&out.frame).expect("checksums");
        assert_eq!(node.reason(Reason::ReplyEgress), before + 1, "counted");

        // UDP and IPv6 replies of local backends too (no SNAT: frontend flags cleared).
        for (svc, sport) in [(&svcs[1], 44_501), (&svcs[2], 44_502), (&svcs[3], 44_503)] {
            let mut plain = Service::new(svc.id, svc.frontend, svc.backends.clone());
            plain.flags = 0;
            plain.install(&mut node.dp);
            let f = client_frame(&plain, sport);
            let (_, backend, bport) = plain.expected_backend(&f);
            let (action, _) = node.run("DNAT for egress", &f, true);
            assert_eq!(action, XDP_REDIRECT);
            let reply = reply_from(&f, backend, bport, last_octet(backend));
            let out = xdp::test_run_egress(&node.dp, &reply.build()).expect("egress run");
            let mut back = reply.clone();
            back.src = plain.frontend.0;
            let (_, dport) = reply.ports();
            back.set_ports(plain.frontend.1, dport);
            assert!(out.frame == back.build(), "egress {sport}: output differs");
            verify_checksums(&out.frame).expect("checksums");
        }

        // Anything else leaves untouched.
        let other =
            Frame::tcp(backend_v4(12), 22, client_v4(), 40_000).macs(LB_CLIENT_MAC, CLIENT_MAC);
        let out = xdp::test_run_egress(&node.dp, &other.build()).expect("egress run");
        assert_eq!(out.frame, other.build(), "not a tracked reply");
    });
}

#[test]
fn a_device_outside_the_devmap_gets_the_translated_packet_through_the_stack() {
    with_node("snatstack", |node, _svcs| {
        let svc = Service::new(
            8,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 80)), 80, PROTO_TCP),
            vec![(81, pod_v4(), 8080)],
        );
        svc.install(&mut node.dp);
        let f = client_frame(&svc, 45_000);
        let mut want = dnat(&f, pod_v4(), 8080, (CLIENT_MAC, LB_CLIENT_MAC));
        want.src_mac = f.src_mac;
        want.dst_mac = f.dst_mac;
        let before = node.reason(Reason::FwdStack);
        node.check("pod veth: to the stack", &f, true, XDP_PASS, &want);
        assert_eq!(
            node.reason(Reason::FwdStack),
            before + 1,
            "counted as fwd_stack"
        );
    });
}

/// `CLOCK_MONOTONIC_COARSE`, the clock of `bpf_ktime_get_coarse_ns`.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(ts.tv_sec).expect("seconds") * 1_000_000_000
        + u64::try_from(ts.tv_nsec).expect("nanoseconds")
}

/// An ICMP error (`kind`: type, code, the header's last word) from `from` to `to`,
/// quoting the IP packet `quoted`; every checksum computed from scratch.
fn icmp_error(
    from: IpAddr,
    to: IpAddr,
    ttl: u8,
    kind: (u8, u8, u32),
    quoted: &[u8],
    macs: ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header};
    let mut icmp = vec![kind.0, kind.1, 0, 0];
    icmp.extend_from_slice(&kind.2.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let len = u16::try_from(icmp.len()).expect("small error");
    let mut out = Vec::new();
    let ether_type = if from.is_ipv4() {
        EtherType::IPV4
    } else {
        EtherType::IPV6
    };
    Ethernet2Header {
        source: macs.0,
        destination: macs.1,
        ether_type,
    }
    .write(&mut out)
    .expect("write to Vec");
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip =
                Ipv4Header::new(len, ttl, IpNumber::ICMP, s.octets(), d.octets()).expect("fits");
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(&mut out).expect("write to Vec");
            let check = lb_common::csum::checksum(&icmp, 0);
            icmp[2..4].copy_from_slice(&check.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: len,
                next_header: IpNumber::IPV6_ICMP,
                hop_limit: ttl,
                source: s.octets(),
                destination: d.octets(),
            }
            .write(&mut out)
            .expect("write to Vec");
            let mut pseudo = s.octets().to_vec();
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 58]);
            pseudo.extend_from_slice(&icmp);
            let check = lb_common::csum::checksum(&pseudo, 0);
            icmp[2..4].copy_from_slice(&check.to_be_bytes());
        }
        _ => panic!("source and destination of different families"),
    }
    out.extend_from_slice(&icmp);
    out
}

#[test]
fn icmp_errors_about_snated_flows_reach_the_client_translated() {
    with_node("snaticmp", |node, svcs| {
        let router_v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254));
        let router_v6: IpAddr = IpAddr::V6("2001:db8:b::fe".parse().expect("address"));
        let cases = [
            (
                0,
                44_001,
                Some(router_v4),
                (3, 4, 1400),
                "IPv4 TCP, fragmentation needed",
            ),
            (
                2,
                44_002,
                Some(router_v6),
                (2, 0, 1280),
                "IPv6 TCP, packet too big",
            ),
            (
                1,
                44_003,
                None,
                (3, 3, 0),
                "IPv4 UDP, port unreachable from the backend",
            ),
        ];
        for (svc, sport, router, kind, what) in cases {
            let f = client_frame(&svcs[svc], sport);
            let (_, backend, bport) = svcs[svc].expected_backend(&f);
            let nat_port = predicted_port(&f, 0, PORT_MIN, PORT_MAX);
            let out = snat_out(&f, backend, bport, nat_port);
            node.check(what, &f, true, XDP_REDIRECT, &out);

            let from = router.unwrap_or(backend);
            let error = icmp_error(
                from,
                node_of(&f),
                64,
                kind,
                &out.build()[14..],
                (backend_mac(last_octet(backend)), LB_BACKEND_MAC),
            );
            // To the client, one hop on, quoting the packet as the client sent it (as it
            // left the node: one hop on as well), the MTU as the router said.
            let mut quoted = f.clone();
            quoted.ttl = out.ttl;
            let want = icmp_error(from, f.src, 63, kind, &quoted.build()[14..], TO_CLIENT);
            let before = node.reason(Reason::ReplyIcmp);
            let got = xdp::test_run(&node.dp, &error, Some(node.backend_if))
                .unwrap_or_else(|e| panic!("{what}: test run failed: {e}"));
            assert_eq!(got.action, XDP_REDIRECT, "{what}: verdict");
            assert!(
                got.frame == want,
                "{what}: output differs\n got: {:02x?}\nwant: {want:02x?}",
                got.frame
            );
            verify_checksums(&got.frame).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                node.reason(Reason::ReplyIcmp),
                before + 1,
                "{what}: counted"
            );
        }

        // An error about a flow the node does not hold: untouched, the kernel's.
        let stray = Frame::tcp(node_v4(), 61_234, backend_v4(11), 8080);
        let error = icmp_error(
            router_v4,
            node_v4(),
            64,
            (3, 4, 1400),
            &stray.build()[14..],
            (backend_mac(11), LB_BACKEND_MAC),
        );
        let before = node.reason(Reason::PassNotL4);
        let got = xdp::test_run(&node.dp, &error, Some(node.backend_if)).expect("test run");
        assert_eq!(got.action, XDP_PASS, "unknown flow: verdict");
        assert_eq!(got.frame, error, "unknown flow: untouched");
        assert_eq!(
            node.reason(Reason::PassNotL4),
            before + 1,
            "unknown flow: counted"
        );
    });
}

/// `frame` with `ttl`: a packet as an ICMP error quotes it, where it was met.
fn with_ttl(frame: &Frame, ttl: u8) -> Frame {
    let mut f = frame.clone();
    f.ttl = ttl;
    f
}

/// A router on the client's side and one on the backends' side, of `frame`'s family.
fn routers(frame: &Frame) -> (IpAddr, IpAddr) {
    if frame.src.is_ipv4() {
        (
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 254)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
        )
    } else {
        (
            "2001:db8:c::fe".parse().expect("address"),
            "2001:db8:b::fe".parse().expect("address"),
        )
    }
}

/// Runs `error` through the tc egress program: it must leave as `want`, counted once
/// as `reply_icmp`.
fn check_egress_error(node: &Node, what: &str, error: &[u8], want: &[u8]) {
    let before = node.reason(Reason::ReplyIcmp);
    let out = xdp::test_run_egress(&node.dp, error).expect("egress run");
    assert_eq!(out.action, 0, "{what}: TC_ACT_OK");
    assert!(
        out.frame == want,
        "{what}: output differs\n got: {:02x?}\nwant: {want:02x?}",
        out.frame
    );
    verify_checksums(&out.frame).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        node.reason(Reason::ReplyIcmp),
        before + 1,
        "{what}: counted"
    );
}

/// Runs `error` through XDP on `ingress`: redirected as `want`, counted once as `reason`.
fn check_xdp_error(
    node: &Node,
    what: &str,
    error: &[u8],
    ingress: u32,
    want: &[u8],
    reason: Reason,
) {
    let before = node.reason(reason);
    let got = xdp::test_run(&node.dp, error, Some(ingress))
        .unwrap_or_else(|e| panic!("{what}: test run failed: {e}"));
    assert_eq!(got.action, XDP_REDIRECT, "{what}: verdict");
    assert!(
        got.frame == want,
        "{what}: output differs\n got: {:02x?}\nwant: {want:02x?}",
        got.frame
    );
    verify_checksums(&got.frame).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(node.reason(reason), before + 1, "{what}: counted");
}

#[test]
fn icmp_errors_about_dnat_only_flows_reach_the_client_translated() {
    with_node("dnaticmp", |node, svcs| {
        let cases = [
            (0, 46_001, (3, 4, 1280), "IPv4 TCP, fragmentation needed"),
            (1, 46_002, (3, 3, 0), "IPv4 UDP, port unreachable"),
            (2, 46_003, (2, 0, 1280), "IPv6 TCP, packet too big"),
            (3, 46_004, (1, 4, 0), "IPv6 UDP, port unreachable"),
        ];
        for (svc, sport, kind, what) in cases {
            // Destination only: `--lb-mode dnat` (a local backend is the same flow).
            let mut plain =
                Service::new(svcs[svc].id, svcs[svc].frontend, svcs[svc].backends.clone());
            plain.flags = 0;
            plain.install(&mut node.dp);
            let f = client_frame(&plain, sport);
            let (_, backend, bport) = plain.expected_backend(&f);
            let bmac = backend_mac(last_octet(backend));
            let out = dnat(&f, backend, bport, (LB_BACKEND_MAC, bmac));
            node.check(what, &f, true, XDP_REDIRECT, &out);
            // Every error quotes the translated packet; the client must get its own.
            let quoted = with_ttl(&f, out.ttl).build();
            let out = out.build();
            let (_, backend_router) = routers(&f);

            // From the node itself (it forwards the packet to a local pod over a smaller
            // link), leaving through the uplink: the quote only.
            let node_addr = node_of(&f);
            check_egress_error(
                node,
                &format!("{what}: from the node, at egress"),
                &icmp_error(node_addr, f.src, 64, kind, &out[14..], TO_CLIENT),
                &icmp_error(node_addr, f.src, 64, kind, &quoted[14..], TO_CLIENT),
            );
            // From the (local) backend itself: it comes from the frontend, as its replies.
            check_egress_error(
                node,
                &format!("{what}: from the backend, at egress"),
                &icmp_error(backend, f.src, 63, kind, &out[14..], TO_CLIENT),
                &icmp_error(f.dst, f.src, 63, kind, &quoted[14..], TO_CLIENT),
            );
            // From a router between the node and a remote backend, through XDP: to the
            // client, one hop on.
            check_xdp_error(
                node,
                &format!("{what}: from a router, through XDP"),
                &icmp_error(
                    backend_router,
                    f.src,
                    64,
                    kind,
                    &out[14..],
                    (bmac, LB_BACKEND_MAC),
                ),
                node.backend_if,
                &icmp_error(backend_router, f.src, 63, kind, &quoted[14..], TO_CLIENT),
                Reason::ReplyIcmp,
            );
        }

        // An error leaving the node about a flow it does not hold: untouched, uncounted.
        let stray = Frame::tcp(client_v4(), 40_000, backend_v4(12), 8080);
        let error = icmp_error(
            node_v4(),
            client_v4(),
            64,
            (3, 4, 1280),
            &stray.build()[14..],
            TO_CLIENT,
        );
        let before = node.reason(Reason::ReplyIcmp);
        let out = xdp::test_run_egress(&node.dp, &error).expect("egress run");
        assert_eq!(out.frame, error, "unknown flow: untouched");
        assert_eq!(
            node.reason(Reason::ReplyIcmp),
            before,
            "unknown flow: uncounted"
        );
    });
}

#[test]
fn icmp_errors_from_the_client_side_reach_the_backend_translated() {
    with_node("fwdicmp", |node, svcs| {
        // (service, destination only, client port, error, what)
        let cases = [
            (
                0,
                true,
                47_001,
                (3, 4, 1280),
                "IPv4 TCP, fragmentation needed",
            ),
            (2, true, 47_002, (2, 0, 1280), "IPv6 TCP, packet too big"),
            (3, true, 47_003, (1, 4, 0), "IPv6 UDP, port unreachable"),
            (
                1,
                false,
                47_004,
                (3, 3, 0),
                "IPv4 UDP, port unreachable, SNAT",
            ),
            (
                0,
                false,
                47_005,
                (3, 4, 1280),
                "IPv4 TCP, fragmentation needed, SNAT",
            ),
        ];
        for (svc, dnat_only, sport, kind, what) in cases {
            let mut s = Service::new(svcs[svc].id, svcs[svc].frontend, svcs[svc].backends.clone());
            s.flags = if dnat_only { 0 } else { svcs[svc].flags };
            s.install(&mut node.dp);
            let f = client_frame(&s, sport);
            let (_, backend, bport) = s.expected_backend(&f);
            let bmac = backend_mac(last_octet(backend));
            let out = if dnat_only {
                dnat(&f, backend, bport, (LB_BACKEND_MAC, bmac))
            } else {
                snat_out(
                    &f,
                    backend,
                    bport,
                    predicted_port(&f, 0, PORT_MIN, PORT_MAX),
                )
            };
            node.check(what, &f, true, XDP_REDIRECT, &out);
            // The backend's reply, and as it left the node for the client.
            let mut reply = reply_to(&out);
            reply.ttl = 64;
            let (action, back) = node.run(what, &reply, false);
            assert_eq!(action, XDP_REDIRECT, "{what}: reply");
            // A router on the client's side answers the frontend about it; the backend
            // must get it about its own reply.
            let (client_router, _) = routers(&f);
            let quoted = with_ttl(&reply, reply.ttl - 1).build();
            check_xdp_error(
                node,
                &format!("{what}: to the backend"),
                &icmp_error(
                    client_router,
                    f.dst,
                    64,
                    kind,
                    &back[14..],
                    (CLIENT_MAC, LB_CLIENT_MAC),
                ),
                node.client_if,
                &icmp_error(
                    client_router,
                    backend,
                    63,
                    kind,
                    &quoted[14..],
                    (LB_BACKEND_MAC, bmac),
                ),
                Reason::FwdIcmp,
            );
        }

        // An error to a frontend about a flow the node does not hold: the kernel's.
        let stray = Frame::tcp(vip_v4(), 80, client_v4(), 40_000);
        let (client_router, _) = routers(&stray);
        let error = icmp_error(
            client_router,
            vip_v4(),
            64,
            (3, 4, 1280),
            &stray.build()[14..],
            (CLIENT_MAC, LB_CLIENT_MAC),
        );
        let got = xdp::test_run(&node.dp, &error, Some(node.client_if)).expect("test run");
        assert_eq!(got.action, XDP_PASS, "unknown flow: verdict");
        assert_eq!(got.frame, error, "unknown flow: untouched");
    });
}
