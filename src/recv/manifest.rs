//! The receiver's reading and check of a whole manifest, done before a single byte is written.
//!
//! A tree can hurt the receiver in ways no single name can: two entries that become one file on a
//! case-insensitive or normalising file system (Windows, macOS), a file that is also a folder or a
//! parent, a path too deep or too long for the OS to create halfway through a batch. Tools that
//! trusted the peer's file list and checked it piecemeal, as they wrote, kept shipping fixes for
//! it (rsync CVE-2022-29154 and CVE-2024-12087, croc CVE-2023-43619). So the receiver checks every
//! rule over the entire manifest first, in two passes:
//!
//! - the universal rules (names, depth, length, exact duplicates, a file used as a folder): a
//!   manifest that breaks one comes from no honest sender, and is refused as a whole;
//! - the rules of the target's file system ([`FsRules`]): a name it cannot hold, or two names it
//!   would merge (on a case-insensitive one). These come from honest senders on other systems, so
//!   only the entries concerned are refused ([`Refused`]) and the rest of the batch lands.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use unicode_normalization::UnicodeNormalization;

use crate::error::Error;
use crate::protocol::{
    Entry, EntryKind, MAX_DEPTH, MAX_ENTRIES, MAX_PATH_LEN, MAX_TOTAL_SIZE, ManifestPart, Message,
    ProtocolError,
};
use crate::sanitize::{FsRules, NameError, escape, validate_for, validate_name};
use crate::transport::FrameReader;

/// Time allowed for the whole manifest to arrive after its first part, however it trickles.
pub(crate) const MANIFEST_DEADLINE: Duration = Duration::from_secs(120);
/// Largest manifest, in bytes of modelled memory ([`entry_cost`]).
pub(crate) const MAX_MANIFEST_BYTES: usize = 160 << 20;
/// Memory a connection may spend on a manifest before it has a transfer slot: a manifest that is
/// not complete by then takes a slot (or is refused as busy) before another part is read.
pub(crate) const PRE_SLOT_MANIFEST: usize = 512 << 10;
/// Memory set aside for the manifests of all transfers holding a slot together; a manifest that
/// finds it used up is refused as busy.
pub(crate) const MANIFEST_MEMORY: usize = 160 << 20;

/// A transfer of a single file: a manifest of exactly one entry, a file. Its failure is reported
/// as itself, its log line names it, and it always keeps a resume record.
pub(super) fn is_single(entries: &[Entry]) -> bool {
    matches!(entries, [e] if e.has_body())
}

/// A manifest being read: its entries so far and what they cost.
pub(super) struct Reading {
    pub entries: Vec<Entry>,
    pub cost: usize,
    pub last: bool,
}

impl Reading {
    pub fn new(first: ManifestPart) -> Reading {
        Reading { cost: cost(None, &first.entries), entries: first.entries, last: first.last }
    }

    /// Past [`MAX_ENTRIES`] or [`MAX_MANIFEST_BYTES`]: no more is read ([`validate`] refuses the
    /// first; the caller refuses the second).
    pub fn over_limits(&self) -> bool {
        self.entries.len() > MAX_ENTRIES || self.cost > MAX_MANIFEST_BYTES
    }

    /// Reads the next part. Returns what it cost.
    pub fn read_part(&mut self, r: &mut FrameReader) -> Result<usize, Error> {
        let source = match r.message().map_err(|e| r.error("reading the manifest", e))? {
            Message::Manifest(part) if part.entries.is_empty() && !part.last => {
                ProtocolError::Malformed("empty manifest part".into())
            }
            Message::Manifest(part) => {
                let more = cost(self.entries.last(), &part.entries);
                self.cost += more;
                self.entries.extend(part.entries);
                self.last = part.last;
                return Ok(more);
            }
            other => ProtocolError::UnexpectedMessage { expected: "manifest", got: other.name() },
        };
        Err(Error::Protocol { peer: r.peer().to_string(), source })
    }
}

/// The memory set aside for manifests ([`MANIFEST_MEMORY`]), shared by all transfers.
pub(crate) struct MemoryPool {
    used: Mutex<usize>,
    cap: usize,
}

/// A transfer's share of the pool, returned when dropped.
pub(crate) struct Held<'a> {
    pool: &'a MemoryPool,
    bytes: usize,
}

impl MemoryPool {
    pub fn new(cap: usize) -> MemoryPool {
        MemoryPool { used: Mutex::new(0), cap }
    }

    /// Takes `bytes` from the pool, if it has them.
    pub fn take(&self, bytes: usize) -> Option<Held<'_>> {
        let mut held = Held { pool: self, bytes: 0 };
        held.grow(bytes).then_some(held)
    }
}

impl Held<'_> {
    /// Takes `bytes` more; false (and nothing taken) if the pool has not got them.
    pub fn grow(&mut self, bytes: usize) -> bool {
        let mut used = self.pool.used.lock().unwrap_or_else(|e| e.into_inner());
        if *used + bytes > self.pool.cap {
            return false;
        }
        *used += bytes;
        self.bytes += bytes;
        true
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        *self.pool.used.lock().unwrap_or_else(|e| e.into_inner()) -= self.bytes;
    }
}

/// Bytes `entries` cost to hold, `before` being the entry that came just before them (the last
/// of the previous part), if any.
fn cost(before: Option<&Entry>, entries: &[Entry]) -> usize {
    let befores = std::iter::once(before).chain(entries.iter().map(Some));
    befores.zip(entries).map(|(before, e)| entry_cost(before, e)).sum()
}

/// What one entry costs the receiver in memory, from its decoding to the end of [`validate`]: a
/// model of the heap it takes (the entry, each component's `String`, and the folded copy, map slot
/// and node that validation adds for a component that is a new path; the folded copy is made only
/// for a case-insensitive target, whose pass runs after the first pass's map is freed).
///
/// Components an entry shares with the one `before` it (the same strings, from the first on)
/// cost only their `String`: validation walked that prefix for the entry before and finds its
/// nodes again, so they add no node. A tree in walk order (a folder, then what is in it) shares
/// all but its last component with the entry before, and so costs about half what the same
/// entries cost in any other order; entries that share nothing cost a node per component, as
/// before. The unit test `memory::the_cost_model_covers_the_heap` measures the real heap of the
/// worst shapes and of a walk-order tree with a counting allocator and holds the model to it.
pub(crate) fn entry_cost(before: Option<&Entry>, e: &Entry) -> usize {
    let shared = before.map_or(0, |b| b.path.iter().zip(&e.path).take_while(|(a, b)| a == b).count());
    let (old, new) = e.path.split_at(shared);
    ENTRY_COST
        + old.iter().map(|c| SHARED_COMPONENT_COST + c.len()).sum::<usize>()
        + new.iter().map(|c| COMPONENT_COST + 2 * c.len()).sum::<usize>()
}

/// Heap per entry beyond its components (the `Entry` in its vector, which may be doubling).
const ENTRY_COST: usize = 200;
/// Heap per component that is a new path: its `String` (header and allocation), the folded copy
/// that validation keys its map with, the map slot, and the node list. Measured: about 230 bytes
/// for a one-letter component; the bytes of the name count twice (the original and the folded
/// copy).
const COMPONENT_COST: usize = 256;
/// Heap per component shared with the entry before: its `String` alone, a 24-byte header in the
/// path's vector and an allocation of at least 32 bytes (glibc's smallest chunk), so 56 bytes for
/// a name of up to 24 bytes and never more than 64 plus its length.
const SHARED_COMPONENT_COST: usize = 64;

/// Why a manifest was refused as a whole. Paths are stored as they are displayed: each component
/// escaped with [`escape`] and joined with `/`, so the error is safe to print or send as is and
/// its message is always one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is empty")]
    Empty,
    #[error("manifest has {0} entries, the limit is {MAX_ENTRIES}")]
    TooManyEntries(usize),
    /// `index` is the entry's position in the manifest: an empty path has nothing else to name.
    #[error("entry {index} has an empty path")]
    EmptyPath { index: usize },
    #[error("\"{path}\" is {depth} components deep, the limit is {MAX_DEPTH}")]
    TooDeep { path: String, depth: usize },
    /// `component` counts from 0; the message counts from 1.
    #[error("\"{path}\": component {} is refused: {error}", .component + 1)]
    BadName { path: String, component: usize, error: NameError },
    #[error("\"{path}\" is {len} bytes long, the limit is {MAX_PATH_LEN}")]
    PathTooLong { path: String, len: usize },
    /// Two entries name exactly the same path (a file and a folder, or one listed twice).
    #[error("\"{path}\" is listed twice")]
    Duplicate { path: String },
    /// `path` lies below `file`: a file and a folder at the same path, or a file used as a parent.
    #[error("\"{path}\" is below \"{file}\", which is a file")]
    BelowFile { path: String, file: String },
    /// The sizes of the files up to and including `path` add up to more than the limit.
    #[error("files add up to more than {MAX_TOTAL_SIZE} bytes at \"{path}\"")]
    TooLarge { path: String },
    /// A stream (a file of unknown size, `xfer send -`) must be the one entry of its manifest.
    #[error("\"{path}\" is a stream of unknown size: it must be the only entry of its transfer")]
    StreamNotAlone { path: String },
}

/// Totals of a valid manifest. `dirs` counts listed folders only, not implied parents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub files: usize,
    pub dirs: usize,
    pub total_bytes: u64,
}

/// Folds one component for a case-insensitive target: NFC, then `char::to_lowercase` on each
/// character. NFC rather than NFD: two names are canonically equivalent exactly when their NFC
/// forms (or their NFD forms) are equal, so either finds the same collisions, and NFC keeps a
/// name's usual length (names are mostly NFC already; NFD would lengthen every accented one, and
/// the memory model counts the folded copy as long as the name). A per-character lowercase, not
/// full Unicode case folding (`ß` and `ss` stay apart) nor `str::to_lowercase` (which lowers a
/// final `Σ` to `ς` and so would tell `ΑΣ` from `ασ`): it merges what the common
/// case-insensitive file systems merge: `É` written precomposed or as `E` + U+0301, and
/// `Readme` vs `README`. A pair it misses is still caught by the file system itself when the
/// second file arrives: it finds the first under its name and keeps both.
fn fold(component: &str) -> String {
    component.nfc().flat_map(char::to_lowercase).collect()
}

/// A path for an error message: each component escaped, joined with `/`.
/// Paths longer than [`SHOWN_PATH`] bytes are cut (with `…`), so a message always has room for
/// the rule that was broken within a reason's `MAX_REASON_LEN`.
fn show(path: &[String]) -> String {
    let mut s = path.iter().map(|c| escape(c)).collect::<Vec<_>>().join("/");
    if s.len() > SHOWN_PATH {
        let mut end = SHOWN_PATH;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Longest path shown in a [`ManifestError`], in bytes.
const SHOWN_PATH: usize = 200;

/// What the manifest says about one path (exact, or folded for a case-insensitive target). The
/// index is the entry that listed it or, for an implied folder, the first entry below it (named
/// if a file later claims the same path).
#[derive(Clone, Copy)]
enum Node {
    Implied(usize),
    Dir(usize),
    File(usize),
}

/// The parent of every first component: not a node, as it is never a file.
const ROOT: usize = usize::MAX;

/// A manifest that may go on: its totals (refused entries included: their digests still come)
/// and the entries refused alone.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub summary: Summary,
    pub refused: Refused,
}

/// Why one entry is refused alone by this receiver's file system; the rest of the batch goes on.
/// Kept small (no text) so a manifest refused entry by entry costs little more memory; the
/// reason is written when the entry is answered ([`Refusal::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Component `component` (from 0) is a name the file system cannot hold.
    Name { component: u8, error: NameError },
    /// The same path as entry `other` once case and Unicode form are ignored.
    SamePath { other: u32 },
    /// Below entry `file`, a file, once case and Unicode form are ignored.
    BelowFile { file: u32 },
    /// A file where entry `below` needs a folder, once case and Unicode form are ignored.
    AboveEntry { below: u32 },
}

const IGNORING: &str = "on the receiver's file system, which ignores case and Unicode form";

impl Refusal {
    /// The reason sent with the answer of entry `index`: the rule, and both paths when two
    /// entries meet, each escaped once.
    pub fn reason(self, entries: &[Entry], index: usize) -> String {
        let this = show(&entries[index].path);
        let other = |i: u32| show(&entries[i as usize].path);
        match self {
            Refusal::Name { component, error } => {
                format!("\"{this}\": component {} is refused: {error}", component + 1)
            }
            Refusal::SamePath { other: o } => {
                let other = other(o);
                // NFC and NFD spellings print alike: say why two equal-looking paths are two.
                let alike = this.nfc().eq(other.nfc());
                let spelled = if alike { " (spelled with other Unicode code points)" } else { "" };
                format!("\"{this}\" is refused: it is the same path as \"{other}\"{spelled} {IGNORING}")
            }
            Refusal::BelowFile { file } => {
                format!("\"{this}\" is refused: it lies below \"{}\", a file, {IGNORING}", other(file))
            }
            Refusal::AboveEntry { below } => format!(
                "\"{this}\" is refused: it is a file where \"{}\" needs a folder {IGNORING}",
                other(below)
            ),
        }
    }
}

/// The entries of a manifest refused alone, in manifest order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refused(Vec<(u32, Refusal)>);

impl Refused {
    /// Why entry `index` is refused, if it is.
    pub fn get(&self, index: usize) -> Option<Refusal> {
        let i = self.0.binary_search_by_key(&index, |&(i, _)| i as usize).ok()?;
        Some(self.0[i].1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Checks the entire manifest for a target whose file system needs `rules`: the universal rules
/// (see [`ManifestError`]) refuse it as a whole, the target's refuse entries alone ([`Refused`]).
/// Folders that are parents of entries need not be listed themselves: they are implied. Entries
/// may come in any order.
///
/// Runs in time linear in the manifest's bytes: the paths form a tree keyed by (parent node,
/// component), so each component is hashed once, and "is any parent a file?" is answered while
/// walking down, instead of hashing every prefix of every path (up to 64 × 4 KiB per entry,
/// which a hostile peer could multiply by [`MAX_ENTRIES`]). The target's pass builds its folded
/// tree only after the first pass's tree is freed.
pub fn validate(entries: &[Entry], rules: FsRules) -> Result<Checked, ManifestError> {
    let summary = validate_universal(entries)?;
    Ok(Checked { summary, refused: refuse_for_target(entries, rules) })
}

/// The universal pass: exact paths, so `Case.txt` and `case.txt`, or the NFC and NFD spellings
/// of a name, are two names here.
fn validate_universal(entries: &[Entry]) -> Result<Summary, ManifestError> {
    // Counted first, so a huge manifest costs nothing more than having been received.
    if entries.is_empty() {
        return Err(ManifestError::Empty);
    }
    if entries.len() > MAX_ENTRIES {
        return Err(ManifestError::TooManyEntries(entries.len()));
    }
    if entries.len() > 1
        && let Some(e) = entries.iter().find(|e| matches!(e.kind, EntryKind::Stream { .. }))
    {
        return Err(ManifestError::StreamNotAlone { path: show(&e.path) });
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut children: HashMap<(usize, &str), usize> = HashMap::new();
    let mut summary = Summary { files: 0, dirs: 0, total_bytes: 0 };

    for (index, entry) in entries.iter().enumerate() {
        check_shape(index, &entry.path)?;
        if let EntryKind::File { size, .. } = entry.kind {
            summary.total_bytes = summary
                .total_bytes
                .checked_add(size)
                .filter(|&t| t <= MAX_TOTAL_SIZE)
                .ok_or_else(|| ManifestError::TooLarge { path: show(&entry.path) })?;
        }

        let last = entry.path.len() - 1;
        let mut parent = ROOT;
        for (depth, component) in entry.path.iter().enumerate() {
            let next = nodes.len();
            let id = *children.entry((parent, component.as_str())).or_insert(next);
            if id == next {
                // A new path: the entry itself, or a parent it implies.
                nodes.push(if depth < last { Node::Implied(index) } else { listed(index, &entry.kind) });
            } else if depth < last {
                if let Node::File(file) = nodes[id] {
                    let file = show(&entries[file].path);
                    return Err(ManifestError::BelowFile { path: show(&entry.path), file });
                }
            } else {
                match (nodes[id], &entry.kind) {
                    (Node::Dir(_) | Node::File(_), _) => {
                        return Err(ManifestError::Duplicate { path: show(&entry.path) });
                    }
                    // An earlier entry already lies below this path, so it cannot be a file.
                    (Node::Implied(below), EntryKind::File { .. } | EntryKind::Stream { .. }) => {
                        let path = show(&entries[below].path);
                        return Err(ManifestError::BelowFile { path, file: show(&entry.path) });
                    }
                    (Node::Implied(_), EntryKind::Dir) => nodes[id] = Node::Dir(index),
                }
            }
            parent = id;
        }
        match entry.kind {
            EntryKind::Dir => summary.dirs += 1,
            EntryKind::File { .. } | EntryKind::Stream { .. } => summary.files += 1,
        }
    }
    Ok(summary)
}

/// The target's pass, over a manifest that passed the universal one: names its file system
/// cannot hold, and on a case-insensitive one entries that meet once folded ([`fold`]). The
/// first entry of such a pair lands; the later one is refused. Two folders that fold alike are
/// one folder there and merge (as they would when copied there by hand); a refused entry adds
/// nothing to the tree, so what lies below a refused folder is refused too (its name, or the
/// file it meets).
fn refuse_for_target(entries: &[Entry], rules: FsRules) -> Refused {
    let mut refused = Vec::new();
    if rules == FsRules::POSIX {
        return Refused(refused);
    }
    let mut nodes: Vec<Node> = Vec::new();
    let mut children: HashMap<(usize, String), usize> = HashMap::new();
    'entries: for (index, entry) in entries.iter().enumerate() {
        let bad =
            entry.path.iter().enumerate().find_map(|(c, name)| Some((c, validate_for(name, rules).err()?)));
        if let Some((component, error)) = bad {
            // MAX_DEPTH (64) components at most: the position fits.
            refused.push((index as u32, Refusal::Name { component: component as u8, error }));
            continue;
        }
        if !rules.case_insensitive {
            continue;
        }
        let last = entry.path.len() - 1;
        let mut parent = ROOT;
        for (depth, component) in entry.path.iter().enumerate() {
            let next = nodes.len();
            let id = *children.entry((parent, fold(component))).or_insert(next);
            // MAX_ENTRIES (250,000) entries at most: positions fit.
            let refusal = if id == next {
                nodes.push(if depth < last { Node::Implied(index) } else { listed(index, &entry.kind) });
                None
            } else if depth < last {
                match nodes[id] {
                    Node::File(file) => Some(Refusal::BelowFile { file: file as u32 }),
                    Node::Dir(_) | Node::Implied(_) => None,
                }
            } else {
                match (nodes[id], &entry.kind) {
                    (Node::File(other), _)
                    | (Node::Dir(other), EntryKind::File { .. } | EntryKind::Stream { .. }) => {
                        Some(Refusal::SamePath { other: other as u32 })
                    }
                    (Node::Implied(below), EntryKind::File { .. } | EntryKind::Stream { .. }) => {
                        Some(Refusal::AboveEntry { below: below as u32 })
                    }
                    (Node::Implied(_), EntryKind::Dir) => {
                        nodes[id] = Node::Dir(index);
                        None
                    }
                    (Node::Dir(_), EntryKind::Dir) => None,
                }
            };
            if let Some(r) = refusal {
                refused.push((index as u32, r));
                continue 'entries;
            }
            parent = id;
        }
    }
    Refused(refused)
}

fn listed(index: usize, kind: &EntryKind) -> Node {
    match kind {
        EntryKind::Dir => Node::Dir(index),
        EntryKind::File { .. } | EntryKind::Stream { .. } => Node::File(index),
    }
}

/// The rules that concern one path alone. Depth is checked before the names so a path of
/// thousands of components is refused without looking at each.
fn check_shape(index: usize, path: &[String]) -> Result<(), ManifestError> {
    if path.is_empty() {
        return Err(ManifestError::EmptyPath { index });
    }
    if path.len() > MAX_DEPTH {
        return Err(ManifestError::TooDeep { path: show(path), depth: path.len() });
    }
    for (component, name) in path.iter().enumerate() {
        validate_name(name).map_err(|error| ManifestError::BadName { path: show(path), component, error })?;
    }
    // Components are valid, hence non-empty and free of '/': the joined length is exact.
    let len = path.iter().map(String::len).sum::<usize>() + path.len() - 1;
    if len > MAX_PATH_LEN {
        return Err(ManifestError::PathTooLong { path: show(path), len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::HashAlg;

    fn p(path: &str) -> Vec<String> {
        path.split('/').map(String::from).collect()
    }

    fn dir(path: &str) -> Entry {
        Entry { path: p(path), kind: EntryKind::Dir, mode: 0o755, mtime: (0, 0) }
    }

    fn file(path: &str, size: u64) -> Entry {
        let kind = EntryKind::File { size, hash: HashAlg::Sha256, tag: [0; 16] };
        Entry { path: p(path), kind, mode: 0o644, mtime: (0, 0) }
    }

    /// An entry whose components are given one by one, so they may contain '/'.
    fn raw(components: &[&str]) -> Entry {
        Entry { path: components.iter().map(|c| c.to_string()).collect(), ..dir("x") }
    }

    /// The manifest checked for a Linux target, where nothing is refused alone.
    fn validate(entries: &[Entry]) -> Result<Summary, ManifestError> {
        let checked = super::validate(entries, FsRules::POSIX)?;
        assert!(checked.refused.is_empty(), "{:?}", checked.refused);
        Ok(checked.summary)
    }

    /// The entries refused alone on a target with `rules`, by position.
    fn refused(entries: &[Entry], rules: FsRules) -> Vec<(u32, Refusal)> {
        super::validate(entries, rules).expect("valid everywhere").refused.0
    }

    fn summary(files: usize, dirs: usize, total_bytes: u64) -> Result<Summary, ManifestError> {
        Ok(Summary { files, dirs, total_bytes })
    }

    fn duplicate(path: &str) -> Result<Summary, ManifestError> {
        Err(ManifestError::Duplicate { path: path.into() })
    }

    fn below_file(path: &str, file: &str) -> Result<Summary, ManifestError> {
        Err(ManifestError::BelowFile { path: path.into(), file: file.into() })
    }

    #[test]
    fn accepts_nested_tree() {
        let m = [dir("a"), dir("a/b"), file("a/b/c.txt", 3), file("a/d", 4), file("e", 0)];
        assert_eq!(validate(&m), summary(3, 2, 7));
    }

    #[test]
    fn accepts_unicode_names() {
        let m = [dir("Ünïcödé"), file("Ünïcödé/日本語.txt", 1), file("Ünïcödé/emoji 🎉", 2)];
        assert_eq!(validate(&m), summary(2, 1, 3));
    }

    #[test]
    fn accepts_empty_dirs_and_implied_parents() {
        let m = [dir("empty"), file("x/y/z", 5), dir("x/y/w"), dir("x")];
        assert_eq!(validate(&m), summary(1, 3, 5));
    }

    #[test]
    fn accepts_listed_parent_after_its_children() {
        assert_eq!(validate(&[file("a/b", 1), dir("a")]), summary(1, 1, 1));
    }

    #[test]
    fn accepts_limits_exactly() {
        let deep = vec!["d"; MAX_DEPTH].join("/");
        // 17 components of 240 bytes and 16 separators: 4096 bytes.
        let long = vec!["l".repeat(240); 17].join("/");
        let m = [dir(&deep), file(&long, MAX_TOTAL_SIZE)];
        assert_eq!(validate(&m), summary(1, 1, MAX_TOTAL_SIZE));
    }

    #[test]
    fn accepts_max_entries() {
        let m: Vec<Entry> = (0..MAX_ENTRIES).map(|i| file(&format!("f{i}"), 1)).collect();
        assert_eq!(validate(&m), summary(MAX_ENTRIES, 0, MAX_ENTRIES as u64));
    }

    #[test]
    fn rejects_traversal_in_any_component() {
        let bad = |path: &str, component, error| {
            Err(ManifestError::BadName { path: path.into(), component, error })
        };
        assert_eq!(validate(&[raw(&[".."])]), bad("..", 0, NameError::DotOrDotDot));
        assert_eq!(validate(&[raw(&["a", "..", "b"])]), bad("a/../b", 1, NameError::DotOrDotDot));
        assert_eq!(validate(&[raw(&["a", "."])]), bad("a/.", 1, NameError::DotOrDotDot));
        assert_eq!(validate(&[raw(&["a", "b/../../c"])]), bad("a/b/../../c", 1, NameError::Separator('/')));
        assert_eq!(validate(&[raw(&["/etc"])]), bad("/etc", 0, NameError::Separator('/')));
        assert_eq!(validate(&[raw(&["a", "x\0"])]), bad("a/x\\u{0}", 1, NameError::ControlChar(0)));
        assert_eq!(validate(&[raw(&["a", "", "b"])]), bad("a//b", 1, NameError::Empty));
        // A bad entry anywhere refuses the batch, not just itself.
        let m = [dir("ok"), file("ok/f", 1), raw(&["ok", ".."])];
        assert_eq!(validate(&m), bad("ok/..", 1, NameError::DotOrDotDot));
    }

    #[test]
    fn rejects_empty_path() {
        let m = [dir("a"), raw(&[])];
        assert_eq!(validate(&m), Err(ManifestError::EmptyPath { index: 1 }));
    }

    #[test]
    fn rejects_exact_duplicates() {
        assert_eq!(validate(&[file("a/b", 1), file("a/b", 1)]), duplicate("a/b"));
        assert_eq!(validate(&[dir("a"), dir("a")]), duplicate("a"));
        assert_eq!(validate(&[file("a", 1), dir("a")]), duplicate("a"));
        // Whatever the target: an exact duplicate comes from no honest sender.
        let err = super::validate(&[file("x", 1), file("x", 1)], FsRules::WINDOWS).unwrap_err();
        assert_eq!(err, ManifestError::Duplicate { path: "x".into() });
    }

    #[test]
    fn rejects_file_as_parent() {
        assert_eq!(validate(&[file("a", 1), file("a/b", 1)]), below_file("a/b", "a"));
        assert_eq!(validate(&[file("a/b", 1), dir("a/b/c/d")]), below_file("a/b/c/d", "a/b"));
        // The same when the file comes second.
        assert_eq!(validate(&[dir("a/b/c"), file("a", 1)]), below_file("a/b/c", "a"));
    }

    #[test]
    fn case_and_unicode_twins_are_two_names_on_a_case_sensitive_target() {
        let m = [
            file("\u{C9}", 1),
            file("E\u{301}", 1),
            file("Readme", 1),
            file("README", 2),
            dir("Docs"),
            file("docs/a", 1),
            file("DOCS/A", 1),
            dir("a"),
            file("A", 1),
            file("\u{C9}t\u{E9}/x", 1),
            file("e\u{301}te\u{301}", 1),
        ];
        assert_eq!(validate(&m), summary(9, 2, 10));
    }

    #[test]
    fn a_case_insensitive_target_refuses_the_later_of_two_twins_alone() {
        let same = |other| Refusal::SamePath { other };
        for rules in [FsRules::CASEFOLD, FsRules::WINDOWS] {
            // NFC and NFD, case, and both at once.
            assert_eq!(refused(&[file("\u{C9}", 1), file("E\u{301}", 1)], rules), [(1, same(0))]);
            assert_eq!(refused(&[file("Readme", 1), file("README", 2)], rules), [(1, same(0))]);
            assert_eq!(refused(&[file("caf\u{E9}", 1), file("CAFE\u{301}", 2)], rules), [(1, same(0))]);
            // In a folder: the folders merge, the files meet.
            let m = [dir("Docs"), file("docs/a", 1), file("DOCS/A", 1), file("docs/b", 1)];
            assert_eq!(refused(&m, rules), [(2, same(1))]);
            // A file and a folder.
            assert_eq!(refused(&[dir("a"), file("A", 1)], rules), [(1, same(0))]);
            assert_eq!(refused(&[file("a", 1), dir("A")], rules), [(1, same(0))]);
            // Below a file, and a file where a folder is needed; what lies below a refused
            // folder is refused too.
            let m =
                [file("\u{C9}", 1), file("e\u{301}/x", 1), dir("E\u{301}/y"), file("b/c", 1), file("B", 1)];
            let r = refused(&m, rules);
            assert_eq!(r[..2], [(1, Refusal::BelowFile { file: 0 }), (2, Refusal::BelowFile { file: 0 })]);
            assert_eq!(r[2..], [(4, Refusal::AboveEntry { below: 3 })]);
            // Distinct names stay distinct; Greek capital sigma folds alike anywhere in a word.
            assert_eq!(refused(&[file("a", 1), file("b", 1), file("\u{C9}x", 1)], rules), []);
            assert_eq!(
                refused(&[file("\u{391}\u{3A3}", 1), file("\u{3B1}\u{3C3}", 1)], rules),
                [(1, same(0))]
            );
        }
    }

    #[test]
    fn a_windows_like_target_refuses_what_it_cannot_hold_alone() {
        let name = |component, error| Refusal::Name { component, error };
        let m = [
            dir("d"),
            file("d/a:b.txt", 1),
            file("d/ok.txt", 1),
            dir("CON"),
            file("CON/x", 1),
            file("trailing ", 1),
            file("back\\slash.txt", 1),
            file(".XFER-x", 1),
        ];
        let checked = super::validate(&m, FsRules::WINDOWS).unwrap();
        assert_eq!(checked.summary, Summary { files: 6, dirs: 2, total_bytes: 6 });
        assert_eq!(
            checked.refused.0,
            [
                (1, name(1, NameError::WindowsChar(':'))),
                (3, name(0, NameError::ReservedDevice("CON"))),
                (4, name(0, NameError::ReservedDevice("CON"))),
                (5, name(0, NameError::TrailingDotOrSpace)),
                (6, name(0, NameError::WindowsChar('\\'))),
                (7, name(0, NameError::ReservedPrefixAnyCase)),
            ]
        );
        // A casefold folder holds all of these but `.XFER-x`.
        assert_eq!(refused(&m, FsRules::CASEFOLD), [(7, name(0, NameError::ReservedPrefixAnyCase))]);
        assert_eq!(refused(&m, FsRules::POSIX), []);
    }

    #[test]
    fn a_refusal_names_both_paths_escaped_once() {
        let m = [file("d/Back\\slash", 1), file("d/back\\SLASH", 1), file("a:b", 1)];
        let reason = |i, rules| {
            let r = super::validate(&m, rules).unwrap().refused;
            r.get(i).map(|r| r.reason(&m, i))
        };
        assert_eq!(
            reason(1, FsRules::CASEFOLD).unwrap(),
            "\"d/back\\\\SLASH\" is refused: it is the same path as \"d/Back\\\\slash\" on the receiver's \
             file system, which ignores case and Unicode form"
        );
        assert_eq!(
            reason(2, FsRules::WINDOWS).unwrap(),
            "\"a:b\": component 1 is refused: name contains `:`, which the receiver's file system (FAT, \
             exFAT, NTFS or SMB) cannot hold"
        );
        let m = [file("caf\u{E9}", 1), file("cafe\u{301}", 1)];
        let r = super::validate(&m, FsRules::CASEFOLD).unwrap().refused;
        assert_eq!(
            r.get(1).unwrap().reason(&m, 1),
            "\"cafe\u{301}\" is refused: it is the same path as \"caf\u{E9}\" (spelled with other Unicode \
             code points) on the receiver's file system, which ignores case and Unicode form"
        );
        // The first of the pair lands.
        let r = super::validate(&m, FsRules::CASEFOLD).unwrap().refused;
        assert_eq!((r.get(0), r.len()), (None, 1));
    }

    #[test]
    fn rejects_too_many_entries() {
        // The count is checked before any entry is looked at, so cheap identical clones will do.
        let m = vec![dir("a"); MAX_ENTRIES + 1];
        assert_eq!(validate(&m), Err(ManifestError::TooManyEntries(MAX_ENTRIES + 1)));
    }

    #[test]
    fn rejects_too_deep() {
        let deep = vec!["d"; MAX_DEPTH + 1].join("/");
        assert_eq!(validate(&[dir(&deep)]), Err(ManifestError::TooDeep { path: deep, depth: MAX_DEPTH + 1 }));
    }

    #[test]
    fn rejects_too_long_path() {
        let mut parts = vec!["l".repeat(240); 17];
        parts[0].push('l');
        let long = parts.join("/");
        let len = MAX_PATH_LEN + 1;
        // The path is shown cut to its first SHOWN_PATH bytes, so the rule fits in a reason.
        let shown = format!("{}…", &long[..SHOWN_PATH]);
        let err = validate(&[file(&long, 1)]).unwrap_err();
        assert_eq!(err, ManifestError::PathTooLong { path: shown, len });
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn rejects_total_size_overflow() {
        let half = u64::MAX / 2 + 1;
        let m = [file("a", half), file("b", half)];
        assert_eq!(validate(&m), Err(ManifestError::TooLarge { path: "a".into() }));
        // Sizes each fine, sum over the limit.
        let m = [file("a", MAX_TOTAL_SIZE), file("b", 1)];
        assert_eq!(validate(&m), Err(ManifestError::TooLarge { path: "b".into() }));
    }

    #[test]
    fn rejects_empty_manifest() {
        assert_eq!(validate(&[]), Err(ManifestError::Empty));
    }

    #[test]
    fn error_message_is_one_escaped_line() {
        let err = validate(&[raw(&["dir", "evil\n\u{202E}txt.exe"])]).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n') && !msg.contains('\u{202E}'), "{msg}");
        assert!(msg.starts_with("\"dir/evil\\u{a}\\u{202e}txt.exe\": component 2 is refused"), "{msg}");
    }

    /// The universal rules stated naively, in quadratic time, to check the linear algorithm
    /// against.
    fn model_accepts(m: &[Entry]) -> bool {
        let keys: Vec<_> = m.iter().map(|e| &e.path).collect();
        let sizes = m.iter().map(|e| match e.kind {
            EntryKind::File { size, .. } => u128::from(size),
            EntryKind::Dir | EntryKind::Stream { .. } => 0,
        });
        let below_file = |i: usize, j: usize| m[i].has_body() && keys[j].starts_with(keys[i]);
        (1..=MAX_ENTRIES).contains(&m.len())
            && m.iter().enumerate().all(|(i, e)| check_shape(i, &e.path).is_ok())
            && sizes.sum::<u128>() <= u128::from(MAX_TOTAL_SIZE)
            && (0..m.len()).all(|i| (0..m.len()).all(|j| i == j || (keys[i] != keys[j] && !below_file(i, j))))
    }

    /// The target's rules stated naively: an entry is refused if a component breaks them, or (on a
    /// case-insensitive target) if it meets an earlier entry that was not refused, once folded:
    /// the same path unless both are folders, below that entry as a file, or a file above it.
    fn model_refused(m: &[Entry], rules: FsRules) -> Vec<usize> {
        let keys: Vec<Vec<String>> = m.iter().map(|e| e.path.iter().map(|c| fold(c)).collect()).collect();
        let is_file = |i: usize| matches!(m[i].kind, EntryKind::File { .. });
        let below = |i: usize, j: usize| keys[i].len() > keys[j].len() && keys[i].starts_with(&keys[j]);
        let mut refused: Vec<usize> = Vec::new();
        for i in 0..m.len() {
            let meets = |j: usize| {
                (keys[i] == keys[j] && (is_file(i) || is_file(j)))
                    || (is_file(j) && below(i, j))
                    || (is_file(i) && below(j, i))
            };
            let bad_name = m[i].path.iter().any(|c| validate_for(c, rules).is_err());
            let met = rules.case_insensitive && (0..i).any(|j| !refused.contains(&j) && meets(j));
            if bad_name || met {
                refused.push(i);
            }
        }
        refused
    }

    fn component() -> impl Strategy<Value = String> {
        // Mostly a tiny alphabet, so duplicates, case and NFC/NFD pairs and files used as parents
        // come up often; sometimes anything at all, hostile characters included.
        prop_oneof![4 => "(a|A|b|\u{C9}|e\u{301}|E\u{301}|a:|CON)", 1 => "(\\PC|[./\\\\:\u{202E}])*"]
    }

    fn entry() -> impl Strategy<Value = Entry> {
        let size = prop_oneof![Just(None), (0u64..100).prop_map(Some), any::<u64>().prop_map(Some)];
        (prop::collection::vec(component(), 0..4), size).prop_map(|(path, size)| match size {
            Some(size) => Entry { path, ..file("x", size) },
            None => Entry { path, ..dir("x") },
        })
    }

    proptest! {
        #[test]
        fn never_panics_and_agrees_with_model(m in prop::collection::vec(entry(), 0..12)) {
            for rules in [FsRules::POSIX, FsRules::CASEFOLD, FsRules::WINDOWS] {
                let result = super::validate(&m, rules);
                prop_assert_eq!(result.is_ok(), model_accepts(&m), "{:?}", result);
                if let Ok(c) = result {
                    prop_assert_eq!(c.summary.files + c.summary.dirs, m.len());
                    let refused: Vec<usize> = c.refused.0.iter().map(|&(i, _)| i as usize).collect();
                    prop_assert_eq!(refused, model_refused(&m, rules), "{:?}", rules);
                }
            }
        }
    }

    /// The heap a manifest really takes, measured with a counting allocator, against the model.
    mod memory {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        use super::*;

        struct Counting;

        thread_local! {
            static ON: Cell<bool> = const { Cell::new(false) };
            static LIVE: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
        }

        // SAFETY: forwards to the system allocator; only counts, on the measuring thread.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, l: Layout) -> *mut u8 {
                count(l.size() as isize);
                unsafe { System.alloc(l) }
            }
            unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
                count(-(l.size() as isize));
                unsafe { System.dealloc(p, l) }
            }
            unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
                count(new as isize - l.size() as isize);
                unsafe { System.realloc(p, l, new) }
            }
        }

        /// Counts `delta` bytes, plus malloc's own overhead: glibc rounds a request up to 16 bytes
        /// and adds 8, with a 32-byte minimum chunk.
        fn count(delta: isize) {
            let _ = ON.try_with(|on| {
                if on.get() {
                    let chunk = |n: isize| {
                        if n == 0 { 0 } else { ((n.abs() + 8 + 15) / 16 * 16).max(32) * n.signum() }
                    };
                    LIVE.with(|l| l.set(l.get() + chunk(delta)));
                    PEAK.with(|p| p.set(p.get().max(LIVE.with(Cell::get))));
                }
            });
        }

        #[global_allocator]
        static A: Counting = Counting;

        /// Measures the peak heap of decoding `entries` from the wire, holding them and validating
        /// them for a Linux target, and asserts the model covers it.
        fn peak_heap(entries: Vec<Entry>) {
            peak_heap_for(entries, FsRules::POSIX)
        }

        /// [`peak_heap`] for a target with `rules`.
        fn peak_heap_for(entries: Vec<Entry>, rules: FsRules) {
            let n = entries.len();
            // As the sender cuts it: parts that each fit a message.
            let mut payloads = Vec::new();
            let mut part = Vec::new();
            for e in entries {
                if part.iter().map(Entry::encoded_len).sum::<usize>() + e.encoded_len() > 60_000 {
                    let m =
                        Message::Manifest(ManifestPart { entries: std::mem::take(&mut part), last: false });
                    payloads.push(crate::protocol::encode_message(&m));
                }
                part.push(e);
            }
            payloads.push(crate::protocol::encode_message(&Message::Manifest(ManifestPart {
                entries: part,
                last: true,
            })));
            LIVE.with(|l| l.set(0));
            PEAK.with(|p| p.set(0));
            ON.with(|on| on.set(true));
            // As the receiver reads it: each part decoded, its entries appended.
            let (mut all, mut model) = (Vec::new(), 0);
            for payload in &payloads {
                let Ok(Message::Manifest(part)) = crate::protocol::decode_message(payload) else {
                    unreachable!()
                };
                model += cost(all.last(), &part.entries);
                all.extend(part.entries);
            }
            let summary = crate::recv::manifest::validate(&all, rules);
            drop(all);
            ON.with(|on| on.set(false));
            assert!(summary.is_ok(), "{summary:?}");
            let peak = PEAK.with(Cell::get) as usize;
            eprintln!(
                "{n} entries: peak heap {peak} bytes, model {model} ({} an entry): heap/model {:.2}",
                model / n,
                peak as f64 / model as f64
            );
            assert!(peak <= model, "the model ({model} bytes) is below the measured heap ({peak} bytes)");
        }

        /// A tree as the sender walks it: each folder, then what is in it (names sorted). `fanout`
        /// folders at each level below `root`, then `files` files in each folder of the last level.
        fn walk_order(root: &str, fanout: &[usize], files: usize) -> Vec<Entry> {
            fn visit(out: &mut Vec<Entry>, path: Vec<String>, fanout: &[usize], files: usize) {
                out.push(Entry { path: path.clone(), ..dir("x") });
                let child = |name: String| path.iter().cloned().chain([name]).collect::<Vec<_>>();
                match fanout.split_first() {
                    Some((&n, rest)) => {
                        (0..n).for_each(|i| visit(out, child(format!("dir-{i}")), rest, files))
                    }
                    None => out.extend(
                        (0..files).map(|i| Entry { path: child(format!("file-{i:04}.txt")), ..file("x", 1) }),
                    ),
                }
            }
            let mut out = Vec::new();
            visit(&mut out, vec![root.to_string()], fanout, files);
            out
        }

        fn name(i: usize) -> String {
            format!("{i:x}")
        }

        #[test]
        fn the_cost_model_covers_the_heap() {
            // Deep one-letter paths, every node distinct: the most components per wire byte.
            let deep = (0..500)
                .map(|i| Entry {
                    path: std::iter::once(name(i)).chain((1..MAX_DEPTH).map(|_| "a".into())).collect(),
                    ..dir("x")
                })
                .collect();
            peak_heap(deep);
            // Many shallow files with short names.
            peak_heap((0..20_000).map(|i| Entry { path: vec![name(i)], ..file("x", 1) }).collect());
            // Long components.
            let long = (0..200)
                .map(|i| Entry {
                    path: (0..16).map(|j| format!("{}{}", name(i * 16 + j), "n".repeat(240))).collect(),
                    ..dir("x")
                })
                .collect();
            peak_heap(long);
            // A tree in walk order, five deep: all but the last component shared with the entry
            // before, so a node per entry only.
            peak_heap(walk_order("tree", &[4, 4, 4], 50));
            // The same, 64 deep and one-letter: the most shared components per entry.
            let deep_walk = (0..500)
                .map(|i| Entry {
                    path: (1..MAX_DEPTH).map(|_| "a".to_string()).chain([name(i)]).collect(),
                    ..dir("x")
                })
                .collect();
            peak_heap(deep_walk);
            // A Windows-like target: every other entry refused alone (a case twin), every third
            // one for its name; and deep one-letter paths folded.
            let twins = (0..20_000)
                .map(|i| {
                    let name = format!("f{}{}", name(i / 2), if i % 3 == 0 { ":" } else { "" });
                    let name = if i % 2 == 0 { name } else { name.to_uppercase() };
                    Entry { path: vec![name], ..file("x", 1) }
                })
                .collect();
            peak_heap_for(twins, FsRules::WINDOWS);
            let deep = (0..500)
                .map(|i| Entry {
                    path: std::iter::once(name(i)).chain((1..MAX_DEPTH).map(|_| "A".into())).collect(),
                    ..dir("x")
                })
                .collect();
            peak_heap_for(deep, FsRules::CASEFOLD);
        }
    }
}
