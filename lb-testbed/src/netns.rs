//! Network namespaces owned by one test: created with a unique name, driven
//! only through `ip -n NAME` / `ip netns exec NAME`, entered per thread, and
//! deleted (with every process started in them) on drop.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::Duration;

use anyhow::{Context, bail};

use super::cmd::{self, CmdLine, TOOL_TIMEOUT};

/// Where `ip netns` keeps its named namespaces (bind mounts of nsfs files).
const NETNS_RUN_DIR: &str = "/run/netns";

/// Prefix of every namespace the testbed creates; nothing else is ever deleted.
const NAME_PREFIX: &str = "xlb-";

/// Longest tag kept verbatim in a namespace name; longer tags are cut and
/// suffixed with a hash so names stay readable yet distinct.
const MAX_TAG_LEN: usize = 40;

/// Linux's `IFNAMSIZ - 1`: interface names longer than this are rejected.
pub const MAX_IFNAME_LEN: usize = 15;

/// Default deadline of [`Netns::exec`]: long enough for a short tool run
/// inside the namespace, short enough that a hung tool fails the test.
pub const EXEC_TIMEOUT: Duration = Duration::from_mins(1);

/// Per-process sequence number: with the PID it makes names unique across the
/// test threads of one process and across processes.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Serialises `ip netns add` within the process: the first call makes
/// `/run/netns` a shared mount point, and concurrent first calls would stack
/// bind mounts.
static ADD_LOCK: Mutex<()> = Mutex::new(());

/// Runs once per process, before its first namespace is created.
static REAP_OWN_PID: Once = Once::new();

/// A network namespace created by the testbed and deleted when dropped.
///
/// Every operation runs inside it (`ip -n NAME`, `ip netns exec NAME`,
/// `setns` on one thread), so the root namespace is never modified.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Background processes from [`Netns::spawn`], killed by PID on drop.
    children: Mutex<Vec<Child>>,
}

impl Netns {
    /// Creates `xlb-<tag>-<pid>-<counter>` with `ip netns add` and brings its
    /// loopback up (services bound to `127.0.0.1` / `::1` in tests need it).
    ///
    /// The tag is reduced to `[A-Za-z0-9_-]` and to at most 40 bytes (longer
    /// tags keep a prefix plus a hash of the whole tag).
    pub fn new(tag: &str) -> anyhow::Result<Netns> {
        super::check_privileges()?;
        // Namespaces named after our PID can only be leftovers of an earlier
        // process with the same PID that was killed before cleaning up; they
        // would collide with the names this process is about to use.
        REAP_OWN_PID.call_once(|| {
            if let Err(e) = remove_namespaces_where(|pid| pid == std::process::id()) {
                tracing::warn!(error = %format!("{e:#}"), "cannot remove stale namespaces");
            }
        });
        let tag = sanitize_tag(tag);
        let name = {
            let _lock = lock_ignoring_poison(&ADD_LOCK);
            let mut attempts = 0;
            loop {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                let name = format!("{NAME_PREFIX}{tag}-{}-{n}", std::process::id());
                if !Path::new(NETNS_RUN_DIR).join(&name).exists() {
                    let line = CmdLine::new("ip", ["netns", "add", name.as_str()]);
                    cmd::run_checked(&line, TOOL_TIMEOUT)?;
                    break name;
                }
                attempts += 1;
                if attempts >= 16 {
                    bail!("cannot find a free namespace name for tag {tag:?}");
                }
            }
        };
        // From here on, dropping `ns` deletes the namespace, also on error.
        let ns = Netns {
            name,
            children: Mutex::new(Vec::new()),
        };
        ns.ip(&["link", "set", "dev", "lo", "up"])?;
        tracing::debug!(netns = %ns.name, "created");
        Ok(ns)
    }

    /// A new namespace with the addresses of the L7 proxy tests on `lo`: the
    /// proxy's 203.0.113.1, the client's 198.51.100.1 and the backends'
    /// 192.0.2.1 to 192.0.2.3.
    pub fn with_l7_test_addresses(tag: &str) -> anyhow::Result<Netns> {
        let ns = Netns::new(tag)?;
        for addr in [
            "203.0.113.1/32",
            "198.51.100.1/32",
            "192.0.2.1/32",
            "192.0.2.2/32",
            "192.0.2.3/32",
        ] {
            ns.ip(&["addr", "add", addr, "dev", "lo"])
                .context("add address")?;
        }
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` and `/run/netns` know it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args...` and returns its stdout; errors carry the
    /// command line and stderr.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let line = CmdLine::new(
            "ip",
            ["-n", self.name.as_str()]
                .into_iter()
                .chain(args.iter().copied()),
        );
        let out = cmd::run_checked(&line, TOOL_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip netns exec NAME program args...` with a deadline of
    /// [`EXEC_TIMEOUT`]; a non-zero exit is an error.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.exec_with_timeout(program, args, EXEC_TIMEOUT)
    }

    /// [`Netns::exec`] with an explicit deadline (the program is killed and an
    /// error returned when it is exceeded), for longer tools such as load
    /// generators.
    pub fn exec_with_timeout(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        cmd::run_checked(&self.exec_line(program, args), timeout)
    }

    fn exec_line(&self, program: &str, args: &[&str]) -> CmdLine {
        CmdLine::new(
            "ip",
            ["netns", "exec", self.name.as_str(), program]
                .into_iter()
                .chain(args.iter().copied()),
        )
    }

    /// Sets a sysctl of this namespace (`net.*` keys are per namespace) via
    /// `ip netns exec NAME sysctl -qw key=value`.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        if key.is_empty() || key.contains(['=', ' ', '/']) {
            bail!("invalid sysctl key {key:?}");
        }
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Starts `program args...` in the background inside the namespace and
    /// returns its PID. The process is tracked and killed by PID (SIGKILL,
    /// then reaped) when the namespace is dropped. Its stdout and stderr are
    /// discarded; see [`Netns::spawn_with_output`] to keep them.
    ///
    /// Started with `nsenter --net=/run/netns/NAME`, which replaces itself with the
    /// program, so the PID is the program's own (processes it forks are not
    /// tracked). Unlike `ip netns exec` it keeps the host's mounts: `ip netns exec`
    /// mounts a fresh /sys, which hides the bpffs at /sys/fs/bpf that the agent
    /// pins to.
    pub fn spawn(&self, program: &str, args: &[&str]) -> anyhow::Result<u32> {
        self.spawn_with_output(program, args, Stdio::null(), Stdio::null())
    }

    /// [`Netns::spawn`] with the caller's choice of stdout and stderr (e.g. a
    /// log file, or `Stdio::inherit()` while debugging).
    pub fn spawn_with_output(
        &self,
        program: &str,
        args: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> anyhow::Result<u32> {
        let netns_path = format!("--net=/run/netns/{}", self.name);
        let line = CmdLine::new(
            "nsenter",
            [netns_path.as_str(), "--", program]
                .into_iter()
                .chain(args.iter().copied()),
        );
        let mut children = lock_ignoring_poison(&self.children);
        let child = line
            .command()
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        let pid = child.id();
        tracing::debug!(netns = %self.name, pid, command = %line, "spawned");
        children.push(child);
        Ok(pid)
    }

    /// Kills (SIGKILL) and reaps a process started by [`Netns::spawn`], e.g.
    /// to restart an agent mid-test. Only PIDs this namespace started are
    /// accepted.
    pub fn kill(&self, pid: u32) -> anyhow::Result<()> {
        let mut children = lock_ignoring_poison(&self.children);
        let Some(pos) = children.iter().position(|c| c.id() == pid) else {
            bail!("pid {pid} was not spawned in netns {}", self.name);
        };
        let mut child = children.swap_remove(pos);
        drop(children);
        cmd::kill_and_reap(&mut child, &format_args!("pid {pid} in {}", self.name));
        Ok(())
    }

    /// Whether a process started by [`Netns::spawn`] has exited, and with what status
    /// (reaping it); `None` while it runs. Only PIDs this namespace started are
    /// accepted.
    pub fn try_wait(&self, pid: u32) -> anyhow::Result<Option<ExitStatus>> {
        let mut children = lock_ignoring_poison(&self.children);
        let Some(child) = children.iter_mut().find(|c| c.id() == pid) else {
            bail!("pid {pid} was not spawned in netns {}", self.name);
        };
        child
            .try_wait()
            .with_context(|| format!("waiting for pid {pid} in {}", self.name))
    }

    /// Moves the current thread (only this thread: `setns` is per thread)
    /// into the namespace until the guard is dropped, so sockets created
    /// meanwhile belong to it. Sockets keep their namespace afterwards and can
    /// be used from any thread.
    pub fn enter(&self) -> anyhow::Result<NetnsGuard<'_>> {
        // Taken first, so the guard can always return to where we were.
        let previous = File::open("/proc/thread-self/ns/net")
            .context("cannot open /proc/thread-self/ns/net")?;
        let path = Path::new(NETNS_RUN_DIR).join(&self.name);
        let target =
            File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        setns_net(&target).with_context(|| format!("setns into netns {}", self.name))?;
        Ok(NetnsGuard {
            previous,
            netns: self,
            _not_send: PhantomData,
        })
    }

    /// Runs `f` on a new thread that has entered the namespace, waits for it
    /// and returns its result; a panic in `f` is resumed on the caller. The
    /// caller's thread never changes namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, || -> anyhow::Result<T> {
                    let _guard = self.enter()?;
                    Ok(f())
                })
                .context("cannot start a thread")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs the future `body` makes on a current-thread tokio runtime, on a thread that
    /// entered the namespace (so every socket it opens belongs here), for at most
    /// `deadline`.
    pub fn block_on<F: Future>(
        &self,
        deadline: Duration,
        body: impl FnOnce() -> F + Send,
    ) -> anyhow::Result<F::Output>
    where
        F::Output: Send,
    {
        self.run_in(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            runtime
                .block_on(async { tokio::time::timeout(deadline, body()).await })
                .map_err(|_| {
                    anyhow::anyhow!("exceeded its deadline of {deadline:?} in {}", self.name)
                })
        })?
    }

    /// The interface index of `ifname` inside this namespace (what XDP
    /// attachment and devmaps use), from `ip -n NAME -j link show dev IF`.
    pub fn ifindex(&self, ifname: &str) -> anyhow::Result<u32> {
        let json = self.ip(&["-j", "link", "show", "dev", ifname])?;
        let links: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("cannot parse `ip -j link` output {json:?}"))?;
        links
            .get(0)
            .and_then(|link| link.get("ifindex"))
            .and_then(serde_json::Value::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| format!("no ifindex for {ifname} in netns {}: {json}", self.name))
    }
}

impl Drop for Netns {
    /// Kills the processes started here, then deletes the namespace. Never
    /// panics (it also runs while a failed test unwinds); problems are logged.
    fn drop(&mut self) {
        let children = std::mem::take(
            self.children
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for mut child in children {
            let pid = child.id();
            cmd::kill_and_reap(&mut child, &format_args!("pid {pid} in {}", self.name));
        }
        let line = CmdLine::new("ip", ["netns", "del", self.name.as_str()]);
        match cmd::run_checked(&line, TOOL_TIMEOUT) {
            Ok(_) => tracing::debug!(netns = %self.name, "deleted"),
            Err(e) => {
                tracing::warn!(netns = %self.name, error = %format!("{e:#}"), "cannot delete netns");
            }
        }
    }
}

/// Proof that the current thread is inside a [`Netns`]; dropping it moves the
/// thread back to the namespace it was in before [`Netns::enter`].
///
/// Not `Send`: the namespace belongs to the thread that entered it.
#[derive(Debug)]
pub struct NetnsGuard<'a> {
    /// `/proc/thread-self/ns/net` as it was before entering.
    previous: File,
    netns: &'a Netns,
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard<'_> {
    /// The namespace this thread is in while the guard lives.
    pub fn netns(&self) -> &Netns {
        self.netns
    }
}

impl Drop for NetnsGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns_net(&self.previous) {
            tracing::warn!(
                netns = %self.netns.name,
                error = %e,
                "cannot return the thread to its previous netns"
            );
        }
    }
}

fn setns_net(ns: &File) -> io::Result<()> {
    // SAFETY: `ns` is an open nsfs file for the duration of the call, and
    // setns(2) only changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A launcher (a command that ends by running its arguments) that runs them
/// with the file `hosts` bind-mounted over `/etc/hosts` in a private mount
/// namespace, so that names resolve to testbed addresses for that command
/// alone (e.g. the L7 agent's backends, wrk's target host).
pub fn hosts_file_launcher(hosts: &str) -> [&str; 8] {
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount --bind "$0" /etc/hosts && exec "$@""#,
        hosts,
    ]
}

/// Makes a veth end run NAPI, so frames XDP-redirected into its peer are received
/// rather than dropped. GRO must be switched *on while the device is up* for the
/// kernel to start NAPI: "on" when ethtool already shows it on is a no-op, and
/// enslaving a port to a bridge can leave it without. So: off, then on.
pub fn enable_napi(ns: &Netns, ifname: &str) -> anyhow::Result<()> {
    ns.exec("ethtool", &["-K", ifname, "gro", "off"])?;
    ns.exec("ethtool", &["-K", ifname, "gro", "on"])?;
    Ok(())
}

/// Creates a veth pair: `a_if` in `a`, its peer `b_if` created directly in
/// `b` (never in the root namespace), both with MTU 1500 and up.
///
/// On both ends TX checksum offload is turned off (frames redirected by XDP
/// must carry full checksums, as from a real NIC) and GRO is turned on (an
/// `XDP_REDIRECT` into a veth is dropped unless its peer runs NAPI); see
/// TOOLCHAIN.md, "XDP on veth in test namespaces".
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> anyhow::Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    a.ip(&[
        "link", "add", a_if, "mtu", "1500", "type", "veth", "peer", "name", b_if, "mtu", "1500",
        "netns", &b.name,
    ])?;
    let configure = || -> anyhow::Result<()> {
        for (ns, ifname) in [(a, a_if), (b, b_if)] {
            ns.exec("ethtool", &["-K", ifname, "tx", "off"])?;
            ns.ip(&["link", "set", "dev", ifname, "up"])?;
            enable_napi(ns, ifname)?;
        }
        Ok(())
    };
    configure().inspect_err(|_| {
        // Deleting one end deletes the pair; the namespaces stay usable.
        if let Err(e) = a.ip(&["link", "del", "dev", a_if]) {
            tracing::warn!(error = %format!("{e:#}"), "cannot delete half-configured veth");
        }
    })
}

/// Rejects names the kernel would refuse, with a clearer message.
fn check_ifname(ifname: &str) -> anyhow::Result<()> {
    if ifname.is_empty()
        || ifname.len() > MAX_IFNAME_LEN
        || ifname == "."
        || ifname == ".."
        || ifname.contains(['/', ':'])
        || ifname.chars().any(char::is_whitespace)
    {
        bail!(
            "invalid interface name {ifname:?} (1..={MAX_IFNAME_LEN} bytes, no '/', ':' or spaces)"
        );
    }
    Ok(())
}

/// Makes a tag safe for a namespace name: `[A-Za-z0-9_-]` only, at most
/// [`MAX_TAG_LEN`] bytes; a longer tag keeps a prefix and a hash of the whole
/// tag, so distinct long tags stay distinct.
fn sanitize_tag(tag: &str) -> String {
    let clean: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = if clean.is_empty() {
        "ns".to_owned()
    } else {
        clean
    };
    if clean.len() <= MAX_TAG_LEN {
        return clean;
    }
    // FNV-1a, written out so names do not depend on std's hasher.
    let hash = tag.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}-{:08x}", &clean[..MAX_TAG_LEN - 9], hash & 0xffff_ffff)
}

/// The PID embedded in a testbed namespace name (`xlb-<tag>-<pid>-<n>`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let counter = parts.next()?;
    let pid = parts.next()?;
    let tag = parts.next()?;
    if tag.is_empty() || counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Names of the testbed namespaces (`xlb-…`) that currently exist.
pub fn testbed_namespaces() -> anyhow::Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(format!("cannot list {NETNS_RUN_DIR}")),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.with_context(|| format!("cannot list {NETNS_RUN_DIR}"))?;
        if let Some(name) = entry.file_name().to_str()
            && owner_pid(name).is_some()
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Deletes testbed namespaces left behind by processes that no longer exist
/// (e.g. a test run killed by a CI timeout before its destructors ran).
/// Returns the names deleted.
///
/// Liveness is judged by PID in this process's PID namespace: do not call it
/// where testbed users in other PID namespaces share `/run/netns`.
pub fn remove_stale_namespaces() -> anyhow::Result<Vec<String>> {
    remove_namespaces_where(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

fn remove_namespaces_where(stale: impl Fn(u32) -> bool) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in testbed_namespaces()? {
        if owner_pid(&name).is_some_and(&stale) {
            let line = CmdLine::new("ip", ["netns", "del", name.as_str()]);
            cmd::run_checked(&line, TOOL_TIMEOUT)?;
            tracing::info!(netns = %name, "removed stale testbed namespace");
            removed.push(name);
        }
    }
    Ok(removed)
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_sanitized_and_bounded() {
        assert_eq!(sanitize_tag("e2e_tcp-v4"), "e2e_tcp-v4");
        assert_eq!(sanitize_tag("a b/c.d"), "a-b-c-d");
        assert_eq!(sanitize_tag(""), "ns");
        let long_a = sanitize_tag(&"x".repeat(100));
        let long_b = sanitize_tag(&format!("{}y", "x".repeat(99)));
        assert_eq!(long_a.len(), MAX_TAG_LEN);
        assert_eq!(long_b.len(), MAX_TAG_LEN);
        assert_ne!(long_a, long_b);
    }

    #[test]
    fn owner_pid_parses_only_testbed_names() {
        assert_eq!(owner_pid("xlb-e2e-v4-1234-7"), Some(1234));
        assert_eq!(owner_pid("xlb-lb-42-0"), Some(42));
        assert_eq!(owner_pid("xlb-1234-7"), None);
        assert_eq!(owner_pid("other-e2e-1234-7"), None);
        assert_eq!(owner_pid("xlb-e2e-abc-7"), None);
        assert_eq!(owner_pid("xlb-e2e-1234-x"), None);
    }

    #[test]
    fn ifnames_are_checked() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("p39").is_ok());
        assert!(check_ifname("fifteen-bytes-x").is_ok());
        assert!(check_ifname("sixteen-bytes-xx").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
    }
}
