//! A single namespace that plays the load-balancer node for `BPF_PROG_TEST_RUN` (one
//! interface towards clients, one towards backends, static neighbours so the FIB
//! lookup resolves), a set of services written into the maps, and the expected-backend
//! oracle (the same flow hash, applied to the same Maglev tables). Shared by the packet
//! tests and `xlb-bench packet`. Set-up failures panic: this is test support.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_agent::dataplane::Dataplane;
use lb_core::maglev;

use crate::frames::{Frame, L4};
use crate::{self as testbed, Netns};
use lb_common::{
    AffinityKey, BACKEND_F_DRAINING, Backend, FRONTEND_F_CLIENT_AFFINITY, FlowKey, Frontend,
    FrontendKey, PROTO_TCP, PROTO_UDP, Reason, SNAT_CFG_F_V4, SNAT_CFG_F_V6, SnatConfig, hash,
};

pub const LB_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const LB_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
/// A client that sits on the backend-facing network (`XDP_TX` case).
pub const NEAR_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x50];
pub const TABLE_SIZE: u32 = 251;

pub fn client_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2))
}
pub fn client_v6() -> IpAddr {
    IpAddr::V6("2001:db8:c::2".parse().expect("address"))
}
pub fn near_client_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 50))
}
pub fn vip_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10))
}
pub fn vip_v6() -> IpAddr {
    IpAddr::V6("2001:db8:f::10".parse().expect("address"))
}
/// Backend `n` (11, 12, 13 ...): 192.0.2.n / `2001:db8:b::n`.
pub fn backend_v4(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))
}
pub fn backend_v6(n: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, u16::from(n)))
}
pub fn backend_mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x02, n]
}
/// The node's own addresses, on its backends' side (`bk`): the source of what it
/// source-NATs and of the outer header of what it encapsulates (DSR).
pub fn node_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
}
pub fn node_v6() -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 1))
}
/// The node's own address of `ip`'s family.
pub fn node_addr_for(ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() { node_v4() } else { node_v6() }
}
/// The node's addresses ([`node_v4`], [`node_v6`]) and the port range `min..=max`, as
/// the agent writes them (`--snat-ports`, the node's addresses).
pub fn node_config(port_min: u16, port_max: u16) -> SnatConfig {
    SnatConfig {
        addr_v4: addr16(node_v4()),
        addr_v6: addr16(node_v6()),
        port_min,
        port_max,
        flags: SNAT_CFG_F_V4 | SNAT_CFG_F_V6,
        _pad: [0; 3],
    }
}
/// The last byte of an address: a test backend's number (`backend_v4(n)`).
pub fn last_octet(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    }
}
/// Packets the program counted under `reason` so far.
pub fn reason_packets(dp: &Dataplane, reason: Reason) -> u64 {
    dp.reason_stats()
        .expect("reason stats")
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, s)| s.packets)
}
/// Backends 11 and 12 have neighbour entries; 13 has none (FIB: no neighbour).
pub const RESOLVED_BACKENDS: [u8; 2] = [11, 12];

/// The node: `cl` towards clients, `bk` towards backends (veth pairs whose peers stay
/// in the same namespace, so the devmap accepts them), forwarding on, neighbours fixed.
pub struct Router {
    pub ns: Netns,
}

impl Router {
    pub fn new(tag: &str) -> Router {
        testbed::check_privileges().expect("privileges for the packet tests");
        let ns = Netns::new(tag).expect("create the router namespace");
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let lb_client_mac = mac(LB_CLIENT_MAC);
        let lb_backend_mac = mac(LB_BACKEND_MAC);
        let mut cmds: Vec<Vec<String>> = vec![
            vec![
                "link",
                "add",
                "cl",
                "address",
                &lb_client_mac,
                "type",
                "veth",
                "peer",
                "name",
                "clp",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            vec![
                "link",
                "add",
                "bk",
                "address",
                &lb_backend_mac,
                "type",
                "veth",
                "peer",
                "name",
                "bkp",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        ];
        for line in [
            "link set cl up",
            "link set clp up",
            "link set bk up",
            "link set bkp up",
            "addr add 198.51.100.1/24 dev cl",
            "addr add 2001:db8:c::1/64 dev cl nodad",
            "addr add 192.0.2.1/24 dev bk",
            "addr add 2001:db8:b::1/64 dev bk nodad",
        ] {
            cmds.push(line.split(' ').map(String::from).collect());
        }
        let mut neigh = |addr: String, m: [u8; 6], dev: &str| {
            cmds.push(
                [
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    &mac(m),
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]
                .into_iter()
                .map(String::from)
                .collect(),
            );
        };
        neigh(client_v4().to_string(), CLIENT_MAC, "cl");
        neigh(client_v6().to_string(), CLIENT_MAC, "cl");
        neigh(near_client_v4().to_string(), NEAR_CLIENT_MAC, "bk");
        for n in RESOLVED_BACKENDS {
            neigh(backend_v4(n).to_string(), backend_mac(n), "bk");
            neigh(backend_v6(n).to_string(), backend_mac(n), "bk");
        }
        for cmd in &cmds {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            ns.ip(&args).expect("configure the router namespace");
        }
        ns.sysctl("net.ipv4.ip_forward", "1").expect("sysctl");
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")
            .expect("sysctl");
        Router { ns }
    }
}

/// Loads the program; must run on a thread inside the router namespace (the devmap
/// entries and FIB lookups are per namespace).
pub fn load_dataplane() -> Dataplane {
    let mut dp = Dataplane::load(None).expect(
        "load the XDP program (run through `cargo xtask test`, which builds it and sets \
         XLB_EBPF_OBJECT)",
    );
    for dev in ["cl", "bk"] {
        let ifindex = lb_agent::dataplane::loader::ifindex(dev).expect("ifindex");
        dp.add_tx_port(ifindex).expect("devmap");
    }
    dp
}

/// The 16-byte key form of an address.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    lb_common::addr_key(ip).0
}

/// The family tag of an address.
pub fn family(ip: IpAddr) -> u8 {
    lb_common::addr_key(ip).1
}

/// A service as the tests install it.
pub struct Service {
    pub id: u32,
    pub frontend: (IpAddr, u16, u8),
    /// (backend id, address, port)
    pub backends: Vec<(u32, IpAddr, u16)>,
    pub affinity: bool,
    /// With `affinity`: how long a client keeps its backend between new connections.
    pub affinity_timeout_s: u32,
    /// More `FRONTEND_F_*` flags for its frontend (reject, source ranges).
    pub flags: u32,
    pub table: Vec<u32>,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

impl Service {
    pub fn new(id: u32, frontend: (IpAddr, u16, u8), backends: Vec<(u32, IpAddr, u16)>) -> Service {
        let mut s = Service {
            id,
            frontend,
            backends,
            affinity: false,
            affinity_timeout_s: DEFAULT_AFFINITY_TIMEOUT_S,
            flags: 0,
            table: Vec::new(),
        };
        s.rebuild_table();
        s
    }

    pub fn rebuild_table(&mut self) {
        let identities: Vec<String> = self
            .backends
            .iter()
            .map(|(_, ip, port)| format!("{ip}:{port}"))
            .collect();
        let input: Vec<maglev::Backend<'_>> = self
            .backends
            .iter()
            .zip(&identities)
            .map(|((id, _, _), identity)| maglev::Backend {
                id: *id,
                identity: identity.as_bytes(),
                weight: 1,
            })
            .collect();
        self.table = maglev::build_table(&input, TABLE_SIZE).expect("maglev table");
    }

    pub fn frontend_key(&self) -> FrontendKey {
        FrontendKey {
            addr: addr16(self.frontend.0),
            port: self.frontend.1.to_be(),
            proto: self.frontend.2,
            family: family(self.frontend.0),
        }
    }

    /// The backend slot of `ip`:`port` in this service.
    fn slot(&self, ip: IpAddr, port: u16, flags: u8) -> Backend {
        Backend {
            addr: addr16(ip),
            port: port.to_be(),
            family: family(ip),
            flags,
            service_id: self.id,
        }
    }

    pub fn install(&self, dp: &mut Dataplane) {
        for (id, ip, port) in &self.backends {
            dp.set_backend(*id, self.slot(*ip, *port, 0))
                .expect("backend");
        }
        dp.set_maglev_table(self.id, &self.table).expect("table");
        dp.set_frontend(
            self.frontend_key(),
            Frontend {
                service_id: self.id,
                flags: self.flags
                    | if self.affinity {
                        FRONTEND_F_CLIENT_AFFINITY
                    } else {
                        0
                    },
                affinity_timeout_s: self.affinity_timeout_s,
                _pad: 0,
            },
        )
        .expect("frontend");
    }

    /// Drains backend `id` as the agent does (weight 0): the table without it first,
    /// then its slot flagged `BACKEND_F_DRAINING`, so its tracked flows keep it.
    pub fn drain(&mut self, dp: &mut Dataplane, id: u32) {
        let (_, ip, port) = *self
            .backends
            .iter()
            .find(|b| b.0 == id)
            .expect("a backend of the service");
        self.backends.retain(|b| b.0 != id);
        self.rebuild_table();
        dp.set_maglev_table(self.id, &self.table)
            .expect("new table");
        dp.set_backend(id, self.slot(ip, port, BACKEND_F_DRAINING))
            .expect("drain");
    }

    /// The session-affinity key of `client` for this service.
    pub fn affinity_key(&self, client: IpAddr) -> AffinityKey {
        AffinityKey {
            client: addr16(client),
            service_id: self.id,
            family: family(client),
            _pad: [0; 3],
        }
    }

    /// The backend the table gives a new flow `frame` (the oracle). With session
    /// affinity, that is where a client goes that has no fresh affinity entry.
    pub fn expected_backend(&self, frame: &Frame) -> (u32, IpAddr, u16) {
        let key = flow_key(frame);
        let h = if self.affinity {
            hash::client_hash(&key.src)
        } else {
            hash::flow_hash(&key)
        };
        let id = self.table[(h % TABLE_SIZE) as usize];
        *self
            .backends
            .iter()
            .find(|b| b.0 == id)
            .expect("table ids are backends")
    }
}

pub fn flow_key(frame: &Frame) -> FlowKey {
    let (sport, dport) = frame.ports();
    FlowKey {
        src: addr16(frame.src),
        dst: addr16(frame.dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: match frame.l4 {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
        },
        family: family(frame.src),
        _pad: [0; 2],
    }
}

/// What the data path must make of `frame` when it forwards it to `to` (DNAT), with
/// the FIB's MACs: the same fields rebuilt from scratch by etherparse.
pub fn dnat(frame: &Frame, to: IpAddr, port: u16, macs: ([u8; 6], [u8; 6])) -> Frame {
    let mut out = frame.clone();
    out.dst = to;
    let (sport, _) = frame.ports();
    out.set_ports(sport, port);
    out.ttl -= 1;
    out.src_mac = macs.0;
    out.dst_mac = macs.1;
    out
}

/// The reply translation: source back to the frontend.
pub fn rev_snat(frame: &Frame, from: IpAddr, port: u16, macs: ([u8; 6], [u8; 6])) -> Frame {
    let mut out = frame.clone();
    out.src = from;
    let (_, dport) = frame.ports();
    out.set_ports(port, dport);
    out.ttl -= 1;
    out.src_mac = macs.0;
    out.dst_mac = macs.1;
    out
}

/// The reply a backend sends for `frame` after DNAT to (`backend`, `port`).
pub fn reply_from(frame: &Frame, backend: IpAddr, port: u16, n: u8) -> Frame {
    let (sport, _) = frame.ports();
    let mut r = frame.clone().established();
    r.src = backend;
    r.dst = frame.src;
    r.set_ports(port, sport);
    r.payload = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    r.macs(backend_mac(n), LB_BACKEND_MAC)
}

/// The standard services of the packet tests.
pub fn services() -> Vec<Service> {
    let tcp = PROTO_TCP;
    let udp = PROTO_UDP;
    let mut affinity = Service::new(
        7,
        (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 70)), 80, tcp),
        vec![(71, backend_v4(11), 8080), (72, backend_v4(12), 8080)],
    );
    affinity.affinity = true;
    affinity.rebuild_table();
    vec![
        Service::new(
            1,
            (vip_v4(), 80, tcp),
            vec![(11, backend_v4(11), 8080), (12, backend_v4(12), 8080)],
        ),
        Service::new(
            2,
            (vip_v4(), 53, udp),
            vec![(21, backend_v4(11), 5353), (22, backend_v4(12), 5353)],
        ),
        Service::new(
            3,
            (vip_v6(), 80, tcp),
            vec![(31, backend_v6(11), 8080), (32, backend_v6(12), 8080)],
        ),
        Service::new(
            4,
            (vip_v6(), 53, udp),
            vec![(41, backend_v6(11), 5353), (42, backend_v6(12), 5353)],
        ),
        // No endpoints.
        Service::new(
            5,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 50)), 80, tcp),
            vec![],
        ),
        // One backend whose MAC the node has not resolved.
        Service::new(
            6,
            (IpAddr::V4(Ipv4Addr::new(203, 0, 113, 60)), 80, tcp),
            vec![(61, backend_v4(13), 8080)],
        ),
        affinity,
    ]
}
