//! The `lb-agent` command line. In the library so that tests can parse argument lists
//! (e.g. the DaemonSet's) with the same definitions the binary uses.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
pub enum Command {
    /// Load and attach the XDP program and keep its maps in step with a config file,
    /// the cluster, or a directory of Kubernetes manifests.
    #[command(group(clap::ArgGroup::new("source").required(true)))]
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
        /// (repeatable).
        #[arg(long = "node-address")]
        node_addresses: Vec<std::net::IpAddr>,
        /// Admin HTTP address: /healthz (liveness), /readyz (ready once the first
        /// complete state is in the maps), /metrics.
        #[arg(long, default_value = "0.0.0.0:9190")]
        admin: std::net::SocketAddr,
        /// An interface that receives VIP traffic or sends to backends (repeatable, or
        /// comma-separated).
        #[arg(long = "interface", required = true, value_delimiter = ',')]
        interfaces: Vec<String>,
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
    },
    /// Print services, backends (health, share of the table) and counters from the
    /// pinned maps; works with or without a running agent.
    Status {
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach the XDP program from every interface and remove the pinned maps.
    Detach {
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
    },
    /// Build namespaces, run the agent from examples/xlb.yaml, send traffic through the
    /// VIPs, print the result.
    Demo {
        /// TCP connections per VIP.
        #[arg(long, default_value_t = 300)]
        requests: u32,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
