//! The sender side: hash the file, connect, offer, stream the body, wait for the verdict.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cache::{DigestCache, Stamp};
use crate::error::{Error, Limit};
use crate::hash::hash_reader;
use crate::progress::Progress;
use crate::protocol::{
    self, FrameKind, HashAlg, Message, Offer, RejectCode, Reply, Trailer, Verdict, WireError, read_message,
    write_frame_header, write_message,
};
use crate::sanitize::{escape, peer_text, validate_name};

/// Default body chunk size. Through the framing alone (`--example framing`), 1024-byte chunks
/// cost 4-15% more time than the best size while 256 KiB stays within 4% of it; whole transfers
/// on a CPU without SHA extensions are hashing-bound and cannot tell sizes apart. README has the
/// numbers.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;

/// Capacity of the socket write buffer: small frames (down to 1-byte chunks) are coalesced into
/// writes of this size; frames at least this large bypass it.
pub(crate) const SOCKET_BUF: usize = 256 * 1024;

/// What to send where, validated by `cli`.
#[derive(Debug, Clone)]
pub struct SendOpts {
    /// The file, when a single regular file is sent (the first of `paths`).
    pub file: PathBuf,
    /// Everything given on the command line.
    pub paths: Vec<PathBuf>,
    /// Follow symlinks in a batch.
    pub follow: bool,
    /// Per-entry lines for a batch.
    pub verbose: bool,
    /// `HOST:PORT`, ready for `ToSocketAddrs`.
    pub to: String,
    /// Name to offer instead of the file's own.
    pub name: Option<String>,
    pub chunk_size: u32,
    /// Idle timeout on the connection; `None` waits forever.
    pub timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub quiet: bool,
    /// Use and update the digest cache (`--no-cache` turns it off).
    pub cache: bool,
    pub hash: HashAlg,
}

/// How a send ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver verified and stored the file under this name.
    Verified(String),
    /// The receiver already had this exact file, under this name.
    AlreadyHad(String),
}

/// The result of a successful send, for the summary line.
#[derive(Debug, Clone)]
pub struct SendReport {
    pub name: String,
    pub size: u64,
    pub digest: protocol::Digest,
    pub elapsed: Duration,
    pub outcome: Outcome,
    /// The digest came from the cache: the file was not read before sending.
    pub cached: bool,
    /// The receiver already held this many bytes from an interrupted transfer; only the rest was
    /// sent.
    pub resumed_at: u64,
}

impl SendOpts {
    /// One path that is not a folder goes the single-file way (which explains what is wrong with
    /// it, if anything); several paths or a folder make a batch.
    pub fn is_single_file(&self) -> bool {
        self.paths.len() == 1 && !std::fs::metadata(&self.paths[0]).is_ok_and(|m| m.is_dir())
    }
}

/// Sends one file. Returns only when the receiver said "verified" or "already have it".
pub fn send(opts: &SendOpts, progress: &Progress) -> Result<SendReport, Error> {
    let start = Instant::now();
    let path = opts.file.display().to_string();
    // Opening a fifo would block until someone writes to it: look before opening.
    if std::fs::metadata(&opts.file).is_ok_and(|m| !m.is_file()) {
        return Err(Error::Usage(format!("{path} is not a regular file")));
    }
    let mut file = File::open(&opts.file).map_err(|e| Error::io(format!("cannot open {path}"), e))?;
    let meta = file.metadata().map_err(|e| Error::io(format!("cannot stat {path}"), e))?;
    if !meta.is_file() {
        return Err(Error::Usage(format!("{path} is not a regular file")));
    }
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => opts
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Usage(format!("{path} has no UTF-8 file name; pick one with --as")))?
            .to_string(),
    };
    validate_name(&name).map_err(|e| {
        Error::Usage(format!("cannot send as \"{}\": {e} (pick another with --as)", escape(&name)))
    })?;
    let size = meta.len();
    let stamp = Stamp::of(&meta);
    // A digest known from the cache goes in the offer (the receiver may already have the file);
    // otherwise the file is hashed while it is sent and the digest follows the body.
    let mut cache = opts.cache.then(|| DigestCache::open_default(opts.hash));
    let known = cache.as_ref().and_then(|c| c.get(&stamp));
    let cached = known.is_some();

    // Without a digest, the whole file is hashed on a second thread (reading it independently,
    // from byte 0), from now on: while we connect, while the receiver checks a partial, and
    // while the body goes out from `offset`. The digest is cached as soon as it is known, so
    // even a send interrupted after that does not need to read the file again.
    let hashing = known.is_none().then(|| {
        let bar = progress.bytes("hashing", &name, size);
        let file = file.try_clone();
        let (alg, mut cache) = (opts.hash, cache.take());
        std::thread::spawn(move || {
            let file = file?;
            let out = crate::hash::hash_reader(alg, PreadReader { file: &file, pos: 0 }, &bar);
            bar.finish_and_clear();
            if let (Ok((d, n)), Some(c)) = (&out, cache.as_mut())
                && *n == stamp.size
                && file.metadata().map(|m| Stamp::of(&m)).ok() == Some(stamp)
            {
                c.put(stamp, *d);
                c.flush();
            }
            out
        })
    });
    let mut hashing = hashing.map(Hashing::Running);
    let (stream, peer, limit) = open_connection(opts)?;
    let wire = |what: &'static str| {
        let peer = peer.clone();
        move |e: WireError| Error::wire(&peer, what, limit, e)
    };
    let malformed = |what: String| Error::Protocol {
        peer: peer.clone(),
        source: protocol::ProtocolError::Malformed(what),
    };

    let mut reader = BufReader::new(&stream);
    let mut writer = BufWriter::with_capacity(SOCKET_BUF, &stream);
    let offer = |digest| Offer { name: name.clone(), size, hash: opts.hash, digest, tag: stamp.tag() };
    let greet = (|| {
        protocol::write_hello(&mut writer)?;
        write_message(&mut writer, &Message::Offer(offer(known)))?;
        writer.flush()
    })();
    // A failed write here is reported after reading the peer's hello, which says more.
    let hello = protocol::read_hello(&mut reader);
    hello.map_err(wire("exchanging hellos"))?;
    greet.map_err(|e| wire("sending the offer")(e.into()))?;

    let read_reply = |reader: &mut BufReader<&TcpStream>| match read_message(reader)
        .map_err(wire("waiting for the reply to the offer"))?
    {
        Message::Reply(r) => Ok(r),
        other => Err(unexpected(&peer, "reply", &other)),
    };
    let mut digest = known;
    let mut reply = read_reply(&mut reader)?;
    if reply == Reply::NeedDigest && digest.is_none() {
        // The receiver holds a file of this name and size: it needs the digest being computed.
        let d = hashing
            .as_mut()
            .expect("no digest, so hashing")
            .wait_keeping_alive(&mut writer, (size, &path))
            .map_err(|e| match e {
                HashError::Local(e) => e,
                HashError::Wire(e) => wire("sending the digest")(e.into()),
            })?;
        digest = Some(d);
        write_message(&mut writer, &Message::Offer(offer(digest)))
            .and_then(|()| writer.flush())
            .map_err(|e| wire("sending the offer")(e.into()))?;
        reply = read_reply(&mut reader)?;
    }
    // Saved now, not when the send ends: a send that is interrupted (Ctrl-C, a kill) is exactly
    // the one whose retry should not read the file again.
    if let Some(c) = cache.as_mut() {
        c.flush();
    }
    let offset = match reply {
        Reply::Accept { offset } if offset <= size => offset,
        Reply::Accept { offset } => {
            return Err(malformed(format!(
                "receiver asked to resume at byte {offset} of a {size}-byte file"
            )));
        }
        Reply::AlreadyHave { name: stored } => {
            let Some(digest) = digest else {
                return Err(malformed("receiver claims to have a file it was given no digest for".into()));
            };
            return Ok(SendReport {
                name,
                size,
                digest,
                elapsed: start.elapsed(),
                outcome: Outcome::AlreadyHad(stored),
                cached,
                resumed_at: 0,
            });
        }
        Reply::NeedDigest => return Err(malformed("receiver asked twice for the digest".into())),
        // The receiver's words reach our terminal: bounded and escaped like any peer input.
        Reply::Reject { code: RejectCode::Failed, reason } => {
            return Err(Error::RemoteFailed(peer_text(reason)));
        }
        Reply::Reject { code, reason } => {
            return Err(Error::Rejected { name: escape(&name), code, reason: peer_text(reason) });
        }
    };

    if offset > 0 {
        progress.line(&format!("xfer: resuming \"{}\" at byte {offset} of {size}", escape(&name)), false);
    }
    let bar = progress.bytes("sending", &name, size);
    bar.set_position(offset);
    let body = send_body(
        &mut file,
        &mut writer,
        (offset, size),
        opts.chunk_size,
        &bar,
        &path,
        wire("sending the body"),
    );
    bar.finish_and_clear();
    // The trailer: the digest of what was sent, or None if the file changed under us.
    let body = body.and_then(|()| {
        // Offered without a digest: the trailer carries it (the digest sent after NeedDigest
        // went in the second offer, and then no trailer follows).
        if let Some(h) = hashing.filter(|_| known.is_none() && digest.is_none()) {
            let (d, n) = h.finish().map_err(|e| Error::io(format!("cannot read {path}"), e))?;
            let unchanged = n == size && file.metadata().map(|m| Stamp::of(&m)).ok() == Some(stamp);
            let trailer = Trailer { digest: unchanged.then_some(d) };
            write_message(&mut writer, &Message::Trailer(trailer))
                .map_err(|e| wire("sending the body")(e.into()))?;
            if unchanged {
                digest = Some(d);
            }
        }
        writer.flush().map_err(|e| wire("sending the body")(e.into()))
    });
    drop(writer);
    // Only a changed file leaves the digest unknown; the receiver then stores nothing.
    let digest_or_zero = digest.unwrap_or(protocol::Digest([0; 32]));
    if let Err(e) = body {
        // A receiver that fails mid-body (disk full) says why in a verdict before it hangs up;
        // prefer its reason to our broken pipe.
        if matches!(e, Error::Connection { .. } | Error::Timeout { .. })
            && let Ok(Message::Verdict(v)) = read_message(&mut reader)
        {
            verdict_result(v, &name, &digest_or_zero)?;
        }
        return Err(e);
    }

    let verdict = match read_message(&mut reader).map_err(wire("waiting for the verdict"))? {
        Message::Verdict(v) => v,
        other => return Err(unexpected(&peer, "verdict", &other)),
    };
    // A file written to while it was read is never reported as sent, whatever the receiver says:
    // what arrived is not what is on disk now.
    let now =
        file.metadata().map(|m| Stamp::of(&m)).map_err(|e| Error::io(format!("cannot stat {path}"), e))?;
    let Some(digest) = digest.filter(|_| now == stamp) else {
        return Err(Error::Integrity(format!(
            "{path} changed while it was being sent; nothing is known to match it, send it again"
        )));
    };
    let stored = verdict_result(verdict, &name, &digest)?;
    let outcome = Outcome::Verified(stored);
    Ok(SendReport { name, size, digest, elapsed: start.elapsed(), outcome, cached, resumed_at: offset })
}

/// Reads a file by position (`pread`), so a second thread can hash it while the first sends it.
struct PreadReader<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for PreadReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

enum HashError {
    Local(Error),
    Wire(std::io::Error),
}

/// The sender's hashing thread: running, or finished with its result taken.
enum Hashing {
    Running(std::thread::JoinHandle<std::io::Result<(protocol::Digest, u64)>>),
    Done(protocol::Digest, u64),
}

impl Hashing {
    /// Waits for the digest while telling the receiver, once a second, that it is coming (an
    /// empty `Digests` part), so a large file does not trip its idle timeout. Checks the whole
    /// file was read.
    fn wait_keeping_alive(
        &mut self,
        writer: &mut BufWriter<&TcpStream>,
        (size, path): (u64, &str),
    ) -> Result<protocol::Digest, HashError> {
        if let Hashing::Running(h) = self {
            let mut last = Instant::now();
            while !h.is_finished() {
                std::thread::sleep(Duration::from_millis(20));
                if !h.is_finished() && last.elapsed() >= KEEPALIVE {
                    last = Instant::now();
                    let keepalive = Message::Digests(protocol::DigestsPart { first: 0, digests: Vec::new() });
                    write_message(writer, &keepalive)
                        .and_then(|()| writer.flush())
                        .map_err(HashError::Wire)?;
                }
            }
        }
        let taken = std::mem::replace(self, Hashing::Done(protocol::Digest([0; 32]), 0));
        let (d, n) =
            taken.finish().map_err(|e| HashError::Local(Error::io(format!("cannot read {path}"), e)))?;
        *self = Hashing::Done(d, n);
        if n != size {
            return Err(HashError::Local(Error::Integrity(format!(
                "{path} changed while it was being hashed; send it again"
            ))));
        }
        Ok(d)
    }

    /// The digest and the number of bytes hashed.
    fn finish(self) -> std::io::Result<(protocol::Digest, u64)> {
        match self {
            Hashing::Running(h) => h.join().expect("hashing thread does not panic"),
            Hashing::Done(d, n) => Ok((d, n)),
        }
    }
}

/// How often a sender waiting for its own hashing tells the receiver it is still there.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(1);

/// The file's digest: from the cache when its stamp is known, otherwise by reading it (advancing
/// `bar`), checking it did not change meanwhile, and remembering the result.
pub(crate) fn digest_of(
    file: &mut File,
    (stamp, alg): (Stamp, HashAlg),
    cache: Option<&mut DigestCache>,
    bar: &indicatif::ProgressBar,
    path: &str,
) -> Result<(protocol::Digest, bool), Error> {
    if let Some(d) = cache.as_ref().and_then(|c| c.get(&stamp)) {
        bar.inc(stamp.size);
        return Ok((d, true));
    }
    let (digest, hashed) =
        hash_reader(alg, &mut *file, bar).map_err(|e| Error::io(format!("cannot read {path}"), e))?;
    let after =
        file.metadata().map(|m| Stamp::of(&m)).map_err(|e| Error::io(format!("cannot stat {path}"), e))?;
    if hashed != stamp.size || after != stamp {
        return Err(Error::Integrity(format!("{path} changed while it was being hashed; send it again")));
    }
    if let Some(c) = cache {
        c.put(stamp, digest);
    }
    Ok((digest, false))
}

pub(crate) fn unexpected(peer: &str, expected: &'static str, got: &Message) -> Error {
    Error::Protocol {
        peer: peer.to_string(),
        source: protocol::ProtocolError::UnexpectedMessage { expected, got: got.name() },
    }
}

/// Turns the receiver's verdict into the stored name or the matching error.
pub(crate) fn verdict_result(v: Verdict, name: &str, digest: &protocol::Digest) -> Result<String, Error> {
    match v {
        Verdict::Verified { name } => Ok(name),
        Verdict::HashMismatch { expected, actual } => Err(Error::Integrity(format!(
            "receiver rejected \"{}\": content hashed to {actual} on arrival, expected {expected}{}",
            escape(name),
            if &expected == digest { "" } else { " (not the digest we sent)" }
        ))),
        Verdict::SizeMismatch { expected, received } => Err(Error::Integrity(format!(
            "receiver rejected \"{}\": got {received} bytes, expected {expected}",
            escape(name)
        ))),
        Verdict::Failed { reason } => Err(Error::RemoteFailed(peer_text(reason))),
    }
}

/// Connects to the receiver and sets the socket up for a transfer: the idle timeout both ways,
/// and no Nagle delay (frames are flushed explicitly at the end of each phase). Returns the
/// stream, the peer's address for messages, and the timeout in force.
pub(crate) fn open_connection(opts: &SendOpts) -> Result<(TcpStream, String, Limit), Error> {
    let stream = connect(&opts.to, opts.connect_timeout)?;
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| opts.to.clone());
    let limit = Limit { secs: opts.timeout.map_or(0, |t| t.as_secs()), option: "--timeout" };
    stream.set_read_timeout(opts.timeout).map_err(|e| Error::io("setting socket timeout", e))?;
    stream.set_write_timeout(opts.timeout).map_err(|e| Error::io("setting socket timeout", e))?;
    let _ = stream.set_nodelay(true);
    Ok((stream, peer, limit))
}

/// Resolves `to` and connects to the first address that answers within `timeout`.
pub(crate) fn connect(to: &str, timeout: Duration) -> Result<TcpStream, Error> {
    let addrs = to
        .to_socket_addrs()
        .map_err(|e| Error::Connect { addr: to.to_string(), source: e })?
        .collect::<Vec<_>>();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address found");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(Error::Connect { addr: to.to_string(), source: last })
}

/// Writes the body from `offset` as data frames of at most `chunk` bytes. Does not flush: a batch
/// streams many bodies through one buffer.
pub(crate) fn send_body(
    file: &mut File,
    w: &mut BufWriter<&TcpStream>,
    (offset, size): (u64, u64),
    chunk: u32,
    bar: &indicatif::ProgressBar,
    path: &str,
    wire: impl Fn(WireError) -> Error,
) -> Result<(), Error> {
    let net = |e: std::io::Error| wire(e.into());
    if chunk as usize >= SENDFILE_MIN_CHUNK && size - offset >= SENDFILE_MIN_BODY {
        return send_body_sendfile(file, w, (offset, size), chunk, bar, path, net);
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(format!("cannot seek in {path}"), e))?;
    // Reads come from the file in large blocks whatever the chunk size, so a 1-byte chunk size
    // costs framing, not a syscall per byte.
    let block = (chunk as usize).max(SOCKET_BUF);
    // No bigger than the body: a batch sends thousands of small files through here.
    let mut buf = vec![0u8; (block as u64).min(size - offset) as usize];
    let mut remaining = size - offset;
    while remaining > 0 {
        let want = (block as u64).min(remaining) as usize;
        file.read_exact(&mut buf[..want])
            .map_err(|e| Error::io(format!("cannot read {path} (did it shrink while being sent?)"), e))?;
        for piece in buf[..want].chunks(chunk as usize) {
            write_frame_header(w, FrameKind::Data, piece.len() as u32).map_err(net)?;
            w.write_all(piece).map_err(net)?;
        }
        remaining -= want as u64;
        bar.inc(want as u64);
    }
    Ok(())
}

/// Bodies at least this large go out through `sendfile(2)`: the kernel copies from the page cache
/// to the socket, and this process never touches the bytes. Smaller ones (most files of a batch)
/// are read and framed through the socket buffer, where several share one write.
const SENDFILE_MIN_BODY: u64 = 1 << 20;
/// Frames this large make a header per frame cheap next to the `sendfile` call it precedes.
const SENDFILE_MIN_CHUNK: usize = 64 * 1024;

/// [`send_body`] by `sendfile(2)`: for each frame, its 5-byte header with `MSG_MORE` (so it
/// travels in the same segment as the data), then the data straight from the file.
fn send_body_sendfile(
    file: &File,
    w: &mut BufWriter<&TcpStream>,
    (offset, size): (u64, u64),
    chunk: u32,
    bar: &indicatif::ProgressBar,
    path: &str,
    net: impl Fn(std::io::Error) -> Error,
) -> Result<(), Error> {
    use rustix::io::Errno;
    // Messages still buffered (a batch's `Body`) go first.
    w.flush().map_err(&net)?;
    let sock: &TcpStream = w.get_ref();
    let mut pos = offset;
    while pos < size {
        let len = (size - pos).min(u64::from(chunk)) as usize;
        let header = protocol::FrameHeader { kind: FrameKind::Data, len: len as u32 }.encode();
        let mut sent = 0;
        while sent < header.len() {
            match rustix::net::send(sock, &header[sent..], rustix::net::SendFlags::MORE) {
                Ok(n) => sent += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(net(e.into())),
            }
        }
        let mut left = len;
        while left > 0 {
            match rustix::fs::sendfile(sock, file, Some(&mut pos), left) {
                Ok(0) => {
                    let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(Error::io(
                        format!("cannot read {path} (did it shrink while being sent?)"),
                        e,
                    ));
                }
                Ok(n) => {
                    left -= n;
                    bar.inc(n as u64);
                }
                Err(Errno::INTR) => {}
                // The socket's side: the peer went away or the send timeout passed.
                Err(
                    e @ (Errno::PIPE | Errno::CONNRESET | Errno::AGAIN | Errno::TIMEDOUT | Errno::NOTCONN),
                ) => {
                    return Err(net(e.into()));
                }
                Err(e) => return Err(Error::io(format!("cannot read {path}"), e.into())),
            }
        }
    }
    Ok(())
}
