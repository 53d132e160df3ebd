//! The writing half of a connection: frames out through one buffer, and file bodies by
//! `sendfile(2)` where the plaintext channel allows it. Every write, either way, counts the time
//! it spends blocked on a peer that does not take the bytes ([`Outbound`]).

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use super::records::{self, CipherState, Sealer};
use super::{MIN_RATE, SOCKET_BUF, Socket};
use crate::error::{Error, Limit, is_timeout};
use crate::protocol::{self, FRAME_HEADER_LEN, FrameHeader, FrameKind, Message, WireError};

/// Writes this side's frames. Nothing is sent until [`FrameWriter::flush`] (or a full buffer):
/// the engines flush at the end of each phase, so many small frames share one write.
pub struct FrameWriter {
    inner: BufWriter<Out>,
    peer: String,
    limit: Limit,
}

/// Where the buffer's bytes go: the socket (counting blocked time), through the record sealer
/// once the secure channel is up.
pub(crate) struct Out {
    sock: Outbound,
    seal: Option<Sealer>,
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.seal {
            Some(s) => s.write_record(&mut self.sock, buf),
            None => self.sock.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.check()
    }
}

/// The socket as this side writes to it. A write blocks in ticks of
/// [`WRITE_TICK`](super::WRITE_TICK); the time spent blocked is counted, and a peer that, over
/// `idle` of it, takes nothing, or less than [`MIN_RATE`] a second, fails the write. A peer
/// frozen (SIGSTOP), or one that stops reading on purpose, is thus given up on after the idle
/// timeout of this side's waiting, though the connection never looks idle to the reader (the
/// kernel still acknowledges, and the peer may still talk). Only time spent in writes counts,
/// not this side's own work between them.
pub(crate) struct Outbound {
    socket: Socket,
    idle: Option<Duration>,
    /// Blocked time since the peer last took a window's worth of bytes, and what it took since.
    stalled: Duration,
    taken: u64,
    /// Why writing ended, once it has: later writes fail at once the same way, so that flushing
    /// on the way out does not wait another window for a peer that stopped.
    failed: Option<(io::ErrorKind, String)>,
}

impl Outbound {
    fn new(socket: Socket, idle: Option<Duration>) -> Outbound {
        Outbound { socket, idle, stalled: Duration::ZERO, taken: 0, failed: None }
    }

    /// The error that ended writing, if it has ended.
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    /// Counts one write attempt that took `blocked` and moved `n` bytes; fails (for good) when
    /// the peer has taken too little over a whole window of blocked time.
    fn account(&mut self, blocked: Duration, n: usize) -> io::Result<()> {
        let Some(window) = self.idle else { return Ok(()) };
        self.stalled += blocked;
        self.taken += n as u64;
        let secs = window.as_secs().max(1);
        if self.taken >= MIN_RATE.saturating_mul(secs) {
            // Progress enough: a new window starts, so earlier progress cannot excuse a stall.
            (self.stalled, self.taken) = (Duration::ZERO, 0);
        } else if self.stalled >= window {
            self.failed = Some(if self.taken == 0 {
                (io::ErrorKind::TimedOut, format!("the peer took nothing for {secs} s (see --timeout)"))
            } else {
                (
                    io::ErrorKind::Other,
                    format!(
                        "the peer took less than {MIN_RATE} bytes/s for {secs} s of blocked writes \
                         (MIN_RATE; see --timeout)"
                    ),
                )
            });
            return self.check();
        }
        Ok(())
    }

    /// Runs one blocking send `op` until it moves something, counting each tick it waits.
    fn attempt(&mut self, mut op: impl FnMut(&Socket) -> io::Result<usize>) -> io::Result<usize> {
        self.check()?;
        loop {
            let start = Instant::now();
            let n = match op(&self.socket) {
                Ok(n) => n,
                // The send timeout (a tick) passed with nothing taken.
                Err(e) if is_timeout(&e) => 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            };
            self.account(start.elapsed(), n)?;
            if n > 0 {
                return Ok(n);
            }
        }
    }

    /// `sendfile(2)` of up to `len` bytes of `file` at `*pos` (advanced), counted like a write.
    /// Returns `Ok(0)` at the end of the file.
    fn sendfile(&mut self, file: &File, pos: &mut u64, len: usize) -> Result<usize, FileError> {
        use rustix::io::Errno;
        self.check().map_err(FileError::Net)?;
        loop {
            let start = Instant::now();
            let n = match rustix::fs::sendfile(self.socket.tcp(), file, Some(pos), len) {
                Ok(0) => return Ok(0),
                Ok(n) => n,
                Err(Errno::INTR | Errno::AGAIN) => 0,
                // The socket's side: the peer went away.
                Err(e @ (Errno::PIPE | Errno::CONNRESET | Errno::TIMEDOUT | Errno::NOTCONN)) => {
                    return Err(FileError::Net(e.into()));
                }
                Err(e) => return Err(FileError::Local(e.into())),
            };
            self.account(start.elapsed(), n).map_err(FileError::Net)?;
            if n > 0 {
                return Ok(n);
            }
        }
    }
}

impl Write for Outbound {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.attempt(|s| {
            let mut tcp = s.tcp();
            tcp.write(buf)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check()
    }
}

/// Why a file body could not be sent.
#[derive(Debug)]
pub enum FileError {
    /// Reading the file failed (or it shrank): this file fails, the connection is fine.
    Local(io::Error),
    /// The connection failed or timed out.
    Net(io::Error),
}

/// Bodies at least this large go out through `sendfile(2)`: the kernel copies from the page cache
/// to the socket, and this process never touches the bytes. Smaller ones (most files of a batch)
/// are read and framed through the socket buffer, where several share one write.
const SENDFILE_MIN_BODY: u64 = 1 << 20;
/// Frames this large make a header per frame cheap next to the `sendfile` call it precedes.
const SENDFILE_MIN_CHUNK: usize = 64 * 1024;
/// Sealed bodies at least this large are read straight into records; smaller ones go through the
/// buffer with the frames around them (many small files share a record).
const SEALED_DIRECT_MIN_BODY: u64 = 64 * 1024;
/// A [`BodyTap`] takes bodies at least this large (those read straight into records).
pub const TAPPED_MIN_BODY: u64 = SEALED_DIRECT_MIN_BODY;

/// Another reader of a sealed body's bytes, on another thread: the sender's hashing thread, so
/// that a large file whose digest is not known yet is read once, not once for its digest and
/// once for its body. Record buffers are lent to it filled and taken back in the same order.
pub trait BodyTap {
    /// Lends a filled record buffer; `data` are the ranges of it that hold the file's bytes, in
    /// order.
    fn lend(&mut self, buf: Vec<u8>, data: Vec<Range<usize>>) -> io::Result<()>;
    /// The buffer lent longest ago, once the tap is done with it (unchanged).
    fn take_back(&mut self) -> io::Result<Vec<u8>>;
}

/// Records lent to a [`BodyTap`] at most, filled and waiting to be sealed: enough that reading
/// the file, hashing it and sealing it overlap; each is a record buffer (256 KiB).
const TAP_DEPTH: usize = 8;
const RECORD_ROOM_START: usize = records::RECORD_ROOM.start;

/// Cuts a body into data frames that fill records: a frame is at most `chunk` bytes, and a
/// record holds as many whole frames as fit (a frame larger than a record spans several).
struct Frames {
    /// Bytes of the body still to read, and of the current frame.
    left: u64,
    frame_left: u64,
    chunk: u32,
}

impl Frames {
    /// Fills `room` with frame headers and the file's bytes read straight into it. Returns the
    /// bytes filled and how many of them are the file's; `data` is told where those lie.
    fn fill(
        &mut self,
        room: &mut [u8],
        file: &mut File,
        mut data: impl FnMut(Range<usize>),
    ) -> Result<(usize, u64), FileError> {
        let mut at = 0;
        let mut read = 0u64;
        while self.left > 0 && at < room.len() {
            if self.frame_left == 0 {
                if room.len() - at < FRAME_HEADER_LEN + 1 {
                    break;
                }
                self.frame_left = self.left.min(u64::from(self.chunk));
                let header = FrameHeader { kind: FrameKind::Data, len: self.frame_left as u32 }.encode();
                room[at..at + FRAME_HEADER_LEN].copy_from_slice(&header);
                at += FRAME_HEADER_LEN;
            }
            let n = self.frame_left.min((room.len() - at) as u64) as usize;
            file.read_exact(&mut room[at..at + n]).map_err(FileError::Local)?;
            data(at..at + n);
            at += n;
            read += n as u64;
            self.frame_left -= n as u64;
            self.left -= n as u64;
        }
        Ok((at, read))
    }
}

/// Moves a file that was just opened (so at its start) to `offset`: no `lseek` for a body sent
/// whole, the common case (a batch of small files would pay one per file).
fn seek_to(file: &mut File, offset: u64) -> Result<(), FileError> {
    if offset > 0 {
        file.seek(SeekFrom::Start(offset)).map_err(FileError::Local)?;
    }
    Ok(())
}

impl FrameWriter {
    /// `idle` is the idle timeout, the window of blocked time the peer gets (`None`: no limit).
    /// The socket's send timeout must be [`WRITE_TICK`](super::WRITE_TICK) when there is one.
    pub(super) fn new(stream: Socket, peer: &str, idle: Option<Duration>, limit: Limit) -> FrameWriter {
        let out = Out { sock: Outbound::new(stream, idle), seal: None };
        FrameWriter { inner: BufWriter::with_capacity(SOCKET_BUF, out), peer: peer.to_string(), limit }
    }

    /// Whether writing has ended because the peer stopped taking the bytes (see `Outbound`):
    /// a peer that does not read will not answer either, so nothing more is waited for.
    pub fn peer_stalled(&self) -> bool {
        self.inner.get_ref().sock.failed.is_some()
    }

    /// Writes one handshake frame and flushes it.
    pub fn handshake(&mut self, payload: &[u8]) -> io::Result<()> {
        protocol::write_frame_header(&mut self.inner, FrameKind::Handshake, payload.len() as u32)?;
        self.inner.write_all(payload)?;
        self.inner.flush()
    }

    /// From now on, everything written is sealed into records with `cipher`. What is buffered
    /// (the handshake) goes out in the clear first.
    pub(crate) fn seal_records(&mut self, cipher: CipherState) -> io::Result<()> {
        self.inner.flush()?;
        self.inner.get_mut().seal = Some(Sealer::new(cipher));
        Ok(())
    }

    /// Whether frames travel in records (then bodies cannot go by `sendfile`).
    pub fn is_sealed(&self) -> bool {
        self.inner.get_ref().seal.is_some()
    }

    /// See [`super::FrameReader::error`].
    pub fn error(&self, what: &'static str, e: WireError) -> Error {
        Error::wire(&self.peer, what, self.limit, e)
    }

    pub fn hello(&mut self) -> io::Result<()> {
        protocol::write_hello(&mut self.inner)?;
        self.inner.flush()
    }

    pub fn message(&mut self, msg: &Message) -> io::Result<()> {
        protocol::write_message(&mut self.inner, msg)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    /// Flushes what is buffered, then ends the connection in direction `how` (a reader blocked on
    /// it, in this process or the peer's, sees the end).
    pub fn shutdown(&mut self, how: Shutdown) {
        if how == Shutdown::Write {
            let _ = self.inner.flush();
        }
        let _ = self.inner.get_ref().sock.socket.tcp().shutdown(how);
    }

    /// Writes `bytes` as data frames of at most `chunk` bytes each (a stream's body, read from a
    /// pipe). Does not flush.
    pub fn data(&mut self, bytes: &[u8], chunk: u32) -> io::Result<()> {
        for piece in bytes.chunks(chunk as usize) {
            protocol::write_frame_header(&mut self.inner, FrameKind::Data, piece.len() as u32)?;
            self.inner.write_all(piece)?;
        }
        Ok(())
    }

    /// Ends a stream's body ([`protocol::STREAM_END`]). Does not flush.
    pub fn stream_end(&mut self) -> io::Result<()> {
        self.inner.write_all(&protocol::STREAM_END)
    }

    /// Writes bytes `offset..size` of `file` (just opened: at its start) as data frames of at
    /// most `chunk` bytes, advancing `bar`. Does not flush: a batch streams many bodies through one buffer.
    /// With a `tap` (only on a secure channel, for a body of at least [`TAPPED_MIN_BODY`]), the
    /// tap is lent every byte read on its way out.
    pub fn file_body(
        &mut self,
        file: &mut File,
        (offset, size): (u64, u64),
        chunk: u32,
        bar: &ProgressBar,
        tap: Option<&mut dyn BodyTap>,
    ) -> Result<(), FileError> {
        if let Some(tap) = tap {
            assert!(
                self.is_sealed() && size - offset >= TAPPED_MIN_BODY,
                "a tap on a sealed large body only"
            );
            return self.file_body_tapped(file, (offset, size), chunk, bar, tap);
        }
        if self.is_sealed() && size - offset >= SEALED_DIRECT_MIN_BODY {
            return self.file_body_sealed(file, (offset, size), chunk, bar);
        }
        if !self.is_sealed() && chunk as usize >= SENDFILE_MIN_CHUNK && size - offset >= SENDFILE_MIN_BODY {
            return self.file_body_sendfile(file, (offset, size), chunk, bar);
        }
        seek_to(file, offset)?;
        // Reads come from the file in large blocks whatever the chunk size, so a 1-byte chunk size
        // costs framing, not a syscall per byte.
        let block = (chunk as usize).max(SOCKET_BUF);
        // No bigger than the body: a batch sends thousands of small files through here.
        let mut buf = vec![0u8; (block as u64).min(size - offset) as usize];
        let mut remaining = size - offset;
        while remaining > 0 {
            let want = (block as u64).min(remaining) as usize;
            file.read_exact(&mut buf[..want]).map_err(FileError::Local)?;
            for piece in buf[..want].chunks(chunk as usize) {
                let net = |e| FileError::Net(e);
                protocol::write_frame_header(&mut self.inner, FrameKind::Data, piece.len() as u32)
                    .map_err(net)?;
                self.inner.write_all(piece).map_err(net)?;
            }
            remaining -= want as u64;
            bar.inc(want as u64);
        }
        Ok(())
    }

    /// [`FrameWriter::file_body`] on a secure channel: each record is filled with data frames
    /// read from the file straight into the record's buffer, sealed there and written, so a
    /// body's bytes are copied once (file to buffer) on their way out.
    fn file_body_sealed(
        &mut self,
        file: &mut File,
        (offset, size): (u64, u64),
        chunk: u32,
        bar: &ProgressBar,
    ) -> Result<(), FileError> {
        // Messages still buffered (the `Body` announcing this one) go first, in their own record.
        self.inner.flush().map_err(FileError::Net)?;
        seek_to(file, offset)?;
        let mut frames = Frames { left: size - offset, frame_left: 0, chunk };
        let Out { sock, seal } = self.inner.get_mut();
        let sealer = seal.as_mut().expect("sealed");
        while frames.left > 0 {
            let written = sealer.write_record_with(sock, |room: &mut [u8]| {
                let (at, data) = frames.fill(room, file, |_| {})?;
                bar.inc(data);
                Ok(at)
            })?;
            written.map_err(FileError::Net)?;
        }
        Ok(())
    }

    /// [`FrameWriter::file_body_sealed`] with a tap: each filled record buffer is lent to `tap`
    /// (another thread, which reads the file's bytes in it) and sealed and written once it comes
    /// back, up to [`TAP_DEPTH`] records in flight. The file is read once for both.
    fn file_body_tapped(
        &mut self,
        file: &mut File,
        (offset, size): (u64, u64),
        chunk: u32,
        bar: &ProgressBar,
        tap: &mut dyn BodyTap,
    ) -> Result<(), FileError> {
        self.inner.flush().map_err(FileError::Net)?;
        seek_to(file, offset)?;
        let mut frames = Frames { left: size - offset, frame_left: 0, chunk };
        let Out { sock, seal } = self.inner.get_mut();
        let sealer = seal.as_mut().expect("sealed");
        let mut spare: Vec<Vec<u8>> = Vec::with_capacity(TAP_DEPTH);
        // Plaintext length and file bytes of each record lent, oldest first.
        let mut lent = std::collections::VecDeque::with_capacity(TAP_DEPTH);
        while frames.left > 0 || !lent.is_empty() {
            if frames.left > 0 && lent.len() < TAP_DEPTH {
                let mut buf = spare.pop().unwrap_or_else(records::record_buffer);
                let mut ranges = Vec::with_capacity(2);
                let (at, data) = frames.fill(&mut buf[records::RECORD_ROOM], file, |r| {
                    ranges.push(r.start + RECORD_ROOM_START..r.end + RECORD_ROOM_START)
                })?;
                tap.lend(buf, ranges).map_err(FileError::Local)?;
                lent.push_back((at, data));
                continue;
            }
            let (at, data) = lent.pop_front().expect("lent");
            let mut buf = tap.take_back().map_err(FileError::Local)?;
            sealer.seal_buffer(sock, &mut buf, at).map_err(FileError::Net)?;
            bar.inc(data);
            spare.push(buf);
        }
        Ok(())
    }

    /// [`FrameWriter::file_body`] by `sendfile(2)`: for each frame, its 5-byte header with
    /// `MSG_MORE` (so it travels in the same segment as the data), then the data straight from
    /// the file. Only a plaintext channel can do this: the bytes never pass through this process.
    fn file_body_sendfile(
        &mut self,
        file: &File,
        (offset, size): (u64, u64),
        chunk: u32,
        bar: &ProgressBar,
    ) -> Result<(), FileError> {
        // Messages still buffered (the `Body` announcing this one) go first.
        self.inner.flush().map_err(FileError::Net)?;
        let out = &mut self.inner.get_mut().sock;
        let mut pos = offset;
        while pos < size {
            let len = (size - pos).min(u64::from(chunk)) as usize;
            let header = FrameHeader { kind: FrameKind::Data, len: len as u32 }.encode();
            let mut sent = 0;
            while sent < header.len() {
                let more = |s: &Socket| {
                    rustix::net::send(s.tcp(), &header[sent..], rustix::net::SendFlags::MORE)
                        .map_err(Into::into)
                };
                sent += out.attempt(more).map_err(FileError::Net)?;
            }
            let mut left = len;
            while left > 0 {
                match out.sendfile(file, &mut pos, left)? {
                    0 => return Err(FileError::Local(io::ErrorKind::UnexpectedEof.into())),
                    n => {
                        left -= n;
                        bar.inc(n as u64);
                    }
                }
            }
        }
        Ok(())
    }
}
