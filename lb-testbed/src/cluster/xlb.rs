//! xlb as the [`NodeProgram`] of the cluster scenarios: one real agent per node, as the
//! DaemonSet runs it, all reading the same manifests (`lb-agent run --manifests DIR
//! --node-name node-<i> --interface eth0`), with XDP on the node's uplink.
//!
//! What a pod sees and whether flows survive a move depend on the agent's mode, so the
//! caller says (see [`XlbAgents::new`]); extra arguments select the mode.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::apps::PodServers;
use super::manifests::ManifestDir;
use super::scenarios::{self, NodeProgram, POD_PORT, PodSees};
use super::{Cluster, ClusterService, PodNetwork, TrafficPolicy, VXLAN_IF_V4, VXLAN_IF_V6};
use crate::AgentProcess;

/// How long the agents may take to hold every Service after a change of manifests. The
/// first time includes loading the programs: three agents' verifier runs at once took
/// over 20 s on a loaded two-core test machine.
const SETTLE: Duration = Duration::from_mins(1);

/// One agent per node of a cluster, started on the first [`NodeProgram::program`] and
/// killed (pins removed) on drop.
pub struct XlbAgents<'c> {
    binary: PathBuf,
    name: String,
    extra: Vec<String>,
    pod_sees_cluster: PodSees,
    flows_survive_moving: bool,
    manifests: Option<ManifestDir>,
    agents: Vec<AgentProcess<'c>>,
}

impl<'c> XlbAgents<'c> {
    /// Agents run from `binary` with `extra` arguments after the source and interface
    /// (e.g. a mode flag), named `name` in messages. `pod_sees_cluster`: the source a pod
    /// sees for external traffic of an `externalTrafficPolicy: Cluster` Service in this
    /// mode (`Local` always keeps the client's); `flows_survive_moving`: whether an
    /// established flow survives the router moving it to another node.
    pub fn new(
        binary: &Path,
        name: &str,
        extra: &[&str],
        pod_sees_cluster: PodSees,
        flows_survive_moving: bool,
    ) -> XlbAgents<'c> {
        XlbAgents {
            binary: binary.to_owned(),
            name: name.to_owned(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            pod_sees_cluster,
            flows_survive_moving,
            manifests: None,
            agents: Vec::new(),
        }
    }

    /// The running agents, in node order (for status, logs, restarts).
    pub fn agents(&self) -> &[AgentProcess<'c>] {
        &self.agents
    }

    /// The manifests directory, once programmed.
    pub fn manifests(&self) -> Option<&ManifestDir> {
        self.manifests.as_ref()
    }

    /// Every agent's `lb-agent status`, for a failure's message.
    pub fn statuses(&self) -> String {
        self.agents
            .iter()
            .map(|agent| match agent.wait_for(STATUS_TIMEOUT, |_| true) {
                Ok(report) => report.to_string(),
                Err(e) => format!("{e:#}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Packets the agents together counted under `reason` (its metrics name).
    pub fn counted(&self, reason: &str) -> anyhow::Result<u64> {
        let mut total = 0;
        for agent in &self.agents {
            let report = agent.wait_for(STATUS_TIMEOUT, |_| true)?;
            total += report
                .reasons
                .iter()
                .filter(|(r, _)| r == reason)
                .map(|(_, n)| n)
                .sum::<u64>();
        }
        Ok(total)
    }
}

/// How long a status read may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// A mode of `--lb-mode`, with what the scenarios expect of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Snat,
    Dsr,
    /// DSR for TCP, SNAT for UDP.
    Hybrid,
}

impl Mode {
    /// As `--lb-mode` takes it.
    pub fn flag(self) -> &'static str {
        match self {
            Mode::Snat => "snat",
            Mode::Dsr => "dsr",
            Mode::Hybrid => "hybrid",
        }
    }
}

/// The standard scenario set-up on `cluster` for xlb in `mode`: the pod servers, the
/// standard Services, an agent (`binary`, with `extra` arguments) on every node holding
/// them, and the `Local` LB IPs announced. On the VXLAN variant, a mode that
/// encapsulates also decapsulates on the overlay devices (`--decap-interface`), where
/// packets for remote pods arrive. What a pod sees and whether flows survive a move
/// follow from the mode (hybrid: as DSR, its TCP; its UDP is `PodSees::NodeIfRemote`).
pub fn start<'c>(
    cluster: &'c Cluster,
    binary: &Path,
    mode: Mode,
    extra: &[&str],
) -> anyhow::Result<(PodServers, Vec<ClusterService>, XlbAgents<'c>)> {
    let servers = PodServers::start(cluster, POD_PORT)?;
    let services = scenarios::standard_services(cluster);
    let decap = format!("{VXLAN_IF_V4},{VXLAN_IF_V6}");
    let mut args = vec!["--lb-mode", mode.flag()];
    if mode != Mode::Snat && cluster.network == PodNetwork::Vxlan {
        args.extend(["--decap-interface", &decap]);
    }
    args.extend_from_slice(extra);
    let (pod_sees, survive) = match mode {
        Mode::Snat => (PodSees::NodeIfRemote, false),
        Mode::Dsr | Mode::Hybrid => (PodSees::Client, true),
    };
    let mut xlb = XlbAgents::new(
        binary,
        &format!("xlb {}", mode.flag()),
        &args,
        pod_sees,
        survive,
    );
    xlb.program(cluster, &services)?;
    scenarios::announce(cluster, &services)?;
    Ok((servers, services, xlb))
}

impl<'c> NodeProgram<'c> for XlbAgents<'c> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn program(&mut self, cluster: &'c Cluster, services: &[ClusterService]) -> anyhow::Result<()> {
        if self.manifests.is_none() {
            self.manifests = Some(ManifestDir::new(cluster.router.name())?);
        }
        let dir = self.manifests.as_ref().context("manifests directory")?;
        dir.write(cluster, services)?;
        if self.agents.is_empty() {
            for node in &cluster.nodes {
                let source = dir.agent_source(&node.name);
                let source: Vec<&str> = source.iter().map(String::as_str).collect();
                let mut extra = vec!["--poll-ms", "100"];
                extra.extend(self.extra.iter().map(String::as_str));
                let agent = AgentProcess::start_on_interfaces(
                    &node.ns,
                    &self.binary,
                    &source,
                    &[Cluster::NODE_IF],
                    node.ns.name(),
                    &extra,
                )
                .with_context(|| format!("starting the agent on {}", node.name))?;
                self.agents.push(agent);
            }
        }
        // Every ClusterIP of every Service with endpoints is in every node's maps.
        let expected: Vec<String> = services
            .iter()
            .filter(|s| !s.endpoints.is_empty())
            .flat_map(|s| {
                [false, true]
                    .into_iter()
                    .filter_map(|v6| s.cluster_ip(v6).map(|a| a.to_string()))
            })
            .collect();
        for (agent, node) in self.agents.iter().zip(&cluster.nodes) {
            agent
                .wait_for(SETTLE, |report| {
                    report.interfaces.iter().any(|i| i == Cluster::NODE_IF)
                        && expected.iter().all(|addr| {
                            report
                                .services
                                .iter()
                                .flat_map(|s| &s.frontends)
                                .any(|f| f.starts_with(&format!("{addr}/")))
                        })
                })
                .with_context(|| format!("the agent on {}", node.name))?;
        }
        Ok(())
    }

    fn pod_sees(&self, policy: TrafficPolicy) -> PodSees {
        match policy {
            TrafficPolicy::Cluster => self.pod_sees_cluster,
            TrafficPolicy::Local => PodSees::Client,
        }
    }

    fn flows_survive_moving(&self) -> bool {
        self.flows_survive_moving
    }
}
