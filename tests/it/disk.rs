//! Disk accounting against a raw peer: every byte, block and inode a transfer may consume is
//! reserved before it is answered (keep-both copies, folders, records, empty files), a transfer
//! cut off after its answers leaves nothing behind, the partials one address leaves for a
//! resume are bounded, oldest first, and a batch's small files have no name at all until they are
//! verified. Small disks are tmpfs mounts (root, as CI has).

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use xfer::protocol::{
    self, Answer, AnswersPart, Entry, EntryKind, FileVerdict, MAX_CHUNK_LEN, Message, Reject, RejectCode,
    Verdict,
};

use crate::util::{
    RawPeer, Receiver, SmallDisk, file_entry, is_accept, list, manifest_frame, random_bytes, send, sha256,
    source_file,
};

/// A tmpfs mounted with `options` (`size=...`, `nr_inodes=...`), or `None` with the reason
/// printed when this process may not mount (not root).
fn tmpfs(options: &str) -> Option<SmallDisk> {
    let uid = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout).unwrap_or_default();
    if String::from_utf8_lossy(&uid).trim() != "0" {
        println!("skipped: mounting a tmpfs ({options}) needs root");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mounting a tmpfs ({options}) failed");
    Some(SmallDisk(dir))
}

/// A receiver serving the folder `dir` inside `disk`.
fn receiver_on(disk: &SmallDisk, args: &[&str]) -> Receiver {
    let dir = disk.0.path().join("dir");
    std::fs::create_dir_all(&dir).unwrap();
    Receiver::start_in(tempfile::tempdir().unwrap(), dir, args)
}

fn dir_entry(path: &[&str]) -> Entry {
    Entry {
        path: path.iter().map(|c| c.to_string()).collect(),
        kind: EntryKind::Dir,
        mode: 0o755,
        mtime: (1_600_000_000, 0),
    }
}

/// Reads answers parts until `n` answers have come.
fn answers(p: &mut RawPeer, n: usize) -> Vec<Answer> {
    let mut all = Vec::new();
    while all.len() < n {
        match p.read().expect("answers") {
            Message::Answers(AnswersPart { answers, .. }) => all.extend(answers),
            other => panic!("expected answers, got {other:?} after {all:?}"),
        }
    }
    all
}

/// Sends `data` as the body of entry `index`, in data frames of `chunk` bytes.
fn body(p: &mut RawPeer, index: u32, data: &[u8], chunk: usize) {
    p.body(index);
    for piece in data.chunks(chunk) {
        p.data(piece);
    }
}

/// Reads messages until the verdict on entry `index`.
fn verdict_on(p: &mut RawPeer, index: u32) -> Verdict {
    loop {
        match p.read().expect("a verdict") {
            Message::FileVerdict(FileVerdict { index: i, verdict }) if i == index => return verdict,
            Message::FileVerdict(_) | Message::Answers(_) => {}
            other => panic!("expected the verdict on entry {index}, got {other:?}"),
        }
    }
}

/// The receiver's first word on a manifest (sent in parts of 500 entries, each within a frame).
fn first_word(p: &mut RawPeer, entries: Vec<Entry>) -> Message {
    let parts: Vec<&[Entry]> = entries.chunks(500).collect();
    for (i, part) in parts.iter().enumerate() {
        p.send_raw(&manifest_frame(part.to_vec(), i + 1 == parts.len()));
    }
    p.read().expect("the receiver's first word")
}

fn is_insufficient_space(m: &Message) -> bool {
    matches!(m, Message::Reject(Reject { code: RejectCode::InsufficientSpace, .. }))
}

/// Partials and records in `dir`.
fn partials(dir: &Path) -> Vec<String> {
    list(dir).into_iter().filter(|n| n.ends_with(".part") || n.ends_with(".meta")).collect()
}

/// Waits until the receiver's log holds `needle` `n` times (one line per connection).
fn wait_log_n(rx: &Receiver, needle: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while rx.stderr().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "receiver logged {needle:?} fewer than {n} times:\n{}",
            rx.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects from the local address `from` (127.0.0.0/8 all reaches loopback).
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&fd, &SocketAddr::from((from, 0))).unwrap();
    rustix::net::connect(&fd, &to).unwrap();
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream
}

#[test]
fn a_copy_kept_beside_a_same_size_file_reserves_its_room_before_it_is_answered() {
    let Some(disk) = tmpfs("size=16m") else { return };
    let rx = receiver_on(&disk, &["--quiet"]);
    let t = rx.dir.join("t");
    std::fs::create_dir(&t).unwrap();
    std::fs::write(t.join("big.bin"), random_bytes(5 << 20, 1)).unwrap();
    let copy = random_bytes(5 << 20, 2);
    let manifest = || vec![dir_entry(&["t"]), file_entry(&["t", "big.bin"], copy.len() as u64)];
    // The acceptance counts nothing for t/big.bin: a same-size file is there, most likely the
    // same one. Only its digest shows it is another version, to be kept beside it: 5 MiB more,
    // with about 4 MiB free. It is refused for space, not answered "send".
    let filler = disk.0.path().join("filler");
    std::fs::write(&filler, vec![0u8; 7 << 20]).unwrap();
    let mut p = RawPeer::greet(rx.addr);
    let first = first_word(&mut p, manifest());
    assert!(is_accept(&first), "{first:?}");
    p.digests(0, vec![Some(sha256(&copy))]);
    let got = answers(&mut p, 2);
    assert_eq!(got[0], Answer::Have { name: "t".into() });
    assert!(
        matches!(&got[1], Answer::Reject { code: RejectCode::InsufficientSpace, reason } if reason.contains("free")),
        "a copy with no room was answered {:?}",
        got[1]
    );
    drop(p);
    wait_log_n(&rx, "batch of 2 entries", 1);
    assert_eq!(list(&t), vec!["big.bin".to_string()]);
    // With room, the copy is answered "send" and its room is held until its body comes: an honest
    // transfer offered meanwhile cannot be promised the same bytes (11 MiB free, 5 of them held).
    std::fs::remove_file(&filler).unwrap();
    let mut p = RawPeer::greet(rx.addr);
    assert!(is_accept(&first_word(&mut p, manifest())));
    p.digests(0, vec![Some(sha256(&copy))]);
    assert_eq!(answers(&mut p, 2)[1], Answer::Send { offset: 0 });
    let (_src, honest) = source_file("honest.bin", &random_bytes(8 << 20, 3));
    let run = send(&honest, &rx.target(), &["--quiet"]).expect(4);
    assert!(run.stderr().contains("free"), "{}", run.report());
    // The copy's body then finds the room it was promised.
    body(&mut p, 1, &copy, 1 << 20);
    assert_eq!(verdict_on(&mut p, 1), Verdict::Verified { name: "big (1).bin".into() });
    assert!(std::fs::read(t.join("big (1).bin")).unwrap() == copy);
}

#[test]
fn folders_and_inodes_are_reserved_too() {
    // 2,000 new folders are 2,000 blocks (8 MB of 4 KiB pages) of a 6 MiB disk: refused before
    // one is made, even though they bring no bytes.
    let Some(disk) = tmpfs("size=6m") else { return };
    let rx = receiver_on(&disk, &["--quiet"]);
    let names: Vec<String> = (0..2000).map(|i| format!("d{i:04}")).collect();
    let mut p = RawPeer::greet(rx.addr);
    let first = first_word(&mut p, names.iter().map(|n| dir_entry(&[n])).collect());
    assert!(is_insufficient_space(&first), "2,000 folders on a 6 MiB disk: {first:?}");
    drop(p);
    // A few folders fit.
    let mut p = RawPeer::greet(rx.addr);
    let first = first_word(&mut p, names[..10].iter().map(|n| dir_entry(&[n])).collect());
    assert!(is_accept(&first), "10 folders on a 6 MiB disk: {first:?}");
    assert_eq!(answers(&mut p, 10).len(), 10);
    drop(p);
    wait_log_n(&rx, "batch of", 2);
    assert_eq!(list(&rx.dir).len(), 10, "{:?}", list(&rx.dir));
    drop(rx);

    // 600 empty files need no bytes, but 600 inodes of a file system that has 400.
    let Some(disk) = tmpfs("size=64m,nr_inodes=400") else { return };
    let rx = receiver_on(&disk, &["--quiet"]);
    let mut p = RawPeer::greet(rx.addr);
    // The batch does not fit whole, so each file reserves its inode before it is answered: the
    // ones past the free inodes are refused alone.
    let first = first_word(&mut p, (0..600).map(|i| file_entry(&[&format!("e{i:03}")], 0)).collect());
    assert!(is_accept(&first), "600 empty files with 400 inodes: {first:?}");
    let got = answers(&mut p, 600);
    let sent = got.iter().filter(|a| matches!(a, Answer::Send { .. })).count();
    let refused = got
        .iter()
        .filter(|a| matches!(a, Answer::Reject { code: RejectCode::InsufficientSpace, reason } if reason.contains("inodes")))
        .count();
    assert!(sent <= 400 && sent + refused == 600 && refused >= 200, "{sent} sent, {refused} refused");
    drop(p);
    wait_log_n(&rx, "batch of 600 entries", 1);
    assert!(list(&rx.dir).is_empty(), "{:?}", list(&rx.dir));
}

#[test]
fn a_transfer_cut_off_after_its_answers_leaves_no_partials() {
    // 200 files large enough to keep a resume record each, answered at once (nothing here could
    // match them): each answer creates a partial and its record. Every other name already has a
    // partial of an older version (as an interrupted earlier send leaves it): its answer starts
    // that one over, empty.
    let rx = Receiver::start(&["--quiet"]);
    let size: u64 = 2 << 20;
    let name = |i: usize| format!("f{i:03}");
    let entries = || (0..200).map(|i| file_entry(&[&name(i)], size)).collect::<Vec<_>>();
    for (round, cut) in [(1, "FIN"), (2, "RST")] {
        for i in (1..200).step_by(2) {
            let stem = xfer::store::stem_for(&name(i));
            std::fs::write(rx.dir.join(format!("{stem}.part")), random_bytes(1000, i as u64)).unwrap();
            let record = format!("size {size}\nhash sha256\ntag {}\nname {}\n", "01".repeat(16), name(i));
            std::fs::write(rx.dir.join(format!("{stem}.meta")), record).unwrap();
        }
        let mut p = RawPeer::greet(rx.addr);
        assert!(is_accept(&first_word(&mut p, entries())));
        let got = answers(&mut p, 200);
        assert!(got.iter().all(|a| *a == Answer::Send { offset: 0 }), "{got:?}");
        if cut == "RST" {
            // SO_LINGER 0: close sends a reset.
            rustix::net::sockopt::set_socket_linger(&p.stream, Some(Duration::ZERO)).unwrap();
            drop(p);
        } else {
            p.stream.shutdown(Shutdown::Write).unwrap();
            assert!(p.closed_by_peer());
        }
        wait_log_n(&rx, "batch of 200 entries", round);
        let left = partials(&rx.dir);
        assert!(left.is_empty(), "{} partials and records left after a {cut}: {left:?}", left.len());
    }
}

#[test]
fn partials_one_address_leaves_behind_are_bounded_oldest_first() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(1000, 7);
    // A transfer cut after 500 bytes of its body: the partial is kept for a resume.
    let cut = |stream: TcpStream, name: &str| {
        let mut p = RawPeer { stream };
        protocol::write_hello(&mut p.stream).unwrap();
        protocol::read_hello(&mut p.stream).unwrap();
        p.send_raw(&crate::util::INSECURE);
        assert!(is_accept(&p.offer(name, 1000, sha256(&data))));
        assert_eq!(p.answer(), Answer::Send { offset: 0 });
        p.body(0);
        p.data(&data[..500]);
        p.stream.shutdown(Shutdown::Write).unwrap();
        assert_eq!(verdict_on(&mut p, 0), Verdict::SizeMismatch { expected: 1000, received: 500 });
        assert!(p.closed_by_peer());
    };
    cut(connect_from([127, 0, 0, 2], rx.addr), "other");
    for i in 0..40 {
        cut(connect_from([127, 0, 0, 1], rx.addr), &format!("p{i:02}"));
    }
    wait_log_n(&rx, "closed early", 41);
    let kept = |name: &str| {
        let stem = xfer::store::stem_for(name);
        let (part, meta) = (rx.dir.join(format!("{stem}.part")), rx.dir.join(format!("{stem}.meta")));
        assert_eq!(part.exists(), meta.exists(), "{name}: a partial without its record or the reverse");
        part.exists()
    };
    let left: Vec<usize> = (0..40).filter(|i| kept(&format!("p{i:02}"))).collect();
    assert_eq!(left, (8..40).collect::<Vec<_>>(), "127.0.0.1's partials left (by number)");
    assert!(kept("other"), "another address's partial was removed");
    assert_eq!(partials(&rx.dir).len(), 2 * 33);
    // What is kept still resumes.
    let mut p = RawPeer::greet(rx.addr);
    assert!(is_accept(&p.offer("p39", 1000, sha256(&data))));
    assert_eq!(p.answer(), Answer::Send { offset: 500 });
}

#[test]
fn a_full_disk_mid_body_fails_that_file_and_the_batch_goes_on() {
    // A 6 MiB disk; a batch of a 4 MiB file and a small one after it is accepted (its room
    // reserved), then another writer fills the disk to 2 MiB from full. Writing the large file
    // meets ENOSPC in the middle of a frame: that file fails alone, the rest of its body is
    // skipped in step, and the small file after it is stored.
    let Some(disk) = tmpfs("size=6m") else { return };
    let rx = receiver_on(&disk, &["--quiet"]);
    let big = random_bytes(4 << 20, 41);
    let small = b"after the failure".to_vec();
    let mut p = RawPeer::greet(rx.addr);
    let entries = vec![
        dir_entry(&["t"]),
        file_entry(&["t", "big.bin"], big.len() as u64),
        file_entry(&["t", "small.txt"], small.len() as u64),
    ];
    assert!(is_accept(&first_word(&mut p, entries)));
    p.digests(0, vec![Some(sha256(&big)), Some(sha256(&small))]);
    let got = answers(&mut p, 3);
    assert!(got.iter().all(|a| *a == Answer::Send { offset: 0 }), "{got:?}");
    let free = xfer::store::free_space(disk.0.path()).unwrap();
    let mut filler = std::fs::File::create(disk.0.path().join("filler")).unwrap();
    filler.write_all(&vec![0u8; (free - (2 << 20)) as usize]).unwrap();
    drop(filler);
    // 1000 KiB frames do not line up with the receiver's 256 KiB buffers, so the failing write
    // lands in the middle of a frame.
    assert!(1000 << 10 <= MAX_CHUNK_LEN as usize);
    body(&mut p, 1, &big, 1000 << 10);
    match verdict_on(&mut p, 1) {
        Verdict::Failed { reason } => assert!(reason.contains("No space left"), "{reason}"),
        other => panic!("a write into a full disk: {other:?}"),
    }
    body(&mut p, 2, &small, 1 << 20);
    assert_eq!(verdict_on(&mut p, 2), Verdict::Verified { name: "small.txt".into() });
    assert_eq!(std::fs::read(rx.dir.join("t/small.txt")).unwrap(), small);
    assert_eq!(list(&rx.dir.join("t")), vec!["small.txt".to_string()], "a failed file got a name");
}

/// How many files the process `pid` holds open in `dir` that have no name (an `O_TMPFILE` shows
/// as `DIR/#INODE (deleted)` in `/proc/PID/fd`).
fn unnamed_held(pid: u32, dir: &Path) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.parent() == Some(dir) && target.to_string_lossy().ends_with(" (deleted)"))
        .count()
}

/// Waits until the receiver writes a body into a file with no name in `dir`.
fn wait_unnamed(rx: &Receiver, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while unnamed_held(rx.child.id(), dir) == 0 {
        let open: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", rx.child.id()))
            .map(|fds| fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok()).collect())
            .unwrap_or_default();
        assert!(Instant::now() < deadline, "no file with no name in {dir:?}; open: {open:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn small_files_of_a_batch_have_no_name_until_they_are_verified() {
    // Files that keep no resume record arrive in a file with no name (O_TMPFILE): while a body
    // is under way nothing of it is in the folder, not even a hidden partial, and a cut leaves
    // nothing. Once verified each gets its name without replacing anything (a file or a symlink
    // already there keeps it: the next keep-both name is taken), and the sender's mode exactly,
    // whatever the receiver's umask (077 here: a 0644 file is created 0600 and changed) or a
    // folder's default ACL (u::rw,g::r,o::-, which the umask does not explain: a 0700 file is
    // created 0600 and changed).
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dir");
    std::fs::create_dir_all(dir.join("acl")).unwrap();
    let acl = [(1u16, 6u16), (4, 4), (0x20, 0)] // ACL_USER_OBJ rw, ACL_GROUP_OBJ r, ACL_OTHER none
        .iter()
        .flat_map(|(tag, perm)| {
            [&tag.to_le_bytes()[..], &perm.to_le_bytes(), &u32::MAX.to_le_bytes()].concat()
        })
        .collect::<Vec<u8>>();
    let acl = [&2u32.to_le_bytes()[..], &acl].concat();
    let flags = rustix::fs::XattrFlags::empty();
    if let Err(e) = rustix::fs::setxattr(dir.join("acl"), "system.posix_acl_default", &acl, flags) {
        println!("no default ACL on the test folder ({e}): that case checks the umask only");
    }
    let rx = Receiver::start_masked(root, dir, &["--quiet"], &[], Some(0o077));
    std::fs::write(rx.dir.join("f1"), b"an older, shorter f1").unwrap();
    let outside = rx.root.path().join("outside");
    std::os::unix::fs::symlink(&outside, rx.dir.join("f2")).unwrap();
    let modes = [0o644, 0o600, 0o777, 0o640, 0o400, 0o700];
    let names = ["f0", "f1", "f2", "f3", "f4", "acl/f5"];
    let data: Vec<Vec<u8>> = (0..modes.len()).map(|i| random_bytes(5000 + i, i as u64)).collect();
    let mut entries = vec![dir_entry(&["acl"])];
    entries.extend((0..modes.len()).map(|i| {
        let path: Vec<&str> = names[i].split('/').collect();
        Entry { mode: modes[i], ..file_entry(&path, data[i].len() as u64) }
    }));
    let mut p = RawPeer::greet(rx.addr);
    assert!(is_accept(&first_word(&mut p, entries)));
    let got = answers(&mut p, modes.len() + 1);
    assert!(got[1..].iter().all(|a| *a == Answer::Send { offset: 0 }), "{got:?}");
    for (i, d) in data.iter().enumerate() {
        p.body(i as u32 + 1);
        p.data(&d[..1000]);
        if i == 0 {
            wait_unnamed(&rx, &rx.dir);
            let named = list(&rx.dir);
            assert_eq!(named, ["acl", "f1", "f2"], "a body under way has a name");
        }
        p.data(&d[1000..]);
        p.digests(i as u32, vec![Some(sha256(d))]);
    }
    let stored: Vec<Verdict> = (1..=modes.len() as u32).map(|i| verdict_on(&mut p, i)).collect();
    let names = ["f0", "f1 (1)", "f2 (1)", "f3", "f4", "acl/f5"];
    for (i, name) in names.iter().enumerate() {
        let last = name.rsplit('/').next().unwrap();
        assert_eq!(stored[i], Verdict::Verified { name: last.to_string() });
        let path = rx.dir.join(name);
        assert_eq!(std::fs::read(&path).unwrap(), data[i], "{name}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, modes[i], "{name}: mode {mode:o}, sent {:o}", modes[i]);
    }
    assert_eq!(std::fs::read(rx.dir.join("f1")).unwrap(), b"an older, shorter f1");
    assert!(std::fs::symlink_metadata(rx.dir.join("f2")).unwrap().is_symlink() && !outside.exists());
    drop(p);
    // Cut off in the middle of a body: nothing is left, named or hidden.
    let before = list(&rx.dir);
    let mut p = RawPeer::greet(rx.addr);
    let cut = random_bytes(8000, 9);
    let entries = vec![file_entry(&["cut-a"], 8000), file_entry(&["cut-b"], 8000)];
    assert!(is_accept(&first_word(&mut p, entries)));
    assert_eq!(answers(&mut p, 2).len(), 2);
    p.body(0);
    p.data(&cut[..4000]);
    wait_unnamed(&rx, &rx.dir);
    rustix::net::sockopt::set_socket_linger(&p.stream, Some(Duration::ZERO)).unwrap();
    drop(p);
    wait_log_n(&rx, "batch of 2 entries", 1);
    assert_eq!(list(&rx.dir), before, "a body cut off left something");
    assert_eq!(unnamed_held(rx.child.id(), &rx.dir), 0);
}
