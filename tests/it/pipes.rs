//! Pipes and one-file receivers: `recv --once -o PATH` stores the one file at PATH, `recv --once
//! -o -` writes it to stdout only once verified, `send - HOST --as NAME` streams stdin.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::{BIN, RawPeer, Receiver, file_entry, is_accept, list, random_bytes, sha256, xfer};
use xfer::code::Code;
use xfer::protocol::{Answer, Entry, EntryKind, HashAlg, Message, RejectCode, STREAM_END, Verdict};

/// A `xfer recv --once` started without the harness's `--dir`: its stdout is collected whole
/// (with `-o -` it is the file), its stderr too; the `listening on` line is looked for on both.
struct OneShot {
    child: Child,
    addr: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    stdout_reader: Option<JoinHandle<()>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
}

/// Copies what `from` gives into `to` as it comes, at most `take` bytes, then closes it.
fn collect(
    mut from: impl Read + Send + 'static,
    to: &Arc<Mutex<Vec<u8>>>,
    take: Option<usize>,
) -> JoinHandle<()> {
    let to = Arc::clone(to);
    std::thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        let mut left = take.unwrap_or(usize::MAX);
        while left > 0 {
            match from.read(&mut buf[..left.min(64 * 1024)]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    to.lock().unwrap().extend_from_slice(&buf[..n]);
                    left -= n;
                }
            }
        }
    })
}

impl OneShot {
    /// `--insecure` is added unless `envs` give a code. `take`: read at most this much of its
    /// stdout, then close it (a reader that goes away early, like `| head -c 10`).
    fn start(args: &[&str], envs: &[(&str, &str)], take: Option<usize>) -> OneShot {
        let config = tempfile::tempdir().unwrap().keep();
        let secure = envs.iter().any(|(k, _)| *k == "XFER_CODE");
        let mut child = Command::new(BIN)
            .args(["recv", "--once", "--listen", "127.0.0.1:0", "--quiet"])
            .args(if secure { &[][..] } else { &["--insecure"][..] })
            .args(args)
            .env("XDG_CONFIG_HOME", &config)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xfer recv");
        let (stdout, stderr) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let stdout_reader = Some(collect(child.stdout.take().unwrap(), &stdout, take));
        let stderr_reader = Some(collect(child.stderr.take().unwrap(), &stderr, None));
        let mut rx = OneShot { child, addr: String::new(), stdout, stdout_reader, stderr, stderr_reader };
        rx.addr = rx.wait_addr();
        rx
    }

    /// The address from the `listening on` line, on stderr (with `-o -`) or stdout.
    fn wait_addr(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned();
            let both = format!("{}\n{out}", self.stderr());
            if let Some(a) = both.lines().find_map(|l| l.strip_prefix("listening on ")) {
                return a.trim().to_string();
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("receiver exited ({st}) before listening; stderr:\n{}", self.stderr());
            }
            assert!(Instant::now() < deadline, "no listening line; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits for the receiver to exit: its code, everything on its stdout, and its stderr.
    fn finish(mut self) -> (i32, Vec<u8>, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "receiver did not exit; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        };
        self.stdout_reader.take().unwrap().join().unwrap();
        self.stderr_reader.take().unwrap().join().unwrap();
        let out = std::mem::take(&mut *self.stdout.lock().unwrap());
        (status.code().unwrap_or(-1), out, self.stderr())
    }
}

impl Drop for OneShot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `xfer recv --once -o PATH EXTRA...`
fn recv_to_path(path: &Path, extra: &[&str]) -> OneShot {
    let mut args = vec!["-o", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    OneShot::start(&args, &[], None)
}

fn write_source(name: &str, data: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    crate::util::source_file(name, data)
}

#[test]
fn output_path_stores_the_one_file_there_whatever_its_name() {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("out");
    std::fs::create_dir(&folder).unwrap();
    let target = folder.join("db.copy");
    let data = random_bytes(3 * 1024 * 1024 + 7, 31);
    let (_src, path) = write_source("original.bin", &data);
    let rx = recv_to_path(&target, &[]);
    let run = xfer(&["send", path.to_str().unwrap(), &rx.addr, "--quiet"]).expect(0);
    assert!(run.stdout().contains("stored as \"db.copy\""), "{}", run.report());
    let (code, _, log) = rx.finish();
    assert_eq!(code, 0, "{log}");
    assert!(std::fs::read(&target).unwrap() == data, "PATH holds other bytes");
    assert_eq!(list(&folder), vec!["db.copy"], "nothing else in PATH's folder");

    // PATH exists with other content: it is replaced (atomically), as `cp` or `curl -o` would.
    let newer = random_bytes(1000, 32);
    let (_src2, path2) = write_source("other-name.txt", &newer);
    let rx = recv_to_path(&target, &[]);
    xfer(&["send", path2.to_str().unwrap(), &rx.addr, "--quiet"]).expect(0);
    let (code, _, log) = rx.finish();
    assert_eq!(code, 0, "{log}");
    assert!(std::fs::read(&target).unwrap() == newer, "PATH was not replaced");
    assert_eq!(list(&folder), vec!["db.copy"], "no keep-both copy, no partial left");
}

#[test]
fn output_path_refuses_a_folder_and_several_files() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("one.bin");
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir(tree.path().join("t")).unwrap();
    std::fs::write(tree.path().join("t/a.txt"), b"a").unwrap();
    let rx = recv_to_path(&target, &[]);
    let run = xfer(&["send", tree.path().join("t").to_str().unwrap(), &rx.addr]).expect(4);
    assert!(run.stderr().contains("this receiver takes one file (-o PATH)"), "{}", run.report());
    let (code, _, log) = rx.finish();
    assert_eq!(code, 4, "the receiver exits with the refusal's code\n{log}");
    assert!(log.contains("xfer: error:") && log.contains("takes one file"), "{log}");
    assert_eq!(list(root.path()), Vec::<String>::new(), "nothing written");
}

#[test]
fn output_usage_errors_exit_2() {
    let root = tempfile::tempdir().unwrap();
    let p = root.path().join("x").to_string_lossy().into_owned();
    let dir = root.path().to_string_lossy().into_owned();
    let r = xfer(&["recv", "-o", &p]).expect(2);
    assert!(r.stderr().contains("--once"), "{}", r.report());
    let r = xfer(&["recv", "--once", "-o", &p, "--dir", &dir]).expect(2);
    assert!(r.stderr().contains("leave out --dir"), "{}", r.report());
    let r = xfer(&["recv", "--once", "--output", &dir]).expect(2);
    assert!(r.stderr().contains("is a folder"), "{}", r.report());
}

#[test]
fn output_stdout_writes_the_verified_file_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp_s = tmp.path().to_string_lossy().into_owned();
    let data = random_bytes(5 * 1024 * 1024, 33);
    let (_src, path) = write_source("five.bin", &data);
    let rx = OneShot::start(&["-o", "-"], &[("TMPDIR", &tmp_s)], None);
    let run = xfer(&["send", path.to_str().unwrap(), &rx.addr, "--quiet"]).expect(0);
    assert!(run.stdout().contains("verified, stored as \"(standard output)\""), "{}", run.report());
    let (code, out, log) = rx.finish();
    assert_eq!(code, 0, "{log}");
    assert_eq!(out.len(), data.len(), "stdout length\n{log}");
    assert!(out == data, "stdout is not the file byte for byte");
    assert!(log.starts_with("listening on 127.0.0.1:"), "the address goes to stderr\n{log}");
    assert!(list(tmp.path()).is_empty(), "the private folder in $TMPDIR is removed: {:?}", list(tmp.path()));
}

#[test]
fn output_stdout_over_the_secure_channel() {
    let code = Code::generate();
    let env = [("XFER_CODE", code.expose())];
    let data = random_bytes(700_000, 34);
    let (_src, path) = write_source("s.bin", &data);
    let rx = OneShot::start(&["-o", "-"], &env, None);
    let cfg = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["send", path.to_str().unwrap(), &rx.addr])
        .env("XDG_CONFIG_HOME", cfg.path())
        .env("XDG_CACHE_HOME", cfg.path())
        .env("XFER_CODE", code.expose())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (status, got, log) = rx.finish();
    assert_eq!(status, 0, "{log}");
    assert!(got == data, "stdout differs");
}

#[test]
fn output_stdout_gets_nothing_from_a_corrupted_or_cut_transfer() {
    let data = random_bytes(2 * 1024 * 1024, 35);
    // A body whose digest does not match: nothing on stdout, the receiver fails (exit 5).
    let rx = OneShot::start(&["-o", "-"], &[], None);
    let mut p = RawPeer::greet(rx.addr.parse().unwrap());
    let wrong = sha256(b"something else");
    assert!(is_accept(&p.offer("f.bin", data.len() as u64, wrong)));
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    for c in data.chunks(256 * 1024) {
        p.data(c);
    }
    match p.read().unwrap() {
        Message::FileVerdict(v) => assert!(matches!(v.verdict, Verdict::HashMismatch { .. }), "{v:?}"),
        other => panic!("{other:?}"),
    }
    let (code, out, log) = rx.finish();
    assert_eq!(code, 5, "{log}");
    assert!(out.is_empty(), "{} bytes reached stdout from a corrupted transfer", out.len());

    // A body cut in the middle: nothing on stdout either (exit 3).
    let rx = OneShot::start(&["-o", "-"], &[], None);
    let mut p = RawPeer::greet(rx.addr.parse().unwrap());
    assert!(is_accept(&p.offer("f.bin", data.len() as u64, sha256(&data))));
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(&data[..1024 * 1024]);
    drop(p);
    let (code, out, log) = rx.finish();
    assert_eq!(code, 3, "{log}");
    assert!(out.is_empty(), "{} bytes reached stdout from a cut transfer", out.len());
}

#[test]
fn output_stdout_closed_early_fails_both_sides() {
    let data = random_bytes(3 * 1024 * 1024, 36);
    let (_src, path) = write_source("big.bin", &data);
    // Like `xfer recv --once -o - | head -c 10`.
    let rx = OneShot::start(&["-o", "-"], &[], Some(10));
    let run = xfer(&["send", path.to_str().unwrap(), &rx.addr, "--quiet"]);
    assert_eq!(run.code(), 1, "the receiver failed to deliver: exit 1\n{}", run.report());
    assert!(run.stderr().contains("standard output"), "{}", run.report());
    let (code, out, log) = rx.finish();
    assert_eq!(code, 6, "{log}");
    assert_eq!(out, data[..10].to_vec());
    assert!(log.contains("standard output"), "{log}");
}

/// Runs `xfer send - TO --as NAME EXTRA...` with `data` on its standard input.
fn send_stdin(data: &[u8], to: &str, name: &str, extra: &[&str], envs: &[(&str, &str)]) -> crate::util::Run {
    let start = Instant::now();
    let cfg = tempfile::tempdir().unwrap();
    let secure = envs.iter().any(|(k, _)| *k == "XFER_CODE");
    let mut child = Command::new(BIN)
        .args(["send", "-", to, "--as", name])
        .args(if secure { &[][..] } else { &["--insecure"][..] })
        .args(extra)
        .env("XDG_CONFIG_HOME", cfg.path())
        .env("XDG_CACHE_HOME", cfg.path())
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    crate::util::Run { out, cmd: format!("xfer send - {to} --as {name}"), elapsed: start.elapsed() }
}

#[test]
fn stdin_streams_into_a_file_of_any_size() {
    let rx = Receiver::start(&["--quiet"]);
    for (name, data) in [
        ("empty.sql", Vec::new()),
        ("small.sql", b"SELECT 1;\n".to_vec()),
        ("db.sql", random_bytes(7 << 20, 37)),
    ] {
        let run = send_stdin(&data, &rx.target(), name, &["--chunk-size", "64K"], &[]).expect(0);
        let digest = sha256(&data).to_hex();
        assert!(run.stdout().contains(&digest), "the summary has the stream's digest\n{}", run.report());
        assert!(run.stdout().contains(&format!("{} bytes", data.len())), "{}", run.report());
        let got = std::fs::read(rx.dir.join(name)).unwrap();
        assert!(got == data, "{name}: stored bytes differ ({} of {})", got.len(), data.len());
        let meta = std::fs::metadata(rx.dir.join(name)).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o644);
        let age = meta.modified().unwrap().elapsed().unwrap_or_default();
        assert!(age < Duration::from_secs(120), "mtime is the time of the send: {age:?} old");
    }
    rx.assert_files(&["db.sql", "empty.sql", "small.sql"]);
}

#[test]
fn stdin_needs_as_and_must_be_the_only_path() {
    let r = xfer(&["send", "-", "127.0.0.1:9"]).expect(2);
    assert!(r.stderr().contains("--as"), "{}", r.report());
    let r = xfer(&["send", "-", "Cargo.toml", "127.0.0.1:9", "--as", "x"]).expect(2);
    assert!(r.stderr().contains("only path"), "{}", r.report());
    let r = xfer(&["send", "-", "127.0.0.1:9", "--as", "x", "--code-file", "-", "--insecure"]).expect(2);
    assert!(r.stderr().contains("--code-file -"), "{}", r.report());
}

#[test]
fn stdin_through_xfer_to_stdout_over_the_secure_channel() {
    // `producer | xfer send - host --as x` into `xfer recv --once -o - | consumer`: a pipe
    // through xfer, encrypted (the default), verified before the consumer sees a byte.
    let code = Code::generate();
    let env = [("XFER_CODE", code.expose())];
    let data = random_bytes(3 << 20, 38);
    let rx = OneShot::start(&["-o", "-"], &env, None);
    let run = send_stdin(&data, &rx.addr, "dump.tar", &[], &env).expect(0);
    assert!(run.stdout().contains("stored as \"(standard output)\""), "{}", run.report());
    let (code, out, log) = rx.finish();
    assert_eq!(code, 0, "{log}");
    assert!(out == data, "what came out ({} bytes) is not what went in", out.len());
}

#[test]
fn stdin_into_output_path() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("restored.sql");
    let data = random_bytes(300_000, 39);
    let rx = recv_to_path(&target, &[]);
    send_stdin(&data, &rx.addr, "db.sql", &[], &[]).expect(0);
    let (code, _, log) = rx.finish();
    assert_eq!(code, 0, "{log}");
    assert!(std::fs::read(&target).unwrap() == data);
    assert_eq!(list(root.path()), vec!["restored.sql"]);
}

#[test]
fn stream_cut_midway_leaves_nothing_under_its_name() {
    let rx = Receiver::start(&[]);
    let cfg = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["send", "-", &rx.target(), "--as", "cut.bin", "--insecure"])
        .env("XDG_CONFIG_HOME", cfg.path())
        .env("XDG_CACHE_HOME", cfg.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&random_bytes(2 << 20, 40)).unwrap();
    // Wait until bytes reached the receiver's partial, then kill the sender mid-stream.
    let stem = xfer::store::stem_for("cut.bin");
    let part = rx.dir.join(format!("{stem}.part"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&part).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "no bytes arrived; stderr:\n{}", rx.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);
    let log = rx.wait_log("failed");
    assert!(log.contains("cannot resume"), "the receiver says a stream does not resume\n{log}");
    rx.assert_files(&[]);
}

#[test]
fn stream_that_outgrows_the_disk_is_refused_and_removed() {
    let disk = crate::util::SmallDisk::mount("4M");
    let dir = disk.0.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let rx = Receiver::start_in(tempfile::tempdir().unwrap(), dir.clone(), &[]);
    let run = send_stdin(&random_bytes(12 << 20, 41), &rx.target(), "big.bin", &[], &[]).expect(1);
    assert!(run.stderr().contains("ran out of room"), "{}", run.report());
    assert!(list(&dir).is_empty(), "nothing stays: {:?}", list(&dir));
    // The receiver goes on serving.
    send_stdin(b"fits", &rx.target(), "small.txt", &[], &[]).expect(0);
    assert_eq!(list(&dir), vec!["small.txt"]);
}

/// A stream as a raw peer writes it: the manifest's one `Stream` entry, the body as data frames
/// ended by an empty one, then the digest.
fn raw_stream(p: &mut RawPeer, name: &str, frames: &[&[u8]], digest: Option<xfer::protocol::Digest>) {
    let entry = Entry {
        path: vec![name.to_string()],
        kind: EntryKind::Stream { hash: HashAlg::Sha256 },
        mode: 0o600,
        mtime: (1_600_000_000, 0),
    };
    p.manifest(vec![entry]);
    assert!(is_accept(&p.read().unwrap()));
    assert_eq!(p.answer(), Answer::Send { offset: 0 }, "a stream is answered at once, from 0");
    p.body(0);
    for f in frames {
        p.data(f);
    }
    p.send_raw(&STREAM_END);
    p.digests(0, vec![digest]);
}

#[test]
fn raw_stream_framing() {
    let rx = Receiver::start(&[]);
    let mut p = RawPeer::greet(rx.addr);
    raw_stream(&mut p, "s.bin", &[b"ab", b"c", b"defg"], Some(sha256(b"abcdefg")));
    match p.read().unwrap() {
        Message::FileVerdict(v) => assert_eq!(v.verdict, Verdict::Verified { name: "s.bin".into() }),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(rx.dir.join("s.bin")).unwrap(), b"abcdefg");

    // A wrong digest: nothing stored.
    let mut p = RawPeer::greet(rx.addr);
    raw_stream(&mut p, "t.bin", &[b"abc"], Some(sha256(b"abd")));
    assert!(
        matches!(p.read().unwrap(), Message::FileVerdict(v) if matches!(v.verdict, Verdict::HashMismatch { .. }))
    );
    // No digest (the sender could not read its input to the end): nothing stored.
    let mut p = RawPeer::greet(rx.addr);
    raw_stream(&mut p, "u.bin", &[b"abc"], None);
    assert!(
        matches!(p.read().unwrap(), Message::FileVerdict(v) if matches!(v.verdict, Verdict::Failed { .. }))
    );

    // A stream is alone in its manifest.
    let mut p = RawPeer::greet(rx.addr);
    let stream = Entry {
        path: vec!["v.bin".into()],
        kind: EntryKind::Stream { hash: HashAlg::Sha256 },
        mode: 0o644,
        mtime: (0, 0),
    };
    p.manifest(vec![stream, file_entry(&["w.bin"], 1)]);
    match p.read().unwrap() {
        Message::Reject(r) => {
            assert_eq!(r.code, RejectCode::InvalidManifest);
            assert!(r.reason.contains("only entry"), "{}", r.reason);
        }
        other => panic!("{other:?}"),
    }
    // A message inside a stream's body breaks the protocol: nothing stored, no partial left.
    let mut p = RawPeer::greet(rx.addr);
    let stream = Entry {
        path: vec!["x.bin".into()],
        kind: EntryKind::Stream { hash: HashAlg::Sha256 },
        mode: 0o644,
        mtime: (0, 0),
    };
    p.manifest(vec![stream]);
    assert!(is_accept(&p.read().unwrap()));
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(b"abc");
    p.digests(0, vec![Some(sha256(b"abc"))]);
    assert!(p.closed_by_peer());
    rx.assert_files(&["s.bin"]);
}

#[test]
fn output_path_resumes_like_any_file() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("resumed.bin");
    let data = random_bytes(3 << 20, 42);
    let cut = 1 << 20;
    // Cut after 1 MiB: the partial stays in PATH's folder, under PATH's name.
    let rx = recv_to_path(&target, &[]);
    let mut p = RawPeer::greet(rx.addr.parse().unwrap());
    assert!(is_accept(&p.offer("sender-name.bin", data.len() as u64, sha256(&data))));
    assert_eq!(p.answer(), Answer::Send { offset: 0 });
    p.body(0);
    p.data(&data[..cut]);
    drop(p);
    let (code, _, log) = rx.finish();
    assert_eq!(code, 3, "{log}");
    assert!(!target.exists(), "nothing under PATH before it is verified");
    // The same file offered again (under another name even) to the same -o PATH resumes.
    let rx = recv_to_path(&target, &[]);
    let mut p = RawPeer::greet(rx.addr.parse().unwrap());
    assert!(is_accept(&p.offer("another-name.bin", data.len() as u64, sha256(&data))));
    assert_eq!(p.answer(), Answer::Send { offset: cut as u64 }, "resumed where it stopped");
    p.body(0);
    p.data(&data[cut..]);
    match p.read().unwrap() {
        Message::FileVerdict(v) => assert_eq!(v.verdict, Verdict::Verified { name: "resumed.bin".into() }),
        other => panic!("{other:?}"),
    }
    let (code, _, log) = rx.finish();
    assert_eq!(code, 0, "{log}");
    assert!(std::fs::read(&target).unwrap() == data);
    assert_eq!(list(root.path()), vec!["resumed.bin"]);
}
