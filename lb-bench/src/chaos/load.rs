//! The chaos benchmark's traffic, run in the client namespace until told to stop: new
//! TCP connections to the L4 VIP at a fixed rate (one `GET /` each, `Connection:
//! close`), and keep-alive connections to the L7 hop, each sending `GET /` one after
//! another at a fixed pace and reconnecting after a failure. Every request becomes a
//! [`Sample`] stamped with its start since a shared epoch, so the caller can cut windows
//! around what it did. Bounded: the rate, the number of requests in flight and a
//! timeout per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{MissedTickBehavior, timeout};

/// A request that has no complete answer after this failed: more than the hop's
/// connect timeout (5 s) plus a retry, so a slow answer is measured, not cut off.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// New L4 connections in flight at most (bounds the stream when the VIP stalls).
const MAX_IN_FLIGHT: u32 = 512;
/// Between two requests on one keep-alive connection.
const KEEPALIVE_PACE: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new connection through the XDP VIP.
    L4,
    /// A request on a keep-alive connection to the L7 hop.
    L7,
}

/// One request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub kind: Kind,
    /// When it started, since the epoch.
    pub at: Duration,
    pub latency: Duration,
    /// The backend that answered (`backend-N`), or `None` when it failed.
    pub backend: Option<u8>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.backend.is_some()
    }
}

/// What to send.
#[derive(Clone)]
pub struct Plan {
    pub vip: SocketAddr,
    pub hop: SocketAddr,
    /// The Host the L7 requests name.
    pub host: &'static str,
    /// New L4 connections per second.
    pub rate: u32,
    /// Keep-alive connections to the hop.
    pub keepalive: usize,
    pub epoch: Instant,
    pub stop: Arc<AtomicBool>,
}

type Samples = Arc<Mutex<Vec<Sample>>>;

fn record(samples: &Samples, sample: Sample) {
    samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(sample);
}

/// Sends until `plan.stop` is set, then waits for the requests in flight.
pub async fn run(plan: Plan) -> Vec<Sample> {
    let samples: Samples = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..plan.keepalive {
        tasks.push(tokio::spawn(keepalive(plan.clone(), Arc::clone(&samples))));
    }
    tasks.push(tokio::spawn(new_connections(plan, Arc::clone(&samples))));
    for task in tasks {
        let _ = task.await;
    }
    let mut all = std::mem::take(
        &mut *samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    all.sort_by_key(|s| s.at);
    all
}

async fn new_connections(plan: Plan, samples: Samples) {
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rate)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while !plan.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        let (samples, vip, epoch) = (Arc::clone(&samples), plan.vip, plan.epoch);
        tokio::spawn(async move {
            let start = Instant::now();
            let backend = timeout(REQUEST_TIMEOUT, once(vip))
                .await
                .ok()
                .and_then(Result::ok);
            record(
                &samples,
                Sample {
                    kind: Kind::L4,
                    at: start.saturating_duration_since(epoch),
                    latency: start.elapsed(),
                    backend,
                },
            );
            drop(permit);
        });
    }
    let _ = limit.acquire_many(MAX_IN_FLIGHT).await;
}

/// One connection, one request, read to the close.
async fn once(vip: SocketAddr) -> std::io::Result<u8> {
    let mut stream = TcpStream::connect(vip).await?;
    let request = format!("GET / HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no complete head"))?;
    answered_by(head, body)
}

/// The backend index of a `200` answer whose body is `backend-N`.
fn answered_by(head: &str, body: &str) -> std::io::Result<u8> {
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "answered {}",
            head.lines().next().unwrap_or_default()
        )));
    }
    body.trim()
        .strip_prefix("backend-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("body {body:?}")))
}

async fn keepalive(plan: Plan, samples: Samples) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !plan.stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let result = timeout(REQUEST_TIMEOUT, request(&mut conn, plan.hop, plan.host)).await;
        let backend = if let Ok(Ok(backend)) = result {
            Some(backend)
        } else {
            conn = None;
            None
        };
        record(
            &samples,
            Sample {
                kind: Kind::L7,
                at: start.saturating_duration_since(plan.epoch),
                latency: start.elapsed(),
                backend,
            },
        );
        tokio::time::sleep(KEEPALIVE_PACE).await;
    }
}

/// One `GET /` for `host` to the hop on a new connection: the backend that answered.
pub async fn l7_once(hop: SocketAddr, host: &str) -> std::io::Result<u8> {
    match timeout(REQUEST_TIMEOUT, request(&mut None, hop, host)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// One `GET /` on the keep-alive connection (opened first when there is none); leaves
/// `conn` empty when the hop closes it.
async fn request(
    conn: &mut Option<BufReader<TcpStream>>,
    hop: SocketAddr,
    host: &str,
) -> std::io::Result<u8> {
    if conn.is_none() {
        *conn = Some(BufReader::new(TcpStream::connect(hop).await?));
    }
    let stream = conn.as_mut().expect("just opened");
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    stream.get_mut().write_all(request.as_bytes()).await?;
    let mut head = String::new();
    loop {
        let before = head.len();
        if stream.read_line(&mut head).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if &head[before..] == "\r\n" {
            break;
        }
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("head too long"));
        }
    }
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other("no Content-Length"))?;
    let mut body = vec![0; length.min(64 * 1024)];
    stream.read_exact(&mut body).await?;
    if header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        *conn = None;
    }
    answered_by(&head, &String::from_utf8_lossy(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_200_from_a_named_backend_is_the_only_success() {
        assert_eq!(
            answered_by("HTTP/1.1 200 OK\r\nContent-Length: 10", "backend-2\n").unwrap(),
            2
        );
        assert!(answered_by("HTTP/1.1 502 Bad Gateway", "backend-2\n").is_err());
        assert!(answered_by("HTTP/1.1 200 OK", "hello").is_err());
    }
}
