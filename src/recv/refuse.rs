//! Telling connections past the limits why they are turned away.
//!
//! A connection over the connection limit (or over its address's share of it) is not handed a
//! thread. It gets the hello and a `Reject { Busy, reason }` in one non-blocking write, its
//! sending side is shut down, and one background thread reads and discards what the peer still
//! sends until the peer hangs up or `LINGER` passes. Closing at once instead would make the kernel
//! answer the peer's hello with a reset, which can destroy the refusal before the peer reads it.
//!
//! Everything here is bounded: at most `MAX_LINGERING` refused connections are held (the oldest is
//! closed when another comes), and the queue to the thread holds `REFUSE_QUEUE` more; past that a
//! connection is simply closed, which is all a flood deserves.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use crate::protocol::{self, Message, Reject, RejectCode, bounded_reason, write_message};

/// How long a refused connection is kept open for its peer to read the refusal.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// Refused connections held open at once.
pub(crate) const MAX_LINGERING: usize = 32;

/// Refused connections waiting for the thread.
pub(crate) const REFUSE_QUEUE: usize = 16;

/// How often held connections are drained.
const TICK: Duration = Duration::from_millis(20);

/// Hands refused connections to the thread that answers them.
pub(super) struct Refuser {
    tx: Option<SyncSender<(TcpStream, String)>>,
}

impl Refuser {
    /// Starts the thread. If it cannot start, refused connections are just closed.
    pub(super) fn start() -> Refuser {
        let (tx, rx) = sync_channel(REFUSE_QUEUE);
        let started = std::thread::Builder::new().name("xfer refuse".into()).spawn(move || run(&rx));
        Refuser { tx: started.ok().map(|_| tx) }
    }

    /// Answers `stream` with a refusal giving `reason`, or closes it if the queue is full.
    pub(super) fn refuse(&self, stream: TcpStream, reason: String) {
        if let Some(tx) = &self.tx {
            // A full queue drops (closes) the connection.
            let _ = tx.try_send((stream, reason));
        }
    }
}

/// The hello and the refusal, as one buffer.
fn refusal(reason: String) -> Vec<u8> {
    let mut bytes = Vec::new();
    let reject = Reject { code: RejectCode::Busy, reason: bounded_reason(reason) };
    protocol::write_hello(&mut bytes).expect("writing to a Vec cannot fail");
    write_message(&mut bytes, &Message::Reject(reject)).expect("writing to a Vec cannot fail");
    bytes
}

fn run(rx: &Receiver<(TcpStream, String)>) {
    let mut held: VecDeque<(TcpStream, Instant)> = VecDeque::new();
    let mut scratch = [0u8; 4096];
    loop {
        let first = if held.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(TICK)
        };
        let mut incoming = match first {
            Ok(c) => vec![c],
            Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => return,
        };
        incoming.extend(rx.try_iter());
        for (mut stream, reason) in incoming {
            // A fresh socket's send buffer takes the ~100 bytes whole; if not, the peer gets less.
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.write(&refusal(reason));
            let _ = stream.shutdown(Shutdown::Write);
            if held.len() == MAX_LINGERING {
                held.pop_front();
            }
            held.push_back((stream, Instant::now() + LINGER));
        }
        let now = Instant::now();
        held.retain_mut(|(stream, until)| now < *until && drain(stream, &mut scratch));
    }
}

/// Reads whatever the peer sent; says whether the connection is still worth holding.
fn drain(stream: &mut TcpStream, scratch: &mut [u8]) -> bool {
    loop {
        match stream.read(scratch) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}
