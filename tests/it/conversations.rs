//! Random hostile conversations against one long-running receiver, two kinds mixed:
//! - a peer following the v4 conversation (reading the answers as a sender does) but with
//!   mutations: a manifest of one file (at the top) or of files and folders that may collide,
//!   folders listed before or after the files; digests right, wrong or missing (`None`), some
//!   sent up front and the rest only after their file's body, or once the receiver falls silent
//!   waiting for them, with or without keepalives in between; wrong sizes, another file's
//!   bytes, a flipped byte, a cut (or a stall) at any point of a body or between a body and its
//!   digest, no digest after a body, withdrawals, wrong indexes, a stray message injected at any
//!   step;
//! - rarely, a slow, silent or flooding peer: a body trickled at 40 bytes a second or a manifest a
//!   byte every 50 ms, a peer that falls silent at any step (before its hello, in the middle of
//!   its manifest, waiting for the acceptance, in a body...) or says nothing but keepalives, and
//!   bursts of up to 20,000 keepalives (empty `Digests`) in an otherwise honest conversation;
//! - noise: any sequence of well-formed and malformed messages, frames and raw bytes.
//!
//! State carries over from one conversation to the next (files already there, partials to
//! resume, keep-both names). After every conversation: nothing beside DIR; in DIR, every file
//! under a final name holds exactly the content of one of the files the peers had (no part, no
//! mix, no altered byte), the rest are hidden partials; every file the receiver acknowledged
//! (`Have`, or a `FileVerdict` saying `Verified`) is where it said, with the content that was
//! offered; every folder it said it created or has is a folder; it kept the rules a sender checks
//! (no resume past the end, no `Have` before the digest, no verdict for a body never sent, no
//! answers past the manifest); an honest conversation (with or without a flood of keepalives) got
//! an answer for every entry and a verdict for every body; a slow or silent peer was let go within
//! `SLOW_BOUND` (it must not keep its transfer, nor its connection); and the receiver still runs.
//! At the end an honest sender gets through.

use std::cell::{Cell, RefCell};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use xfer::hash::Hasher;
use xfer::protocol::{
    self, Answer, AnswersPart, Body, Digest, DigestsPart, Entry, EntryKind, FileVerdict, HashAlg,
    ManifestPart, Message, Reject, RejectCode, Verdict, WireError, Withdraw,
};

use crate::bridge::{Channel, Target};
use crate::util::{Receiver, data_frame, is_accept, random_bytes, source_file};

/// The files peers have: empty, small, and large enough (1.5 MiB, past the 1 MiB below which a
/// batch keeps no resume record) to leave resumable partials.
fn contents() -> Vec<Vec<u8>> {
    vec![Vec::new(), b"eleven byte".to_vec(), random_bytes(3 << 19, 99)]
}

/// Names of a single file (a manifest of one entry at the top).
static NAMES: [&str; 3] = ["a", "b", "c.txt"];
/// Paths of a batch's entries.
const PATHS: [&[&str]; 5] = [&["a"], &["d"], &["d", "a"], &["d", "e"], &["b"]];

/// How long the peer waits for an answer before it takes the receiver's silence to mean it waits
/// for the next digest (v3's `NeedDigest`). A slow receiver only makes the digest go out sooner.
const WAIT_FOR_DIGEST: Duration = Duration::from_millis(50);
/// How long the peer waits for anything else the receiver should say.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A slow body: a byte every 25 ms, 40 bytes a second (the receiver asks for `MIN_RATE`, 1 KiB/s).
const TRICKLE_BODY: Duration = Duration::from_millis(25);
/// A slow manifest: a byte every 50 ms (it must be in within `--handshake-timeout`).
const TRICKLE_MANIFEST: Duration = Duration::from_millis(50);
/// How long a slow or silent peer may keep its connection (and transfer) at the receiver's
/// `--timeout 3`: the idle timeout, the minimum rate and the handshake deadline each let it go
/// within about 3 s, keepalives waiting for a 1.5 MiB file's digest within 4 s; past this bound it
/// is a violation.
const SLOW_BOUND: Duration = Duration::from_secs(16);
/// Most keepalives in one burst.
const MAX_FLOOD: usize = 20_000;
/// Time slow and silent peers may take, per conversation of the run (12 s for the default 300):
/// past it, the rest are played without their slowness, so CI time stays modest.
const SLOW_BUDGET_PER_CASE: Duration = Duration::from_millis(40);

/// What a peer says about a content's digest.
#[derive(Debug, Clone, Copy)]
enum Claim {
    Right,
    Wrong,
    /// `None`: the sender could not read the file (or it changed); nothing may be stored.
    Missing,
}

#[derive(Debug, Clone)]
enum Op {
    /// A manifest of one file at the top (v3's offer), and its digest right after unless missing.
    Offer {
        name: usize,
        content: usize,
        size_delta: i8,
        claim: Claim,
        blake3: bool,
        tag: u8,
    },
    /// A data frame with `len` bytes of a content from `at` quarters in, one byte altered if `flip`.
    Data {
        content: usize,
        at: usize,
        len: usize,
        flip: bool,
    },
    /// One digest for file 0 (v3's trailer): the digest that follows a single file's body.
    Digest {
        content: usize,
        claim: Claim,
        blake3: bool,
    },
    /// Entries: path, content if a file (else a folder), BLAKE3, tag.
    Manifest {
        entries: Vec<(usize, Option<usize>, bool, u8)>,
        last: bool,
    },
    Digests {
        first: u32,
        digests: Vec<(usize, Claim, bool)>,
    },
    Body {
        index: u32,
    },
    Withdraw {
        index: u32,
    },
    /// One of the receiver's own messages, sent the wrong way: answers, a verdict, a refusal.
    Backwards {
        which: u8,
        index: u32,
    },
    Raw(Vec<u8>),
}

fn claim() -> impl Strategy<Value = Claim> {
    prop_oneof![3 => Just(Claim::Right), 1 => Just(Claim::Wrong), 1 => Just(Claim::Missing)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NAMES.len(), 0..3usize, prop_oneof![6 => Just(0i8), 1 => Just(-1), 1 => Just(1)], claim(), any::<bool>(), 0..2u8)
            .prop_map(|(name, content, size_delta, claim, blake3, tag)| Op::Offer { name, content, size_delta, claim, blake3, tag }),
        4 => (0..3usize, 0..4usize, prop_oneof![1..64usize, 1000..300_000usize], prop::bool::weighted(0.2))
            .prop_map(|(content, at, len, flip)| Op::Data { content, at, len, flip }),
        1 => (0..3usize, claim(), any::<bool>()).prop_map(|(content, claim, blake3)| Op::Digest { content, claim, blake3 }),
        2 => (prop::collection::vec((0..PATHS.len(), prop::option::of(0..3usize), any::<bool>(), 0..2u8), 0..5), prop::bool::weighted(0.8))
            .prop_map(|(entries, last)| Op::Manifest { entries, last }),
        2 => (0..4u32, prop::collection::vec((0..3usize, claim(), any::<bool>()), 0..4))
            .prop_map(|(first, digests)| Op::Digests { first, digests }),
        2 => (0..5u32).prop_map(|index| Op::Body { index }),
        1 => (0..5u32).prop_map(|index| Op::Withdraw { index }),
        1 => (0..3u8, 0..5u32).prop_map(|(which, index)| Op::Backwards { which, index }),
        1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(Op::Raw),
    ]
}

fn digest(data: &[u8], claim: Claim, alg: HashAlg) -> Option<Digest> {
    let mut h = Hasher::new(alg);
    h.update(data);
    if let Claim::Wrong = claim {
        h.update(b"!");
    }
    (!matches!(claim, Claim::Missing)).then(|| h.finish())
}

fn alg(blake3: bool) -> HashAlg {
    if blake3 { HashAlg::Blake3 } else { HashAlg::Sha256 }
}

fn entry(path: &[&str], kind: EntryKind) -> Entry {
    Entry { path: path.iter().map(|c| c.to_string()).collect(), kind, mode: 0o644, mtime: (1_700_000_000, 0) }
}

fn file_kind(size: u64, blake3: bool, tag: u8) -> EntryKind {
    EntryKind::File { size, hash: alg(blake3), tag: [tag; 16] }
}

fn encoded(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::write_message(&mut out, msg).unwrap();
    out
}

fn encode(op: &Op, pool: &[Vec<u8>]) -> Vec<u8> {
    let msg = match op {
        Op::Offer { name, content, size_delta, claim, blake3, tag } => {
            let size = (pool[*content].len() as u64).saturating_add_signed((*size_delta).into());
            let file = entry(&[NAMES[*name]], file_kind(size, *blake3, *tag));
            let mut out = encoded(&Message::Manifest(ManifestPart { entries: vec![file], last: true }));
            if let Some(d) = digest(&pool[*content], *claim, alg(*blake3)) {
                out.extend(encoded(&Message::Digests(DigestsPart { first: 0, digests: vec![Some(d)] })));
            }
            return out;
        }
        Op::Data { content, at, len, flip } => {
            let data = &pool[*content];
            let from = data.len() * at / 4;
            let mut piece = data[from..(from + len).min(data.len())].to_vec();
            if piece.is_empty() {
                piece.push(b'?');
            }
            if *flip {
                piece[0] ^= 0xff;
            }
            return data_frame(&piece);
        }
        Op::Digest { content, claim, blake3 } => Message::Digests(DigestsPart {
            first: 0,
            digests: vec![digest(&pool[*content], *claim, alg(*blake3))],
        }),
        Op::Manifest { entries, last } => Message::Manifest(ManifestPart {
            entries: entries
                .iter()
                .map(|(path, file, blake3, tag)| {
                    let kind = match file {
                        Some(c) => file_kind(pool[*c].len() as u64, *blake3, *tag),
                        None => EntryKind::Dir,
                    };
                    entry(PATHS[*path], kind)
                })
                .collect(),
            last: *last,
        }),
        Op::Digests { first, digests } => Message::Digests(DigestsPart {
            first: *first,
            digests: digests.iter().map(|(c, claim, b)| digest(&pool[*c], *claim, alg(*b))).collect(),
        }),
        Op::Body { index } => Message::Body(Body { index: *index }),
        Op::Withdraw { index } => Message::Withdraw(Withdraw { index: *index, reason: "gone".into() }),
        Op::Backwards { which: 0, .. } => {
            Message::Answers(AnswersPart { answers: vec![Answer::Send { offset: 0 }], last: true })
        }
        Op::Backwards { which: 1, index } => Message::FileVerdict(FileVerdict {
            index: *index,
            verdict: Verdict::Verified { name: "a".into() },
        }),
        Op::Backwards { .. } => Message::Reject(Reject { code: RejectCode::Failed, reason: "no".into() }),
        Op::Raw(bytes) => return bytes.clone(),
    };
    encoded(&msg)
}

/// Says everything, reading whatever comes back on another thread, then hangs up and waits for
/// the receiver to close its side.
fn play_noise(to: SocketAddr, hello: bool, ops: &[Op], pool: &[Vec<u8>]) {
    let mut stream = TcpStream::connect(to).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut said = if hello {
        [&protocol::hello()[..], &crate::util::INSECURE[..]].concat()
    } else {
        b"GET / HTTP/1.0\r\n".to_vec()
    };
    for op in ops {
        said.extend_from_slice(&encode(op, pool));
    }
    let _ = stream.write_all(&said);
    let _ = stream.shutdown(Shutdown::Write);
    drain.join().unwrap();
}

/// One file of a plan: where it goes, what it is, and what the peer claims about it.
#[derive(Debug, Clone)]
struct FilePlan {
    /// Index into `NAMES` (single file) or `PATHS` (batch).
    place: usize,
    content: usize,
    /// Sent instead of the content, if set (same length, padded or cut).
    other_body: Option<usize>,
    size_delta: i8,
    claim: Claim,
    blake3: bool,
    tag: u8,
}

/// How a plan departs from an honest sender.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    /// Flip one body byte, `at` per mille into the bytes sent for file `file`.
    Flip {
        file: usize,
        at: u16,
    },
    /// Stop `at` per mille into the bytes sent for file `file` (1000: after its last byte, before
    /// its digest if that was to follow the body): hang up, or with `stall` fall silent until the
    /// receiver gives up.
    Cut {
        file: usize,
        at: u16,
        stall: bool,
    },
    /// Say `op` at step `step`: 0 before the manifest, 1 after it, 2 after the digests sent up
    /// front, 3 after the first data frame of the first body, 4 after the first body (before its
    /// digest, if that follows it), 5 after the bodies.
    Inject {
        step: u8,
        op: Op,
    },
    /// Withdraw file `file` instead of sending its body.
    Withdraw {
        file: usize,
    },
    /// Send no digest after the body of file `file` where it is due, and go on as if it had been
    /// (the next body, or hang up): v3's missing trailer.
    NoDigest {
        file: usize,
    },
    /// Announce the body of the entry after the one due.
    WrongIndex {
        file: usize,
    },
    /// Trickle file `file`'s body (frame headers included) a byte every `TRICKLE_BODY`.
    SlowBody {
        file: usize,
    },
    /// Trickle the manifest a byte every `TRICKLE_MANIFEST`.
    SlowManifest,
    /// Fall silent at `at` and listen until the receiver lets go; with `keepalives`, say nothing
    /// but an empty `Digests` part every 100 ms.
    Silent {
        at: Quiet,
        keepalives: bool,
    },
    /// Say `count` keepalives in one burst at step `step` (as for `Inject`: 1, 2, 4 or 5, where
    /// a `Digests` part is allowed), and go on honestly.
    Flood {
        step: u8,
        count: usize,
    },
}

impl Mutation {
    /// Slow and silent peers take seconds each (the receiver's timeouts); they are kept rare.
    fn is_slow(&self) -> bool {
        match self {
            Mutation::SlowBody { .. } | Mutation::SlowManifest | Mutation::Silent { .. } => true,
            Mutation::Cut { stall, .. } => *stall,
            _ => false,
        }
    }
}

/// Where a silent peer falls silent.
#[derive(Debug, Clone, Copy)]
enum Quiet {
    /// Connected, not even a hello.
    BeforeHello,
    /// Half of the manifest's frame said.
    MidManifest,
    /// At a step, as for `Mutation::Inject`.
    Step(u8),
}

#[derive(Debug, Clone)]
struct Plan {
    /// A batch of files and folders at `PATHS`, or a single file at `NAMES`.
    batch: bool,
    files: Vec<FilePlan>,
    /// Folders listed in a batch, as indexes into `PATHS`.
    dirs: Vec<usize>,
    /// The folders come before the files in the manifest (as a walk lists them), else after.
    dirs_first: bool,
    /// Digests sent right after the acceptance, for the first `told` files; each of the others
    /// goes out right after its file's body, or when the receiver falls silent waiting for it.
    told: usize,
    /// An empty digests part (the keepalive of a sender still hashing) after every body and
    /// before every digest sent because the receiver waits: the receiver then acknowledges what
    /// it verified so far, in the middle of the transfer.
    keepalives: bool,
    /// Data frame size.
    chunk: usize,
    mutation: Mutation,
}

impl Plan {
    /// The file number (position among the files) of entry `i`, or `None` for a folder.
    fn file_no(&self, i: usize) -> Option<usize> {
        let k = if self.dirs_first { i.checked_sub(self.dirs.len())? } else { i };
        (k < self.files.len()).then_some(k)
    }

    /// The path of entry `i`.
    fn path(&self, i: usize) -> &'static [&'static str] {
        match self.file_no(i).map(|k| &self.files[k]) {
            Some(f) if self.batch => PATHS[f.place],
            Some(f) => std::slice::from_ref(&NAMES[f.place]),
            None if self.dirs_first => PATHS[self.dirs[i]],
            None => PATHS[self.dirs[i - self.files.len()]],
        }
    }

    fn entries(&self) -> usize {
        self.files.len() + self.dirs.len()
    }
}

fn file_plan() -> impl Strategy<Value = FilePlan> {
    (
        0..PATHS.len(),
        0..3usize,
        prop::option::weighted(0.1, 0..3usize),
        prop_oneof![10 => Just(0i8), 1 => Just(-1), 1 => Just(1)],
        claim(),
        any::<bool>(),
        0..2u8,
    )
        .prop_map(|(place, content, other_body, size_delta, claim, blake3, tag)| FilePlan {
            place,
            content,
            other_body,
            size_delta,
            claim,
            blake3,
            tag,
        })
}

fn slow() -> impl Strategy<Value = Mutation> {
    let quiet =
        prop_oneof![Just(Quiet::BeforeHello), Just(Quiet::MidManifest), (0..6u8).prop_map(Quiet::Step)];
    prop_oneof![
        (0..3usize).prop_map(|file| Mutation::SlowBody { file }),
        Just(Mutation::SlowManifest),
        (quiet, any::<bool>()).prop_map(|(at, keepalives)| Mutation::Silent { at, keepalives }),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    let mutation = prop_oneof![
        40 => Just(Mutation::None),
        20 => (0..3usize, 0..1000u16).prop_map(|(file, at)| Mutation::Flip { file, at }),
        20 => (0..3usize, 0..=1000u16, prop::bool::weighted(0.05))
            .prop_map(|(file, at, stall)| Mutation::Cut { file, at, stall }),
        20 => (0..6u8, op()).prop_map(|(step, op)| Mutation::Inject { step, op }),
        10 => (0..3usize).prop_map(|file| Mutation::Withdraw { file }),
        10 => (0..3usize).prop_map(|file| Mutation::NoDigest { file }),
        10 => (0..3usize).prop_map(|file| Mutation::WrongIndex { file }),
        // About one conversation in a hundred is slow or silent, one in fifty a flood.
        2 => slow(),
        4 => (prop::sample::select(vec![1u8, 2, 4, 5]), prop_oneof![1..100usize, 1000..=MAX_FLOOD])
            .prop_map(|(step, count)| Mutation::Flood { step, count }),
    ];
    (
        any::<bool>(),
        prop::collection::vec(file_plan(), 1..4),
        (prop::collection::vec(0..PATHS.len(), 0..2), any::<bool>()),
        (0..4usize, prop::bool::weighted(0.25)),
        prop_oneof![Just(1000usize), Just(65536), Just(1 << 20)],
        mutation,
    )
        .prop_map(|(batch, mut files, (mut dirs, dirs_first), (told, keepalives), chunk, mutation)| {
            if !batch {
                files.truncate(1);
                files[0].place %= NAMES.len();
                dirs.clear();
            }
            let told = told.min(files.len());
            // A slow body is the large file's: the small ones are through in a moment.
            if let Mutation::SlowBody { file } = mutation
                && let Some(f) = files.get_mut(file)
            {
                (f.content, f.size_delta, f.other_body) = (2, 0, None);
            }
            Plan { batch, files, dirs, dirs_first, told, keepalives, chunk, mutation }
        })
}

/// An acknowledgement the receiver gave: this content is stored at this path under DIR.
struct Acked {
    path: PathBuf,
    content: usize,
    /// The receiver's words, for the failure message.
    said: &'static str,
}

/// What the peers saw over a whole run, for the record.
#[derive(Default)]
struct Stats {
    acks: Cell<usize>,
    /// Files answered `Send` before their digest was sent.
    early: Cell<usize>,
    /// Digests sent because the receiver fell silent waiting for them.
    waited: Cell<usize>,
    /// Digests sent right after their file's body.
    late: Cell<usize>,
    /// `Send` answers at an offset past 0.
    resumed: Cell<usize>,
    have: Cell<usize>,
    /// Folders answered `Send`: created by the transfer.
    created: Cell<usize>,
    rejected: Cell<usize>,
    refused: Cell<usize>,
    /// Verdicts: verified, hash mismatch, size mismatch, failed.
    verdicts: [Cell<usize>; 4],
    /// Verdicts that came while the peer was still sending (after a keepalive, or a stall).
    verdicts_midway: Cell<usize>,
    /// Slow peers the receiver hung up on while they trickled, and the longest it took.
    slow_cut: Cell<usize>,
    slow_longest: Cell<Duration>,
    /// Silent peers (and peers saying only keepalives) let go, and the longest it took.
    silent_let_go: Cell<usize>,
    silent_longest: Cell<Duration>,
    /// Bursts of keepalives, and keepalives in them.
    floods: Cell<usize>,
    flood_keepalives: Cell<usize>,
    /// Time spent in slow and silent conversations, and those played without their slowness
    /// because it ran out (`SLOW_BUDGET_PER_CASE`).
    slow_time: Cell<Duration>,
    slow_skipped: Cell<usize>,
}

fn bump(c: &Cell<usize>) {
    c.set(c.get() + 1);
}

/// What a peer waiting on the receiver sees.
enum Heard {
    Something,
    Closed,
    Nothing,
}

/// What one conversation showed.
#[derive(Default)]
struct Played {
    acked: Vec<Acked>,
    /// Folders the receiver said it created or has.
    dirs: Vec<PathBuf>,
    /// Rules of the conversation the receiver broke.
    violations: Vec<String>,
}

/// A peer following `plan`, reading the receiver's answers as a sender does.
struct Peer<'a> {
    stream: TcpStream,
    plan: &'a Plan,
    pool: &'a [Vec<u8>],
    stats: &'a Stats,
    played: Played,
    /// Answers received, in manifest order.
    answers: Vec<Answer>,
    /// Files whose digest (or its absence) was sent.
    told: usize,
    /// Entries whose body (or withdrawal) was announced and whose verdict has not come.
    owed: Vec<bool>,
    /// The receiver refused the whole transfer.
    refused: bool,
    /// The peer has hung up.
    hung_up: bool,
    /// A digest due after a body was held back (`Mutation::NoDigest`).
    withheld: bool,
    /// Set once something was injected: the answers may then be to it, so none are attributed
    /// or judged.
    injected: bool,
    /// The flood was said.
    flooded: bool,
    /// The receiver accepted the manifest.
    accepted: bool,
}

impl Peer<'_> {
    fn say(&mut self, bytes: &[u8]) -> bool {
        match self.stream.write_all(bytes) {
            Ok(()) => true,
            Err(e) => {
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                    self.violation(format!("the receiver neither read nor hung up for {SLOW_BOUND:?}"));
                }
                false
            }
        }
    }

    fn message(&mut self, m: &Message) -> bool {
        self.say(&encoded(m))
    }

    fn read(&mut self) -> Result<Message, WireError> {
        protocol::read_message(&mut self.stream)
    }

    fn violation(&mut self, what: String) {
        self.played.violations.push(what);
    }

    fn inject(&mut self, step: u8) -> bool {
        match &self.plan.mutation {
            Mutation::Inject { step: s, op } if *s == step && !self.injected => {
                self.injected = true;
                let bytes = encode(op, self.pool);
                self.say(&bytes)
            }
            Mutation::Silent { at: Quiet::Step(s), keepalives } if *s == step => {
                self.fall_silent(*keepalives);
                false
            }
            Mutation::Flood { step: s, count } if *s == step && !self.flooded => {
                self.flooded = true;
                bump(&self.stats.floods);
                self.stats.flood_keepalives.set(self.stats.flood_keepalives.get() + count);
                let one =
                    encoded(&Message::Digests(DigestsPart { first: self.told as u32, digests: Vec::new() }));
                self.say(&one.repeat(*count))
            }
            _ => true,
        }
    }

    /// Waits up to `wait` for the receiver to say something or hang up.
    fn hear(&mut self, wait: Duration) -> Heard {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let heard = match self.stream.peek(&mut [0u8; 1]) {
            Ok(0) => Heard::Closed,
            Ok(_) => Heard::Something,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Heard::Nothing,
            Err(_) => Heard::Closed,
        };
        self.stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        heard
    }

    /// Takes what the receiver says within `wait`: `None` once it hung up, `Some(false)` if it
    /// refused the transfer or said what it never should (the conversation is over).
    fn listen(&mut self, wait: Duration) -> Option<bool> {
        match self.hear(wait) {
            Heard::Nothing => Some(true),
            Heard::Closed => None,
            Heard::Something => match self.read() {
                Ok(Message::Reject(_)) if !self.accepted => {
                    self.refused = true;
                    bump(&self.stats.refused);
                    Some(false)
                }
                Ok(m) if !self.accepted && is_accept(&m) => {
                    self.accepted = true;
                    Some(true)
                }
                Ok(m) => Some(self.take(m)),
                Err(_) => None,
            },
        }
    }

    /// Says nothing more (or only keepalives) and listens until the receiver hangs up, which it
    /// must within `SLOW_BOUND`.
    fn fall_silent(&mut self, keepalives: bool) {
        let start = Instant::now();
        let wait = Duration::from_millis(if keepalives { 100 } else { 250 });
        loop {
            if start.elapsed() > SLOW_BOUND {
                let what = if keepalives { "saying only keepalives" } else { "silent" };
                return self.violation(format!("a peer {what} kept its connection for {SLOW_BOUND:?}"));
            }
            match self.listen(wait) {
                Some(true) => {}
                Some(false) => return,
                None => break,
            }
            let first = self.told as u32;
            if keepalives && !self.message(&Message::Digests(DigestsPart { first, digests: Vec::new() })) {
                break;
            }
        }
        bump(&self.stats.silent_let_go);
        let longest = &self.stats.silent_longest;
        longest.set(longest.get().max(start.elapsed()));
    }

    /// Says `bytes` a byte every `gap`, taking what the receiver says meanwhile. True if all was
    /// said; false if the receiver hung up first (as it should, for anything but a few bytes) or
    /// kept the connection past `SLOW_BOUND` (a violation).
    fn trickle(&mut self, bytes: &[u8], gap: Duration, start: Instant) -> bool {
        for b in bytes {
            if start.elapsed() > SLOW_BOUND {
                self.violation(format!(
                    "a peer trickling a byte every {gap:?} kept its transfer for {SLOW_BOUND:?}"
                ));
                return false;
            }
            let heard = if self.say(std::slice::from_ref(b)) { self.listen(gap) } else { None };
            match heard {
                Some(true) => {}
                Some(false) => return false,
                None => {
                    bump(&self.stats.slow_cut);
                    let longest = &self.stats.slow_longest;
                    longest.set(longest.get().max(start.elapsed()));
                    return false;
                }
            }
        }
        true
    }

    /// The size listed for file `k`.
    fn size(&self, k: usize) -> u64 {
        let f = &self.plan.files[k];
        (self.pool[f.content].len() as u64).saturating_add_signed(f.size_delta.into())
    }

    /// Sends the digests of the files up to (not including) `upto` not sent yet, as claimed.
    fn tell(&mut self, upto: usize) -> bool {
        let digests = (self.told..upto)
            .map(|k| {
                let f = &self.plan.files[k];
                digest(&self.pool[f.content], f.claim, alg(f.blake3))
            })
            .collect();
        let first = self.told as u32;
        self.told = upto;
        self.message(&Message::Digests(DigestsPart { first, digests }))
    }

    /// An empty digests part, if the plan has them: "still hashing".
    fn keepalive(&mut self) -> bool {
        let first = self.told as u32;
        !self.plan.keepalives || self.message(&Message::Digests(DigestsPart { first, digests: Vec::new() }))
    }

    /// True if the receiver says nothing for `wait`.
    fn silent_for(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let silent = matches!(self.stream.peek(&mut [0u8; 1]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        self.stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        silent
    }

    /// Records an acknowledgement that entry `i` (a file) is stored as `name` in its folder.
    fn ack(&mut self, i: usize, name: &str, said: &'static str) {
        let Some(f) = self.plan.file_no(i).map(|k| &self.plan.files[k]) else {
            return self.violation(format!("{said} {name:?} for entry {i}, a folder"));
        };
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return self.violation(format!("{said} {name:?} for entry {i}: not a name in its folder"));
        }
        let path = self.plan.path(i).iter().collect::<PathBuf>().with_file_name(name);
        self.played.acked.push(Acked { path, content: f.content, said });
    }

    /// Takes what the receiver said during the transfer. False for a message it never sends.
    fn take(&mut self, m: Message) -> bool {
        match m {
            Message::Answers(part) => self.take_answers(part),
            Message::FileVerdict(v) => self.take_verdict(v),
            other => {
                self.violation(format!("the receiver sent a {} during the transfer", other.name()));
                return false;
            }
        }
        true
    }

    /// Takes answers for the next entries, checking the receiver could have given them (the
    /// rules the real sender enforces), and records what they acknowledge.
    fn take_answers(&mut self, part: AnswersPart) {
        let stats = self.stats;
        for a in part.answers {
            let i = self.answers.len();
            if i >= self.plan.entries() {
                return self.violation(format!("more answers than the {} entries", self.plan.entries()));
            }
            let file = self.plan.file_no(i);
            let dir: PathBuf = self.plan.path(i).iter().collect();
            match (&a, file) {
                (Answer::Send { offset }, Some(k)) => {
                    if *offset > self.size(k) {
                        let size = self.size(k);
                        self.violation(format!("entry {i}: resume at byte {offset} of a {size}-byte file"));
                    }
                    if k >= self.told {
                        bump(&stats.early);
                    }
                    if *offset > 0 {
                        bump(&stats.resumed);
                    }
                }
                (Answer::Send { offset }, None) => {
                    if *offset != 0 {
                        self.violation(format!("folder entry {i}: Send at offset {offset}"));
                    }
                    bump(&stats.created);
                    self.played.dirs.push(dir);
                }
                (Answer::Have { name }, Some(k)) => {
                    bump(&stats.have);
                    if k >= self.told {
                        self.violation(format!("entry {i}: Have {name:?} before its digest was sent"));
                    }
                    self.ack(i, name, "Have");
                }
                (Answer::Have { .. }, None) => self.played.dirs.push(dir),
                (Answer::Reject { .. }, _) => bump(&stats.rejected),
            }
            self.answers.push(a);
        }
        let done = self.answers.len() == self.plan.entries();
        if part.last != done {
            let (n, all) = (self.answers.len(), self.plan.entries());
            self.violation(format!("answers part with last: {} after {n} of {all} answers", part.last));
        }
    }

    fn take_verdict(&mut self, v: FileVerdict) {
        let i = v.index as usize;
        if !self.owed.get(i).copied().unwrap_or(false) {
            return self.violation(format!("{v:?}: for an entry whose body was not sent, or judged twice"));
        }
        self.owed[i] = false;
        if !self.hung_up {
            bump(&self.stats.verdicts_midway);
        }
        let kind = match v.verdict {
            Verdict::Verified { name } => {
                self.ack(i, &name, "FileVerdict Verified");
                0
            }
            Verdict::HashMismatch { .. } => 1,
            Verdict::SizeMismatch { .. } => 2,
            Verdict::Failed { .. } => 3,
        };
        bump(&self.stats.verdicts[kind]);
    }

    /// Sends file `k`'s body from `offset` as data frames, applying the plan's mutations. False if
    /// the peer stops (a cut) or the receiver hung up.
    fn body(&mut self, k: usize, offset: u64) -> bool {
        let f = &self.plan.files[k];
        let mut body = self.pool[f.other_body.unwrap_or(f.content)].clone();
        body.resize(self.size(k) as usize, b'#');
        let mut rest = body.get(offset as usize..).unwrap_or(&[]).to_vec();
        let cut = match self.plan.mutation {
            Mutation::Flip { file, at } if file == k && !rest.is_empty() => {
                let at = rest.len() * at as usize / 1000;
                rest[at] ^= 0x20;
                None
            }
            Mutation::Cut { file, at, stall } if file == k => Some((rest.len() * at as usize / 1000, stall)),
            _ => None,
        };
        if matches!(self.plan.mutation, Mutation::SlowBody { file } if file == k) {
            let start = Instant::now();
            return rest
                .chunks(self.plan.chunk)
                .all(|piece| self.trickle(&data_frame(piece), TRICKLE_BODY, start));
        }
        let mut sent = 0;
        for piece in rest.chunks(self.plan.chunk) {
            if let Some((cut, stall)) = cut
                && sent + piece.len() > cut
            {
                // The header announces the whole piece; only its first `cut - sent` bytes follow.
                let frame = data_frame(piece);
                let _ = self.say(&frame[..protocol::FRAME_HEADER_LEN + cut - sent]);
                return self.stop(stall);
            }
            if !self.say(&data_frame(piece)) || (sent == 0 && !self.inject(3)) {
                return false;
            }
            sent += piece.len();
        }
        match cut {
            // Cut after the last byte: before the digest, if it was to follow.
            Some((_, stall)) => self.stop(stall),
            None => true,
        }
    }

    /// A cut: hang up (the caller does), or fall silent and listen until the receiver gives up.
    fn stop(&mut self, stall: bool) -> bool {
        if stall {
            self.fall_silent(false);
        }
        false
    }

    /// Acts on the answer for entry `i`: a body (or a withdrawal) for a file answered `Send`, its
    /// digest right behind it if not sent before. False if the conversation is over.
    fn act(&mut self, i: usize) -> bool {
        let (Answer::Send { offset }, Some(k)) = (&self.answers[i], self.plan.file_no(i)) else {
            return true;
        };
        let offset = *offset;
        let index = match self.plan.mutation {
            Mutation::WrongIndex { file } if file == k => i + 1,
            _ => i,
        };
        if let Some(owed) = self.owed.get_mut(index) {
            *owed = true;
        }
        if let Mutation::Withdraw { file } = self.plan.mutation
            && file == k
        {
            return self
                .message(&Message::Withdraw(Withdraw { index: index as u32, reason: "changed".into() }));
        }
        if !self.message(&Message::Body(Body { index: index as u32 }))
            || !self.body(k, offset)
            || !self.inject(4)
            || !self.keepalive()
        {
            return false;
        }
        if self.told > k {
            return true;
        }
        if matches!(self.plan.mutation, Mutation::NoDigest { file } if file == k) {
            self.withheld = true;
            return true;
        }
        bump(&self.stats.late);
        self.tell(k + 1)
    }

    /// The conversation, up to the last body. Returns when it is over or either side gives up.
    fn converse(&mut self) {
        let plan = self.plan;
        let entries = (0..plan.entries())
            .map(|i| match plan.file_no(i) {
                Some(k) => {
                    let f = &plan.files[k];
                    entry(plan.path(i), file_kind(self.size(k), f.blake3, f.tag))
                }
                None => entry(plan.path(i), EntryKind::Dir),
            })
            .collect();
        let manifest = encoded(&Message::Manifest(ManifestPart { entries, last: true }));
        if !self.inject(0) {
            return;
        }
        let said = match plan.mutation {
            Mutation::SlowManifest => self.trickle(&manifest, TRICKLE_MANIFEST, Instant::now()),
            Mutation::Silent { at: Quiet::MidManifest, keepalives } => {
                self.say(&manifest[..manifest.len() / 2]);
                self.fall_silent(keepalives);
                false
            }
            _ => self.say(&manifest),
        };
        if !said || !self.inject(1) {
            return;
        }
        // A trickled manifest may have heard the acceptance already.
        let first = if self.accepted { None } else { Some(self.read()) };
        match first {
            None => {}
            Some(Ok(m)) if is_accept(&m) => self.accepted = true,
            Some(Ok(Message::Reject(_))) => {
                self.refused = true;
                bump(&self.stats.refused);
                return;
            }
            Some(Ok(other)) => return self.violation(format!("the receiver's first word was {other:?}")),
            Some(Err(e)) => return self.violation(format!("no first word from the receiver: {e}")),
        }
        if (plan.told > 0 && !self.tell(plan.told)) || !self.inject(2) {
            return;
        }
        let mut acted = 0;
        while acted < plan.entries() {
            if acted < self.answers.len() {
                if !self.act(acted) {
                    return;
                }
                acted += 1;
                continue;
            }
            // Nothing to act on: after a moment of silence, the receiver waits for a digest. With
            // one held back, it waits for that one: hang up rather than send it.
            if self.withheld && self.silent_for(WAIT_FOR_DIGEST) {
                return;
            }
            if !self.withheld && self.told < plan.files.len() && self.silent_for(WAIT_FOR_DIGEST) {
                bump(&self.stats.waited);
                if !self.keepalive() || !self.tell(self.told + 1) {
                    return;
                }
                continue;
            }
            match self.read() {
                Ok(m) => {
                    if !self.take(m) {
                        return;
                    }
                }
                Err(WireError::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let n = self.answers.len();
                    return self.violation(format!(
                        "silent for {READ_TIMEOUT:?} after {n} answers, every digest sent"
                    ));
                }
                Err(_) => return,
            }
        }
        self.inject(5);
    }

    /// After the peer hung up: whatever the receiver still says (verdicts of what it verified),
    /// until it closes.
    fn drain(&mut self) {
        while let Ok(m) = self.read() {
            self.take(m);
        }
        let mut buf = vec![0u8; 64 << 10];
        while matches!(self.stream.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Plays `plan` to the end (or until either side gives up), hangs up, waits for the receiver to
/// close, and returns what it acknowledged and what rules it broke.
fn play(to: SocketAddr, plan: &Plan, pool: &[Vec<u8>], stats: &Stats) -> Played {
    let stream = TcpStream::connect(to).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(SLOW_BOUND)).unwrap();
    let mut peer = Peer {
        stream,
        plan,
        pool,
        stats,
        played: Played::default(),
        answers: Vec::new(),
        told: 0,
        owed: vec![false; plan.entries()],
        refused: false,
        hung_up: false,
        withheld: false,
        injected: false,
        flooded: false,
        accepted: false,
    };
    if let Mutation::Silent { at: Quiet::BeforeHello, keepalives } = plan.mutation {
        // The receiver's hello is read, but not answered.
        let _ = protocol::read_hello(&mut peer.stream);
        peer.fall_silent(keepalives);
    } else if peer.say(&protocol::hello())
        && protocol::read_hello(&mut peer.stream).is_ok()
        && peer.say(&crate::util::INSECURE)
    {
        peer.converse();
    } else {
        peer.violation("no hello from the receiver".into());
    }
    let _ = peer.stream.shutdown(Shutdown::Write);
    peer.hung_up = true;
    peer.drain();
    if peer.injected {
        return Played::default();
    }
    // An honest peer (even one whose digests are wrong or missing, or who floods keepalives) gets
    // an answer for every entry and a verdict for every body.
    if matches!(plan.mutation, Mutation::None | Mutation::Flood { .. }) && !peer.refused {
        if peer.answers.len() < plan.entries() {
            let (n, all) = (peer.answers.len(), plan.entries());
            peer.violation(format!("honest conversation: {n} of {all} entries answered"));
        }
        if let Some(i) = peer.owed.iter().position(|&o| o) {
            peer.violation(format!("honest conversation: no verdict for entry {i}"));
        }
    }
    peer.played
}

/// Nothing beside DIR; under DIR only whole, exact contents under final names, hidden partials,
/// and folders.
fn check(rx: &Receiver, pool: &[Vec<u8>]) -> Result<(), TestCaseError> {
    prop_assert_eq!(crate::util::list(rx.root.path()), vec!["dir".to_string()]);
    fn visit(dir: &Path, pool: &[Vec<u8>]) -> Result<(), TestCaseError> {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let kind = e.file_type().unwrap();
            if kind.is_dir() {
                visit(&e.path(), pool)?;
            } else if name.starts_with(".xfer-") {
                prop_assert!(name.ends_with(".part") || name.ends_with(".meta"), "stray temporary {}", name);
            } else {
                prop_assert!(kind.is_file(), "{} is neither a file nor a folder", name);
                let data = std::fs::read(e.path()).unwrap();
                prop_assert!(pool.contains(&data), "{} holds {} bytes that no peer had", name, data.len());
            }
        }
        Ok(())
    }
    visit(&rx.dir, pool)
}

#[derive(Debug, Clone)]
enum Conversation {
    Noise((bool, Vec<Op>)),
    /// A plan, and whether to play it again without its mutation afterwards.
    Plan(Plan, bool),
}

/// Conversations per run; `XFER_CONVERSATIONS=N` runs more (for a long hunt outside CI).
fn cases() -> u32 {
    std::env::var("XFER_CONVERSATIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(300)
}

#[test]
fn random_hostile_conversations_never_store_an_unverified_file() {
    converse(Channel::Plain, cases(), &[]);
}

#[test]
fn random_hostile_conversations_with_overwrite_never_store_an_unverified_file() {
    converse(Channel::Plain, cases(), &["--overwrite"]);
}

/// The same conversations (half as many, for CI time) sealed by a `SecureBridge` for a receiver
/// that requires a code: the frame stream inside the records is the same, so are the rules.
#[test]
fn random_hostile_conversations_over_the_secure_channel_never_store_an_unverified_file() {
    converse(Channel::Secure, cases() / 2, &[]);
}

/// Plays `cases` random conversations against one receiver started with `args`, its peers
/// reaching it over `channel`.
fn converse(channel: Channel, cases: u32, args: &[&str]) {
    let args = [&["--quiet", "--timeout", "3", "--handshake-timeout", "3"], args].concat();
    let rx = RefCell::new(Target::start(channel, &args));
    let pool = contents();
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let kind = prop_oneof![
        1 => (prop::bool::weighted(0.95), prop::collection::vec(op(), 1..10)).prop_map(Conversation::Noise),
        4 => plan().prop_map(|plan| Conversation::Plan(plan, false)),
        // The large file cut somewhere, then the same plan again without the cut: a resume.
        1 => (plan(), 0..=1000u16).prop_map(|(mut plan, at)| {
            plan.files[0].content = 2;
            plan.files[0].size_delta = 0;
            plan.mutation = Mutation::Cut { file: 0, at, stall: false };
            Conversation::Plan(plan, true)
        }),
    ];
    // Now and then DIR is emptied first, so the receiver does not end up having everything.
    let conversation = (prop::bool::weighted(0.1), kind);
    let stats = Stats::default();
    let started = Instant::now();
    let slow_budget = SLOW_BUDGET_PER_CASE * cases;
    runner
        .run(&conversation, |(empty_first, conversation)| {
            let mut rx = rx.borrow_mut();
            if empty_first {
                for e in std::fs::read_dir(&rx.dir).unwrap() {
                    let path = e.unwrap().path();
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            }
            let plays = match conversation {
                Conversation::Noise((hello, ops)) => {
                    play_noise(rx.peer_addr(), hello, &ops, &pool);
                    Vec::new()
                }
                Conversation::Plan(mut plan, false) => {
                    if plan.mutation.is_slow() && stats.slow_time.get() > slow_budget {
                        plan.mutation = Mutation::None;
                        bump(&stats.slow_skipped);
                    }
                    vec![plan]
                }
                Conversation::Plan(plan, true) => {
                    let again = Plan { mutation: Mutation::None, ..plan.clone() };
                    vec![plan, again]
                }
            };
            for plan in &plays {
                let start = Instant::now();
                let played = play(rx.peer_addr(), plan, &pool, &stats);
                if plan.mutation.is_slow() {
                    stats.slow_time.set(stats.slow_time.get() + start.elapsed());
                }
                prop_assert!(
                    played.violations.is_empty(),
                    "the receiver broke the conversation's rules: {:?}; receiver log:\n{}",
                    played.violations,
                    rx.stderr()
                );
                for ack in played.acked {
                    bump(&stats.acks);
                    let stored = std::fs::read(rx.dir.join(&ack.path)).ok();
                    prop_assert!(
                        stored.as_ref() == Some(&pool[ack.content]),
                        "{} for {} but it holds {:?} bytes, not {}; receiver log:\n{}",
                        ack.said,
                        ack.path.display(),
                        stored.map(|s| s.len()),
                        pool[ack.content].len(),
                        rx.stderr()
                    );
                }
                for dir in played.dirs {
                    let meta = std::fs::symlink_metadata(rx.dir.join(&dir));
                    prop_assert!(
                        meta.is_ok_and(|m| m.is_dir()),
                        "the receiver answered folder {} as created or there, but it is not a folder",
                        dir.display()
                    );
                }
            }
            check(&rx, &pool)?;
            prop_assert!(rx.child.try_wait().unwrap().is_none(), "the receiver exited:\n{}", rx.stderr());
            Ok(())
        })
        .unwrap();
    let mut rx = rx.into_inner();
    // What the conversations achieved, for the record (some must have stored files, and some
    // must have been answered before their digest, or the test never reached those paths).
    let log = rx.stderr();
    let n = |c: &Cell<usize>| c.get();
    let [verified, hash, size, failed] = &stats.verdicts;
    println!(
        "{} hostile conversations ({channel:?}, {args:?}) in {:.1} s: {} acknowledgements checked on disk; peers saw \
         {} answered Send before their digest, {} resumes, {} Have, {} folders created, {} rejected, \
         {} transfers refused, {} digests sent after their body, {} after the receiver waited for them; \
         verdicts: {} verified, {} hash mismatch, {} size mismatch, {} failed ({} of them while the peer \
         was still sending); {} slow peers cut off (longest {:.1} s), {} silent peers let go (longest {:.1} s), \
         {} keepalive floods ({} keepalives), {} slow peers played fast (time budget spent); \
         receiver log: {} single files stored, {} resumed, {} already there, {} failed",
        cases,
        started.elapsed().as_secs_f64(),
        n(&stats.acks),
        n(&stats.early),
        n(&stats.resumed),
        n(&stats.have),
        n(&stats.created),
        n(&stats.rejected),
        n(&stats.refused),
        n(&stats.late),
        n(&stats.waited),
        n(verified),
        n(hash),
        n(size),
        n(failed),
        n(&stats.verdicts_midway),
        n(&stats.slow_cut),
        stats.slow_longest.get().as_secs_f64(),
        n(&stats.silent_let_go),
        stats.silent_longest.get().as_secs_f64(),
        n(&stats.floods),
        n(&stats.flood_keepalives),
        n(&stats.slow_skipped),
        log.matches("verified, stored as").count(),
        log.matches("(resumed at").count(),
        log.matches("already have it").count(),
        log.matches(": failed: ").count(),
    );
    assert!(n(&stats.acks) >= cases as usize / 10, "too few conversations got as far as an acknowledgement");
    assert!(
        n(&stats.early) > 0 && n(&stats.late) > 0,
        "no file was answered before its digest, or none had its digest sent after its body"
    );
    if std::env::var("SHOWLOG").is_ok() {
        println!("{log}");
    }
    let data = random_bytes(200_000, 3);
    let (_src, path) = source_file("honest.bin", &data);
    rx.send(&path, &["--quiet"]).expect(0);
    assert!(std::fs::read(rx.dir.join("honest.bin")).unwrap() == data);
    assert!(rx.child.try_wait().unwrap().is_none());
    // Every conversation that opened as a plaintext sender went through the secure channel.
    if let Some(bridge) = rx.bridge() {
        println!(
            "over the secure channel: {} connections sealed, {} forwarded as they were",
            bridge.secured(),
            bridge.as_is()
        );
        rx.assert_sealed(cases as usize / 2);
    }
}
