//! Every exit code in README's table, provoked for real. Fake receivers here speak the wire
//! format by hand to produce verdicts a real receiver gives only under faults.

use std::net::TcpListener;
use std::time::Duration;

use xfer::protocol::{self, Answer, AnswersPart, FileVerdict, Message, Reject, Verdict};

use crate::hostile_receiver::{accept_manifest, read_body, size_of, until_closed};
use crate::util::{Receiver, is_accept, send, sha256, source_file, xfer};

/// A one-shot fake receiver: greets with `hello`, reads the manifest of one file, accepts it,
/// answers "send it all", reads the digest and the body, then gives `verdict` on the file.
fn fake_receiver(hello: [u8; 10], verdict: Option<Verdict>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        std::io::Write::write_all(&mut s, &hello).unwrap();
        let Some(verdict) = verdict else {
            std::thread::sleep(Duration::from_millis(500));
            return;
        };
        protocol::read_hello(&mut s).unwrap();
        crate::util::expect_insecure(&mut s);
        let entries = accept_manifest(&mut s);
        assert_eq!(entries.len(), 1, "one file: {entries:?}");
        let answers = vec![Answer::Send { offset: 0 }];
        protocol::write_message(&mut s, &Message::Answers(AnswersPart { answers, last: true })).unwrap();
        read_body(&mut s, size_of(&entries[0]), |_| {});
        protocol::write_message(&mut s, &Message::FileVerdict(FileVerdict { index: 0, verdict })).unwrap();
        until_closed(&mut s);
    });
    addr
}

#[test]
fn usage_errors_exit_2() {
    let run = xfer(&["send"]).expect(2);
    assert!(run.stderr().contains("Usage"), "{}", run.report());
    xfer(&["send", "f", "h:1", "--chunk-size", "0"]).expect(2);
    xfer(&["send", "f", "h:1", "--chunk-size", "17M"]).expect(2);
    xfer(&["bogus"]).expect(2);
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, "127.0.0.1:notaport", &[]).expect(2);
    assert!(run.stderr().starts_with("xfer: error: bad port"), "{}", run.report());
    // A path inside DIR is fine; out of it is not.
    let run = send(&path, "127.0.0.1:1", &["--as", "../escape"]).expect(2);
    assert!(run.stderr().contains("\"..\": name is `.` or `..`"), "{}", run.report());
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let run = send(&fifo, "127.0.0.1:1", &[]).expect(2);
    assert!(run.stderr().contains("not a regular file"), "{}", run.report());
    let p = path.to_string_lossy();
    let run = xfer(&["send", &p, &p, "127.0.0.1:1", "--as", "x"]).expect(2);
    assert!(run.stderr().contains("--as names one file or folder"), "{}", run.report());
    let run = xfer(&["recv", "--dir", &path.to_string_lossy()]).expect(2);
    assert!(run.stderr().contains("is not a folder"), "{}", run.report());
}

#[test]
fn nothing_listening_exits_3_quickly() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &format!("127.0.0.1:{port}"), &[]).expect(3);
    assert_eq!(run.stdout(), "", "nothing for scripts on failure");
    let err = run.stderr();
    assert!(
        err.starts_with(&format!("xfer: error: cannot connect to 127.0.0.1:{port}: ")),
        "{}",
        run.report()
    );
    assert!(err.to_lowercase().contains("refused"), "{}", run.report());
    assert_eq!(err.lines().count(), 1, "one line\n{}", run.report());
    assert!(run.elapsed < Duration::from_secs(3), "took {:?}", run.elapsed);
}

#[test]
fn rejected_exits_4() {
    // A real receiver refuses the offer: another sender holds its only transfer slot.
    let rx = Receiver::start(&["--quiet", "--max-transfers", "1"]);
    let mut holder = crate::util::RawPeer::greet(rx.addr);
    assert!(is_accept(&holder.offer("holder", 10, sha256(b""))));
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &rx.target(), &["--wait", "0"]).expect(4);
    assert!(run.stderr().starts_with("xfer: error: receiver rejected f: "), "{}", run.report());
}

#[test]
fn hash_mismatch_exits_5() {
    let addr = fake_receiver(
        protocol::hello(),
        Some(Verdict::HashMismatch { expected: sha256(b"x"), actual: sha256(b"y") }),
    );
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &addr, &[]).expect(5);
    assert!(run.stderr().contains("hashed to"), "{}", run.report());
}

#[test]
fn size_mismatch_exits_5() {
    let addr = fake_receiver(protocol::hello(), Some(Verdict::SizeMismatch { expected: 1, received: 0 }));
    let (_src, path) = source_file("f", b"x");
    send(&path, &addr, &[]).expect(5);
}

#[test]
fn receiver_failure_exits_1() {
    let addr = fake_receiver(protocol::hello(), Some(Verdict::Failed { reason: "disk full".into() }));
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &addr, &[]).expect(1);
    assert!(run.stderr().contains("disk full"), "{}", run.report());
}

#[test]
fn real_receiver_failure_exits_1_on_both_sides() {
    // The receiver's folder vanishes under it: it cannot prepare the file and says so.
    let mut rx = Receiver::start(&["--quiet", "--once"]);
    std::fs::remove_dir(&rx.dir).unwrap();
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &rx.target(), &[]).expect(1);
    assert!(run.stderr().starts_with("xfer: error: receiver failed to store the file: "), "{}", run.report());
    assert_eq!(rx.wait_exit(), 6, "local I/O on the receiver's side\n{}", rx.stderr());
}

#[test]
fn peer_text_is_escaped_on_the_sender() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        protocol::write_hello(&mut s).unwrap();
        protocol::read_hello(&mut s).unwrap();
        crate::util::expect_insecure(&mut s);
        let _ = protocol::read_message(&mut s).unwrap();
        let reason = "evil\x1b]0;owned\x07\r\nxfer: verified\u{202e}".to_string();
        let reject = Reject { code: protocol::RejectCode::InvalidName, reason };
        protocol::write_message(&mut s, &Message::Reject(reject)).unwrap();
        until_closed(&mut s);
    });
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &addr, &[]).expect(4);
    let err = run.stderr();
    assert!(!err.contains('\x1b') && !err.contains('\x07') && !err.contains('\u{202e}'), "{err:?}");
    assert_eq!(err.lines().count(), 1, "one line\n{}", run.report());
    assert!(err.contains("evil\\u{1b}]0;owned"), "{err:?}");
}

#[test]
fn missing_file_exits_6() {
    let run = xfer(&["send", "/nonexistent/file", "127.0.0.1:1"]).expect(6);
    assert!(run.stderr().starts_with("xfer: error: cannot open /nonexistent/file: "), "{}", run.report());
}

#[test]
fn not_an_xfer_peer_exits_7() {
    let addr = fake_receiver(*b"HTTP/1.1 4", None);
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &addr, &[]).expect(7);
    assert!(run.stderr().contains("not an xfer peer"), "{}", run.report());
    assert!(run.stderr().contains("\"HTTP/1.1\"") && run.stderr().contains("wrong port"), "{}", run.report());
}

#[test]
fn other_version_exits_7_naming_both() {
    let mut h = protocol::hello();
    let ours = protocol::VERSION;
    h[8..].copy_from_slice(&(ours + 1).to_be_bytes());
    let addr = fake_receiver(h, None);
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &addr, &[]).expect(7);
    let want = format!("peer speaks xfer protocol v{}, this xfer speaks v{ours}", ours + 1);
    assert!(run.stderr().contains(&want), "{}", run.report());
}

#[test]
fn a_port_in_use_exits_3_saying_so_and_short_listen_addresses_work() {
    let rx = Receiver::start(&["--quiet"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().into_owned();
    let run = xfer(&["recv", "--dir", &d, "--listen", &rx.target()]).expect(3);
    assert!(
        run.stderr().contains("Address already in use") && run.stderr().contains("pick another"),
        "{}",
        run.report()
    );
    let run = xfer(&["recv", "--dir", &d, "--listen", "host:port"]).expect(2);
    assert!(run.stderr().contains("cannot use `host:port` as --listen"), "{}", run.report());
    // A port alone listens on every interface.
    let mut child = std::process::Command::new(crate::util::BIN)
        .args(["recv", "--insecure", "--quiet", "--dir", &d, "--listen", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("listening on 0.0.0.0:"), "{line}");
}

#[test]
fn connection_refused_says_what_to_check() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (_src, path) = source_file("f", b"x");
    let run = send(&path, &free, &[]).expect(3);
    assert!(run.stderr().contains("is `xfer recv` running there"), "{}", run.report());
}

#[test]
fn an_option_of_the_other_side_says_whose_it_is() {
    let run = xfer(&["send", "--overwrite", "f", "h:1"]).expect(2);
    assert!(
        run.stderr().contains("--overwrite is an option of `xfer recv`, not `xfer send`"),
        "{}",
        run.report()
    );
    let run = xfer(&["recv", "--as", "x"]).expect(2);
    assert!(run.stderr().contains("--as is an option of `xfer send`"), "{}", run.report());
}

#[test]
fn a_receiver_that_cannot_write_its_folder_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&ro)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: mounting a read-only tmpfs needs root");
        return;
    }
    let d = ro.to_string_lossy().into_owned();
    let run = xfer(&["recv", "--dir", &d, "--listen", "127.0.0.1:0"]);
    let _ = std::process::Command::new("umount").arg(&ro).status();
    assert_eq!(run.code(), 6, "{}", run.report());
    assert!(run.stderr().contains("cannot write in --dir"), "{}", run.report());
}

#[test]
fn completions_for_every_shell_and_man_pages_are_generated() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let run = xfer(&["completions", shell]).expect(0);
        for word in ["send", "recv", "code-file", "insecure", "remember"] {
            assert!(run.stdout().contains(word), "{shell} completions lack {word}");
        }
    }
    let run = xfer(&["man"]).expect(0);
    assert!(run.stdout().starts_with(".ie") && run.stdout().contains(".TH xfer 1"), "{}", run.report());
    let run = xfer(&["man", "send"]).expect(0);
    assert!(
        run.stdout().contains(".TH xfer-send 1") && run.stdout().contains("code\\-file"),
        "{}",
        run.report()
    );
    let run = xfer(&["man", "recv"]).expect(0);
    assert!(run.stdout().contains("remember"), "{}", run.report());
    xfer(&["man", "nonsense"]).expect(2);
}
