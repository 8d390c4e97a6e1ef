//! The benchmark's synthetic cluster: N ClusterIP Services, one TCP port each, with M
//! ready endpoints in one EndpointSlice each, as Kubernetes objects (for xlb) and as
//! kube-proxy's service ports (for the iptables and nftables baselines).
//!
//! Addresses come from the documentation ranges. A /24 has too few VIPs for 10,000
//! Services, so Service `i` is `203.0.113.(1 + i / 250)` port `10000 + i % 250` (40
//! addresses x 250 ports for 10,000). Endpoint `j` of Service `i` is
//! `192.0.2.(1 + (i % 20) * 10 + j)` on port `20000 + i / 20` (a slice has one port for
//! all its endpoints), unique across Services. A change replaces endpoint 0 with
//! `192.0.2.(201 + i % 20)` (a pod replaced), also unique, and the next change of that
//! Service puts it back.

use std::net::{Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeStatus, Service, ServicePort as KubeServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_core::cluster::{Object, SERVICE_NAME_LABEL};

use crate::kube_proxy::ServicePort;

pub const NAMESPACE: &str = "bench";
pub const NODE: &str = "bench-node";
const PORT_NAME: &str = "http";
/// Most endpoints per Service the address plan allows.
pub const MAX_ENDPOINTS: usize = 10;
/// Most Services: 254 VIP addresses x 250 ports.
pub const MAX_SERVICES: usize = 254 * 250;

#[derive(Debug, Clone, Copy)]
pub struct Synthetic {
    pub services: usize,
    pub endpoints: usize,
}

fn octet(n: usize) -> u8 {
    u8::try_from(n).expect("address plan keeps octets below 256")
}

fn port(n: usize) -> u16 {
    u16::try_from(n).expect("address plan keeps ports below 65536")
}

impl Synthetic {
    pub fn new(services: usize, endpoints: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=MAX_SERVICES).contains(&services),
            "--services must be 1..={MAX_SERVICES}"
        );
        anyhow::ensure!(
            (1..=MAX_ENDPOINTS).contains(&endpoints),
            "--endpoints must be 1..={MAX_ENDPOINTS}"
        );
        Ok(Self {
            services,
            endpoints,
        })
    }

    pub fn name(i: usize) -> String {
        format!("svc-{i:05}")
    }

    pub fn vip(i: usize) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::new(203, 0, 113, octet(1 + i / 250)),
            port(10_000 + i % 250),
        )
    }

    fn backend_port(i: usize) -> u16 {
        port(20_000 + i / 20)
    }

    /// Service `i`'s endpoints; `swapped`: endpoint 0 replaced.
    pub fn endpoints(&self, i: usize, swapped: bool) -> Vec<SocketAddrV4> {
        (0..self.endpoints)
            .map(|j| {
                let host = if j == 0 && swapped {
                    201 + i % 20
                } else {
                    1 + (i % 20) * 10 + j
                };
                SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, octet(host)), Self::backend_port(i))
            })
            .collect()
    }

    pub fn service_port(&self, i: usize, swapped: bool) -> ServicePort {
        ServicePort {
            namespace: NAMESPACE.into(),
            service: Self::name(i),
            port_name: PORT_NAME.into(),
            vip: Self::vip(i),
            endpoints: self.endpoints(i, swapped),
        }
    }

    pub fn service_ports(&self) -> Vec<ServicePort> {
        (0..self.services)
            .map(|i| self.service_port(i, false))
            .collect()
    }

    pub fn service(i: usize) -> Object {
        let vip = Self::vip(i);
        Object::Service(Service {
            metadata: ObjectMeta {
                name: Some(Self::name(i)),
                namespace: Some(NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: Some(vip.ip().to_string()),
                cluster_ips: Some(vec![vip.ip().to_string()]),
                ports: Some(vec![KubeServicePort {
                    name: Some(PORT_NAME.into()),
                    port: i32::from(vip.port()),
                    protocol: Some("TCP".into()),
                    target_port: Some(IntOrString::Int(i32::from(Self::backend_port(i)))),
                    ..KubeServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        })
    }

    pub fn slice(&self, i: usize, swapped: bool) -> Object {
        let endpoints = self
            .endpoints(i, swapped)
            .into_iter()
            .map(|e| Endpoint {
                addresses: vec![e.ip().to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                node_name: Some("bench-worker".into()),
                ..Endpoint::default()
            })
            .collect();
        Object::EndpointSlice(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{}-x7k2p", Self::name(i))),
                namespace: Some(NAMESPACE.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), Self::name(i))].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(vec![EndpointPort {
                name: Some(PORT_NAME.into()),
                port: Some(i32::from(Self::backend_port(i))),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
        })
    }

    pub fn node() -> Object {
        Object::Node(Node {
            metadata: ObjectMeta {
                name: Some(NODE.into()),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: "198.51.100.1".into(),
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        })
    }

    /// Every object: the Node, then each Service and its slice.
    pub fn objects(&self) -> Vec<Object> {
        std::iter::once(Self::node())
            .chain((0..self.services).flat_map(|i| [Self::service(i), self.slice(i, false)]))
            .collect()
    }

    /// The Service changed by change number `k` (spread over all Services).
    pub fn changed(&self, k: usize) -> usize {
        (k * 7919 + 13) % self.services
    }
}
