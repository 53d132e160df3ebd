//! Progress bars appear on a terminal and nowhere else, and fit it. A pseudo-terminal comes from
//! util-linux `script`, which is on every Debian machine; `stty cols N` inside it sets its width
//! (its rows stay 0 when the test's stdin is not a terminal, as under `cargo test`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xfer::protocol::{Answer, AnswersPart, Message};

use crate::hostile_receiver::{acceptance, fake, read_digest, say, until_closed};
use crate::util::{BIN, Receiver, random_bytes, source_file, test_cache_home};

fn send_under_pty(extra: &str) -> String {
    let rx = Receiver::start(&["--quiet"]);
    let (_src, path) = source_file("big.bin", &random_bytes(48 * 1024 * 1024, 5));
    let cmd = format!("{BIN} send --insecure {} {} {extra} 2>&1", path.display(), rx.target());
    let out = Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().expect("run script(1)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the shell command `cmd` under a pseudo-terminal `cols` wide, with this test's cache;
/// returns whether it succeeded and everything drawn on the terminal.
pub(crate) fn under_pty(cols: u16, cmd: &str) -> (bool, String) {
    let line = format!("stty cols {cols}; {cmd}");
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("XDG_CACHE_HOME", test_cache_home())
        .stdin(Stdio::null())
        .output()
        .expect("run script(1)");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a terminal `cols` wide shows, row by row: the output split where the cursor moves
/// (`\r`, `\n`, escape sequences), each piece cut into rows of `cols` characters as the terminal
/// wraps it. Pieces that `skip` says are log lines (whole lines of text, allowed to wrap) are left
/// out.
fn rows(tty: &str, cols: usize, skip: impl Fn(&str) -> bool) -> Vec<String> {
    let mut pieces = vec![String::new()];
    let mut chars = tty.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final-byte.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() || c == '~' {
                            break;
                        }
                    }
                }
                pieces.push(String::new());
            }
            '\r' | '\n' => pieces.push(String::new()),
            c => pieces.last_mut().unwrap().push(c),
        }
    }
    let mut rows = Vec::new();
    for p in pieces.iter().filter(|p| !p.trim().is_empty() && !skip(p)) {
        let chars: Vec<char> = p.chars().collect();
        for row in chars.chunks(cols) {
            rows.push(row.iter().collect::<String>());
        }
    }
    rows
}

/// Asserts no row of a bar reaches the terminal's last column (a longer line would wrap).
fn assert_fits(rows: &[String], cols: usize, tty: &str) {
    for r in rows {
        let used = r.trim_end().chars().count();
        assert!(used < cols, "a line {used} wide on a terminal {cols} wide: {r:?}\nall:\n{tty}");
    }
}

/// A one-connection proxy to `target` that forwards the sender's bytes at about `rate` bytes a
/// second, and stops forwarding for `stall` once `stall_at` bytes went through. Returns its
/// address and, once the connection is over, the bytes forwarded and how long that took.
fn slow_proxy(
    target: SocketAddr,
    rate: u64,
    (stall_at, stall): (u64, Duration),
) -> (SocketAddr, std::thread::JoinHandle<(u64, Duration)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut client_r, mut server_w) = crate::util::relay(&listener, target);
        let start = Instant::now();
        let (mut done, mut stalled, mut paused) = (0u64, false, Duration::ZERO);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if server_w.write_all(&buf[..n]).is_err() {
                break;
            }
            done += n as u64;
            if !stalled && done >= stall_at {
                stalled = true;
                std::thread::sleep(stall);
                paused = stall;
            }
            let due = Duration::from_secs_f64(done as f64 / rate as f64) + paused;
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let _ = server_w.shutdown(Shutdown::Both);
        (done, start.elapsed().saturating_sub(paused))
    });
    (addr, handle)
}

/// `xfer recv --once` under a pseudo-terminal `cols` wide: its address, and the child whose
/// output (read once it exits) is what it drew.
fn receiver_under_pty(
    cols: u16,
    dir: &std::path::Path,
) -> (String, std::process::Child, BufReader<std::process::ChildStdout>) {
    let cmd = format!(
        "stty cols {cols}; {BIN} recv --insecure --once --listen 127.0.0.1:0 --dir {} 2>&1",
        dir.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run script(1)");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on ") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the receiver said nothing");
    }
    let addr = line.split("listening on ").nth(1).unwrap().trim().to_string();
    (addr, child, out)
}

/// The files done / total counts (`3/6`, digits only) in the rows that start with `verb`, in
/// order, with the row.
fn counts<'a>(rows: &'a [String], verb: &str) -> Vec<(usize, usize, &'a str)> {
    rows.iter()
        .filter(|r| r.starts_with(verb))
        .filter_map(|r| {
            r.split_whitespace().find_map(|w| {
                let (d, t) = w.split_once('/')?;
                Some((d.parse().ok()?, t.parse().ok()?, r.as_str()))
            })
        })
        .collect()
}

#[test]
fn bars_show_on_a_terminal() {
    let tty = send_under_pty("");
    assert!(tty.contains("hashing"), "no hashing bar on a terminal:\n{tty}");
    assert!(tty.contains("verified"), "{tty}");
}

#[test]
fn quiet_hides_bars_on_a_terminal() {
    let tty = send_under_pty("--quiet");
    assert!(!tty.contains("hashing") && !tty.contains("sending"), "bars despite --quiet:\n{tty}");
    assert!(tty.contains("verified"), "the summary stays:\n{tty}");
}

#[test]
fn a_batch_shows_a_hashing_bar_and_an_overall_bar() {
    let rx = Receiver::start(&["--quiet"]);
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("batch");
    std::fs::create_dir(&dir).unwrap();
    for (i, size) in [96usize << 20, 10, 20].iter().enumerate() {
        std::fs::write(dir.join(format!("f{i}")), random_bytes(*size, i as u64)).unwrap();
    }
    let cmd = format!("{BIN} send --insecure {} {} --no-cache 2>&1", dir.display(), rx.target());
    let out = Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().expect("run script(1)");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("hashing") && tty.contains("files"), "no hashing bar:\n{tty}");
    // The overall bar counts files done of the total, and bytes.
    assert!(tty.contains("sending") && tty.contains("/3 files"), "no overall bar:\n{tty}");
}

/// A batch through a link of 24 MiB/s, on terminals 60 and 200 columns wide, on both sides: no
/// line reaches the last column, the current file is named (shortened with `…` where it does
/// not fit), and files done count up to the total, which is reached only once every byte is in.
#[test]
fn bars_fit_the_terminal_and_count_files_as_they_are_verified() {
    let long = format!("a-file-with-a-name-long-enough-not-to-fit-sixty-columns-{}.bin", "x".repeat(40));
    for cols in [60u16, 200] {
        let root = tempfile::tempdir().unwrap();
        let src = root.path().join("batch");
        let target = root.path().join("target");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&target).unwrap();
        let names: Vec<String> = (0..5).map(|i| format!("f{i}.bin")).chain([long.clone()]).collect();
        for (i, n) in names.iter().enumerate() {
            // The long name is sent first (it sorts first) and for long enough to be drawn.
            let size = if *n == long { 24 << 20 } else { 4 << 20 };
            std::fs::write(src.join(n), random_bytes(size, 40 + i as u64)).unwrap();
        }
        let (raddr, mut receiver, mut rout) = receiver_under_pty(cols, &target);
        let (addr, proxy) = slow_proxy(raddr.parse().unwrap(), 24 << 20, (u64::MAX, Duration::ZERO));
        let cmd = format!("{BIN} send --insecure {} {addr} --no-cache > /dev/null", src.display());
        let (ok, tty) = under_pty(cols, &cmd);
        assert!(ok, "{tty}");
        proxy.join().unwrap();
        receiver.wait().unwrap();
        let mut rtty = String::new();
        rout.read_to_string(&mut rtty).unwrap();
        let cols = usize::from(cols);
        let sender_rows = rows(&tty, cols, |_| false);
        let log = |p: &str| ["127.0.0.1:", "listening on", "xfer: "].iter().any(|s| p.starts_with(s));
        let receiver_rows = rows(&rtty, cols, log);
        assert_fits(&sender_rows, cols, &tty);
        assert_fits(&receiver_rows, cols, &rtty);
        for (side, rows, verb, all) in
            [("sender", &sender_rows, "sending", &tty), ("receiver", &receiver_rows, "receiving", &rtty)]
        {
            let counts = counts(rows, verb);
            assert!(counts.len() >= 3, "{side}: too few {verb} rows with a file count:\n{all}");
            assert!(
                counts.iter().all(|(_, t, _)| *t == names.len()),
                "{side}: total is not the file count:\n{all}"
            );
            assert!(counts.windows(2).all(|w| w[0].0 <= w[1].0), "{side}: the count went down:\n{all}");
            // The receiver counts a file once it verified it; its sender once that file is
            // acknowledged, after the group it joined is on disk (all six here, at the end).
            if side == "receiver" {
                assert!(
                    counts.iter().any(|(d, _, _)| (1..names.len()).contains(d)),
                    "never counted up:\n{all}"
                );
            }
            // The total only with every byte in: "44.0/44.0 MiB".
            for (d, t, row) in &counts {
                let all_in = row.contains("44.0/44.0 MiB") || row.contains("44.0 MiB/44.0 MiB");
                assert!(d < t || all_in, "{side}: {d}/{t} before the end: {row:?}");
            }
            assert!(
                // Small files may go by between two draws of a busy sender: one of them at least.
                rows.iter()
                    .any(|r| r.starts_with(verb) && (0..5).any(|i| r.contains(&format!("batch/f{i}.bin")))),
                "{side}: no file named:\n{all}"
            );
            let long_shown = if cols < 100 {
                rows.iter().any(|r| r.starts_with(verb) && r.contains('…') && r.contains("xxxx.bin"))
            } else {
                rows.iter().any(|r| r.starts_with(verb) && r.contains(&long))
            };
            assert!(long_shown, "{side}: the long name is not shown (shortened with … at {cols}):\n{all}");
        }
    }
}

/// A link that stops moving: the rate falls to 0 and the ETA says it cannot tell (`eta -`, not
/// `eta 0s`); a receiver that then has to check its copy is shown as doing that.
#[test]
fn a_stalled_link_shows_no_eta() {
    let rx = Receiver::start(&["--quiet"]);
    let (_src, path) = source_file("stall.bin", &random_bytes(24 << 20, 50));
    let (addr, proxy) = slow_proxy(rx.addr, 8 << 20, (4 << 20, Duration::from_secs(5)));
    let cmd = format!("{BIN} send --insecure {} {addr} --no-cache > /dev/null", path.display());
    let (ok, tty) = under_pty(200, &cmd);
    assert!(ok, "{tty}");
    proxy.join().unwrap();
    let rows = rows(&tty, 200, |_| false);
    let stalled =
        rows.iter().find(|r| r.starts_with("sending") && r.contains(" 0 B/s") && r.contains("eta -"));
    assert!(stalled.is_some(), "no `0 B/s ... eta -` while the link stalled:\n{tty}");
    assert!(!tty.contains("eta 0s"), "{tty}");
}

/// A resumed send over a link of a known speed: the rate on the bar counts only the bytes that
/// moved (before, the resumed part counted as moved at once: GiB/s).
#[test]
fn the_rate_after_a_resume_counts_moved_bytes_only() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(48 << 20, 60);
    let (_src, path) = source_file("resume.bin", &data);
    // First, cut off after 40 MiB: the receiver keeps a partial.
    let (addr, proxy) = slow_proxy(rx.addr, 1 << 40, (40 << 20, Duration::from_secs(5)));
    let cut = Command::new(BIN)
        .args(["send", "--insecure", "--quiet", "--timeout", "1"])
        .arg(&path)
        .arg(addr.to_string())
        .env("XDG_CACHE_HOME", test_cache_home())
        .output()
        .unwrap();
    drop(proxy);
    assert!(!cut.status.success(), "the first send was not cut off");
    rx.wait_log("resume.bin");
    let held = rx.partial("resume.bin").1;
    assert!(held > 16 << 20, "only {held} bytes kept");
    let (addr, proxy) = slow_proxy(rx.addr, 4 << 20, (u64::MAX, Duration::ZERO));
    let out = tempfile::tempdir().unwrap();
    let summary = out.path().join("summary");
    let cmd = format!("{BIN} send --insecure {} {addr} > {}", path.display(), summary.display());
    let (ok, tty) = under_pty(200, &cmd);
    assert!(ok, "{tty}");
    let (moved, took) = proxy.join().unwrap();
    let link = moved as f64 / took.as_secs_f64();
    let rows = rows(&tty, 200, |_| false);
    let mut rates = Vec::new();
    for r in rows.iter().filter(|r| r.trim_start().starts_with("sending")) {
        let Some(at) = r.find("/s ") else { continue };
        let words: Vec<&str> = r[..at].rsplitn(3, ' ').collect();
        let Ok(v) = words[1].parse::<f64>() else { continue };
        let unit = match words[0] {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            _ => continue,
        };
        rates.push(v * unit);
    }
    assert!(!rates.is_empty(), "no rate on the sending bar:\n{tty}");
    for r in &rates {
        assert!(*r < 10.0 * link, "rate {r:.0} B/s on a link of {link:.0} B/s:\n{tty}");
    }
    // The summary says what moved and what was resumed, and rates the moved bytes only.
    let summary = std::fs::read_to_string(summary).unwrap();
    assert!(summary.contains("resumed at") && summary.contains(" resumed)"), "{summary}");
    assert!(summary.contains(" sent at "), "{summary}");
}

/// An identical file sent again: while the receiver re-hashes its copy the sender says so, and
/// the summary says nothing was sent instead of giving a rate for 0 bytes.
#[test]
fn a_receiver_checking_its_copy_is_shown_and_nothing_sent_is_said() {
    let (addr, receiver) = fake(|s, _manifest| {
        say(s, acceptance());
        let _ = read_digest(s);
        // Checking its copy for a while.
        std::thread::sleep(Duration::from_millis(2500));
        say(
            s,
            Message::Answers(AnswersPart {
                answers: vec![Answer::Have { name: "same.bin".into() }],
                last: true,
            }),
        );
        until_closed(s);
    });
    let (_src, path) = source_file("same.bin", &random_bytes(1 << 20, 70));
    let out = tempfile::tempdir().unwrap();
    let summary = out.path().join("summary");
    let cmd = format!("{BIN} send --insecure {} {addr} > {}", path.display(), summary.display());
    let (ok, tty) = under_pty(100, &cmd);
    receiver.join().unwrap();
    assert!(ok, "{tty}");
    assert!(tty.contains("the receiver is checking its copy of \"same.bin\""), "no word of the wait:\n{tty}");
    let summary = std::fs::read_to_string(summary).unwrap();
    assert!(summary.contains("(nothing sent)") && !summary.contains("B/s"), "{summary}");
    assert!(summary.contains("receiver already has it"), "{summary}");
}

/// The real receiver, sent a file it holds: its log line and the sender's summary say nothing
/// moved; a batch all there says "nothing sent".
#[test]
fn a_resend_of_what_is_there_says_nothing_moved() {
    let rx = Receiver::start(&[]);
    let (_src, path) = source_file("there.bin", &random_bytes(3 << 20, 80));
    crate::util::send(&path, &rx.target(), &[]).expect(0);
    let again = crate::util::send(&path, &rx.target(), &[]).expect(0);
    assert!(
        again.stdout().contains("(nothing sent)") && !again.stdout().contains("B/s"),
        "{}",
        again.report()
    );
    rx.wait_log("nothing received in ");
    let batch = path.parent().unwrap();
    let first = crate::util::send(batch, &rx.target(), &[]).expect(0);
    assert!(first.stdout().contains(" sent ("), "{}", first.report());
    let again = crate::util::send(batch, &rx.target(), &[]).expect(0);
    assert!(again.stdout().contains("nothing sent") && !again.stdout().contains("B/s"), "{}", again.report());
}

#[test]
fn a_wait_for_a_silent_peer_shows_what_is_awaited() {
    // Something accepts the connection and never answers: before, the terminal stayed blank
    // until the timeout; now a spinner says what is awaited.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let (_src, path) = source_file("f", b"x");
    let cmd = format!("{BIN} send --insecure --timeout 2 {} {addr} 2>&1", path.display());
    let out = Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().expect("run script(1)");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(tty.contains("waiting for its hello"), "no word of the wait:\n{tty}");
    assert!(tty.contains("timed out"), "{tty}");
    drop(hold);
}
