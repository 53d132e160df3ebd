//! Batches: folders and many files in one conversation, trees recreated exactly, repeats that send
//! nothing, and hostile manifests refused before anything is written.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use xfer::protocol::{self, Entry, EntryKind, HashAlg, Message, Reject, RejectCode};

use crate::util::{RawPeer, Receiver, SmallDisk, random_bytes, send};

/// Every path below `root` with its kind, permission bits, mtime and content, for comparing trees.
fn snapshot(root: &Path) -> Vec<(String, bool, u32, SystemTime, Vec<u8>)> {
    let mut out = Vec::new();
    fn visit(base: &Path, dir: &Path, out: &mut Vec<(String, bool, u32, SystemTime, Vec<u8>)>) {
        let mut kids: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        kids.sort();
        for p in kids {
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let content = if m.is_file() { fs::read(&p).unwrap() } else { Vec::new() };
            out.push((rel, m.is_dir(), m.permissions().mode() & 0o7777, m.modified().unwrap(), content));
            if m.is_dir() {
                visit(base, &p, out);
            }
        }
    }
    visit(root, root, &mut out);
    out
}

fn set_mtime(path: &Path, t: SystemTime) {
    fs::File::open(path).unwrap().set_modified(t).unwrap();
}

/// A tree of 1,040 files in nested folders, with empty folders, zero-length files, odd names,
/// varied modes (one with setuid) and old mtimes.
fn build_tree(root: &Path) {
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    let odd = ["with space.txt", "ünïcödé.txt", "日本語.txt", "-leading-dash", "#hash#", "a'quote"];
    for d in 0..20 {
        let dir = root.join(format!("d{d:02}")).join(format!("sub {d}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..52 {
            let name = if f < odd.len() { format!("{}-{f}", odd[f]) } else { format!("f{f:03}.bin") };
            let p = dir.join(name);
            let len = if f % 13 == 0 { 0 } else { (d * 52 + f) * 37 % 5000 };
            fs::write(&p, random_bytes(len, (d * 100 + f) as u64)).unwrap();
            let mode = [0o644, 0o600, 0o755, 0o640][f % 4];
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            set_mtime(&p, t0 + Duration::from_secs((d * 52 + f) as u64));
        }
        set_mtime(&dir, t0 + Duration::from_secs(d as u64));
        set_mtime(dir.parent().unwrap(), t0 + Duration::from_secs(100 + d as u64));
    }
    fs::create_dir_all(root.join("empty/nested-empty")).unwrap();
    fs::write(root.join("setuid-tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("setuid-tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o750)).unwrap();
    set_mtime(&root.join("empty/nested-empty"), t0);
    set_mtime(&root.join("empty"), t0);
    set_mtime(root, t0);
}

#[test]
fn a_tree_of_a_thousand_files_arrives_identical_and_again_sends_nothing() {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("project");
    build_tree(&tree);
    let rx = Receiver::start(&["--quiet"]);
    let run = send(&tree, &rx.target(), &["--quiet"]).expect(0);
    assert!(run.stdout().contains("1041 files"), "{}", run.report());
    assert!(run.stdout().contains(" 0 failed"), "{}", run.report());

    let want = snapshot(&tree);
    let got = snapshot(&rx.dir.join("project"));
    assert_eq!(want.len(), got.len(), "entry count");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!((&w.0, w.1), (&g.0, g.1), "path or kind");
        assert!(w.4 == g.4, "{}: content differs", w.0);
        assert_eq!(w.3, g.3, "{}: mtime differs", w.0);
        // Modes travel, but never setuid, setgid or sticky.
        assert_eq!(w.2 & 0o777, g.2, "{}: mode differs", w.0);
    }
    let top = fs::metadata(rx.dir.join("project")).unwrap();
    assert_eq!(top.modified().unwrap(), fs::metadata(&tree).unwrap().modified().unwrap());
    rx.assert_files(&["project"]);

    // The same tree again: one exchange, no bodies.
    let again = send(&tree, &rx.target(), &["--quiet", "--verbose"]).expect(0);
    let out = again.stdout();
    assert!(out.contains(", nothing sent:"), "{}", again.report());
    assert!(out.contains(": 0 verified,"), "{}", again.report());
    assert!(out.lines().filter(|l| l.starts_with("already there ")).count() > 1000, "{}", again.report());
}

#[test]
fn several_paths_and_skipped_entries() {
    let src = tempfile::tempdir().unwrap();
    fs::create_dir(src.path().join("docs")).unwrap();
    fs::write(src.path().join("docs/a.txt"), b"a").unwrap();
    fs::write(src.path().join("notes.txt"), b"notes").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.path().join("docs/link")).unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let args = [
        "send".to_string(),
        src.path().join("docs").to_string_lossy().into_owned(),
        src.path().join("notes.txt").to_string_lossy().into_owned(),
        rx.target(),
    ];
    let run = crate::util::xfer(&args).expect(0);
    assert!(run.stdout().contains("1 skipped"), "{}", run.report());
    assert!(run.stderr().contains("symlink (not followed; see --follow)"), "{}", run.report());
    rx.assert_files(&["docs", "notes.txt"]);
    assert_eq!(fs::read(rx.dir.join("docs/a.txt")).unwrap(), b"a");
    assert!(!rx.dir.join("docs/link").exists());
}

fn file(path: &[&str], data: &[u8]) -> Entry {
    Entry {
        path: path.iter().map(|s| s.to_string()).collect(),
        kind: EntryKind::File { size: data.len() as u64, hash: HashAlg::Sha256, tag: [0; 16] },
        mode: 0o644,
        mtime: (0, 0),
    }
}

fn dir(path: &[&str]) -> Entry {
    Entry {
        path: path.iter().map(|s| s.to_string()).collect(),
        kind: EntryKind::Dir,
        mode: 0o755,
        mtime: (0, 0),
    }
}

/// Offers `entries` as one manifest and returns the receiver's first answer.
fn offer_manifest(rx: &Receiver, entries: Vec<Entry>) -> Message {
    let mut p = RawPeer::greet(rx.addr);
    protocol::write_message(
        &mut p.stream,
        &Message::Manifest(protocol::ManifestPart { entries, last: true }),
    )
    .unwrap();
    p.read().unwrap()
}

fn assert_refused(msg: Message, code: RejectCode, needle: &str) {
    match msg {
        Message::Reject(Reject { code: c, reason }) => {
            assert_eq!(c, code, "{reason}");
            assert!(reason.contains(needle), "reason {reason:?} lacks {needle:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn hostile_manifests_are_refused_before_any_write() {
    let rx = Receiver::start(&["--quiet"]);
    // A bad name is refused as such; the other rules concern the manifest as a whole.
    let (name, whole) = (RejectCode::InvalidName, RejectCode::InvalidManifest);
    let cases: Vec<(Vec<Entry>, RejectCode, &str)> = vec![
        (vec![dir(&["a"]), file(&["a", "..", "b"], b"x")], name, "`.` or `..`"),
        (vec![file(&["..", "etc", "passwd"], b"x")], name, "`.` or `..`"),
        (vec![file(&["a/b"], b"x")], name, "path separator"),
        (vec![file(&["ok"], b"x"), file(&["ok", "deeper"], b"y")], whole, "below"),
        (vec![file(&["x"], b"x"), dir(&["x"])], whole, "\"x\" is listed twice"),
        // Exact twins only: `Readme` and `README` are two names on Linux (see names.rs).
        (
            vec![file(&["d", "Readme"], b"1"), file(&["d", "Readme"], b"2")],
            whole,
            "\"d/Readme\" is listed twice",
        ),
        (vec![], whole, "empty"),
    ];
    for (entries, code, needle) in cases {
        let reply = offer_manifest(&rx, entries);
        assert_refused(reply, code, needle);
        rx.assert_files(&[]);
    }
    rx.assert_files(&[]);
}

#[test]
fn a_batch_that_does_not_fit_whole_is_refused_file_by_file() {
    // A folder and a file larger than the free space: the batch is accepted, the folder made,
    // and only the file that cannot fit is refused, before its body (it used to refuse it all).
    let rx = Receiver::start(&["--quiet"]);
    let free = xfer::store::free_space(&rx.dir).unwrap();
    let mut huge = file(&["t", "huge"], b"");
    huge.kind = EntryKind::File { size: free + (1 << 30), hash: HashAlg::Sha256, tag: [0; 16] };
    let mut p = RawPeer::greet(rx.addr);
    let manifest = Message::Manifest(protocol::ManifestPart { entries: vec![dir(&["t"]), huge], last: true });
    protocol::write_message(&mut p.stream, &manifest).unwrap();
    assert!(crate::util::is_accept(&p.read().unwrap()));
    let mut got = Vec::new();
    while got.len() < 2 {
        match p.read().expect("answers") {
            Message::Answers(part) => got.extend(part.answers),
            other => panic!("expected answers, got {other:?}"),
        }
    }
    assert_eq!(got[0], protocol::Answer::Send { offset: 0 }, "{got:?}");
    assert!(
        matches!(&got[1], protocol::Answer::Reject { code: RejectCode::InsufficientSpace, reason } if reason.contains("free")),
        "{got:?}"
    );
    drop(p);
    rx.wait_log("batch of 2 entries");
    rx.assert_files(&["t"]);
}

#[test]
fn a_million_entries_are_refused_without_storing_them() {
    let rx = Receiver::start(&["--quiet"]);
    let mut p = RawPeer::greet(rx.addr);
    let mut writer = p.stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let mut n = 0u32;
        while n < 1_000_000 {
            let entries: Vec<Entry> = (n..n + 500).map(|i| file(&[&format!("f{i}")], b"")).collect();
            let part = protocol::ManifestPart { entries, last: n + 500 >= 1_000_000 };
            if protocol::write_message(&mut writer, &Message::Manifest(part)).is_err() {
                break; // the receiver stopped listening: good
            }
            n += 500;
        }
    });
    // Either the refusal arrives, or the receiver hangs up; its log says why either way.
    let _ = p.read();
    flood.join().unwrap();
    rx.wait_log("the limit is 250000");
    rx.assert_files(&[]);
}

#[test]
fn a_symlink_planted_in_dir_is_not_written_through() {
    let rx = Receiver::start(&["--quiet"]);
    let outside = rx.root.path().join("outside");
    fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, rx.dir.join("tree")).unwrap();
    let src = tempfile::tempdir().unwrap();
    fs::create_dir_all(src.path().join("tree/sub")).unwrap();
    fs::write(src.path().join("tree/sub/evil.txt"), b"payload").unwrap();
    let run = send(&src.path().join("tree"), &rx.target(), &["--verbose"]);
    assert_ne!(run.code(), 0, "{}", run.report());
    assert!(run.stdout().contains("failed"), "{}", run.report());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "something was written through the symlink");
    assert!(fs::symlink_metadata(rx.dir.join("tree")).unwrap().file_type().is_symlink());
}

#[test]
fn unsendable_names_fail_the_batch_but_not_the_rest() {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("shots");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("ok.png"), b"fine").unwrap();
    fs::write(tree.join("bell\x07.png"), b"control").unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let run = send(&tree, &rx.target(), &["--verbose"]).expect(2);
    assert!(run.stdout().contains("1 failed"), "{}", run.report());
    let shown = "bell\\u{7}.png: name contains control or invisible character U+0007";
    assert!(run.stderr().contains("cannot send") && run.stderr().contains(shown), "{}", run.report());
    assert_eq!(fs::read(rx.dir.join("shots/ok.png")).unwrap(), b"fine");
}

#[test]
fn follow_does_not_loop() {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("loop");
    fs::create_dir_all(tree.join("inner")).unwrap();
    fs::write(tree.join("inner/f"), b"f").unwrap();
    std::os::unix::fs::symlink(&tree, tree.join("inner/back")).unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let run = send(&tree, &rx.target(), &["--follow"]).expect(0);
    assert!(run.stderr().contains("symlink loop"), "{}", run.report());
    assert_eq!(fs::read(rx.dir.join("loop/inner/f")).unwrap(), b"f");
}

#[test]
fn resending_a_tree_that_is_there_does_not_need_its_size_again() {
    let disk = SmallDisk::mount("6m");
    let dir = disk.0.path().join("dir");
    fs::create_dir(&dir).unwrap();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("t");
    fs::create_dir(&tree).unwrap();
    for i in 0..4 {
        fs::write(tree.join(format!("f{i}")), random_bytes(1 << 20, i)).unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    let rx = Receiver::start_in(root, dir.clone(), &["--quiet"]);
    send(&tree, &rx.target(), &[]).expect(0);
    // 4 MiB stored, about 2 MiB free: the tree is there, so the repeat must not be refused.
    let again = send(&tree, &rx.target(), &[]).expect(0);
    assert!(again.stdout().contains("4 already there"), "{}", again.report());
    // A different tree of the same size does not fit whole: what fits is sent, the rest is
    // refused file by file for space, and the send exits 4.
    let other = src.path().join("u");
    fs::create_dir(&other).unwrap();
    for i in 0..4 {
        fs::write(other.join(format!("g{i}")), random_bytes(1 << 20, 10 + i)).unwrap();
    }
    let run = send(&other, &rx.target(), &["--verbose"]).expect(4);
    assert!(run.stderr().contains("free"), "{}", run.report());
    let out = run.stdout();
    let sent: Vec<_> = (0..4).filter(|i| out.contains(&format!("verified \"u/g{i}\""))).collect();
    let refused = out.matches("failed \"u/g").count();
    assert!(!sent.is_empty() && refused > 0 && sent.len() + refused == 4, "{}", run.report());
    for i in 0..4 {
        let there = dir.join("u").join(format!("g{i}"));
        assert_eq!(there.exists(), sent.contains(&i), "u/g{i}\n{}", run.report());
        if sent.contains(&i) {
            assert!(fs::read(&there).unwrap() == fs::read(other.join(format!("g{i}"))).unwrap());
        }
    }
    drop(rx);
}

#[test]
fn the_target_folder_keeps_its_own_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let rx = Receiver::start(&["--quiet"]);
    fs::set_permissions(&rx.dir, fs::Permissions::from_mode(0o750)).unwrap();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("open");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("f"), b"f").unwrap();
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o777)).unwrap();
    send(&tree, &rx.target(), &["--quiet"]).expect(0);
    let (_one, single) = crate::util::source_file("single", b"single");
    send(&single, &rx.target(), &["--quiet"]).expect(0);
    assert_eq!(fs::metadata(&rx.dir).unwrap().permissions().mode() & 0o7777, 0o750);
    // The sender's folder mode applies to the folder it sent, never to DIR.
    assert_eq!(fs::metadata(rx.dir.join("open")).unwrap().permissions().mode() & 0o7777, 0o777);
}

#[test]
fn nothing_that_arrives_is_executed_extracted_or_made_setuid() {
    let rx = Receiver::start(&["--quiet"]);
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("drop");
    fs::create_dir(&tree).unwrap();
    // Would leave a mark if anything ran it: a script, and the hooks tools are known to run.
    let mark = rx.root.path().join("ran");
    let script = format!("#!/bin/sh\ntouch '{}'\n", mark.display());
    for name in ["run.sh", ".bashrc", "post-receive", "autorun.inf"] {
        fs::write(tree.join(name), &script).unwrap();
        fs::set_permissions(tree.join(name), fs::Permissions::from_mode(0o755)).unwrap();
    }
    // An archive that would put a file beside DIR if it were unpacked, by an absolute path too.
    let stage = tempfile::tempdir().unwrap();
    fs::write(stage.path().join("inside"), b"unpacked").unwrap();
    let tar = tree.join("payload.tar");
    let ok = std::process::Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(stage.path())
        .arg("inside")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar failed");
    // setgid and sticky on a folder, setgid on a file, setuid+setgid on another.
    fs::write(tree.join("sgid-tool"), b"x").unwrap();
    fs::set_permissions(tree.join("sgid-tool"), fs::Permissions::from_mode(0o2755)).unwrap();
    fs::write(tree.join("both"), b"y").unwrap();
    fs::set_permissions(tree.join("both"), fs::Permissions::from_mode(0o6755)).unwrap();
    fs::create_dir(tree.join("shared")).unwrap();
    fs::set_permissions(tree.join("shared"), fs::Permissions::from_mode(0o3775)).unwrap();
    let before = snapshot(&tree);

    send(&tree, &rx.target(), &["--quiet"]).expect(0);
    std::thread::sleep(Duration::from_millis(300));

    assert!(!mark.exists(), "something that arrived was run");
    // Beside DIR: only DIR. Inside it: exactly what was sent, byte for byte (the archive was not
    // unpacked), with the same permission bits less setuid, setgid and sticky.
    assert_eq!(crate::util::list(rx.root.path()), vec!["dir".to_string()]);
    let after = snapshot(&rx.dir.join("drop"));
    assert_eq!(after.len(), before.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&a.0, a.1, &a.4), (&b.0, b.1, &b.4), "{} differs", b.0);
        assert_eq!(a.2, b.2 & 0o777, "{}: mode {:o} stored as {:o}", b.0, b.2, a.2);
    }
}

#[test]
fn already_there_names_the_copy_that_holds_the_content() {
    // DIR/t/a holds other bytes; DIR/t/a (1) holds exactly what is sent as t/a.
    let rx = Receiver::start(&["--quiet"]);
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("t");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("a"), b"the new a").unwrap();
    fs::create_dir(rx.dir.join("t")).unwrap();
    fs::write(rx.dir.join("t").join("a"), b"an older a").unwrap();
    fs::write(rx.dir.join("t").join("a (1)"), b"the new a").unwrap();
    let run = send(&tree, &rx.target(), &["--quiet", "--verbose"]).expect(0);
    assert!(run.stdout().contains("already there \"t/a\" as \"t/a (1)\""), "{}", run.report());
    // Nothing was written: both files as they were, no third copy.
    assert_eq!(crate::util::list(&rx.dir.join("t")), vec!["a".to_string(), "a (1)".to_string()]);
    assert_eq!(fs::read(rx.dir.join("t").join("a")).unwrap(), b"an older a");
}

#[test]
fn what_cannot_be_read_is_reported_by_path_and_the_rest_is_sent() {
    // A missing path and a dangling symlink under --follow: before, either stopped the whole
    // batch before anything was sent (exit 6). Now each is reported and the rest arrives (exit 6).
    let rx = Receiver::start(&["--quiet"]);
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("d");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("a.txt"), b"readable").unwrap();
    std::os::unix::fs::symlink(src.path().join("nowhere"), dir.join("dangling")).unwrap();
    let missing = src.path().join("missing.txt");
    let args = [
        "send".to_string(),
        missing.display().to_string(),
        dir.display().to_string(),
        rx.target(),
        "--follow".to_string(),
    ];
    let run = crate::util::xfer(&args).expect(6);
    assert!(run.stderr().contains("cannot read") && run.stderr().contains("missing.txt"), "{}", run.report());
    assert!(run.stderr().contains("dangling"), "{}", run.report());
    assert_eq!(fs::read(rx.dir.join("d/a.txt")).unwrap(), b"readable", "{}", run.report());
    assert!(run.stdout().contains("1 verified") || run.stdout().contains("2 verified"), "{}", run.report());
}

#[test]
fn as_renames_a_folder_or_puts_a_file_at_a_path_inside_dir() {
    // Before: --as on a folder was silently ignored and `--as sub/x.txt` was refused.
    let rx = Receiver::start(&["--quiet"]);
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/a.txt"), b"in a folder").unwrap();
    let one = src.path().join("one.txt");
    fs::write(&one, b"one file").unwrap();
    send(&one, &rx.target(), &["--as", "backups/2024/renamed.txt"]).expect(0);
    assert_eq!(fs::read(rx.dir.join("backups/2024/renamed.txt")).unwrap(), b"one file");
    send(&tree, &rx.target(), &["--as", "trees/t2"]).expect(0);
    assert_eq!(fs::read(rx.dir.join("trees/t2/sub/a.txt")).unwrap(), b"in a folder");
    assert!(!rx.dir.join("tree").exists());
    // Still a path inside DIR, component by component.
    let run = send(&one, &rx.target(), &["--as", "a/../../x"]).expect(2);
    assert!(run.stderr().contains("\"..\""), "{}", run.report());
}

#[test]
fn json_lines_follow_the_documented_schema() {
    let rx = Receiver::start(&["--quiet"]);
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("j");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/a.txt"), b"json a").unwrap();
    // A name the receiver would refuse, holding a terminal escape: a failed entry, exit 2.
    fs::write(tree.join("b\u{1b}[31m.txt"), b"json b").unwrap();
    let run = send(&tree, &rx.target(), &["--json"]).expect(2);
    assert!(!run.stdout().contains('\u{1b}'), "a raw escape on stdout: {}", run.report());
    let lines: Vec<serde_json::Value> = run
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let (entries, summary) = lines.split_at(lines.len() - 1);
    assert_eq!(entries.len(), 4, "{}", run.report());
    for e in entries {
        assert_eq!(e["type"], "entry");
        assert!(e["size"].is_u64() && e["path"].is_string(), "{e}");
        match e["outcome"].as_str() {
            Some("verified") => assert!(e["stored_as"].is_string(), "{e}"),
            Some("failed") => {
                assert_eq!(e["exit"], 2, "{e}");
                assert!(e["error"].as_str().unwrap().contains("control"), "{e}");
                assert!(
                    e["path"].as_str().unwrap().ends_with("b\u{1b}[31m.txt"),
                    "the exact name parses back: {e}"
                );
            }
            other => panic!("outcome {other:?}: {e}"),
        }
        if e["kind"] == "file" && e["outcome"] == "verified" {
            assert_eq!(e["hash"], "sha256");
            assert_eq!(e["digest"].as_str().unwrap().len(), 64);
        }
    }
    let s = &summary[0];
    assert_eq!(
        (s["type"].as_str(), s["entries"].as_u64(), s["files"].as_u64()),
        (Some("summary"), Some(4), Some(1))
    );
    assert_eq!(
        (s["verified"].as_u64(), s["failed"].as_u64(), s["exit"].as_u64()),
        (Some(3), Some(1), Some(2))
    );
    assert!(s["seconds"].is_f64() && s["bytes"].is_u64() && s["sent"].is_u64());
    // A send that fails as a whole: one error line, and the exit code as without --json.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let run = send(&tree.join("sub"), &free, &["--json"]).expect(3);
    let e: serde_json::Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert_eq!((e["type"].as_str(), e["exit"].as_u64()), (Some("error"), Some(3)));
}
