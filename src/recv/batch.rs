//! The receiving side of a batch: the whole manifest is read and validated before anything is
//! written, every entry is answered in order, then the bodies arrive back to back and each file
//! is acknowledged once it is verified and on stable storage.
//!
//! Durability without a flush per file: verified files are renamed into place as they complete,
//! and a group of them (up to [`GROUP_FILES`] files or [`GROUP_BYTES`] bytes, or whatever is left
//! at the end) is made durable with one `syncfs` before any of them is acknowledged. A crash
//! before that `syncfs` can lose files that were never acknowledged; an acknowledged file is on
//! disk for good.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::body::{BodyError, DeadlineReader, receive_body, skip_body};
use super::{Seen, Shared, Stored, take_slot};
use crate::error::{Error, Limit};
use crate::hash::Hasher;
use crate::manifest;
use crate::partial::{Durability, FileId, Opened, Partial, RESUME_MIN};
use crate::progress::human_bytes;
use crate::protocol::{
    Answer, AnswersPart, Body, Digest, Entry, EntryKind, FileVerdict, HashAlg, MAX_ENTRIES, MAX_MESSAGE_LEN,
    ManifestPart, Message, ProtocolError, RejectCode, Reply, Verdict, WireError, Withdraw, bounded_reason,
    encode_message, read_message, write_message,
};
use crate::safedir::{Kind, SafeDir};
use crate::sanitize::escape;
use crate::store;

/// Files made durable and acknowledged together. Each is held open (locked) until its group is
/// flushed, so this also bounds the descriptors a batch holds.
pub(crate) const GROUP_FILES: usize = 128;
/// Bytes acknowledged together: bounds how much an interruption can cost.
pub(crate) const GROUP_BYTES: u64 = 256 << 20;
/// Resumed partials kept locked from their answer to their body, so nothing can change them in
/// between; past this many, further partials are answered from offset 0.
pub(crate) const MAX_HELD: usize = 64;
/// Time allowed for the whole manifest to arrive, however it trickles.
pub(crate) const MANIFEST_DEADLINE: Duration = Duration::from_secs(120);
/// Largest manifest, in bytes of path text plus a fixed cost per entry.
pub(crate) const MAX_MANIFEST_BYTES: usize = 64 << 20;
/// An answers part goes out at least this often, so the sender's idle timeout is fed.
pub(crate) const ANSWER_FLUSH: Duration = Duration::from_secs(1);

type Reader<'a> = BufReader<DeadlineReader<'a>>;
type Writer<'a> = BufWriter<&'a TcpStream>;

/// What the receiver decided for one file entry before the bodies.
struct Plan {
    index: usize,
    digest: Digest,
    offset: u64,
    /// The hash state of bytes `0..offset` for a resumed file. Fresh files get theirs when their
    /// body comes: 10,000 queued plans must not hold 10,000 hash states (2 KiB each for BLAKE3).
    hasher: Option<Hasher>,
    alg: HashAlg,
    record: bool,
    /// The partial, still locked, for a resumed file.
    held: Option<Partial>,
}

/// A verified file waiting for its group's sync before it gets its final name.
struct Pending {
    index: u32,
    partial: Partial,
    name: String,
}

pub(super) fn handle(
    shared: &Shared,
    (reader, writer): (&mut Reader<'_>, &mut Writer<'_>),
    peer: &str,
    first: ManifestPart,
    seen: &mut Seen,
) -> Result<Stored, Error> {
    let opts = &shared.opts;
    let idle = Limit { secs: opts.timeout.map_or(0, |t| t.as_secs()), option: "--timeout" };
    let wire = |what: &'static str| move |e: WireError| Error::wire(peer, what, idle, e);
    let send = |writer: &mut Writer<'_>, m: &Message| {
        write_message(writer, m)
            .and_then(|()| writer.flush())
            .map_err(|e| wire("answering the manifest")(e.into()))
    };
    let refuse = |writer: &mut Writer<'_>, code: RejectCode, reason: String| -> Result<Stored, Error> {
        let _ = send(writer, &Message::Reply(Reply::Reject { code, reason: bounded_reason(reason.clone()) }));
        Err(Error::Rejected { name: "the batch".into(), code, reason })
    };

    // The whole manifest first: one deadline, bounded by entries and bytes before it is stored.
    reader.get_mut().until = Some(Instant::now() + MANIFEST_DEADLINE);
    let mut bytes = manifest_bytes(&first);
    let mut entries = first.entries;
    let mut last = first.last;
    while !last && entries.len() <= MAX_ENTRIES && bytes <= MAX_MANIFEST_BYTES {
        match read_message(reader).map_err(wire("reading the manifest"))? {
            Message::Manifest(part) if part.entries.is_empty() && !part.last => {
                let source = ProtocolError::Malformed("empty manifest part".into());
                return Err(Error::Protocol { peer: peer.to_string(), source });
            }
            Message::Manifest(part) => {
                bytes += manifest_bytes(&part);
                entries.extend(part.entries);
                last = part.last;
            }
            other => {
                let source = ProtocolError::UnexpectedMessage { expected: "manifest", got: other.name() };
                return Err(Error::Protocol { peer: peer.to_string(), source });
            }
        }
    }
    reader.get_mut().until = None;
    seen.name = Some(format!("batch of {} entries", entries.len()));
    if bytes > MAX_MANIFEST_BYTES {
        let reason = format!("manifest refused: more than {MAX_MANIFEST_BYTES} bytes of paths");
        return refuse(writer, RejectCode::InvalidManifest, reason);
    }
    let summary = match manifest::validate(&entries) {
        Ok(s) => s,
        Err(e) => return refuse(writer, RejectCode::InvalidManifest, format!("manifest refused: {e}")),
    };
    seen.size = Some(summary.total_bytes);
    let Some(_slot) = take_slot(&shared.transfers, opts.max_transfers) else {
        let reason = format!("receiver busy: {} transfers in progress, try again later", opts.max_transfers);
        return refuse(writer, RejectCode::Busy, reason);
    };
    let root = match SafeDir::open_root(&opts.dir) {
        Ok(d) => d,
        Err(e) => return refuse(writer, RejectCode::Failed, format!("cannot open the target folder: {e}")),
    };
    // Space for what will probably be sent: files with a same-size file already at their path
    // are most likely there (re-sending a tree must not need its size twice). If one turns out to
    // differ, writing it may meet a full disk, which fails that file cleanly.
    let need = likely_needed(&root, &entries);
    let mut reservation = match shared.reserve(need) {
        Ok(Ok(r)) => r,
        Ok(Err(available)) => {
            let reason = format!(
                "batch needs {} but the receiver has {} free",
                human_bytes(need),
                human_bytes(available)
            );
            return refuse(writer, RejectCode::InsufficientSpace, reason);
        }
        Err(e) => return refuse(writer, RejectCode::Failed, format!("cannot read free space: {e}")),
    };

    // Accepted: an empty answers part says so, and the sender starts sending digests. From here
    // on, every entry is answered in order as soon as it can be (folders at once, files once
    // their digest is here), and bodies arrive for the files answered `Send`.
    send(writer, &Message::Answers(AnswersPart { answers: Vec::new(), last: false }))?;
    let compare_for = opts.timeout.map_or(Duration::from_secs(60), |t| t / 2);
    let mut digests: Vec<Option<Digest>> = Vec::new();
    let mut cursor = 0usize;
    let mut file_no = 0usize;
    let mut answer_dirs = Dirs::new(&root);
    let mut plans: VecDeque<Plan> = VecDeque::new();
    let mut created_dirs = Vec::new();
    let mut refused = 0usize;
    let mut there = 0usize;
    let mut held = 0usize;
    let mut pending: Vec<Pending> = Vec::new();
    let mut pending_bytes = 0u64;
    let mut verified = 0usize;
    let mut failed = 0usize;
    let mut bodies = 0usize;
    let bar = shared.progress.bytes("receiving", &format!("{} files", summary.files), summary.total_bytes);
    let mut dirs = Dirs::new(&root);
    let flush =
        |writer: &mut Writer<'_>, pending: &mut Vec<Pending>, verified: &mut usize, failed: &mut usize| {
            let (v, f) = flush_group(&root, writer, pending, opts.overwrite).map_err(|e| match e {
                GroupError::Local(e) => Error::io("making received files durable", e),
                GroupError::Wire(e) => wire("acknowledging files")(e.into()),
            })?;
            *verified += v;
            *failed += f;
            Ok::<(), Error>(())
        };
    // Ends the batch early: what was verified is acknowledged, partials that never got a byte go.
    macro_rules! give_up {
        ($err:expr) => {{
            let err = $err;
            let _ = flush(writer, &mut pending, &mut verified, &mut failed);
            abandon(&root, &entries, plans.drain(..));
            return Err(err);
        }};
    }
    let protocol_error =
        |what: String| Error::Protocol { peer: peer.to_string(), source: ProtocolError::Malformed(what) };
    loop {
        // Answer what can be answered, in parts sent by size or by time.
        let mut part = Vec::new();
        let mut part_len = 0;
        let mut last_flush = Instant::now();
        while cursor < entries.len() {
            let entry = &entries[cursor];
            let digest = match entry.kind {
                EntryKind::Dir => None,
                EntryKind::File { .. } => match digests.get(file_no) {
                    Some(d) => Some(*d),
                    None => break,
                },
            };
            let until = Instant::now() + compare_for;
            let hold = held < MAX_HELD;
            let (answer, plan) = match digest {
                Some(None) => {
                    let reason = "not sent: the sender could not read it".to_string();
                    Ok((Answer::Reject { code: RejectCode::Failed, reason }, None))
                }
                Some(Some(d)) => answer_file(&mut answer_dirs, entry, &d, opts.overwrite, until, hold),
                None => answer_dir(&mut answer_dirs, entry),
            }
            .unwrap_or_else(|e| {
                let reason = bounded_reason(format!("{}: {e}", display(&entry.path)));
                (Answer::Reject { code: RejectCode::Failed, reason }, None)
            });
            match (&answer, plan) {
                (Answer::Send { .. }, Some(mut p)) => {
                    p.index = cursor;
                    held += usize::from(p.held.is_some());
                    plans.push_back(p);
                }
                (Answer::Send { .. }, None) => created_dirs.push(cursor),
                (Answer::Reject { .. }, _) => refused += 1,
                (Answer::Have { .. }, _) if digest.is_some() => there += 1,
                _ => {}
            }
            cursor += 1;
            file_no += usize::from(digest.is_some());
            part_len +=
                encode_message(&Message::Answers(AnswersPart { answers: vec![answer.clone()], last: false }))
                    .len();
            part.push(answer);
            if part_len > MAX_MESSAGE_LEN as usize / 2 || last_flush.elapsed() > ANSWER_FLUSH {
                let last = cursor == entries.len();
                send(writer, &Message::Answers(AnswersPart { answers: std::mem::take(&mut part), last }))?;
                part_len = 0;
                last_flush = Instant::now();
            }
        }
        if !part.is_empty() {
            let last = cursor == entries.len();
            send(writer, &Message::Answers(AnswersPart { answers: part, last }))?;
        }
        if cursor == entries.len() && plans.is_empty() {
            break;
        }

        let message = match read_message(reader) {
            Ok(m) => m,
            Err(e) => give_up!(wire("reading the batch")(e)),
        };
        let plan = match message {
            Message::Digests(part) => {
                let files_left = summary.files - digests.len();
                if part.first as usize != digests.len() || part.digests.len() > files_left {
                    give_up!(protocol_error(format!(
                        "digests for files {}..{} when {} of {} are known",
                        part.first,
                        part.first as usize + part.digests.len(),
                        digests.len(),
                        summary.files
                    )));
                }
                // An empty part: the sender is still hashing. A good moment to acknowledge what
                // is verified, rather than keep it waiting for a group that is not coming soon.
                if part.digests.is_empty() && !pending.is_empty() {
                    flush(writer, &mut pending, &mut verified, &mut failed)?;
                    pending_bytes = 0;
                }
                digests.extend(part.digests);
                continue;
            }
            Message::Body(Body { index }) | Message::Withdraw(Withdraw { index, .. })
                if plans.front().is_some_and(|p| p.index == index as usize) =>
            {
                let plan = plans.pop_front().expect("just checked");
                held -= usize::from(plan.held.is_some());
                if let Message::Withdraw(w) = message {
                    abandon(&root, &entries, std::iter::once(plan));
                    failed += 1;
                    let v = FileVerdict {
                        index,
                        verdict: Verdict::Failed {
                            reason: bounded_reason(format!(
                                "not sent: {}",
                                crate::sanitize::peer_text(w.reason)
                            )),
                        },
                    };
                    send(writer, &Message::FileVerdict(v))?;
                    continue;
                }
                plan
            }
            Message::Body(Body { index }) | Message::Withdraw(Withdraw { index, .. }) => {
                let want = plans.front().map_or("none".to_string(), |p| p.index.to_string());
                give_up!(protocol_error(format!("body of entry {index} when entry {want} is due")));
            }
            other => {
                let source =
                    ProtocolError::UnexpectedMessage { expected: "digests or a body", got: other.name() };
                give_up!(Error::Protocol { peer: peer.to_string(), source });
            }
        };

        bodies += 1;
        let entry = &entries[plan.index];
        let EntryKind::File { size, .. } = &entry.kind else { unreachable!("plans hold files") };
        let digest = &plan.digest;
        let (parent, name) = entry.path.split_at(entry.path.len() - 1);
        let name = &name[0];
        let partial = match plan.held {
            Some(p) => Some(p),
            None => dirs
                .get(parent)
                .and_then(SafeDir::try_clone)
                .and_then(|d| Partial::reopen(d, name, plan.offset, plan.record))
                .ok()
                .flatten(),
        };
        let fail = |writer: &mut Writer<'_>, reason: String| {
            let v = FileVerdict {
                index: plan.index as u32,
                verdict: Verdict::Failed { reason: bounded_reason(reason) },
            };
            send(writer, &Message::FileVerdict(v))
        };
        let Some(partial) = partial else {
            // The body comes anyway (it was promised): take it off the wire and say why.
            if let Err(e) = skip_body(reader, 0, size - plan.offset) {
                give_up!(wire("receiving a body")(e));
            }
            failed += 1;
            fail(writer, format!("{}: the partial file is in use or gone", display(&entry.path)))?;
            continue;
        };
        let mut received = 0u64;
        let body = receive_body(
            reader,
            &partial,
            (*size, plan.offset, plan.hasher.unwrap_or_else(|| Hasher::new(plan.alg))),
            &mut received,
            &mut reservation,
            &bar,
        );
        seen.received += received;
        match body {
            Ok(d) if &d == digest => {
                if let Err(e) = partial.set_attributes(entry.mode, entry.mtime) {
                    partial.discard();
                    failed += 1;
                    fail(writer, format!("storing the file: {e}"))?;
                } else {
                    pending.push(Pending { index: plan.index as u32, partial, name: name.clone() });
                    pending_bytes += size;
                }
            }
            Ok(actual) => {
                partial.discard();
                failed += 1;
                let v = FileVerdict {
                    index: plan.index as u32,
                    verdict: Verdict::HashMismatch { expected: *digest, actual },
                };
                send(writer, &Message::FileVerdict(v))?;
            }
            Err(BodyError::Wire(e)) => {
                let err = wire("receiving a body")(e);
                if matches!(err, Error::Protocol { .. }) {
                    partial.discard();
                } else {
                    partial.keep();
                }
                give_up!(err);
            }
            Err(BodyError::TooLong(_)) => {
                partial.discard();
                give_up!(protocol_error(format!("body of {} runs past its size", display(&entry.path))));
            }
            Err(BodyError::Local(e, frame_left)) => {
                partial.discard();
                // The rest of this body is still on the wire: skip it to stay in step.
                if let Err(w) = skip_body(reader, frame_left, size - plan.offset - received - frame_left) {
                    give_up!(wire("receiving a body")(w));
                }
                failed += 1;
                fail(writer, format!("writing the file: {e}"))?;
            }
        }
        if pending.len() >= GROUP_FILES || pending_bytes >= GROUP_BYTES {
            flush(writer, &mut pending, &mut verified, &mut failed)?;
            pending_bytes = 0;
        }
    }
    flush(writer, &mut pending, &mut verified, &mut failed)?;
    bar.finish_and_clear();
    drop(answer_dirs);

    // Folders last, deepest first: writing files into them changed their mtimes.
    for &index in created_dirs.iter().rev() {
        let e = &entries[index];
        if let Ok(d) = root.walk(&e.path, false) {
            let _ = d.set_mode_and_mtime(e.mode, e.mtime);
        }
    }
    let _ = root.sync_filesystem();
    let name = format!(
        "{} files, {} folders: {verified} received, {there} already there, {} failed",
        summary.files,
        summary.dirs,
        failed + refused
    );
    if failed + refused > 0 {
        return Err(Error::Integrity(name));
    }
    Ok(Stored { name, already_had: bodies == 0, batch: true })
}

/// Bytes the batch will probably need: files without a same-size regular file at their path.
fn likely_needed(root: &SafeDir, entries: &[Entry]) -> u64 {
    let mut dirs = Dirs::new(root);
    entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File { size, .. } => {
                let (parent, name) = e.path.split_at(e.path.len() - 1);
                let there = dirs.peek(parent).and_then(|d| d.kind(&name[0])).ok();
                (there != Some(Kind::File(*size))).then_some(*size)
            }
            EntryKind::Dir => None,
        })
        .sum()
}

/// After a batch broke off: partials that were created while answering but never got a byte
/// are removed (resumed ones keep their data for next time).
fn abandon(root: &SafeDir, entries: &[Entry], rest: impl Iterator<Item = Plan>) {
    for plan in rest {
        if plan.offset > 0 || !plan.record {
            continue;
        }
        let path = &entries[plan.index].path;
        let (parent, name) = path.split_at(path.len() - 1);
        if let Ok(dir) = root.walk(parent, false)
            && let Ok(Some(p)) = Partial::reopen(dir, &name[0], 0, true)
        {
            p.discard();
        }
    }
}

/// Bytes a manifest part costs to hold: its path text plus a fixed amount per entry.
fn manifest_bytes(part: &ManifestPart) -> usize {
    part.entries.iter().map(|e| 96 + e.path.iter().map(|c| c.len() + 24).sum::<usize>()).sum()
}

enum GroupError {
    Local(std::io::Error),
    Wire(std::io::Error),
}

/// Makes a group of verified files durable, then gives them their final names, makes the names
/// durable, and only then acknowledges them: a crash at any point leaves each file either under
/// its hidden partial name or, complete and synced, under its final name. Returns (stored, failed).
fn flush_group(
    root: &SafeDir,
    writer: &mut Writer<'_>,
    pending: &mut Vec<Pending>,
    overwrite: bool,
) -> Result<(usize, usize), GroupError> {
    if pending.is_empty() {
        return Ok((0, 0));
    }
    root.sync_filesystem().map_err(GroupError::Local)?;
    let mut verdicts = Vec::with_capacity(pending.len());
    for p in pending.drain(..) {
        verdicts.push(match p.partial.commit_with(&p.name, overwrite, None, Durability::Deferred) {
            Ok(stored) => (p.index, Verdict::Verified { name: stored }),
            Err(e) => (p.index, Verdict::Failed { reason: bounded_reason(format!("storing the file: {e}")) }),
        });
    }
    root.sync_filesystem().map_err(GroupError::Local)?;
    let mut stored = 0;
    for (index, verdict) in &verdicts {
        stored += usize::from(matches!(verdict, Verdict::Verified { .. }));
        let v = FileVerdict { index: *index, verdict: verdict.clone() };
        write_message(writer, &Message::FileVerdict(v)).map_err(GroupError::Wire)?;
    }
    writer.flush().map_err(GroupError::Wire)?;
    Ok((stored, verdicts.len() - stored))
}

/// The answer for a folder: created now (validation is done: writing may start) or already there.
fn answer_dir(dirs: &mut Dirs<'_>, entry: &Entry) -> std::io::Result<(Answer, Option<Plan>)> {
    let (parent_path, name) = entry.path.split_at(entry.path.len() - 1);
    let (_, created) = dirs.get(parent_path)?.subdir(&name[0], true)?;
    if created {
        dirs.created.insert(entry.path.clone());
    }
    let answer = if created { Answer::Send { offset: 0 } } else { Answer::Have { name: name[0].clone() } };
    Ok((answer, None))
}

/// The answer for a file whose digest is known, and if it is to be sent, its plan.
fn answer_file(
    dirs: &mut Dirs<'_>,
    entry: &Entry,
    digest: &Digest,
    overwrite: bool,
    until: Instant,
    hold: bool,
) -> std::io::Result<(Answer, Option<Plan>)> {
    let (parent_path, name) = entry.path.split_at(entry.path.len() - 1);
    let name = &name[0];
    let EntryKind::File { size, hash: alg } = &entry.kind else { unreachable!("answer_file takes files") };
    let alg = *alg;
    let resumable = *size > RESUME_MIN;
    let plan =
        |offset, hasher, record, held| Plan { index: 0, digest: *digest, offset, hasher, alg, record, held };
    // In a folder this batch just created there is nothing to compare with or resume:
    // no lookups at all (the renames stay no-replace, whatever appears meanwhile).
    if !resumable && dirs.created.contains(parent_path) {
        return Ok((Answer::Send { offset: 0 }, Some(plan(0, None, false, None))));
    }
    let parent = dirs.get(parent_path)?;
    if let Some(stored) = store::find_existing(parent, name, (*size, alg, digest), overwrite, until)? {
        return Ok((Answer::Have { name: stored }, None));
    }
    // Nothing to resume and nothing worth a record: answer without touching the disk.
    if !resumable && Partial::absent(parent, name) {
        return Ok((Answer::Send { offset: 0 }, Some(plan(0, None, false, None))));
    }
    match Partial::open(
        parent.try_clone()?,
        name,
        &FileId { size: *size, alg, digest: Some(*digest), tag: None },
        until,
        resumable,
    )? {
        Opened::Ready { partial, offset, hasher } => {
            let record = partial.has_record();
            // A resumed partial stays locked until its body: its prefix was hashed and
            // nothing may change it in between. Past MAX_HELD it starts over instead.
            if offset > 0 && hold {
                return Ok((
                    Answer::Send { offset },
                    Some(plan(offset, Some(hasher), record, Some(partial))),
                ));
            }
            drop(partial);
            Ok((Answer::Send { offset: 0 }, Some(plan(0, None, record, None))))
        }
        Opened::Busy => Ok((
            Answer::Reject {
                code: RejectCode::Busy,
                reason: "another transfer of this file is in progress".into(),
            },
            None,
        )),
    }
}

/// The folder of the previous entry, kept open: entries come in walk order, so siblings share it
/// and a batch opens each folder about once without holding thousands of descriptors.
struct Dirs<'a> {
    root: &'a SafeDir,
    path: Option<Vec<String>>,
    dir: Option<SafeDir>,
    /// The last folder found missing by `peek`: its siblings' lookups fail without a syscall.
    missing: Option<Vec<String>>,
    /// Folders this batch created (answer phase only).
    created: std::collections::HashSet<Vec<String>>,
}

impl<'a> Dirs<'a> {
    fn new(root: &'a SafeDir) -> Dirs<'a> {
        Dirs { root, path: None, dir: None, missing: None, created: Default::default() }
    }

    fn get(&mut self, path: &[String]) -> std::io::Result<&SafeDir> {
        self.open(path, true)
    }

    /// Like `get`, without creating folders.
    fn peek(&mut self, path: &[String]) -> std::io::Result<&SafeDir> {
        self.open(path, false)
    }

    fn open(&mut self, path: &[String], create: bool) -> std::io::Result<&SafeDir> {
        if !create && self.missing.as_deref() == Some(path) {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        if self.path.as_deref() != Some(path) || self.dir.is_none() {
            self.dir = None;
            match self.root.walk(path, create) {
                Ok(d) => self.dir = Some(d),
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        self.missing = Some(path.to_vec());
                    }
                    return Err(e);
                }
            }
            self.path = Some(path.to_vec());
            self.missing = None;
        }
        Ok(self.dir.as_ref().expect("just set"))
    }
}

fn display(path: &[String]) -> String {
    escape(&path.join("/"))
}
