//! The sending side of a batch: files and folders listed once in a manifest, answered once, then
//! every needed body streamed back to back on the same connection while the receiver's
//! acknowledgements are read on a second thread.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cache::{DigestCache, Stamp};
use crate::error::{Error, Exit, is_timeout};
use crate::progress::Progress;
use crate::protocol::{
    self, Answer, Entry, EntryKind, HashAlg, MAX_MESSAGE_LEN, ManifestPart, Message, Reply, WireError,
    encode_message, read_message, write_message,
};
use crate::sanitize::{escape, peer_text};
use crate::send::{SOCKET_BUF, SendOpts, digest_of, open_connection, send_body, unexpected, verdict_result};
use crate::tree::{Item, walk};

/// What happened to one entry.
#[derive(Debug)]
pub enum EntryOutcome {
    Verified(String),
    AlreadyThere,
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

    // Digests first (the cache makes a repeat free), then one manifest.
    let mut cache = opts.cache.then(DigestCache::open_default);
    let bar = progress.bytes("hashing", &format!("0/{files} files"), bytes);
    let mut entries = Vec::with_capacity(items.len());
    let mut hashed = 0usize;
    for item in &items {
        let kind = match item.file {
            None => EntryKind::Dir,
            Some(stamp) => {
                let path = item.source.display().to_string();
                // A cached digest for the stamp the walk saw needs no open here; the file is
                // checked against that stamp again when its body is sent.
                let digest = match cache.as_ref().and_then(|c| c.get(&stamp)) {
                    Some(d) => {
                        bar.inc(stamp.size);
                        d
                    }
                    None => {
                        digest_of(&mut open_unchanged(item, stamp)?, stamp, cache.as_mut(), &bar, &path)?.0
                    }
                };
                hashed += 1;
                bar.set_message(format!("{hashed}/{files} files"));
                EntryKind::File { size: stamp.size, hash: HashAlg::Sha256, digest }
            }
        };
        entries.push(Entry { path: item.path.clone(), kind, mode: item.mode, mtime: item.mtime });
    }
    bar.finish_and_clear();

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

    let mut answers = Vec::with_capacity(entries.len());
    loop {
        match read_message(&mut reader).map_err(wire("waiting for the answers"))? {
            Message::Answers(part) => {
                answers.extend(part.answers);
                if answers.len() > entries.len() {
                    break;
                }
                if part.last {
                    break;
                }
            }
            Message::Reply(Reply::Reject { code, reason }) => {
                let reason = peer_text(reason);
                return Err(Error::Rejected { name: "the batch".into(), code, reason });
            }
            other => return Err(unexpected(&peer, "answers", &other)),
        }
    }
    let bad_offset = answers.iter().zip(&entries).any(|(a, e)| match (a, &e.kind) {
        (Answer::Send { offset }, EntryKind::File { size, .. }) => offset > size,
        (Answer::Send { offset }, EntryKind::Dir) => *offset > 0,
        _ => false,
    });
    if bad_offset {
        let source = protocol::ProtocolError::Malformed("an answer's offset lies past its file's end".into());
        return Err(Error::Protocol { peer, source });
    }
    if answers.len() != entries.len() {
        let source = protocol::ProtocolError::Malformed(format!(
            "{} answers for {} entries",
            answers.len(),
            entries.len()
        ));
        return Err(Error::Protocol { peer, source });
    }

    // Verdicts come back while bodies go out: read them on their own thread, or a receiver
    // blocked writing acknowledgements and a sender blocked writing bodies would wait forever.
    let expected: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            matches!(a, Answer::Send { .. }) && matches!(entries[*i].kind, EntryKind::File { .. })
        })
        .map(|(i, _)| i)
        .collect();
    let mut outcomes: Vec<Option<EntryOutcome>> = answers
        .iter()
        .zip(&entries)
        .map(|(a, e)| match (a, &e.kind) {
            (Answer::Have, _) => Some(EntryOutcome::AlreadyThere),
            // A folder answered Send was created by the receiver.
            (Answer::Send { .. }, EntryKind::Dir) => Some(EntryOutcome::Verified(e.path.join("/"))),
            (Answer::Reject { code, reason }, _) => Some(EntryOutcome::Failed(Error::Rejected {
                name: escape(&e.path.join("/")),
                code: *code,
                reason: peer_text(reason.clone()),
            })),
            (Answer::Send { .. }, EntryKind::File { .. }) => None,
        })
        .collect();
    let to_send: u64 = expected
        .iter()
        .map(|&i| match (&entries[i].kind, &answers[i]) {
            (EntryKind::File { size, .. }, Answer::Send { offset }) => size.saturating_sub(*offset),
            _ => 0,
        })
        .sum();
    let peer_ref = &peer;
    let writing = AtomicBool::new(true);
    let verdicts = std::thread::scope(|scope| {
        let n = expected.len();
        let writing = &writing;
        let acks = scope.spawn(move || {
            let mut got = Vec::with_capacity(n);
            while got.len() < n {
                match read_message(&mut reader) {
                    Ok(Message::FileVerdict(v)) => got.push(v),
                    Ok(other) => return (got, Some(unexpected(peer_ref, "file verdict", &other))),
                    // Verdicts come per group: while bodies are still going out, a quiet
                    // stretch longer than the idle timeout is normal, not a dead peer.
                    Err(WireError::Io(e)) if is_timeout(&e) && writing.load(Ordering::SeqCst) => continue,
                    Err(e) => return (got, Some(wire("waiting for file verdicts")(e))),
                }
            }
            (got, None)
        });
        let bar = progress.bytes("sending", &format!("{} files", expected.len()), to_send);
        let mut sent = 0u64;
        let mut done = 0usize;
        let mut local_failures = Vec::new();
        let streamed = (|| {
            for &i in &expected {
                let item = &items[i];
                let (EntryKind::File { size, .. }, Answer::Send { offset }) = (&entries[i].kind, &answers[i])
                else {
                    continue;
                };
                let stamp = item.file.expect("files have stamps");
                let path = item.source.display().to_string();
                let mut f = open_unchanged(item, stamp)?;
                send_body(
                    &mut f,
                    &mut writer,
                    (*offset, *size),
                    opts.chunk_size,
                    &bar,
                    &path,
                    wire("sending bodies"),
                )?;
                sent += size - offset;
                done += 1;
                bar.set_message(format!("{done}/{} files", expected.len()));
                if f.metadata().map(|m| Stamp::of(&m)).ok() != Some(stamp) {
                    local_failures.push(i);
                }
            }
            writer.flush().map_err(|e| wire("sending bodies")(e.into()))
        })();
        writing.store(false, Ordering::SeqCst);
        if streamed.is_err() {
            // Stop here cleanly: what is buffered goes out, then the receiver sees the end and
            // acknowledges what it verified; the verdict reader then sees the end too.
            let _ = writer.flush();
            let _ = stream.shutdown(Shutdown::Write);
        }
        bar.finish_and_clear();
        let (got, ack_error) = acks.join().expect("verdict reader does not panic");
        (streamed, got, ack_error, sent, local_failures)
    });
    let (streamed, got, ack_error, sent, local_failures) = verdicts;
    for v in got {
        let i = v.index as usize;
        if expected.binary_search(&i).is_err() {
            let source =
                protocol::ProtocolError::Malformed(format!("verdict for entry {i}, which was not sent"));
            return Err(Error::Protocol { peer: opts.to.clone(), source });
        }
        let path = &entries[i].path;
        let name = path.join("/");
        outcomes[i] = Some(match verdict_result(v.verdict, &name, &digest_for(&entries[i])) {
            // The receiver names the file it stored in its folder (maybe `name (1).ext`).
            Ok(stored) => EntryOutcome::Verified([&path[..path.len() - 1], &[stored]].concat().join("/")),
            Err(e) => EntryOutcome::Failed(e),
        });
    }
    for i in local_failures {
        let msg = format!("{} changed while it was being sent; send it again", items[i].source.display());
        outcomes[i] = Some(EntryOutcome::Failed(Error::Integrity(msg)));
    }
    // A connection that broke before every verdict arrived: the rest are failed with that cause.
    let cause = streamed.err().or(ack_error);
    let mut entries_out = Vec::with_capacity(entries.len());
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let outcome = match (outcome, &cause) {
            (Some(o), _) => o,
            (None, Some(e)) => EntryOutcome::Failed(Error::Connection {
                peer: opts.to.clone(),
                what: "failed",
                source: std::io::Error::other(e.to_string()),
            }),
            (None, None) => EntryOutcome::Failed(Error::RemoteFailed("no verdict arrived".into())),
        };
        entries_out.push((entries[i].path.join("/"), matches!(entries[i].kind, EntryKind::Dir), outcome));
    }
    // Names the receiver would refuse were never offered: they count as failed, so a script
    // that deletes what it sent does not delete them.
    for (p, why) in walked.refused {
        let shown = p.display().to_string();
        let e = Error::Usage(format!("cannot send {}: {why}", escape(&shown)));
        entries_out.push((shown, false, EntryOutcome::Failed(e)));
    }
    let resumed =
        expected.iter().map(|&i| if let Answer::Send { offset } = answers[i] { offset } else { 0 }).sum();
    Ok(BatchReport {
        entries: entries_out,
        skipped: walked.skipped,
        files,
        bytes,
        sent,
        resumed,
        elapsed: start.elapsed(),
    })
}

fn digest_for(e: &Entry) -> protocol::Digest {
    match &e.kind {
        EntryKind::File { digest, .. } => *digest,
        EntryKind::Dir => protocol::Digest([0; 32]),
    }
}

/// Opens a listed file and checks it is still the one that was listed.
fn open_unchanged(item: &Item, stamp: Stamp) -> Result<File, Error> {
    let path = item.source.display().to_string();
    let f = File::open(&item.source).map_err(|e| Error::io(format!("cannot open {path}"), e))?;
    let now = f.metadata().map(|m| Stamp::of(&m)).map_err(|e| Error::io(format!("cannot stat {path}"), e))?;
    if now != stamp {
        return Err(Error::Integrity(format!("{path} changed while the batch was prepared; send it again")));
    }
    Ok(f)
}

/// Writes the manifest as parts that each fit a message frame.
fn write_manifest(w: &mut BufWriter<&TcpStream>, entries: &[Entry]) -> std::io::Result<()> {
    // Each entry's encoded size, measured once; a part's overhead is small and fixed.
    let budget = MAX_MESSAGE_LEN as usize - 64;
    let mut part = Vec::new();
    let mut len = 0;
    for e in entries {
        let one =
            encode_message(&Message::Manifest(ManifestPart { entries: vec![e.clone()], last: false })).len();
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
