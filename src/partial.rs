//! Partial files: where a body is written while it arrives, kept when a transfer is interrupted
//! so that sending the same file again resumes where it stopped.
//!
//! Each final name has one partial, `.xfer-<id>.part`, where `<id>` is derived from the name, and
//! a record `.xfer-<id>.meta` saying what it belongs to (size, SHA-256, name). An offer resumes
//! only if the record matches its size and digest exactly; a partial of any other version is
//! truncated and started over. The prefix already on disk is hashed again before the offset is
//! promised (for at most a deadline: whatever could not be hashed in time is dropped and sent
//! again), so the final whole-file check covers every byte. A partial is locked (`flock`) while a
//! transfer uses it; a second transfer of the same name meanwhile is refused as busy.
//!
//! Paths are single validated components joined to the target folder, and the partial and its
//! record are opened with `O_NOFOLLOW`, so a symlink planted under those names is not followed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::{FlockOperation, RenameFlags};

use crate::hash::Hasher;
use crate::protocol::Digest;
use crate::sanitize::numbered_name;
use crate::store::{MAX_KEEP_BOTH, sync_dir};

/// Prefix of every file xfer keeps in the target folder; names from the wire may not use it.
pub const TEMP_PREFIX: &str = ".xfer-";
/// Suffix of partial files.
pub const PART_SUFFIX: &str = ".part";
/// Suffix of the records beside them.
pub const RECORD_SUFFIX: &str = ".meta";

/// Permission bits of stored files. The sender's modes travel with folders (issue 3); until then
/// files get the usual default for a user's documents. Partials stay private (0600) until then.
const FILE_MODE: u32 = 0o644;

/// Read size when hashing a partial's prefix again.
const PREFIX_BUF: usize = 1024 * 1024;

/// A body being received, in its partial file, locked for this transfer.
pub struct Partial {
    file: File,
    dir: PathBuf,
    stem: String,
}

/// What opening a partial for an offer gave.
// One per transfer and moved out at once: boxing the hash state would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Opened {
    /// Write from `offset`; `hasher` already holds the digest state of bytes `0..offset`.
    Ready { partial: Partial, offset: u64, hasher: Hasher },
    /// Another transfer of the same name holds the partial.
    Busy,
}

/// The hidden stem (`.xfer-<id>`) of the partial and record for a final name.
pub fn stem_for(name: &str) -> String {
    let mut h = Hasher::new();
    h.update(name.as_bytes());
    format!("{TEMP_PREFIX}{}", &h.finish().to_hex()[..32])
}

fn record_text(name: &str, size: u64, digest: &Digest) -> String {
    format!("size {size}\nsha256 {digest}\nname {}\n", name.escape_debug())
}

/// Opens (without following symlinks) a file in the target folder for reading and writing.
fn open_nofollow(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

impl Partial {
    /// Opens the partial for `name` for an offer of `size` bytes with `digest`, resuming from
    /// what it holds if it belongs to exactly that file. The prefix is re-hashed until
    /// `deadline` at most.
    pub fn open(
        dir: &Path,
        name: &str,
        (size, digest): (u64, &Digest),
        deadline: Instant,
    ) -> io::Result<Opened> {
        let stem = stem_for(name);
        let file = open_nofollow(&dir.join(format!("{stem}{PART_SUFFIX}")), false)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!("{stem}{PART_SUFFIX} is not a regular file")));
        }
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => return Ok(Opened::Busy),
            Err(e) => return Err(e.into()),
        }
        let record_path = dir.join(format!("{stem}{RECORD_SUFFIX}"));
        let want = record_text(name, size, digest);
        let mut have = String::new();
        if let Ok(mut r) = open_nofollow(&record_path, false) {
            let _ = r.read_to_string(&mut have);
        }
        let len = file.metadata()?.len();
        let (hasher, offset) =
            if have == want && len <= size { hash_prefix(&file, len, deadline)? } else { (Hasher::new(), 0) };
        // Drop whatever is not covered by the hash (or everything, for another version).
        file.set_len(offset)?;
        if offset == 0
            && let Err(e) = open_nofollow(&record_path, true).and_then(|mut r| r.write_all(want.as_bytes()))
        {
            // No record, no resume: take the empty partial back out too.
            let _ = fs::remove_file(dir.join(format!("{stem}{PART_SUFFIX}")));
            return Err(e);
        }
        let mut partial = Partial { file, dir: dir.to_path_buf(), stem };
        partial.file.seek(SeekFrom::Start(offset))?;
        Ok(Opened::Ready { partial, offset, hasher })
    }

    /// The open file, positioned at the resume offset, for writing the body.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn path(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}{suffix}", self.stem))
    }

    /// Removes the partial and its record: its content is wrong, or cannot be used.
    pub fn discard(self) {
        let _ = fs::remove_file(self.path(PART_SUFFIX));
        let _ = fs::remove_file(self.path(RECORD_SUFFIX));
    }

    /// Leaves the partial for a later resume (an empty one is removed: nothing to resume).
    /// Returns the number of bytes kept.
    pub fn keep(self) -> u64 {
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if len == 0 {
            self.discard();
        }
        len
    }

    /// Makes the data durable and gives the file its final name. Without `overwrite` an existing
    /// name is never replaced: the first free keep-both name is taken, atomically
    /// (`renameat2(RENAME_NOREPLACE)`), so two transfers cannot clobber each other. With
    /// `overwrite` the rename replaces the old file atomically. Returns the stored name.
    pub fn commit(self, name: &str, overwrite: bool) -> io::Result<String> {
        self.file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        self.file.sync_all()?;
        let from = self.path(PART_SUFFIX);
        let mut stored = None;
        for n in 0..=MAX_KEEP_BOTH {
            let candidate = numbered_name(name, n);
            let to = self.dir.join(&candidate);
            let result = if overwrite && n == 0 {
                fs::rename(&from, &to)
            } else {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &from,
                    rustix::fs::CWD,
                    &to,
                    RenameFlags::NOREPLACE,
                )
                .map_err(io::Error::from)
            };
            match result {
                Ok(()) => {
                    stored = Some(candidate);
                    break;
                }
                // Taken by a file, or (with --overwrite) by a folder: try the next name.
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::AlreadyExists | io::ErrorKind::IsADirectory)
                        || e.raw_os_error() == Some(rustix::io::Errno::NOTEMPTY.raw_os_error()) => {}
                Err(e) => return Err(e),
            }
        }
        let stored = stored.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{MAX_KEEP_BOTH} files named like this exist"),
            )
        })?;
        let _ = fs::remove_file(self.path(RECORD_SUFFIX));
        // The rename is durable only once the folder's entry is on disk. If that cannot be
        // promised, the file is taken back out: "failed" must mean nothing was stored.
        if let Err(e) = sync_dir(&self.dir) {
            let _ = fs::remove_file(self.dir.join(&stored));
            return Err(e);
        }
        Ok(stored)
    }
}

/// Hashes the first `len` bytes of `file`, stopping early at `deadline` on a block boundary.
/// Returns the hash state and how many bytes it covers.
fn hash_prefix(file: &File, len: u64, deadline: Instant) -> io::Result<(Hasher, u64)> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; PREFIX_BUF];
    let mut done = 0u64;
    while done < len && Instant::now() < deadline {
        let want = (len - done).min(PREFIX_BUF as u64) as usize;
        file.read_exact_at(&mut buf[..want], done)?;
        hasher.update(&buf[..want]);
        done += want as u64;
    }
    Ok((hasher, done))
}

/// Removes partials (and records) in `dir` not modified for `max_age` and not in use. Returns
/// how many partials were removed.
pub fn sweep(dir: &Path, max_age: Duration) -> io::Result<usize> {
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(TEMP_PREFIX) || !(name.ends_with(PART_SUFFIX) || name.ends_with(RECORD_SUFFIX)) {
            continue;
        }
        let meta = entry.metadata()?;
        let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
        if !meta.is_file() || age < max_age {
            continue;
        }
        if name.ends_with(PART_SUFFIX) {
            // In use by a transfer right now: leave it.
            let Ok(f) = OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(entry.path())
            else {
                continue;
            };
            if rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
                continue;
            }
            removed += 1;
        }
        let _ = fs::remove_file(entry.path());
    }
    Ok(removed)
}
