//! Endpoint choice per upstream: round robin by default, power of two choices on
//! in-flight requests for least-request. State is keyed by upstream name and endpoint
//! address, so it survives snapshot swaps (a new snapshot with the same endpoints keeps
//! its rotation and in-flight counts).
//!
//! Passive ejection: an endpoint that fails a connect is skipped for a back-off that
//! starts at [`FIRST_BACKOFF`] and doubles on each failed probe up to [`MAX_BACKOFF`].
//! Once the back-off has run out, the next pick that would choose it is its probe
//! (one at a time: the probe re-arms the back-off without doubling it, in case the
//! probing request goes away): a successful connect brings it back, a failed one doubles
//! the back-off. A change in the upstream's endpoint set (a new EndpointSlice) forgets
//! every ejection. When every candidate is ejected, one is tried anyway (fail open, as
//! nginx forgets `max_fails` when all its peers have failed).

use foldhash::fast::RandomState;
use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::routes::Balance;

/// The first ejection after a connect failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Ejections double up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct UpstreamState {
    next: AtomicUsize,
    in_flight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>, RandomState>>,
    /// Endpoints ejected, so the request path skips the ejection lock when empty.
    ejected_count: AtomicUsize,
    ejected: Mutex<Ejections>,
}

#[derive(Debug, Default)]
struct Ejections {
    /// The endpoint set the ejections were made under (a hash of it).
    endpoints: u64,
    by_addr: HashMap<SocketAddr, Ejection, RandomState>,
}

#[derive(Debug, Clone, Copy)]
struct Ejection {
    /// Skipped until then; afterwards the next pick probes it.
    until: Instant,
    /// The current back-off, doubled when a probe fails.
    backoff: Duration,
}

fn endpoint_set(endpoints: &[SocketAddr]) -> u64 {
    let mut h = DefaultHasher::new();
    endpoints.hash(&mut h);
    h.finish()
}

/// What ejection leaves to choose from.
enum Available<'a> {
    /// An ejected endpoint whose back-off ran out: this pick probes it.
    Probe(SocketAddr),
    /// Balance over these.
    Among(Cow<'a, [SocketAddr]>),
}

impl UpstreamState {
    /// `candidates` without the endpoints ejected at `now`, or the first ejected one
    /// whose back-off ran out (re-armed, so one request at a time probes it). Forgets
    /// every ejection when the endpoint set changed. Fails open: when all are ejected,
    /// all of `candidates` are given back.
    fn available<'a>(
        &self,
        endpoints: &[SocketAddr],
        candidates: Cow<'a, [SocketAddr]>,
        now: Instant,
    ) -> Available<'a> {
        if self.ejected_count.load(Ordering::Relaxed) == 0 {
            return Available::Among(candidates);
        }
        let mut ejected = self.ejected.lock().unwrap_or_else(PoisonError::into_inner);
        if ejected.endpoints != endpoint_set(endpoints) {
            ejected.by_addr.clear();
            self.ejected_count.store(0, Ordering::Relaxed);
            return Available::Among(candidates);
        }
        for addr in candidates.iter() {
            if let Some(e) = ejected.by_addr.get_mut(addr)
                && e.until <= now
            {
                e.until = now + e.backoff;
                return Available::Probe(*addr);
            }
        }
        let live: Vec<SocketAddr> = candidates
            .iter()
            .filter(|addr| !ejected.by_addr.contains_key(addr))
            .copied()
            .collect();
        if live.is_empty() || live.len() == candidates.len() {
            Available::Among(candidates)
        } else {
            Available::Among(Cow::Owned(live))
        }
    }
}

#[derive(Debug, Default)]
pub struct Balancer {
    upstreams: Mutex<HashMap<String, Arc<UpstreamState>, RandomState>>,
}

/// Counts one request in flight on an endpoint until dropped (when the response
/// body ends or the request fails), and reports how connecting to it went.
#[derive(Debug)]
pub struct InFlight {
    count: Arc<AtomicUsize>,
    upstream: Arc<UpstreamState>,
    addr: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// Picks one of `endpoints` not in `exclude` (the endpoints that already failed to
    /// connect for this request). `None`: nothing left to try.
    pub fn pick(
        &self,
        upstream: &str,
        endpoints: &[SocketAddr],
        balance: Balance,
        exclude: &[SocketAddr],
    ) -> Option<(SocketAddr, InFlight)> {
        self.pick_at(upstream, endpoints, balance, exclude, Instant::now())
    }

    /// As [`pick`](Self::pick), but `sticky` (a session-affinity cookie's endpoint)
    /// when it is still a candidate and not ejected.
    pub fn pick_sticky(
        &self,
        upstream: &str,
        endpoints: &[SocketAddr],
        balance: Balance,
        exclude: &[SocketAddr],
        sticky: Option<SocketAddr>,
    ) -> Option<(SocketAddr, InFlight)> {
        self.pick_preferring(
            upstream,
            endpoints,
            balance,
            exclude,
            Instant::now(),
            sticky,
        )
    }

    fn pick_at(
        &self,
        upstream: &str,
        endpoints: &[SocketAddr],
        balance: Balance,
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Option<(SocketAddr, InFlight)> {
        self.pick_preferring(upstream, endpoints, balance, exclude, now, None)
    }

    fn pick_preferring(
        &self,
        upstream: &str,
        endpoints: &[SocketAddr],
        balance: Balance,
        exclude: &[SocketAddr],
        now: Instant,
        prefer: Option<SocketAddr>,
    ) -> Option<(SocketAddr, InFlight)> {
        let state = self.state(upstream);
        let candidates: Cow<'_, [SocketAddr]> = if exclude.is_empty() {
            Cow::Borrowed(endpoints)
        } else {
            endpoints
                .iter()
                .filter(|e| !exclude.contains(e))
                .copied()
                .collect()
        };
        if candidates.is_empty() {
            return None;
        }
        let candidates = match state.available(endpoints, candidates, now) {
            Available::Probe(addr) => Cow::Owned(vec![addr]),
            Available::Among(candidates) => candidates,
        };
        let mut in_flight = state
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Forget endpoints that left and are idle, so the map follows the endpoints
        // (only once enough have left, to keep this off the per-request cost).
        if in_flight.len() > 2 * endpoints.len() + 8 {
            let current: HashSet<&SocketAddr> = endpoints.iter().collect();
            in_flight.retain(|addr, n| current.contains(addr) || n.load(Ordering::Relaxed) > 0);
        }
        let mut count = |addr: SocketAddr| Arc::clone(in_flight.entry(addr).or_default());
        let chosen = match balance {
            _ if let Some(p) = prefer.filter(|p| candidates.contains(p)) => p,
            Balance::RoundRobin => {
                candidates[state.next.fetch_add(1, Ordering::Relaxed) % candidates.len()]
            }
            Balance::LeastRequest if candidates.len() == 1 => candidates[0],
            Balance::LeastRequest => {
                let a = rand::random_range(0..candidates.len());
                let mut b = rand::random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                if count(b).load(Ordering::Relaxed) < count(a).load(Ordering::Relaxed) {
                    b
                } else {
                    a
                }
            }
        };
        let n = count(chosen);
        n.fetch_add(1, Ordering::Relaxed);
        Some((
            chosen,
            InFlight {
                count: n,
                upstream: Arc::clone(&state),
                addr: chosen,
            },
        ))
    }

    fn state(&self, upstream: &str) -> Arc<UpstreamState> {
        let mut map = self
            .upstreams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match map.get(upstream) {
            Some(state) => Arc::clone(state),
            None => Arc::clone(map.entry(upstream.to_owned()).or_default()),
        }
    }
}

impl InFlight {
    /// The connect to this endpoint succeeded: it is no longer ejected.
    pub fn connected(&self) {
        let state = &self.upstream;
        if state.ejected_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut ejected = state.ejected.lock().unwrap_or_else(PoisonError::into_inner);
        if ejected.by_addr.remove(&self.addr).is_some() {
            state
                .ejected_count
                .store(ejected.by_addr.len(), Ordering::Relaxed);
        }
    }

    /// The connect to this endpoint failed: ejects it for [`FIRST_BACKOFF`], or twice
    /// its last back-off if it was ejected already (a failed probe). `endpoints` is the
    /// upstream's current set. Returns whether it was not ejected before (the counter).
    pub fn connect_failed(&self, endpoints: &[SocketAddr]) -> bool {
        self.connect_failed_at(endpoints, Instant::now())
    }

    fn connect_failed_at(&self, endpoints: &[SocketAddr], now: Instant) -> bool {
        let state = &self.upstream;
        let mut ejected = state.ejected.lock().unwrap_or_else(PoisonError::into_inner);
        let set = endpoint_set(endpoints);
        if ejected.endpoints != set {
            ejected.by_addr.clear();
            ejected.endpoints = set;
        }
        let previous = ejected.by_addr.get(&self.addr).map(|e| e.backoff);
        let backoff = previous.map_or(FIRST_BACKOFF, |b| (b * 2).min(MAX_BACKOFF));
        ejected.by_addr.insert(
            self.addr,
            Ejection {
                until: now + backoff,
                backoff,
            },
        );
        state
            .ejected_count
            .store(ejected.by_addr.len(), Ordering::Relaxed);
        previous.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_of_departed_endpoints_is_forgotten() {
        let b = Balancer::default();
        for i in 0..100 {
            let eps = [SocketAddr::from(([192, 0, 2, 1], 9000 + i))];
            b.pick("u", &eps, Balance::RoundRobin, &[]).unwrap();
        }
        let map = b.upstreams.lock().unwrap();
        let tracked = map["u"].in_flight.lock().unwrap().len();
        assert!(tracked <= 11, "{tracked} endpoints tracked for 1 current");
    }

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([192, 0, 2, 1], 8000 + i)))
            .collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let b = Balancer::default();
        let eps = addrs(3);
        let picks: Vec<_> = (0..6)
            .map(|_| b.pick("u", &eps, Balance::RoundRobin, &[]).unwrap().0)
            .collect();
        assert_eq!(picks[..3], picks[3..]);
        for e in &eps {
            assert!(picks[..3].contains(e));
        }
    }

    #[test]
    fn exclusion_skips_failed_endpoints() {
        let b = Balancer::default();
        let eps = addrs(2);
        for _ in 0..4 {
            let (e, _) = b.pick("u", &eps, Balance::RoundRobin, &eps[..1]).unwrap();
            assert_eq!(e, eps[1]);
        }
        assert!(b.pick("u", &eps, Balance::LeastRequest, &eps).is_none());
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint_and_releases() {
        let b = Balancer::default();
        let eps = addrs(2);
        let (busy, held) = b.pick("u", &eps, Balance::LeastRequest, &[]).unwrap();
        for _ in 0..20 {
            let (e, _g) = b.pick("u", &eps, Balance::LeastRequest, &[]).unwrap();
            assert_ne!(e, busy);
        }
        drop(held);
        // Both idle now: a busy one on the other side flips the choice.
        let (other, _g2) = b.pick("u", &eps, Balance::LeastRequest, &[]).unwrap();
        let (next, _g3) = b.pick("u", &eps, Balance::LeastRequest, &[]).unwrap();
        assert_ne!(other, next);
    }

    #[test]
    fn a_failed_endpoint_is_ejected_then_probed_after_its_backoff() {
        let b = Balancer::default();
        let eps = addrs(2);
        let t0 = Instant::now();
        let (dead, probe) = b.pick_at("u", &eps, Balance::RoundRobin, &[], t0).unwrap();
        assert!(probe.connect_failed_at(&eps, t0), "a new ejection");
        drop(probe);
        // The retry and every pick during the back-off go elsewhere.
        for _ in 0..6 {
            let (e, _) = b.pick_at("u", &eps, Balance::RoundRobin, &[], t0).unwrap();
            assert_ne!(e, dead);
            let (e, _) = b
                .pick_at("u", &eps, Balance::LeastRequest, &[], t0)
                .unwrap();
            assert_ne!(e, dead);
        }
        // After it, one pick probes it; meanwhile the others still skip it.
        let later = t0 + FIRST_BACKOFF;
        let probed = (0..2)
            .map(|_| {
                b.pick_at("u", &eps, Balance::RoundRobin, &[], later)
                    .unwrap()
            })
            .find(|(e, _)| *e == dead)
            .expect("probed after the back-off")
            .1;
        for _ in 0..4 {
            let (e, _) = b
                .pick_at("u", &eps, Balance::RoundRobin, &[], later)
                .unwrap();
            assert_ne!(e, dead, "one probe at a time");
        }
        // A failed probe doubles the back-off (not counted as a new ejection).
        assert!(!probed.connect_failed_at(&eps, later));
        let skipped = later + FIRST_BACKOFF;
        for _ in 0..4 {
            let (e, _) = b
                .pick_at("u", &eps, Balance::RoundRobin, &[], skipped)
                .unwrap();
            assert_ne!(e, dead, "back-off doubled to 2 s");
        }
        // A successful probe brings it back into the rotation.
        let again = later + 2 * FIRST_BACKOFF;
        let probed = (0..2)
            .map(|_| {
                b.pick_at("u", &eps, Balance::RoundRobin, &[], again)
                    .unwrap()
            })
            .find(|(e, _)| *e == dead)
            .expect("probed after the doubled back-off")
            .1;
        probed.connected();
        drop(probed);
        let picks: Vec<_> = (0..4)
            .map(|_| {
                b.pick_at("u", &eps, Balance::RoundRobin, &[], again)
                    .unwrap()
                    .0
            })
            .collect();
        assert_eq!(picks.iter().filter(|e| **e == dead).count(), 2, "{picks:?}");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let b = Balancer::default();
        let eps = addrs(2);
        let t0 = Instant::now();
        let (dead, g) = b.pick_at("u", &eps, Balance::RoundRobin, &[], t0).unwrap();
        for _ in 0..10 {
            g.connect_failed_at(&eps, t0);
        }
        let state = b.state("u");
        let ejected = state.ejected.lock().unwrap();
        assert_eq!(ejected.by_addr[&dead].backoff, MAX_BACKOFF);
    }

    #[test]
    fn a_new_endpoint_set_forgets_ejections() {
        let b = Balancer::default();
        let eps = addrs(2);
        let t0 = Instant::now();
        let (dead, g) = b.pick_at("u", &eps, Balance::RoundRobin, &[], t0).unwrap();
        g.connect_failed_at(&eps, t0);
        // The same set keeps it ejected; a changed one (a third endpoint) resets it.
        let (e, _) = b.pick_at("u", &eps, Balance::RoundRobin, &[], t0).unwrap();
        assert_ne!(e, dead);
        let more = addrs(3);
        let picks: Vec<_> = (0..3)
            .map(|_| {
                b.pick_at("u", &more, Balance::RoundRobin, &[], t0)
                    .unwrap()
                    .0
            })
            .collect();
        assert!(picks.contains(&dead), "{picks:?}");
    }

    #[test]
    fn fails_open_when_every_endpoint_is_ejected_but_never_repeats_a_failure() {
        let b = Balancer::default();
        let eps = addrs(2);
        let t0 = Instant::now();
        for _ in 0..2 {
            let (_, g) = b.pick_at("u", &eps, Balance::RoundRobin, &[], t0).unwrap();
            g.connect_failed_at(&eps, t0);
        }
        assert_eq!(b.state("u").ejected_count.load(Ordering::Relaxed), 2);
        let (first, _) = b.pick_at("u", &eps, Balance::RoundRobin, &[], t0).unwrap();
        // The retry of a request goes to the other endpoint even though it is ejected.
        let (retry, _) = b
            .pick_at("u", &eps, Balance::RoundRobin, &[first], t0)
            .unwrap();
        assert_ne!(retry, first);
        assert!(
            b.pick_at("u", &eps, Balance::RoundRobin, &eps, t0)
                .is_none()
        );
    }
}
