//! Tests that build real namespaces. They need root and fail (never skip)
//! without it.

use std::net::{Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

const ASK_TIMEOUT: Duration = Duration::from_secs(2);
const PORT: u16 = 8080;

fn require_root() {
    if let Err(e) = check_privileges() {
        panic!("{e:#}");
    }
}

/// Names listed by `ip netns list` (first word of each line).
fn listed_namespaces() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run `ip netns list`");
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn assert_gone(names: &[String]) {
    let listed = listed_namespaces();
    for name in names {
        assert!(!listed.contains(name), "{name} still in `ip netns list`");
        assert!(
            !Path::new("/run/netns").join(name).exists(),
            "{name} still in /run/netns"
        );
    }
}

/// (device, inode) of a namespace file: equal pairs are the same namespace.
fn ns_id(path: impl AsRef<Path>) -> (u64, u64) {
    let meta = std::fs::metadata(path.as_ref()).expect("stat namespace file");
    (meta.dev(), meta.ino())
}

fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[test]
fn netns_is_created_with_lo_up_and_deleted_on_drop() {
    require_root();
    let ns = Netns::new("unit-create").unwrap();
    let name = ns.name().to_owned();
    assert!(
        name.starts_with(&format!("xlb-unit-create-{}-", std::process::id())),
        "{name}"
    );
    assert!(listed_namespaces().contains(&name));
    let lo = ns.ip(&["-j", "link", "show", "dev", "lo"]).unwrap();
    assert!(lo.contains("\"UP\""), "lo not up: {lo}");
    assert_eq!(ns.ifindex("lo").unwrap(), 1);
    drop(ns);
    assert_gone(&[name]);
}

#[test]
fn names_are_unique_within_a_process() {
    require_root();
    let a = Netns::new("unit-same").unwrap();
    let b = Netns::new("unit-same").unwrap();
    assert_ne!(a.name(), b.name());
}

#[test]
fn failed_commands_quote_command_line_and_stderr() {
    require_root();
    let ns = Netns::new("unit-err").unwrap();
    let err = format!(
        "{:#}",
        ns.ip(&["link", "show", "dev", "xnosuch0"]).unwrap_err()
    );
    assert!(
        err.contains(&format!("ip -n {} link show dev xnosuch0", ns.name())),
        "{err}"
    );
    assert!(err.contains("does not exist"), "stderr missing: {err}");
    let err = format!(
        "{:#}",
        ns.exec("sh", &["-c", "echo bad >&2; exit 4"]).unwrap_err()
    );
    assert!(
        err.contains(&format!("ip netns exec {} sh -c", ns.name())) && err.contains("bad"),
        "{err}"
    );
    assert!(ns.ifindex("xnosuch0").is_err());
    assert!(veth_pair(&ns, "this-name-is-too-long", &ns, "b").is_err());
}

#[test]
fn sysctl_changes_only_the_namespace() {
    require_root();
    let root_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let ns = Netns::new("unit-sysctl").unwrap();
    let flip = if root_before.trim() == "1" { "0" } else { "1" };
    ns.sysctl("net.ipv4.ip_forward", flip).unwrap();
    let inside = ns.exec("sysctl", &["-n", "net.ipv4.ip_forward"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&inside.stdout).trim(), flip);
    let root_after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(root_before, root_after);
    assert!(ns.sysctl("net.ipv4.no_such_key", "1").is_err());
}

#[test]
fn spawned_processes_run_inside_and_are_killed_on_drop() {
    require_root();
    let ns = Netns::new("unit-spawn").unwrap();
    let name = ns.name().to_owned();
    let a = ns.spawn("sleep", &["30"]).unwrap();
    let b = ns.spawn("sleep", &["30"]).unwrap();
    // `ip netns exec` has switched namespaces and exec'd by the time
    // /proc/PID/ns/net matches; bounded wait.
    let deadline = Instant::now() + Duration::from_secs(2);
    while ns_id(format!("/proc/{a}/ns/net")) != ns_id(format!("/run/netns/{name}")) {
        assert!(Instant::now() < deadline, "pid {a} never entered {name}");
        std::thread::sleep(Duration::from_millis(5));
    }
    ns.kill(b).unwrap();
    assert!(!process_exists(b));
    assert!(ns.kill(b).is_err(), "pid is no longer tracked");
    assert!(process_exists(a));
    drop(ns);
    assert!(!process_exists(a), "pid {a} survived the netns");
    assert_gone(&[name]);
}

#[test]
fn enter_moves_only_the_current_thread_and_restores_it() {
    require_root();
    let ns = Netns::new("unit-enter").unwrap();
    let target = ns_id(format!("/run/netns/{}", ns.name()));
    let original = ns_id("/proc/thread-self/ns/net");
    assert_ne!(original, target);

    // A thread that exists before we enter must stay where it is.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        go_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        ns_id("/proc/thread-self/ns/net")
    });
    {
        let guard = ns.enter().unwrap();
        assert_eq!(guard.netns().name(), ns.name());
        assert_eq!(ns_id("/proc/thread-self/ns/net"), target);
        go_tx.send(()).unwrap();
        assert_eq!(other.join().unwrap(), original);
    }
    assert_eq!(ns_id("/proc/thread-self/ns/net"), original);

    // run_in: the closure sees the namespace, the caller does not move.
    let seen = ns.run_in(|| ns_id("/proc/thread-self/ns/net")).unwrap();
    assert_eq!(seen, target);
    assert_eq!(ns_id("/proc/thread-self/ns/net"), original);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ns.run_in(|| panic!("inside")).unwrap();
    }));
    assert!(panicked.is_err(), "run_in must resume the closure's panic");
}

#[test]
fn veth_pair_sets_offloads_mtu_and_state_on_both_ends() {
    require_root();
    let a = Netns::new("unit-veth-a").unwrap();
    let b = Netns::new("unit-veth-b").unwrap();
    veth_pair(&a, "va", &b, "vb").unwrap();
    for (ns, ifname) in [(&a, "va"), (&b, "vb")] {
        let features = ns.exec("ethtool", &["-k", ifname]).unwrap();
        let features = String::from_utf8_lossy(&features.stdout);
        assert!(
            features.contains("tx-checksumming: off"),
            "{ifname}: {features}"
        );
        assert!(
            features.contains("generic-receive-offload: on"),
            "{ifname}: {features}"
        );
        let link = ns.ip(&["-j", "link", "show", "dev", ifname]).unwrap();
        assert!(link.contains("\"mtu\":1500"), "{link}");
        assert!(link.contains("\"UP\""), "{link}");
        assert!(ns.ifindex(ifname).unwrap() > 1);
    }
}

#[test]
fn topology_routes_tcp_and_udp_over_v4_and_v6_without_xdp() {
    require_root();
    let topo = Topology::build(&TopologyConfig::new("unit-topo", 2)).unwrap();
    topo.wait_ready().unwrap();

    // Addresses as documented, and no VIP anywhere.
    let client_addrs = topo
        .client
        .ip(&["-j", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(client_addrs.contains("198.51.100.2") && client_addrs.contains("2001:db8:c::2"));
    let b1 = topo.backends[1]
        .ip(&["-j", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        b1.contains("192.0.2.12") && b1.contains("2001:db8:b::12"),
        "{b1}"
    );
    for ns in topo.namespaces() {
        let addrs = ns.ip(&["-j", "addr", "show"]).unwrap();
        assert!(!addrs.contains("203.0.113.") && !addrs.contains("2001:db8:f::"));
    }
    assert!(topo.lb.ifindex(Topology::LB_CLIENT_IF).unwrap() > 1);
    assert!(topo.lb.ifindex(Topology::LB_BACKEND_IF).unwrap() > 1);

    let any: SocketAddr = (Ipv6Addr::UNSPECIFIED, PORT).into();
    let mut servers = Vec::new();
    for (i, backend) in topo.backends.iter().enumerate() {
        let name = format!("backend-{i}");
        servers.push(spawn_tcp_name_server(backend, any, &name).unwrap());
        servers.push(spawn_udp_name_server(backend, any, &name).unwrap());
    }
    for i in 0..2 {
        let want = format!("backend-{i}");
        for addr in [
            SocketAddr::from((Topology::backend_v4(i), PORT)),
            SocketAddr::from((Topology::backend_v6(i), PORT)),
        ] {
            assert_eq!(
                tcp_ask(&topo.client, addr, ASK_TIMEOUT).unwrap(),
                want,
                "{addr}"
            );
            assert_eq!(
                udp_ask(&topo.client, None, addr, ASK_TIMEOUT).unwrap(),
                want,
                "{addr}"
            );
        }
    }
    assert_eq!(
        udp_ask(
            &topo.client,
            Some(40_000),
            (Topology::backend_v4(0), PORT).into(),
            ASK_TIMEOUT
        )
        .unwrap(),
        "backend-0"
    );
    assert_eq!(servers[0].served(), 2, "tcp backend-0");
    assert_eq!(servers[1].served(), 3, "udp backend-0");

    // Nothing listens on this port: refused quickly, not a hang.
    let closed: SocketAddr = (Topology::backend_v4(0), PORT + 1).into();
    assert!(tcp_ask(&topo.client, closed, ASK_TIMEOUT).is_err());
    // Nothing routes the VIP without XDP: an error within the timeout.
    let vip: SocketAddr = (Topology::vip_v4(0), PORT).into();
    let t = Instant::now();
    assert!(udp_ask(&topo.client, None, vip, Duration::from_millis(300)).is_err());
    assert!(t.elapsed() < Duration::from_secs(2));

    drop(servers);
    let names: Vec<String> = topo.namespaces().map(|ns| ns.name().to_owned()).collect();
    assert_eq!(names.len(), 5);
    drop(topo);
    assert_gone(&names);
}

#[test]
fn a_panicking_test_still_removes_its_topology() {
    require_root();
    let names = std::sync::Mutex::new(Vec::new());
    let pid = std::sync::Mutex::new(0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::build(&TopologyConfig::new("unit-panic", 1)).unwrap();
        *names.lock().unwrap() = topo.namespaces().map(|ns| ns.name().to_owned()).collect();
        *pid.lock().unwrap() = topo.backends[0].spawn("sleep", &["30"]).unwrap();
        panic!("deliberate failure after building the topology");
    }));
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 4);
    assert_gone(&names);
    assert!(!process_exists(pid.into_inner().unwrap()));
}

#[test]
fn servers_stop_when_their_handle_is_dropped() {
    require_root();
    let ns = Netns::new("unit-srv").unwrap();
    let tcp = spawn_tcp_name_server(&ns, "127.0.0.1:0".parse().unwrap(), "me").unwrap();
    let udp = spawn_udp_name_server(&ns, "[::1]:0".parse().unwrap(), "me6").unwrap();
    let (tcp_addr, udp_addr) = (tcp.local_addr(), udp.local_addr());
    assert_ne!(tcp_addr.port(), 0);
    assert_eq!(tcp_ask(&ns, tcp_addr, ASK_TIMEOUT).unwrap(), "me");
    assert_eq!(udp_ask(&ns, None, udp_addr, ASK_TIMEOUT).unwrap(), "me6");
    // The listener lives in its namespace only: the same address elsewhere
    // has nothing behind it.
    let other = Netns::new("unit-srv-other").unwrap();
    assert!(tcp_ask(&other, tcp_addr, ASK_TIMEOUT).is_err());
    let t = Instant::now();
    drop(tcp);
    drop(udp);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(tcp_ask(&ns, tcp_addr, ASK_TIMEOUT).is_err());
    let t = Instant::now();
    let err = udp_ask(&ns, None, udp_addr, Duration::from_millis(200)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1), "{err:#}");
}

#[test]
fn topology_with_the_most_backends_builds_and_routes() {
    require_root();
    let topo = Topology::build(&TopologyConfig::new("unit-max", MAX_BACKENDS)).unwrap();
    topo.wait_ready().unwrap();
    let last = MAX_BACKENDS - 1;
    let any: SocketAddr = (Ipv6Addr::UNSPECIFIED, PORT).into();
    let _server = spawn_tcp_name_server(&topo.backends[last], any, "backend-39").unwrap();
    for addr in [
        SocketAddr::from((Topology::backend_v4(last), PORT)),
        SocketAddr::from((Topology::backend_v6(last), PORT)),
    ] {
        assert_eq!(
            tcp_ask(&topo.client, addr, ASK_TIMEOUT).unwrap(),
            "backend-39"
        );
    }
}

#[test]
fn namespaces_of_dead_processes_are_removed() {
    require_root();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let name = format!("xlb-unit-stale-{dead_pid}-0");
    let add = std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap();
    assert!(add.success());
    let removed = remove_stale_namespaces();
    // Best effort, so a failed assertion leaves nothing behind either.
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &name])
        .stderr(std::process::Stdio::null())
        .status();
    assert!(removed.unwrap().contains(&name));
    assert_gone(&[name]);
    // Our own (live) namespaces are kept.
    let ours = Netns::new("unit-live").unwrap();
    assert!(
        !remove_stale_namespaces()
            .unwrap()
            .contains(&ours.name().to_owned())
    );
    assert!(
        testbed_namespaces()
            .unwrap()
            .contains(&ours.name().to_owned())
    );
}
