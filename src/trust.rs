//! Keys and whom they are trusted for: this user's identity key, the receivers a sender has
//! paired with (like ssh's known_hosts, but each entry was proven by a code, not trusted on first
//! use), and the senders a receiver run with `--remember` lets in without a code.
//!
//! Everything lives in `$XDG_CONFIG_HOME/xfer/` (or `~/.config/xfer/`), a folder of mode 0700:
//! - `identity`: the X25519 private and public key, hex, one line each, mode 0600;
//! - `known-receivers`: `HOST:PORT KEY SINCE REMEMBERS` a line (REMEMBERS is `remembers` when the
//!   receiver said it keeps paired senders, else `asks`);
//! - `trusted-senders`: `KEY SINCE FROM` a line.
//!
//! Files are rewritten whole through a temporary name of this process and a rename, so a reader
//! never sees half a file. `xfer trust list|forget` reads and edits them.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

use crate::error::Error;

/// A long-lived X25519 key pair: who this user is to the peers it paired with.
pub struct Identity {
    pub private: Zeroizing<[u8; 32]>,
    pub public: [u8; 32],
}

/// A receiver this user paired with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownReceiver {
    pub target: String,
    pub key: [u8; 32],
    pub since: u64,
    /// The receiver keeps paired senders (`--remember`): the next send needs no code.
    pub remembers: bool,
}

/// A sender a `--remember` receiver lets in without a code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedSender {
    pub key: [u8; 32],
    pub since: u64,
    pub from: String,
}

/// The folder of keys and pins.
#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
}

const IDENTITY: &str = "identity";
const RECEIVERS: &str = "known-receivers";
const SENDERS: &str = "trusted-senders";
/// Trust files are small; a larger one is not ours to parse.
const MAX_FILE: u64 = 16 << 20;

/// Edits of the trust files one at a time: within this process (a receiver's connections may
/// remember senders at once) by a mutex, and between processes (`xfer trust forget` while a
/// `--remember` receiver pairs someone) by an exclusive `flock` on `.lock` in the folder. Each edit
/// reads, changes and rewrites a whole file, so two at once would lose one.
static EDITS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held while one edit runs.
struct Editing {
    _file: File,
    _thread: std::sync::MutexGuard<'static, ()>,
}

/// Writes `bytes` to `path` as a new file only this user can read (mode 0600), synced; fails if
/// `path` exists. Secrets and trust files are written this way (then renamed or linked in place).
pub fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TrustStore {
    /// The store of this user: `$XDG_CONFIG_HOME/xfer`, else `$HOME/.config/xfer`.
    pub fn for_user() -> Result<TrustStore, Error> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .ok_or_else(|| {
                Error::Usage(
                    "cannot find a config folder for xfer's keys: set XDG_CONFIG_HOME or HOME".into(),
                )
            })?;
        Ok(TrustStore { dir: base.join("xfer") })
    }

    /// A store in `dir` (tests).
    pub fn at(dir: &Path) -> TrustStore {
        TrustStore { dir: dir.to_path_buf() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits for the right to edit (see [`EDITS`]).
    fn editing(&self) -> Result<Editing, Error> {
        let thread = EDITS.lock().unwrap_or_else(|e| e.into_inner());
        self.ensure_dir()?;
        let path = self.dir.join(".lock");
        let ctx = |e| Error::io(format!("cannot lock {}", path.display()), e);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(ctx)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| ctx(e.into()))?;
        Ok(Editing { _file: file, _thread: thread })
    }

    fn ensure_dir(&self) -> Result<(), Error> {
        let ctx = |e| Error::io(format!("cannot create {}", self.dir.display()), e);
        fs::create_dir_all(&self.dir).map_err(ctx)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(ctx)
    }

    fn read(&self, name: &str) -> Result<String, Error> {
        let path = self.dir.join(name);
        let ctx = |e| Error::io(format!("cannot read {}", path.display()), e);
        match File::open(&path) {
            Ok(f) => {
                let mut s = String::new();
                f.take(MAX_FILE).read_to_string(&mut s).map_err(ctx)?;
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(ctx(e)),
        }
    }

    /// Writes `text` (mode 0600, synced) under a temporary name of this process, to be renamed or
    /// linked to `name`: returns both paths.
    fn write_temp(&self, name: &str, text: &str) -> Result<(PathBuf, PathBuf), Error> {
        self.ensure_dir()?;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let ctx = |e| Error::io(format!("cannot write {}", path.display()), e);
        let _ = fs::remove_file(&tmp);
        write_new_private(&tmp, text.as_bytes()).map_err(ctx)?;
        Ok((tmp, path))
    }

    /// Replaces `name` with `text` atomically (a temporary name of this process, then a rename).
    fn write(&self, name: &str, text: &str) -> Result<(), Error> {
        let (tmp, path) = self.write_temp(name, text)?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
    }

    /// This user's identity, made on first use.
    pub fn identity(&self) -> Result<Identity, Error> {
        let one = self.editing()?;
        let text = Zeroizing::new(self.read(IDENTITY)?);
        let mut lines = text.lines();
        if let (Some(p), Some(q)) = (lines.next(), lines.next()) {
            if let (Some(private), Some(public)) = (unhex32(p.trim()), unhex32(q.trim())) {
                return Ok(Identity { private: Zeroizing::new(private), public });
            }
            return Err(Error::Usage(format!(
                "{} is not an xfer identity file (move it away to make a new identity)",
                self.dir.join(IDENTITY).display()
            )));
        }
        let kp = snow::Builder::new(crate::transport::handshake::XX.parse().expect("valid"))
            .generate_keypair()
            .map_err(|e| Error::io("generating an identity key", std::io::Error::other(e.to_string())))?;
        let mut private = Zeroizing::new([0u8; 32]);
        private.copy_from_slice(&kp.private);
        let mut public = [0u8; 32];
        public.copy_from_slice(&kp.public);
        let text = Zeroizing::new(format!("{}\n{}\n", hex(&*private), hex(&public)));
        // Another xfer may make one at the same moment: the first to link its file wins, and
        // everyone uses that one.
        let (tmp, path) = self.write_temp(IDENTITY, &text)?;
        let ctx = |e| Error::io(format!("cannot write {}", path.display()), e);
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Identity { private, public }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                drop(one);
                self.identity()
            }
            Err(e) => Err(ctx(e)),
        }
    }

    pub fn receivers(&self) -> Result<Vec<KnownReceiver>, Error> {
        Ok(self
            .read(RECEIVERS)?
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(KnownReceiver {
                    target: f.next()?.to_string(),
                    key: unhex32(f.next()?)?,
                    since: f.next()?.parse().ok()?,
                    remembers: f.next()? == "remembers",
                })
            })
            .collect())
    }

    pub fn receiver(&self, target: &str) -> Result<Option<KnownReceiver>, Error> {
        Ok(self.receivers()?.into_iter().find(|r| r.target == target))
    }

    /// Pins `key` for `target` (replacing any earlier pin of that target).
    pub fn pin_receiver(&self, target: &str, key: [u8; 32], remembers: bool) -> Result<(), Error> {
        let _one = self.editing()?;
        let known = self.receivers()?;
        // Already pinned just so: nothing to write (a send that asks for the code every time would
        // otherwise rewrite and sync this file every time).
        if known.iter().any(|r| r.target == target && r.key == key && r.remembers == remembers) {
            return Ok(());
        }
        let mut all: Vec<KnownReceiver> = known.into_iter().filter(|r| r.target != target).collect();
        all.push(KnownReceiver { target: target.to_string(), key, since: now(), remembers });
        self.write_receivers(&all)
    }

    pub fn senders(&self) -> Result<Vec<TrustedSender>, Error> {
        Ok(self
            .read(SENDERS)?
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(TrustedSender {
                    key: unhex32(f.next()?)?,
                    since: f.next()?.parse().ok()?,
                    from: f.next().unwrap_or("?").to_string(),
                })
            })
            .collect())
    }

    pub fn trusts_sender(&self, key: &[u8; 32]) -> Result<bool, Error> {
        Ok(self.senders()?.iter().any(|s| &s.key == key))
    }

    /// Remembers a sender that proved the code (a `--remember` receiver).
    pub fn trust_sender(&self, key: [u8; 32], from: &str) -> Result<(), Error> {
        let _one = self.editing()?;
        let mut all = self.senders()?;
        if all.iter().any(|s| s.key == key) {
            return Ok(());
        }
        all.push(TrustedSender { key, since: now(), from: from.replace(char::is_whitespace, "_") });
        self.write_senders(&all)
    }

    fn write_receivers(&self, all: &[KnownReceiver]) -> Result<(), Error> {
        let line = |r: &KnownReceiver| {
            let how = if r.remembers { "remembers" } else { "asks" };
            format!("{} {} {} {how}\n", r.target, hex(&r.key), r.since)
        };
        self.write(RECEIVERS, &all.iter().map(line).collect::<String>())
    }

    fn write_senders(&self, all: &[TrustedSender]) -> Result<(), Error> {
        let text: String = all.iter().map(|s| format!("{} {} {}\n", hex(&s.key), s.since, s.from)).collect();
        self.write(SENDERS, &text)
    }

    /// Forgets a receiver (by `HOST:PORT` as it was typed) or a sender or receiver (by key, or
    /// a prefix of at least 8 hex digits of it). Returns how many entries went.
    pub fn forget(&self, what: &str) -> Result<usize, Error> {
        let _one = self.editing()?;
        let by_key = |k: &[u8; 32]| what.len() >= 8 && hex(k).starts_with(&what.to_ascii_lowercase());
        let receivers = self.receivers()?;
        let keep: Vec<KnownReceiver> =
            receivers.iter().filter(|r| r.target != what && !by_key(&r.key)).cloned().collect();
        let mut gone = receivers.len() - keep.len();
        if gone > 0 {
            self.write_receivers(&keep)?;
        }
        let senders = self.senders()?;
        let keep: Vec<TrustedSender> = senders.iter().filter(|s| !by_key(&s.key)).cloned().collect();
        if keep.len() < senders.len() {
            gone += senders.len() - keep.len();
            self.write_senders(&keep)?;
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_pins_and_forgetting() {
        let d = tempfile::tempdir().unwrap();
        let s = TrustStore::at(&d.path().join("xfer"));
        let id = s.identity().unwrap();
        assert_eq!(s.identity().unwrap().public, id.public, "made once, then read");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(s.dir()), 0o700);
        assert_eq!(mode(&s.dir().join(IDENTITY)), 0o600);
        s.pin_receiver("h:1", [1; 32], true).unwrap();
        s.pin_receiver("h:2", [2; 32], false).unwrap();
        s.pin_receiver("h:1", [3; 32], false).unwrap();
        assert_eq!(s.receiver("h:1").unwrap().unwrap().key, [3; 32]);
        assert_eq!(s.receivers().unwrap().len(), 2);
        s.trust_sender([9; 32], "127.0.0.1:5 x").unwrap();
        assert!(s.trusts_sender(&[9; 32]).unwrap());
        assert_eq!(s.forget("h:2").unwrap(), 1);
        assert_eq!(s.forget(&hex(&[9; 32])[..8]).unwrap(), 1);
        assert!(!s.trusts_sender(&[9; 32]).unwrap());
        assert_eq!(s.forget("nothing").unwrap(), 0);
    }
}
