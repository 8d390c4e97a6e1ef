//! Packets in, packets out: each fixture is a frame, the interface it arrives on, and
//! the verdict and exact output frame the XDP program must produce, run through
//! `BPF_PROG_TEST_RUN` in a namespace that plays the node. Expected frames are rebuilt
//! from fields by etherparse (every checksum computed from scratch), so a byte-equal
//! output proves the incremental checksum updates. Needs root (run by `cargo xtask test`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use lb_agent::dataplane::Dataplane;
use lb_common::{
    Affinity, AffinityKey, Backend, ClientKey, FLOW_F_FRONTEND_REMEMBERED, FRONTEND_F_REJECT_EMPTY,
    FRONTEND_F_SOURCE_RANGES, FlowKey, PROTO_TCP, Reason, TrackedFlow, maps,
    reason::{XDP_DROP, XDP_PASS, XDP_REDIRECT},
};
use lb_testbed::frames::Frame;
use lb_testbed::node::*;
use lb_testbed::xdp;

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
        let out = xdp::test_run(&self.dp, &case.input, Some(ingress))
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
            lb_testbed::frames::verify_checksums(&out.frame)
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
        reason_packets(&self.dp, reason)
    }

    fn assert_one_reason_per_packet(&self) {
        let total: u64 = self
            .dp
            .reason_stats()
            .expect("stats")
            .iter()
            .map(|(_, s)| s.packets)
            .sum();
        assert_eq!(total, self.runs, "one reason per packet");
    }
}

/// Runs `fixtures` on a fresh node: its own router namespace, the program loaded, the
/// standard services installed; then checks that every run counted exactly one reason.
fn with_node(tag: &str, fixtures: impl FnOnce(&mut Node, &mut Vec<Service>) + Send) {
    let router = Router::new(tag);
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
            fixtures(&mut node, &mut svcs);
            node.assert_one_reason_per_packet();
        })
        .expect("run in the router namespace");
}

const TO_BACKEND: fn(u8) -> ([u8; 6], [u8; 6]) = |n| (LB_BACKEND_MAC, backend_mac(n));

/// `input` from a client, translated to `backend`:`port` and redirected towards it.
fn to_backend(description: &'static str, input: &Frame, backend: IpAddr, port: u16) -> Case {
    let output = dnat(input, backend, port, TO_BACKEND(last_octet(backend)));
    Case::forward(description, input, Ingress::Client, &output)
}
const TO_CLIENT: ([u8; 6], [u8; 6]) = (LB_CLIENT_MAC, CLIENT_MAC);

/// The test client of a service's address family.
fn client_of(svc: &Service) -> IpAddr {
    if svc.frontend.0.is_ipv4() {
        client_v4()
    } else {
        client_v6()
    }
}

fn client_frame(svc: &Service, sport: u16) -> Frame {
    let (vip, port, proto) = svc.frontend;
    let src = client_of(svc);
    let f = if proto == PROTO_TCP {
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

    // The SYN again (retransmitted; its entry is there): same backend, no new flow.
    node.check(&to_backend(what, &f, backend, bport));
    assert_eq!(
        node.new_flows(svc.id),
        before + 1,
        "{what}: a retransmitted first packet is no new flow"
    );

    // The same flow again (a data segment): same backend, no new flow.
    let mut again = f.clone().established();
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
    with_node("fix", |node, svcs| run_fixtures(node, svcs));
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

    // --- Next hop behind the interface the packet came in on: a devmap redirect back
    // out of it (a veth passes XDP_TX frames on only to a peer that runs XDP itself).
    let f = Frame::tcp(near_client_v4(), 40_100, vip_v4(), 80)
        .syn()
        .macs(NEAR_CLIENT_MAC, LB_BACKEND_MAC);
    let (_, backend, bport) = svcs[0].expected_backend(&f);
    let case = Case::forward(
        "client on the backend side",
        &f,
        Ingress::Backend,
        &dnat(&f, backend, bport, TO_BACKEND(last_octet(backend))),
    );
    node.check(&case);

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
    let before = node.new_flows(1);
    node.check(&to_backend(
        "established flow after a table change (its SYN again)",
        &f,
        old_backend,
        bport,
    ));
    assert_eq!(node.new_flows(1), before, "the flow is kept, not new");
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

// --- Session affinity (`sessionAffinity: ClientIP` with `timeoutSeconds`) -------------

/// The standard IPv4 affinity service (id 7) and an IPv6 one (id 8, added to `svcs`
/// and installed): every scenario runs for both, so both key forms are exercised.
const AFFINITY_V4: usize = 6;
const AFFINITY_V6: usize = 7;

fn add_affinity_v6(node: &mut Node, svcs: &mut Vec<Service>) {
    let mut svc = Service::new(
        8,
        (vip_v6(), 443, PROTO_TCP),
        vec![(181, backend_v6(11), 8443), (182, backend_v6(12), 8443)],
    );
    svc.affinity = true;
    svc.rebuild_table();
    svc.install(&mut node.dp);
    assert_eq!(
        svcs.len(),
        AFFINITY_V6,
        "the v6 affinity service comes last"
    );
    svcs.push(svc);
}

/// The client's affinity entry for `svc`, if any.
fn affinity_entry(node: &Node, svc: &Service) -> Option<Affinity> {
    node.dp
        .affinity(&svc.affinity_key(client_of(svc)))
        .expect("read the affinity map")
}

/// A new connection (a SYN from source port `sport`) of the client of `svc` must be
/// translated to `want`, count as a new flow and be tracked with that backend.
fn new_connection(
    node: &mut Node,
    svc: &Service,
    sport: u16,
    want: (u32, IpAddr, u16),
    what: &'static str,
) {
    let f = client_frame(svc, sport);
    let before = node.new_flows(svc.id);
    node.check(&to_backend(what, &f, want.1, want.2));
    assert_eq!(node.new_flows(svc.id), before + 1, "{what}: a new flow");
    let tracked = node
        .dp
        .flow(&flow_key(&f))
        .expect("conntrack")
        .unwrap_or_else(|| panic!("{what}: flow tracked"));
    assert_eq!(tracked.backend_id, want.0, "{what}: conntrack backend");
}

/// The client's first connection: placed by the table, and remembered.
fn first_connection(node: &mut Node, svc: &Service, sport: u16) -> (u32, IpAddr, u16) {
    assert_eq!(
        affinity_entry(node, svc),
        None,
        "no entry before the first connection"
    );
    let first = svc.expected_backend(&client_frame(svc, sport));
    new_connection(
        node,
        svc,
        sport,
        first,
        "first connection, placed by the table",
    );
    let entry = affinity_entry(node, svc).expect("the first connection writes the entry");
    assert_eq!(
        entry.backend_id, first.0,
        "the entry holds the table's backend"
    );
    assert_ne!(entry.last_seen_ns, 0, "the entry is stamped");
    first
}

/// A backend joins `svc` and the table is rebuilt; returns the new backend, which the
/// client's slot now holds. (Maglev gives a newcomer about 1/N of the slots; whether the
/// client's is among them depends on identities, so the test sees to it by writing the
/// slot.) Writes the new backend first, then the table, as the agent does.
fn move_client_away(node: &mut Node, svc: &mut Service, from: u32) -> (u32, IpAddr, u16) {
    let id = svc.backends.iter().map(|b| b.0).max().expect("backends") + 1;
    let n = RESOLVED_BACKENDS[0];
    let ip = if svc.frontend.0.is_ipv4() {
        backend_v4(n)
    } else {
        backend_v6(n)
    };
    let joined = (id, ip, 9_000);
    svc.backends.push(joined);
    svc.rebuild_table();
    let slot = lb_common::hash::client_hash(&addr16(client_of(svc))) % TABLE_SIZE;
    svc.table[slot as usize] = id;
    svc.install(&mut node.dp);
    let to = svc.expected_backend(&client_frame(svc, 1));
    assert_eq!(to, joined, "the table gives the client the new backend");
    assert_ne!(to.0, from);
    to
}

/// Runs bpftool (installed by `cargo xtask test`); its stdout.
fn bpftool(args: &[&str]) -> Vec<u8> {
    lb_testbed::run_stdout(
        Command::new("bpftool").args(args),
        &format!("bpftool {args:?} (installed by `cargo xtask test`)"),
    )
}

/// Every map pinned under a directory of its own (removed on drop, also when the test
/// fails), so the test can read and rewrite affinity and conntrack entries with bpftool,
/// as an operator would.
struct Pins(PathBuf);

impl Pins {
    fn new(dp: &Dataplane) -> Pins {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let pins = Pins(PathBuf::from(format!(
            "/sys/fs/bpf/xlb-test-affinity-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )));
        dp.pin_maps(&pins.0).expect("pin the maps");
        pins
    }

    /// Overwrites an affinity entry from userspace.
    fn set_affinity(&self, key: &AffinityKey, value: &Affinity) {
        let mut k = key.client.to_vec();
        k.extend_from_slice(&key.service_id.to_ne_bytes());
        k.push(key.family);
        k.extend_from_slice(&key._pad);
        let mut v = value.backend_id.to_ne_bytes().to_vec();
        v.extend_from_slice(&value._pad.to_ne_bytes());
        v.extend_from_slice(&value.last_seen_ns.to_ne_bytes());
        self.update(maps::AFFINITY, &k, &v);
    }

    /// Overwrites a conntrack entry from userspace.
    fn set_flow(&self, key: &FlowKey, value: &TrackedFlow) {
        let mut k = key.src.to_vec();
        k.extend_from_slice(&key.dst);
        k.extend_from_slice(&key.sport.to_ne_bytes());
        k.extend_from_slice(&key.dport.to_ne_bytes());
        k.extend_from_slice(&[key.proto, key.family]);
        k.extend_from_slice(&key._pad);
        let mut v = value.backend_id.to_ne_bytes().to_vec();
        v.extend_from_slice(&value.service_id.to_ne_bytes());
        v.extend_from_slice(&value.nat_port.to_ne_bytes());
        v.push(value.frontend_flags);
        v.extend_from_slice(&value._pad);
        self.update(maps::CONNTRACK, &k, &v);
    }

    /// Removes the client's `FLOWS` entry of the flow `key`, as an older build (which
    /// wrote none) would have left it.
    fn forget_client_entry(&self, key: &FlowKey) {
        let client = ClientKey::of_forward(key);
        let mut k = client.addr.to_vec();
        k.extend_from_slice(&client.port.to_ne_bytes());
        k.extend_from_slice(&[client.proto, client.family]);
        self.bpftool_map("delete", maps::FLOWS, &k, None);
    }

    /// `bpftool map update` of the pinned map `name`.
    fn update(&self, name: &str, key: &[u8], value: &[u8]) {
        self.bpftool_map("update", name, key, Some(value));
    }

    /// `bpftool map <op>` of the pinned map `name`, with the key and value (if any) in
    /// hex.
    fn bpftool_map(&self, op: &str, name: &str, key: &[u8], value: Option<&[u8]>) {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>();
        let path = self.0.join(name).display().to_string();
        let mut args = vec!["map", op, "pinned", &path, "key", "hex"];
        let k = hex(key);
        args.extend(k.iter().map(String::as_str));
        let v = value.map(hex).unwrap_or_default();
        if value.is_some() {
            args.extend(["value", "hex"]);
            args.extend(v.iter().map(String::as_str));
        }
        bpftool(&args);
    }

    /// How many entries the whole affinity map holds.
    fn affinity_entries(&self) -> usize {
        self.entries(maps::AFFINITY)
    }

    /// How many entries the pinned map `name` holds.
    fn entries(&self, name: &str) -> usize {
        let path = self.0.join(name).display().to_string();
        let dump = bpftool(&["-j", "map", "dump", "pinned", &path]);
        let dump: serde_json::Value = serde_json::from_slice(&dump).expect("bpftool JSON");
        dump.as_array().expect("a JSON array").len()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An established flow's conntrack entry remembers its frontend's service and flags,
/// so its packets skip the frontend lookup; an entry that does not (written by an
/// older build in `CONNTRACK`, with the byte zero, and no `FLOWS` entry) is still
/// served, by the lookup.
#[test]
fn conntrack_entries_remember_their_frontend() {
    with_node("ctfe", |node, svcs| {
        let pins = Pins::new(&node.dp);
        for svc in &svcs[..4] {
            let f = client_frame(svc, 40_400);
            let (_, backend, bport) = svc.expected_backend(&f);
            node.check(&to_backend("new flow", &f, backend, bport));
            let key = flow_key(&f);
            let tracked = node.dp.flow(&key).expect("conntrack").expect("tracked");
            assert_eq!(
                tracked.frontend_flags, FLOW_F_FRONTEND_REMEMBERED,
                "{:?}: the entry remembers the frontend (no flags)",
                svc.frontend
            );
            pins.forget_client_entry(&key);
            // As the agent does when it adopts an older build's tables.
            node.dp.mark_flow_pairs().expect("flag");
            pins.set_flow(
                &key,
                &TrackedFlow {
                    frontend_flags: 0,
                    ..tracked
                },
            );
            let mut again = f.clone().established();
            again.payload = b"after an upgrade".to_vec();
            let before = node.new_flows(svc.id);
            node.check(&to_backend("older entry", &again, backend, bport));
            assert_eq!(node.new_flows(svc.id), before, "still the same flow");
        }
    });
}

/// One entry per flow, keyed by the client's address and port: a client port that
/// talks to two frontends at once, with different backends, keeps both flows (the
/// second in the `CONNTRACK`/`REVNAT` pair), each with its backend and each reply with
/// its frontend; a flow to another frontend that reaches the same backend as the
/// client port's entry replaces it (the backend cannot tell the two apart), and the
/// replies get the newer frontend.
#[test]
fn one_client_port_two_frontends() {
    with_node("ports", |node, svcs| {
        let pins = Pins::new(&node.dp);
        let a = &svcs[0];
        // Another frontend on the same VIP, to other backend ports.
        let b = Service::new(
            8,
            (vip_v4(), 8081, PROTO_TCP),
            vec![(81, backend_v4(11), 9090), (82, backend_v4(12), 9090)],
        );
        b.install(&mut node.dp);
        let fa = client_frame(a, 40_500);
        let fb = client_frame(&b, 40_500);
        let (_, ba, pa) = a.expected_backend(&fa);
        let (_, bb, pb) = b.expected_backend(&fb);
        node.check(&to_backend("first frontend", &fa, ba, pa));
        assert_eq!(pins.entries(maps::CONNTRACK), 0, "one entry, in FLOWS");
        assert!(!node.dp.flow_pairs_marked().expect("flag"), "no pair yet");
        node.check(&to_backend("second frontend, same port", &fb, bb, pb));
        assert_eq!(pins.entries(maps::CONNTRACK), 1, "the second in the pair");
        assert!(node.dp.flow_pairs_marked().expect("flag"), "pairs in use");
        assert_eq!(pins.entries(maps::REVNAT), 1, "with its reply entry");
        for (svc, f, backend, port) in [(a, &fa, ba, pa), (&b, &fb, bb, pb)] {
            let mut again = f.clone().established();
            again.payload = b"both at once".to_vec();
            let before = node.new_flows(svc.id);
            node.check(&to_backend(
                "each flow keeps its backend",
                &again,
                backend,
                port,
            ));
            assert_eq!(node.new_flows(svc.id), before, "no new flow");
            let tracked = node.dp.flow(&flow_key(f)).expect("conntrack");
            assert_eq!(tracked.map(|t| t.service_id), Some(svc.id));
            let reply = reply_from(f, backend, port, last_octet(backend));
            let (vip, vport, _) = svc.frontend;
            node.check(&Case::forward(
                "each reply gets its frontend",
                &reply,
                Ingress::Backend,
                &rev_snat(&reply, vip, vport, TO_CLIENT),
            ));
        }

        // A third frontend whose one backend is the first flow's.
        let c = Service::new(9, (vip_v4(), 8082, PROTO_TCP), vec![(91, ba, pa)]);
        c.install(&mut node.dp);
        let fc = client_frame(&c, 40_500);
        node.check(&to_backend("third frontend, same backend", &fc, ba, pa));
        assert_eq!(
            pins.entries(maps::CONNTRACK),
            1,
            "the client entry replaced"
        );
        let reply = reply_from(&fc, ba, pa, last_octet(ba));
        node.check(&Case::forward(
            "the reply gets the newer frontend",
            &reply,
            Ingress::Backend,
            &rev_snat(&reply, vip_v4(), 8082, TO_CLIENT),
        ));
    });
}

/// 1. Connections from one client (different source ports) land on one backend, and
///    the affinity entry holds it.
#[test]
fn affinity_keeps_a_client_on_one_backend() {
    with_node("aff1", |node, svcs| {
        add_affinity_v6(node, svcs);
        for svc in &svcs[AFFINITY_V4..=AFFINITY_V6] {
            let first = first_connection(node, svc, 40_200);
            let stamped = affinity_entry(node, svc).expect("entry").last_seen_ns;
            for sport in 40_201..40_221 {
                new_connection(node, svc, sport, first, "next connection, same client");
            }
            let entry = affinity_entry(node, svc).expect("entry");
            assert_eq!(entry.backend_id, first.0, "the entry keeps the backend");
            assert!(
                entry.last_seen_ns >= stamped,
                "new connections refresh the entry"
            );
        }
    });
}

/// 2. Within the timeout, a new connection keeps the client's backend even after the
///    table has moved the client's slot to another backend (plain hashing would not).
#[test]
fn affinity_outlives_a_table_change() {
    with_node("aff2", |node, svcs| {
        add_affinity_v6(node, svcs);
        for svc in &mut svcs[AFFINITY_V4..=AFFINITY_V6] {
            let first = first_connection(node, svc, 40_300);
            let moved = move_client_away(node, svc, first.0);
            assert_ne!(moved.0, first.0);
            new_connection(
                node,
                svc,
                40_301,
                first,
                "new connection after a table change",
            );
            new_connection(node, svc, 40_302, first, "and another one");
            let entry = affinity_entry(node, svc).expect("entry");
            assert_eq!(
                entry.backend_id, first.0,
                "the entry still holds the first backend"
            );
        }
    });
}

/// 3. Once the timeout has passed since the client's last new connection, its next one
///    follows the table, and the entry remembers the new backend. No sleeping: the test
///    ages the entry from userspace. `now - last_seen < timeout` keeps it, so an entry
///    exactly one timeout old has expired whatever the clock did meanwhile.
#[test]
fn affinity_expires_after_the_timeout() {
    const TIMEOUT_S: u32 = 10;
    const NS: u64 = 1_000_000_000;
    with_node("aff3", |node, svcs| {
        add_affinity_v6(node, svcs);
        let pins = Pins::new(&node.dp);
        for svc in &mut svcs[AFFINITY_V4..=AFFINITY_V6] {
            svc.affinity_timeout_s = TIMEOUT_S;
            svc.install(&mut node.dp);
            let key = svc.affinity_key(client_of(svc));
            let first = first_connection(node, svc, 40_400);
            let moved = move_client_away(node, svc, first.0);

            // Half the timeout ago: still the client's backend, and refreshed.
            let entry = affinity_entry(node, svc).expect("entry");
            let aged = Affinity {
                last_seen_ns: entry.last_seen_ns - u64::from(TIMEOUT_S) / 2 * NS,
                ..entry
            };
            pins.set_affinity(&key, &aged);
            new_connection(node, svc, 40_401, first, "within the timeout");
            let entry = affinity_entry(node, svc).expect("entry");
            assert_eq!(entry.backend_id, first.0);
            assert!(entry.last_seen_ns > aged.last_seen_ns, "refreshed");

            // A whole timeout ago: expired, the table decides and the entry follows.
            let expired = Affinity {
                last_seen_ns: entry.last_seen_ns - u64::from(TIMEOUT_S) * NS,
                ..entry
            };
            pins.set_affinity(&key, &expired);
            new_connection(node, svc, 40_402, moved, "after the timeout");
            let entry = affinity_entry(node, svc).expect("entry");
            assert_eq!(entry.backend_id, moved.0, "the entry holds the new backend");
            assert!(
                entry.last_seen_ns > expired.last_seen_ns,
                "and a fresh stamp"
            );
            new_connection(node, svc, 40_403, moved, "the new backend sticks");
        }
    });
}

/// 4. The client's backend is deleted (slot emptied): its next connection is placed by
///    the table and the entry updated. The same when the id is recycled for a backend
///    of another service.
#[test]
fn affinity_reselects_when_its_backend_is_removed() {
    with_node("aff4", |node, svcs| {
        add_affinity_v6(node, svcs);
        for svc in &mut svcs[AFFINITY_V4..=AFFINITY_V6] {
            let first = first_connection(node, svc, 40_500);

            // Deleted: new table first, then the slot emptied (the agent's order).
            svc.backends.retain(|b| b.0 != first.0);
            svc.rebuild_table();
            node.dp
                .set_maglev_table(svc.id, &svc.table)
                .expect("new table");
            node.dp.remove_backend(first.0).expect("delete backend");
            let second = svc.expected_backend(&client_frame(svc, 40_501));
            new_connection(node, svc, 40_501, second, "affinity backend deleted");
            let entry = affinity_entry(node, svc).expect("entry");
            assert_eq!(entry.backend_id, second.0, "the entry follows the table");
            new_connection(node, svc, 40_502, second, "and sticks there");

            // Recycled: the id now holds a backend of service 1, and this service
            // gets a new backend (a port no other backend uses).
            let (ip, port) = (second.1, 9_500);
            node.dp
                .set_backend(
                    second.0,
                    Backend {
                        addr: addr16(ip),
                        port: 7_070u16.to_be(),
                        family: family(ip),
                        flags: 0,
                        service_id: 1,
                    },
                )
                .expect("recycle the backend id");
            let third = (second.0 + 100, ip, port);
            svc.backends = vec![third];
            svc.rebuild_table();
            svc.install(&mut node.dp);
            new_connection(node, svc, 40_503, third, "affinity backend id recycled");
            let entry = affinity_entry(node, svc).expect("entry");
            assert_eq!(entry.backend_id, third.0, "the entry follows the table");
        }
    });
}

/// 4b. A drained backend (weight 0: `BACKEND_F_DRAINING`, out of the table) keeps
/// its tracked flows but gets no new ones through affinity: the client follows the
/// table, and the entry with it.
#[test]
fn affinity_does_not_send_new_flows_to_a_drained_backend() {
    with_node("aff4b", |node, svcs| {
        add_affinity_v6(node, svcs);
        for svc in &mut svcs[AFFINITY_V4..=AFFINITY_V6] {
            let first = first_connection(node, svc, 40_550);
            svc.drain(&mut node.dp, first.0);
            let second = svc.expected_backend(&client_frame(svc, 40_551));
            assert_ne!(second.0, first.0);
            new_connection(node, svc, 40_551, second, "affinity backend drained");
            let entry = affinity_entry(node, svc).expect("entry");
            assert_eq!(entry.backend_id, second.0, "the entry follows the table");
        }
    });
}

/// 5. Frontends without the affinity flag never write an affinity entry.
#[test]
fn no_affinity_entry_without_the_flag() {
    with_node("aff5", |node, svcs| {
        let pins = Pins::new(&node.dp);
        for (svc, sport) in svcs[..4].iter().zip(40_600..) {
            assert!(!svc.affinity);
            flow_round_trip(node, svc, sport, "new flow without affinity");
            let no_entry = |node: &Node| {
                assert_eq!(
                    affinity_entry(node, svc),
                    None,
                    "no entry for service {}",
                    svc.id
                );
            };
            no_entry(node);
            let f = client_frame(svc, sport + 10);
            new_connection(
                node,
                svc,
                sport + 10,
                svc.expected_backend(&f),
                "another one",
            );
            no_entry(node);
        }
        assert_eq!(pins.affinity_entries(), 0, "the affinity map stays empty");
        // The map and the dump do see entries: one affinity connection writes one.
        let svc = &svcs[AFFINITY_V4];
        let f = client_frame(svc, 40_650);
        new_connection(node, svc, 40_650, svc.expected_backend(&f), "affinity");
        assert_eq!(
            pins.affinity_entries(),
            1,
            "one entry, the affinity service's"
        );
    });
}

// --- Reject (kube-proxy's REJECT) -----------------------------------------------------

fn vip_reject_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 90))
}

fn vip_reject_v6() -> IpAddr {
    IpAddr::V6("2001:db8:f::90".parse().expect("address"))
}

/// Services without backends that reject: TCP and UDP, IPv4 and IPv6 (ids 20..=23).
/// The IPv6 TCP one has no table at all (the agent removes it when the last backend
/// goes), the others a table of empty slots.
fn add_reject_services(node: &mut Node) -> [Service; 4] {
    let tcp = PROTO_TCP;
    let udp = lb_common::PROTO_UDP;
    let mut svcs = [
        Service::new(20, (vip_reject_v4(), 80, tcp), vec![]),
        Service::new(21, (vip_reject_v4(), 53, udp), vec![]),
        Service::new(22, (vip_reject_v6(), 80, tcp), vec![]),
        Service::new(23, (vip_reject_v6(), 53, udp), vec![]),
    ];
    for svc in &mut svcs {
        svc.flags = FRONTEND_F_REJECT_EMPTY;
        svc.install(&mut node.dp);
    }
    node.dp.remove_maglev_table(22).expect("remove table");
    svcs
}

/// A TCP segment from `client` to `vip`, with the fields a reset is computed from.
#[derive(Clone, Copy)]
struct Segment<'a> {
    seq: u32,
    /// The ACK flag and number.
    ack: Option<u32>,
    /// SYN, FIN, RST as `CTL_*` bits.
    ctl: u8,
    /// An MSS option (the reset must carry none).
    mss: bool,
    payload: &'a [u8],
}

const CTL_FIN: u8 = 1;
const CTL_SYN: u8 = 2;
const CTL_RST: u8 = 4;

const SYN: Segment<'static> = Segment {
    seq: 0x1234_5678,
    ack: None,
    ctl: CTL_SYN,
    mss: true,
    payload: b"",
};

fn ip_step(
    eth: etherparse::PacketBuilderStep<etherparse::Ethernet2Header>,
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => panic!("one family"),
    }
}

fn tcp_segment(client: IpAddr, sport: u16, vip: IpAddr, seg: &Segment<'_>) -> Vec<u8> {
    let eth = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LB_CLIENT_MAC);
    let mut tcp = ip_step(eth, client, vip, 64).tcp(sport, 80, seg.seq, 64240);
    if seg.ctl & CTL_SYN != 0 {
        tcp = tcp.syn();
    }
    if seg.ctl & CTL_FIN != 0 {
        tcp = tcp.fin();
    }
    if seg.ctl & CTL_RST != 0 {
        tcp = tcp.rst();
    }
    if let Some(ack) = seg.ack {
        tcp = tcp.ack(ack);
    }
    if seg.mss {
        tcp = tcp
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
            .expect("MSS option");
    }
    let mut out = Vec::new();
    tcp.write(&mut out, seg.payload).expect("write to Vec");
    out
}

/// The reset the node must send back: from the VIP to the client, to the MAC the
/// segment came from, a fresh TTL, no options, no payload, window 0.
fn tcp_reset(client: IpAddr, sport: u16, vip: IpAddr, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let eth = etherparse::PacketBuilder::ethernet2(LB_CLIENT_MAC, CLIENT_MAC);
    let mut tcp = ip_step(eth, vip, client, 64).tcp(80, sport, seq, 0).rst();
    if let Some(ack) = ack {
        tcp = tcp.ack(ack);
    }
    let mut out = Vec::new();
    tcp.write(&mut out, &[]).expect("write to Vec");
    out
}

/// Checks a reset field by field, as a client's stack reads it.
fn assert_reset(frame: &[u8], what: &str, seq: u32, ack: Option<u32>) {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
    let ttl = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            assert!(ip.header().options().is_empty(), "{what}: IPv4 options");
            ip.header().ttl()
        }
        Some(NetSlice::Ipv6(ip)) => ip.header().hop_limit(),
        None => panic!("{what}: no IP"),
    };
    assert_eq!(ttl, 64, "{what}: fresh TTL");
    let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
        panic!("{what}: not TCP");
    };
    assert!(tcp.rst() && !tcp.syn() && !tcp.fin(), "{what}: flags");
    assert_eq!(tcp.sequence_number(), seq, "{what}: seq");
    assert_eq!(tcp.ack(), ack.is_some(), "{what}: ACK flag");
    assert_eq!(tcp.acknowledgment_number(), ack.unwrap_or(0), "{what}: ack");
    assert_eq!(tcp.data_offset(), 5, "{what}: no options");
    assert!(tcp.payload().is_empty(), "{what}: no payload");
    lb_testbed::frames::verify_checksums(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// A reset case: the segment in, the reset out (redirected back out of the client's
/// interface), counted, nothing tracked.
fn check_reset(
    node: &mut Node,
    svc: &Service,
    sport: u16,
    seg: &Segment<'_>,
    want: (u32, Option<u32>),
    what: &'static str,
) {
    let (vip, _, _) = svc.frontend;
    let client = client_of(svc);
    let input = tcp_segment(client, sport, vip, seg);
    let output = tcp_reset(client, sport, vip, want.0, want.1);
    let resets = node.reason(Reason::RejectTcpReset);
    let rejected = node.dp.service_stats(svc.id).expect("stats").rejected;
    node.check(&Case {
        description: what,
        input: input.clone(),
        ingress: Ingress::Client,
        action: XDP_REDIRECT,
        output: Some(output.clone()),
    });
    assert_reset(&output, what, want.0, want.1);
    assert_eq!(
        node.reason(Reason::RejectTcpReset),
        resets + 1,
        "{what}: counted"
    );
    assert_eq!(
        node.dp.service_stats(svc.id).expect("stats").rejected,
        rejected + 1,
        "{what}: counted for the service"
    );
    let key = lb_testbed::node::flow_key(&Frame::tcp(client, sport, vip, 80));
    assert_eq!(
        node.dp.flow(&key).expect("conntrack"),
        None,
        "{what}: not tracked"
    );
}

/// A case the node must drop untouched, counted under `reason`.
fn check_dropped(node: &mut Node, input: Vec<u8>, reason: Reason, what: &'static str) {
    let before = node.reason(reason);
    node.check(&Case {
        description: what,
        input,
        ingress: Ingress::Client,
        action: XDP_DROP,
        output: None,
    });
    assert_eq!(
        node.reason(reason),
        before + 1,
        "{what}: counted as {reason:?}"
    );
}

#[test]
fn tcp_to_an_empty_rejecting_service_gets_a_reset() {
    with_node("rst", |node, _| {
        let svcs = add_reject_services(node);
        for svc in [&svcs[0], &svcs[2]] {
            // A SYN (with an MSS option): RST|ACK acknowledging the SYN.
            check_reset(node, svc, 41_000, &SYN, (0, Some(SYN.seq + 1)), "SYN");
            // A mid-stream segment with ACK and data: RST with SEQ = its ACK.
            let data = Segment {
                seq: 0x0bad_cafe,
                ack: Some(0xfeed_beef),
                ctl: 0,
                mss: false,
                payload: b"GET / HTTP/1.1\r\n\r\n",
            };
            check_reset(
                node,
                svc,
                41_001,
                &data,
                (0xfeed_beef, None),
                "mid-stream ACK",
            );
            // No ACK: SEQ 0, ACK = SEQ + data + SYN + FIN (wrapping).
            let odd = Segment {
                seq: u32::MAX - 2,
                ctl: CTL_SYN | CTL_FIN,
                payload: b"hello",
                ..SYN
            };
            check_reset(
                node,
                svc,
                41_002,
                &odd,
                (0, Some((u32::MAX - 2).wrapping_add(5 + 2))),
                "SYN+FIN with data, no ACK",
            );
            // Never a reset for a reset.
            let reset = Segment {
                ctl: CTL_RST,
                ack: Some(7),
                ..SYN
            };
            let (vip, _, _) = svc.frontend;
            check_dropped(
                node,
                tcp_segment(client_of(svc), 41_003, vip, &reset),
                Reason::DropNoBackend,
                "a reset is not answered",
            );
        }

        // IPv4 options: the reset is built without them.
        let mut f =
            Frame::tcp(client_v4(), 41_010, vip_reject_v4(), 80).macs(CLIENT_MAC, LB_CLIENT_MAC);
        f.ipv4_options = vec![0x01, 0x01, 0x01, 0x00];
        let output = tcp_reset(client_v4(), 41_010, vip_reject_v4(), 0, None);
        node.check(&Case {
            description: "ACK segment with IPv4 options",
            input: f.build(),
            ingress: Ingress::Client,
            action: XDP_REDIRECT,
            output: Some(output),
        });

        // A source that must not be answered.
        let from_nowhere = tcp_segment(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            41_011,
            vip_reject_v4(),
            &SYN,
        );
        check_dropped(
            node,
            from_nowhere,
            Reason::DropNoBackend,
            "unspecified source",
        );
    });
}

/// The ICMP error the node must send back for `input` (untagged or with `vlan`): from
/// the VIP to the client, quoting the client's IP header and UDP header.
fn port_unreachable(input: &[u8], client: IpAddr, vip: IpAddr, vlan: Option<u16>) -> Vec<u8> {
    let l3 = if vlan.is_some() { 18 } else { 14 };
    let quoted = &input[l3..l3 + if vip.is_ipv4() { 20 } else { 40 } + 8];
    let eth = etherparse::PacketBuilder::ethernet2(LB_CLIENT_MAC, CLIENT_MAC);
    let ip = match vlan {
        Some(id) => {
            let tagged = eth.single_vlan(etherparse::VlanId::try_new(id).expect("vlan id"));
            match (vip, client) {
                (IpAddr::V4(s), IpAddr::V4(d)) => tagged.ipv4(s.octets(), d.octets(), 64),
                (IpAddr::V6(s), IpAddr::V6(d)) => tagged.ipv6(s.octets(), d.octets(), 64),
                _ => panic!("one family"),
            }
        }
        None => ip_step(eth, vip, client, 64),
    };
    let mut out = Vec::new();
    if vip.is_ipv4() {
        ip.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut out, quoted)
    } else {
        ip.icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
            etherparse::icmpv6::DestUnreachableCode::Port,
        ))
        .write(&mut out, quoted)
    }
    .expect("write to Vec");
    out
}

/// Checks an ICMP error field by field: type, code, the quote, the checksum.
fn assert_unreachable(frame: &[u8], input: &[u8], l3: usize, what: &str) {
    use etherparse::{SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (type_code, quote) = match &p.transport {
        Some(TransportSlice::Icmpv4(icmp)) => {
            (icmp.header().to_bytes()[..2].to_vec(), icmp.payload())
        }
        Some(TransportSlice::Icmpv6(icmp)) => {
            (icmp.header().to_bytes()[..2].to_vec(), icmp.payload())
        }
        _ => panic!("{what}: not ICMP"),
    };
    let (want_type, hlen) = if quote[0] >> 4 == 4 {
        ([3, 3], 20)
    } else {
        ([1, 4], 40)
    };
    assert_eq!(type_code, want_type, "{what}: port unreachable");
    assert_eq!(
        quote,
        &input[l3..l3 + hlen + 8],
        "{what}: quotes IP header + 8 bytes"
    );
    lb_testbed::frames::verify_checksums(frame).unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn udp_to_an_empty_rejecting_service_gets_port_unreachable() {
    with_node("icmp", |node, _| {
        let svcs = add_reject_services(node);
        for (svc, vlan, what) in [
            (&svcs[1], None, "IPv4 UDP"),
            (&svcs[3], None, "IPv6 UDP"),
            (&svcs[1], Some(100), "VLAN-tagged IPv4 UDP"),
            (&svcs[3], Some(100), "VLAN-tagged IPv6 UDP"),
        ] {
            let (vip, port, _) = svc.frontend;
            let client = client_of(svc);
            let mut f = Frame::udp(client, 42_000, vip, port).macs(CLIENT_MAC, LB_CLIENT_MAC);
            f.vlan = vlan;
            let input = f.build();
            let output = port_unreachable(&input, client, vip, vlan);
            let before = node.reason(Reason::RejectIcmpUnreachable);
            node.check(&Case {
                description: what,
                input: input.clone(),
                ingress: Ingress::Client,
                action: XDP_REDIRECT,
                output: Some(output.clone()),
            });
            assert_unreachable(&output, &input, if vlan.is_some() { 18 } else { 14 }, what);
            assert_eq!(
                node.reason(Reason::RejectIcmpUnreachable),
                before + 1,
                "{what}: counted"
            );
            assert_eq!(
                node.dp.flow(&flow_key(&f)).expect("conntrack"),
                None,
                "{what}: not tracked"
            );
        }
        assert_eq!(node.dp.service_stats(21).expect("stats").rejected, 2);
        assert_eq!(node.dp.service_stats(23).expect("stats").rejected, 2);

        // IPv4 with options: dropped (and counted), not answered.
        let mut f =
            Frame::udp(client_v4(), 42_001, vip_reject_v4(), 53).macs(CLIENT_MAC, LB_CLIENT_MAC);
        f.ipv4_options = vec![0x01, 0x01, 0x01, 0x00];
        check_dropped(
            node,
            f.build(),
            Reason::DropNoBackend,
            "IPv4 UDP with options",
        );
    });
}

#[test]
fn rejecting_applies_only_while_the_service_is_empty_and_drop_mode_still_drops() {
    with_node("rjmode", |node, svcs| {
        // The standard IPv4 TCP service with backends, now rejecting when empty.
        svcs[0].flags = FRONTEND_F_REJECT_EMPTY;
        svcs[0].install(&mut node.dp);
        flow_round_trip(node, &svcs[0], 43_000, "rejecting service with backends");
        // It loses its backends (table first, then the slots, as the agent does): the
        // tracked flow and a new one are refused with a reset.
        node.dp.remove_maglev_table(1).expect("remove table");
        for (id, _, _) in svcs[0].backends.clone() {
            node.dp.remove_backend(id).expect("remove backend");
        }
        check_reset(
            node,
            &svcs[0],
            43_001,
            &SYN,
            (0, Some(SYN.seq + 1)),
            "after its backends left",
        );

        // The standard empty service drops (WhenEmpty::Drop).
        let f = client_frame(&svcs[4], 43_002);
        check_dropped(node, f.build(), Reason::DropNoBackend, "drop-mode service");
        let f =
            Frame::udp(client_v4(), 43_003, svcs[4].frontend.0, 80).macs(CLIENT_MAC, LB_CLIENT_MAC);
        node.check(&Case::pass(
            "drop-mode service, another protocol",
            f.build(),
            Ingress::Client,
        ));
    });
}

// --- Source ranges (`loadBalancerSourceRanges`) -----------------------------------------

fn net(text: &str) -> ipnet::IpNet {
    text.parse().expect("test range")
}

/// A client of `svc` from address `client`.
fn frame_from(svc: &Service, client: IpAddr, sport: u16) -> Frame {
    let (vip, port, _) = svc.frontend;
    Frame::tcp(client, sport, vip, port)
        .syn()
        .macs(CLIENT_MAC, LB_CLIENT_MAC)
}

#[test]
fn source_ranges_admit_clients_inside_and_drop_the_others() {
    with_node("srcrange", |node, _| {
        let tcp = PROTO_TCP;
        let mut v4 = Service::new(
            30,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 91)), 80, tcp),
            vec![(301, backend_v4(11), 8080), (302, backend_v4(12), 8080)],
        );
        let mut v6 = Service::new(
            31,
            (
                IpAddr::V6("2001:db8:f::91".parse().expect("address")),
                80,
                tcp,
            ),
            vec![(311, backend_v6(11), 8080), (312, backend_v6(12), 8080)],
        );
        for svc in [&mut v4, &mut v6] {
            svc.flags = FRONTEND_F_SOURCE_RANGES;
            svc.install(&mut node.dp);
        }
        node.dp
            .add_source_range(30, net("198.51.100.0/28"))
            .expect("range");
        node.dp
            .add_source_range(30, net("2001:db8:c::/64"))
            .expect("range");
        node.dp
            .add_source_range(31, net("2001:db8:c::/64"))
            .expect("range");
        // Another service's range admits nobody here.
        node.dp
            .add_source_range(32, net("198.51.100.128/25"))
            .expect("range");

        let outside_v4 = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200));
        let outside_v6: IpAddr = "2001:db8:d::2".parse().expect("address");
        for (svc, inside, outside) in [
            (&v4, client_v4(), outside_v4),
            (&v6, client_v6(), outside_v6),
        ] {
            let f = frame_from(svc, inside, 44_000);
            let (_, backend, bport) = svc.expected_backend(&f);
            node.check(&to_backend("client inside the ranges", &f, backend, bport));
            let denied = node.dp.service_stats(svc.id).expect("stats").source_denied;
            let f = frame_from(svc, outside, 44_001);
            check_dropped(
                node,
                f.build(),
                Reason::DropSourceRange,
                "client outside the ranges",
            );
            assert_eq!(
                node.dp.flow(&flow_key(&f)).expect("ct"),
                None,
                "not tracked"
            );
            assert_eq!(
                node.dp.service_stats(svc.id).expect("stats").source_denied,
                denied + 1,
                "counted for the service"
            );
        }

        // Ranges removed while the frontend still asks: nobody new gets in.
        node.dp
            .remove_source_range(31, net("2001:db8:c::/64"))
            .expect("remove");
        let f = frame_from(&v6, client_v6(), 44_002);
        check_dropped(node, f.build(), Reason::DropSourceRange, "no range left");
    });
}

#[test]
fn an_established_flow_survives_new_source_ranges_that_exclude_it() {
    with_node("srcest", |node, _| {
        let mut svc = Service::new(
            33,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 92)), 80, PROTO_TCP),
            vec![(331, backend_v4(11), 8080), (332, backend_v4(12), 8080)],
        );
        svc.install(&mut node.dp);
        let outsider = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200));
        let f = frame_from(&svc, outsider, 45_000);
        let (_, backend, bport) = svc.expected_backend(&f);
        node.check(&to_backend("before the ranges", &f, backend, bport));

        // Ranges arrive (as the agent orders it: ranges first, then the flag).
        node.dp
            .add_source_range(33, net("198.51.100.0/28"))
            .expect("range");
        svc.flags = FRONTEND_F_SOURCE_RANGES;
        svc.install(&mut node.dp);
        let again = f.clone().established();
        node.check(&to_backend(
            "the tracked flow goes on",
            &again,
            backend,
            bport,
        ));
        node.check(&to_backend(
            "and so does its SYN again (retransmitted)",
            &f,
            backend,
            bport,
        ));
        let new = frame_from(&svc, outsider, 45_001);
        check_dropped(
            node,
            new.build(),
            Reason::DropSourceRange,
            "a new flow does not",
        );
    });
}

/// A bare SYN is not looked up before its backend is chosen; when the table has none
/// for it (every backend draining), a kept flow's SYN again still reaches its backend,
/// without counting a new flow, while a new connection is dropped.
#[test]
fn a_kept_flows_syn_again_keeps_its_backend_when_the_table_empties() {
    with_node("synkept", |node, _| {
        let mut svc = Service::new(
            34,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 93)), 80, PROTO_TCP),
            vec![(341, backend_v4(11), 8080), (342, backend_v4(12), 8080)],
        );
        svc.install(&mut node.dp);
        let f = client_frame(&svc, 45_100);
        let (_, backend, bport) = svc.expected_backend(&f);
        node.check(&to_backend("first SYN", &f, backend, bport));

        // Both backends drain: still there, out of the table.
        svc.table = vec![0; svc.table.len()];
        node.dp
            .set_maglev_table(34, &svc.table)
            .expect("empty table");
        let before = node.new_flows(34);
        node.check(&to_backend("its SYN again", &f, backend, bport));
        assert_eq!(node.new_flows(34), before, "the flow is kept, not new");
        check_dropped(
            node,
            client_frame(&svc, 45_101).build(),
            Reason::DropNoBackend,
            "a new connection",
        );
    });
}

/// A bare SYN whose kept flow's backend drains (weight 0, or an endpoint that is no
/// longer ready) is a new connection on a reused client port: it goes to the table and
/// counts as a new flow, and the flow's later packets follow it. Until then the open
/// flow's packets stay with the draining backend.
#[test]
fn a_syn_on_a_reused_port_leaves_a_draining_backend() {
    with_node("syndrain", |node, _| {
        let mut svc = Service::new(
            35,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 94)), 80, PROTO_TCP),
            vec![(351, backend_v4(11), 8080), (352, backend_v4(12), 8080)],
        );
        svc.install(&mut node.dp);
        let f = client_frame(&svc, 45_200);
        let (id, backend, bport) = svc.expected_backend(&f);
        node.check(&to_backend("first SYN", &f, backend, bport));

        svc.drain(&mut node.dp, id);
        let mut data = f.clone().established();
        data.payload = b"more".to_vec();
        node.check(&to_backend("the open flow's data", &data, backend, bport));

        let (_, other, oport) = svc.expected_backend(&f);
        assert_ne!(other, backend);
        let before = node.new_flows(35);
        node.check(&to_backend("a SYN on the reused port", &f, other, oport));
        assert_eq!(node.new_flows(35), before + 1, "a new flow");
        node.check(&to_backend("its data", &data, other, oport));
    });
}

#[test]
fn a_rejecting_service_with_ranges_answers_only_clients_inside() {
    with_node("srcrj", |node, _| {
        let mut svc = Service::new(24, (vip_reject_v4(), 54, lb_common::PROTO_UDP), vec![]);
        svc.flags = FRONTEND_F_REJECT_EMPTY | FRONTEND_F_SOURCE_RANGES;
        svc.install(&mut node.dp);
        node.dp
            .add_source_range(24, net("198.51.100.0/28"))
            .expect("range");
        let outsider = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200));
        let f = Frame::udp(outsider, 46_000, vip_reject_v4(), 54).macs(CLIENT_MAC, LB_CLIENT_MAC);
        check_dropped(
            node,
            f.build(),
            Reason::DropSourceRange,
            "outside: dropped silently",
        );
        let f =
            Frame::udp(client_v4(), 46_001, vip_reject_v4(), 54).macs(CLIENT_MAC, LB_CLIENT_MAC);
        let input = f.build();
        node.check(&Case {
            description: "inside: port unreachable",
            input: input.clone(),
            ingress: Ingress::Client,
            action: XDP_REDIRECT,
            output: Some(port_unreachable(&input, client_v4(), vip_reject_v4(), None)),
        });
    });
}
