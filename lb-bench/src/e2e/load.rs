//! The load generators (wrk for HTTP, iperf3 for TCP throughput), run in the client
//! namespace with a fixed duration and a deadline, their output parsed; and the CPU
//! accounting that says where the time went during a measurement.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use lb_testbed::Netns;

/// What one wrk run reported.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub requests: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx responses.
    pub errors: u64,
    pub error_detail: String,
}

/// A wrk run: `threads` threads, `connections` connections, for `secs` seconds, with
/// latency percentiles; `close` adds `Connection: close`, so every request is a new
/// connection. `cpu` pins wrk with taskset.
pub struct Wrk<'a> {
    pub url: &'a str,
    pub threads: u32,
    pub connections: u32,
    pub secs: u32,
    pub close: bool,
    pub cpu: Option<usize>,
}

impl Wrk<'_> {
    pub fn command(&self) -> Vec<String> {
        let mut args = pinned(self.cpu, "wrk");
        args.extend([
            format!("-t{}", self.threads),
            format!("-c{}", self.connections),
            format!("-d{}s", self.secs),
            "--latency".to_owned(),
        ]);
        if self.close {
            args.extend(["-H".to_owned(), "Connection: close".to_owned()]);
        }
        args.push(self.url.to_owned());
        args
    }

    pub fn run(&self, client: &Netns) -> Result<WrkResult> {
        let out = exec(client, &self.command(), self.secs)?;
        parse_wrk(&String::from_utf8_lossy(&out.stdout))
    }
}

/// `taskset -c CPU PROGRAM` or just `PROGRAM`.
pub fn pinned(cpu: Option<usize>, program: &str) -> Vec<String> {
    match cpu {
        Some(cpu) => vec![
            "taskset".to_owned(),
            "-c".to_owned(),
            cpu.to_string(),
            program.to_owned(),
        ],
        None => vec![program.to_owned()],
    }
}

/// Runs `command` in `ns`, killed if it runs well past its `secs`.
fn exec(ns: &Netns, command: &[String], secs: u32) -> Result<std::process::Output> {
    let rest: Vec<&str> = command[1..].iter().map(String::as_str).collect();
    ns.exec_with_timeout(
        &command[0],
        &rest,
        Duration::from_secs(u64::from(secs) + 30),
    )
}

/// `300.00us`, `1.20ms`, `2.00s`, `1.00m` in milliseconds.
fn parse_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return None,
    };
    Some(value * scale)
}

pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut p50, mut p99, mut rps) = (None, None, None);
    let mut errors = Vec::new();
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("50%") {
            p50 = parse_duration_ms(v);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = parse_duration_ms(v);
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            r.requests = n.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                let n: u64 = part
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                r.errors += n;
            }
            errors.push(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
            errors.push(format!("non-2xx/3xx {}", v.trim()));
        }
    }
    match (rps, p50, p99) {
        (Some(rps), Some(p50), Some(p99)) => {
            r.requests_per_sec = rps;
            r.p50_ms = p50;
            r.p99_ms = p99;
        }
        _ => bail!("cannot read requests/s and latency percentiles from wrk's output:\n{out}"),
    }
    r.error_detail = errors.join("; ");
    Ok(r)
}

/// What one iperf3 run reported.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct IperfResult {
    /// Received by the server, over the whole run.
    pub gbit_per_sec: f64,
    pub retransmits: u64,
}

/// `iperf3 -c HOST -p PORT -t SECS -J`, pinned like wrk.
pub struct Iperf<'a> {
    pub host: &'a str,
    pub port: u16,
    pub secs: u32,
    pub cpu: Option<usize>,
}

impl Iperf<'_> {
    pub fn command(&self) -> Vec<String> {
        let mut args = pinned(self.cpu, "iperf3");
        args.extend([
            "-c".to_owned(),
            self.host.to_owned(),
            "-p".to_owned(),
            self.port.to_string(),
            "-t".to_owned(),
            self.secs.to_string(),
            "--connect-timeout".to_owned(),
            "3000".to_owned(),
            "-J".to_owned(),
        ]);
        args
    }

    pub fn run(&self, client: &Netns) -> Result<IperfResult> {
        let out = exec(client, &self.command(), self.secs)?;
        parse_iperf(&String::from_utf8_lossy(&out.stdout))
    }
}

fn parse_iperf(out: &str) -> Result<IperfResult> {
    let json: serde_json::Value =
        serde_json::from_str(out).with_context(|| format!("iperf3 -J output: {out}"))?;
    if let Some(error) = json.get("error").and_then(serde_json::Value::as_str) {
        bail!("iperf3: {error}");
    }
    let end = &json["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's output")?;
    Ok(IperfResult {
        gbit_per_sec: bps / 1e9,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// Jiffies per CPU from `/proc/stat`: (busy, softirq, total).
#[derive(Debug, Clone, Default)]
pub struct CpuTimes(Vec<(u64, u64, u64)>);

impl CpuTimes {
    pub fn read() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        Ok(Self(parse_proc_stat(&stat)))
    }

    /// Per CPU since `earlier`: (busy %, softirq %).
    pub fn since(&self, earlier: &CpuTimes) -> Vec<(f64, f64)> {
        self.0
            .iter()
            .zip(&earlier.0)
            .map(|(now, then)| {
                let total = now.2.saturating_sub(then.2).max(1);
                #[expect(clippy::cast_precision_loss, reason = "jiffies")]
                let pct = |a: u64, b: u64| 100.0 * a.saturating_sub(b) as f64 / total as f64;
                (pct(now.0, then.0), pct(now.1, then.1))
            })
            .collect()
    }
}

/// `cpuN user nice system idle iowait irq softirq steal ...` lines.
fn parse_proc_stat(stat: &str) -> Vec<(u64, u64, u64)> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let at = |i: usize| v.get(i).copied().unwrap_or(0);
            // Guest time is already counted in user time.
            let total: u64 = (0..8).map(at).sum();
            let idle = at(3) + at(4);
            (total - idle, at(6), total)
        })
        .collect()
}

/// The CPUs this process may run on (`sched_getaffinity`), in order.
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity fills it and
    // CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect())
    }
}

/// CPU time a process has used, from `/proc/PID/schedstat` (zero when it is gone).
pub fn process_cpu_time(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// CPU time of this process's reaped children (wrk and iperf3 clients are reaped when
/// their run ends), from `getrusage(RUSAGE_CHILDREN)`.
pub fn children_cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut usage);
        usage
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://203.0.113.10/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.33us  120.10us   9.87ms   91.02%
    Req/Sec    76.41k     3.02k   80.11k    72.00%
  Latency Distribution
     50%  398.00us
     75%  450.00us
     90%  510.00us
     99%    1.21ms
  760412 requests in 10.00s, 88.02MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 1
Requests/sec:  76031.45
Transfer/sec:      8.80MB
";

    #[test]
    fn wrk_output_is_parsed() {
        let r = parse_wrk(WRK).unwrap();
        assert!((r.requests_per_sec - 76_031.45).abs() < 1e-6);
        assert_eq!(r.requests, 760_412);
        assert!((r.p50_ms - 0.398).abs() < 1e-9);
        assert!((r.p99_ms - 1.21).abs() < 1e-9);
        assert_eq!(r.errors, 6);
        assert!(r.error_detail.contains("read 3"));
        assert!(parse_wrk("unable to connect to 203.0.113.10:80").is_err());
        assert_eq!(parse_duration_ms("2.00s"), Some(2000.0));
    }

    #[test]
    fn wrk_and_iperf_commands() {
        let wrk = Wrk {
            url: "http://203.0.113.10/",
            threads: 1,
            connections: 32,
            secs: 10,
            close: true,
            cpu: Some(0),
        };
        assert_eq!(
            wrk.command().join(" "),
            "taskset -c 0 wrk -t1 -c32 -d10s --latency -H Connection: close http://203.0.113.10/"
        );
        let iperf = Iperf {
            host: "203.0.113.10",
            port: 5201,
            secs: 10,
            cpu: None,
        };
        assert_eq!(
            iperf.command().join(" "),
            "iperf3 -c 203.0.113.10 -p 5201 -t 10 --connect-timeout 3000 -J"
        );
    }

    #[test]
    fn iperf_output_is_parsed() {
        let out = r#"{"start":{},"intervals":[],"end":{"sum_sent":{"bits_per_second":9.5e9,"retransmits":12},"sum_received":{"bits_per_second":9.4e9}}}"#;
        let r = parse_iperf(out).unwrap();
        assert!((r.gbit_per_sec - 9.4).abs() < 1e-9);
        assert_eq!(r.retransmits, 12);
        assert!(parse_iperf(r#"{"error":"unable to connect to server"}"#).is_err());
    }

    #[test]
    fn proc_stat_per_cpu() {
        let stat = "cpu  10 0 10 80 0 0 0 0 0 0\ncpu0 5 0 5 40 0 0 2 0 0 0\ncpu1 5 0 5 40 0 0 0 0 0 0\nintr 1\n";
        let before = CpuTimes(parse_proc_stat(stat));
        let stat2 = "cpu0 55 0 5 40 0 0 12 0 0 0\ncpu1 5 0 5 140 0 0 0 0 0 0\n";
        let after = CpuTimes(parse_proc_stat(stat2));
        let u = after.since(&before);
        assert_eq!(u.len(), 2);
        assert!((u[0].0 - 100.0).abs() < 1e-9 && (u[0].1 - 16.666_666).abs() < 1e-3);
        assert!(u[1].0.abs() < 1e-9);
    }
}
