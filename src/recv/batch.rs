//! The receiving side of a batch: the whole manifest is read and validated before anything is
//! written, every entry is answered in order, then the bodies arrive back to back and each file
//! is acknowledged once it is verified and on stable storage.
//!
//! Durability without a flush per file: verified files are renamed into place as they complete,
//! and a group of them (up to [`GROUP_FILES`] files or [`GROUP_BYTES`] bytes, or whatever is left
//! at the end) is made durable with one `syncfs` before any of them is acknowledged. A crash
//! before that `syncfs` can lose files that were never acknowledged; an acknowledged file is on
//! disk for good.

use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::body::{BodyError, DeadlineReader, Reservation, receive_body};
use super::{Seen, Shared, Stored, take_slot};
use crate::error::{Error, Limit};
use crate::hash::Hasher;
use crate::manifest;
use crate::partial::{Durability, Opened, Partial, RESUME_MIN};
use crate::progress::human_bytes;
use crate::protocol::{
    Answer, AnswersPart, Entry, EntryKind, FileVerdict, MAX_ENTRIES, MAX_MESSAGE_LEN, ManifestPart, Message,
    ProtocolError, RejectCode, Reply, Verdict, WireError, bounded_reason, encode_message, read_message,
    write_message,
};
use crate::safedir::SafeDir;
use crate::sanitize::escape;
use crate::store;

/// Files acknowledged together after one `syncfs`.
const GROUP_FILES: usize = 1024;
/// Bytes acknowledged together after one `syncfs`: bounds how much an interruption can cost.
const GROUP_BYTES: u64 = 256 << 20;

type Reader<'a> = BufReader<DeadlineReader<'a>>;
type Writer<'a> = BufWriter<&'a TcpStream>;

/// What the receiver decided for one file entry before the bodies.
struct Plan {
    index: usize,
    offset: u64,
    hasher: Hasher,
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

    // The whole manifest first, bounded by entry count before it is stored.
    let mut entries = first.entries;
    let mut last = first.last;
    while !last {
        if entries.len() > MAX_ENTRIES {
            break;
        }
        match read_message(reader).map_err(wire("reading the manifest"))? {
            Message::Manifest(part) => {
                entries.extend(part.entries);
                last = part.last;
            }
            other => {
                let source = ProtocolError::UnexpectedMessage { expected: "manifest", got: other.name() };
                return Err(Error::Protocol { peer: peer.to_string(), source });
            }
        }
    }
    seen.name = Some(format!("batch of {} entries", entries.len()));
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
    let mut reservation = {
        let mut reserved = shared.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let free = store::free_space(&opts.dir).unwrap_or(0);
        let available = free.saturating_sub(*reserved);
        if summary.total_bytes > available {
            let reason = format!(
                "batch is {} but the receiver has {} free",
                human_bytes(summary.total_bytes),
                human_bytes(available)
            );
            drop(reserved);
            return refuse(writer, RejectCode::InsufficientSpace, reason);
        }
        *reserved += summary.total_bytes;
        Reservation { pool: &shared.reserved, left: summary.total_bytes }
    };

    // Answer every entry, in order, in parts: the sender's read timeout keeps being fed.
    let check_until = Instant::now() + opts.timeout.map_or(Duration::from_secs(60), |t| t / 2);
    let mut dirs = Dirs::new(&root);
    let mut plans = Vec::new();
    let mut created_dirs = Vec::new();
    let mut part = Vec::new();
    let mut part_len = 0;
    for (index, entry) in entries.iter().enumerate() {
        let answer =
            answer(&mut dirs, entry, opts.overwrite, check_until).unwrap_or_else(|e| Answer::Reject {
                code: RejectCode::Failed,
                reason: bounded_reason(format!("{}: {e}", display(&entry.path))),
            });
        match (&answer, &entry.kind) {
            (Answer::Send { offset }, EntryKind::File { .. }) => {
                let hasher = dirs.take_hasher();
                plans.push(Plan { index, offset: *offset, hasher });
            }
            (Answer::Send { .. }, EntryKind::Dir) => created_dirs.push(index),
            _ => {}
        }
        part_len +=
            encode_message(&Message::Answers(AnswersPart { answers: vec![answer.clone()], last: false }))
                .len();
        part.push(answer);
        if part_len > MAX_MESSAGE_LEN as usize / 2 {
            send(writer, &Message::Answers(AnswersPart { answers: std::mem::take(&mut part), last: false }))?;
            part_len = 0;
        }
    }
    send(writer, &Message::Answers(AnswersPart { answers: part, last: true }))?;
    drop(dirs);

    // Bodies, back to back, in manifest order.
    let mut pending: Vec<(u32, String)> = Vec::new();
    let mut pending_bytes = 0u64;
    let mut verified = 0usize;
    let mut failed = 0usize;
    let total_plans = plans.len();
    let bar = shared.progress.bytes("receiving", &format!("{total_plans} files"), summary.total_bytes);
    let mut dirs = Dirs::new(&root);
    for (n, plan) in plans.into_iter().enumerate() {
        let entry = &entries[plan.index];
        let EntryKind::File { size, digest, .. } = &entry.kind else { unreachable!("plans hold files") };
        let (parent, name) = entry.path.split_at(entry.path.len() - 1);
        let name = &name[0];
        let opened = dirs
            .get(parent)
            .and_then(|d| d.try_clone())
            .and_then(|d| Partial::reopen(d, name, plan.offset, *size > RESUME_MIN));
        let Ok(Some(partial)) = opened else {
            // The sender sends the body anyway: it was promised. Without a partial we cannot
            // take it, so the batch ends here and the sender learns why.
            let reason = format!("{}: partial file no longer available", display(&entry.path));
            let v =
                FileVerdict { index: plan.index as u32, verdict: Verdict::Failed { reason: reason.clone() } };
            let _ = send(writer, &Message::FileVerdict(v));
            return Err(Error::io(reason, std::io::Error::other("lost the partial file")));
        };
        let mut received = 0u64;
        let body = receive_body(
            reader,
            &partial,
            (*size, plan.offset, plan.hasher),
            &mut received,
            &mut reservation,
            &bar,
        );
        seen.received += received;
        let verdict = match body {
            Ok(d) if &d == digest => {
                match partial.commit_with(
                    name,
                    opts.overwrite,
                    entry.mode,
                    Some(entry.mtime),
                    Durability::Deferred,
                ) {
                    Ok(stored) => {
                        pending.push((plan.index as u32, stored));
                        pending_bytes += size;
                        None
                    }
                    Err(e) => {
                        Some(Verdict::Failed { reason: bounded_reason(format!("storing the file: {e}")) })
                    }
                }
            }
            Ok(actual) => {
                partial.discard();
                Some(Verdict::HashMismatch { expected: *digest, actual })
            }
            Err(BodyError::Wire(e)) => {
                let err = wire("receiving a body")(e);
                if matches!(err, Error::Protocol { .. }) {
                    partial.discard();
                } else {
                    partial.keep();
                }
                // Whatever was verified so far is made durable and acknowledged.
                let _ = flush_group(&root, writer, &mut pending);
                return Err(err);
            }
            Err(BodyError::TooLong(_)) => {
                partial.discard();
                let err = Error::Protocol {
                    peer: peer.to_string(),
                    source: ProtocolError::Malformed(format!(
                        "body of {} runs past its size",
                        display(&entry.path)
                    )),
                };
                let _ = flush_group(&root, writer, &mut pending);
                return Err(err);
            }
            Err(BodyError::Local(e)) => {
                partial.discard();
                Some(Verdict::Failed { reason: bounded_reason(format!("writing the file: {e}")) })
            }
        };
        if let Some(v) = verdict {
            failed += 1;
            send(writer, &Message::FileVerdict(FileVerdict { index: plan.index as u32, verdict: v }))?;
        }
        if pending.len() >= GROUP_FILES || pending_bytes >= GROUP_BYTES || n + 1 == total_plans {
            verified += flush_group(&root, writer, &mut pending).map_err(|e| match e {
                GroupError::Local(e) => Error::io("making received files durable", e),
                GroupError::Wire(e) => wire("acknowledging files")(e.into()),
            })?;
            pending_bytes = 0;
        }
    }
    bar.finish_and_clear();

    // Folders last, deepest first: writing files into them changed their mtimes.
    for &index in created_dirs.iter().rev() {
        let e = &entries[index];
        if let Ok(d) = root.walk(&e.path, false) {
            let _ = d.set_mode_and_mtime(e.mode, e.mtime);
        }
    }
    let _ = root.sync_filesystem();
    let name = format!(
        "{} files, {} folders: {verified} received, {} already there, {failed} failed",
        summary.files,
        summary.dirs,
        summary.files - total_plans
    );
    if failed > 0 {
        return Err(Error::Integrity(format!("{failed} of {total_plans} files failed")));
    }
    Ok(Stored { name, already_had: total_plans == 0, batch: true })
}

enum GroupError {
    Local(std::io::Error),
    Wire(std::io::Error),
}

/// Makes the pending files durable with one `syncfs`, then acknowledges them. Returns how many.
fn flush_group(
    root: &SafeDir,
    writer: &mut Writer<'_>,
    pending: &mut Vec<(u32, String)>,
) -> Result<usize, GroupError> {
    if pending.is_empty() {
        return Ok(0);
    }
    root.sync_filesystem().map_err(GroupError::Local)?;
    let n = pending.len();
    for (index, name) in pending.drain(..) {
        let v = FileVerdict { index, verdict: Verdict::Verified { name } };
        write_message(writer, &Message::FileVerdict(v)).map_err(GroupError::Wire)?;
    }
    writer.flush().map_err(GroupError::Wire)?;
    Ok(n)
}

/// The answer for one entry. Creates folders (validation is done: writing may start).
fn answer(dirs: &mut Dirs<'_>, entry: &Entry, overwrite: bool, until: Instant) -> std::io::Result<Answer> {
    let (parent_path, name) = entry.path.split_at(entry.path.len() - 1);
    let name = &name[0];
    let parent = dirs.get(parent_path)?;
    match &entry.kind {
        EntryKind::Dir => {
            let (_, created) = parent.subdir(name, true)?;
            Ok(if created { Answer::Send { offset: 0 } } else { Answer::Have })
        }
        EntryKind::File { size, digest, .. } => {
            if store::find_existing(parent, name, (*size, digest), overwrite, until)?.is_some() {
                return Ok(Answer::Have);
            }
            let resumable = *size > RESUME_MIN;
            // Nothing to resume and nothing worth a record: answer without touching the disk.
            if !resumable && Partial::absent(parent, name) {
                return Ok(Answer::Send { offset: 0 });
            }
            match Partial::open(parent.try_clone()?, name, (*size, digest), until, resumable)? {
                Opened::Ready { partial, offset, hasher } => {
                    // Unlocked until its body comes; `reopen` checks it is still there.
                    drop(partial);
                    dirs.hasher = Some(hasher);
                    Ok(Answer::Send { offset })
                }
                Opened::Busy => Ok(Answer::Reject {
                    code: RejectCode::Busy,
                    reason: "another transfer of this file is in progress".into(),
                }),
            }
        }
    }
}

/// The folder of the previous entry, kept open: entries come in walk order, so siblings share it
/// and a batch opens each folder about once without holding thousands of descriptors.
struct Dirs<'a> {
    root: &'a SafeDir,
    path: Option<Vec<String>>,
    dir: Option<SafeDir>,
    hasher: Option<Hasher>,
}

impl<'a> Dirs<'a> {
    fn new(root: &'a SafeDir) -> Dirs<'a> {
        Dirs { root, path: None, dir: None, hasher: None }
    }

    fn get(&mut self, path: &[String]) -> std::io::Result<&SafeDir> {
        if self.path.as_deref() != Some(path) || self.dir.is_none() {
            self.dir = Some(self.root.walk(path, true)?);
            self.path = Some(path.to_vec());
        }
        Ok(self.dir.as_ref().expect("just set"))
    }

    fn take_hasher(&mut self) -> Hasher {
        self.hasher.take().unwrap_or_default()
    }
}

fn display(path: &[String]) -> String {
    escape(&path.join("/"))
}
