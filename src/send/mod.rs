//! The sender: plan what to send, hash it on one thread while the engine sends it on another.
//!
//! One path for everything: a single file is a transfer of one entry. The phases, each in its own
//! module: `plan` (command-line paths to manifest entries; `walk` for folders), `events` (the
//! hashing and reader threads), `handoff` (one read of a large file for its digest and body), `run` (the engine: digests, answers, verdicts), `body` (acting on
//! one answer: an outcome, or a body and its digest), `report`
//! (outcomes for the summary lines).

use std::net::Shutdown;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::progress::{Bar, Progress};
use crate::protocol::{EntryKind, HashAlg, MAX_MESSAGE_LEN, ManifestPart, Message, Queued, RejectCode};
use crate::sanitize::{escape, peer_text};
use crate::transport::{self, FrameWriter};

mod body;
pub(crate) mod events;
pub(crate) mod handoff;
pub mod json;
pub(crate) mod lanes;
pub mod plan;
mod report;
pub(crate) mod run;
mod secure;
mod stream;
pub mod walk;

pub use report::{EntryOutcome, EntryReport, Report};

/// Default body chunk size. Through the framing alone (`--example framing`), 1024-byte chunks
/// cost 4-15% more time than the best size while 256 KiB stays within 4% of it; whole transfers
/// on a CPU without SHA extensions are hashing-bound and cannot tell sizes apart. README has the
/// numbers.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;

/// What to send where, validated by `cli`.
#[derive(Debug, Clone)]
pub struct SendOpts {
    /// The file, when a single regular file is sent (the first of `paths`).
    pub file: PathBuf,
    /// Everything given on the command line.
    pub paths: Vec<PathBuf>,
    /// Follow symlinks in a batch.
    pub follow: bool,
    /// Per-entry lines for a batch.
    pub verbose: bool,
    /// `HOST:PORT`, ready for `ToSocketAddrs`.
    pub to: String,
    /// Name to send the file under instead of its own.
    pub name: Option<String>,
    pub chunk_size: u32,
    /// Idle timeout on the connection; `None` waits forever.
    pub timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub quiet: bool,
    /// Use and update the digest cache (`--no-cache` turns it off).
    pub cache: bool,
    pub hash: HashAlg,
    /// Plaintext, unauthenticated (`--insecure`).
    pub insecure: bool,
    /// Where the code comes from when one is needed (`-`: standard input).
    pub code_file: Option<PathBuf>,
    /// How long a busy receiver is waited for (`--wait`; zero: not at all).
    pub wait: Duration,
    /// JSON lines on stdout instead of the summary (`--json`).
    pub json: bool,
    /// `xfer send - HOST --as NAME`: standard input is sent as one stream.
    pub stdin: bool,
    /// Connections a large file's body may use (`--streams`; 1: one connection; `None`: as
    /// many as the round trip calls for, see `send::lanes::auto_lanes`).
    pub streams: Option<u8>,
}

impl SendOpts {
    /// One path that is not a folder goes the single-file way (which explains what is wrong with
    /// it, if anything); several paths or a folder make a batch.
    pub fn is_single_file(&self) -> bool {
        self.stdin || self.paths.len() == 1 && !std::fs::metadata(&self.paths[0]).is_ok_and(|m| m.is_dir())
    }
}

/// Sends `opts.paths`. A single file's failure is returned as the error; a batch's failures are
/// in the report, entry by entry.
pub fn send(opts: &SendOpts, progress: &Progress) -> Result<Report, Error> {
    if opts.stdin {
        return stream::send_stdin(opts, progress);
    }
    let start = Instant::now();
    let plan = plan::plan(opts)?;
    for (p, why) in &plan.skipped {
        progress.line(&format!("xfer: skipping {}: {why}", escape(&p.display().to_string())), false);
    }
    for (p, why) in &plan.refused {
        progress.line(&format!("xfer: cannot send {}: {why}", escape(&p.display().to_string())), true);
    }
    for (p, why) in &plan.unreadable {
        progress.line(&format!("xfer: cannot read {}: {why}", escape(&p.display().to_string())), true);
    }
    if plan.items.is_empty() {
        if let Some((p, why)) = plan.unreadable.first() {
            let e = std::io::Error::other(why.clone());
            return Err(Error::io(format!("cannot read {}", escape(&p.display().to_string())), e));
        }
        return Err(Error::Usage("nothing to send (everything given was skipped)".into()));
    }
    let (files, bytes) = (plan.files(), plan.bytes());
    // What bars and errors call the transfer: a single file by its name.
    let label = plan.single.then(|| plan.entries[0].path.join("/"));

    // Hashing starts at once, on its own thread, while we connect and the receiver validates the
    // manifest; its digests go out as they come, between bodies (or right after its body).
    // Keys, pin and (when this receiver needs one) the code come first: a prompt for the code
    // must not fight with the hashing bar.
    let mut ready = secure::prepare(opts)?;
    let (events, inbox) = mpsc::sync_channel(events::EVENT_QUEUE);
    let batch = (!plan.single).then_some(files);
    let hashing_bar = progress.bytes("hashing", label.as_deref().unwrap_or(""), bytes, batch);
    // On a secure channel, a large file may be read once for its digest and its body (handoff).
    let handoff = handoff::Handoff::new(!opts.insecure);
    let _close = handoff::CloseOnDrop(handoff.clone());
    let hashing = events::spawn_hashing(
        &plan.items,
        (opts.cache, opts.hash),
        hashing_bar.clone(),
        label.clone(),
        (events.clone(), handoff.clone()),
    );

    let (r, mut w, peer, rtt, waited) =
        connect(opts, &mut ready, &hashing_bar, progress, &plan.entries, label.as_deref())?;

    let overall = progress.bytes("sending", label.as_deref().unwrap_or(""), bytes, batch);
    let mut run = run::Run::new((&plan.entries, &plan.items), (opts, progress), &overall, (&peer, handoff));
    run.rtt = rtt;
    let cause = std::thread::scope(|scope| {
        let reader_events = events.clone();
        let mut reader = r;
        scope.spawn(move || events::read_events(&mut reader, reader_events));
        drop(events);
        let cause = run.drive(&inbox, &mut w);
        if let Some(cause) = &cause {
            // Stop here cleanly: what is buffered goes out, then the receiver sees the end and
            // acknowledges what it verified, within one more idle timeout. Unless the receiver
            // has stopped (it took nothing, or said nothing when it owed something): then only
            // the verdicts already here count.
            let stopped = w.peer_stalled() || matches!(cause, Error::Timeout { .. });
            w.shutdown(Shutdown::Write);
            let wait = if stopped { Duration::ZERO } else { opts.timeout.unwrap_or(Duration::from_secs(30)) };
            run.drain(&inbox, wait);
        }
        // The reader thread ends when the connection does, or when it finds nobody listening
        // (it may be waiting for room in a full queue).
        drop(inbox);
        w.shutdown(Shutdown::Both);
        cause
    });
    run.end_wait();
    overall.finish_and_clear();
    hashing_bar.finish_and_clear();
    if run.hashed == run.files() {
        // Finished: its cache is saved when it ends. (After a failure it may still be reading a
        // large file; it is not waited for.)
        let _ = hashing.join();
    }
    // A receiver that broke the protocol is the answer, whatever else happened.
    if let Some(e @ Error::Protocol { .. }) = cause {
        return Err(e);
    }
    // Cut off mid-transfer after bytes went out: they are kept on the receiver, and the error
    // says what to do next.
    let cut = overall.position() > 0;
    let mut cause = cause.map(|e| match e {
        e @ (Error::Connection { .. } | Error::Timeout { .. }) if cut => Error::Resumable(Box::new(e)),
        e => e,
    });
    let mut entries = Vec::with_capacity(plan.entries.len() + plan.refused.len() + plan.unreadable.len());
    for (i, entry) in plan.entries.iter().enumerate() {
        let outcome = match (run.outcomes[i].take(), &cause) {
            (Some(o), _) => o,
            // A single file fails with what broke the connection, as it is.
            (None, Some(_)) if plan.single => EntryOutcome::Failed(cause.take().expect("matched")),
            (None, Some(e)) => EntryOutcome::Failed(Error::Connection {
                peer: opts.to.clone(),
                what: "failed",
                source: std::io::Error::other(e.to_string()),
            }),
            (None, None) => EntryOutcome::Failed(Error::RemoteFailed("no verdict arrived".into())),
        };
        let (is_dir, size) = (matches!(entry.kind, EntryKind::Dir), entry.size());
        entries.push(EntryReport {
            path: entry.path.join("/"),
            is_dir,
            size,
            digest: run.digests[i],
            cached: run.cached[i],
            offset: run.offsets[i],
            outcome,
        });
    }
    // Names the receiver would refuse were never offered: they count as failed, so a script
    // that deletes what it sent does not delete them.
    let unreadable = plan.unreadable.into_iter().map(|(p, why)| {
        let e = Error::io(
            format!("cannot read {}", escape(&p.display().to_string())),
            std::io::Error::other(why),
        );
        (p, e)
    });
    let refused = plan.refused.into_iter().map(|(p, why)| {
        let e = Error::Usage(format!("cannot send {}: {why}", escape(&p.display().to_string())));
        (p, e)
    });
    // Paths that could not be read here were never offered either: they fail too (exit 6).
    for (p, e) in refused.chain(unreadable) {
        let shown = p.display().to_string();
        entries.push(EntryReport {
            path: shown,
            is_dir: false,
            size: 0,
            digest: None,
            cached: false,
            offset: 0,
            outcome: EntryOutcome::Failed(e),
        });
    }
    Ok(Report {
        single: plan.single,
        entries,
        skipped: plan.skipped,
        files,
        bytes,
        sent: run.sent,
        resumed: run.resumed,
        elapsed: start.elapsed().saturating_sub(waited),
    })
}

/// Connects, authenticates and offers `entries` until the receiver accepts them. A busy receiver
/// is waited for (up to --wait), trying again with growing pauses: 64 sends started at once
/// against one receiver all get through.
fn connect(
    opts: &SendOpts,
    ready: &mut secure::Ready,
    hashing_bar: &Bar,
    progress: &Progress,
    entries: &[crate::protocol::Entry],
    label: Option<&str>,
) -> Result<(transport::FrameReader, FrameWriter, String, Duration, Duration), Error> {
    let mut waiting: Option<Instant> = None;
    let status = progress.spinner(&format!("connecting to {} (waiting for its hello)", opts.to));
    let mut pause = Duration::from_millis(250 + u64::from(std::process::id() % 250));
    let offered = loop {
        match offer(opts, ready, (hashing_bar, &status), entries, label, (&mut waiting, progress)) {
            Err(e) => break Err(e),
            Ok(Offered::Accepted(c)) => break Ok(*c),
            Ok(Offered::Busy(e)) => {
                let since = *waiting.get_or_insert_with(|| {
                    let shown = e.to_string();
                    progress.line(
                        &format!(
                            "xfer: {shown}; waiting for a free slot (up to --wait {} s)",
                            opts.wait.as_secs()
                        ),
                        false,
                    );
                    Instant::now()
                });
                if since.elapsed() + pause > opts.wait {
                    break Err(e);
                }
                status.set_message(format!(
                    "receiver busy: waiting for a free slot (up to --wait {} s)",
                    opts.wait.as_secs()
                ));
                std::thread::sleep(pause);
                status.set_message(format!("connecting to {} again", opts.to));
                pause = (pause * 3 / 2).min(Duration::from_secs(4));
            }
        }
    };
    status.finish_and_clear();
    // The time spent waiting for a busy receiver is not the transfer's: it was said at the time.
    let waited = waiting.map_or(Duration::ZERO, |since| since.elapsed());
    offered.map(|(r, w, peer, rtt)| (r, w, peer, rtt, waited))
}

/// What became of one offer of the manifest.
enum Offered {
    /// Accepted: the connection, ready for digests and bodies.
    Accepted(Box<(transport::FrameReader, FrameWriter, String, Duration)>),
    /// The receiver is busy (no slot, or too many connections): try again later.
    Busy(Error),
}

/// Connects, authenticates, offers the manifest and reads the receiver's first word.
fn offer(
    opts: &SendOpts,
    ready: &mut secure::Ready,
    (bar, status): (&Bar, &Bar),
    entries: &[crate::protocol::Entry],
    label: Option<&str>,
    (waiting, progress): (&mut Option<Instant>, &Progress),
) -> Result<Offered, Error> {
    let secure::Connected { mut r, mut w, peer, auth, rtt } = match secure::connect(opts, ready, bar) {
        Ok(c) => c,
        // Refused before the handshake, or closed without a word: the receiver has no
        // connection to spare.
        Err(e @ Error::Rejected { code: RejectCode::Busy, .. }) if opts.wait > Duration::ZERO => {
            return Ok(Offered::Busy(e));
        }
        Err(e @ Error::Connection { what: secure::CLOSED_AT_ONCE, .. }) if opts.wait > Duration::ZERO => {
            return Ok(Offered::Busy(e));
        }
        Err(e) => return Err(e),
    };
    status.set_message(format!("connected to {peer}: waiting for it to accept the list of files"));
    // A receiver that refuses at once (busy) may hang up while the manifest is still going out:
    // its refusal, read next, says more than the broken pipe.
    let sent = write_manifest(&mut w, entries).map_err(|e| w.error("sending the manifest", e.into()));

    // The receiver's first word: an empty answers part (the manifest is accepted) or a refusal.
    // Nothing more is sent before it, so a refusal is never lost to a reset.
    let first = r.message().map_err(|e| r.error("waiting for the manifest's acceptance", e));
    if sent.is_err() && !matches!(first, Ok(Message::Reject(_))) {
        return Err(sent.expect_err("checked"));
    }
    let mut first = first?;
    // The receiver's first record opened: it knew the code, and its key can be pinned.
    let sealed = r.records_opened();
    if sealed {
        secure::pin(&auth, &opts.to)?;
    }
    // Every slot is taken: the manifest waits in the receiver's line, which says how many are
    // before it, until its turn (the acceptance) or --wait runs out.
    while let Message::Queued(Queued { ahead }) = first {
        if opts.wait.is_zero() {
            let name = label.map_or_else(|| "the batch".to_string(), escape);
            let reason =
                format!("receiver busy: every transfer slot is taken, {ahead} ahead in its line (--wait 0)");
            return Err(Error::Rejected { name, code: RejectCode::Busy, reason });
        }
        let since = *waiting.get_or_insert_with(|| {
            let line = format!(
                "xfer: receiver busy: {ahead} ahead in its line; waiting for our turn (up to --wait {} s)",
                opts.wait.as_secs()
            );
            progress.line(&line, false);
            Instant::now()
        });
        if since.elapsed() >= opts.wait {
            let name = label.map_or_else(|| "the batch".to_string(), escape);
            let reason = format!(
                "receiver busy: still {ahead} ahead in its line after --wait {} s",
                opts.wait.as_secs()
            );
            return Err(Error::Rejected { name, code: RejectCode::Busy, reason });
        }
        status.set_message(format!(
            "waiting for the receiver: {ahead} ahead in its line (up to --wait {} s)",
            opts.wait.as_secs()
        ));
        first = r.message().map_err(|e| r.error("waiting in the receiver's line", e))?;
    }
    match first {
        Message::Answers(part) if part.answers.is_empty() => {
            Ok(Offered::Accepted(Box::new((r, w, peer, rtt))))
        }
        Message::Reject(reject)
            if matches!(
                reject.code,
                RejectCode::AuthRequired
                    | RejectCode::AuthFailed
                    | RejectCode::InsecureOnly
                    | RejectCode::UnknownSender
            ) =>
        {
            Err(secure::refusal(reject, &opts.to, matches!(auth, secure::Auth::Pinned)))
        }
        Message::Reject(reject) => {
            let reason = peer_text(reject.reason);
            if reject.code == RejectCode::Failed {
                return Err(Error::RemoteFailed(reason));
            }
            let name = label.map_or_else(|| "the batch".to_string(), escape);
            let e = Error::Rejected { name, code: reject.code, reason };
            // Busy with its slots, said by the receiver itself (in a record, or in the clear
            // on a plaintext channel) is worth waiting for; a busy refusal in the clear after a
            // code handshake is the guess budget, which waiting out would only spend.
            let from_receiver = sealed || matches!(auth, secure::Auth::Insecure);
            if reject.code == RejectCode::Busy && from_receiver && opts.wait > Duration::ZERO {
                return Ok(Offered::Busy(e));
            }
            Err(e)
        }
        other => {
            let source =
                crate::protocol::ProtocolError::UnexpectedMessage { expected: "answers", got: other.name() };
            Err(Error::Protocol { peer, source })
        }
    }
}

/// Writes the manifest as parts that each fit a message frame, and flushes it.
fn write_manifest(w: &mut FrameWriter, entries: &[crate::protocol::Entry]) -> std::io::Result<()> {
    // A part's overhead (variant, count, flag) is small and fixed.
    let budget = MAX_MESSAGE_LEN as usize - 64;
    let mut part = Vec::new();
    let mut len = 0;
    for e in entries {
        let one = e.encoded_len();
        if len + one > budget && !part.is_empty() {
            w.message(&Message::Manifest(ManifestPart { entries: std::mem::take(&mut part), last: false }))?;
            len = 0;
        }
        part.push(e.clone());
        len += one;
    }
    w.message(&Message::Manifest(ManifestPart { entries: part, last: true }))?;
    w.flush()
}
