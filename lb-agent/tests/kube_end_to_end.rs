//! `lb-agent run --kube` end to end: the real agent in the load-balancer namespace of a
//! namespace topology, its KUBECONFIG pointing at the test API server listening in the
//! same namespace, real TCP connections through the ClusterIP. The maps converge to
//! the server's objects, and stay untouched (no "maps updated") across a 410 Gone
//! relist and a dropped watch. Every loop is bounded; namespaces, the agent, its pins
//! and the server are removed on drop.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_core::cluster::Object;
use lb_testbed::apiserver::RequestRecord;
use lb_testbed::{self as testbed, AgentProcess, ApiServer, Topology};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(20);
const CLUSTER_IP: &str = "203.0.113.10";

fn node() -> Object {
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n  \
         - type: InternalIP\n    address: {}\n",
        Topology::lb_client_v4()
    );
    Object::Node(serde_yaml::from_str::<Node>(&yaml).expect("node YAML"))
}

fn web() -> Object {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n\
         spec:\n  type: ClusterIP\n  clusterIP: {CLUSTER_IP}\n  clusterIPs: [{CLUSTER_IP}]\n  \
         ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: {PORT}\n"
    );
    Object::Service(serde_yaml::from_str::<Service>(&yaml).expect("service YAML"))
}

fn web_slice(backends: &[usize]) -> Object {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-x7k2p\n  \
         namespace: shop\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\n\
         ports:\n- name: http\n  port: {PORT}\n  protocol: TCP\nendpoints:\n"
    );
    for i in backends {
        write!(
            yaml,
            "- addresses: [\"{}\"]\n  conditions:\n    ready: true\n  nodeName: node-b\n",
            Topology::backend_v4(*i)
        )
        .expect("write to a String");
    }
    Object::EndpointSlice(serde_yaml::from_str::<EndpointSlice>(&yaml).expect("slice YAML"))
}

/// Waits until `check` holds, within `SETTLE`.
fn until(agent: &AgentProcess<'_>, what: &str, check: impl Fn() -> bool) {
    agent.until(what, SETTLE, check);
}

/// The web Service's backends as `lb-agent status --json` prints them.
fn web_backends(agent: &AgentProcess<'_>) -> Vec<String> {
    let out = std::process::Command::new(AGENT)
        .args(["status", "--json", "--bpffs"])
        .arg(agent.pin_dir())
        .output()
        .expect("lb-agent status");
    if !out.status.success() {
        return Vec::new();
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let mut backends: Vec<String> = json["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.contains("shop/web")))
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["endpoint"].as_str().map(str::to_owned))
        .collect();
    backends.sort();
    backends
}

fn map_writes(agent: &AgentProcess<'_>) -> usize {
    agent.log().matches("maps updated").count()
}

fn relisted_and_watching(log: &[RequestRecord]) -> bool {
    ["services", "endpointslices", "nodes"]
        .iter()
        .all(|resource| {
            log.iter()
                .rposition(|r| r.resource == *resource && r.verb == "list")
                .is_some_and(|i| {
                    log[i..]
                        .iter()
                        .any(|r| r.resource == *resource && r.verb == "watch")
                })
        })
}

fn rewatched(log: &[RequestRecord]) -> bool {
    ["services", "endpointslices", "nodes"]
        .iter()
        .all(|resource| {
            log.iter()
                .any(|r| r.resource == *resource && r.verb == "watch")
        })
}

#[test]
fn kube_source_converges_and_writes_nothing_on_relist_or_reconnect() {
    let topo = Topology::for_test("k8skube", 3);
    let _servers = testbed::spawn_backend_peer_servers(&topo, 3, PORT).expect("peer servers");
    let api = ApiServer::start(&topo.lb).expect("API server");
    api.apply_all([node(), web(), web_slice(&[0, 1])]);
    let kubeconfig = api.kubeconfig().display().to_string();
    let agent = AgentProcess::start_with_env(
        &topo.lb,
        Path::new(AGENT),
        &["--kube", "--node-name", "node-a"],
        &[("KUBECONFIG", &kubeconfig)],
        "k8skube",
        &[],
    )
    .expect("start agent");

    let two = [Topology::backend_v4(0), Topology::backend_v4(1)]
        .map(|a| format!("{a}:{PORT}"))
        .to_vec();
    until(&agent, "the two endpoints are in the maps", || {
        web_backends(&agent) == two
    });
    let cluster_ip = SocketAddr::new(CLUSTER_IP.parse().expect("IP"), 80);
    let answer = testbed::tcp_ask(&topo.client, cluster_ip, TIMEOUT).expect("via the ClusterIP");
    assert!(answer.starts_with("backend-"), "{answer}");
    let writes = map_writes(&agent);
    assert!(writes >= 1, "{}", agent.log());

    // A 410 Gone: the watches are cut and the history is compacted; the agent
    // relists every kind and resumes watching.
    let before = api.requests().len();
    api.expire_history();
    api.drop_watches();
    until(&agent, "a relist and new watches", || {
        relisted_and_watching(&api.requests()[before..])
    });

    // A dropped connection: the agent resumes its watches.
    let before = api.requests().len();
    api.drop_watches();
    until(&agent, "new watches", || {
        rewatched(&api.requests()[before..])
    });

    // A real change, through the resumed watch: the relist's and reconnect's events
    // were all queued before it, so once it is in the maps they were all handled.
    api.apply(web_slice(&[0, 1, 2]));
    let mut three = two.clone();
    three.push(format!("{}:{PORT}", Topology::backend_v4(2)));
    until(&agent, "the third endpoint is in the maps", || {
        web_backends(&agent) == three
    });
    assert_eq!(
        map_writes(&agent),
        writes + 1,
        "only the real change wrote the maps; agent log:\n{}",
        agent.log()
    );
    assert!(
        !api.requests().iter().any(|r| r.resource.is_empty()),
        "the agent asked for something the server does not know: {:#?}",
        api.requests()
    );

    // A bad field: a slice endpoint of the wrong family. The rest still applies, the
    // log names the object and field, and a Warning Event tells the object's owner.
    let Object::EndpointSlice(mut bad) = web_slice(&[0, 1]) else {
        unreachable!("a slice")
    };
    bad.endpoints[1].addresses = vec!["2001:db8:b::12".into()];
    api.apply(Object::EndpointSlice(bad));
    until(
        &agent,
        "the bad endpoint is skipped, the good one stays",
        || web_backends(&agent) == [format!("{}:{PORT}", Topology::backend_v4(0))],
    );
    until(&agent, "a Warning Event about the slice", || {
        api.events().iter().any(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-x7k2p")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("endpoints[1].addresses[0]"))
        })
    });
    assert!(
        agent
            .log()
            .contains("EndpointSlice shop/web-x7k2p: endpoints[1].addresses[0]"),
        "{}",
        agent.log()
    );
}

/// A Node object with these `status.addresses` (type, address), in this order.
fn node_with(addresses: &[(&str, String)]) -> Object {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n",
    );
    for (kind, address) in addresses {
        writeln!(yaml, "  - type: {kind}\n    address: \"{address}\"").expect("write to a String");
    }
    Object::Node(serde_yaml::from_str::<Node>(&yaml).expect("node YAML"))
}

/// Without `--node-address`, `--node-name`'s Node object gives the SNAT source
/// addresses: its first InternalIP of each family (ahead of an ExternalIP listed
/// first), else its ExternalIP, as kube-proxy and Cilium pick the node IP; they follow
/// the Node when its addresses change. A source-NATed connection leaves with it.
#[test]
fn snat_source_addresses_come_from_the_node_object() {
    let topo = Topology::for_test("k8ssnat", 1);
    let _servers = testbed::spawn_backend_peer_servers(&topo, 1, PORT).expect("peer servers");
    let api = ApiServer::start(&topo.lb).expect("API server");
    let external_v6 = "2001:db8:e::200".to_owned();
    api.apply_all([
        node_with(&[
            ("ExternalIP", "198.51.100.200".to_owned()),
            ("Hostname", "node-a".to_owned()),
            ("InternalIP", Topology::lb_backend_v4().to_string()),
            ("ExternalIP", external_v6.clone()),
            ("InternalIP", Topology::lb_backend_v6().to_string()),
        ]),
        web(),
        web_slice(&[0]),
    ]);
    let kubeconfig = api.kubeconfig().display().to_string();
    let agent = AgentProcess::start_with_env(
        &topo.lb,
        Path::new(AGENT),
        &["--kube", "--node-name", "node-a"],
        &[("KUBECONFIG", &kubeconfig)],
        "k8ssnat",
        &["--lb-mode", "snat"],
    )
    .expect("start agent");
    let addresses = |v4: String, v6: String| {
        agent
            .wait_for(SETTLE, |r| {
                r.snat.as_ref().is_some_and(|s| {
                    s.address_v4.as_deref() == Some(&v4) && s.address_v6.as_deref() == Some(&v6)
                }) && !r.services.is_empty()
            })
            .unwrap_or_else(|e| panic!("SNAT from {v4} and {v6}: {e:#}"))
    };
    addresses(
        Topology::lb_backend_v4().to_string(),
        Topology::lb_backend_v6().to_string(),
    );
    // The backend (on another node, as its slice says) sees the InternalIP.
    let cluster_ip = SocketAddr::new(CLUSTER_IP.parse().expect("IP"), 80);
    let answer = testbed::tcp_ask(&topo.client, cluster_ip, TIMEOUT).expect("via the ClusterIP");
    assert_eq!(
        answer.trim(),
        format!("backend-0 {}", Topology::lb_backend_v4()),
        "the backend saw the InternalIP"
    );

    // The Node's addresses change: no IPv6 InternalIP any more.
    api.apply(node_with(&[
        ("InternalIP", Topology::lb_client_v4().to_string()),
        ("ExternalIP", external_v6.clone()),
    ]));
    addresses(Topology::lb_client_v4().to_string(), external_v6);
    assert!(
        agent.log().contains("the Node object's InternalIP"),
        "{}",
        agent.log()
    );
}
