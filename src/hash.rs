//! Content hashing: SHA-256 (the default) and BLAKE3 (`--hash blake3`), behind one `Hasher`.
//!
//! SHA-256 comes from ring rather than sha2: both use the CPU's SHA extensions when it has them,
//! but without them (this project's 2-core test machine has none) ring's AVX2 assembly runs about
//! 1.9x faster than sha2's portable code (`cargo run --release --example hash-speed`; numbers in
//! README). sha2 remains the independent oracle in the tests.
//!
//! BLAKE3 comes from the blake3 crate, which picks SSE4.1, AVX2 or AVX-512 code at run time and
//! hashes several 1 KiB chunks of one buffer at once: many times faster than SHA-256 without SHA
//! extensions, on one core.

use std::io::{self, Read};

use indicatif::ProgressBar;
use ring::digest::{Context, SHA256};

use crate::protocol::{Digest, HashAlg};

/// Read size for hashing a file: large enough that syscalls cost nothing next to SHA-256.
const HASH_BUF: usize = 1024 * 1024;

/// An incremental hash of either algorithm.
#[derive(Clone)]
pub enum Hasher {
    // Both states live on the heap (SHA-256's is about 200 bytes, BLAKE3's about 2 KiB), so a
    // Hasher is small to move between threads and through plans.
    Sha256(Box<Context>),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn new(alg: HashAlg) -> Hasher {
        match alg {
            HashAlg::Sha256 => Hasher::Sha256(Box::new(Context::new(&SHA256))),
            HashAlg::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(c) => c.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(c) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(c.finish().as_ref());
                Digest(out)
            }
            Hasher::Blake3(h) => Digest(*h.finalize().as_bytes()),
        }
    }
}

/// SHA-256 of a short byte string (names, records).
pub fn sha256(data: &[u8]) -> Digest {
    let mut h = Hasher::new(HashAlg::Sha256);
    h.update(data);
    h.finish()
}

/// Hashes everything `r` yields, advancing `bar`. Returns the digest and the byte count, so the
/// caller can tell whether the file changed size under it.
pub fn hash_reader<R: Read>(alg: HashAlg, r: R, bar: &ProgressBar) -> io::Result<(Digest, u64)> {
    Ok(hash_reader_until(alg, r, bar, None)?.expect("no deadline"))
}

/// Like [`hash_reader`], but gives up (returns `None`) once `deadline` has passed.
pub fn hash_reader_until<R: Read>(
    alg: HashAlg,
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
        let mut h = Hasher::new(alg);
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

/// Hashes the first `size` bytes of `r` and reads nothing past them: the caller knows the file's
/// size and checks its stamp afterwards (a file that grew has another stamp; one that shrank ends
/// early, `UnexpectedEof`). With `keep`, the bytes are read in one piece and returned too.
pub fn hash_exact<R: Read>(
    alg: HashAlg,
    mut r: R,
    size: u64,
    bar: &ProgressBar,
    keep: bool,
) -> io::Result<(Digest, Option<Vec<u8>>)> {
    let mut h = Hasher::new(alg);
    if keep {
        let mut bytes = vec![0u8; usize::try_from(size).map_err(io::Error::other)?];
        r.read_exact(&mut bytes)?;
        h.update(&bytes);
        bar.inc(size);
        return Ok((h.finish(), Some(bytes)));
    }
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        buf.resize(HASH_BUF, 0);
        let mut left = size;
        while left > 0 {
            let n = left.min(HASH_BUF as u64) as usize;
            r.read_exact(&mut buf[..n])?;
            h.update(&buf[..n]);
            bar.inc(n as u64);
            left -= n as u64;
        }
        Ok((h.finish(), None))
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
    fn split_updates_match_one_update() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for alg in [HashAlg::Sha256, HashAlg::Blake3] {
            let mut whole = Hasher::new(alg);
            whole.update(&data);
            let mut parts = Hasher::new(alg);
            for piece in data.chunks(4097) {
                parts.update(piece);
            }
            assert_eq!(whole.finish(), parts.finish(), "{alg}");
        }
    }

    #[test]
    fn known_digests() {
        let bar = ProgressBar::hidden();
        let (d, n) = hash_reader(HashAlg::Sha256, &b""[..], &bar).unwrap();
        assert_eq!(
            (d.to_hex().as_str(), n),
            ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 0)
        );
        let (d, n) = hash_reader(HashAlg::Sha256, &b"abc"[..], &bar).unwrap();
        assert_eq!(d.to_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(n, 3);
        // The BLAKE3 paper's test vectors: empty input and "abc".
        let (d, _) = hash_reader(HashAlg::Blake3, &b""[..], &bar).unwrap();
        assert_eq!(d.to_hex(), "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262");
        let (d, _) = hash_reader(HashAlg::Blake3, &b"abc"[..], &bar).unwrap();
        assert_eq!(d.to_hex(), "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85");
    }
}
