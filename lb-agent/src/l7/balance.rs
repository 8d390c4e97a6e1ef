//! Endpoint choice per upstream: round robin by default, power of two choices on
//! in-flight requests for least-request. State is keyed by upstream name and endpoint
//! address, so it survives snapshot swaps (a new snapshot with the same endpoints keeps
//! its rotation and in-flight counts).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::routes::Balance;

#[derive(Debug, Default)]
struct UpstreamState {
    next: AtomicUsize,
    in_flight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

#[derive(Debug, Default)]
pub struct Balancer {
    upstreams: Mutex<HashMap<String, Arc<UpstreamState>>>,
}

/// Counts one request in flight on an endpoint until dropped (when the response
/// body ends or the request fails).
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
        let state = {
            let mut map = self
                .upstreams
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match map.get(upstream) {
                Some(state) => Arc::clone(state),
                None => Arc::clone(map.entry(upstream.to_owned()).or_default()),
            }
        };
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
        Some((chosen, InFlight(n)))
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
}
