//! Translation cases from real Kubernetes YAML (`lb-core/tests/fixtures/kubernetes/`),
//! one rule each, with the Kubernetes documentation that defines the behaviour.

use super::{DEFAULT_AFFINITY_TIMEOUT_S, NodeInfo};
use crate::model::WhenEmpty::{Drop, Reject};
use crate::model::fixtures::{self, View, cluster, load, node, translate_fixture, translate_in};
use k8s_openapi::api::core::v1::Node;

/// node-a with one NodePort address given as a flag.
fn node_a() -> NodeInfo {
    node("node-a", &["203.0.113.201"])
}

fn no_problems(t: &View) {
    assert!(
        t.problems.is_empty(),
        "unexpected problems: {:#?}",
        t.problems
    );
}

/// Every fixture parses into k8s-openapi types (none is dead weight with a typo).
#[test]
fn every_fixture_parses() {
    let mut files: Vec<_> = std::fs::read_dir(fixtures::dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 15, "{files:?}");
    for path in files {
        let objects = load(path.file_name().unwrap().to_str().unwrap());
        assert!(!objects.is_empty(), "{}", path.display());
    }
}

// --- Frontends -------------------------------------------------------------------

/// Every port of a Service is a frontend of its own, TCP and UDP alike, on the cluster
/// IP. https://kubernetes.io/docs/concepts/services-networking/service/#multi-port-services
/// https://kubernetes.io/docs/reference/networking/service-protocols/#protocol-udp
/// The endpoint port is the EndpointSlice port with the Service port's name and
/// protocol: kube-dns's slice lists `dns-tcp` TCP 53 first and `dns` UDP 53 second.
/// https://kubernetes.io/docs/reference/kubernetes-api/service-resources/endpoint-slice-v1/
/// (`ports.name`: "If the EndpointSlice is derived from a Kubernetes service, this
/// corresponds to the Service.ports[].name.")
#[test]
fn every_port_tcp_and_udp() {
    let t = translate_fixture("kube-dns.yaml", "kube-system/kube-dns", &node_a());
    no_problems(&t);
    assert_eq!(
        t.names(),
        [
            "kube-system/kube-dns:dns-tcp/tcp",
            "kube-system/kube-dns:dns/udp",
            "kube-system/kube-dns:metrics/tcp"
        ]
    );
    let dns = &t["kube-system/kube-dns:dns/udp"];
    assert_eq!(dns.frontends, ["udp 203.0.113.10:53"]);
    assert_eq!(dns.backends, ["192.0.2.2:53 w1", "192.0.2.3:53 w1"]);
    assert_eq!(dns.when_empty, Drop);
    assert_eq!(dns.ranges, Vec::<String>::new());
    assert_eq!(dns.affinity_s, None);
    let dns_tcp = &t["kube-system/kube-dns:dns-tcp/tcp"];
    assert_eq!(dns_tcp.frontends, ["tcp 203.0.113.10:53"]);
    assert_eq!(dns_tcp.backends, ["192.0.2.2:53 w1", "192.0.2.3:53 w1"]);
    let metrics = &t["kube-system/kube-dns:metrics/tcp"];
    assert_eq!(metrics.frontends, ["tcp 203.0.113.10:9153"]);
    assert_eq!(metrics.backends, ["192.0.2.2:9153 w1", "192.0.2.3:9153 w1"]);
}

/// A dual-stack Service has a cluster IP per family (`clusterIPs`, in `ipFamilies`
/// order) and an EndpointSlice per family: one model per family, each with the
/// endpoints of its own family. Unnamed models are IPv4; `/v6` is IPv6.
/// https://kubernetes.io/docs/concepts/services-networking/dual-stack/#services
/// https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/#address-types
#[test]
fn dual_stack_cluster_ips() {
    let t = translate_fixture("dual-stack.yaml", "shop/web", &node_a());
    no_problems(&t);
    assert_eq!(t.names(), ["shop/web:http/tcp", "shop/web:http/tcp/v6"]);
    assert_eq!(t["shop/web:http/tcp"].frontends, ["tcp 203.0.113.20:80"]);
    assert_eq!(
        t["shop/web:http/tcp"].backends,
        ["192.0.2.11:8080 w1", "192.0.2.12:8080 w1"]
    );
    assert_eq!(
        t["shop/web:http/tcp/v6"].frontends,
        ["tcp [2001:db8:c::10]:80"]
    );
    assert_eq!(
        t["shop/web:http/tcp/v6"].backends,
        ["[2001:db8:b::11]:8080 w1", "[2001:db8:b::12]:8080 w1"]
    );
}

/// SCTP ports get no frontend: xlb passes SCTP through untouched and says so; the TCP
/// port of the same number is served.
/// https://kubernetes.io/docs/reference/networking/service-protocols/#protocol-sctp
#[test]
fn sctp_is_passed_over_with_a_note() {
    let t = translate_fixture("sctp.yaml", "telco/diameter", &node_a());
    no_problems(&t);
    assert_eq!(t.names(), ["telco/diameter:diameter-tcp/tcp"]);
    assert_eq!(
        t["telco/diameter:diameter-tcp/tcp"].frontends,
        ["tcp 203.0.113.21:3868"]
    );
    assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
    assert!(t.notes[0].contains("SCTP"), "{:?}", t.notes);
    assert!(t.notes[0].contains("telco/diameter"), "{:?}", t.notes);
}

/// A NodePort Service is also reachable on `nodePort` at this node's addresses: the
/// Node object's InternalIP and ExternalIP addresses (not its Hostname), of the
/// Service's families only.
/// https://kubernetes.io/docs/concepts/services-networking/service/#type-nodeport
/// https://kubernetes.io/docs/reference/node/node-status/#addresses
/// The SNAT source address of each family is the Node's first InternalIP of it, else
/// its first ExternalIP (as kube-proxy and Cilium pick the node IP); flags replace the
/// Node object entirely.
#[test]
fn snat_addresses_are_the_nodes_internal_ips_first() {
    let c = cluster(&load("nodeport.yaml"));
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let me = NodeInfo::resolve(
        Some("node-a"),
        &[],
        c.nodes.get("node-a").map(AsRef::as_ref),
    );
    assert_eq!(
        me.snat_addresses,
        [ip("203.0.113.201"), ip("2001:db8:d::201")]
    );
    // node-b has no IPv6 address: no IPv6 SNAT address.
    let b = NodeInfo::resolve(
        Some("node-b"),
        &[],
        c.nodes.get("node-b").map(AsRef::as_ref),
    );
    assert_eq!(b.snat_addresses, [ip("203.0.113.202")]);
    // An ExternalIP listed first still comes after the InternalIP; one serves when no
    // InternalIP of the family exists.
    let node: Node = serde_yaml::from_str(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-c}\nstatus:\n  addresses:\n  \
         - {type: ExternalIP, address: 198.51.100.30}\n  - {type: Hostname, address: node-c}\n  \
         - {type: InternalIP, address: 198.51.100.3}\n  - {type: ExternalIP, address: \"2001:db8::30\"}\n",
    )
    .unwrap();
    let c3 = NodeInfo::resolve(Some("node-c"), &[], Some(&node));
    assert_eq!(c3.snat_addresses, [ip("198.51.100.3"), ip("2001:db8::30")]);
    let flagged = NodeInfo::resolve(Some("node-c"), &[ip("2001:db8::9")], Some(&node));
    assert_eq!(
        flagged.snat_addresses,
        [ip("2001:db8::9")],
        "flags replace the Node's"
    );
    assert!(NodeInfo::resolve(None, &[], None).snat_addresses.is_empty());
}

#[test]
fn node_port_on_the_node_objects_addresses() {
    let c = cluster(&load("nodeport.yaml"));
    let me = NodeInfo::resolve(
        Some("node-a"),
        &[],
        c.nodes.get("node-a").map(AsRef::as_ref),
    );
    assert_eq!(
        me.addresses,
        [
            "203.0.113.201".parse::<std::net::IpAddr>().unwrap(),
            "203.0.113.221".parse().unwrap(),
            "2001:db8:d::201".parse().unwrap()
        ]
    );
    let t = translate_in(&c, "shop/web-np", &me);
    no_problems(&t);
    assert_eq!(t.names(), ["shop/web-np:http/tcp"]);
    assert_eq!(
        t["shop/web-np:http/tcp"].frontends,
        [
            "tcp 203.0.113.22:80",
            "tcp 203.0.113.201:30080",
            "tcp 203.0.113.221:30080"
        ]
    );
    assert_eq!(t["shop/web-np:http/tcp"].backends, ["192.0.2.11:8080 w1"]);

    // Dual-stack: the node's IPv6 address serves the IPv6 family.
    let t = translate_in(&c, "shop/api-np", &me);
    assert_eq!(
        t["shop/api-np:https/tcp"].frontends,
        [
            "tcp 203.0.113.23:443",
            "tcp 203.0.113.201:30443",
            "tcp 203.0.113.221:30443"
        ]
    );
    assert_eq!(
        t["shop/api-np:https/tcp/v6"].frontends,
        ["tcp [2001:db8:c::23]:443", "tcp [2001:db8:d::201]:30443"]
    );
    // No endpoints at all: refused (see `no_endpoints_rejects`).
    assert_eq!(t["shop/api-np:https/tcp/v6"].when_empty, Reject);
}

/// `--node-address` flags replace the Node object's addresses (kube-proxy's
/// `--nodeport-addresses` narrows them the same way).
/// https://kubernetes.io/docs/concepts/services-networking/service/#service-nodeport-custom-listen-address
#[test]
fn node_port_addresses_from_flags_override_the_node_object() {
    let c = cluster(&load("nodeport.yaml"));
    let flags = ["203.0.113.250".parse().unwrap()];
    let me = NodeInfo::resolve(
        Some("node-a"),
        &flags,
        c.nodes.get("node-a").map(AsRef::as_ref),
    );
    assert_eq!(me.addresses, flags);
    let t = translate_in(&c, "shop/web-np", &me);
    assert_eq!(
        t["shop/web-np:http/tcp"].frontends,
        ["tcp 203.0.113.22:80", "tcp 203.0.113.250:30080"]
    );
    // Another node's object is not ours.
    let other = NodeInfo::resolve(
        Some("node-b"),
        &[],
        c.nodes.get("node-b").map(AsRef::as_ref),
    );
    assert_eq!(
        other.addresses,
        ["203.0.113.202".parse::<std::net::IpAddr>().unwrap()]
    );
}

/// A LoadBalancer Service is reachable on the IPs of `status.loadBalancer.ingress`
/// (ipMode VIP, the default when unset). An ingress with ipMode Proxy is not captured
/// (the load balancer proxies to the nodes itself), nor is a hostname-only ingress
/// (nothing to match). `allocateLoadBalancerNodePorts: false` means no NodePort.
/// https://kubernetes.io/docs/concepts/services-networking/service/#loadbalancer
/// https://kubernetes.io/docs/concepts/services-networking/service/#load-balancer-ip-mode
/// https://kubernetes.io/docs/concepts/services-networking/service/#load-balancer-nodeport-allocation
#[test]
fn load_balancer_ingress_ips() {
    let c = cluster(&load("loadbalancer.yaml"));
    let t = translate_in(&c, "shop/store", &node_a());
    no_problems(&t);
    assert_eq!(t.names(), ["shop/store:http/tcp"]);
    assert_eq!(
        t["shop/store:http/tcp"].frontends,
        [
            "tcp 203.0.113.24:80",
            "tcp 203.0.113.100:80",
            "tcp 203.0.113.101:80",
            "tcp 203.0.113.201:31080"
        ]
    );
    assert_eq!(t["shop/store:http/tcp"].backends, ["192.0.2.31:8080 w1"]);

    let t = translate_in(&c, "shop/proxied", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/proxied:http/tcp"].frontends,
        ["tcp 203.0.113.25:80"]
    );

    let t = translate_in(&c, "shop/elb", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/elb:http/tcp"].frontends,
        ["tcp 203.0.113.26:80", "tcp 203.0.113.201:31081"]
    );
}

/// `externalIPs` are frontends for any Service type, each in the Service's family.
/// https://kubernetes.io/docs/concepts/services-networking/service/#external-ips
#[test]
fn external_ips() {
    let c = cluster(&load("external-ips.yaml"));
    let t = translate_in(&c, "shop/legacy", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/legacy:http/tcp"].frontends,
        ["tcp 203.0.113.27:80", "tcp 203.0.113.150:80"]
    );
    assert_eq!(t["shop/legacy:http/tcp"].backends, ["192.0.2.41:8080 w1"]);

    let t = translate_in(&c, "shop/legacy-ds", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/legacy-ds:http/tcp"].frontends,
        ["tcp 203.0.113.28:80", "tcp 203.0.113.151:80"]
    );
    assert_eq!(
        t["shop/legacy-ds:http/tcp/v6"].frontends,
        ["tcp [2001:db8:c::28]:80", "tcp [2001:db8:e::151]:80"]
    );
}

/// Headless Services (clusterIP None) are not proxied; ExternalName Services are a DNS
/// CNAME only: no L4 frontend either, but the name is kept for the L7 hop.
/// https://kubernetes.io/docs/concepts/services-networking/service/#headless-services
/// https://kubernetes.io/docs/concepts/services-networking/service/#externalname
#[test]
fn headless_and_external_name_get_no_frontend() {
    let c = cluster(&load("headless-externalname.yaml"));
    let t = translate_in(&c, "shop/db", &node_a());
    no_problems(&t);
    assert!(t.models.is_empty(), "{:?}", t.models);
    assert!(t.notes[0].contains("headless"), "{:?}", t.notes);

    let t = translate_in(&c, "shop/payments", &node_a());
    no_problems(&t);
    assert!(t.models.is_empty(), "{:?}", t.models);
    assert_eq!(t.external_name.as_deref(), Some("payments.example.com"));
}

/// A Service labelled `service.kubernetes.io/service-proxy-name` belongs to another
/// proxy: kube-proxy (and xlb) leave it alone; its neighbours are served.
/// https://kubernetes.io/docs/reference/labels-annotations-taints/#servicekubernetesioservice-proxy-name
#[test]
fn another_proxys_service_is_left_alone() {
    let c = cluster(&load("service-proxy-name.yaml"));
    let t = translate_in(&c, "shop/legacy", &node_a());
    no_problems(&t);
    assert!(t.models.is_empty(), "{:?}", t.models);
    assert!(t.notes[0].contains("other-proxy"), "{:?}", t.notes);
    let t = translate_in(&c, "shop/modern", &node_a());
    assert_eq!(t.names(), ["shop/modern:http/tcp"]);
}

// --- Backends ----------------------------------------------------------------------

/// A named targetPort resolves per Pod: the EndpointSlice controller groups Pods by the
/// resolved number, so each slice carries its own port for the same Service port name.
/// https://kubernetes.io/docs/concepts/services-networking/service/#field-spec-ports
/// ("This works even if there is a mixture of Pods in the Service using a single
/// configured name, with the same network protocol available via different port numbers")
/// https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/#distribution-of-endpointslices
#[test]
fn named_target_port_resolves_per_slice() {
    let t = translate_fixture("named-target-port.yaml", "shop/api", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/api:web/tcp"].backends,
        [
            "192.0.2.61:8080 w1",
            "192.0.2.62:8080 w1",
            "192.0.2.63:9090 w1"
        ]
    );
}

/// A slice port matches a Service port by name *and* protocol: a TCP `syslog` port is
/// not the UDP `syslog` Service port, so that one has no endpoints.
/// https://kubernetes.io/docs/reference/kubernetes-api/service-resources/endpoint-slice-v1/
/// (EndpointPort: `name`, `protocol`)
/// https://kubernetes.io/docs/concepts/services-networking/service/#custom-endpointslices
#[test]
fn endpoint_port_matched_by_name_and_protocol() {
    let t = translate_fixture("port-protocol.yaml", "ops/logs", &node_a());
    no_problems(&t);
    assert_eq!(t["ops/logs:syslog/udp"].backends, Vec::<String>::new());
    assert_eq!(t["ops/logs:syslog/udp"].when_empty, Reject);
    assert_eq!(
        t["ops/logs:syslog-tls/tcp"].backends,
        ["192.0.2.71:6514 w1", "192.0.2.72:6514 w1"]
    );
}

/// Only ready endpoints get new connections while any is ready: not-ready Pods, and
/// terminating ones, are left out of the table. Over TCP they drain (weight 0): a
/// connection already open to one keeps it, as kube-proxy's conntrack entries keep
/// theirs through a rolling update. Over UDP they are gone (kube-proxy deletes the
/// conntrack entries of UDP endpoints that stop serving).
/// https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/#conditions
/// https://kubernetes.io/docs/reference/networking/virtual-ips/#traffic-to-terminating-endpoints
#[test]
fn only_ready_endpoints() {
    let c = cluster(&load("conditions.yaml"));
    let t = translate_in(&c, "shop/rolling", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/rolling:http/tcp"].backends,
        [
            "192.0.2.101:8080 w1",
            "192.0.2.102:8080 w0",
            "192.0.2.103:8080 w0",
            "192.0.2.104:8080 w0"
        ]
    );
    assert_eq!(t["shop/rolling:dns/udp"].backends, ["192.0.2.101:8053 w1"]);
}

/// When no endpoint is ready, the ones that are serving while terminating are used, so
/// connections drain gracefully (kube-proxy since 1.26, for policy Cluster too);
/// terminating endpoints that no longer serve never are.
/// https://kubernetes.io/docs/reference/networking/virtual-ips/#traffic-to-terminating-endpoints
/// https://github.com/kubernetes/enhancements/tree/master/keps/sig-network/1669-proxy-terminating-endpoints
/// ("Example: all endpoints terminating and traffic policy is "Cluster"")
/// https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/#serving
#[test]
fn serving_terminating_when_none_ready() {
    let c = cluster(&load("conditions.yaml"));
    let t = translate_in(&c, "shop/draining", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/draining:http/tcp"].backends,
        [
            "192.0.2.111:8080 w1",
            "192.0.2.112:8080 w1",
            "192.0.2.113:8080 w0",
            "192.0.2.114:8080 w0"
        ]
    );
    assert_eq!(t["shop/draining:http/tcp"].when_empty, Drop);

    // Only terminating-not-serving and not-ready endpoints: nothing usable, so new
    // connections are refused; open ones drain.
    let t = translate_in(&c, "shop/gone", &node_a());
    assert_eq!(
        t["shop/gone:http/tcp"].backends,
        ["192.0.2.121:8080 w0", "192.0.2.122:8080 w0"]
    );
    assert_eq!(t["shop/gone:http/tcp"].when_empty, Reject);
}

/// Conditions left unset take the API's defaults: `ready` and `serving` nil mean true,
/// `terminating` nil means false (hand-made slices often omit them).
/// https://kubernetes.io/docs/reference/kubernetes-api/service-resources/endpoint-slice-v1/
/// (`endpoints.conditions`: ready and serving "A nil value should be interpreted as
/// "true""; terminating "A nil value should be interpreted as "false"")
#[test]
fn unset_conditions_take_the_api_defaults() {
    let c = cluster(&load("conditions.yaml"));
    let t = translate_in(&c, "shop/bare", &node_a());
    assert_eq!(t["shop/bare:http/tcp"].backends, ["192.0.2.151:8080 w1"]);
    // ready false, terminating true, serving unset (= true): the fallback uses it.
    let t = translate_in(&c, "shop/external-db", &node_a());
    assert_eq!(
        t["shop/external-db:http/tcp"].backends,
        ["192.0.2.141:8080 w1", "192.0.2.142:8080 w0"]
    );
}

/// With `publishNotReadyAddresses` the controller marks every endpoint ready, even
/// terminating ones; consumers go by `ready`, so all of them get traffic.
/// https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/#ready
/// ("The only exception to this rule is for Services with spec.publishNotReadyAddresses
/// set to true. Endpoints for these Services will always have the ready condition set to
/// true.")
#[test]
fn publish_not_ready_addresses_are_ready() {
    let t = translate_fixture("conditions.yaml", "shop/unready", &node_a());
    assert_eq!(
        t["shop/unready:http/tcp"].backends,
        [
            "192.0.2.131:8080 w1",
            "192.0.2.132:8080 w1",
            "192.0.2.133:8080 w1"
        ]
    );
}

/// An endpoint listed in two slices (the controller moves endpoints between slices, and
/// watches deliver the slices at different times) is one backend, and a ready copy wins.
/// https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/#duplicate-endpoints
#[test]
fn duplicate_endpoints_across_slices_counted_once() {
    let t = translate_fixture("duplicates.yaml", "shop/cart", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/cart:http/tcp"].backends,
        [
            "192.0.2.161:8080 w1",
            "192.0.2.162:8080 w1",
            "192.0.2.163:8080 w1"
        ]
    );
}

/// A Service with no usable endpoint refuses new connections at once (kube-proxy
/// installs a REJECT rule: "has no endpoints"), whether its slice is empty
/// (`endpoints: null`, scaled to zero) or it has no slice at all. No documentation page
/// states it; it is kube-proxy's behaviour since kubernetes/kubernetes#43415 and #44547.
/// https://kubernetes.io/docs/reference/networking/virtual-ips/
#[test]
fn no_endpoints_rejects() {
    let c = cluster(&load("no-endpoints.yaml"));
    let t = translate_in(&c, "shop/empty", &node_a());
    no_problems(&t);
    assert_eq!(t.names(), ["shop/empty:dns/udp", "shop/empty:http/tcp"]);
    for name in t.names() {
        assert_eq!(t[name].backends, Vec::<String>::new(), "{name}");
        assert_eq!(t[name].when_empty, Reject, "{name}");
    }
    // An unnamed port is named by its number.
    let t = translate_in(&c, "shop/orphan", &node_a());
    assert_eq!(t["shop/orphan:80/tcp"].frontends, ["tcp 203.0.113.61:80"]);
    assert_eq!(t["shop/orphan:80/tcp"].when_empty, Reject);
}

// --- Traffic policies ---------------------------------------------------------------

/// externalTrafficPolicy Local: NodePort, externalIPs and load-balancer IPs use only
/// this node's endpoints (model `/local`); the cluster IP keeps all of them. A node
/// without local endpoints drops that traffic while other nodes have endpoints.
/// https://kubernetes.io/docs/reference/networking/virtual-ips/#external-traffic-policy
#[test]
fn external_traffic_policy_local() {
    let c = cluster(&load("traffic-policy.yaml"));
    let t = translate_in(&c, "shop/ingress", &node_a());
    no_problems(&t);
    assert_eq!(
        t.names(),
        [
            "shop/ingress:http/tcp",
            "shop/ingress:http/tcp/local",
            "shop/ingress:https/tcp",
            "shop/ingress:https/tcp/local"
        ]
    );
    let cluster_wide = &t["shop/ingress:https/tcp"];
    // The cluster IP, and the in-cluster entries of the external addresses: the node's
    // pods and processes reach them through the socket hooks with every endpoint.
    assert_eq!(
        cluster_wide.frontends,
        [
            "tcp 203.0.113.70:443",
            "tcp 203.0.113.110:443 in-cluster",
            "tcp 203.0.113.160:443 in-cluster",
            "tcp 203.0.113.201:30443 in-cluster"
        ]
    );
    assert_eq!(
        cluster_wide.backends,
        [
            "192.0.2.171:8443 w1",
            "192.0.2.172:8443 w1",
            "192.0.2.173:8443 w1",
            "192.0.2.174:8443 w0",
            "192.0.2.175:8443 w0"
        ]
    );
    let local = &t["shop/ingress:https/tcp/local"];
    assert_eq!(
        local.frontends,
        [
            "tcp 203.0.113.110:443",
            "tcp 203.0.113.160:443",
            "tcp 203.0.113.201:30443"
        ]
    );
    assert_eq!(
        local.backends,
        [
            "192.0.2.171:8443 w1",
            "192.0.2.172:8443 w1",
            "192.0.2.174:8443 w0"
        ]
    );
    assert_eq!(local.when_empty, Drop);

    // node-c has no endpoint: external traffic is dropped, not rejected (the Service
    // has endpoints elsewhere; the load balancer's health check steers away).
    let t = translate_in(&c, "shop/ingress", &node("node-c", &["203.0.113.203"]));
    let local = &t["shop/ingress:https/tcp/local"];
    assert_eq!(local.backends, Vec::<String>::new());
    assert_eq!(local.when_empty, Drop);
    assert_eq!(
        t["shop/ingress:https/tcp"]
            .backends
            .iter()
            .filter(|b| b.ends_with("w1"))
            .count(),
        3
    );
}

/// With policy Local and only terminating endpoints on this node, those that still
/// serve are used (graceful drain behind a load balancer), even while other nodes have
/// ready endpoints.
/// https://kubernetes.io/docs/reference/networking/virtual-ips/#traffic-to-terminating-endpoints
#[test]
fn external_traffic_policy_local_drains_local_terminating() {
    let t = translate_fixture("traffic-policy.yaml", "shop/ingress", &node("node-d", &[]));
    assert_eq!(
        t["shop/ingress:https/tcp/local"].backends,
        ["192.0.2.175:8443 w1"]
    );
}

/// healthCheckNodePort (LoadBalancer + externalTrafficPolicy Local): the agent reports
/// the node's ready local endpoints, counted by address across the Service's ports, so
/// the load balancer in front sends traffic only to nodes that have some (0: none).
/// https://kubernetes.io/docs/tasks/access-application-cluster/create-external-load-balancer/#preserving-the-client-source-ip
/// https://kubernetes.io/docs/tutorials/services/source-ip/#source-ip-for-services-with-type-loadbalancer
#[test]
fn health_check_node_port_counts_local_ready_endpoints() {
    let c = cluster(&load("traffic-policy.yaml"));
    // Two ports, two ready local Pods (192.0.2.174 is terminating): 2, not 4 or 3.
    assert_eq!(
        translate_in(&c, "shop/ingress", &node_a()).health_check,
        Some((32000, 2))
    );
    assert_eq!(
        translate_in(&c, "shop/ingress", &node("node-b", &[])).health_check,
        Some((32000, 1))
    );
    assert_eq!(
        translate_in(&c, "shop/ingress", &node("node-c", &[])).health_check,
        Some((32000, 0))
    );
    // Serving-but-terminating endpoints do not make a node healthy.
    assert_eq!(
        translate_in(&c, "shop/ingress", &node("node-d", &[])).health_check,
        Some((32000, 0))
    );
    assert_eq!(
        translate_in(&c, "shop/internal", &node_a()).health_check,
        None
    );
}

/// internalTrafficPolicy Local: the cluster IP uses only this node's endpoints; a node
/// without any drops the traffic.
/// https://kubernetes.io/docs/reference/networking/virtual-ips/#internal-traffic-policy
/// https://kubernetes.io/docs/concepts/services-networking/service-traffic-policy/
#[test]
fn internal_traffic_policy_local() {
    let c = cluster(&load("traffic-policy.yaml"));
    let t = translate_in(&c, "shop/internal", &node_a());
    no_problems(&t);
    assert_eq!(t.names(), ["shop/internal:http/tcp/local"]);
    assert_eq!(
        t["shop/internal:http/tcp/local"].frontends,
        ["tcp 203.0.113.71:80"]
    );
    assert_eq!(
        t["shop/internal:http/tcp/local"].backends,
        ["192.0.2.181:8080 w1"]
    );
    let t = translate_in(&c, "shop/internal", &node("node-c", &[]));
    assert_eq!(
        t["shop/internal:http/tcp/local"].backends,
        Vec::<String>::new()
    );
    assert_eq!(t["shop/internal:http/tcp/local"].when_empty, Drop);
}

/// In-cluster clients (the socket hooks) of an `externalTrafficPolicy: Local` Service:
/// its NodePort, externalIPs and load-balancer IPs use every ready endpoint, as
/// kube-proxy's short-circuit of pod and node traffic to the cluster chain does, also
/// with `internalTrafficPolicy: Local` (which narrows the cluster IP only) and past
/// `loadBalancerSourceRanges`. Services with policy Cluster need no in-cluster entry.
/// https://kubernetes.io/docs/reference/networking/virtual-ips/#traffic-policies
#[test]
fn in_cluster_clients_of_external_policy_local_use_every_endpoint() {
    use crate::cluster::Object;
    let mut objects = load("traffic-policy.yaml");
    for o in &mut objects {
        if let Object::Service(svc) = o
            && svc.metadata.name.as_deref() == Some("ingress")
        {
            let spec = svc.spec.as_mut().expect("spec");
            spec.internal_traffic_policy = Some("Local".into());
            spec.load_balancer_source_ranges = Some(vec!["198.51.100.0/25".into()]);
        }
    }
    let c = cluster(&objects);
    let t = translate_in(&c, "shop/ingress", &node_a());
    no_problems(&t);
    assert_eq!(
        t.names(),
        [
            "shop/ingress:http/tcp",
            "shop/ingress:http/tcp/local",
            "shop/ingress:http/tcp/local/ranges",
            "shop/ingress:https/tcp",
            "shop/ingress:https/tcp/local",
            "shop/ingress:https/tcp/local/ranges"
        ]
    );
    // The cluster IP follows internalTrafficPolicy Local.
    let local = &t["shop/ingress:https/tcp/local"];
    assert_eq!(
        local.frontends,
        [
            "tcp 203.0.113.70:443",
            "tcp 203.0.113.160:443",
            "tcp 203.0.113.201:30443"
        ]
    );
    assert_eq!(
        t["shop/ingress:https/tcp/local/ranges"].frontends,
        ["tcp 203.0.113.110:443"]
    );
    // In-cluster entries: every ready endpoint, no source ranges.
    let in_cluster = &t["shop/ingress:https/tcp"];
    assert_eq!(
        in_cluster.frontends,
        [
            "tcp 203.0.113.110:443 in-cluster",
            "tcp 203.0.113.160:443 in-cluster",
            "tcp 203.0.113.201:30443 in-cluster"
        ]
    );
    assert_eq!(
        in_cluster
            .backends
            .iter()
            .filter(|b| b.ends_with("w1"))
            .count(),
        3
    );
    assert!(in_cluster.ranges.is_empty());

    // Policy Cluster: one model, no in-cluster entries.
    let t = translate_in(&c, "shop/internal", &node_a());
    assert!(
        t.models
            .values()
            .flat_map(|m| &m.frontends)
            .all(|f| !f.ends_with("in-cluster"))
    );
}

// --- Session affinity, source ranges --------------------------------------------------

/// sessionAffinity ClientIP keeps a client on its backend for
/// `sessionAffinityConfig.clientIP.timeoutSeconds`, 10800 (3 hours) when unset.
/// https://kubernetes.io/docs/reference/networking/virtual-ips/#session-affinity
/// https://kubernetes.io/docs/reference/networking/virtual-ips/#session-stickiness-timeout
#[test]
fn session_affinity_client_ip() {
    let c = cluster(&load("session-affinity.yaml"));
    let affinity = |svc: &str| {
        let t = translate_in(&c, svc, &node_a());
        no_problems(&t);
        t[format!("{svc}:http/tcp").as_str()].affinity_s
    };
    assert_eq!(affinity("shop/sticky"), Some(600));
    assert_eq!(affinity("shop/sticky-default"), Some(10_800));
    assert_eq!(
        affinity("shop/sticky-manifest"),
        Some(DEFAULT_AFFINITY_TIMEOUT_S)
    );
    assert_eq!(DEFAULT_AFFINITY_TIMEOUT_S, 10_800);
    assert_eq!(affinity("shop/plain"), None);
}

/// loadBalancerSourceRanges restrict the load balancer only: the LoadBalancer IPs get
/// their own model (`/ranges`) carrying the ranges; the cluster IP, NodePort and
/// external IPs stay open.
/// https://kubernetes.io/docs/tasks/access-application-cluster/configure-cloud-provider-firewall/#restrict-access-for-loadbalancer-service
/// https://kubernetes.io/docs/reference/kubernetes-api/service-resources/service-v1/#ServiceSpec
#[test]
fn source_ranges_on_load_balancer_frontends_only() {
    let c = cluster(&load("source-ranges.yaml"));
    let t = translate_in(&c, "shop/admin", &node_a());
    no_problems(&t);
    assert_eq!(
        t.names(),
        ["shop/admin:http/tcp", "shop/admin:http/tcp/ranges"]
    );
    let open = &t["shop/admin:http/tcp"];
    assert_eq!(
        open.frontends,
        [
            "tcp 203.0.113.90:80",
            "tcp 203.0.113.190:80",
            "tcp 203.0.113.201:30090"
        ]
    );
    assert!(open.ranges.is_empty());
    let ranged = &t["shop/admin:http/tcp/ranges"];
    assert_eq!(ranged.frontends, ["tcp 203.0.113.120:80"]);
    assert_eq!(ranged.ranges, ["198.51.100.0/25", "198.51.100.200/29"]);
    assert_eq!(ranged.backends, open.backends);

    // Ranges of one family only: the other family's load-balancer IP admits no client
    // (xlb fails closed rather than leave it open).
    let t = translate_in(&c, "shop/admin-ds", &node_a());
    assert_eq!(
        t["shop/admin-ds:http/tcp/v6/ranges"].ranges,
        ["198.51.100.0/24"]
    );
    assert_eq!(
        t["shop/admin-ds:http/tcp/v6/ranges"].frontends,
        ["tcp [2001:db8:e::121]:80"]
    );
}

// --- xlb annotations ----------------------------------------------------------------

/// `xlb.dev/weight` on an EndpointSlice weighs all its endpoints; `xlb.dev/endpoint-weights`
/// weighs single addresses; 0 drains an endpoint (kept for established flows, no new
/// ones). xlb's own annotations (prefixed, as Kubernetes asks of tools):
/// https://kubernetes.io/docs/concepts/overview/working-with-objects/annotations/#syntax-and-character-set
#[test]
fn weight_annotations() {
    let t = translate_fixture("weights.yaml", "shop/checkout", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/checkout:http/tcp"].backends,
        [
            "192.0.2.201:8080 w10",
            "192.0.2.202:8080 w10",
            "192.0.2.211:8080 w0",
            "192.0.2.212:8080 w5",
            "192.0.2.213:8080 w1"
        ]
    );
}

/// `xlb.dev/maglev-table-size` on the Service sets M; otherwise the smallest size class
/// with 100 slots per endpoint (11 endpoints need more than 1021).
#[test]
fn maglev_table_size() {
    let c = cluster(&load("table-size.yaml"));
    let size = |svc: &str| {
        let t = translate_in(&c, svc, &node_a());
        no_problems(&t);
        t[format!("{svc}:http/tcp").as_str()].table_size
    };
    assert_eq!(size("shop/big"), 65_537);
    assert_eq!(size("shop/wide"), 4093);
    assert_eq!(size("shop/narrow"), 1021);
}

// --- Bad objects -------------------------------------------------------------------

/// Every bad field is one problem naming kind, namespace/name and field; the rest of the
/// object is still served. (The API server refuses most of these; `--manifests` and
/// buggy controllers do not.)
#[test]
fn bad_fields_are_skipped_with_a_problem() {
    let c = cluster(&load("bad-objects.yaml"));
    let t = translate_in(&c, "shop/messy", &node_a());
    assert_eq!(
        t.problems,
        [
            "Service shop/messy: metadata.annotations[xlb.dev/maglev-table-size]: must be a \
             prime 2..=131071, got \"1000\"; using the default",
            "Service shop/messy: spec.externalIPs[1]: 2001:db8:e::196 is IPv6, but the \
             Service has no IPv6 cluster IP",
            "Service shop/messy: spec.loadBalancerSourceRanges[1]: \"everyone\" is not a CIDR",
            "Service shop/messy: spec.ports[1].port: 70000 is not a port number",
            "EndpointSlice shop/messy-a: endpoints[1].addresses[0]: 2001:db8:b::252 is not \
             IPv4 (addressType IPv4)",
            "EndpointSlice shop/messy-a: endpoints[2].addresses[0]: \"192.0.2.300\" is not \
             an IP address",
            "EndpointSlice shop/messy-a: metadata.annotations[xlb.dev/weight]: must be a \
             weight 0..=100, got \"heavy\"",
            "EndpointSlice shop/messy-b: ports[0].port: 70000 is not a port number",
            "EndpointSlice shop/messy-c: metadata.annotations[xlb.dev/endpoint-weights]: \
             \"bogus\" is not ADDRESS=WEIGHT",
        ]
    );
    assert_eq!(
        t.names(),
        ["shop/messy:http/tcp", "shop/messy:http/tcp/ranges"]
    );
    let open = &t["shop/messy:http/tcp"];
    assert_eq!(
        open.frontends,
        [
            "tcp 203.0.113.96:80",
            "tcp 203.0.113.196:80",
            "tcp 203.0.113.201:30096"
        ]
    );
    assert_eq!(
        open.backends,
        [
            "192.0.2.250:8080 w7",
            "192.0.2.251:8080 w1",
            "192.0.2.253:8080 w1"
        ]
    );
    assert_eq!(open.table_size, 1021);
    let ranged = &t["shop/messy:http/tcp/ranges"];
    assert_eq!(ranged.frontends, ["tcp 203.0.113.130:80"]);
    assert_eq!(ranged.ranges, ["198.51.100.0/24"]);
}

/// Endpoints that would reach the node itself (unspecified, loopback, link-local, an
/// IPv4-mapped loopback), no host (multicast, broadcast) or the Service's own addresses
/// are skipped one by one with a problem naming the endpoint; the rest is served.
#[test]
fn unusable_endpoint_addresses_are_refused_one_by_one() {
    let t = translate_fixture("unusable-endpoints.yaml", "shop/trap", &node_a());
    let slice = |s: &str, i: usize, reason: &str| {
        format!("EndpointSlice shop/{s}: endpoints[{i}].addresses[0]: {reason}")
    };
    assert_eq!(
        t.problems,
        [
            slice("trap-v4", 1, "127.0.0.1 is a loopback address"),
            slice("trap-v4", 2, "0.0.0.0 is the unspecified address"),
            slice("trap-v4", 3, "169.254.169.254 is a link-local address"),
            slice("trap-v4", 4, "224.0.0.1 is a multicast address"),
            slice("trap-v4", 5, "255.255.255.255 is the broadcast address"),
            slice(
                "trap-v4",
                6,
                "198.51.100.40 is an address of Service shop/trap itself"
            ),
            slice(
                "trap-v4",
                7,
                "203.0.113.40 is an address of Service shop/trap itself"
            ),
            slice(
                "trap-v4",
                8,
                "203.0.113.41 is an address of Service shop/trap itself"
            ),
            slice("trap-v6", 0, "::1 is a loopback address"),
            slice("trap-v6", 1, ":: is the unspecified address"),
            slice("trap-v6", 2, "fe80::1 is a link-local address"),
            slice("trap-v6", 3, "ff02::1 is a multicast address"),
            slice(
                "trap-v6",
                4,
                "2001:db8:40::1 is an address of Service shop/trap itself"
            ),
            slice(
                "trap-v6",
                5,
                "::ffff:127.0.0.1 is an IPv4-mapped address of the node itself or of no host"
            ),
        ]
    );
    assert_eq!(t.names(), ["shop/trap:http/tcp", "shop/trap:http/tcp/v6"]);
    assert_eq!(
        t["shop/trap:http/tcp"].backends,
        ["192.0.2.40:8080 w1", "192.0.2.41:8080 w1"]
    );
    assert_eq!(
        t["shop/trap:http/tcp/v6"].backends,
        ["[2001:db8:b::40]:8080 w1"]
    );
}

/// A huge bad value is quoted short: about 200 bytes, an ellipsis and its length.
#[test]
fn a_huge_bad_annotation_is_quoted_short() {
    use crate::cluster::Object;
    let mut objects = load("weights.yaml");
    let huge = "9".repeat(4 << 20);
    for object in &mut objects {
        if let Object::EndpointSlice(slice) = object {
            slice
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(super::WEIGHT_ANNOTATION.to_owned(), huge.clone());
        }
    }
    let c = cluster(&objects);
    let key = c.services.keys().next().expect("a Service").to_string();
    let t = translate_in(&c, &key, &node_a());
    let problem = t
        .problems
        .iter()
        .find(|p| p.contains("xlb.dev/weight"))
        .unwrap_or_else(|| panic!("{:#?}", t.problems));
    assert!(problem.len() < 400, "{} bytes", problem.len());
    assert!(
        problem.ends_with(&format!("got \"{}…\" (4194304 bytes)", "9".repeat(200))),
        "{problem}"
    );
}

/// A bad cluster IP of a dual-stack Service: the other family is still served.
#[test]
fn bad_cluster_ip_keeps_the_other_family() {
    let t = translate_fixture("bad-objects.yaml", "shop/half", &node_a());
    assert_eq!(
        t.problems,
        ["Service shop/half: spec.clusterIPs[1]: \"2001:db8:c::9g\" is not an IP address"]
    );
    assert_eq!(t.names(), ["shop/half:http/tcp"]);
    assert_eq!(t["shop/half:http/tcp"].frontends, ["tcp 203.0.113.97:80"]);
}

/// Source ranges given but none valid: the load balancer IPs are not served at all
/// (failing open would admit every client the user meant to keep out).
#[test]
fn no_valid_source_range_serves_no_load_balancer_ip() {
    let t = translate_fixture("bad-objects.yaml", "shop/closed", &node_a());
    assert_eq!(t.problems.len(), 2, "{:#?}", t.problems);
    assert!(
        t.problems[0].contains("spec.loadBalancerSourceRanges[0]"),
        "{:?}",
        t.problems
    );
    assert!(
        t.problems[1].contains("status.loadBalancer.ingress"),
        "{:?}",
        t.problems
    );
    assert_eq!(t.names(), ["shop/closed:http/tcp"]);
    assert_eq!(t["shop/closed:http/tcp"].frontends, ["tcp 203.0.113.98:80"]);
}

/// A bad endpoint in a slice shared by several Service ports is one problem, not one
/// per port.
#[test]
fn a_bad_endpoint_is_one_problem_whatever_the_port_count() {
    let mut objects = load("kube-dns.yaml");
    for object in &mut objects {
        if let crate::cluster::Object::EndpointSlice(slice) = object {
            slice.endpoints[1].addresses[0] = "2001:db8:b::3".into();
        }
    }
    let t = translate_in(&cluster(&objects), "kube-system/kube-dns", &node_a());
    assert_eq!(
        t.problems,
        [
            "EndpointSlice kube-system/kube-dns-8mfzt: endpoints[1].addresses[0]: 2001:db8:b::3 \
          is not IPv4 (addressType IPv4)"
        ]
    );
    assert_eq!(
        t["kube-system/kube-dns:dns/udp"].backends,
        ["192.0.2.2:53 w1"]
    );
    assert_eq!(
        t["kube-system/kube-dns:metrics/tcp"].backends,
        ["192.0.2.2:9153 w1"]
    );
}

/// One frontend, one model: a port repeating an earlier port's number and protocol (the
/// API server refuses it, a manifest may not) is a problem, and a load-balancer IP that
/// is also an external IP stays behind the source ranges.
#[test]
fn a_frontend_is_served_once_per_service() {
    use crate::cluster::Object;
    let mut objects = load("kube-dns.yaml");
    for object in &mut objects {
        if let Object::Service(svc) = object {
            svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[2].port = 53;
        }
    }
    let t = translate_in(&cluster(&objects), "kube-system/kube-dns", &node_a());
    assert_eq!(
        t.problems,
        [
            "Service kube-system/kube-dns: spec.ports[2]: TCP 203.0.113.10:53 already served \
          by an earlier port"
        ]
    );
    assert_eq!(
        t.names(),
        [
            "kube-system/kube-dns:dns-tcp/tcp",
            "kube-system/kube-dns:dns/udp"
        ]
    );

    let mut objects = load("source-ranges.yaml");
    for object in &mut objects {
        if let Object::Service(svc) = object {
            svc.spec.as_mut().unwrap().external_ips = Some(vec!["203.0.113.120".into()]);
        }
    }
    let t = translate_in(&cluster(&objects), "shop/admin", &node_a());
    no_problems(&t);
    assert_eq!(
        t["shop/admin:http/tcp"].frontends,
        ["tcp 203.0.113.90:80", "tcp 203.0.113.201:30090"]
    );
    assert_eq!(
        t["shop/admin:http/tcp/ranges"].frontends,
        ["tcp 203.0.113.120:80"]
    );
}

/// A Service without a cluster IP (a hand-written manifest; the API server would have
/// allocated one) has no frontend, and says so.
#[test]
fn no_cluster_ip_is_a_problem() {
    let t = translate_fixture("bad-objects.yaml", "shop/unallocated", &node_a());
    assert_eq!(
        t.problems,
        ["Service shop/unallocated: spec.clusterIP: not set: the Service has no frontend"]
    );
    assert!(t.models.is_empty());
}

// --- Modes ---------------------------------------------------------------------------

/// `externalTrafficPolicy: Cluster` frontends are source-NATed in the node's mode (snat by
/// default, as kube-proxy masquerades), `Local` ones never; `xlb.dev/lb-mode` overrides
/// the node's mode, a bad value is a problem naming the annotation and the node's mode
/// applies. Endpoints whose `nodeName` is this node are local (never source-NATed).
#[test]
fn lb_mode_snat_for_cluster_never_for_local_and_the_annotation_overrides() {
    use crate::mode::LbMode;
    let mut c = cluster(&load("traffic-policy.yaml"));
    let key = crate::cluster::ObjectKey::new("shop", "ingress");
    let translate = |c: &crate::cluster::Cluster, mode: LbMode| {
        let mut node = node_a();
        node.lb_mode = mode;
        super::translate(&c.services[&key], &c.slices_of(&key), &node)
    };
    let t = translate(&c, LbMode::Snat);
    assert!(t.services["shop/ingress:https/tcp"].snat, "Cluster scope");
    assert!(
        !t.services["shop/ingress:https/tcp/local"].snat,
        "Local policy"
    );
    let local: Vec<bool> = t.services["shop/ingress:https/tcp"]
        .backends
        .values()
        .map(|b| b.local)
        .collect();
    assert!(local.contains(&true) && local.contains(&false), "{local:?}");
    assert!(
        t.services["shop/ingress:https/tcp/local"]
            .backends
            .values()
            .all(|b| b.local)
    );
    assert!(!translate(&c, LbMode::Dnat).services["shop/ingress:https/tcp"].snat);

    let svc = std::sync::Arc::make_mut(c.services.get_mut(&key).expect("ingress"));
    svc.metadata
        .annotations
        .get_or_insert_default()
        .insert(super::LB_MODE_ANNOTATION.into(), "dnat".into());
    assert!(!translate(&c, LbMode::Snat).services["shop/ingress:https/tcp"].snat);
    let svc = std::sync::Arc::make_mut(c.services.get_mut(&key).expect("ingress"));
    svc.metadata
        .annotations
        .get_or_insert_default()
        .insert(super::LB_MODE_ANNOTATION.into(), "DSR".into());
    let t = translate(&c, LbMode::Snat);
    assert!(t.services["shop/ingress:https/tcp"].snat, "the node's mode");
    assert!(
        t.problems
            .iter()
            .any(|p| p.field.contains(super::LB_MODE_ANNOTATION) && p.reason.contains("\"DSR\"")),
        "{:?}",
        t.problems
    );
}

/// `dsr` encapsulates `Cluster` frontends (never `Local` ones, never source-NATed);
/// `hybrid` encapsulates TCP and source-NATs UDP; the annotation picks either.
#[test]
fn lb_mode_dsr_and_hybrid() {
    use crate::mode::LbMode;
    let mut c = cluster(&load("traffic-policy.yaml"));
    let key = crate::cluster::ObjectKey::new("shop", "ingress");
    let translate = |c: &crate::cluster::Cluster, mode: LbMode| {
        let mut node = node_a();
        node.lb_mode = mode;
        super::translate(&c.services[&key], &c.slices_of(&key), &node)
    };
    for mode in [LbMode::Dsr, LbMode::Hybrid] {
        let t = translate(&c, mode);
        let tcp = &t.services["shop/ingress:https/tcp"];
        assert!(tcp.dsr && !tcp.snat, "{mode}: TCP is encapsulated");
        let local = &t.services["shop/ingress:https/tcp/local"];
        assert!(!local.dsr && !local.snat, "{mode}: Local policy");
    }
    let svc = std::sync::Arc::make_mut(c.services.get_mut(&key).expect("ingress"));
    svc.metadata
        .annotations
        .get_or_insert_default()
        .insert(super::LB_MODE_ANNOTATION.into(), "dsr".into());
    let t = translate(&c, LbMode::Snat);
    assert!(t.services["shop/ingress:https/tcp"].dsr, "the annotation");
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}
