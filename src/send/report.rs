//! What a send reports: per entry, the outcome and what was learnt on the way (digest, cache,
//! resume offset); and how the receiver's verdicts become outcomes or errors.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Exit};
use crate::protocol::{Digest, Verdict};
use crate::sanitize::{escape, peer_text};

/// What happened to one entry.
#[derive(Debug)]
pub enum EntryOutcome {
    /// Stored under this path (the receiver may have chosen a keep-both name).
    Verified(String),
    /// The same content is already there under this path (its own, or a keep-both copy).
    AlreadyThere(String),
    Failed(Error),
}

/// One entry of the manifest, after the send.
#[derive(Debug)]
pub struct EntryReport {
    /// Display path from the batch root (`/`-joined).
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
    /// The file's digest, if it was read (or known from the cache) unchanged.
    pub digest: Option<Digest>,
    /// The digest came from the cache: the file was not read to hash it.
    pub cached: bool,
    /// Bytes the receiver already held from an interrupted transfer (only the rest was sent).
    pub offset: u64,
    pub outcome: EntryOutcome,
}

/// The result of a send: per-entry outcomes in manifest order, and totals.
#[derive(Debug)]
pub struct Report {
    /// A single regular file was sent: `entries` holds exactly it.
    pub single: bool,
    pub entries: Vec<EntryReport>,
    pub skipped: Vec<(PathBuf, String)>,
    pub files: usize,
    pub bytes: u64,
    /// Body bytes actually sent (less than `bytes` when files were already there or resumed).
    pub sent: u64,
    /// Bytes the receiver already held from interrupted transfers, summed over resumed files.
    pub resumed: u64,
    /// From start to the last verdict, less any wait for a busy receiver (said when it began).
    pub elapsed: Duration,
}

impl Report {
    /// The worst failure, if any entry failed: protocol, then integrity, connection, refusal.
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
            .filter_map(|e| if let EntryOutcome::Failed(e) = &e.outcome { Some(e) } else { None })
            .min_by_key(|e| rank(e))
    }
}

/// Turns the receiver's verdict on the file shown as `name` into the stored name or an error.
/// `digest` is what this side sent, to tell a corrupted verdict from corrupted bytes.
pub(crate) fn verdict_result(v: Verdict, name: &str, digest: Option<&Digest>) -> Result<String, Error> {
    match v {
        Verdict::Verified { name } => Ok(name),
        Verdict::HashMismatch { expected, actual } => Err(Error::Integrity(format!(
            "receiver rejected \"{}\": content hashed to {actual} on arrival, expected {expected}{}",
            escape(name),
            if Some(&expected) == digest { "" } else { " (not the digest we sent)" }
        ))),
        Verdict::SizeMismatch { expected, received } => Err(Error::Integrity(format!(
            "receiver rejected \"{}\": got {received} bytes, expected {expected}",
            escape(name)
        ))),
        // The receiver's word that what reached it did not authenticate: the path was tampered
        // with (its verdict itself arrived sealed, so it is the receiver's).
        Verdict::Failed { reason } if reason.starts_with(CHANNEL_BROKEN) => {
            Err(Error::Auth(format!("the receiver says: {}", peer_text(reason))))
        }
        Verdict::Failed { reason } => Err(Error::RemoteFailed(peer_text(reason))),
    }
}

/// How a receiver's `Failed` verdict begins when its side of the secure channel broke.
pub(crate) const CHANNEL_BROKEN: &str = "secure channel broken";

/// The display path of `name` in the folder of the entry at `path`: where the receiver says it
/// stored (or already has) that entry, maybe under a keep-both name.
pub(crate) fn beside(path: &[String], name: &str) -> String {
    [&path[..path.len() - 1], &[name.to_string()]].concat().join("/")
}
