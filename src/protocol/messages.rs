//! The control messages and their bounded encoding.
//!
//! Messages are serde types encoded with bincode 2 using a fixed configuration: big-endian,
//! fixed-width integers (so PROTOCOL.md can give every field's offset), enum variants as a `u32`
//! index, strings and byte vectors as a `u64` length then the bytes, and a decode limit of
//! [`MAX_MESSAGE_LEN`] so no claimed length can make the decoder allocate more than a frame.
//! Variant order is part of the wire format: new variants go at the end, none is ever removed.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::batch::{AnswersPart, Body, DigestsPart, FileVerdict, ManifestPart, Withdraw};
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

/// The hash algorithm of an offer's digest.
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

/// Sender → receiver: the file on offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// One path component, untrusted: the receiver validates it (see `sanitize`).
    pub name: String,
    /// Size of the file in bytes: exactly this many body bytes follow an accept from offset 0.
    pub size: u64,
    pub hash: HashAlg,
    /// Digest of the whole file, when the sender knows it before sending (from its cache). `None`:
    /// the sender hashes while it sends and the digest follows the body in a [`Trailer`].
    pub digest: Option<Digest>,
    /// Names this version of the sender's file (a hash of its device, inode, size, mtime and
    /// ctime): a partial left by an interrupted send of the same version can be resumed even when
    /// no digest was known then. The final digest check covers every byte either way.
    pub tag: [u8; 16],
}

/// Sender → receiver, after a body offered without a digest: the digest of what was sent.
/// `None`: the file changed while it was being read, so no digest describes what was sent and
/// the receiver must not keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    pub digest: Option<Digest>,
}

/// Why a receiver refused an offer. Codes are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// The name breaks the name rules (variant 0).
    InvalidName,
    /// The file would not fit in the receiver's free space (variant 1).
    InsufficientSpace,
    /// The receiver is at its limit of concurrent transfers (variant 2).
    Busy,
    /// The receiver does not support the offer's hash algorithm (variant 3).
    UnsupportedHash,
    /// The receiver could not prepare the file, e.g. a local I/O error (variant 4).
    Failed,
    /// A batch manifest breaks a rule as a whole: a bad path, a collision, a limit (variant 5).
    InvalidManifest,
}

/// Receiver → sender: the answer to an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Send the body starting at `offset` (non-zero when the receiver resumes a partial).
    Accept { offset: u64 },
    /// A file with this exact content is already stored, under `name`. No body follows.
    AlreadyHave { name: String },
    /// Refused; `reason` is for humans.
    Reject { code: RejectCode, reason: String },
    /// (Variant 3.) The receiver holds a file of this name and size: offer again with the digest,
    /// so it can tell whether it is the same. Only for offers without a digest.
    NeedDigest,
}

/// Receiver → sender: the outcome after the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Hashed, matched, synced to stable storage and stored as `name`.
    Verified { name: String },
    /// The body's digest differs from the offer's. Nothing was stored.
    HashMismatch { expected: Digest, actual: Digest },
    /// The body ended before or after the offered size. Nothing was stored.
    SizeMismatch { expected: u64, received: u64 },
    /// The receiver failed for another reason (disk full, I/O error). Nothing was stored.
    Failed { reason: String },
}

/// Every control message. The variant index is the first field of every message payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Offer(Offer),
    Reply(Reply),
    Verdict(Verdict),
    Manifest(ManifestPart),
    Answers(AnswersPart),
    FileVerdict(FileVerdict),
    Digests(DigestsPart),
    Body(Body),
    Withdraw(Withdraw),
    Trailer(Trailer),
}

impl Message {
    /// The message's name for error reports.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Offer(_) => "offer",
            Message::Reply(_) => "reply",
            Message::Verdict(_) => "verdict",
            Message::Manifest(_) => "manifest",
            Message::Answers(_) => "answers",
            Message::FileVerdict(_) => "file verdict",
            Message::Digests(_) => "digests",
            Message::Body(_) => "body",
            Message::Withdraw(_) => "withdraw",
            Message::Trailer(_) => "trailer",
        }
    }
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
