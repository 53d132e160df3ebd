//! Silent peers on either side are given up on with a clear error.

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::util::{RawPeer, Receiver, send, source_file};

#[test]
fn sender_gives_up_on_a_silent_receiver() {
    // Accepts (the kernel does) and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_src, path) = source_file("f", b"data");
    let run = send(&path, &addr, &["--timeout", "1"]).expect(3);
    assert!(run.stderr().starts_with("xfer: error: "), "{}", run.report());
    assert!(run.stderr().contains("timed out while exchanging hellos"), "{}", run.report());
    assert!(run.stderr().contains("(nothing within 1 s, see --timeout)"), "{}", run.report());
    assert!(run.elapsed < Duration::from_secs(10), "took {:?}", run.elapsed);
    drop(listener);
}

#[test]
fn receiver_drops_a_silent_sender_and_keeps_serving() {
    let rx = Receiver::start(&["--quiet", "--handshake-timeout", "1"]);
    let mut silent = RawPeer::connect(rx.addr);
    assert!(silent.closed_by_peer(), "receiver never hung up on a silent peer");
    rx.wait_log("(nothing within 1 s, see --handshake-timeout)");
    let (_src, path) = source_file("after", b"after");
    send(&path, &rx.target(), &[]).expect(0);
    rx.assert_files(&["after"]);
}

#[test]
fn trickling_peer_cannot_stretch_the_handshake() {
    let rx = Receiver::start(&["--quiet", "--handshake-timeout", "1"]);
    let mut slow = RawPeer::connect(rx.addr);
    let start = Instant::now();
    // One byte of a valid hello every 200 ms: each read succeeds, the deadline still passes.
    let hello = xfer::protocol::hello();
    let mut closed = false;
    for b in hello.iter().cycle().take(100) {
        if slow.stream.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(closed || slow.closed_by_peer(), "receiver kept a trickling peer");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    rx.wait_log("see --handshake-timeout");
}

#[test]
fn once_exits_with_the_status_of_its_transfer() {
    // A connection that never offers anything (a port scan) does not end --once.
    let mut rx = Receiver::start(&["--quiet", "--once", "--handshake-timeout", "1"]);
    drop(RawPeer::connect(rx.addr));
    let _silent = RawPeer::connect(rx.addr);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rx.child.try_wait().unwrap().is_none(), "--once ended without a transfer\n{}", rx.stderr());
    // A refused offer is a transfer: exit 4.
    let mut p = RawPeer::greet(rx.addr);
    let refused = p.offer("../escape", 1, crate::util::sha256(b"x"));
    assert!(matches!(refused, xfer::protocol::Message::Reject(_)), "{refused:?}");
    assert_eq!(rx.wait_exit(), 4, "{}", rx.stderr());
    // The exit can beat the last stderr bytes to the reader thread: wait for them.
    rx.wait_log("xfer: error: ");

    let mut rx = Receiver::start(&["--quiet", "--once"]);
    let (_src, path) = source_file("one", b"one");
    send(&path, &rx.target(), &[]).expect(0);
    assert_eq!(rx.wait_exit(), 0, "{}", rx.stderr());
    rx.assert_files(&["one"]);
}

#[test]
fn a_manifest_that_stops_arriving_is_dropped_at_the_idle_timeout() {
    // Before: once the first manifest part was in, only the 120 s manifest deadline applied, so
    // four connections that sent one part and then nothing held every connection of a
    // `--max-transfers 1` receiver for two minutes. Now the idle timeout applies too.
    let rx =
        Receiver::start(&["--quiet", "--timeout", "2", "--handshake-timeout", "2", "--max-transfers", "1"]);
    let stalled: Vec<RawPeer> = (0..4)
        .map(|i| {
            let mut p = RawPeer::greet(rx.addr);
            p.send_raw(&crate::util::manifest_frame(
                vec![crate::util::file_entry(&[&format!("f{i}")], 1)],
                false,
            ));
            p
        })
        .collect();
    let start = Instant::now();
    rx.wait_log("see --timeout");
    assert!(start.elapsed() < Duration::from_secs(8), "dropped after {:?}", start.elapsed());
    let (_src, path) = source_file("honest", b"honest");
    send(&path, &rx.target(), &[]).expect(0);
    drop(stalled);
}

#[test]
fn a_body_trickled_just_inside_the_idle_timeout_loses_its_slot() {
    // Before: one byte every (timeout - ε) is never idle, so it held its transfer slot for as
    // long as the peer liked. Now a body must move MIN_RATE bytes a second over each window of
    // the idle timeout.
    let rx = Receiver::start(&["--quiet", "--timeout", "2", "--max-transfers", "1"]);
    let data = crate::util::random_bytes(100_000, 4);
    let mut p = RawPeer::greet(rx.addr);
    assert!(crate::util::is_accept(&p.offer("slow", data.len() as u64, crate::util::sha256(&data))));
    assert_eq!(p.answer(), xfer::protocol::Answer::Send { offset: 0 });
    p.body(0);
    let start = Instant::now();
    // One frame of the whole body, then its bytes one at a time, 1.5 s apart.
    let mut header = Vec::new();
    xfer::protocol::write_frame_header(&mut header, xfer::protocol::FrameKind::Data, data.len() as u32)
        .unwrap();
    p.send_raw(&header);
    for byte in &data[..10] {
        p.send_raw(&[*byte]);
        std::thread::sleep(Duration::from_millis(1500));
        if rx.stderr().contains("bytes/s") {
            break;
        }
    }
    rx.wait_log("bytes/s for 2 s");
    assert!(start.elapsed() < Duration::from_secs(8), "held for {:?}", start.elapsed());
    let (_src, path) = source_file("honest", b"honest");
    send(&path, &rx.target(), &[]).expect(0);
}

#[test]
fn keepalives_alone_do_not_hold_a_slot() {
    // Before: empty Digests parts every second kept a transfer alive forever. Now keepalives
    // count only while the sender may be hashing what the receiver waits for: the idle timeout
    // plus the awaited file's size at MIN_HASH_RATE.
    let rx = Receiver::start(&["--quiet", "--timeout", "2", "--max-transfers", "1"]);
    // A file of the offered size is there, so the answer waits for the digest.
    std::fs::write(rx.dir.join("k"), b"0123456789").unwrap();
    let mut p = RawPeer::greet(rx.addr);
    p.manifest(vec![crate::util::file_entry(&["k"], 10)]);
    assert!(crate::util::is_accept(&p.read().unwrap()));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) && !rx.stderr().contains("keepalives") {
        p.digests(0, vec![]);
        std::thread::sleep(Duration::from_millis(500));
    }
    rx.wait_log("timed out while sending nothing but keepalives");
    assert!(start.elapsed() < Duration::from_secs(6), "held for {:?}", start.elapsed());
    let (_src, path) = source_file("honest", b"honest");
    send(&path, &rx.target(), &[]).expect(0);
}

#[test]
fn a_receiver_that_stops_reading_mid_body_is_given_up_on_within_the_timeout() {
    // Before: the sender's writes waited a whole idle timeout per attempt, and then it waited
    // another for verdicts from the receiver that had stopped: 9-15 s at `--timeout 3`. Now
    // writes count the time they spend blocked (ticks of 0.5 s), a window of the idle timeout in
    // which the receiver takes nothing fails the send, and nothing more is waited for.
    let rx = Receiver::start(&["--quiet", "--timeout", "2"]);
    // Large enough that the body is still going out when the receiver stops (sparse: nothing
    // on the sender's disk).
    let src = tempfile::tempdir().unwrap();
    let path = src.path().join("big");
    std::fs::File::create(&path).unwrap().set_len(4 << 30).unwrap();
    let target = rx.target();
    let sender = std::thread::spawn(move || {
        let run = send(&path, &target, &["--timeout", "2", "--no-cache"]);
        (run, Instant::now())
    });
    // The body has begun once the receiver's partial holds bytes.
    let begun = Instant::now();
    while !crate::util::list(&rx.dir)
        .iter()
        .any(|f| f.ends_with(".part") && std::fs::metadata(rx.dir.join(f)).is_ok_and(|m| m.len() > 0))
    {
        assert!(begun.elapsed() < Duration::from_secs(30), "the body never began: {}", rx.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = rx.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let frozen = Instant::now();
    let (run, ended) = sender.join().unwrap();
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
    let run = run.expect(3);
    let took = ended - frozen;
    eprintln!("sender gave up {took:?} after the receiver was frozen (--timeout 2)");
    assert!(run.stderr().contains("see --timeout"), "{}", run.report());
    assert!(took < Duration::from_secs(6), "took {took:?} after the freeze\n{}", run.report());
}
