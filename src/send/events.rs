//! The sender's two helper threads and what they tell its main loop: the hashing thread reports
//! each file's digest in manifest order, the reader thread each message from the receiver.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::handoff::{Fed, Handoff, Piece, Turn};
use super::walk::Item;
use crate::cache::{DigestCache, Stamp};
use crate::error::{Error, is_timeout};
use crate::hash::{Hasher, hash_exact};
use crate::progress::Bar;
use crate::protocol::{AnswersPart, Digest, FileVerdict, HashAlg, Message, ProtocolError, WireError};
use crate::transport::FrameReader;

/// What the sender's threads tell its main loop.
pub(super) enum Event {
    /// The hashing thread's result for file `.0` (counting files only, in manifest order), and
    /// whether it came from the cache; a small file's bytes, kept for its body (`handoff`).
    Hashed(usize, Result<(Digest, bool), Error>, Option<Vec<u8>>),
    Answers(AnswersPart),
    Verdict(FileVerdict),
    /// The connection ended or the receiver broke the protocol; the reader has stopped.
    Broken(Error),
}

/// Events queued for the main loop at most. Both threads wait when it is full: the hashing thread
/// stops running ahead, and the reader stops reading, so a receiver that floods messages meets
/// TCP back-pressure instead of growing the sender's memory. The main loop drains the queue at
/// every turn; a receiver says far less than this between two bodies (a group's verdicts, a
/// few answers parts).
pub(crate) const EVENT_QUEUE: usize = 1024;

/// How often the hashing thread appends new digests to the cache file.
const CACHE_SAVE: Duration = Duration::from_secs(1);

/// Hashes the listed files in order, from the cache where it knows them, and reports each digest.
/// A large file may be kept for its body (see `handoff`): then the bytes the body reads are hashed.
pub(super) fn spawn_hashing(
    items: &[Item],
    (cache, alg): (bool, HashAlg),
    bar: Bar,
    label: Option<String>,
    (events, handoff): (mpsc::SyncSender<Event>, Arc<Handoff>),
) -> std::thread::JoinHandle<()> {
    let files: Vec<(PathBuf, Stamp)> =
        items.iter().filter_map(|i| i.file.map(|s| (i.source.clone(), s))).collect();
    std::thread::spawn(move || {
        let mut cache = cache.then(|| DigestCache::open_default(alg));
        let mut saved = Instant::now();
        for (n, (source, stamp)) in files.into_iter().enumerate() {
            let path = source.display().to_string();
            if label.is_none() {
                bar.set_name(&path);
            }
            let mut kept = None;
            let digest = match cache.as_ref().and_then(|c| c.get(&stamp)) {
                Some(d) => {
                    // Known from the cache: done, but not hashed in this run.
                    bar.skip(stamp.size);
                    Ok((d, true))
                }
                None => {
                    let turn = if handoff.defers(stamp.size) { handoff.turn(n) } else { Turn::Read };
                    let hashed = match turn {
                        Turn::Stop => return,
                        Turn::Fed(fed) => digest_fed(fed, (stamp, alg), &bar, &path),
                        Turn::Read => {
                            let keep = handoff.keep(stamp.size);
                            let read = digest_of(&source, (stamp, alg), &bar, &path, keep);
                            if keep && read.is_err() {
                                handoff.unkeep(stamp.size);
                            }
                            read.map(|(d, bytes)| {
                                kept = bytes;
                                d
                            })
                        }
                    };
                    if let (Ok(d), Some(c)) = (&hashed, cache.as_mut()) {
                        c.put(stamp, *d);
                        // One large file is worth saving at once: a send interrupted now resumes
                        // without it.
                        if stamp.size >= 1 << 20 {
                            c.flush();
                        }
                    }
                    hashed.map(|d| (d, false))
                }
            };
            // Saved as it goes, so an interrupted send's retry does not hash it all again.
            if let Some(c) = cache.as_mut()
                && saved.elapsed() > CACHE_SAVE
            {
                c.flush();
                saved = Instant::now();
            }
            if digest.is_err() {
                bar.skip(stamp.size);
            }
            bar.file_done();
            if events.send(Event::Hashed(n, digest, kept)).is_err() {
                return;
            }
        }
        bar.finish_and_clear();
    })
}

/// The listed file's digest, by reading its listed size (advancing `bar`), and with `keep` its
/// bytes. The stamp of what was opened, taken after the read, must still be the listed one: a
/// file replaced, grown, shrunk or written to since it was listed fails (so one check, not one
/// before and one after).
fn digest_of(
    source: &Path,
    (stamp, alg): (Stamp, HashAlg),
    bar: &Bar,
    path: &str,
    keep: bool,
) -> Result<(Digest, Option<Vec<u8>>), Error> {
    let changed = || Error::Integrity(format!("{path} changed after it was listed; send it again"));
    let mut file = File::open(source).map_err(|e| Error::io(format!("cannot open {path}"), e))?;
    let read = hash_exact(alg, &mut file, stamp.size, bar, keep);
    let after =
        file.metadata().map(|m| Stamp::of(&m)).map_err(|e| Error::io(format!("cannot stat {path}"), e))?;
    if after != stamp {
        return Err(changed());
    }
    match read {
        Ok(r) => Ok(r),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(changed()),
        Err(e) => Err(Error::io(format!("cannot read {path}"), e)),
    }
}

/// The file's digest from the bytes its body read (advancing `bar`), handing each buffer back;
/// good only if the body path found the file unchanged once it was all read.
fn digest_fed(fed: Fed, (stamp, alg): (Stamp, HashAlg), bar: &Bar, path: &str) -> Result<Digest, Error> {
    let mut h = Hasher::new(alg);
    let mut total = 0u64;
    loop {
        match fed.rx.recv() {
            Ok(Piece::Bytes(batch)) => {
                for (buf, data) in &batch {
                    for r in data {
                        total += r.len() as u64;
                        bar.inc(r.len() as u64);
                        h.update(&buf[r.clone()]);
                    }
                }
                // The body path waits for them; if it has stopped, the end of the feed says so.
                let _ = fed.back.send(batch);
            }
            Ok(Piece::End { unchanged }) if unchanged && total == stamp.size => return Ok(h.finish()),
            Ok(Piece::End { .. }) => {
                return Err(Error::Integrity(format!(
                    "{path} changed while it was being sent; send it again"
                )));
            }
            Err(_) => {
                let cut = std::io::Error::other("its body was cut short");
                return Err(Error::io(format!("cannot read {path}"), cut));
            }
        }
    }
}

/// Opens a listed file and checks it is still the one that was listed.
pub(super) fn open_unchanged(source: &Path, stamp: Stamp) -> Result<File, Error> {
    let path = source.display().to_string();
    let f = File::open(source).map_err(|e| Error::io(format!("cannot open {path}"), e))?;
    let now = f.metadata().map(|m| Stamp::of(&m)).map_err(|e| Error::io(format!("cannot stat {path}"), e))?;
    if now != stamp {
        return Err(Error::Integrity(format!("{path} changed after it was listed; send it again")));
    }
    Ok(f)
}

/// Reads answers and verdicts until the connection ends, passing them on. A quiet stretch before
/// a message is not fatal here: only the main loop knows whether the receiver owes it anything,
/// and it keeps the time (`Run::check_silence`). A message that stops in the middle is.
pub(super) fn read_events(r: &mut FrameReader, events: mpsc::SyncSender<Event>) {
    loop {
        let event = match r.message() {
            Ok(Message::Answers(part)) => Event::Answers(part),
            Ok(Message::FileVerdict(v)) => Event::Verdict(v),
            Ok(other) => {
                let source = ProtocolError::UnexpectedMessage {
                    expected: "answers or file verdicts",
                    got: other.name(),
                };
                Event::Broken(Error::Protocol { peer: r.peer().to_string(), source })
            }
            Err(WireError::Io(e)) if is_timeout(&e) => continue,
            Err(e) => Event::Broken(r.error("waiting for answers", e)),
        };
        let stop = matches!(event, Event::Broken(_));
        if events.send(event).is_err() || stop {
            return;
        }
    }
}
