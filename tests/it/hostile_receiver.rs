//! The sender facing a hostile receiver (scp's CVE-2019-6111 was a client trusting its server):
//! offsets past the end, oversized frames, answers and verdicts it never asked for, names full of
//! escapes. Each time the sender stops with a protocol error (exit 7) or prints the receiver's
//! words escaped, and it never writes anything.

use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xfer::protocol::{self, Answer, AnswersPart, FileVerdict, Message, Reply, Verdict};

use crate::util::{random_bytes, send, source_file};

/// A one-connection fake receiver: greets, reads the sender's hello and first message, then
/// runs `script` on the connection. Returns its address.
fn fake(script: impl FnOnce(&mut TcpStream, Message) + Send + 'static) -> (String, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        protocol::write_hello(&mut s).unwrap();
        protocol::read_hello(&mut s).unwrap();
        let first = protocol::read_message(&mut s).unwrap();
        script(&mut s, first);
        // Let the sender read everything before the connection goes.
        std::thread::sleep(Duration::from_millis(300));
    });
    (addr, handle)
}

fn say(s: &mut TcpStream, m: Message) {
    let _ = protocol::write_message(s, &m);
}

#[test]
fn an_offset_past_the_end_is_refused() {
    for offset in [100_001, u64::MAX] {
        let (_src, path) = source_file("f.bin", &random_bytes(100_000, 1));
        let (addr, fake) = fake(move |s, _| say(s, Message::Reply(Reply::Accept { offset })));
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
        say(s, Message::Reply(Reply::Accept { offset: 0 }));
        let mut left = 3000u64;
        while left > 0 {
            let h = protocol::read_frame_header(s).unwrap();
            let mut buf = vec![0; h.len as usize];
            std::io::Read::read_exact(s, &mut buf).unwrap();
            left = left.saturating_sub(h.len.into());
        }
        // A verdict may come before or after a trailer; the sender reads it either way.
        let name = "../../.ssh/authorized_keys\x1b]0;owned\x07\x1b[2J\u{202e}gpj.exe".to_string();
        say(s, Message::Verdict(Verdict::Verified { name }));
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
fn a_batch_receiver_that_answers_what_it_was_not_asked_is_a_protocol_error() {
    type Script = fn(&mut TcpStream, usize);
    // (what the sender must say, whether `a` is large (256 MiB, sparse), the receiver's script)
    let cases: [(&str, bool, Script); 4] = [
        ("more answers than the", false, |s, n| {
            say(s, Message::Answers(AnswersPart { answers: vec![], last: false }));
            let _ = protocol::read_message(s);
            let answers = vec![Answer::Have { name: "x".into() }; n + 1];
            say(s, Message::Answers(AnswersPart { answers, last: true }));
        }),
        ("offset lies past its file's end", false, |s, n| {
            say(s, Message::Answers(AnswersPart { answers: vec![], last: false }));
            // Wait for the digests, so only the offset is wrong.
            let _ = protocol::read_message(s);
            let mut answers = vec![Answer::Have { name: "x".into() }; n];
            answers[n - 1] = Answer::Send { offset: u64::MAX };
            say(s, Message::Answers(AnswersPart { answers, last: true }));
        }),
        // Answers right behind the acceptance, while the sender is still hashing the large `a`.
        ("before its digest was sent", true, |s, n| {
            say(s, Message::Answers(AnswersPart { answers: vec![], last: false }));
            say(
                s,
                Message::Answers(AnswersPart {
                    answers: vec![Answer::Have { name: "x".into() }; n],
                    last: true,
                }),
            );
        }),
        ("which was not sent", false, |s, _| {
            say(s, Message::Answers(AnswersPart { answers: vec![], last: false }));
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
