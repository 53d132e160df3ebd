//! The sender's digest cache: a repeat send does not hash again, a changed file always is, the
//! cache can never turn a wrong digest into "verified", and a file changed mid-send fails.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc;

use sha2::Digest as _;
use xfer::protocol::{self, Answer, AnswersPart, FileVerdict, Message, Verdict};

use crate::hostile_receiver::{accept_manifest, read_body, read_digest, size_of, until_closed};
use crate::util::{Receiver, random_bytes, sha256, source_file, xfer_in};

fn send_with_cache(file: &Path, to: &str, cache: &Path, extra: &[&str]) -> crate::util::Run {
    let mut args: Vec<std::ffi::OsString> = vec!["send".into(), file.into(), to.into()];
    args.extend(extra.iter().map(Into::into));
    xfer_in(&args, cache)
}

#[test]
fn repeat_send_uses_the_cache_and_a_change_invalidates_it() {
    let cache = tempfile::tempdir().unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let (_src, path) = source_file("doc.txt", b"version one");
    let first = send_with_cache(&path, &rx.target(), cache.path(), &[]).expect(0);
    assert!(!first.stdout().contains("(cached)"), "{}", first.report());
    assert!(cache.path().join("xfer/digests-v1").is_file(), "no cache file written");

    // Same file again: digest from the cache, and the receiver already has it.
    let again = send_with_cache(&path, &rx.target(), cache.path(), &[]).expect(0);
    assert!(again.stdout().contains("(cached)"), "{}", again.report());
    assert!(again.stdout().contains("already has it"), "{}", again.report());
    assert!(again.stdout().contains(&sha256(b"version one").to_hex()), "{}", again.report());

    // Changed content (same size, even): hashed again, sent, verified.
    std::fs::write(&path, b"version two").unwrap();
    let changed = send_with_cache(&path, &rx.target(), cache.path(), &[]).expect(0);
    assert!(!changed.stdout().contains("(cached)"), "{}", changed.report());
    assert!(changed.stdout().contains(&sha256(b"version two").to_hex()), "{}", changed.report());
    assert_eq!(std::fs::read(rx.dir.join("doc (1).txt")).unwrap(), b"version two");

    // --no-cache reads the file whatever the cache holds.
    let uncached = send_with_cache(&path, &rx.target(), cache.path(), &["--no-cache"]).expect(0);
    assert!(!uncached.stdout().contains("(cached)"), "{}", uncached.report());
}

#[test]
fn a_lying_cache_cannot_make_a_transfer_verified() {
    let cache = tempfile::tempdir().unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let (_src, path) = source_file("victim.bin", b"real content");
    send_with_cache(&path, &rx.target(), cache.path(), &["--as", "first.bin"]).expect(0);
    // Corrupt the cached digest for this exact stamp.
    let file = cache.path().join("xfer/digests-v1");
    let text = std::fs::read_to_string(&file).unwrap();
    let good = sha256(b"real content").to_hex();
    std::fs::write(&file, text.replace(&good, &sha256(b"forged").to_hex())).unwrap();
    let run = send_with_cache(&path, &rx.target(), cache.path(), &["--as", "second.bin"]).expect(5);
    assert!(run.stderr().contains("hashed to"), "{}", run.report());
    rx.assert_files(&["first.bin"]);
}

#[test]
fn a_file_changed_while_being_sent_is_never_verified() {
    // A receiver that waits for the digest (as a real one does when a file of that size is
    // there), answers "send", reads the first frame, lets the test change the file, then drains
    // the body and says "verified" regardless: the sender must still fail.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (paused_tx, paused_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (told_tx, told_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        protocol::write_hello(&mut s).unwrap();
        protocol::read_hello(&mut s).unwrap();
        crate::util::expect_insecure(&mut s);
        let entries = accept_manifest(&mut s);
        let told = read_digest(&mut s);
        let answers = vec![Answer::Send { offset: 0 }];
        protocol::write_message(&mut s, &Message::Answers(AnswersPart { answers, last: true })).unwrap();
        let mut hasher = sha2::Sha256::new();
        let mut first = true;
        read_body(&mut s, size_of(&entries[0]), |bytes| {
            hasher.update(bytes);
            if std::mem::take(&mut first) {
                paused_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
        });
        told_tx.send((told, protocol::Digest(hasher.finalize().into()))).unwrap();
        let name = entries[0].path.join("/");
        let v = FileVerdict { index: 0, verdict: Verdict::Verified { name } };
        protocol::write_message(&mut s, &Message::FileVerdict(v)).unwrap();
        until_closed(&mut s);
    });
    // Far larger than loopback socket buffers, so the sender is still reading the file.
    let data = random_bytes(64 << 20, 8);
    let (_src, path) = source_file("growing.log", &data);
    let sender = {
        let path = path.clone();
        std::thread::spawn(move || crate::util::send(&path, &addr, &["--no-cache"]))
    };
    paused_rx.recv().unwrap();
    // Rewritten near its end, in place: bytes the sender has not read yet.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(data.len() as u64 - 100)).unwrap();
    f.write_all(b"changed while sending").unwrap();
    drop(f);
    go_tx.send(()).unwrap();
    let run = sender.join().unwrap().expect(5);
    assert!(run.stderr().contains("changed while it was being sent"), "{}", run.report());
    assert_eq!(run.stdout(), "", "no success summary\n{}", run.report());
    // And the receiver was never told a digest that vouches for what it got: the one it was
    // told (the file as listed) differs, so a real receiver stores nothing.
    let (told, received) = told_rx.recv().unwrap();
    assert_eq!(told, Some(sha256(&data)), "the digest of the file as it was listed");
    assert_ne!(told, Some(received), "the digest vouches for bytes that changed");
}
