//! The cluster's Kubernetes objects as YAML in a directory, for agents started with
//! `--manifests DIR --node-name NODE` (one per node, all reading the same objects): a
//! Node per node (InternalIPs, `podCIDRs`), and per Service the Service and one
//! EndpointSlice per IP family whose endpoints carry `nodeName`.
//!
//! The objects are k8s-openapi's own types serialised, so they have exactly the shapes
//! the API server returns (`kubectl get -o yaml`), with the fields the controllers fill in
//! (uid, resourceVersion, the slice's labels and owner).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeSpec, NodeStatus,
    ObjectReference, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Cluster, ClusterService};

/// The file holding every Node.
pub const NODES_FILE: &str = "nodes.yaml";

/// A directory of manifests, removed on drop.
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    /// Creates `<tmp>/xlb-manifests-<tag>-<pid>` (emptied if it exists).
    pub fn new(tag: &str) -> anyhow::Result<ManifestDir> {
        let path = std::env::temp_dir().join(format!("xlb-manifests-{tag}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(ManifestDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the cluster's Nodes and `services` (one file per Service, replaced
    /// atomically), and removes the files of Services no longer listed.
    pub fn write(&self, cluster: &Cluster, services: &[ClusterService]) -> anyhow::Result<()> {
        crate::write_atomically(&self.path.join(NODES_FILE), &nodes_yaml(cluster)?);
        let mut keep = vec![PathBuf::from(NODES_FILE)];
        for svc in services {
            let file = PathBuf::from(format!("svc-{}-{}.yaml", svc.namespace, svc.name));
            crate::write_atomically(&self.path.join(&file), &service_yaml(svc)?);
            keep.push(file);
        }
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if !keep.iter().any(|k| k.as_os_str() == entry.file_name()) {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
        Ok(())
    }

    /// The agent's source arguments for node `node_name`:
    /// `--manifests DIR --node-name NODE`.
    pub fn agent_source(&self, node_name: &str) -> Vec<String> {
        vec![
            "--manifests".into(),
            self.path.display().to_string(),
            "--node-name".into(),
            node_name.into(),
        ]
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove manifests");
        }
    }
}

/// A stable, well-formed uid for an object (`kind/namespace/name`).
fn uid(what: &str) -> String {
    let hash = what.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        hash >> 32,
        (hash >> 16) & 0xffff,
        hash & 0xfff,
        (hash >> 4) & 0xfff,
        hash & 0xffff_ffff_ffff
    )
}

fn meta(kind: &str, namespace: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        uid: Some(uid(&format!("{kind}/{}/{name}", namespace.unwrap_or("")))),
        resource_version: Some("1000".to_owned()),
        ..ObjectMeta::default()
    }
}

/// Every node as `kubectl get nodes -o yaml` prints them (abridged to what a proxy
/// reads): InternalIPs of both families, the hostname, `podCIDR` and `podCIDRs`.
pub fn nodes_yaml(cluster: &Cluster) -> anyhow::Result<String> {
    let mut docs = Vec::new();
    for node in &cluster.nodes {
        let i = node.index;
        let mut metadata = meta("Node", None, &node.name);
        metadata.labels = Some(BTreeMap::from([(
            "kubernetes.io/hostname".to_owned(),
            node.name.clone(),
        )]));
        let cidrs = vec![Cluster::pod_cidr_v4(i), Cluster::pod_cidr_v6(i)];
        let address = |address: String, type_: &str| NodeAddress {
            address,
            type_: type_.to_owned(),
        };
        let object = Node {
            metadata,
            spec: Some(NodeSpec {
                pod_cidr: Some(cidrs[0].clone()),
                pod_cidrs: Some(cidrs),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    address(Cluster::node_v4(i).to_string(), "InternalIP"),
                    address(Cluster::node_v6(i).to_string(), "InternalIP"),
                    address(node.name.clone(), "Hostname"),
                ]),
                ..NodeStatus::default()
            }),
        };
        docs.push(serde_yaml::to_string(&object).context("serialising a Node")?);
    }
    Ok(docs.join("---\n"))
}

/// The Service and its EndpointSlices (one per family with endpoints) in one
/// multi-document file.
pub fn service_yaml(svc: &ClusterService) -> anyhow::Result<String> {
    svc.validate()?;
    let mut docs = vec![serde_yaml::to_string(&service(svc)).context("serialising a Service")?];
    for v6 in [false, true] {
        if let Some(slice) = endpoint_slice(svc, v6) {
            docs.push(serde_yaml::to_string(&slice).context("serialising an EndpointSlice")?);
        }
    }
    Ok(docs.join("---\n"))
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv6() { "IPv6" } else { "IPv4" }
}

fn service(svc: &ClusterService) -> Service {
    let mut metadata = meta("Service", Some(&svc.namespace), &svc.name);
    metadata.creation_timestamp = None;
    let external = svc.externally_accessible();
    let load_balancer = svc.kubernetes_type() == "LoadBalancer";
    let families: Vec<String> = svc
        .cluster_ips
        .iter()
        .map(|ip| family(ip).to_owned())
        .collect();
    let dual = families.len() > 1;
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(svc.kubernetes_type().to_owned()),
            cluster_ip: svc.cluster_ips.first().map(ToString::to_string),
            cluster_ips: Some(svc.cluster_ips.iter().map(ToString::to_string).collect()),
            ip_families: Some(families),
            ip_family_policy: Some(
                if dual {
                    "RequireDualStack"
                } else {
                    "SingleStack"
                }
                .to_owned(),
            ),
            internal_traffic_policy: Some("Cluster".to_owned()),
            external_traffic_policy: external
                .then(|| svc.external_traffic_policy.kubernetes().to_owned()),
            health_check_node_port: svc.health_check_node_port.map(i32::from),
            allocate_load_balancer_node_ports: load_balancer.then_some(svc.node_port.is_some()),
            session_affinity: Some("None".to_owned()),
            selector: Some(BTreeMap::from([("app".to_owned(), svc.name.clone())])),
            ports: Some(vec![ServicePort {
                name: Some(svc.port_name.clone()),
                protocol: Some(svc.protocol.kubernetes().to_owned()),
                port: i32::from(svc.port),
                target_port: Some(IntOrString::Int(i32::from(svc.target_port))),
                node_port: svc.node_port.map(i32::from),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: load_balancer.then(|| {
                    svc.load_balancer_ips
                        .iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some(ip.to_string()),
                            ip_mode: Some("VIP".to_owned()),
                            ..LoadBalancerIngress::default()
                        })
                        .collect()
                }),
            }),
            ..ServiceStatus::default()
        }),
    }
}

/// The slice the EndpointSlice controller writes for one family, `None` without
/// endpoints of that family.
fn endpoint_slice(svc: &ClusterService, v6: bool) -> Option<EndpointSlice> {
    let endpoints: Vec<SliceEndpoint> = svc
        .endpoints_of(v6)
        .map(|e| SliceEndpoint {
            addresses: vec![e.address.to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: Some(e.node.clone()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".to_owned()),
                name: Some(e.pod.clone()),
                namespace: Some(svc.namespace.clone()),
                ..ObjectReference::default()
            }),
            ..SliceEndpoint::default()
        })
        .collect();
    if endpoints.is_empty() {
        return None;
    }
    let family = if v6 { "IPv6" } else { "IPv4" };
    let name = format!("{}-{}", svc.name, family.to_ascii_lowercase());
    let mut metadata = meta("EndpointSlice", Some(&svc.namespace), &name);
    metadata.generate_name = Some(format!("{}-", svc.name));
    metadata.labels = Some(BTreeMap::from([
        (
            "endpointslice.kubernetes.io/managed-by".to_owned(),
            "endpointslice-controller.k8s.io".to_owned(),
        ),
        ("kubernetes.io/service-name".to_owned(), svc.name.clone()),
    ]));
    metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".to_owned(),
        kind: "Service".to_owned(),
        name: svc.name.clone(),
        uid: uid(&format!("Service/{}/{}", svc.namespace, svc.name)),
        block_owner_deletion: Some(true),
        controller: Some(true),
    }]);
    Some(EndpointSlice {
        metadata,
        address_type: family.to_owned(),
        endpoints,
        ports: Some(vec![EndpointPort {
            name: Some(svc.port_name.clone()),
            port: Some(i32::from(svc.target_port)),
            protocol: Some(svc.protocol.kubernetes().to_owned()),
            ..EndpointPort::default()
        }]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::TrafficPolicy;
    use crate::cluster::service::fixture;

    /// A `Local` Service with an IPv4 endpoint on node-0 and an IPv6 one on node-1.
    fn svc() -> ClusterService {
        fixture::web(
            TrafficPolicy::Local,
            &[("192.0.2.10", "node-0"), ("2001:db8:a:1::10", "node-1")],
        )
    }

    #[test]
    fn service_and_slices_parse_back_as_kubernetes_objects() {
        let yaml = service_yaml(&svc()).unwrap();
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 3, "{yaml}");
        let service: Service = serde_yaml::from_value(docs[0].clone()).unwrap();
        let spec = service.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(spec.ports.unwrap()[0].node_port, Some(30_080));
        assert!(yaml.contains("apiVersion: v1\nkind: Service\n"), "{yaml}");
        let v6: EndpointSlice = serde_yaml::from_value(docs[2].clone()).unwrap();
        assert_eq!(v6.address_type, "IPv6");
        assert_eq!(v6.endpoints[0].node_name.as_deref(), Some("node-1"));
        assert!(yaml.contains("kind: EndpointSlice"), "{yaml}");
    }

    #[test]
    fn invalid_services_are_rejected_by_field() {
        let mut bad = svc();
        bad.node_port = Some(80);
        let err = service_yaml(&bad).unwrap_err().to_string();
        assert!(
            err.contains("shop/web") && err.contains("nodePort"),
            "{err}"
        );
    }
}
