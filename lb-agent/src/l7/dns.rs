//! ExternalName resolution: `tokio::net::lookup_host` (getaddrinfo, so /etc/hosts and
//! resolv.conf apply), cached per name and re-resolved at most once per interval. A
//! failed re-resolution keeps serving the last good answer (a DNS blip does not take a
//! working route down); a name never resolved fails the request (502).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct Entry {
    addrs: Arc<[SocketAddr]>,
    resolved: Instant,
}

#[derive(Debug)]
pub struct Resolver {
    interval: Duration,
    timeout: Duration,
    cache: Mutex<HashMap<(String, u16), Entry>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot resolve {0}: {1}")]
    Lookup(String, std::io::Error),
    #[error("resolving {0} timed out")]
    Timeout(String),
    #[error("{0} resolved to no addresses")]
    Empty(String),
}

impl Resolver {
    pub fn new(interval: Duration, timeout: Duration) -> Resolver {
        Resolver {
            interval,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The addresses of `host:port`, from the cache while fresh.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Arc<[SocketAddr]>, DnsError> {
        let key = (host.to_owned(), port);
        let stale = {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            match cache.get(&key) {
                Some(e) if e.resolved.elapsed() < self.interval => return Ok(Arc::clone(&e.addrs)),
                Some(e) => Some(Arc::clone(&e.addrs)),
                None => None,
            }
        };
        match self.lookup(host, port).await {
            Ok(addrs) => {
                let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
                cache.insert(
                    key,
                    Entry {
                        addrs: Arc::clone(&addrs),
                        resolved: Instant::now(),
                    },
                );
                Ok(addrs)
            }
            Err(e) => match stale {
                Some(addrs) => {
                    tracing::warn!("{e}; keeping the previous answer");
                    Ok(addrs)
                }
                None => Err(e),
            },
        }
    }

    async fn lookup(&self, host: &str, port: u16) -> Result<Arc<[SocketAddr]>, DnsError> {
        let found = tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| DnsError::Timeout(host.to_owned()))?
            .map_err(|e| DnsError::Lookup(host.to_owned(), e))?;
        let mut addrs: Vec<SocketAddr> = found.collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(DnsError::Empty(host.to_owned()));
        }
        Ok(addrs.into())
    }
}
