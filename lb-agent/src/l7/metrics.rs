//! The L7 hop's counters (`xlb_l7_*`): one sink every answer and failure goes through,
//! so each branch of the request path is visible.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];

#[derive(Debug, Clone)]
pub struct Metrics {
    /// Answers by status class (`2xx` .. `5xx`), backend and proxy answers alike.
    requests: Family<Labels, Counter>,
    /// Answers the proxy made itself, by reason (`no_route`, `body_too_large`, ...).
    local_answers: Family<Labels, Counter>,
    /// Client connections the proxy cut, by reason (`header_timeout`, `idle_timeout`,
    /// `tls_handshake`, `headers_too_large`, `protocol`).
    closed: Family<Labels, Counter>,
    /// Failures talking to a backend, by reason (`connect`, `timeout`, `dns`, ...).
    upstream_errors: Family<Labels, Counter>,
    /// Second attempts after a connect failure.
    retries: Counter,
    /// Endpoints ejected after a connect failure (a failed probe of an ejected one is
    /// not counted again).
    ejections: Counter,
    /// Accepted client connections by listener (`http`, `https`).
    connections: Family<Labels, Counter>,
    /// Upgraded (WebSocket and other) connections tunneled to a backend.
    upgrades: Counter,
    /// `requests`' counters by class, `1xx` first, looked up once: every answer
    /// counts, and the family's lookup (lock, hash) showed per request.
    by_class: [Counter; 5],
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<Labels, Counter>::default();
        let by_class = CLASSES.map(|class| requests.get_or_create(&[("code", class)]).clone());
        Metrics {
            requests,
            local_answers: Family::default(),
            closed: Family::default(),
            upstream_errors: Family::default(),
            retries: Counter::default(),
            ejections: Counter::default(),
            connections: Family::default(),
            upgrades: Counter::default(),
            by_class,
        }
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(
            "l7_requests",
            "HTTP answers by status class",
            m.requests.clone(),
        );
        registry.register(
            "l7_local_answers",
            "Requests the proxy answered itself instead of a backend, by reason",
            m.local_answers.clone(),
        );
        registry.register(
            "l7_connections_closed",
            "Client connections the proxy closed, by reason",
            m.closed.clone(),
        );
        registry.register(
            "l7_upstream_errors",
            "Failures talking to backends, by reason",
            m.upstream_errors.clone(),
        );
        registry.register(
            "l7_retries",
            "Requests retried on another endpoint after a connect failure",
            m.retries.clone(),
        );
        registry.register(
            "l7_ejections",
            "Endpoints ejected from balancing after a connect failure",
            m.ejections.clone(),
        );
        registry.register(
            "l7_connections",
            "Accepted client connections by listener",
            m.connections.clone(),
        );
        registry.register(
            "l7_upgrades",
            "Upgraded connections tunneled to backends",
            m.upgrades.clone(),
        );
        m
    }

    pub fn answered(&self, status: hyper::StatusCode) {
        let class = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.by_class[class].inc();
    }

    pub fn local_answer(&self, reason: &'static str) {
        self.local_answers
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn upstream_error(&self, reason: &'static str) {
        self.upstream_errors
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn ejected(&self) {
        self.ejections.inc();
    }

    /// The accepted-connections counter of `listener`, which its accept loop keeps
    /// (no label lookup per connection).
    pub fn accepted(&self, listener: &'static str) -> Counter {
        self.connections
            .get_or_create(&[("listener", listener)])
            .clone()
    }

    pub fn upgraded(&self) {
        self.upgrades.inc();
    }

    #[cfg(test)]
    pub fn local_answer_count(&self, reason: &'static str) -> u64 {
        self.local_answers
            .get_or_create(&[("reason", reason)])
            .get()
    }

    #[cfg(test)]
    pub fn closed_count(&self, reason: &'static str) -> u64 {
        self.closed.get_or_create(&[("reason", reason)]).get()
    }

    #[cfg(test)]
    pub fn retries_count(&self) -> u64 {
        self.retries.get()
    }

    #[cfg(test)]
    pub fn ejections_count(&self) -> u64 {
        self.ejections.get()
    }

    #[cfg(test)]
    pub fn upgrades_count(&self) -> u64 {
        self.upgrades.get()
    }

    #[cfg(test)]
    pub fn upstream_error_count(&self, reason: &'static str) -> u64 {
        self.upstream_errors
            .get_or_create(&[("reason", reason)])
            .get()
    }
}
