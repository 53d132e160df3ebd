//! The receiver: accept senders, read and validate their manifests, write, verify, acknowledge.
//!
//! Each connection gets a thread (blocking I/O keeps back-pressure and fsync simple). The number
//! of transfers in flight is bounded by `--max-transfers`; a manifest past it waits in line for a
//! slot (`queue`), and connections past a larger bound (or past one address's share of it) get a busy refusal
//! from one background thread (`refuse`) without a thread of their own. Every connection ends
//! with one log line on stderr, and no failure of one transfer stops the receiver.
//!
//! The phases of one connection, each in its own module: `conn` (hellos, manifest, admission,
//! log line), `manifest` (reading and validating it), `transfer` (the engine: answers, bodies,
//! verdicts), `answer` (one entry against the disk), `verify` (one announced body checked and
//! queued, or failed alone), `body` (frames into a partial, hashed on the way),
//! `durable` (groups made durable before they are acknowledged), `litter` (the partials each
//! address leaves behind, bounded), `queue` (the line manifests wait in for a slot).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::Error;
use crate::progress::Progress;
use crate::sanitize::FsRules;
use crate::store::{SpacePool, fs_rules, partial};

pub(crate) mod answer;
pub(crate) mod body;
mod conn;
pub(crate) mod durable;
pub mod guard;
pub(crate) mod lanes;
pub(crate) mod litter;
pub mod manifest;
pub(crate) mod queue;
pub(crate) mod refuse;
mod secure;
pub(crate) mod transfer;
pub(crate) mod verify;

use conn::handle_logged;

/// Connections (not transfers) held at once, as a multiple of `--max-transfers`: room to read an
/// manifest and refuse it as busy, while a flood of idle connections is turned away at accept.
pub(crate) const CONNECTIONS_PER_TRANSFER: usize = 4;

/// Of those connections, the share one peer address may hold (half: twice `--max-transfers`), so
/// a flood of idle connections from one address cannot keep everyone else out, while one busy
/// host can still run all the transfers and be told "busy" past them.
pub(crate) const PEER_SHARE: usize = 2;

/// How often old partial files are looked for while the receiver runs.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// How the receiver runs, validated by `cli`.
#[derive(Debug, Clone)]
pub struct RecvOpts {
    pub dir: PathBuf,
    pub listen: String,
    pub once: bool,
    pub overwrite: bool,
    pub max_transfers: usize,
    /// Idle timeout once a transfer is under way; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Time allowed from accept to the first part of the manifest.
    pub handshake_timeout: Duration,
    /// Age after which unused partial files are removed.
    pub keep_partials: Duration,
    pub quiet: bool,
    /// Plaintext senders only (`--insecure`).
    pub insecure: bool,
    /// Where the code is read from or written to.
    pub code_file: Option<PathBuf>,
    /// Remember paired senders (`--remember`).
    pub remember: bool,
    /// `-o PATH` / `-o -`: the one file of the one transfer goes there, whatever its name.
    pub output: Option<Output>,
}

/// Where `xfer recv --once -o` puts its one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// `-o PATH`: stored as this name in `dir` (PATH's folder), replacing what is there.
    File(String),
    /// `-o -`: verified in a hidden partial, then copied to standard output and removed.
    Stdout,
}

/// The name a file poured to standard output is reported as, in the verdict and the log line.
pub const STDOUT_NAME: &str = "(standard output)";

/// A private folder made for `-o -` without `--dir`, removed when xfer ends (also on a signal).
static SCRATCH: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Makes the private folder `-o -` keeps its partial in, in `$TMPDIR`, removed by
/// [`remove_scratch`].
pub fn make_scratch() -> io::Result<PathBuf> {
    let dir = tempfile::Builder::new().prefix("xfer-recv-").tempdir()?.keep();
    *SCRATCH.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir.clone());
    Ok(dir)
}

/// Removes the folder [`make_scratch`] made, if any, with what is in it.
pub fn remove_scratch() {
    if let Some(dir) = SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A finished, successful transfer.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The stored name, or for a batch a summary of it.
    pub name: String,
    pub already_had: bool,
    pub batch: bool,
}

struct Shared {
    opts: RecvOpts,
    progress: Progress,
    transfers: AtomicUsize,
    connections: AtomicUsize,
    /// Connections open per peer address.
    per_peer: PeerCounts,
    /// Transfer slots held per peer address.
    per_peer_transfers: PeerCounts,
    /// Free space promised to transfers in flight, so concurrent ones cannot overbook the disk.
    space: SpacePool,
    /// Memory set aside for the manifests of transfers in flight.
    manifests: manifest::MemoryPool,
    /// Partials each address left behind, bounded per address.
    litter: litter::Litter,
    /// Keys, code and guess budget; `None` with `--insecure`.
    secure: Option<secure::Secure>,
    /// Manifests waiting for a transfer slot.
    line: queue::Line,
    /// What the target folder's file system adds to the name rules, found at start.
    names: FsRules,
    /// Split bodies in progress, for their lanes to join.
    lanes: lanes::Registry,
    /// `--once`: the one transfer has begun (its first manifest part is in).
    once_taken: std::sync::atomic::AtomicBool,
    /// `--once`: where that transfer's outcome goes.
    once: Mutex<Option<std::sync::mpsc::Sender<Result<Stored, Error>>>>,
}

/// How many connections (or transfers) each peer address holds.
#[derive(Default)]
struct PeerCounts(Mutex<HashMap<IpAddr, usize>>);

impl PeerCounts {
    /// Counts one more for `ip` unless that address already holds `limit`.
    fn take(&self, ip: IpAddr, limit: usize) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    /// How many `ip` holds.
    fn count(&self, ip: IpAddr) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).copied().unwrap_or(0)
    }

    fn release(&self, ip: IpAddr) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }
}

/// The address a connection is counted against for `PEER_SHARE`: an IPv4 address (also when it
/// arrives IPv4-mapped on a dual-stack socket), or an IPv6 address's /64 prefix, because one
/// IPv6 host usually holds a whole /64 and could otherwise take a new address per connection.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// A connection (or transfer) counted against its peer address until dropped.
struct PeerSlot<'a>(&'a PeerCounts, IpAddr);

impl Drop for PeerSlot<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

impl PeerCounts {
    /// Like `take`, as a slot released when dropped.
    fn slot(&self, ip: IpAddr, limit: usize) -> Option<PeerSlot<'_>> {
        self.take(ip, limit).then_some(PeerSlot(self, ip))
    }
}

/// Transfers this process is running (with a slot), for a stop that must say what it cut short.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// How many transfers are under way in this process: 0 means a stop loses nothing.
pub fn transfers_in_flight() -> usize {
    IN_FLIGHT.load(Ordering::SeqCst)
}

/// One transfer counted in [`transfers_in_flight`] while it lives.
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A bound listener, ready to serve.
pub struct Receiver {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// Releases a counted slot when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn take_slot(counter: &AtomicUsize, max: usize) -> Option<Slot<'_>> {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1)).ok()?;
    Some(Slot(counter))
}

impl Receiver {
    pub fn bind(opts: RecvOpts) -> Result<Receiver, Error> {
        let listener = TcpListener::bind(&opts.listen).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::AddrInUse {
                " (another program, maybe another xfer recv, uses that port: pick another with --listen)"
            } else {
                ""
            };
            Error::Listen { addr: opts.listen.clone(), source: e, hint }
        })?;
        let progress = Progress::new(opts.quiet);
        let space = SpacePool::new(&opts.dir);
        let names = fs_rules::for_dir(&opts.dir).map_err(Error::Usage)?;
        let secure = if opts.insecure { None } else { Some(secure::Secure::setup(&opts, &progress)?) };
        let shared = Shared {
            opts,
            progress,
            transfers: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            per_peer: PeerCounts::default(),
            per_peer_transfers: PeerCounts::default(),
            space,
            manifests: manifest::MemoryPool::new(manifest::MANIFEST_MEMORY),
            litter: litter::Litter::default(),
            secure,
            line: queue::Line::default(),
            names,
            lanes: lanes::Registry::default(),
            once_taken: std::sync::atomic::AtomicBool::new(false),
            once: Mutex::new(None),
        };
        Ok(Receiver { listener, shared: Arc::new(shared) })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// What to tell the person at the terminal once the receiver listens: the code senders
    /// need, or that the channel is plaintext. Never part of stdout or of the log lines.
    pub fn notice(&self) -> String {
        let Some(s) = &self.shared.secure else {
            return "xfer: --insecure: senders are not authenticated and files travel in the clear".into();
        };
        s.notice.clone()
    }

    /// Removes partials older than `--keep-partials` now, and then every hour in the background.
    fn start_sweeping(&self) {
        let shared = Arc::clone(&self.shared);
        let sweep = move || match partial::sweep(&shared.opts.dir, shared.opts.keep_partials) {
            Ok(0) => {}
            Ok(n) => {
                shared.progress.line(&format!("removed {n} partial file(s) older than --keep-partials"), true)
            }
            Err(e) => shared.progress.line(&format!("xfer: cannot sweep old partial files: {e}"), true),
        };
        sweep();
        let _ = std::thread::Builder::new().name("xfer sweep".into()).spawn(move || {
            loop {
                std::thread::sleep(SWEEP_EVERY);
                sweep();
            }
        });
    }

    /// Handles exactly one transfer and returns its outcome. Connections that never send a
    /// manifest (a port scan, a health check, a stray HTTP client) are logged and do not count;
    /// the transfer's lanes (a split body's further connections) are served beside it, and any
    /// other manifest meanwhile is refused as busy.
    pub fn serve_once(self) -> Result<Stored, Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.shared.once.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        std::thread::Builder::new()
            .name("xfer accept".into())
            .spawn(move || self.serve())
            .map_err(|e| Error::io("starting the accept thread", e))?;
        match rx.recv() {
            Ok(result) => result,
            Err(_) => Err(Error::io("accepting a connection", io::Error::other("the accept loop ended"))),
        }
    }

    /// Serves forever, one thread per connection.
    pub fn serve(self) -> Result<(), Error> {
        self.start_sweeping();
        let max_conns = self.shared.opts.max_transfers * CONNECTIONS_PER_TRANSFER;
        let per_peer = (max_conns / PEER_SHARE).max(1);
        let refuser = refuse::Refuser::start();
        for conn in self.listener.incoming() {
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: note it, back off
                    // briefly, keep serving.
                    self.shared.progress.line(&format!("xfer: accept failed: {e}"), true);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let peer = stream.peer_addr().map_or_else(|_| "unknown".to_string(), |a| a.to_string());
            let ip = stream.peer_addr().map_or(IpAddr::from([0, 0, 0, 0]), |a| peer_key(a.ip()));
            if !self.shared.per_peer.take(ip, per_peer) {
                let from = if ip.is_ipv6() { "this /64 network" } else { "this address" };
                let reason = format!("receiver busy: {per_peer} connections already open from {from}");
                self.shared.progress.line(&format!("{peer}: refused: {reason}"), true);
                refuser.refuse(stream, reason);
                continue;
            }
            if take_slot(&self.shared.connections, max_conns).map(std::mem::forget).is_none() {
                self.shared.per_peer.release(ip);
                let reason = format!("receiver busy: {max_conns} connections open, try again later");
                self.shared.progress.line(&format!("{peer}: refused: {reason}"), true);
                refuser.refuse(stream, reason);
                continue;
            }
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new().name(format!("xfer {peer}")).spawn(move || {
                let slots = (Slot(&shared.connections), PeerSlot(&shared.per_peer, ip));
                let addr = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                let (result, transfer) = handle_logged(&shared, stream, addr, slots);
                if transfer
                    && shared.opts.once
                    && let Some(tx) = shared.once.lock().unwrap_or_else(|e| e.into_inner()).take()
                {
                    let _ = tx.send(result);
                }
            });
            if let Err(e) = spawned {
                self.shared.connections.fetch_sub(1, Ordering::SeqCst);
                self.shared.per_peer.release(ip);
                self.shared.progress.line(&format!("{peer}: cannot start a thread: {e}"), true);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_counted_by_ipv4_address_or_ipv6_slash_64() {
        let key = |s: &str| peer_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        // The same IPv4 host through a dual-stack socket is the same peer.
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        // Every address of one /64 is one peer; the next /64 is another.
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(key("::1"), "::");
    }
}
