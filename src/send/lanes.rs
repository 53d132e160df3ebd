//! A large file over several connections (PROTOCOL.md, "Lanes"): on a long fat link one TCP
//! stream is held to its window per round trip (about 4 MiB of send buffer by default, so
//! ~45% of 1 Gbit/s at 50 ms and ~22% at 100 ms: bench/README.md), and `--streams N` fills it
//! with N.
//!
//! The main connection announces the split (`Split`: a session id and a fresh secret, inside its
//! records), then it and up to N-1 lane connections take [`SPLIT_CHUNK`] parts of the body from
//! one queue, each a `Part` and its data frames. A lane joins with the session id and derives its
//! own record keys from the secret (`handshake::sender_lane`); it ends with `SplitEnd`, and the
//! receiver's `SplitEnd` back says every part it carried is written. A lane that fails (cannot
//! connect, is refused, breaks) gives its parts back to the queue, and the others, the main
//! connection at least, send them again: a split needs no lane to succeed. When the queue is empty
//! and every lane has ended, the main connection sends `SplitEnd`; the file's digest follows as
//! for any body, and the receiver checks it over the whole file.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use indicatif::ProgressBar;

use super::events::open_unchanged;
use crate::cache::Stamp;
use crate::error::Error;
pub(crate) use crate::protocol::SPLIT_MIN;
use crate::protocol::{DigestsPart, Message, Part, SPLIT_CHUNK, Split, SplitEnd};
use crate::transport::{self, FileError, FrameWriter, handshake};

/// The round trip one connection fills a link at: `--streams auto` opens one connection per
/// this much of it. Measured with bench/link.py (Linux's default 4 MiB send buffer): one stream
/// fills 1 Gbit/s at 20 ms, about 45% of it at 50 ms and 22% at 100 ms.
pub(crate) const RTT_PER_LANE: Duration = Duration::from_millis(20);

/// `--streams auto`: a connection per [`RTT_PER_LANE`] of round trip (`rtt`: how long the TCP
/// connect took), rounded to the nearest, 1 to [`MAX_LANES`]. On a LAN or loopback that is one.
/// Nearest, not up: a connect takes a little longer than the round trip (20.4 ms on a 20 ms
/// link), and rounding up opened a second connection where one fills the link (bench/README.md).
pub(crate) fn auto_lanes(rtt: Duration) -> u8 {
    let per = RTT_PER_LANE.as_micros();
    let n = ((rtt.as_micros() + per / 2) / per).max(1);
    n.min(u128::from(crate::protocol::MAX_LANES)) as u8
}

/// How long a lane may take to connect; one that cannot is given up (the split goes on).
pub(crate) const LANE_CONNECT: Duration = Duration::from_secs(5);

/// How often the main connection, its own parts sent, sends a keepalive while lanes finish.
const LANE_KEEPALIVE: Duration = Duration::from_secs(1);

/// The parts of a split still to send, shared by its connections.
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

struct QueueState {
    next: u64,
    end: u64,
    /// Parts a failed lane gave back.
    returned: Vec<u64>,
    /// Lanes still running.
    running: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Option<u64> {
        let mut st = self.lock();
        if let Some(off) = st.returned.pop() {
            return Some(off);
        }
        (st.next < st.end).then(|| {
            let off = st.next;
            st.next = (off + SPLIT_CHUNK).min(st.end);
            off
        })
    }

    fn lane_ended(&self, give_back: Vec<u64>) {
        let mut st = self.lock();
        st.returned.extend(give_back);
        st.running -= 1;
        self.changed.notify_all();
    }
}

/// What every lane of one split needs.
struct Lane<'a> {
    addr: SocketAddr,
    peer: &'a str,
    idle: Option<Duration>,
    split: &'a Split,
    secure: bool,
    source: &'a std::path::Path,
    stamp: Stamp,
    size: u64,
    chunk: u32,
    bar: &'a ProgressBar,
}

impl Lane<'_> {
    /// Sends parts from `queue` until it is empty; `Err` leaves the parts sent to be sent again.
    fn run(&self, queue: &Queue, sent: &mut Vec<u64>) -> Result<(), Error> {
        let stream = TcpStream::connect_timeout(&self.addr, LANE_CONNECT)
            .map_err(|e| Error::Connect { addr: self.peer.to_string(), source: e })?;
        let (mut r, mut w) = transport::split(stream, self.peer, self.idle)?;
        transport::exchange_hellos(&mut r, &mut w)?;
        handshake::sender_lane(&mut r, &mut w, &self.split.session, &self.split.secret, self.secure)?;
        let mut f = open_unchanged(self.source, self.stamp)?;
        let index = self.split.index;
        while let Some(off) = queue.take() {
            sent.push(off);
            part(&mut w, &mut f, index, (off, self.size), self.chunk, self.bar).map_err(|e| match e {
                FileError::Net(e) => w.error("sending a lane's part", e.into()),
                FileError::Local(e) => Error::io("reading the file for a lane", e),
            })?;
        }
        w.message(&Message::SplitEnd(SplitEnd { index }))
            .and_then(|()| w.flush())
            .map_err(|e| w.error("ending a lane", e.into()))?;
        match r.message().map_err(|e| r.error("waiting for the lane's end", e))? {
            Message::SplitEnd(SplitEnd { index: i }) if i == index => Ok(()),
            other => Err(Error::Protocol {
                peer: self.peer.to_string(),
                source: crate::protocol::ProtocolError::UnexpectedMessage {
                    expected: "the lane's end",
                    got: other.name(),
                },
            }),
        }
    }
}

/// One part: its `Part` message and the file's bytes `off..` (up to [`SPLIT_CHUNK`]).
fn part(
    w: &mut FrameWriter,
    f: &mut File,
    index: u32,
    (off, size): (u64, u64),
    chunk: u32,
    bar: &ProgressBar,
) -> Result<(), FileError> {
    w.message(&Message::Part(Part { index, offset: off })).map_err(FileError::Net)?;
    w.file_body(f, (off, (off + SPLIT_CHUNK).min(size)), chunk, bar, None)
}

/// What [`send_split`] needs to know about the file and the connection.
pub(super) struct SplitFile<'a> {
    pub index: u32,
    pub source: &'a std::path::Path,
    pub stamp: Stamp,
    /// Bytes `offset..size` go.
    pub range: (u64, u64),
    pub lanes: u8,
    pub peer: &'a str,
    pub idle: Option<Duration>,
    pub chunk: u32,
    /// Digests told so far, for the keepalives.
    pub told: u32,
}

/// Sends a file's body split over `lanes` connections, `f` (the main connection's handle on the
/// file) included. Returns how many lanes took part to the end, the main connection not counted.
pub(super) fn send_split(
    w: &mut FrameWriter,
    f: &mut File,
    file: &SplitFile,
    bar: &ProgressBar,
) -> Result<usize, FileError> {
    let (offset, size) = file.range;
    let session: [u8; 16] = handshake::random().map_err(|e| FileError::Local(std::io::Error::other(e)))?;
    let secret: [u8; 32] = handshake::random().map_err(|e| FileError::Local(std::io::Error::other(e)))?;
    let split = Split { index: file.index, session, secret, lanes: file.lanes };
    w.message(&Message::Split(split.clone())).and_then(|()| w.flush()).map_err(FileError::Net)?;
    let addr = file.peer.parse::<SocketAddr>().map_err(|e| FileError::Local(std::io::Error::other(e)))?;
    let lane = Lane {
        addr,
        peer: file.peer,
        idle: file.idle,
        split: &split,
        secure: w.is_sealed(),
        source: file.source,
        stamp: file.stamp,
        size,
        chunk: file.chunk,
        bar,
    };
    let extra = usize::from(file.lanes) - 1;
    let queue = Queue {
        state: Mutex::new(QueueState { next: offset, end: size, returned: Vec::new(), running: extra }),
        changed: Condvar::new(),
    };
    let finished = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..extra {
            scope.spawn(|| {
                let mut sent = Vec::new();
                let outcome = lane.run(&queue, &mut sent);
                if outcome.is_ok() {
                    finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sent.clear();
                } else {
                    // Sent again by another connection: take them off the bar.
                    let lost: u64 = sent.iter().map(|&o| SPLIT_CHUNK.min(size - o)).sum();
                    bar.set_position(bar.position().saturating_sub(lost));
                }
                queue.lane_ended(sent);
            });
        }
        // The main connection takes parts too, and any a failed lane gave back, until the queue
        // is empty and no lane runs; meanwhile it keeps the receiver's idle timeout fed.
        let mut main = || loop {
            if let Some(off) = queue.take() {
                part(w, f, file.index, (off, size), file.chunk, bar)?;
                continue;
            }
            let st = queue.lock();
            if st.running == 0 && st.returned.is_empty() {
                break Ok(());
            }
            let (st, waited) =
                queue.changed.wait_timeout(st, LANE_KEEPALIVE).unwrap_or_else(|e| e.into_inner());
            drop(st);
            if waited.timed_out() {
                let keepalive = DigestsPart { first: file.told, digests: Vec::new() };
                w.message(&Message::Digests(keepalive)).and_then(|()| w.flush()).map_err(FileError::Net)?;
            }
        };
        let outcome: Result<(), FileError> = main();
        if outcome.is_err() {
            // The split is lost: lanes stop after the part they are sending.
            let mut st = queue.lock();
            st.next = st.end;
            st.returned.clear();
        }
        outcome
    })?;
    w.message(&Message::SplitEnd(SplitEnd { index: file.index })).map_err(FileError::Net)?;
    Ok(finished.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_opens_a_connection_per_20_ms_of_round_trip_rounded_to_the_nearest() {
        let us = |m: u64| auto_lanes(Duration::from_micros(m));
        // Loopback and LANs: one.
        assert_eq!(us(40), 1);
        assert_eq!(us(9_000), 1);
        // What the delay line's links measured at connect (bench/results/2026-12-04T201906).
        assert_eq!(us(20_400), 1);
        assert_eq!(us(50_400), 3);
        assert_eq!(us(100_400), 5);
        assert_eq!(us(30_000), 2);
        // Never more than MAX_LANES, however far.
        assert_eq!(us(2_000_000), crate::protocol::MAX_LANES);
    }
}
