//! Random hostile conversations against one long-running receiver, three kinds mixed:
//! - a peer following the single-file conversation (reading the replies) but with mutations:
//!   wrong or missing digests, wrong sizes, another file's bytes, a flipped byte, a cut, a stray
//!   message injected at any step;
//! - the same for batches: manifests of files and folders that may collide, digests right, wrong
//!   or missing, bodies for the files answered Send with the same mutations, withdrawals, wrong
//!   indexes;
//! - noise: any sequence of well-formed and malformed messages, frames and raw bytes.
//!
//! State carries over from one conversation to the next (files already there, partials to
//! resume, keep-both names). After every conversation: nothing beside DIR; in DIR, every file
//! under a final name holds exactly the content of one of the files the peers had (no part, no
//! mix, no altered byte), the rest are hidden partials; every file the receiver acknowledged
//! (verified or already there) is where it said, with the content that was offered; and the
//! receiver still runs. At the end an honest sender gets through.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use xfer::hash::Hasher;
use xfer::protocol::{
    self, Answer, Body, Digest, DigestsPart, Entry, EntryKind, FileVerdict, HashAlg, ManifestPart, Message,
    Offer, Reply, Trailer, Verdict, Withdraw,
};

use crate::util::{Receiver, data_frame, random_bytes, send, source_file};

/// The files peers have: empty, small, and large enough (1.5 MiB) to leave resumable partials.
fn contents() -> Vec<Vec<u8>> {
    vec![Vec::new(), b"eleven byte".to_vec(), random_bytes(3 << 19, 99)]
}

const NAMES: [&str; 3] = ["a", "b", "c.txt"];
const PATHS: [&[&str]; 5] = [&["a"], &["d"], &["d", "a"], &["d", "e"], &["b"]];

/// What a peer claims about a content's digest.
#[derive(Debug, Clone, Copy)]
enum Claim {
    Right,
    Wrong,
    Missing,
}

#[derive(Debug, Clone)]
enum Op {
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
    Trailer {
        content: usize,
        claim: Claim,
        blake3: bool,
    },
    Manifest {
        entries: Vec<(usize, Option<usize>, bool)>,
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
        1 => (0..3usize, claim(), any::<bool>()).prop_map(|(content, claim, blake3)| Op::Trailer { content, claim, blake3 }),
        2 => (prop::collection::vec((0..PATHS.len(), prop::option::of(0..3usize), any::<bool>()), 0..5), prop::bool::weighted(0.8))
            .prop_map(|(entries, last)| Op::Manifest { entries, last }),
        2 => (0..4u32, prop::collection::vec((0..3usize, claim(), any::<bool>()), 0..4))
            .prop_map(|(first, digests)| Op::Digests { first, digests }),
        2 => (0..5u32).prop_map(|index| Op::Body { index }),
        1 => (0..5u32).prop_map(|index| Op::Withdraw { index }),
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

fn encode(op: &Op, pool: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    let msg = match op {
        Op::Offer { name, content, size_delta, claim, blake3, tag } => Message::Offer(Offer {
            name: NAMES[*name].into(),
            size: (pool[*content].len() as u64).saturating_add_signed((*size_delta).into()),
            hash: alg(*blake3),
            digest: digest(&pool[*content], *claim, alg(*blake3)),
            tag: [*tag; 16],
        }),
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
        Op::Trailer { content, claim, blake3 } => {
            Message::Trailer(Trailer { digest: digest(&pool[*content], *claim, alg(*blake3)) })
        }
        Op::Manifest { entries, last } => Message::Manifest(ManifestPart {
            entries: entries
                .iter()
                .map(|(path, file, blake3)| Entry {
                    path: PATHS[*path].iter().map(|s| s.to_string()).collect(),
                    kind: match file {
                        Some(c) => EntryKind::File { size: pool[*c].len() as u64, hash: alg(*blake3) },
                        None => EntryKind::Dir,
                    },
                    mode: 0o644,
                    mtime: (1_700_000_000, 0),
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
        Op::Raw(bytes) => return bytes.clone(),
    };
    protocol::write_message(&mut out, &msg).unwrap();
    out
}

/// Says everything, reading whatever comes back on another thread, then hangs up and waits for
/// the receiver to close its side.
fn play_noise(rx: &Receiver, hello: bool, ops: &[Op], pool: &[Vec<u8>]) {
    let mut stream = TcpStream::connect(rx.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut said = if hello { protocol::hello().to_vec() } else { b"GET / HTTP/1.0\r\n".to_vec() };
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
    /// Hang up `at` per mille into the bytes sent for file `file`.
    Cut {
        file: usize,
        at: u16,
    },
    /// Say `op` at step `step` (0: before the offer or manifest, 1: after it, 2: in the middle of
    /// the first body, 3: after the bodies).
    Inject {
        step: u8,
        op: Op,
    },
    /// Withdraw file `file` instead of sending it (batch), or send no trailer (single file).
    Withdraw {
        file: usize,
    },
    /// Announce the body of the entry after the one due (batch).
    WrongIndex {
        file: usize,
    },
}

#[derive(Debug, Clone)]
struct Plan {
    batch: bool,
    files: Vec<FilePlan>,
    /// Folders listed in a batch, as indexes into `PATHS`; they come after the files.
    dirs: Vec<usize>,
    /// Data frame size.
    chunk: usize,
    mutation: Mutation,
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

fn plan() -> impl Strategy<Value = Plan> {
    let mutation = prop_oneof![
        4 => Just(Mutation::None),
        2 => (0..3usize, 0..1000u16).prop_map(|(file, at)| Mutation::Flip { file, at }),
        2 => (0..3usize, 0..1000u16).prop_map(|(file, at)| Mutation::Cut { file, at }),
        2 => (0..4u8, op()).prop_map(|(step, op)| Mutation::Inject { step, op }),
        1 => (0..3usize).prop_map(|file| Mutation::Withdraw { file }),
        1 => (0..3usize).prop_map(|file| Mutation::WrongIndex { file }),
    ];
    (
        any::<bool>(),
        prop::collection::vec(file_plan(), 1..4),
        prop::collection::vec(0..PATHS.len(), 0..2),
        prop_oneof![Just(1000usize), Just(65536), Just(1 << 20)],
        mutation,
    )
        .prop_map(|(batch, mut files, dirs, chunk, mutation)| {
            if !batch {
                files.truncate(1);
                files[0].place %= NAMES.len();
            }
            Plan { batch, files, dirs, chunk, mutation }
        })
}

/// An acknowledgement the receiver gave: this content is stored at this path under DIR.
struct Acked {
    path: std::path::PathBuf,
    content: usize,
    /// The receiver's words, for the failure message.
    said: &'static str,
}

/// A peer following `plan`, reading the receiver's answers as a sender does.
struct Peer<'a> {
    stream: TcpStream,
    plan: &'a Plan,
    pool: &'a [Vec<u8>],
    acked: Vec<Acked>,
    /// Set once something was injected: the answers may then be to it, so none are attributed.
    injected: bool,
}

impl Peer<'_> {
    fn say(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    fn message(&mut self, m: &Message) -> bool {
        let mut out = Vec::new();
        protocol::write_message(&mut out, m).unwrap();
        self.say(&out)
    }

    fn read(&mut self) -> Option<Message> {
        protocol::read_message(&mut self.stream).ok()
    }

    fn inject(&mut self, step: u8) -> bool {
        match &self.plan.mutation {
            Mutation::Inject { step: s, op } if *s == step => {
                self.injected = true;
                let bytes = encode(op, self.pool);
                self.say(&bytes)
            }
            _ => true,
        }
    }

    /// Sends file `i`'s body from `offset` as data frames, applying the plan's mutations. False if
    /// the peer hangs up (a cut) or the receiver did.
    fn body(&mut self, i: usize, offset: u64) -> bool {
        let f = &self.plan.files[i];
        let size = (self.pool[f.content].len() as u64).saturating_add_signed(f.size_delta.into()) as usize;
        let mut body = self.pool[f.other_body.unwrap_or(f.content)].clone();
        body.resize(size, b'#');
        let mut rest = body.get(offset as usize..).unwrap_or(&[]).to_vec();
        let cut = match self.plan.mutation {
            Mutation::Flip { file, at } if file == i && !rest.is_empty() => {
                let at = rest.len() * at as usize / 1000;
                rest[at] ^= 0x20;
                None
            }
            Mutation::Cut { file, at } if file == i => Some(rest.len() * at as usize / 1000),
            _ => None,
        };
        let mut sent = 0;
        for piece in rest.chunks(self.plan.chunk) {
            if let Some(cut) = cut
                && sent + piece.len() > cut
            {
                // The header announces the whole piece; only its first `cut - sent` bytes follow.
                let frame = data_frame(piece);
                let _ = self.say(&frame[..protocol::FRAME_HEADER_LEN + cut - sent]);
                return false;
            }
            if !self.say(&data_frame(piece)) || (sent == 0 && !self.inject(2)) {
                return false;
            }
            sent += piece.len();
        }
        true
    }

    fn digest_of(&self, i: usize, claim: Claim) -> Option<Digest> {
        let f = &self.plan.files[i];
        digest(&self.pool[f.content], claim, alg(f.blake3))
    }

    fn single(&mut self) {
        let f = self.plan.files[0].clone();
        let size = (self.pool[f.content].len() as u64).saturating_add_signed(f.size_delta.into());
        let mut offer = Offer {
            name: NAMES[f.place].into(),
            size,
            hash: alg(f.blake3),
            digest: self.digest_of(0, f.claim),
            tag: [f.tag; 16],
        };
        if !self.inject(0) || !self.message(&Message::Offer(offer.clone())) || !self.inject(1) {
            return;
        }
        loop {
            match self.read() {
                Some(Message::Reply(Reply::NeedDigest)) => {
                    offer.digest = self.digest_of(0, Claim::Right);
                    if !self.message(&Message::Offer(offer.clone())) {
                        return;
                    }
                }
                Some(Message::Reply(Reply::Accept { offset })) => {
                    if !self.body(0, offset) || !self.inject(3) {
                        return;
                    }
                    if offer.digest.is_none() && !matches!(self.plan.mutation, Mutation::Withdraw { .. }) {
                        let trailer = Trailer { digest: self.digest_of(0, Claim::Right) };
                        if !self.message(&Message::Trailer(trailer)) {
                            return;
                        }
                    }
                    if let Some(Message::Verdict(Verdict::Verified { name })) = self.read() {
                        self.acked.push(Acked { path: name.into(), content: f.content, said: "Verified" });
                    }
                    return;
                }
                Some(Message::Reply(Reply::AlreadyHave { name })) => {
                    self.acked.push(Acked { path: name.into(), content: f.content, said: "AlreadyHave" });
                    return;
                }
                _ => return,
            }
        }
    }

    fn batch(&mut self) {
        let plan = self.plan;
        let mut entries = Vec::new();
        for f in &plan.files {
            let size = (self.pool[f.content].len() as u64).saturating_add_signed(f.size_delta.into());
            entries.push((PATHS[f.place], EntryKind::File { size, hash: alg(f.blake3) }));
        }
        for &d in &plan.dirs {
            entries.push((PATHS[d], EntryKind::Dir));
        }
        let manifest: Vec<Entry> = entries
            .iter()
            .map(|(path, kind)| Entry {
                path: path.iter().map(|c| c.to_string()).collect(),
                kind: kind.clone(),
                mode: 0o644,
                mtime: (1_700_000_000, 0),
            })
            .collect();
        let part = Message::Manifest(ManifestPart { entries: manifest, last: true });
        if !self.inject(0) || !self.message(&part) || !self.inject(1) {
            return;
        }
        match self.read() {
            Some(Message::Answers(a)) if a.answers.is_empty() => {}
            _ => return,
        }
        let digests = (0..plan.files.len()).map(|i| self.digest_of(i, plan.files[i].claim)).collect();
        if !self.message(&Message::Digests(DigestsPart { first: 0, digests })) {
            return;
        }
        let mut answers = Vec::new();
        while answers.len() < entries.len() {
            match self.read() {
                Some(Message::Answers(a)) => answers.extend(a.answers),
                Some(Message::FileVerdict(_)) => {}
                _ => return,
            }
        }
        for (i, answer) in answers.iter().enumerate().take(plan.files.len()) {
            let path: std::path::PathBuf = PATHS[plan.files[i].place].iter().collect();
            match answer {
                // Where the receiver says the content is: the entry's own name or a keep-both copy.
                Answer::Have { name } => self.acked.push(Acked {
                    path: path.with_file_name(name),
                    content: plan.files[i].content,
                    said: "Have",
                }),
                Answer::Send { offset } => {
                    let index = match plan.mutation {
                        Mutation::WrongIndex { file } if file == i => i as u32 + 1,
                        _ => i as u32,
                    };
                    let sent = match plan.mutation {
                        Mutation::Withdraw { file } if file == i => {
                            self.message(&Message::Withdraw(Withdraw { index, reason: "changed".into() }))
                        }
                        _ => self.message(&Message::Body(Body { index })) && self.body(i, *offset),
                    };
                    if !sent {
                        return;
                    }
                }
                Answer::Reject { .. } => {}
            }
        }
        if !self.inject(3) {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Write);
        while let Some(m) = self.read() {
            if let Message::FileVerdict(FileVerdict { index, verdict: Verdict::Verified { name } }) = m {
                let i = index as usize;
                let Some(f) = plan.files.get(i) else { continue };
                let mut path: std::path::PathBuf = PATHS[f.place].iter().collect();
                if !name.contains('/') {
                    path.set_file_name(&name);
                } else {
                    path = name.into();
                }
                self.acked.push(Acked { path, content: f.content, said: "FileVerdict Verified" });
            }
        }
    }
}

/// Plays `plan` to the end (or until either side gives up), hangs up, waits for the receiver to
/// close, and returns what it acknowledged.
fn play(rx: &Receiver, plan: &Plan, pool: &[Vec<u8>]) -> Vec<Acked> {
    let stream = TcpStream::connect(rx.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut peer = Peer { stream, plan, pool, acked: Vec::new(), injected: false };
    if peer.say(&protocol::hello()) && protocol::read_hello(&mut peer.stream).is_ok() {
        if plan.batch { peer.batch() } else { peer.single() }
    }
    let _ = peer.stream.shutdown(Shutdown::Write);
    let mut buf = vec![0u8; 64 << 10];
    while matches!(peer.stream.read(&mut buf), Ok(n) if n > 0) {}
    if peer.injected { Vec::new() } else { peer.acked }
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
    converse(&[]);
}

#[test]
fn random_hostile_conversations_with_overwrite_never_store_an_unverified_file() {
    converse(&["--overwrite"]);
}

/// Plays `cases()` random conversations against one receiver started with `args`.
fn converse(args: &[&str]) {
    let args = [&["--quiet", "--timeout", "3", "--handshake-timeout", "3"], args].concat();
    let rx = std::cell::RefCell::new(Receiver::start(&args));
    let pool = contents();
    let mut runner =
        TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let kind = prop_oneof![
        1 => (prop::bool::weighted(0.95), prop::collection::vec(op(), 1..10)).prop_map(Conversation::Noise),
        4 => plan().prop_map(|plan| Conversation::Plan(plan, false)),
        // The large file cut somewhere, then the same plan again without the cut: a resume.
        1 => (plan(), 0..1000u16).prop_map(|(mut plan, at)| {
            plan.files[0].content = 2;
            plan.files[0].size_delta = 0;
            plan.mutation = Mutation::Cut { file: 0, at };
            Conversation::Plan(plan, true)
        }),
    ];
    // Now and then DIR is emptied first, so the receiver does not end up having everything.
    let conversation = (prop::bool::weighted(0.1), kind);
    let acks = std::cell::Cell::new(0usize);
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
                    play_noise(&rx, hello, &ops, &pool);
                    Vec::new()
                }
                Conversation::Plan(plan, false) => vec![plan],
                Conversation::Plan(plan, true) => {
                    let again = Plan { mutation: Mutation::None, ..plan.clone() };
                    vec![plan, again]
                }
            };
            for plan in &plays {
                for ack in play(&rx, plan, &pool) {
                    acks.set(acks.get() + 1);
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
            }
            check(&rx, &pool)?;
            prop_assert!(rx.child.try_wait().unwrap().is_none(), "the receiver exited:\n{}", rx.stderr());
            Ok(())
        })
        .unwrap();
    let mut rx = rx.into_inner();
    // What the conversations achieved, for the record (some must have stored files, or the test
    // never reached the paths that write).
    let log = rx.stderr();
    println!(
        "{} hostile conversations ({args:?}): {} acknowledgements checked on disk; receiver log: {} stored, \
         {} resumed, {} already there, {} failed",
        cases(),
        acks.get(),
        log.matches("verified, stored as").count(),
        log.matches("(resumed at").count(),
        log.matches("already have it").count(),
        log.matches(": failed: ").count(),
    );
    assert!(acks.get() >= cases() as usize / 10, "too few conversations got as far as an acknowledgement");
    if std::env::var("SHOWLOG").is_ok() {
        println!("{log}");
    }
    let data = random_bytes(200_000, 3);
    let (_src, path) = source_file("honest.bin", &data);
    send(&path, &rx.target(), &["--quiet"]).expect(0);
    assert!(std::fs::read(rx.dir.join("honest.bin")).unwrap() == data);
    assert!(rx.child.try_wait().unwrap().is_none());
}
