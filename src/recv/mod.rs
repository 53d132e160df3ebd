//! The receiver: accept senders, validate their offers, write, verify, acknowledge.
//!
//! Each connection gets a thread (blocking I/O keeps back-pressure and fsync simple). The number
//! of transfers in flight is bounded by `--max-transfers`; an offer past it is refused as busy, and
//! connections past a larger bound (or past one address's share of it) get a busy refusal from
//! one background thread (`refuse`) without a thread of their own. Every connection ends with one log line on
//! stderr, and no failure of one transfer stops the receiver.

use std::io::{self, BufReader, BufWriter, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Limit};
use crate::partial::{self, FileId, Opened, Partial};
use crate::progress::{Progress, human_bytes, human_rate};
use crate::protocol::{
    self, Message, ProtocolError, RejectCode, Reply, Trailer, Verdict, WireError, bounded_reason,
    read_message, write_message,
};
use crate::safedir::SafeDir;
use crate::sanitize::{escape, validate_name};
use crate::store;

pub(crate) mod batch;
pub(crate) mod body;
pub(crate) mod refuse;

use body::{BodyError, DeadlineReader, RECV_BUF, Reservation, receive_body};

/// Connections (not transfers) held at once, as a multiple of `--max-transfers`: room to read an
/// offer and refuse it as busy, while a flood of idle connections is turned away at accept.
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
    /// Time allowed from accept to a complete offer.
    pub handshake_timeout: Duration,
    /// Age after which unused partial files are removed.
    pub keep_partials: Duration,
    pub quiet: bool,
}

/// A finished, successful transfer.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The stored name, or for a batch a summary of it.
    pub name: String,
    pub already_had: bool,
    pub batch: bool,
}

pub(super) struct Shared {
    opts: RecvOpts,
    progress: Progress,
    transfers: AtomicUsize,
    connections: AtomicUsize,
    /// Connections open per peer address.
    per_peer: Mutex<std::collections::HashMap<IpAddr, usize>>,
    /// Bytes promised to transfers in flight, so concurrent offers cannot overbook free space.
    reserved: Mutex<u64>,
}

impl Shared {
    /// Counts a connection from `ip` unless that address already holds `limit`.
    fn take_peer_slot(&self, ip: IpAddr, limit: usize) -> bool {
        let mut map = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    fn release_peer_slot(&self, ip: IpAddr) {
        let mut map = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
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

/// A connection counted against its peer address until dropped.
struct PeerSlot<'a>(&'a Shared, IpAddr);

impl Drop for PeerSlot<'_> {
    fn drop(&mut self) {
        self.0.release_peer_slot(self.1);
    }
}

impl Shared {
    /// Reserves `need` bytes of the target folder's free space for one transfer, counting what
    /// transfers in flight have reserved as used; or says how much is available.
    fn reserve(&self, need: u64) -> io::Result<Result<Reservation<'_>, u64>> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let available = store::free_space(&self.opts.dir)?.saturating_sub(*reserved);
        if need > available {
            return Ok(Err(available));
        }
        *reserved += need;
        Ok(Ok(Reservation { pool: &self.reserved, left: need }))
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
        let listener = TcpListener::bind(&opts.listen)
            .map_err(|e| Error::Connect { addr: format!("{} (listening)", opts.listen), source: e })?;
        let progress = Progress::new(opts.quiet);
        let shared = Shared {
            opts,
            progress,
            transfers: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            per_peer: Mutex::new(Default::default()),
            reserved: Mutex::new(0),
        };
        Ok(Receiver { listener, shared: Arc::new(shared) })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
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

    /// Handles exactly one transfer and returns its outcome. Connections that never make an
    /// offer (a port scan, a health check, a stray HTTP client) are logged and do not count.
    pub fn serve_once(self) -> Result<Stored, Error> {
        self.start_sweeping();
        loop {
            let (stream, peer) =
                self.listener.accept().map_err(|e| Error::io("accepting a connection", e))?;
            let (result, offered) = handle_logged(&self.shared, stream, peer, ());
            if offered {
                return result;
            }
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
            if !self.shared.take_peer_slot(ip, per_peer) {
                let from = if ip.is_ipv6() { "this /64 network" } else { "this address" };
                let reason = format!("receiver busy: {per_peer} connections already open from {from}");
                self.shared.progress.line(&format!("{peer}: refused: {reason}"), true);
                refuser.refuse(stream, reason);
                continue;
            }
            if take_slot(&self.shared.connections, max_conns).map(std::mem::forget).is_none() {
                self.shared.release_peer_slot(ip);
                let reason = format!("receiver busy: {max_conns} connections open, try again later");
                self.shared.progress.line(&format!("{peer}: refused: {reason}"), true);
                refuser.refuse(stream, reason);
                continue;
            }
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new().name(format!("xfer {peer}")).spawn(move || {
                let slots = (Slot(&shared.connections), PeerSlot(&shared, ip));
                let addr = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                let _ = handle_logged(&shared, stream, addr, slots);
            });
            if let Err(e) = spawned {
                self.shared.connections.fetch_sub(1, Ordering::SeqCst);
                self.shared.release_peer_slot(ip);
                self.shared.progress.line(&format!("{peer}: cannot start a thread: {e}"), true);
            }
        }
        Ok(())
    }
}

/// What is known about a transfer so far, for its log line.
#[derive(Default)]
struct Seen {
    name: Option<String>,
    size: Option<u64>,
    /// Offset the body resumed from (0 for a fresh transfer).
    resumed: u64,
    /// Body bytes received on this connection.
    received: u64,
}

/// Handles one connection and logs one line about it. Also says whether an offer was read.
/// The connection is closed and `held` (its slots) released before the line is written, so a
/// slow or blocked stderr never holds a connection.
fn handle_logged<H>(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    held: H,
) -> (Result<Stored, Error>, bool) {
    let start = Instant::now();
    let mut seen = Seen::default();
    let result = handle(shared, &stream, &peer.to_string(), &mut seen);
    let elapsed = start.elapsed();
    drop(stream);
    drop(held);
    let what = match (&seen.name, seen.size) {
        (Some(n), Some(s)) => format!("\"{}\" {}", escape(n), human_bytes(s)),
        _ => "(no offer)".to_string(),
    };
    let resumed =
        if seen.resumed > 0 { format!(" (resumed at {} bytes)", seen.resumed) } else { String::new() };
    let outcome = match &result {
        Ok(s) if s.batch => s.name.clone(),
        Ok(s) if s.already_had => format!("already have it as \"{}\"", escape(&s.name)),
        Ok(s) => format!("verified, stored as \"{}\"{resumed}", escape(&s.name)),
        Err(e) => format!("failed: {e}"),
    };
    let line = format!(
        "{peer} {what} in {:.2} s ({}): {outcome}",
        elapsed.as_secs_f64(),
        human_rate(seen.received, elapsed)
    );
    shared.progress.line(&line, true);
    (result, seen.name.is_some())
}

fn handle(shared: &Shared, stream: &TcpStream, peer: &str, seen: &mut Seen) -> Result<Stored, Error> {
    let opts = &shared.opts;
    let idle = Limit { secs: opts.timeout.map_or(0, |t| t.as_secs()), option: "--timeout" };
    let hs = Limit { secs: opts.handshake_timeout.as_secs(), option: "--handshake-timeout" };
    let wire = |what: &'static str, limit: Limit| move |e: WireError| Error::wire(peer, what, limit, e);
    let setup = |e| Error::io("configuring the socket", e);
    stream.set_write_timeout(opts.timeout).map_err(setup)?;
    let _ = stream.set_nodelay(true);
    // Until the offer is in, one deadline from accept applies: a silent or trickling connection
    // costs a thread for seconds, not for the idle timeout.
    let deadline = DeadlineReader { stream, until: Some(Instant::now() + opts.handshake_timeout) };
    let mut reader = BufReader::with_capacity(RECV_BUF, deadline);
    let mut writer = BufWriter::new(stream);

    // Hello out first, so a peer with another version learns ours even though we hang up.
    protocol::write_hello(&mut writer)
        .and_then(|()| writer.flush())
        .map_err(|e| wire("greeting", hs)(e.into()))?;
    protocol::read_hello(&mut reader).map_err(wire("waiting for the hello", hs))?;
    let offer = match read_message(&mut reader).map_err(wire("waiting for the offer", hs))? {
        Message::Offer(o) => o,
        Message::Manifest(first) => {
            // A batch: the rest of the manifest may be long; the idle timeout applies from here.
            reader.get_mut().until = None;
            stream.set_read_timeout(opts.timeout).map_err(setup)?;
            return batch::handle(shared, (&mut reader, &mut writer), peer, first, seen);
        }
        other => {
            return Err(Error::Protocol {
                peer: peer.to_string(),
                source: ProtocolError::UnexpectedMessage { expected: "offer", got: other.name() },
            });
        }
    };
    let mut offer = offer;
    seen.name = Some(offer.name.clone());
    seen.size = Some(offer.size);
    let reply = |writer: &mut BufWriter<&TcpStream>, r: Reply| -> Result<(), Error> {
        write_message(writer, &Message::Reply(r))
            .and_then(|()| writer.flush())
            .map_err(|e| wire("replying to the offer", idle)(e.into()))
    };
    // Refuses the offer (the sender may already be gone; the refusal is logged either way).
    // A refusal for our own failure (code Failed) is a local I/O error on this side.
    let shown = escape(&offer.name);
    let refuse = |writer: &mut BufWriter<&TcpStream>,
                  code: RejectCode,
                  reason: String,
                  local: Option<io::Error>|
     -> Result<Stored, Error> {
        let _ = reply(writer, Reply::Reject { code, reason: bounded_reason(reason.clone()) });
        Err(match local {
            Some(e) => Error::io(reason, e),
            None => Error::Rejected { name: shown.clone(), code, reason },
        })
    };

    if let Err(e) = validate_name(&offer.name) {
        return refuse(&mut writer, RejectCode::InvalidName, e.to_string(), None);
    }
    let Some(_slot) = take_slot(&shared.transfers, opts.max_transfers) else {
        let reason = format!("receiver busy: {} transfers in progress, try again later", opts.max_transfers);
        return refuse(&mut writer, RejectCode::Busy, reason, None);
    };
    let root = match SafeDir::open_root(&opts.dir) {
        Ok(d) => d,
        Err(e) => {
            return refuse(&mut writer, RejectCode::Failed, "cannot open the target folder".into(), Some(e));
        }
    };
    // An offer without a digest (the sender hashes while it sends) is just sent, unless a file of
    // that name and size is here: then the digest decides whether it is the same file.
    // So is one whose name has a partial that its digest would let it resume.
    let id = FileId { size: offer.size, alg: offer.hash, digest: offer.digest, tag: Some(offer.tag) };
    if offer.digest.is_none() {
        let existing = store::same_size_exists(&root, &offer.name, offer.size, opts.overwrite);
        match existing.map(|e| e || id.digest_would_resume(&root, &offer.name)) {
            Ok(false) => {}
            Ok(true) => {
                reply(&mut writer, Reply::NeedDigest)?;
                // The sender hashes the file now; empty Digests parts keep the connection alive.
                reader.get_mut().until = None;
                stream.set_read_timeout(opts.timeout).map_err(setup)?;
                offer = loop {
                    match read_message(&mut reader).map_err(wire("waiting for the digest", idle))? {
                        Message::Digests(p) if p.digests.is_empty() => continue,
                        Message::Offer(o)
                            if o.digest.is_some()
                                && (&o.name, o.size, o.hash) == (&offer.name, offer.size, offer.hash) =>
                        {
                            break o;
                        }
                        other => {
                            let source = ProtocolError::UnexpectedMessage {
                                expected: "the same offer with its digest",
                                got: other.name(),
                            };
                            return Err(Error::Protocol { peer: peer.to_string(), source });
                        }
                    }
                };
            }
            Err(e) => {
                return refuse(
                    &mut writer,
                    RejectCode::Failed,
                    "cannot check existing files".into(),
                    Some(e),
                );
            }
        }
    }
    // Half the sender's idle timeout (as far as we know it: ours) for comparing with old files.
    let check_until = Instant::now() + opts.timeout.map_or(Duration::from_secs(60), |t| t / 2);
    if let Some(digest) = &offer.digest {
        match store::find_existing(
            &root,
            &offer.name,
            (offer.size, offer.hash, digest),
            opts.overwrite,
            check_until,
        ) {
            Ok(Some(name)) => {
                reply(&mut writer, Reply::AlreadyHave { name: name.clone() })?;
                return Ok(Stored { name, already_had: true, batch: false });
            }
            Ok(None) => {}
            Err(e) => {
                return refuse(
                    &mut writer,
                    RejectCode::Failed,
                    "cannot check existing files".into(),
                    Some(e),
                );
            }
        }
    }
    let id = FileId { digest: offer.digest, ..id };
    let (partial, offset, hasher) = match Partial::open(root, &offer.name, &id, check_until, true) {
        Ok(Opened::Ready { partial, offset, hasher }) => (partial, offset, hasher),
        Ok(Opened::Busy) => {
            let reason = "another transfer of this name is in progress, try again later".to_string();
            return refuse(&mut writer, RejectCode::Busy, reason, None);
        }
        Err(e) => {
            return refuse(&mut writer, RejectCode::Failed, "cannot open the partial file".into(), Some(e));
        }
    };
    seen.resumed = offset;
    let need = offer.size - offset;
    let mut reservation = match shared.reserve(need) {
        Ok(Ok(r)) => r,
        Ok(Err(available)) => {
            partial.keep();
            let reason = format!(
                "file needs {} ({need} bytes) more but the receiver has {} free",
                human_bytes(need),
                human_bytes(available)
            );
            return refuse(&mut writer, RejectCode::InsufficientSpace, reason, None);
        }
        Err(e) => {
            partial.keep();
            return refuse(&mut writer, RejectCode::Failed, "cannot read free space".into(), Some(e));
        }
    };
    if let Err(e) = reply(&mut writer, Reply::Accept { offset }) {
        partial.keep();
        return Err(e);
    }

    // From here the idle timeout applies to each read.
    reader.get_mut().until = None;
    stream.set_read_timeout(opts.timeout).map_err(setup)?;
    let bar = shared.progress.bytes("receiving", &escape(&offer.name), offer.size);
    let body = receive_body(
        &mut reader,
        &partial,
        (offer.size, offset, hasher),
        &mut seen.received,
        &mut reservation,
        &bar,
    );
    bar.finish_and_clear();
    let verdict = |writer: &mut BufWriter<&TcpStream>, v: Verdict| {
        write_message(writer, &Message::Verdict(v)).and_then(|()| writer.flush())
    };
    let digest = match body {
        Ok(d) => d,
        Err(BodyError::Wire(e)) => {
            let err = wire("receiving the body", idle)(e);
            // The peer may have closed only its writing half; tell it what we saw. Only a body
            // that ended early is a size mismatch; a timeout or broken framing is a failure.
            let v = match &err {
                Error::Connection { .. } => {
                    Verdict::SizeMismatch { expected: offer.size, received: offset + seen.received }
                }
                _ => Verdict::Failed { reason: bounded_reason(format!("receiver: {err}")) },
            };
            let _ = verdict(&mut writer, v);
            // An interruption keeps what arrived for a resume; broken framing does not.
            if matches!(err, Error::Protocol { .. }) {
                partial.discard();
            } else {
                partial.keep();
            }
            return Err(err);
        }
        Err(BodyError::TooLong(len)) => {
            partial.discard();
            let received = offset + seen.received + u64::from(len);
            let _ = verdict(&mut writer, Verdict::SizeMismatch { expected: offer.size, received });
            return Err(Error::Integrity(format!(
                "body longer than offered: a {len}-byte chunk at byte {} of {}",
                offset + seen.received,
                offer.size
            )));
        }
        Err(BodyError::Local(e, _)) => {
            partial.discard();
            let _ = verdict(
                &mut writer,
                Verdict::Failed { reason: bounded_reason(format!("writing the file: {e}")) },
            );
            return Err(Error::io("writing the received file", e));
        }
    };
    // Without a digest in the offer, the sender's comes after the body.
    let expected = match offer.digest {
        Some(d) => d,
        None => match read_message(&mut reader) {
            Ok(Message::Trailer(Trailer { digest: Some(d) })) => d,
            Ok(Message::Trailer(Trailer { digest: None })) => {
                partial.discard();
                let reason = "the sender's file changed while it was being sent; nothing was stored";
                let _ = verdict(&mut writer, Verdict::Failed { reason: reason.into() });
                return Err(Error::Integrity(reason.into()));
            }
            Ok(other) => {
                partial.discard();
                let source = ProtocolError::UnexpectedMessage { expected: "trailer", got: other.name() };
                return Err(Error::Protocol { peer: peer.to_string(), source });
            }
            Err(e) => {
                // Every byte arrived and only the digest did not: kept for a resume, which
                // re-checks it all. After broken framing, not.
                if matches!(e, WireError::Protocol(_)) {
                    partial.discard();
                } else {
                    partial.keep();
                }
                return Err(wire("waiting for the digest", idle)(e));
            }
        },
    };
    if digest != expected {
        partial.discard();
        let _ = verdict(&mut writer, Verdict::HashMismatch { expected, actual: digest });
        return Err(Error::Integrity(format!(
            "content hashed to {digest}, the sender's digest is {expected}"
        )));
    }
    let stored = match partial.commit(&offer.name, opts.overwrite) {
        Ok(s) => s,
        Err(e) => {
            let _ = verdict(
                &mut writer,
                Verdict::Failed { reason: bounded_reason(format!("storing the file: {e}")) },
            );
            return Err(Error::io("storing the received file", e));
        }
    };
    // The file is durable under its final name; only now is it acknowledged. If the sender is
    // gone by now the file still stays: it is verified.
    verdict(&mut writer, Verdict::Verified { name: stored.clone() })
        .map_err(|e| wire("sending the verdict", idle)(e.into()))?;
    Ok(Stored { name: stored, already_had: false, batch: false })
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
