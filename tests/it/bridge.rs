//! The raw-peer tests over the secure channel: a [`SecureBridge`] takes a raw test peer's
//! plaintext conversation (its hello, the mode-00 handshake frame, then the frame stream, as
//! [`RawPeer`](crate::util::RawPeer) speaks it to an `--insecure` receiver), pairs with a receiver
//! that requires a code through the real code handshake, and from then on seals what the peer
//! says into records and opens what the receiver says back into the plaintext stream.
//!
//! Faithful forwarding, so the hostile tests keep their meaning: each read from the peer is
//! sealed as one record as soon as it arrives (a peer trickling a byte at a time makes a record
//! per byte, a flood makes records as large as a read gives); a half-close passes through both
//! ways; a reset from the peer is passed on as a reset; the receiver's connection comes from the
//! peer's own address (per-address limits still apply). A peer that does not speak the plaintext
//! sender's opening (a bad hello, another handshake mode) or a receiver that refuses before the
//! records is forwarded as it is, byte for byte; the bridge counts those connections apart, so a
//! test can check that everything it meant to seal was sealed.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use xfer::code::Code;
use xfer::protocol::{self, FRAME_HEADER_LEN, FrameKind, HELLO_LEN, MAX_HANDSHAKE_LEN, MAX_RECORD_PLAIN};
use xfer::transport::handshake::{self, Random};
use xfer::transport::{RecordOpener, RecordSealer};
use xfer::trust::Identity;

use crate::util::{INSECURE, Receiver, Run, xfer_in};

/// What a bridge did, connection by connection.
#[derive(Default)]
struct Counts {
    /// Code handshakes completed: the peer's stream went sealed both ways.
    secured: AtomicUsize,
    /// Forwarded as it was: the peer did not open as a plaintext sender, or the receiver refused
    /// before the records.
    as_is: AtomicUsize,
    /// The receiver's handshake reply did not verify, or one of its records did not open.
    failed: AtomicUsize,
}

/// A loopback proxy in front of a secure receiver that seals a raw peer's plaintext stream (see
/// the module's comment). Stops accepting when dropped; connections in progress run to their end.
pub struct SecureBridge {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl SecureBridge {
    /// Bridges to the receiver at `target`, pairing with `code` on every connection.
    pub fn start(target: SocketAddr, code: Code) -> SecureBridge {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let keys = tempfile::tempdir().unwrap();
        let me = Arc::new(xfer::trust::TrustStore::at(&keys.path().join("bridge")).identity().unwrap());
        let (counts, stop) = (Arc::new(Counts::default()), Arc::new(AtomicBool::new(false)));
        let (c, s) = (Arc::clone(&counts), Arc::clone(&stop));
        std::thread::spawn(move || {
            for peer in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(peer) = peer else { continue };
                let (code, me, counts) = (code.clone(), Arc::clone(&me), Arc::clone(&c));
                std::thread::spawn(move || bridge(peer, target, code, me, counts));
            }
        });
        SecureBridge { addr, counts, stop }
    }

    /// Connections whose stream went through the secure channel.
    pub fn secured(&self) -> usize {
        self.counts.secured.load(Ordering::SeqCst)
    }

    /// Connections forwarded as they were (not a plaintext sender's opening, or refused).
    pub fn as_is(&self) -> usize {
        self.counts.as_is.load(Ordering::SeqCst)
    }

    /// Connections where the receiver's side of the channel did not verify.
    pub fn failed(&self) -> usize {
        self.counts.failed.load(Ordering::SeqCst)
    }
}

impl Drop for SecureBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// A TCP connection to `to` from the loopback address `from` (any port).
pub fn connect_from(from: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)?;
    rustix::net::bind(&fd, &SocketAddr::new(from, 0))?;
    rustix::net::connect(&fd, &to)?;
    Ok(TcpStream::from(fd))
}

/// What the half reading the peer tells the half reading the receiver.
enum Down {
    /// The peer did not open as a plaintext sender: forward the receiver's bytes as they are.
    AsIs,
    /// The code handshake's first step is out; the receiver's reply is for the bridge.
    Pairing,
    /// The handshake is done: open the receiver's records with this.
    Open(Box<RecordOpener>),
}

/// One connection: the peer's half on this thread, the receiver's half on another.
fn bridge(peer: TcpStream, target: SocketAddr, code: Code, me: Arc<Identity>, counts: Arc<Counts>) {
    let Ok(from) = peer.peer_addr() else { return };
    let Ok(rx) = connect_from(from.ip(), target) else { return };
    let _ = rx.set_nodelay(true);
    let _ = peer.set_nodelay(true);
    let (peer, rx) = (Arc::new(peer), Arc::new(rx));
    let (to_down, down_rx) = mpsc::channel();
    let (to_up, up_rx) = mpsc::channel();
    let down = {
        let (peer, rx, counts) = (Arc::clone(&peer), Arc::clone(&rx), Arc::clone(&counts));
        std::thread::spawn(move || receiver_half(&rx, &peer, &down_rx, &to_up, &counts))
    };
    peer_half(&peer, &rx, &code, &me, &to_down, &up_rx, &counts);
    let _ = down.join();
}

/// Reads until `buf` is full or the stream ends; how much was read, and the error if any.
fn read_full(mut s: &TcpStream, buf: &mut [u8]) -> (usize, Option<std::io::Error>) {
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => return (n, None),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

/// Ends the connection to `s` with a reset (what the other side did), and wakes the thread
/// reading it.
fn reset(s: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(s, Some(std::time::Duration::ZERO));
    let _ = s.shutdown(Shutdown::Read);
}

fn write_step(mut to: &TcpStream, step: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + step.len());
    protocol::write_frame_header(&mut frame, FrameKind::Handshake, step.len() as u32)?;
    frame.extend_from_slice(step);
    to.write_all(&frame)
}

/// The peer's half: its hello as it comes, its handshake frame replaced by the code handshake,
/// then every read sealed as one record.
fn peer_half(
    peer: &TcpStream,
    rx: &TcpStream,
    code: &Code,
    me: &Identity,
    to_down: &mpsc::Sender<Down>,
    from_down: &mpsc::Receiver<Option<Vec<u8>>>,
    counts: &Counts,
) {
    let mut buf = vec![0u8; MAX_RECORD_PLAIN as usize];
    let opening = HELLO_LEN + INSECURE.len();
    // The hello and the handshake frame, and whatever came with them.
    let mut seen = Vec::new();
    let mut forwarded = 0;
    let as_is = |rest: &[u8]| {
        counts.as_is.fetch_add(1, Ordering::SeqCst);
        let _ = to_down.send(Down::AsIs);
        let _ = (&*rx).write_all(rest);
    };
    loop {
        let hello_part = seen.len().min(HELLO_LEN);
        if hello_part > forwarded {
            if (&*rx).write_all(&seen[forwarded..hello_part]).is_err() {
                return;
            }
            forwarded = hello_part;
        }
        if seen.len() >= HELLO_LEN && seen[..HELLO_LEN] != protocol::hello() {
            as_is(&seen[HELLO_LEN..]);
            return pump(peer, rx, &mut buf, None);
        }
        if seen.len() >= opening {
            break;
        }
        let mut peer_r = peer;
        match peer_r.read(&mut buf) {
            Ok(0) => {
                as_is(&seen[forwarded..]);
                let _ = rx.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return reset(rx),
        }
    }
    if seen[HELLO_LEN..opening] != INSECURE {
        as_is(&seen[HELLO_LEN..]);
        return pump(peer, rx, &mut buf, None);
    }
    let rest = &seen[opening..];
    let _ = to_down.send(Down::Pairing);
    let (state, step1) = handshake::sender_code_start(code, me, Random::System);
    if write_step(rx, &step1).is_err() {
        return;
    }
    // The receiver's reply, or `None`: it refused (or hung up) instead.
    let Ok(Some(step2)) = from_down.recv() else {
        as_is(rest);
        return pump(peer, rx, &mut buf, None);
    };
    let Ok(reply) = handshake::sender_code_reply(state, &step2) else {
        counts.failed.fetch_add(1, Ordering::SeqCst);
        reset(peer);
        return reset(rx);
    };
    let (m3, keys) = reply.finish();
    if write_step(rx, &m3).is_err() {
        return;
    }
    let _ = to_down.send(Down::Open(Box::new(RecordOpener::new(keys.to_sender))));
    counts.secured.fetch_add(1, Ordering::SeqCst);
    let mut sealer = RecordSealer::new(keys.to_receiver);
    if !rest.is_empty() && sealer.seal(&mut &*rx, rest).is_err() {
        return;
    }
    pump(peer, rx, &mut buf, Some(&mut sealer));
}

/// Peer to receiver until the peer hangs up: each read sealed as one record (or forwarded as it
/// is without a sealer). An end of stream becomes a half-close, a reset a reset.
fn pump(mut peer: &TcpStream, mut rx: &TcpStream, buf: &mut [u8], mut sealer: Option<&mut RecordSealer>) {
    loop {
        match peer.read(buf) {
            Ok(0) => {
                let _ = rx.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                let sent = match sealer.as_deref_mut() {
                    Some(s) => s.seal(&mut rx, &buf[..n]).map(drop),
                    None => rx.write_all(&buf[..n]),
                };
                // The receiver hung up: what the peer says next goes nowhere, as it would.
                if sent.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return reset(rx),
        }
    }
}

/// The receiver's half: its hello as it comes, its handshake reply to the peer's half, then its
/// records opened into the plaintext stream (or its bytes as they are).
fn receiver_half(
    rx: &TcpStream,
    peer: &TcpStream,
    from_up: &mpsc::Receiver<Down>,
    to_up: &mpsc::Sender<Option<Vec<u8>>>,
    counts: &Counts,
) {
    let mut buf = vec![0u8; MAX_RECORD_PLAIN as usize];
    let end = |peer: &TcpStream| {
        let _ = peer.shutdown(Shutdown::Write);
    };
    let mut hello = 0;
    while hello < HELLO_LEN {
        match (&*rx).read(&mut buf[..HELLO_LEN - hello]) {
            Ok(0) | Err(_) => return end(peer),
            Ok(n) => {
                if (&*peer).write_all(&buf[..n]).is_err() {
                    return reset(rx);
                }
                hello += n;
            }
        }
    }
    let mut header = [0u8; FRAME_HEADER_LEN];
    let (n, _) = read_full(rx, &mut header);
    let step = header[4] == FrameKind::Handshake as u8
        && u32::from_be_bytes(header[..4].try_into().unwrap()) <= MAX_HANDSHAKE_LEN;
    if n < FRAME_HEADER_LEN || !step {
        // A refusal, or anything else: the peer's half gets no reply and forwards as it is.
        let _ = to_up.send(None);
        let _ = (&*peer).write_all(&header[..n]);
        return copy(rx, peer, &mut buf, None, counts);
    }
    if !matches!(from_up.recv(), Ok(Down::Pairing)) {
        let _ = (&*peer).write_all(&header);
        return copy(rx, peer, &mut buf, None, counts);
    }
    let mut step2 = vec![0u8; u32::from_be_bytes(header[..4].try_into().unwrap()) as usize];
    if read_full(rx, &mut step2).0 < step2.len() {
        return end(peer);
    }
    let _ = to_up.send(Some(step2));
    let Ok(Down::Open(mut opener)) = from_up.recv() else { return end(peer) };
    copy(rx, peer, &mut buf, Some(&mut opener), counts)
}

/// Receiver to peer until the receiver hangs up (then a half-close, also after a reset: what it
/// said before must reach the peer). A record that does not open resets the peer.
fn copy(
    rx: &TcpStream,
    mut peer: &TcpStream,
    buf: &mut [u8],
    mut opener: Option<&mut RecordOpener>,
    counts: &Counts,
) {
    loop {
        let got = match opener.as_deref_mut() {
            Some(o) => o.read(&mut { rx }, buf),
            None => { rx }.read(buf),
        };
        match got {
            Ok(0) => break,
            Ok(n) => {
                if peer.write_all(&buf[..n]).is_err() {
                    return reset(rx);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                counts.failed.fetch_add(1, Ordering::SeqCst);
                reset(rx);
                return reset(peer);
            }
            Err(_) => break,
        }
    }
    let _ = peer.shutdown(Shutdown::Write);
}

/// How the raw peers of a test reach its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Straight to a receiver started with `--insecure`: the plaintext stream.
    Plain,
    /// Through a [`SecureBridge`] to a receiver that requires a code.
    Secure,
}

/// A receiver under test and the way raw peers reach it. Derefs to the [`Receiver`].
pub struct Target {
    rx: Receiver,
    bridge: Option<SecureBridge>,
    /// The code file and the honest sender's keys (never inside the receiver's root, whose only
    /// entry must be DIR).
    keys: Option<tempfile::TempDir>,
}

impl Target {
    /// A receiver with `args` (and `--insecure` or a code, as `channel` says).
    pub fn start(channel: Channel, args: &[&str]) -> Target {
        if channel == Channel::Plain {
            return Target { rx: Receiver::start(args), bridge: None, keys: None };
        }
        let keys = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        let code_file = keys.path().join("code").to_string_lossy().into_owned();
        let config = keys.path().join("receiver").to_string_lossy().into_owned();
        let args = [&["--code-file", code_file.as_str()], args].concat();
        let rx = Receiver::start_with(root, dir, &args, &[("XDG_CONFIG_HOME", config.as_str())]);
        let text = std::fs::read_to_string(&code_file).unwrap();
        let code = Code::parse(&text).unwrap_or_else(|e| panic!("the receiver's code {text:?}: {e}"));
        let bridge = SecureBridge::start(rx.addr, code);
        Target { rx, bridge: Some(bridge), keys: Some(keys) }
    }

    /// Where raw peers connect: the receiver, or the bridge in front of it.
    pub fn peer_addr(&self) -> SocketAddr {
        self.bridge.as_ref().map_or(self.rx.addr, |b| b.addr)
    }

    pub fn bridge(&self) -> Option<&SecureBridge> {
        self.bridge.as_ref()
    }

    /// An honest `xfer send FILE` to the receiver: in the clear, or with the code (then with its
    /// own keys, so no receiver an earlier test pinned at the same port gets in the way).
    pub fn send(&self, file: &Path, extra: &[&str]) -> Run {
        let mut args: Vec<std::ffi::OsString> = vec!["send".into(), file.into(), self.rx.target().into()];
        args.extend(extra.iter().map(Into::into));
        let Some(keys) = &self.keys else { return crate::util::xfer(&args) };
        args.extend(["--code-file".into(), keys.path().join("code").into()]);
        xfer_in(&args, &keys.path().join("sender"))
    }

    /// For a secure target: at least `connections` raw peers went through the secure channel,
    /// none failed it, and the receiver never refused a plaintext opening (`AuthRequired`).
    pub fn assert_sealed(&self, connections: usize) {
        let Some(b) = &self.bridge else { return };
        let log = self.rx.stderr();
        assert!(
            b.secured() >= connections && b.failed() == 0,
            "{} connections sealed (want {connections}), {} failed; receiver log:\n{log}",
            b.secured(),
            b.failed()
        );
        assert!(!log.contains("accepts only encrypted"), "a plaintext opening reached the receiver:\n{log}");
    }
}

impl Deref for Target {
    type Target = Receiver;
    fn deref(&self) -> &Receiver {
        &self.rx
    }
}

impl DerefMut for Target {
    fn deref_mut(&mut self) -> &mut Receiver {
        &mut self.rx
    }
}

#[test]
fn the_bridge_speaks_only_the_secure_channel_and_raw_peers_need_it() {
    use xfer::protocol::{Message, Reject, RejectCode};
    let offer = |to: SocketAddr| {
        let mut p = crate::util::RawPeer::greet(to);
        p.offer("f", 4, crate::util::sha256(b"data"))
    };
    // A bridge in front of a plaintext receiver: refused, nothing goes through in the clear.
    let plain = Receiver::start(&["--quiet"]);
    let code = Code::generate();
    let bridge = SecureBridge::start(plain.addr, code);
    match offer(bridge.addr) {
        Message::Reject(Reject { code: RejectCode::InsecureOnly, .. }) => {}
        other => panic!("a plaintext receiver behind the bridge answered {other:?}"),
    }
    plain.wait_log("runs with --insecure");
    assert_eq!((bridge.secured(), bridge.as_is(), bridge.failed()), (0, 1, 0));
    // A raw peer straight to a secure receiver: refused (so no bridged test can pass unsealed).
    let t = Target::start(Channel::Secure, &["--quiet"]);
    match offer(t.addr) {
        Message::Reject(Reject { code: RejectCode::AuthRequired, .. }) => {}
        other => panic!("a secure receiver answered a plaintext peer {other:?}"),
    }
    t.wait_log("accepts only encrypted");
    // Through its bridge, the same offer is answered, and nothing was refused.
    let mut p = crate::util::RawPeer::greet(t.peer_addr());
    assert!(crate::util::is_accept(&p.offer("f", 4, crate::util::sha256(b"data"))));
    assert_eq!(t.bridge().unwrap().secured(), 1);
    assert_eq!(t.stderr().matches("accepts only encrypted").count(), 1, "{}", t.stderr());
}
