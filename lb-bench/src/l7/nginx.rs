//! The baseline: nginx from the Debian package, configured by the benchmark as an
//! ingress controller would configure it for the same Ingress (a server for the host, the
//! same Prefix routes, keep-alive upstream pools, the forwarded headers xlb adds, TLS with
//! the same certificate, HTTP/2 on TLS), run with `daemon off` in the proxy namespace and
//! stopped by PID: the master, then any worker that outlived it.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_testbed::Netns;

use super::Route;

/// Where the benchmark looks for the binary (Debian's path) before `PATH`.
const NGINX: &str = "/usr/sbin/nginx";
/// Requests per keep-alive connection (client and upstream side). nginx's default of
/// 1000 would make wrk reconnect every 1000 requests, which xlb does not ask for.
const KEEPALIVE_REQUESTS: u32 = 1_000_000;
/// Idle upstream connections kept per worker and upstream.
const UPSTREAM_KEEPALIVE: u32 = 256;

/// What the generated configuration serves.
pub struct Config<'a> {
    pub workers: usize,
    pub address: IpAddr,
    pub http_port: u16,
    pub https_port: u16,
    pub host: &'a str,
    pub routes: &'a [Route],
    pub cert: &'a Path,
    pub key: &'a Path,
    /// nginx's prefix: pid file, logs, temporary files.
    pub prefix: &'a Path,
    /// `listen ... deferred` (`TCP_DEFER_ACCEPT`), as xlb's hop listens.
    pub deferred: bool,
}

impl Config<'_> {
    /// `nginx.conf`. Each Kubernetes Prefix path `/p` becomes `location = /p` and
    /// `location /p/` (nginx's plain prefix would also match `/pother`); `/` is
    /// `location /`. Unknown hosts get a 404, as from xlb.
    pub fn render(&self) -> String {
        let prefix = self.prefix.display();
        let mut c = String::new();
        let w = &mut c;
        let _ = writeln!(w, "# Written by xlb-bench l7.");
        let _ = writeln!(w, "daemon off;");
        let _ = writeln!(w, "master_process on;");
        let _ = writeln!(w, "worker_processes {};", self.workers);
        let _ = writeln!(w, "pid {prefix}/nginx.pid;");
        let _ = writeln!(w, "error_log {prefix}/error.log warn;");
        // Connections per worker; the file limit is inherited (nginx may not raise it).
        let _ = writeln!(w, "events {{\n    worker_connections 16384;\n}}");
        let _ = writeln!(w, "http {{");
        let _ = writeln!(w, "    access_log off;");
        for dir in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            let _ = writeln!(w, "    {dir}_temp_path {prefix}/{dir}_temp;");
        }
        let _ = writeln!(w, "    keepalive_requests {KEEPALIVE_REQUESTS};");
        let _ = writeln!(w, "    ssl_certificate {};", self.cert.display());
        let _ = writeln!(w, "    ssl_certificate_key {};", self.key.display());
        let _ = writeln!(w, "    ssl_protocols TLSv1.2 TLSv1.3;");
        let _ = writeln!(w, "    ssl_session_cache shared:SSL:10m;");
        let _ = writeln!(w, "    proxy_http_version 1.1;");
        for (name, value) in [
            ("Connection", "\"\""),
            ("Host", "$host"),
            ("X-Real-IP", "$remote_addr"),
            ("X-Forwarded-For", "$proxy_add_x_forwarded_for"),
            ("X-Forwarded-Host", "$host"),
            ("X-Forwarded-Port", "$server_port"),
            ("X-Forwarded-Proto", "$scheme"),
            ("X-Request-ID", "$request_id"),
        ] {
            let _ = writeln!(w, "    proxy_set_header {name} {value};");
        }
        for route in self.routes {
            let _ = writeln!(w, "    upstream {} {{", route.upstream);
            for endpoint in &route.endpoints {
                let _ = writeln!(w, "        server {endpoint};");
            }
            let _ = writeln!(w, "        keepalive {UPSTREAM_KEEPALIVE};");
            let _ = writeln!(w, "        keepalive_requests {KEEPALIVE_REQUESTS};");
            let _ = writeln!(w, "    }}");
        }
        let listen = |w: &mut String, default: &str| {
            let http = SocketAddr::new(self.address, self.http_port);
            let https = SocketAddr::new(self.address, self.https_port);
            let _ = writeln!(w, "        listen {http}{default};");
            // `listen ... http2` is what nginx 1.22 (Debian 12) knows; later versions
            // also accept it (with a note that `http2 on` is the new spelling).
            let _ = writeln!(w, "        listen {https} ssl http2{default};");
        };
        let _ = writeln!(w, "    server {{");
        // Socket options go on one `listen` per address, the default server's.
        listen(
            w,
            if self.deferred {
                " default_server deferred"
            } else {
                " default_server"
            },
        );
        let _ = writeln!(w, "        server_name _;");
        let _ = writeln!(w, "        return 404 \"no route\\n\";");
        let _ = writeln!(w, "    }}");
        let _ = writeln!(w, "    server {{");
        listen(w, "");
        let _ = writeln!(w, "        server_name {};", self.host);
        for route in self.routes {
            let target = format!("proxy_pass http://{};", route.upstream);
            if route.path == "/" {
                let _ = writeln!(w, "        location / {{ {target} }}");
            } else {
                let path = route.path.trim_end_matches('/');
                let _ = writeln!(w, "        location = {path} {{ {target} }}");
                let _ = writeln!(w, "        location {path}/ {{ {target} }}");
            }
        }
        let _ = writeln!(w, "    }}");
        self.render_annotated(w, &listen);
        let _ = writeln!(w, "}}");
        c
    }

    /// The annotations scenario's host as ingress-nginx renders its Ingresses
    /// (`xlb::manifests`): a regex location (`use-regex`) with `rewrite ... break`
    /// (`rewrite-target: /$2`), `allow`/`deny all` (`allowlist-source-range`), its CORS
    /// block (`enable-cors`, `cors-allow-origin`, ingress-nginx's default methods,
    /// headers, credentials and max age), and the canary by header, which
    /// ingress-nginx decides in Lua per request and is a `$http_x_canary` test here.
    /// The first route's upstream is the main backend, the second's the canary.
    fn render_annotated(&self, w: &mut String, listen: &dyn Fn(&mut String, &str)) {
        let [main, canary] =
            [0, 1].map(|i| self.routes.get(i).map_or("none", |r| r.upstream.as_str()));
        let _ = writeln!(w, "    server {{");
        listen(w, "");
        let _ = writeln!(w, "        server_name {};", super::ANNOTATED_HOST);
        let _ = writeln!(w, "        location ~* \"^/app(/|$)(.*)\" {{");
        let _ = writeln!(w, "            set $annotated_upstream {main};");
        let _ = writeln!(
            w,
            "            if ($http_x_canary = \"always\") {{ set $annotated_upstream {canary}; }}"
        );
        let _ = writeln!(w, "            allow {};", super::ALLOWED_CLIENTS);
        let _ = writeln!(w, "            deny all;");
        let _ = writeln!(
            w,
            "            if ($http_origin ~* ((https://shop\\.example\\.com))$) {{ set $cors 'true'; }}"
        );
        let _ = writeln!(
            w,
            "            if ($request_method = 'OPTIONS') {{ set $cors ${{cors}}options; }}"
        );
        let _ = writeln!(w, "            if ($cors = \"true\") {{");
        for (name, value) in [
            ("Access-Control-Allow-Origin", "$http_origin"),
            ("Access-Control-Allow-Credentials", "true"),
            (
                "Access-Control-Allow-Methods",
                "\"GET, PUT, POST, DELETE, PATCH, OPTIONS\"",
            ),
            (
                "Access-Control-Allow-Headers",
                "\"DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,\
                 Cache-Control,Content-Type,Range,Authorization\"",
            ),
            ("Access-Control-Max-Age", "1728000"),
        ] {
            let _ = writeln!(w, "                add_header {name} {value} always;");
        }
        let _ = writeln!(w, "            }}");
        let _ = writeln!(w, "            rewrite \"(?i)/app(/|$)(.*)\" /$2 break;");
        let _ = writeln!(w, "            proxy_pass http://$annotated_upstream;");
        let _ = writeln!(w, "        }}");
        let _ = writeln!(w, "    }}");
    }
}

/// The nginx binary: Debian's path, else the first `nginx` on `PATH`.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from(NGINX))
        .chain(std::env::split_paths(&path).map(|d| d.join("nginx")))
        .find(|p| p.is_file())
}

/// A running nginx (master and workers) in a namespace.
pub struct Nginx<'a> {
    ns: &'a Netns,
    master: u32,
    prefix: PathBuf,
}

impl<'a> Nginx<'a> {
    /// Checks the configuration (`nginx -t`), starts nginx in `ns` (through `launcher`,
    /// e.g. taskset) and waits until its workers run and it listens on `listen`.
    pub fn start(
        ns: &'a Netns,
        launcher: &[String],
        config: &Config<'_>,
        listen: &[SocketAddr],
    ) -> Result<Self> {
        let binary =
            binary().context("nginx is not installed (cargo xtask bench l7 installs it)")?;
        let binary = binary.display().to_string();
        std::fs::create_dir_all(config.prefix)?;
        let conf = config.prefix.join("nginx.conf");
        std::fs::write(&conf, config.render())
            .with_context(|| format!("writing {}", conf.display()))?;
        let (conf, prefix) = (
            conf.display().to_string(),
            config.prefix.display().to_string(),
        );
        let error_log = format!("{prefix}/error.log");
        let args = ["-p", &prefix, "-e", &error_log, "-c", &conf];
        let test = ns.exec(&binary, &[&args[..], &["-t", "-q"]].concat());
        if let Err(e) = test {
            bail!("nginx rejects the generated {conf}: {e:#}");
        }
        let mut command: Vec<&str> = launcher.iter().map(String::as_str).collect();
        command.push(&binary);
        command.extend(args);
        let log = std::fs::File::create(config.prefix.join("stderr.log"))?;
        let master = ns.spawn_with_output(command[0], &command[1..], Stdio::null(), log.into())?;
        let nginx = Nginx {
            ns,
            master,
            prefix: config.prefix.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = ns.try_wait(master)? {
                bail!("nginx exited at start ({status}):\n{}", nginx.log());
            }
            let workers = children(master).len();
            if workers == config.workers && listen.iter().all(|a| listening(ns, *a)) {
                return Ok(nginx);
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx did not start {} workers listening on {listen:?} within 10 s \
                     ({workers} workers):\n{}",
                    config.workers,
                    nginx.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.master];
        pids.extend(children(self.master));
        pids
    }

    /// nginx's error log and stderr so far.
    pub fn log(&self) -> String {
        ["error.log", "stderr.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.prefix.join(f)).unwrap_or_default())
            .collect::<String>()
    }
}

impl Drop for Nginx<'_> {
    /// SIGTERM (fast shutdown: the master stops its workers), then SIGKILL by PID for
    /// whatever is left after 3 s; workers are killed before the master is reaped, since
    /// a worker outlives a SIGKILLed master.
    fn drop(&mut self) {
        let workers = children(self.master);
        signal(self.master, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline
            && !matches!(self.ns.try_wait(self.master), Ok(Some(_)) | Err(_))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in workers.into_iter().chain(children(self.master)) {
            signal(pid, libc::SIGKILL);
        }
        // Kills (if still running) and reaps the master.
        let _ = self.ns.kill(self.master);
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a PID we started (or its worker) and a valid signal.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// PIDs whose parent is `parent`, from `/proc/*/stat`.
pub fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parent_pid(&s))
                == Some(parent)
        })
        .collect()
}

/// The parent PID from a `/proc/PID/stat` line (`pid (comm) state ppid ...`; comm may
/// hold spaces and parentheses, so read after the last `)`).
fn parent_pid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether a TCP socket listens on `addr` in `ns` (`ss -Hltn src ADDR`).
fn listening(ns: &Netns, addr: SocketAddr) -> bool {
    ns.exec("ss", &["-Hltn", "src", &addr.to_string()])
        .is_ok_and(|out| !out.stdout.is_empty())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn config_serves_the_ingress_routes() {
        let routes = [
            Route {
                path: "/".into(),
                upstream: "web".into(),
                endpoints: vec!["192.0.2.11:8080".parse().unwrap()],
            },
            Route {
                path: "/api".into(),
                upstream: "api".into(),
                endpoints: vec![
                    "192.0.2.12:8080".parse().unwrap(),
                    "192.0.2.13:8080".parse().unwrap(),
                ],
            },
        ];
        let config = Config {
            workers: 2,
            address: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10)),
            http_port: 80,
            https_port: 443,
            host: "bench.example.com",
            routes: &routes,
            cert: Path::new("/t/cert.pem"),
            key: Path::new("/t/key.pem"),
            prefix: Path::new("/t/nginx"),
            deferred: false,
        };
        let text = config.render();
        for line in [
            "worker_processes 2;",
            "pid /t/nginx/nginx.pid;",
            "    ssl_certificate /t/cert.pem;",
            "    proxy_set_header Connection \"\";",
            "    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "    upstream api {\n        server 192.0.2.12:8080;\n        server 192.0.2.13:8080;\n        keepalive 256;",
            "        listen 203.0.113.10:80 default_server;\n        listen 203.0.113.10:443 ssl http2 default_server;",
            "        server_name bench.example.com;",
            "        location / { proxy_pass http://web; }",
            // Kubernetes Prefix: /api and /api/..., never /apix.
            "        location = /api { proxy_pass http://api; }\n        location /api/ { proxy_pass http://api; }",
            // The annotations scenario's host, as ingress-nginx renders it.
            "        server_name annotated.example.com;\n        location ~* \"^/app(/|$)(.*)\" {",
            "            if ($http_x_canary = \"always\") { set $annotated_upstream api; }",
            "            allow 198.51.100.0/24;\n            deny all;",
            "                add_header Access-Control-Allow-Origin $http_origin always;",
            "            rewrite \"(?i)/app(/|$)(.*)\" /$2 break;\n            proxy_pass http://$annotated_upstream;",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("location /api {"), "{text}");
        assert_eq!(text.matches('{').count(), text.matches('}').count());

        // `deferred` on the one `listen` per address that may carry socket options.
        assert!(!text.contains("deferred"), "{text}");
        let deferred = Config {
            deferred: true,
            ..config
        }
        .render();
        assert!(
            deferred.contains(
                "        listen 203.0.113.10:80 default_server deferred;\n        \
                 listen 203.0.113.10:443 ssl http2 default_server deferred;"
            ),
            "{deferred}"
        );
        assert_eq!(deferred.matches("deferred").count(), 2, "{deferred}");
    }

    #[test]
    fn parent_pid_from_stat() {
        assert_eq!(
            parent_pid("4242 (nginx: worker) S 4241 4241 1 0 -1"),
            Some(4241)
        );
        assert_eq!(parent_pid("7 (a) b) R 1 7"), Some(1));
        assert_eq!(parent_pid("garbage"), None);
    }
}
