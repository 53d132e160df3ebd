//! The `xfer` binary: parse, run, map the error to an exit code, print it once.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use xfer::cli::{Cli, Command, TrustAction};
use xfer::error::{Error, Exit};
use xfer::progress::{Progress, human_bytes, human_rate, moved};
use xfer::recv::Receiver;
use xfer::sanitize::escape;
use xfer::send::{EntryOutcome, Report, send};
use xfer::trust::{TrustStore, hex};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(msg) = misplaced_option(&e) {
                eprintln!("xfer: error: {msg}");
                return Exit::Usage.into();
            }
            e.exit()
        }
    };
    exit_on_signals(matches!(cli.command, Command::Recv(_)));
    let result = run(cli);
    // `recv -o -` without --dir kept its partial in a private folder of its own.
    xfer::recv::remove_scratch();
    match result {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            eprintln!("xfer: error: {e}");
            e.exit().into()
        }
    }
}

/// An option given to the side it does not belong to (`xfer send --overwrite`): clap would suggest
/// `-- --overwrite`, which is not what anyone means.
fn misplaced_option(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    const RECV: &[&str] = &[
        "--overwrite",
        "--remember",
        "--once",
        "--dir",
        "--listen",
        "--max-transfers",
        "--keep-partials",
        "--handshake-timeout",
        "--output",
        "-o",
    ];
    const SEND: &[&str] =
        &["--as", "--follow", "--hash", "--chunk-size", "--no-cache", "--connect-timeout", "--verbose"];
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else { return None };
    let flag = arg.split('=').next().unwrap_or(arg);
    let sub = std::env::args().nth(1).unwrap_or_default();
    let why = |side: &str, other: &str, what: &str| {
        format!("{flag} is an option of `xfer {side}`, not `xfer {other}`: {what}")
    };
    match sub.as_str() {
        "send" if RECV.contains(&flag) => {
            Some(why("recv", "send", "the receiver decides where and how files are stored"))
        }
        "recv" if SEND.contains(&flag) => {
            Some(why("send", "recv", "the sender chooses what and how it sends"))
        }
        _ => None,
    }
}

/// Ctrl-C (SIGINT) or SIGTERM ends xfer at once, with 130 or 143, after one line on stderr; a
/// receiver with no transfer under way stops quietly with 0 (nothing was cut short).
/// Nothing needs tidying first: a file gets its final name only by a rename after it was
/// verified, and partials are meant to stay for a resume, so stopping at any instant leaves no
/// unverified file under a final name.
///
/// Saying so can block (stderr a full pipe, a terminal paused with Ctrl-S): a second signal
/// then ends the process from the signal handler itself, without writing anything.
fn exit_on_signals(receiving: bool) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let code = |signal| if signal == SIGINT { Exit::Interrupted } else { Exit::Terminated };
    let seen = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // In this order: the shutdown checks the flag the first signal has not set yet.
        let _ =
            signal_hook::flag::register_conditional_shutdown(signal, code(signal) as i32, Arc::clone(&seen));
        let _ = signal_hook::flag::register(signal, Arc::clone(&seen));
    }
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            xfer::recv::remove_scratch();
            if receiving && xfer::recv::transfers_in_flight() == 0 {
                std::process::exit(0);
            }
            let what = if signal == SIGINT { "interrupted" } else { "terminated" };
            eprintln!("xfer: {what}; partial files stay on the receiver, and sending again resumes them");
            std::process::exit(code(signal) as i32);
        }
    });
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Send(args) => {
            let opts = args.into_opts()?;
            let progress = Progress::new(opts.quiet);
            if opts.json {
                return report_json(send(&opts, &progress), &opts);
            }
            let r = send(&opts, &progress)?;
            if r.single { report_single(r, &opts) } else { report_batch(&r, opts.verbose) }
        }
        Command::Recv(args) => {
            let opts = args.into_opts()?;
            let once = opts.once;
            let to_stdout = opts.output == Some(xfer::recv::Output::Stdout);
            let receiver = Receiver::bind(opts)?;
            let addr = receiver.local_addr().map_err(|e| Error::io("reading the listening address", e))?;
            // Scripts and tests read this line to learn the port; flush it before anything else.
            // With `-o -` stdout carries the file and nothing else: the line goes to stderr.
            if to_stdout {
                eprintln!("listening on {addr}");
            } else {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "listening on {addr}").and_then(|()| out.flush());
            }
            let notice = receiver.notice();
            if !notice.is_empty() {
                eprintln!("{notice}");
            }
            if once { receiver.serve_once().map(drop) } else { receiver.serve() }
        }
        Command::Trust(args) => trust(args.action),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "xfer", &mut out);
            print_all(&out, "the completion script")
        }
        Command::Man { of } => {
            let top = <Cli as clap::CommandFactory>::command();
            let cmd = match of.as_deref() {
                None => top,
                Some(name @ ("send" | "recv" | "trust")) => {
                    let page: &'static str = match name {
                        "send" => "xfer-send",
                        "recv" => "xfer-recv",
                        _ => "xfer-trust",
                    };
                    top.find_subcommand(name).cloned().expect("a subcommand of xfer").name(page)
                }
                Some(name) => {
                    return Err(Error::Usage(format!("no subcommand {name:?} (send, recv, trust)")));
                }
            };
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out).map_err(|e| Error::io("making the man page", e))?;
            print_all(&out, "the man page")
        }
    }
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn print_all(bytes: &[u8], what: &str) -> Result<(), Error> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io(format!("writing {what}"), e)),
        _ => Ok(()),
    }
}

/// `1 entry`, `2 entries`.
fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `xfer trust list|forget`.
fn trust(action: TrustAction) -> Result<(), Error> {
    let store = TrustStore::for_user()?;
    match action {
        TrustAction::List => {
            let me = store.identity()?;
            println!("this user's key: {}", hex(&me.public));
            for r in store.receivers()? {
                let how = if r.remembers { "no code needed" } else { "asks for its code" };
                println!("receiver {} key {} paired {} ({how})", r.target, hex(&r.key), r.since);
            }
            for s in store.senders()? {
                println!("sender key {} from {} since {}", hex(&s.key), s.from, s.since);
            }
            Ok(())
        }
        TrustAction::Forget { what } => match store.forget(&what)? {
            0 => Err(Error::Usage(format!("nothing paired matches {what:?} (see xfer trust list)"))),
            n => {
                println!("forgot {n} entr{}", if n == 1 { "y" } else { "ies" });
                Ok(())
            }
        },
    }
}

/// `--json`: the lines on stdout, then the same exit code (and stderr line) as without it.
fn report_json(result: Result<Report, Error>, opts: &xfer::send::SendOpts) -> Result<(), Error> {
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            println!("{}", xfer::send::json::error(&e));
            return Err(e);
        }
    };
    for l in xfer::send::json::report(&r, opts.hash) {
        println!("{l}");
    }
    let failed = r.entries.iter().filter(|e| matches!(e.outcome, EntryOutcome::Failed(_))).count();
    match r.worst() {
        Some(e) => Err(Error::Batch { failed, total: r.entries.len(), first: e.to_string(), code: e.exit() }),
        None => Ok(()),
    }
}

/// Prints a single file's outcome on stdout, or returns its failure as the error.
fn report_single(mut r: Report, opts: &xfer::send::SendOpts) -> Result<(), Error> {
    let e = r.entries.swap_remove(0);
    let outcome = match &e.outcome {
        EntryOutcome::Failed(_) => {
            let EntryOutcome::Failed(err) = e.outcome else { unreachable!() };
            return Err(err);
        }
        EntryOutcome::Verified(n) => {
            let resumed =
                if e.offset > 0 { format!(", resumed at {} bytes", e.offset) } else { String::new() };
            format!("verified, stored as \"{}\"{resumed}", escape(n))
        }
        EntryOutcome::AlreadyThere(n) => format!("receiver already has it as \"{}\"", escape(n)),
    };
    let digest = e.digest.map(|d| d.to_hex()).unwrap_or_default();
    // What moved: a rate only for bytes that did (none when the receiver had it, the rest only
    // after a resume).
    let moved = match &e.outcome {
        EntryOutcome::AlreadyThere(_) => "nothing sent".to_string(),
        _ if e.offset > 0 => moved("sent", e.size - e.offset, e.offset, r.elapsed),
        _ => human_rate(e.size, r.elapsed),
    };
    println!(
        "\"{}\" {} bytes ({}) in {:.2} s ({moved}) {} {digest}{}: {outcome}",
        escape(&e.path),
        e.size,
        human_bytes(e.size),
        r.elapsed.as_secs_f64(),
        opts.hash,
        if e.cached { " (cached)" } else { "" }
    );
    Ok(())
}

/// Prints a batch's outcome on stdout (per entry with `--verbose`, then one total line) and turns
/// failures into the error that sets the exit code.
fn report_batch(r: &Report, verbose: bool) -> Result<(), Error> {
    let mut failed = 0;
    let (mut verified, mut there) = (0, 0);
    for e in &r.entries {
        let (path, is_dir, outcome) = (&e.path, &e.is_dir, &e.outcome);
        let shown = if *is_dir { format!("{}/", escape(path)) } else { escape(path) };
        let line = match outcome {
            EntryOutcome::Verified(stored) | EntryOutcome::AlreadyThere(stored) => {
                // The totals count files, as the receiver's do; folders are counted apart.
                let word = if let EntryOutcome::Verified(_) = outcome {
                    verified += usize::from(!is_dir);
                    "verified"
                } else {
                    there += usize::from(!is_dir);
                    "already there"
                };
                // The receiver may have stored it under a keep-both name.
                if stored != path && !is_dir {
                    format!("{word} \"{shown}\" as \"{}\"", escape(stored))
                } else {
                    format!("{word} \"{shown}\"")
                }
            }
            EntryOutcome::Failed(e) => {
                failed += 1;
                format!("failed \"{shown}\": {e}")
            }
        };
        if verbose {
            println!("{line}");
        }
    }
    let resumed = if r.resumed > 0 { format!(", resumed past {} bytes", r.resumed) } else { String::new() };
    // A rate only for bytes that moved: a batch that was all there sent nothing.
    let sent = if r.sent == 0 {
        format!(
            "nothing sent{}",
            if resumed.is_empty() { String::new() } else { format!(" ({})", &resumed[2..]) }
        )
    } else {
        format!("{} sent ({}{resumed})", human_bytes(r.sent), human_rate(r.sent, r.elapsed))
    };
    let folders = r.entries.iter().filter(|e| e.is_dir).count();
    let folders =
        if folders > 0 { format!(", {}", plural(folders, "folder", "folders")) } else { String::new() };
    println!(
        "{} ({}{folders}, {}) in {:.2} s, {sent}: {verified} verified, {there} already there, {failed} failed, {} skipped",
        plural(r.entries.len(), "entry", "entries"),
        plural(r.files, "file", "files"),
        human_bytes(r.bytes),
        r.elapsed.as_secs_f64(),
        r.skipped.len()
    );
    match r.worst() {
        Some(e) => Err(Error::Batch { failed, total: r.entries.len(), first: e.to_string(), code: e.exit() }),
        None => Ok(()),
    }
}
