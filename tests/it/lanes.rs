//! Lanes: a large file's body over several connections (`--streams`), in parts, checked whole.
//! The real sender over the secure channel and in the clear; a raw peer that speaks the parts as
//! PROTOCOL.md describes them (out of order, a part sent twice, a part off the grid, a lane of
//! no split); and interruptions that must still resume: a sender killed mid-split, and a receiver
//! killed mid-split, whose partial has holes past what it noted as whole.

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::secure::{Secure, send_file};
use crate::util::{
    BIN, RawPeer, Receiver, data_frame, random_bytes, send, sha256, source_file, test_cache_home,
};
use xfer::protocol::{
    self, FileVerdict, FrameKind, Message, Part, SPLIT_CHUNK, SPLIT_MIN, Split, SplitEnd, Verdict,
};

fn lane_lines(log: &str) -> usize {
    log.lines().filter(|l| l.contains("(a lane)") && l.contains("lane done")).count()
}

/// The lanes' log lines, once `n` are there (a lane logs when its connection ends, which may be
/// just after the main connection's line), or what there is after a while.
fn lanes_logged(rx: &Receiver, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    while lane_lines(&rx.stderr()) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    lane_lines(&rx.stderr())
}

#[test]
fn a_large_file_goes_over_several_encrypted_streams_and_arrives_whole() {
    let s = Secure::start(&[]);
    let cfg = tempfile::tempdir().unwrap();
    // Not a whole number of parts: the last one is short.
    let data = random_bytes((72 << 20) + 12345, 41);
    let (_src, path) = source_file("big.bin", &data);
    let code = s.code.to_string_lossy().into_owned();
    let run = send_file(cfg.path(), &path, &s.rx.target(), &["--code-file", &code, "--streams", "4"], &[]);
    run.expect(0);
    assert!(std::fs::read(s.rx.dir.join("big.bin")).unwrap() == data, "stored file differs");
    let line = s.rx.wait_log("verified, stored as \"big.bin\"");
    assert!(line.contains("72.0 MiB received"), "the main line counts every part: {line}");
    assert_eq!(lanes_logged(&s.rx, 3), 3, "three lanes beside the main connection:\n{}", s.rx.stderr());
    assert_eq!(crate::util::list(&s.rx.dir), ["big.bin"], "no partial or record left");
}

#[test]
fn in_the_clear_too_and_auto_stays_on_one_connection_over_loopback() {
    let rx = Receiver::start(&[]);
    let data = random_bytes(65 << 20, 42);
    let (_src, path) = source_file("plain.bin", &data);
    send(&path, &rx.target(), &["--streams", "3"]).expect(0);
    assert!(std::fs::read(rx.dir.join("plain.bin")).unwrap() == data);
    rx.wait_log("stored as \"plain.bin\"");
    assert_eq!(lanes_logged(&rx, 2), 2, "{}", rx.stderr());
    // auto: a loopback round trip is far below 20 ms, so one connection.
    let (_src2, path2) = source_file("auto.bin", &data[..(64 << 20) + 1]);
    send(&path2, &rx.target(), &[]).expect(0);
    rx.wait_log("stored as \"auto.bin\"");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lane_lines(&rx.stderr()), 2, "auto split a loopback send:\n{}", rx.stderr());
}

#[test]
fn recv_once_serves_the_lanes_of_its_one_transfer() {
    let rx = Receiver::start(&["--once"]);
    let data = random_bytes(70 << 20, 43);
    let (_src, path) = source_file("once.bin", &data);
    send(&path, &rx.target(), &["--streams", "2"]).expect(0);
    let mut rx = rx;
    assert_eq!(rx.wait_exit(), 0);
    assert!(std::fs::read(rx.dir.join("once.bin")).unwrap() == data);
    assert_eq!(lanes_logged(&rx, 1), 1, "{}", rx.stderr());
}

/// A raw lane: hellos, then mode 03 with `session` and a nonce; the receiver's nonce back (in the
/// clear: the receivers of raw-peer tests run `--insecure`, so lanes carry plaintext frames).
fn raw_lane(addr: std::net::SocketAddr, session: [u8; 16]) -> (TcpStream, Result<Vec<u8>, Message>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    protocol::write_hello(&mut s).unwrap();
    protocol::read_hello(&mut s).unwrap();
    let mut step = vec![0x03];
    step.extend_from_slice(&session);
    step.extend_from_slice(&[7u8; 32]);
    protocol::write_frame_header(&mut s, FrameKind::Handshake, step.len() as u32).unwrap();
    s.write_all(&step).unwrap();
    let h = protocol::read_frame_header(&mut s).unwrap();
    let mut payload = vec![0u8; h.len as usize];
    std::io::Read::read_exact(&mut s, &mut payload).unwrap();
    let reply = match h.kind {
        FrameKind::Handshake => Ok(payload),
        _ => Err(protocol::decode_message(&payload).unwrap()),
    };
    (s, reply)
}

/// A part and its data frames. A receiver that refuses it may hang up meanwhile: the test looks
/// at what it said, not at whether every byte went out.
fn part(to: &mut impl Write, offset: u64, bytes: &[u8]) {
    let _ = protocol::write_message(to, &Message::Part(Part { index: 0, offset }));
    for piece in bytes.chunks(1 << 20) {
        if to.write_all(&data_frame(piece)).is_err() {
            return;
        }
    }
}

#[test]
fn parts_out_of_order_over_a_raw_lane_a_part_sent_twice_is_dropped_and_the_file_checked_whole() {
    let rx = Receiver::start(&[]);
    let size = SPLIT_MIN + 5;
    let data = random_bytes(size as usize, 44);
    // A lane of no split is refused in the clear.
    let (_, reply) = raw_lane(rx.addr, [9; 16]);
    assert!(matches!(reply, Err(Message::Reject(_))), "a lane of no split: {reply:?}");
    let session = [1u8; 16];
    let (mut main, offset) = raw_split(&rx, "split.bin", &data, 2, session);
    assert_eq!(offset, 0);
    let mut lane = joined_lane(&rx, session);
    // The last part first, on the lane.
    part(&mut lane, SPLIT_MIN, &data[SPLIT_MIN as usize..]);
    protocol::write_message(&mut lane, &Message::SplitEnd(SplitEnd { index: 0 })).unwrap();
    assert_eq!(protocol::read_message(&mut lane).unwrap(), Message::SplitEnd(SplitEnd { index: 0 }));
    // On the main connection: the lane's part again with other bytes (dropped), then the rest
    // from the end backwards.
    part(&mut main.stream, SPLIT_MIN, &[0xee; 5]);
    for k in (0..SPLIT_MIN / SPLIT_CHUNK).rev() {
        let at = (k * SPLIT_CHUNK) as usize;
        part(&mut main.stream, at as u64, &data[at..at + SPLIT_CHUNK as usize]);
    }
    protocol::write_message(&mut main.stream, &Message::SplitEnd(SplitEnd { index: 0 })).unwrap();
    match main.read().unwrap() {
        Message::FileVerdict(FileVerdict { verdict: Verdict::Verified { name }, .. }) => {
            assert_eq!(name, "split.bin")
        }
        other => panic!("expected the file verified, got {other:?}"),
    }
    assert!(std::fs::read(rx.dir.join("split.bin")).unwrap() == data, "the first copy of each part stays");
    rx.assert_files(&["split.bin"]);
}

#[test]
fn a_part_off_the_grid_a_split_that_ends_early_or_a_split_too_small_stores_nothing() {
    let rx = Receiver::start(&[]);
    for case in ["off the grid", "ends early", "too small"] {
        let size = if case == "too small" { SPLIT_MIN - 1 } else { SPLIT_MIN + 100 };
        let data = random_bytes(size as usize, 45);
        let name = format!("{}.bin", case.replace(' ', "-"));
        let (mut main, _) = raw_split(&rx, &name, &data, 1, [3; 16]);
        match case {
            "off the grid" => part(&mut main.stream, 4096, &data[4096..4096 + SPLIT_CHUNK as usize]),
            "ends early" => {
                part(&mut main.stream, 0, &data[..SPLIT_CHUNK as usize]);
                let _ = protocol::write_message(&mut main.stream, &Message::SplitEnd(SplitEnd { index: 0 }));
            }
            _ => part(&mut main.stream, 0, &data[..SPLIT_CHUNK as usize]),
        }
        match main.read() {
            Ok(Message::FileVerdict(FileVerdict { verdict: Verdict::Failed { .. }, .. })) | Err(_) => {}
            other => panic!("{case}: expected a failure, got {other:?}"),
        }
        assert!(main.closed_by_peer(), "{case}: the connection ends");
        let line = rx.wait_log(&format!("\"{name}\""));
        assert!(line.contains("failed"), "{case}: {line}");
    }
    // Nothing under a final name; the receiver still serves.
    assert!(rx.files().iter().all(|f| f.starts_with(".xfer-")), "{:?}", rx.files());
    let (_src, path) = source_file("after.bin", b"still serving");
    send(&path, &rx.target(), &[]).expect(0);
}

fn spawn_send(path: &std::path::Path, to: &str, streams: &str) -> std::process::Child {
    Command::new(BIN)
        .args(["send", "--quiet", "--insecure", "--no-cache", "--streams", streams])
        .arg(path)
        .arg(to)
        .env("XDG_CACHE_HOME", test_cache_home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the partial of `name` in `rx` is at least `len` bytes long (its parts reach that
/// far; there may be holes before).
fn wait_partial(rx: &Receiver, name: &str, len: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stem = xfer::store::stem_for(name);
        let have = std::fs::metadata(rx.dir.join(format!("{stem}.part"))).map_or(0, |m| m.len());
        if have >= len {
            return;
        }
        assert!(Instant::now() < deadline, "the partial never reached {len} bytes");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_sender_killed_mid_split_resumes_from_what_was_whole() {
    let rx = Receiver::start(&[]);
    let data = random_bytes(256 << 20, 46);
    let (_src, path) = source_file("cut.bin", &data);
    let mut tx = spawn_send(&path, &rx.target(), "4");
    wait_partial(&rx, "cut.bin", 96 << 20);
    tx.kill().unwrap();
    tx.wait().unwrap();
    rx.wait_log("\"cut.bin\" (256.0 MiB)");
    // What was whole is kept (cut to the first gap), nothing past it.
    let (_, kept) = rx.partial("cut.bin");
    assert!(kept > 0 && kept.is_multiple_of(SPLIT_CHUNK), "kept {kept} bytes: whole parts from the start");
    let run = send(&path, &rx.target(), &["--streams", "4"]).expect(0);
    assert!(run.stdout().contains("resumed at"), "did not resume:\n{}", run.report());
    assert!(std::fs::read(rx.dir.join("cut.bin")).unwrap() == data, "resumed file differs");
}

#[test]
fn a_receiver_killed_mid_split_resumes_from_its_mark_not_from_its_holes() {
    let rx = Receiver::start(&[]);
    let data = random_bytes(256 << 20, 47);
    let (_src, path) = source_file("holes.bin", &data);
    let mut tx = spawn_send(&path, &rx.target(), "4");
    wait_partial(&rx, "holes.bin", 128 << 20);
    let (root, dir) = rx.kill_and_keep_dir();
    let _ = tx.wait();
    // The partial may hold holes past its mark; a restarted receiver must not hash them as data.
    let rx = Receiver::start_in(root, dir, &[]);
    let run = send(&path, &rx.target(), &["--streams", "4"]).expect(0);
    assert!(
        std::fs::read(rx.dir.join("holes.bin")).unwrap() == data,
        "stored file differs:\n{}",
        run.report()
    );
    rx.assert_files(&["holes.bin"]);
}

/// A raw main connection that offers `name` (`data`), is answered `Send { offset }` and announces
/// a split over `lanes` connections with `session`. Returns it and the offset.
fn raw_split(rx: &Receiver, name: &str, data: &[u8], lanes: u8, session: [u8; 16]) -> (RawPeer, u64) {
    let mut main = RawPeer::greet(rx.addr);
    assert!(crate::util::is_accept(&main.offer(name, data.len() as u64, sha256(data))));
    let protocol::Answer::Send { offset } = main.answer() else { panic!("expected Send") };
    let split = Split { index: 0, session, secret: [5; 32], lanes };
    protocol::write_message(&mut main.stream, &Message::Split(split)).unwrap();
    (main, offset)
}

/// A raw lane of `session`, once the receiver has registered the split.
fn joined_lane(rx: &Receiver, session: [u8; 16]) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (lane, reply) = raw_lane(rx.addr, session);
        if reply.is_ok() {
            return lane;
        }
        assert!(Instant::now() < deadline, "the split never registered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lane carries the last part (from `last`) and ends; the main connection carries the parts
/// before it and ends the split; the file must be verified.
fn carry_and_verify(main: &mut RawPeer, lane: &mut TcpStream, data: &[u8], last: u64) {
    part(lane, last, &data[last as usize..]);
    protocol::write_message(lane, &Message::SplitEnd(SplitEnd { index: 0 })).unwrap();
    assert_eq!(protocol::read_message(lane).unwrap(), Message::SplitEnd(SplitEnd { index: 0 }));
    for k in 0..last / SPLIT_CHUNK {
        let at = (k * SPLIT_CHUNK) as usize;
        part(&mut main.stream, at as u64, &data[at..at + SPLIT_CHUNK as usize]);
    }
    protocol::write_message(&mut main.stream, &Message::SplitEnd(SplitEnd { index: 0 })).unwrap();
    assert!(matches!(
        main.read().unwrap(),
        Message::FileVerdict(FileVerdict { verdict: Verdict::Verified { .. }, .. })
    ));
}

#[test]
fn a_split_that_moves_nothing_but_keepalives_loses_its_slot() {
    let rx = Receiver::start(&["--timeout", "2"]);
    let data = random_bytes(SPLIT_MIN as usize, 48);
    let (mut main, _) = raw_split(&rx, "idle.bin", &data, 8, [6; 16]);
    let began = Instant::now();
    let keepalive = Message::Digests(protocol::DigestsPart { first: 1, digests: vec![] });
    let mut ended = false;
    while began.elapsed() < Duration::from_secs(15) {
        if protocol::write_message(&mut main.stream, &keepalive).is_err() {
            ended = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(900));
    }
    assert!(ended, "keepalives alone held a split for 15 s past a 2 s --timeout");
    let line = rx.wait_log("\"idle.bin\"");
    assert!(line.contains("least rate"), "{line}");
}

#[test]
fn a_lane_that_proves_nothing_takes_no_place_and_a_lane_that_breaks_the_protocol_fails_the_file() {
    let rx = Receiver::start(&[]);
    let data = random_bytes((SPLIT_MIN + SPLIT_CHUNK) as usize, 49);
    let session = [7u8; 16];
    let (mut main, _) = raw_split(&rx, "places.bin", &data, 2, session);
    // Two strangers who saw the session id: garbage where a message is due. Neither counts.
    for _ in 0..2 {
        let mut bad = joined_lane(&rx, session);
        bad.write_all(&data_frame(b"not a message")).unwrap();
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut bad, &mut sink);
    }
    // The one lane the split asked for still gets in and carries a part.
    let mut lane = joined_lane(&rx, session);
    carry_and_verify(&mut main, &mut lane, &data, SPLIT_MIN);
    assert!(std::fs::read(rx.dir.join("places.bin")).unwrap() == data);

    // A lane that sends a part off the grid fails the whole file, as PROTOCOL.md says.
    let session = [8u8; 16];
    let (mut main, _) = raw_split(&rx, "broken.bin", &data, 2, session);
    let mut lane = joined_lane(&rx, session);
    part(&mut lane, 12345, &data[12345..12345 + SPLIT_CHUNK as usize]);
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut lane, &mut sink);
    part(&mut main.stream, 0, &data[..SPLIT_CHUNK as usize]);
    match main.read() {
        Ok(Message::FileVerdict(FileVerdict { verdict: Verdict::Failed { reason }, .. })) => {
            assert!(reason.contains("lane"), "{reason}")
        }
        other => panic!("a lane broke the protocol and the file went on: {other:?}"),
    }
    assert!(!rx.dir.join("broken.bin").exists());
}

#[test]
fn a_plain_resume_after_a_cut_split_moves_the_resume_point_on() {
    let rx = Receiver::start(&[]);
    let data = random_bytes((SPLIT_MIN + SPLIT_CHUNK) as usize, 50);
    // A split cut after its first part: the partial keeps that part, its record says so.
    let (mut main, offset) = raw_split(&rx, "onward.bin", &data, 1, [10; 16]);
    assert_eq!(offset, 0);
    part(&mut main.stream, 0, &data[..SPLIT_CHUNK as usize]);
    drop(main);
    rx.wait_log("\"onward.bin\"");
    // Resumed with a plain body, cut again after 16 MiB more.
    let mut main = RawPeer::greet(rx.addr);
    assert!(crate::util::is_accept(&main.offer("onward.bin", data.len() as u64, sha256(&data))));
    assert_eq!(main.answer(), protocol::Answer::Send { offset: SPLIT_CHUNK });
    main.body(0);
    let upto = 3 * SPLIT_CHUNK;
    for piece in data[SPLIT_CHUNK as usize..upto as usize].chunks(1 << 20) {
        main.data(piece);
    }
    main.stream.flush().unwrap();
    // Let the receiver write what it read before the cut.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.partial("onward.bin").1 < upto && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(main);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rx.stderr().matches("\"onward.bin\"").count() < 2 {
        assert!(Instant::now() < deadline, "the cut resume was never logged");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next offer resumes where the plain body stopped, not at the split's old mark.
    let mut main = RawPeer::greet(rx.addr);
    assert!(crate::util::is_accept(&main.offer("onward.bin", data.len() as u64, sha256(&data))));
    assert_eq!(main.answer(), protocol::Answer::Send { offset: upto });
}

#[test]
fn lanes_the_receiver_refuses_are_not_needed() {
    // One transfer slot: this address may hold 2 connections, the main one and one lane; the
    // other lanes are told "busy" and the parts go over the two that got in.
    let rx = Receiver::start(&["--max-transfers", "1"]);
    let data = random_bytes((SPLIT_MIN + 3 * SPLIT_CHUNK) as usize, 51);
    let (_src, path) = source_file("few.bin", &data);
    send(&path, &rx.target(), &["--streams", "4"]).expect(0);
    assert!(std::fs::read(rx.dir.join("few.bin")).unwrap() == data);
    assert_eq!(lanes_logged(&rx, 1), 1, "{}", rx.stderr());
    assert!(rx.stderr().contains("refused: receiver busy"), "{}", rx.stderr());
}

#[test]
fn a_lane_cut_in_the_middle_of_a_part_gives_its_parts_back_and_the_file_still_arrives() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let rx = Receiver::start(&[]);
    let data = random_bytes((SPLIT_MIN + 5 * SPLIT_CHUNK) as usize, 52);
    let (_src, path) = source_file("cut-lane.bin", &data);
    // A relay for every connection; the second one (the first lane) is cut after 12 MiB from the
    // sender: in the middle of its second part.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap();
    let target = rx.addr;
    let cut_at = Arc::new(AtomicU64::new(0));
    let cut = Arc::clone(&cut_at);
    std::thread::spawn(move || {
        for n in 0.. {
            let (mut from_sender, mut to_receiver) = crate::util::relay(&listener, target);
            let cut = Arc::clone(&cut);
            std::thread::spawn(move || {
                let limit = if n == 1 { 12u64 << 20 } else { u64::MAX };
                let mut buf = vec![0u8; 64 << 10];
                let mut moved = 0u64;
                loop {
                    let k = match std::io::Read::read(&mut from_sender, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => k,
                    };
                    if moved + k as u64 > limit {
                        cut.store(moved, Ordering::SeqCst);
                        let _ = from_sender.shutdown(std::net::Shutdown::Both);
                        let _ = to_receiver.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if to_receiver.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    moved += k as u64;
                }
                let _ = to_receiver.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    send(&path, &proxy.to_string(), &["--streams", "3"]).expect(0);
    assert!(cut_at.load(Ordering::SeqCst) > 0, "the lane was never cut");
    assert!(std::fs::read(rx.dir.join("cut-lane.bin")).unwrap() == data, "stored file differs");
    rx.wait_log("stored as \"cut-lane.bin\"");
    assert!(rx.stderr().contains("(a lane)") && rx.stderr().contains("failed"), "{}", rx.stderr());
}

#[test]
fn a_lane_that_comes_before_its_split_is_read_waits_for_it() {
    let rx = Receiver::start(&[]);
    let data = random_bytes(SPLIT_MIN as usize, 53);
    let mut main = RawPeer::greet(rx.addr);
    assert!(crate::util::is_accept(&main.offer("early.bin", data.len() as u64, sha256(&data))));
    assert_eq!(main.answer(), protocol::Answer::Send { offset: 0 });
    let session = [11u8; 16];
    // The lane's handshake is in before the receiver has read the split (it has not been sent).
    let addr = rx.addr;
    let lane = std::thread::spawn(move || raw_lane(addr, session));
    std::thread::sleep(Duration::from_millis(500));
    let split = Split { index: 0, session, secret: [12; 32], lanes: 2 };
    protocol::write_message(&mut main.stream, &Message::Split(split)).unwrap();
    let (mut lane, reply) = lane.join().unwrap();
    assert_eq!(reply.expect("the lane joins once the split begins").len(), 32);
    // It carries the last part; the main connection the rest.
    carry_and_verify(&mut main, &mut lane, &data, SPLIT_MIN - SPLIT_CHUNK);
    assert!(std::fs::read(rx.dir.join("early.bin")).unwrap() == data);
}
