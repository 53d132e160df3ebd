//! The sending side of a batch. The tree is walked and its manifest sent at once; a hashing
//! thread reports digests as it goes, a reader thread reports the receiver's answers and
//! verdicts, and the main loop sends digests as they come and each answered body in turn: while
//! file k is on the wire, file k+1 is being hashed.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use crate::cache::{DigestCache, Stamp};
use crate::error::{Error, Exit, Limit, is_timeout};
use crate::progress::Progress;
use crate::protocol::{
    self, Answer, AnswersPart, Body, Digest, DigestsPart, Entry, EntryKind, FileVerdict, HashAlg,
    MAX_DIGESTS_PER_PART, MAX_MESSAGE_LEN, ManifestPart, Message, Reply, WireError, Withdraw, bounded_reason,
    read_message, write_message,
};
use crate::sanitize::{escape, peer_text};
use crate::send::{SOCKET_BUF, SendOpts, digest_of, open_connection, send_body, unexpected, verdict_result};
use crate::tree::{Item, walk};

/// What happened to one entry.
#[derive(Debug)]
pub enum EntryOutcome {
    /// Stored under this path (the receiver may have chosen a keep-both name).
    Verified(String),
    /// The same content is already there under this path (its own, or a keep-both copy).
    AlreadyThere(String),
    Failed(Error),
}

/// The result of a batch: per-entry outcomes in manifest order, and totals.
#[derive(Debug)]
pub struct BatchReport {
    /// Display path and outcome of every file and folder sent or checked.
    pub entries: Vec<(String, bool, EntryOutcome)>,
    pub skipped: Vec<(PathBuf, String)>,
    pub files: usize,
    pub bytes: u64,
    /// Body bytes actually sent (less than `bytes` when files were already there or resumed).
    pub sent: u64,
    /// Bytes the receiver already held from interrupted transfers, summed over resumed files.
    pub resumed: u64,
    pub elapsed: Duration,
}

impl BatchReport {
    /// The exit code of the worst failure, if any failed.
    pub fn worst(&self) -> Option<&Error> {
        let rank = |e: &Error| match e.exit() {
            Exit::Protocol => 0,
            Exit::Integrity => 1,
            Exit::Connection => 2,
            Exit::Rejected => 3,
            _ => 4,
        };
        self.entries
            .iter()
            .filter_map(|(_, _, o)| if let EntryOutcome::Failed(e) = o { Some(e) } else { None })
            .min_by_key(|e| rank(e))
    }
}

/// Sends `opts.paths` (files and folders) as one batch.
pub fn send_batch(opts: &SendOpts, progress: &Progress) -> Result<BatchReport, Error> {
    let start = Instant::now();
    let walked = walk(&opts.paths, opts.follow)?;
    for (p, why) in &walked.skipped {
        progress.line(&format!("xfer: skipping {}: {why}", escape(&p.display().to_string())), false);
    }
    for (p, why) in &walked.refused {
        progress.line(&format!("xfer: cannot send {}: {why}", escape(&p.display().to_string())), true);
    }
    let items = walked.items;
    let files = items.iter().filter(|i| i.file.is_some()).count();
    let bytes: u64 = items.iter().filter_map(|i| i.file.map(|s| s.size)).sum();
    if items.is_empty() {
        return Err(Error::Usage("nothing to send (everything given was skipped)".into()));
    }
    let entries: Vec<Entry> = items
        .iter()
        .map(|item| Entry {
            path: item.path.clone(),
            kind: match item.file {
                None => EntryKind::Dir,
                Some(stamp) => EntryKind::File { size: stamp.size, hash: opts.hash },
            },
            mode: item.mode,
            mtime: item.mtime,
        })
        .collect();

    // Hashing starts at once, on its own thread, while we connect and the receiver validates the
    // manifest; its digests go out as they come, between bodies.
    let (events, inbox) = mpsc::channel();
    let hashing_bar = progress.bytes("hashing", &format!("0/{files} files"), bytes);
    let hashing = spawn_hashing(&items, (opts.cache, opts.hash), hashing_bar.clone(), events.clone());

    let (stream, peer, limit) = open_connection(opts)?;
    let wire = |what: &'static str| {
        let peer = peer.clone();
        move |e: WireError| Error::wire(&peer, what, limit, e)
    };
    let mut reader = BufReader::new(&stream);
    let mut writer = BufWriter::with_capacity(SOCKET_BUF, &stream);
    let greet = (|| {
        protocol::write_hello(&mut writer)?;
        write_manifest(&mut writer, &entries)?;
        writer.flush()
    })();
    protocol::read_hello(&mut reader).map_err(wire("exchanging hellos"))?;
    greet.map_err(|e| wire("sending the manifest")(e.into()))?;

    // The receiver's first word: an empty answers part (the manifest is accepted) or a refusal.
    // Nothing more is sent before it, so a refusal is never lost to a reset.
    match read_message(&mut reader).map_err(wire("waiting for the manifest's acceptance"))? {
        Message::Answers(part) if part.answers.is_empty() => {}
        Message::Reply(Reply::Reject { code, reason }) => {
            let reason = peer_text(reason);
            return Err(Error::Rejected { name: "the batch".into(), code, reason });
        }
        other => return Err(unexpected(&peer, "answers", &other)),
    }

    let overall = progress.bytes("sending", &format!("0/{} entries", entries.len()), bytes);
    let mut run = Run::new(&entries, opts, &overall, Peer(peer.clone(), limit));
    let peer_ref = &peer;
    let local_busy = AtomicBool::new(true);
    let cause = std::thread::scope(|scope| {
        let local_busy = &local_busy;
        let reader_events = events.clone();
        scope.spawn(move || {
            read_events(&mut reader, reader_events, peer_ref, local_busy, wire("waiting for answers"))
        });
        drop(events);
        let cause = run.drive(&items, &inbox, &mut writer, local_busy);
        if cause.is_some() {
            // Stop here cleanly: what is buffered goes out, then the receiver sees the end and
            // acknowledges what it verified.
            let _ = writer.flush();
            let _ = stream.shutdown(Shutdown::Write);
            run.drain(&inbox);
        }
        // The reader thread ends when the connection does.
        let _ = stream.shutdown(Shutdown::Both);
        cause
    });
    overall.finish_and_clear();
    hashing_bar.finish_and_clear();
    if run.hashed == files {
        // Finished: its cache is saved when it ends. (After a failure it may still be reading a
        // large file; it is not waited for.)
        let _ = hashing.join();
    }
    let mut outcomes = run.outcomes;
    // A receiver that broke the protocol is the answer, whatever else happened.
    if let Some(e @ Error::Protocol { .. }) = cause {
        return Err(e);
    }
    let mut entries_out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let outcome = match (outcomes[i].take(), &cause) {
            (Some(o), _) => o,
            (None, Some(e)) => EntryOutcome::Failed(Error::Connection {
                peer: opts.to.clone(),
                what: "failed",
                source: std::io::Error::other(e.to_string()),
            }),
            (None, None) => EntryOutcome::Failed(Error::RemoteFailed("no verdict arrived".into())),
        };
        entries_out.push((entry.path.join("/"), matches!(entry.kind, EntryKind::Dir), outcome));
    }
    // Names the receiver would refuse were never offered: they count as failed, so a script
    // that deletes what it sent does not delete them.
    for (p, why) in walked.refused {
        let shown = p.display().to_string();
        let e = Error::Usage(format!("cannot send {}: {why}", escape(&shown)));
        entries_out.push((shown, false, EntryOutcome::Failed(e)));
    }
    Ok(BatchReport {
        entries: entries_out,
        skipped: walked.skipped,
        files,
        bytes,
        sent: run.sent,
        resumed: run.resumed,
        elapsed: start.elapsed(),
    })
}

/// The display path of `name` in the folder of the entry at `path`: where the receiver says it
/// stored (or already has) that entry, maybe under a keep-both name.
fn beside(path: &[String], name: &str) -> String {
    [&path[..path.len() - 1], &[name.to_string()]].concat().join("/")
}

/// What the sender's threads tell its main loop.
enum Event {
    /// The hashing thread's result for file `.0` (counting files only, in manifest order).
    Hashed(usize, Result<Digest, Error>),
    Answers(AnswersPart),
    Verdict(FileVerdict),
    /// No byte from the receiver for a whole idle timeout, ending at this instant.
    Quiet(Instant),
    /// The connection ended or the receiver broke the protocol; the reader has stopped.
    Broken(Error),
}

/// How often the hashing thread appends new digests to the cache file.
const CACHE_SAVE: Duration = Duration::from_secs(1);
/// How long the main loop waits for news before it tells the receiver it is still hashing.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(1);
/// Files the receiver should know the digest of beyond those already sent: enough that answers
/// keep coming while bodies go out, without a message per digest.
pub(crate) const TELL_AHEAD: usize = 64;

/// Hashes the listed files in order, from the cache where it knows them, and reports each digest.
fn spawn_hashing(
    items: &[Item],
    (cache, alg): (bool, HashAlg),
    bar: ProgressBar,
    events: mpsc::Sender<Event>,
) -> std::thread::JoinHandle<()> {
    let files: Vec<(PathBuf, Stamp)> =
        items.iter().filter_map(|i| i.file.map(|s| (i.source.clone(), s))).collect();
    std::thread::spawn(move || {
        let mut cache = cache.then(|| DigestCache::open_default(alg));
        let total = files.len();
        let mut saved = Instant::now();
        for (n, (source, stamp)) in files.into_iter().enumerate() {
            let path = source.display().to_string();
            let digest = open_unchanged(&source, stamp).and_then(|mut f| {
                digest_of(&mut f, (stamp, alg), cache.as_mut(), &bar, &path).map(|(d, _)| d)
            });
            // Saved as it goes, so an interrupted batch's retry does not hash it all again.
            if let Some(c) = cache.as_mut()
                && saved.elapsed() > CACHE_SAVE
            {
                c.flush();
                saved = Instant::now();
            }
            if digest.is_err() {
                bar.inc(stamp.size);
            }
            bar.set_message(format!("{}/{total} files", n + 1));
            if events.send(Event::Hashed(n, digest)).is_err() {
                return;
            }
        }
        bar.finish_and_clear();
    })
}

/// Reads answers and verdicts until the connection ends, passing them on. Quiet stretches are
/// reported, not fatal: only the main loop knows whether the receiver owes it anything.
fn read_events(
    reader: &mut BufReader<&TcpStream>,
    events: mpsc::Sender<Event>,
    peer: &str,
    local_busy: &AtomicBool,
    wire: impl Fn(WireError) -> Error,
) {
    loop {
        let event = match read_message(reader) {
            Ok(Message::Answers(part)) => Event::Answers(part),
            Ok(Message::FileVerdict(v)) => Event::Verdict(v),
            Ok(other) => Event::Broken(unexpected(peer, "answers or file verdicts", &other)),
            Err(WireError::Io(e)) if is_timeout(&e) => {
                if local_busy.load(Ordering::SeqCst) {
                    continue;
                }
                Event::Quiet(Instant::now())
            }
            Err(e) => Event::Broken(wire(e)),
        };
        let stop = matches!(event, Event::Broken(_));
        if events.send(event).is_err() || stop {
            return;
        }
    }
}

/// The receiver's address and the idle timeout, for error messages.
#[derive(Clone)]
struct Peer(String, Limit);

impl Peer {
    fn wire(&self, what: &'static str, e: WireError) -> Error {
        Error::wire(&self.0, what, self.1, e)
    }
}

/// The state of a batch once the manifest is accepted.
struct Run<'a> {
    entries: &'a [Entry],
    opts: &'a SendOpts,
    peer: Peer,
    /// Each file's digest once hashed, by entry index.
    digests: Vec<Option<Digest>>,
    bar: &'a ProgressBar,
    /// Digests from the hashing thread not yet sent, and how many files that thread has done.
    unsent: Vec<Option<Digest>>,
    hashed: usize,
    /// Files whose digest (or its absence) the receiver has been told.
    told: usize,
    answers: Vec<Answer>,
    /// Entries acted on (body sent, withdrawn, or outcome known from the answer), and how many of
    /// them were files.
    acted: usize,
    acted_files: usize,
    /// Entries whose body or withdrawal went out and whose verdict has not come.
    owed: Vec<bool>,
    owing: usize,
    outcomes: Vec<Option<EntryOutcome>>,
    /// Entry index of each file, by file number.
    file_entry: Vec<usize>,
    /// Local failures (hashing, reading) that outrank whatever the receiver says.
    local: Vec<bool>,
    sent: u64,
    resumed: u64,
    done: usize,
    /// The reader thread has stopped: nothing more will come from the receiver.
    reader_done: bool,
    /// Why it stopped.
    ended: Option<Error>,
}

impl<'a> Run<'a> {
    fn new(entries: &'a [Entry], opts: &'a SendOpts, bar: &'a ProgressBar, peer: Peer) -> Run<'a> {
        let file_entry = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.kind, EntryKind::File { .. }))
            .map(|(i, _)| i);
        Run {
            entries,
            opts,
            peer,
            digests: vec![None; entries.len()],
            bar,
            unsent: Vec::new(),
            hashed: 0,
            told: 0,
            answers: Vec::with_capacity(entries.len()),
            acted: 0,
            acted_files: 0,
            owed: vec![false; entries.len()],
            owing: 0,
            outcomes: (0..entries.len()).map(|_| None).collect(),
            file_entry: file_entry.collect(),
            local: vec![false; entries.len()],
            sent: 0,
            resumed: 0,
            done: 0,
            reader_done: false,
            ended: None,
        }
    }

    /// The main loop: digests out as they are hashed, answers in, one body at a time out, verdicts
    /// in, until every entry has its outcome. Returns what broke the connection, if anything.
    fn drive(
        &mut self,
        items: &[Item],
        inbox: &mpsc::Receiver<Event>,
        writer: &mut BufWriter<&TcpStream>,
        local_busy: &AtomicBool,
    ) -> Option<Error> {
        let peer = self.peer.clone();
        let net = |e: std::io::Error| peer.wire("sending the batch", e.into());
        let mut waiting_since = Instant::now();
        loop {
            if self.acted == self.entries.len() && self.owing == 0 {
                return None;
            }
            let work = self.acted < self.answers.len() || self.should_tell();
            // Blocking only when there is nothing to write: flush first, so the receiver has it.
            let mut event = if work {
                inbox.try_recv().ok()
            } else {
                // The receiver has stopped talking and nothing it already said is left to act on.
                if let Some(e) = self.ended.take() {
                    return Some(e);
                }
                if let Err(e) = writer.flush() {
                    return Some(net(e));
                }
                let still_hashing = self.hashed < self.file_entry.len();
                local_busy.store(still_hashing, Ordering::SeqCst);
                match inbox.recv_timeout(KEEPALIVE) {
                    Ok(e) => Some(e),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if still_hashing {
                            let keepalive = DigestsPart { first: self.told as u32, digests: Vec::new() };
                            if let Err(e) = write_message(writer, &Message::Digests(keepalive)) {
                                return Some(net(e));
                            }
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                        return Some(self.wire("waiting for answers", eof.into()));
                    }
                }
            };
            local_busy.store(true, Ordering::SeqCst);
            // Everything that is already here, so digests and answers travel in batches.
            while let Some(e) = event {
                if let Err(cause) = self.take(e, waiting_since) {
                    return Some(cause);
                }
                event = inbox.try_recv().ok();
            }
            if self.should_tell() {
                for chunk in std::mem::take(&mut self.unsent).chunks(MAX_DIGESTS_PER_PART) {
                    let part = DigestsPart { first: self.told as u32, digests: chunk.to_vec() };
                    if let Err(e) = write_message(writer, &Message::Digests(part)) {
                        return Some(net(e));
                    }
                    self.told += chunk.len();
                }
            }
            // One answered entry acted on per turn, so digests keep flowing between bodies.
            if self.acted < self.answers.len() {
                if let Err(e) = self.act(items, writer) {
                    return Some(e);
                }
                waiting_since = Instant::now();
            }
        }
    }

    /// Whether to send the digests held back now: when the receiver is running short of files
    /// it can answer, when enough have gathered, or when hashing is over. Holding them a little
    /// while bodies go out turns 10,000 digests into a few messages instead of 10,000.
    fn should_tell(&self) -> bool {
        let ahead = self.told - self.acted_files;
        !self.unsent.is_empty()
            && (ahead < TELL_AHEAD
                || self.unsent.len() >= MAX_DIGESTS_PER_PART
                || self.hashed == self.file_entry.len())
    }

    /// Takes one event from the hashing or reader thread; an error ends the batch.
    fn take(&mut self, event: Event, waiting_since: Instant) -> Result<(), Error> {
        match event {
            Event::Hashed(n, digest) => {
                debug_assert_eq!(n, self.hashed);
                self.hashed += 1;
                let i = self.file_entry[n];
                match digest {
                    Ok(d) => {
                        self.digests[i] = Some(d);
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
            Event::Answers(part) => self.take_answers(part.answers),
            Event::Verdict(v) => self.take_verdict(v),
            Event::Quiet(at) => {
                let waiting_on_receiver = self.hashed == self.file_entry.len() && self.unsent.is_empty();
                let quiet_for = self.opts.timeout.unwrap_or(Duration::MAX);
                if waiting_on_receiver && at.saturating_duration_since(waiting_since) >= quiet_for {
                    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer");
                    return Err(self.wire("waiting for answers", e.into()));
                }
                Ok(())
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

    fn wire(&self, what: &'static str, e: WireError) -> Error {
        self.peer.wire(what, e)
    }

    /// Takes answers for the next entries, checking the receiver could have given them.
    fn take_answers(&mut self, answers: Vec<Answer>) -> Result<(), Error> {
        for a in answers {
            let i = self.answers.len();
            let malformed = |what: String| Error::Protocol {
                peer: self.opts.to.clone(),
                source: protocol::ProtocolError::Malformed(what),
            };
            let Some(entry) = self.entries.get(i) else {
                return Err(malformed(format!("more answers than the {} entries", self.entries.len())));
            };
            let bad_offset = match (&a, &entry.kind) {
                (Answer::Send { offset }, EntryKind::File { size, .. }) => offset > size,
                (Answer::Send { offset }, EntryKind::Dir) => *offset > 0,
                _ => false,
            };
            if bad_offset {
                return Err(malformed("an answer's offset lies past its file's end".into()));
            }
            if matches!(entry.kind, EntryKind::File { .. })
                && self.file_entry.binary_search(&i).is_ok_and(|n| n >= self.told)
            {
                return Err(malformed(format!("an answer for entry {i} before its digest was sent")));
            }
            self.answers.push(a);
        }
        Ok(())
    }

    fn take_verdict(&mut self, v: FileVerdict) -> Result<(), Error> {
        let i = v.index as usize;
        if !self.owed.get(i).copied().unwrap_or(false) {
            let source =
                protocol::ProtocolError::Malformed(format!("verdict for entry {i}, which was not sent"));
            return Err(Error::Protocol { peer: self.opts.to.clone(), source });
        }
        self.owed[i] = false;
        self.owing -= 1;
        if self.local[i] {
            return Ok(());
        }
        let path = &self.entries[i].path;
        let name = path.join("/");
        let sent = self.digests[i].unwrap_or(Digest([0; 32]));
        self.outcomes[i] = Some(match verdict_result(v.verdict, &name, &sent) {
            // The receiver names the file it stored in its folder (maybe `name (1).ext`).
            Ok(stored) => EntryOutcome::Verified(beside(path, &stored)),
            Err(e) => EntryOutcome::Failed(e),
        });
        Ok(())
    }

    /// Acts on the next answered entry: records the outcome the answer decides, or sends its body.
    fn act(&mut self, items: &[Item], writer: &mut BufWriter<&TcpStream>) -> Result<(), Error> {
        let i = self.acted;
        self.acted += 1;
        let entry = &self.entries[i];
        self.acted_files += usize::from(matches!(entry.kind, EntryKind::File { .. }));
        let size = match entry.kind {
            EntryKind::File { size, .. } => size,
            EntryKind::Dir => 0,
        };
        let outcome = match (&self.answers[i], &entry.kind) {
            // The receiver names the file in its folder (untrusted: it is only ever printed escaped).
            (Answer::Have { name }, _) => Some(EntryOutcome::AlreadyThere(beside(&entry.path, name))),
            // A folder answered Send was created by the receiver.
            (Answer::Send { .. }, EntryKind::Dir) => Some(EntryOutcome::Verified(entry.path.join("/"))),
            (Answer::Reject { code, reason }, _) => Some(EntryOutcome::Failed(Error::Rejected {
                name: escape(&entry.path.join("/")),
                code: *code,
                reason: peer_text(reason.clone()),
            })),
            (Answer::Send { .. }, EntryKind::File { .. }) => None,
        };
        self.done += 1;
        self.bar.set_message(format!("{}/{} entries", self.done, self.entries.len()));
        if let Some(o) = outcome {
            self.bar.inc(size);
            if !self.local[i] {
                self.outcomes[i] = Some(o);
            }
            return Ok(());
        }
        let Answer::Send { offset } = self.answers[i] else { unreachable!("matched above") };
        self.owed[i] = true;
        self.owing += 1;
        self.bar.inc(offset);
        let item = &items[i];
        let stamp = item.file.expect("files have stamps");
        let opened = if self.local[i] {
            Err(Error::Usage("it could not be read".into()))
        } else {
            open_unchanged(&item.source, stamp)
        };
        let peer = self.peer.clone();
        let net = |e: std::io::Error| peer.wire("sending bodies", e.into());
        let mut f = match opened {
            Ok(f) => f,
            Err(e) => {
                let reason = bounded_reason(e.to_string());
                self.local[i] = true;
                self.outcomes[i].get_or_insert(EntryOutcome::Failed(e));
                self.bar.inc(size - offset);
                let w = Withdraw { index: i as u32, reason };
                return write_message(writer, &Message::Withdraw(w)).map_err(net);
            }
        };
        write_message(writer, &Message::Body(Body { index: i as u32 })).map_err(net)?;
        let path = item.source.display().to_string();
        let wire = |e| peer.wire("sending bodies", e);
        send_body(&mut f, writer, (offset, size), self.opts.chunk_size, self.bar, &path, wire)?;
        self.sent += size - offset;
        self.resumed += offset;
        if f.metadata().map(|m| Stamp::of(&m)).ok() != Some(stamp) {
            let msg = format!("{path} changed while it was being sent; send it again");
            self.local[i] = true;
            self.outcomes[i] = Some(EntryOutcome::Failed(Error::Integrity(msg)));
        }
        Ok(())
    }

    /// After the connection broke on our side: collect the verdicts the receiver still sends.
    fn drain(&mut self, inbox: &mpsc::Receiver<Event>) {
        while self.owing > 0 && !self.reader_done {
            match inbox.recv_timeout(self.opts.timeout.unwrap_or(Duration::from_secs(30))) {
                Ok(Event::Verdict(v)) => {
                    if self.take_verdict(v).is_err() {
                        self.reader_done = true;
                    }
                }
                Ok(Event::Broken(_)) | Err(_) => self.reader_done = true,
                Ok(_) => {}
            }
        }
    }
}

/// Opens a listed file and checks it is still the one that was listed.
fn open_unchanged(source: &Path, stamp: Stamp) -> Result<File, Error> {
    let path = source.display().to_string();
    let f = File::open(source).map_err(|e| Error::io(format!("cannot open {path}"), e))?;
    let now = f.metadata().map(|m| Stamp::of(&m)).map_err(|e| Error::io(format!("cannot stat {path}"), e))?;
    if now != stamp {
        return Err(Error::Integrity(format!("{path} changed while the batch was prepared; send it again")));
    }
    Ok(f)
}

/// Writes the manifest as parts that each fit a message frame.
fn write_manifest(w: &mut BufWriter<&TcpStream>, entries: &[Entry]) -> std::io::Result<()> {
    // A part's overhead (variant, count, flag) is small and fixed.
    let budget = MAX_MESSAGE_LEN as usize - 64;
    let mut part = Vec::new();
    let mut len = 0;
    for e in entries {
        let one = e.encoded_len();
        if len + one > budget && !part.is_empty() {
            write_message(
                w,
                &Message::Manifest(ManifestPart { entries: std::mem::take(&mut part), last: false }),
            )?;
            len = 0;
        }
        part.push(e.clone());
        len += one;
    }
    write_message(w, &Message::Manifest(ManifestPart { entries: part, last: true }))
}
