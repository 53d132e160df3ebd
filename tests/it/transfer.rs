//! Byte-for-byte equality and the right SHA-256 across the sizes that break naive framing, for
//! chunk sizes 1, 1024 and the default.

use crate::util::{Receiver, random_bytes, send, sha256, source_file};
use xfer::send::DEFAULT_CHUNK_SIZE;

/// The files every chunk size must carry intact. `chunk` decides what "one chunk" is.
fn cases(chunk: usize) -> Vec<(String, Vec<u8>)> {
    let mut hashes_then_end = random_bytes(chunk * 2 + 5, 7);
    hashes_then_end.extend_from_slice(b"##");
    vec![
        ("empty".into(), Vec::new()),
        ("one-byte".into(), vec![b'#']),
        ("exactly-one-chunk".into(), random_bytes(chunk, 1)),
        ("one-chunk-plus-one".into(), random_bytes(chunk + 1, 2)),
        ("all-markers".into(), b"##".repeat(chunk.max(3000))),
        ("ends-in-marker".into(), hashes_then_end),
        ("ten-mib-random".into(), random_bytes(10 * 1024 * 1024, 3)),
    ]
}

fn check_chunk_size(chunk: usize, flag: Option<&str>) {
    let rx = Receiver::start(&["--quiet"]);
    let mut names = Vec::new();
    for (name, data) in cases(chunk) {
        let (_src, path) = source_file(&name, &data);
        let mut extra = vec!["--quiet"];
        if let Some(f) = flag {
            extra.extend(["--chunk-size", f]);
        }
        let run = send(&path, &rx.target(), &extra).expect(0);
        let digest = sha256(&data).to_hex();
        assert!(run.stdout().contains(&digest), "summary lacks the SHA-256\n{}", run.report());
        assert!(run.stdout().contains("verified"), "{}", run.report());
        let got = std::fs::read(rx.dir.join(&name)).unwrap();
        assert_eq!(got.len(), data.len(), "{name}: length differs");
        assert!(got == data, "{name}: content differs");
        assert_eq!(sha256(&got).to_hex(), digest);
        names.push(name);
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    rx.assert_files(&names);
}

#[test]
fn chunk_size_1_carries_every_case() {
    check_chunk_size(1, Some("1"));
}

#[test]
fn chunk_size_1024_carries_every_case() {
    check_chunk_size(1024, Some("1024"));
}

#[test]
fn default_chunk_size_carries_every_case() {
    check_chunk_size(DEFAULT_CHUNK_SIZE as usize, None);
}

#[test]
fn largest_chunk_size_works() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(16 * 1024 * 1024 + 3, 9);
    let (_src, path) = source_file("big", &data);
    send(&path, &rx.target(), &["--chunk-size", "16M", "--quiet"]).expect(0);
    assert!(std::fs::read(rx.dir.join("big")).unwrap() == data);
}

#[test]
fn send_as_another_name_and_log_line() {
    let rx = Receiver::start(&[]);
    let (_src, path) = source_file("original.txt", b"hello");
    let run = send(&path, &rx.target(), &["--as", "renamed.txt"]).expect(0);
    assert!(run.stdout().contains("\"renamed.txt\""), "{}", run.report());
    assert_eq!(run.stdout().lines().count(), 1, "one summary line on stdout\n{}", run.report());
    assert!(run.stderr().is_empty(), "stderr is not a terminal: no bars, no noise\n{}", run.report());
    rx.assert_files(&["renamed.txt"]);
    let log = rx.wait_log("renamed.txt");
    assert!(log.contains("127.0.0.1:") && log.contains("5 B") && log.contains("verified"), "{log}");
}

#[test]
fn missing_dir_is_created() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("downloads");
    let rx = Receiver::start_in(root, dir.clone(), &["--quiet"]);
    let (_src, path) = source_file("f", b"x");
    send(&path, &rx.target(), &[]).expect(0);
    assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"x");
}

#[test]
fn chunk_size_sets_the_frame_sizes_on_the_wire() {
    use crate::hostile_receiver::{accept_manifest, read_body, size_of, until_closed};
    use xfer::protocol::{self, Answer, AnswersPart, FileVerdict, Message, Verdict};
    // A recording receiver: accepts, notes every data frame's length, verifies nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let recorder = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        protocol::write_hello(&mut s).unwrap();
        protocol::read_hello(&mut s).unwrap();
        crate::util::expect_insecure(&mut s);
        let entries = accept_manifest(&mut s);
        let answers = vec![Answer::Send { offset: 0 }];
        protocol::write_message(&mut s, &Message::Answers(AnswersPart { answers, last: true })).unwrap();
        let mut lens = Vec::new();
        read_body(&mut s, size_of(&entries[0]), |frame| lens.push(frame.len()));
        let v = FileVerdict { index: 0, verdict: Verdict::Verified { name: entries[0].path.join("/") } };
        protocol::write_message(&mut s, &Message::FileVerdict(v)).unwrap();
        until_closed(&mut s);
        lens
    });
    let (_src, path) = source_file("framed", &random_bytes(2500, 4));
    send(&path, &addr, &["--chunk-size", "1000"]).expect(0);
    assert_eq!(recorder.join().unwrap(), vec![1000, 1000, 500]);
}
