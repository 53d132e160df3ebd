//! Hashing overlaps sending: the manifest goes out before any digest, digests follow as files are
//! hashed, and the receiver answers and stores each file without waiting for the rest: at once
//! when nothing on its disk could match the file, otherwise as soon as its digest comes.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xfer::protocol::{
    self, Answer, AnswersPart, Body, DigestsPart, Entry, EntryKind, FileVerdict, HashAlg, ManifestPart,
    Message, Verdict, Withdraw,
};

use crate::hostile::still_serves;
use crate::util::{BIN, RawPeer, Receiver, random_bytes, sha256, test_cache_home};

fn file(name: &str, size: u64) -> Entry {
    Entry {
        path: vec![name.into()],
        kind: EntryKind::File { size, hash: HashAlg::Sha256, tag: [0; 16] },
        mode: 0o644,
        mtime: (0, 0),
    }
}

/// Greets, sends `entries` as the manifest and reads the acceptance.
fn accepted(rx: &Receiver, entries: Vec<Entry>) -> RawPeer {
    let mut p = RawPeer::greet(rx.addr);
    protocol::write_message(&mut p.stream, &Message::Manifest(ManifestPart { entries, last: true })).unwrap();
    match p.read().unwrap() {
        Message::Answers(AnswersPart { answers, last: false }) if answers.is_empty() => p,
        other => panic!("expected the manifest's acceptance, got {other:?}"),
    }
}

fn say(p: &mut RawPeer, m: Message) {
    protocol::write_message(&mut p.stream, &m).unwrap();
}

fn answers(p: &mut RawPeer) -> Vec<Answer> {
    match p.read().unwrap() {
        Message::Answers(part) => part.answers,
        other => panic!("expected answers, got {other:?}"),
    }
}

fn verdict(p: &mut RawPeer) -> FileVerdict {
    match p.read().unwrap() {
        Message::FileVerdict(v) => v,
        other => panic!("expected a file verdict, got {other:?}"),
    }
}

#[test]
fn a_file_is_answered_stored_and_acknowledged_before_later_digests_exist() {
    let rx = Receiver::start(&["--quiet"]);
    // A file of z's size is there, so z's answer waits for its digest; nothing could match `a`.
    fs::write(rx.dir.join("z"), b"zzz?").unwrap();
    let mut p = accepted(&rx, vec![file("a", 3), file("z", 4)]);
    // Only the first digest: the receiver answers that file alone and takes its body.
    say(&mut p, Message::Digests(DigestsPart { first: 0, digests: vec![Some(sha256(b"abc"))] }));
    assert_eq!(answers(&mut p), vec![Answer::Send { offset: 0 }]);
    say(&mut p, Message::Body(Body { index: 0 }));
    p.data(b"abc");
    // A keepalive (the sender is still hashing) makes the receiver acknowledge what it holds.
    say(&mut p, Message::Digests(DigestsPart { first: 1, digests: vec![] }));
    let v = verdict(&mut p);
    assert_eq!((v.index, v.verdict), (0, Verdict::Verified { name: "a".into() }));
    assert_eq!(fs::read(rx.dir.join("a")).unwrap(), b"abc", "acknowledged, so on disk under its name");
    // The second file is answered once its digest comes, then withdrawn: it fails alone.
    say(&mut p, Message::Digests(DigestsPart { first: 1, digests: vec![Some(sha256(b"zzzz"))] }));
    assert_eq!(answers(&mut p), vec![Answer::Send { offset: 0 }]);
    say(&mut p, Message::Withdraw(Withdraw { index: 1, reason: "z changed\x1b[2J".into() }));
    let v = verdict(&mut p);
    match v.verdict {
        Verdict::Failed { reason } => {
            assert_eq!(v.index, 1);
            assert!(reason.contains("not sent: z changed") && !reason.contains('\x1b'), "{reason:?}");
        }
        other => panic!("a withdrawn file must fail, got {other:?}"),
    }
    assert!(p.closed_by_peer());
    rx.wait_log("1 received, 0 already there, 1 failed");
    assert_eq!(fs::read(rx.dir.join("z")).unwrap(), b"zzz?");
    fs::remove_file(rx.dir.join("a")).unwrap();
    fs::remove_file(rx.dir.join("z")).unwrap();
    still_serves(&rx, 0);
}

#[test]
fn a_file_the_sender_could_not_hash_is_refused_and_the_rest_goes_on() {
    let rx = Receiver::start(&["--quiet"]);
    // Not answered yet when its missing digest comes (a file of its size is there, so its answer
    // waits for the digest): refused, and the next file is answered and stored.
    fs::write(rx.dir.join("bad"), b"other").unwrap();
    let mut p = accepted(&rx, vec![file("bad", 5), file("good", 2)]);
    say(&mut p, Message::Digests(DigestsPart { first: 0, digests: vec![None, Some(sha256(b"ok"))] }));
    let got = answers(&mut p);
    assert!(matches!(&got[..], [Answer::Reject { .. }, Answer::Send { offset: 0 }]), "{got:?}");
    say(&mut p, Message::Body(Body { index: 1 }));
    p.data(b"ok");
    let v = verdict(&mut p);
    assert_eq!((v.index, v.verdict), (1, Verdict::Verified { name: "good".into() }));
    rx.assert_files(&["bad", "good"]);
    assert_eq!(fs::read(rx.dir.join("bad")).unwrap(), b"other");
    // Already answered "send" when its missing digest comes (nothing could match it): the
    // sender withdraws it, it fails alone, and the next file is stored.
    let mut p = accepted(&rx, vec![file("bad2", 5), file("good2", 2)]);
    assert_eq!(answers(&mut p), vec![Answer::Send { offset: 0 }, Answer::Send { offset: 0 }]);
    say(&mut p, Message::Digests(DigestsPart { first: 0, digests: vec![None, Some(sha256(b"ok"))] }));
    say(&mut p, Message::Withdraw(Withdraw { index: 0, reason: "cannot read bad2".into() }));
    let v = verdict(&mut p);
    assert!(matches!(&v.verdict, Verdict::Failed { .. }) && v.index == 0, "{v:?}");
    say(&mut p, Message::Body(Body { index: 1 }));
    p.data(b"ok");
    let v = verdict(&mut p);
    assert_eq!((v.index, v.verdict), (1, Verdict::Verified { name: "good2".into() }));
    rx.assert_files(&["bad", "good", "good2"]);
}

#[test]
fn digests_and_bodies_out_of_step_are_protocol_errors() {
    let rx = Receiver::start(&["--quiet"]);
    // Digests that skip ahead.
    let mut p = accepted(&rx, vec![file("a", 3), file("b", 3)]);
    say(&mut p, Message::Digests(DigestsPart { first: 1, digests: vec![Some(sha256(b"abc"))] }));
    assert!(p.closed_by_peer());
    rx.wait_log("digests for files 1..2 when 0 of 2 are known");
    // More digests than files.
    let mut p = accepted(&rx, vec![file("a", 3)]);
    say(&mut p, Message::Digests(DigestsPart { first: 0, digests: vec![Some(sha256(b"abc")); 2] }));
    assert!(p.closed_by_peer());
    rx.wait_log("digests for files 0..2 when 0 of 1 are known");
    // A body for a file that is not the next one due (both were answered at once: nothing
    // could match them).
    let mut p = accepted(&rx, vec![file("a", 3), file("b", 3)]);
    say(&mut p, Message::Digests(DigestsPart { first: 0, digests: vec![Some(sha256(b"abc"))] }));
    assert_eq!(answers(&mut p), vec![Answer::Send { offset: 0 }, Answer::Send { offset: 0 }]);
    say(&mut p, Message::Body(Body { index: 1 }));
    p.data(b"abc");
    assert!(p.closed_by_peer());
    rx.wait_log("body of entry 1 when entry 0 is due");
    // A body for a file not answered at all yet (a file of its size is there, so its answer
    // waits for its digest).
    fs::write(rx.dir.join("a"), b"aaa").unwrap();
    let mut p = accepted(&rx, vec![file("a", 3)]);
    say(&mut p, Message::Body(Body { index: 0 }));
    p.data(b"abc");
    assert!(p.closed_by_peer());
    rx.wait_log("body of entry 0 when entry none is due");
    assert_eq!(fs::read(rx.dir.join("a")).unwrap(), b"aaa");
    fs::remove_file(rx.dir.join("a")).unwrap();
    still_serves(&rx, 0);
}

/// Starts `xfer send PATHS... TO --no-cache` in the background.
fn spawn_send(paths: &[&std::path::Path], to: &str) -> std::process::Child {
    Command::new(BIN)
        .args(["send", "--insecure"])
        .args(paths)
        .args([to, "--no-cache", "--verbose"])
        .env("XDG_CACHE_HOME", test_cache_home())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn the_first_file_is_stored_while_a_later_one_is_still_being_hashed() {
    // `a` is tiny; `z` is large enough that hashing it takes over a second (SHA-256 runs at
    // 0.3-1.6 GB/s here). The receiver holds a file of z's size at z's path, so z's answer waits
    // for its digest (a file answered at once would have its body sent while it is hashed).
    // Meanwhile `a` is answered and sent, and the sender's keepalive while it hashes z makes the
    // receiver acknowledge `a`. Hashing everything first would store `a` only once `z` is
    // hashed.
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("batch");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a"), b"first").unwrap();
    fs::File::create(dir.join("z")).unwrap().set_len(3 << 30).unwrap();
    let rx = Receiver::start(&["--quiet"]);
    fs::create_dir(rx.dir.join("batch")).unwrap();
    let there = rx.dir.join("batch/z");
    fs::write(&there, b"another z").unwrap();
    fs::File::options().write(true).open(&there).unwrap().set_len(3 << 30).unwrap();
    let mut child = spawn_send(&[&dir], &rx.target());
    let stored = rx.dir.join("batch/a");
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read(&stored).ok().as_deref() != Some(b"first") {
        assert!(child.try_wait().unwrap().is_none(), "the sender ended before `a` was stored");
        assert!(Instant::now() < deadline, "`a` never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Nothing of `z` has arrived yet: its digest was not even known when `a` was acknowledged.
    assert_eq!(crate::util::list(&rx.dir.join("batch")), ["a", "z"], "z's body had started");
    assert_eq!(fs::metadata(&there).unwrap().len(), 3 << 30);
    assert!(child.try_wait().unwrap().is_none(), "the sender is still busy with z");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_large_body_does_not_hold_back_the_files_before_it() {
    // `z` is answered at once (nothing at its path could match it), so its body goes out while it
    // is hashed, and it fills a durability group (256 MiB) on its own: the receiver makes `a`
    // durable and acknowledges it before z's body arrives, not after it in the same group.
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("batch");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a"), b"first").unwrap();
    fs::File::create(dir.join("z")).unwrap().set_len(512 << 20).unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let child = spawn_send(&[&dir], &rx.target());
    let (stored, z) = (rx.dir.join("batch/a"), rx.dir.join("batch/z"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stored.exists() {
        assert!(Instant::now() < deadline, "a never stored; receiver: {}", rx.stderr());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!z.exists(), "a was held back until z had arrived");
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    assert_eq!(fs::metadata(&z).unwrap().len(), 512 << 20);
    assert_eq!(fs::read(&stored).unwrap(), b"first");
}

#[test]
fn a_file_that_keeps_changing_fails_alone() {
    // One file is rewritten over and over while the batch runs: by the time it is hashed it
    // no longer matches what the walk saw, so it is reported failed; the others arrive.
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("batch");
    fs::create_dir(&dir).unwrap();
    let first = random_bytes(32 << 20, 7);
    fs::write(dir.join("1-first"), &first).unwrap();
    fs::write(dir.join("2-busy"), b"v0").unwrap();
    fs::write(dir.join("3-last"), b"last").unwrap();
    let busy = dir.join("2-busy");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                fs::write(&busy, format!("v{n}")).unwrap();
                // No sleep: on a loaded machine a sleeping writer can miss the whole window
                // between the walk and the hashing (a few ms with SHA extensions).
                std::thread::yield_now();
            }
        })
    };
    let rx = Receiver::start(&["--quiet"]);
    let out = spawn_send(&[&dir], &rx.target()).wait_with_output().unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let report = format!("status {}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert_eq!(out.status.code(), Some(5), "{report}");
    assert!(
        stdout.contains("verified \"batch/1-first\"") && stdout.contains("verified \"batch/3-last\""),
        "{report}"
    );
    assert!(stdout.contains("failed \"batch/2-busy\"") && stdout.contains("1 failed"), "{report}");
    // Caught when it was listed, hashed or sent, whichever came first.
    assert!(stderr.contains("2-busy changed ") && stderr.contains("send it again"), "{report}");
    rx.wait_log("1 failed");
    assert_eq!(fs::read(rx.dir.join("batch/1-first")).unwrap(), first);
    assert_eq!(fs::read(rx.dir.join("batch/3-last")).unwrap(), b"last");
    assert!(!rx.dir.join("batch/2-busy").exists());
}

#[test]
fn keepalives_cannot_force_a_flush_per_message() {
    // Before: every empty Digests part made the receiver flush its verified files, so a peer
    // sending empty files each followed by a keepalive forced a file system flush per ~34 bytes.
    // Now keepalives flush at most once per KEEPALIVE_FLUSH (1 s).
    let rx = Receiver::start(&["--quiet"]);
    // n empty files, and a last one whose body is held back so the transfer stays open.
    let n = 40;
    let names: Vec<String> = (0..=n).map(|i| format!("e{i:02}")).collect();
    let mut p = accepted(&rx, names.iter().map(|name| file(name, 0)).collect());
    say(&mut p, Message::Digests(DigestsPart { first: 0, digests: vec![Some(sha256(b"")); n + 1] }));
    let mut got = Vec::new();
    while got.len() <= n {
        got.extend(answers(&mut p));
    }
    let start = Instant::now();
    for i in 0..n {
        say(&mut p, Message::Body(Body { index: i as u32 }));
        say(&mut p, Message::Digests(DigestsPart { first: n as u32 + 1, digests: vec![] }));
    }
    // Whatever verdicts the keepalives caused arrive now; count them for a moment.
    p.stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut early = 0;
    while let Ok(Message::FileVerdict(_)) = p.read() {
        early += 1;
    }
    assert!(start.elapsed() < Duration::from_secs(1), "the bodies took {:?}", start.elapsed());
    assert!(early <= 1, "{early} verdicts before the end: a flush per keepalive");
    // The end of the transfer acknowledges them all.
    say(&mut p, Message::Body(Body { index: n as u32 }));
    p.stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut all = early;
    while let Ok(Message::FileVerdict(v)) = p.read() {
        assert!(matches!(v.verdict, Verdict::Verified { .. }), "{v:?}");
        all += 1;
    }
    assert_eq!(all, n + 1);
    rx.wait_log(&format!("{} received", n + 1));
}
