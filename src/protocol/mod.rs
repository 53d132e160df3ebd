//! The xfer wire protocol, version 7. PROTOCOL.md is the full specification; this is its summary.
//!
//! Roles: the *receiver* listens, the *sender* connects. One connection carries one transfer: a
//! single file is a transfer of one entry, a folder or several paths a transfer of many; there is
//! one conversation for both.
//!
//! 1. Both sides write a 10-byte hello at once — [`MAGIC`] then [`VERSION`] as a big-endian `u16`
//!    — and read the peer's. Wrong magic: not an xfer peer. Other version: both sides report both
//!    versions and close.
//! 2. A handshake (frame kind `Handshake`, see `transport::handshake`): insecure, a code (SPAKE2
//!    then Noise XXpsk3) or a pinned key (Noise IK). Then, unless insecure, every frame below
//!    travels inside AES-256-GCM records (frame kind `Record`, see `transport::records`).
//! 3. Everything after the hello is a frame: a 4-byte big-endian payload length, a 1-byte kind,
//!    then the payload. The length is checked against the kind's limit ([`MAX_MESSAGE_LEN`],
//!    [`MAX_CHUNK_LEN`]) before any buffer is allocated.
//! 4. Sender: the manifest (paths, kinds, sizes, modes, times; no digests) in `Manifest` parts.
//!    Receiver: validates all of it, then accepts with an empty `Answers` part or refuses with
//!    `Reject`.
//! 5. Sender: `Digests` parts as it hashes. Receiver: answers every entry in order (send from an
//!    offset / already have it / refused), a file as soon as it can: at once when nothing on its
//!    disk could match it, otherwise once its digest is here.
//! 6. For each file answered "send", the sender writes `Body` and the bytes from the offset as data
//!    frames (no sentinel: the body ends when `size - offset` bytes arrived), or `Withdraw`; the
//!    file's digest must be sent by the end of its body. A stream (`EntryKind::Stream`, size
//!    unknown: `xfer send -`) is the one entry of its manifest; its body ends with an empty data
//!    frame ([`STREAM_END`]) and its digest follows.
//! 7. Receiver: a `FileVerdict` per file (verified / hash mismatch / size mismatch / failed), sent
//!    only after the file is hashed, compared, flushed to stable storage and renamed.
//!
//! This module does no I/O of its own beyond `Read` / `Write`: no sockets, files or terminals, so
//! it can be tested and fuzzed on byte slices. bincode is used here and only here, so it can be
//! swapped without touching the rest of the crate.

mod frame;
mod messages;

pub use frame::{
    FRAME_HEADER_LEN, FrameHeader, FrameKind, STREAM_END, read_frame_header, read_message,
    read_stream_frame_header, write_frame_header, write_message,
};
pub use messages::{
    Answer, AnswersPart, Body, Digest, DigestsPart, Entry, EntryKind, FileVerdict, HashAlg, ManifestPart,
    Message, Part, Queued, Reject, RejectCode, Split, SplitEnd, Verdict, Withdraw, bounded_reason,
    decode_message, encode_message,
};

use std::io::{self, Read, Write};

/// The first bytes on the wire in both directions. `\x89` catches 7-bit channels and text
/// protocols (an HTTP client, a mistyped port); `\r\n` and `\x1a\n` catch newline translation.
pub const MAGIC: [u8; 8] = *b"\x89XFR\r\n\x1a\n";

/// The protocol version this build speaks. Bumped for any incompatible change to frames or
/// messages; message variants are never renumbered within a version.
pub const VERSION: u16 = 7;

/// The bytes of a split file travel in parts of this size (the last one: what is left), each
/// on one connection of the split (see [`Split`]).
pub const SPLIT_CHUNK: u64 = 8 << 20;

/// The least a body must hold (from its answered offset) to be split: below it, one connection
/// fills a link as fast as several would start. A `Split` of a smaller body is a protocol error.
pub const SPLIT_MIN: u64 = 64 << 20;

/// Connections one split may use, the main one included; a `Split` asking for more is refused.
pub const MAX_LANES: u8 = 8;

/// Digests per `DigestsPart` a sender puts in one message (33 bytes each, well within a frame).
pub const MAX_DIGESTS_PER_PART: usize = 1024;

/// Size of the hello: magic plus version.
pub const HELLO_LEN: usize = MAGIC.len() + 2;

/// Largest control message payload. Manifest, answers and digests parts are cut to fit it; a
/// verdict or a refusal carries at most a reason of [`MAX_REASON_LEN`] bytes. 64 KiB keeps a
/// hostile peer's allocation small.
pub const MAX_MESSAGE_LEN: u32 = 64 * 1024;

/// Largest data chunk. Bounds the receiver's buffer per transfer; `--chunk-size` may not exceed
/// it. 16 MiB is well past the point where larger chunks stop paying (see README).
pub const MAX_CHUNK_LEN: u32 = 16 * 1024 * 1024;

/// Largest handshake frame payload. The handshake's messages are under 200 bytes; 1 KiB leaves
/// room and keeps what a stranger can make the receiver allocate before it proves anything tiny.
pub const MAX_HANDSHAKE_LEN: u32 = 1024;

/// Most plaintext bytes in one encrypted record: large enough that the per-record cost (a header,
/// a tag, a seal) is lost in the noise, small enough to bound the buffer each side holds.
pub const MAX_RECORD_PLAIN: u32 = 256 * 1024;

/// Largest record payload: ciphertext plus the 16-byte AES-GCM tag.
pub const MAX_RECORD_LEN: u32 = MAX_RECORD_PLAIN + 16;

/// Longest file name, in bytes of UTF-8: NAME_MAX on Linux and most Unix file systems.
pub const MAX_NAME_LEN: usize = 255;

/// Longest human-readable reason in a reply or verdict, in bytes. Longer reasons are cut.
pub const MAX_REASON_LEN: usize = 1024;

/// Most entries in one batch manifest. The receiver holds the whole manifest while it validates
/// it (a few hundred bytes per entry), so this bounds its memory per batch to tens of MiB.
pub const MAX_ENTRIES: usize = 250_000;

/// Deepest path in a batch, in components.
pub const MAX_DEPTH: usize = 64;

/// Longest path in a batch, in bytes with `/` separators: PATH_MAX on Linux.
pub const MAX_PATH_LEN: usize = 4096;

/// Largest total size of a batch's files, so sums cannot overflow whatever the peer claims.
pub const MAX_TOTAL_SIZE: u64 = 1 << 50;

/// The hello this side sends.
pub fn hello() -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..MAGIC.len()].copy_from_slice(&MAGIC);
    h[MAGIC.len()..].copy_from_slice(&VERSION.to_be_bytes());
    h
}

/// What went wrong with the peer's bytes. Every variant names what was seen, so the message can
/// be shown to a user as it is.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("peer is not an xfer peer: it began with {} where xfer's hello was due{}", shown_magic(.0), magic_hint(.0))]
    BadMagic([u8; 8]),
    #[error("protocol version mismatch: peer speaks xfer protocol v{peer}, this xfer speaks v{ours}")]
    VersionMismatch { peer: u16, ours: u16 },
    #[error("frame of {len} bytes exceeds the {kind} limit of {limit} bytes")]
    FrameTooLarge { kind: FrameKind, len: u32, limit: u32 },
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownFrameKind(u8),
    #[error("empty data frame")]
    EmptyChunk,
    #[error("expected a {expected} frame, got a {got} frame")]
    UnexpectedFrame { expected: FrameKind, got: FrameKind },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unexpected message: expected {expected}, got {got}")]
    UnexpectedMessage { expected: &'static str, got: &'static str },
}

/// The first bytes of a peer that is not xfer, as text when they are printable (an HTTP or SSH
/// server says who it is), else as hex.
fn shown_magic(b: &[u8; 8]) -> String {
    if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
        format!("\"{}\"", String::from_utf8_lossy(b))
    } else {
        b.iter().map(|c| format!("{c:02x}")).collect::<Vec<_>>().join(" ")
    }
}

fn magic_hint(b: &[u8; 8]) -> &'static str {
    if b.starts_with(b"HTTP") || b.starts_with(b"GET ") || b.starts_with(b"POST") || b.starts_with(b"<") {
        " (a web server or client: wrong port?)"
    } else if b.starts_with(b"SSH-") {
        " (an SSH server: wrong port?)"
    } else {
        " (wrong port?)"
    }
}

/// An error while speaking the protocol: either the transport failed or the peer broke the rules.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Reads the peer's hello and checks magic and version.
pub fn read_hello<R: Read>(r: &mut R) -> Result<(), WireError> {
    let mut h = [0u8; HELLO_LEN];
    r.read_exact(&mut h)?;
    check_hello(&h)?;
    Ok(())
}

/// Checks a hello already read: magic first, so garbage is reported as garbage, not as a version.
pub fn check_hello(h: &[u8; HELLO_LEN]) -> Result<(), ProtocolError> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&h[..MAGIC.len()]);
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let peer = u16::from_be_bytes([h[8], h[9]]);
    if peer != VERSION {
        return Err(ProtocolError::VersionMismatch { peer, ours: VERSION });
    }
    Ok(())
}

/// Writes this side's hello.
pub fn write_hello<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(&hello())
}

#[cfg(test)]
mod tests;
