//! Limits a YAML text must keep before any parser sees it: the config file and every
//! file of a manifests directory. A parser's time and memory grow with the input's
//! size and with its nesting (a 200 KB file of nested collections kept the agent busy
//! for most of a minute), so both are checked first by one cheap pass over the bytes,
//! and a file over either limit is refused as a whole.
//!
//! The depth scan is an estimate, not a YAML parser: it counts block indentation
//! levels, `- ` and `? ` entries opened on one line, and flow collections (`[`, `{`)
//! outside quoted scalars, comments and block scalars. It may count a level more than a
//! parser would (a plain scalar continued on a more indented line), never fewer for the
//! shapes that nest: block mappings and sequences, flow collections, and any mix.

/// Largest YAML file read: 4 MiB. A kubectl List of a few thousand objects fits.
pub const MAX_BYTES: usize = 4 << 20;
/// Deepest nesting read: 64 levels. A Kubernetes object nests about 15 deep.
pub const MAX_DEPTH: usize = 64;

/// Which limit a text broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    #[error(
        "{bytes} bytes is over the size limit of {MAX_BYTES} bytes (4 MiB); nothing in the file was read"
    )]
    TooLarge { bytes: usize },
    #[error(
        "line {line}: nested deeper than the limit of {MAX_DEPTH} levels; nothing in the file was read"
    )]
    TooDeep { line: usize },
}

/// `Ok` when `text` is within both limits.
pub fn check(text: &str) -> Result<(), Limit> {
    if text.len() > MAX_BYTES {
        return Err(Limit::TooLarge { bytes: text.len() });
    }
    let mut scan = Scan::default();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line).as_bytes();
        if scan.line(line) > MAX_DEPTH {
            return Err(Limit::TooDeep { line: i + 1 });
        }
    }
    Ok(())
}

#[derive(Default)]
struct Scan {
    /// Indentation of each open block level.
    indents: Vec<usize>,
    /// Open flow collections.
    flow: usize,
    /// Inside a quoted scalar that continues on the next line: its quote.
    quote: Option<u8>,
    /// Inside a block scalar (`|`, `>`): the indentation of the line that opened it.
    block_scalar: Option<usize>,
}

impl Scan {
    /// Scans one line; returns the deepest nesting seen on it.
    fn line(&mut self, line: &[u8]) -> usize {
        let indent = line.iter().take_while(|b| **b == b' ').count();
        let rest = &line[indent..];
        let blank = rest.iter().all(u8::is_ascii_whitespace);
        let mut i = 0;
        if let Some(quote) = self.quote {
            match close_quote(line, 0, quote) {
                Some(end) => {
                    self.quote = None;
                    i = end;
                }
                None => return self.depth(0),
            }
        } else if self.flow == 0 {
            if let Some(parent) = self.block_scalar {
                if blank || indent > parent {
                    return self.depth(0);
                }
                self.block_scalar = None;
            }
            if blank || rest.first() == Some(&b'#') {
                return self.depth(0);
            }
            if indent == 0 && (rest.starts_with(b"---") || rest.starts_with(b"...")) {
                self.indents.clear();
                i = 3;
            } else {
                while self.indents.last().is_some_and(|top| *top >= indent) {
                    self.indents.pop();
                }
                self.indents.push(indent);
                i = indent;
            }
        }
        self.tokens(line, i, indent)
    }

    fn depth(&self, entries: usize) -> usize {
        self.indents.len() + entries + self.flow
    }

    /// Flow collections, quotes, comments and block scalars from byte `i` on.
    fn tokens(&mut self, line: &[u8], mut i: usize, indent: usize) -> usize {
        let mut entries = 0;
        // Only the line's start (after `- ` and `? ` entries) or an indicator that acted
        // (`: `, `,`, `[`, `{`) starts a token; elsewhere `[` or `"` is part of a plain
        // scalar (`x[1]`, `say "hi"`).
        let mut token = true;
        let mut line_start = true;
        let mut deepest = self.depth(0);
        while i < line.len() {
            let b = line[i];
            let next_blank = line.get(i + 1).is_none_or(|n| *n == b' ' || *n == b'\t');
            let after_space = i == 0 || matches!(line[i - 1], b' ' | b'\t');
            let mut acted = true;
            match b {
                b' ' | b'\t' => {
                    i += 1;
                    continue;
                }
                b'#' if after_space => break,
                b'-' | b'?' if self.flow == 0 && line_start && next_blank => entries += 1,
                b'[' | b'{' if token => self.flow += 1,
                b']' | b'}' if self.flow > 0 => {
                    self.flow -= 1;
                    acted = false;
                }
                b',' if self.flow > 0 => {}
                b':' if next_blank || self.flow > 0 => {}
                b'"' | b'\'' if token => {
                    let Some(end) = close_quote(line, i + 1, b) else {
                        self.quote = Some(b);
                        break;
                    };
                    token = false;
                    line_start = false;
                    i = end;
                    continue;
                }
                b'|' | b'>' if self.flow == 0 && token => {
                    self.block_scalar = Some(indent);
                    break;
                }
                _ => acted = false,
            }
            line_start = line_start && matches!(b, b'-' | b'?') && acted;
            token = acted;
            deepest = deepest.max(self.depth(entries));
            i += 1;
        }
        deepest.max(self.depth(entries))
    }
}

/// The index just past the quote that closes a scalar opened by `quote`, searching from
/// `from`; `None` when it continues past the line.
fn close_quote(line: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from;
    while i < line.len() {
        match line[i] {
            b'\\' if quote == b'"' => i += 2,
            b'\'' if quote == b'\'' && line.get(i + 1) == Some(&b'\'') => i += 2,
            b if b == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests;
