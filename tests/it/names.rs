//! Names Linux allows arrive as they are, Linux to Linux; a receiver whose file system cannot
//! hold a name (the `XFER_ASSUME_FS` hook stands in for FAT/NTFS and casefold folders) refuses
//! that entry alone while the rest lands; lookalike names are shown escaped on both sides.

use std::fs;
use std::path::Path;

use crate::util::{Receiver, send};

/// The names a Linux file system holds that xfer used to refuse, each with its own content.
/// Sent in name order, so of each twin pair `folder/Case.txt` and the NFD `café.txt` come first.
const LEGAL: &[&str] = &[
    "a:b.txt",
    "backup-2024-01-01T10:00:00.tar",
    "trailing ",
    "CON",
    "back\\slash.txt",
    "folder/Case.txt",
    "folder/case.txt",
    "caf\u{e9}.txt",
    "cafe\u{301}.txt",
];

/// A folder `batch` holding [`LEGAL`].
fn legal_batch() -> (tempfile::TempDir, std::path::PathBuf) {
    let src = tempfile::tempdir().unwrap();
    let batch = src.path().join("batch");
    fs::create_dir_all(batch.join("folder")).unwrap();
    for (i, name) in LEGAL.iter().enumerate() {
        fs::write(batch.join(name), format!("{i}: {name}\n").repeat(i + 1)).unwrap();
    }
    (src, batch)
}

/// The names under `dir`, as stored (`folder/...` for the folder's), sorted.
fn stored(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if e.file_type().unwrap().is_dir() {
            names.extend(
                fs::read_dir(e.path())
                    .unwrap()
                    .map(|f| format!("{name}/{}", f.unwrap().file_name().into_string().unwrap())),
            );
        } else {
            names.push(name);
        }
    }
    names.sort();
    names
}

/// `want` (names of [`LEGAL`]) arrived under exactly these names, byte for byte, and nothing else.
fn assert_arrived(rx: &Receiver, batch: &Path, want: &[&str]) {
    let mut sorted: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    sorted.sort();
    assert_eq!(stored(&rx.dir.join("batch")), sorted);
    for name in want {
        let (sent, got) = (batch.join(name), rx.dir.join("batch").join(name));
        let cmp = std::process::Command::new("cmp").arg(&sent).arg(&got).status().unwrap();
        assert!(cmp.success(), "{name:?} differs");
    }
}

fn receiver_assuming(fs_kind: &str) -> Receiver {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dir");
    fs::create_dir(&dir).unwrap();
    Receiver::start_with(root, dir, &["--quiet"], &[("XFER_ASSUME_FS", fs_kind)])
}

#[test]
fn names_linux_allows_arrive_byte_identical() {
    let (_src, batch) = legal_batch();
    let rx = Receiver::start(&["--quiet"]);
    let run = send(&batch, &rx.target(), &[]).expect(0);
    assert!(!run.stderr().contains("cannot send"), "{}", run.report());
    assert_arrived(&rx, &batch, LEGAL);
}

#[test]
fn a_windows_like_receiver_refuses_what_it_cannot_hold_and_stores_the_rest() {
    let (_src, batch) = legal_batch();
    let rx = receiver_assuming("windows");
    let run = send(&batch, &rx.target(), &["--verbose"]).expect(4);
    // The sender offered everything: nothing was refused on its side.
    assert!(!run.stderr().contains("cannot send"), "{}", run.report());
    assert_arrived(&rx, &batch, &["folder/Case.txt", "cafe\u{301}.txt"]);
    let out = format!("{}{}", run.stdout(), run.stderr());
    // Each refusal names the entry (once: the receiver's reason begins with it, the sender drops
    // that repeat) and the rule, escaped once.
    for needle in [
        "rejected batch/a:b.txt: component 2 is refused: name contains `:`, which the receiver's file \
         system (FAT, exFAT, NTFS or SMB) cannot hold",
        "rejected batch/backup-2024-01-01T10:00:00.tar: component 2 is refused: name contains `:`",
        "rejected batch/back\\\\slash.txt: component 2 is refused: name contains `\\`",
        "rejected batch/trailing\\u{20}: component 2 is refused: name ends with a dot or a space",
        "rejected batch/CON: component 2 is refused: name is the Windows device name CON",
        "\"batch/folder/case.txt\" is refused: it is the same path as \"batch/folder/Case.txt\" on \
         the receiver's file system, which ignores case and Unicode form",
        "\"batch/caf\u{e9}.txt\" is refused: it is the same path as \"batch/cafe\u{301}.txt\" (spelled \
         with other Unicode code points)",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{}", run.report());
    }
    assert_eq!(run.stdout().matches("is refused").count(), 7, "{}", run.report());
    rx.wait_log("7 failed");
}

#[test]
fn a_case_insensitive_receiver_refuses_only_the_second_of_each_twin_pair() {
    let (_src, batch) = legal_batch();
    let rx = receiver_assuming("casefold");
    let run = send(&batch, &rx.target(), &["--verbose"]).expect(4);
    let out = format!("{}{}", run.stdout(), run.stderr());
    assert!(out.contains("\"batch/folder/case.txt\" is refused: it is the same path as"), "{}", run.report());
    assert!(out.contains("\"batch/caf\u{e9}.txt\" is refused: it is the same path as"), "{}", run.report());
    assert_eq!(run.stdout().matches("is refused").count(), 2, "{}", run.report());
    let rest: Vec<&str> =
        LEGAL.iter().copied().filter(|n| *n != "folder/case.txt" && *n != "caf\u{e9}.txt").collect();
    assert_arrived(&rx, &batch, &rest);
}

#[test]
fn an_unknown_assumed_file_system_is_a_usage_error() {
    let root = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(crate::util::BIN)
        .args(["recv", "--insecure", "--listen", "127.0.0.1:0", "--dir"])
        .arg(root.path())
        .env("XFER_ASSUME_FS", "hfs")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A receiver that ignored the variable would serve on: give it ten seconds to refuse.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("the receiver started with XFER_ASSUME_FS=hfs");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let run = child.wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("xfer: error: XFER_ASSUME_FS=\"hfs\": expected `windows` or `casefold`"),
        "{stderr}"
    );
}

#[test]
fn a_lookalike_name_arrives_as_it_is_and_is_shown_escaped() {
    let src = tempfile::tempdir().unwrap();
    let name = "report.pdf\u{a0}";
    let path = src.path().join(name);
    fs::write(&path, b"not the report").unwrap();
    let rx = Receiver::start(&[]);
    let run = send(&path, &rx.target(), &[]).expect(0);
    assert_eq!(fs::read(rx.dir.join(name)).unwrap(), b"not the report");
    assert!(!rx.dir.join("report.pdf").exists());
    let log = rx.wait_log("stored as");
    assert!(log.contains("\"report.pdf\\u{a0}\""), "receiver log:\n{log}");
    let out = format!("{}{}", run.stdout(), run.stderr());
    assert!(out.contains("report.pdf\\u{a0}"), "{}", run.report());
    assert!(!log.contains('\u{a0}') && !out.contains('\u{a0}'), "a raw NBSP was printed");
}

#[test]
fn a_trailing_space_is_shown_escaped_in_a_batch() {
    let src = tempfile::tempdir().unwrap();
    let batch = src.path().join("b");
    fs::create_dir(&batch).unwrap();
    fs::write(batch.join("report.pdf "), b"x").unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let run = send(&batch, &rx.target(), &["--verbose"]).expect(0);
    assert_eq!(fs::read(rx.dir.join("b/report.pdf ")).unwrap(), b"x");
    let out = format!("{}{}", run.stdout(), run.stderr());
    assert!(out.contains("b/report.pdf\\u{20}"), "{}", run.report());
}
