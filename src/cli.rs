//! The command line: clap derive types, turned once into validated [`SendOpts`] / [`RecvOpts`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::Error;
use crate::protocol::{HashAlg, MAX_CHUNK_LEN};
use crate::recv::{Output, RecvOpts, make_scratch};
use crate::sanitize::validate_name;
use crate::send::{DEFAULT_CHUNK_SIZE, SendOpts};

/// The port both sides use when none is given.
pub const DEFAULT_PORT: u16 = 8888;

#[derive(Debug, Parser)]
#[command(
    name = "xfer",
    version,
    about = "Move files between machines over TCP and prove they arrived intact.",
    long_about = "Move files between machines over TCP and prove they arrived intact.\n\n\
        Start a receiver, then send to it:\n\n  \
        xfer recv --dir ./downloads\n  \
        xfer send img.jpg host:8888\n\n\
        The receiver shows a four-word code; the first send to it asks for that code, and \
        everything after a short handshake travels encrypted and authenticated. Every file is \
        hashed (SHA-256) on both sides; the receiver stores it under its final name only after \
        the digests match and the data is on stable storage. The sender exits 0 only when the \
        receiver says so.",
    after_help = "Exit codes: 0 ok, 1 receiver failed, 2 usage, 3 connection, 4 rejected, \
        5 integrity, 6 local I/O, 7 protocol, 8 authentication. See README.md for details."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send files and folders to a running `xfer recv`.
    Send(SendArgs),
    /// Listen for senders and store what they send into a folder.
    Recv(RecvArgs),
    /// List or forget the receivers and senders this user paired with.
    Trust(TrustArgs),
    /// Print a shell completion script: `xfer completions bash > /etc/bash_completion.d/xfer`.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff): `xfer man > xfer.1`, `xfer man send > xfer-send.1`, then
    /// `man ./xfer-send.1`.
    Man {
        /// The subcommand to document (send, recv, trust); none: xfer itself.
        #[arg(value_name = "COMMAND")]
        of: Option<String>,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "Keys and pins live in $XDG_CONFIG_HOME/xfer (or ~/.config/xfer).")]
pub struct TrustArgs {
    #[command(subcommand)]
    pub action: TrustAction,
}

#[derive(Debug, Subcommand)]
pub enum TrustAction {
    /// Show this user's key, the receivers it paired with and the senders it remembers.
    List,
    /// Forget a receiver (HOST:PORT as you typed it when sending) or a key (8+ hex digits).
    /// The next send to that receiver asks for its code again.
    Forget {
        #[arg(value_name = "HOST:PORT|KEY")]
        what: String,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  xfer send img.jpg 192.168.1.20:8888\n  \
    xfer send photos/ notes.txt 192.168.1.20     (one batch; port 8888)\n  \
    tar c photos | xfer send - 192.168.1.20 --as photos.tar     (standard input; no resume)\n\n\
    Prints one summary line on stdout (for one file: name, size, time, rate, SHA-256, outcome; \
    for a batch: totals, and with --verbose a line per entry first); progress and \
    errors go to stderr. Sending the same file again after an interruption resumes it. Exit codes: 0 verified or already there, 2 usage, 3 connection, \
    4 rejected, 5 integrity, 6 local I/O, 7 protocol, 8 authentication, 1 receiver failed.\n\n\
    The first send to a receiver asks for the code it shows (or reads XFER_CODE / --code-file); \
    after that, a receiver run with --remember lets this user in without it.")]
pub struct SendArgs {
    /// Files and folders to send (folders with everything in them); `-` alone sends standard
    /// input as one file named by --as (it cannot resume).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Where the receiver listens: HOST:PORT, HOST (port 8888), or [IPv6]:PORT.
    #[arg(required = true, value_name = "HOST:PORT")]
    pub to: String,
    /// Follow symlinks and send what they point to (default: skip them and say so).
    #[arg(long)]
    pub follow: bool,
    /// Print one line per file and folder on stdout, not just the total.
    #[arg(short, long)]
    pub verbose: bool,
    /// Body chunk size: bytes, or with a K/M suffix (binary), from 1 to 16M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub chunk_size: Option<u32>,
    /// Store under this name instead of its own: a file or a folder, and may be a path inside the
    /// receiver's folder (`--as backups/2024/db.sql`).
    #[arg(long = "as", value_name = "NAME")]
    pub name: Option<String>,
    /// Give up if the receiver takes nothing this long, or owes an answer and says nothing this
    /// long, in seconds (0: wait forever).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Wait this long for a busy receiver: in its line, told how many are ahead, when its transfer
    /// slots are taken; trying again with growing pauses when its connections are (0: give up at
    /// once, exit 4).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub wait: u64,
    /// TCP connections a large file (64 MiB or more) is sent over at once, in 8 MiB parts, 1 to
    /// 8. One stream cannot fill a long fat link (its window per round trip caps it), several
    /// can. `auto`: one per 20 ms of round trip (timed at connect, rounded), so one on a LAN. The receiver
    /// checks the whole file either way.
    #[arg(long, value_name = "N|auto", default_value = "auto", value_parser = parse_streams)]
    pub streams: Streams,
    /// Give up connecting after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Do not use or update the digest cache: always read the file to hash it.
    #[arg(long)]
    pub no_cache: bool,
    /// Hash algorithm: sha256 (default, everywhere) or blake3 (several times faster on CPUs
    /// without SHA extensions). The receiver verifies with the one the sender names.
    #[arg(long, value_name = "ALG", default_value = "sha256", value_parser = parse_hash)]
    pub hash: HashAlg,
    /// No progress bars or notes on stderr (the summary on stdout and errors remain).
    #[arg(short, long)]
    pub quiet: bool,
    /// Print one JSON object a line on stdout (an entry each, then a summary) instead of the
    /// summary lines; README, "Scripts", gives the schema.
    #[arg(long)]
    pub json: bool,
    /// Read the receiver's code from this file (`-`: standard input) instead of asking on the
    /// terminal. XFER_CODE in the environment works too. Codes are never taken on the command line.
    #[arg(long, value_name = "PATH")]
    pub code_file: Option<PathBuf>,
    /// Send in the clear, unauthenticated (the receiver must run with --insecure too). Only on
    /// a network you trust, e.g. for benchmarks.
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  xfer recv --dir ./downloads --listen 0.0.0.0:8888\n  \
    xfer recv --once -o ./restore/db.sql     (one file, stored at that path)\n  \
    xfer recv --once -o - | tar x            (one file to stdout, once verified)\n\n\
    The first line on stdout is `listening on IP:PORT` (with the real port when PORT is 0; on \
    stderr with -o -, where stdout carries only the file). \
    Each finished transfer logs one line on stderr. Files arrive as hidden `.xfer-*.part` files \
    and get their final name only once verified and synced; an interrupted transfer keeps its \
    partial, and sending the same file again resumes it. An existing file with the same \
    content is not sent again; a different one is kept and the new file stored as `name (1).ext` \
    unless --overwrite.")]
pub struct RecvArgs {
    /// Folder to store received files in (created if missing) [default: .]
    #[arg(short, long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// With --once: store the one file at PATH whatever name the sender gave it, replacing
    /// what is there (atomically, once verified); `-`: write it to standard output once verified
    /// (it waits in a hidden partial in --dir, or in a private folder in $TMPDIR). A folder or
    /// several files are refused.
    #[arg(short = 'o', long = "output", value_name = "PATH", requires = "once")]
    pub output: Option<PathBuf>,
    /// Address to listen on: IP:PORT, PORT or :PORT (every interface), or an IP (port 8888).
    /// Port 0 picks a free port.
    #[arg(short, long, value_name = "ADDR", default_value = "0.0.0.0:8888")]
    pub listen: String,
    /// Handle one transfer, then exit with its status.
    #[arg(long)]
    pub once: bool,
    /// Replace an existing file of the same name (atomically) instead of keeping both.
    #[arg(long)]
    pub overwrite: bool,
    /// Transfers served at once (at most half of them from one address); senders past this wait
    /// in line, told their place, for up to 10 minutes.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_transfers: u32,
    /// Drop a sender that is silent this long, in seconds (0: wait forever).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Drop a connection that has not started its list of files within this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout: u64,
    /// Remove partial files of interrupted transfers not touched for this many hours (checked at
    /// start and hourly). Until then, sending the same file again resumes it.
    #[arg(long, value_name = "HOURS", default_value_t = 168)]
    pub keep_partials: u64,
    /// No progress bars on stderr (per-transfer log lines and errors remain).
    #[arg(short, long)]
    pub quiet: bool,
    /// The code senders must prove: read from PATH if it exists (yours, mode 0600), else made
    /// up and written there (mode 0600). XFER_CODE in the environment works too. Without either,
    /// a new code is shown on the terminal.
    #[arg(long, value_name = "PATH")]
    pub code_file: Option<PathBuf>,
    /// Remember senders that proved the code, and let them in later without it (they are
    /// listed by `xfer trust list` and removed by `xfer trust forget`).
    #[arg(long)]
    pub remember: bool,
    /// Accept plaintext, unauthenticated senders only (they must use --insecure too): anyone
    /// who reaches the port can store files, and anyone on the path can read and change them.
    #[arg(long, conflicts_with_all = ["code_file", "remember"])]
    pub insecure: bool,
}

/// `--streams`: a number, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streams(pub Option<u8>);

fn parse_streams(s: &str) -> Result<Streams, String> {
    if s == "auto" {
        return Ok(Streams(None));
    }
    match s.parse::<u8>() {
        Ok(n) if (1..=crate::protocol::MAX_LANES).contains(&n) => Ok(Streams(Some(n))),
        _ => Err(format!("`{s}` is not a number of streams (1 to {}) or auto", crate::protocol::MAX_LANES)),
    }
}

/// Parses a size such as `1024`, `64K`, `64KiB`, `1M`. Suffixes are binary (K = 1024).
fn parse_hash(s: &str) -> Result<HashAlg, String> {
    HashAlg::from_name(&s.to_ascii_lowercase())
        .ok_or_else(|| format!("unknown hash {s:?}: use sha256 or blake3"))
}

fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (try 1024, 64K or 1M)"))?;
    let mul: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("`{s}` has an unknown unit (use K or M)")),
    };
    let v = n.saturating_mul(mul);
    if v == 0 || v > MAX_CHUNK_LEN as u64 {
        return Err(format!("chunk size must be from 1 byte to {MAX_CHUNK_LEN} bytes (16M), got {s}"));
    }
    Ok(v as u32)
}

/// Normalises what people write for `--listen`: `PORT` or `:PORT` (every interface), an address
/// alone (port 8888), `IP:PORT`, `[IPv6]:PORT`, or `HOST:PORT`.
pub fn parse_listen(s: &str) -> Result<String, Error> {
    let bad = || {
        Error::Usage(format!(
            "cannot use `{s}` as --listen (expected IP:PORT, PORT, :PORT, an IP, or [IPv6]:PORT)"
        ))
    };
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad());
    if s.is_empty() {
        return Err(bad());
    }
    if let Some(p) = s.strip_prefix(':').filter(|p| !p.contains(':')) {
        return Ok(format!("0.0.0.0:{}", port(p)?));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(format!("0.0.0.0:{}", port(s)?));
    }
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    if let Ok(ip) = s.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, DEFAULT_PORT).to_string());
    }
    match s.rsplit_once(':') {
        Some((host, p)) if !host.is_empty() && !host.contains(':') => Ok(format!("{host}:{}", port(p)?)),
        _ => Err(bad()),
    }
}

/// Normalises `HOST[:PORT]` to something `ToSocketAddrs` takes, adding the default port.
pub fn parse_target(s: &str) -> Result<String, Error> {
    if s.is_empty() {
        return Err(Error::Usage("the receiver address is empty (expected HOST:PORT)".into()));
    }
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    if let Ok(ip) = s.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, DEFAULT_PORT).to_string());
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            port.parse::<u16>()
                .map_err(|_| Error::Usage(format!("bad port `{port}` in `{s}` (expected HOST:PORT)")))?;
            Ok(s.to_string())
        }
        Some(_) => Err(Error::Usage(format!("cannot parse `{s}` as HOST:PORT (IPv6 needs [addr]:port)"))),
        None => Ok(format!("{s}:{DEFAULT_PORT}")),
    }
}

fn secs(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n))
}

impl SendArgs {
    pub fn into_opts(self) -> Result<SendOpts, Error> {
        let stdin = self.paths.iter().any(|p| p.as_os_str() == "-");
        if stdin && self.paths.len() > 1 {
            return Err(Error::Usage("`-` (standard input) must be the only path to send".into()));
        }
        if stdin && self.name.is_none() {
            return Err(Error::Usage(
                "`xfer send -` needs --as NAME: standard input has no name of its own".into(),
            ));
        }
        if stdin && self.code_file.as_ref().is_some_and(|p| p.as_os_str() == "-") {
            return Err(Error::Usage(
                "--code-file - reads the code from standard input, which `xfer send -` sends: \
                 give the code in a file or XFER_CODE"
                    .into(),
            ));
        }
        if self.name.is_some() && self.paths.len() > 1 {
            return Err(Error::Usage(
                "--as names one file or folder; it cannot be used with several paths".into(),
            ));
        }
        Ok(SendOpts {
            to: parse_target(&self.to)?,
            file: self.paths[0].clone(),
            paths: self.paths,
            follow: self.follow,
            verbose: self.verbose,
            name: self.name,
            chunk_size: self.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
            timeout: secs(self.timeout),
            connect_timeout: Duration::from_secs(self.connect_timeout.max(1)),
            quiet: self.quiet,
            cache: !self.no_cache,
            hash: self.hash,
            insecure: self.insecure,
            code_file: self.code_file,
            wait: Duration::from_secs(self.wait),
            json: self.json,
            stdin,
            streams: self.streams.0,
        })
    }
}

/// Where `-o PATH` or `-o -` puts the file, and the folder the receiver works in.
fn output_and_dir(output: Option<PathBuf>, dir: Option<PathBuf>) -> Result<(Option<Output>, PathBuf), Error> {
    let Some(path) = output else { return Ok((None, dir.unwrap_or_else(|| ".".into()))) };
    if path.as_os_str() == "-" {
        let dir = match dir {
            Some(d) => d,
            None => make_scratch().map_err(|e| Error::io("cannot make a private folder in $TMPDIR", e))?,
        };
        return Ok((Some(Output::Stdout), dir));
    }
    let shown = path.display().to_string();
    if dir.is_some() {
        return Err(Error::Usage(format!(
            "-o {shown} names the file and its folder: leave out --dir (or give -o a path inside it)"
        )));
    }
    if std::fs::metadata(&path).is_ok_and(|m| m.is_dir()) || shown.ends_with('/') {
        return Err(Error::Usage(format!("-o {shown} is a folder: -o names the file to write")));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Usage(format!("-o {shown} has no UTF-8 file name")))?;
    validate_name(name).map_err(|e| Error::Usage(format!("cannot write -o {shown}: {e}")))?;
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    Ok((Some(Output::File(name.to_string())), folder.to_path_buf()))
}

impl RecvArgs {
    pub fn into_opts(self) -> Result<RecvOpts, Error> {
        let (output, dir) = output_and_dir(self.output, self.dir)?;
        // Like `mkdir -p`: `xfer recv --dir ./downloads` works in a fresh folder.
        if !dir.exists() {
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    // The new folder must survive a power cut with the files acknowledged in it.
                    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
                    std::fs::File::open(parent.unwrap_or(std::path::Path::new(".")))
                        .and_then(|d| d.sync_all())
                })
                .map_err(|e| Error::io(format!("cannot create --dir {}", dir.display()), e))?;
        }
        let meta = std::fs::metadata(&dir)
            .map_err(|e| Error::io(format!("cannot use --dir {}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(Error::Usage(format!("--dir {} is not a folder", dir.display())));
        }
        // A receiver that cannot write its folder would fail every sender: say so at start.
        let probe = dir.join(format!(".xfer-probe-{}", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| Error::io(format!("cannot write in --dir {}", dir.display()), e))?;
        Ok(RecvOpts {
            dir,
            listen: parse_listen(&self.listen)?,
            once: self.once,
            // `-o PATH` writes PATH, like `cp` or `curl -o`: what is there is replaced.
            overwrite: self.overwrite || matches!(output, Some(Output::File(_))),
            max_transfers: self.max_transfers as usize,
            timeout: secs(self.timeout),
            handshake_timeout: Duration::from_secs(self.handshake_timeout),
            keep_partials: Duration::from_secs(self.keep_partials.saturating_mul(3600)),
            quiet: self.quiet,
            insecure: self.insecure,
            code_file: self.code_file,
            remember: self.remember,
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1"), Ok(1));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64kib"), Ok(65536));
        assert_eq!(parse_size("16M"), Ok(MAX_CHUNK_LEN));
        assert!(parse_size("0").is_err());
        assert!(parse_size("17M").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("1G").is_err());
        assert!(parse_size("K").is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(parse_target("host:9").unwrap(), "host:9");
        assert_eq!(parse_target("host").unwrap(), "host:8888");
        assert_eq!(parse_target("127.0.0.1").unwrap(), "127.0.0.1:8888");
        assert_eq!(parse_target("[::1]:7").unwrap(), "[::1]:7");
        assert_eq!(parse_target("::1").unwrap(), "[::1]:8888");
        assert!(parse_target("host:notaport").is_err());
        assert!(parse_target("").is_err());
    }

    #[test]
    fn listen_addresses_people_write() {
        let l = |s: &str| parse_listen(s).map_err(|e| e.to_string());
        assert_eq!(l("8892").unwrap(), "0.0.0.0:8892");
        assert_eq!(l(":8892").unwrap(), "0.0.0.0:8892");
        assert_eq!(l("0.0.0.0").unwrap(), "0.0.0.0:8888");
        assert_eq!(l("::1").unwrap(), "[::1]:8888");
        assert_eq!(l("[::1]").unwrap(), "[::1]:8888");
        assert_eq!(l("[::1]:0").unwrap(), "[::1]:0");
        assert_eq!(l("127.0.0.1:0").unwrap(), "127.0.0.1:0");
        assert_eq!(l("localhost:9").unwrap(), "localhost:9");
        for bad in ["", "99999", ":x", "host:", "a:b:c", "1.2.3.4:70000"] {
            assert!(l(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn send_parses() {
        let cli =
            Cli::try_parse_from(["xfer", "send", "f", "h:1", "--chunk-size", "4K", "--as", "g"]).unwrap();
        let Command::Send(a) = cli.command else { panic!("not send") };
        let o = a.into_opts().unwrap();
        assert_eq!((o.chunk_size, o.name.as_deref(), o.to.as_str()), (4096, Some("g"), "h:1"));
        assert!(Cli::try_parse_from(["xfer", "send", "f"]).is_err());
        assert!(Cli::try_parse_from(["xfer", "send", "f", "h", "--chunk-size", "0"]).is_err());
    }
}
