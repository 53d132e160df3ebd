//! Receiving one body: frames from the socket into a partial file, hashed on the way.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use crate::hash::Hasher;
use crate::partial::Partial;
use crate::protocol::{self, FrameKind, ProtocolError, WireError, read_frame_header};

/// Read size from the socket into the file: one buffer per transfer, whatever the chunk size, so
/// memory stays flat however large the file or the sender's chunks.
pub(crate) const RECV_BUF: usize = 256 * 1024;

/// Bytes a transfer still has to write, counted in the shared pool. Shrinks as data lands (the
/// file system's free space shrinks by the same amount) and returns the rest when dropped.
pub(super) struct Reservation<'a> {
    pub(super) pool: &'a Mutex<u64>,
    pub(super) left: u64,
}

impl Reservation<'_> {
    fn consume(&mut self, n: u64) {
        let n = n.min(self.left);
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) -= n;
        self.left -= n;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) -= self.left;
    }
}

/// A socket reader with an overall deadline: before each read the socket's timeout is set to the
/// time left, so a peer trickling one byte at a time cannot stretch the handshake. Without a
/// deadline it reads with whatever idle timeout the socket has.
pub(super) struct DeadlineReader<'a> {
    pub(super) stream: &'a TcpStream,
    pub(super) until: Option<Instant>,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake deadline passed"));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        (&mut &*self.stream).read(buf)
    }
}

pub(super) enum BodyError {
    /// The connection failed or the peer broke framing.
    Wire(WireError),
    /// A data frame would run past the offered size.
    TooLong(u32),
    /// Writing the partial file failed. The second field is how many bytes of the data frame
    /// being read were still unread: a caller that wants to stay in step with the stream skips
    /// those, then the remaining frames (see [`skip_body`]).
    Local(io::Error, u64),
}

/// Reads the next frame header of a body with `remaining` bytes still to come, and checks it is
/// a data frame that does not run past them. Returns its length.
fn next_data_frame(r: &mut BufReader<DeadlineReader<'_>>, remaining: u64) -> Result<usize, BodyError> {
    data_frame_len(read_frame_header(r).map_err(BodyError::Wire)?, remaining)
}

/// Checks a body's frame header: a data frame that does not run past the `remaining` bytes.
fn data_frame_len(h: protocol::FrameHeader, remaining: u64) -> Result<usize, BodyError> {
    if h.kind != FrameKind::Data {
        let e = ProtocolError::UnexpectedFrame { expected: FrameKind::Data, got: h.kind };
        return Err(BodyError::Wire(e.into()));
    }
    if u64::from(h.len) > remaining {
        return Err(BodyError::TooLong(h.len));
    }
    Ok(h.len as usize)
}

/// Like [`next_data_frame`], but a header that is not already buffered is read straight from
/// the socket, so the `BufReader` does not fill up with the frame's payload (which would then be
/// copied out of it: a large body bypasses the buffer, see [`read_payload`]).
fn next_data_frame_direct(r: &mut BufReader<DeadlineReader<'_>>, remaining: u64) -> Result<usize, BodyError> {
    if !r.buffer().is_empty() {
        return next_data_frame(r, remaining);
    }
    let mut h = [0u8; protocol::FRAME_HEADER_LEN];
    r.get_mut().read_exact(&mut h).map_err(|e| BodyError::Wire(e.into()))?;
    data_frame_len(protocol::FrameHeader::decode(h).map_err(|e| BodyError::Wire(e.into()))?, remaining)
}

/// Fills `dst` with payload bytes: first what the `BufReader` holds, then straight from the
/// socket into `dst`, without passing through the buffer (one copy less per byte).
fn read_payload(r: &mut BufReader<DeadlineReader<'_>>, dst: &mut [u8]) -> io::Result<()> {
    let held = r.buffer();
    let n = held.len().min(dst.len());
    dst[..n].copy_from_slice(&held[..n]);
    r.consume(n);
    if n < dst.len() {
        r.get_mut().read_exact(&mut dst[n..])?;
    }
    Ok(())
}

/// Reads and discards the rest of a body: `frame_left` bytes of the frame under way, then data
/// frames carrying `frames` more bytes. Keeps a batch in step when one file cannot be stored.
pub(super) fn skip_body(
    r: &mut BufReader<DeadlineReader<'_>>,
    frame_left: u64,
    frames: u64,
) -> Result<(), WireError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut discard = |r: &mut BufReader<DeadlineReader<'_>>, mut n: u64| -> Result<(), WireError> {
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    };
    discard(r, frame_left)?;
    let mut left = frames;
    while left > 0 {
        let len = match next_data_frame(r, left) {
            Ok(len) => len as u64,
            Err(BodyError::Wire(e)) => return Err(e),
            Err(_) => {
                return Err(ProtocolError::Malformed("body frames run past the announced size".into()).into());
            }
        };
        discard(r, len)?;
        left -= len;
    }
    Ok(())
}

/// Buffers in flight between the socket reader and the hashing thread. Four 256 KiB buffers keep
/// both busy; more only adds memory.
pub(crate) const PIPELINE_BUFFERS: usize = 4;

/// Reads exactly `size - offset` body bytes into the partial file. Hashing runs on its own thread
/// (SHA-256 is the slowest stage by far), fed full buffers after they are written, so socket reads
/// and file writes overlap with it. Small data frames are gathered into full buffers first.
pub(super) fn receive_body(
    r: &mut BufReader<DeadlineReader<'_>>,
    partial: &Partial,
    (size, offset, hasher): (u64, u64, Hasher),
    received: &mut u64,
    reservation: &mut Reservation<'_>,
    bar: &indicatif::ProgressBar,
) -> Result<protocol::Digest, BodyError> {
    // A body that fits one buffer (most files of a batch) is hashed inline: a thread and four
    // 256 KiB buffers per small file would cost more than the file.
    if size - offset <= RECV_BUF as u64 {
        return receive_small(r, partial, (size, offset, hasher), received, reservation, bar);
    }
    let (full_tx, full_rx) = mpsc::channel::<(Vec<u8>, usize)>();
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..PIPELINE_BUFFERS {
        empty_tx.send(vec![0u8; RECV_BUF]).expect("receiver is alive");
    }
    std::thread::scope(|scope| {
        let hashing = scope.spawn(move || {
            let mut hasher = hasher;
            for (buf, len) in full_rx {
                hasher.update(&buf[..len]);
                // The reader may have stopped early; then nobody wants the buffer back.
                let _ = empty_tx.send(buf);
            }
            hasher.finish()
        });
        let mut file = partial.file();
        let mut pass_on = |buf: Vec<u8>, len: usize| -> io::Result<()> {
            file.write_all(&buf[..len])?;
            reservation.consume(len as u64);
            full_tx.send((buf, len)).expect("hashing thread is alive");
            Ok(())
        };
        let read = (|| {
            let mut buf = empty_rx.recv().expect("hashing thread returns buffers");
            let mut filled = 0;
            let outcome = 'body: loop {
                if offset + *received >= size {
                    break 'body Ok(());
                }
                let mut left = match next_data_frame_direct(r, size - offset - *received) {
                    Ok(len) => len,
                    Err(e) => break 'body Err(e),
                };
                while left > 0 {
                    let n = left.min(RECV_BUF - filled);
                    if let Err(e) = read_payload(r, &mut buf[filled..filled + n]) {
                        break 'body Err(BodyError::Wire(e.into()));
                    }
                    filled += n;
                    left -= n;
                    *received += n as u64;
                    bar.inc(n as u64);
                    if filled == RECV_BUF {
                        if let Err(e) = pass_on(buf, filled) {
                            return Err(BodyError::Local(e, left as u64));
                        }
                        buf = empty_rx.recv().expect("hashing thread returns buffers");
                        filled = 0;
                    }
                }
            };
            // Bytes that arrived intact are written even when the connection then failed: a
            // resume starts after them. (After broken framing the partial is discarded anyway.)
            if filled > 0 && matches!(outcome, Ok(()) | Err(BodyError::Wire(WireError::Io(_)))) {
                pass_on(buf, filled).map_err(|e| BodyError::Local(e, 0))?;
            }
            outcome
        })();
        drop(full_tx);
        let digest = hashing.join().expect("hashing thread does not panic");
        read.map(|()| digest)
    })
}

/// [`receive_body`] for a body of at most one buffer: read, write, hash, on this thread.
fn receive_small(
    r: &mut BufReader<DeadlineReader<'_>>,
    partial: &Partial,
    (size, offset, mut hasher): (u64, u64, Hasher),
    received: &mut u64,
    reservation: &mut Reservation<'_>,
    bar: &indicatif::ProgressBar,
) -> Result<protocol::Digest, BodyError> {
    let want = (size - offset) as usize;
    let mut buf = vec![0u8; want];
    let mut filled = 0;
    let outcome = loop {
        if filled == want {
            break Ok(());
        }
        let len = match next_data_frame(r, (want - filled) as u64) {
            Ok(len) => len,
            Err(e) => break Err(e),
        };
        if let Err(e) = r.read_exact(&mut buf[filled..filled + len]) {
            break Err(BodyError::Wire(e.into()));
        }
        filled += len;
        *received += len as u64;
        bar.inc(len as u64);
    };
    // As in the pipeline: bytes that arrived intact are kept for a resume.
    if filled > 0 && matches!(outcome, Ok(()) | Err(BodyError::Wire(WireError::Io(_)))) {
        partial.file().write_all(&buf[..filled]).map_err(|e| BodyError::Local(e, 0))?;
        reservation.consume(filled as u64);
    }
    outcome?;
    hasher.update(&buf);
    Ok(hasher.finish())
}
