//! The real agent binary, run in the load-balancer namespace the way an operator runs
//! it (`lb-agent run --config … --interface … --bpffs …`), for end-to-end tests and
//! the demo. Dropping it kills the process (by PID) and removes everything it pinned.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::netns::Netns;
use super::topology::Topology;
use crate::dataplane::pins;
use crate::status::Report;

/// How often `wait_for` reads the pinned maps.
const POLL: Duration = Duration::from_millis(50);

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
        let config = config.display().to_string();
        Self::start_with_source(ns, binary, &["--config", &config], tag, extra)
    }

    /// Like [`AgentProcess::start`] with any source (`--manifests DIR`, `--kube`).
    pub fn start_with_source(
        ns: &'a Netns,
        binary: &Path,
        source: &[&str],
        tag: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let unique = format!("xlb-{tag}-{}", std::process::id());
        let mut agent = AgentProcess {
            ns,
            binary: binary.to_path_buf(),
            source: source.iter().map(|s| (*s).to_owned()).collect(),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&unique),
            log: std::env::temp_dir().join(format!("{unique}.log")),
            pid: None,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        // A directory left by a crashed earlier run with the same PID is stale.
        pins::remove_all(&agent.pin_dir).context("removing stale pins")?;
        agent.spawn()?;
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
        args.extend([
            "--interface".into(),
            Topology::LB_CLIENT_IF.into(),
            "--interface".into(),
            Topology::LB_BACKEND_IF.into(),
            "--bpffs".into(),
            self.pin_dir.display().to_string(),
        ]);
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = self.ns.spawn_with_output(
            &self.binary.display().to_string(),
            &args,
            Stdio::null(),
            Stdio::from(log),
        )?;
        self.pid = Some(pid);
        Ok(())
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

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
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
