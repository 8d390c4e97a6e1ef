//! ingress-nginx's per-client limits (`limit-rps`, `limit-rpm` with
//! `limit-burst-multiplier`, `limit-connections`): per client address and per Ingress,
//! kept in this instance only (several hop instances each allow the limit, as several
//! ingress-nginx replicas do). Over a limit the request gets a 503, ingress-nginx's
//! default `limit-req-status-code`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lb_core::cluster::ObjectKey;
use lb_core::routes::Limits;

/// Clients tracked at most; past it, idle entries are forgotten first, then (under a
/// flood of distinct addresses) new clients are not tracked and not limited.
const MAX_TRACKED: usize = 65_536;

/// A token bucket: `burst` tokens, refilled at `per_second`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Client {
    rps: Option<Bucket>,
    rpm: Option<Bucket>,
    /// Requests in flight (`limit-connections`).
    active: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
pub struct Limiter {
    clients: Mutex<HashMap<(ObjectKey, IpAddr), Client>>,
}

/// A client over one of its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit;

/// A request counted against `limit-connections` until dropped.
#[derive(Debug, Clone)]
pub struct Slot {
    _held: Arc<SlotInner>,
}

#[derive(Debug)]
struct SlotInner(Arc<AtomicUsize>);

impl Drop for SlotInner {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes one token at `rate` per `period` with `burst` capacity (at least one).
fn take(
    bucket: &mut Option<Bucket>,
    rate: u32,
    period: Duration,
    burst: u32,
    now: Instant,
) -> bool {
    let capacity = f64::from(burst.max(1));
    let b = bucket.get_or_insert(Bucket {
        tokens: capacity,
        at: now,
    });
    let refill = now.duration_since(b.at).as_secs_f64() * f64::from(rate) / period.as_secs_f64();
    b.tokens = (b.tokens + refill).min(capacity);
    b.at = now;
    if b.tokens >= 1.0 {
        b.tokens -= 1.0;
        true
    } else {
        false
    }
}

impl Limiter {
    /// Whether `client` may send one more request to `ingress`'s routes; `Ok` holds its
    /// `limit-connections` slot (if that limit is set).
    pub fn admit(
        &self,
        ingress: &ObjectKey,
        client: IpAddr,
        limits: &Limits,
    ) -> Result<Option<Slot>, OverLimit> {
        self.admit_at(ingress, client.to_canonical(), limits, Instant::now())
    }

    fn admit_at(
        &self,
        ingress: &ObjectKey,
        client: IpAddr,
        limits: &Limits,
        now: Instant,
    ) -> Result<Option<Slot>, OverLimit> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (ingress.clone(), client);
        if !clients.contains_key(&key) && clients.len() >= MAX_TRACKED {
            // Forget clients with nothing in flight whose buckets are full again.
            let idle = Duration::from_mins(1);
            clients.retain(|_, c| {
                let recent = |b: &Option<Bucket>| {
                    b.as_ref().is_some_and(|b| now.duration_since(b.at) < idle)
                };
                c.active.load(Ordering::Relaxed) > 0 || recent(&c.rps) || recent(&c.rpm)
            });
            if clients.len() >= MAX_TRACKED {
                return Ok(None);
            }
        }
        let c = clients.entry(key).or_default();
        let multiplier = limits.burst_multiplier.max(1);
        if let Some(rps) = limits.rps
            && !take(
                &mut c.rps,
                rps,
                Duration::from_secs(1),
                rps.saturating_mul(multiplier),
                now,
            )
        {
            return Err(OverLimit);
        }
        if let Some(rpm) = limits.rpm
            && !take(
                &mut c.rpm,
                rpm,
                Duration::from_mins(1),
                rpm.saturating_mul(multiplier),
                now,
            )
        {
            return Err(OverLimit);
        }
        let Some(max) = limits.connections else {
            return Ok(None);
        };
        if c.active.load(Ordering::Relaxed) >= max as usize {
            return Err(OverLimit);
        }
        c.active.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Slot {
            _held: Arc::new(SlotInner(Arc::clone(&c.active))),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: Option<u32>, rpm: Option<u32>, connections: Option<u32>, burst: u32) -> Limits {
        Limits {
            rps,
            rpm,
            connections,
            burst_multiplier: burst,
        }
    }

    #[test]
    fn rps_allows_the_burst_then_the_rate() {
        let l = Limiter::default();
        let ing = ObjectKey::new("shop", "api");
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let t0 = Instant::now();
        let lim = limits(Some(2), None, None, 5);
        let admitted = (0..20)
            .filter(|_| l.admit_at(&ing, ip, &lim, t0).is_ok())
            .count();
        assert_eq!(admitted, 10, "burst = rps x multiplier");
        // One second later: two more tokens.
        let t1 = t0 + Duration::from_secs(1);
        let admitted = (0..20)
            .filter(|_| l.admit_at(&ing, ip, &lim, t1).is_ok())
            .count();
        assert_eq!(admitted, 2);
        // Another client and another Ingress have their own buckets.
        let other: IpAddr = "198.51.100.2".parse().unwrap();
        assert!(l.admit_at(&ing, other, &lim, t1).is_ok());
        assert!(
            l.admit_at(&ObjectKey::new("shop", "web"), ip, &lim, t1)
                .is_ok()
        );
        // rpm applies too.
        let lim = limits(None, Some(60), None, 1);
        let admitted = (0..100)
            .filter(|_| l.admit_at(&ing, other, &lim, t1).is_ok())
            .count();
        assert_eq!(admitted, 60);
    }

    #[test]
    fn connections_count_requests_in_flight() {
        let l = Limiter::default();
        let ing = ObjectKey::new("shop", "api");
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        let lim = limits(None, None, Some(2), 5);
        let now = Instant::now();
        let a = l.admit_at(&ing, ip, &lim, now).unwrap();
        let b = l.admit_at(&ing, ip, &lim, now).unwrap();
        assert!(l.admit_at(&ing, ip, &lim, now).is_err());
        drop(a);
        let c = l.admit_at(&ing, ip, &lim, now).unwrap();
        assert!(l.admit_at(&ing, ip, &lim, now).is_err());
        drop((b, c));
        assert!(l.admit_at(&ing, ip, &lim, now).is_ok());
    }
}
