//! The receiver's keys and code: its identity, the code senders must prove (with its guess
//! budget), and where paired senders are remembered.
//!
//! The code comes from `XFER_CODE`, from `--code-file` (read if the file exists, else made up and
//! written there, mode 0600), or is made up and shown on the terminal. A receiver with none of
//! these refuses to start: a code nobody can read would lock every sender out.

use std::io::{IsTerminal, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::RecvOpts;
use super::guard::{AUTH_MAX_WRONG, Guard};
use crate::code::Code;
use crate::error::Error;
use crate::progress::Progress;
use crate::trust::{Identity, TrustStore, write_new_private};

/// What a secure receiver holds.
pub(crate) struct Secure {
    pub identity: Identity,
    pub guard: Guard,
    /// `--remember`: the store paired senders go into.
    pub remember: Option<TrustStore>,
    /// What to say on the terminal at start: the code itself when it is shown there.
    pub notice: String,
}

/// Where a code came from decides what retiring it means.
enum Source {
    /// Made up here and shown on the terminal.
    Shown,
    /// Made up here and written to this file.
    Written(PathBuf),
    /// The operator's (`XFER_CODE` or an existing `--code-file`): it just stops working.
    Operator,
}

/// The comment `write_code_file` puts under a code it made up: such a file's code is replaced
/// when retired, also after a restart; an operator's own file is never rewritten.
const MADE_UP: &str = "# made up by xfer recv: replaced by a new one after too many wrong guesses";

/// The code in `path`, and whether xfer made it up (see [`MADE_UP`]).
fn read_code_file(path: &Path) -> Result<(Code, bool), Error> {
    let ctx = |e| Error::io(format!("cannot read --code-file {}", path.display()), e);
    let f = std::fs::File::open(path).map_err(ctx)?;
    let meta = f.metadata().map_err(ctx)?;
    let uid = rustix::process::getuid().as_raw();
    if !meta.is_file() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::Usage(format!(
            "--code-file {} must be a file of yours that only you can read (chmod 600 it)",
            path.display()
        )));
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    f.take(4096).read_to_string(&mut text).map_err(ctx)?;
    let code = Code::parse(&text)
        .map_err(|e| Error::Usage(format!("bad code in --code-file {}: {e}", path.display())))?;
    Ok((code, text.lines().any(|l| l.trim() == MADE_UP)))
}

/// Writes a made-up code to `path`: a new file (mode 0600) or a rewrite through a temporary name.
fn write_code_file(path: &Path, code: &Code, fresh: bool) -> std::io::Result<()> {
    let tmp = if fresh {
        path.to_path_buf()
    } else {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{}.tmp", std::process::id()));
        path.with_file_name(name)
    };
    let text = zeroize::Zeroizing::new(format!("{}\n{MADE_UP}\n", code.expose()));
    write_new_private(&tmp, text.as_bytes())?;
    if !fresh {
        std::fs::rename(&tmp, path)?;
    }
    Ok(())
}

impl Secure {
    pub(crate) fn setup(opts: &RecvOpts, progress: &Progress) -> Result<Secure, Error> {
        let store = TrustStore::for_user()?;
        let identity = store.identity()?;
        let (code, source) = if let Ok(v) = std::env::var("XFER_CODE") {
            (
                Code::parse(&v).map_err(|e| Error::Usage(format!("bad code in XFER_CODE: {e}")))?,
                Source::Operator,
            )
        } else if let Some(path) = &opts.code_file {
            if path.exists() {
                match read_code_file(path)? {
                    (code, true) => (code, Source::Written(path.clone())),
                    (code, false) => (code, Source::Operator),
                }
            } else {
                let code = Code::generate();
                write_code_file(path, &code, true)
                    .map_err(|e| Error::io(format!("cannot write --code-file {}", path.display()), e))?;
                (code, Source::Written(path.clone()))
            }
        } else if std::io::stderr().is_terminal() {
            (Code::generate(), Source::Shown)
        } else {
            return Err(Error::Usage(
                "xfer recv needs a code for senders to prove, and stderr is not a terminal to show \
                 one on: use --code-file PATH (a new code is written there) or set XFER_CODE; or \
                 --insecure on a network you trust"
                    .into(),
            ));
        };
        let remember =
            if opts.remember { "; senders that pair once are remembered (xfer trust list)" } else { "" };
        let notice = match &source {
            Source::Shown => format!(
                "xfer: code for senders: {}  (they type it when xfer send asks; it stays valid while \
                 this receiver runs{remember})",
                code.expose()
            ),
            Source::Written(path) => format!(
                "xfer: the code for senders is in {} (xfer send --code-file reads it){remember}",
                path.display()
            ),
            Source::Operator => format!("xfer: senders prove the code you set{remember}"),
        };
        let progress = progress.clone();
        let renew: super::guard::Renew = Box::new(move || {
            let new = Code::generate();
            match &source {
                Source::Operator => {
                    progress.line(
                        &format!(
                            "xfer: the code was retired after {AUTH_MAX_WRONG} wrong guesses; restart \
                             xfer recv with a new code to accept new senders"
                        ),
                        true,
                    );
                    None
                }
                Source::Shown => {
                    progress.line(
                        &format!(
                            "xfer: the code was retired after {AUTH_MAX_WRONG} wrong guesses; the new \
                             code is: {}",
                            new.expose()
                        ),
                        true,
                    );
                    Some(new)
                }
                // Fails closed: a code that cannot be written where senders' operators look is
                // no code at all.
                Source::Written(path) => match write_code_file(path, &new, false) {
                    Ok(()) => {
                        progress.line(
                            &format!(
                                "xfer: the code was retired after {AUTH_MAX_WRONG} wrong guesses; a new \
                                 one is in {}",
                                path.display()
                            ),
                            true,
                        );
                        Some(new)
                    }
                    Err(e) => {
                        progress
                            .line(&format!("xfer: cannot write a new code to {}: {e}", path.display()), true);
                        None
                    }
                },
            }
        });
        let remember = opts.remember.then_some(store);
        Ok(Secure { identity, guard: Guard::new(code, renew), remember, notice })
    }
}
