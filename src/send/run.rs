//! The sending engine once the manifest is accepted: digests out as they are hashed, answers in,
//! one body at a time out (its digest right behind it if it was not sent before), verdicts in,
//! until every entry has its outcome.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::SendOpts;
use super::events::Event;
use super::handoff::{HANDOFF_WAIT, Handoff};
use super::report::{EntryOutcome, beside, verdict_result};
use super::walk::Item;
use crate::error::Error;
use crate::progress::{Bar, Progress};
use crate::protocol::{
    Answer, Digest, DigestsPart, Entry, EntryKind, FileVerdict, MAX_DIGESTS_PER_PART, Message, ProtocolError,
    Verdict,
};
use crate::transport::FrameWriter;

/// How long the main loop waits for news before it tells the receiver it is still hashing.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(1);
/// Files the receiver should know the digest of beyond those already sent: enough that answers
/// keep coming while bodies go out, without a message per digest.
pub(crate) const TELL_AHEAD: usize = 64;

/// The state of a send once the manifest is accepted.
pub(super) struct Run<'a> {
    pub(super) entries: &'a [Entry],
    pub(super) items: &'a [Item],
    pub(super) opts: &'a SendOpts,
    pub(super) progress: &'a Progress,
    pub(super) peer: String,
    pub(super) bar: &'a Bar,
    /// A spinner saying what the receiver is doing while this side waits for it.
    pub(super) status: Option<Bar>,
    /// Each file's digest once hashed, by entry index, and whether it came from the cache.
    pub(super) digests: Vec<Option<Digest>>,
    pub(super) cached: Vec<bool>,
    /// Digests from the hashing thread not yet sent, and how many files that thread has done.
    pub(super) unsent: Vec<Option<Digest>>,
    pub(super) hashed: usize,
    /// Files whose digest (or its absence) the receiver has been told.
    pub(super) told: usize,
    pub(super) answers: Vec<Answer>,
    /// Entries acted on (body sent, withdrawn, or outcome known from the answer), and how many of
    /// them were files.
    pub(super) acted: usize,
    pub(super) acted_files: usize,
    /// Entries whose body or withdrawal went out and whose verdict has not come.
    pub(super) owed: Vec<bool>,
    pub(super) owing: usize,
    pub(super) outcomes: Vec<Option<EntryOutcome>>,
    /// Resume offset of each entry answered `Send`.
    pub(super) offsets: Vec<u64>,
    /// Entry index of each file, by file number; file number of each entry.
    pub(super) file_entry: Vec<usize>,
    pub(super) entry_file: Vec<usize>,
    /// Local failures (hashing, reading) that outrank whatever the receiver says.
    pub(super) local: Vec<bool>,
    pub(super) sent: u64,
    pub(super) resumed: u64,
    pub(super) done: usize,
    /// The reader thread has stopped: nothing more will come from the receiver.
    pub(super) reader_done: bool,
    /// Why it stopped.
    pub(super) ended: Option<Error>,
    /// Since when the receiver has owed this side something without a word: the last time it
    /// said something, was given something to answer, or was excused (see [`Run::check_silence`]).
    pub(super) waiting_since: Instant,
    /// The word with the hashing thread about a large file kept for its body.
    pub(super) handoff: Arc<Handoff>,
    /// When the receiver last answered (or the engine started): since then it sits at the
    /// entry it answers next.
    pub(super) answered_at: Instant,
    /// Small files' bytes, read and checked by the hashing thread, by entry index, until their
    /// body goes out from them.
    pub(super) kept: Vec<Option<Vec<u8>>>,
    /// Lanes that carried parts of split bodies to their end (`--streams`).
    pub(super) lanes_joined: usize,
    /// How long the TCP connect took (about one round trip), for `--streams auto`.
    pub(super) rtt: Duration,
}

impl<'a> Run<'a> {
    pub fn new(
        (entries, items): (&'a [Entry], &'a [Item]),
        (opts, progress): (&'a SendOpts, &'a Progress),
        bar: &'a Bar,
        (peer, handoff): (&str, Arc<Handoff>),
    ) -> Run<'a> {
        let mut file_entry = Vec::new();
        let mut entry_file = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            entry_file.push(file_entry.len());
            if matches!(e.kind, EntryKind::File { .. }) {
                file_entry.push(i);
            }
        }
        let n = entries.len();
        Run {
            entries,
            items,
            opts,
            progress,
            peer: peer.to_string(),
            bar,
            status: None,
            digests: vec![None; n],
            cached: vec![false; n],
            unsent: Vec::new(),
            hashed: 0,
            told: 0,
            answers: Vec::with_capacity(n),
            acted: 0,
            acted_files: 0,
            owed: vec![false; n],
            owing: 0,
            outcomes: (0..n).map(|_| None).collect(),
            offsets: vec![0; n],
            file_entry,
            entry_file,
            local: vec![false; n],
            sent: 0,
            resumed: 0,
            done: 0,
            reader_done: false,
            ended: None,
            waiting_since: Instant::now(),
            handoff,
            answered_at: Instant::now(),
            kept: vec![None; n],
            lanes_joined: 0,
            rtt: Duration::ZERO,
        }
    }

    pub fn files(&self) -> usize {
        self.file_entry.len()
    }

    pub(super) fn protocol(&self, what: String) -> Error {
        Error::Protocol { peer: self.peer.clone(), source: ProtocolError::Malformed(what) }
    }

    /// The main loop. Returns what broke the connection, if anything.
    pub fn drive(&mut self, inbox: &mpsc::Receiver<Event>, w: &mut FrameWriter) -> Option<Error> {
        loop {
            if self.acted == self.entries.len() && self.owing == 0 {
                return None;
            }
            let work = self.acted < self.answers.len() || self.should_tell();
            let mut event = if work {
                inbox.try_recv().ok()
            } else {
                // The receiver has stopped talking and nothing it already said is left to act on.
                if let Some(e) = self.ended.take() {
                    return Some(e);
                }
                // Blocking only when there is nothing to write: flush first, so the receiver has it.
                if let Err(e) = w.flush() {
                    return Some(w.error("sending", e.into()));
                }
                match self.wait(inbox, w) {
                    Ok(Some(e)) => Some(e),
                    Ok(None) => continue,
                    Err(e) => return Some(e),
                }
            };
            // Everything that is already here, so digests and answers travel in batches.
            while let Some(e) = event {
                if let Err(cause) = self.take(e) {
                    return Some(cause);
                }
                event = inbox.try_recv().ok();
            }
            if self.should_tell()
                && let Err(e) = self.tell(w)
            {
                return Some(e);
            }
            // One answered entry acted on per turn, so digests keep flowing between bodies.
            if self.acted < self.answers.len() {
                if let Err(e) = self.act(inbox, w) {
                    return Some(e);
                }
                self.waiting_since = Instant::now();
            }
        }
    }

    /// Waits up to [`KEEPALIVE`] for an event; while this side is still hashing, tells the
    /// receiver so with an empty `Digests` part when none comes. Each time, first checks that the
    /// receiver has not been silent too long (so at least every [`KEEPALIVE`]).
    pub(super) fn wait(
        &mut self,
        inbox: &mpsc::Receiver<Event>,
        w: &mut FrameWriter,
    ) -> Result<Option<Event>, Error> {
        self.check_silence(Instant::now())?;
        let still_hashing = self.hashed < self.file_entry.len();
        let handoff = self.handoff_due();
        if handoff == Some(Duration::ZERO) {
            self.handoff.give_up();
        }
        let limit = handoff.filter(|d| !d.is_zero()).map_or(KEEPALIVE, |d| d.min(KEEPALIVE));
        match inbox.recv_timeout(limit) {
            Ok(e) => Ok(Some(e)),
            // Time to look at the handoff again; a keepalive is not due yet.
            Err(mpsc::RecvTimeoutError::Timeout) if limit < KEEPALIVE => Ok(None),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.show_wait();
                if still_hashing {
                    let keepalive = DigestsPart { first: self.told as u32, digests: Vec::new() };
                    w.message(&Message::Digests(keepalive))
                        .and_then(|()| w.flush())
                        .map_err(|e| w.error("sending", e.into()))?;
                }
                Ok(None)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                Err(w.error("waiting for answers", eof.into()))
            }
        }
    }

    /// How long the hashing thread's wait at a file kept for its body may still last, when the
    /// receiver is at that file and has not answered it: zero when it has waited long enough
    /// (the receiver is taken to be waiting for the digest; see `handoff`).
    fn handoff_due(&self) -> Option<Duration> {
        let (n, since) = self.handoff.waiting()?;
        let at = *self.file_entry.get(n)?;
        if at != self.answers.len() {
            return None;
        }
        let waited = since.elapsed().min(self.answered_at.elapsed());
        Some(HANDOFF_WAIT.saturating_sub(waited))
    }

    /// After a second without news: says what the receiver is busy with when this side has
    /// nothing to do but wait for it. Owing the next answer while it has what it needs, it is
    /// checking a copy it holds (an identical file, or a partial's start, re-hashed); owing
    /// verdicts once every body went out, it is verifying and syncing what it received.
    fn show_wait(&mut self) {
        let next = self.answers.len();
        let what = if next < self.entries.len() && self.acted == next && !self.receiver_waits_for_a_digest() {
            let name = crate::sanitize::escape(&self.entries[next].path.join("/"));
            format!("the receiver is checking its copy of \"{name}\"")
        } else if self.acted == self.entries.len() && self.owing > 0 {
            "waiting for the receiver to verify and store what it received".to_string()
        } else {
            return self.end_wait();
        };
        match &self.status {
            Some(s) => s.set_message(what),
            None => self.status = Some(self.progress.spinner(&what)),
        }
    }

    /// The receiver spoke: the spinner goes.
    pub(super) fn end_wait(&mut self) {
        if let Some(s) = self.status.take() {
            s.finish_and_clear();
        }
    }

    /// Whether to send the digests held back now: when the receiver is running short of files
    /// it can answer, when enough have gathered, or when hashing is over. Holding them a little
    /// while bodies go out turns 10,000 digests into a few messages instead of 10,000.
    fn should_tell(&self) -> bool {
        let ahead = self.told - self.acted_files.min(self.told);
        !self.unsent.is_empty()
            && (ahead < TELL_AHEAD
                || self.unsent.len() >= MAX_DIGESTS_PER_PART
                || self.hashed == self.file_entry.len())
    }

    /// Whether the receiver may be waiting for a digest this side has not sent: to answer the
    /// next entry (it may need the digest to compare with a file it has), or to give the verdict
    /// on a body sent before its digest (only the entry being acted on can be one: `act` sends
    /// the digest before it returns). It owes nothing meanwhile: a large file can take longer to
    /// hash than the idle timeout.
    fn receiver_waits_for_a_digest(&self) -> bool {
        let untold = |i: usize| {
            matches!(self.entries[i].kind, EntryKind::File { .. }) && self.entry_file[i] >= self.told
        };
        let next = self.answers.len();
        let current = self.acted.checked_sub(1);
        (next < self.entries.len() && untold(next)) || current.is_some_and(|i| self.owed[i] && untold(i))
    }

    /// The receiver owes an answer or a verdict and is waiting for nothing from this side: it
    /// has `--timeout` from when it last said something or was last given something to answer.
    /// While it waits for a digest this side is still computing, its silence is excused (and its
    /// time starts again once the digest is sent).
    fn check_silence(&mut self, now: Instant) -> Result<(), Error> {
        let owes = self.answers.len() < self.entries.len() || self.owing > 0;
        if !owes || self.receiver_waits_for_a_digest() {
            self.waiting_since = now;
            return Ok(());
        }
        let Some(limit) = self.opts.timeout else { return Ok(()) };
        if now.saturating_duration_since(self.waiting_since) < limit {
            return Ok(());
        }
        let what = if self.answers.len() == self.entries.len() {
            "waiting for the verdict"
        } else {
            "waiting for answers"
        };
        Err(Error::Timeout {
            peer: self.peer.clone(),
            what,
            limit: crate::transport::idle_limit(self.opts.timeout),
        })
    }

    /// Sends every digest held back.
    pub(super) fn tell(&mut self, w: &mut FrameWriter) -> Result<(), Error> {
        // A receiver that was waiting for one of these has its full time from now.
        if self.receiver_waits_for_a_digest() {
            self.waiting_since = Instant::now();
        }
        for chunk in std::mem::take(&mut self.unsent).chunks(MAX_DIGESTS_PER_PART) {
            let part = DigestsPart { first: self.told as u32, digests: chunk.to_vec() };
            w.message(&Message::Digests(part)).map_err(|e| w.error("sending digests", e.into()))?;
            self.told += chunk.len();
        }
        Ok(())
    }

    /// Takes one event from the hashing or reader thread; an error ends the transfer.
    pub(super) fn take(&mut self, event: Event) -> Result<(), Error> {
        match event {
            Event::Hashed(n, digest, kept) => {
                debug_assert_eq!(n, self.hashed);
                self.hashed += 1;
                let i = self.file_entry[n];
                self.kept[i] = kept;
                // Acted on already (its body read from the file): its bytes are not needed. (The
                // entry being acted on may be waiting for them; it drops them when done.)
                if i + 1 < self.acted {
                    self.drop_kept(i);
                }
                match digest {
                    Ok((d, cached)) => {
                        self.digests[i] = Some(d);
                        self.cached[i] = cached;
                        self.unsent.push(Some(d));
                    }
                    Err(e) => {
                        self.local[i] = true;
                        self.outcomes[i] = Some(EntryOutcome::Failed(e));
                        self.unsent.push(None);
                    }
                }
                Ok(())
            }
            Event::Answers(part) => {
                self.end_wait();
                self.waiting_since = Instant::now();
                self.take_answers(part.answers)
            }
            Event::Verdict(v) => {
                self.end_wait();
                self.waiting_since = Instant::now();
                self.take_verdict(v)
            }
            // Acted on once what came before it is: a receiver that answered everything and
            // hung up has still answered everything.
            Event::Broken(e) => {
                self.reader_done = true;
                self.ended = Some(e);
                Ok(())
            }
        }
    }

    /// Takes answers for the next entries, checking the receiver could have given them.
    fn take_answers(&mut self, answers: Vec<Answer>) -> Result<(), Error> {
        // Only the acceptance is empty: an empty part later says nothing and could go on forever.
        if answers.is_empty() {
            return Err(self.protocol("an empty answers part after the manifest was accepted".into()));
        }
        for a in answers {
            let i = self.answers.len();
            let Some(entry) = self.entries.get(i) else {
                return Err(self.protocol(format!("more answers than the {} entries", self.entries.len())));
            };
            match (&a, &entry.kind) {
                (Answer::Send { offset }, EntryKind::File { size, .. }) if offset > size => {
                    return Err(self.protocol(format!(
                        "receiver asked to resume at byte {offset} of a {size}-byte file"
                    )));
                }
                (Answer::Send { offset }, EntryKind::Dir) if *offset > 0 => {
                    return Err(
                        self.protocol(format!("receiver asked to resume folder entry {i} at byte {offset}"))
                    );
                }
                // Only a receiver that has the digest can know it has the content.
                (Answer::Have { .. }, EntryKind::File { .. }) if self.entry_file[i] >= self.told => {
                    return Err(self
                        .protocol(format!("receiver claims to have entry {i} before its digest was sent")));
                }
                _ => {}
            }
            self.answers.push(a);
        }
        self.answered_at = Instant::now();
        Ok(())
    }

    fn take_verdict(&mut self, v: FileVerdict) -> Result<(), Error> {
        let i = v.index as usize;
        if !self.owed.get(i).copied().unwrap_or(false) {
            return Err(self.protocol(format!("verdict for entry {i}, which was not sent")));
        }
        // Only a receiver that has the digest can have verified the file (or found it differs).
        let needs_digest = matches!(v.verdict, Verdict::Verified { .. } | Verdict::HashMismatch { .. });
        if needs_digest && self.entry_file[i] >= self.told {
            return Err(self.protocol(format!("verdict for entry {i} before its digest was sent")));
        }
        self.owed[i] = false;
        self.owing -= 1;
        self.bar.file_done();
        if self.local[i] {
            return Ok(());
        }
        let path = &self.entries[i].path;
        self.outcomes[i] = Some(match verdict_result(v.verdict, &path.join("/"), self.digests[i].as_ref()) {
            // The receiver names the file it stored in its folder (maybe `name (1).ext`).
            Ok(stored) => EntryOutcome::Verified(beside(path, &stored)),
            Err(e) => EntryOutcome::Failed(e),
        });
        Ok(())
    }

    /// After the connection broke on our side: collect the verdicts the receiver still sends,
    /// for at most `for_at_most` (none but those already here when the receiver has stopped).
    pub fn drain(&mut self, inbox: &mpsc::Receiver<Event>, for_at_most: Duration) {
        let until = Instant::now() + for_at_most;
        while self.owing > 0 && !self.reader_done {
            let left = until.saturating_duration_since(Instant::now());
            let event = if left.is_zero() { inbox.try_recv().ok() } else { inbox.recv_timeout(left).ok() };
            match event {
                Some(Event::Verdict(v)) => {
                    if self.take_verdict(v).is_err() {
                        self.reader_done = true;
                    }
                }
                Some(Event::Broken(_)) | None => self.reader_done = true,
                Some(_) => {}
            }
        }
    }
}
