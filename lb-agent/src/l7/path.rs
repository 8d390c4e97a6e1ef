//! Request path normalisation before routing, as nginx does with `merge_slashes on`:
//! percent-encoded unreserved characters are decoded (RFC 3986 6.2.2.2), other escapes
//! are kept with upper-case hex (so `%2F` stays an escaped slash and never splits a
//! segment), duplicate slashes are merged, and dot segments are resolved (RFC 3986
//! 5.2.4). A path that climbs above the root, or holds a broken escape, is refused.
//! The backend receives the normalised path, so what was routed is what is served.

use std::borrow::Cow;

/// Why a path cannot be normalised (the request gets a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("the path climbs above the root")]
    AboveRoot,
    #[error("the path holds a broken percent escape")]
    BadEscape,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` is already in normal form (the common case, checked without
/// allocating).
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => return false,
            b'/' => {
                let rest = &b[i + 1..];
                let segment = rest.split(|c| *c == b'/').next().unwrap_or_default();
                if matches!(segment, b"." | b"..") || rest.first() == Some(&b'/') {
                    return false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    true
}

/// The normal form of an origin-form `path` (no query). A path that does not start
/// with `/` (`*` of `OPTIONS *`) is returned unchanged.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Escapes: unreserved characters decoded, the rest upper-cased.
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(hi), Some(lo)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(BadPath::BadEscape);
            };
            let byte = hi * 16 + lo;
            if unreserved(byte) {
                decoded.push(char::from(byte));
            } else {
                decoded.push('%');
                decoded.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
            }
            i += 3;
        } else {
            let len = path[i..].chars().next().map_or(1, char::len_utf8);
            decoded.push_str(&path[i..i + len]);
            i += len;
        }
    }
    // 2. Segments: empty ones merged away, `.` dropped, `..` pops (never past the root).
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = decoded.ends_with('/');
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, segment) in segments.into_iter().enumerate() {
        match segment {
            "" => {}
            "." => trailing_slash |= n == last,
            ".." => {
                if out.pop().is_none() {
                    return Err(BadPath::AboveRoot);
                }
                trailing_slash |= n == last;
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &out {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_the_known_bypasses() {
        for (raw, normal) in [
            ("/api/../admin", "/admin"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E%2E/admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a//b///c", "/a/b/c"),
            ("/..a/b..", "/..a/b.."),
            ("/%7euser/%41-%5F", "/~user/A-_"),
            ("/a%2fb/%2F..", "/a%2Fb/%2F.."),
            ("/a%2Fb", "/a%2Fb"),
            ("/%c3%a9t%C3%A9", "/%C3%A9t%C3%A9"),
            ("/ünï", "/ünï"),
            ("/", "/"),
            ("/.", "/"),
            ("/a/..", "/"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(normal), "{raw}");
        }
    }

    #[test]
    fn already_normal_paths_are_borrowed() {
        for path in ["/", "/a/b", "/a/b/", "/a.b/..c", "/api/v1/x.json"] {
            assert!(matches!(normalize(path), Ok(Cow::Borrowed(_))), "{path}");
        }
    }

    #[test]
    fn refuses_climbing_above_the_root_and_broken_escapes() {
        for raw in ["/..", "/../admin", "/a/../../b", "/%2e%2e/x", "//../x"] {
            assert_eq!(normalize(raw), Err(BadPath::AboveRoot), "{raw}");
        }
        for raw in ["/a%", "/a%2", "/a%zz", "/%%41"] {
            assert_eq!(normalize(raw), Err(BadPath::BadEscape), "{raw}");
        }
    }
}
