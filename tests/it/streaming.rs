//! Files answered before their digest: the sender hashes while it sends and the digest follows
//! the body in a Digests part. The receiver keeps nothing that digest does not vouch for, and
//! waits for the digest before answering when it may already have the file (or resume it).

use std::fs;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use xfer::protocol::{Answer, Entry, EntryKind, FileVerdict, HashAlg, Message, Verdict, WireError};

use crate::hostile::still_serves;
use crate::util::{RawPeer, Receiver, file_entry, is_accept, random_bytes, send, sha256, source_file};

/// Greets, lists `entry` as a one-file manifest (no digest yet) and reads the acceptance.
fn list(rx: &Receiver, entry: Entry) -> RawPeer {
    let mut p = RawPeer::greet(rx.addr);
    p.manifest(vec![entry]);
    let first = p.read().unwrap();
    assert!(is_accept(&first), "expected the manifest's acceptance, got {first:?}");
    p
}

/// [`list`] for a file `name` of `size` bytes.
fn list_file(rx: &Receiver, name: &str, size: u64) -> RawPeer {
    list(rx, file_entry(&[name], size))
}

/// A file entry with the sender's version tag `tag`.
fn tagged(name: &str, size: u64, tag: [u8; 16]) -> Entry {
    Entry { kind: EntryKind::File { size, hash: HashAlg::Sha256, tag }, ..file_entry(&[name], size) }
}

/// Reads the verdict on the transfer's only file.
fn verdict(p: &mut RawPeer) -> Verdict {
    match p.read().unwrap() {
        Message::FileVerdict(FileVerdict { index: 0, verdict }) => verdict,
        other => panic!("expected the file's verdict, got {other:?}"),
    }
}

/// Asserts the receiver says nothing for `wait`: it is waiting for the digest.
fn assert_silent(p: &mut RawPeer, wait: Duration, why: &str) {
    p.stream.set_read_timeout(Some(wait)).unwrap();
    let got = p.read();
    p.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    match got {
        Err(WireError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("{why}: the receiver should wait for the digest, but said {other:?}"),
    }
}

/// Waits until the receiver has logged `n` lines containing `needle` (one per transfer).
fn wait_log_lines(rx: &Receiver, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while rx.stderr().matches(needle).count() < n {
        assert!(Instant::now() < deadline, "fewer than {n} lines with {needle:?}:\n{}", rx.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_digest_after_the_body_decides_what_is_kept() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(300_000, 3);
    let size = data.len() as u64;
    // Nothing here could match: answered before any digest; the right one after the body.
    let mut p = list_file(&rx, "good", size);
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(&data);
    p.digests(0, vec![Some(sha256(&data))]);
    assert_eq!(verdict(&mut p), Verdict::Verified { name: "good".into() });
    assert!(fs::read(rx.dir.join("good")).unwrap() == data);
    fs::remove_file(rx.dir.join("good")).unwrap();
    // A wrong digest: a mismatch, and nothing kept.
    let mut p = list_file(&rx, "bad", size);
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(&data);
    p.digests(0, vec![Some(sha256(b"something else"))]);
    let want = Verdict::HashMismatch { expected: sha256(b"something else"), actual: sha256(&data) };
    assert_eq!(verdict(&mut p), want);
    // No digest at all (the sender's file changed): a failure, and nothing kept.
    let mut p = list_file(&rx, "changed", size);
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(&data);
    p.digests(0, vec![None]);
    match verdict(&mut p) {
        Verdict::Failed { reason } => assert!(reason.contains("changed"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    // More data instead of the missing digest: a protocol error.
    let mut p = list_file(&rx, "no-digest", 3);
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(b"abc");
    p.data(b"d");
    assert!(p.closed_by_peer());
    rx.wait_log("\"no-digest\" (3 B): ");
    rx.wait_log("expected a message frame, got a data frame");
    // Any other message instead of it: a protocol error too (only digests may come between a
    // body's end and its digest).
    let mut p = list_file(&rx, "body-again", 3);
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(b"abc");
    p.body(0);
    assert!(p.closed_by_peer());
    rx.wait_log("\"body-again\" (3 B): ");
    rx.wait_log("expected the file's digest, got body");
    still_serves(&rx, 0);
}

#[test]
fn a_same_size_file_makes_the_receiver_wait_for_the_digest() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(50_000, 4);
    let size = data.len() as u64;
    fs::write(rx.dir.join("same.bin"), &data).unwrap();
    // A regular file of this size at the name: no answer until the digest, then "have it".
    let mut p = list_file(&rx, "same.bin", size);
    assert_silent(&mut p, Duration::from_millis(500), "same.bin");
    p.digests(0, vec![Some(sha256(&data))]);
    assert_eq!(p.answer(), Answer::Have { name: "same.bin".into() });
    // The same at a keep-both name (the name itself holds another size): waits too.
    fs::write(rx.dir.join("kept.bin"), b"another size").unwrap();
    fs::write(rx.dir.join("kept (1).bin"), &data).unwrap();
    let mut p = list_file(&rx, "kept.bin", size);
    assert_silent(&mut p, Duration::from_millis(500), "kept.bin");
    p.digests(0, vec![Some(sha256(&data))]);
    assert_eq!(p.answer(), Answer::Have { name: "kept (1).bin".into() });
    // Nothing of this size there (another size at the name, or no file at all): answered at
    // once, before any digest was sent.
    for (name, size) in [("same.bin", size - 1), ("new.bin", size)] {
        let mut p = list_file(&rx, name, size);
        assert_eq!(p.answer(), Answer::Send { offset: 0 }, "{name}");
    }
    // While the receiver waits for the digest, a body (or anything but digests) is refused.
    let mut p = list_file(&rx, "same.bin", size);
    assert_silent(&mut p, Duration::from_millis(200), "same.bin again");
    p.body(0);
    p.data(&data);
    assert!(p.closed_by_peer());
    rx.wait_log("body of entry 0 when entry none is due");
    rx.assert_files(&["kept (1).bin", "kept.bin", "same.bin"]);
}

#[test]
fn a_partial_only_the_digest_could_resume_makes_the_receiver_wait_for_it() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(200_000, 5);
    let size = data.len() as u64;
    // A same-size file makes the first transfer wait for the digest, so its resume record holds
    // the digest as well as the version tag. Half the body, then the sender stops.
    fs::write(rx.dir.join("p.bin"), random_bytes(200_000, 6)).unwrap();
    let mut p = list(&rx, tagged("p.bin", size, [1; 16]));
    p.digests(0, vec![Some(sha256(&data))]);
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(&data[..100_000]);
    p.stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(verdict(&mut p), Verdict::SizeMismatch { expected: size, received: 100_000 });
    rx.wait_log("\"p.bin\"");
    fs::remove_file(rx.dir.join("p.bin")).unwrap();
    assert_eq!(rx.assert_files_and_partial(&[], "p.bin"), 100_000);
    // Another version tag: only the digest can tell whether that partial is this file's.
    let mut p = list(&rx, tagged("p.bin", size, [2; 16]));
    assert_silent(&mut p, Duration::from_millis(500), "another tag");
    p.digests(0, vec![Some(sha256(&data))]);
    assert_eq!(p.answer(), Answer::Send { offset: 100_000 });
    drop(p);
    wait_log_lines(&rx, "\"p.bin\"", 2);
    // The same version tag resumes at once, before any digest was sent.
    let mut p = list(&rx, tagged("p.bin", size, [1; 16]));
    assert_eq!(p.answer(), Answer::Send { offset: 100_000 });
    p.body(0);
    p.data(&data[100_000..]);
    p.digests(0, vec![Some(sha256(&data))]);
    assert_eq!(verdict(&mut p), Verdict::Verified { name: "p.bin".into() });
    rx.assert_files(&["p.bin"]);
    assert!(fs::read(rx.dir.join("p.bin")).unwrap() == data);
}

#[test]
fn an_uncached_send_of_a_file_the_receiver_has_sends_no_body() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(2 << 20, 9);
    let (_src, path) = source_file("have.bin", &data);
    send(&path, &rx.target(), &["--no-cache"]).expect(0);
    let again = send(&path, &rx.target(), &["--no-cache"]).expect(0);
    assert!(again.stdout().contains("receiver already has it as \"have.bin\""), "{}", again.report());
    // Its log says nothing arrived (it used to give the listed 2 MiB as if received).
    let log = rx.wait_log("already have it");
    let line = log.lines().find(|l| l.contains("already have it")).unwrap();
    assert!(line.contains("\"have.bin\" (2.0 MiB): nothing received in "), "{line}");
    // A different file of the same name and size: answered once its digest came, then sent
    // beside it.
    let other = random_bytes(2 << 20, 10);
    let (_src2, path2) = source_file("have.bin", &other);
    let run = send(&path2, &rx.target(), &["--no-cache"]).expect(0);
    assert!(run.stdout().contains("stored as \"have (1).bin\""), "{}", run.report());
    assert!(fs::read(rx.dir.join("have (1).bin")).unwrap() == other);
}
