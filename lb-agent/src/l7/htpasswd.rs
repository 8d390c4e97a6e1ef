//! Password hashes as htpasswd writes them and nginx's `auth_basic` checks them:
//! bcrypt (`$2y$`, `$2a$`, `$2b$`, via the bcrypt crate), MD5-crypt (`$apr1$` and
//! `$1$`, one algorithm with two magic strings, over the md-5 crate), `{SHA}`,
//! `{SSHA}` (sha1 crate) and `{PLAIN}`. Which kinds are accepted is
//! [`lb_core::routes::auth::hash_kind`]; any other hash never matches.

use base64::Engine as _;
use md5::{Digest as _, Md5};
use sha1::Sha1;

/// Whether `password` matches `hash`.
pub fn verify(password: &str, hash: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    if hash.starts_with("$2") {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    if let Some(rest) = hash.strip_prefix("$apr1$") {
        return same(&md5_crypt(password, "$apr1$", rest), hash);
    }
    if let Some(rest) = hash.strip_prefix("$1$") {
        return same(&md5_crypt(password, "$1$", rest), hash);
    }
    if let Some(digest) = hash.strip_prefix("{SHA}") {
        return same(&b64.encode(Sha1::digest(password.as_bytes())), digest);
    }
    if let Some(encoded) = hash.strip_prefix("{SSHA}") {
        let Ok(raw) = b64.decode(encoded) else {
            return false;
        };
        if raw.len() <= 20 {
            return false;
        }
        let (digest, salt) = raw.split_at(20);
        let mut sha = Sha1::new();
        sha.update(password.as_bytes());
        sha.update(salt);
        return same_bytes(&sha.finalize(), digest);
    }
    if let Some(plain) = hash.strip_prefix("{PLAIN}") {
        return same(password, plain);
    }
    false
}

fn same(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

/// Compares without stopping at the first difference.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Poul-Henning Kamp's MD5-crypt (`$1$`; Apache's `$apr1$` differs only in the
/// magic): `magic$salt$hash` for `password` and the salt at the start of `rest`.
fn md5_crypt(password: &str, magic: &str, rest: &str) -> String {
    let pw = password.as_bytes();
    let salt = rest.split('$').next().unwrap_or("");
    let salt = &salt.as_bytes()[..salt.len().min(8)];
    let alt = Md5::new()
        .chain_update(pw)
        .chain_update(salt)
        .chain_update(pw)
        .finalize();
    let mut ctx = Md5::new()
        .chain_update(pw)
        .chain_update(magic)
        .chain_update(salt);
    let mut left = pw.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alt[..n]);
        left -= n;
    }
    let mut i = pw.len();
    while i > 0 {
        if i & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&pw[..1]);
        }
        i >>= 1;
    }
    let mut fin = ctx.finalize();
    for round in 0..1000 {
        let mut c = Md5::new();
        if round & 1 == 1 {
            c.update(pw);
        } else {
            c.update(fin);
        }
        if round % 3 != 0 {
            c.update(salt);
        }
        if round % 7 != 0 {
            c.update(pw);
        }
        if round & 1 == 1 {
            c.update(fin);
        } else {
            c.update(pw);
        }
        fin = c.finalize();
    }
    let mut out = format!("{magic}{}$", String::from_utf8_lossy(salt));
    let mut put = |v: u32, n: usize| {
        let mut v = v;
        for _ in 0..n {
            out.push(char::from(ITOA64[(v & 0x3f) as usize]));
            v >>= 6;
        }
    };
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        put(
            (u32::from(fin[a]) << 16) | (u32::from(fin[b]) << 8) | u32::from(fin[c]),
            4,
        );
    }
    put(u32::from(fin[11]), 2);
    out
}

#[cfg(test)]
mod tests {
    use super::verify;

    /// Hashes of "password" made by htpasswd (Apache), openssl passwd -1 and -apr1,
    /// and htpasswd -B (bcrypt, cost 5).
    #[test]
    fn verifies_the_hash_kinds_htpasswd_writes() {
        for hash in [
            "$apr1$xxxxxxxx$dxHfLAsjHkDRmG83UXe8K0",
            "$1$5pZSV9va$azfrPr6af3Fc7dLblQXVa0",
            "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "{PLAIN}password",
        ] {
            assert!(verify("password", hash), "{hash}");
            assert!(!verify("Password", hash), "{hash}");
        }
        let bcrypt = bcrypt::hash("password", 4).unwrap();
        assert!(verify("password", &bcrypt));
        assert!(!verify("passwore", &bcrypt));
        let y = bcrypt.replacen("$2b$", "$2y$", 1);
        assert!(verify("password", &y));
        assert!(!verify("password", "$6$salt$whatever"));
        assert!(!verify("password", "plain"));
    }

    #[test]
    fn verifies_salted_sha() {
        use base64::Engine as _;
        use sha1::{Digest as _, Sha1};
        let salt = b"saltsalt";
        let mut raw = Sha1::new()
            .chain_update(b"secret")
            .chain_update(salt)
            .finalize()
            .to_vec();
        raw.extend_from_slice(salt);
        let hash = format!(
            "{{SSHA}}{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        );
        assert!(verify("secret", &hash));
        assert!(!verify("secreT", &hash));
    }
}
