//! wrk against one proxy: the benchmark host name resolved through a hosts file bound
//! over `/etc/hosts` in a private mount namespace (so TLS gets the real SNI and `Host`
//! without touching the machine's files), a Lua script that alternates the two routes and
//! counts every answer that is not a 200 (wrk itself counts only 4xx/5xx), and the output
//! parsed.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use lb_testbed::Netns;

use crate::e2e::load::{self, WrkResult};

/// Requests wrk sends, alternately: one per route.
pub const PATHS: [&str; 2] = ["/", "/api/items"];

/// The line the script's `done` prints.
const NOT_200_LINE: &str = "xlb-bench non-200 responses:";

/// The script: requests prepared once (no per-request formatting), `response` counts in a
/// per-thread global that `done` sums over the threads.
pub fn script() -> String {
    format!(
        r#"-- xlb-bench l7: alternate the routes, count answers that are not 200.
local threads = {{}}
local prepared = {{}}
local n = 0
not200 = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  prepared[1] = wrk.format(nil, "{first}")
  prepared[2] = wrk.format(nil, "{second}")
end

function request()
  n = n + 1
  return prepared[n % 2 + 1]
end

function response(status, headers, body)
  if status ~= 200 then
    not200 = not200 + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("not200")
  end
  io.write(string.format("{NOT_200_LINE} %d\n", total))
end
"#,
        first = PATHS[0],
        second = PATHS[1],
    )
}

/// The body scenario's request body size.
pub const BODY_BYTES: usize = 1024;

/// The body scenario's script: the routes alternated as in [`script`], each request
/// with a [`BODY_BYTES`] body (`wrk.format` adds its `Content-Length`).
pub fn body_script() -> String {
    script()
        .replace(
            "-- xlb-bench l7: alternate the routes",
            "-- xlb-bench l7 body: alternate the routes, each request with a body",
        )
        .replace(
            &format!(r#"wrk.format(nil, "{}")"#, PATHS[0]),
            &format!(r#"wrk.format("GET", "{}", nil, body)"#, PATHS[0]),
        )
        .replace(
            &format!(r#"wrk.format(nil, "{}")"#, PATHS[1]),
            &format!(r#"wrk.format("GET", "{}", nil, body)"#, PATHS[1]),
        )
        .replace(
            "function init(args)\n",
            &format!("function init(args)\n  local body = string.rep(\"x\", {BODY_BYTES})\n"),
        )
}

/// The annotations scenario's requests: both to the rewritten regex route, with the
/// allowed `Origin`, one kept on the main backend and one sent to the canary.
pub const ANNOTATED_PATH: &str = "/app/items";
pub const ORIGIN: &str = "https://shop.example.com";

/// The annotations scenario's script: alternates `X-Canary: never` and `always`, and
/// counts an answer that is not a 200 or lacks the CORS header for the origin.
pub fn annotations_script() -> String {
    format!(
        r#"-- xlb-bench l7 annotations: canary header both ways, CORS checked.
local threads = {{}}
local prepared = {{}}
local n = 0
not200 = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  prepared[1] = wrk.format("GET", "{ANNOTATED_PATH}", {{ ["Origin"] = "{ORIGIN}", ["X-Canary"] = "never" }})
  prepared[2] = wrk.format("GET", "{ANNOTATED_PATH}", {{ ["Origin"] = "{ORIGIN}", ["X-Canary"] = "always" }})
end

function request()
  n = n + 1
  return prepared[n % 2 + 1]
end

function response(status, headers, body)
  local allowed = headers["Access-Control-Allow-Origin"] or headers["access-control-allow-origin"]
  if status ~= 200 or allowed ~= "{ORIGIN}" then
    not200 = not200 + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("not200")
  end
  io.write(string.format("{NOT_200_LINE} %d\n", total))
end
"#
    )
}

/// What one run reported: wrk's figures plus the script's count.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Outcome {
    #[serde(flatten)]
    pub wrk: WrkResult,
    /// Answers that were not `200 OK` (3xx included).
    pub not_200: u64,
    /// Connect, read, write and timeout errors (`wrk.errors` also counts 4xx and 5xx
    /// answers, which `not_200` holds already).
    pub socket_errors: u64,
}

impl Outcome {
    /// Socket errors and non-200 answers over the requests wrk completed (1.0 when none).
    pub fn failure_share(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "request counts")]
        let bad = (self.socket_errors + self.not_200) as f64;
        #[expect(clippy::cast_precision_loss, reason = "request counts")]
        let total = self.wrk.requests as f64;
        if total == 0.0 { 1.0 } else { bad / total }
    }
}

/// One wrk run against `url` (`http(s)://HOST/`), with `hosts` bound over `/etc/hosts`.
pub struct Wrk<'a> {
    pub url: &'a str,
    pub hosts: &'a Path,
    pub script: &'a Path,
    pub threads: u32,
    pub connections: u32,
    pub secs: u32,
    /// `Connection: close`: a new connection per request.
    pub close: bool,
    /// CPUs for taskset (`0`, `0,1`); none = not pinned.
    pub cpus: Option<&'a str>,
}

impl Wrk<'_> {
    /// The whole command line (what `ip netns exec CLIENT` runs).
    pub fn command(&self) -> Vec<String> {
        let hosts = self.hosts.display().to_string();
        let mut args: Vec<String> = lb_testbed::hosts_file_launcher(&hosts)
            .map(str::to_owned)
            .into();
        if let Some(cpus) = self.cpus {
            args.extend(["taskset".to_owned(), "-c".to_owned(), cpus.to_owned()]);
        }
        args.extend([
            "wrk".to_owned(),
            format!("-t{}", self.threads),
            format!("-c{}", self.connections),
            format!("-d{}s", self.secs),
            "--latency".to_owned(),
            "-s".to_owned(),
            self.script.display().to_string(),
        ]);
        if self.close {
            args.extend(["-H".to_owned(), "Connection: close".to_owned()]);
        }
        args.push(self.url.to_owned());
        args
    }

    /// Runs wrk in `client`, killed if it runs 30 s past its duration.
    pub fn run(&self, client: &Netns) -> Result<Outcome> {
        let command = self.command();
        let rest: Vec<&str> = command[1..].iter().map(String::as_str).collect();
        let out = client.exec_with_timeout(
            &command[0],
            &rest,
            Duration::from_secs(u64::from(self.secs) + 30),
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        tracing::debug!(%stdout, "wrk's output");
        parse(&stdout)
    }
}

/// wrk's report (see [`load::parse_wrk`]) and the script's non-200 line, which must be
/// there: without it nothing checked the status codes.
pub fn parse(out: &str) -> Result<Outcome> {
    let wrk = load::parse_wrk(out)?;
    let count = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    let Some(not_200) = count(NOT_200_LINE) else {
        bail!("wrk's output lacks the script's `{NOT_200_LINE} N` line:\n{out}");
    };
    let non_2xx_3xx = count("Non-2xx or 3xx responses:").unwrap_or(0);
    Ok(Outcome {
        socket_errors: wrk.errors.saturating_sub(non_2xx_3xx),
        wrk,
        not_200,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real run of this benchmark (HTTPS keep-alive through nginx, 2 s, debug build).
    const SAMPLE: &str = "\
Running 2s test @ https://bench.example.com/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    16.71ms   14.42ms  80.53ms   66.14%
    Req/Sec     3.90k     1.88k    8.42k    80.00%
  Latency Distribution
     50%   15.09ms
     75%   23.74ms
     90%   35.30ms
     99%   64.00ms
  8037 requests in 2.06s, 1.21MB read
Requests/sec:   3907.20
Transfer/sec:    602.87KB
xlb-bench non-200 responses: 0
";

    /// The body script is the routes script with every request carrying the body: a
    /// replacement that missed would leave a request without it.
    #[test]
    fn the_body_script_sends_the_body_on_both_routes() {
        let body = body_script();
        assert!(
            body.contains(r#"local body = string.rep("x", 1024)"#),
            "{body}"
        );
        for path in PATHS {
            assert!(body.contains(&format!(r#"wrk.format("GET", "{path}", nil, body)"#)));
        }
        assert!(!body.contains("wrk.format(nil"), "{body}");
        assert!(body.contains(NOT_200_LINE));
    }

    #[test]
    fn a_real_wrk_report_is_parsed() {
        let r = parse(SAMPLE).unwrap();
        assert!((r.wrk.requests_per_sec - 3907.2).abs() < 1e-9);
        assert_eq!(r.wrk.requests, 8037);
        assert!((r.wrk.p50_ms - 15.09).abs() < 1e-9);
        assert!((r.wrk.p99_ms - 64.0).abs() < 1e-9);
        assert_eq!((r.wrk.errors, r.not_200), (0, 0));
        assert!(r.failure_share() < 1e-9);
    }

    #[test]
    fn non_200_answers_and_errors_count_as_failures() {
        // Two of the three non-200 answers were 5xx, which wrk counts too: not twice.
        let out = "  Latency Distribution\n     50%  1.00ms\n     99%    2.50ms\n  \
                   200 requests in 1.00s, 1.00MB read\n  \
                   Socket errors: connect 0, read 1, write 0, timeout 0\n  \
                   Non-2xx or 3xx responses: 2\n\
                   Requests/sec:    200.00\nxlb-bench non-200 responses: 3\n";
        let r = parse(out).unwrap();
        assert_eq!(r.not_200, 3);
        assert_eq!((r.wrk.errors, r.socket_errors), (3, 1));
        assert!((r.failure_share() - 0.02).abs() < 1e-12);
        assert!((r.wrk.p99_ms - 2.5).abs() < 1e-12);
        // No script line: the status codes were not checked, so the run is not trusted.
        let unchecked = out.replace("xlb-bench non-200 responses: 3\n", "");
        assert!(parse(&unchecked).is_err());
        assert!(parse("unable to connect to bench.example.com:443 Connection refused").is_err());
    }

    #[test]
    fn command_line() {
        let wrk = Wrk {
            url: "https://bench.example.com/",
            hosts: Path::new("/tmp/h"),
            script: Path::new("/tmp/s.lua"),
            threads: 1,
            connections: 64,
            secs: 10,
            close: true,
            cpus: Some("0"),
        };
        assert_eq!(
            wrk.command()[7..].join(" "),
            "/tmp/h taskset -c 0 wrk -t1 -c64 -d10s --latency -s /tmp/s.lua -H Connection: close https://bench.example.com/"
        );
        let script = script();
        assert!(script.contains(r#"wrk.format(nil, "/api/items")"#));
        assert!(script.contains(NOT_200_LINE));
    }
}
