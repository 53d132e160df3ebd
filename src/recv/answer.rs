//! Answering one entry of a manifest: a folder is created (or found), a file is compared with
//! what the target folder holds and answered "send from offset N", "already have it" or refused.
//!
//! A file is answered before its digest arrives whenever nothing on the disk could match it: no
//! regular file of its size at its name (or a keep-both name), and no partial whose record only
//! its digest could match. Then its body goes out at once and is checked against the digest that
//! follows it. Otherwise the answer waits for the digest.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::Instant;

use super::manifest::Refused;
use crate::hash::Hasher;
use crate::progress::{Bar, Progress, human_bytes};
use crate::protocol::{Answer, Digest, Entry, EntryKind, RejectCode};
use crate::store::space::round_up;
use crate::store::{self, FileId, Kind, Opened, Partial, Reservation, Room, SafeDir};

/// What the receiver decided for one file answered `Send`, kept until its body comes.
pub(super) struct Plan {
    /// Position in the manifest, and among its files.
    pub index: usize,
    pub file_no: usize,
    pub offset: u64,
    /// The hash state of bytes `0..offset` for a resumed file. Fresh files get theirs when their
    /// body comes: 10,000 queued plans must not hold 10,000 hash states (2 KiB each for BLAKE3).
    pub hasher: Option<Hasher>,
    /// A resume record was written for it.
    pub record: bool,
    /// The partial, still locked, for a resumed file.
    pub held: Option<Partial>,
    /// Its body may arrive in a partial with no name (`Partial::unnamed`): it keeps no record,
    /// no partial is under its name, and it will not replace a file (no `--overwrite`).
    pub unnamed: bool,
}

/// How an entry is answered.
pub(super) struct Rules<'a> {
    pub overwrite: bool,
    /// Comparing with existing files stops here: the sender is waiting.
    pub until: Instant,
    /// A resumed partial may stay locked until its body (see `MAX_HELD`).
    pub hold: bool,
    /// A transfer of one file: it keeps a resume record whatever its size, and its partial stays
    /// locked from its answer to its body, so a second sender of the same name is told busy at
    /// once instead of after sending its whole body.
    pub single: bool,
    /// Nothing on the disk counts as "already have it" (`-o -`: the bytes must reach stdout).
    pub fresh: bool,
    /// Where a "checking" bar shows while a large copy or partial here is re-hashed.
    pub progress: &'a Progress,
}

/// Re-hashing a copy or a partial start of at least this size shows a "checking" bar on the
/// receiver's terminal (smaller ones take a moment, and a batch may hold thousands).
const CHECK_BAR_MIN: u64 = 16 << 20;

/// In a transfer of many files, files up to this size keep no record while they arrive, so they
/// never resume: for them a record costs more than resending does. A single file always does.
pub(crate) const RESUME_MIN: u64 = 1 << 20;

/// The answer for a folder: created now (validation is done: writing may start) or already there.
pub(super) fn answer_dir(dirs: &mut Dirs, entry: &Entry) -> io::Result<Answer> {
    let (parent_path, name) = entry.path.split_at(entry.path.len() - 1);
    let (_, created) = dirs.get(parent_path)?.subdir(&name[0], true)?;
    if created {
        dirs.created.insert(entry.path.clone());
        dirs.made = true;
    }
    Ok(if created { Answer::Send { offset: 0 } } else { Answer::Have { name: name[0].clone() } })
}

/// The answer for a file, with its digest if it has arrived. `Ok(None)`: the digest is needed
/// first (something here may hold this content, or a partial only the digest can resume).
/// `room`: the acceptance did not count this file (a same-size file was at its path), so it
/// reserves its room here before it is answered `Send`, or is refused for space.
pub(super) fn answer_file(
    dirs: &mut Dirs,
    (index, file_no, entry): (usize, usize, &Entry),
    digest: Option<&Digest>,
    rules: &Rules<'_>,
    room: Option<&mut Reservation<'_>>,
) -> io::Result<Option<(Answer, Option<Plan>)>> {
    let (parent_path, name) = entry.path.split_at(entry.path.len() - 1);
    let name = &name[0];
    let EntryKind::File { size, hash: alg, tag } = entry.kind else {
        unreachable!("answer_file takes files")
    };
    let resumable = size > RESUME_MIN || rules.single;
    let plan =
        |offset, hasher, record, held| Plan { index, file_no, offset, hasher, record, held, unnamed: false };
    // Nothing under its name to take over or remove: a partial with no name will do.
    let fresh = || Plan { unnamed: !rules.overwrite, ..plan(0, None, false, None) };
    let send = |plan| Ok(Some((Answer::Send { offset: 0 }, Some(plan))));
    // In a folder this transfer just created there is nothing to compare with or resume:
    // no lookups at all (names are still claimed no-replace, whatever appears meanwhile).
    if !resumable && dirs.created.contains(parent_path) {
        if let Some(reservation) = room {
            let need = Room::file(size, false, reservation.block());
            if let Err(available) = reservation.grow(need)? {
                let reason = no_room("this file", need, available);
                return Ok(Some((Answer::Reject { code: RejectCode::InsufficientSpace, reason }, None)));
            }
        }
        return send(fresh());
    }
    let parent = dirs.get(parent_path)?;
    let id = FileId { size, alg, digest: digest.copied(), tag: Some(tag) };
    let check = || {
        let shown = entry.path.join("/");
        if size >= CHECK_BAR_MIN { rules.progress.bytes("checking", &shown, 0, None) } else { Bar::hidden() }
    };
    match digest {
        _ if rules.fresh => {
            if digest.is_none() && id.digest_would_resume(parent, name) {
                return Ok(None);
            }
        }
        Some(d) => {
            let bar = check();
            let found =
                store::find_existing(parent, name, (size, alg, d), rules.overwrite, rules.until, &bar);
            bar.finish_and_clear();
            if let Some(stored) = found? {
                return Ok(Some((Answer::Have { name: stored }, None)));
            }
        }
        None => {
            if store::same_size_exists(parent, name, size, rules.overwrite)?
                || id.digest_would_resume(parent, name)
            {
                return Ok(None);
            }
        }
    }
    if let Some(reservation) = room {
        let block = reservation.block();
        let need = match Partial::held_for(parent, name, &id) {
            0 => Room::file(size, resumable, block),
            // The partial and its record are there: only the rest of the bytes.
            held => Room { bytes: round_up(size - held, block), inodes: 0 },
        };
        if let Err(available) = reservation.grow(need)? {
            let what = if rules.overwrite {
                "a replacement"
            } else if store::same_size_exists(parent, name, size, false)? {
                "a copy beside a file of the same size"
            } else {
                "this file"
            };
            let reason = no_room(what, need, available);
            return Ok(Some((Answer::Reject { code: RejectCode::InsufficientSpace, reason }, None)));
        }
    }
    // Nothing to resume and nothing worth a record: answer without touching the disk.
    if !resumable && Partial::absent(parent, name) {
        return send(fresh());
    }
    let bar = check();
    let opened = Partial::open(parent.try_clone()?, name, &id, rules.until, resumable, &bar);
    bar.finish_and_clear();
    match opened? {
        Opened::Ready { partial, offset, hasher } => {
            let record = partial.has_record();
            // A resumed partial stays locked until its body: its prefix was hashed and nothing
            // may change it in between. Past MAX_HELD it starts over instead. A single file's
            // stays locked too (see `Rules::single`).
            if (offset > 0 || rules.single) && rules.hold {
                let p = plan(offset, Some(hasher), record, Some(partial));
                return Ok(Some((Answer::Send { offset }, Some(p))));
            }
            drop(partial);
            send(plan(0, None, record, None))
        }
        Opened::Busy => {
            let reason = "another transfer of this file is in progress, try again later".into();
            Ok(Some((Answer::Reject { code: RejectCode::Busy, reason }, None)))
        }
    }
}

/// The answer for a stream (a file of unknown size, the one entry of its transfer): always
/// `Send { offset: 0 }` into a fresh partial, locked from now until its body. Never "already
/// have it" (its digest comes after its body) and never a resume (what a sender read from a pipe
/// it cannot read again): whatever partial of that name was there is emptied, and its record
/// goes with the partial. Its room is reserved as it arrives (`body::receive_stream`).
pub(super) fn answer_stream(
    dirs: &mut Dirs,
    (index, file_no, entry): (usize, usize, &Entry),
) -> io::Result<Option<(Answer, Option<Plan>)>> {
    let (parent_path, name) = entry.path.split_at(entry.path.len() - 1);
    let parent = dirs.get(parent_path)?;
    Ok(Some(match Partial::reopen(parent.try_clone()?, &name[0], 0, true)? {
        Some(p) => {
            let plan =
                Plan { index, file_no, offset: 0, hasher: None, record: true, held: Some(p), unnamed: false };
            (Answer::Send { offset: 0 }, Some(plan))
        }
        None => {
            let reason = "another transfer of this file is in progress, try again later".into();
            (Answer::Reject { code: RejectCode::Busy, reason }, None)
        }
    }))
}

/// Why `need` was refused with `available` left, for a refusal's reason.
pub(super) fn no_room(what: &str, need: Room, available: Room) -> String {
    if need.bytes > available.bytes {
        format!(
            "{what} needs {} ({} bytes) but the receiver has {} free",
            human_bytes(need.bytes),
            need.bytes,
            human_bytes(available.bytes)
        )
    } else {
        format!(
            "{what} needs {} files and folders but the receiver's file system has room for {} more (free inodes)",
            need.inodes, available.inodes
        )
    }
}

/// What the transfer will probably need, reserved when it is accepted.
pub(super) struct Needed {
    pub room: Room,
    /// The part of `room` the new folders take: what a batch that does not fit whole reserves
    /// before its files reserve their own, one by one (see [`Needed::per_file`]).
    pub folders: Room,
    /// By entry: a file not counted because a same-size regular file is at its path (most likely
    /// the same content: re-sending a tree must not need its size twice). If it is not, it
    /// reserves its own room before it is answered `Send` (see [`answer_file`]).
    pub uncounted: Vec<bool>,
}

/// Room the transfer will probably need: for each file its blocks and an inode (less what a
/// partial of the same version already holds: a resume needs only the rest) and, if it keeps a
/// resume record, a block and an inode for it; a block and an inode for each folder not there
/// yet. Files with a same-size regular file at their path are not counted (see [`Needed`]), nor
/// entries refused alone (they write nothing).
pub(super) fn likely_needed(
    root: &SafeDir,
    entries: &[Entry],
    refused: &Refused,
    block: u64,
) -> io::Result<Needed> {
    let single = super::manifest::is_single(entries);
    let mut dirs = Dirs::new(root)?;
    let folders = Room::entry(block) * new_folders(&mut dirs, entries, refused);
    let mut room = folders;
    let mut uncounted = vec![false; entries.len()];
    for (i, e) in entries.iter().enumerate() {
        if refused.get(i).is_some() {
            continue;
        }
        let (size, hash, tag) = match e.kind {
            EntryKind::File { size, hash, tag } => (size, hash, tag),
            // Its partial; its bytes reserve their room as they arrive.
            EntryKind::Stream { .. } => {
                room += Room::entry(block);
                continue;
            }
            EntryKind::Dir => continue,
        };
        let resumable = size > RESUME_MIN || single;
        let (parent, name) = e.path.split_at(e.path.len() - 1);
        // A folder that is not there yet holds nothing of it.
        let Ok(dir) = dirs.peek(parent) else {
            room += Room::file(size, resumable, block);
            continue;
        };
        if dir.kind(&name[0]).ok() == Some(Kind::File(size)) {
            uncounted[i] = true;
            continue;
        }
        let id = FileId { size, alg: hash, digest: None, tag: Some(tag) };
        room += match Partial::held_for(dir, &name[0], &id) {
            0 => Room::file(size, resumable, block),
            // The partial and its record are there: only the rest of the bytes.
            held => Room { bytes: round_up(size - held, block), inodes: 0 },
        };
    }
    Ok(Needed { room, folders, uncounted })
}

impl Needed {
    /// A batch that does not fit whole is refused per file instead: only its folders are
    /// reserved up front, and every file reserves its own room before it is answered `Send`, in
    /// manifest order, or is answered `Reject { InsufficientSpace }` when none is left.
    pub fn per_file(self, entries: &[Entry]) -> Needed {
        let uncounted = entries.iter().map(|e| matches!(e.kind, EntryKind::File { .. })).collect();
        Needed { room: self.folders, folders: self.folders, uncounted }
    }
}

/// How many folders the entries need that are not there: folders listed, and folders implied by
/// a deeper path. Each is looked up once (a folder below a missing one is missing too).
fn new_folders(dirs: &mut Dirs, entries: &[Entry], refused: &Refused) -> u64 {
    let mut there: HashMap<&[String], bool> = HashMap::new();
    let mut new = 0;
    for (_, e) in entries.iter().enumerate().filter(|&(i, _)| refused.get(i).is_none()) {
        let depth = if matches!(e.kind, EntryKind::Dir) { e.path.len() } else { e.path.len() - 1 };
        // The deepest folder of this path already decided; the ones below it are decided now.
        let mut known = depth;
        while known > 0 && !there.contains_key(&e.path[..known]) {
            known -= 1;
        }
        let mut is_there = known == 0 || there[&e.path[..known]];
        for d in known + 1..=depth {
            let path = &e.path[..d];
            is_there = is_there && dirs.peek(path).is_ok();
            new += u64::from(!is_there);
            there.insert(path, is_there);
        }
    }
    new
}

/// The folder of the previous entry, kept open: entries come in walk order, so siblings share it
/// and a transfer opens each folder about once without holding thousands of descriptors.
pub(super) struct Dirs {
    root: SafeDir,
    path: Option<Vec<String>>,
    dir: Option<SafeDir>,
    /// The last folder found missing by `peek`: its siblings' lookups fail without a syscall.
    missing: Option<Vec<String>>,
    /// Folders this transfer created (answer phase only).
    pub created: HashSet<Vec<String>>,
    /// Some folder was created through this handle: new folder entries need a durable flush of
    /// their own before a file in them is acknowledged.
    pub made: bool,
}

impl Dirs {
    pub fn new(root: &SafeDir) -> io::Result<Dirs> {
        Ok(Dirs {
            root: root.try_clone()?,
            path: None,
            dir: None,
            missing: None,
            created: HashSet::new(),
            made: false,
        })
    }

    /// The folder at `path` below the target folder, created if missing.
    pub fn get(&mut self, path: &[String]) -> io::Result<&SafeDir> {
        self.open(path, true)
    }

    /// Opens the folder at `path` one component at a time (see `SafeDir::subdir`), noting
    /// whether it created any.
    fn walk(&mut self, path: &[String], create: bool) -> io::Result<SafeDir> {
        let mut dir = self.root.try_clone()?;
        for c in path {
            let (sub, created) = dir.subdir(c, create)?;
            self.made |= created;
            dir = sub;
        }
        Ok(dir)
    }

    /// Like `get`, without creating folders.
    pub fn peek(&mut self, path: &[String]) -> io::Result<&SafeDir> {
        self.open(path, false)
    }

    fn open(&mut self, path: &[String], create: bool) -> io::Result<&SafeDir> {
        if !create && self.missing.as_deref() == Some(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        if self.path.as_deref() != Some(path) || self.dir.is_none() {
            self.dir = None;
            match self.walk(path, create) {
                Ok(d) => self.dir = Some(d),
                Err(e) => {
                    if e.kind() == io::ErrorKind::NotFound {
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
