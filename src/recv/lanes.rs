//! A split body on the receiver: one large file's bytes arriving as parts over several
//! connections at once (the main one and its lanes), written at their offsets, hashed in order
//! behind them, and checked whole like any body (PROTOCOL.md, "Lanes").
//!
//! A [`Hub`] is the split's shared state: the partial's descriptor, which parts are claimed and
//! written, and the hashing thread's place. The main connection registers it under the session
//! id the sender chose; a lane finds it there after its handshake, from the same address only,
//! and proves the split's secret with its first record. Every part is checked (this split's
//! file, on the grid of [`SPLIT_CHUNK`], inside the body) and written once: a part sent again
//! after its lane broke is read and dropped, so what was hashed is what stays on disk.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use zeroize::Zeroizing;

use crate::hash::Hasher;
use crate::protocol::{
    Digest, FrameKind, MAX_LANES, Message, Part, ProtocolError, SPLIT_CHUNK, SplitEnd, WireError,
};
use crate::store::partial::UptoMark;
use crate::transport::{FrameReader, FrameWriter, MIN_RATE, RECV_BUF};

/// The hashing thread notes how far a split body is contiguous (`upto` in the partial's record)
/// at most every this many bytes.
pub(crate) const UPTO_EVERY: u64 = 16 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Free,
    /// Being written by one connection.
    Claimed,
    Written,
}

struct State {
    chunks: Vec<Chunk>,
    /// The split ended (done or failed): the hashing thread and waiting parts stop, and no
    /// write begins.
    closed: bool,
    /// Writes under way: a failed split waits for them before it cuts the partial.
    writing: usize,
    /// Why a lane made the whole split fail (it broke the protocol, or its write failed).
    failure: Option<String>,
}

/// One split body in progress.
pub(crate) struct Hub {
    pub index: u32,
    /// Shown in the lanes' log lines.
    pub name: String,
    secret: Zeroizing<[u8; 32]>,
    ip: IpAddr,
    file: File,
    /// The body's first byte (the answered offset) and the file's size.
    start: u64,
    size: u64,
    state: Mutex<State>,
    changed: Condvar,
    /// Lanes that joined (the main connection not counted), and how many may.
    joined: AtomicUsize,
    max_lanes: usize,
    /// Bytes of the parts written whole, on all connections (each part once).
    pub received: AtomicU64,
    bar: indicatif::ProgressBar,
}

/// How long a lane's handshake waits for its split to be registered: the sender connects its
/// lanes as soon as it sends `Split`, and the receiver reads that only after what came before it
/// (the previous body, its digest, a group being made durable on a slow disk).
pub(crate) const LANE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Splits in progress, by session id.
#[derive(Default)]
pub(crate) struct Registry {
    map: Mutex<HashMap<[u8; 16], Arc<Hub>>>,
    added: Condvar,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 16], Arc<Hub>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The secret of split `session`, for a lane's handshake from `ip`: only the address of the
    /// main connection may join it. A split not registered yet is waited for, up to
    /// [`LANE_WAIT`].
    pub fn secret(&self, session: &[u8; 16], ip: IpAddr) -> Option<Zeroizing<[u8; 32]>> {
        let until = std::time::Instant::now() + LANE_WAIT;
        let mut map = self.lock();
        loop {
            if let Some(hub) = map.get(session).filter(|h| h.ip == ip) {
                return Some(hub.secret.clone());
            }
            let left = until.checked_duration_since(std::time::Instant::now())?;
            map = self.added.wait_timeout(map, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The split `session` from `ip` (the address of its main connection).
    pub fn find(&self, session: &[u8; 16], ip: IpAddr) -> Option<Arc<Hub>> {
        self.lock().get(session).filter(|h| h.ip == ip).cloned()
    }
}

/// A hub in the registry, taken out (and closed) when dropped.
pub(crate) struct Registered<'a> {
    registry: &'a Registry,
    session: [u8; 16],
    pub hub: Arc<Hub>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.session);
        self.hub.close();
    }
}

/// What went wrong with a part.
pub(crate) enum PartError {
    Wire(WireError),
    /// Writing or reading the partial.
    Local(io::Error),
    /// The split ended (it failed elsewhere): nothing more is written.
    Closed,
}

impl From<WireError> for PartError {
    fn from(e: WireError) -> Self {
        PartError::Wire(e)
    }
}

fn malformed(what: String) -> PartError {
    PartError::Wire(ProtocolError::Malformed(what).into())
}

pub(crate) struct NewHub<'a> {
    pub index: u32,
    pub name: String,
    pub session: [u8; 16],
    pub secret: [u8; 32],
    pub lanes: u8,
    pub ip: IpAddr,
    pub file: File,
    pub range: (u64, u64),
    pub bar: &'a indicatif::ProgressBar,
}

/// Registers a split; `Err` with a reason when it cannot be (a session id in use, a lane count
/// out of bounds).
pub(crate) fn register<'r>(registry: &'r Registry, new: NewHub) -> Result<Registered<'r>, String> {
    if new.lanes == 0 || new.lanes > MAX_LANES {
        return Err(format!("a split over {} connections (1 to {MAX_LANES})", new.lanes));
    }
    let (start, size) = new.range;
    let chunks = (size - start).div_ceil(SPLIT_CHUNK) as usize;
    let hub = Arc::new(Hub {
        index: new.index,
        name: new.name,
        secret: Zeroizing::new(new.secret),
        ip: new.ip,
        file: new.file,
        start,
        size,
        state: Mutex::new(State {
            chunks: vec![Chunk::Free; chunks],
            closed: false,
            writing: 0,
            failure: None,
        }),
        changed: Condvar::new(),
        joined: AtomicUsize::new(0),
        max_lanes: usize::from(new.lanes) - 1,
        received: AtomicU64::new(0),
        bar: new.bar.clone(),
    });
    let mut map = registry.lock();
    if map.contains_key(&new.session) {
        return Err("a split whose lane id is already in use".into());
    }
    map.insert(new.session, Arc::clone(&hub));
    drop(map);
    registry.added.notify_all();
    Ok(Registered { registry, session: new.session, hub })
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Fails the whole split (a lane broke the protocol or could not write): the main connection
    /// reports `reason` at its next look.
    pub fn fail(&self, reason: String) {
        let mut st = self.lock();
        st.failure.get_or_insert(reason);
        st.closed = true;
        drop(st);
        self.changed.notify_all();
    }

    /// Why a lane failed the split, if one did.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    /// Closes the split and waits until no lane is writing: what is on disk then stays as it is.
    pub fn close_and_settle(&self) {
        let mut st = self.lock();
        st.closed = true;
        self.changed.notify_all();
        while st.writing > 0 {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Writes `bytes` at `at` unless the split is closed.
    fn write_at(&self, bytes: &[u8], at: u64) -> Result<(), PartError> {
        {
            let mut st = self.lock();
            if st.closed {
                return Err(PartError::Closed);
            }
            st.writing += 1;
        }
        let written = self.file.write_all_at(bytes, at);
        self.lock().writing -= 1;
        self.changed.notify_all();
        written.map_err(PartError::Local)
    }

    /// Whether every part is written.
    pub fn complete(&self) -> bool {
        self.lock().chunks.iter().all(|c| *c == Chunk::Written)
    }

    /// How many bytes from the body's start are written without a gap.
    pub fn contiguous(&self) -> u64 {
        let st = self.lock();
        let n = st.chunks.iter().take_while(|c| **c == Chunk::Written).count() as u64;
        (self.start + n * SPLIT_CHUNK).min(self.size)
    }

    /// Reads one part's data frames (announced by `part`) and writes them at its offset. A part
    /// already written is read and dropped; one another connection is writing is waited for.
    /// Returns the bytes written (0 for a part dropped).
    pub fn take_part(&self, r: &mut FrameReader, part: &Part, buf: &mut [u8]) -> Result<u64, PartError> {
        if part.index != self.index {
            return Err(malformed(format!(
                "a part of entry {} in the split of entry {}",
                part.index, self.index
            )));
        }
        let off = part.offset;
        if off < self.start || off >= self.size || !(off - self.start).is_multiple_of(SPLIT_CHUNK) {
            return Err(malformed(format!(
                "a part at byte {off}, off the grid of the split (from {} by {SPLIT_CHUNK} to {})",
                self.start, self.size
            )));
        }
        let k = ((off - self.start) / SPLIT_CHUNK) as usize;
        let len = SPLIT_CHUNK.min(self.size - off);
        let write = {
            let mut st = self.lock();
            loop {
                match st.chunks[k] {
                    Chunk::Free => {
                        st.chunks[k] = Chunk::Claimed;
                        break true;
                    }
                    Chunk::Written => break false,
                    Chunk::Claimed if st.closed => break false,
                    Chunk::Claimed => {
                        st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        };
        let mut shown = 0;
        let outcome = self.part_frames(r, (off, len), buf, write, &mut shown);
        if write {
            if outcome.is_ok() {
                self.received.fetch_add(len, Ordering::Relaxed);
            } else {
                // Sent again later, on some connection: off the bar until then.
                self.bar.set_position(self.bar.position().saturating_sub(shown));
            }
            let mut st = self.lock();
            st.chunks[k] = if outcome.is_ok() { Chunk::Written } else { Chunk::Free };
            drop(st);
            self.changed.notify_all();
        }
        outcome.map(|()| if write { len } else { 0 })
    }

    fn part_frames(
        &self,
        r: &mut FrameReader,
        (off, len): (u64, u64),
        buf: &mut [u8],
        write: bool,
        shown: &mut u64,
    ) -> Result<(), PartError> {
        let mut at = off;
        let end = off + len;
        let mut filled = 0usize;
        while at + (filled as u64) < end {
            let h = r.header()?;
            if h.kind != FrameKind::Data {
                let e = ProtocolError::UnexpectedFrame { expected: FrameKind::Data, got: h.kind };
                return Err(PartError::Wire(e.into()));
            }
            let mut left = h.len as usize;
            if left == 0 || (at + filled as u64) + left as u64 > end {
                return Err(malformed(format!("data frames of a part run past its {len} bytes")));
            }
            while left > 0 {
                let n = left.min(buf.len() - filled);
                r.payload(&mut buf[filled..filled + n]).map_err(|e| PartError::Wire(e.into()))?;
                filled += n;
                left -= n;
                if filled == buf.len() || at + filled as u64 == end {
                    if write {
                        self.write_at(&buf[..filled], at)?;
                        self.bar.inc(filled as u64);
                        *shown += filled as u64;
                    }
                    at += filled as u64;
                    filled = 0;
                }
            }
        }
        Ok(())
    }

    /// Hashes the body in order as its parts are written (reading them back), starting from
    /// `hasher`'s state; notes the contiguous prefix in the partial's record as it grows.
    /// `None` if the split closed before every byte was there.
    pub fn hash_behind(
        &self,
        mut hasher: Hasher,
        mark: Option<&UptoMark>,
    ) -> Result<Option<Digest>, io::Error> {
        let mut buf = vec![0u8; RECV_BUF * 4];
        let mut pos = self.start;
        let mut marked = pos;
        while pos < self.size {
            let k = ((pos - self.start) / SPLIT_CHUNK) as usize;
            {
                let mut st = self.lock();
                while st.chunks[k] != Chunk::Written {
                    if st.closed {
                        return Ok(None);
                    }
                    st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
            let end = (self.start + (k as u64 + 1) * SPLIT_CHUNK).min(self.size);
            while pos < end {
                let n = (buf.len() as u64).min(end - pos) as usize;
                self.file.read_exact_at(&mut buf[..n], pos)?;
                hasher.update(&buf[..n]);
                pos += n as u64;
            }
            if let Some(m) = mark
                && pos - marked >= UPTO_EVERY
            {
                m.mark(Some(pos))?;
                marked = pos;
            }
        }
        Ok(Some(hasher.finish()))
    }
}

/// Serves one lane: parts until the sender's `SplitEnd`, answered with `SplitEnd` once every part
/// it carried is written. `mine`: the bytes it wrote. A lane counts against the split's lanes
/// only once its first message is in (on the secure channel: its first record opened), so a
/// stranger who saw the session id cannot take the places. A lane that breaks the protocol or
/// cannot write fails the whole split; one that is cut or times out fails alone (its sender sends
/// its parts again on another connection).
pub(crate) fn serve(
    hub: &Hub,
    r: &mut FrameReader,
    w: &mut FrameWriter,
    mine: &mut u64,
) -> Result<(), crate::error::Error> {
    use crate::error::Error;
    let peer = r.peer().to_string();
    let protocol = |source| Error::Protocol { peer: peer.clone(), source };
    r.set_min_rate(Some(MIN_RATE));
    let mut buf = vec![0u8; RECV_BUF];
    let mut joined = false;
    loop {
        let m = r.message().map_err(|e| r.error("reading a lane", e))?;
        if !std::mem::replace(&mut joined, true) && hub.joined.fetch_add(1, Ordering::SeqCst) >= hub.max_lanes
        {
            return Err(protocol(ProtocolError::Malformed(format!(
                "a lane past the {} the split asked for",
                hub.max_lanes
            ))));
        }
        let broke = |e: Error| {
            hub.fail(format!("a lane broke it ({e})"));
            e
        };
        match m {
            Message::Part(part) => match hub.take_part(r, &part, &mut buf) {
                Ok(n) => *mine += n,
                Err(PartError::Wire(e @ WireError::Protocol(_))) => {
                    return Err(broke(r.error("reading a lane's part", e)));
                }
                Err(PartError::Wire(e)) => return Err(r.error("reading a lane's part", e)),
                Err(PartError::Local(e)) => return Err(broke(Error::io("writing a lane's part", e))),
                Err(PartError::Closed) => {
                    return Err(protocol(ProtocolError::Malformed(
                        "a part of a split that has ended".into(),
                    )));
                }
            },
            Message::SplitEnd(SplitEnd { index }) if index == hub.index => {
                w.message(&Message::SplitEnd(SplitEnd { index }))
                    .and_then(|()| w.flush())
                    .map_err(|e| w.error("ending a lane", e.into()))?;
                return Ok(());
            }
            other => {
                return Err(broke(protocol(ProtocolError::UnexpectedMessage {
                    expected: "a part",
                    got: other.name(),
                })));
            }
        }
    }
}
