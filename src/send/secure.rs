//! The sender's way into a connection: the secure channel (a code at first contact, the pinned
//! receiver key after that) or, with `--insecure`, the plaintext stream.
//!
//! The code is needed only when this user has not paired with the receiver, or paired with one
//! that does not remember senders. It comes from `XFER_CODE`, `--code-file`, or a prompt on the
//! terminal, and is checked against the word list before anything is sent (a typo costs no guess).
//! A receiver key is pinned only once the receiver's first record opened: then it knew the code.

use std::io::{BufRead, ErrorKind, Read, Write};
use std::net::TcpStream;

use super::SendOpts;
use crate::code::Code;
use crate::error::Error;
use crate::protocol::{Reject, RejectCode};
use crate::sanitize::peer_text;
use crate::transport::handshake::{self, HsError, MODE_INSECURE, Random};
use crate::transport::{self, FrameReader, FrameWriter, Handshake};
use crate::trust::{Identity, KnownReceiver, TrustStore};

use indicatif::ProgressBar;

/// How this connection was authenticated, and what to pin once the receiver proved itself.
pub(crate) enum Auth {
    Insecure,
    Pinned,
    Code { store: TrustStore, receiver: [u8; 32], remembers: bool },
}

/// A connection past its handshake.
pub(crate) struct Connected {
    pub r: FrameReader,
    pub w: FrameWriter,
    pub peer: String,
    pub auth: Auth,
    /// How long the TCP connect took: about one round trip (`--streams auto` goes by it).
    pub rtt: std::time::Duration,
}

fn dial(opts: &SendOpts) -> Result<(FrameReader, FrameWriter, String, std::time::Duration), Error> {
    let (stream, rtt): (TcpStream, _) = transport::connect_timed(&opts.to, opts.connect_timeout)?;
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| opts.to.clone());
    let (mut r, mut w) = transport::split(stream, &peer, opts.timeout)?;
    match transport::exchange_hellos(&mut r, &mut w) {
        // Closed before a word: what a receiver too busy even to refuse does (past its queue of
        // refusals); `send` waits for it as for a busy refusal.
        Err(Error::Connection { source, .. })
            if matches!(source.kind(), ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof) =>
        {
            Err(Error::Connection { peer, what: CLOSED_AT_ONCE, source })
        }
        other => other.map(|()| (r, w, peer, rtt)),
    }
}

/// How [`dial`] names a connection closed before the receiver's hello.
pub(crate) const CLOSED_AT_ONCE: &str = "was closed before a word (the receiver may be overloaded)";

/// The message for a receiver whose key is not the one pinned for `to`.
fn changed_key(to: &str) -> Error {
    Error::Auth(format!(
        "the receiver at {to} does not hold the key you paired with: either it was reinstalled \
         (its key changed) or someone is in the middle. Nothing was sent. If you know why the key \
         changed, run `xfer trust forget {to}` and send again to pair with its code"
    ))
}

/// A refusal the receiver sent in the clear, in words that say what to do.
pub(crate) fn refusal(reject: Reject, to: &str, pinned: bool) -> Error {
    let reason = peer_text(reject.reason);
    match reject.code {
        RejectCode::AuthRequired => Error::Auth(format!(
            "the receiver at {to} accepts only encrypted senders and you sent with --insecure: \
             send without --insecure ({reason})"
        )),
        RejectCode::InsecureOnly => Error::Auth(format!(
            "the receiver at {to} runs with --insecure (plaintext): send with --insecure only if \
             you trust the network, or ask for a receiver without it ({reason})"
        )),
        RejectCode::AuthFailed if pinned => changed_key(to),
        RejectCode::AuthFailed => Error::Auth(format!(
            "wrong code: the receiver at {to} did not accept it ({reason}). Check the code \
             `xfer recv` shows and send again; each wrong code uses up one of its guesses"
        )),
        RejectCode::UnknownSender => Error::Auth(format!(
            "the receiver at {to} does not know this sender: pair with its code ({reason})"
        )),
        code => Error::Rejected { name: "the connection".into(), code, reason },
    }
}

fn hs_failed(to: &str, e: HsError) -> Error {
    let what = match e {
        HsError::Malformed(w) => w,
        HsError::WrongCode | HsError::NotOurKey => "a proof failed",
    };
    Error::Auth(format!(
        "the secure handshake with {to} failed ({what}): someone in the middle, or not an xfer \
         receiver; nothing was sent"
    ))
}

/// What is known before connecting: this user's keys, the receiver's pin, and the code when
/// the receiver will ask for it.
pub(crate) enum Ready {
    Insecure,
    Secure { store: TrustStore, me: Identity, pin: Option<KnownReceiver>, code: Option<Code> },
}

/// Loads keys and pin, and obtains the code now unless the pin says the receiver remembers
/// this sender (then it is asked for only if the receiver turns out to have forgotten it).
pub(crate) fn prepare(opts: &SendOpts) -> Result<Ready, Error> {
    if opts.insecure {
        return Ok(Ready::Insecure);
    }
    let store = TrustStore::for_user()?;
    let me = store.identity()?;
    let pin = store.receiver(&opts.to)?;
    let code = if pin.as_ref().is_some_and(|p| p.remembers) { None } else { Some(obtain_code(opts)?) };
    Ok(Ready::Secure { store, me, pin, code })
}

/// Connects and authenticates as prepared. `bar` is hidden while a late prompt asks for a code.
pub(crate) fn connect(opts: &SendOpts, ready: &mut Ready, bar: &ProgressBar) -> Result<Connected, Error> {
    let Ready::Secure { store, me, pin, code } = ready else {
        let (r, mut w, peer, rtt) = dial(opts)?;
        w.handshake(&[MODE_INSECURE]).map_err(|e| w.error("starting the handshake", e.into()))?;
        return Ok(Connected { r, w, peer, auth: Auth::Insecure, rtt });
    };
    if code.is_none() {
        let p = pin.as_ref().expect("prepare asks for a code when nothing is pinned");
        let (mut r, mut w, peer, rtt) = dial(opts)?;
        let (st, step1) = handshake::sender_pinned_start(me, &p.key, Random::System);
        w.handshake(&step1).map_err(|e| w.error("starting the handshake", e.into()))?;
        match r.handshake().map_err(|e| r.error("waiting for the handshake", e))? {
            Handshake::Step(m2) => {
                let keys = st.finish(&m2).map_err(|_| changed_key(&opts.to))?;
                handshake::start_records(&mut r, &mut w, (keys.to_receiver, keys.to_sender), false)?;
                return Ok(Connected { r, w, peer, auth: Auth::Pinned, rtt });
            }
            // The receiver forgot this sender (or lost its list): pair again with the code,
            // kept for a retry.
            Handshake::Refused(rej) if rej.code == RejectCode::UnknownSender => {
                *code = Some(bar.suspend(|| obtain_code(opts))?);
            }
            Handshake::Refused(rej) => return Err(refusal(rej, &opts.to, true)),
        }
    }
    let code = code.as_ref().expect("a code by now");
    let (mut r, mut w, peer, rtt) = dial(opts)?;
    let (receiver, remembers) = code_handshake(&mut r, &mut w, code, me, pin.as_ref(), &opts.to)?;
    Ok(Connected { r, w, peer, auth: Auth::Code { store: store.clone(), receiver, remembers }, rtt })
}

fn code_handshake(
    r: &mut FrameReader,
    w: &mut FrameWriter,
    code: &Code,
    me: &Identity,
    pin: Option<&KnownReceiver>,
    to: &str,
) -> Result<([u8; 32], bool), Error> {
    let (st, step1) = handshake::sender_code_start(code, me, Random::System);
    w.handshake(&step1).map_err(|e| w.error("starting the handshake", e.into()))?;
    let step2 = match r.handshake().map_err(|e| r.error("waiting for the handshake", e))? {
        Handshake::Step(s) => s,
        Handshake::Refused(rej) => return Err(refusal(rej, to, false)),
    };
    let reply = handshake::sender_code_reply(st, &step2).map_err(|e| hs_failed(to, e))?;
    if pin.is_some_and(|p| p.key != reply.receiver) {
        return Err(changed_key(to));
    }
    let (receiver, remembers) = (reply.receiver, reply.remembers);
    let (m3, keys) = reply.finish();
    w.handshake(&m3).map_err(|e| w.error("finishing the handshake", e.into()))?;
    handshake::start_records(r, w, (keys.to_receiver, keys.to_sender), true)?;
    Ok((receiver, remembers))
}

/// After the receiver's first record opened: it knew the code, so its key can be pinned.
pub(crate) fn pin(auth: &Auth, to: &str) -> Result<(), Error> {
    if let Auth::Code { store, receiver, remembers } = auth {
        store.pin_receiver(to, *receiver, *remembers)?;
    }
    Ok(())
}

/// The code: `XFER_CODE`, `--code-file` (`-` for standard input), or asked on the terminal.
fn obtain_code(opts: &SendOpts) -> Result<Code, Error> {
    let bad = |e: String| Error::Usage(format!("bad code: {e}"));
    if let Ok(v) = std::env::var("XFER_CODE") {
        return Code::parse(&v).map_err(|e| bad(format!("XFER_CODE: {e}")));
    }
    if let Some(path) = &opts.code_file {
        let mut text = zeroize::Zeroizing::new(String::new());
        let read = if path.as_os_str() == "-" {
            std::io::stdin().lock().take(4096).read_to_string(&mut text)
        } else {
            std::fs::File::open(path).and_then(|f| f.take(4096).read_to_string(&mut text))
        };
        read.map_err(|e| Error::io(format!("cannot read the code from {}", path.display()), e))?;
        return Code::parse(&text).map_err(|e| bad(format!("{}: {e}", path.display())));
    }
    let tty = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty").map_err(|_| {
        Error::Usage(format!(
            "{} needs its code for a first send, and there is no terminal to ask on: set XFER_CODE \
             or use --code-file PATH (or `-` for standard input)",
            opts.to
        ))
    })?;
    let mut out = &tty;
    let mut input = std::io::BufReader::new(&tty);
    for attempt in 1..=3 {
        let _ = write!(out, "xfer: code shown by `xfer recv` at {}: ", opts.to);
        let _ = out.flush();
        let mut line = zeroize::Zeroizing::new(String::new());
        if input.read_line(&mut line).map_err(|e| Error::io("reading the code", e))? == 0 {
            break;
        }
        match Code::parse(&line) {
            Ok(c) => return Ok(c),
            Err(e) if attempt < 3 => {
                let _ = writeln!(out, "xfer: {e}; try again");
            }
            Err(e) => return Err(bad(e)),
        }
    }
    Err(Error::Usage("no code was entered".into()))
}
