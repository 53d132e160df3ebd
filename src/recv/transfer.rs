//! The receiving engine: one accepted manifest, from the first answer to the last verdict.
//!
//! Entries are answered strictly in manifest order, each as soon as it can be (see `answer`);
//! bodies come in the same order for the files answered "send"; each body is written to its
//! partial and hashed as it arrives (`body`), checked against the file's digest (which the sender
//! sends by the end of the body at the latest), and the file joins the group being made durable
//! (`durable`); its verdict goes out once the group is on disk. A failed file fails alone; a
//! broken connection ends the transfer after acknowledging what was verified.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::answer::{Dirs, Plan, Rules, answer_dir, answer_file, answer_stream};
use super::durable::Group;
use super::manifest::{Checked, Refused, Summary};
use super::{Shared, Stored};
use crate::error::Error;
use crate::protocol::{
    Answer, AnswersPart, Body, Digest, Entry, EntryKind, MAX_MESSAGE_LEN, Message, ProtocolError, RejectCode,
    Split, Withdraw, bounded_reason, encode_message,
};
use crate::sanitize::escape;
use crate::store::{Reservation, Room, SafeDir};
use crate::transport::{FrameReader, FrameWriter};

/// Resumed partials kept locked from their answer to their body, so nothing can change them in
/// between; past this many, further partials are answered from offset 0.
pub(crate) const MAX_HELD: usize = 64;
/// The slowest hashing a receiver waits for: a sender's keepalives for a file's digest are
/// accepted for the idle timeout plus the file's size at this rate, in bytes a second.
pub(crate) const MIN_HASH_RATE: u64 = 1 << 20;
/// Keepalives make the receiver flush its group of verified files at most this often.
pub(crate) const KEEPALIVE_FLUSH: Duration = Duration::from_secs(1);
/// An answers part goes out at least this often, so the sender's idle timeout is fed.
pub(crate) const ANSWER_FLUSH: Duration = Duration::from_secs(1);

/// What is known about a transfer so far, for its log line.
#[derive(Default)]
pub(super) struct Seen {
    /// The file's name for a single file, a summary for several.
    pub name: Option<String>,
    pub size: Option<u64>,
    /// Offset the body resumed from (single files).
    pub resumed: u64,
    /// Body bytes received on this connection.
    pub received: u64,
    /// A lane of a split body, not a transfer.
    pub lane: bool,
    /// `--once`: this connection is the one transfer.
    pub claimed: bool,
}

/// One transfer in progress.
pub(super) struct Transfer<'a> {
    pub(super) shared: &'a Shared,
    pub(super) r: &'a mut FrameReader,
    pub(super) w: &'a mut FrameWriter,
    pub(super) entries: Vec<Entry>,
    pub(super) summary: Summary,
    /// Entries the target's file system refuses alone: answered `Reject { InvalidName }`.
    pub(super) refused: Refused,
    pub(super) root: SafeDir,
    pub(super) reservation: Reservation<'a>,
    /// By entry: files the acceptance did not reserve room for (see `answer::Needed`).
    pub(super) uncounted: Vec<bool>,
    /// The peer's address as its share is counted (see `peer_key`), for the partials it leaves.
    pub(super) peer: IpAddr,
    /// One entry, a file: its failure is reported as itself, not as a batch summary.
    pub(super) single: bool,
    /// Digests received, by file number (`None`: the sender could not read that file).
    pub(super) digests: Vec<Option<Digest>>,
    /// Next entry to answer, and how many files came before it.
    pub(super) cursor: usize,
    pub(super) file_no: usize,
    /// The entry at `cursor` needs its digest before it can be answered.
    pub(super) waiting_for_digest: bool,
    /// When the sender last sent something other than a keepalive.
    pub(super) progress_at: Instant,
    /// When the group was last flushed.
    pub(super) flushed_at: Instant,
    pub(super) answer_dirs: Dirs,
    pub(super) body_dirs: Dirs,
    /// Files answered `Send` whose body has not come yet, in order.
    pub(super) plans: VecDeque<Plan>,
    pub(super) held: usize,
    pub(super) created_dirs: Vec<usize>,
    pub(super) group: Group,
    pub(super) verified: usize,
    pub(super) there: usize,
    pub(super) failed: usize,
    pub(super) bodies: usize,
    /// The first failure of a file, as the error a single-file transfer reports.
    pub(super) first_failure: Option<Error>,
    /// For a single file: what the log line says.
    pub(super) stored: Option<(String, bool)>,
    pub(super) bar: crate::progress::Bar,
}

impl<'a> Transfer<'a> {
    pub fn new(
        shared: &'a Shared,
        (r, w): (&'a mut FrameReader, &'a mut FrameWriter),
        (peer, entries, Checked { summary, refused }): (IpAddr, Vec<Entry>, Checked),
        root: SafeDir,
        (reservation, uncounted): (Reservation<'a>, Vec<bool>),
    ) -> Result<Transfer<'a>, Error> {
        let single = super::manifest::is_single(&entries);
        let (label, files) =
            if single { (entries[0].path.join("/"), None) } else { (String::new(), Some(summary.files)) };
        let bar = shared.progress.bytes("receiving", &label, summary.total_bytes, files);
        let dirs = || Dirs::new(&root).map_err(|e| Error::io("opening the target folder", e));
        Ok(Transfer {
            answer_dirs: dirs()?,
            body_dirs: dirs()?,
            shared,
            r,
            w,
            entries,
            summary,
            refused,
            root,
            reservation,
            uncounted,
            peer,
            single,
            digests: Vec::new(),
            cursor: 0,
            file_no: 0,
            waiting_for_digest: false,
            progress_at: Instant::now(),
            // The first keepalive may flush at once.
            flushed_at: Instant::now().checked_sub(KEEPALIVE_FLUSH).unwrap_or_else(Instant::now),
            plans: VecDeque::new(),
            held: 0,
            created_dirs: Vec::new(),
            group: Group::default(),
            verified: 0,
            there: 0,
            failed: 0,
            bodies: 0,
            first_failure: None,
            stored: None,
            bar,
        })
    }

    /// Answers, bodies and verdicts until every entry has its outcome.
    pub fn run(mut self, seen: &mut Seen) -> Result<Stored, Error> {
        let outcome = self.exchange(seen);
        self.bar.finish_and_clear();
        if let Err(e) = outcome {
            // What was verified is acknowledged; partials that never got a byte go.
            let _ = self.flush_group();
            self.abandon_plans();
            return Err(e);
        }
        self.flush_group()?;
        // Folders last, deepest first: writing files into them changed their mtimes.
        for &index in self.created_dirs.iter().rev() {
            let e = &self.entries[index];
            if let Ok(d) = self.root.walk(&e.path, false) {
                let _ = d.set_mode_and_mtime(e.mode, e.mtime);
            }
        }
        if !self.created_dirs.is_empty() {
            let _ = self.root.sync_filesystem();
        }
        if self.single {
            return match (self.first_failure.take(), self.stored.take()) {
                (Some(e), _) => Err(e),
                (None, Some((name, already_had))) => Ok(Stored { name, already_had, batch: false }),
                (None, None) => Err(Error::Integrity("the file has no outcome".into())),
            };
        }
        let s = &self.summary;
        let count = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
        let name = format!(
            "{}, {}: {} received, {} already there, {} failed",
            count(s.files, "file"),
            count(s.dirs, "folder"),
            self.verified,
            self.there,
            self.failed
        );
        if self.failed > 0 {
            return Err(Error::Integrity(name));
        }
        Ok(Stored { name, already_had: self.bodies == 0, batch: true })
    }

    fn exchange(&mut self, seen: &mut Seen) -> Result<(), Error> {
        loop {
            self.answer_what_can_be()?;
            if self.cursor == self.entries.len() && self.plans.is_empty() {
                return Ok(());
            }
            let message = self.r.message().map_err(|e| self.r.error("reading the transfer", e))?;
            // Keepalives while the sender hashes the file whose digest the answer waits for.
            let hashing = if self.waiting_for_digest { self.entries[self.cursor].size() } else { 0 };
            self.note_progress(&message, hashing)?;
            match message {
                Message::Digests(part) => {
                    // An empty part: the sender is still hashing. A good moment to acknowledge
                    // what is verified, rather than keep it waiting for a group not coming soon;
                    // at most once per KEEPALIVE_FLUSH, so keepalives cannot force a file
                    // system flush per message.
                    if part.digests.is_empty() && self.flushed_at.elapsed() >= KEEPALIVE_FLUSH {
                        self.flush_group()?;
                    }
                    self.take_digests(part.first, part.digests)?;
                }
                Message::Body(Body { index })
                | Message::Withdraw(Withdraw { index, .. })
                | Message::Split(Split { index, .. })
                    if self.plans.front().is_some_and(|p| p.index == index as usize) =>
                {
                    let plan = self.plans.pop_front().expect("just checked");
                    self.held -= usize::from(plan.held.is_some());
                    // A body that will fill the group anyway must not hold back the verdicts of
                    // the files before it while it arrives (a large file after small ones).
                    if self.group.would_fill(self.entries[plan.index].size() - plan.offset) {
                        self.flush_group()?;
                    }
                    match message {
                        Message::Withdraw(w) => self.withdrawn(plan, w.reason)?,
                        Message::Split(split) => self.body(plan, Some(split), seen)?,
                        _ => self.body(plan, None, seen)?,
                    }
                    if self.group.is_full() {
                        self.flush_group()?;
                    }
                }
                Message::Body(Body { index })
                | Message::Withdraw(Withdraw { index, .. })
                | Message::Split(Split { index, .. }) => {
                    let due = self.plans.front().map_or("none".to_string(), |p| p.index.to_string());
                    return Err(self.malformed(format!("body of entry {index} when entry {due} is due")));
                }
                other => {
                    let source =
                        ProtocolError::UnexpectedMessage { expected: "digests or a body", got: other.name() };
                    return Err(Error::Protocol { peer: self.r.peer().to_string(), source });
                }
            }
        }
    }

    /// Keeps the progress clock: any message but a keepalive (an empty `Digests` part) is
    /// progress. Keepalives alone are accepted for the idle timeout, plus the time a sender
    /// hashing at [`MIN_HASH_RATE`] needs for the `hashing` bytes whose digest is awaited; past
    /// that the transfer ends, so keepalives cannot hold a slot forever.
    pub(super) fn note_progress(&mut self, message: &Message, hashing: u64) -> Result<(), Error> {
        if !matches!(message, Message::Digests(p) if p.digests.is_empty()) {
            self.progress_at = Instant::now();
            return Ok(());
        }
        let Some(idle) = self.shared.opts.timeout else { return Ok(()) };
        let allowed = idle + Duration::from_secs(hashing / MIN_HASH_RATE);
        if self.progress_at.elapsed() > allowed {
            return Err(Error::Timeout {
                peer: self.r.peer().to_string(),
                what: "sending nothing but keepalives",
                limit: crate::transport::idle_limit(self.shared.opts.timeout),
            });
        }
        Ok(())
    }

    pub(super) fn malformed(&self, what: String) -> Error {
        Error::Protocol { peer: self.r.peer().to_string(), source: ProtocolError::Malformed(what) }
    }

    /// Digests for files `first..`: they must continue where the last part stopped.
    pub(super) fn take_digests(&mut self, first: u32, digests: Vec<Option<Digest>>) -> Result<(), Error> {
        let known = self.digests.len();
        if first as usize != known
            || digests.len() > self.summary.files - known
            || digests.len() > crate::protocol::MAX_DIGESTS_PER_PART
        {
            return Err(self.malformed(format!(
                "digests for files {first}..{} when {known} of {} are known",
                first as usize + digests.len(),
                self.summary.files
            )));
        }
        self.digests.extend(digests);
        Ok(())
    }

    /// Answers entries in order until one needs a digest that has not come, sending the answers
    /// in parts cut by size and by time.
    fn answer_what_can_be(&mut self) -> Result<(), Error> {
        // The next entry was found to need its digest: nothing to do until it comes.
        if self.waiting_for_digest && self.digests.len() <= self.file_no {
            return Ok(());
        }
        self.waiting_for_digest = false;
        let opts = &self.shared.opts;
        let compare_for = opts.timeout.map_or(Duration::from_secs(60), |t| t / 2);
        let mut part = Vec::new();
        let mut part_len = 0;
        let mut last_flush = Instant::now();
        while self.cursor < self.entries.len() {
            let index = self.cursor;
            let entry = &self.entries[index];
            let rules = Rules {
                overwrite: opts.overwrite,
                until: Instant::now() + compare_for,
                hold: self.held < MAX_HELD,
                single: self.single,
                fresh: opts.output == Some(super::Output::Stdout),
                progress: &self.shared.progress,
            };
            let is_file = entry.has_body();
            // A name this file system cannot hold, or would merge with another's: refused alone,
            // before anything else is looked at (no digest is needed for it).
            let refused = self.refused.get(index);
            let answered = match (refused, &entry.kind, self.digests.get(self.file_no)) {
                (Some(refusal), _, _) => {
                    let reason = bounded_reason(refusal.reason(&self.entries, index));
                    Ok(Some((Answer::Reject { code: RejectCode::InvalidName, reason }, None)))
                }
                (None, EntryKind::File { .. }, Some(None)) => {
                    let reason = "not sent: the sender could not read it".to_string();
                    Ok(Some((Answer::Reject { code: RejectCode::Failed, reason }, None)))
                }
                (None, EntryKind::File { .. }, digest) => answer_file(
                    &mut self.answer_dirs,
                    (index, self.file_no, entry),
                    digest.map(|d| d.as_ref().expect("matched above")),
                    &rules,
                    self.uncounted[index].then_some(&mut self.reservation),
                ),
                (None, EntryKind::Dir, _) => {
                    answer_dir(&mut self.answer_dirs, entry).map(|a| Some((a, None)))
                }
                (None, EntryKind::Stream { .. }, _) => {
                    answer_stream(&mut self.answer_dirs, (index, self.file_no, entry))
                }
            };
            let mut failure = None;
            let (answer, plan) = match answered {
                Ok(Some(a)) => a,
                // Needs its digest: what is answered goes out now, the rest waits.
                Ok(None) => {
                    self.waiting_for_digest = true;
                    break;
                }
                Err(e) => {
                    let shown = escape(&entry.path.join("/"));
                    let reason = bounded_reason(format!("{shown}: {e}"));
                    failure = Some(Error::io(shown, e));
                    (Answer::Reject { code: RejectCode::Failed, reason }, None)
                }
            };
            match (&answer, plan) {
                (Answer::Send { offset }, Some(p)) => {
                    self.held += usize::from(p.held.is_some());
                    // Already here from an earlier transfer: done, but not moved now.
                    self.bar.skip(*offset);
                    self.plans.push_back(p);
                }
                (Answer::Send { .. }, None) => {
                    // A new folder: its block and inode now show as used in the file system.
                    self.reservation.release(Room::entry(self.reservation.block()));
                    self.created_dirs.push(index);
                }
                (Answer::Reject { code, reason }, _) => {
                    self.failed += 1;
                    if is_file {
                        self.bar.skip(entry.size());
                        self.bar.file_done();
                    }
                    let name = escape(&entry.path.join("/"));
                    failure.get_or_insert(Error::Rejected { name, code: *code, reason: reason.clone() });
                }
                (Answer::Have { name }, _) if is_file => {
                    self.there += 1;
                    self.bar.skip(entry.size());
                    self.bar.file_done();
                    self.stored = Some((name.clone(), true));
                }
                _ => {}
            }
            if let Some(e) = failure {
                self.fail(e);
            }
            self.cursor += 1;
            self.file_no += usize::from(is_file);
            part_len +=
                encode_message(&Message::Answers(AnswersPart { answers: vec![answer.clone()], last: false }))
                    .len();
            part.push(answer);
            if part_len > MAX_MESSAGE_LEN as usize / 2 || last_flush.elapsed() > ANSWER_FLUSH {
                self.send_answers(std::mem::take(&mut part))?;
                part_len = 0;
                last_flush = Instant::now();
            }
        }
        if !part.is_empty() {
            self.send_answers(part)?;
        }
        Ok(())
    }

    fn send_answers(&mut self, answers: Vec<Answer>) -> Result<(), Error> {
        let last = self.cursor == self.entries.len();
        self.send(&Message::Answers(AnswersPart { answers, last }))
    }

    pub(super) fn send(&mut self, m: &Message) -> Result<(), Error> {
        self.w.message(m).and_then(|()| self.w.flush()).map_err(|e| self.w.error("answering", e.into()))
    }

    /// Records a file's failure (the first one is what a single-file transfer reports).
    pub(super) fn fail(&mut self, e: Error) {
        self.first_failure.get_or_insert(e);
    }
}
