//! Length-prefixed frames over any `Read` / `Write`.
//!
//! A frame is `len: u32 BE`, `kind: u8`, then `len` payload bytes. The header is fixed-size so a
//! reader always knows how much to read next; the length is checked against the kind's limit
//! before anything is allocated, so a peer claiming 4 GiB costs nothing.

use std::fmt;
use std::io::{self, Read, Write};

use super::{
    MAX_CHUNK_LEN, MAX_HANDSHAKE_LEN, MAX_MESSAGE_LEN, MAX_RECORD_LEN, Message, ProtocolError, WireError,
    decode_message, encode_message,
};

/// Size of a frame header: length then kind.
pub const FRAME_HEADER_LEN: usize = 5;

/// What a frame carries. Values are part of the wire format and are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A bincode-encoded [`Message`].
    Message = 0x01,
    /// A piece of the file body.
    Data = 0x02,
    /// A step of the secure-channel handshake, in the clear, before any record (PROTOCOL.md,
    /// "Secure channel").
    Handshake = 0x03,
    /// An encrypted record: AES-256-GCM over a piece of the frame stream, the header as
    /// associated data.
    Record = 0x04,
}

impl FrameKind {
    fn from_byte(b: u8) -> Result<Self, ProtocolError> {
        match b {
            0x01 => Ok(FrameKind::Message),
            0x02 => Ok(FrameKind::Data),
            0x03 => Ok(FrameKind::Handshake),
            0x04 => Ok(FrameKind::Record),
            other => Err(ProtocolError::UnknownFrameKind(other)),
        }
    }

    /// The largest payload a frame of this kind may carry.
    pub fn limit(self) -> u32 {
        match self {
            FrameKind::Message => MAX_MESSAGE_LEN,
            FrameKind::Data => MAX_CHUNK_LEN,
            FrameKind::Handshake => MAX_HANDSHAKE_LEN,
            FrameKind::Record => MAX_RECORD_LEN,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameKind::Message => "message",
            FrameKind::Data => "data",
            FrameKind::Handshake => "handshake",
            FrameKind::Record => "record",
        })
    }
}

/// A decoded, limit-checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub len: u32,
}

impl FrameHeader {
    /// The header's bytes on the wire.
    pub fn encode(self) -> [u8; FRAME_HEADER_LEN] {
        let l = self.len.to_be_bytes();
        [l[0], l[1], l[2], l[3], self.kind as u8]
    }

    /// Parses and checks a header: known kind, length within the kind's limit, no empty data
    /// frame (it would let a peer spin the receiver without progress).
    pub fn decode(b: [u8; FRAME_HEADER_LEN]) -> Result<Self, ProtocolError> {
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let kind = FrameKind::from_byte(b[4])?;
        if len > kind.limit() {
            return Err(ProtocolError::FrameTooLarge { kind, len, limit: kind.limit() });
        }
        if kind == FrameKind::Data && len == 0 {
            return Err(ProtocolError::EmptyChunk);
        }
        Ok(FrameHeader { kind, len })
    }
}

/// Writes a frame header. The payload follows with plain writes, so a data payload can come
/// straight from a file buffer without being copied into a frame.
pub fn write_frame_header<W: Write>(w: &mut W, kind: FrameKind, len: u32) -> io::Result<()> {
    w.write_all(&FrameHeader { kind, len }.encode())
}

/// Reads and checks one frame header.
pub fn read_frame_header<R: Read>(r: &mut R) -> Result<FrameHeader, WireError> {
    let mut b = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut b)?;
    Ok(FrameHeader::decode(b)?)
}

/// The end of a stream's body (an [`EntryKind::Stream`](super::EntryKind) entry): an empty data
/// frame. Valid only there; anywhere else [`FrameHeader::decode`] refuses it (`EmptyChunk`).
pub const STREAM_END: [u8; FRAME_HEADER_LEN] = [0, 0, 0, 0, FrameKind::Data as u8];

/// Reads one frame header of a stream's body: `None` for [`STREAM_END`], otherwise a checked
/// header (which the caller requires to be a data frame).
pub fn read_stream_frame_header<R: Read>(r: &mut R) -> Result<Option<FrameHeader>, WireError> {
    let mut b = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut b)?;
    if b == STREAM_END {
        return Ok(None);
    }
    Ok(Some(FrameHeader::decode(b)?))
}

/// Writes one message as a single frame.
pub fn write_message<W: Write>(w: &mut W, msg: &Message) -> io::Result<()> {
    let payload = encode_message(msg);
    // Messages are built by this side from bounded fields; a failure here is a bug, not input.
    assert!(payload.len() <= MAX_MESSAGE_LEN as usize, "message exceeds MAX_MESSAGE_LEN");
    let mut buf = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    buf.extend_from_slice(&FrameHeader { kind: FrameKind::Message, len: payload.len() as u32 }.encode());
    buf.extend_from_slice(&payload);
    w.write_all(&buf)
}

/// Reads one frame that must be a message and decodes it.
pub fn read_message<R: Read>(r: &mut R) -> Result<Message, WireError> {
    let h = read_frame_header(r)?;
    if h.kind != FrameKind::Message {
        return Err(ProtocolError::UnexpectedFrame { expected: FrameKind::Message, got: h.kind }.into());
    }
    // The length was checked against MAX_MESSAGE_LEN by `decode`, so this allocation is bounded.
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload)?;
    Ok(decode_message(&payload)?)
}
