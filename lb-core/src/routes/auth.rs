//! A route's authentication, from ingress-nginx's `auth-*` annotations: an external
//! check (`auth-url`, nginx's `auth_request`) and HTTP basic authentication
//! (`auth-type: basic`, `auth_basic`). Pure: what to ask and what to compare; the proxy
//! sends the check and verifies the hashes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// `auth-url` and its settings, as ingress-nginx renders them into an `auth_request`
/// location: every request first goes (without its body) to `url`; 2xx lets it on,
/// 401 and 403 are answered as such, anything else is a 500.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalAuth {
    /// `auth-url`, with nginx variables (`$host`, ...; see [`VARIABLES`]) still in it.
    pub url: String,
    /// `auth-method`: the check's method (nginx's subrequests are `GET` otherwise);
    /// when set, `X-Original-URI` and `X-Scheme` are sent too, as ingress-nginx does.
    pub method: Option<String>,
    /// `auth-signin`, with `rd=` (or `auth-signin-redirect-param`) added as
    /// ingress-nginx's `buildAuthSignURL` does: a 401 from the check becomes a 302 to it.
    pub signin: Option<String>,
    /// `auth-response-headers`: copied from the check's answer into the backend's
    /// request (a client's own header of that name never reaches the backend).
    pub response_headers: Vec<String>,
    /// `auth-request-redirect`: sent as `X-Auth-Request-Redirect` (default: the
    /// request URI).
    pub request_redirect: Option<String>,
    /// `auth-always-set-cookie`: the check's `Set-Cookie` goes on every answer, not
    /// only on 2xx and 3xx ones.
    pub always_set_cookie: bool,
}

/// HTTP basic authentication (`auth-type: basic`): a request needs `Authorization:
/// Basic` with a user of the Secret and its password, else 401 with
/// `WWW-Authenticate: Basic realm="..."`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicAuth {
    /// `auth-realm` (ingress-nginx's default is empty).
    pub realm: String,
    /// User name to its password hash, as htpasswd writes them (`$2y$` bcrypt,
    /// `$apr1$` / `$1$` MD5, `{SHA}`, `{SSHA}`, `{PLAIN}`).
    pub users: BTreeMap<String, String>,
}

/// The nginx variables `auth-url` and `auth-signin` may use (ingress-nginx passes them
/// to nginx untouched); the proxy fills them in per request.
pub const VARIABLES: &[&str] = &[
    "host",
    "http_host",
    "best_http_host",
    "request_uri",
    "escaped_request_uri",
    "scheme",
    "pass_access_scheme",
    "remote_addr",
];

/// The first `$name` in `text` that is not one of [`VARIABLES`].
pub fn unknown_variable(text: &str) -> Option<String> {
    let mut unknown = None;
    expand(text, |name| {
        if !VARIABLES.contains(&name) && unknown.is_none() {
            unknown = Some(format!("${name}"));
        }
        Some(String::new())
    });
    unknown
}

/// `text` with each `$name` (longest run of letters, digits and `_`) replaced by
/// `value(name)`; a name it does not know stays as written.
pub fn expand(text: &str, mut value: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..end];
        if let Some(v) = (!name.is_empty()).then(|| value(name)).flatten() {
            out.push_str(&v);
        } else {
            out.push('$');
            out.push_str(name);
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// ingress-nginx's `buildAuthSignURL`: `url` with `PARAM=$pass_access_scheme://
/// $http_host$escaped_request_uri` appended, unless its query already sets `param`.
pub fn signin_url(url: &str, param: &str) -> String {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    let target = "$pass_access_scheme://$http_host$escaped_request_uri";
    if query.is_empty() {
        return format!("{url}?{param}={target}");
    }
    let set = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .any(|(k, v)| k == param && !v.is_empty());
    if set {
        url.to_owned()
    } else {
        format!("{url}&{param}={target}")
    }
}

/// nginx's `set_escape_uri` (the `$escaped_request_uri` of `auth-signin`): every byte
/// but RFC 3986's unreserved ones percent-encoded.
pub fn escape_uri(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The kind of an htpasswd hash the proxy can check (nginx's `auth_basic` takes
/// these, and the system `crypt` ones, which are not accepted here), or `None`.
pub fn hash_kind(hash: &str) -> Option<&'static str> {
    const KINDS: &[(&str, &str)] = &[
        ("$2a$", "bcrypt"),
        ("$2b$", "bcrypt"),
        ("$2y$", "bcrypt"),
        ("$apr1$", "apr1 (MD5)"),
        ("$1$", "MD5-crypt"),
        ("{SHA}", "SHA-1"),
        ("{SSHA}", "salted SHA-1"),
        ("{PLAIN}", "plain text"),
    ];
    KINDS
        .iter()
        .find(|(prefix, _)| hash.starts_with(prefix))
        .map(|(_, kind)| *kind)
}

/// Checks one user's hash: a kind the proxy can verify.
pub fn check_hash(user: &str, hash: &str) -> Result<(), String> {
    if hash_kind(hash).is_some() {
        Ok(())
    } else {
        Err(format!(
            "user {user:?}: the hash is not bcrypt ($2y$), apr1/MD5 ($apr1$, $1$), {{SHA}}, \
             {{SSHA}} or {{PLAIN}}"
        ))
    }
}

/// Users from an htpasswd file (`user:hash` per line, `#` comments and blank lines
/// skipped); the error names the first line that is not `user:hash`.
pub fn htpasswd(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut users = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((user, hash)) if !user.is_empty() && !hash.is_empty() => {
                check_hash(user, hash)?;
                users.insert(user.to_owned(), hash.to_owned());
            }
            _ => return Err(format!("line {} is not user:hash", i + 1)),
        }
    }
    if users.is_empty() {
        return Err("holds no user".to_owned());
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signin_gets_rd_as_ingress_nginx_builds_it() {
        let t = "$pass_access_scheme://$http_host$escaped_request_uri";
        assert_eq!(
            signin_url("https://auth.example/start", "rd"),
            format!("https://auth.example/start?rd={t}")
        );
        assert_eq!(
            signin_url("https://auth.example/start?x=1", "rd"),
            format!("https://auth.example/start?x=1&rd={t}")
        );
        // The oauth2-proxy example sets rd itself.
        let own = "https://$host/oauth2/start?rd=$escaped_request_uri";
        assert_eq!(signin_url(own, "rd"), own);
        assert_eq!(
            signin_url("https://a.example/s?rd=", "next"),
            format!("https://a.example/s?rd=&next={t}")
        );
    }

    #[test]
    fn expands_known_variables_and_finds_unknown_ones() {
        let got = expand(
            "https://$host/oauth2/start?rd=$escaped_request_uri",
            |n| match n {
                "host" => Some("shop.example".into()),
                "escaped_request_uri" => Some(escape_uri("/a b?c=d")),
                _ => None,
            },
        );
        assert_eq!(got, "https://shop.example/oauth2/start?rd=%2Fa%20b%3Fc%3Dd");
        assert_eq!(unknown_variable("https://$host/$request_uri"), None);
        assert_eq!(
            unknown_variable("https://$host/$cookie_x"),
            Some("$cookie_x".into())
        );
        assert_eq!(expand("a$", |_| None), "a$");
    }

    #[test]
    fn reads_htpasswd_lines() {
        let users = htpasswd("# admins\nfoo:$apr1$x$y\r\n\nbar:{SHA}abc\n").unwrap();
        assert!(
            htpasswd("foo:$6$salt$x\n")
                .unwrap_err()
                .contains("user \"foo\"")
        );
        assert_eq!(users.len(), 2);
        assert_eq!(users["bar"], "{SHA}abc");
        assert_eq!(htpasswd("foo\n").unwrap_err(), "line 1 is not user:hash");
        assert_eq!(htpasswd("\n# none\n").unwrap_err(), "holds no user");
    }
}
