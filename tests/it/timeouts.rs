//! Silent peers on either side are given up on with a clear error.

use std::net::TcpListener;
use std::time::Duration;

use crate::util::{RawPeer, Receiver, send, source_file};

#[test]
fn sender_gives_up_on_a_silent_receiver() {
    // Accepts (the kernel does) and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_src, path) = source_file("f", b"data");
    let run = send(&path, &addr, &["--timeout", "1"]).expect(3);
    assert!(run.stderr().starts_with("xfer: error: "), "{}", run.report());
    assert!(run.stderr().contains("silent for 1 s"), "{}", run.report());
    assert!(run.elapsed < Duration::from_secs(10), "took {:?}", run.elapsed);
    drop(listener);
}

#[test]
fn receiver_drops_a_silent_sender_and_keeps_serving() {
    let rx = Receiver::start(&["--quiet", "--handshake-timeout", "1"]);
    let mut silent = RawPeer::connect(rx.addr);
    assert!(silent.closed_by_peer(), "receiver never hung up on a silent peer");
    rx.wait_log("silent for 1 s");
    let (_src, path) = source_file("after", b"after");
    send(&path, &rx.target(), &[]).expect(0);
    rx.assert_files(&["after"]);
}

#[test]
fn once_exits_with_the_status_of_its_transfer() {
    let mut rx = Receiver::start(&["--quiet", "--once", "--handshake-timeout", "1"]);
    let _silent = RawPeer::connect(rx.addr);
    assert_eq!(rx.wait_exit(), 3, "{}", rx.stderr());
    assert!(rx.stderr().contains("xfer: error: "), "{}", rx.stderr());

    let mut rx = Receiver::start(&["--quiet", "--once"]);
    let (_src, path) = source_file("one", b"one");
    send(&path, &rx.target(), &[]).expect(0);
    assert_eq!(rx.wait_exit(), 0, "{}", rx.stderr());
    rx.assert_files(&["one"]);
}
