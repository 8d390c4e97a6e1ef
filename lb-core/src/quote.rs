//! A value from an object, quoted in a problem or a log line. An object can carry
//! megabytes in one annotation; a problem quotes at most [`MAX_QUOTED`] bytes of it,
//! then an ellipsis and the value's length, so one bad object cannot flood the log, the
//! Events or the status.

use std::fmt;

/// Bytes of a value a problem quotes before cutting it short.
pub const MAX_QUOTED: usize = 200;

/// `value` as `"..."` (Rust string escapes), cut after about [`MAX_QUOTED`] bytes (at
/// a character boundary) with `…" (N bytes)`.
pub fn quoted(value: &str) -> Quoted<'_> {
    Quoted(value)
}

pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.0;
        if value.len() <= MAX_QUOTED {
            return write!(f, "{value:?}");
        }
        let mut cut = MAX_QUOTED;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        let head = format!("{:?}", &value[..cut]);
        let open = head.strip_suffix('"').unwrap_or(&head);
        write!(f, "{open}…\" ({} bytes)", value.len())
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_QUOTED, quoted};

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(quoted("heavy").to_string(), "\"heavy\"");
        assert_eq!(quoted("a\"b\n").to_string(), "\"a\\\"b\\n\"");
        let edge = "x".repeat(MAX_QUOTED);
        assert_eq!(quoted(&edge).to_string(), format!("\"{edge}\""));
    }

    #[test]
    fn long_values_are_cut_with_their_length() {
        let big = "y".repeat(4 << 20);
        let text = quoted(&big).to_string();
        assert_eq!(
            text,
            format!("\"{}…\" (4194304 bytes)", "y".repeat(MAX_QUOTED))
        );
        // A multi-byte character across the cut is left out whole.
        let wide = format!("{}é{}", "z".repeat(MAX_QUOTED - 1), "z".repeat(10));
        assert_eq!(
            quoted(&wide).to_string(),
            format!("\"{}…\" ({} bytes)", "z".repeat(MAX_QUOTED - 1), wide.len())
        );
    }
}
