//! Partials that one peer leaves behind. A transfer cut off in the middle of a body keeps its
//! partial for a resume, so a stranger cutting transfer after transfer could fill DIR until
//! `--keep-partials` sweeps them. Each partial left is noted against the peer's address (an IPv6
//! /64 counted as one, as for the connection share); past [`PEER_PARTIALS`] partials or
//! [`PEER_PARTIAL_BYTES`] bytes from one address, its oldest are removed (only if the name still
//! names the same file and no transfer holds it), and its newest is always kept.
//!
//! The notes live in memory, at most [`LITTER_NOTED`] of them (past that the oldest are forgotten,
//! not removed): what was left before a restart, or forgotten, is bounded by `--keep-partials`
//! alone.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

use crate::store::{Left, SafeDir, remove_left};

/// Partials one address may leave behind; past this its oldest go.
pub(crate) const PEER_PARTIALS: usize = 32;
/// Bytes of partials one address may leave behind; past this its oldest go (its newest stays).
pub(crate) const PEER_PARTIAL_BYTES: u64 = 16 << 30;
/// Notes kept in all. A note holds its folder's path (at most MAX_PATH_LEN) and a few numbers,
/// so all of them take at most about 17 MiB, usually a few hundred KiB.
pub(crate) const LITTER_NOTED: usize = 4096;

/// One partial left behind.
#[derive(Debug)]
struct Note {
    /// Order of noting, over all peers.
    seq: u64,
    /// Its folder below the target folder.
    folder: Vec<String>,
    left: Left,
}

/// The partials each address left behind, oldest first.
#[derive(Default)]
pub(crate) struct Litter(Mutex<Notes>);

#[derive(Default)]
struct Notes {
    by_peer: HashMap<IpAddr, VecDeque<Note>>,
    count: usize,
    seq: u64,
}

impl Litter {
    /// Notes that `peer` left the partial `left` in `folder` (below the target folder `root`),
    /// and removes that address's oldest partials past its bounds. Returns how many were removed.
    pub fn left_behind(&self, root: &SafeDir, peer: IpAddr, folder: Vec<String>, left: Left) -> usize {
        // Files are removed outside the lock: other transfers note theirs meanwhile.
        let over = self.note(peer, folder, left);
        over.iter()
            .filter(|n| root.walk(&n.folder, false).and_then(|d| remove_left(&d, &n.left)).unwrap_or(false))
            .count()
    }

    /// Notes a partial; returns the notes past the peer's bounds, no longer noted.
    fn note(&self, peer: IpAddr, folder: Vec<String>, left: Left) -> Vec<Note> {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let notes = &mut *guard;
        // The same file noted before (a resume of it was cut again): the new note replaces it.
        let same = |n: &Note| (n.left.dev, n.left.ino) == (left.dev, left.ino);
        for queue in notes.by_peer.values_mut() {
            let before = queue.len();
            queue.retain(|n| !same(n));
            notes.count -= before - queue.len();
        }
        notes.by_peer.retain(|_, q| !q.is_empty());
        notes.seq += 1;
        let mine = notes.by_peer.entry(peer).or_default();
        mine.push_back(Note { seq: notes.seq, folder, left });
        notes.count += 1;
        let mut over = Vec::new();
        let bytes = |q: &VecDeque<Note>| q.iter().map(|n| n.left.bytes).sum::<u64>();
        while mine.len() > 1 && (mine.len() > PEER_PARTIALS || bytes(mine) > PEER_PARTIAL_BYTES) {
            over.extend(mine.pop_front());
            notes.count -= 1;
        }
        while notes.count > LITTER_NOTED {
            let oldest = notes.by_peer.iter().min_by_key(|(_, q)| q.front().map_or(u64::MAX, |n| n.seq));
            let Some((&ip, _)) = oldest else { break };
            let queue = notes.by_peer.get_mut(&ip).expect("just found");
            queue.pop_front();
            notes.count -= 1;
            if queue.is_empty() {
                notes.by_peer.remove(&ip);
            }
        }
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left(ino: u64, bytes: u64) -> Left {
        Left { stem: format!("s{ino}"), dev: 1, ino, bytes }
    }

    fn inodes(over: &[Note]) -> Vec<u64> {
        over.iter().map(|n| n.left.ino).collect()
    }

    #[test]
    fn an_address_keeps_its_newest_partials_within_count_and_bytes() {
        let litter = Litter::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        litter.note(b, vec![], left(1000, 10));
        for i in 0..PEER_PARTIALS as u64 {
            assert!(litter.note(a, vec![], left(i, 10)).is_empty());
        }
        // One more from `a`: its oldest goes; `b`'s is not touched.
        assert_eq!(inodes(&litter.note(a, vec![], left(100, 10))), vec![0]);
        // A partial noted again (resumed, cut again) is one note, now the newest.
        assert!(litter.note(a, vec![], left(1, 20)).is_empty());
        assert_eq!(inodes(&litter.note(a, vec![], left(101, 10))), vec![2]);
        // Past the bytes: the oldest go, but the newest stays even alone over the bound.
        let over = litter.note(a, vec![], left(102, PEER_PARTIAL_BYTES));
        assert_eq!(over.len(), PEER_PARTIALS);
        assert_eq!(inodes(&litter.note(a, vec![], left(103, PEER_PARTIAL_BYTES + 1))), vec![102]);
        let notes = litter.0.lock().unwrap();
        assert_eq!(notes.by_peer[&b].iter().map(|n| n.left.ino).collect::<Vec<_>>(), vec![1000]);
        assert_eq!(notes.count, 2);
    }

    #[test]
    fn notes_are_bounded_overall_and_the_oldest_forgotten() {
        let litter = Litter::default();
        for i in 0..(LITTER_NOTED + 10) as u64 {
            let ip = IpAddr::from((i as u32).to_be_bytes());
            assert!(litter.note(ip, vec![], left(i, 1)).is_empty(), "forgotten, not removed");
        }
        let notes = litter.0.lock().unwrap();
        assert_eq!(notes.count, LITTER_NOTED);
        assert_eq!(notes.by_peer.len(), LITTER_NOTED);
        assert!(!notes.by_peer.contains_key(&IpAddr::from(9u32.to_be_bytes())));
        assert!(notes.by_peer.contains_key(&IpAddr::from(10u32.to_be_bytes())));
    }
}
