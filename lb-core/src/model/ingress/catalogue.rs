//! Every ingress-nginx Ingress annotation xlb knows of (names after the prefix, as
//! ingress-nginx's annotation reference lists them) and what the L7 hop does with it.
//! The translation and the migration report (`lb-agent ingress check`) both read this
//! one list, so the report cannot claim what the hop does not do.

/// What the L7 hop does with one annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Read and applied with ingress-nginx's semantics and default.
    Honoured,
    /// Not read, and the result is the same as ingress-nginx's (why).
    Same(&'static str),
    /// Not read, and requests are served differently from ingress-nginx (why).
    Differs(&'static str),
    /// The Ingress is not served while it carries this annotation (why).
    Refused(&'static str),
}

const SNIPPET: &str = "raw nginx configuration written by Ingress authors: xlb is not nginx, \
    and snippets (which could read the controller's Secrets, CVE-2021-25742 and \
    CVE-2025-1974) were the security debt that ended ingress-nginx; the Ingress is not \
    served until the annotation is removed";
const BUFFERING: &str = "the hop streams bodies instead of buffering them in nginx buffers";
const AUTH_NO_CACHE: &str = "the hop asks the auth service on every request: no cached \
    answer, so a revoked session ends at once; the service sees every request";
const AUTH_NO_KEEPALIVE: &str = "the hop opens a connection per check (ingress-nginx's default); \
    the answers are the same";
const UNSUPPORTED: &str = "not supported by xlb";
const NGINX_ONLY: &str = "an nginx module or log setting with no counterpart in xlb";

/// Known annotations, by name after the prefix.
const CATALOGUE: &[(&str, Support)] = &[
    ("ssl-redirect", Support::Honoured),
    ("force-ssl-redirect", Support::Honoured),
    ("proxy-body-size", Support::Honoured),
    ("rewrite-target", Support::Honoured),
    ("use-regex", Support::Honoured),
    ("app-root", Support::Honoured),
    ("permanent-redirect", Support::Honoured),
    ("permanent-redirect-code", Support::Honoured),
    ("temporal-redirect", Support::Honoured),
    ("temporal-redirect-code", Support::Honoured),
    ("x-forwarded-prefix", Support::Honoured),
    ("upstream-vhost", Support::Honoured),
    ("preserve-trailing-slash", Support::Differs(UNSUPPORTED)),
    ("from-to-www-redirect", Support::Differs(UNSUPPORTED)),
    ("server-alias", Support::Differs(UNSUPPORTED)),
    ("enable-cors", Support::Honoured),
    ("cors-allow-origin", Support::Honoured),
    ("cors-allow-methods", Support::Honoured),
    ("cors-allow-headers", Support::Honoured),
    ("cors-allow-credentials", Support::Honoured),
    ("cors-max-age", Support::Honoured),
    ("cors-expose-headers", Support::Honoured),
    ("whitelist-source-range", Support::Honoured),
    ("allowlist-source-range", Support::Honoured),
    ("denylist-source-range", Support::Honoured),
    ("canary", Support::Honoured),
    ("canary-weight", Support::Honoured),
    ("canary-weight-total", Support::Honoured),
    ("canary-by-header", Support::Honoured),
    ("canary-by-header-value", Support::Honoured),
    ("canary-by-header-pattern", Support::Honoured),
    ("canary-by-cookie", Support::Honoured),
    ("affinity", Support::Honoured),
    ("affinity-mode", Support::Honoured),
    ("affinity-canary-behavior", Support::Differs(UNSUPPORTED)),
    ("session-cookie-name", Support::Honoured),
    ("session-cookie-path", Support::Honoured),
    ("session-cookie-domain", Support::Differs(UNSUPPORTED)),
    ("session-cookie-max-age", Support::Honoured),
    ("session-cookie-expires", Support::Honoured),
    ("session-cookie-samesite", Support::Honoured),
    ("session-cookie-secure", Support::Differs(UNSUPPORTED)),
    (
        "session-cookie-conditional-samesite-none",
        Support::Differs(UNSUPPORTED),
    ),
    (
        "session-cookie-change-on-failure",
        Support::Differs(UNSUPPORTED),
    ),
    ("upstream-hash-by", Support::Differs(UNSUPPORTED)),
    (
        "load-balance",
        Support::Differs("use xlb.dev/load-balance (round-robin or least-request)"),
    ),
    ("proxy-connect-timeout", Support::Honoured),
    ("proxy-read-timeout", Support::Honoured),
    ("proxy-send-timeout", Support::Honoured),
    ("proxy-next-upstream", Support::Differs(UNSUPPORTED)),
    ("proxy-next-upstream-timeout", Support::Differs(UNSUPPORTED)),
    ("proxy-next-upstream-tries", Support::Differs(UNSUPPORTED)),
    ("client-body-buffer-size", Support::Same(BUFFERING)),
    ("proxy-buffering", Support::Same(BUFFERING)),
    ("proxy-buffer-size", Support::Same(BUFFERING)),
    ("proxy-buffers-number", Support::Same(BUFFERING)),
    ("proxy-max-temp-file-size", Support::Same(BUFFERING)),
    ("proxy-request-buffering", Support::Same(BUFFERING)),
    (
        "proxy-http-version",
        Support::Same("the hop speaks HTTP/1.1 to backends, nginx's default"),
    ),
    ("enable-access-log", Support::Same(NGINX_ONLY)),
    ("enable-rewrite-log", Support::Same(NGINX_ONLY)),
    ("limit-rps", Support::Honoured),
    ("limit-rpm", Support::Honoured),
    ("limit-connections", Support::Honoured),
    ("limit-burst-multiplier", Support::Honoured),
    ("limit-rate", Support::Differs(UNSUPPORTED)),
    ("limit-rate-after", Support::Differs(UNSUPPORTED)),
    ("limit-whitelist", Support::Differs(UNSUPPORTED)),
    ("limit-allowlist", Support::Differs(UNSUPPORTED)),
    ("auth-url", Support::Honoured),
    ("auth-signin", Support::Honoured),
    ("auth-signin-redirect-param", Support::Honoured),
    ("auth-response-headers", Support::Honoured),
    ("auth-request-redirect", Support::Honoured),
    ("auth-method", Support::Honoured),
    ("auth-always-set-cookie", Support::Honoured),
    ("auth-cache-key", Support::Same(AUTH_NO_CACHE)),
    ("auth-cache-duration", Support::Same(AUTH_NO_CACHE)),
    ("auth-keepalive", Support::Same(AUTH_NO_KEEPALIVE)),
    ("auth-keepalive-requests", Support::Same(AUTH_NO_KEEPALIVE)),
    (
        "auth-keepalive-share-vars",
        Support::Same(AUTH_NO_KEEPALIVE),
    ),
    ("auth-keepalive-timeout", Support::Same(AUTH_NO_KEEPALIVE)),
    (
        "auth-proxy-set-headers",
        Support::Differs(
            "xlb does not read ConfigMaps: these headers are not sent to the auth service",
        ),
    ),
    (
        "enable-global-auth",
        Support::Same("xlb has no global-auth-url, so there is no global check to turn off"),
    ),
    ("auth-type", Support::Honoured),
    ("auth-secret", Support::Honoured),
    ("auth-secret-type", Support::Honoured),
    ("auth-realm", Support::Honoured),
    ("auth-tls-secret", Support::Differs(UNSUPPORTED)),
    ("auth-tls-verify-client", Support::Differs(UNSUPPORTED)),
    ("auth-tls-verify-depth", Support::Differs(UNSUPPORTED)),
    ("auth-tls-error-page", Support::Differs(UNSUPPORTED)),
    (
        "auth-tls-pass-certificate-to-upstream",
        Support::Differs(UNSUPPORTED),
    ),
    ("auth-tls-match-cn", Support::Differs(UNSUPPORTED)),
    ("backend-protocol", Support::Honoured),
    ("proxy-ssl-secret", Support::Honoured),
    ("proxy-ssl-verify", Support::Honoured),
    (
        "proxy-ssl-verify-depth",
        Support::Differs(
            "a backend certificate chaining to ca.crt through any number of \
             intermediates is accepted (nginx's default depth is 1)",
        ),
    ),
    ("proxy-ssl-name", Support::Honoured),
    ("proxy-ssl-server-name", Support::Honoured),
    (
        "proxy-ssl-ciphers",
        Support::Differs("rustls's own cipher suites are used with every backend"),
    ),
    (
        "proxy-ssl-protocols",
        Support::Differs("TLS 1.2 and 1.3 (rustls's safe defaults) with every backend"),
    ),
    ("ssl-passthrough", Support::Honoured),
    ("ssl-ciphers", Support::Differs(UNSUPPORTED)),
    ("ssl-prefer-server-ciphers", Support::Differs(UNSUPPORTED)),
    ("custom-headers", Support::Differs(UNSUPPORTED)),
    ("custom-http-errors", Support::Differs(UNSUPPORTED)),
    (
        "disable-proxy-intercept-errors",
        Support::Differs(UNSUPPORTED),
    ),
    ("default-backend", Support::Differs(UNSUPPORTED)),
    ("service-upstream", Support::Differs(UNSUPPORTED)),
    ("proxy-cookie-domain", Support::Differs(UNSUPPORTED)),
    ("proxy-cookie-path", Support::Differs(UNSUPPORTED)),
    ("proxy-redirect-from", Support::Differs(UNSUPPORTED)),
    ("proxy-redirect-to", Support::Differs(UNSUPPORTED)),
    ("connection-proxy-header", Support::Differs(UNSUPPORTED)),
    ("satisfy", Support::Differs(UNSUPPORTED)),
    ("mirror-target", Support::Differs(UNSUPPORTED)),
    ("mirror-request-body", Support::Differs(UNSUPPORTED)),
    ("mirror-host", Support::Differs(UNSUPPORTED)),
    (
        "http2-push-preload",
        Support::Same("browsers no longer use HTTP/2 push"),
    ),
    ("enable-opentelemetry", Support::Same(NGINX_ONLY)),
    (
        "opentelemetry-trust-incoming-span",
        Support::Same(NGINX_ONLY),
    ),
    (
        "enable-modsecurity",
        Support::Differs("xlb has no web application firewall"),
    ),
    (
        "enable-owasp-core-rules",
        Support::Differs("xlb has no web application firewall"),
    ),
    (
        "modsecurity-transaction-id",
        Support::Differs("xlb has no web application firewall"),
    ),
    ("server-snippet", Support::Refused(SNIPPET)),
    ("configuration-snippet", Support::Refused(SNIPPET)),
    ("stream-snippet", Support::Refused(SNIPPET)),
    ("auth-snippet", Support::Refused(SNIPPET)),
    ("modsecurity-snippet", Support::Refused(SNIPPET)),
];

/// What the hop does with the annotation `name` (after the prefix); one it does not
/// know differs.
pub fn support(name: &str) -> Support {
    CATALOGUE.iter().find(|(known, _)| *known == name).map_or(
        Support::Differs("not an ingress-nginx annotation xlb knows"),
        |(_, s)| *s,
    )
}

/// The names the hop honours, in catalogue order (for docs and tests).
pub fn honoured() -> impl Iterator<Item = &'static str> {
    CATALOGUE
        .iter()
        .filter(|(_, s)| *s == Support::Honoured)
        .map(|(name, _)| *name)
}
