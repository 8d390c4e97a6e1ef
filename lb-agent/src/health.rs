//! Active health checks for the standalone agent: a TCP connect or an HTTP/1.1
//! GET per backend every `interval`, with `HAProxy`-style `rise`/`fall`
//! hysteresis, reported as up/down transitions on a channel.
//!
//! - [`Threshold`] is the pure rise/fall state machine.
//! - [`probe`] runs one check against one address.
//! - [`Monitor`] keeps one task per backend that probes it every `interval`,
//!   feeds a [`Threshold`] and sends a [`HealthEvent`] on each transition. It
//!   is generic over the backend key, so it does not depend on the model.
//!
//! # Initial state
//!
//! A backend the agent has never seen starts **up**, as in `HAProxy`: a new
//! configuration forwards at once instead of waiting `rise` intervals, and a
//! backend that is really down is taken out after `fall` failed probes. A
//! backend's state after an agent restart is not this module's business: the
//! caller restores it (e.g. from the pinned data-plane maps) and passes it as
//! the initial state ([`Target::initial_up`]). When a monitored backend's
//! address or check changes, its task restarts with the state it had: a down
//! backend whose check is edited stays down until `rise` new probes pass.
//!
//! Only transitions are reported, never the initial state. Each task probes
//! immediately, then every `interval`; a probe slower than `interval` delays
//! the next one instead of piling up. There is no start-up jitter: probes of
//! many new backends start together.
//!
//! # Probes
//!
//! The probe port is the check's `port` when set, else the backend's port. A
//! TCP probe succeeds when the connection is established within `timeout`.
//! An HTTP probe connects, sends
//!
//! ```text
//! GET {path} HTTP/1.1
//! Host: {host, or the probed address as ip:port}
//! User-Agent: xlb-health/1
//! Connection: close
//! ```
//!
//! and reads until the status line and headers are complete (at most
//! [`MAX_RESPONSE_HEAD`] bytes); it succeeds when the status is within
//! `expect` (inclusive). The body is never read. Connect, send and read
//! together must finish within `timeout`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use lb_core::config::{HealthCheck, Probe};

/// Largest HTTP response head (status line and headers) a probe reads; a
/// longer head fails the probe.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Most headers a response head may have (each takes at least 3 bytes, so a
/// head within [`MAX_RESPONSE_HEAD`] cannot have more).
const MAX_HEADERS: usize = MAX_RESPONSE_HEAD / 3;

/// Value of the probes' `User-Agent` header.
pub const USER_AGENT: &str = "xlb-health/1";

/// Shortest probe interval; shorter (e.g. zero) intervals act as this.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// A backend changed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent<K> {
    pub key: K,
    pub up: bool,
    /// "ok" when it came up; the last probe's failure when it went down.
    pub detail: String,
}

/// What to probe for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub check: HealthCheck,
    /// The state of a key the monitor does not have yet: `true` for a new
    /// backend, or the state restored after an agent restart. Ignored for
    /// keys already monitored.
    pub initial_up: bool,
}

/// One task per monitored backend. Dropping the monitor stops them all.
///
/// An event already queued on the channel is not withdrawn when its key is
/// removed, but once [`Monitor::set_targets`] returns, no task it stopped
/// sends another event.
#[derive(Debug)]
pub struct Monitor<K> {
    events: UnboundedSender<HealthEvent<K>>,
    tasks: BTreeMap<K, Running>,
}

#[derive(Debug)]
struct Running {
    addr: SocketAddr,
    check: HealthCheck,
    state: Arc<Mutex<TaskState>>,
    handle: JoinHandle<()>,
}

/// Shared by a task and the monitor. The task updates `up` and sends its
/// event under the lock, and only while `stopped` is false.
#[derive(Debug)]
struct TaskState {
    up: bool,
    stopped: bool,
}

impl Running {
    /// Stops the task for good; returns its last state.
    fn stop(&self) -> bool {
        let up = {
            let mut state = lock(&self.state);
            state.stopped = true;
            state.up
        };
        self.handle.abort();
        up
    }
}

impl<K> Monitor<K>
where
    K: Clone + Ord + Send + Sync + Debug + 'static,
{
    pub fn new(events: UnboundedSender<HealthEvent<K>>) -> Self {
        Monitor {
            events,
            tasks: BTreeMap::new(),
        }
    }

    /// Makes the monitored set equal to `targets`: starts a task for each new
    /// key (in state [`Target::initial_up`]), stops the tasks of keys that are
    /// gone, and restarts, keeping its state, a key whose address or check
    /// changed. Unchanged keys keep running undisturbed.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (tasks are started with [`tokio::spawn`]).
    pub fn set_targets(&mut self, mut targets: BTreeMap<K, Target>) {
        self.tasks.retain(|key, running| {
            let keep = targets
                .get(key)
                .is_some_and(|t| t.addr == running.addr && t.check == running.check);
            if !keep {
                let up = running.stop();
                if let Some(target) = targets.get_mut(key) {
                    // Changed: restart in the state it had.
                    target.initial_up = up;
                    tracing::debug!(?key, backend = %target.addr, "health check changed");
                } else {
                    tracing::debug!(?key, backend = %running.addr, "health check removed");
                }
            }
            keep
        });
        for (key, target) in targets {
            if !self.tasks.contains_key(&key) {
                let running = self.start(key.clone(), target);
                self.tasks.insert(key, running);
            }
        }
    }

    /// The key's state as last reported, or `None` if it is not monitored.
    pub fn is_up(&self, key: &K) -> Option<bool> {
        self.tasks.get(key).map(|running| lock(&running.state).up)
    }

    fn start(&self, key: K, target: Target) -> Running {
        let state = Arc::new(Mutex::new(TaskState {
            up: target.initial_up,
            stopped: false,
        }));
        let handle = tokio::spawn(watch(
            key,
            target.addr,
            target.check.clone(),
            state.clone(),
            self.events.clone(),
        ));
        Running {
            addr: target.addr,
            check: target.check,
            state,
            handle,
        }
    }
}

impl<K> Drop for Monitor<K> {
    fn drop(&mut self) {
        for running in self.tasks.values() {
            running.stop();
        }
    }
}

/// One backend's task: probe, judge, report transitions; until stopped.
async fn watch<K: Clone + Debug>(
    key: K,
    addr: SocketAddr,
    check: HealthCheck,
    state: Arc<Mutex<TaskState>>,
    events: UnboundedSender<HealthEvent<K>>,
) {
    let initial_up = lock(&state).up;
    let mut threshold = Threshold::new(initial_up, check.rise, check.fall);
    let mut ticks = tokio::time::interval(check.interval.max(MIN_INTERVAL));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = probe(addr, &check).await;
        if let Err(failure) = &result {
            tracing::debug!(?key, backend = %addr, %failure, "health probe failed");
        }
        let Some(up) = threshold.observe(result.is_ok()) else {
            continue;
        };
        let detail = match result {
            Ok(()) => "ok".to_owned(),
            Err(failure) => failure.to_string(),
        };
        let mut state = lock(&state);
        if state.stopped {
            return;
        }
        state.up = up;
        if up {
            tracing::info!(?key, backend = %addr, "backend up");
        } else {
            tracing::warn!(?key, backend = %addr, %detail, "backend down");
        }
        // A closed channel only means nobody listens any more; `is_up` still
        // serves the state.
        let _ = events.send(HealthEvent {
            key: key.clone(),
            up,
            detail,
        });
        drop(state);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Rise/fall hysteresis: a healthy backend goes down after `fall` consecutive
/// failed probes, an unhealthy one comes back after `rise` consecutive
/// successes. An observation that agrees with the current state resets the
/// opposite streak, so a single success between failures keeps a backend up.
///
/// `rise` and `fall` of 0 act as 1 (every transition needs at least one
/// observation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    up: bool,
    rise: u32,
    fall: u32,
    /// Consecutive observations so far that contradict `up`.
    streak: u32,
}

impl Threshold {
    pub fn new(up: bool, rise: u32, fall: u32) -> Self {
        Threshold {
            up,
            rise: rise.max(1),
            fall: fall.max(1),
            streak: 0,
        }
    }

    /// Feeds one probe result; returns the new state if it changed.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }

    pub fn is_up(&self) -> bool {
        self.up
    }
}

/// Why a probe failed; the `Display` text is short enough for a log line or an
/// event's detail (e.g. "connect: connection refused").
#[derive(Debug, thiserror::Error)]
pub enum ProbeFailure {
    #[error("connect: {}", brief(.0))]
    Connect(io::Error),
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("send: {}", brief(.0))]
    Send(io::Error),
    #[error("receive: {}", brief(.0))]
    Receive(io::Error),
    #[error("connection closed before a complete HTTP response head")]
    Closed,
    #[error("HTTP response head larger than {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
    #[error("malformed HTTP response")]
    Malformed,
    #[error("HTTP status {status} not in {}-{}", .expect.0, .expect.1)]
    Status { status: u16, expect: (u16, u16) },
    /// The check's path or host would not make a valid request line or
    /// header (config validation should have refused it).
    #[error("invalid HTTP health check: {0}")]
    InvalidRequest(&'static str),
}

/// An I/O error as "connection refused" rather than
/// "Connection refused (os error 111)".
fn brief(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match e.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text),
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => e.kind().to_string(),
    }
}

/// Runs `check` once against `target` (its port is replaced by `check.port`
/// when that is set).
pub async fn probe(target: SocketAddr, check: &HealthCheck) -> Result<(), ProbeFailure> {
    let addr = SocketAddr::new(target.ip(), check.port.unwrap_or(target.port()));
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(ProbeFailure::Connect)?;
        match &check.probe {
            Probe::Tcp => Ok(()),
            Probe::Http { path, host, expect } => {
                let request = http_request(addr, path, host.as_deref())?;
                http_exchange(stream, &request, *expect).await
            }
        }
    };
    tokio::time::timeout(check.timeout, attempt)
        .await
        .unwrap_or(Err(ProbeFailure::Timeout(check.timeout)))
}

/// The probe's request bytes.
fn http_request(addr: SocketAddr, path: &str, host: Option<&str>) -> Result<String, ProbeFailure> {
    let bad = |s: &str| s.is_empty() || s.bytes().any(|b| b <= b' ' || b == 0x7f);
    if bad(path) || !path.starts_with('/') {
        return Err(ProbeFailure::InvalidRequest(
            "path must start with '/' and have no spaces or control characters",
        ));
    }
    let host = match host {
        Some(h) if bad(h) => {
            return Err(ProbeFailure::InvalidRequest(
                "host must be non-empty and have no spaces or control characters",
            ));
        }
        Some(h) => h.to_owned(),
        None => addr.to_string(),
    };
    Ok(format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n"
    ))
}

/// Sends `request` and judges the response's status.
async fn http_exchange(
    mut stream: TcpStream,
    request: &str,
    expect: (u16, u16),
) -> Result<(), ProbeFailure> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeFailure::Send)?;
    let mut buf = vec![0; MAX_RESPONSE_HEAD];
    let mut len = 0;
    let status = loop {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(ProbeFailure::Receive)?;
        if n == 0 {
            return Err(ProbeFailure::Closed);
        }
        len += n;
        if let Some(status) = parse_status(&buf[..len])? {
            break status;
        }
        if len == buf.len() {
            return Err(ProbeFailure::TooLarge);
        }
    };
    if (expect.0..=expect.1).contains(&status) {
        Ok(())
    } else {
        Err(ProbeFailure::Status { status, expect })
    }
}

/// The status code once `head` holds a complete status line and headers;
/// `None` while more bytes are needed.
fn parse_status(head: &[u8]) -> Result<Option<u16>, ProbeFailure> {
    // Health endpoints send few headers: try a small array on the stack first.
    let mut few = [httparse::EMPTY_HEADER; 32];
    match parse_with(head, &mut few) {
        Err(httparse::Error::TooManyHeaders) => {
            parse_with(head, &mut vec![httparse::EMPTY_HEADER; MAX_HEADERS])
        }
        parsed => parsed,
    }
    .map_err(|_| ProbeFailure::Malformed)
}

fn parse_with<'b>(
    head: &'b [u8],
    headers: &mut [httparse::Header<'b>],
) -> Result<Option<u16>, httparse::Error> {
    let mut response = httparse::Response::new(headers);
    Ok(match response.parse(head)? {
        httparse::Status::Complete(_) => response.code,
        httparse::Status::Partial => None,
    })
}

#[cfg(test)]
mod tests;
