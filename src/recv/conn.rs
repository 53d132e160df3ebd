//! One connection on the receiver, up to the engine: hellos, the whole manifest, the decision to
//! take the transfer (a valid manifest, a transfer slot, room on the disk), then
//! [`Transfer::run`], and one log line at the end.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Instant;

use super::answer::{likely_needed, no_room};
use super::manifest::{self, ManifestError};
use super::queue::{self, Left};
use super::refuse::LINGER;
use super::transfer::{Seen, Transfer};
use super::{InFlight, Output, PEER_SHARE, Shared, Stored, peer_key};
use crate::error::{Error, Limit};
use crate::progress::{human_bytes, human_rate};
use crate::protocol::{AnswersPart, Message, ProtocolError, Queued, Reject, RejectCode, bounded_reason};
use crate::sanitize::escape;
use crate::store::SafeDir;
use crate::transport::handshake::{self, Admit, Admitted};
use crate::transport::{self, FrameReader, FrameWriter};

/// Handles one connection and logs one line about it. Also says whether it was a transfer (with
/// `--once`: the one transfer; port scans and lanes do not count). The connection is closed and `held` (its slots)
/// released before the line is written, so a slow or blocked stderr never holds a connection.
pub(super) fn handle_logged<H>(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    held: H,
) -> (Result<Stored, Error>, bool) {
    let start = Instant::now();
    let mut seen = Seen::default();
    let result = handle(shared, stream, &peer.to_string(), &mut seen);
    let claimed = if shared.opts.once { seen.claimed } else { seen.name.is_some() && !seen.lane };
    let elapsed = start.elapsed();
    drop(held);
    // Its transfer slot, if it had one, is free: the next manifest in line may take it.
    shared.line.wake();
    // What was listed, then what actually arrived: a refused, resumed or cut transfer moves less
    // than it listed.
    let what = match (&seen.name, seen.size) {
        (Some(n), Some(s)) => format!("\"{}\" ({})", escape(n), human_bytes(s)),
        (Some(n), None) => format!("\"{}\"", escape(n)),
        _ => "(no offer)".to_string(),
    };
    let moved = match seen.received {
        0 => "nothing received".to_string(),
        n => format!("{} received", human_bytes(n)),
    };
    let resumed =
        if seen.resumed > 0 { format!(" (resumed at {} bytes)", seen.resumed) } else { String::new() };
    let outcome = match &result {
        Ok(s) if s.batch => s.name.clone(),
        Ok(s) if s.already_had => format!("already have it as \"{}\"", escape(&s.name)),
        Ok(s) => format!("verified, stored as \"{}\"{resumed}", escape(&s.name)),
        Err(e) => format!("failed: {e}"),
    };
    let rate =
        if seen.received > 0 { format!(" ({})", human_rate(seen.received, elapsed)) } else { String::new() };
    let line = format!("{peer} {what}: {moved} in {:.2} s{rate}, {outcome}", elapsed.as_secs_f64());
    shared.progress.line(&line, true);
    (result, claimed)
}

/// Refuses the whole transfer (the sender may already be gone: the refusal is logged either
/// way). The sender may still be sending its manifest: what it sends is read and dropped for up
/// to `LINGER` after the refusal, so closing does not reset the connection before the refusal is
/// read. Returns the error this side reports: a local failure for code `Failed`.
fn refuse(
    (r, w): (&mut FrameReader, &mut FrameWriter),
    code: RejectCode,
    reason: String,
    what: &str,
    local: Option<std::io::Error>,
) -> Error {
    let sent = w.message(&Message::Reject(Reject { code, reason: bounded_reason(reason.clone()) }));
    if sent.is_ok() {
        w.shutdown(Shutdown::Write);
        r.discard_until(Instant::now() + LINGER);
    }
    match local {
        Some(e) => Error::io(reason, e),
        None => Error::Rejected { name: what.to_string(), code, reason },
    }
}

fn handle(shared: &Shared, stream: TcpStream, peer: &str, seen: &mut Seen) -> Result<Stored, Error> {
    let ip = stream.peer_addr().map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| peer_key(a.ip()));
    let opts = &shared.opts;
    let (mut r, mut w) = transport::split(stream, peer, opts.timeout)?;
    // Until the first manifest part is in, one deadline from accept applies: a silent or
    // trickling connection costs a thread for seconds, not for the idle timeout.
    let hs = Limit { secs: opts.handshake_timeout.as_secs(), option: "--handshake-timeout" };
    let deadline =
        |r: &mut FrameReader, at| r.set_deadline(at).map_err(|e| Error::io("configuring the socket", e));
    deadline(&mut r, Some((Instant::now() + opts.handshake_timeout, hs)))?;
    transport::exchange_hellos(&mut r, &mut w)?;
    let admit = Admit {
        insecure: shared.secure.is_none(),
        identity: shared.secure.as_ref().map(|s| &s.identity),
        guard: shared.secure.as_ref().map(|s| &s.guard),
        remember: shared.secure.as_ref().and_then(|s| s.remember.as_ref()),
        ip,
        lanes: &|session, ip| shared.lanes.secret(session, ip),
    };
    let admitted = match handshake::receive(&mut r, &mut w, &admit) {
        Ok(a) => a,
        Err(e) => {
            // A refusal in the clear was sent: let the sender read it before the connection closes.
            if matches!(e, Error::Auth(_) | Error::Rejected { .. }) {
                w.shutdown(Shutdown::Write);
                r.discard_until(Instant::now() + LINGER);
            }
            return Err(e);
        }
    };
    if let Admitted::Lane(session) = admitted {
        seen.lane = true;
        deadline(&mut r, None)?;
        let Some(hub) = shared.lanes.find(&session, ip) else {
            let source = ProtocolError::Malformed("a lane of a split that has ended".into());
            return Err(Error::Protocol { peer: peer.to_string(), source });
        };
        seen.name = Some(format!("{} (a lane)", hub.name));
        super::lanes::serve(&hub, &mut r, &mut w, &mut seen.received)?;
        return Ok(Stored { name: "lane done: its parts written".into(), already_had: false, batch: true });
    }
    let first = match r.message().map_err(|e| r.error("waiting for the manifest", e))? {
        Message::Manifest(part) => part,
        other => {
            let source = ProtocolError::UnexpectedMessage { expected: "manifest", got: other.name() };
            return Err(Error::Protocol { peer: peer.to_string(), source });
        }
    };
    // The rest of the manifest may be long: it has a deadline of its own, and past a small
    // budget it is read only by a transfer that holds a slot and the memory for it.
    let deadline_limit =
        Limit { secs: manifest::MANIFEST_DEADLINE.as_secs(), option: "the manifest deadline" };
    deadline(&mut r, Some((Instant::now() + manifest::MANIFEST_DEADLINE, deadline_limit)))?;
    let mut m = manifest::Reading::new(first);
    while !m.last && !m.over_limits() && m.cost <= manifest::PRE_SLOT_MANIFEST {
        m.read_part(&mut r)?;
    }
    // `--once`: the first manifest is the one transfer; any other meanwhile is told so.
    if opts.once {
        if shared.once_taken.swap(true, std::sync::atomic::Ordering::SeqCst) {
            drop(m);
            let reason = "receiver busy: it takes one transfer (--once) and has it".to_string();
            return Err(refuse((&mut r, &mut w), RejectCode::Busy, reason, "the transfer", None));
        }
        seen.claimed = true;
    }
    let single = manifest::is_single(&m.entries);
    // How the transfer is named in messages: a single file by its name.
    let what = if single { escape(&m.entries[0].path.join("/")) } else { "the batch".to_string() };
    seen.name = Some(if single { m.entries[0].path.join("/") } else { "batch".to_string() });
    // The manifest's memory, then its share of the pool and the slots, are let go before a
    // refusal lingers, so a refused peer holds nothing (freeing the entries before the pool
    // credit keeps the pool true to what is allocated).
    // One address may hold at most its share of the transfer slots, as of the connections.
    // A complete manifest that finds every slot taken waits in line (told its place); one still
    // coming is refused as busy, since reading more of it would take memory without a slot.
    let share = (opts.max_transfers / PEER_SHARE).max(1);
    let tell = |ahead| w.message(&Message::Queued(Queued { ahead })).and_then(|()| w.flush());
    let (slot, mine) = match shared.line.take(shared, (ip, share), m.last, tell) {
        Ok(slots) => slots,
        Err(left) => {
            drop(m);
            let reason = match left {
                Left::Full => format!(
                    "receiver busy: {} transfers in progress ({share} at most from one address), try again later",
                    opts.max_transfers
                ),
                Left::TooLong => format!(
                    "receiver busy: waited {} s in line for a transfer slot, try again later",
                    queue::QUEUE_WAIT.as_secs()
                ),
                Left::Gone(e) => return Err(w.error("telling the sender its place in line", e.into())),
            };
            return Err(refuse((&mut r, &mut w), RejectCode::Busy, reason, &what, None));
        }
    };
    let memory_busy =
        || "receiver busy: the memory set aside for manifests is in use, try again later".to_string();
    let Some(memory) = shared.manifests.take(m.cost) else {
        drop((m, slot, mine));
        return Err(refuse((&mut r, &mut w), RejectCode::Busy, memory_busy(), &what, None));
    };
    let mut held = (slot, mine, memory, InFlight::enter());
    while !m.last && !m.over_limits() {
        let more = m.read_part(&mut r)?;
        if !held.2.grow(more) {
            drop(m);
            drop(held);
            return Err(refuse((&mut r, &mut w), RejectCode::Busy, memory_busy(), &what, None));
        }
    }
    deadline(&mut r, None)?;
    let mut entries = m.entries;
    if !single {
        seen.name = Some(format!("batch of {} entries", entries.len()));
    }
    if m.cost > manifest::MAX_MANIFEST_BYTES {
        let reason = format!(
            "manifest refused: it would take more than {} of memory (MAX_MANIFEST_BYTES)",
            human_bytes(manifest::MAX_MANIFEST_BYTES as u64)
        );
        drop(entries);
        drop(held);
        return Err(refuse((&mut r, &mut w), RejectCode::InvalidManifest, reason, &what, None));
    }
    let mut checked = match manifest::validate(&entries, shared.names) {
        Ok(c) => c,
        Err(e) => {
            let code = if matches!(e, ManifestError::BadName { .. }) {
                RejectCode::InvalidName
            } else {
                RejectCode::InvalidManifest
            };
            let reason = format!("manifest refused: {e}");
            drop(entries);
            drop(held);
            return Err(refuse((&mut r, &mut w), code, reason, &what, None));
        }
    };
    seen.size = Some(checked.summary.total_bytes);
    // `-o PATH` / `-o -`: one file, whatever its name, goes where the receiver was told.
    if let Some(output) = &opts.output {
        let flag = if *output == Output::Stdout { "-o -" } else { "-o PATH" };
        if !single {
            let reason = format!(
                "manifest refused: this receiver takes one file ({flag}), not a folder or several files"
            );
            drop(entries);
            drop(held);
            return Err(refuse((&mut r, &mut w), RejectCode::InvalidManifest, reason, &what, None));
        }
        let name = match output {
            Output::File(name) => name.clone(),
            // The sender's own name (already checked), without folders: the partial's name.
            Output::Stdout => entries[0].path.last().expect("paths are not empty").clone(),
        };
        entries[0].path = vec![name];
        // The name is the receiver's own choice now, not the sender's: what the sender's name
        // would have been refused for no longer applies.
        checked.refused = manifest::Refused::default();
    }
    let root = match SafeDir::open_root(&opts.dir) {
        Ok(d) => d,
        Err(e) => {
            drop(entries);
            drop(held);
            let reason = "cannot open the target folder".to_string();
            return Err(refuse((&mut r, &mut w), RejectCode::Failed, reason, &what, Some(e)));
        }
    };
    // Room for what will probably be written (see `likely_needed`): files, records, folders, in
    // blocks and inodes; a file it does not count reserves its own before it is answered.
    // A batch that does not fit whole is answered file by file: what fits is sent, the rest is
    // refused for space (like rsync, which sends what it can).
    let needed = shared
        .space
        .block_size()
        .and_then(|block| likely_needed(&root, &entries, &checked.refused, block))
        .and_then(|needed| match shared.space.reserve(needed.room)? {
            Err(_) if !single => {
                let needed = needed.per_file(&entries);
                Ok((shared.space.reserve(needed.room)?, needed))
            }
            reserved => Ok((reserved, needed)),
        });
    let (reservation, uncounted) = match needed {
        Ok((Ok(r), needed)) => (r, needed.uncounted),
        Ok((Err(available), needed)) => {
            let what_needs = if single { "file" } else { "the batch's folders alone" };
            let reason = no_room(what_needs, needed.room, available);
            drop((entries, needed));
            drop(held);
            return Err(refuse((&mut r, &mut w), RejectCode::InsufficientSpace, reason, &what, None));
        }
        Err(e) => {
            drop(entries);
            drop(held);
            let reason = "cannot read free space".to_string();
            return Err(refuse((&mut r, &mut w), RejectCode::Failed, reason, &what, Some(e)));
        }
    };
    // Accepted: an empty answers part says so, and the sender starts sending digests.
    w.message(&Message::Answers(AnswersPart { answers: Vec::new(), last: false }))
        .and_then(|()| w.flush())
        .map_err(|e| w.error("accepting the manifest", e.into()))?;
    let room = (reservation, uncounted);
    Transfer::new(shared, (&mut r, &mut w), (ip, entries, checked), root, room)?.run(seen)
}
