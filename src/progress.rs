//! Progress bars and human-readable lines on stderr. indicatif lives here and only here.
//!
//! Bars are drawn only when stderr is a terminal and `--quiet` is off; otherwise every bar is a
//! hidden no-op and log lines go straight to stderr, so pipes and CI logs stay clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A set of bars sharing stderr, plus a way to print lines without tearing them.
#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    quiet: bool,
}

impl Progress {
    /// Bars when stderr is a terminal and not `quiet`; silence otherwise.
    pub fn new(quiet: bool) -> Progress {
        let multi = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)));
        Progress { multi, quiet }
    }

    /// A byte-counting bar: `verb` says what it counts ("hashing", "sending", "receiving").
    pub fn bytes(&self, verb: &str, name: &str, len: u64) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let style = ProgressStyle::with_template(
            "{prefix:>9} {msg:20!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> ");
        let bar = multi.add(ProgressBar::new(len).with_style(style));
        bar.set_prefix(verb.to_string());
        bar.set_message(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// A spinner saying what is being waited for (`set_message` changes it as the wait moves on):
    /// no wait of more than a moment leaves the terminal blank.
    pub fn spinner(&self, what: &str) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template");
        let bar = multi.add(ProgressBar::new_spinner().with_style(style));
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    }

    /// Prints a human-readable line on stderr above any bars. Suppressed by `--quiet` unless
    /// `always` (errors and per-transfer log lines of the receiver are always printed).
    pub fn line(&self, text: &str, always: bool) {
        if self.quiet && !always {
            return;
        }
        match &self.multi {
            Some(m) => m.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }
}

/// Bytes in binary units with one decimal: `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// A rate in binary units per second, from bytes and elapsed time.
pub fn human_rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-6);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 * 1024 * 1024), "10.0 MiB");
        assert_eq!(human_rate(2048, Duration::from_secs(2)), "1.0 KiB/s");
    }
}
