//! Acknowledging files only once they are on disk for good, without a journal commit per file.
//!
//! Verified files wait under their hidden partial names (a batch's small files with no name at
//! all, see `Partial::unnamed`) in a group (up to [`GROUP_FILES`] files or [`GROUP_BYTES`] bytes,
//! or whatever is there when the transfer ends, the sender pauses, or a body that would fill the
//! group on its own begins). Then one `syncfs` makes their data durable, they are renamed (or
//! linked) to their final names, a second `syncfs` makes the names durable, and only then are
//! their verdicts sent. A group of one file (a single file; a batch's tail, or a file flushed
//! early) in a transfer that created no folder is flushed with `fsync` of the file and its folder
//! instead, which costs less than flushing the whole file system. A crash at any point leaves
//! each file either hidden under its partial name (or gone, one with no name) or complete under
//! its final name.

use std::io;

use super::{Output, RecvOpts, STDOUT_NAME};
use crate::protocol::{FileVerdict, Message, Verdict, bounded_reason};
use crate::store::{Durability, Partial, SafeDir};
use crate::transport::FrameWriter;

/// Files made durable and acknowledged together. Each is held open (locked) until its group is
/// flushed, so this also bounds the descriptors a transfer holds.
pub(crate) const GROUP_FILES: usize = 128;
/// Bytes acknowledged together: bounds how much an interruption can cost.
pub(crate) const GROUP_BYTES: u64 = 256 << 20;

/// A verified file waiting for its group's sync before it gets its final name.
pub(super) struct Pending {
    pub index: u32,
    pub partial: Partial,
    pub name: String,
    pub size: u64,
}

/// The verified files of the group being filled.
#[derive(Default)]
pub(super) struct Group {
    files: Vec<Pending>,
    bytes: u64,
}

/// Why a group could not be acknowledged.
pub(super) enum GroupError {
    /// The file system could not be flushed.
    Local(io::Error),
    /// The verdicts could not be sent.
    Wire(io::Error),
}

/// What a flushed group gave: (entry index, stored name or why it failed) per file.
pub(super) type Stored = Vec<(u32, Result<String, io::Error>)>;

impl Group {
    pub fn push(&mut self, p: Pending) {
        self.bytes += p.size;
        self.files.push(p);
    }

    pub fn is_full(&self) -> bool {
        self.files.len() >= GROUP_FILES || self.bytes >= GROUP_BYTES
    }

    /// Whether `bytes` more (one body) would fill the group.
    pub fn would_fill(&self, bytes: u64) -> bool {
        !self.files.is_empty() && self.bytes.saturating_add(bytes) >= GROUP_BYTES
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Makes the group durable, names its files and acknowledges them (see the module docs).
    /// `new_folders`: the transfer created folders, whose entries only a `syncfs` makes durable
    /// (an `fsync` of the file's folder does not cover its parents), so even one file takes it.
    pub fn flush(
        &mut self,
        root: &SafeDir,
        w: &mut FrameWriter,
        (opts, new_folders): (&RecvOpts, bool),
    ) -> Result<Stored, GroupError> {
        self.bytes = 0;
        let files = std::mem::take(&mut self.files);
        let one = files.len() == 1 && !new_folders;
        if files.is_empty() {
            return Ok(Vec::new());
        }
        if !one {
            root.sync_filesystem().map_err(GroupError::Local)?;
        }
        let durability = if one { Durability::Fsync } else { Durability::Deferred };
        let store = |p: Pending| match &opts.output {
            None => p.partial.commit(&p.name, opts.overwrite, durability),
            Some(Output::File(name)) => p.partial.commit_exact(name, durability),
            // Nothing is kept, so nothing needs to be durable; stdout takes it all first.
            Some(Output::Stdout) => p
                .partial
                .pour(&mut io::stdout().lock())
                .map(|()| STDOUT_NAME.to_string())
                .map_err(|e| io::Error::new(e.kind(), format!("writing it to standard output: {e}"))),
        };
        let stored: Stored = files.into_iter().map(|p| (p.index, store(p))).collect();
        if !one {
            root.sync_filesystem().map_err(GroupError::Local)?;
        }
        for (index, outcome) in &stored {
            let verdict = match outcome {
                Ok(name) => Verdict::Verified { name: name.clone() },
                Err(e) => Verdict::Failed { reason: bounded_reason(format!("storing the file: {e}")) },
            };
            w.message(&Message::FileVerdict(FileVerdict { index: *index, verdict }))
                .map_err(GroupError::Wire)?;
        }
        w.flush().map_err(GroupError::Wire)?;
        Ok(stored)
    }
}
