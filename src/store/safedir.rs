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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

/// An open folder inside (or being) the target folder.
pub struct SafeDir {
    // Shared: a clone for each partial of a folder costs no `dup` (a batch makes thousands).
    fd: std::sync::Arc<Folder>,
}

/// A held folder descriptor, and what was learnt about the folder once.
struct Folder {
    fd: OwnedFd,
    /// Whether the folder has a default ACL (then it, not the umask, shapes new files' modes).
    default_acl: OnceLock<bool>,
}

impl AsFd for Folder {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<OwnedFd> for SafeDir {
    fn from(fd: OwnedFd) -> SafeDir {
        SafeDir { fd: std::sync::Arc::new(Folder { fd, default_acl: OnceLock::new() }) }
    }
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
        Ok(fd.into())
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
            Ok(fd) => Ok((fd.into(), false)),
            Err(e) if e == rustix::io::Errno::NOENT && create => {
                match rustix::fs::mkdirat(&*self.fd, name, Mode::from_raw_mode(NEW_DIR_MODE)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                Ok((open()?.into(), true))
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

    /// Creates a file with no name in this folder (`O_TMPFILE`), with permission bits `mode`
    /// (only 0o777) less the umask, for reading and writing. Nobody can open it by a name, and it
    /// vanishes with its descriptor unless [`SafeDir::link_unnamed`] names it. `Ok(None)` where
    /// that is not possible: a file system without such files (`EOPNOTSUPP`), a kernel without
    /// them (`EISDIR`, `EINVAL`), or no `/proc` to name them through. Once seen, no further file
    /// of this process is tried that way (a caller falls back to a named partial).
    pub fn create_unnamed(&self, mode: u32) -> io::Result<Option<File>> {
        if !unnamed_possible() {
            return Ok(None);
        }
        let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
        match rustix::fs::openat(&*self.fd, ".", flags, Mode::from_raw_mode(mode & 0o777)) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(e) if e == Errno::OPNOTSUPP || e == Errno::ISDIR || e == Errno::INVAL => {
                UNNAMED_UNSUPPORTED.store(true, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What the kernel takes away from the mode a new file in this folder is created with: the
    /// umask, unless the folder has a default ACL (then the ACL decides: `None`, as when the
    /// umask cannot be read). The ACL is looked up once per folder.
    pub fn creation_mask(&self) -> Option<u32> {
        let acl = self.fd.default_acl.get_or_init(|| {
            // No such attribute (or no ACLs on this file system): the umask applies.
            !matches!(
                rustix::fs::fgetxattr_query(&*self.fd, "system.posix_acl_default"),
                Err(Errno::NODATA | Errno::OPNOTSUPP)
            )
        });
        if *acl { None } else { umask() }
    }

    /// Gives `file`, made by [`SafeDir::create_unnamed`] in this folder, the name `name`. Never
    /// replaces anything (`linkat` fails with `AlreadyExists` if the name is taken, by a symlink
    /// too). Linked by its descriptor (`AT_EMPTY_PATH`: no path lookup) where the kernel allows
    /// it (older kernels only with `CAP_DAC_READ_SEARCH`; 6.18 also to the file's opener, as an
    /// unprivileged user was seen to), otherwise through `/proc/self/fd/N` with
    /// `AT_SYMLINK_FOLLOW`, which any user may do. A refused `AT_EMPTY_PATH` (`ENOENT`) is tried
    /// once: when `/proc` then works, it is not tried again.
    pub fn link_unnamed(&self, file: &File, name: &str) -> io::Result<()> {
        if !EMPTY_PATH_REFUSED.load(Ordering::Relaxed) {
            match rustix::fs::linkat(file, "", &*self.fd, name, AtFlags::EMPTY_PATH) {
                Err(Errno::NOENT) => {}
                linked => return Ok(linked?),
            }
        }
        let from = format!("/proc/self/fd/{}", file.as_raw_fd());
        rustix::fs::linkat(rustix::fs::CWD, from.as_str(), &*self.fd, name, AtFlags::SYMLINK_FOLLOW)?;
        EMPTY_PATH_REFUSED.store(true, Ordering::Relaxed);
        Ok(())
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

/// Set once `O_TMPFILE` failed as unsupported (see [`SafeDir::create_unnamed`]).
static UNNAMED_UNSUPPORTED: AtomicBool = AtomicBool::new(false);
/// Set once `linkat(AT_EMPTY_PATH)` was refused (see [`SafeDir::link_unnamed`]).
static EMPTY_PATH_REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether files with no name can be made and then named: not known to be unsupported, and
/// `/proc/self/fd` is there to name them through (looked up once).
fn unnamed_possible() -> bool {
    static PROC: OnceLock<bool> = OnceLock::new();
    !UNNAMED_UNSUPPORTED.load(Ordering::Relaxed) && *PROC.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// This process's umask, read once from `/proc/self/status` (reading it with `umask(2)` would
/// change it for a moment under the other threads). `None` if it cannot be read.
fn umask() -> Option<u32> {
    static UMASK: OnceLock<Option<u32>> = OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let value = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(value.trim(), 8).ok()
    })
}

/// Sets permission bits (only 0o777: never setuid, setgid or sticky) and the modification time of
/// an open file or folder.
pub fn set_mode_and_mtime(fd: BorrowedFd<'_>, mode: u32, mtime: (i64, u32)) -> io::Result<()> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o777))?;
    set_mtime(fd, mtime)
}

/// Sets the modification time of an open file or folder (`futimens`; the access time is left).
pub fn set_mtime(fd: BorrowedFd<'_>, mtime: (i64, u32)) -> io::Result<()> {
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
