//! Receiving one body: data frames from the connection into a partial file, hashed on the way.

use std::io::{self, Write};
use std::sync::mpsc;

use crate::hash::Hasher;
use crate::protocol::{self, FrameKind, ProtocolError, WireError};
use crate::store::{Partial, Reservation, Room};
use crate::transport::{FrameReader, RECV_BUF};

pub(super) enum BodyError {
    /// The connection failed or the peer broke framing.
    Wire(WireError),
    /// A data frame would run past the offered size.
    TooLong(u32),
    /// Writing the partial file failed. The second field is how many bytes of the data frame
    /// being read were still unread: a caller that wants to stay in step with the stream skips
    /// those, then the remaining frames (see [`skip_body`]).
    Local(io::Error, u64),
    /// A split body failed (`lanes`): the verdict to send and the error this side reports; the
    /// connection ends, as the rest of the split cannot be skipped in step.
    Split(Box<(crate::protocol::Verdict, crate::error::Error)>),
}

/// Reads the next frame header of a body with `remaining` bytes still to come, and checks it is
/// a data frame that does not run past them. Returns its length. `direct`: see
/// [`FrameReader::header_direct`].
fn next_data_frame(r: &mut FrameReader, remaining: u64, direct: bool) -> Result<usize, BodyError> {
    let h = if direct { r.header_direct() } else { r.header() };
    data_frame_len(h.map_err(BodyError::Wire)?, remaining)
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

/// Reads and discards the rest of a body: `frame_left` bytes of the frame under way, then data
/// frames carrying `frames` more bytes. Keeps a batch in step when one file cannot be stored.
pub(super) fn skip_body(r: &mut FrameReader, frame_left: u64, frames: u64) -> Result<(), WireError> {
    r.skip(frame_left)?;
    let mut left = frames;
    while left > 0 {
        let len = match next_data_frame(r, left, false) {
            Ok(len) => len as u64,
            Err(BodyError::Wire(e)) => return Err(e),
            Err(_) => {
                return Err(ProtocolError::Malformed("body frames run past the announced size".into()).into());
            }
        };
        r.skip(len)?;
        left -= len;
    }
    Ok(())
}

/// Buffers in flight between the socket reader and the hashing thread. Four keep both busy; more
/// only adds memory.
pub(crate) const PIPELINE_BUFFERS: usize = 4;
/// Size of each of them: a large body is written and handed to the hashing thread this much at a
/// time. 1 MiB rather than the socket's 256 KiB read buffer: a quarter of the hand-offs (thread
/// wake-ups) per GiB, measured 7-15 % faster for a 1 GiB send (bench/README.md), for 3 MiB more
/// memory per transfer receiving a large body.
pub(crate) const PIPE_BUF: usize = 1 << 20;

/// Reads exactly `size - offset` body bytes into the partial file. Hashing runs on its own thread
/// (SHA-256 is the slowest stage by far), fed full buffers after they are written, so socket reads
/// and file writes overlap with it. Small data frames are gathered into full buffers first.
pub(super) fn receive_body(
    r: &mut FrameReader,
    partial: &Partial,
    (size, offset, hasher): (u64, u64, Hasher),
    received: &mut u64,
    reservation: &mut Reservation<'_>,
    bar: &indicatif::ProgressBar,
) -> Result<protocol::Digest, BodyError> {
    // A body that fits one read buffer (most files of a batch) is hashed inline: a thread and
    // four buffers per small file would cost more than the file.
    if size - offset <= RECV_BUF as u64 {
        return receive_small(r, partial, (size, offset, hasher), received, reservation, bar);
    }
    let (full_tx, full_rx) = mpsc::channel::<(Vec<u8>, usize)>();
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    // No larger than the body: a batch's files of a few hundred KiB come through here too.
    let piece = PIPE_BUF.min((size - offset) as usize);
    for _ in 0..PIPELINE_BUFFERS {
        empty_tx.send(vec![0u8; piece]).expect("receiver is alive");
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
                let mut left = match next_data_frame(r, size - offset - *received, true) {
                    Ok(len) => len,
                    Err(e) => break 'body Err(e),
                };
                while left > 0 {
                    let n = left.min(piece - filled);
                    if let Err(e) = r.payload(&mut buf[filled..filled + n]) {
                        break 'body Err(BodyError::Wire(e.into()));
                    }
                    filled += n;
                    left -= n;
                    *received += n as u64;
                    bar.inc(n as u64);
                    if filled == piece {
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
    r: &mut FrameReader,
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
        let len = match next_data_frame(r, (want - filled) as u64, false) {
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

/// Room a stream (a file of unknown size, `xfer send -`) reserves at a time as it arrives: one
/// look at the free room (blocks) per this many bytes, so concurrent transfers cannot overbook
/// the disk with it either.
pub(crate) const STREAM_STEP: u64 = 16 << 20;

/// Reads a stream's body into its partial until its end mark: data frames of any number, then
/// an empty data frame. Hashed on this thread as it is written. Before each write the room for it
/// is reserved, [`STREAM_STEP`] at a time (or only what this write needs, when that much is not
/// free); when even that is not free the body fails with `StorageFull`: the disk is the only cap.
pub(super) fn receive_stream(
    r: &mut FrameReader,
    partial: &Partial,
    mut hasher: Hasher,
    received: &mut u64,
    reservation: &mut Reservation<'_>,
    bar: &indicatif::ProgressBar,
) -> Result<protocol::Digest, BodyError> {
    let mut buf = vec![0u8; RECV_BUF];
    let mut file = partial.file();
    while let Some(h) = r.stream_header().map_err(BodyError::Wire)? {
        let mut left = data_frame_len(h, u64::MAX)?;
        while left > 0 {
            let n = left.min(RECV_BUF);
            r.payload(&mut buf[..n]).map_err(|e| BodyError::Wire(e.into()))?;
            left -= n;
            if reservation.left().bytes < n as u64 {
                reserve_more(reservation, n as u64, *received)
                    .map_err(|e| BodyError::Local(e, left as u64))?;
            }
            file.write_all(&buf[..n]).map_err(|e| BodyError::Local(e, left as u64))?;
            reservation.consume(n as u64);
            hasher.update(&buf[..n]);
            *received += n as u64;
            bar.inc(n as u64);
        }
    }
    Ok(hasher.finish())
}

/// Reserves room for the next `n` bytes of a stream that has `so_far` bytes.
fn reserve_more(reservation: &mut Reservation<'_>, n: u64, so_far: u64) -> io::Result<()> {
    let step = Room { bytes: STREAM_STEP.max(n), inodes: 0 };
    if reservation.grow(step)?.is_ok() {
        return Ok(());
    }
    match reservation.grow(Room { bytes: n, inodes: 0 })? {
        Ok(()) => Ok(()),
        Err(available) => Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!(
                "the receiver ran out of room after {so_far} bytes of the stream ({} free, less what other transfers reserved)",
                crate::progress::human_bytes(available.bytes)
            ),
        )),
    }
}

/// Reads and discards the rest of a stream's body: `frame_left` bytes of the frame under way,
/// then frames up to its end mark. Keeps the connection in step after a local failure.
pub(super) fn skip_stream(r: &mut FrameReader, frame_left: u64) -> Result<(), WireError> {
    r.skip(frame_left)?;
    while let Some(h) = r.stream_header()? {
        if h.kind != FrameKind::Data {
            return Err(ProtocolError::UnexpectedFrame { expected: FrameKind::Data, got: h.kind }.into());
        }
        r.skip(u64::from(h.len))?;
    }
    Ok(())
}
