//! Resume after an interruption, three ways, on a 64 MiB file cut at half: the sender killed, the
//! receiver killed, the connection dropped by a proxy. Sending again moves only the rest, and
//! the file verifies. A partial of another version is not reused.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crate::util::{BIN, Receiver, random_bytes, send, source_file, test_cache_home};

const SIZE: usize = 64 << 20;
const CUT: u64 = 32 << 20;

/// A one-connection TCP proxy that counts the bytes it forwards from sender to receiver. With
/// `cut_at`, it forwards exactly that many, reports it is paused, waits to be released, then
/// drops both connections.
struct Proxy {
    addr: SocketAddr,
    forwarded: Arc<AtomicU64>,
    paused: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl Proxy {
    fn start(target: SocketAddr, cut_at: Option<u64>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new(AtomicU64::new(0));
        let (paused_tx, paused) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let count = Arc::clone(&forwarded);
        std::thread::spawn(move || {
            let (mut client_r, mut server_w) = crate::util::relay(&listener, target);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let done = count.load(Ordering::SeqCst);
                let n = cut_at.map_or(n, |c| n.min((c - done) as usize));
                if server_w.write_all(&buf[..n]).is_err() {
                    break;
                }
                count.fetch_add(n as u64, Ordering::SeqCst);
                if cut_at == Some(done + n as u64) {
                    let _ = paused_tx.send(());
                    let _ = release_rx.recv_timeout(Duration::from_secs(30));
                    break;
                }
            }
            let _ = server_w.shutdown(Shutdown::Both);
            let _ = client_r.shutdown(Shutdown::Both);
        });
        Proxy { addr, forwarded, paused, release }
    }

    fn wait_paused(&self) {
        self.paused.recv_timeout(Duration::from_secs(60)).expect("proxy never reached the cut");
    }
}

/// `xfer send` started in the background, through `to`.
fn spawn_sender(path: &std::path::Path, to: SocketAddr) -> std::process::Child {
    Command::new(BIN)
        .args(["send", "--quiet", "--insecure"])
        .arg(path)
        .arg(to.to_string())
        .env("XDG_CACHE_HOME", test_cache_home())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the receiver has written the first half of `big.bin` (less what its pipeline may
/// still hold), so that a kill lands mid-body.
fn wait_for_first_half(rx: &Receiver) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while rx.partial("big.bin").1 < CUT - (1 << 20) {
        assert!(Instant::now() < deadline, "receiver never wrote the first half");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `path` again through a counting proxy; checks it resumed past most of the cut, moved
/// only the rest, and stored the right bytes.
fn resend_and_check(rx: &Receiver, path: &std::path::Path, data: &[u8]) -> crate::util::Run {
    let counter = Proxy::start(rx.addr, None);
    let run = send(path, &counter.addr.to_string(), &[]).expect(0);
    let out = run.stdout();
    let offset: u64 = out
        .split("resumed at ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("did not resume\n{}", run.report()));
    // What crossed the wire but was not written yet (at most the one pipeline buffer being
    // filled, 1 MiB) when it was interrupted or killed is sent again; everything else is not.
    assert!((CUT - (2 << 20)..=CUT).contains(&offset), "resumed at {offset}, cut at {CUT}");
    let moved = counter.forwarded.load(Ordering::SeqCst);
    assert!(moved < SIZE as u64 - offset + (64 << 10), "moved {moved} bytes after resuming at {offset}");
    rx.assert_files(&["big.bin"]);
    assert!(std::fs::read(rx.dir.join("big.bin")).unwrap() == data, "resumed file differs");
    // The receiver's log says what arrived, not what was listed: about the half that was left.
    let line = rx.wait_log(&format!("(resumed at {offset} bytes)"));
    let line =
        line.lines().rfind(|l| l.contains(&format!("(resumed at {offset} bytes)"))).unwrap().to_string();
    let received: f64 = line
        .split("\"big.bin\" (64.0 MiB): ")
        .nth(1)
        .and_then(|t| t.split(" MiB received").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size received in {line}"));
    assert!((30.0..=34.0).contains(&received), "{line}");
    run
}

#[test]
fn resume_after_the_sender_is_killed() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(SIZE, 21);
    let (_src, path) = source_file("big.bin", &data);
    let proxy = Proxy::start(rx.addr, Some(CUT));
    let mut sender = spawn_sender(&path, proxy.addr);
    proxy.wait_paused();
    // The sender hashes the file on its own while the body waits at the proxy, and caches the
    // digest as soon as it has it: wait for that, then kill it.
    let digest = crate::util::sha256(&data).to_hex();
    let cache = test_cache_home().join("xfer").join("digests-v1");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&cache).unwrap_or_default().contains(&digest) {
        assert!(Instant::now() < deadline, "the digest never reached the cache");
        std::thread::sleep(Duration::from_millis(20));
    }
    sender.kill().unwrap();
    sender.wait().unwrap();
    proxy.release.send(()).unwrap();
    rx.wait_log("\"big.bin\"");
    rx.assert_files_and_partial(&[], "big.bin");
    let run = resend_and_check(&rx, &path, &data);
    // The killed send had hashed the file: its digest was saved then, so the retry offers it up
    // front (and resumes the partial its first attempt left, found by the version tag).
    assert!(run.stdout().contains("(cached)"), "{}", run.report());
}

#[test]
fn resume_after_the_receiver_is_killed() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(SIZE, 22);
    let (_src, path) = source_file("big.bin", &data);
    let proxy = Proxy::start(rx.addr, Some(CUT));
    let mut sender = spawn_sender(&path, proxy.addr);
    proxy.wait_paused();
    // Let the receiver write what it has, then kill it mid-transfer.
    wait_for_first_half(&rx);
    let (root, dir) = rx.kill_and_keep_dir();
    proxy.release.send(()).unwrap();
    assert_eq!(sender.wait().unwrap().code(), Some(3), "the sender reports the lost connection");
    let rx = Receiver::start_in(root, dir, &["--quiet"]);
    resend_and_check(&rx, &path, &data);
}

#[test]
fn resume_after_the_connection_drops() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(SIZE, 23);
    let (_src, path) = source_file("big.bin", &data);
    let proxy = Proxy::start(rx.addr, Some(CUT));
    proxy.release.send(()).unwrap(); // drop as soon as the cut is reached
    let run = send(&path, &proxy.addr.to_string(), &[]).expect(3);
    assert!(run.stderr().contains("xfer: error: "), "{}", run.report());
    // The sender says what to do next.
    assert!(run.stderr().contains("sending the same files again resumes"), "{}", run.report());
    rx.wait_log("\"big.bin\"");
    rx.assert_files_and_partial(&[], "big.bin");
    resend_and_check(&rx, &path, &data);
}

#[test]
fn a_partial_of_another_version_is_not_reused() {
    let rx = Receiver::start(&["--quiet"]);
    let (_src, path) = source_file("big.bin", &random_bytes(SIZE, 24));
    let proxy = Proxy::start(rx.addr, Some(CUT));
    proxy.release.send(()).unwrap();
    send(&path, &proxy.addr.to_string(), &[]).expect(3);
    rx.wait_log("\"big.bin\"");
    rx.assert_files_and_partial(&[], "big.bin");
    // Same name and size, other content: starts from zero and stores the new version.
    let newer = random_bytes(SIZE, 25);
    std::fs::write(&path, &newer).unwrap();
    let run = send(&path, &rx.target(), &[]).expect(0);
    assert!(!run.stdout().contains("resumed"), "{}", run.report());
    rx.assert_files(&["big.bin"]);
    assert!(std::fs::read(rx.dir.join("big.bin")).unwrap() == newer);
}

#[test]
fn old_partials_are_swept_and_fresh_ones_kept() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dir");
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    let week_ago = std::time::SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    for (name, old) in [("old.bin", true), ("fresh.bin", false)] {
        let stem = xfer::store::stem_for(name);
        for suffix in [".part", ".meta"] {
            let f = std::fs::File::create(dir.join(format!("{stem}{suffix}"))).unwrap();
            f.set_len(10).unwrap();
            if old {
                f.set_modified(week_ago).unwrap();
            }
        }
    }
    // An old partial of a batch, in a subfolder.
    let deep = dir.join("sub/deeper").join(format!("{}.part", xfer::store::stem_for("deep.bin")));
    std::fs::File::create(&deep).unwrap().set_modified(week_ago).unwrap();
    let rx = Receiver::start_in(root, dir, &[]);
    rx.wait_log("removed 2 partial file(s) older than --keep-partials");
    rx.assert_files_and_partial(&["sub"], "fresh.bin");
    assert!(!deep.exists());
}

#[test]
fn a_batch_resumes_its_large_file() {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("batch");
    std::fs::create_dir_all(tree.join("small")).unwrap();
    let big = random_bytes(16 << 20, 26);
    std::fs::write(tree.join("big.bin"), &big).unwrap();
    for i in 0..50 {
        std::fs::write(tree.join("small").join(format!("s{i:02}")), random_bytes(100 + i, i as u64)).unwrap();
    }
    let rx = Receiver::start(&["--quiet"]);
    // Cut inside big.bin, the first body of the batch.
    let proxy = Proxy::start(rx.addr, Some(8 << 20));
    proxy.release.send(()).unwrap();
    let cut = send(&tree, &proxy.addr.to_string(), &[]);
    assert_ne!(cut.code(), 0, "{}", cut.report());
    rx.wait_log("batch of");
    assert!(!rx.dir.join("batch/big.bin").exists(), "no final name for an unfinished file");

    let run = send(&tree, &rx.target(), &[]).expect(0);
    let out = run.stdout();
    let resumed: u64 = out
        .split("resumed past ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the batch did not resume\n{}", run.report()));
    assert!(resumed > 6 << 20, "resumed past only {resumed} bytes");
    assert!(std::fs::read(rx.dir.join("batch/big.bin")).unwrap() == big);
    assert_eq!(std::fs::read_dir(rx.dir.join("batch/small")).unwrap().count(), 50);
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn ctrl_c_on_the_sender_exits_130_and_sending_again_resumes() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(SIZE, 27);
    let (_src, path) = source_file("big.bin", &data);
    let proxy = Proxy::start(rx.addr, Some(CUT));
    let sender = Command::new(BIN)
        .args(["send", "--insecure"])
        .arg(&path)
        .arg(proxy.addr.to_string())
        .env("XDG_CACHE_HOME", test_cache_home())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    proxy.wait_paused();
    signal(sender.id(), "-INT");
    let out = sender.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("xfer: interrupted"), "{stderr}");
    assert!(out.stdout.is_empty(), "no summary for an interrupted send");
    proxy.release.send(()).unwrap();
    rx.wait_log("\"big.bin\"");
    rx.assert_files_and_partial(&[], "big.bin");
    resend_and_check(&rx, &path, &data);
}

#[test]
fn a_receiver_stops_quietly_when_idle_and_with_130_keeping_only_the_partial_mid_body() {
    // An idle receiver (no transfer under way, an idle connection at most): SIGTERM or Ctrl-C
    // stop it quietly with 0.
    for sig in ["-TERM", "-INT"] {
        let mut idle = Receiver::start(&["--quiet"]);
        let _conn = TcpStream::connect(idle.addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        signal(idle.child.id(), sig);
        assert_eq!(idle.wait_exit(), 0, "{sig}");
        let said = idle.stderr();
        assert!(!said.contains("terminated") && !said.contains("interrupted"), "an idle stop said: {said}");
    }
    // A receiver in the middle of a body: Ctrl-C, 130, no final name, the partial kept.
    let mut rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(SIZE, 28);
    let (_src, path) = source_file("big.bin", &data);
    let proxy = Proxy::start(rx.addr, Some(CUT));
    let mut sender = spawn_sender(&path, proxy.addr);
    proxy.wait_paused();
    wait_for_first_half(&rx);
    signal(rx.child.id(), "-INT");
    assert_eq!(rx.wait_exit(), 130);
    assert!(rx.stderr().contains("xfer: interrupted"), "{}", rx.stderr());
    rx.assert_files_and_partial(&[], "big.bin");
    proxy.release.send(()).unwrap();
    assert_ne!(sender.wait().unwrap().code(), Some(0));
    let (root, dir) = rx.kill_and_keep_dir();
    let rx = Receiver::start_in(root, dir, &["--quiet"]);
    resend_and_check(&rx, &path, &data);
}

#[test]
fn a_second_ctrl_c_exits_at_once_when_the_first_cannot_finish() {
    // A receiver whose stderr is a one-page pipe that nobody reads: once its log lines fill it,
    // writing "interrupted" blocks, so the first Ctrl-C cannot finish.
    let (read_end, write_end) = rustix::pipe::pipe().unwrap();
    rustix::pipe::fcntl_setpipe_size(&write_end, 4096).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args([
                "recv",
                "--insecure",
                "--listen",
                "127.0.0.1:0",
                "--quiet",
                "--max-transfers",
                "1",
                "--dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(write_end))
            .spawn()
            .unwrap(),
    );
    let child = &mut child.0;
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first)
        .unwrap();
    let addr: SocketAddr = first.trim().strip_prefix("listening on ").unwrap().parse().unwrap();
    // A transfer under way (a stop with none is quiet and cannot block), and an idle connection:
    // they take this address's share; each further one is refused with a log line of ~90 bytes.
    // 100 of them are two pages.
    let data = random_bytes(1000, 9);
    let mut busy = crate::util::RawPeer::greet(addr);
    assert!(crate::util::is_accept(&busy.offer("busy.bin", 1000, crate::util::sha256(&data))));
    assert_eq!(busy.answer(), xfer::protocol::Answer::Send { offset: 0 });
    busy.body(0);
    busy.data(&data[..500]);
    let _idle = TcpStream::connect(addr).unwrap();
    for _ in 0..100 {
        let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(200));
    }
    // Wait until the pipe is full (a ~90-byte line no longer fits), however slow the host is.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rustix::io::ioctl_fionread(&read_end).unwrap() < 4096 - 100 {
        assert!(Instant::now() < deadline, "the receiver's stderr never filled");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(child.id(), "-INT");
    std::thread::sleep(Duration::from_secs(1));
    let first_finished = child.try_wait().unwrap().is_some();
    let start = Instant::now();
    signal(child.id(), "-INT");
    let ended = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if start.elapsed() > Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!first_finished, "the first Ctrl-C finished: the test did not block stderr");
    assert_eq!(ended, Some(130), "a second Ctrl-C did not end the receiver within 5 s");
    drop(read_end);
}

/// A child process killed (if still running) when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_resume_needs_room_only_for_the_rest() {
    // A 30 MiB file into a 40 MiB disk, cut after 22 MiB: 18 MiB free is enough for the 8 MiB
    // still missing. Before, the whole size was reserved again and the resend was refused.
    let disk = crate::util::SmallDisk::mount("40m");
    let dir = disk.0.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let root = tempfile::tempdir().unwrap();
    let rx = Receiver::start_in(root, dir, &["--quiet"]);
    let data = random_bytes(30 << 20, 12);
    let (_src, path) = source_file("big", &data);
    // The first attempt, as the real sender would make it (the same version tag), cut short.
    let tag = xfer::cache::Stamp::of(&std::fs::metadata(&path).unwrap()).tag();
    let mut p = crate::util::RawPeer::greet(rx.addr);
    let mut entry = crate::util::file_entry(&["big"], data.len() as u64);
    entry.kind = xfer::protocol::EntryKind::File {
        size: data.len() as u64,
        hash: xfer::protocol::HashAlg::Sha256,
        tag,
    };
    p.manifest(vec![entry]);
    assert!(crate::util::is_accept(&p.read().unwrap()));
    assert_eq!(p.answer(), xfer::protocol::Answer::Send { offset: 0 });
    p.body(0);
    for chunk in data[..22 << 20].chunks(1 << 20) {
        p.data(chunk);
    }
    p.stream.shutdown(Shutdown::Write).unwrap();
    let _ = p.read();
    drop(p);
    rx.wait_log("\"big\"");
    assert_eq!(rx.partial("big").1, 22 << 20);
    let run = send(&path, &rx.target(), &[]).expect(0);
    assert!(run.stdout().contains(&format!("resumed at {} bytes", 22 << 20)), "{}", run.report());
    assert!(std::fs::read(rx.dir.join("big")).unwrap() == data);
}
