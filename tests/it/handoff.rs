//! One read of a file for its digest and its body (`send::handoff`): on a secure first send the
//! hashing thread hashes what a large file's body reads; a small file's body is sent from the
//! bytes the hashing thread read. Each file is read once; a receiver that waits for the digest
//! still gets it; a file changed while it is read is still never stored.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use crate::secure::{Secure, send_file};
use crate::util::{random_bytes, source_file};

/// What the sender read: bytes (`rchar`: files and sockets) and read calls (`syscr`), and what it
/// printed. The sender runs under `sh`, which, once it has reaped it, counts the sender's reads
/// in its own `/proc/PID/io` (Linux adds a reaped child's I/O counts to its parent's).
fn send_counting_reads(
    cfg: &std::path::Path,
    path: &std::path::Path,
    to: &str,
    extra: &[&str],
    code: Option<&str>,
) -> (u64, u64, String) {
    let script = r#""$@"; status=$?; grep -E '^(rchar|syscr):' /proc/$$/io; exit $status"#;
    let (bin, f) = (crate::util::BIN, path.to_string_lossy().into_owned());
    let mut args = vec!["sh", "-c", script, "sh", bin, "send", &f, to, "--no-cache"];
    args.extend_from_slice(extra);
    let mut cmd = std::process::Command::new("env");
    cmd.args(args).env("XDG_CONFIG_HOME", cfg).env("XDG_CACHE_HOME", cfg).env_remove("XFER_CODE");
    if let Some(code) = code {
        cmd.env("XFER_CODE", code);
    }
    let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "sender failed: {stdout}\n{stderr}");
    let count = |key: &str| -> u64 {
        let line = stdout.lines().find_map(|l| l.strip_prefix(key)).expect("an I/O count line");
        line.trim().parse().unwrap()
    };
    (count("rchar:"), count("syscr:"), stdout)
}

#[test]
fn a_large_first_send_over_the_secure_channel_reads_the_file_once() {
    let s = Secure::start(&["--quiet"]);
    let cfg = tempfile::tempdir().unwrap();
    let size = 48 << 20;
    let data = random_bytes(size, 14);
    let (_src, path) = source_file("once.bin", &data);
    let (read, _, said) = send_counting_reads(cfg.path(), &path, &s.rx.target(), &[], Some(&s.code()));
    assert_eq!(std::fs::read(s.rx.dir.join("once.bin")).unwrap(), data);
    // Once for the body (which the hashing thread hashes), plus what came from the receiver
    // and the keys: far below two reads of the file.
    assert!(read < size as u64 + (size as u64) / 4, "read {read} bytes for a {size}-byte file\n{said}");
}

#[test]
fn a_receiver_that_waits_for_the_digest_of_a_large_file_gets_it() {
    // A different file of the same size under the name: the receiver needs the digest before it
    // answers, while the sender's hashing thread keeps the file for its body. After a short wait
    // the hashing thread reads it itself, and the file arrives beside the other one.
    let s = Secure::start(&["--quiet"]);
    let size = 8 << 20;
    std::fs::write(s.rx.dir.join("same.bin"), random_bytes(size, 1)).unwrap();
    let data = random_bytes(size, 2);
    let (_src, path) = source_file("same.bin", &data);
    let cfg = tempfile::tempdir().unwrap();
    let env = [("XFER_CODE", s.code())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = send_file(cfg.path(), &path, &s.rx.target(), &["--no-cache", "--timeout", "5"], &env).expect(0);
    assert!(run.elapsed < Duration::from_secs(5), "took {:?}\n{}", run.elapsed, run.report());
    assert_eq!(s.rx.files(), ["same (1).bin", "same.bin"]);
    assert_eq!(std::fs::read(s.rx.dir.join("same (1).bin")).unwrap(), data);
    // And sent again: the receiver has it now, which only the digest can tell.
    let run = send_file(cfg.path(), &path, &s.rx.target(), &["--no-cache", "--timeout", "5"], &env).expect(0);
    assert!(run.stdout().contains("already"), "{}", run.report());
    assert_eq!(s.rx.files(), ["same (1).bin", "same.bin"]);
}

/// A proxy to `to` that passes the first `pass` bytes from the sender, then holds the rest until
/// `go` says so (saying on `paused` that it holds), and passes everything else as it comes.
fn holding_proxy(to: String, pass: u64) -> (String, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (paused_tx, paused) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut from_tx, mut to_rx) = crate::util::relay(&listener, to.parse().expect("an address"));
        let mut buf = vec![0u8; 64 * 1024];
        let mut moved = 0u64;
        let mut held = false;
        loop {
            let want = if held { buf.len() } else { buf.len().min((pass - moved) as usize).max(1) };
            let n = match from_tx.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to_rx.write_all(&buf[..n]).is_err() {
                break;
            }
            moved += n as u64;
            if !held && moved >= pass {
                held = true;
                paused_tx.send(()).unwrap();
                let _ = go_rx.recv_timeout(Duration::from_secs(20));
            }
        }
        let _ = to_rx.shutdown(Shutdown::Write);
    });
    (addr, paused, go)
}

#[test]
fn a_large_file_changed_while_its_body_is_read_is_never_stored() {
    // The body is read once and hashed as it goes: the check after the body must still keep the
    // receiver from storing a file that changed while it was read.
    let s = Secure::start(&["--quiet"]);
    let size = 64 << 20;
    let data = random_bytes(size, 3);
    let (_src, path) = source_file("growing.log", &data);
    // Held after 4 MiB of the sender's bytes (the handshake and manifest are far less): the body
    // is on its way and the end of the file not read yet.
    let (addr, paused, go) = holding_proxy(s.rx.target(), 4 << 20);
    let cfg = tempfile::tempdir().unwrap();
    let code = s.code();
    let sender = {
        let (path, cfg) = (path.clone(), cfg.path().to_path_buf());
        std::thread::spawn(move || {
            send_file(&cfg, &path, &addr, &["--no-cache", "--timeout", "10"], &[("XFER_CODE", &code)])
        })
    };
    paused.recv_timeout(Duration::from_secs(20)).expect("the proxy held the body");
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(size as u64 - 100)).unwrap();
    f.write_all(b"changed while sending").unwrap();
    drop(f);
    go.send(()).unwrap();
    let run = sender.join().unwrap().expect(5);
    assert!(run.stderr().contains("changed while it was being sent"), "{}", run.report());
    // Nothing under the name, and the receiver says why.
    s.rx.wait_log("growing.log");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!s.rx.dir.join("growing.log").exists(), "stored: {:?}\n{}", s.rx.files(), s.rx.stderr());
}

#[test]
fn small_files_are_opened_and_read_once() {
    // 300 files of 1 byte to 16 KiB: the hashing thread reads each in one call and keeps it for
    // its body (it used to read each twice, once more to see the end, and the body once again).
    let rx = crate::util::Receiver::start(&[]);
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("small");
    std::fs::create_dir(&tree).unwrap();
    let mut total = 0;
    for i in 0..300u64 {
        let data = random_bytes(1 + (i as usize * 7919) % (16 << 10), i);
        total += data.len() as u64;
        std::fs::write(tree.join(format!("f{i:03}")), data).unwrap();
    }
    let cfg = tempfile::tempdir().unwrap();
    let (read, calls, said) = send_counting_reads(cfg.path(), &tree, &rx.target(), &["--insecure"], None);
    for i in 0..300u64 {
        let want = random_bytes(1 + (i as usize * 7919) % (16 << 10), i);
        assert_eq!(std::fs::read(rx.dir.join(format!("small/f{i:03}"))).unwrap(), want);
    }
    // One read call a file, and a few for the rest (keys, the receiver's messages).
    assert!(calls < 300 + 100, "{calls} read calls for 300 files\n{said}");
    assert!(read < total + total / 4, "read {read} bytes of files holding {total}\n{said}");
}
