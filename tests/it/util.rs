//! Test harness: a receiver child killed on drop, a sender runner that reports everything on
//! failure, a raw wire peer, and deterministic random data.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;
use xfer::protocol::{
    self, Answer, AnswersPart, Body, Digest, DigestsPart, Entry, EntryKind, HashAlg, ManifestPart, Message,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_xfer");

/// A running `xfer recv` on 127.0.0.1 with a fresh target folder. Killed when dropped.
pub struct Receiver {
    pub child: Child,
    pub addr: SocketAddr,
    /// The temporary root; `dir` is a folder inside it, so writes outside `dir` can be detected.
    pub root: tempfile::TempDir,
    pub dir: PathBuf,
    stderr: Arc<Mutex<String>>,
    /// The thread copying the child's stderr into `stderr`; finished once stderr is closed.
    stderr_reader: std::thread::JoinHandle<()>,
}

impl Receiver {
    pub fn start(args: &[&str]) -> Receiver {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        Receiver::start_in(root, dir, args)
    }

    pub fn start_in(root: tempfile::TempDir, dir: PathBuf, args: &[&str]) -> Receiver {
        Receiver::start_with(root, dir, args, &[])
    }

    /// A receiver with `envs` set. Unless `args` ask for a code (`--code-file`, `--remember`) or
    /// `envs` give one (`XFER_CODE`), it runs `--insecure`: the plaintext stream most tests speak.
    /// Its keys live in `root/config`.
    pub fn start_with(
        root: tempfile::TempDir,
        dir: PathBuf,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Receiver {
        Receiver::start_masked(root, dir, args, envs, None)
    }

    /// [`Receiver::start_with`], the receiver running with file mode creation mask `umask` (the
    /// tests' own is left alone: other tests spawn children meanwhile).
    pub fn start_masked(
        root: tempfile::TempDir,
        dir: PathBuf,
        args: &[&str],
        envs: &[(&str, &str)],
        umask: Option<u32>,
    ) -> Receiver {
        let secure = args.iter().any(|a| *a == "--code-file" || *a == "--remember")
            || envs.iter().any(|(k, _)| *k == "XFER_CODE");
        let listen = if args.contains(&"--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] };
        // A port a test chose (to restart a receiver on it) may be taken for a moment by another
        // test's outgoing connection: try again for a while before calling it a failure.
        let mut tries = 0;
        loop {
            let rx = Receiver::spawn(&root, &dir, (listen, secure, umask), args, envs);
            match rx {
                Ok((child, addr, stderr, stderr_reader)) => {
                    return Receiver { child, addr, root, dir, stderr, stderr_reader };
                }
                Err(said) if said.contains("Address already in use") && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(said) => panic!("{said}"),
            }
        }
    }

    /// Starts one `xfer recv`; its address, or what it said when it did not start.
    #[allow(clippy::type_complexity)]
    fn spawn(
        root: &tempfile::TempDir,
        dir: &Path,
        (listen, secure, umask): (&[&str], bool, Option<u32>),
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<(Child, SocketAddr, Arc<Mutex<String>>, std::thread::JoinHandle<()>), String> {
        let mut cmd = Command::new(BIN);
        if let Some(mask) = umask {
            use std::os::unix::process::CommandExt;
            // SAFETY: umask(2) is async-signal-safe and touches no memory.
            unsafe {
                cmd.pre_exec(move || {
                    rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask));
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .arg("recv")
            .args(listen)
            .arg("--dir")
            .arg(dir)
            .args(if secure { &[][..] } else { &["--insecure"][..] })
            .args(args)
            .env("XDG_CONFIG_HOME", root.path().join("config"))
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xfer recv");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let mut err = child.stderr.take().unwrap();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let Some(addr) = first.strip_prefix("listening on ") else {
            let _ = child.wait();
            let _ = stderr_reader.join();
            return Err(format!("first stdout line was {first:?}; stderr: {}", stderr.lock().unwrap()));
        };
        Ok((child, addr.trim().parse().unwrap(), stderr, stderr_reader))
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the receiver's stderr contains `needle` (log lines come after the sender's
    /// verdict, so a test may need to wait for them).
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < deadline, "receiver never logged {needle:?}; stderr:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sorted names in the target folder.
    pub fn files(&self) -> Vec<String> {
        list(&self.dir)
    }

    /// Waits for temporary files to be cleaned up, then asserts the folder holds exactly `want`
    /// and nothing appeared next to it in the temporary root.
    pub fn assert_files(&self, want: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        loop {
            let got = self.files();
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "folder holds {got:?}, want {want:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(list(self.root.path()), vec!["dir".to_string()], "something was written outside DIR");
    }

    /// The partial file kept for `name` (after an interruption), and its length.
    pub fn partial(&self, name: &str) -> (String, u64) {
        let stem = xfer::store::stem_for(name);
        let part = format!("{stem}.part");
        let len = std::fs::metadata(self.dir.join(&part)).map(|m| m.len()).unwrap_or_else(|e| {
            panic!("no partial for {name:?} ({part}): {e}; folder holds {:?}", self.files())
        });
        (stem, len)
    }

    /// Like `assert_files`, plus the partial and record kept for `name`.
    pub fn assert_files_and_partial(&self, want: &[&str], name: &str) -> u64 {
        let (stem, len) = self.partial(name);
        let (part, meta) = (format!("{stem}.part"), format!("{stem}.meta"));
        let mut all: Vec<&str> = want.to_vec();
        all.extend([part.as_str(), meta.as_str()]);
        self.assert_files(&all);
        len
    }

    /// Kills the receiver and hands back its folder, for a new receiver on the same folder.
    pub fn kill_and_keep_dir(mut self) -> (tempfile::TempDir, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let root = std::mem::replace(&mut self.root, tempfile::tempdir().unwrap());
        (root, self.dir.clone())
    }

    /// Waits for the child to exit (for --once) and returns its status code. Everything it wrote
    /// to stderr is in `stderr()` by then.
    pub fn wait_exit(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let closed = self.stderr_reader.is_finished();
            if let Some(st) = self.child.try_wait().unwrap().filter(|_| closed) {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "receiver did not exit; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The result of running the binary, with a report of everything for failure messages.
pub struct Run {
    pub out: Output,
    pub cmd: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
            self.cmd,
            self.out.status,
            self.stdout(),
            self.stderr()
        )
    }
    /// Asserts the exit code, printing the whole run if it differs.
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code(), code, "unexpected exit code\n{}", self.report());
        self
    }
}

/// A cache folder for this test process, so senders never touch the user's real digest cache.
pub fn test_cache_home() -> &'static Path {
    static HOME: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    HOME.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// Runs `xfer` with `args` to completion.
pub fn xfer<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    xfer_in(args, test_cache_home())
}

/// Runs `xfer` with `args` and `XDG_CACHE_HOME` set to `cache_home`.
pub fn xfer_in<S: AsRef<std::ffi::OsStr>>(args: &[S], cache_home: &Path) -> Run {
    let cmd = format!(
        "xfer {}",
        args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    );
    let start = Instant::now();
    // Plaintext unless the test asks for a code: most tests are about the frame stream.
    let mut args: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    let secure = args.iter().any(|a| a == "--code-file" || a == "--remember" || a == "--insecure");
    if !secure && args.first().is_some_and(|a| a == "send" || a == "recv") {
        args.insert(1, "--insecure".into());
    }
    let out = Command::new(BIN)
        .args(&args)
        .env("XDG_CACHE_HOME", cache_home)
        .env("XDG_CONFIG_HOME", cache_home.join("config"))
        .stdin(Stdio::null())
        .output()
        .expect("run xfer");
    Run { out, cmd, elapsed: start.elapsed() }
}

/// `xfer send FILE ADDR EXTRA...`
pub fn send(file: &Path, to: &str, extra: &[&str]) -> Run {
    let mut args: Vec<std::ffi::OsString> = vec!["send".into(), file.into(), to.into()];
    args.extend(extra.iter().map(Into::into));
    xfer(&args)
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> Digest {
    Digest(sha2::Sha256::digest(data).into())
}

/// Writes `data` to a new file `name` in a fresh temporary folder.
pub fn source_file(name: &str, data: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, data).unwrap();
    (dir, path)
}

/// `bytes` as one data frame: header, then the bytes.
pub fn data_frame(bytes: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(protocol::FRAME_HEADER_LEN + bytes.len());
    protocol::write_frame_header(&mut frame, protocol::FrameKind::Data, bytes.len() as u32).unwrap();
    frame.extend_from_slice(bytes);
    frame
}

/// The sender's handshake frame that asks for the plaintext stream (mode `00`).
pub const INSECURE: [u8; 6] = [0, 0, 0, 1, 0x03, 0x00];

/// For a fake receiver: reads the sender's handshake frame, which must ask for plaintext.
pub fn expect_insecure(s: &mut impl Read) {
    let mut b = [0u8; 6];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b, INSECURE, "the sender did not ask for the plaintext stream");
}

/// A hand-driven peer on a raw TcpStream, for saying what the real sender never would.
pub struct RawPeer {
    pub stream: TcpStream,
}

impl RawPeer {
    /// Connects without saying anything.
    pub fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        RawPeer { stream }
    }

    /// Connects, exchanges valid hellos and asks for the plaintext stream (the receivers of
    /// raw-peer tests run `--insecure`).
    pub fn greet(addr: SocketAddr) -> RawPeer {
        let mut p = RawPeer::connect(addr);
        protocol::write_hello(&mut p.stream).unwrap();
        protocol::read_hello(&mut p.stream).unwrap();
        p.stream.write_all(&INSECURE).unwrap();
        p
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        // The receiver may already have hung up; the test checks what it said instead.
        let _ = self.stream.write_all(bytes);
    }

    /// Sends a manifest of `entries` in one part.
    pub fn manifest(&mut self, entries: Vec<Entry>) {
        let msg = Message::Manifest(ManifestPart { entries, last: true });
        protocol::write_message(&mut self.stream, &msg).unwrap();
    }

    /// Offers one file as the real sender does (a manifest of one SHA-256 file entry, tag zero),
    /// and returns the receiver's first word. If that is the acceptance (an empty answers part),
    /// the file's digest is sent right after it; the answer for the file is then the next thing
    /// to read (see [`RawPeer::answer`]).
    pub fn offer(&mut self, name: &str, size: u64, digest: Digest) -> Message {
        self.manifest(vec![file_entry(&[name], size)]);
        let first = self.read().expect("the receiver's first word");
        if is_accept(&first) {
            self.digests(0, vec![Some(digest)]);
        }
        first
    }

    /// Sends a digests part.
    pub fn digests(&mut self, first: u32, digests: Vec<Option<Digest>>) {
        let msg = Message::Digests(DigestsPart { first, digests });
        protocol::write_message(&mut self.stream, &msg).unwrap();
    }

    /// Reads the next message, which must be an answers part with exactly one answer.
    pub fn answer(&mut self) -> Answer {
        match self.read().expect("an answer") {
            Message::Answers(AnswersPart { mut answers, .. }) if answers.len() == 1 => answers.remove(0),
            other => panic!("expected one answer, got {other:?}"),
        }
    }

    /// Announces the body of entry `index`.
    pub fn body(&mut self, index: u32) {
        protocol::write_message(&mut self.stream, &Message::Body(Body { index })).unwrap();
    }

    pub fn data(&mut self, bytes: &[u8]) {
        self.send_raw(&data_frame(bytes));
    }

    pub fn read(&mut self) -> Result<Message, protocol::WireError> {
        protocol::read_message(&mut self.stream)
    }

    /// Reads until the receiver closes the connection; true if it did (rather than time out).
    pub fn closed_by_peer(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A file entry for a manifest: SHA-256, mode 0644, tag zero.
pub fn file_entry(path: &[&str], size: u64) -> Entry {
    Entry {
        path: path.iter().map(|c| c.to_string()).collect(),
        kind: EntryKind::File { size, hash: HashAlg::Sha256, tag: [0; 16] },
        mode: 0o644,
        mtime: (1_600_000_000, 0),
    }
}

/// A manifest part as one frame's bytes.
pub fn manifest_frame(entries: Vec<Entry>, last: bool) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::write_message(&mut out, &Message::Manifest(ManifestPart { entries, last })).unwrap();
    out
}

/// True for the receiver's acceptance of a manifest: an empty answers part.
pub fn is_accept(m: &Message) -> bool {
    matches!(m, Message::Answers(AnswersPart { answers, last: false }) if answers.is_empty())
}

/// A small tmpfs mounted for one test, unmounted when dropped. Needs root (as CI has).
pub struct SmallDisk(pub tempfile::TempDir);

impl SmallDisk {
    pub fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mounting a tmpfs failed: this test needs root");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

/// The two ends a one-connection test proxy works with: accepts the sender on `listener`,
/// connects to `target`, and copies the receiver's side back to the sender in a thread (closing
/// the sender's direction when the receiver closes). Returns (from the sender, to the receiver):
/// what the proxy does to the sender's bytes on their way is the test's.
pub fn relay(listener: &std::net::TcpListener, target: SocketAddr) -> (TcpStream, TcpStream) {
    let (mut client, _) = listener.accept().unwrap();
    let mut server = TcpStream::connect(target).unwrap();
    let ends = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut server, &mut client);
        let _ = client.shutdown(std::net::Shutdown::Write);
    });
    ends
}
