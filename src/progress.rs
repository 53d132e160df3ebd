//! Progress bars and human-readable lines on stderr. indicatif lives here and only here.
//!
//! Bars are drawn only when stderr is a terminal and `--quiet` is off; otherwise every bar is a
//! hidden no-op and log lines go straight to stderr, so pipes and CI logs stay clean.
//!
//! Each bar's line is composed here, not by an indicatif template, to the width stderr's terminal
//! has at each draw (so a resized terminal is followed): the current file (escaped, shortened
//! with `…` in the middle when it does not fit), files done of the total, bytes, the rate and ETA
//! over the bytes that moved in this run only (bytes already there or resumed are skipped, not
//! moved), and the time elapsed; what does not fit is left out in a fixed order, never cut off.
//! indicatif draws through [`StderrTerm`], which reads the same width: console's own `Term` gives
//! up on a terminal that reports 0 rows (a pty created without a size, as `script` makes one from
//! a pipe, after `stty cols 60`) and falls back to 80 columns.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle, TermLike};
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use crate::sanitize::escape;

/// The rate is measured over this much of the recent past: long enough to be steady, short
/// enough that a stalled transfer shows `0 B/s` and `eta -` within seconds.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// A set of bars sharing stderr, plus a way to print lines without tearing them.
#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    quiet: bool,
}

impl Progress {
    /// Bars when stderr is a terminal and not `quiet`; silence otherwise.
    pub fn new(quiet: bool) -> Progress {
        let multi = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let term = StderrTerm::default();
            MultiProgress::with_draw_target(ProgressDrawTarget::term_like_with_hz(Box::new(term), 10))
        });
        Progress { multi, quiet }
    }

    /// A byte-counting bar: `verb` says what it counts ("hashing", "sending", "receiving"),
    /// `name` is the file (shown escaped); `files`, for a batch, is how many files it counts.
    pub fn bytes(&self, verb: &str, name: &str, len: u64, files: Option<usize>) -> Bar {
        let info = Arc::new(Info::new(verb, name, files));
        let Some(multi) = &self.multi else {
            return Bar { bar: ProgressBar::hidden().with_position(0), info };
        };
        let bar = ProgressBar::new(len);
        let shown = Arc::clone(&info);
        let style = ProgressStyle::with_template("{line}").expect("static template").with_key(
            "line",
            move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&shown.bar_line(s, Instant::now(), term_width()));
            },
        );
        let bar = multi.add(bar.with_style(style));
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar { bar, info }
    }

    /// A spinner saying what is being waited for (`set_message` changes it as the wait moves on):
    /// no wait of more than a moment leaves the terminal blank.
    pub fn spinner(&self, what: &str) -> Bar {
        let info = Arc::new(Info::new("", "", None));
        info.set_raw(what);
        let Some(multi) = &self.multi else {
            return Bar { bar: ProgressBar::hidden(), info };
        };
        let shown = Arc::clone(&info);
        let style = ProgressStyle::with_template("{line}").expect("static template").with_key(
            "line",
            move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&shown.spinner_line(s.elapsed(), term_width()));
            },
        );
        let bar = multi.add(ProgressBar::new_spinner().with_style(style));
        bar.enable_steady_tick(Duration::from_millis(100));
        Bar { bar, info }
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

/// A bar or spinner: an indicatif bar (its position counts bytes done) plus what its line shows
/// besides. Derefs to the indicatif bar, so hashing and copying loops advance it as they go.
#[derive(Clone)]
pub struct Bar {
    bar: ProgressBar,
    info: Arc<Info>,
}

impl Deref for Bar {
    type Target = ProgressBar;
    fn deref(&self) -> &ProgressBar {
        &self.bar
    }
}

impl Bar {
    /// A bar that draws nothing.
    pub fn hidden() -> Bar {
        Bar { bar: ProgressBar::hidden(), info: Arc::new(Info::new("", "", None)) }
    }

    /// The file now being worked on (escaped here; not at all for a bar that draws nothing: a
    /// batch names every file).
    pub fn set_name(&self, name: &str) {
        if self.bar.is_hidden() {
            return;
        }
        self.info.set_raw(&escape(name));
    }

    /// A spinner's text (already fit to print).
    pub fn set_message(&self, text: impl Into<String>) {
        self.info.set_raw(&text.into());
    }

    /// One more file is done (verified, already there, or failed).
    pub fn file_done(&self) {
        self.info.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Files done so far.
    pub fn files_done(&self) -> usize {
        self.info.done.load(Ordering::Relaxed)
    }

    /// `n` bytes are done without moving in this run (already there, resumed, given up): they
    /// advance the bar but not the rate or the ETA.
    pub fn skip(&self, n: u64) {
        self.info.skipped.fetch_add(n, Ordering::Relaxed);
        self.bar.inc(n);
    }

    /// Bytes that moved in this run (the position less what was skipped).
    pub fn moved(&self) -> u64 {
        self.bar.position().saturating_sub(self.info.skipped.load(Ordering::Relaxed))
    }
}

/// What a bar's line shows besides its position and length.
struct Info {
    verb: String,
    /// The current file, escaped (a spinner's text).
    name: Mutex<String>,
    /// Files done of `files` (a batch); a single file shows no count.
    done: AtomicUsize,
    files: Option<usize>,
    /// Bytes of the position that did not move in this run.
    skipped: AtomicU64,
    /// Recent (time, moved bytes) samples, taken as the bar is drawn, for the rate.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Info {
    fn new(verb: &str, name: &str, files: Option<usize>) -> Info {
        Info {
            verb: verb.to_string(),
            name: Mutex::new(escape(name)),
            done: AtomicUsize::new(0),
            files,
            skipped: AtomicU64::new(0),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    fn set_raw(&self, text: &str) {
        *self.name.lock().unwrap_or_else(|e| e.into_inner()) = text.to_string();
    }

    /// The recent rate of moved bytes, per second; `None` until there is enough to tell.
    fn rate(&self, now: Instant, moved: u64) -> Option<f64> {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.back().is_none_or(|(t, _)| now.saturating_duration_since(*t) >= Duration::from_millis(100))
        {
            samples.push_back((now, moved));
        }
        // Keep one sample at least RATE_WINDOW old, so the window is full once it can be.
        while samples.len() > 2 && now.saturating_duration_since(samples[1].0) >= RATE_WINDOW {
            samples.pop_front();
        }
        let (t0, m0) = *samples.front()?;
        let span = now.saturating_duration_since(t0).as_secs_f64();
        (span >= 0.5).then(|| moved.saturating_sub(m0) as f64 / span)
    }

    fn bar_line(&self, s: &ProgressState, now: Instant, width: usize) -> String {
        let (pos, len) = (s.pos(), s.len().unwrap_or(0));
        let moved = pos.saturating_sub(self.skipped.load(Ordering::Relaxed));
        let rate = self.rate(now, moved);
        let name = self.name.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let files = self.files.map(|t| (self.done.load(Ordering::Relaxed).min(t), t));
        Line { verb: &self.verb, name: &name, files, pos, len, rate, elapsed: s.elapsed() }.fit(width)
    }

    fn spinner_line(&self, elapsed: Duration, width: usize) -> String {
        const FRAMES: [char; 8] = ['⠁', '⠂', '⠄', '⡀', '⢀', '⠠', '⠐', '⠈'];
        let frame = FRAMES[(elapsed.as_millis() / 100) as usize % FRAMES.len()];
        let text = self.name.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let line = format!("{frame} {text} ({})", clock(elapsed));
        shorten_end(&line, width.saturating_sub(1))
    }
}

/// The parts of a bar's line, fit to a width by [`Line::fit`].
struct Line<'a> {
    verb: &'a str,
    name: &'a str,
    files: Option<(usize, usize)>,
    pos: u64,
    len: u64,
    rate: Option<f64>,
    elapsed: Duration,
}

impl Line<'_> {
    /// The line in at most `width - 1` columns (the last column is left alone, so no terminal
    /// wraps it). Left out as room runs short, in this order: the bar, the elapsed time, the word
    /// "files", the rate, the file count; the name shrinks (with `…`) down to 12 columns first.
    fn fit(&self, width: usize) -> String {
        let width = width.saturating_sub(1);
        // Room to breathe on a wide terminal: aligned verbs, two spaces between parts.
        let (verb, sep) =
            if width >= 100 { (format!("{:<9}", self.verb), "  ") } else { (self.verb.to_string(), " ") };
        let (pos, len) = (human_bytes(self.pos), human_bytes(self.len));
        let bytes = match (pos.split_once(' '), len.split_once(' ')) {
            // One unit for both: `24.0/48.0 MiB`.
            (Some((p, u)), Some((l, v))) if u == v => format!("{p}/{l} {u}"),
            _ => format!("{pos}/{len}"),
        };
        let rate = match self.rate {
            Some(r) => format!("{}/s", human_bytes(r as u64)),
            None => "- B/s".to_string(),
        };
        let eta = match self.rate {
            Some(r) if r >= 1.0 => {
                let left = self.len.saturating_sub(self.pos) as f64 / r;
                format!("eta {}", clock(Duration::from_secs_f64(left.min(1e7))))
            }
            _ if self.pos >= self.len => "eta 0:00".to_string(),
            _ => "eta -".to_string(),
        };
        let elapsed = format!("elapsed {}", clock(self.elapsed));
        let files = self.files.map(|(d, t)| (format!("{d}/{t} files"), format!("{d}/{t}")));
        let name_w = self.name.width();
        // (elapsed, "files" word, rate, file count) kept, richest first.
        let plans = [
            (true, true, true, true),
            (false, true, true, true),
            (false, false, true, true),
            (false, false, false, true),
            (false, false, false, false),
        ];
        for (i, &(with_elapsed, files_word, with_rate, with_files)) in plans.iter().enumerate() {
            let mut tail = Vec::new();
            if with_files && let Some((long, short)) = &files {
                tail.push(if files_word { long.as_str() } else { short.as_str() });
            }
            tail.push(&bytes);
            if with_rate {
                tail.push(&rate);
            }
            tail.push(&eta);
            if with_elapsed {
                tail.push(&elapsed);
            }
            let tail = tail.join(sep);
            let fixed = verb.width() + 1 + sep.len() + tail.width();
            let last = i == plans.len() - 1;
            let min_name = if last { 1 } else { name_w.min(12) };
            if fixed + min_name > width && !last {
                continue;
            }
            let room = width.saturating_sub(fixed);
            // The name first, up to all of it; the bar takes what is left if that is worth it.
            let name_room = if name_w + 14 <= room {
                name_w
            } else if room >= 50 {
                room - 24
            } else {
                room
            };
            let name = shorten_middle(self.name, name_room);
            let left = room.saturating_sub(name.width());
            let bar = if left >= 12 {
                let inner = (left - 2 - sep.len()).min(40);
                let filled = if self.len == 0 {
                    inner
                } else {
                    (inner as u128 * self.pos as u128 / self.len as u128) as usize
                };
                let filled = filled.min(inner);
                format!("{sep}[{}{}]", "#".repeat(filled), "-".repeat(inner - filled))
            } else {
                String::new()
            };
            let name = if name.is_empty() { name } else { format!(" {name}") };
            let line = format!("{verb}{name}{bar}{sep}{tail}");
            return shorten_end(&line, width);
        }
        unreachable!("the last plan always returns")
    }
}

/// `s` in at most `width` columns: cut in the middle with `…` when it is wider (the end of a
/// path, its file name, is what tells files apart, so it keeps the larger part).
pub fn shorten_middle(s: &str, width: usize) -> String {
    if s.width() <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let budget = width - 1;
    let head_w = budget / 3;
    let mut head = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > head_w {
            break;
        }
        head.push(c);
        used += w;
    }
    let tail_w = budget - used;
    let mut tail: Vec<char> = Vec::new();
    let mut used = 0;
    for c in s.chars().rev() {
        let w = c.width().unwrap_or(0);
        if used + w > tail_w {
            break;
        }
        tail.push(c);
        used += w;
    }
    tail.reverse();
    format!("{head}…{}", tail.into_iter().collect::<String>())
}

/// `s` in at most `width` columns: cut at the end with `…` when it is wider.
pub fn shorten_end(s: &str, width: usize) -> String {
    if s.width() <= width {
        return s.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > width {
            break;
        }
        out.push(c);
        used += w;
    }
    if width > 0 {
        out.push('…');
    }
    out
}

/// `0:07`, `12:34`, `1:02:03`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 { format!("{h}:{m:02}:{s:02}") } else { format!("{m}:{s:02}") }
}

/// Columns of the terminal on stderr, asked at each draw (a resize is followed); 80 when it
/// cannot tell. Only the columns count: a pty may report 0 rows and still have its width.
fn term_width() -> usize {
    match rustix::termios::tcgetwinsize(std::io::stderr()) {
        Ok(w) if w.ws_col > 0 => usize::from(w.ws_col),
        _ => 80,
    }
}

/// Rows of the terminal on stderr; 24 when it cannot tell.
fn term_height() -> u16 {
    match rustix::termios::tcgetwinsize(std::io::stderr()) {
        Ok(w) if w.ws_row > 0 => w.ws_row,
        _ => 24,
    }
}

/// stderr as indicatif's terminal, with the width from [`term_width`]. Output is buffered until
/// indicatif flushes, so a redraw reaches the terminal in one write.
#[derive(Debug, Default)]
struct StderrTerm {
    buf: Mutex<Vec<u8>>,
}

impl StderrTerm {
    fn put(&self, s: &str) -> std::io::Result<()> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn cursor(&self, n: usize, code: char) -> std::io::Result<()> {
        if n > 0 { self.put(&format!("\x1b[{n}{code}")) } else { Ok(()) }
    }
}

impl TermLike for StderrTerm {
    fn width(&self) -> u16 {
        u16::try_from(term_width()).unwrap_or(u16::MAX)
    }
    fn height(&self) -> u16 {
        term_height()
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'A')
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'B')
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'C')
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        self.cursor(n, 'D')
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(s)?;
        self.put("\n")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        let bytes = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()));
        let mut err = std::io::stderr().lock();
        err.write_all(&bytes)?;
        err.flush()
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

/// What moved, for a summary: `nothing sent`, or the bytes that moved and their rate, and what
/// was resumed besides (`12.0 MiB sent at 240.1 MiB/s, 276.1 MiB resumed`). The rate counts
/// moved bytes only.
pub fn moved(verb: &str, bytes: u64, resumed: u64, elapsed: Duration) -> String {
    let mut out = if bytes == 0 {
        format!("nothing {verb}")
    } else {
        format!("{} {verb} at {}", human_bytes(bytes), human_rate(bytes, elapsed))
    };
    if resumed > 0 {
        let _ = write!(out, ", {} resumed", human_bytes(resumed));
    }
    out
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
        assert_eq!(moved("sent", 0, 0, Duration::from_secs(1)), "nothing sent");
        assert_eq!(
            moved("sent", 2048, 1024, Duration::from_secs(2)),
            "2.0 KiB sent at 1.0 KiB/s, 1.0 KiB resumed"
        );
    }

    #[test]
    fn shortening_says_so() {
        assert_eq!(shorten_middle("abcdefghij", 10), "abcdefghij");
        let s = shorten_middle("photos/2024/summer/IMG_0001.jpg", 16);
        assert_eq!(s.width(), 16);
        assert!(s.contains('…') && s.ends_with("_0001.jpg"), "{s}");
        assert_eq!(shorten_end("abcdef", 4), "abc…");
        // Wide characters count as two columns.
        assert!(shorten_middle("日本語のファイル名.txt", 9).width() <= 9);
    }

    #[test]
    fn lines_fit_every_width() {
        let name = "a/very/long/folder/name/with/a/file/at/the/end/of/it.tar.gz";
        for width in [20, 40, 60, 80, 120, 200] {
            for files in [None, Some((9_999, 10_000))] {
                let l = Line {
                    verb: "receiving",
                    name,
                    files,
                    pos: 1000 << 20,
                    len: 1023 << 30,
                    rate: Some(1023.9 * 1024.0),
                    elapsed: Duration::from_secs(3725),
                };
                let s = l.fit(width);
                assert!(s.width() < width, "{width}: {s:?} is {} wide", s.width());
                assert!(width < 40 || s.contains("eta"), "{width}: {s:?}");
                if (60..120).contains(&width) {
                    assert!(s.contains('…') && s.contains("1023.0 GiB"), "{width}: {s:?}");
                }
                if width >= 200 {
                    assert!(s.contains(name) && s.contains("elapsed") && s.contains('['), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn no_eta_while_nothing_moves() {
        let l = Line {
            verb: "sending",
            name: "f",
            files: None,
            pos: 5,
            len: 10,
            rate: Some(0.0),
            elapsed: Duration::ZERO,
        };
        let s = l.fit(80);
        assert!(s.contains(" 0 B/s eta -"), "{s}");
    }
}
