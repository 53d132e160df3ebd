//! The secure channel: pairing with a code, pinned keys after that, and everything an attacker
//! on the path or at the port can try: wrong codes, downgrades, flipped, replayed and reordered
//! bytes, a relay that runs its own handshakes, a receiver whose key changed, and the code kept
//! out of argv, stdout, stderr and logs.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::{BIN, Receiver, Run, random_bytes, source_file, test_cache_home};
use xfer::code::Code;
use xfer::protocol::{self, FrameKind};
use xfer::transport::handshake::{self, Random};

/// A receiver that requires a code, written by it to `code` (mode 0600) at start.
pub(crate) struct Secure {
    pub rx: Receiver,
    pub code: PathBuf,
}

impl Secure {
    pub fn start(extra: &[&str]) -> Secure {
        Secure::start_on("127.0.0.1:0", None, extra)
    }

    /// On `listen`, with its keys in `config` (a fresh folder when `None`).
    fn start_on(listen: &str, config: Option<&Path>, extra: &[&str]) -> Secure {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        let code = root.path().join("code");
        let code_s = code.to_string_lossy().into_owned();
        let config = config.map_or_else(|| root.path().join("config"), Path::to_path_buf);
        let config_s = config.to_string_lossy().into_owned();
        let mut args = vec!["--code-file", code_s.as_str(), "--listen", listen];
        args.extend_from_slice(extra);
        let rx = Receiver::start_with(root, dir, &args, &[("XDG_CONFIG_HOME", config_s.as_str())]);
        Secure { rx, code }
    }

    pub fn code(&self) -> String {
        // The code's line; a comment line under it says xfer made it up.
        let text = std::fs::read_to_string(&self.code).unwrap();
        text.lines().next().unwrap_or("").trim().to_string()
    }
}

/// Runs `xfer` as a sender of its own (keys in `config`), with no terminal, `envs` set and
/// nothing added to `args`.
fn run(config: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
    let start = Instant::now();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("XDG_CACHE_HOME", test_cache_home())
        .env("XDG_CONFIG_HOME", config)
        .env_remove("XFER_CODE")
        .envs(envs.iter().copied())
        .stdin(Stdio::null());
    // No controlling terminal: a prompt for the code has nowhere to go, as in CI.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    Run { out, cmd: format!("xfer {}", args.join(" ")), elapsed: start.elapsed() }
}

pub(crate) fn send_file(config: &Path, file: &Path, to: &str, extra: &[&str], envs: &[(&str, &str)]) -> Run {
    let f = file.to_string_lossy().into_owned();
    let mut args = vec!["send", f.as_str(), to];
    args.extend_from_slice(extra);
    run(config, &args, envs)
}

fn config() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn a_file_and_a_tree_arrive_with_the_code() {
    let s = Secure::start(&["--quiet"]);
    let cfg = config();
    let data = random_bytes(3 << 20, 1);
    let (_src, path) = source_file("secret.bin", &data);
    let code = s.code.to_string_lossy().into_owned();
    send_file(cfg.path(), &path, &s.rx.target(), &["--code-file", &code], &[]).expect(0);
    assert_eq!(std::fs::read(s.rx.dir.join("secret.bin")).unwrap(), data);
    // A tree, the code in XFER_CODE in capitals with spaces: people type codes many ways.
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("t");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    for i in 0..20 {
        std::fs::write(tree.join("sub").join(format!("f{i}")), random_bytes(i * 1000, i as u64)).unwrap();
    }
    let shouted = s.code().replace('-', " ").to_uppercase();
    send_file(cfg.path(), &tree, &s.rx.target(), &[], &[("XFER_CODE", &shouted)]).expect(0);
    for i in 0..20 {
        let got = std::fs::read(s.rx.dir.join("t/sub").join(format!("f{i}"))).unwrap();
        assert_eq!(got, random_bytes(i * 1000, i as u64));
    }
}

#[test]
fn a_wrong_code_is_exit_8_one_guess_and_the_receiver_keeps_serving() {
    let s = Secure::start(&["--quiet"]);
    let (_src, path) = source_file("f", b"payload");
    let wrong = Code::generate();
    let cfg = config();
    let run = send_file(cfg.path(), &path, &s.rx.target(), &[], &[("XFER_CODE", wrong.expose())]).expect(8);
    assert!(run.stderr().contains("wrong code"), "{}", run.report());
    s.rx.wait_log("wrong code");
    assert!(s.rx.files().is_empty(), "{:?}", s.rx.files());
    // Not pinned: a receiver that did not prove the code is not remembered.
    assert!(
        !cfg.path().join("xfer/known-receivers").exists() || {
            std::fs::read_to_string(cfg.path().join("xfer/known-receivers")).unwrap().is_empty()
        }
    );
    send_file(cfg.path(), &path, &s.rx.target(), &[], &[("XFER_CODE", &s.code())]).expect(0);
    assert_eq!(std::fs::read(s.rx.dir.join("f")).unwrap(), b"payload");
}

#[test]
fn a_typo_is_caught_before_connecting() {
    // Nothing listens there: a typo must be exit 2 (usage), not 3 (connection).
    let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (_src, path) = source_file("f", b"x");
    let cfg = config();
    let run = send_file(cfg.path(), &path, &free, &[], &[("XFER_CODE", "acid-zzzzq-acid-acid")]).expect(2);
    assert!(run.stderr().contains("word 2"), "{}", run.report());
    let run = send_file(cfg.path(), &path, &free, &[], &[("XFER_CODE", "acid acid")]).expect(2);
    assert!(run.stderr().contains("4 words"), "{}", run.report());
    // And no code at all, with no terminal to ask on: exit 2 saying how to give one.
    let run = send_file(cfg.path(), &path, &free, &[], &[]).expect(2);
    assert!(run.stderr().contains("XFER_CODE"), "{}", run.report());
}

#[test]
fn neither_side_falls_back_to_plaintext() {
    let s = Secure::start(&["--quiet"]);
    let (_src, path) = source_file("f", b"x");
    let cfg = config();
    let run = send_file(cfg.path(), &path, &s.rx.target(), &["--insecure"], &[]).expect(8);
    assert!(run.stderr().contains("without --insecure"), "{}", run.report());
    s.rx.wait_log("accepts only encrypted");
    let plain = Receiver::start(&["--quiet"]);
    let run = send_file(cfg.path(), &path, &plain.target(), &[], &[("XFER_CODE", &s.code())]).expect(8);
    assert!(run.stderr().contains("runs with --insecure"), "{}", run.report());
    plain.wait_log("runs with --insecure");
    assert!(s.rx.files().is_empty() && plain.files().is_empty());
}

/// A relay between a sender and `target` that forwards both ways and keeps what it saw. With
/// `flip`, the byte at that offset of the sender's stream is XORed with 0x01 on the way.
struct Relay {
    addr: SocketAddr,
    up: Arc<Mutex<Vec<u8>>>,
    down: Arc<Mutex<Vec<u8>>>,
}

fn relay(target: SocketAddr, flip: Option<usize>) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (up, down) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let (up2, down2) = (Arc::clone(&up), Arc::clone(&down));
    std::thread::spawn(move || {
        let Ok((client, _)) = listener.accept() else { return };
        let server = TcpStream::connect(target).unwrap();
        let pump =
            |mut from: TcpStream, mut to: TcpStream, seen: Arc<Mutex<Vec<u8>>>, flip: Option<usize>| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut seen = seen.lock().unwrap();
                        let at = seen.len();
                        if let Some(f) = flip.filter(|f| (at..at + n).contains(f)) {
                            buf[f - at] ^= 0x01;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        drop(seen);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                })
            };
        let a = pump(client.try_clone().unwrap(), server.try_clone().unwrap(), up2, flip);
        let b = pump(server, client, down2, None);
        let _ = (a.join(), b.join());
    });
    Relay { addr, up, down }
}

#[test]
fn a_forwarding_relay_sees_no_name_content_digest_or_code() {
    let s = Secure::start(&["--quiet"]);
    let data = random_bytes(1 << 20, 7);
    let (_src, path) = source_file("password=hunter2.txt", &data);
    let r = relay(s.rx.addr, None);
    let cfg = config();
    let run = send_file(cfg.path(), &path, &r.addr.to_string(), &[], &[("XFER_CODE", &s.code())]).expect(0);
    assert_eq!(std::fs::read(s.rx.dir.join("password=hunter2.txt")).unwrap(), data);
    std::thread::sleep(Duration::from_millis(200));
    let capture = [r.up.lock().unwrap().clone(), r.down.lock().unwrap().clone()].concat();
    assert!(capture.len() > data.len(), "the relay carried the transfer");
    let contains = |needle: &[u8]| capture.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(b"hunter2"), "a file name in the clear");
    for window in data.chunks(32).step_by(97) {
        assert!(!contains(window), "file content in the clear");
    }
    let digest = crate::util::sha256(&data);
    assert!(!contains(&digest.0), "the digest in the clear");
    assert!(!contains(digest.to_hex().as_bytes()));
    for word in s.code().split('-') {
        assert!(!contains(word.as_bytes()), "a code word in the clear");
    }
    assert!(run.stdout().contains("verified"), "{}", run.report());
}

/// Where a flip lands: offsets into the sender's stream.
fn flip_offsets(capture: &[u8]) -> Vec<(usize, &'static str)> {
    let hello = protocol::HELLO_LEN;
    // After the hello: the first handshake frame (header, mode, A, m1), m3's frame, then records.
    let hs1 = hello + protocol::FRAME_HEADER_LEN;
    let hs1_len = u32::from_be_bytes(capture[hello..hello + 4].try_into().unwrap()) as usize;
    let m3 = hs1 + hs1_len;
    let m3_len = u32::from_be_bytes(capture[m3..m3 + 4].try_into().unwrap()) as usize;
    let rec = m3 + protocol::FRAME_HEADER_LEN + m3_len;
    assert_eq!(capture[rec + 4], FrameKind::Record as u8, "records follow the handshake");
    // The start of the last record, and of the first one past the middle: a full record of the
    // body, whether the digest's record comes before the body or after it (a run's layout may
    // differ from the clean run's by where that small record falls, never by more).
    let (mut last, mut deep) = (rec, None);
    loop {
        let len = u32::from_be_bytes(capture[last..last + 4].try_into().unwrap()) as usize;
        let next = last + protocol::FRAME_HEADER_LEN + len;
        if next >= capture.len() {
            break;
        }
        last = next;
        if deep.is_none() && last > capture.len() / 2 {
            deep = Some(last);
        }
    }
    let deep = deep.expect("a body of several records");
    vec![
        (3, "the hello's magic"),
        (9, "the hello's version"),
        (hs1, "the mode byte (code to insecure)"),
        (hs1 + 5, "the SPAKE2 message"),
        (hs1 + 1 + handshake::SPAKE_LEN + 3, "m1"),
        (m3 + protocol::FRAME_HEADER_LEN + 10, "m3"),
        (rec + 2, "a record's length"),
        (rec + 4, "a record's kind"),
        (rec + 40, "a record's ciphertext"),
        (deep + protocol::FRAME_HEADER_LEN + 100, "deep in a record of the body"),
        (last + protocol::FRAME_HEADER_LEN + 3, "the last record"),
    ]
}

#[test]
fn a_flipped_byte_anywhere_is_never_success_and_the_next_send_resumes() {
    let s = Secure::start(&["--quiet"]);
    let data = random_bytes(4 << 20, 3);
    let (_src, path) = source_file("f.bin", &data);
    let cfg = config();
    let code = s.code();
    let env = [("XFER_CODE", code.as_str())];
    // A clean run through the relay learns where things are.
    let clean = relay(s.rx.addr, None);
    send_file(cfg.path(), &path, &clean.addr.to_string(), &["--no-cache"], &env).expect(0);
    std::thread::sleep(Duration::from_millis(200));
    let capture = clean.up.lock().unwrap().clone();
    std::fs::remove_file(s.rx.dir.join("f.bin")).unwrap();
    let offsets = flip_offsets(&capture);
    for &(at, what) in &offsets {
        // Each run starts from nothing, so the stream has the layout the clean run had.
        for f in s.rx.files() {
            std::fs::remove_file(s.rx.dir.join(f)).unwrap();
        }
        let r = relay(s.rx.addr, Some(at));
        let run = send_file(cfg.path(), &path, &r.addr.to_string(), &["--no-cache"], &env);
        assert_ne!(run.code(), 0, "flipping {what} (byte {at}) went unnoticed:\n{}", run.report());
        assert!([3, 7, 8].contains(&run.code()), "flipping {what}: {}", run.report());
        // Nothing under its final name; what a partial holds was authenticated.
        assert!(!s.rx.dir.join("f.bin").exists(), "flipping {what}: stored");
        for f in s.rx.files().iter().filter(|f| f.ends_with(".part")) {
            let held = std::fs::read(s.rx.dir.join(f)).unwrap();
            assert_eq!(held[..], data[..held.len()], "flipping {what}: a partial holds forged bytes");
        }
    }
    // A flip deep in the body leaves a partial of authenticated bytes: the next send resumes it.
    for f in s.rx.files() {
        std::fs::remove_file(s.rx.dir.join(f)).unwrap();
    }
    let deep = offsets.iter().find(|o| o.1.starts_with("deep")).unwrap().0;
    let r = relay(s.rx.addr, Some(deep));
    let run = send_file(cfg.path(), &path, &r.addr.to_string(), &["--no-cache"], &env).expect(8);
    assert!(
        run.stderr().contains("tamper") || run.stderr().contains("did not authenticate"),
        "{}",
        run.report()
    );
    let run = send_file(cfg.path(), &path, &s.rx.target(), &[], &env).expect(0);
    assert!(run.stdout().contains("resumed at"), "{}", run.report());
    assert_eq!(std::fs::read(s.rx.dir.join("f.bin")).unwrap(), data, "{}", run.report());
}

#[test]
fn a_relay_running_its_own_handshakes_with_a_guessed_code_fails_on_both_sides() {
    let s = Secure::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = s.rx.addr;
    let mitm = std::thread::spawn(move || {
        let guess = Code::generate();
        let me = throwaway_identity();
        // Towards the sender: a receiver with the guessed code.
        let (mut c, _) = listener.accept().unwrap();
        protocol::write_hello(&mut c).unwrap();
        protocol::read_hello(&mut c).unwrap();
        let step1 = read_step(&mut c);
        let (state, step2) =
            handshake::receiver_code_start(&guess, &me, &step1, false, Random::System).unwrap();
        write_step(&mut c, &step2);
        let m3 = read_step(&mut c);
        let sender_side = state.finish(&m3).is_ok();
        // Towards the receiver: a sender with the guessed code.
        let mut srv = TcpStream::connect(target).unwrap();
        protocol::write_hello(&mut srv).unwrap();
        protocol::read_hello(&mut srv).unwrap();
        let (st, step1) = handshake::sender_code_start(&guess, &me, Random::System);
        write_step(&mut srv, &step1);
        let step2 = read_step(&mut srv);
        let (m3, _) = handshake::sender_code_reply(st, &step2).unwrap().finish();
        write_step(&mut srv, &m3);
        // It cannot seal records for the sender: it sends what it can, forged records.
        let mut forged = vec![0u8, 0, 0, 40, FrameKind::Record as u8];
        forged.extend_from_slice(&[0x55; 40]);
        let _ = c.write_all(&forged);
        std::thread::sleep(Duration::from_millis(500));
        sender_side
    });
    let (_src, path) = source_file("f", b"secret");
    let cfg = config();
    let run = send_file(cfg.path(), &path, &addr.to_string(), &[], &[("XFER_CODE", &s.code())]).expect(8);
    assert!(run.stderr().contains("tampering"), "{}", run.report());
    assert!(!mitm.join().unwrap(), "the relay's guess opened the sender's m3");
    s.rx.wait_log("wrong code");
    assert!(s.rx.files().is_empty());
}

/// A key pair made for one test and forgotten.
fn throwaway_identity() -> xfer::trust::Identity {
    let dir = tempfile::tempdir().unwrap();
    xfer::trust::TrustStore::at(&dir.path().join("k")).identity().unwrap()
}

fn read_step(s: &mut TcpStream) -> Vec<u8> {
    let h = protocol::read_frame_header(s).unwrap();
    assert_eq!(h.kind, FrameKind::Handshake);
    let mut b = vec![0u8; h.len as usize];
    s.read_exact(&mut b).unwrap();
    b
}

fn write_step(s: &mut TcpStream, step: &[u8]) {
    protocol::write_frame_header(s, FrameKind::Handshake, step.len() as u32).unwrap();
    s.write_all(step).unwrap();
}

#[test]
fn the_code_is_in_no_argv_output_or_log() {
    let s = Secure::start(&[]);
    let code = s.code();
    let (_src, path) = source_file("f", b"x");
    let cfg = config();
    let runs = [
        send_file(cfg.path(), &path, &s.rx.target(), &[], &[("XFER_CODE", &code)]),
        send_file(config().path(), &path, &s.rx.target(), &[], &[("XFER_CODE", Code::generate().expose())]),
        send_file(cfg.path(), &path, "127.0.0.1:1", &[], &[("XFER_CODE", &code)]),
    ];
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", s.rx.child.id())).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let log = s.rx.stderr();
    for word in code.split('-') {
        for run in &runs {
            assert!(!run.stdout().contains(word) && !run.stderr().contains(word), "{}", run.report());
        }
        assert!(!log.contains(word), "the code in the receiver's log:\n{log}");
        assert!(!String::from_utf8_lossy(&cmdline).contains(word));
    }
    // No option puts a code on the command line.
    let r = run(cfg.path(), &["send", "--code", &code, "f", "h:1"], &[]);
    assert_eq!(r.code(), 2, "{}", r.report());
    let r = run(cfg.path(), &["recv", "--code", &code], &[]);
    assert_eq!(r.code(), 2, "{}", r.report());
}

#[test]
fn rekeying_crosses_many_keys_and_a_peer_one_record_late_fails() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let code = Code::generate();
    let envs = [("XFER_CODE", code.expose()), ("XFER_TEST_REKEY_RECORDS", "3")];
    let rx = Receiver::start_with(root, dir, &["--quiet"], &envs);
    let data = random_bytes(6 << 20, 11);
    let (_src, path) = source_file("r.bin", &data);
    let cfg = config();
    send_file(cfg.path(), &path, &rx.target(), &["--no-cache"], &envs).expect(0);
    assert_eq!(std::fs::read(rx.dir.join("r.bin")).unwrap(), data);
    let (_src2, path2) = source_file("late.bin", &data);
    let late = [("XFER_CODE", code.expose()), ("XFER_TEST_REKEY_RECORDS", "4")];
    let run = send_file(cfg.path(), &path2, &rx.target(), &["--no-cache"], &late);
    assert_ne!(run.code(), 0, "{}", run.report());
    assert!(!rx.dir.join("late.bin").exists());
}

#[test]
fn wrong_codes_are_rate_limited_and_aborted_handshakes_cost_nothing() {
    let s = Secure::start(&["--quiet"]);
    // Twenty handshakes that stop after their first step: no guess was made.
    for _ in 0..20 {
        let mut c = TcpStream::connect(s.rx.addr).unwrap();
        protocol::write_hello(&mut c).unwrap();
        protocol::read_hello(&mut c).unwrap();
        let me = throwaway_identity();
        let (_, step1) = handshake::sender_code_start(&Code::generate(), &me, Random::System);
        write_step(&mut c, &step1);
        let _ = read_step(&mut c);
    }
    let (_src, path) = source_file("f", b"x");
    let cfg = config();
    let wrong =
        || send_file(cfg.path(), &path, &s.rx.target(), &[], &[("XFER_CODE", Code::generate().expose())]);
    // One address gets three guesses in a burst; the fourth is turned away unchecked.
    for _ in 0..3 {
        wrong().expect(8);
    }
    let run = wrong().expect(4);
    assert!(run.stderr().contains("too many wrong codes"), "{}", run.report());
}

#[test]
fn pairing_once_with_remember_then_no_code() {
    let s = Secure::start(&["--quiet", "--remember"]);
    let cfg = config();
    let (_src, path) = source_file("a", b"first");
    send_file(cfg.path(), &path, &s.rx.target(), &[], &[("XFER_CODE", &s.code())]).expect(0);
    // No code, no terminal: the pinned key is enough.
    let (_src2, path2) = source_file("b", b"second");
    let run = send_file(cfg.path(), &path2, &s.rx.target(), &[], &[]).expect(0);
    assert_eq!(std::fs::read(s.rx.dir.join("b")).unwrap(), b"second", "{}", run.report());
    let list = run_ok(cfg.path(), &["trust", "list"]);
    assert!(list.contains(&s.rx.target()) && list.contains("no code needed"), "{list}");
}

fn run_ok(cfg: &Path, args: &[&str]) -> String {
    run(cfg, args, &[]).expect(0).stdout()
}

#[test]
fn a_receiver_that_does_not_remember_asks_every_time() {
    let s = Secure::start(&["--quiet"]);
    let cfg = config();
    let (_src, path) = source_file("a", b"first");
    send_file(cfg.path(), &path, &s.rx.target(), &[], &[("XFER_CODE", &s.code())]).expect(0);
    let run = send_file(cfg.path(), &path, &s.rx.target(), &[], &[]).expect(2);
    assert!(run.stderr().contains("needs its code"), "{}", run.report());
}

#[test]
fn a_changed_receiver_key_is_exit_8_until_forgotten() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let cfg = config();
    let (_src, path) = source_file("a", b"x");
    let first = Secure::start_on(&listen, None, &["--quiet", "--remember"]);
    send_file(cfg.path(), &path, &listen, &[], &[("XFER_CODE", &first.code())]).expect(0);
    drop(first);
    // The same address, another key (a reinstalled receiver, or someone else).
    let second = Secure::start_on(&listen, None, &["--quiet", "--remember"]);
    for env in [&[][..], &[("XFER_CODE", second.code().as_str())][..]] {
        let run = send_file(cfg.path(), &path, &listen, &[], env).expect(8);
        assert!(run.stderr().contains(&format!("xfer trust forget {listen}")), "{}", run.report());
    }
    assert!(second.rx.files().is_empty());
    run_ok(cfg.path(), &["trust", "forget", &listen]);
    send_file(cfg.path(), &path, &listen, &[], &[("XFER_CODE", &second.code())]).expect(0);
}

#[test]
fn a_forgotten_sender_must_pair_again() {
    let rcfg = config();
    let s = Secure::start_on("127.0.0.1:0", Some(rcfg.path()), &["--quiet", "--remember"]);
    let cfg = config();
    let (_src, path) = source_file("a", b"x");
    send_file(cfg.path(), &path, &s.rx.target(), &[], &[("XFER_CODE", &s.code())]).expect(0);
    let senders = std::fs::read_to_string(rcfg.path().join("xfer/trusted-senders")).unwrap();
    let key = senders.split_whitespace().next().unwrap().to_string();
    run_ok(rcfg.path(), &["trust", "forget", &key[..16]]);
    let (_src2, path2) = source_file("b", b"y");
    let run = send_file(cfg.path(), &path2, &s.rx.target(), &[], &[]).expect(2);
    assert!(run.stderr().contains("needs its code"), "{}", run.report());
    send_file(cfg.path(), &path2, &s.rx.target(), &[], &[("XFER_CODE", &s.code())]).expect(0);
}

#[test]
fn an_impostor_that_does_not_know_the_code_is_never_pinned() {
    // A fake receiver answers the code handshake with its own key, then refuses.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let me = throwaway_identity();
        let (mut c, _) = listener.accept().unwrap();
        protocol::write_hello(&mut c).unwrap();
        protocol::read_hello(&mut c).unwrap();
        let step1 = read_step(&mut c);
        let (_, step2) =
            handshake::receiver_code_start(&Code::generate(), &me, &step1, true, Random::System).unwrap();
        write_step(&mut c, &step2);
        let _ = read_step(&mut c);
        let reject = protocol::Reject { code: protocol::RejectCode::AuthFailed, reason: "no".into() };
        let _ = protocol::write_message(&mut c, &protocol::Message::Reject(reject));
        std::thread::sleep(Duration::from_millis(300));
    });
    let cfg = config();
    let (_src, path) = source_file("a", b"x");
    send_file(cfg.path(), &path, &addr, &[], &[("XFER_CODE", Code::generate().expose())]).expect(8);
    let pins = std::fs::read_to_string(cfg.path().join("xfer/known-receivers")).unwrap_or_default();
    assert!(pins.is_empty(), "an impostor was pinned: {pins}");
}

#[test]
fn a_receiver_with_nowhere_to_show_its_code_does_not_start() {
    let cfg = config();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().into_owned();
    let r = run(cfg.path(), &["recv", "--dir", &d, "--listen", "127.0.0.1:0"], &[]).expect(2);
    assert!(r.stderr().contains("--code-file"), "{}", r.report());
    // A code file others can read is not a secret.
    let code = dir.path().join("code");
    std::fs::write(&code, "acid acid acid acid").unwrap();
    let c = code.to_string_lossy().into_owned();
    let r =
        run(cfg.path(), &["recv", "--dir", &d, "--listen", "127.0.0.1:0", "--code-file", &c], &[]).expect(2);
    assert!(r.stderr().contains("chmod 600"), "{}", r.report());
}

/// Runs `cmd` under a pseudo-terminal (script(1)) with `input` typed into it.
fn under_pty(cmd: &str, input: &str, config: &Path) -> (i32, String) {
    let mut child = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .env("XDG_CONFIG_HOME", config)
        .env("XDG_CACHE_HOME", test_cache_home())
        .env_remove("XFER_CODE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    std::thread::spawn(move || {
        for line in input.lines() {
            std::thread::sleep(Duration::from_millis(400));
            let _ = writeln!(stdin, "{line}");
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn on_terminals_the_code_is_shown_asked_and_typos_asked_again() {
    // The receiver on a terminal shows a code; the first lines it prints are read from the pty.
    let rcfg = config();
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let recv_cmd =
        format!("{BIN} recv --dir {} --listen 127.0.0.1:{port} --once --remember", dir.path().display());
    let mut rx = Command::new("script")
        .args(["-qfec", &recv_cmd, "/dev/null"])
        .env("XDG_CONFIG_HOME", rcfg.path())
        .env_remove("XFER_CODE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = rx.stdout.take().unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        let mut buf = [0u8; 1024];
        let n = out.read(&mut buf).unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(rest) = seen.split("code for senders: ").nth(1)
            && let Some(code) = rest.split_whitespace().next().filter(|_| rest.contains("  "))
        {
            break code.to_string();
        }
        assert!(Instant::now() < deadline, "no code shown: {seen}");
    };
    let (_src, path) = source_file("typed.txt", b"typed at a prompt");
    let scfg = config();
    let send_cmd = format!("{BIN} send {} 127.0.0.1:{port}", path.display());
    let typo = "acid-zzzzq-acid-acid";
    let (status, shown) = under_pty(&send_cmd, &format!("{typo}\n{code}"), scfg.path());
    assert_eq!(status, 0, "{shown}");
    assert!(shown.contains("code shown by `xfer recv`") && shown.contains("word 2"), "{shown}");
    assert!(shown.contains("verified"), "{shown}");
    let _ = rx.wait();
    assert_eq!(std::fs::read(dir.path().join("typed.txt")).unwrap(), b"typed at a prompt");
    // Paired with a receiver that remembers: the next send (to a new one on the same config and
    // port) asks nothing.
    let recv_cmd2 =
        format!("{BIN} recv --dir {} --listen 127.0.0.1:{port} --once --remember", dir.path().display());
    let mut rx2 = Command::new("script")
        .args(["-qfec", &recv_cmd2, "/dev/null"])
        .env("XDG_CONFIG_HOME", rcfg.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let (_src2, path2) = source_file("again.txt", b"no code asked");
    let send2 = format!("{BIN} send {} 127.0.0.1:{port}", path2.display());
    let (status, shown) = under_pty(&send2, "", scfg.path());
    assert_eq!(status, 0, "{shown}");
    assert!(!shown.contains("code shown by"), "asked for a code again: {shown}");
    let _ = rx2.wait();
}

#[test]
fn a_handshake_step_trickled_a_byte_at_a_time_is_given_up_on() {
    // A fake receiver says hello, then a handshake frame of 1,024 bytes a byte every 1.5 s: each
    // byte inside --timeout 2, the whole frame never. Before: the sender waited ~25 minutes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        protocol::write_hello(&mut c).unwrap();
        let _ = c.write_all(&[0, 0, 4, 0, FrameKind::Handshake as u8]);
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(1500));
            if c.write_all(&[0x42]).is_err() {
                break;
            }
        }
    });
    let (_src, path) = source_file("f", b"x");
    let cfg = config();
    let run =
        send_file(cfg.path(), &path, &addr, &["--timeout", "2"], &[("XFER_CODE", Code::generate().expose())]);
    assert_eq!(run.code(), 3, "{}", run.report());
    assert!(run.elapsed < Duration::from_secs(8), "took {:?}: {}", run.elapsed, run.report());
}

#[test]
fn a_plaintext_refusal_injected_after_a_pinned_handshake_is_tampering_not_a_changed_key() {
    let s = Secure::start(&["--quiet", "--remember"]);
    let cfg = config();
    let (_src, path) = source_file("a", b"x");
    send_file(cfg.path(), &path, &s.rx.target(), &[], &[("XFER_CODE", &s.code())]).expect(0);
    // Someone on the path: passes the handshake, then puts a refusal in the clear where the
    // receiver's first record was due.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap().to_string();
    let target = s.rx.addr;
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(target).unwrap();
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c_in, &mut s_out);
        });
        let (mut s_in, mut c_out) = (server, client);
        let mut hello = [0u8; protocol::HELLO_LEN];
        s_in.read_exact(&mut hello).unwrap();
        c_out.write_all(&hello).unwrap();
        loop {
            let mut h = [0u8; protocol::FRAME_HEADER_LEN];
            if s_in.read_exact(&mut h).is_err() {
                return;
            }
            let len = u32::from_be_bytes(h[..4].try_into().unwrap()) as usize;
            if h[4] == FrameKind::Record as u8 {
                let reject = protocol::Reject { code: protocol::RejectCode::AuthFailed, reason: "x".into() };
                let _ = protocol::write_message(&mut c_out, &protocol::Message::Reject(reject));
                std::thread::sleep(Duration::from_millis(300));
                return;
            }
            let mut body = vec![0u8; len];
            s_in.read_exact(&mut body).unwrap();
            c_out.write_all(&h).unwrap();
            c_out.write_all(&body).unwrap();
        }
    });
    // The sender's pin for the proxy's address is the receiver's real key (as it is for an
    // attacker who sits on the path to the real address).
    let pins = cfg.path().join("xfer/known-receivers");
    let line = std::fs::read_to_string(&pins).unwrap();
    let copied = line.replace(&s.rx.target(), &proxy);
    std::fs::write(&pins, format!("{line}{copied}")).unwrap();
    let run = send_file(cfg.path(), &path, &proxy, &[], &[]).expect(8);
    assert!(run.stderr().contains("tampering"), "{}", run.report());
    assert!(!run.stderr().contains("trust forget"), "a proven key was called changed: {}", run.report());
}
