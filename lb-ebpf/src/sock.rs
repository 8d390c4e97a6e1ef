//! Socket load balancing: cgroup `sock_addr` programs that serve Services to the
//! node's own pods and processes before a packet exists (Cilium's `bpf_sock`).
//!
//! - `connect4/6` and `sendmsg4/6` (unconnected UDP) rewrite a destination that is a
//!   Service frontend (the XDP program's `FRONTENDS` key) into a backend's address,
//!   chosen from the same Maglev table with the same flow hash, honouring session
//!   affinity and the backend array (health, draining); an in-cluster frontend entry
//!   (`PROTO_F_IN_CLUSTER`) wins over the plain one.
//! - `recvmsg4/6` and `getpeername4/6` give the application the Service address back,
//!   from `SOCK_REVNAT` (socket cookie, backend) -> frontend.
//! - A Service without a usable backend refuses the `connect`/`sendmsg` with
//!   ECONNREFUSED (`bpf_set_retval`, then 0), as kube-proxy's REJECT does.
//!
//! A socket has no source port (often no source address) when it connects, so the hash
//! takes the socket cookie where XDP has the client's address and port; session
//! affinity is per network namespace (a pod), keyed by its netns cookie.
#![expect(
    clippy::needless_pass_by_value,
    reason = "the #[cgroup_sock_addr] macro hands the context over by value"
)]

use aya_ebpf::{
    bindings::bpf_sock_addr,
    btf_maps::{Array, LruHashMap},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use lb_common::{
    ADDR_F_BACKEND, ADDR_F_FRONTEND, Backend, FAMILY_V4, FAMILY_V6, FRONTEND_F_CLIENT_AFFINITY,
    Flow, FlowKey, Frontend, FrontendKey, PROTO_TCP, PROTO_UDP, Reason,
    hash::{client_hash, flow_hash},
    maps::{SOCK_FLOWS_ENTRIES, SOCK_REVNAT_ENTRIES},
    sock::{
        AFFINITY_FAMILY_NETNS, PROTO_F_IN_CLUSTER, SOCK_F_HOST_ONLY, SockConfig, SockFlowKey,
        SockRevKey, SockRevNat,
    },
};

use crate::{
    affinity, maglev,
    maps::FRONTENDS_V1,
    service::{self, may_be},
};

const fn n(v: u32) -> usize {
    v as usize
}

/// (socket cookie, backend) -> the frontend the socket asked for.
#[btf_map]
pub static SOCK_REVNAT_V1: LruHashMap<SockRevKey, SockRevNat, { n(SOCK_REVNAT_ENTRIES) }> =
    LruHashMap::new();

/// (socket cookie, frontend) -> backend of an unconnected UDP socket's datagrams.
#[btf_map]
pub static SOCK_FLOWS_V1: LruHashMap<SockFlowKey, Flow, { n(SOCK_FLOWS_ENTRIES) }> =
    LruHashMap::new();

#[btf_map]
pub static SOCK_CONFIG_V1: Array<SockConfig, 1> = Array::new();

/// The verdicts of a `sock_addr` program.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// linux/errno.h; the system call returns it when the program refuses.
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn xlb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend::<false>(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn xlb_connect6(ctx: SockAddrContext) -> i32 {
    to_backend::<true>(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn xlb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend::<false>(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn xlb_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend::<true>(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn xlb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn xlb_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_frontend::<true>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn xlb_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn xlb_getpeername6(ctx: SockAddrContext) -> i32 {
    to_frontend::<true>(&ctx)
}

/// An address and port as the context holds them (port in network order).
#[derive(Clone, Copy)]
struct Peer {
    addr: [u8; 16],
    port: u16,
}

/// The destination (`connect`, `sendmsg`) or peer (`recvmsg`, `getpeername`). The
/// verifier admits only 4-byte accesses to `user_ip6` words and `user_port`, and only
/// the field of the program's family: volatile reads keep LLVM from merging them.
#[inline(always)]
fn read_peer<const V6: bool>(sa: *mut bpf_sock_addr) -> Peer {
    let mut addr = [0u8; 16];
    // SAFETY: the context pointer the kernel passed; fields of this family only.
    unsafe {
        if V6 {
            let words = &raw const (*sa).user_ip6;
            for i in 0..4 {
                let w = core::ptr::read_volatile(words.cast::<u32>().add(i));
                addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
        } else {
            let w = core::ptr::read_volatile(&raw const (*sa).user_ip4);
            addr[..4].copy_from_slice(&w.to_ne_bytes());
        }
        let port = core::ptr::read_volatile(&raw const (*sa).user_port);
        Peer {
            addr,
            // The port's two bytes, in the order they are on the wire.
            port: port as u16,
        }
    }
}

#[inline(always)]
fn write_peer<const V6: bool>(sa: *mut bpf_sock_addr, peer: &Peer) {
    // SAFETY: as in `read_peer`; the hooks may write these fields.
    unsafe {
        if V6 {
            let words = (&raw mut (*sa).user_ip6).cast::<u32>();
            for i in 0..4 {
                let w = u32::from_ne_bytes([
                    peer.addr[i * 4],
                    peer.addr[i * 4 + 1],
                    peer.addr[i * 4 + 2],
                    peer.addr[i * 4 + 3],
                ]);
                core::ptr::write_volatile(words.add(i), w);
            }
        } else {
            let w = u32::from_ne_bytes([peer.addr[0], peer.addr[1], peer.addr[2], peer.addr[3]]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, w);
        }
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(peer.port));
    }
}

const fn family<const V6: bool>() -> u8 {
    if V6 { FAMILY_V6 } else { FAMILY_V4 }
}

/// `connect`/`sendmsg`: a Service destination becomes a backend's, or the call is
/// refused when the Service has none.
#[inline(always)]
fn to_backend<const V6: bool>(ctx: &SockAddrContext, unconnected: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer; `protocol` is readable in every sock_addr hook.
    let proto = unsafe { core::ptr::read_volatile(&raw const (*sa).protocol) } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let dst = read_peer::<V6>(sa);
    if !may_be(&dst.addr, ADDR_F_FRONTEND) || !in_scope(ctx) {
        return ALLOW;
    }
    let key = FrontendKey {
        addr: dst.addr,
        port: dst.port,
        proto,
        family: family::<V6>(),
    };
    let Some(frontend) = lookup_frontend(&key) else {
        return ALLOW;
    };
    // SAFETY: plain helper call on the hook's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let chosen = if unconnected {
        sticky_backend(ctx, cookie, &key, &frontend)
    } else {
        select(ctx, cookie, &key, &frontend)
    };
    match chosen {
        (id, backend) if id != 0 && backend.family == key.family => {
            let rev = SockRevNat {
                addr: dst.addr,
                port: dst.port,
                family: key.family,
                _pad: 0,
                service_id: frontend.service_id,
            };
            let rev_key = SockRevKey {
                cookie,
                addr: backend.addr,
                port: backend.port,
                family: key.family,
                _pad: [0; 5],
            };
            // A failed insert (LRU full of locked entries) only means the application
            // sees the backend's address instead of the Service's.
            let _ = SOCK_REVNAT_V1.insert(&rev_key, &rev, 0);
            write_peer::<V6>(
                sa,
                &Peer {
                    addr: backend.addr,
                    port: backend.port,
                },
            );
            ALLOW
        }
        _ => {
            // SAFETY: plain helper call; connect and sendmsg hooks may set it.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REFUSE
        }
    }
}

/// Whether this socket is ours to translate: every socket, or with `SOCK_F_HOST_ONLY`
/// only those of the host's network namespace.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext) -> bool {
    let Some(config) = SOCK_CONFIG_V1.get(0) else {
        return true;
    };
    if config.flags & SOCK_F_HOST_ONLY == 0 {
        return true;
    }
    // SAFETY: plain helper call on the hook's context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    netns == config.host_netns_cookie
}

/// The in-cluster entry of a frontend, else the frontend itself.
#[inline(always)]
fn lookup_frontend(key: &FrontendKey) -> Option<Frontend> {
    let in_cluster = FrontendKey {
        proto: key.proto | PROTO_F_IN_CLUSTER,
        ..*key
    };
    // SAFETY: values copied out at once.
    unsafe {
        FRONTENDS_V1
            .get(&in_cluster)
            .or_else(|| FRONTENDS_V1.get(key))
            .copied()
    }
}

/// The backend an unconnected UDP socket's datagrams to this frontend already go to
/// while it still serves the service; else a new choice, remembered.
#[inline(always)]
fn sticky_backend(
    ctx: &SockAddrContext,
    cookie: u64,
    key: &FrontendKey,
    frontend: &Frontend,
) -> (u32, Backend) {
    let flow_key = SockFlowKey {
        cookie,
        frontend: *key,
        _pad: [0; 4],
    };
    // SAFETY: copied out at once.
    if let Some(flow) = unsafe { SOCK_FLOWS_V1.get(&flow_key).copied() }
        && flow.service_id == frontend.service_id
        && let Some(backend) = service::backend(flow.backend_id, flow.service_id)
    {
        return (flow.backend_id, backend);
    }
    let (id, backend) = select(ctx, cookie, key, frontend);
    if id == 0 {
        return (0, backend);
    }
    let flow = Flow {
        backend_id: id,
        service_id: frontend.service_id,
    };
    let _ = SOCK_FLOWS_V1.insert(&flow_key, &flow, 0);
    (id, backend)
}

/// A new choice: the pod's session-affinity backend, or the Maglev table's slot for
/// the socket; id 0 when the service has none. Every byte of the answer is written on
/// every path: a `Result` whose error leaves the backend undefined makes LLVM copy
/// uninitialised registers, which the verifier refuses (`R2 !read_ok`).
#[inline(always)]
fn select(
    ctx: &SockAddrContext,
    cookie: u64,
    key: &FrontendKey,
    frontend: &Frontend,
) -> (u32, Backend) {
    if frontend.flags & FRONTEND_F_CLIENT_AFFINITY != 0 {
        // SAFETY: plain helper call on the hook's context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        let mut client = [0u8; 16];
        client[..8].copy_from_slice(&netns.to_ne_bytes());
        return defined(affinity::select_for(
            client,
            AFFINITY_FAMILY_NETNS,
            frontend,
            client_hash(&client),
        ));
    }
    let mut src = [0u8; 16];
    src[..8].copy_from_slice(&cookie.to_ne_bytes());
    let flow = FlowKey {
        src,
        dst: key.addr,
        sport: 0,
        dport: key.port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    defined(maglev::backend_at(frontend.service_id, flow_hash(&flow)))
}

#[inline(always)]
fn defined(chosen: Result<(u32, Backend), Reason>) -> (u32, Backend) {
    chosen.unwrap_or_default()
}

/// `recvmsg`/`getpeername`: a backend this socket was sent to reads as the Service.
#[inline(always)]
fn to_frontend<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let peer = read_peer::<V6>(sa);
    if !may_be(&peer.addr, ADDR_F_BACKEND) {
        return ALLOW;
    }
    // SAFETY: plain helper call on the hook's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockRevKey {
        cookie,
        addr: peer.addr,
        port: peer.port,
        family: family::<V6>(),
        _pad: [0; 5],
    };
    // SAFETY: copied out at once.
    if let Some(rev) = unsafe { SOCK_REVNAT_V1.get(&key).copied() } {
        write_peer::<V6>(
            sa,
            &Peer {
                addr: rev.addr,
                port: rev.port,
            },
        );
    }
    ALLOW
}
