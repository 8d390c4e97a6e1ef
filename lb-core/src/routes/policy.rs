//! What a route does to a request besides forwarding it, from its Ingress's
//! ingress-nginx annotations: redirects, `app-root`, `rewrite-target`, the upstream
//! `Host`, `X-Forwarded-Prefix`. Pure: the proxy asks, these answer.

use std::fmt;

use regex::Regex;

/// The per-route behaviour the annotations ask for; [`Default`]: none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `permanent-redirect` / `temporal-redirect`: every request is answered with this.
    pub redirect: Option<Redirect>,
    /// `app-root`: a request for `/` is answered 302 to this path.
    pub app_root: Option<String>,
    /// `rewrite-target`: the path the backend sees.
    pub rewrite: Option<Rewrite>,
    /// `upstream-vhost`: the `Host` the backend sees.
    pub upstream_vhost: Option<String>,
    /// `x-forwarded-prefix`: sent as `X-Forwarded-Prefix`.
    pub forwarded_prefix: Option<String>,
}

/// A fixed redirect: status and `Location`, as nginx's `return CODE URL` (the request's
/// path is not appended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub code: u16,
    pub location: String,
}

/// A regular expression as ingress-nginx writes it into nginx: case-insensitive.
#[derive(Clone)]
pub struct PathRegex(Regex);

impl PathRegex {
    /// `(?i)` + `pattern`; `anchored` adds `^` (a location match; a rewrite is not
    /// anchored). The error says why the pattern is not a regular expression (Rust's
    /// `regex` syntax: no look-around or back-references, unlike nginx's PCRE).
    pub fn new(pattern: &str, anchored: bool) -> Result<Self, String> {
        let anchor = if anchored { "^" } else { "" };
        regex::RegexBuilder::new(&format!("(?i){anchor}{pattern}"))
            .size_limit(1 << 20)
            .build()
            .map(PathRegex)
            .map_err(|e| match e {
                regex::Error::Syntax(text) => text.lines().last().unwrap_or("").to_owned(),
                other => other.to_string(),
            })
    }

    pub fn is_match(&self, path: &str) -> bool {
        self.0.is_match(path)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl PartialEq for PathRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for PathRegex {}

impl fmt::Debug for PathRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

/// nginx's `rewrite "(?i)PATH" TARGET break;` as ingress-nginx renders
/// `rewrite-target`: when the route's path (a regular expression, not anchored)
/// matches the request's path, the whole path is replaced by the target with `$1`..`$9`
/// set to the captures (an absent group is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub pattern: PathRegex,
    pub target: String,
}

impl Rewrite {
    /// The backend's path and query for a request's `path` and `query`: `None` when the
    /// pattern does not match (the request goes unchanged). As nginx, the request's
    /// query is kept, after the target's own when the target has one.
    pub fn apply(&self, path: &str, query: Option<&str>) -> Option<String> {
        let caps = self.pattern.0.captures(path)?;
        let mut out = String::with_capacity(self.target.len() + path.len());
        let mut chars = self.target.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '$'
                && let Some(digit) = chars.peek().and_then(|d| d.to_digit(10))
            {
                chars.next();
                let group = usize::try_from(digit).unwrap_or(0);
                out.push_str(caps.get(group).map_or("", |m| m.as_str()));
            } else {
                out.push(c);
            }
        }
        if !out.starts_with('/') {
            out.insert(0, '/');
        }
        match query.filter(|q| !q.is_empty()) {
            Some(q) if out.contains('?') => {
                out.push('&');
                out.push_str(q);
            }
            Some(q) => {
                out.push('?');
                out.push_str(q);
            }
            None => {}
        }
        Some(out)
    }
}
