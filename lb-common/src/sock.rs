//! Socket load balancing (cgroup `connect`/`sendmsg`/`recvmsg`/`getpeername` hooks):
//! the map types the socket programs add beside the XDP program's. The frontend,
//! backend, Maglev and affinity maps are the XDP program's own; these only remember
//! what a socket was translated to, so that the application sees the Service address.

/// `FrontendKey::proto` bit of an in-cluster frontend: the entry the socket hooks use
/// before the plain one, for traffic from the node's own pods and processes. The
/// Kubernetes translation writes one for every external address (NodePort,
/// LoadBalancer IP, externalIP) of an `externalTrafficPolicy: Local` Service, naming the
/// Service's cluster-wide endpoints (kube-proxy's short-circuit of in-cluster traffic).
/// The XDP program never builds such a key (a packet's protocol is 6 or 17).
pub const PROTO_F_IN_CLUSTER: u8 = 0x80;

/// `AffinityKey::family` of a socket client: the socket hooks keep session affinity per
/// network namespace (a pod), keyed by its netns cookie in `client`, because a socket
/// has no source address yet when it connects. Distinct from the XDP program's
/// `FAMILY_V4`/`FAMILY_V6` entries, which are keyed by client address.
pub const AFFINITY_FAMILY_NETNS: u8 = 0x40;

/// `SockConfig::flags`: translate only sockets of the host's network namespace
/// (`host_netns_cookie`), as Cilium's `socketLB.hostNamespaceOnly`; pods' sockets are
/// left to whatever handles their packets (a service mesh sidecar, the XDP path).
pub const SOCK_F_HOST_ONLY: u32 = 1;

/// The socket programs' settings: one element (index 0), written by the agent before it
/// attaches them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockConfig {
    /// `SO_NETNS_COOKIE` of the agent's (the host's) network namespace.
    pub host_netns_cookie: u64,
    pub flags: u32,
    pub _pad: u32,
}

/// A translated peer of one socket: (socket cookie, backend address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// The Service address the application asked for, restored by `recvmsg` and
/// `getpeername`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
    pub service_id: u32,
}

/// The backend an unconnected UDP socket's datagrams to one frontend go to: kept while
/// it is a backend of the service, as conntrack keeps a flow's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFlowKey {
    pub cookie: u64,
    pub frontend: crate::FrontendKey,
    pub _pad: [u8; 4],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, no implicit padding (checked below).
    unsafe impl aya::Pod for super::SockConfig {}
    unsafe impl aya::Pod for super::SockRevKey {}
    unsafe impl aya::Pod for super::SockRevNat {}
    unsafe impl aya::Pod for super::SockFlowKey {}
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<SockConfig>() == 16);
    assert!(size_of::<SockRevKey>() == 8 + 16 + 2 + 1 + 5);
    assert!(size_of::<SockRevNat>() == 16 + 2 + 1 + 1 + 4);
    assert!(size_of::<SockFlowKey>() == 8 + size_of::<crate::FrontendKey>() + 4);
};
