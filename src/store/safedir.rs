//! Writes confined to the target folder. Every path below it is resolved one component at a time
//! with `openat(O_NOFOLLOW | O_DIRECTORY)` from a held folder descriptor, and files are opened,
//! renamed and removed relative to their folder's descriptor, never by a path string. A symlink
//! planted in the folder, or a folder swapped for a symlink mid-transfer, makes the operation fail
//! instead of sending a write elsewhere (the fix rsync 3.4/3.5 made for its path CVEs).
//!
//! Only the target folder itself is opened by path (and may be a symlink: the user chose it).
//! Every name handed to these methods is a single component already checked by `sanitize`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

/// An open folder inside (or being) the target folder.
pub struct SafeDir {
    // Shared: a clone for each partial of a folder costs no `dup` (a batch makes thousands).
    fd: std::sync::Arc<OwnedFd>,
}

/// What a name in a folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Missing,
    /// A regular file of this many bytes.
    File(u64),
    /// A folder, symlink, fifo, device or socket.
    Other,
}

/// Mode of folders created for a batch before their own mode is applied.
const NEW_DIR_MODE: u32 = 0o755;

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

impl SafeDir {
    /// Opens the target folder itself.
    pub fn open_root(path: &Path) -> io::Result<SafeDir> {
        let fd = rustix::fs::openat(rustix::fs::CWD, path, dir_flags(), Mode::empty())?;
        Ok(SafeDir { fd: fd.into() })
    }

    /// Another handle on the same folder.
    pub fn try_clone(&self) -> io::Result<SafeDir> {
        Ok(SafeDir { fd: self.fd.clone() })
    }

    /// Opens the folder `name` inside this one, never through a symlink; creates it first when
    /// `create` and it does not exist. Returns whether it was created.
    pub fn subdir(&self, name: &str, create: bool) -> io::Result<(SafeDir, bool)> {
        let open = || rustix::fs::openat(&*self.fd, name, dir_flags() | OFlags::NOFOLLOW, Mode::empty());
        match open() {
            Ok(fd) => Ok((SafeDir { fd: fd.into() }, false)),
            Err(e) if e == rustix::io::Errno::NOENT && create => {
                match rustix::fs::mkdirat(&*self.fd, name, Mode::from_raw_mode(NEW_DIR_MODE)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                Ok((SafeDir { fd: open()?.into() }, true))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the folder at `components` below this one (see [`SafeDir::subdir`]).
    pub fn walk(&self, components: &[String], create: bool) -> io::Result<SafeDir> {
        let mut dir = self.try_clone()?;
        for c in components {
            dir = dir.subdir(c, create)?.0;
        }
        Ok(dir)
    }

    /// Opens (creating if needed, mode 0600) the file `name` for reading and writing, never
    /// through a symlink. With `truncate` its content is discarded.
    pub fn open_rw(&self, name: &str, truncate: bool) -> io::Result<File> {
        let mut flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if truncate {
            flags |= OFlags::TRUNC;
        }
        Ok(File::from(rustix::fs::openat(&*self.fd, name, flags, Mode::from_raw_mode(0o600))?))
    }

    /// Creates the file `name` (mode 0600) for reading and writing; fails with `AlreadyExists` if
    /// anything is there (a symlink included).
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(File::from(rustix::fs::openat(&*self.fd, name, flags, Mode::from_raw_mode(0o600))?))
    }

    /// Opens the file `name` for reading, never through a symlink, and without blocking: a fifo
    /// planted in the folder opens at once (and is then refused by its type) instead of holding
    /// the thread until someone writes to it. `O_NONBLOCK` changes nothing for regular files.
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        Ok(File::from(rustix::fs::openat(&*self.fd, name, flags, Mode::empty())?))
    }

    /// Metadata of `name` itself (a symlink is reported as a symlink).
    pub fn stat(&self, name: &str) -> io::Result<rustix::fs::Stat> {
        Ok(rustix::fs::statat(&*self.fd, name, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// What `name` is, without following a symlink: one `statat` answers both "is it there" and
    /// "is it a regular file, of what size".
    pub fn kind(&self, name: &str) -> io::Result<Kind> {
        match self.stat(name) {
            Ok(st)
                if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile =>
            {
                Ok(Kind::File(st.st_size as u64))
            }
            Ok(_) => Ok(Kind::Other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Kind::Missing),
            Err(e) => Err(e),
        }
    }

    /// Renames `from` to `to` within this folder. Without `replace` an existing `to` is never
    /// replaced (`RENAME_NOREPLACE`: fails with `AlreadyExists`).
    pub fn rename(&self, from: &str, to: &str, replace: bool) -> io::Result<()> {
        let flags = if replace { RenameFlags::empty() } else { RenameFlags::NOREPLACE };
        Ok(rustix::fs::renameat_with(&*self.fd, from, &*self.fd, to, flags)?)
    }

    /// Removes the file `name` (not a folder; a symlink is removed itself).
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&*self.fd, name, AtFlags::empty())?)
    }

    /// Flushes this folder's entries to stable storage.
    pub fn sync(&self) -> io::Result<()> {
        Ok(rustix::fs::fsync(&*self.fd)?)
    }

    /// Flushes the whole file system holding this folder: one journal commit for many files.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        Ok(rustix::fs::syncfs(&*self.fd)?)
    }

    /// Sets this folder's permission bits (masked to 0o777) and modification time.
    pub fn set_mode_and_mtime(&self, mode: u32, mtime: (i64, u32)) -> io::Result<()> {
        set_mode_and_mtime(self.fd.as_fd(), mode, mtime)
    }
}

/// Sets permission bits (only 0o777: never setuid, setgid or sticky) and the modification time of
/// an open file or folder.
pub fn set_mode_and_mtime(fd: BorrowedFd<'_>, mode: u32, mtime: (i64, u32)) -> io::Result<()> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o777))?;
    let now = rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT };
    let times = rustix::fs::Timestamps {
        last_access: now,
        last_modification: rustix::fs::Timespec {
            tv_sec: mtime.0,
            tv_nsec: i64::from(mtime.1.min(999_999_999)),
        },
    };
    Ok(rustix::fs::futimens(fd, &times)?)
}
