//! The sender's digest cache: a file's digest remembered by (device, inode, size, mtime, ctime),
//! so sending the same file again — a retry, a resume, a repeat — does not read it twice.
//!
//! Any write to a file changes its ctime (and size or mtime), and a new file on a reused inode
//! gets a new ctime, so a stamp that matches means the content is the one that was hashed. The
//! cache can only save time, never produce a false "verified": the receiver hashes the bytes it
//! gets and compares them with the digest offered, wherever that digest came from.
//!
//! Storage: one append-only text file per algorithm, `$XDG_CACHE_HOME/xfer/digests-v1` for SHA-256
//! and `digests-blake3-v1` for BLAKE3 (default `~/.cache/xfer/`), a line per entry:
//! `dev ino size mtime_s mtime_ns ctime_s ctime_ns ALG HEX`.
//! New lines are appended in one write per send (appends are atomic), so concurrent senders need
//! no lock; the last entry for a
//! stamp wins; the file is compacted when most of its lines are stale. The cache is an
//! optimisation: if it cannot be read or written, xfer hashes as if it were empty.

use std::collections::HashMap;
use std::fs::{self, Metadata, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::protocol::{Digest, HashAlg};

/// Name of the cache file for SHA-256; the version is bumped if the line format changes.
const FILE_NAME: &str = "digests-v1";

/// The cache file of an algorithm: SHA-256 keeps the original name.
fn file_name(alg: HashAlg) -> String {
    match alg {
        HashAlg::Sha256 => FILE_NAME.to_string(),
        other => format!("digests-{other}-v1"),
    }
}

/// Compaction threshold: rewrite once the file has this many lines more than live entries.
const STALE_LINES: usize = 10_000;

/// What identifies one version of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Stamp {
    pub fn of(meta: &Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// An opaque name for this version of this file, for the receiver's resume records: a hash,
    /// so device and inode numbers do not leave the machine.
    pub fn tag(&self) -> [u8; 16] {
        let text = format!(
            "xfer stamp {} {} {} {} {} {} {}",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1
        );
        let d = crate::hash::sha256(text.as_bytes());
        std::array::from_fn(|i| d.0[i])
    }

    fn line(&self, alg: HashAlg, digest: &Digest) -> String {
        format!(
            "{} {} {} {} {} {} {} {alg} {}\n",
            self.dev, self.ino, self.size, self.mtime.0, self.mtime.1, self.ctime.0, self.ctime.1, digest
        )
    }

    fn parse(line: &str, alg: HashAlg) -> Option<(Stamp, Digest)> {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 9 || HashAlg::from_name(f[7]) != Some(alg) || f[8].len() != 64 {
            return None;
        }
        let n = |i: usize| f[i].parse::<i64>().ok();
        let u = |i: usize| f[i].parse::<u64>().ok();
        let mut digest = [0u8; 32];
        for (i, b) in digest.iter_mut().enumerate() {
            *b = u8::from_str_radix(f[8].get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let stamp =
            Stamp { dev: u(0)?, ino: u(1)?, size: u(2)?, mtime: (n(3)?, n(4)?), ctime: (n(5)?, n(6)?) };
        Some((stamp, Digest(digest)))
    }
}

/// The loaded cache. `path` is `None` when there is no cache folder to use.
pub struct DigestCache {
    path: Option<PathBuf>,
    alg: HashAlg,
    /// Lines not yet appended to the file: written in one append when dropped (or flushed), so a
    /// batch of 10,000 files costs one write, not 10,000.
    unsaved: String,
    /// Latest known version of each file, by (device, inode): a file that keeps changing holds
    /// one entry, not one per version.
    map: HashMap<(u64, u64), (Stamp, Digest)>,
}

impl DigestCache {
    /// The cache in the user's cache folder, or an empty one that stores nothing.
    pub fn open_default(alg: HashAlg) -> DigestCache {
        let dir = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
        match dir {
            Some(d) => DigestCache::open(&d.join("xfer").join(file_name(alg)), alg),
            None => DigestCache { path: None, alg, unsaved: String::new(), map: HashMap::new() },
        }
    }

    /// Loads the cache file at `path`; a missing or unreadable file is an empty cache.
    pub fn open(path: &Path, alg: HashAlg) -> DigestCache {
        let text = fs::read_to_string(path).unwrap_or_default();
        let mut map = HashMap::new();
        let mut lines = 0;
        for (stamp, digest) in text.lines().filter_map(|l| Stamp::parse(l.trim_end(), alg)) {
            map.insert((stamp.dev, stamp.ino), (stamp, digest));
            lines += 1;
        }
        let cache = DigestCache { path: Some(path.to_path_buf()), alg, unsaved: String::new(), map };
        if lines > cache.map.len() + STALE_LINES {
            cache.compact();
        }
        cache
    }

    pub fn get(&self, stamp: &Stamp) -> Option<Digest> {
        self.map.get(&(stamp.dev, stamp.ino)).filter(|(s, _)| s == stamp).map(|(_, d)| *d)
    }

    /// Remembers a digest: in memory now, in the file at the next [`DigestCache::flush`].
    pub fn put(&mut self, stamp: Stamp, digest: Digest) {
        self.map.insert((stamp.dev, stamp.ino), (stamp, digest));
        if self.path.is_some() {
            self.unsaved.push_str(&stamp.line(self.alg, &digest));
        }
    }

    /// Appends what was remembered since the last flush. Failures are ignored: the cache only
    /// saves time.
    pub fn flush(&mut self) {
        let Some(path) = &self.path else { return };
        if self.unsaved.is_empty() {
            return;
        }
        let append = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir)?;
            }
            let mut f = OpenOptions::new().create(true).append(true).open(path)?;
            f.write_all(self.unsaved.as_bytes())
        };
        let _ = append();
        self.unsaved.clear();
    }

    /// Rewrites the file with live entries only (temporary file, then rename).
    fn compact(&self) {
        let Some(path) = &self.path else { return };
        let text: String = self.map.values().map(|(s, d)| s.line(self.alg, d)).collect();
        let tmp = path.with_extension("tmp");
        if fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, path)).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

impl Drop for DigestCache {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64) -> Stamp {
        Stamp { dev: 1, ino, size: 3, mtime: (10, 20), ctime: (30, -1) }
    }

    #[test]
    fn entries_survive_a_reload_and_the_last_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(FILE_NAME);
        let mut c = DigestCache::open(&path, HashAlg::Sha256);
        c.put(stamp(1), Digest([1; 32]));
        c.put(stamp(2), Digest([2; 32]));
        c.put(stamp(1), Digest([3; 32]));
        drop(c);
        let c = DigestCache::open(&path, HashAlg::Sha256);
        assert_eq!(c.get(&stamp(1)), Some(Digest([3; 32])));
        assert_eq!(c.get(&stamp(2)), Some(Digest([2; 32])));
        assert_eq!(c.get(&stamp(3)), None);
        let mut other = stamp(1);
        other.ctime.1 = 0;
        assert_eq!(c.get(&other), None, "any change to the stamp misses");
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let good = stamp(7).line(HashAlg::Sha256, &Digest([7; 32]));
        fs::write(&path, format!("junk\n1 2 3\n{good}1 2 3 4 5 6 7 sha256 zz\n{}", &good[..good.len() - 5]))
            .unwrap();
        let c = DigestCache::open(&path, HashAlg::Sha256);
        assert_eq!(c.map.len(), 1);
        assert_eq!(c.get(&stamp(7)), Some(Digest([7; 32])));
        // A line of another algorithm is not a BLAKE3 digest.
        assert_eq!(DigestCache::open(&path, HashAlg::Blake3).map.len(), 0);
    }

    #[test]
    fn stale_lines_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let line = stamp(1).line(HashAlg::Sha256, &Digest([1; 32]));
        fs::write(&path, line.repeat(STALE_LINES + 2)).unwrap();
        let c = DigestCache::open(&path, HashAlg::Sha256);
        assert_eq!(c.get(&stamp(1)), Some(Digest([1; 32])));
        assert_eq!(fs::read_to_string(&path).unwrap(), line);
    }
}
