//! Incremental Internet checksum update (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! The data path rewrites addresses and ports and must fix the IPv4 header checksum and
//! the TCP/UDP checksum (whose pseudo-header covers the addresses) without summing the
//! payload. Words are 16-bit big-endian, as on the wire.

/// Accumulates `~old + new` for every replaced 16-bit word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CsumDelta(u32);

impl CsumDelta {
    pub const fn new() -> Self {
        CsumDelta(0)
    }

    /// One 16-bit word `old` becomes `new` (both as read big-endian from the wire).
    #[inline(always)]
    pub fn replace_u16(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
    }

    /// A field of `N` bytes (N even) changes from `old` to `new`.
    #[inline(always)]
    pub fn replace_bytes<const N: usize>(&mut self, old: &[u8; N], new: &[u8; N]) {
        let mut i = 0;
        while i + 1 < N {
            self.replace_u16(
                u16::from_be_bytes([old[i], old[i + 1]]),
                u16::from_be_bytes([new[i], new[i + 1]]),
            );
            // Keep the sum from overflowing on long fields.
            self.0 = (self.0 & 0xffff) + (self.0 >> 16);
            i += 2;
        }
    }

    /// A 32-bit field changes from `old` to `new`, both as loaded from memory (its four
    /// bytes in wire order, as `FlowKey::src_words` gives them): two 16-bit words.
    #[inline(always)]
    pub fn replace_word(&mut self, old: u32, new: u32) {
        let (old, new) = (u32::from_be(old), u32::from_be(new));
        #[expect(clippy::cast_possible_truncation, reason = "the halves of a word")]
        {
            self.replace_u16((old >> 16) as u16, (new >> 16) as u16);
            self.replace_u16(old as u16, new as u16);
        }
        self.0 = (self.0 & 0xffff) + (self.0 >> 16);
    }

    /// Adds the changes of `other`: a field covered by two checksums (the quoted
    /// header's and the ICMP message's) changes both.
    #[inline(always)]
    pub fn add(&mut self, other: CsumDelta) {
        self.0 = (self.0 & 0xffff) + (self.0 >> 16) + (other.0 & 0xffff) + (other.0 >> 16);
    }

    /// The updated checksum for a header whose checksum field was `check`.
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        let mut sum = (!check) as u32 + (self.0 & 0xffff) + (self.0 >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
        let folded = sum as u16;
        !folded
    }
}

/// The ones' complement sum of `N` bytes (N even) as 16-bit big-endian words, unfolded:
/// a part of a checksum computed from scratch (headers the data path builds itself).
#[inline(always)]
pub fn sum_words<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// Bytes `i..i + 4` of an address (as a `FlowKey` holds it), as a big-endian word: the
/// data path writes headers it builds as words from registers.
#[inline(always)]
pub const fn word(addr: &[u8; 16], i: usize) -> u32 {
    u32::from_be_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]])
}

/// A big-endian word's two 16-bit halves added: its part of an unfolded ones'
/// complement sum.
#[inline(always)]
pub const fn words(w: u32) -> u32 {
    (w >> 16) + (w & 0xffff)
}

/// The checksum field for an unfolded sum of everything it covers (RFC 1071).
#[inline(always)]
pub const fn finish(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

/// Full RFC 1071 checksum of `data` with an initial partial sum; for tests and for
/// building packets on the host side.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets the checksum of `buf` (field at `at`) from scratch.
    fn seal(buf: &mut [u8], at: usize) {
        buf[at] = 0;
        buf[at + 1] = 0;
        let c = checksum(buf, 0);
        buf[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn a_word_changes_the_sum_as_its_bytes_do() {
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let (old, new) = (x, x.rotate_left(11) ^ 0x5a5a_a5a5);
            let mut by_word = CsumDelta::new();
            by_word.replace_word(old, new);
            let mut by_bytes = CsumDelta::new();
            by_bytes.replace_bytes(&old.to_ne_bytes(), &new.to_ne_bytes());
            assert_eq!(
                by_word.apply(0x1234),
                by_bytes.apply(0x1234),
                "{old:#x} -> {new:#x}"
            );
        }
    }

    #[test]
    #[expect(
        clippy::cast_possible_truncation,
        reason = "random bytes from random words"
    )]
    fn incremental_matches_full_recompute() {
        // A deterministic pseudo-random walk over buffers and edits (no_std: no rand).
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..20_000 {
            let mut buf = [0u8; 40];
            for b in &mut buf {
                *b = next() as u8;
            }
            seal(&mut buf, 10);
            // Any even offset after the checksum field where 16 bytes fit.
            let at = (next() % 7) as usize * 2 + 12;
            let old: [u8; 16] = buf[at..at + 16].try_into().expect("16 bytes");
            let mut new = [0u8; 16];
            for b in &mut new {
                *b = next() as u8;
            }
            let mut d = CsumDelta::new();
            d.replace_bytes(&old, &new);
            let check = u16::from_be_bytes([buf[10], buf[11]]);
            buf[at..at + 16].copy_from_slice(&new);
            let incremental = d.apply(check);
            seal(&mut buf, 10);
            let full = u16::from_be_bytes([buf[10], buf[11]]);
            // 0x0000 and 0xffff are the same number in ones' complement; RFC 1624
            // never produces -0 from a non-zero sum, full recomputation never does either.
            assert_eq!(incremental, full, "edit at {at}");
        }
    }

    #[test]
    fn sum_and_finish_match_the_full_checksum() {
        let hdr: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(finish(sum_words(&hdr)), 0xb861);
        // Split sums add up: the pseudo-header part and the header part of a checksum.
        let (a, b): ([u8; 8], [u8; 12]) = (
            hdr[..8].try_into().expect("8"),
            hdr[8..].try_into().expect("12"),
        );
        assert_eq!(finish(sum_words(&a) + sum_words(&b)), 0xb861);
        assert_eq!(finish(0), 0xffff);
        // Header words built from registers sum as the bytes do.
        let addr = [0xc0, 0xa8, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(word(&addr, 0), 0xc0a8_0001);
        assert_eq!(words(word(&addr, 0)), sum_words(&[0xc0, 0xa8, 0x00, 0x01]));
    }

    #[test]
    fn known_ipv4_header() {
        // The classic example header from RFC 1071 discussions (checksum 0xb861).
        let hdr: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr, 0), 0xb861);
    }
}
