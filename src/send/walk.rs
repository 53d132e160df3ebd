//! The sender's view of what to send: the paths given on the command line, walked into a list of
//! folders and regular files with their paths relative to what was named.
//!
//! `xfer send photos notes.txt host` sends `photos/...` and `notes.txt`: each path arrives under
//! its own last component, like `scp -r`. Symlinks are not followed unless asked (`--follow`),
//! and devices, sockets and fifos are never sent; both are reported as skipped. Names that the
//! receiver would refuse are skipped here with the rule they break, so one odd name does not sink
//! a batch of thousands.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cache::Stamp;
use crate::error::Error;
use crate::protocol::MAX_DEPTH;
use crate::sanitize::{escape, validate_name};

/// One thing to send.
#[derive(Debug, Clone)]
pub struct Item {
    /// Path from the batch root, one component per element.
    pub path: Vec<String>,
    /// Where it is on this machine.
    pub source: PathBuf,
    /// `Some` for a regular file: its identity when it was listed.
    pub file: Option<Stamp>,
    pub mode: u32,
    pub mtime: (i64, u32),
}

/// The walk's result: what to send, what was left out by policy (symlinks, special files) and
/// what could not be sent (names the receiver would refuse), each with the reason.
#[derive(Debug, Default)]
pub struct Walk {
    pub items: Vec<Item>,
    pub skipped: Vec<(PathBuf, String)>,
    pub refused: Vec<(PathBuf, String)>,
    /// Could not be read here (missing, a folder that cannot be listed, a dangling symlink under
    /// `--follow`): reported by path while the rest goes, as rsync does.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Walks `paths` (files and folders) in a stable order (names sorted within each folder).
pub fn walk(paths: &[PathBuf], follow: bool) -> Result<Walk, Error> {
    let mut w = Walk::default();
    for p in paths {
        let meta = match if follow { fs::metadata(p) } else { fs::symlink_metadata(p) } {
            Ok(m) => m,
            Err(e) => {
                w.unreadable.push((p.clone(), e.to_string()));
                continue;
            }
        };
        // `.` or `dir/..` have no last component of their own: use the folder's real name.
        let name = p
            .file_name()
            .map(|n| n.to_owned())
            .or_else(|| p.canonicalize().ok()?.file_name().map(|n| n.to_owned()));
        let Some(name) = name else {
            return Err(Error::Usage(format!("cannot tell what to call {} on the receiver", p.display())));
        };
        let Some(name) = name.to_str().map(str::to_owned) else {
            return Err(Error::Usage(format!("{} has no UTF-8 name", p.display())));
        };
        if let Err(e) = validate_name(&name) {
            return Err(Error::Usage(format!("cannot send {}: \"{}\": {e}", p.display(), escape(&name))));
        }
        visit(&mut w, p, vec![name], meta, follow, &mut Vec::new())?;
    }
    Ok(w)
}

/// `ancestors` holds the (device, inode) of the folders above, so `--follow` cannot loop.
fn visit(
    w: &mut Walk,
    source: &Path,
    path: Vec<String>,
    meta: fs::Metadata,
    follow: bool,
    ancestors: &mut Vec<(u64, u64)>,
) -> Result<(), Error> {
    let ft = meta.file_type();
    let mtime = (meta.mtime(), meta.mtime_nsec().clamp(0, 999_999_999) as u32);
    let mode = meta.mode() & 0o777;
    if ft.is_symlink() {
        w.skipped.push((source.to_path_buf(), "symlink (not followed; see --follow)".into()));
    } else if ft.is_file() {
        w.items.push(Item { path, source: source.to_path_buf(), file: Some(Stamp::of(&meta)), mode, mtime });
    } else if ft.is_dir() {
        if path.len() >= MAX_DEPTH {
            w.refused.push((source.to_path_buf(), format!("deeper than {MAX_DEPTH} levels")));
            return Ok(());
        }
        let id = (meta.dev(), meta.ino());
        if ancestors.contains(&id) {
            w.skipped.push((source.to_path_buf(), "symlink loop (a folder inside itself)".into()));
            return Ok(());
        }
        ancestors.push(id);
        w.items.push(Item { path: path.clone(), source: source.to_path_buf(), file: None, mode, mtime });
        let listed = fs::read_dir(source).and_then(|d| d.collect::<Result<Vec<_>, _>>());
        let mut children = match listed {
            Ok(c) => c,
            Err(e) => {
                // The folder itself is sent (empty); what it holds is reported.
                w.unreadable.push((source.to_path_buf(), format!("cannot list it: {e}")));
                ancestors.pop();
                return Ok(());
            }
        };
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let child_path = child.path();
            let Some(name) = child.file_name().to_str().map(str::to_owned) else {
                w.refused.push((child_path, "name is not UTF-8".into()));
                continue;
            };
            if let Err(e) = validate_name(&name) {
                w.refused.push((child_path, e.to_string()));
                continue;
            }
            // Not following, the entry's own lstat, relative to the folder being read (no walk of
            // the whole path per file).
            let meta = match if follow { fs::metadata(&child_path) } else { child.metadata() } {
                Ok(m) => m,
                Err(e) => {
                    w.unreadable.push((child_path, e.to_string()));
                    continue;
                }
            };
            let mut p = path.clone();
            p.push(name);
            visit(w, &child_path, p, meta, follow, ancestors)?;
        }
        ancestors.pop();
    } else {
        w.skipped
            .push((source.to_path_buf(), "not a regular file or folder (device, socket or fifo)".into()));
    }
    Ok(())
}
