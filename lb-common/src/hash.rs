//! The flow hash that picks a Maglev slot: Bob Jenkins' lookup3 `hashword` (public
//! domain, the kernel's jhash2) over the 5-tuple, with a fixed seed.
//!
//! It must be the same on every node and every agent version, so that a flow lands on
//! the same backend whichever node receives it; tests use it to predict the backend.

/// Fixed seed: the same on every node.
pub const FLOW_HASH_SEED: u32 = 0x786c_6221; // "xlb!"

#[inline(always)]
const fn rot(x: u32, k: u32) -> u32 {
    x.rotate_left(k)
}

#[inline(always)]
const fn mix(mut a: u32, mut b: u32, mut c: u32) -> (u32, u32, u32) {
    a = a.wrapping_sub(c);
    a ^= rot(c, 4);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= rot(a, 6);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= rot(b, 8);
    b = b.wrapping_add(a);
    a = a.wrapping_sub(c);
    a ^= rot(c, 16);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= rot(a, 19);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= rot(b, 4);
    b = b.wrapping_add(a);
    (a, b, c)
}

#[inline(always)]
const fn final_mix(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(rot(b, 14));
    a ^= c;
    a = a.wrapping_sub(rot(c, 11));
    b ^= a;
    b = b.wrapping_sub(rot(a, 25));
    c ^= b;
    c = c.wrapping_sub(rot(b, 16));
    a ^= c;
    a = a.wrapping_sub(rot(c, 4));
    b ^= a;
    b = b.wrapping_sub(rot(a, 14));
    c ^= b;
    c = c.wrapping_sub(rot(b, 24));
    c
}

/// lookup3 `hashword` over exactly `N` words (N a multiple of 3 keeps it branch-free).
#[inline(always)]
#[expect(
    clippy::many_single_char_names,
    reason = "a, b, c, k are the names of the published algorithm"
)]
pub const fn hash_words<const N: usize>(k: &[u32; N], seed: u32) -> u32 {
    #[expect(clippy::cast_possible_truncation, reason = "N is a small constant")]
    let init = 0xdead_beef_u32
        .wrapping_add((N as u32) << 2)
        .wrapping_add(seed);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut i = 0;
    while N - i > 3 {
        a = a.wrapping_add(k[i]);
        b = b.wrapping_add(k[i + 1]);
        c = c.wrapping_add(k[i + 2]);
        (a, b, c) = mix(a, b, c);
        i += 3;
    }
    match N - i {
        3 => {
            c = c.wrapping_add(k[i + 2]);
            b = b.wrapping_add(k[i + 1]);
            a = a.wrapping_add(k[i]);
            final_mix(a, b, c)
        }
        2 => {
            b = b.wrapping_add(k[i + 1]);
            a = a.wrapping_add(k[i]);
            final_mix(a, b, c)
        }
        1 => {
            a = a.wrapping_add(k[i]);
            final_mix(a, b, c)
        }
        _ => c,
    }
}

#[inline(always)]
const fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Hash of the whole 5-tuple (client -> frontend direction).
#[inline(always)]
pub const fn flow_hash(k: &crate::FlowKey) -> u32 {
    // The addresses' words as `word` reads them (little-endian), in word loads.
    let (src, dst) = (k.src_words(), k.dst_words());
    let words: [u32; 12] = [
        u32::from_le(src[0]),
        u32::from_le(src[1]),
        u32::from_le(src[2]),
        u32::from_le(src[3]),
        u32::from_le(dst[0]),
        u32::from_le(dst[1]),
        u32::from_le(dst[2]),
        u32::from_le(dst[3]),
        k.sport as u32 | (k.dport as u32) << 16,
        k.proto as u32 | (k.family as u32) << 8,
        0,
        0,
    ];
    hash_words(&words, FLOW_HASH_SEED)
}

/// Hash of the client address only (session affinity by client IP).
#[inline(always)]
pub const fn client_hash(addr: &[u8; 16]) -> u32 {
    let words: [u32; 6] = [
        word(addr, 0),
        word(addr, 4),
        word(addr, 8),
        word(addr, 12),
        0,
        0,
    ];
    hash_words(&words, FLOW_HASH_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of the reference lookup3.c `hashword` (Bob Jenkins' self-test prints
    /// hashword of "" as 0xdeadbeef with seed 0, and these are from the same routine).
    #[test]
    fn matches_reference_shape() {
        assert_eq!(hash_words::<0>(&[], 0), 0xdead_beef);
        // Different inputs, different hashes; same input, same hash.
        let a = hash_words(&[1, 2, 3], 0);
        let b = hash_words(&[1, 2, 4], 0);
        assert_ne!(a, b);
        assert_eq!(a, hash_words(&[1, 2, 3], 0));
    }

    #[test]
    fn ports_and_direction_matter() {
        let mut k = crate::FlowKey {
            src: [198, 51, 100, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [203, 0, 113, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        };
        let h = flow_hash(&k);
        k.sport = 40001u16.to_be();
        assert_ne!(h, flow_hash(&k));
        // The client hash ignores ports.
        assert_eq!(client_hash(&k.src), client_hash(&k.src));
    }
}
