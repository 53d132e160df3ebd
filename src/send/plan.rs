//! What a send will list: the paths on the command line turned into manifest entries, each with
//! where its bytes come from. A single regular file is checked strictly (its name must be one the
//! receiver accepts, or `--as` picks another); folders and several paths are walked (`walk`), and
//! what cannot be sent is set aside to be reported, not fatal.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::SendOpts;
use super::walk::{Item, walk};
use crate::cache::Stamp;
use crate::error::Error;
use crate::protocol::{Entry, EntryKind, MAX_DEPTH};
use crate::sanitize::{escape, validate_name};

/// The entries to list, in order, and where they come from.
pub struct Plan {
    pub items: Vec<Item>,
    pub entries: Vec<Entry>,
    /// Left out by policy (symlinks, special files), with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Could not be sent (a name the receiver would refuse), with the reason.
    pub refused: Vec<(PathBuf, String)>,
    /// Could not be read here, with the reason.
    pub unreadable: Vec<(PathBuf, String)>,
    /// One regular file: reported as itself, not as a batch.
    pub single: bool,
}

impl Plan {
    pub fn files(&self) -> usize {
        self.items.iter().filter(|i| i.file.is_some()).count()
    }

    pub fn bytes(&self) -> u64 {
        self.items.iter().filter_map(|i| i.file.map(|s| s.size)).sum()
    }
}

/// Plans the send of `opts.paths`.
pub fn plan(opts: &SendOpts) -> Result<Plan, Error> {
    let (items, skipped, refused, unreadable, single) = if opts.is_single_file() {
        (vec![single_item(opts)?], Vec::new(), Vec::new(), Vec::new(), true)
    } else {
        let mut w = walk(&opts.paths, opts.follow)?;
        // `--as` on a folder: everything in it goes under that path instead of its own name.
        if let Some(name) = &opts.name {
            let root = as_path(name)?;
            for item in &mut w.items {
                item.path.splice(..1, root.iter().cloned());
            }
        }
        (w.items, w.skipped, w.refused, w.unreadable, false)
    };
    let entries = items
        .iter()
        .map(|item| Entry {
            path: item.path.clone(),
            kind: match item.file {
                None => EntryKind::Dir,
                Some(stamp) => EntryKind::File { size: stamp.size, hash: opts.hash, tag: stamp.tag() },
            },
            mode: item.mode,
            mtime: item.mtime,
        })
        .collect();
    Ok(Plan { items, entries, skipped, refused, unreadable, single })
}

/// `--as NAME` or `--as sub/folder/name`: a path inside the receiver's folder, each component
/// checked by the receiver's name rules.
pub(super) fn as_path(name: &str) -> Result<Vec<String>, Error> {
    let parts: Vec<String> = name.split('/').map(str::to_owned).collect();
    if parts.len() > MAX_DEPTH {
        return Err(Error::Usage(format!("--as {name:?} is deeper than {MAX_DEPTH} folders")));
    }
    for p in &parts {
        validate_name(p).map_err(|e| {
            Error::Usage(format!(
                "cannot send as \"{}\": \"{}\": {e} (pick another with --as)",
                escape(name),
                escape(p)
            ))
        })?;
    }
    Ok(parts)
}

/// The one regular file of a single-file send, under its own name or `--as`.
fn single_item(opts: &SendOpts) -> Result<Item, Error> {
    let path = opts.file.display().to_string();
    // Opening a fifo would block until someone writes to it: look before opening.
    if std::fs::metadata(&opts.file).is_ok_and(|m| !m.is_file()) {
        return Err(Error::Usage(format!("{path} is not a regular file")));
    }
    let file = File::open(&opts.file).map_err(|e| Error::io(format!("cannot open {path}"), e))?;
    let meta = file.metadata().map_err(|e| Error::io(format!("cannot stat {path}"), e))?;
    if !meta.is_file() {
        return Err(Error::Usage(format!("{path} is not a regular file")));
    }
    let path = match &opts.name {
        Some(n) => as_path(n)?,
        None => vec![
            opts.file
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::Usage(format!("{path} has no UTF-8 file name; pick one with --as")))?
                .to_string(),
        ],
    };
    if let [name] = &path[..] {
        validate_name(name).map_err(|e| {
            Error::Usage(format!("cannot send as \"{}\": {e} (pick another with --as)", escape(name)))
        })?;
    }
    Ok(Item {
        path,
        source: opts.file.clone(),
        file: Some(Stamp::of(&meta)),
        mode: meta.mode() & 0o777,
        mtime: (meta.mtime(), meta.mtime_nsec().clamp(0, 999_999_999) as u32),
    })
}
