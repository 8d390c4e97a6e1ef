//! Packets in, packets out: each fixture is a frame, the interface it arrives on, and
//! the verdict and exact output frame the XDP program must produce, run through
//! `BPF_PROG_TEST_RUN` in a namespace that plays the node. Expected frames are rebuilt
//! from fields by etherparse (every checksum computed from scratch), so a byte-equal
//! output proves the incremental checksum updates. Needs root (run by `cargo xtask test`).

use std::net::{IpAddr, Ipv4Addr};

use lb_agent::testbed::node::*;
use lb_agent::{dataplane::Dataplane, frames::Frame};
use lb_common::{
    Reason,
    reason::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

#[derive(Clone, Copy, Debug)]
enum Ingress {
    Client,
    Backend,
}

/// One fixture: description, input, where it arrives, what must come out.
struct Case {
    description: &'static str,
    input: Vec<u8>,
    ingress: Ingress,
    action: u32,
    /// `None`: the output must be the input, byte for byte.
    output: Option<Vec<u8>>,
}

impl Case {
    fn pass(description: &'static str, input: Vec<u8>, ingress: Ingress) -> Case {
        Case {
            description,
            input,
            ingress,
            action: XDP_PASS,
            output: None,
        }
    }

    fn forward(description: &'static str, input: &Frame, ingress: Ingress, output: &Frame) -> Case {
        Case {
            description,
            input: input.build(),
            ingress,
            action: XDP_REDIRECT,
            output: Some(output.build()),
        }
    }
}

struct Node {
    dp: Dataplane,
    client_if: u32,
    backend_if: u32,
    runs: u64,
}

impl Node {
    fn check(&mut self, case: &Case) {
        let ingress = match case.ingress {
            Ingress::Client => self.client_if,
            Ingress::Backend => self.backend_if,
        };
        let out = self
            .dp
            .test_run(&case.input, Some(ingress))
            .unwrap_or_else(|e| panic!("{}: test run failed: {e}", case.description));
        self.runs += 1;
        assert_eq!(
            out.action, case.action,
            "{}: verdict {} != expected {}",
            case.description, out.action, case.action
        );
        let want = case.output.as_ref().unwrap_or(&case.input);
        assert!(
            out.frame == *want,
            "{}: output frame differs\n got: {:02x?}\nwant: {:02x?}",
            case.description,
            out.frame,
            want
        );
        if case.action != XDP_PASS && case.action != XDP_DROP {
            lb_agent::frames::verify_checksums(&out.frame)
                .unwrap_or_else(|e| panic!("{}: {e}", case.description));
        }
    }

    fn new_flows(&self, service_id: u32) -> u64 {
        self.dp
            .service_stats(service_id)
            .expect("service stats")
            .new_flows
    }

    fn reason(&self, reason: Reason) -> u64 {
        self.dp
            .reason_stats()
            .expect("reason stats")
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, s)| s.packets)
    }
}

const TO_BACKEND: fn(u8) -> ([u8; 6], [u8; 6]) = |n| (LB_BACKEND_MAC, backend_mac(n));

/// `input` from a client, translated to `backend`:`port` and redirected towards it.
fn to_backend(description: &'static str, input: &Frame, backend: IpAddr, port: u16) -> Case {
    let output = dnat(input, backend, port, TO_BACKEND(last_octet(backend)));
    Case::forward(description, input, Ingress::Client, &output)
}
const TO_CLIENT: ([u8; 6], [u8; 6]) = (LB_CLIENT_MAC, CLIENT_MAC);

fn last_octet(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    }
}

fn client_frame(svc: &Service, sport: u16) -> Frame {
    let (vip, port, proto) = svc.frontend;
    let src = if vip.is_ipv4() {
        client_v4()
    } else {
        client_v6()
    };
    let f = if proto == lb_common::PROTO_TCP {
        Frame::tcp(src, sport, vip, port).syn()
    } else {
        Frame::udp(src, sport, vip, port)
    };
    f.macs(CLIENT_MAC, LB_CLIENT_MAC)
}

/// New flow, same flow again, and the reply: for one service.
fn flow_round_trip(node: &mut Node, svc: &Service, sport: u16, what: &'static str) {
    let f = client_frame(svc, sport);
    let (_, backend, bport) = svc.expected_backend(&f);
    let n = last_octet(backend);
    let before = node.new_flows(svc.id);
    node.check(&to_backend(what, &f, backend, bport));
    assert_eq!(
        node.new_flows(svc.id),
        before + 1,
        "{what}: new flow counted"
    );
    let tracked = node
        .dp
        .flow(&flow_key(&f))
        .expect("conntrack")
        .expect("flow tracked");
    assert_eq!(tracked.service_id, svc.id, "{what}: conntrack service");

    // The same flow again (a data segment): same backend, no new flow.
    let mut again = f.clone();
    if let lb_agent::frames::L4::Tcp { syn, .. } = &mut again.l4 {
        *syn = false;
    }
    again.payload = b"more data".to_vec();
    node.check(&to_backend(what, &again, backend, bport));
    assert_eq!(
        node.new_flows(svc.id),
        before + 1,
        "{what}: established flow"
    );

    // The backend's reply: source back to VIP:port, towards the client.
    let reply = reply_from(&f, backend, bport, n);
    let (vip, vport, _) = svc.frontend;
    node.check(&Case::forward(
        what,
        &reply,
        Ingress::Backend,
        &rev_snat(&reply, vip, vport, TO_CLIENT),
    ));
}

#[test]
fn packet_fixtures() {
    let router = Router::new("fix");
    let client_if = router.ns.ifindex("cl").expect("ifindex");
    let backend_if = router.ns.ifindex("bk").expect("ifindex");
    router
        .ns
        .run_in(|| {
            let mut node = Node {
                dp: load_dataplane(),
                client_if,
                backend_if,
                runs: 0,
            };
            let mut svcs = services();
            for s in &svcs {
                s.install(&mut node.dp);
            }
            run_fixtures(&mut node, &mut svcs);
        })
        .expect("run in the router namespace");
}

#[expect(
    clippy::too_many_lines,
    reason = "one fixture table, read top to bottom"
)]
fn run_fixtures(node: &mut Node, svcs: &mut [Service]) {
    // --- IPv4 and IPv6 x TCP and UDP: new flow, same flow, reply.
    flow_round_trip(node, &svcs[0], 40_001, "IPv4 TCP to VIP");
    flow_round_trip(node, &svcs[1], 40_002, "IPv4 UDP to VIP");
    flow_round_trip(node, &svcs[2], 40_003, "IPv6 TCP to VIP");
    flow_round_trip(node, &svcs[3], 40_004, "IPv6 UDP to VIP");

    // --- Many flows spread over both backends, each exactly where the table says.
    let mut seen = std::collections::BTreeSet::new();
    for sport in 41_000..41_064 {
        let f = client_frame(&svcs[0], sport);
        let (id, backend, bport) = svcs[0].expected_backend(&f);
        seen.insert(id);
        node.check(&to_backend("IPv4 TCP flow spread", &f, backend, bport));
    }
    assert_eq!(seen.len(), 2, "64 flows reach both backends");

    // --- UDP over IPv4 without a checksum keeps it zero.
    let mut f = client_frame(&svcs[1], 40_010);
    f.udp_no_checksum = true;
    let (_, backend, bport) = svcs[1].expected_backend(&f);
    let mut want = dnat(&f, backend, bport, TO_BACKEND(last_octet(backend)));
    want.udp_no_checksum = true;
    let case = Case::forward(
        "IPv4 UDP, zero checksum stays zero",
        &f,
        Ingress::Client,
        &want,
    );
    assert_eq!(&case.output.as_ref().expect("output")[40..42], &[0, 0]);
    node.check(&case);

    // --- 802.1Q tag: parsed, kept.
    let mut f = client_frame(&svcs[0], 40_020);
    f.vlan = Some(100);
    let (_, backend, bport) = svcs[0].expected_backend(&f);
    node.check(&to_backend("VLAN-tagged IPv4 TCP", &f, backend, bport));

    // --- IPv4 with options (IHL 8): L4 found after the options.
    let mut f = client_frame(&svcs[0], 40_030);
    f.ipv4_options = vec![
        0x01, 0x01, 0x01, 0x01, 0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00,
    ];
    let (_, backend, bport) = svcs[0].expected_backend(&f);
    node.check(&to_backend("IPv4 with options", &f, backend, bport));

    // --- Not for us: untouched.
    let other = Frame::tcp(
        client_v4(),
        40_040,
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 77)),
        80,
    )
    .macs(CLIENT_MAC, LB_CLIENT_MAC);
    node.check(&Case::pass("non-VIP TCP", other.build(), Ingress::Client));
    let wrong_port =
        Frame::tcp(client_v4(), 40_041, vip_v4(), 8443).macs(CLIENT_MAC, LB_CLIENT_MAC);
    node.check(&Case::pass(
        "VIP on a port that is no frontend",
        wrong_port.build(),
        Ingress::Client,
    ));
    let wrong_proto = Frame::udp(client_v4(), 40_042, vip_v4(), 80).macs(CLIENT_MAC, LB_CLIENT_MAC);
    node.check(&Case::pass(
        "VIP port with the other protocol",
        wrong_proto.build(),
        Ingress::Client,
    ));
    node.check(&Case::pass("ARP request", arp_request(), Ingress::Client));
    let before = node.reason(Reason::PassNotIp);
    node.check(&Case::pass(
        "ARP request again",
        arp_request(),
        Ingress::Client,
    ));
    assert_eq!(
        node.reason(Reason::PassNotIp),
        before + 1,
        "ARP counted as pass_not_ip"
    );

    // --- A reply-looking packet nobody asked for: untouched.
    let stray =
        Frame::tcp(backend_v4(11), 8080, client_v4(), 49_999).macs(backend_mac(11), LB_BACKEND_MAC);
    node.check(&Case::pass(
        "untracked packet from a backend",
        stray.build(),
        Ingress::Backend,
    ));

    // --- TTL 1 would expire here: to the kernel untranslated.
    let mut f = client_frame(&svcs[0], 40_050);
    f.ttl = 1;
    node.check(&Case::pass("TTL 1 to VIP", f.build(), Ingress::Client));

    // --- Fragments: the first one to a VIP is dropped, a later one passes.
    let f = client_frame(&svcs[1], 40_060);
    node.check(&Case {
        description: "first IPv4 fragment to VIP",
        input: set_fragment(f.build(), 0x2000),
        ingress: Ingress::Client,
        action: XDP_DROP,
        output: None,
    });
    node.check(&Case::pass(
        "later IPv4 fragment to VIP",
        set_fragment(f.build(), 0x0010),
        Ingress::Client,
    ));

    // --- Truncated: IP total length beyond the frame.
    let mut bytes = client_frame(&svcs[0], 40_070).build();
    bytes.truncate(14 + 20 + 10);
    node.check(&Case::pass("truncated TCP header", bytes, Ingress::Client));

    // --- A service without endpoints drops, and counts it.
    let before = node.reason(Reason::DropNoBackend);
    let f = client_frame(&svcs[4], 40_080);
    node.check(&Case {
        description: "service without backends",
        input: f.build(),
        ingress: Ingress::Client,
        action: XDP_DROP,
        output: None,
    });
    assert_eq!(node.reason(Reason::DropNoBackend), before + 1);

    // --- Unresolved neighbour: translated, handed to the kernel, MACs untouched.
    let f = client_frame(&svcs[5], 40_090);
    let mut want = dnat(&f, backend_v4(13), 8080, (CLIENT_MAC, LB_CLIENT_MAC));
    want.src_mac = f.src_mac;
    want.dst_mac = f.dst_mac;
    node.check(&Case {
        description: "backend neighbour not resolved",
        input: f.build(),
        ingress: Ingress::Client,
        action: XDP_PASS,
        output: Some(want.build()),
    });

    // --- Next hop behind the interface the packet came in on: XDP_TX.
    let f = Frame::tcp(near_client_v4(), 40_100, vip_v4(), 80)
        .syn()
        .macs(NEAR_CLIENT_MAC, LB_BACKEND_MAC);
    let (_, backend, bport) = svcs[0].expected_backend(&f);
    let mut case = Case::forward(
        "client on the backend side",
        &f,
        Ingress::Backend,
        &dnat(&f, backend, bport, TO_BACKEND(last_octet(backend))),
    );
    case.action = XDP_TX;
    node.check(&case);

    // --- Session affinity: the client's address alone picks the backend.
    let first = client_frame(&svcs[6], 40_110);
    let (id, _, _) = svcs[6].expected_backend(&first);
    for sport in 40_111..40_131 {
        let f = client_frame(&svcs[6], sport);
        let (other_id, backend, bport) = svcs[6].expected_backend(&f);
        assert_eq!(id, other_id);
        node.check(&to_backend("affinity by client IP", &f, backend, bport));
    }

    // --- Established flows keep their backend when the table changes ...
    let f = client_frame(&svcs[0], 40_001);
    let (old_id, old_backend, bport) = svcs[0].expected_backend(&f);
    let survivor = svcs[0]
        .backends
        .iter()
        .copied()
        .find(|b| b.0 != old_id)
        .expect("two backends");
    svcs[0].backends = vec![survivor];
    svcs[0].rebuild_table();
    node.dp
        .set_maglev_table(1, &svcs[0].table)
        .expect("new table");
    node.check(&to_backend(
        "established flow after a table change",
        &f,
        old_backend,
        bport,
    ));
    // ... and are re-selected when their backend is deleted.
    node.dp.remove_backend(old_id).expect("delete backend");
    let before = node.new_flows(1);
    node.check(&to_backend(
        "flow whose backend was deleted",
        &f,
        survivor.1,
        survivor.2,
    ));
    assert_eq!(
        node.new_flows(1),
        before + 1,
        "re-selection counts as a new flow"
    );
    assert_eq!(
        node.dp
            .flow(&flow_key(&f))
            .expect("ct")
            .expect("flow")
            .backend_id,
        survivor.0
    );

    // --- Every run counted exactly one reason.
    let total: u64 = node
        .dp
        .reason_stats()
        .expect("stats")
        .iter()
        .map(|(_, s)| s.packets)
        .sum();
    assert_eq!(total, node.runs, "one reason per packet");
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[198, 51, 100, 2, 0, 0, 0, 0, 0, 0, 198, 51, 100, 1]);
    f.resize(60, 0);
    f
}

/// Sets the IPv4 flags/fragment-offset field of an untagged frame and reseals the
/// header checksum.
fn set_fragment(mut frame: Vec<u8>, field: u16) -> Vec<u8> {
    frame[20..22].copy_from_slice(&field.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = lb_common::csum::checksum(&frame[14..34], 0);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    frame
}
