//! The control messages and their bounded encoding.
//!
//! Messages are serde types encoded with bincode 2 using a fixed configuration: big-endian,
//! fixed-width integers (so PROTOCOL.md can give every field's offset), enum variants as a `u32`
//! index, strings and byte vectors as a `u64` length then the bytes, and a decode limit of
//! [`MAX_MESSAGE_LEN`] so no claimed length can make the decoder allocate more than a frame.
//! Variant order is part of the wire format: new variants go at the end, none is ever removed.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{MAX_MESSAGE_LEN, MAX_REASON_LEN, ProtocolError};

/// The bincode configuration of the protocol. Changing it changes the wire format.
fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_big_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_MESSAGE_LEN as usize }>()
}

/// A 32-byte digest: SHA-256, or BLAKE3's default output length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Parses what [`Digest::to_hex`] prints.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return None;
        }
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Digest(out))
    }

    /// Lower-case hex, as `sha256sum` prints it.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 15)] as char);
        }
        s
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The hash algorithm of a file's digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashAlg {
    /// SHA-256 (FIPS 180-4). Variant 0.
    Sha256,
    /// BLAKE3 with its default 32-byte output. Variant 1.
    Blake3,
}

impl HashAlg {
    /// Parses the name `Display` prints.
    pub fn from_name(s: &str) -> Option<HashAlg> {
        match s {
            "sha256" => Some(HashAlg::Sha256),
            "blake3" => Some(HashAlg::Blake3),
            _ => None,
        }
    }
}

impl fmt::Display for HashAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HashAlg::Sha256 => "sha256",
            HashAlg::Blake3 => "blake3",
        })
    }
}

/// Why a receiver refused a transfer or one entry. Codes are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// The name breaks the name rules (variant 0).
    InvalidName,
    /// The file would not fit in the receiver's free space (variant 1).
    InsufficientSpace,
    /// The receiver is at its limit of concurrent transfers (variant 2).
    Busy,
    /// The receiver does not support the entry's hash algorithm (variant 3).
    UnsupportedHash,
    /// The receiver could not prepare the file, e.g. a local I/O error (variant 4).
    Failed,
    /// A batch manifest breaks a rule as a whole: a bad path, a collision, a limit (variant 5).
    InvalidManifest,
    /// The receiver accepts only authenticated senders; this one asked for plaintext (variant 6).
    AuthRequired,
    /// The sender's proof failed: a wrong code, or a pinned key the receiver does not hold
    /// (variant 7).
    AuthFailed,
    /// The receiver runs with `--insecure`; this sender asked for a secure channel (variant 8).
    InsecureOnly,
    /// The sender came with a pinned key the receiver does not remember (variant 9).
    UnknownSender,
}

/// Receiver → sender: the whole transfer is refused before anything was written (the manifest
/// breaks a rule, the receiver is busy or short of space). Nothing follows; the receiver closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub code: RejectCode,
    /// For humans: at most [`MAX_REASON_LEN`] bytes, escaped before it is shown.
    pub reason: String,
}

/// Receiver → sender, in place of the acceptance while every transfer slot is taken: the manifest
/// waits in the receiver's queue with `ahead` transfers before it, and keeps its place. Sent when
/// the position changes and at least every [`QUEUE_TICK`](crate::recv::QUEUE_TICK), so a queued
/// sender's idle timeout is fed; the acceptance (or a refusal) follows when its turn comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    /// Manifests waiting before this one.
    pub ahead: u32,
}

/// Sender → receiver, in place of `Body` for a large file sent over several connections (lanes):
/// its bytes from the answered offset travel as [`Part`]s of [`SPLIT_CHUNK`](super::SPLIT_CHUNK)
/// bytes on this connection and on up to `lanes - 1` lane connections that join with `session`
/// and prove `secret` (see PROTOCOL.md, "Lanes"); [`SplitEnd`] closes it on this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub index: u32,
    /// Names the split for the lanes' handshakes (visible on the wire).
    pub session: [u8; 16],
    /// The lanes' key material: travels only inside records (or in the clear with `--insecure`).
    pub secret: [u8; 32],
    /// Connections the sender means to use, this one included.
    pub lanes: u8,
}

/// Sender → receiver, on the main connection or a lane: the bytes of a split file from `offset`,
/// as data frames, [`SPLIT_CHUNK`](super::SPLIT_CHUNK) of them or what is left of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub index: u32,
    pub offset: u64,
}

/// Ends a split file's parts: sender → receiver on the main connection (every part has arrived,
/// on some connection) and on a lane (no more parts on it); receiver → sender on a lane: every
/// part it carried is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitEnd {
    pub index: u32,
}

/// Receiver → sender: the outcome of one file after its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Hashed, matched, synced to stable storage and stored as `name`.
    Verified { name: String },
    /// The body's digest differs from the sender's. Nothing was stored.
    HashMismatch { expected: Digest, actual: Digest },
    /// The body ended before or ran past the listed size. Nothing was stored.
    SizeMismatch { expected: u64, received: u64 },
    /// The receiver failed for another reason (disk full, I/O error). Nothing was stored.
    Failed { reason: String },
}

/// Every control message. The variant index is the first field of every message payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Sender → receiver (variant 0).
    Manifest(ManifestPart),
    /// Receiver → sender (variant 1).
    Answers(AnswersPart),
    /// Sender → receiver (variant 2).
    Digests(DigestsPart),
    /// Sender → receiver (variant 3).
    Body(Body),
    /// Sender → receiver (variant 4).
    Withdraw(Withdraw),
    /// Receiver → sender (variant 5).
    FileVerdict(FileVerdict),
    /// Receiver → sender (variant 6).
    Reject(Reject),
    /// Receiver → sender (variant 7), only before the acceptance.
    Queued(Queued),
    /// Sender → receiver (variant 8), in place of `Body`.
    Split(Split),
    /// Sender → receiver (variant 9), on the main connection or a lane.
    Part(Part),
    /// Both ways (variant 10): see [`SplitEnd`].
    SplitEnd(SplitEnd),
}

impl Message {
    /// The message's name for error reports.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Manifest(_) => "manifest",
            Message::Answers(_) => "answers",
            Message::Digests(_) => "digests",
            Message::Body(_) => "body",
            Message::Withdraw(_) => "withdraw",
            Message::FileVerdict(_) => "file verdict",
            Message::Reject(_) => "reject",
            Message::Queued(_) => "queued",
            Message::Split(_) => "split",
            Message::Part(_) => "part",
            Message::SplitEnd(_) => "split end",
        }
    }
}

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
    /// A file's size; 0 for a folder, and for a stream (its size is known only at its end).
    pub fn size(&self) -> u64 {
        match self.kind {
            EntryKind::File { size, .. } => size,
            EntryKind::Dir | EntryKind::Stream { .. } => 0,
        }
    }

    /// A file or a stream: it has a body and a digest, and counts among the files.
    pub fn has_body(&self) -> bool {
        !matches!(self.kind, EntryKind::Dir)
    }

    /// Bytes this entry takes inside an encoded message (see PROTOCOL.md: u64 lengths, u32
    /// variants, fixed-width integers), without encoding it: a sender splits a 10,000-entry
    /// manifest into frames with it.
    pub fn encoded_len(&self) -> usize {
        let path: usize = 8 + self.path.iter().map(|c| 8 + c.len()).sum::<usize>();
        let kind = match self.kind {
            EntryKind::Dir => 4,
            EntryKind::File { .. } => 4 + 8 + 4 + 16,
            EntryKind::Stream { .. } => 4 + 4,
        };
        path + kind + 4 + 8 + 4
    }
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A folder (variant 0). Listed so empty folders arrive too.
    Dir,
    /// A regular file (variant 1). Its digest comes later, in a [`DigestsPart`]. `tag` names this
    /// version of the sender's file (a hash of its device, inode, size, mtime and ctime): a
    /// partial left by an interrupted send of the same version can be resumed before the digest
    /// is known. The final digest check covers every byte either way.
    File { size: u64, hash: HashAlg, tag: [u8; 16] },
    /// A file of unknown size (variant 2): what `xfer send -` reads from its standard input.
    /// Only as the one entry of a manifest. Its body is data frames ended by an empty data
    /// frame; its digest follows the body. It never resumes and is never "already there".
    Stream { hash: HashAlg },
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

/// Receiver → sender: the outcome of entry `index` (its position in the manifest), sent once the
/// file is verified and on stable storage, or failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVerdict {
    pub index: u32,
    pub verdict: Verdict,
}

/// Sender → receiver: digests of the next files of the manifest, in manifest order (folders are
/// not counted). `first` is the position, among the manifest's files, of the first one here. A
/// file's digest must arrive before the end of its body at the latest. An empty part is a
/// keepalive: the sender is still hashing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestsPart {
    pub first: u32,
    /// `None`: the sender could not read that file (or it changed while it was read); the
    /// receiver stores nothing for it.
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

/// Cuts a human-readable reason to [`MAX_REASON_LEN`] bytes on a character boundary.
pub fn bounded_reason(reason: impl Into<String>) -> String {
    let mut s: String = reason.into();
    if s.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Encodes a message payload (without its frame header).
pub fn encode_message(msg: &Message) -> Vec<u8> {
    bincode::serde::encode_to_vec(msg, config()).expect("encoding to a Vec cannot fail")
}

/// Decodes a message payload. Rejects trailing bytes, so one payload has exactly one meaning.
pub fn decode_message(payload: &[u8]) -> Result<Message, ProtocolError> {
    let (msg, used): (Message, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes after a {} message",
            payload.len() - used,
            msg.name()
        )));
    }
    Ok(msg)
}
