//! A Service of the cluster as the tests describe it: one port, its frontends (ClusterIPs,
//! a NodePort, LoadBalancer IPs) and its endpoints with the node each runs on. Both the
//! manifest writer ([`super::manifests`]) and kube-proxy's rules ([`super::kube_proxy`])
//! are rendered from it, so every implementation is programmed with the same Services.

use std::net::{IpAddr, SocketAddr};

use super::Protocol;

/// `externalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Any node forwards to any endpoint (kube-proxy masquerades the source).
    Cluster,
    /// A node forwards only to its own endpoints and keeps the client's address.
    Local,
}

impl TrafficPolicy {
    /// As Kubernetes writes it.
    pub fn kubernetes(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// One endpoint: a pod's address and the node it runs on (the EndpointSlice's
/// `nodeName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    /// The Kubernetes node name (`node-<i>`).
    pub node: String,
    /// The pod's name, for the slice's `targetRef`.
    pub pod: String,
}

/// One single-port Service, dual-stack when it has addresses of both families.
///
/// Its type follows from its frontends, as the API server requires them: `LoadBalancer`
/// with `load_balancer_ips`, else `NodePort` with a `node_port`, else `ClusterIP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterService {
    /// The Kubernetes namespace.
    pub namespace: String,
    pub name: String,
    /// The port's name (`http`, `dns`).
    pub port_name: String,
    pub protocol: Protocol,
    /// The Service port, on ClusterIPs and LB IPs.
    pub port: u16,
    /// The endpoints' port.
    pub target_port: u16,
    /// One per family (`spec.clusterIPs`).
    pub cluster_ips: Vec<IpAddr>,
    pub node_port: Option<u16>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// Meaningful for NodePort and LoadBalancer Services only.
    pub external_traffic_policy: TrafficPolicy,
    /// For a `Local` LoadBalancer Service (the API server allocates one).
    pub health_check_node_port: Option<u16>,
    /// Ready endpoints of both families.
    pub endpoints: Vec<Endpoint>,
}

impl ClusterService {
    /// kube-proxy's service-port name, `namespace/name:port_name`.
    pub fn port_name_full(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }

    /// `LoadBalancer`, `NodePort` or `ClusterIP`.
    pub fn kubernetes_type(&self) -> &'static str {
        if !self.load_balancer_ips.is_empty() {
            "LoadBalancer"
        } else if self.node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        }
    }

    /// Reachable from outside the cluster (a NodePort or an LB IP).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some() || !self.load_balancer_ips.is_empty()
    }

    /// The endpoints of one family (`v6`: IPv6).
    pub fn endpoints_of(&self, v6: bool) -> impl Iterator<Item = &Endpoint> {
        self.endpoints
            .iter()
            .filter(move |e| e.address.is_ipv6() == v6)
    }

    /// The ClusterIP of one family, `ip:port`.
    pub fn cluster_ip(&self, v6: bool) -> Option<SocketAddr> {
        self.cluster_ips
            .iter()
            .find(|ip| ip.is_ipv6() == v6)
            .map(|ip| SocketAddr::new(*ip, self.port))
    }

    /// The LB IP of one family, `ip:port`.
    pub fn load_balancer_ip(&self, v6: bool) -> Option<SocketAddr> {
        self.load_balancer_ips
            .iter()
            .find(|ip| ip.is_ipv6() == v6)
            .map(|ip| SocketAddr::new(*ip, self.port))
    }

    /// The nodes (names) that run an endpoint of this Service.
    pub fn endpoint_nodes(&self) -> Vec<&str> {
        let mut nodes: Vec<&str> = self.endpoints.iter().map(|e| e.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// Checks what the API server would: a name, ports, one ClusterIP per family, a
    /// NodePort in 30000-32767, IP families that match.
    pub fn validate(&self) -> anyhow::Result<()> {
        let what = format!("service {}/{}", self.namespace, self.name);
        anyhow::ensure!(!self.name.is_empty(), "{what}: name: must not be empty");
        anyhow::ensure!(self.port != 0, "{what}: port: must not be 0");
        anyhow::ensure!(self.target_port != 0, "{what}: targetPort: must not be 0");
        anyhow::ensure!(
            !self.cluster_ips.is_empty(),
            "{what}: clusterIPs: every Service here has at least one"
        );
        for v6 in [false, true] {
            anyhow::ensure!(
                self.cluster_ips
                    .iter()
                    .filter(|ip| ip.is_ipv6() == v6)
                    .count()
                    <= 1,
                "{what}: clusterIPs: at most one per family"
            );
        }
        for (field, port) in [
            ("nodePort", self.node_port),
            ("healthCheckNodePort", self.health_check_node_port),
        ] {
            if let Some(port) = port {
                anyhow::ensure!(
                    (30_000..=32_767).contains(&port),
                    "{what}: {field}: {port} is outside 30000-32767"
                );
            }
        }
        for ip in self
            .load_balancer_ips
            .iter()
            .chain(self.endpoints.iter().map(|e| &e.address))
        {
            anyhow::ensure!(
                self.cluster_ips.iter().any(|c| c.is_ipv6() == ip.is_ipv6()),
                "{what}: {ip} has no ClusterIP of its family (ipFamilies)"
            );
        }
        Ok(())
    }
}

/// The one Service the renderers' and the manifest writer's unit tests use.
#[cfg(test)]
pub(crate) mod fixture {
    use super::{ClusterService, Endpoint, Protocol, TrafficPolicy};

    /// `shop/web` (port `http`, TCP 80 -> 8080): dual-stack ClusterIPs (.10) and LB IPs
    /// (.100), NodePort 30080, with `policy` (a `Local` one has the healthCheckNodePort
    /// the API server would allocate), and an endpoint per `(address, node)`.
    pub(crate) fn web(policy: TrafficPolicy, endpoints: &[(&str, &str)]) -> ClusterService {
        ClusterService {
            namespace: "shop".into(),
            name: "web".into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: 8080,
            cluster_ips: vec![
                "203.0.113.10".parse().unwrap(),
                "2001:db8:f::10".parse().unwrap(),
            ],
            node_port: Some(30_080),
            load_balancer_ips: vec![
                "203.0.113.100".parse().unwrap(),
                "2001:db8:f::100".parse().unwrap(),
            ],
            external_traffic_policy: policy,
            health_check_node_port: (policy == TrafficPolicy::Local).then_some(32_000),
            endpoints: endpoints
                .iter()
                .map(|(ip, node)| Endpoint {
                    address: ip.parse().unwrap(),
                    node: (*node).into(),
                    pod: format!("{node}-pod"),
                })
                .collect(),
        }
    }
}
