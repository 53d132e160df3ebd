//! Content hashing. sha2 lives here so a second algorithm (BLAKE3, issue 4) slots in beside it.
//!
//! sha2 picks its SHA-NI backend at run time when the CPU has the SHA extensions and falls back to
//! portable code otherwise; [`sha256_backend`] reports which one this machine gets.

use std::io::{self, Read};

use indicatif::ProgressBar;
use sha2::{Digest as _, Sha256};

use crate::protocol::Digest;

/// Read size for hashing a file: large enough that syscalls cost nothing next to SHA-256.
const HASH_BUF: usize = 1024 * 1024;

/// An incremental SHA-256.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(Sha256::new())
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

/// Hashes everything `r` yields, advancing `bar`. Returns the digest and the byte count, so the
/// caller can tell whether the file changed size under it.
pub fn hash_reader<R: Read>(mut r: R, bar: &ProgressBar) -> io::Result<(Digest, u64)> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        total += n as u64;
        bar.inc(n as u64);
    }
    Ok((h.finish(), total))
}

/// "sha-ni" when the CPU's SHA extensions are in use, "portable" otherwise.
pub fn sha256_backend() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("sha") && std::arch::is_x86_feature_detected!("sse4.1") {
            return "sha-ni";
        }
    }
    "portable"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let bar = ProgressBar::hidden();
        let (d, n) = hash_reader(&b""[..], &bar).unwrap();
        assert_eq!(
            (d.to_hex().as_str(), n),
            ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 0)
        );
        let (d, n) = hash_reader(&b"abc"[..], &bar).unwrap();
        assert_eq!(d.to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(n, 3);
    }
}
