//! The `xfer` binary: parse, run, map the error to an exit code, print it once.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use xfer::cli::{Cli, Command};
use xfer::error::{Error, Exit};
use xfer::progress::{Progress, human_bytes, human_rate};
use xfer::recv::Receiver;
use xfer::sanitize::escape;
use xfer::send::{Outcome, send};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            eprintln!("xfer: error: {e}");
            e.exit().into()
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Send(args) => {
            let opts = args.into_opts()?;
            let progress = Progress::new(opts.quiet);
            let r = send(&opts, &progress)?;
            let resumed =
                if r.resumed_at > 0 { format!(", resumed at {} bytes", r.resumed_at) } else { String::new() };
            let outcome = match &r.outcome {
                Outcome::Verified(n) => format!("verified, stored as \"{}\"{resumed}", escape(n)),
                Outcome::AlreadyHad(n) => format!("receiver already has it as \"{}\"", escape(n)),
            };
            println!(
                "\"{}\" {} bytes ({}) in {:.2} s ({}) sha256 {}{}: {outcome}",
                escape(&r.name),
                r.size,
                human_bytes(r.size),
                r.elapsed.as_secs_f64(),
                human_rate(r.size, r.elapsed),
                r.digest,
                if r.cached { " (cached)" } else { "" }
            );
            Ok(())
        }
        Command::Recv(args) => {
            let opts = args.into_opts()?;
            let once = opts.once;
            let receiver = Receiver::bind(opts)?;
            let addr = receiver.local_addr().map_err(|e| Error::io("reading the listening address", e))?;
            // Scripts and tests read this line to learn the port; flush it before anything else.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on {addr}").and_then(|()| out.flush());
            drop(out);
            if once { receiver.serve_once().map(drop) } else { receiver.serve() }
        }
    }
}
