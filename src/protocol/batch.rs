//! The messages of a batch: many files and folders in one conversation.
//!
//! The sender lists the whole tree in a manifest (one or more `ManifestPart`s, the last marked):
//! paths, kinds, sizes, modes and times, but no digests, so it goes out as soon as the tree is
//! walked. The receiver validates all of it before writing anything and accepts it with an empty
//! `AnswersPart` (or refuses the whole batch with `Reply::Reject`). Digests follow in
//! `DigestsPart`s as the sender hashes; the receiver answers every entry, in order, as soon as it
//! can (folders at once, files once their digest is known). For each file answered `Send` the
//! sender sends `Body` and then exactly `size - offset` bytes of data frames (a frame never spans
//! two files), or `Withdraw` if it cannot read the file after all; digests for later files may go
//! out between bodies, so hashing file k+1 overlaps sending file k. The receiver sends one
//! `FileVerdict` per file answered `Send`, once it is verified and on stable storage.

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

impl Entry {
    /// Bytes this entry takes inside an encoded message (see PROTOCOL.md: u64 lengths, u32
    /// variants, fixed-width integers), without encoding it: a sender splits a 10,000-entry
    /// manifest into frames with it.
    pub fn encoded_len(&self) -> usize {
        let path: usize = 8 + self.path.iter().map(|c| 8 + c.len()).sum::<usize>();
        let kind = match self.kind {
            EntryKind::Dir => 4,
            EntryKind::File { .. } => 4 + 8 + 4,
        };
        path + kind + 4 + 8 + 4
    }
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A folder (variant 0). Listed so empty folders arrive too.
    Dir,
    /// A regular file (variant 1).
    /// Its digest comes later, in a [`DigestsPart`].
    File { size: u64, hash: HashAlg },
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
    /// Already there with this content (variant 1), stored as `name` in the entry's folder: the
    /// entry's own name, or a keep-both copy of it (`a (2).jpg`) when another file holds that
    /// name. For a folder: it exists (`name` is its name).
    Have { name: String },
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

/// Sender → receiver: digests of the next files of the manifest, in manifest order (folders are
/// not counted). `first` is the position, among the manifest's files, of the first one here. An
/// empty part is a keepalive: the sender is still hashing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestsPart {
    pub first: u32,
    /// `None`: the sender could not read that file; the receiver answers it `Reject`.
    pub digests: Vec<Option<Digest>>,
}

/// Sender → receiver: the body of entry `index` follows, as data frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    pub index: u32,
}

/// Sender → receiver: the body of entry `index`, answered `Send`, will not come (the file could
/// not be opened or changed since it was listed). The receiver answers it with a failed
/// `FileVerdict` and the batch goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdraw {
    pub index: u32,
    pub reason: String,
}
