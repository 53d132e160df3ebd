//! Which name rules the target folder's file system adds to the universal ones, found once when
//! the receiver starts: its type (`statfs`), and for ext4 and f2fs the folder's casefold flag.
//!
//! A Linux file system holds any name but `/` and NUL, so by default the receiver stores what
//! rsync would. FAT, exFAT, NTFS and SMB refuse or alter more (`a:b`, `CON`, `a.`) and ignore
//! case; a casefold folder (`chattr +F` on ext4 or f2fs) ignores case and Unicode form. On those
//! the receiver refuses, entry by entry, what the file system could not hold as named
//! ([`FsRules`]).

use std::io;
use std::path::Path;

use crate::sanitize::FsRules;

/// `statfs` types of file systems that hold names as Windows does: msdos/vfat, exFAT, NTFS (the
/// old driver and ntfs3), CIFS and SMB2 mounts.
const WINDOWS_LIKE: &[u32] = &[0x4d44, 0x2011_bab0, 0x5346_544e, 0x7366_746e, 0xff53_4d42, 0xfe53_4d42];

/// `FS_CASEFOLD_FL`: the folder's names are compared case-insensitively (ext4, f2fs).
const FS_CASEFOLD_FL: u32 = 0x4000_0000;

/// Environment variable that makes the receiver apply the rules of another kind of file system:
/// `windows` or `casefold`. A test hook (this machine has neither); it only ever adds rules.
pub const ASSUME_FS: &str = "XFER_ASSUME_FS";

/// The rules for names stored in `dir`: what its file system needs, plus what [`ASSUME_FS`]
/// asks for. An unknown [`ASSUME_FS`] value is an error; a file system that cannot be asked
/// (`dir` missing, an ioctl it does not know) adds nothing.
pub fn for_dir(dir: &Path) -> Result<FsRules, String> {
    let assumed = match std::env::var(ASSUME_FS).as_deref() {
        Err(_) | Ok("") => FsRules::POSIX,
        Ok("windows") => FsRules::WINDOWS,
        Ok("casefold") => FsRules::CASEFOLD,
        Ok(other) => return Err(format!("{ASSUME_FS}={other:?}: expected `windows` or `casefold`")),
    };
    Ok(detect(dir).unwrap_or(FsRules::POSIX).and(assumed))
}

/// What the file system of `dir` itself needs.
fn detect(dir: &Path) -> io::Result<FsRules> {
    // The magic is a `long`: compare its low 32 bits, the same on 32- and 64-bit systems.
    let kind = rustix::fs::statfs(dir)?.f_type as u32;
    if WINDOWS_LIKE.contains(&kind) {
        return Ok(FsRules::WINDOWS);
    }
    let folder = std::fs::File::open(dir)?;
    let casefold = rustix::fs::ioctl_getflags(&folder).is_ok_and(|f| f.bits() & FS_CASEFOLD_FL != 0);
    Ok(if casefold { FsRules::CASEFOLD } else { FsRules::POSIX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_folder_adds_no_rule() {
        // tmp is tmpfs or ext4 here: case-sensitive, without the casefold flag.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(detect(dir.path()).unwrap(), FsRules::POSIX);
    }
}
