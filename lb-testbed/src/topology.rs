//! The three-tier topology of the end-to-end tests, the demo and the
//! benchmarks: a client, the load balancer, and backends behind a bridge.
//!
//! ```text
//!  client ns            lb ns                       switch ns            backend ns i
//!  eth0 ──────────────── xc        xb ────────────── plb ┐
//!  198.51.100.2/24       198.51.100.1/24  192.0.2.1/24    br0 ─ p<i> ───── eth0
//!  2001:db8:c::2/64      2001:db8:c::1/64 2001:db8:b::1/64               192.0.2.(11+i)/24
//!  (and .3, ::3)
//!  default via .1 / ::1  ip(v6) forwarding on                            2001:db8:b::<11+i>/64
//!                                                                        default via 192.0.2.1
//!                                                                        / 2001:db8:b::1
//! ```
//!
//! VIPs (`203.0.113.0/24`, `2001:db8:f::/64`) are configured on no interface: the
//! client reaches them through its default route to the LB, where the XDP
//! program (attached by the caller to [`Topology::LB_CLIENT_IF`] and
//! [`Topology::LB_BACKEND_IF`]) rewrites them. Without XDP the LB simply
//! routes between the client and backend subnets.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::netns::{Netns, enable_napi, veth_pair};

/// Most backends a topology can have (addresses 192.0.2.11 ..= 192.0.2.50).
pub const MAX_BACKENDS: usize = 40;

/// How long [`Topology::wait_ready`] waits at most.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyConfig {
    /// Goes into every namespace name (`xlb-<tag>-<role>-<pid>-<n>`), so a
    /// leftover namespace tells which test made it.
    pub tag: String,
    /// Number of backend namespaces, `1..=MAX_BACKENDS`.
    pub backends: usize,
}

impl TopologyConfig {
    pub fn new(tag: impl Into<String>, backends: usize) -> Self {
        Self {
            tag: tag.into(),
            backends,
        }
    }
}

/// Client, load balancer, switch and backend namespaces, wired and addressed
/// as in the module docs. Dropping it deletes every namespace.
#[derive(Debug)]
pub struct Topology {
    /// Sends traffic to VIPs; one interface, `eth0`.
    pub client: Netns,
    /// Where the XDP program runs; interfaces `xc` (client side) and `xb`
    /// (backend side), forwarding enabled.
    pub lb: Netns,
    /// An L2 bridge `br0` joining the LB's `xb` and every backend.
    pub switch: Netns,
    /// Backend `i` has `eth0` with [`Topology::backend_v4`]`(i)` and
    /// [`Topology::backend_v6`]`(i)`.
    pub backends: Vec<Netns>,
}

impl Topology {
    /// The LB's interface towards the client (peer of the client's `eth0`).
    pub const LB_CLIENT_IF: &str = "xc";
    /// The LB's interface towards the backends (peer of the switch's `plb`).
    pub const LB_BACKEND_IF: &str = "xb";
    /// The client's only interface.
    pub const CLIENT_IF: &str = "eth0";
    /// Each backend's only interface.
    pub const BACKEND_IF: &str = "eth0";
    /// The bridge in the switch namespace.
    pub const BRIDGE: &str = "br0";
    /// The switch port that is the peer of the LB's `xb`.
    pub const SWITCH_LB_PORT: &str = "plb";

    /// The set-up of a privileged test: checks the privileges, builds the
    /// topology `TopologyConfig::new(tag, backends)` and waits until it is ready.
    ///
    /// # Panics
    ///
    /// When the process lacks the privileges, or the topology cannot be built
    /// or does not become ready.
    #[track_caller]
    #[must_use]
    pub fn for_test(tag: &str, backends: usize) -> Topology {
        crate::check_privileges().expect("privileges");
        let topo = Topology::build(&TopologyConfig::new(tag, backends)).expect("topology");
        topo.wait_ready().expect("topology ready");
        topo
    }

    /// Creates the namespaces, links, addresses and routes. On error,
    /// everything already created is deleted again.
    pub fn build(cfg: &TopologyConfig) -> anyhow::Result<Topology> {
        if !(1..=MAX_BACKENDS).contains(&cfg.backends) {
            bail!(
                "topology {:?}: backends must be 1..={MAX_BACKENDS}, got {}",
                cfg.tag,
                cfg.backends
            );
        }
        let tag = &cfg.tag;
        let client = Netns::new(&format!("{tag}-cl"))?;
        let lb = Netns::new(&format!("{tag}-lb"))?;
        let switch = Netns::new(&format!("{tag}-sw"))?;
        let backends = (0..cfg.backends)
            .map(|i| Netns::new(&format!("{tag}-b{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let topo = Topology {
            client,
            lb,
            switch,
            backends,
        };
        topo.configure()
            .with_context(|| format!("building topology {tag:?}"))?;
        Ok(topo)
    }

    fn configure(&self) -> anyhow::Result<()> {
        // Set before any interface exists, so that new interfaces inherit
        // it: no duplicate address detection, so link-local addresses are
        // usable at once too (the global ones are added with `nodad`).
        for ns in self.namespaces() {
            ns.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ],
            )?;
        }
        // The switch is pure L2; without IPv6 on its ports it sends no
        // router/neighbour solicitations of its own into the test traffic.
        self.switch.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        self.lb.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )?;

        // Links.
        veth_pair(&self.client, Self::CLIENT_IF, &self.lb, Self::LB_CLIENT_IF)?;
        // Forward at once (no STP listening/learning delay) and flood
        // multicast (no MLD querier here, so snooping could starve NDP).
        self.switch.ip(&[
            "link",
            "add",
            Self::BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        self.switch
            .ip(&["link", "set", "dev", Self::BRIDGE, "up"])?;
        veth_pair(
            &self.lb,
            Self::LB_BACKEND_IF,
            &self.switch,
            Self::SWITCH_LB_PORT,
        )?;
        self.switch.ip(&[
            "link",
            "set",
            "dev",
            Self::SWITCH_LB_PORT,
            "master",
            Self::BRIDGE,
        ])?;
        enable_napi(&self.switch, Self::SWITCH_LB_PORT)?;
        for (i, backend) in self.backends.iter().enumerate() {
            let port = Self::switch_port(i);
            veth_pair(backend, Self::BACKEND_IF, &self.switch, &port)?;
            self.switch
                .ip(&["link", "set", "dev", &port, "master", Self::BRIDGE])?;
            enable_napi(&self.switch, &port)?;
        }

        // Addresses and routes.
        let client_gw4 = Self::lb_client_v4().to_string();
        let client_gw6 = Self::lb_client_v6().to_string();
        let backend_gw4 = Self::lb_backend_v4().to_string();
        let backend_gw6 = Self::lb_backend_v6().to_string();
        add_addrs(
            &self.client,
            Self::CLIENT_IF,
            &format!("{}/24", Self::client_v4()),
            &format!("{}/64", Self::client_v6()),
        )?;
        self.add_second_client_address()?;
        add_default_routes(&self.client, &client_gw4, &client_gw6)?;
        add_addrs(
            &self.lb,
            Self::LB_CLIENT_IF,
            &format!("{client_gw4}/24"),
            &format!("{client_gw6}/64"),
        )?;
        add_addrs(
            &self.lb,
            Self::LB_BACKEND_IF,
            &format!("{backend_gw4}/24"),
            &format!("{backend_gw6}/64"),
        )?;
        for (i, backend) in self.backends.iter().enumerate() {
            add_addrs(
                backend,
                Self::BACKEND_IF,
                &format!("{}/24", Self::backend_v4(i)),
                &format!("{}/64", Self::backend_v6(i)),
            )?;
            add_default_routes(backend, &backend_gw4, &backend_gw6)?;
        }
        Ok(())
    }

    /// A second client address, for tests of per-client policy (source ranges). The
    /// first stays the source of connections that do not bind one: an IPv4 secondary
    /// is never chosen, and the IPv6 one is deprecated (preferred lifetime 0).
    fn add_second_client_address(&self) -> anyhow::Result<()> {
        self.client.ip(&[
            "-4",
            "addr",
            "add",
            &format!("{}/24", Self::client2_v4()),
            "dev",
            Self::CLIENT_IF,
        ])?;
        self.client.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", Self::client2_v6()),
            "dev",
            Self::CLIENT_IF,
            "nodad",
            "preferred_lft",
            "0",
        ])?;
        Ok(())
    }

    /// Every namespace of the topology: client, LB, switch, then backends.
    pub fn namespaces(&self) -> impl Iterator<Item = &Netns> {
        [&self.client, &self.lb, &self.switch]
            .into_iter()
            .chain(&self.backends)
    }

    /// The LB's interfaces ([`Self::LB_CLIENT_IF`], [`Self::LB_BACKEND_IF`])
    /// that have an XDP program attached.
    ///
    /// # Panics
    ///
    /// When `ip link show` fails.
    #[must_use]
    pub fn xdp_attached(&self) -> Vec<&'static str> {
        [Self::LB_CLIENT_IF, Self::LB_BACKEND_IF]
            .into_iter()
            .filter(|ifname| {
                self.lb
                    .ip(&["link", "show", "dev", ifname])
                    .expect("ip link")
                    .contains("prog/xdp")
            })
            .collect()
    }

    /// Waits (at most 3 s) until every interface is up and no IPv6 address
    /// is tentative (still doing duplicate address detection, so unusable),
    /// by polling `ip -n NS -j addr`. Sends no traffic.
    pub fn wait_ready(&self) -> anyhow::Result<()> {
        let namespaces: Vec<&Netns> = self.namespaces().collect();
        wait_until_ready("topology", &namespaces, READY_TIMEOUT)
    }

    /// The client's address, 198.51.100.2.
    pub fn client_v4() -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 2)
    }

    /// The client's address, `2001:db8:c::2`.
    pub fn client_v6() -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 2)
    }

    /// The client's second address, 198.51.100.3 (bind to it to use it).
    pub fn client2_v4() -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 3)
    }

    /// The client's second address, `2001:db8:c::3`.
    pub fn client2_v6() -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 3)
    }

    /// The LB's address on `xc`, the client's gateway: 198.51.100.1.
    pub fn lb_client_v4() -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 1)
    }

    /// The LB's address on `xc`, the client's gateway: `2001:db8:c::1`.
    pub fn lb_client_v6() -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1)
    }

    /// The LB's address on `xb`, the backends' gateway: 192.0.2.1.
    pub fn lb_backend_v4() -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 1)
    }

    /// The LB's address on `xb`, the backends' gateway: `2001:db8:b::1`.
    pub fn lb_backend_v6() -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 1)
    }

    /// Backend `i`'s address (`i` from 0): 192.0.2.(11 + i), so backend 0 is
    /// 192.0.2.11 and backend 39 is 192.0.2.50.
    ///
    /// # Panics
    /// If `i >= MAX_BACKENDS`.
    pub fn backend_v4(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, backend_host(i))
    }

    /// Backend `i`'s address (`i` from 0): `2001:db8:b::<11 + i>` where the
    /// decimal number 11 + i is written as the last hex group, so the IPv6
    /// address ends in the same digits as [`Topology::backend_v4`]: backend 0
    /// is `2001:db8:b::11`, backend 8 is `2001:db8:b::19`, backend 9 is
    /// `2001:db8:b::20` (not `::1a`), backend 39 is `2001:db8:b::50`.
    ///
    /// # Panics
    /// If `i >= MAX_BACKENDS`.
    pub fn backend_v6(i: usize) -> Ipv6Addr {
        let last = decimal_digits_as_hex(backend_host(i));
        Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, last)
    }

    /// A VIP for tests: 203.0.113.(10 + i). Configured nowhere; only the XDP
    /// program knows it.
    pub fn vip_v4(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113, 10u8.saturating_add(i))
    }

    /// A VIP for tests: `2001:db8:f::<10 + i>`, the same digits as
    /// [`Topology::vip_v4`] (`2001:db8:f::10` for 0). Configured nowhere.
    pub fn vip_v6(i: u8) -> Ipv6Addr {
        let last = decimal_digits_as_hex(10u8.saturating_add(i));
        Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, last)
    }

    /// The name of backend `i`'s port on the bridge: `p<i>`.
    pub fn switch_port(i: usize) -> String {
        format!("p{i}")
    }
}

fn backend_host(i: usize) -> u8 {
    assert!(
        i < MAX_BACKENDS,
        "backend index {i} out of range (topologies have at most {MAX_BACKENDS} backends)"
    );
    u8::try_from(11 + i).expect("11 + i < 256 for i < MAX_BACKENDS")
}

/// 20 -> 0x20: the decimal digits of `n` read as hexadecimal.
fn decimal_digits_as_hex(n: u8) -> u16 {
    let n = u16::from(n);
    (n / 100) << 8 | (n / 10 % 10) << 4 | (n % 10)
}

/// Adds an IPv4 and an IPv6 (without duplicate address detection, so it is
/// usable at once) address to `ifname`.
fn add_addrs(ns: &Netns, ifname: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ns.ip(&["-4", "addr", "add", v4, "dev", ifname])?;
    ns.ip(&["-6", "addr", "add", v6, "dev", ifname, "nodad"])?;
    Ok(())
}

fn add_default_routes(ns: &Netns, via4: &str, via6: &str) -> anyhow::Result<()> {
    ns.ip(&["-4", "route", "add", "default", "via", via4])?;
    ns.ip(&["-6", "route", "add", "default", "via", via6])?;
    Ok(())
}

/// What in `ip -j addr` output is not ready yet: interfaces that are not up
/// and tentative IPv6 addresses. A failed duplicate address detection is an
/// error (it will not resolve by waiting).
/// Polls every namespace's links until none is pending (see [`not_ready`]) or
/// `timeout` passes; `what` names the topology in the error. Shared by every topology
/// of the testbed.
pub(crate) fn wait_until_ready(
    what: &str,
    namespaces: &[&Netns],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut pending = Vec::new();
        for ns in namespaces {
            let json = ns.ip(&["-j", "addr", "show"])?;
            let links: serde_json::Value = serde_json::from_str(&json)
                .with_context(|| format!("cannot parse `ip -j addr` output {json:?}"))?;
            pending.extend(not_ready(ns.name(), &links)?);
        }
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what} not ready after {timeout:?}: {}", pending.join(", "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn not_ready(ns: &str, links: &serde_json::Value) -> anyhow::Result<Vec<String>> {
    let mut pending = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let ifname = link
            .get("ifname")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?");
        let operstate = link
            .get("operstate")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?");
        // Devices without carrier reporting (loopback, VXLAN) say UNKNOWN when up.
        let admin_up = link
            .get("flags")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|f| f.iter().any(|f| f == "UP"));
        let unknown_but_up = operstate == "UNKNOWN" && admin_up;
        if ifname != "lo" && operstate != "UP" && !unknown_but_up {
            pending.push(format!("{ns}/{ifname} is {operstate}"));
        }
        let addrs = link.get("addr_info").and_then(serde_json::Value::as_array);
        for addr in addrs.into_iter().flatten() {
            let local = addr
                .get("local")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("?");
            let flag = |f: &str| addr.get(f).and_then(serde_json::Value::as_bool) == Some(true);
            if flag("dadfailed") {
                bail!("{ns}/{ifname}: duplicate address detection failed for {local}");
            }
            if flag("tentative") {
                pending.push(format!("{ns}/{ifname} {local} is tentative"));
            }
        }
    }
    Ok(pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_documented_plan() {
        assert_eq!(Topology::client_v4().to_string(), "198.51.100.2");
        assert_eq!(Topology::client_v6().to_string(), "2001:db8:c::2");
        assert_eq!(Topology::backend_v4(0).to_string(), "192.0.2.11");
        assert_eq!(Topology::backend_v4(39).to_string(), "192.0.2.50");
        assert_eq!(Topology::backend_v6(0).to_string(), "2001:db8:b::11");
        assert_eq!(Topology::backend_v6(8).to_string(), "2001:db8:b::19");
        assert_eq!(Topology::backend_v6(9).to_string(), "2001:db8:b::20");
        assert_eq!(Topology::backend_v6(39).to_string(), "2001:db8:b::50");
        assert_eq!(Topology::vip_v4(0).to_string(), "203.0.113.10");
        assert_eq!(Topology::vip_v6(0).to_string(), "2001:db8:f::10");
        assert_eq!(Topology::vip_v6(5).to_string(), "2001:db8:f::15");
        assert_eq!(Topology::lb_backend_v6().to_string(), "2001:db8:b::1");
        assert_eq!(decimal_digits_as_hex(255), 0x255);
    }

    #[test]
    fn all_addresses_are_documentation_ranges() {
        let doc4 = |a: Ipv4Addr| {
            let [a, b, c, _] = a.octets();
            matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113))
        };
        let doc6 = |a: Ipv6Addr| a.segments()[..2] == [0x2001, 0xdb8];
        let mut v4 = vec![
            Topology::client_v4(),
            Topology::client2_v4(),
            Topology::lb_client_v4(),
            Topology::lb_backend_v4(),
            Topology::vip_v4(255),
        ];
        let mut v6 = vec![
            Topology::client_v6(),
            Topology::client2_v6(),
            Topology::lb_client_v6(),
            Topology::lb_backend_v6(),
            Topology::vip_v6(255),
        ];
        for i in 0..MAX_BACKENDS {
            v4.push(Topology::backend_v4(i));
            v6.push(Topology::backend_v6(i));
        }
        assert!(v4.into_iter().all(doc4));
        assert!(v6.into_iter().all(doc6));
    }

    #[test]
    #[should_panic(expected = "backend index 40 out of range")]
    fn backend_index_is_bounded() {
        let _ = Topology::backend_v4(MAX_BACKENDS);
    }

    #[test]
    fn backend_count_is_validated_before_creating_anything() {
        for n in [0, MAX_BACKENDS + 1] {
            let err = Topology::build(&TopologyConfig::new("bad", n)).unwrap_err();
            assert!(err.to_string().contains("backends must be 1..=40"), "{err}");
        }
    }

    #[test]
    fn readiness_reads_ip_json() {
        let links: serde_json::Value = serde_json::from_str(
            r#"[{"ifname":"lo","operstate":"UNKNOWN","addr_info":[]},
                {"ifname":"eth0","operstate":"UP","addr_info":[
                  {"family":"inet6","local":"2001:db8:c::2","tentative":true}]},
                {"ifname":"xb","operstate":"LOWERLAYERDOWN","addr_info":[]}]"#,
        )
        .unwrap();
        let pending = not_ready("n", &links).unwrap();
        assert_eq!(
            pending,
            [
                "n/eth0 2001:db8:c::2 is tentative",
                "n/xb is LOWERLAYERDOWN"
            ]
        );
        let failed: serde_json::Value = serde_json::from_str(
            r#"[{"ifname":"eth0","operstate":"UP","addr_info":[{"local":"x","dadfailed":true}]}]"#,
        )
        .unwrap();
        assert!(not_ready("n", &failed).is_err());
    }
}
