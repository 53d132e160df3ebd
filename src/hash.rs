//! Content hashing, in one place so a second algorithm (BLAKE3, issue 4) slots in beside it.
//!
//! SHA-256 comes from ring rather than sha2: both use the CPU's SHA extensions when it has them,
//! but without them (this project's 2-core test machine has none) ring's AVX2 assembly runs about
//! 1.9x faster than sha2's portable code (`cargo run --release --example hash-speed`; numbers in
//! README). sha2 remains the independent oracle in the tests.

use std::io::{self, Read};

use indicatif::ProgressBar;
use ring::digest::{Context, SHA256};

use crate::protocol::Digest;

/// Read size for hashing a file: large enough that syscalls cost nothing next to SHA-256.
const HASH_BUF: usize = 1024 * 1024;

/// An incremental SHA-256.
#[derive(Clone)]
pub struct Hasher(Context);

impl Default for Hasher {
    fn default() -> Hasher {
        Hasher::new()
    }
}

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(Context::new(&SHA256))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Digest {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        Digest(out)
    }
}

/// Hashes everything `r` yields, advancing `bar`. Returns the digest and the byte count, so the
/// caller can tell whether the file changed size under it.
pub fn hash_reader<R: Read>(r: R, bar: &ProgressBar) -> io::Result<(Digest, u64)> {
    Ok(hash_reader_until(r, bar, None)?.expect("no deadline"))
}

/// Like [`hash_reader`], but gives up (returns `None`) once `deadline` has passed.
pub fn hash_reader_until<R: Read>(
    mut r: R,
    bar: &ProgressBar,
    deadline: Option<std::time::Instant>,
) -> io::Result<Option<(Digest, u64)>> {
    // One buffer per thread, reused: a batch hashes thousands of small files, and a fresh
    // zeroed megabyte for each would cost more than hashing them.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        buf.resize(HASH_BUF, 0);
        let mut h = Hasher::new();
        let mut total = 0u64;
        loop {
            let n = match r.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            total += n as u64;
            bar.inc(n as u64);
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(None);
            }
        }
        Ok(Some((h.finish(), total)))
    })
}

/// "sha-ni" when the CPU has the SHA extensions (both ring and sha2 then use them), "no sha-ni"
/// otherwise.
pub fn sha256_backend() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("sha") && std::arch::is_x86_feature_detected!("sse4.1") {
            return "sha-ni";
        }
    }
    "no sha-ni"
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
