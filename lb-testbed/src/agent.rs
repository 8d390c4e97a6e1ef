//! The real agent binary, run in the load-balancer namespace the way an operator runs
//! it (`lb-agent run --config … --interface … --bpffs …`), for end-to-end tests and
//! the demo. Dropping it kills the process (by PID) and removes everything it pinned.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::netns::Netns;
use super::topology::Topology;
use lb_agent::dataplane::pins;
use lb_agent::status::Report;

/// How often `wait_for` reads the pinned maps.
const POLL: Duration = Duration::from_millis(50);

/// The L7 hop's arguments as the DaemonSet runs it (plain HTTP on port 80
/// and HTTPS on 443 of every address), with manifests polled every 100 ms so
/// that tests converge quickly.
pub const L7_ARGS: [&str; 7] = [
    "--l7",
    "--l7-http",
    "0.0.0.0:80",
    "--l7-https",
    "0.0.0.0:443",
    "--poll-ms",
    "100",
];

pub struct AgentProcess<'a> {
    ns: &'a Netns,
    binary: PathBuf,
    /// The source arguments: `--config FILE`, `--manifests DIR` or `--kube`.
    source: Vec<String>,
    pin_dir: PathBuf,
    log: PathBuf,
    pid: Option<u32>,
    /// Extra arguments for `run` (e.g. `--poll-ms 100`).
    extra: Vec<String>,
    /// A command that runs the agent (e.g. `setpriv ... --`); empty = none.
    launcher: Vec<String>,
    /// Attach XDP to `interfaces`; false for an L7-only instance.
    xdp: bool,
    /// Where XDP attaches: the topology's load-balancer interfaces unless started with
    /// [`AgentProcess::start_on_interfaces`].
    interfaces: Vec<String>,
}

impl<'a> AgentProcess<'a> {
    /// Starts `binary run` in `ns` on the topology's two load-balancer interfaces,
    /// pinning under a unique bpffs directory named after `tag`.
    pub fn start(
        ns: &'a Netns,
        binary: &Path,
        config: &Path,
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_with_launcher(ns, &[], binary, config, tag, extra)
    }

    /// [`AgentProcess::start`] through `launcher`, a command that ends by running its
    /// arguments (e.g. `setpriv --bounding-set=... --` to limit capabilities).
    pub fn start_with_launcher(
        ns: &'a Netns,
        launcher: &[&str],
        binary: &Path,
        config: &Path,
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let config = config.display().to_string();
        Self::start_full(ns, launcher, binary, &["--config", &config], tag, extra)
    }

    /// Like [`AgentProcess::start`] with any source (`--manifests DIR`, `--kube`).
    pub fn start_with_source(
        ns: &'a Netns,
        binary: &Path,
        source: &[&str],
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_full(ns, &[], binary, source, tag, extra)
    }

    /// [`AgentProcess::start_with_source`] with environment variables set for the
    /// agent (e.g. `KUBECONFIG`), through `env`, which execs the agent (same PID).
    pub fn start_with_env(
        ns: &'a Netns,
        binary: &Path,
        source: &[&str],
        env: &[(&str, &str)],
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let assignments: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let launcher: Vec<&str> = std::iter::once("env")
            .chain(assignments.iter().map(String::as_str))
            .collect();
        Self::start_full(ns, &launcher, binary, source, tag, extra)
    }

    /// An agent with any source on the given interfaces of `ns` (e.g. a cluster node's
    /// uplink, `Cluster::NODE_IF`), pinning under a unique bpffs directory named after
    /// `tag`.
    pub fn start_on_interfaces(
        ns: &'a Netns,
        binary: &Path,
        source: &[&str],
        interfaces: &[&str],
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        if interfaces.is_empty() {
            bail!("agent {tag}: interfaces: at least one is needed");
        }
        let mut agent = Self::prepare(ns, &[], binary, source, tag, extra)?;
        agent.interfaces = interfaces.iter().map(|i| (*i).to_owned()).collect();
        agent.spawn()?;
        Ok(agent)
    }

    /// An L7-only agent (`--l7` without `--interface`: no XDP, no pins) in `ns`,
    /// through `launcher` (may be empty).
    pub fn start_l7_only(
        ns: &'a Netns,
        launcher: &[&str],
        binary: &Path,
        source: &[&str],
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut agent = Self::prepare(ns, launcher, binary, source, tag, extra)?;
        agent.xdp = false;
        agent.spawn()?;
        Ok(agent)
    }

    /// An agent without XDP that still loads the data plane and pins under its bpffs
    /// directory: socket load balancing only (`extra` carries `--cgroup DIR` etc.).
    pub fn start_socket_lb(
        ns: &'a Netns,
        binary: &Path,
        source: &[&str],
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut agent = Self::prepare(ns, &[], binary, source, tag, extra)?;
        agent.xdp = false;
        let pin_dir = agent.pin_dir.display().to_string();
        agent.extra.extend(["--bpffs".to_owned(), pin_dir]);
        agent.spawn()?;
        Ok(agent)
    }

    /// [`AgentProcess::start`] with any source, through `launcher` (may be empty).
    pub fn start_full(
        ns: &'a Netns,
        launcher: &[&str],
        binary: &Path,
        source: &[&str],
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut agent = Self::prepare(ns, launcher, binary, source, tag, extra)?;
        agent.spawn()?;
        Ok(agent)
    }

    fn prepare(
        ns: &'a Netns,
        launcher: &[&str],
        binary: &Path,
        source: &[&str],
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let unique = format!("xlb-{tag}-{}", std::process::id());
        let agent = AgentProcess {
            ns,
            binary: binary.to_path_buf(),
            source: source.iter().map(|s| (*s).to_owned()).collect(),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&unique),
            log: std::env::temp_dir().join(format!("{unique}.log")),
            pid: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            launcher: launcher.iter().map(|s| (*s).to_owned()).collect(),
            xdp: true,
            interfaces: vec![
                Topology::LB_CLIENT_IF.to_owned(),
                Topology::LB_BACKEND_IF.to_owned(),
            ],
        };
        // A directory left by a crashed earlier run with the same PID is stale.
        pins::remove_all(&agent.pin_dir).context("removing stale pins")?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("agent log {}", self.log.display()))?;
        let mut args: Vec<String> = vec!["run".into()];
        args.extend(self.source.iter().cloned());
        if self.xdp {
            for ifname in &self.interfaces {
                args.extend(["--interface".into(), ifname.clone()]);
            }
            args.extend(["--bpffs".into(), self.pin_dir.display().to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        let binary = self.binary.display().to_string();
        let (program, args): (&str, Vec<&str>) = match self.launcher.split_first() {
            None => (&binary, args.iter().map(String::as_str).collect()),
            Some((program, launcher_args)) => (
                program,
                launcher_args
                    .iter()
                    .chain(std::iter::once(&binary))
                    .chain(&args)
                    .map(String::as_str)
                    .collect(),
            ),
        };
        let pid = self
            .ns
            .spawn_with_output(program, &args, Stdio::null(), Stdio::from(log))?;
        self.pid = Some(pid);
        Ok(())
    }

    /// The agent's PID while it runs (the launcher execs it, so the PID is the
    /// agent's own).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Waits up to `timeout` for the agent to exit (e.g. after a start-up error) and
    /// returns its status; fails with the agent's log when it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let Some(pid) = self.pid else {
            bail!("the agent is not running");
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.ns.try_wait(pid)? {
                self.pid = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent still runs after {timeout:?}; log ({}):\n{}",
                    self.log.display(),
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// SIGKILL, as a crash or an OOM kill would: nothing is cleaned up.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(pid) = self.pid.take() {
            self.ns.kill(pid)?;
        }
        Ok(())
    }

    /// Starts the agent again with the same arguments (it adopts the pins).
    pub fn restart(&mut self) -> Result<()> {
        if self.pid.is_some() {
            bail!("the agent is still running");
        }
        self.spawn()
    }

    /// Reads the status until `ready` accepts it, within `timeout`; fails with the
    /// agent's log.
    pub fn wait_for(&self, timeout: Duration, ready: impl Fn(&Report) -> bool) -> Result<Report> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no status read yet");
        while Instant::now() < deadline {
            match Report::read(&self.pin_dir) {
                Ok(report) if ready(&report) => return Ok(report),
                Ok(report) => last = report.to_string(),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(POLL);
        }
        bail!(
            "the agent did not reach the expected state within {timeout:?}; last status:\n{last}\n\
             agent log ({}):\n{}",
            self.log.display(),
            self.log()
        )
    }

    /// Polls `check` until it holds, within `timeout`; panics naming `what`, with the
    /// agent's log.
    pub fn until(&self, what: &str, timeout: Duration, check: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(POLL);
        }
        panic!("{what} within {timeout:?}; agent log:\n{}", self.log());
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The log without terminal colour codes (`ESC [ ... m`).
#[must_use]
pub fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for AgentProcess<'_> {
    fn drop(&mut self) {
        let _ = self.kill9();
        if let Err(e) = pins::remove_all(&self.pin_dir) {
            tracing::warn!("cleaning up {}: {e}", self.pin_dir.display());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The `lb-agent` binary beside the running one (the benchmarks and the demo are built
/// next to it by `cargo xtask bench` and `cargo xtask demo`).
pub fn sibling_agent_binary() -> Result<PathBuf> {
    let path = std::env::current_exe()
        .context("locating the running binary")?
        .with_file_name("lb-agent");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run this through `cargo xtask` (bench or demo), which builds it",
        path.display()
    );
    Ok(path)
}
