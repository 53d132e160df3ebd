//! The reading half of a connection: frames in, under a deadline or an idle timeout.

use std::io::{self, BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use super::records::{CipherState, Opener, PlainRefusalError};
use super::{RECV_BUF, Socket};
use crate::error::{ChannelBroken, Error, Limit, is_timeout};
use crate::protocol::{
    self, FRAME_HEADER_LEN, FrameHeader, FrameKind, Message, ProtocolError, Reject, RejectCode, WireError,
};

/// A handshake step read from the peer, or its refusal in the clear.
pub enum Handshake {
    Step(Vec<u8>),
    Refused(crate::protocol::Reject),
}

/// Reads the peer's frames. Owns the read buffer and the time rules: an overall deadline (the
/// handshake, a manifest) or the idle timeout (no byte for that long).
pub struct FrameReader {
    inner: BufReader<Channel>,
    peer: String,
    /// The rule in force, for error messages.
    limit: Limit,
    idle_limit: Limit,
}

/// A socket reader with an optional overall deadline: before each read the socket's timeout is
/// set to the time left, so a peer trickling one byte at a time cannot stretch a phase. Without
/// a deadline it reads with the idle timeout.
struct Deadlined {
    stream: Socket,
    until: Option<Instant>,
    idle: Option<Duration>,
    /// The last read under a deadline waited for the idle timeout, not the deadline.
    idle_fired: bool,
    /// The socket's read timeout was set for a deadline and must go back to the idle timeout.
    armed: bool,
    /// While a body arrives: the least bytes a second over each window of `idle` spent waiting,
    /// and the current window's wait and bytes.
    min_rate: Option<u64>,
    waited: Duration,
    got: u64,
}

/// What the buffer reads from: the socket under its time rules, through the record opener once
/// the secure channel is up.
struct Channel {
    raw: Deadlined,
    open: Option<Opener>,
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.open {
            Some(o) => o.read(&mut self.raw, buf),
            None => self.raw.read(buf),
        }
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.idle_fired = false;
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
            }
            // The idle timeout applies under a deadline too: a peer silent that long is dropped
            // even when the deadline is further away.
            self.idle_fired = self.idle.is_some_and(|idle| idle < left);
            let wait = self.idle.map_or(left, |idle| idle.min(left));
            self.stream.tcp().set_read_timeout(Some(wait))?;
            self.armed = true;
        }
        let (Some(rate), Some(window)) = (self.min_rate, self.idle) else {
            return self.stream.read(buf);
        };
        let start = Instant::now();
        let n = self.stream.read(buf)?;
        // Only the time spent waiting for the peer counts, not this side's own work.
        self.waited += start.elapsed();
        self.got += n as u64;
        if self.waited >= window {
            if self.got < rate.saturating_mul(window.as_secs().max(1)) {
                return Err(io::Error::other(format!(
                    "less than {rate} bytes/s for {} s (MIN_RATE; see --timeout)",
                    window.as_secs()
                )));
            }
            (self.waited, self.got) = (Duration::ZERO, 0);
        }
        Ok(n)
    }
}

impl FrameReader {
    pub(super) fn new(stream: Socket, peer: &str, idle: Option<Duration>, limit: Limit) -> FrameReader {
        let raw = Deadlined {
            stream,
            until: None,
            idle,
            idle_fired: false,
            armed: false,
            min_rate: None,
            waited: Duration::ZERO,
            got: 0,
        };
        let inner = BufReader::with_capacity(RECV_BUF, Channel { raw, open: None });
        FrameReader { inner, peer: peer.to_string(), limit, idle_limit: limit }
    }

    /// Reads under one overall deadline from now on (`limit` names it in errors), or with `None`
    /// goes back to the idle timeout.
    pub fn set_deadline(&mut self, until: Option<(Instant, Limit)>) -> io::Result<()> {
        let d = &mut self.inner.get_mut().raw;
        match until {
            Some((at, limit)) => {
                d.until = Some(at);
                self.limit = limit;
            }
            None => {
                d.until = None;
                d.armed = false;
                d.stream.tcp().set_read_timeout(d.idle)?;
                self.limit = self.idle_limit;
            }
        }
        Ok(())
    }

    /// Requires at least `rate` bytes a second from the peer (with `None`, no minimum), measured
    /// over windows of the idle timeout spent waiting in reads while it is set: a body trickled a
    /// byte at a time, each just inside the idle timeout, fails instead of holding its transfer
    /// slot forever. The window carries over from one body to the next, so many tiny bodies
    /// cannot trickle either.
    pub fn set_min_rate(&mut self, rate: Option<u64>) {
        self.inner.get_mut().raw.min_rate = rate;
    }

    /// The peer's address, as shown in messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Turns a failure on this connection into the error a user sees: a timeout naming the rule
    /// in force, a drop, or the peer's protocol violation. `what` says what this side was doing.
    pub fn error(&self, what: &'static str, e: WireError) -> Error {
        let limit = if self.inner.get_ref().raw.idle_fired { self.idle_limit } else { self.limit };
        Error::wire(&self.peer, what, limit, e)
    }

    /// Reads and checks the peer's hello, straight from the socket: nothing past it may sit in
    /// the buffer, since what follows may be records to open.
    pub fn hello(&mut self) -> Result<(), WireError> {
        protocol::read_hello(&mut self.inner.get_mut().raw)
    }

    /// Reads one handshake frame, straight from the socket (see [`FrameReader::hello`]). The
    /// peer may refuse in the clear instead: a `Reject` message.
    pub fn handshake(&mut self) -> Result<Handshake, WireError> {
        let mut first = [0u8; 1];
        self.inner.get_mut().raw.read_exact(&mut first)?;
        self.begun(|r| {
            let raw = &mut r.inner.get_mut().raw;
            let mut rest = [0u8; FRAME_HEADER_LEN - 1];
            raw.read_exact(&mut rest)?;
            let h = FrameHeader::decode([first[0], rest[0], rest[1], rest[2], rest[3]])?;
            // Lengths were checked against the kind's limit (1 KiB, 64 KiB) by the decoder;
            // nothing is allocated for any other kind.
            match h.kind {
                FrameKind::Handshake => {
                    let mut payload = vec![0u8; h.len as usize];
                    raw.read_exact(&mut payload)?;
                    Ok(Handshake::Step(payload))
                }
                FrameKind::Message => {
                    let mut payload = vec![0u8; h.len as usize];
                    raw.read_exact(&mut payload)?;
                    match protocol::decode_message(&payload)? {
                        Message::Reject(r) => Ok(Handshake::Refused(r)),
                        other => Err(ProtocolError::UnexpectedMessage {
                            expected: "a handshake step or a refusal",
                            got: other.name(),
                        }
                        .into()),
                    }
                }
                got => Err(ProtocolError::UnexpectedFrame { expected: FrameKind::Handshake, got }.into()),
            }
        })
    }

    /// From now on, reads open records with `cipher` (the handshake is done). Nothing was
    /// buffered: the hello and the handshake were read straight from the socket.
    pub(crate) fn open_records(&mut self, cipher: CipherState, min_rate: u64, plain_refusals: bool) {
        debug_assert!(self.inner.buffer().is_empty());
        let ch = self.inner.get_mut();
        let opener = Opener::new(cipher, ch.raw.idle, min_rate);
        ch.open = Some(if plain_refusals { opener } else { opener.without_plain_refusals() });
    }

    /// Reads one frame that must be a message. Waiting for its first byte is waiting (the idle
    /// timeout, or the deadline in force); once it has begun, the whole message must be in within
    /// one idle timeout, so a peer cannot trickle a message a byte at a time, each just inside
    /// the idle timeout, and hold this side for as long as it likes.
    pub fn message(&mut self) -> Result<Message, WireError> {
        let mut first = [0u8; 1];
        if let Err(e) = self.inner.read_exact(&mut first) {
            return match e.get_ref().and_then(|i| i.downcast_ref::<PlainRefusalError>()) {
                Some(&PlainRefusalError(len)) => self.begun(|r| r.plain_refusal(len)),
                None => Err(e.into()),
            };
        }
        self.begun(|r| {
            let mut rest = [0u8; FRAME_HEADER_LEN - 1];
            r.inner.read_exact(&mut rest)?;
            let h = FrameHeader::decode([first[0], rest[0], rest[1], rest[2], rest[3]])?;
            if h.kind != FrameKind::Message {
                return Err(
                    ProtocolError::UnexpectedFrame { expected: FrameKind::Message, got: h.kind }.into()
                );
            }
            // The length was checked against MAX_MESSAGE_LEN by `decode`: a bounded allocation.
            let mut payload = vec![0u8; h.len as usize];
            r.inner.read_exact(&mut payload)?;
            Ok(protocol::decode_message(&payload)?)
        })
    }

    /// Runs `read`, the rest of something whose first byte is in, under the rule that it must be
    /// complete within one idle timeout (or the phase's deadline, if sooner): a peer cannot
    /// trickle a message, a handshake step or a refusal a byte at a time, each just inside the
    /// idle timeout, and hold this side for as long as it likes.
    fn begun<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T, WireError>) -> Result<T, WireError> {
        let d = &mut self.inner.get_mut().raw;
        let saved = d.until;
        // Whether the phase's own deadline comes first (then it is the one a timeout reports).
        let mut outer_first = saved.is_some();
        if let Some(idle) = d.idle {
            let by = Instant::now() + idle;
            outer_first = saved.is_some_and(|s| s <= by);
            d.until = Some(saved.map_or(by, |s| s.min(by)));
        }
        let result = read(self);
        let d = &mut self.inner.get_mut().raw;
        d.until = saved;
        if saved.is_none() && d.armed {
            d.armed = false;
            let _ = d.stream.tcp().set_read_timeout(d.idle);
        }
        // Stopped in the middle: the stream is out of step, so this is not a quiet spell to wait
        // out (as a timeout before the first byte is) but the end of the connection.
        result.map_err(|e| match e {
            WireError::Io(io) if is_timeout(&io) && !outer_first => WireError::Io(io::Error::other(format!(
                "a message was not complete within {} s of its first byte (see --timeout)",
                self.idle_limit.secs
            ))),
            other => other,
        })
    }

    /// The first frame on a secure connection was a message in the clear: the peer's refusal
    /// (its side of the code handshake failed). Only `AuthFailed` and `Busy` may come so; anything
    /// else breaks the channel.
    fn plain_refusal(&mut self, len: u32) -> Result<Message, WireError> {
        let ch = self.inner.get_mut();
        let opener = ch.open.as_mut().expect("only an opener reports a plaintext refusal");
        let payload = opener.take_refusal(&mut ch.raw, len)?;
        // Only what a receiver may say after checking a code: the code was wrong, or its guess
        // budget is spent. Anything else in the clear is someone on the path.
        match protocol::decode_message(&payload)? {
            m @ Message::Reject(Reject { code: RejectCode::AuthFailed | RejectCode::Busy, .. }) => Ok(m),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                ChannelBroken(format!("a plaintext {} where the first record was due", other.name())),
            )
            .into()),
        }
    }

    /// Whether a record from the peer has opened (it holds the channel's keys).
    pub fn records_opened(&self) -> bool {
        self.inner.get_ref().open.as_ref().is_some_and(Opener::opened_one)
    }

    /// Reads one frame header.
    pub fn header(&mut self) -> Result<FrameHeader, WireError> {
        protocol::read_frame_header(&mut self.inner)
    }

    /// Reads one frame header of a stream's body: `None` at its end (an empty data frame, see
    /// [`protocol::STREAM_END`]).
    pub fn stream_header(&mut self) -> Result<Option<FrameHeader>, WireError> {
        protocol::read_stream_frame_header(&mut self.inner)
    }

    /// Reads a frame header; one that is not already buffered is read straight from the socket,
    /// so the buffer does not fill up with the frame's payload, which [`FrameReader::payload`]
    /// then reads without a copy through it.
    pub fn header_direct(&mut self) -> Result<FrameHeader, WireError> {
        if !self.inner.buffer().is_empty() {
            return self.header();
        }
        let mut h = [0u8; FRAME_HEADER_LEN];
        self.inner.get_mut().read_exact(&mut h)?;
        Ok(FrameHeader::decode(h)?)
    }

    /// Fills `dst` with payload bytes through the buffer (small payloads).
    pub fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(dst)
    }

    /// Fills `dst` with payload bytes: first what the buffer holds, then straight from the socket
    /// into `dst` (one copy less per byte for large bodies).
    pub fn payload(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let held = self.inner.buffer();
        let n = held.len().min(dst.len());
        dst[..n].copy_from_slice(&held[..n]);
        self.inner.consume(n);
        if n < dst.len() {
            self.inner.get_mut().read_exact(&mut dst[n..])?;
        }
        Ok(())
    }

    /// Reads and discards whatever the peer sends until it closes or `until` passes (after a
    /// refusal, so the peer reads it instead of a reset caused by unread bytes).
    pub fn discard_until(&mut self, until: Instant) {
        let mut buf = [0u8; 16 * 1024];
        let d = &mut self.inner.get_mut().raw;
        d.until = Some(until);
        while matches!(d.read(&mut buf), Ok(n) if n > 0) {}
    }

    /// Reads and discards `n` payload bytes.
    pub fn skip(&mut self, n: u64) -> io::Result<()> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if copied < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}
