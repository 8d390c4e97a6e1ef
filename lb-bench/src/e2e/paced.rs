//! An open-loop load of new HTTP connections at a fixed rate: connection `i` starts at
//! `i / rate` seconds whatever happened to the earlier ones, each sends one
//! `Connection: close` request to `targets[i % targets.len()]` and reads the answer to
//! its end.
//!
//! wrk (closed loop, as many connections as it can) measures capacity; at saturation the
//! machine's CPUs are all busy whatever the path costs, so CPU per connection there
//! mostly mirrors throughput. At a fixed rate below saturation every configuration does
//! the same work in the same time, and the CPU it takes for it is what the path costs.
//! Rotating over a list of targets lets a reference without a load balancer spread its
//! connections over the same pods as a VIP does.
//!
//! The generator is one thread (pinned like wrk) in the client's namespace running a
//! current-thread tokio runtime; it reports its own CPU time, which the caller counts as
//! the load generator's. Everything is bounded: `rate * secs` connections, at most
//! [`MAX_IN_FLIGHT`] at once, each within [`CONNECTION_TIMEOUT`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lb_testbed::Netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;

use crate::report;

/// Deadline of one connection: connect, request and the whole answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections open at once at most; a start beyond it is counted as failed (the path is
/// far slower than the rate: the measurement is not below saturation).
pub const MAX_IN_FLIGHT: usize = 4096;

/// Most bytes read of one answer (the harness's answers are a few dozen).
const MAX_ANSWER: usize = 4096;

/// Most error messages kept.
const MAX_ERRORS: usize = 3;

/// A fixed-rate run.
pub struct Paced<'a> {
    /// Connection `i` goes to `targets[i % len]`.
    pub targets: &'a [SocketAddr],
    /// New connections per second.
    pub rate: u32,
    pub secs: u32,
    /// Pin the generator's thread to this CPU.
    pub cpu: Option<usize>,
}

/// What a fixed-rate run did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PacedResult {
    /// Connections started (`rate * secs` unless [`MAX_IN_FLIGHT`] was reached).
    pub started: u64,
    /// Connections answered `200` and closed.
    pub completed: u64,
    /// Connections that failed: refused, reset, timed out, a wrong answer, or not started
    /// because [`MAX_IN_FLIGHT`] were open.
    pub failed: u64,
    /// Completed connections per second of the schedule (`rate` when all complete).
    pub connections_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU seconds the generator's thread used (socket calls, and the softirq work the
    /// kernel did on that thread while it sent).
    pub generator_cpu_s: f64,
    /// The first failures' errors.
    pub errors: Vec<String>,
}

impl Paced<'_> {
    /// Runs the schedule from `client`'s namespace.
    pub fn run(&self, client: &Netns) -> Result<PacedResult> {
        if self.targets.is_empty() || self.rate == 0 || self.secs == 0 {
            bail!("a paced run needs targets, a rate and a duration");
        }
        let deadline = Duration::from_secs(u64::from(self.secs)) + CONNECTION_TIMEOUT * 3;
        let cpu = self.cpu;
        let (targets, rate, secs) = (self.targets.to_vec(), self.rate, self.secs);
        client.block_on(deadline, move || async move {
            if let Some(cpu) = cpu {
                lb_testbed::pin_current_thread(cpu)?;
            }
            Ok(schedule(&targets, rate, secs).await)
        })?
    }
}

async fn schedule(targets: &[SocketAddr], rate: u32, secs: u32) -> PacedResult {
    let cpu0 = report::thread_cpu_time();
    let total = u64::from(rate) * u64::from(secs);
    let interval = Duration::from_secs(1) / rate;
    let mut out = PacedResult::default();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut running = JoinSet::new();
    let start = tokio::time::Instant::now();
    let mut next = 0_u64;
    while next < total {
        // Every connection that is due starts now (the timer ticks by the millisecond, so
        // at rates above 1000/s a few start together).
        let now = tokio::time::Instant::now();
        while next < total && start + interval * u32::try_from(next).unwrap_or(u32::MAX) <= now {
            #[expect(
                clippy::cast_possible_truncation,
                reason = "index modulo the target count"
            )]
            let target = targets[(next % targets.len() as u64) as usize];
            next += 1;
            if running.len() >= MAX_IN_FLIGHT {
                record(
                    &mut out,
                    &mut latencies,
                    Err(format!("not started: {MAX_IN_FLIGHT} connections open")),
                );
                continue;
            }
            out.started += 1;
            running.spawn(one(target));
        }
        while let Some(done) = running.try_join_next() {
            record(&mut out, &mut latencies, flatten(done));
        }
        let due = start + interval * u32::try_from(next).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due).await;
    }
    while let Some(done) = running.join_next().await {
        record(&mut out, &mut latencies, flatten(done));
    }
    out.generator_cpu_s = report::thread_cpu_time().saturating_sub(cpu0).as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "connection counts")]
    {
        out.connections_per_sec = out.completed as f64 / f64::from(secs);
    }
    latencies.sort();
    if !latencies.is_empty() {
        out.p50_ms = report::percentile(&latencies, 50.0).as_secs_f64() * 1e3;
        out.p99_ms = report::percentile(&latencies, 99.0).as_secs_f64() * 1e3;
    }
    out
}

fn flatten(
    done: Result<Result<Duration, String>, tokio::task::JoinError>,
) -> Result<Duration, String> {
    done.map_err(|e| format!("connection task: {e}"))?
}

fn record(out: &mut PacedResult, latencies: &mut Vec<Duration>, r: Result<Duration, String>) {
    match r {
        Ok(latency) => {
            out.completed += 1;
            latencies.push(latency);
        }
        Err(e) => {
            out.failed += 1;
            if out.errors.len() < MAX_ERRORS {
                out.errors.push(e);
            }
        }
    }
}

/// One connection: connect, one request, the whole answer, which must be a `200`.
async fn one(target: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(target)
            .await
            .map_err(|e| format!("connect {target}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("{target}: nodelay: {e}"))?;
        let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("{target}: write: {e}"))?;
        let mut answer = Vec::with_capacity(256);
        let mut buf = [0_u8; 512];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("{target}: read: {e}"))?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.len() > MAX_ANSWER {
                return Err(format!("{target}: answer longer than {MAX_ANSWER} bytes"));
            }
        }
        if answer.starts_with(b"HTTP/1.1 200 ") {
            Ok(())
        } else {
            let head = String::from_utf8_lossy(&answer[..answer.len().min(40)]).into_owned();
            Err(format!("{target}: answer {head:?}"))
        }
    };
    match tokio::time::timeout(CONNECTION_TIMEOUT, exchange).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("{target}: no answer within {CONNECTION_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_and_the_first_kept() {
        let mut out = PacedResult::default();
        let mut latencies = Vec::new();
        record(&mut out, &mut latencies, Ok(Duration::from_millis(1)));
        for i in 0..5 {
            record(&mut out, &mut latencies, Err(format!("e{i}")));
        }
        assert_eq!((out.completed, out.failed), (1, 5));
        assert_eq!(out.errors, ["e0", "e1", "e2"]);
        assert_eq!(latencies.len(), 1);
    }
}
