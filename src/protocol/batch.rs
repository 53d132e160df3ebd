//! The messages of a batch: many files and folders in one conversation.
//!
//! The sender lists the whole tree in a manifest (one or more `ManifestPart`s, the last marked);
//! the receiver validates all of it before writing anything and answers every entry, in order, in
//! one or more `AnswersPart`s (or refuses the whole batch with `Reply::Reject`). The sender then
//! streams the bodies of the entries answered `Send`, back to back in manifest order, each exactly
//! `size - offset` bytes of data frames (a frame never spans two files). The receiver sends a
//! `FileVerdict` for each of those files once it is verified and on stable storage.

use serde::{Deserialize, Serialize};

use super::{Digest, HashAlg, RejectCode, Verdict};

/// One folder or regular file of the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path from the batch root, one component per element; each is checked like a single name.
    pub path: Vec<String>,
    pub kind: EntryKind,
    /// Permission bits. The receiver keeps only 0o777: never setuid, setgid or sticky.
    pub mode: u32,
    /// Modification time: seconds since the Unix epoch, and nanoseconds.
    pub mtime: (i64, u32),
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A folder (variant 0). Listed so empty folders arrive too.
    Dir,
    /// A regular file (variant 1).
    File { size: u64, hash: HashAlg, digest: Digest },
}

/// Sender → receiver: a slice of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPart {
    pub entries: Vec<Entry>,
    /// True on the final part.
    pub last: bool,
}

/// The receiver's answer for one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Send the body from `offset` (variant 0). For a folder: it will be created (offset 0).
    Send { offset: u64 },
    /// Already there with this content (variant 1). For a folder: it exists.
    Have,
    /// Not accepted (variant 2); the rest of the batch goes on.
    Reject { code: RejectCode, reason: String },
}

/// Receiver → sender: answers for the next entries, in manifest order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswersPart {
    pub answers: Vec<Answer>,
    /// True on the final part.
    pub last: bool,
}

/// Receiver → sender: the outcome of entry `index` (its position in the manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVerdict {
    pub index: u32,
    pub verdict: Verdict,
}
