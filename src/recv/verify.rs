//! One announced body on the receiver: received into its partial, checked against the file's
//! digest (which may still be on its way: it is due by the end of the body), queued for its
//! durable group; or failed alone with a verdict that says why. Also the end of a transfer's
//! files: groups flushed and acknowledged, partials of a broken-off transfer cleaned up.

use super::answer::Plan;
use super::body::{BodyError, receive_body, receive_stream, skip_body, skip_stream};
use super::durable::{GroupError, Pending};
use super::transfer::{Seen, Transfer};
use crate::error::Error;
use crate::hash::Hasher;
use crate::protocol::{
    Digest, EntryKind, FileVerdict, HashAlg, Message, ProtocolError, Split, SplitEnd, Verdict, bounded_reason,
};
use crate::sanitize::{escape, peer_text};
use crate::store::space::round_up;
use crate::store::{self, Partial, Room, SafeDir};
use crate::transport::MIN_RATE;

impl Transfer<'_> {
    /// Sends a file's failed verdict and counts it.
    /// The body hashed to `actual`, not the sender's `expected`: nothing is stored.
    fn hash_mismatch(&mut self, plan: &Plan, expected: Digest, actual: Digest) -> Result<(), Error> {
        let e = Error::Integrity(format!("content hashed to {actual}, the sender's digest is {expected}"));
        self.verdict_failed(plan, Verdict::HashMismatch { expected, actual }, e)
    }

    pub(super) fn verdict_failed(&mut self, plan: &Plan, verdict: Verdict, e: Error) -> Result<(), Error> {
        self.failed += 1;
        self.bar.file_done();
        self.fail(e);
        self.send(&Message::FileVerdict(FileVerdict { index: plan.index as u32, verdict }))
    }

    pub(super) fn withdrawn(&mut self, plan: Plan, reason: String) -> Result<(), Error> {
        let reason = bounded_reason(format!("not sent: {}", peer_text(reason)));
        let e = Error::Integrity(format!("the sender withdrew it ({reason})"));
        self.bar.skip(self.entries[plan.index].size() - plan.offset);
        let sent = self.verdict_failed(&plan, Verdict::Failed { reason }, e);
        self.abandon(plan);
        sent
    }

    /// Receives the body `plan` announced, checks it against the file's digest and queues it for
    /// its group; or takes it off the wire and says why it could not be stored. Either way the
    /// file's room is settled: what was written shows in the file system now, and the rest of its
    /// blocks, its inode and its record's are no longer reserved (the file is there, or gone).
    pub(super) fn body(&mut self, plan: Plan, split: Option<Split>, seen: &mut Seen) -> Result<(), Error> {
        if let EntryKind::Stream { hash } = self.entries[plan.index].kind {
            let outcome = self.stream(plan, hash, seen);
            // Alone in its transfer: what its partial and bytes reserved is all that is left.
            let left = self.reservation.left();
            self.reservation.release(left);
            return outcome;
        }
        let block = self.reservation.block();
        let size = self.entries[plan.index].size();
        // As the acceptance counted it (`likely_needed`): a resume only the blocks it lacks.
        let room = match plan.offset {
            0 => Room::file(size, plan.record, block),
            offset => Room { bytes: round_up(size - offset, block), inodes: 0 },
        };
        let before = self.reservation.left().bytes;
        let outcome = self.receive(plan, split, seen);
        let written = before - self.reservation.left().bytes;
        self.reservation.release(Room { bytes: room.bytes.saturating_sub(written), inodes: room.inodes });
        outcome
    }

    fn receive(&mut self, mut plan: Plan, split: Option<Split>, seen: &mut Seen) -> Result<(), Error> {
        self.bodies += 1;
        let entry = &self.entries[plan.index];
        if split.is_some() && !matches!(entry.kind, EntryKind::File { .. }) {
            return Err(self.malformed("a split body for an entry that is not a file".into()));
        }
        let EntryKind::File { size, hash, .. } = entry.kind else { unreachable!("plans hold files") };
        let (parent, name) = entry.path.split_at(entry.path.len() - 1);
        let name = name[0].clone();
        if self.single {
            seen.resumed = plan.offset;
        } else {
            self.bar.set_name(&entry.path.join("/"));
        }
        let mode = entry.mode;
        let opened = match plan.held.take() {
            Some(p) => Ok(p),
            None => self.body_dirs.get(parent).and_then(SafeDir::try_clone).and_then(|d| {
                if plan.unnamed
                    && let Some(p) = Partial::unnamed(d.try_clone()?, mode)?
                {
                    return Ok(p);
                }
                Partial::reopen(d, &name, plan.offset, plan.record)?
                    .ok_or_else(|| std::io::Error::other("the partial file is in use or gone"))
            }),
        };
        let partial = match opened {
            Ok(p) => p,
            Err(e) => {
                // The body comes anyway (it was promised): take it off the wire and say why.
                skip_body(self.r, 0, size - plan.offset).map_err(|w| self.r.error("receiving a body", w))?;
                seen.received += size - plan.offset;
                self.bar.inc(size - plan.offset);
                let shown = escape(&entry.path.join("/"));
                let reason = bounded_reason(format!("{shown}: {e}"));
                return self.verdict_failed(&plan, Verdict::Failed { reason }, Error::io(shown, e));
            }
        };
        let mut received = 0u64;
        let hasher = plan.hasher.take().unwrap_or_else(|| Hasher::new(hash));
        self.r.set_min_rate(Some(MIN_RATE));
        let body = match split {
            None => receive_body(
                self.r,
                &partial,
                (size, plan.offset, hasher),
                &mut received,
                &mut self.reservation,
                &self.bar,
            ),
            Some(split) => {
                let name = escape(&entry.path.join("/"));
                self.receive_split(&partial, (size, plan.offset, hasher), split, &mut received, name)
            }
        };
        self.r.set_min_rate(None);
        seen.received += received;
        let at = plan.offset + received;
        let actual = match body {
            Ok(d) => d,
            Err(BodyError::Wire(e)) => {
                let err = self.r.error("receiving the body", e);
                let v = broken_verdict(&err, size, at);
                return Err(self.broken_off(&plan, partial, v, err));
            }
            Err(BodyError::Split(failure)) => {
                let (v, err) = *failure;
                return Err(self.broken_off(&plan, partial, v, err));
            }
            Err(BodyError::TooLong(len)) => {
                partial.discard();
                let v = Verdict::SizeMismatch { expected: size, received: at + u64::from(len) };
                let _ =
                    self.send(&Message::FileVerdict(FileVerdict { index: plan.index as u32, verdict: v }));
                return Err(Error::Integrity(format!(
                    "body longer than listed: a {len}-byte chunk at byte {at} of {size}"
                )));
            }
            Err(BodyError::Local(e, frame_left)) => {
                partial.discard();
                // The rest of this body is still on the wire: skip it to stay in step.
                skip_body(self.r, frame_left, size - at - frame_left)
                    .map_err(|w| self.r.error("receiving a body", w))?;
                seen.received += size - at;
                self.bar.inc(size - at);
                let reason = bounded_reason(format!("writing the file: {e}"));
                return self.verdict_failed(
                    &plan,
                    Verdict::Failed { reason },
                    Error::io("writing the received file", e),
                );
            }
        };
        // The digest may still be on its way: it is due by the end of the body.
        self.progress_at = std::time::Instant::now();
        let expected = match self.digest_of(plan.file_no, size) {
            Ok(d) => d,
            Err(e) => {
                if matches!(e, Error::Protocol { .. }) {
                    partial.discard();
                } else {
                    self.keep(plan.index, partial);
                }
                return Err(e);
            }
        };
        let Some(expected) = expected else {
            partial.discard();
            let reason = "the sender's file changed while it was being sent; nothing was stored";
            return self.verdict_failed(
                &plan,
                Verdict::Failed { reason: reason.into() },
                Error::Integrity(reason.into()),
            );
        };
        if actual != expected {
            partial.discard();
            return self.hash_mismatch(&plan, expected, actual);
        }
        let entry = &self.entries[plan.index];
        if let Err(e) = partial.set_attributes(entry.mode, entry.mtime) {
            partial.discard();
            let reason = bounded_reason(format!("storing the file: {e}"));
            return self.verdict_failed(
                &plan,
                Verdict::Failed { reason },
                Error::io("storing the received file", e),
            );
        }
        self.group.push(Pending { index: plan.index as u32, partial, name, size });
        // Verified: done on this side's bar (its sender counts it when the group is acknowledged).
        self.bar.file_done();
        Ok(())
    }

    /// A body broken off by `err`: the sender is told `v` (it may have closed only its writing
    /// half), and the partial is kept for a resume, unless the framing broke. Returns `err`.
    fn broken_off(&mut self, plan: &Plan, partial: Partial, v: Verdict, err: Error) -> Error {
        let _ = self.send(&Message::FileVerdict(FileVerdict { index: plan.index as u32, verdict: v }));
        if matches!(err, Error::Protocol { .. }) {
            partial.discard();
        } else {
            self.keep(plan.index, partial);
        }
        err
    }

    /// Receives a split body (`lanes`): parts on this connection until the sender's `SplitEnd`,
    /// parts on the lanes meanwhile, hashed in order behind them. On failure the partial keeps its
    /// contiguous prefix (cut there, its record's `upto` mark dropped) for a resume.
    fn receive_split(
        &mut self,
        partial: &Partial,
        (size, offset, hasher): (u64, u64, Hasher),
        split: Split,
        received: &mut u64,
        name: String,
    ) -> Result<Digest, BodyError> {
        let local = |what: &'static str, e: std::io::Error| {
            let reason = bounded_reason(format!("receiver: {what}: {e}"));
            BodyError::Split(Box::new((Verdict::Failed { reason }, Error::io(what, e))))
        };
        // A split the protocol does not allow: nothing was written for it yet.
        let refused = |err: Error| BodyError::Split(Box::new((broken_verdict(&err, size, offset), err)));
        if size - offset < crate::protocol::SPLIT_MIN {
            return Err(refused(self.malformed(format!(
                "a split of a {}-byte body (SPLIT_MIN is {})",
                size - offset,
                crate::protocol::SPLIT_MIN
            ))));
        }
        let file = partial.clone_file().map_err(|e| local("opening the partial again", e))?;
        let mark = partial.upto_mark().map_err(|e| local("opening the partial's record", e))?;
        if let Some(m) = &mark {
            m.mark(Some(offset)).map_err(|e| local("writing the partial's record", e))?;
        }
        let new = super::lanes::NewHub {
            index: split.index,
            name,
            session: split.session,
            secret: split.secret,
            lanes: split.lanes,
            ip: self.peer,
            file,
            range: (offset, size),
            bar: &self.bar,
        };
        let registered =
            super::lanes::register(&self.shared.lanes, new).map_err(|why| refused(self.malformed(why)))?;
        let hub = &registered.hub;
        let mut buf = vec![0u8; crate::transport::RECV_BUF];
        self.r.set_min_rate(None);
        // The split as a whole must move `MIN_RATE` over each window of the idle timeout: the main
        // connection may carry nothing but keepalives while its lanes work, but not forever.
        let idle = self.shared.opts.timeout;
        let mut window = (std::time::Instant::now(), 0u64);
        let mut consumed = 0u64;
        let (outcome, digest) = std::thread::scope(|scope| {
            let hashing = scope.spawn(|| hub.hash_behind(hasher, mark.as_ref()));
            let outcome = loop {
                let m = match self.r.message() {
                    Ok(m) => m,
                    Err(e) => break Err(self.r.error("receiving a split body", e)),
                };
                let stepped = match m {
                    Message::Part(part) => match hub.take_part(self.r, &part, &mut buf) {
                        Ok(_) => Ok(()),
                        Err(super::lanes::PartError::Wire(e)) => {
                            Err(self.r.error("receiving a split body", e))
                        }
                        Err(super::lanes::PartError::Local(e)) => {
                            Err(Error::io("writing the received file", e))
                        }
                        Err(super::lanes::PartError::Closed) => {
                            Err(self.malformed("the split has ended".into()))
                        }
                    },
                    // Keepalives while the lanes carry the last parts.
                    Message::Digests(p) if p.digests.is_empty() => Ok(()),
                    Message::SplitEnd(SplitEnd { index }) if index == split.index => {
                        break match hub.failure() {
                            Some(why) => Err(self.malformed(format!("the split failed: {why}"))),
                            None if hub.complete() => Ok(()),
                            None => Err(self.malformed(format!(
                                "the split ended with {} of {} bytes written",
                                hub.received.load(std::sync::atomic::Ordering::Relaxed),
                                size - offset
                            ))),
                        };
                    }
                    other => {
                        let source = ProtocolError::UnexpectedMessage {
                            expected: "a part or the split's end",
                            got: other.name(),
                        };
                        Err(Error::Protocol { peer: self.r.peer().to_string(), source })
                    }
                };
                // A lane's failure outranks what the main connection saw of it.
                if let Some(why) = hub.failure() {
                    break Err(self.malformed(format!("the split failed: {why}")));
                }
                if let Err(e) = stepped {
                    break Err(e);
                }
                // What is written shows in the file system now: no longer reserved.
                let now = hub.received.load(std::sync::atomic::Ordering::Relaxed);
                self.reservation.consume(now - consumed);
                consumed = now;
                if let Some(idle) = idle
                    && window.0.elapsed() >= idle
                {
                    if now - window.1 < MIN_RATE * idle.as_secs().max(1) {
                        break Err(Error::Timeout {
                            peer: self.r.peer().to_string(),
                            what: "moving a split body at the least rate",
                            limit: crate::transport::idle_limit(Some(idle)),
                        });
                    }
                    window = (std::time::Instant::now(), now);
                }
            };
            if outcome.is_err() {
                hub.close_and_settle();
            }
            (outcome, hashing.join().expect("hashing thread does not panic"))
        });
        *received = hub.received.load(std::sync::atomic::Ordering::Relaxed);
        self.reservation.consume(*received - consumed);
        let fail = |err: Error| {
            // Keep only what is whole, for a resume: the prefix without gaps (no lane writes any
            // more: the split is closed and settled).
            hub.close_and_settle();
            let upto = hub.contiguous();
            let _ = partial.truncate(upto);
            if let Some(m) = &mark {
                let _ = m.mark(Some(upto));
            }
            BodyError::Split(Box::new((broken_verdict(&err, size, upto), err)))
        };
        outcome.map_err(fail)?;
        match digest {
            Ok(Some(d)) => {
                if let Some(m) = &mark {
                    let _ = m.mark(None);
                }
                Ok(d)
            }
            Ok(None) => Err(fail(Error::Integrity("the split closed before it was hashed".into()))),
            Err(e) => Err(fail(Error::io("reading the received file back to hash it", e))),
        }
    }

    /// Receives a stream's body (see `body::receive_stream`), then its digest, and queues it like
    /// any verified file. Whatever goes wrong removes its partial: a stream cannot resume. A local
    /// failure (the disk is full) is told at once, then the rest of the stream is read and
    /// dropped, so the sender, which looks for a verdict while it streams, can stop early.
    fn stream(&mut self, mut plan: Plan, hash: HashAlg, seen: &mut Seen) -> Result<(), Error> {
        self.bodies += 1;
        let partial = plan.held.take().expect("a stream's partial is held from its answer");
        let mut received = 0u64;
        self.r.set_min_rate(Some(MIN_RATE));
        let body = receive_stream(
            self.r,
            &partial,
            Hasher::new(hash),
            &mut received,
            &mut self.reservation,
            &self.bar,
        );
        self.r.set_min_rate(None);
        seen.received += received;
        seen.size = Some(received);
        let actual = match body {
            Ok(d) => d,
            Err(BodyError::Local(e, frame_left)) => {
                partial.discard();
                let reason = bounded_reason(format!("storing the stream: {e}; nothing was stored"));
                let err = Error::io("storing the received stream", e);
                self.verdict_failed(&plan, Verdict::Failed { reason }, err)?;
                skip_stream(self.r, frame_left).map_err(|e| self.r.error("receiving the stream", e))?;
                // Its digest (or its absence) still comes: the sender ends the stream properly.
                return self.digest_of(plan.file_no, 0).map(drop);
            }
            Err(BodyError::Wire(e)) => {
                partial.discard();
                let err = self.r.error("receiving the stream", e);
                let reason = match &err {
                    Error::Auth(_) => format!(
                        "secure channel broken: what arrived for this stream did not authenticate ({err})"
                    ),
                    _ => format!("receiver: {err}; nothing was stored (a stream cannot resume)"),
                };
                let v = Verdict::Failed { reason: bounded_reason(reason) };
                let _ =
                    self.send(&Message::FileVerdict(FileVerdict { index: plan.index as u32, verdict: v }));
                return Err(Error::NotResumable(Box::new(err)));
            }
            Err(BodyError::TooLong(_) | BodyError::Split(..)) => {
                unreachable!("a stream has no size and no split")
            }
        };
        self.progress_at = std::time::Instant::now();
        let expected = match self.digest_of(plan.file_no, received) {
            Ok(Some(d)) => d,
            Ok(None) => {
                partial.discard();
                let reason = "the sender could not read its input to the end; nothing was stored";
                let e = Error::Integrity(reason.into());
                return self.verdict_failed(&plan, Verdict::Failed { reason: reason.into() }, e);
            }
            Err(e) => {
                partial.discard();
                return Err(e);
            }
        };
        if actual != expected {
            partial.discard();
            return self.hash_mismatch(&plan, expected, actual);
        }
        let entry = &self.entries[plan.index];
        let name = entry.path[entry.path.len() - 1].clone();
        if let Err(e) = partial.set_attributes(entry.mode, entry.mtime) {
            partial.discard();
            let reason = bounded_reason(format!("storing the stream: {e}"));
            let err = Error::io("storing the received stream", e);
            return self.verdict_failed(&plan, Verdict::Failed { reason }, err);
        }
        self.group.push(Pending { index: plan.index as u32, partial, name, size: received });
        Ok(())
    }

    /// The digest of file `n`, reading further `Digests` parts (and keepalives) if it has not
    /// come yet: nothing else may come between a body and its digest.
    pub(super) fn digest_of(&mut self, n: usize, size: u64) -> Result<Option<Digest>, Error> {
        while self.digests.len() <= n {
            let message = self.r.message().map_err(|e| self.r.error("waiting for the digest", e))?;
            self.note_progress(&message, size)?;
            match message {
                Message::Digests(part) => self.take_digests(part.first, part.digests)?,
                other => {
                    let source =
                        ProtocolError::UnexpectedMessage { expected: "the file's digest", got: other.name() };
                    return Err(Error::Protocol { peer: self.r.peer().to_string(), source });
                }
            }
        }
        Ok(self.digests[n])
    }

    /// Makes the verified files durable, renames and acknowledges them.
    pub(super) fn flush_group(&mut self) -> Result<(), Error> {
        if self.group.is_empty() {
            return Ok(());
        }
        self.flushed_at = std::time::Instant::now();
        let new_folders = self.answer_dirs.made || self.body_dirs.made;
        let stored =
            self.group.flush(&self.root, self.w, (&self.shared.opts, new_folders)).map_err(|e| match e {
                GroupError::Local(e) => Error::io("making received files durable", e),
                GroupError::Wire(e) => self.w.error("acknowledging files", e.into()),
            })?;
        for (_, outcome) in stored {
            match outcome {
                Ok(name) => {
                    self.verified += 1;
                    self.stored = Some((name, false));
                }
                Err(e) => {
                    self.failed += 1;
                    self.fail(Error::io("storing the received file", e));
                }
            }
        }
        Ok(())
    }

    /// After the transfer broke off: partials created while answering that never got a byte are
    /// removed (resumed ones keep their data for next time).
    pub(super) fn abandon_plans(&mut self) {
        let plans: Vec<Plan> = self.plans.drain(..).collect();
        for plan in plans {
            self.abandon(plan);
        }
    }

    /// A file answered `Send` whose body will not come: its partial goes if it is empty (this
    /// answer created it, or truncated another version's). A partial that holds bytes stays for
    /// a resume: resumed data, or one another transfer has written meanwhile.
    pub(super) fn abandon(&self, mut plan: Plan) {
        if plan.offset > 0 {
            return;
        }
        if let Some(p) = plan.held.take() {
            p.discard();
            return;
        }
        let path = &self.entries[plan.index].path;
        let (parent, name) = path.split_at(path.len() - 1);
        if let Ok(dir) = self.root.walk(parent, false) {
            let _ = store::remove_if_empty(&dir, &name[0]);
        }
    }

    /// Leaves the partial of entry `index` for a resume, noted against the peer's address: past
    /// its bounds, its oldest partials go (see `litter`).
    fn keep(&self, index: usize, partial: Partial) {
        let Some(left) = partial.keep() else { return };
        let path = &self.entries[index].path;
        let folder = path[..path.len() - 1].to_vec();
        self.shared.litter.left_behind(&self.root, self.peer, folder, left);
    }
}

/// The verdict for a body that `err` broke off with `at` of its `size` bytes in: only a body that
/// ended early is a size mismatch; a broken record says so; a timeout or broken framing is a
/// failure.
fn broken_verdict(err: &Error, size: u64, at: u64) -> Verdict {
    match err {
        Error::Connection { .. } => Verdict::SizeMismatch { expected: size, received: at },
        Error::Auth(_) => Verdict::Failed {
            reason: bounded_reason(format!(
                "secure channel broken: what arrived for this file did not authenticate ({err})"
            )),
        },
        _ => Verdict::Failed { reason: bounded_reason(format!("receiver: {err}")) },
    }
}
