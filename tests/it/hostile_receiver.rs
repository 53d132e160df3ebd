//! The sender facing a hostile receiver (scp's CVE-2019-6111 was a client trusting its server):
//! offsets past the end, oversized frames, answers and verdicts it never asked for, names full of
//! escapes. Each time the sender stops with a protocol error (exit 7) or prints the receiver's
//! words escaped, and it never writes anything. Also the fake receivers' half of the v4
//! conversation, used by other tests that need a receiver saying what a real one would not.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xfer::protocol::{
    self, Answer, AnswersPart, Digest, Entry, EntryKind, FileVerdict, FrameKind, ManifestPart, Message,
    Verdict,
};

use crate::util::{random_bytes, send, source_file};

/// A one-connection fake receiver: greets, reads the sender's hello and first message, then
/// runs `script` on the connection. Returns its address.
pub(crate) fn fake(
    script: impl FnOnce(&mut TcpStream, Message) + Send + 'static,
) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        protocol::write_hello(&mut s).unwrap();
        protocol::read_hello(&mut s).unwrap();
        crate::util::expect_insecure(&mut s);
        let first = protocol::read_message(&mut s).unwrap();
        script(&mut s, first);
        // Let the sender read everything before the connection goes.
        std::thread::sleep(Duration::from_millis(300));
    });
    (addr, handle)
}

pub(crate) fn say(s: &mut TcpStream, m: Message) {
    let _ = protocol::write_message(s, &m);
}

/// The receiver's acceptance of a manifest: an empty answers part.
pub(crate) fn acceptance() -> Message {
    Message::Answers(AnswersPart { answers: vec![], last: false })
}

/// Reads the sender's manifest (which must come in one part) and accepts it.
pub(crate) fn accept_manifest(s: &mut TcpStream) -> Vec<Entry> {
    match protocol::read_message(s).unwrap() {
        Message::Manifest(ManifestPart { entries, last: true }) => {
            say(s, acceptance());
            entries
        }
        other => panic!("expected a one-part manifest, got {other:?}"),
    }
}

/// The size of a file entry.
pub(crate) fn size_of(e: &Entry) -> u64 {
    match e.kind {
        EntryKind::File { size, .. } => size,
        EntryKind::Dir | EntryKind::Stream { .. } => panic!("{:?} has no size", e.path),
    }
}

/// Reads the sender's digests parts (keepalives included) until one carries a digest.
pub(crate) fn read_digest(s: &mut TcpStream) -> Option<Digest> {
    loop {
        match protocol::read_message(s).unwrap() {
            Message::Digests(part) if part.digests.is_empty() => continue,
            Message::Digests(part) => return part.digests[0],
            other => panic!("expected digests, got {other:?}"),
        }
    }
}

/// Reads what the sender says about the one file answered `Send { offset: 0 }` until its body
/// of `size` bytes is in: digests parts (before or after the body), `Body`, data frames, each of
/// which is passed to `frame`. Returns the digests sent so far (none if it is still to come).
pub(crate) fn read_body(s: &mut TcpStream, size: u64, mut frame: impl FnMut(&[u8])) -> Vec<Option<Digest>> {
    let (mut got, mut announced, mut digests) = (0u64, false, Vec::new());
    let mut buf = Vec::new();
    while got < size || !announced {
        let h = protocol::read_frame_header(s).unwrap();
        buf.resize(h.len as usize, 0);
        s.read_exact(&mut buf).unwrap();
        match h.kind {
            FrameKind::Data => {
                assert!(announced, "a data frame before the body was announced");
                got += u64::from(h.len);
                frame(&buf);
            }
            FrameKind::Message => match protocol::decode_message(&buf).unwrap() {
                Message::Digests(part) => digests.extend(part.digests),
                Message::Body(b) if !announced && b.index == 0 => announced = true,
                other => panic!("expected digests, the body or its data, got {other:?}"),
            },
            other => panic!("a {other} frame in the plaintext stream"),
        }
    }
    assert_eq!(got, size, "the body ran past the file's size");
    digests
}

/// Reads until the sender closes the connection, so that what was said last is read before the
/// connection goes (a close with unread data would reset it).
pub(crate) fn until_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64 * 1024];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

#[test]
fn an_offset_past_the_end_is_refused() {
    for offset in [100_001, u64::MAX] {
        let (_src, path) = source_file("f.bin", &random_bytes(100_000, 1));
        let (addr, fake) = fake(move |s, _| {
            say(s, acceptance());
            say(s, Message::Answers(AnswersPart { answers: vec![Answer::Send { offset }], last: true }));
        });
        let run = send(&path, &addr, &["--quiet"]).expect(7);
        assert!(
            run.stderr().contains(&format!("resume at byte {offset} of a 100000-byte file")),
            "{}",
            run.report()
        );
        fake.join().unwrap();
    }
}

#[test]
fn a_four_gib_frame_from_the_receiver_is_refused_without_allocating() {
    let (_src, path) = source_file("f.bin", b"small");
    let (addr, fake) = fake(|s, _| {
        let _ = std::io::Write::write_all(s, &[0xff, 0xff, 0xff, 0xff, 0x01]);
    });
    let start = Instant::now();
    let run = send(&path, &addr, &["--quiet"]).expect(7);
    assert!(run.stderr().contains("exceeds the message limit"), "{}", run.report());
    assert!(start.elapsed() < Duration::from_secs(5));
    fake.join().unwrap();
}

#[test]
fn a_stored_name_full_of_escapes_is_printed_inert() {
    let data = random_bytes(3000, 2);
    let (_src, path) = source_file("f.bin", &data);
    let (addr, fake) = fake(move |s, _| {
        say(s, acceptance());
        say(s, Message::Answers(AnswersPart { answers: vec![Answer::Send { offset: 0 }], last: true }));
        // A verdict may come before or after the file's digest; the sender reads it either way.
        read_body(s, 3000, |_| {});
        let name = "../../.ssh/authorized_keys\x1b]0;owned\x07\x1b[2J\u{202e}gpj.exe".to_string();
        say(s, Message::FileVerdict(FileVerdict { index: 0, verdict: Verdict::Verified { name } }));
        until_closed(s);
    });
    let run = send(&path, &addr, &[]);
    let out = format!("{}{}", run.stdout(), run.stderr());
    assert!(
        !out.contains('\x1b') && !out.contains('\x07') && !out.contains('\u{202e}'),
        "raw escapes: {out:?}"
    );
    fake.join().unwrap();
}

#[test]
fn a_send_answered_before_its_digest_is_sent_and_its_digest_follows_the_body() {
    // Answering Send before a file's digest came is legal: the sender sends the body at once,
    // and the digest by the end of it at the latest. `a` is large (256 MiB, sparse), so it is
    // still being hashed when its answer comes.
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    std::fs::File::create(tree.join("a")).unwrap().set_len(256 << 20).unwrap();
    std::fs::write(tree.join("b"), b"bee").unwrap();
    let (addr, fake) = fake(move |s, first| {
        let Message::Manifest(part) = first else { panic!("expected a manifest, got {first:?}") };
        let paths: Vec<String> = part.entries.iter().map(|e| e.path.join("/")).collect();
        assert_eq!(paths, ["t", "t/a", "t/b"]);
        say(s, acceptance());
        let answers =
            vec![Answer::Have { name: "t".into() }, Answer::Send { offset: 0 }, Answer::Send { offset: 0 }];
        say(s, Message::Answers(AnswersPart { answers, last: true }));
        // Everything up to the end of b's body, in order: digests may come anywhere between
        // bodies, and both must be in by the end of b's body (each by the end of its own).
        let mut digests = Vec::new();
        let (mut body, mut left) = (0u32, 0u64);
        while body < 2 || left > 0 {
            let h = protocol::read_frame_header(s).unwrap();
            let mut buf = vec![0; h.len as usize];
            s.read_exact(&mut buf).unwrap();
            if h.kind == FrameKind::Data {
                assert!(left >= u64::from(h.len), "data past the end of a body");
                left -= u64::from(h.len);
                continue;
            }
            assert_eq!(left, 0, "a message inside a body");
            match protocol::decode_message(&buf).unwrap() {
                Message::Digests(part) => {
                    assert_eq!(part.first as usize, digests.len());
                    digests.extend(part.digests);
                }
                Message::Body(b) => {
                    // Only digests may come between a body's end and its digest.
                    assert!(
                        digests.len() >= body as usize,
                        "body {} began before body {body}'s digest",
                        body + 1
                    );
                    body += 1;
                    assert_eq!(b.index, body, "bodies in manifest order");
                    left = if body == 1 { 256 << 20 } else { 3 };
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // b's digest may follow its body right away.
        while digests.len() < 2 {
            match protocol::read_message(s).unwrap() {
                Message::Digests(part) => digests.extend(part.digests),
                other => panic!("expected b's digest after its body, got {other:?}"),
            }
        }
        let zeros = {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            let mib = vec![0u8; 1 << 20];
            (0..256).for_each(|_| h.update(&mib));
            Digest(h.finalize().into())
        };
        assert_eq!(digests, [Some(zeros), Some(crate::util::sha256(b"bee"))]);
        for (index, name) in [(1, "a"), (2, "b")] {
            let verdict = Verdict::Verified { name: name.into() };
            say(s, Message::FileVerdict(FileVerdict { index, verdict }));
        }
        until_closed(s);
    });
    let run = send(&tree, &addr, &["--quiet", "--no-cache"]).expect(0);
    assert!(
        run.stdout().contains("(2 files, 1 folder, ")
            && run.stdout().contains("2 verified, 0 already there, 0 failed"),
        "{}",
        run.report()
    );
    fake.join().unwrap();
}

/// Reads digests parts until `files` digests have come (the sender may send them in several).
fn await_digests(s: &mut TcpStream, files: usize) {
    let mut got = 0;
    while got < files {
        match protocol::read_message(s) {
            Ok(Message::Digests(part)) => got += part.digests.len(),
            _ => return,
        }
    }
}

#[test]
fn a_batch_receiver_that_answers_what_it_was_not_asked_is_a_protocol_error() {
    type Script = fn(&mut TcpStream, usize);
    // (what the sender must say, whether `a` is large (256 MiB, sparse), the receiver's script)
    let cases: [(&str, bool, Script); 4] = [
        ("more answers than the", false, |s, n| {
            say(s, acceptance());
            await_digests(s, n - 1);
            let answers = vec![Answer::Have { name: "x".into() }; n + 1];
            say(s, Message::Answers(AnswersPart { answers, last: true }));
        }),
        ("receiver asked to resume at byte 18446744073709551615 of a 1-byte file", false, |s, n| {
            say(s, acceptance());
            // Wait for the digests, so only the offset is wrong.
            await_digests(s, n - 1);
            let mut answers = vec![Answer::Have { name: "x".into() }; n];
            answers[n - 1] = Answer::Send { offset: u64::MAX };
            say(s, Message::Answers(AnswersPart { answers, last: true }));
        }),
        // "Have" right behind the acceptance, while the sender is still hashing the large `a`:
        // only a receiver that has the digest can know it has the content. (A Send before the
        // digest is legal, see above.)
        ("before its digest was sent", true, |s, n| {
            say(s, acceptance());
            say(
                s,
                Message::Answers(AnswersPart {
                    answers: vec![Answer::Have { name: "x".into() }; n],
                    last: true,
                }),
            );
        }),
        ("which was not sent", false, |s, _| {
            say(s, acceptance());
            let verdict = Verdict::Verified { name: "x".into() };
            say(s, Message::FileVerdict(FileVerdict { index: 0, verdict }));
        }),
    ];
    for (want, large, script) in cases {
        let src = tempfile::tempdir().unwrap();
        let tree = src.path().join("t");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("a"), random_bytes(5000, 3)).unwrap();
        if large {
            std::fs::File::options().write(true).open(tree.join("a")).unwrap().set_len(256 << 20).unwrap();
        }
        std::fs::write(tree.join("b"), b"b").unwrap();
        let before = crate::util::list(src.path());
        let (addr, fake) = fake(move |s, first| {
            let Message::Manifest(part) = first else { panic!("expected a manifest, got {first:?}") };
            script(s, part.entries.len());
        });
        let run = send(&tree, &addr, &["--quiet", "--no-cache"]).expect(7);
        assert!(run.stderr().contains(want), "{want}: {}", run.report());
        assert_eq!(crate::util::list(src.path()), before, "the sender wrote something");
        fake.join().unwrap();
    }
}

#[test]
fn a_receiver_flooding_empty_answers_is_stopped_at_once() {
    // Before: every empty answers part was queued for the sender's main loop in an unbounded
    // channel (about 95 bytes each: 1 GiB in 5 s), and the send never ended. Now an empty part
    // after the acceptance is a protocol error, and the queue is bounded anyway.
    let (addr, handle) = fake(|s, first| {
        assert!(matches!(first, Message::Manifest(_)), "{first:?}");
        say(s, acceptance());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if protocol::write_message(s, &acceptance()).is_err() {
                break;
            }
        }
    });
    let (_src, path) = source_file("f", &random_bytes(1000, 3));
    let run = send(&path, &addr, &[]).expect(7);
    assert!(run.stderr().contains("empty answers part"), "{}", run.report());
    assert!(run.elapsed < Duration::from_secs(5), "took {:?}", run.elapsed);
    handle.join().unwrap();
}

#[test]
fn a_receiver_trickling_its_verdict_is_given_up_on() {
    // Before: a verdict sent a byte every (timeout - ε) was never idle, so the sender waited as
    // long as the receiver liked. Now a message, once begun, must be in within one idle timeout.
    let (addr, handle) = fake(|s, first| {
        let Message::Manifest(part) = first else { panic!("expected a manifest, got {first:?}") };
        let size = size_of(&part.entries[0]);
        say(s, acceptance());
        say(s, Message::Answers(AnswersPart { answers: vec![Answer::Send { offset: 0 }], last: true }));
        if read_body(s, size, |_| {}).is_empty() {
            read_digest(s);
        }
        let mut bytes = Vec::new();
        let verdict = Verdict::Verified { name: "f".into() };
        protocol::write_message(&mut bytes, &Message::FileVerdict(FileVerdict { index: 0, verdict }))
            .unwrap();
        for b in bytes {
            if std::io::Write::write_all(s, &[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1500));
        }
    });
    let (_src, path) = source_file("f", &random_bytes(1000, 6));
    let run = send(&path, &addr, &["--timeout", "2"]).expect(3);
    assert!(run.elapsed < Duration::from_secs(8), "took {:?}\n{}", run.elapsed, run.report());
    assert!(run.stderr().contains("see --timeout"), "{}", run.report());
    drop(handle);
}

/// A folder `t` holding the small file `a` and the sparse file `b` of `b_size` bytes.
fn tree_with_a_large_file(b_size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("a"), random_bytes(1000, 7)).unwrap();
    std::fs::File::create(tree.join("b")).unwrap().set_len(b_size).unwrap();
    (src, tree)
}

/// A single sparse file of `size` bytes: it takes the sender seconds to hash.
fn large_file(size: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let src = tempfile::tempdir().unwrap();
    let path = src.path().join("large");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    (src, path)
}

#[test]
fn a_receiver_silent_while_the_sender_hashes_something_else_is_given_up_on() {
    // Before: the sender excused the receiver's silence as long as it was hashing anything, here
    // the 8 GiB `b`, which the receiver refused and does not wait for; and it noticed the
    // silence only at its reader's next timeout. Now silence is excused only while the receiver
    // waits for a digest not yet sent, and checked every second.
    let (silent_from, told) = std::sync::mpsc::channel();
    let (addr, handle) = fake(move |s, first| {
        let Message::Manifest(part) = first else { panic!("expected a manifest, got {first:?}") };
        let paths: Vec<String> = part.entries.iter().map(|e| e.path.join("/")).collect();
        assert_eq!(paths, ["t", "t/a", "t/b"]);
        say(s, acceptance());
        let refused =
            Answer::Reject { code: protocol::RejectCode::InsufficientSpace, reason: "no room".into() };
        let answers = vec![Answer::Have { name: "t".into() }, Answer::Send { offset: 0 }, refused];
        say(s, Message::Answers(AnswersPart { answers, last: true }));
        // Reads a's body and digest (and b's, if it comes), and never gives a's verdict.
        silent_from.send(Instant::now()).unwrap();
        until_closed(s);
    });
    let (_src, tree) = tree_with_a_large_file(8 << 30);
    let run = send(&tree, &addr, &["--quiet", "--no-cache", "--timeout", "1"]);
    let silent = told.recv().unwrap();
    let took = silent.elapsed();
    eprintln!("sender gave up {took:?} after the receiver fell silent (--timeout 1)");
    let run = run.expect(3);
    assert!(run.stderr().contains("timed out while waiting for the verdict"), "{}", run.report());
    assert!(took < Duration::from_secs(4), "took {took:?}\n{}", run.report());
    handle.join().unwrap();
}

#[test]
fn a_verdict_before_the_digest_was_sent_is_a_protocol_error() {
    // Only a receiver that has a file's digest can have verified it (or found it differs). The
    // body is answered at its end offset (nothing to send), and the verdict comes while the
    // sender is still hashing the 8 GiB file.
    let size = 8u64 << 30;
    let (addr, handle) = fake(move |s, _| {
        say(s, acceptance());
        say(s, Message::Answers(AnswersPart { answers: vec![Answer::Send { offset: size }], last: true }));
        loop {
            match protocol::read_message(s).unwrap() {
                Message::Digests(part) => assert!(part.digests.is_empty(), "the digest came already"),
                Message::Body(b) if b.index == 0 => break,
                other => panic!("expected the body, got {other:?}"),
            }
        }
        let verdict = Verdict::Verified { name: "large".into() };
        say(s, Message::FileVerdict(FileVerdict { index: 0, verdict }));
        until_closed(s);
    });
    let (_src, path) = large_file(size);
    let run = send(&path, &addr, &["--quiet", "--no-cache"]).expect(7);
    assert!(run.stderr().contains("verdict for entry 0 before its digest was sent"), "{}", run.report());
    assert!(run.elapsed < Duration::from_secs(5), "took {:?}", run.elapsed);
    handle.join().unwrap();
}

#[test]
fn a_message_stalled_mid_frame_while_the_sender_hashes_is_the_end_of_the_connection() {
    // The receiver waits for the digest of the file being hashed, so its silence is excused; but
    // a message that stops after its first bytes is not silence. Before, the reader waited that
    // out while the sender hashed and then read on from the middle of the frame.
    let (addr, handle) = fake(move |s, _| {
        say(s, acceptance());
        let mut bytes = Vec::new();
        let answers = vec![Answer::Send { offset: 0 }];
        protocol::write_message(&mut bytes, &Message::Answers(AnswersPart { answers, last: true })).unwrap();
        let _ = std::io::Write::write_all(s, &bytes[..3]);
        std::thread::sleep(Duration::from_millis(2500));
        let _ = std::io::Write::write_all(s, &bytes[3..]);
        until_closed(s);
    });
    let (_src, path) = large_file(8 << 30);
    let run = send(&path, &addr, &["--quiet", "--no-cache", "--timeout", "1"]).expect(3);
    assert!(run.stderr().contains("not complete within 1 s of its first byte"), "{}", run.report());
    assert!(run.elapsed < Duration::from_secs(5), "took {:?}", run.elapsed);
    handle.join().unwrap();
}
