//! Partial files: where a body is written while it arrives, kept when a transfer is interrupted
//! so that sending the same file again resumes where it stopped.
//!
//! Each final name has one partial, `.xfer-<id>.part`, where `<id>` is derived from the name, and
//! a record `.xfer-<id>.meta` saying what it belongs to (size, hash algorithm, digest if known,
//! the sender's version tag if known, name). An entry resumes only if the record matches it (see
//! [`FileId::matches`]); a partial of any other version is truncated and started over. The prefix already on disk is hashed again before the offset is
//! promised (for at most a deadline: whatever could not be hashed in time is dropped and sent
//! again), so the final whole-file check covers every byte. A partial is locked (`flock`) while a
//! transfer uses it; a second transfer of the same name meanwhile is refused as busy.
//!
//! Paths are single validated components joined to the target folder, and the partial and its
//! record are opened with `O_NOFOLLOW`, so a symlink planted under those names is not followed.
//!
//! A file of a batch that keeps no record (it never resumes) can instead arrive in a partial with
//! no name at all ([`Partial::unnamed`], `O_TMPFILE`), linked under its final name once verified
//! and synced: no lock, no rename, nothing left behind when a transfer breaks off.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::FlockOperation;

use super::existing::MAX_KEEP_BOTH;
use super::safedir::{Kind, SafeDir, set_mode_and_mtime, set_mtime};
use crate::hash::Hasher;
use crate::protocol::{Digest, HashAlg, MAX_DEPTH};
use crate::sanitize::{TEMP_PREFIX, numbered_name};

/// Suffix of partial files.
pub const PART_SUFFIX: &str = ".part";
/// Suffix of the records beside them.
pub const RECORD_SUFFIX: &str = ".meta";

/// When a committed file reaches stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync of the file and its folder before `commit` returns.
    Fsync,
    /// Left to the caller's `syncfs` for a group of files.
    Deferred,
}

/// Read size when hashing a partial's prefix again.
const PREFIX_BUF: usize = 1024 * 1024;

/// A body being received, in its partial file, locked for this transfer.
pub struct Partial {
    file: File,
    dir: SafeDir,
    /// `.xfer-<id>`, the hidden name less its suffix; `None` for a partial with no name.
    stem: Option<String>,
    /// A record exists beside the partial (and must go when it does).
    record: bool,
    /// The permission bits the file has, when known (a partial with no name is created with the
    /// file's own): [`Partial::set_attributes`] then changes them only if they differ.
    mode: Option<u32>,
}

/// The `upto N` line of a partial's record, kept while a split body arrives: bytes `0..N` are all
/// written; past `N` parts may be missing. A resume hashes and keeps only `0..N`, so a receiver
/// killed in the middle of a split still resumes (from its last mark) rather than hashing holes.
pub struct UptoMark {
    dir: SafeDir,
    record: String,
}

impl UptoMark {
    /// Rewrites the record with `upto n` (or without it: `None`, the body is whole or cut there).
    pub fn mark(&self, n: Option<u64>) -> io::Result<()> {
        let text = read_record(&self.dir, &self.record)?;
        let mut kept = without_upto(&text);
        if let Some(n) = n {
            kept.push_str(&format!("upto {n}\n"));
        }
        rewrite_record(&self.dir, &self.record, &kept)
    }
}

/// A record's `upto N` mark (see [`UptoMark`]), if it has one.
fn upto_of(record: &str) -> Option<u64> {
    record.lines().find_map(|l| l.strip_prefix("upto ")).and_then(|v| v.parse().ok())
}

/// A record's lines but its `upto` mark.
fn without_upto(record: &str) -> String {
    record.lines().filter(|l| !l.starts_with("upto ")).map(|l| format!("{l}\n")).collect()
}

/// Replaces a partial's record with `text` at once (a new file renamed over it), so a receiver
/// killed meanwhile leaves the old record or the new one, never an empty one.
fn rewrite_record(dir: &SafeDir, record: &str, text: &str) -> io::Result<()> {
    // Still ours to sweep by age (`.xfer-*.meta`) if a crash leaves it.
    let tmp = format!("{}.new{RECORD_SUFFIX}", record.trim_end_matches(RECORD_SUFFIX));
    let _ = dir.remove_file(&tmp);
    let written = dir.create_new(&tmp).and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        let _ = dir.remove_file(&tmp);
        return Err(e);
    }
    dir.rename(&tmp, record, true)
}

/// What opening a partial for an entry gave.
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
    format!("{TEMP_PREFIX}{}", &crate::hash::sha256(name.as_bytes()).to_hex()[..32])
}

/// What a partial belongs to: the file as the sender described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    pub size: u64,
    pub alg: HashAlg,
    /// The whole file's digest, when the sender knew it up front.
    pub digest: Option<Digest>,
    /// The sender's version tag of the file (every file entry carries one).
    pub tag: Option<[u8; 16]>,
}

impl FileId {
    fn record(&self, name: &str) -> String {
        let mut s = format!("size {}\nhash {}\n", self.size, self.alg);
        if let Some(d) = &self.digest {
            s.push_str(&format!("digest {d}\n"));
        }
        if let Some(t) = &self.tag {
            s.push_str(&format!("tag {}\n", tag_hex(t)));
        }
        s.push_str(&format!("name {}\n", name.escape_debug()));
        s
    }

    /// Whether the record kept for `name` in `dir` is one that this entry (whose digest is not here)
    /// would resume if it named its digest: same name, size and algorithm, a digest recorded,
    /// and not this sender version's tag.
    pub fn digest_would_resume(&self, dir: &SafeDir, name: &str) -> bool {
        let Ok(record) = read_record(dir, &format!("{}{RECORD_SUFFIX}", stem_for(name))) else {
            return false;
        };
        let with_digest = |d: Digest| FileId { digest: Some(d), tag: None, ..self.clone() };
        let recorded = record.lines().find_map(|l| l.strip_prefix("digest ")).and_then(Digest::from_hex);
        self.digest.is_none()
            && !self.matches(name, &record)
            && recorded.is_some_and(|d| with_digest(d).matches(name, &record))
    }

    /// Whether a record (as [`FileId::record`] wrote it) describes this file under `name`: same
    /// name, size and algorithm, and the same digest when both sides know one, otherwise the
    /// same version tag. A digest that differs always means another version.
    fn matches(&self, name: &str, record: &str) -> bool {
        let field = |key: &str| {
            record
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
                .map(str::to_string)
        };
        let same = |key: &str, want: String| field(key) == Some(want);
        if !same("size", self.size.to_string())
            || !same("hash", self.alg.to_string())
            || !same("name", name.escape_debug().to_string())
        {
            return false;
        }
        match (field("digest"), &self.digest) {
            (Some(have), Some(want)) => have == want.to_hex(),
            _ => self.tag.is_some() && field("tag") == self.tag.as_ref().map(tag_hex),
        }
    }
}

fn tag_hex(bytes: &[u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Partial {
    /// Opens the partial for `name` in `dir` for an entry of `size` bytes with `digest`, resuming
    /// from what it holds if it belongs to exactly that file. The prefix is re-hashed until
    /// `deadline` at most, advancing `bar`.
    /// Without `resumable` no record is written, so an interruption leaves nothing to resume.
    pub fn open(
        dir: SafeDir,
        name: &str,
        id: &FileId,
        deadline: Instant,
        resumable: bool,
        bar: &indicatif::ProgressBar,
    ) -> io::Result<Opened> {
        let stem = stem_for(name);
        let (part_name, record_name) = (format!("{stem}{PART_SUFFIX}"), format!("{stem}{RECORD_SUFFIX}"));
        let Some((file, len)) = open_locked(&dir, &part_name)? else {
            return Ok(Opened::Busy);
        };
        let (size, alg) = (id.size, id.alg);
        let want = id.record(name);
        let mut have = match read_record(&dir, &record_name) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            // Not a record we wrote (a fifo, a huge or unreadable file): discarded like a
            // corrupt one, so the new record can take its place.
            Err(_) => {
                let _ = dir.remove_file(&record_name);
                String::new()
            }
        };
        // A split body writes its parts out of order: only the prefix its record vouches for
        // (`upto`, see `UptoMark`) is contiguous; past it there may be holes.
        let upto = upto_of(&have);
        let len = upto.map_or(len, |u| len.min(u));
        let (hasher, offset) = if id.matches(name, &have) && len <= size {
            bar.set_length(len);
            hash_prefix(&file, len, alg, deadline, bar)?
        } else {
            (Hasher::new(alg), 0)
        };
        // Drop whatever is not covered by the hash (or everything, for another version).
        if len != offset {
            file.set_len(offset)?;
        }
        // Cut there, the partial has no holes: an `upto` mark is dropped (a split body that goes
        // on sets its own), or a later body that writes past it would resume from it again.
        if offset > 0 && upto.is_some() {
            let kept = without_upto(&have);
            rewrite_record(&dir, &record_name, &kept)?;
            have = kept;
        }
        if offset == 0
            && resumable
            && let Err(e) = dir.open_rw(&record_name, true).and_then(|mut r| r.write_all(want.as_bytes()))
        {
            // No record, no resume: take the empty partial back out too.
            let _ = dir.remove_file(&part_name);
            return Err(e);
        }
        if offset == 0 && !resumable && !have.is_empty() {
            // Another version's record must not outlive the bytes it described.
            let _ = dir.remove_file(&record_name);
            have.clear();
        }
        let record = resumable || !have.is_empty();
        let mut partial = Partial { file, dir, stem: Some(stem), record, mode: None };
        if offset > 0 {
            partial.file.seek(SeekFrom::Start(offset))?;
        }
        Ok(Opened::Ready { partial, offset, hasher })
    }

    /// Bytes the partial of `name` in `dir` already holds of the file `id` describes (by its
    /// record: same name, size, algorithm and version tag), so a resume reserves only the rest.
    /// 0 when there is no such partial; a lookup, nothing is opened for writing.
    pub fn held_for(dir: &SafeDir, name: &str, id: &FileId) -> u64 {
        let stem = stem_for(name);
        let matches = read_record(dir, &format!("{stem}{RECORD_SUFFIX}")).is_ok_and(|r| id.matches(name, &r));
        let record = read_record(dir, &format!("{stem}{RECORD_SUFFIX}")).unwrap_or_default();
        let upto = upto_of(&record);
        match dir.kind(&format!("{stem}{PART_SUFFIX}")) {
            Ok(Kind::File(len)) if matches => len.min(id.size).min(upto.unwrap_or(u64::MAX)),
            _ => 0,
        }
    }

    /// True if `name` has no partial in `dir`: a fresh, unresumable file can then be answered
    /// without creating anything, and [`Partial::reopen`] creates it when its body comes.
    pub fn absent(dir: &SafeDir, name: &str) -> bool {
        matches!(dir.kind(&format!("{}{PART_SUFFIX}", stem_for(name))), Ok(Kind::Missing))
    }

    /// Reopens (or creates, for offset 0) the partial for `name` to continue at `offset`, as an
    /// earlier answer promised (a batch answers every entry first and unlocks in between). `None`
    /// if another transfer holds it now or it no longer has `offset` bytes. `record` says whether
    /// a record was written for it.
    pub fn reopen(dir: SafeDir, name: &str, offset: u64, record: bool) -> io::Result<Option<Partial>> {
        let stem = stem_for(name);
        let Some((file, len)) = open_locked(&dir, &format!("{stem}{PART_SUFFIX}"))? else {
            return Ok(None);
        };
        if len < offset {
            return Ok(None);
        }
        if len != offset {
            file.set_len(offset)?;
        }
        let mut partial = Partial { file, dir, stem: Some(stem), record, mode: None };
        if offset > 0 {
            partial.file.seek(SeekFrom::Start(offset))?;
        }
        Ok(Some(partial))
    }

    /// A partial with no name in `dir` (`O_TMPFILE`) for a file that keeps no record, created
    /// with the file's permission bits `mode` (less the umask or as the folder's default ACL has
    /// it: they are set again where that changed them): its unverified bytes cannot be
    /// opened by anyone, vanish if the transfer breaks off, and get a name only when
    /// [`Partial::commit`] links it, never replacing a file (not for `--overwrite`: a link cannot
    /// replace a name). `Ok(None)` where no such file can be made: use [`Partial::reopen`].
    pub fn unnamed(dir: SafeDir, mode: u32) -> io::Result<Option<Partial>> {
        let Some(file) = dir.create_unnamed(mode)? else { return Ok(None) };
        let mode = dir.creation_mask().map(|mask| mode & 0o777 & !mask);
        Ok(Some(Partial { file, dir, stem: None, record: false, mode }))
    }

    /// A second descriptor of the partial, for writing a split body's parts at their offsets
    /// from several connections (`pwrite`) and reading them back to hash.
    pub fn clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Where a split body notes how far its bytes are contiguous (`None`: no record to note it
    /// in; such a partial is never resumed anyway).
    pub fn upto_mark(&self) -> io::Result<Option<UptoMark>> {
        let Some(record) = self.name(RECORD_SUFFIX).filter(|_| self.record) else { return Ok(None) };
        Ok(Some(UptoMark { dir: self.dir.try_clone()?, record }))
    }

    /// Cuts the partial to its first `len` bytes (a split body that broke off keeps only its
    /// contiguous prefix).
    pub fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// Whether a record sits beside this partial.
    pub fn has_record(&self) -> bool {
        self.record
    }

    /// The open file, positioned at the resume offset, for writing the body.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The hidden name with `suffix`; `None` for a partial with no name.
    fn name(&self, suffix: &str) -> Option<String> {
        self.stem.as_ref().map(|stem| format!("{stem}{suffix}"))
    }

    /// Removes the partial and its record: its content is wrong, or cannot be used. (One with no
    /// name goes with its descriptor.)
    pub fn discard(self) {
        let (Some(part), Some(record)) = (self.name(PART_SUFFIX), self.name(RECORD_SUFFIX)) else { return };
        let _ = self.dir.remove_file(&part);
        if self.record {
            let _ = self.dir.remove_file(&record);
        }
    }

    /// Leaves the partial for a later resume (an empty one is removed: nothing to resume; one with
    /// no name goes: it cannot be found again). Returns what was left, for the litter notes of the
    /// peer that left it.
    pub fn keep(self) -> Option<Left> {
        let meta = self.file.metadata().ok().filter(|m| m.len() > 0);
        let (Some(meta), Some(stem)) = (meta, self.stem.clone()) else {
            self.discard();
            return None;
        };
        Some(Left { stem, dev: meta.dev(), ino: meta.ino(), bytes: meta.len() })
    }

    /// Sets the file's permission bits (only 0o777) and modification time before it is stored.
    /// The bits are left alone when the file already has them (see [`Partial::unnamed`]).
    pub fn set_attributes(&self, mode: u32, mtime: (i64, u32)) -> io::Result<()> {
        if self.mode == Some(mode & 0o777) {
            return set_mtime(self.file.as_fd(), mtime);
        }
        set_mode_and_mtime(self.file.as_fd(), mode, mtime)
    }

    /// Gives the file its final name. Without `overwrite` an existing name is never replaced: the
    /// first free keep-both name is taken, atomically (`renameat2(RENAME_NOREPLACE)`), so two
    /// transfers cannot clobber each other; with `overwrite` the rename replaces the old file
    /// atomically. `Fsync` flushes the file before the rename and its folder after; `Deferred`
    /// does neither: the caller has synced the data (one `syncfs` for a group) and syncs the
    /// renames before acknowledging any of them. Returns the stored name.
    pub fn commit(self, name: &str, overwrite: bool, durability: Durability) -> io::Result<String> {
        self.commit_as(name, overwrite, durability, MAX_KEEP_BOTH)
    }

    /// [`Partial::commit`] to `name` itself, replacing what is there (`xfer recv -o PATH`): no
    /// keep-both name is ever taken, a folder in the way is an error.
    pub fn commit_exact(self, name: &str, durability: Durability) -> io::Result<String> {
        self.commit_as(name, true, durability, 0).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(e.kind(), format!("{name:?} is a folder or cannot be replaced"))
            } else {
                e
            }
        })
    }

    /// Writes the whole file to `out` and flushes it, then removes the partial and its record
    /// (`xfer recv -o -`: the verified bytes go to standard output, nothing is kept).
    pub fn pour(mut self, out: &mut impl Write) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        let copied = io::copy(&mut self.file, out).and_then(|n| out.flush().map(|()| n));
        self.discard();
        copied.map(drop)
    }

    fn commit_as(
        self,
        name: &str,
        overwrite: bool,
        durability: Durability,
        keep_both: u32,
    ) -> io::Result<String> {
        if durability == Durability::Fsync {
            self.file.sync_all()?;
        }
        let from = self.name(PART_SUFFIX);
        let mut stored = None;
        for n in 0..=keep_both {
            let candidate = numbered_name(name, n);
            let named = match &from {
                Some(from) => self.dir.rename(from, &candidate, overwrite && n == 0),
                // A link never replaces: a file with no name is for callers that do not either.
                None if overwrite && n == 0 => {
                    Err(io::Error::other("a received file with no name cannot replace another"))
                }
                // Taken (by anything: a file, a folder, a symlink) fails with AlreadyExists,
                // as the no-replace rename does.
                None => self.dir.link_unnamed(&self.file, &candidate),
            };
            match named {
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
            io::Error::new(io::ErrorKind::AlreadyExists, format!("{keep_both} files named like this exist"))
        })?;
        if self.record
            && let Some(record) = self.name(RECORD_SUFFIX)
        {
            let _ = self.dir.remove_file(&record);
        }
        // The rename is durable only once the folder's entry is on disk. If that cannot be
        // promised, the file is taken back out: "failed" must mean nothing was stored.
        if durability == Durability::Fsync
            && let Err(e) = self.dir.sync()
        {
            let _ = self.dir.remove_file(&stored);
            return Err(e);
        }
        Ok(stored)
    }
}

/// A partial kept for a resume, as it was when its transfer ended: which file it is (its inode)
/// and how many bytes it held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    pub stem: String,
    pub dev: u64,
    pub ino: u64,
    pub bytes: u64,
}

/// Removes the partial `left` describes, and its record, if its name still names that very file
/// and no transfer holds it. Returns whether it was removed.
pub fn remove_left(dir: &SafeDir, left: &Left) -> io::Result<bool> {
    take_out(dir, &left.stem, |meta| (meta.dev(), meta.ino()) == (left.dev, left.ino))
}

/// Removes the partial of `name` in `dir`, and its record, if it is empty and no transfer holds
/// it (an answer created or truncated it, and its body never came). Creates nothing.
pub fn remove_if_empty(dir: &SafeDir, name: &str) -> io::Result<bool> {
    take_out(dir, &stem_for(name), |meta| meta.len() == 0)
}

/// Removes the partial `stem` and its record if `wanted` says so of the file its name names, once
/// locked (so not in use) and checked to be still under that name. The record goes first: a
/// newcomer meanwhile finds the partial locked (busy), and after its removal creates its own.
fn take_out(dir: &SafeDir, stem: &str, wanted: impl FnOnce(&fs::Metadata) -> bool) -> io::Result<bool> {
    let part = format!("{stem}{PART_SUFFIX}");
    let file = match dir.open_read(&part) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // Held by a transfer, or no longer under the name: not ours to remove.
    if !matches!(lock_verified(dir, &part, &file)?, Locked::Ours(_)) || !wanted(&file.metadata()?) {
        return Ok(false);
    }
    let _ = dir.remove_file(&format!("{stem}{RECORD_SUFFIX}"));
    dir.remove_file(&part)?;
    Ok(true)
}

/// Opens (creating it if missing) and locks the partial `part_name`; returns it with its length,
/// or `None` if another transfer holds it. See [`lock_verified`].
fn open_locked(dir: &SafeDir, part_name: &str) -> io::Result<Option<(File, u64)>> {
    // A partial this call creates is ours: nobody can have committed it under another name
    // before we lock it (the common case, a fresh file: no lookup by name needed).
    match dir.create_new(part_name) {
        Ok(file) => {
            return match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => Ok(Some((file, 0))),
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(None),
                Err(e) => Err(e.into()),
            };
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // A lost race (the name was committed between our open and our lock) is retried: the next
    // open creates a fresh partial under the name. Three losses in a row count as busy.
    for _ in 0..3 {
        let file = dir.open_rw(part_name, false)?;
        match lock_verified(dir, part_name, &file)? {
            Locked::Ours(len) => return Ok(Some((file, len))),
            Locked::Busy => return Ok(None),
            Locked::Gone => continue,
        }
    }
    Ok(None)
}

/// What locking an opened partial found.
#[derive(Debug, PartialEq, Eq)]
enum Locked {
    /// Locked, and still the file under the partial's name: its length.
    Ours(u64),
    /// Another transfer holds the lock.
    Busy,
    /// The name no longer refers to this file: a transfer that held it committed it (renamed it
    /// to a final name) after we opened it. It must not be touched: it is a stored file now.
    Gone,
}

/// Locks `file`, opened as `part_name` in `dir`, and then checks it is still ours: a regular file
/// with no other names (a hard link planted under a partial's name would otherwise receive the
/// writes), and still the file that `part_name` names. Checking after the lock closes the window
/// in which a committed file could be reopened, locked and truncated by a newcomer.
fn lock_verified(dir: &SafeDir, part_name: &str, file: &File) -> io::Result<Locked> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => return Ok(Locked::Busy),
        Err(e) => return Err(e.into()),
    }
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() > 1 {
        return Err(io::Error::other(format!("{part_name}: not a plain regular file (type or hard links)")));
    }
    match dir.stat(part_name) {
        Ok(st) if st.st_dev == meta.dev() && st.st_ino == meta.ino() => Ok(Locked::Ours(meta.len())),
        Ok(_) => Ok(Locked::Gone),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Locked::Gone),
        Err(e) => Err(e),
    }
}

/// Largest record read: a record is a few lines (size, hash, digest, tag, name).
pub(crate) const MAX_RECORD: u64 = 4096;

/// Reads the record `record_name`: only a regular file of at most [`MAX_RECORD`] bytes, opened
/// without blocking. Anything else in DIR under that name (a fifo, a device, a huge or sparse
/// file) is an error, never a hang or an allocation of its size.
fn read_record(dir: &SafeDir, record_name: &str) -> io::Result<String> {
    let f = dir.open_read(record_name)?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() > MAX_RECORD {
        return Err(io::Error::other(format!("{record_name}: not a record (type or size)")));
    }
    let mut text = String::new();
    f.take(MAX_RECORD).read_to_string(&mut text)?;
    Ok(text)
}

/// Hashes the first `len` bytes of `file`, stopping early at `deadline` on a block boundary.
/// Returns the hash state and how many bytes it covers.
fn hash_prefix(
    file: &File,
    len: u64,
    alg: HashAlg,
    deadline: Instant,
    bar: &indicatif::ProgressBar,
) -> io::Result<(Hasher, u64)> {
    let mut hasher = Hasher::new(alg);
    let mut buf = vec![0u8; PREFIX_BUF];
    let mut done = 0u64;
    while done < len && Instant::now() < deadline {
        let want = (len - done).min(PREFIX_BUF as u64) as usize;
        file.read_exact_at(&mut buf[..want], done)?;
        hasher.update(&buf[..want]);
        done += want as u64;
        bar.inc(want as u64);
    }
    Ok((hasher, done))
}

/// Removes partials (and records) in `dir` and its subfolders not modified for `max_age` and not
/// in use. Returns how many partials were removed. Folders are entered with `O_NOFOLLOW` and files
/// removed relative to their folder's descriptor, so a symlink cannot lead the sweep elsewhere.
pub fn sweep(dir: &Path, max_age: Duration) -> io::Result<usize> {
    let root = SafeDir::open_root(dir)?;
    sweep_in(&root, dir, max_age, 0)
}

fn sweep_in(dir: &SafeDir, listing: &Path, max_age: Duration, depth: usize) -> io::Result<usize> {
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in fs::read_dir(listing)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Ok(st) = dir.stat(name) else { continue };
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if kind == rustix::fs::FileType::Directory {
            if depth < MAX_DEPTH
                && let Ok((sub, _)) = dir.subdir(name, false)
            {
                // A folder that cannot be read is skipped, not a reason to stop sweeping.
                removed += sweep_in(&sub, &listing.join(name), max_age, depth + 1).unwrap_or(0);
            }
            continue;
        }
        let ours =
            name.starts_with(TEMP_PREFIX) && (name.ends_with(PART_SUFFIX) || name.ends_with(RECORD_SUFFIX));
        let modified = SystemTime::UNIX_EPOCH + Duration::from_secs(st.st_mtime.max(0) as u64);
        let age = now.duration_since(modified).unwrap_or_default();
        if !ours || kind != rustix::fs::FileType::RegularFile || age < max_age {
            continue;
        }
        if name.ends_with(PART_SUFFIX) {
            // In use by a transfer right now: leave it.
            let Ok(f) = dir.open_read(name) else { continue };
            if rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
                continue;
            }
            removed += 1;
        }
        let _ = dir.remove_file(name);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> (tempfile::TempDir, SafeDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SafeDir::open_root(tmp.path()).unwrap();
        (tmp, dir)
    }

    #[test]
    fn a_partial_committed_between_open_and_lock_is_never_ours() {
        let (tmp, dir) = folder();
        let part = format!("{}{PART_SUFFIX}", stem_for("f"));
        // A newcomer opens the partial's name...
        let newcomer = dir.open_rw(&part, false).unwrap();
        // ...then the transfer that held it commits it under its final name.
        std::fs::write(tmp.path().join(&part), b"verified content").unwrap();
        dir.rename(&part, "f", false).unwrap();
        // Locking what the newcomer opened must not hand it the stored file.
        assert_eq!(lock_verified(&dir, &part, &newcomer).unwrap(), Locked::Gone);
        // Through the real entry point, the newcomer gets a fresh, empty partial instead.
        let (fresh, len) = open_locked(&dir, &part).unwrap().expect("not busy");
        assert_eq!(len, 0);
        assert_ne!(fresh.metadata().unwrap().ino(), std::fs::metadata(tmp.path().join("f")).unwrap().ino());
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"verified content");
    }

    #[test]
    fn a_locked_partial_is_busy_and_a_hard_linked_one_refused() {
        let (tmp, dir) = folder();
        let part = format!("{}{PART_SUFFIX}", stem_for("g"));
        let (held, _) = open_locked(&dir, &part).unwrap().unwrap();
        assert!(open_locked(&dir, &part).unwrap().is_none(), "a second holder");
        drop(held);
        std::fs::hard_link(tmp.path().join(&part), tmp.path().join("elsewhere")).unwrap();
        assert!(open_locked(&dir, &part).is_err(), "a partial with another name");
    }

    #[test]
    fn only_an_unchanged_unlocked_partial_is_removed_as_litter() {
        let (tmp, dir) = folder();
        let part = format!("{}{PART_SUFFIX}", stem_for("h"));
        let record = format!("{}{RECORD_SUFFIX}", stem_for("h"));
        let (held, _) = open_locked(&dir, &part).unwrap().unwrap();
        std::fs::write(tmp.path().join(&record), b"size 3\n").unwrap();
        (&held).write_all(b"abc").unwrap();
        let meta = held.metadata().unwrap();
        let left = Left { stem: stem_for("h"), dev: meta.dev(), ino: meta.ino(), bytes: 3 };
        // In use: neither removed as litter nor as empty.
        assert!(!remove_left(&dir, &left).unwrap());
        drop(held);
        assert!(!remove_if_empty(&dir, "h").unwrap(), "it holds bytes");
        // Another file under the name now (the old one committed, a new partial made).
        let other = Left { ino: left.ino + 1, ..left.clone() };
        assert!(!remove_left(&dir, &other).unwrap());
        assert!(remove_left(&dir, &left).unwrap());
        assert!(!tmp.path().join(&part).exists() && !tmp.path().join(&record).exists());
        // An empty one goes; a missing one is not created.
        let (empty, _) = open_locked(&dir, &part).unwrap().unwrap();
        drop(empty);
        assert!(remove_if_empty(&dir, "h").unwrap());
        assert!(!remove_if_empty(&dir, "h").unwrap());
        assert!(!tmp.path().join(&part).exists());
    }

    #[test]
    fn records_are_read_only_when_small_and_regular() {
        let (tmp, dir) = folder();
        std::fs::write(tmp.path().join("ok.meta"), b"size 1\n").unwrap();
        assert_eq!(read_record(&dir, "ok.meta").unwrap(), "size 1\n");
        // A fifo would block a plain open forever; a sparse giant would cost its size in memory.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            tmp.path().join("fifo.meta"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(read_record(&dir, "fifo.meta").is_err());
        let big = std::fs::File::create(tmp.path().join("big.meta")).unwrap();
        big.set_len(256 << 20).unwrap();
        assert!(read_record(&dir, "big.meta").is_err());
        assert!(read_record(&dir, "missing.meta").unwrap_err().kind() == io::ErrorKind::NotFound);
    }
}
