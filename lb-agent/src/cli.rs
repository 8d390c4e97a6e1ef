//! The `lb-agent` command line. In the library so that tests can parse argument lists
//! (e.g. the DaemonSet's) with the same definitions the binary uses.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::dataplane::pins;

#[derive(Parser)]
#[command(name = "lb-agent", about = "xlb: XDP L4 load balancer agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum XdpMode {
    /// In the NIC driver (fast); fails if the driver has no XDP support.
    Native,
    /// In the kernel's generic path (any interface, much slower).
    Generic,
    /// Native, else generic with a warning naming the interface.
    Auto,
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process")]
pub enum Command {
    /// Load and attach the XDP program and keep its maps in step with a config file,
    /// the cluster, or a directory of Kubernetes manifests.
    #[command(group(clap::ArgGroup::new("source").required(true)))]
    #[command(group(clap::ArgGroup::new("kubernetes_source").args(["kube", "manifests"])))]
    Run {
        /// The services (YAML; see examples/xlb.yaml). Reloaded on change and on SIGHUP.
        #[arg(long, group = "source")]
        config: Option<PathBuf>,
        /// Watch Services, EndpointSlices and Nodes of the cluster (in-cluster config,
        /// else KUBECONFIG) and serve every Service as kube-proxy would.
        #[arg(long, group = "source")]
        kube: bool,
        /// Translate the Kubernetes YAML in this directory (Service, EndpointSlice,
        /// Node; multi-document files) as `--kube` would; reloaded on change.
        #[arg(long, group = "source", value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// This node's name: selects its Node object (NodePort addresses) and its local
        /// endpoints (traffic policy Local). Kubernetes sources only.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// NodePort addresses of this node, instead of those of its Node object
        /// (repeatable). The first of each family is also the SNAT source address;
        /// without it, the Node object's first InternalIP of each family is (else its
        /// ExternalIP), else the first address of that family on the `--interface`s.
        #[arg(long = "node-address")]
        node_addresses: Vec<std::net::IpAddr>,
        /// How new flows to backends on other nodes are translated, unless a Service
        /// says otherwise (`xlb.dev/lb-mode`, a config file service's `lbMode`):
        /// `snat` (source to this node's address and an allocated port, as kube-proxy
        /// masquerades), `dsr` (encapsulated, untranslated, to the backend's node,
        /// which delivers it: the pod sees the client and answers it directly),
        /// `hybrid` (DSR for TCP, SNAT for UDP) or `dnat` (destination only: replies
        /// must route back through this node). `externalTrafficPolicy: Local` never
        /// rewrites the source nor encapsulates.
        #[arg(long, default_value = "snat", value_parser = parse_lb_mode)]
        lb_mode: lb_core::mode::LbMode,
        /// The SNAT source ports, `MIN-MAX` (each backend has the whole range). The
        /// default lies above the kernel's ephemeral ports and the NodePort range.
        #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
        snat_ports: (u16, u16),
        /// Admin HTTP address: /healthz (liveness), /readyz (ready once the first
        /// complete state is in the maps), /metrics.
        #[arg(long, default_value = "0.0.0.0:9190")]
        admin: std::net::SocketAddr,
        /// An interface that receives VIP traffic or sends to backends (repeatable, or
        /// comma-separated). Required unless `--l7` runs alone (an L7-only instance,
        /// reached through another node's XDP).
        #[arg(
            long = "interface",
            required_unless_present_any = ["l7", "socket_lb", "cgroup"],
            value_delimiter = ','
        )]
        interfaces: Vec<String>,
        /// A device on which DSR packets for this node's pods arrive without crossing
        /// an `--interface` (an overlay such as flannel's `flannel.1`): the
        /// decapsulating tc ingress program is attached there too (repeatable, or
        /// comma-separated).
        #[arg(long = "decap-interface", value_delimiter = ',')]
        decap_interfaces: Vec<String>,
        /// Socket load balancing: cgroup hooks rewrite connect/sendmsg to Services into
        /// backend addresses for every process of the host's cgroup2 root (found in
        /// /proc/self/mountinfo, else mounted privately). Works with or without
        /// `--interface`.
        #[arg(long)]
        socket_lb: bool,
        /// Socket load balancing attached to this cgroup v2 directory instead of the
        /// root (implies `--socket-lb`).
        #[arg(long, value_name = "DIR")]
        cgroup: Option<PathBuf>,
        /// Socket load balancing only for sockets of the host's network namespace (the
        /// agent's), not for pods' (Cilium's `socketLB.hostNamespaceOnly`, for meshes
        /// whose sidecars must see the Service address).
        #[arg(long)]
        socket_lb_host_only: bool,
        #[command(flatten)]
        l7: L7Args,
        #[arg(long, value_enum, default_value = "native")]
        xdp_mode: XdpMode,
        /// bpffs directory for the pinned maps and links.
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
        /// Start from scratch: detach and unpin what a previous agent left (drops
        /// tracked connections). Without it, a restarted agent adopts them.
        #[arg(long)]
        replace: bool,
        /// How often to check the config file for changes, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
        /// Backends with their own series on /metrics (`xlb_backend_*`); the others
        /// are summed per service into `backend="other"`.
        #[arg(long, default_value_t = crate::metrics::DEFAULT_MAX_BACKENDS)]
        metrics_max_backends: usize,
    },
    /// Print services, backends (health, share of the table) and counters from the
    /// pinned maps; works with or without a running agent.
    Status {
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Rates instead: new flows (connections), packets and bytes per second per
        /// service and backend, over `--interval` (like `ipvsadm --stats --rate`).
        #[arg(long)]
        stats: bool,
        /// Seconds between the two reads of `--stats`.
        #[arg(long, default_value_t = 1.0, requires = "stats")]
        interval: f64,
    },
    /// What the data plane does with a flow right now, from the maps (read-only):
    /// frontend, source ranges, conntrack, session affinity, Maglev slot, backend,
    /// translation, next hop.
    Trace {
        /// `tcp` or `udp`.
        proto: String,
        /// The client: `198.51.100.2:40000`, `[2001:db8::2]:40000`, or an address alone
        /// (then only affinity services can say which backend a new flow gets).
        src: String,
        /// The frontend: `203.0.113.10:80`, `[2001:db8::10]:80`.
        dst: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
        /// Ask these agents' admin endpoints instead of reading local maps
        /// (`http://198.51.100.11:9190`, comma-separated or repeated): where each node would
        /// send the flow.
        #[arg(long, value_delimiter = ',', value_name = "URL")]
        nodes: Vec<String>,
    },
    /// Detach the XDP program from every interface and the socket programs from their
    /// cgroup, and remove the pinned maps.
    Detach {
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
    },
    /// Ingress migration tools.
    #[command(subcommand)]
    Ingress(IngressCommand),
}

#[derive(Subcommand)]
pub enum IngressCommand {
    /// The migration report: for every Ingress of the class, each annotation and
    /// whether the L7 hop honours it, ignores it (and why) or refuses it, and the
    /// problems it would have. Exit status 2 when anything would be served
    /// differently from ingress-nginx, 1 on an error.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["kube", "manifests"])))]
    Check {
        /// List the cluster's Ingresses, IngressClasses, Services, EndpointSlices and
        /// TLS Secrets (in-cluster config, else KUBECONFIG).
        #[arg(long)]
        kube: bool,
        /// Read Kubernetes YAML from this directory (as `run --manifests`).
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// The class whose Ingresses to check (ingress-nginx's by default).
        #[arg(long, default_value = "nginx")]
        l7_ingress_class: String,
        /// The controller that class's IngressClass names.
        #[arg(long, default_value = lb_core::model::ingress::INGRESS_NGINX_CONTROLLER)]
        l7_controller_name: String,
        /// ingress-nginx's `--annotations-prefix`.
        #[arg(long, default_value = lb_core::model::ingress::DEFAULT_PREFIX, value_parser = annotations_prefix)]
        annotations_prefix: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The L7 hop: an HTTP(S) proxy routing by Ingress host and path rules.
#[derive(Args, Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "command-line switches, each an independent flag"
)]
pub struct L7Args {
    /// Run the L7 hop (Kubernetes sources only): route HTTP and HTTPS by the Ingresses
    /// of `--l7-ingress-class`.
    #[arg(long, requires = "kubernetes_source", conflicts_with = "config")]
    pub l7: bool,
    /// Plain HTTP listener of the L7 hop.
    #[arg(long, default_value = "0.0.0.0:80", requires = "l7")]
    pub l7_http: SocketAddr,
    /// HTTPS listener of the L7 hop (certificates from the Ingresses' TLS Secrets).
    #[arg(long, default_value = "0.0.0.0:443", requires = "l7")]
    pub l7_https: SocketAddr,
    /// The IngressClass whose Ingresses this hop serves: by `spec.ingressClassName`, the
    /// `kubernetes.io/ingress.class` annotation, or (neither set) when the class of
    /// this name is the default one. `nginx` takes over ingress-nginx's Ingresses.
    #[arg(long, default_value = "xlb", requires = "l7")]
    pub l7_ingress_class: String,
    /// The `spec.controller` that IngressClass must name to count as the default class
    /// (`k8s.io/ingress-nginx` to take over ingress-nginx's class unedited).
    #[arg(long, default_value = lb_core::model::ingress::CONTROLLER, requires = "l7")]
    pub l7_controller_name: String,
    /// The prefix of the ingress-nginx annotations read (ingress-nginx's
    /// `--annotations-prefix`).
    #[arg(long, default_value = lb_core::model::ingress::DEFAULT_PREFIX, requires = "l7", value_parser = annotations_prefix)]
    pub annotations_prefix: String,
    /// The L4 Service (namespace/name) that reaches this hop: its LoadBalancer ingress
    /// IPs and externalIPs are written to the status of the Ingresses served (`--kube`).
    #[arg(long, value_name = "NAMESPACE/NAME", requires = "l7")]
    pub l7_publish_service: Option<String>,
    /// Addresses written to the Ingresses' status instead of the publish Service's
    /// (repeatable).
    #[arg(long = "l7-publish-address", requires = "l7")]
    pub l7_publish_addresses: Vec<IpAddr>,
    /// Time allowed to connect to an endpoint before the next one is tried.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, requires = "l7")]
    pub l7_connect_timeout: Duration,
    /// Time a client has to send a request's headers (slow clients are cut off).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, requires = "l7")]
    pub l7_header_timeout: Duration,
    /// Time an idle keep-alive connection is kept open.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, requires = "l7")]
    pub l7_idle_timeout: Duration,
    /// Time from choosing a backend to its response head, connecting and the retry
    /// included (504 after).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, requires = "l7")]
    pub l7_request_timeout: Duration,
    /// Time a write to a backend may stay pending (the backend not reading the
    /// request) before the request fails, unless the Ingress sets
    /// `nginx.ingress.kubernetes.io/proxy-send-timeout`; between two writes, not the
    /// whole request.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, requires = "l7")]
    pub l7_send_timeout: Duration,
    /// Request body limit in bytes (413 above it) unless the Ingress sets
    /// `nginx.ingress.kubernetes.io/proxy-body-size`.
    #[arg(long, default_value_t = 1 << 20, requires = "l7")]
    pub l7_max_body: u64,
    /// Request head limit in bytes: request line and headers (431 above it).
    #[arg(long, default_value_t = 16 * 1024, requires = "l7")]
    pub l7_max_header_bytes: usize,
    /// On SIGTERM the hop stops accepting, answers the requests in flight (with
    /// `Connection: close`) and closes keep-alive connections; connections still open
    /// after this long are cut.
    #[arg(long, default_value = "25s", value_parser = humantime::parse_duration, requires = "l7")]
    pub l7_drain_grace: Duration,
    /// How often ExternalName targets are resolved again (DNS).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, requires = "l7")]
    pub l7_dns_refresh: Duration,
    /// Honour the `ssl-passthrough` annotation (ingress-nginx's
    /// `--enable-ssl-passthrough`): TLS whose SNI names such an Ingress's host goes to
    /// its backend untouched; every other handshake is terminated as before.
    #[arg(long, requires = "l7")]
    pub l7_enable_ssl_passthrough: bool,
    /// ingress-nginx's `ssl-redirect` ConfigMap key: redirect plain HTTP to HTTPS for
    /// hosts with TLS unless an Ingress's `ssl-redirect` annotation says otherwise.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, requires = "l7")]
    pub l7_ssl_redirect: bool,
    /// ingress-nginx's `use-forwarded-headers`: believe `X-Forwarded-For` (the client
    /// the source ranges and limits judge), `-Proto`, `-Host` and `-Port` from clients;
    /// only behind another proxy that sets them.
    #[arg(long, requires = "l7")]
    pub l7_use_forwarded_headers: bool,
    /// ingress-nginx's `compute-full-forwarded-for`: append the connection's address
    /// to the client's `X-Forwarded-For` instead of replacing it.
    #[arg(long, requires = "l7")]
    pub l7_compute_full_forwarded_for: bool,
    /// Worker threads of the L7 hop (nginx's `worker_processes`), each accepting on
    /// listeners of its own; default: one per CPU the agent may run on.
    /// Ignored without `--l7`.
    #[arg(long, env = "XLB_L7_WORKERS")]
    pub l7_workers: Option<std::num::NonZeroUsize>,
}

/// An annotation prefix is the DNS-subdomain part of an annotation name (RFC 1123:
/// lower-case letters, digits, `-` and `.`, at most 253 characters), without the `/`.
fn annotations_prefix(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && text
            .split('.')
            .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} is not a DNS subdomain like nginx.ingress.kubernetes.io (no trailing /)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The shipped binary holds only the product: the demo lives in the test harness
    /// (`xlb-demo`, behind `cargo xtask demo`).
    #[test]
    fn the_shipped_binary_has_no_demo() {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect();
        // `ingress` holds the migration report (`ingress check`), a product feature.
        assert_eq!(names, ["run", "status", "trace", "detach", "ingress"]);
    }

    /// ingress-nginx's ConfigMap defaults as flags: off unless given, `ssl-redirect` on
    /// unless turned off.
    #[test]
    fn configmap_defaults_parse() {
        use clap::Parser as _;
        let l7 = |extra: &[&str]| {
            let mut argv = vec!["lb-agent", "run", "--kube", "--l7"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(&argv).expect("parses").command {
                super::Command::Run { l7, .. } => l7,
                _ => unreachable!("run"),
            }
        };
        let plain = l7(&[]);
        assert!(plain.l7_ssl_redirect);
        assert!(!plain.l7_use_forwarded_headers && !plain.l7_compute_full_forwarded_for);
        assert!(!plain.l7_enable_ssl_passthrough);
        let set = l7(&[
            "--l7-ssl-redirect=false",
            "--l7-use-forwarded-headers",
            "--l7-compute-full-forwarded-for",
            "--l7-enable-ssl-passthrough",
        ]);
        assert!(!set.l7_ssl_redirect);
        assert!(set.l7_use_forwarded_headers && set.l7_compute_full_forwarded_for);
        assert!(set.l7_enable_ssl_passthrough);
    }

    #[test]
    fn annotation_prefixes_are_dns_subdomains() {
        assert_eq!(
            super::annotations_prefix("ingress.example.com").as_deref(),
            Ok("ingress.example.com")
        );
        for bad in [
            "",
            "nginx.ingress.kubernetes.io/",
            "Upper.case",
            "a..b",
            "-a.b",
        ] {
            let error = super::annotations_prefix(bad).expect_err(bad);
            assert!(error.contains("not a DNS subdomain"), "{error}");
        }
    }
}

/// `--lb-mode`: `snat`, `dsr`, `hybrid` or `dnat`.
fn parse_lb_mode(text: &str) -> Result<lb_core::mode::LbMode, String> {
    text.parse()
}

/// `--snat-ports MIN-MAX`: 1 <= MIN <= MAX <= 65535.
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("must be MIN-MAX, such as 61000-65535, got {text:?}"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("{p:?} is not a port number 1-65535"))
    };
    let (min, max) = (port(min)?, port(max)?);
    if min > max {
        return Err(format!("{min} is above {max}"));
    }
    Ok((min, max))
}

#[cfg(test)]
mod snat_flag_tests {
    use super::*;

    #[test]
    fn port_ranges_and_modes_parse_or_say_why_not() {
        assert_eq!(parse_port_range("61000-65535"), Ok((61_000, 65_535)));
        assert_eq!(parse_port_range("5-5"), Ok((5, 5)));
        for bad in ["61000", "0-10", "10-5", "a-b", "1-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_lb_mode("snat"), Ok(lb_core::mode::LbMode::Snat));
        assert_eq!(parse_lb_mode("dsr"), Ok(lb_core::mode::LbMode::Dsr));
        assert_eq!(parse_lb_mode("hybrid"), Ok(lb_core::mode::LbMode::Hybrid));
        let err = parse_lb_mode("direct").expect_err("direct");
        assert!(err.contains("\"direct\""), "{err}");
    }
}
