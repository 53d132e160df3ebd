//! The writing half of a connection: frames out through one buffer, and file bodies by
//! `sendfile(2)` where the plaintext channel allows it.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpStream};

use indicatif::ProgressBar;

use super::records::{CipherState, Sealer};
use super::{SOCKET_BUF, Socket};
use crate::error::{Error, Limit};
use crate::protocol::{self, FRAME_HEADER_LEN, FrameHeader, FrameKind, MAX_RECORD_PLAIN, Message, WireError};

/// Writes this side's frames. Nothing is sent until [`FrameWriter::flush`] (or a full buffer):
/// the engines flush at the end of each phase, so many small frames share one write.
pub struct FrameWriter {
    inner: BufWriter<Out>,
    peer: String,
    limit: Limit,
}

/// Where the buffer's bytes go: the socket, through the record sealer once the secure channel is
/// up.
pub(crate) struct Out {
    sock: Socket,
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
        Ok(())
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

impl FrameWriter {
    pub(super) fn new(stream: Socket, peer: &str, limit: Limit) -> FrameWriter {
        let out = Out { sock: stream, seal: None };
        FrameWriter { inner: BufWriter::with_capacity(SOCKET_BUF, out), peer: peer.to_string(), limit }
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
        let _ = self.inner.get_ref().sock.tcp().shutdown(how);
    }

    /// Writes bytes `offset..size` of `file` as data frames of at most `chunk` bytes, advancing
    /// `bar`. Does not flush: a batch streams many bodies through one buffer.
    pub fn file_body(
        &mut self,
        file: &mut File,
        (offset, size): (u64, u64),
        chunk: u32,
        bar: &ProgressBar,
    ) -> Result<(), FileError> {
        if self.is_sealed() && size - offset >= SEALED_DIRECT_MIN_BODY {
            return self.file_body_sealed(file, (offset, size), chunk, bar);
        }
        if !self.is_sealed() && chunk as usize >= SENDFILE_MIN_CHUNK && size - offset >= SENDFILE_MIN_BODY {
            return self.file_body_sendfile(file, (offset, size), chunk, bar);
        }
        file.seek(SeekFrom::Start(offset)).map_err(FileError::Local)?;
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
        file.seek(SeekFrom::Start(offset)).map_err(FileError::Local)?;
        let room = MAX_RECORD_PLAIN as usize;
        let mut left = size - offset;
        let Out { sock, seal } = self.inner.get_mut();
        let sealer = seal.as_mut().expect("sealed");
        // Frames split where records do: a frame is at most `chunk` bytes, and a record holds
        // as many whole frames as fit (a frame larger than a record spans several).
        let mut frame_left = 0u64;
        while left > 0 {
            let written = sealer.write_record_with(sock, |buf| {
                while left > 0 && buf.len() - FRAME_HEADER_LEN < room {
                    if frame_left == 0 {
                        if room - (buf.len() - FRAME_HEADER_LEN) < FRAME_HEADER_LEN + 1 {
                            break;
                        }
                        frame_left = left.min(u64::from(chunk));
                        buf.extend_from_slice(
                            &FrameHeader { kind: FrameKind::Data, len: frame_left as u32 }.encode(),
                        );
                    }
                    let space = room - (buf.len() - FRAME_HEADER_LEN);
                    let n = frame_left.min(space as u64) as usize;
                    let at = buf.len();
                    buf.resize(at + n, 0);
                    file.read_exact(&mut buf[at..]).map_err(FileError::Local)?;
                    frame_left -= n as u64;
                    left -= n as u64;
                    bar.inc(n as u64);
                }
                Ok(())
            })?;
            written.map_err(FileError::Net)?;
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
        use rustix::io::Errno;
        // Messages still buffered (the `Body` announcing this one) go first.
        self.inner.flush().map_err(FileError::Net)?;
        let sock: &TcpStream = self.inner.get_ref().sock.tcp();
        let mut pos = offset;
        while pos < size {
            let len = (size - pos).min(u64::from(chunk)) as usize;
            let header = FrameHeader { kind: FrameKind::Data, len: len as u32 }.encode();
            let mut sent = 0;
            while sent < header.len() {
                match rustix::net::send(sock, &header[sent..], rustix::net::SendFlags::MORE) {
                    Ok(n) => sent += n,
                    Err(Errno::INTR) => {}
                    Err(e) => return Err(FileError::Net(e.into())),
                }
            }
            let mut left = len;
            while left > 0 {
                match rustix::fs::sendfile(sock, file, Some(&mut pos), left) {
                    Ok(0) => return Err(FileError::Local(io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => {
                        left -= n;
                        bar.inc(n as u64);
                    }
                    Err(Errno::INTR) => {}
                    // The socket's side: the peer went away or the send timeout passed.
                    Err(
                        e
                        @ (Errno::PIPE | Errno::CONNRESET | Errno::AGAIN | Errno::TIMEDOUT | Errno::NOTCONN),
                    ) => return Err(FileError::Net(e.into())),
                    Err(e) => return Err(FileError::Local(e.into())),
                }
            }
        }
        Ok(())
    }
}
