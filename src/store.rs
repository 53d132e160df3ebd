//! Where received bytes land in the target folder: a hidden temporary file, written, synced, and
//! only then given its final name; existing files are recognised or kept.
//!
//! Guarantees: a file appears under its final name only after its digest matched and its data and
//! the folder entry are on stable storage (fsync of the file, rename, fsync of the folder). A
//! temporary file is removed when the transfer fails (its handle is dropped). Names given here are
//! already validated single components, so every path is `dir.join(name)` and stays inside `dir`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::ProgressBar;
use tempfile::NamedTempFile;

use crate::hash::hash_reader_until;
use crate::protocol::Digest;
use crate::sanitize::numbered_name;

/// How many keep-both names (`img (1).jpg` ... ) are tried before giving up.
pub const MAX_KEEP_BOTH: u32 = 9999;

/// Prefix of temporary files: hidden, and recognisable by a later resume.
pub const TEMP_PREFIX: &str = ".xfer-";
/// Suffix of temporary files.
pub const TEMP_SUFFIX: &str = ".part";

/// Permission bits of stored files. The sender's modes travel with folders (issue 3); until then
/// files get the usual default for a user's documents.
const FILE_MODE: u32 = 0o644;

/// If a file with this exact content is already stored as `name` or one of its keep-both
/// variants, returns the name it is stored under. Only same-size regular files are hashed, and
/// only until `deadline`: the sender is waiting for the reply, and a peer must not be able to make
/// the receiver read huge files for nothing. Past the deadline the answer is "not found", which
/// costs a resend (stored beside the old file), never a wrong "already have it".
pub fn find_existing(
    dir: &Path,
    name: &str,
    (size, digest): (u64, &Digest),
    overwrite: bool,
    deadline: Instant,
) -> io::Result<Option<String>> {
    let last = if overwrite { 0 } else { MAX_KEEP_BOTH };
    for n in 0..=last {
        let candidate = numbered_name(name, n);
        let meta = match fs::symlink_metadata(dir.join(&candidate)) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Never follow a symlink, and never read a fifo or device the folder happens to contain.
        if meta.file_type().is_file() && meta.len() == size {
            let file = File::open(dir.join(&candidate))?;
            match hash_reader_until(file, &ProgressBar::hidden(), Some(deadline))? {
                Some((d, _)) if &d == digest => return Ok(Some(candidate)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
    Ok(None)
}

/// Bytes available to an unprivileged writer in `dir`'s file system.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A file being received: hidden until [`Incoming::commit`].
pub struct Incoming {
    tmp: NamedTempFile,
    dir: PathBuf,
}

impl Incoming {
    /// Creates a new, exclusive temporary file in `dir`.
    pub fn create(dir: &Path) -> io::Result<Incoming> {
        let tmp = tempfile::Builder::new().prefix(TEMP_PREFIX).suffix(TEMP_SUFFIX).tempfile_in(dir)?;
        Ok(Incoming { tmp, dir: dir.to_path_buf() })
    }

    /// The open file, for writing the body.
    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    /// Makes the data durable and gives the file its final name. Without `overwrite` an existing
    /// name is never replaced: the first free keep-both name is taken, atomically
    /// (`renameat2(RENAME_NOREPLACE)` through tempfile), so two concurrent transfers of one name
    /// cannot clobber each other. With `overwrite` the rename replaces the old file atomically.
    /// Returns the name the file was stored under.
    pub fn commit(self, name: &str, overwrite: bool) -> io::Result<String> {
        let file = self.tmp.as_file();
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(FILE_MODE))?;
        file.sync_all()?;
        let mut tmp = self.tmp;
        let mut stored = None;
        for n in 0..=MAX_KEEP_BOTH {
            let candidate = numbered_name(name, n);
            let target = self.dir.join(&candidate);
            let result = if overwrite && n == 0 {
                tmp.persist(&target).map(drop).map_err(|e| (e.error, e.file))
            } else {
                tmp.persist_noclobber(&target).map(drop).map_err(|e| (e.error, e.file))
            };
            match result {
                Ok(()) => {
                    stored = Some(candidate);
                    break;
                }
                // Taken by a file, or (with --overwrite) by a folder: try the next name.
                Err((e, back))
                    if matches!(e.kind(), io::ErrorKind::AlreadyExists | io::ErrorKind::IsADirectory)
                        || e.raw_os_error() == Some(rustix::io::Errno::NOTEMPTY.raw_os_error()) =>
                {
                    tmp = back;
                }
                Err((e, _)) => return Err(e),
            }
        }
        let stored = stored.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{MAX_KEEP_BOTH} files named like this exist"),
            )
        })?;
        // The rename is durable only once the folder's entry is on disk. If that cannot be
        // promised, the file is taken back out: "failed" must mean nothing was stored.
        if let Err(e) = sync_dir(&self.dir) {
            let _ = fs::remove_file(self.dir.join(&stored));
            return Err(e);
        }
        Ok(stored)
    }
}

/// Flushes a folder's entries (new names, renames) to stable storage.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    OpenOptions::new().read(true).open(dir)?.sync_all()
}
