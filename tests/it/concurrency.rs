//! Many senders at once into one receiver; a stalled sender holds up no one; the busy limit.

use std::time::{Duration, Instant};

use xfer::protocol::{Answer, Message, Reject, RejectCode};

use crate::util::{RawPeer, Receiver, is_accept, random_bytes, send, sha256, source_file};

/// Offers one file as the real sender does; checks it is accepted and answered "send it all".
fn offer_accepted(p: &mut RawPeer, name: &str, size: u64) {
    let first = p.offer(name, size, sha256(name.as_bytes()));
    assert!(is_accept(&first), "{name}: expected the manifest's acceptance, got {first:?}");
    assert_eq!(p.answer(), Answer::Send { offset: 0 }, "{name}");
}

#[test]
fn eight_senders_at_once_and_a_stalled_one() {
    // Nine transfers from one address: more than the default share of one address (8 of 16).
    let rx = Receiver::start(&["--quiet", "--timeout", "8", "--max-transfers", "32"]);
    // A sender that offers a file, sends part of it, then goes silent.
    let mut stalled = RawPeer::greet(rx.addr);
    offer_accepted(&mut stalled, "stalled", 1 << 20);
    stalled.body(0);
    stalled.data(&random_bytes(1000, 0));

    let start = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let target = rx.target();
            std::thread::spawn(move || {
                let name = format!("file-{i}");
                let data = random_bytes(2 * 1024 * 1024 + i * 1000, i as u64 + 10);
                let (_src, path) = source_file(&name, &data);
                send(&path, &target, &["--quiet", "--chunk-size", "64K"]).expect(0);
                (name, data)
            })
        })
        .collect();
    for h in handles {
        let (name, data) = h.join().unwrap();
        assert!(std::fs::read(rx.dir.join(&name)).unwrap() == data, "{name} differs");
    }
    // All eight finished while the stalled sender still held its connection.
    assert!(start.elapsed() < Duration::from_secs(8), "senders waited on the stalled one");
    // The stalled transfer times out; no final name, its 1000 bytes kept for a resume.
    rx.wait_log("\"stalled\"");
    let want: Vec<String> = (0..8).map(|i| format!("file-{i}")).collect();
    let kept = rx.assert_files_and_partial(&want.iter().map(String::as_str).collect::<Vec<_>>(), "stalled");
    assert_eq!(kept, 1000);
    rx.wait_log("timed out while receiving the body (nothing within 8 s, see --timeout)");
}

#[test]
fn past_the_transfer_limit_senders_are_refused_as_busy() {
    let rx = Receiver::start(&["--quiet", "--max-transfers", "1"]);
    let mut holder = RawPeer::greet(rx.addr);
    offer_accepted(&mut holder, "holder", 100);
    let (_src, path) = source_file("second", b"second");
    let run = send(&path, &rx.target(), &["--wait", "0"]).expect(4);
    assert!(run.stderr().contains("receiver busy"), "{}", run.report());
    drop(holder);
    rx.wait_log("\"holder\"");
    // The slot is free again.
    send(&path, &rx.target(), &[]).expect(0);
    rx.assert_files(&["second"]);
}

/// `xfer send` in the background with its stderr in a file, to watch what it says while waiting.
fn spawn_watched(
    path: &std::path::Path,
    target: &str,
    args: &[&str],
) -> (std::process::Child, tempfile::NamedTempFile, tempfile::NamedTempFile) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let child = std::process::Command::new(crate::util::BIN)
        .args(["send", "--insecure"])
        .args(args)
        .arg(path)
        .arg(target)
        .env("XDG_CACHE_HOME", crate::util::test_cache_home())
        .stdout(out.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    (child, log, out)
}

fn wait_for_text(log: &tempfile::NamedTempFile, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "never said {needle:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_receiver_keeps_senders_in_line_and_says_how_many_are_ahead() {
    // This address's one slot of two (its share) is held by a transfer that does not move: the
    // senders that come next wait in line, told their place, and go in the order they came.
    let rx = Receiver::start(&["--quiet", "--max-transfers", "2"]);
    let mut holder = RawPeer::greet(rx.addr);
    offer_accepted(&mut holder, "holder", 100);
    let (_a_src, a) = source_file("first-in-line", &random_bytes(300_000, 1));
    let (_b_src, b) = source_file("second-in-line", &random_bytes(300_000, 2));
    let waiting_since = Instant::now();
    let (mut first, first_log, first_out) = spawn_watched(&a, &rx.target(), &["--json"]);
    wait_for_text(&first_log, "receiver busy: 0 ahead in its line");
    let (mut second, second_log, _) = spawn_watched(&b, &rx.target(), &[]);
    wait_for_text(&second_log, "receiver busy: 1 ahead in its line");
    // One that will not wait long gives up with exit 4 and says why.
    let (_c_src, c) = source_file("impatient", b"impatient");
    let run = send(&c, &rx.target(), &["--wait", "1"]).expect(4);
    assert!(run.stderr().contains("2 ahead in its line after --wait 1 s"), "{}", run.report());
    // Nothing moved while the slot was held; then they go, in the order they came.
    assert!(first.try_wait().unwrap().is_none() && second.try_wait().unwrap().is_none());
    drop(holder);
    assert_eq!(
        first.wait().unwrap().code(),
        Some(0),
        "{}",
        std::fs::read_to_string(first_log.path()).unwrap()
    );
    assert_eq!(
        second.wait().unwrap().code(),
        Some(0),
        "{}",
        std::fs::read_to_string(second_log.path()).unwrap()
    );
    // Its time in line is not the transfer's: the summary's seconds leave it out.
    let waited = waiting_since.elapsed().as_secs_f64();
    let summary = std::fs::read_to_string(first_out.path()).unwrap();
    let seconds: f64 = summary
        .split("\"seconds\":")
        .nth(1)
        .and_then(|t| t.split([',', '}']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no seconds in {summary}"));
    assert!(waited > 1.0 && seconds < waited - 0.5, "waited {waited:.2} s in line, summary says {seconds} s");
    let log = rx.wait_log("\"second-in-line\"");
    let at = |name: &str| log.find(&format!("\"{name}\"")).unwrap();
    assert!(at("holder") < at("first-in-line") && at("first-in-line") < at("second-in-line"), "{log}");
    rx.assert_files(&["first-in-line", "second-in-line"]);
}

#[test]
fn concurrent_offers_cannot_overbook_free_space() {
    let rx = Receiver::start(&["--quiet"]);
    let free = xfer::store::free_space(&rx.dir).unwrap();
    // Two offers of 60% of the free space each: the first is accepted and reserved, the second
    // must be refused although the disk is still (almost) empty.
    let mut first = RawPeer::greet(rx.addr);
    offer_accepted(&mut first, "first", free / 10 * 6);
    let mut second = RawPeer::greet(rx.addr);
    match second.offer("second", free / 10 * 6, sha256(b"")) {
        Message::Reject(Reject { code: RejectCode::InsufficientSpace, .. }) => {}
        other => panic!("second offer should be refused for space, got {other:?}"),
    }
    // Once the first gives up, its reservation is returned.
    drop(first);
    rx.wait_log("\"first\"");
    let mut third = RawPeer::greet(rx.addr);
    offer_accepted(&mut third, "third", free / 10 * 6);
}

#[test]
fn a_second_sender_of_the_same_name_is_told_busy_at_once() {
    // The first transfer of "same" is answered and its body has not started: its partial stays
    // locked, so a second sender is refused before it sends anything (before: it was answered,
    // sent its whole body and then failed, or won the race and was stored under the first's feet).
    let rx = Receiver::start(&["--quiet"]);
    let mut first = RawPeer::greet(rx.addr);
    assert!(crate::util::is_accept(&first.offer("same", 10, sha256(b"0123456789"))));
    assert_eq!(first.answer(), xfer::protocol::Answer::Send { offset: 0 });
    let (_src, path) = crate::util::source_file("same", &crate::util::random_bytes(1 << 20, 8));
    let run = crate::util::send(&path, &rx.target(), &[]).expect(4);
    assert!(run.stderr().contains("another transfer of this file is in progress"), "{}", run.report());
    // The first one goes on undisturbed.
    first.body(0);
    first.data(b"0123456789");
    match first.read().unwrap() {
        Message::FileVerdict(v) => {
            assert_eq!(v.verdict, xfer::protocol::Verdict::Verified { name: "same".into() })
        }
        other => panic!("expected a verdict, got {other:?}"),
    }
    rx.assert_files(&["same"]);
}

#[test]
fn sixty_four_sends_at_once_all_get_through_a_default_receiver() {
    // Before: 64 senders started at once against a default receiver (16 transfers, 8 per
    // address, 32 connections per address): most were refused busy (exit 4; with --wait 0 they
    // still are). Now a busy sender waits (--wait, default 300 s) and tries again.
    let rx = Receiver::start(&["--quiet"]);
    let src = tempfile::tempdir().unwrap();
    let senders: Vec<_> = (0..64)
        .map(|i| {
            let path = src.path().join(format!("f{i:02}"));
            std::fs::write(&path, random_bytes(64 * 1024 + i, i as u64)).unwrap();
            let to = rx.target();
            std::thread::spawn(move || crate::util::send(&path, &to, &["--quiet"]))
        })
        .collect();
    let runs: Vec<_> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    for run in &runs {
        assert_eq!(run.code(), 0, "{}", run.report());
    }
    for i in 0..64 {
        let got = std::fs::read(rx.dir.join(format!("f{i:02}"))).unwrap();
        assert_eq!(got, random_bytes(64 * 1024 + i, i as u64));
    }
}
