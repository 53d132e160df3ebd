//! Progress bars appear on a terminal and nowhere else. A pseudo-terminal comes from util-linux
//! `script`, which is on every Debian machine.

use std::process::Command;

use crate::util::{BIN, Receiver, random_bytes, source_file};

fn send_under_pty(extra: &str) -> String {
    let rx = Receiver::start(&["--quiet"]);
    let (_src, path) = source_file("big.bin", &random_bytes(48 * 1024 * 1024, 5));
    let cmd = format!("{BIN} send --insecure {} {} {extra} 2>&1", path.display(), rx.target());
    let out = Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().expect("run script(1)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    // The overall bar counts entries (files and folders) and bytes done of the total.
    assert!(tty.contains("sending") && tty.contains("/4 entries"), "no overall bar:\n{tty}");
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
