//! xlb's test harness: real network topologies in namespaces, packet frames, the
//! API-compatible test server, echo backends, a test CA, and the demo behind `cargo xtask
//! demo`. A dev-dependency of the agent and of the benchmarks: never in the shipped binary.
//!
//! Project rules this module enforces:
//! - It changes only namespaces it created: every command is `ip -n NS …` or
//!   `ip netns exec NS …`, veth peers are created directly in their target
//!   namespace, and sockets are opened on a thread that entered the
//!   namespace. The root namespace's links, routes, sysctls and firewall are
//!   never touched.
//! - Addresses come from the documentation ranges only (see [`Topology`]).
//! - Names are `xlb-<tag>-<pid>-<counter>`, unique across the threads of a
//!   test process and across processes; interface names are short and fixed
//!   per namespace.
//! - Dropping a [`Netns`] (also while a failed test unwinds) kills the
//!   processes started in it by PID and deletes it; every command and wait
//!   is bounded in time; a failed command reports its full command line and
//!   stderr.
//!
//! It needs root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN`); without them every
//! constructor fails with an error that says so.

pub mod agent;
pub mod apiserver;
mod certs;
pub mod cluster;
mod cmd;
pub mod demo;
mod echo;
pub mod frames;
pub mod hostile;
mod http;
mod netns;
pub mod node;
mod topology;
mod traffic;
pub mod xdp;

#[cfg(test)]
mod tests;

pub use agent::AgentProcess;
pub use apiserver::ApiServer;
pub use certs::{IssuedCert, TestCa};
pub use echo::{Echo, EchoServer, spawn_echo_server, websocket_echo};
pub use http::{
    HttpConnection, curl_status, http_get, spawn_backend_http_servers, spawn_http_server,
    spawn_pinned_http_server, status_and_body,
};
pub use netns::{
    EXEC_TIMEOUT, MAX_IFNAME_LEN, Netns, NetnsGuard, enable_napi, hosts_file_launcher,
    remove_stale_namespaces, testbed_namespaces, veth_pair,
};
pub use topology::{MAX_BACKENDS, Topology, TopologyConfig};
pub use traffic::{
    Outcome, ServerHandle, pin_current_thread, spawn_backend_peer_servers, spawn_tcp_name_server,
    spawn_tcp_peer_server, spawn_udp_name_server, tcp_ask, tcp_connect, udp_ask, udp_exchange,
};

/// Bit numbers from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Writes `text` to `path` through a temporary file and a rename, as editors and
/// ConfigMap updates do, so an agent polling the file never reads half of it.
pub fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Runs `cmd` to completion and returns its stdout, for the tests that call a
/// tool (`bpftool`, `lb-agent`) from their own process.
///
/// # Panics
///
/// When `cmd` cannot be started or exits with a failure: the message starts
/// with `what` and, on failure, quotes the command's stderr.
#[track_caller]
#[must_use]
pub fn run_stdout(cmd: &mut std::process::Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Fails unless this process may create and enter network namespaces
/// (effective `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`, i.e. root), with a message
/// saying how to run the tests. Privileged tests call it so that they fail
/// loudly instead of being skipped.
pub fn check_privileges() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| anyhow::anyhow!("cannot read /proc/self/status: {e}"))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| cap_eff & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "the testbed needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network \
             namespaces; missing {}; run the tests as root",
            missing.join(" and ")
        )
    }
}
