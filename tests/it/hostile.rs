//! A hostile peer on a raw TcpStream. For every attack: a clear rejection, nothing written outside
//! DIR, no file under a final name, no temporary file left, and the receiver still serves the
//! next honest sender.

use std::net::Shutdown;

use xfer::protocol::{self, Answer, Body, FileVerdict, Message, Reject, RejectCode, Verdict, hello};

use crate::bridge::{Channel, Target};
use crate::util::{RawPeer, Receiver, file_entry, is_accept, random_bytes, send, sha256, source_file};

/// After an attack: the folder is empty again and an honest sender still gets through.
pub(crate) fn still_serves(rx: &Receiver, round: usize) {
    serves(rx, round, |path| send(path, &rx.target(), &["--quiet"]));
}

/// `still_serves` for a target on either channel (the honest sender then pairs by code).
fn still_serves_on(t: &Target, round: usize) {
    serves(t, round, |path| t.send(path, &["--quiet"]));
}

fn serves(rx: &Receiver, round: usize, send: impl Fn(&std::path::Path) -> crate::util::Run) {
    rx.assert_files(&[]);
    let name = format!("honest-{round}");
    let data = random_bytes(100_000, round as u64);
    let (_src, path) = source_file(&name, &data);
    send(&path).expect(0);
    assert!(std::fs::read(rx.dir.join(&name)).unwrap() == data);
    std::fs::remove_file(rx.dir.join(&name)).unwrap();
}

/// Offers one file as the real sender does and checks the manifest is accepted and the file
/// answered "send it all".
fn offer_accepted(p: &mut RawPeer, name: &str, size: u64, digest: xfer::protocol::Digest) {
    let first = p.offer(name, size, digest);
    assert!(is_accept(&first), "{name}: expected the manifest's acceptance, got {first:?}");
    assert_eq!(p.answer(), Answer::Send { offset: 0 }, "{name}");
    p.body(0);
}

/// Reads the verdict on the transfer's only file.
fn verdict(p: &mut RawPeer) -> Verdict {
    match p.read().unwrap() {
        Message::FileVerdict(FileVerdict { index: 0, verdict }) => verdict,
        other => panic!("expected the file's verdict, got {other:?}"),
    }
}

fn hostile_names_are_rejected_with_a_reason(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let long = "x".repeat(10 * 1024);
    // What no receiver stores. (`C:\x` or `a:b` are legal Linux names: see names.rs.)
    let names = [
        "../x",
        "/etc/x",
        "a/b",
        "..",
        ".",
        "",
        "a\0b",
        "a\x1b[2Jb",
        "evil\u{202e}gpj.exe",
        ".xfer-x",
        &long,
    ];
    for (i, name) in names.iter().enumerate() {
        // The long name is shown by its start only: a failure message stays readable.
        let shown = if name.len() > 40 {
            format!("{:?}... ({} bytes)", &name[..40], name.len())
        } else {
            format!("{name:?}")
        };
        let mut p = RawPeer::greet(rx.peer_addr());
        match p.offer(name, 4, sha256(b"evil")) {
            Message::Reject(Reject { code: RejectCode::InvalidName, reason }) => {
                // The rule it broke, whatever the name's length.
                let rule = reason.find("\": component 1 is refused: name ");
                let tail = &reason[reason.len().saturating_sub(100)..];
                assert!(reason.starts_with("manifest refused: \""), "{shown}: reason ends {tail:?}");
                assert!(rule.is_some(), "{shown}: the reason does not say the rule; it ends {tail:?}");
            }
            other => panic!("{shown}: expected an InvalidName rejection, got {other:?}"),
        }
        // Sending a body anyway must not create anything either.
        let mut body = Vec::new();
        protocol::write_message(&mut body, &Message::Body(Body { index: 0 })).unwrap();
        p.send_raw(&body);
        p.data(b"evil");
        assert!(p.closed_by_peer(), "{name:?}: receiver kept the connection open");
        still_serves_on(&rx, i);
    }
    assert!(!std::path::Path::new("/etc/x").exists());
    // Log lines show names escaped: no raw ESC or NUL reaches the terminal.
    let log = rx.wait_log("\\u{1b}[2Jb");
    assert!(!log.contains('\x1b') && !log.contains('\0'), "raw control bytes in the log:\n{log:?}");
    rx.assert_sealed(names.len());
}

fn four_gib_frame_is_refused_without_allocating(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let mut p = RawPeer::greet(rx.peer_addr());
    p.send_raw(&[0xff, 0xff, 0xff, 0xff, 0x01]);
    assert!(p.closed_by_peer());
    rx.wait_log("frame of 4294967295 bytes exceeds the message limit");
    still_serves_on(&rx, 0);
    rx.assert_sealed(1);
}

fn four_gib_data_frame_in_the_body_is_refused(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let mut p = RawPeer::greet(rx.peer_addr());
    offer_accepted(&mut p, "body", 10, sha256(&[0; 10]));
    p.send_raw(&[0xff, 0xff, 0xff, 0xff, 0x02]);
    match verdict(&mut p) {
        Verdict::Failed { reason } => {
            assert!(reason.contains("exceeds the data limit"), "{reason}")
        }
        other => panic!("expected a failed verdict, got {other:?}"),
    }
    still_serves_on(&rx, 0);
    rx.assert_sealed(1);
}

fn truncated_body_then_close_is_a_size_mismatch_and_kept_for_resume(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let data = random_bytes(1000, 1);
    let mut p = RawPeer::greet(rx.peer_addr());
    offer_accepted(&mut p, "short", 1000, sha256(&data));
    p.data(&data[..500]);
    p.stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(verdict(&mut p), Verdict::SizeMismatch { expected: 1000, received: 500 });
    rx.wait_log("closed early");
    // No final name; the 500 bytes wait, hidden, for the rest.
    assert_eq!(rx.assert_files_and_partial(&[], "short"), 500);
    // The same sender again (its version tag matches the record): only the rest is asked for.
    let mut p = RawPeer::greet(rx.peer_addr());
    assert!(is_accept(&p.offer("short", 1000, sha256(&data))));
    assert_eq!(p.answer(), Answer::Send { offset: 500 });
    p.body(0);
    p.data(&data[500..]);
    assert_eq!(verdict(&mut p), Verdict::Verified { name: "short".into() });
    rx.wait_log("(resumed at 500 bytes)");
    rx.assert_files(&["short"]);
    assert!(std::fs::read(rx.dir.join("short")).unwrap() == data);
    rx.assert_sealed(2);
}

fn truncated_body_then_reset_leaves_no_final_name(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let data = random_bytes(4 << 20, 1);
    let mut p = RawPeer::greet(rx.peer_addr());
    offer_accepted(&mut p, "cut", 4 << 20, sha256(&data));
    p.data(&data[..1 << 20]);
    // SO_LINGER 0: close sends a reset, not an orderly end of stream.
    rustix::net::sockopt::set_socket_linger(&p.stream, Some(std::time::Duration::ZERO)).unwrap();
    drop(p);
    rx.wait_log("\"cut\"");
    // A reset may discard what was still queued unread, so the partial holds up to 1 MiB, or
    // nothing at all (then it is removed); never a final name.
    let stem = xfer::store::stem_for("cut");
    let part = rx.dir.join(format!("{stem}.part"));
    let kept = match std::fs::metadata(&part) {
        Ok(m) => {
            assert!(m.len() <= 1 << 20, "kept {} bytes of 1 MiB sent", m.len());
            rx.assert_files_and_partial(&[], "cut")
        }
        Err(_) => {
            rx.assert_files(&[]);
            0
        }
    };
    // Resending (the same sender: its version tag matches the record) completes from what was
    // kept.
    let mut p = RawPeer::greet(rx.peer_addr());
    assert!(is_accept(&p.offer("cut", 4 << 20, sha256(&data))));
    assert_eq!(p.answer(), Answer::Send { offset: kept });
    p.body(0);
    p.data(&data[kept as usize..]);
    assert_eq!(verdict(&mut p), Verdict::Verified { name: "cut".into() });
    rx.assert_files(&["cut"]);
    assert!(std::fs::read(rx.dir.join("cut")).unwrap() == data);
    rx.assert_sealed(2);
}

fn body_longer_than_offered_is_refused(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let data = random_bytes(20, 2);
    let mut p = RawPeer::greet(rx.peer_addr());
    offer_accepted(&mut p, "long", 10, sha256(&data[..10]));
    p.data(&data);
    assert_eq!(verdict(&mut p), Verdict::SizeMismatch { expected: 10, received: 20 });
    rx.wait_log("body longer than listed");
    still_serves_on(&rx, 0);
    rx.assert_sealed(1);
}

fn wrong_digest_is_a_hash_mismatch(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let data = random_bytes(5000, 3);
    let mut p = RawPeer::greet(rx.peer_addr());
    offer_accepted(&mut p, "forged", 5000, sha256(b"something else"));
    p.data(&data);
    let want = Verdict::HashMismatch { expected: sha256(b"something else"), actual: sha256(&data) };
    assert_eq!(verdict(&mut p), want);
    rx.wait_log("content hashed to");
    still_serves_on(&rx, 0);
    rx.assert_sealed(1);
}

fn message_in_place_of_data_is_refused(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let mut p = RawPeer::greet(rx.peer_addr());
    offer_accepted(&mut p, "mixed", 10, sha256(&[0; 10]));
    p.manifest(vec![file_entry(&["again"], 10)]);
    match verdict(&mut p) {
        Verdict::Failed { reason } => {
            assert!(reason.contains("expected a data frame, got a message frame"), "{reason}")
        }
        other => panic!("expected a failed verdict, got {other:?}"),
    }
    still_serves_on(&rx, 0);
    rx.assert_sealed(1);
}

#[test]
fn garbage_instead_of_magic() {
    let rx = Receiver::start(&["--quiet"]);
    let mut p = RawPeer::connect(rx.addr);
    p.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(p.closed_by_peer());
    rx.wait_log("not an xfer peer");
    still_serves(&rx, 0);
}

#[test]
fn wrong_version_names_both_versions() {
    let rx = Receiver::start(&["--quiet"]);
    let mut p = RawPeer::connect(rx.addr);
    let mut h = hello();
    h[8..].copy_from_slice(&99u16.to_be_bytes());
    p.send_raw(&h);
    // The receiver's own hello tells the peer which version it speaks.
    let mut theirs = [0u8; 10];
    std::io::Read::read_exact(&mut p.stream, &mut theirs).unwrap();
    assert_eq!(theirs, hello());
    assert!(p.closed_by_peer());
    rx.wait_log(&format!("peer speaks xfer protocol v99, this xfer speaks v{}", xfer::protocol::VERSION));
    still_serves(&rx, 0);
}

fn file_larger_than_free_space_is_refused_before_the_body(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let mut p = RawPeer::greet(rx.peer_addr());
    // 512 TiB: more than any disk here, within the 2^50-byte limit of a transfer.
    match p.offer("huge", 1 << 49, sha256(b"")) {
        Message::Reject(Reject { code: RejectCode::InsufficientSpace, reason }) => {
            assert!(reason.contains("free"), "{reason}");
        }
        other => panic!("expected an InsufficientSpace rejection, got {other:?}"),
    }
    still_serves_on(&rx, 0);
    rx.assert_sealed(1);
}

fn data_before_any_offer_is_refused(ch: Channel) {
    let rx = Target::start(ch, &["--quiet"]);
    let mut p = RawPeer::greet(rx.peer_addr());
    p.data(b"surprise");
    assert!(p.closed_by_peer());
    rx.wait_log("expected a message frame, got a data frame");
    still_serves_on(&rx, 0);
    rx.assert_sealed(1);
}

#[test]
fn offer_naming_a_huge_existing_file_is_answered_quickly() {
    // An 8 GiB sparse file already in DIR, and an offer of the same name and size: the receiver
    // may compare contents only for half its idle timeout, not for the ~25 s a full read takes.
    let rx = Receiver::start(&["--quiet", "--timeout", "2"]);
    let big = std::fs::File::create(rx.dir.join("big.img")).unwrap();
    big.set_len(8 << 30).unwrap();
    let mut p = RawPeer::greet(rx.addr);
    let start = std::time::Instant::now();
    assert!(is_accept(&p.offer("big.img", 8 << 30, sha256(b"not the content"))));
    let answer = p.answer();
    assert!(start.elapsed() < std::time::Duration::from_secs(5), "answer took {:?}", start.elapsed());
    assert!(!matches!(answer, Answer::Have { .. }), "{answer:?}");
}

#[test]
fn symlinks_planted_at_partial_names_are_not_followed() {
    let rx = Receiver::start(&["--quiet"]);
    let stem = xfer::store::stem_for("victim");
    let outside = rx.root.path().join("outside");
    // A symlink at the record's name is not a record: discarded (the link itself, never what it
    // points to) like a corrupt one, and the file is stored.
    let link = rx.dir.join(format!("{stem}.meta"));
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let (_src, path) = source_file("victim", b"payload");
    send(&path, &rx.target(), &[]).expect(0);
    assert!(!outside.exists(), "wrote through a symlink planted at .meta");
    rx.assert_files(&["victim"]);
    std::fs::remove_file(rx.dir.join("victim")).unwrap();
    // At the partial's name it is refused.
    let suffix = ".part";
    let link = rx.dir.join(format!("{stem}{suffix}"));
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let (_src, path) = source_file("victim", b"payload");
    let run = send(&path, &rx.target(), &[]).expect(1);
    // O_NOFOLLOW refused the link (ELOOP), and the receiver said so.
    let err = run.stderr();
    assert!(err.starts_with("xfer: error: receiver failed to store the file: victim: "), "{}", run.report());
    assert!(err.contains("symbolic links"), "{}", run.report());
    assert!(!outside.exists(), "wrote through a symlink planted at {suffix}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    std::fs::remove_file(&link).unwrap();
    rx.assert_files(&[]);
    still_serves(&rx, 0);
}

/// The receiver's peak resident memory so far, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn records_planted_in_dir_are_data_not_trust() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(2 << 20, 9);
    // A fifo where a partial's record would be: opening it plainly would block until someone
    // writes to it, holding the transfer (and its slot) forever.
    let stem = xfer::store::stem_for("rec");
    let fifo = rx.dir.join(format!("{stem}.meta"));
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    std::fs::write(rx.dir.join(format!("{stem}.part")), &data[..1000]).unwrap();
    let (_src, path) = source_file("rec", &data);
    send(&path, &rx.target(), &["--timeout", "5"]).expect(0);
    assert!(std::fs::read(rx.dir.join("rec")).unwrap() == data);
    // A 256 MiB sparse file as a record: read with a bound, never into memory whole.
    let stem = xfer::store::stem_for("big");
    let record = std::fs::File::create(rx.dir.join(format!("{stem}.meta"))).unwrap();
    record.set_len(256 << 20).unwrap();
    std::fs::write(rx.dir.join(format!("{stem}.part")), &data[..1000]).unwrap();
    let (_src, path) = source_file("big", &data);
    send(&path, &rx.target(), &["--timeout", "5"]).expect(0);
    assert!(std::fs::read(rx.dir.join("big")).unwrap() == data);
    rx.assert_files(&["big", "rec"]);
    let peak = peak_rss_kib(rx.child.id());
    assert!(peak < 64 * 1024, "receiver peak RSS {peak} KiB: the record was read whole");
    eprintln!("receiver peak RSS with a 256 MiB planted record: {} KiB", peak);
}

/// The attacks on the frame stream above, on both channels: `plain::NAME` straight to an
/// `--insecure` receiver, `over_the_secure_channel::NAME` sealed by a `SecureBridge` for a receiver
/// that requires a code (the frame stream inside the records is the same, so is the verdict).
macro_rules! on_both_channels {
    ($($name:ident),* $(,)?) => {
        mod plain {
            $(#[test] fn $name() { super::$name(crate::bridge::Channel::Plain) })*
        }
        mod over_the_secure_channel {
            $(#[test] fn $name() { super::$name(crate::bridge::Channel::Secure) })*
        }
    };
}

on_both_channels!(
    hostile_names_are_rejected_with_a_reason,
    four_gib_frame_is_refused_without_allocating,
    four_gib_data_frame_in_the_body_is_refused,
    truncated_body_then_close_is_a_size_mismatch_and_kept_for_resume,
    truncated_body_then_reset_leaves_no_final_name,
    body_longer_than_offered_is_refused,
    wrong_digest_is_a_hash_mismatch,
    message_in_place_of_data_is_refused,
    file_larger_than_free_space_is_refused_before_the_body,
    data_before_any_offer_is_refused,
);
