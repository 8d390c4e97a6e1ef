//! `lb-agent trace PROTO SRC[:PORT] DST:PORT`: what the data plane does with that flow
//! right now, computed from the maps alone (read-only), step by step as the XDP
//! program takes it (`lb-ebpf/src/main.rs`, `conntrack.rs`): frontend, conntrack,
//! source ranges, session affinity, the Maglev slot (the kernel's flow hash,
//! `lb_common::hash`), the translation and the cached next hop. The admin endpoint
//! serves the same computation (`GET /trace?proto=tcp&src=...&dst=...`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use lb_common::{
    AffinityKey, BACKEND_F_DRAINING, Backend, FRONTEND_F_CLIENT_AFFINITY, FRONTEND_F_REJECT_EMPTY,
    FRONTEND_F_SOURCE_RANGES, FlowKey, Frontend, FrontendKey, HEALTH_DOWN, HEALTH_UP, PROTO_TCP,
    PROTO_UDP, Reason, ServiceMeta, addr_key,
    hash::{client_hash, flow_hash},
    maps::NEXTHOP_TTL_JIFFIES,
};
use lb_core::maglev;
use lb_core::plan::{meta_endpoint, service_name, table_digest};
use serde::{Deserialize, Serialize};

use crate::dataplane::{Dataplane, DataplaneError};
use crate::metrics::frontend_text;

/// The flow asked about: client -> frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    /// `tcp` or `udp`.
    pub proto: u8,
    pub src: IpAddr,
    /// Absent: only what does not depend on the source port is known.
    pub sport: Option<u16>,
    pub dst: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("protocol {0:?}: expected tcp or udp")]
    Proto(String),
    #[error(
        "{what} {text:?}: expected ADDRESS{port} (IPv6 in brackets with a port: [2001:db8::1]:80)"
    )]
    Address {
        what: &'static str,
        text: String,
        port: &'static str,
    },
    #[error("source and destination families differ")]
    Family,
}

impl Query {
    /// Parses `tcp`, `198.51.100.2:40000` (or `198.51.100.2`), `203.0.113.10:80`.
    pub fn parse(proto: &str, src: &str, dst: &str) -> Result<Query, QueryError> {
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            _ => return Err(QueryError::Proto(proto.to_owned())),
        };
        let (src, sport) = if let Ok(a) = src.parse::<SocketAddr>() {
            (a.ip(), Some(a.port()))
        } else {
            let bare = src.trim_start_matches('[').trim_end_matches(']');
            let ip = bare.parse::<IpAddr>().map_err(|_| QueryError::Address {
                what: "source",
                text: src.to_owned(),
                port: "[:PORT]",
            })?;
            (ip, None)
        };
        let dst = dst.parse::<SocketAddr>().map_err(|_| QueryError::Address {
            what: "destination",
            text: dst.to_owned(),
            port: ":PORT",
        })?;
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(QueryError::Family);
        }
        Ok(Query {
            proto,
            src,
            sport,
            dst,
        })
    }

    fn proto_name(&self) -> &'static str {
        if self.proto == PROTO_TCP {
            "TCP"
        } else {
            "UDP"
        }
    }

    /// The flow key as the program builds it from the packet.
    fn flow_key(&self) -> FlowKey {
        let (src, family) = addr_key(self.src);
        let (dst, _) = addr_key(self.dst.ip());
        FlowKey {
            src,
            dst,
            sport: self.sport.unwrap_or(0).to_be(),
            dport: self.dst.port().to_be(),
            proto: self.proto,
            family,
            _pad: [0; 2],
        }
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let src = match (self.sport, self.src) {
            (Some(p), ip) => SocketAddr::new(ip, p).to_string(),
            (None, IpAddr::V6(ip)) => format!("[{ip}]"),
            (None, ip) => ip.to_string(),
        };
        write!(f, "{} {src} -> {}", self.proto_name(), self.dst)
    }
}

/// What the data plane does with the flow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trace {
    pub flow: String,
    /// The node that answered (`--nodes`), else absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub steps: Vec<Step>,
    /// `forward`, `drop`, `reject`, `pass` (not for xlb) or `unknown`.
    pub verdict: String,
    /// The backend the flow goes to, when it goes to one.
    #[serde(default)]
    pub backend: Option<String>,
    /// The backend id.
    #[serde(default)]
    pub backend_id: Option<u32>,
    /// The kernel's reason counter this packet would count, when known.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One stage of the packet path and what it found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub stage: String,
    pub result: String,
}

struct Builder {
    trace: Trace,
}

impl Builder {
    fn step(&mut self, stage: &str, result: impl Into<String>) {
        self.trace.steps.push(Step {
            stage: stage.to_owned(),
            result: result.into(),
        });
    }

    fn end(mut self, verdict: &str, reason: Option<Reason>) -> Trace {
        verdict.clone_into(&mut self.trace.verdict);
        self.trace.reason = reason.map(|r| r.name().to_owned());
        self.trace
    }
}

/// The kernel's tick (one jiffy) in ns: the resolution of the coarse clocks.
fn tick_ns() -> u64 {
    // SAFETY: clock_getres into a zeroed timespec it fills.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `ts` outlives the call.
    unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u64::try_from(ts.tv_nsec).unwrap_or(0).max(1)
}

/// `bpf_ktime_get_coarse_ns`'s clock, as the program reads it.
fn monotonic_coarse_ns() -> u64 {
    // SAFETY: clock_gettime into a zeroed timespec it fills.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `ts` outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn endpoint_of(b: &Backend) -> String {
    meta_endpoint(&lb_common::BackendMeta {
        addr: b.addr,
        port: b.port,
        family: b.family,
        ..Default::default()
    })
    .to_string()
}

/// Backend `id` if its slot holds a backend of `service_id` (the program's `backend`).
fn usable(dp: &Dataplane, id: u32, service_id: u32) -> Result<Option<Backend>, DataplaneError> {
    if id == 0 || id >= lb_common::maps::MAX_BACKENDS {
        return Ok(None);
    }
    let b = dp.backend_slot(id)?;
    Ok((b.family != 0 && b.service_id == service_id).then_some(b))
}

/// Computes the trace from the maps `dp` opened.
pub fn trace(dp: &Dataplane, q: &Query) -> Result<Trace, DataplaneError> {
    let mut t = Builder {
        trace: Trace {
            flow: q.to_string(),
            node: None,
            steps: Vec::new(),
            verdict: String::new(),
            backend: None,
            backend_id: None,
            reason: None,
        },
    };
    let key = q.flow_key();
    let fkey = FrontendKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    let Some(frontend) = dp.frontend(&fkey)? else {
        let why = no_frontend(dp, &fkey)?;
        t.step("frontend", why);
        t.step(
            "verdict",
            "not for xlb: passed to the kernel untouched (unless it is a reply from a backend)",
        );
        return Ok(t.end("pass", Some(Reason::PassNotFrontend)));
    };
    let meta = dp.service_meta(frontend.service_id)?;
    t.step("frontend", frontend_step(&fkey, &frontend, &meta));
    // Conntrack first, as the program does: an established flow keeps its backend.
    if let Some((id, b)) = conntrack_step(dp, &mut t, q, &key, frontend.service_id)? {
        return finish(dp, t, q, id, &b);
    }
    if !source_range_step(dp, &mut t, q, &key, &frontend)? {
        return Ok(t.end("drop", Some(Reason::DropSourceRange)));
    }
    if frontend.flags & FRONTEND_F_CLIENT_AFFINITY != 0
        && let Some((id, b)) = affinity_step(dp, &mut t, q, &key, &frontend)?
    {
        return finish(dp, t, q, id, &b);
    }
    maglev_step(dp, t, q, &key, &frontend, &meta)
}

fn frontend_step(fkey: &FrontendKey, frontend: &Frontend, meta: &ServiceMeta) -> String {
    let mut flags = Vec::new();
    if frontend.flags & FRONTEND_F_CLIENT_AFFINITY != 0 {
        flags.push(format!("session affinity {}s", frontend.affinity_timeout_s));
    }
    if frontend.flags & FRONTEND_F_SOURCE_RANGES != 0 {
        flags.push("source ranges".to_owned());
    }
    flags.push(if frontend.flags & FRONTEND_F_REJECT_EMPTY != 0 {
        "whenEmpty reject".to_owned()
    } else {
        "whenEmpty drop".to_owned()
    });
    format!(
        "{} -> service {} (id {}; {})",
        frontend_text(fkey),
        service_name(meta),
        frontend.service_id,
        flags.join(", ")
    )
}

/// The tracked backend, if the flow is established and its backend still exists.
fn conntrack_step(
    dp: &Dataplane,
    t: &mut Builder,
    q: &Query,
    key: &FlowKey,
    sid: u32,
) -> Result<Option<(u32, Backend)>, DataplaneError> {
    if q.sport.is_none() {
        t.step(
            "conntrack",
            "not looked up: no source port given (a new flow is assumed)",
        );
        return Ok(None);
    }
    match dp.tracked(key)? {
        Some(flow) if flow.service_id == sid => {
            if let Some(b) = usable(dp, flow.backend_id, sid)? {
                t.step(
                    "conntrack",
                    format!(
                        "established flow -> backend {} (id {})",
                        endpoint_of(&b),
                        flow.backend_id
                    ),
                );
                return Ok(Some((flow.backend_id, b)));
            }
            t.step(
                "conntrack",
                format!(
                    "tracked to backend id {}, which is gone: the flow is re-selected",
                    flow.backend_id
                ),
            );
        }
        Some(_) => t.step(
            "conntrack",
            "tracked for another service (a recycled frontend): re-selected",
        ),
        None => t.step("conntrack", "no entry: a new flow"),
    }
    Ok(None)
}

/// Whether the service's source ranges admit the client.
fn source_range_step(
    dp: &Dataplane,
    t: &mut Builder,
    q: &Query,
    key: &FlowKey,
    frontend: &Frontend,
) -> Result<bool, DataplaneError> {
    if frontend.flags & FRONTEND_F_SOURCE_RANGES == 0 {
        t.step("source ranges", "none: every client is admitted");
        return Ok(true);
    }
    if dp.source_range_admits(frontend.service_id, key.family, key.src)? {
        t.step("source ranges", format!("{} is admitted", q.src));
        Ok(true)
    } else {
        t.step(
            "source ranges",
            format!("{} is outside every range of the service", q.src),
        );
        Ok(false)
    }
}

/// The client's remembered backend, while its entry is fresh and usable.
fn affinity_step(
    dp: &Dataplane,
    t: &mut Builder,
    q: &Query,
    key: &FlowKey,
    frontend: &Frontend,
) -> Result<Option<(u32, Backend)>, DataplaneError> {
    let sid = frontend.service_id;
    let akey = AffinityKey {
        client: key.src,
        service_id: sid,
        family: key.family,
        _pad: [0; 3],
    };
    let Some(entry) = dp.affinity_entry(&akey)? else {
        t.step("session affinity", "no entry: the table decides");
        return Ok(None);
    };
    let age = monotonic_coarse_ns().saturating_sub(entry.last_seen_ns);
    let fresh = age < u64::from(frontend.affinity_timeout_s) * 1_000_000_000;
    #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
    let age_s = age as f64 / 1e9;
    match usable(dp, entry.backend_id, sid)? {
        Some(b) if fresh && b.flags & BACKEND_F_DRAINING == 0 => {
            t.step(
                "session affinity",
                format!(
                    "{} last got backend {} (id {}) {age_s:.1}s ago, within {}s: kept",
                    q.src,
                    endpoint_of(&b),
                    entry.backend_id,
                    frontend.affinity_timeout_s
                ),
            );
            Ok(Some((entry.backend_id, b)))
        }
        _ => {
            t.step(
                "session affinity",
                format!(
                    "entry for backend id {} ({age_s:.1}s old) is stale, gone or draining: \
                     the table decides",
                    entry.backend_id
                ),
            );
            Ok(None)
        }
    }
}

/// A new flow: `table[hash % M]`, as `lb-ebpf/src/maglev.rs` picks it.
fn maglev_step(
    dp: &Dataplane,
    mut t: Builder,
    q: &Query,
    key: &FlowKey,
    frontend: &Frontend,
    meta: &ServiceMeta,
) -> Result<Trace, DataplaneError> {
    let sid = frontend.service_id;
    let affinity = frontend.flags & FRONTEND_F_CLIENT_AFFINITY != 0;
    if !affinity && q.sport.is_none() {
        t.step(
            "maglev",
            "needs the source port: the slot is chosen by a hash of the whole 5-tuple",
        );
        return Ok(t.end("unknown", None));
    }
    let (hash, hashed) = if affinity {
        (client_hash(&key.src), "client-address hash")
    } else {
        (flow_hash(key), "flow hash")
    };
    let empty = |t: Builder| {
        let (verdict, reason) = if frontend.flags & FRONTEND_F_REJECT_EMPTY == 0 {
            ("drop", Reason::DropNoBackend)
        } else if q.proto == PROTO_TCP {
            ("reject", Reason::RejectTcpReset)
        } else {
            ("reject", Reason::RejectIcmpUnreachable)
        };
        t.end(verdict, Some(reason))
    };
    let (table, source) = table_of(dp, sid, meta)?;
    let Some(table) = table else {
        t.step("maglev", format!("no table: {source}"));
        return Ok(empty(t));
    };
    let size = u32::try_from(table.len()).unwrap_or(u32::MAX).max(1);
    let slot = hash % size;
    let id = table.get(slot as usize).copied().unwrap_or(0);
    match usable(dp, id, sid)? {
        Some(b) if b.family == key.family => {
            t.step(
                "maglev",
                format!(
                    "{hashed} {hash:#010x} % {size} = slot {slot} -> backend {} (id {id}; {source})",
                    endpoint_of(&b)
                ),
            );
            if affinity {
                t.step("session affinity", "the entry is written with this backend");
            }
            finish(dp, t, q, id, &b)
        }
        Some(_) => {
            t.step(
                "maglev",
                format!("slot {slot} -> backend id {id} of another family"),
            );
            Ok(t.end("drop", Some(Reason::DropFamilyMismatch)))
        }
        None => {
            t.step(
                "maglev",
                format!("{hashed} {hash:#010x} % {size} = slot {slot}: empty (no backend)"),
            );
            Ok(empty(t))
        }
    }
}

/// The live table from the kernel (needs CAP_SYS_ADMIN to open the inner map by id),
/// else the table rebuilt from `BACKEND_META` and checked against the digest the
/// agent recorded for the installed one.
fn table_of(
    dp: &Dataplane,
    sid: u32,
    meta: &lb_common::ServiceMeta,
) -> Result<(Option<Vec<u32>>, String), DataplaneError> {
    match dp.maglev_table(sid) {
        Ok(Some(t)) if !t.is_empty() => return Ok((Some(t), "the installed table".into())),
        Ok(_) => {
            return Ok((
                None,
                "the service has no backend that takes new flows".into(),
            ));
        }
        Err(e) => tracing::debug!("reading the Maglev table of service {sid}: {e}"),
    }
    if meta.table_digest == 0 || meta.table_size == 0 {
        return Ok((
            None,
            "the service has no backend that takes new flows".into(),
        ));
    }
    match rebuilt_table(dp, sid, meta)? {
        Some(table) => Ok((
            Some(table),
            "table rebuilt from BACKEND_META; its digest matches the installed one".into(),
        )),
        None => Ok((
            None,
            "the installed table cannot be read here (opening it by id needs CAP_SYS_ADMIN) \
             and the rebuilt one differs from its digest (a change is being written?)"
                .into(),
        )),
    }
}

/// The service's table as the planner builds it (selectable backends: forwarding,
/// not down, weight > 0; identity `address:port`), from `BACKEND_META_V1`; `None`
/// unless its digest equals the one recorded for the installed table.
pub fn rebuilt_table(
    dp: &Dataplane,
    sid: u32,
    meta: &lb_common::ServiceMeta,
) -> Result<Option<Vec<u32>>, DataplaneError> {
    let members: Vec<(u32, String, u32)> = dp
        .backends_in_use()?
        .into_iter()
        .filter(|(_, m, slot)| {
            m.service_id == sid && m.health != HEALTH_DOWN && m.weight > 0 && slot.is_some()
        })
        .map(|(id, m, _)| (id, meta_endpoint(&m).to_string(), m.weight))
        .collect();
    let input: Vec<maglev::Backend<'_>> = members
        .iter()
        .map(|(id, identity, weight)| maglev::Backend {
            id: *id,
            identity: identity.as_bytes(),
            weight: *weight,
        })
        .collect();
    Ok(maglev::build_table(&input, meta.table_size)
        .ok()
        .filter(|t| meta.table_digest != 0 && table_digest(t) == meta.table_digest))
}

/// Translation and next hop, for a flow that goes to backend `id`.
fn finish(
    dp: &Dataplane,
    mut t: Builder,
    q: &Query,
    id: u32,
    b: &Backend,
) -> Result<Trace, DataplaneError> {
    let endpoint = endpoint_of(b);
    let meta = dp.backend_meta(id)?;
    let health = match meta.health {
        HEALTH_UP => "up",
        HEALTH_DOWN => "down",
        _ => "unchecked",
    };
    t.step(
        "backend",
        format!(
            "{endpoint} (id {id}, weight {}, health {health}{})",
            meta.weight,
            if b.flags & BACKEND_F_DRAINING != 0 {
                ", draining"
            } else {
                ""
            }
        ),
    );
    t.step("translation", format!("DNAT {} -> {endpoint}", q.dst));
    let hop = dp.next_hop(id)?;
    let ttl_ns = u64::from(NEXTHOP_TTL_JIFFIES) * tick_ns();
    let age_ns = monotonic_coarse_ns().saturating_sub(hop.refreshed_ns);
    if hop.refreshed_ns != 0 && hop.expires_jiffies != 0 && age_ns < ttl_ns {
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        t.step(
            "next hop",
            format!(
                "out of {} to {} (from {}), cached for {} ms more",
                ifname(hop.ifindex),
                mac(hop.dmac),
                mac(hop.smac),
                (ttl_ns - age_ns) / 1_000_000
            ),
        );
    } else {
        t.step(
            "next hop",
            "not cached: the FIB decides on the next packet (bpf_fib_lookup)",
        );
    }
    t.trace.backend = Some(endpoint);
    t.trace.backend_id = Some(id);
    Ok(t.end("forward", None))
}

fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Why no frontend matched: no such address, or not this port or protocol.
fn no_frontend(dp: &Dataplane, key: &FrontendKey) -> Result<String, DataplaneError> {
    let same_addr: Vec<FrontendKey> = dp
        .frontends()?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.addr == key.addr && k.family == key.family)
        .collect();
    let text = frontend_text(key);
    if same_addr.is_empty() {
        return Ok(format!("none: no frontend has this address ({text})"));
    }
    let port = u16::from_be(key.port);
    let ports: Vec<String> = same_addr.iter().map(frontend_text).collect();
    if same_addr.iter().any(|k| k.port == key.port) {
        Ok(format!(
            "none: port {port} has no frontend for this protocol ({text}); the address has {}",
            ports.join(", ")
        ))
    } else {
        Ok(format!(
            "none: no frontend on port {port} ({text}); the address has {}",
            ports.join(", ")
        ))
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(node) => writeln!(f, "{} (node {node})", self.flow)?,
            None => writeln!(f, "{}", self.flow)?,
        }
        for s in &self.steps {
            writeln!(f, "  {:<17} {}", s.stage, s.result)?;
        }
        write!(f, "  {:<17} {}", "=>", self.verdict)?;
        if let Some(b) = &self.backend {
            write!(f, " to {b}")?;
        }
        if let Some(r) = &self.reason {
            write!(f, " (counted as {r})")?;
        }
        writeln!(f)
    }
}

/// Asks each agent's admin endpoint (`http://HOST:PORT`, plain HTTP: the admin port)
/// for the trace of this flow, one after the other with a 5 s timeout each. A node that
/// cannot answer gets a trace with verdict `error` and the reason.
pub fn ask_nodes(
    nodes: &[String],
    proto: &str,
    src: &str,
    dst: &str,
) -> Result<Vec<Trace>, QueryError> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("proto", proto)
        .append_pair("src", src)
        .append_pair("dst", dst)
        .finish();
    Ok(nodes
        .iter()
        .map(|node| {
            let mut t = ask_node(node, &query).unwrap_or_else(|e| Trace {
                flow: format!("{proto} {src} -> {dst}"),
                node: None,
                steps: vec![Step {
                    stage: "node".into(),
                    result: e,
                }],
                verdict: "error".into(),
                backend: None,
                backend_id: None,
                reason: None,
            });
            t.node = Some(node.clone());
            t
        })
        .collect())
}

fn ask_node(node: &str, query: &str) -> Result<Trace, String> {
    use std::io::{Read as _, Write as _};
    use std::net::ToSocketAddrs as _;
    let authority = node
        .strip_prefix("http://")
        .unwrap_or(node)
        .trim_end_matches('/');
    if authority.contains('/') || node.starts_with("https://") {
        return Err(format!(
            "{node}: expected http://HOST:PORT (the admin address)"
        ));
    }
    let timeout = std::time::Duration::from_secs(5);
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    write!(
        stream,
        "GET /trace?{query} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut raw = Vec::new();
    // At most 1 MiB: a trace is a few hundred bytes.
    stream
        .take(1 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response
        .parse(&raw)
        .map_err(|e| format!("{addr}: bad HTTP answer: {e}"))?
    else {
        return Err(format!("{addr}: incomplete HTTP answer"));
    };
    let body = String::from_utf8_lossy(&raw[head..]);
    if response.code != Some(200) {
        return Err(format!(
            "{addr}: HTTP {}: {}",
            response.code.unwrap_or(0),
            body.trim()
        ));
    }
    serde_json::from_str(&body).map_err(|e| format!("{addr}: not a trace: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse() {
        let q = Query::parse("TCP", "198.51.100.2:40000", "203.0.113.10:80").unwrap();
        assert_eq!(q.sport, Some(40000));
        assert_eq!(q.to_string(), "TCP 198.51.100.2:40000 -> 203.0.113.10:80");
        let q = Query::parse("udp", "2001:db8::2", "[2001:db8::10]:53").unwrap();
        assert_eq!(q.sport, None);
        assert_eq!(q.to_string(), "UDP [2001:db8::2] -> [2001:db8::10]:53");
        assert!(Query::parse("icmp", "198.51.100.2", "203.0.113.10:80").is_err());
        assert!(Query::parse("tcp", "198.51.100.2", "203.0.113.10").is_err());
        assert!(Query::parse("tcp", "2001:db8::2", "203.0.113.10:80").is_err());
    }

    #[test]
    fn the_key_is_the_programs() {
        let q = Query::parse("tcp", "198.51.100.2:40000", "203.0.113.10:80").unwrap();
        let k = q.flow_key();
        assert_eq!(&k.src[..4], &[198, 51, 100, 2]);
        assert_eq!(k.sport, 40000u16.to_be());
        assert_eq!(k.dport, 80u16.to_be());
        assert_eq!(k.family, lb_common::FAMILY_V4);
    }
}
