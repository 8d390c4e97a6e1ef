//! A route's authentication before it is forwarded, as ingress-nginx renders it into
//! nginx: a denied route (a broken `auth-*` annotation or Secret) answers 503; basic
//! authentication (`auth_basic`) answers 401 with `WWW-Authenticate`; the external
//! check (`auth_request` to `auth-url`) is a body-less request whose 2xx lets the
//! request on, whose 401 and 403 are the answer (401 becomes a 302 to `auth-signin`
//! when set), and whose anything else (or no answer) is a 500.
//!
//! The check goes to the route of the hop itself when its host is one the hop serves
//! (the oauth2-proxy pattern's `https://$host/oauth2/auth`), else to the URL's host by
//! DNS, over TLS for `https://`. One connection per check, as ingress-nginx without
//! `auth-keepalive`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::dns::Resolver;
use super::headers::{new_request_id, strip_hop_by_hop};
use super::htpasswd;
use super::routes::auth::{BasicAuth, ExternalAuth, escape_uri, expand};
use super::routes::{Policy, RouteTable, Target};
use super::upstream::Body;

/// What the request looks like to nginx's variables.
pub struct Seen<'a> {
    /// The request's authority as the client sent it (`$http_host`).
    pub authority: &'a str,
    /// `http` or `https` (`$scheme`).
    pub scheme: &'static str,
    pub peer: SocketAddr,
    /// Path and query (`$request_uri`).
    pub uri: &'a str,
}

/// The outcome: forward (with what the check granted) or answer now.
pub enum Verdict {
    Forward(Granted),
    /// Answered here, counted under the reason.
    Answer(&'static str, Response<Body>),
}

/// What a passed check adds: headers for the backend, cookies for the client.
#[derive(Default)]
pub struct Granted {
    /// `auth-response-headers`: name and the check's value (none: removed).
    upstream: Vec<(HeaderName, Vec<HeaderValue>)>,
    /// The check's `Set-Cookie` values.
    cookies: Vec<HeaderValue>,
    always_set_cookie: bool,
    /// Basic authentication passed: `Authorization` is not forwarded (ingress-nginx
    /// clears it).
    clear_authorization: bool,
}

impl Granted {
    /// On the backend's request head.
    pub fn to_backend(&self, headers: &mut HeaderMap) {
        if self.clear_authorization {
            headers.remove(header::AUTHORIZATION);
        }
        for (name, values) in &self.upstream {
            headers.remove(name);
            for v in values {
                headers.append(name.clone(), v.clone());
            }
        }
    }

    /// On the client's answer: the check's cookies, on 2xx and 3xx answers only
    /// (nginx's `add_header`) unless `auth-always-set-cookie`.
    pub fn to_client(&self, status: StatusCode, headers: &mut HeaderMap) {
        if self.always_set_cookie || adds_headers(status) {
            for c in &self.cookies {
                headers.append(header::SET_COOKIE, c.clone());
            }
        }
    }
}

/// The statuses nginx's `add_header` (without `always`) applies to.
fn adds_headers(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 201 | 204 | 206 | 301 | 302 | 303 | 304 | 307 | 308
    )
}

/// Sends external checks; one per proxy.
pub struct Checker {
    tls: tokio_rustls::TlsConnector,
}

impl Checker {
    /// With the system's trust roots for `https://` checks outside the hop.
    pub fn new() -> Checker {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!("system trust roots: {e}");
        }
        let (added, _) = roots.add_parsable_certificates(found.certs);
        tracing::debug!("{added} system trust roots for auth-url checks");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            .map_or_else(
                |e| {
                    tracing::warn!("TLS for auth-url checks: {e}");
                    None
                },
                Some,
            );
        let config = config.unwrap_or_else(|| {
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        });
        Checker {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }
}

impl Default for Checker {
    fn default() -> Self {
        Checker::new()
    }
}

/// Timeouts for one check (the route's `proxy-connect-timeout` / `-read-timeout`, as
/// nginx's auth location inherits them).
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
}

/// The route's checks for one request, in nginx's order (denied, basic, external).
pub async fn check<B>(
    checker: &Checker,
    dns: &Resolver,
    routes: &RouteTable,
    policy: &Policy,
    seen: &Seen<'_>,
    timeouts: &Timeouts,
    req: &Request<B>,
) -> Verdict {
    if let Some(why) = &policy.denied {
        tracing::debug!("route denied: {why}");
        return Verdict::Answer(
            "auth_denied",
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "this route's authentication is misconfigured",
            ),
        );
    }
    let mut granted = Granted::default();
    if let Some(basic) = &policy.basic_auth {
        if !basic_passes(basic, req.headers()) {
            let mut answer = text(StatusCode::UNAUTHORIZED, "authentication required");
            let challenge = format!("Basic realm=\"{}\"", basic.realm);
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                answer.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return Verdict::Answer("auth_basic", answer);
        }
        granted.clear_authorization = true;
    }
    let Some(ext) = &policy.external_auth else {
        return Verdict::Forward(granted);
    };
    let answer = match external(checker, dns, routes, ext, seen, timeouts, req).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!("auth-url {}: {e}", ext.url);
            return Verdict::Answer("auth_error", auth_failed());
        }
    };
    let status = answer.status();
    let cookies: Vec<HeaderValue> = answer
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    granted.always_set_cookie = ext.always_set_cookie;
    if status.is_success() {
        for name in &ext.response_headers {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                continue;
            };
            let values = answer.headers().get_all(&name).iter().cloned().collect();
            granted.upstream.push((name, values));
        }
        granted.cookies = cookies;
        return Verdict::Forward(granted);
    }
    let (reason, mut response) = match status {
        StatusCode::UNAUTHORIZED => unauthorized(ext, seen, &answer),
        StatusCode::FORBIDDEN => ("auth_forbidden", text(StatusCode::FORBIDDEN, "forbidden")),
        other => {
            tracing::warn!("auth-url {} answered {other}", ext.url);
            ("auth_error", auth_failed())
        }
    };
    if ext.always_set_cookie || adds_headers(response.status()) {
        for c in cookies {
            response.headers_mut().append(header::SET_COOKIE, c);
        }
    }
    Verdict::Answer(reason, response)
}

/// A 401 from the check: a 302 to `auth-signin` (nginx's `error_page 401`), else the
/// 401 with the check's challenge (nginx's `auth_request` passes it on).
fn unauthorized<B>(
    ext: &ExternalAuth,
    seen: &Seen<'_>,
    answer: &Response<B>,
) -> (&'static str, Response<Body>) {
    if let Some(signin) = &ext.signin {
        let location = expand(signin, |name| variable(name, seen));
        let Ok(location) = HeaderValue::from_str(&location) else {
            return ("auth_error", auth_failed());
        };
        let mut r = text(StatusCode::FOUND, "sign in first");
        r.headers_mut().insert(header::LOCATION, location);
        return ("auth_signin", r);
    }
    let mut r = text(StatusCode::UNAUTHORIZED, "authentication required");
    if let Some(v) = answer.headers().get(header::WWW_AUTHENTICATE) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v.clone());
    }
    ("auth_unauthorized", r)
}

fn auth_failed() -> Response<Body> {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the authentication service failed",
    )
}

fn text(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `Authorization: Basic` with a known user and a matching password.
fn basic_passes(basic: &BasicAuth, headers: &HeaderMap) -> bool {
    use base64::Engine as _;
    let Some(encoded) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    let Ok(pair) = std::str::from_utf8(&decoded) else {
        return false;
    };
    let Some((user, password)) = pair.split_once(':') else {
        return false;
    };
    basic
        .users
        .get(user)
        .is_some_and(|hash| htpasswd::verify(password, hash))
}

/// The value of nginx variable `name` for this request (the names of
/// [`lb_core::routes::auth::VARIABLES`]).
fn variable(name: &str, seen: &Seen<'_>) -> Option<String> {
    Some(match name {
        "host" => host_only(seen.authority).to_ascii_lowercase(),
        "http_host" | "best_http_host" => seen.authority.to_owned(),
        "request_uri" => seen.uri.to_owned(),
        "escaped_request_uri" => escape_uri(seen.uri),
        "scheme" | "pass_access_scheme" => seen.scheme.to_owned(),
        "remote_addr" => seen.peer.ip().to_canonical().to_string(),
        _ => return None,
    })
}

fn host_only(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// Sends the check: the client's headers (no body) plus ingress-nginx's.
async fn external<B>(
    checker: &Checker,
    dns: &Resolver,
    routes: &RouteTable,
    ext: &ExternalAuth,
    seen: &Seen<'_>,
    timeouts: &Timeouts,
    req: &Request<B>,
) -> Result<Response<hyper::body::Incoming>, String> {
    let url = expand(&ext.url, |name| variable(name, seen));
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} has no host"))?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();

    let check = check_request(ext, seen, authority.as_str(), path, req)?;
    // A host the hop serves: that route's backend directly, in plain HTTP.
    let (addrs, tls) = if let Some(route) = routes.lookup_named(host, uri.path()) {
        let addrs: Vec<SocketAddr> = match &route.upstream.target {
            Target::Endpoints(e) => e.clone(),
            Target::Dns { host, port } => dns
                .resolve(host, *port)
                .await
                .map_err(|e| e.to_string())?
                .to_vec(),
        };
        (addrs, None)
    } else {
        let addrs = dns.resolve(host, port).await.map_err(|e| e.to_string())?;
        (addrs.to_vec(), https.then_some(host.to_owned()))
    };
    if addrs.is_empty() {
        return Err(format!("no endpoints for {host}"));
    }
    let start = rand::random_range(0..addrs.len());
    let mut last = String::new();
    for i in 0..addrs.len().min(2) {
        let addr = addrs[(start + i) % addrs.len()];
        match tokio::time::timeout(timeouts.connect, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let exchange = send(checker, stream, tls.as_deref(), check);
                return tokio::time::timeout(timeouts.read, exchange)
                    .await
                    .map_err(|_| format!("{addr} did not answer in time"))?;
            }
            Ok(Err(e)) => last = format!("connect to {addr}: {e}"),
            Err(_) => last = format!("connect to {addr} timed out"),
        }
    }
    Err(last)
}

/// The check's request: the client's headers less its body's and
/// `X-Forwarded-Proto`, with the ones ingress-nginx's auth location sets.
fn check_request<B>(
    ext: &ExternalAuth,
    seen: &Seen<'_>,
    authority: &str,
    path: String,
    req: &Request<B>,
) -> Result<Request<Empty<Bytes>>, String> {
    let mut headers = req.headers().clone();
    strip_hop_by_hop(&mut headers, false);
    for name in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::EXPECT,
        HeaderName::from_static("x-forwarded-proto"),
    ] {
        headers.remove(name);
    }
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    let client = seen.peer.ip().to_canonical().to_string();
    set("host", authority);
    set(
        "x-original-url",
        &format!("{}://{}{}", seen.scheme, seen.authority, seen.uri),
    );
    set("x-original-method", req.method().as_str());
    set("x-sent-from", "nginx-ingress-controller");
    set("x-real-ip", &client);
    set("x-forwarded-for", &client);
    set(
        "x-auth-request-redirect",
        ext.request_redirect.as_deref().unwrap_or(seen.uri),
    );
    if ext.method.is_some() {
        set("x-original-uri", seen.uri);
        set("x-scheme", seen.scheme);
    }
    if !headers.contains_key("x-request-id") {
        headers.insert("x-request-id", new_request_id());
    }
    let method = ext
        .method
        .as_deref()
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .unwrap_or(Method::GET);
    let mut check = Request::builder()
        .method(method)
        .uri(path)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    *check.headers_mut() = headers;
    Ok(check)
}

async fn send(
    checker: &Checker,
    stream: TcpStream,
    tls: Option<&str>,
    check: Request<Empty<Bytes>>,
) -> Result<Response<hyper::body::Incoming>, String> {
    let _ = stream.set_nodelay(true);
    match tls {
        None => exchange(stream, check).await,
        Some(name) => {
            let server = rustls_pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| format!("{name}: {e}"))?;
            let stream = checker
                .tls
                .connect(server, stream)
                .await
                .map_err(|e| format!("TLS with {name}: {e}"))?;
            exchange(stream, check).await
        }
    }
}

async fn exchange<S>(
    stream: S,
    check: Request<Empty<Bytes>>,
) -> Result<Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(check).await.map_err(|e| e.to_string())
}
