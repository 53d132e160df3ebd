//! `xfer send - HOST --as NAME`: standard input as one stream entry (PROTOCOL.md,
//! `EntryKind::Stream`). Its size is known only at its end, so it is hashed as it is read (one
//! pass, no temporary file), sent as data frames ended by an empty one, and its digest follows.
//! It never resumes: what was read from a pipe cannot be read again, so a failure says so.

use std::io::Read;
use std::net::Shutdown;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::progress::Bar;

use super::events::{self, EVENT_QUEUE, Event};
use super::report::{EntryOutcome, EntryReport, Report, beside, verdict_result};
use super::{SendOpts, plan, secure};
use crate::error::Error;
use crate::hash::Hasher;
use crate::progress::{Progress, human_bytes};
use crate::protocol::{
    Answer, Body, Digest, DigestsPart, Entry, EntryKind, Message, ProtocolError, RejectCode, Verdict,
};
use crate::sanitize::{escape, peer_text};
use crate::transport::FrameWriter;

/// Sends standard input as the one stream entry `--as` names.
pub(super) fn send_stdin(opts: &SendOpts, progress: &Progress) -> Result<Report, Error> {
    let start = Instant::now();
    let path = plan::as_path(opts.name.as_deref().expect("cli requires --as with -"))?;
    // A pipe has no permissions or time of its own: a new file's, as `cat > file` would make.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let entry = Entry {
        path,
        kind: EntryKind::Stream { hash: opts.hash },
        mode: 0o644,
        mtime: (now.as_secs() as i64, now.subsec_nanos()),
    };
    let label = entry.path.join("/");
    let entries = vec![entry];
    let mut ready = secure::prepare(opts)?;
    let (r, mut w, peer, _rtt, waited) =
        super::connect(opts, &mut ready, &Bar::hidden(), progress, &entries, Some(&label))?;
    let spinner = progress.spinner(&format!("sending standard input as \"{}\"", escape(&label)));
    let mut sent = Sent { bytes: 0, digest: None };
    let outcome = std::thread::scope(|scope| {
        let (tx, inbox) = mpsc::sync_channel(EVENT_QUEUE);
        let mut reader = r;
        scope.spawn(move || events::read_events(&mut reader, tx));
        let outcome = Conversation { opts, w: &mut w, inbox: &inbox, peer: &peer, label: &label }
            .run(&spinner, &mut sent);
        // The reader thread sees the end of the connection and stops.
        w.shutdown(Shutdown::Both);
        drop(inbox);
        outcome
    });
    spinner.finish_and_clear();
    let outcome = match outcome {
        Ok(stored) => EntryOutcome::Verified(beside(&entries[0].path, &stored)),
        Err(e @ (Error::Connection { .. } | Error::Timeout { .. } | Error::Io { .. })) => {
            EntryOutcome::Failed(Error::NotResumable(Box::new(e)))
        }
        Err(e) => EntryOutcome::Failed(e),
    };
    Ok(Report {
        single: true,
        entries: vec![EntryReport {
            path: label,
            is_dir: false,
            size: sent.bytes,
            digest: sent.digest,
            cached: false,
            offset: 0,
            outcome,
        }],
        skipped: Vec::new(),
        files: 1,
        bytes: sent.bytes,
        sent: sent.bytes,
        resumed: 0,
        elapsed: start.elapsed().saturating_sub(waited),
    })
}

/// What went out: bytes read from standard input, and their digest once it was all read.
struct Sent {
    bytes: u64,
    digest: Option<Digest>,
}

/// The stream's conversation once the manifest is accepted.
struct Conversation<'a> {
    opts: &'a SendOpts,
    w: &'a mut FrameWriter,
    inbox: &'a mpsc::Receiver<Event>,
    peer: &'a str,
    label: &'a str,
}

impl Conversation<'_> {
    /// The answer, the body and its digest, the verdict: the name the receiver stored it as.
    fn run(mut self, spinner: &Bar, sent: &mut Sent) -> Result<String, Error> {
        match self.next("waiting for answers")? {
            Event::Answers(part) => match part.answers.as_slice() {
                [Answer::Send { offset: 0 }] => {}
                [Answer::Reject { code: RejectCode::Failed, reason }] => {
                    return Err(Error::RemoteFailed(peer_text(reason.clone())));
                }
                [Answer::Reject { code, reason }] => {
                    let name = escape(self.label);
                    return Err(Error::Rejected { name, code: *code, reason: peer_text(reason.clone()) });
                }
                other => return Err(self.protocol(format!("answered a stream with {other:?}"))),
            },
            _ => return Err(self.protocol("a verdict before the stream's answer".into())),
        }
        let early = self.body(spinner, sent)?;
        let verdict = match early {
            Some(v) => v,
            None => match self.next("waiting for the verdict")? {
                Event::Verdict(v) => v.verdict,
                _ => return Err(self.protocol("answers after the stream's answer".into())),
            },
        };
        verdict_result(verdict, self.label, sent.digest.as_ref())
    }

    /// Reads standard input to its end into data frames, hashing it on the way, then the end
    /// mark and the digest. Between reads, looks whether the receiver has given its verdict
    /// already (it failed to store the stream, e.g. its disk is full): then the stream ends there,
    /// with no digest, and that verdict is returned.
    fn body(&mut self, spinner: &Bar, sent: &mut Sent) -> Result<Option<Verdict>, Error> {
        let net = |w: &FrameWriter, e: std::io::Error| w.error("sending standard input", e.into());
        self.w.message(&Message::Body(Body { index: 0 })).map_err(|e| net(self.w, e))?;
        let mut hasher = Hasher::new(self.opts.hash);
        let mut buf = vec![0u8; (self.opts.chunk_size as usize).clamp(64 * 1024, 1 << 20)];
        let mut stdin = std::io::stdin().lock();
        let mut shown = Instant::now();
        let mut read_error = None;
        let mut early = None;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            };
            hasher.update(&buf[..n]);
            self.w.data(&buf[..n], self.opts.chunk_size).map_err(|e| net(self.w, e))?;
            sent.bytes += n as u64;
            if shown.elapsed() > Duration::from_millis(100) {
                shown = Instant::now();
                spinner.set_message(format!(
                    "sending standard input as \"{}\": {} so far",
                    escape(self.label),
                    human_bytes(sent.bytes)
                ));
            }
            match self.inbox.try_recv() {
                Ok(Event::Verdict(v)) => {
                    early = Some(v.verdict);
                    break;
                }
                Ok(Event::Broken(e)) => return Err(e),
                Ok(_) => return Err(self.protocol("answers while the stream was being sent".into())),
                Err(_) => {}
            }
        }
        // A digest only for what was read whole: otherwise the receiver must store nothing.
        let digest = (read_error.is_none() && early.is_none()).then(|| hasher.finish());
        sent.digest = digest;
        self.w.stream_end().map_err(|e| net(self.w, e))?;
        let part = DigestsPart { first: 0, digests: vec![digest] };
        self.w.message(&Message::Digests(part)).and_then(|()| self.w.flush()).map_err(|e| net(self.w, e))?;
        if let Some(e) = read_error {
            // The receiver's verdict (nothing stored) is not worth waiting for: ours is the cause.
            return Err(Error::io("cannot read standard input", e));
        }
        Ok(early)
    }

    /// The next event from the receiver, within `--timeout`.
    fn next(&mut self, what: &'static str) -> Result<Event, Error> {
        let limit = self.opts.timeout.unwrap_or(Duration::from_secs(u64::MAX / 4));
        match self.inbox.recv_timeout(limit) {
            Ok(Event::Broken(e)) => Err(e),
            Ok(e) => Ok(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout {
                peer: self.peer.to_string(),
                what,
                limit: crate::transport::idle_limit(self.opts.timeout),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                Err(self.w.error(what, eof.into()))
            }
        }
    }

    fn protocol(&self, what: String) -> Error {
        Error::Protocol { peer: self.peer.to_string(), source: ProtocolError::Malformed(what) }
    }
}
