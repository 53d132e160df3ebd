//! Typed errors and the one exit-code table. README lists the same table; `tests/it/exit_codes.rs`
//! checks the binary against it.

use std::io;
use std::process::ExitCode;

use crate::protocol::{ProtocolError, RejectCode, WireError};

/// The documented exit codes of `xfer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Verified, or the receiver already had the file.
    Ok = 0,
    /// The receiver failed for its own reasons (e.g. its disk), or another unexpected failure.
    Failed = 1,
    /// Bad command line or an unusable local argument (clap also uses 2).
    Usage = 2,
    /// Could not connect, the connection dropped, or the peer went silent past the timeout.
    Connection = 3,
    /// The receiver refused the file (bad name, no space, busy).
    Rejected = 4,
    /// The bytes that arrived do not match the size or digest that was offered.
    Integrity = 5,
    /// A local file or folder could not be read or written.
    Io = 6,
    /// The peer is not xfer, speaks another protocol version, or broke the protocol.
    Protocol = 7,
    /// Authentication failed: a wrong code, a receiver whose key changed, a secure side facing
    /// an `--insecure` one, or a handshake someone tampered with.
    Auth = 8,
    /// Stopped by Ctrl-C (SIGINT), as shells report it: 128 + 2.
    Interrupted = 130,
    /// Stopped by SIGTERM: 128 + 15.
    Terminated = 143,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// Everything that can end a send or a receive. Messages are sentence fragments that
/// read well after `xfer: error: `.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to {addr}: {source}{}", connect_hint(source))]
    Connect { addr: String, source: io::Error },
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen { addr: String, source: io::Error, hint: &'static str },
    #[error("connection to {peer} {what}: {source}")]
    Connection { peer: String, what: &'static str, source: io::Error },
    #[error("peer {peer} timed out while {what} (nothing within {} s, see {})", limit.secs, limit.option)]
    Timeout { peer: String, what: &'static str, limit: Limit },
    #[error("receiver rejected {name}: {reason}")]
    Rejected { name: String, code: RejectCode, reason: String },
    #[error("{0}")]
    Integrity(String),
    #[error("receiver failed to store the file: {0}")]
    RemoteFailed(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{peer}: {source}")]
    Protocol { peer: String, source: ProtocolError },
    #[error("{0}")]
    Auth(String),
    /// A transfer cut off after some of it arrived: sending again resumes.
    #[error("{0} (what arrived is kept on the receiver: sending the same files again resumes from there)")]
    Resumable(Box<Error>),
    /// A stream from standard input that failed: nothing of it is kept, it cannot resume.
    #[error(
        "{0} (a stream from standard input cannot resume: nothing of it was stored; send it again from the start)"
    )]
    NotResumable(Box<Error>),
    #[error("{failed} of {total} entries failed; the first: {first}")]
    Batch { failed: usize, total: usize, first: String, code: Exit },
}

impl Error {
    /// The exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Usage(_) => Exit::Usage,
            Error::Connect { .. }
            | Error::Listen { .. }
            | Error::Connection { .. }
            | Error::Timeout { .. } => Exit::Connection,
            Error::Rejected { .. } => Exit::Rejected,
            Error::Integrity(_) => Exit::Integrity,
            Error::RemoteFailed(_) => Exit::Failed,
            Error::Io { .. } => Exit::Io,
            Error::Protocol { .. } => Exit::Protocol,
            Error::Auth(_) => Exit::Auth,
            Error::Resumable(e) | Error::NotResumable(e) => e.exit(),
            Error::Batch { code, .. } => *code,
        }
    }

    /// A local I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }

    /// Maps an error on the connection to a peer: a timeout, a drop, or a protocol violation.
    /// `what` says what this side was doing ("sending the body", "waiting for the verdict");
    /// `limit` is the timeout that applied, for the message.
    pub fn wire(peer: &str, what: &'static str, limit: Limit, e: WireError) -> Error {
        match e {
            WireError::Protocol(source) => Error::Protocol { peer: peer.to_string(), source },
            WireError::Io(source) if source.get_ref().is_some_and(|e| e.is::<ChannelBroken>()) => {
                Error::Auth(format!(
                    "connection to {peer} failed while {what}: {source}; someone may be tampering \
                     with the connection"
                ))
            }
            WireError::Io(source) if is_timeout(&source) => {
                Error::Timeout { peer: peer.to_string(), what, limit }
            }
            WireError::Io(source) if source.kind() == io::ErrorKind::UnexpectedEof => Error::Connection {
                peer: peer.to_string(),
                what: "closed early",
                source: io::Error::new(io::ErrorKind::UnexpectedEof, format!("peer hung up while {what}")),
            },
            WireError::Io(source) => Error::Connection { peer: peer.to_string(), what: "failed", source },
        }
    }
}

/// A record of the secure channel failed to open, or something else arrived where a record was
/// due: the bytes were changed, replayed, reordered or dropped on the way (exit 8).
#[derive(Debug)]
pub struct ChannelBroken(pub String);

impl std::fmt::Display for ChannelBroken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "secure channel broken: {}", self.0)
    }
}

impl std::error::Error for ChannelBroken {}

/// What to check when a connection could not be made.
fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => " (is `xfer recv` running there, on that port? a firewall?)",
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            " (nothing answered: a wrong address, or a firewall dropping the connection?)"
        }
        _ => "",
    }
}

/// A timeout that was in force, and the option that sets it, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub secs: u64,
    pub option: &'static str,
}

/// True for the errors a socket read or write timeout produces on the platforms we run on.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}
