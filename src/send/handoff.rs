//! One read of a large file for both its digest and its body, on a secure channel.
//!
//! The hashing thread and the body each used to read a large file: once to hash it, once into
//! the records. On a first send the body usually goes out before the digest is known (the
//! receiver has nothing the file could match, so it answers at once), and then both can share
//! one read: the hashing thread waits at such a file for the engine's word, and when its body
//! goes out from its start, it hashes the bytes the body path read, buffer by buffer, before
//! they are sealed (`transport::BodyTap`). So the digest is of exactly the bytes sent; the body
//! path's check that the file did not change while it was read decides whether the digest is
//! good (and cached).
//!
//! When the file is not sent from its start (already there, refused, resumed) the hashing thread
//! reads it itself, as it does for every file on a plaintext channel: there `sendfile` sends a
//! body without it passing through this process, so a second read by the hashing thread costs
//! less than bringing the body's bytes up to hash them. And when the receiver sits at the file
//! without answering, it is waiting for its digest (it has a file of that size, or a partial to
//! resume): after [`HANDOFF_WAIT`] the hashing thread reads the file itself, and no later file of
//! the transfer waits.
//!
//! Small files go the other way: the hashing thread reads one whole, checks its stamp, and keeps
//! the bytes (up to [`KEEP_BUDGET`] in all) for its body, which is sent from them without opening
//! the file again. What arrives is then the file as it was read and checked, the bytes its digest
//! is of; a change after that read is not seen, as with any copy taken at one moment.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use crate::transport::BodyTap;

/// Files at least this large (and not in the digest cache) wait for their answer before the
/// hashing thread reads them: a read saved is worth a wait for the answer, which on a first send
/// comes right behind the manifest. Smaller files are hashed ahead, as they are listed.
pub(crate) const DEFER_MIN: u64 = 4 << 20;

/// How long the receiver may sit at a file the hashing thread is keeping for its body, without
/// answering it, before the hashing thread reads the file itself: it is taken to be waiting for
/// the digest. A receiver that answers without the digest does so within a few milliseconds of
/// reaching the file; the cost of a wrong guess is this wait, once per transfer.
pub(crate) const HANDOFF_WAIT: Duration = Duration::from_millis(200);

/// Files up to this size are kept in memory by the hashing thread once read and checked, and
/// their body is sent from there: a small file is opened and read once (see `keep`).
pub(crate) const KEEP_MAX: u64 = 64 * 1024;

/// Bytes of small files kept for their bodies at most: the hashing thread runs ahead of the
/// bodies, and past this it leaves the files it hashes for their body to read again.
pub(crate) const KEEP_BUDGET: u64 = 16 << 20;

/// Record buffers handed to the hashing thread together: each hand-over may wake a thread, and
/// four records (1 MiB) make that cost nothing next to hashing them.
const FEED_BATCH: usize = 4;
/// Batches in flight between the body and the hashing thread, each way: more than the body
/// lends at once (`transport`'s `TAP_DEPTH`, two batches), so neither side blocks on the channel
/// itself.
const FEED_QUEUE: usize = 4;

/// The word between the engine and the hashing thread about the file it may keep for its body.
pub(super) struct Handoff {
    state: Mutex<State>,
    turn: Condvar,
}

#[derive(Default)]
struct State {
    /// The file the hashing thread is waiting at, and since when.
    waiting: Option<(usize, Instant)>,
    /// Files below this are not kept for their body: the engine is past them.
    released: usize,
    /// The hashing thread's end of the feed for the file whose body is going out.
    fed: Option<(usize, Fed)>,
    /// No file is kept for its body (a plaintext channel, or the receiver waited for a digest).
    off: bool,
    /// The send is over: a waiting hashing thread stops.
    closed: bool,
    /// Bytes of small files the hashing thread keeps for their bodies, and whether it waits for
    /// room (only then is it woken: a wake costs a syscall, and the engine frees room per file).
    kept: u64,
    wants_room: bool,
}

/// What the hashing thread does with a file it may keep for its body.
pub(super) enum Turn {
    /// Read and hash it itself.
    Read,
    /// Hash what the body reads, from this feed.
    Fed(Fed),
    /// The send is over.
    Stop,
}

/// A record buffer and the ranges in it that hold the file's bytes.
pub(super) type Lent = (Vec<u8>, Vec<Range<usize>>);

/// What the body path hands the hashing thread.
pub(super) enum Piece {
    /// Record buffers, in order (they go back in the same order).
    Bytes(Vec<Lent>),
    /// The body is all read; `unchanged`: the file is still the one listed.
    End { unchanged: bool },
}

/// The hashing thread's end of a feed.
pub(super) struct Fed {
    pub rx: mpsc::Receiver<Piece>,
    pub back: mpsc::SyncSender<Vec<Lent>>,
}

/// The body path's end of a feed: buffers lent and not yet sent (a batch being made), and
/// buffers back and not yet taken.
pub(super) struct Feed {
    to: mpsc::SyncSender<Piece>,
    back: mpsc::Receiver<Vec<Lent>>,
    batch: Vec<Lent>,
    returned: std::collections::VecDeque<Vec<u8>>,
}

fn hashing_stopped() -> std::io::Error {
    std::io::Error::other("the hashing thread stopped")
}

impl BodyTap for Feed {
    fn lend(&mut self, buf: Vec<u8>, data: Vec<Range<usize>>) -> std::io::Result<()> {
        self.batch.push((buf, data));
        if self.batch.len() == FEED_BATCH {
            self.send_batch()?;
        }
        Ok(())
    }

    fn take_back(&mut self) -> std::io::Result<Vec<u8>> {
        if let Some(buf) = self.returned.pop_front() {
            return Ok(buf);
        }
        // The oldest buffer may be in the batch being made (the body's end): it goes now.
        if !self.batch.is_empty() {
            self.send_batch()?;
        }
        let back = self.back.recv().map_err(|_| hashing_stopped())?;
        self.returned.extend(back.into_iter().map(|(buf, _)| buf));
        self.returned.pop_front().ok_or_else(hashing_stopped)
    }
}

impl Feed {
    fn send_batch(&mut self) -> std::io::Result<()> {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(FEED_BATCH));
        self.to.send(Piece::Bytes(batch)).map_err(|_| hashing_stopped())
    }

    /// The body is all out: says whether the file is unchanged, so the digest counts or not.
    pub fn end(self, unchanged: bool) {
        let _ = self.to.send(Piece::End { unchanged });
    }
}

impl Handoff {
    /// `defer`: whether large files may be kept for their body at all (a secure channel).
    pub fn new(defer: bool) -> Arc<Handoff> {
        let state = State { off: !defer, ..State::default() };
        Arc::new(Handoff { state: Mutex::new(state), turn: Condvar::new() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the hashing thread should ask before reading a file of `size` bytes.
    pub fn defers(&self, size: u64) -> bool {
        size >= DEFER_MIN && !self.lock().off
    }

    /// The hashing thread, at file `n`: waits for the engine's word on it.
    pub fn turn(&self, n: usize) -> Turn {
        let mut s = self.lock();
        let turn = loop {
            if s.closed {
                break Turn::Stop;
            }
            if s.fed.as_ref().is_some_and(|(m, _)| *m == n) {
                break Turn::Fed(s.fed.take().expect("checked").1);
            }
            if s.off || n < s.released {
                break Turn::Read;
            }
            if s.waiting.is_none() {
                s.waiting = Some((n, Instant::now()));
            }
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        };
        s.waiting = None;
        turn
    }

    /// The engine, sending file `n`'s body from its start: a feed for the hashing thread if it
    /// is waiting at that file; otherwise `None`, and it reads the file itself.
    pub fn claim(&self, n: usize) -> Option<Feed> {
        let mut s = self.lock();
        s.released = s.released.max(n + 1);
        let feed = if s.waiting.is_some_and(|(m, _)| m == n) {
            let (to, rx) = mpsc::sync_channel(FEED_QUEUE);
            let (back_tx, back) = mpsc::sync_channel(FEED_QUEUE);
            s.fed = Some((n, Fed { rx, back: back_tx }));
            Some(Feed { to, back, batch: Vec::with_capacity(FEED_BATCH), returned: Default::default() })
        } else {
            None
        };
        self.turn.notify_all();
        feed
    }

    /// The engine is past file `n` without sending its body from the start.
    pub fn release(&self, n: usize) {
        let mut s = self.lock();
        if s.released <= n {
            s.released = n + 1;
            self.turn.notify_all();
        }
    }

    /// The file the hashing thread is waiting at, and since when.
    pub fn waiting(&self) -> Option<(usize, Instant)> {
        self.lock().waiting
    }

    /// The receiver waited for a digest the hashing thread was keeping: it reads that file, and
    /// keeps no other for this transfer.
    pub fn give_up(&self) {
        self.lock().off = true;
        self.turn.notify_all();
    }

    /// Whether the hashing thread should keep a file of `size` bytes it reads for its body: a
    /// small one is kept, once [`KEEP_BUDGET`] has room for it (until [`Handoff::unkeep`]), so
    /// the hashing thread runs at most that far ahead of the bodies. The engine frees the room as
    /// it acts on files in order, which needs no digest the hashing thread has not given yet.
    pub fn keep(&self, size: u64) -> bool {
        if size > KEEP_MAX {
            return false;
        }
        let mut s = self.lock();
        while !s.closed && s.kept + size > KEEP_BUDGET {
            s.wants_room = true;
            s = self.turn.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.wants_room = false;
        s.kept += size;
        !s.closed
    }

    /// The engine took (or dropped) kept bytes.
    pub fn unkeep(&self, size: u64) {
        let mut s = self.lock();
        s.kept = s.kept.saturating_sub(size);
        if s.wants_room {
            self.turn.notify_all();
        }
    }

    /// The send is over.
    pub fn close(&self) {
        self.lock().closed = true;
        self.turn.notify_all();
    }
}

/// Closes the handoff when the send ends, however it ends, so a waiting hashing thread stops.
pub(super) struct CloseOnDrop(pub Arc<Handoff>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}
