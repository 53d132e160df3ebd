//! The seam between the engines and the network: a TCP connection turned into a frame reader
//! and a frame writer that own buffering, deadlines and error wording.
//!
//! The send and receive engines never touch a socket: they read and write [`Message`]s and data
//! frames through [`FrameReader`] and [`FrameWriter`]. Today those carry frames in plaintext over
//! TCP, and the writer offers `sendfile(2)` for large bodies; an encrypted channel slides in here,
//! under the same two types, without the engines changing (see ARCHITECTURE.md).
//!
//! [`Message`]: crate::protocol::Message

use std::io::{self, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Limit};

pub mod handshake;
mod read;
pub(crate) mod records;
mod write;

pub use read::{FrameReader, Handshake};
/// The record layer for test harnesses ([`RecordSealer`], [`RecordOpener`]); not a stable API.
#[doc(hidden)]
pub use records::{RecordOpener, RecordSealer};
pub use write::{BodyTap, FileError, FrameWriter, TAPPED_MIN_BODY};

/// The least the peer must move, in bytes a second, over each window of the idle timeout this
/// side spends waiting for it: in reads while a body arrives ([`FrameReader::set_min_rate`]), and
/// in every write, both sides (`write::Outbound`).
pub(crate) const MIN_RATE: u64 = 1024;

/// A blocked write wakes up this often (the socket's send timeout) to count how long it has
/// waited, so a peer that stops reading is given up on within the idle timeout plus one tick
/// however the bytes go out (a buffered write or `sendfile`).
pub(crate) const WRITE_TICK: Duration = Duration::from_millis(500);

/// Capacity of the socket write buffer: small frames (down to 1-byte chunks) are coalesced into
/// writes of this size; frames at least this large bypass it.
pub(crate) const SOCKET_BUF: usize = 256 * 1024;

/// Read buffer of a connection: also the size of each buffer between socket, file and hashing
/// thread on the receiver, so memory stays flat however large the file or the sender's chunks.
pub(crate) const RECV_BUF: usize = 256 * 1024;

/// The idle timeout in force, worded for error messages.
pub fn idle_limit(timeout: Option<Duration>) -> Limit {
    Limit { secs: timeout.map_or(0, |t| t.as_secs()), option: "--timeout" }
}

/// Resolves `to` and connects to the first address that answers within `timeout`.
pub fn connect(to: &str, timeout: Duration) -> Result<TcpStream, Error> {
    connect_timed(to, timeout).map(|(s, _)| s)
}

/// [`connect`], and how long the connect that succeeded took (about one round trip: the name
/// lookup and addresses that failed first are not counted).
pub fn connect_timed(to: &str, timeout: Duration) -> Result<(TcpStream, Duration), Error> {
    let addrs = to
        .to_socket_addrs()
        .map_err(|e| Error::Connect { addr: to.to_string(), source: e })?
        .collect::<Vec<_>>();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address found");
    for addr in addrs {
        let began = std::time::Instant::now();
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok((s, began.elapsed())),
            Err(e) => last = e,
        }
    }
    Err(Error::Connect { addr: to.to_string(), source: last })
}

/// Splits a connected socket into its frame reader and writer. `idle` is the idle timeout of
/// both directions (`None`: wait forever); the reader may run under a deadline instead
/// ([`FrameReader::set_deadline`]), and writes wait in ticks and count how long the peer has
/// taken nothing (`write::Outbound`). No Nagle delay: the engines flush at the end of each phase.
pub fn split(
    stream: TcpStream,
    peer: &str,
    idle: Option<Duration>,
) -> Result<(FrameReader, FrameWriter), Error> {
    let setup = |e| Error::io("configuring the socket", e);
    stream.set_read_timeout(idle).map_err(setup)?;
    stream.set_write_timeout(idle.map(|_| WRITE_TICK)).map_err(setup)?;
    let _ = stream.set_nodelay(true);
    let shared = Socket(Arc::new(stream));
    let limit = idle_limit(idle);
    Ok((FrameReader::new(shared.clone(), peer, idle, limit), FrameWriter::new(shared, peer, idle, limit)))
}

/// The socket both halves use: one descriptor per connection (a `dup` per connection would
/// double what a flood of connections costs the receiver).
#[derive(Clone)]
pub(crate) struct Socket(Arc<TcpStream>);

impl Socket {
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.0
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

/// Both hellos: ours out at once (so a peer of another version learns ours even though one of
/// us then hangs up), then the peer's. A failed write is reported only after the peer's hello
/// was read, which says more (a version mismatch rather than a broken pipe).
pub fn exchange_hellos(r: &mut FrameReader, w: &mut FrameWriter) -> Result<(), Error> {
    let greet = w.hello();
    r.hello().map_err(|e| r.error("exchanging hellos", e))?;
    greet.map_err(|e| w.error("exchanging hellos", e.into()))
}
