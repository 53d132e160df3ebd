//! Offers without a digest: the sender hashes while it sends and the digest follows the body in
//! a trailer. The receiver keeps nothing the trailer does not vouch for, and asks for the digest
//! first when it may already have the file.

use std::fs;

use xfer::protocol::{self, HashAlg, Message, Offer, Reply, Trailer, Verdict};

use crate::hostile::still_serves;
use crate::util::{RawPeer, Receiver, random_bytes, send, sha256, source_file};

fn offer_without_digest(p: &mut RawPeer, name: &str, size: u64) {
    let offer = Offer { name: name.into(), size, hash: HashAlg::Sha256, digest: None, tag: [7; 16] };
    protocol::write_message(&mut p.stream, &Message::Offer(offer)).unwrap();
}

fn trailer(p: &mut RawPeer, digest: Option<protocol::Digest>) {
    protocol::write_message(&mut p.stream, &Message::Trailer(Trailer { digest })).unwrap();
}

#[test]
fn the_trailer_decides_what_is_kept() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(300_000, 3);
    // The right digest after the body: verified.
    let mut p = RawPeer::greet(rx.addr);
    offer_without_digest(&mut p, "good", data.len() as u64);
    assert_eq!(p.read().unwrap(), Message::Reply(Reply::Accept { offset: 0 }));
    p.data(&data);
    trailer(&mut p, Some(sha256(&data)));
    assert_eq!(p.read().unwrap(), Message::Verdict(Verdict::Verified { name: "good".into() }));
    assert!(fs::read(rx.dir.join("good")).unwrap() == data);
    fs::remove_file(rx.dir.join("good")).unwrap();
    // A wrong digest: a mismatch, and nothing kept.
    let mut p = RawPeer::greet(rx.addr);
    offer_without_digest(&mut p, "bad", data.len() as u64);
    assert_eq!(p.read().unwrap(), Message::Reply(Reply::Accept { offset: 0 }));
    p.data(&data);
    trailer(&mut p, Some(sha256(b"something else")));
    assert!(matches!(p.read().unwrap(), Message::Verdict(Verdict::HashMismatch { .. })));
    // No digest at all (the sender's file changed): a failure, and nothing kept.
    let mut p = RawPeer::greet(rx.addr);
    offer_without_digest(&mut p, "changed", data.len() as u64);
    assert_eq!(p.read().unwrap(), Message::Reply(Reply::Accept { offset: 0 }));
    p.data(&data);
    trailer(&mut p, None);
    match p.read().unwrap() {
        Message::Verdict(Verdict::Failed { reason }) => assert!(reason.contains("changed"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    // Something else instead of the trailer: a protocol error.
    let mut p = RawPeer::greet(rx.addr);
    offer_without_digest(&mut p, "no-trailer", 3);
    assert_eq!(p.read().unwrap(), Message::Reply(Reply::Accept { offset: 0 }));
    p.data(b"abc");
    p.data(b"d");
    assert!(p.closed_by_peer());
    rx.wait_log("\"no-trailer\" 3 B in");
    rx.wait_log("expected a message frame, got a data frame");
    still_serves(&rx, 0);
}

#[test]
fn a_same_size_file_makes_the_receiver_ask_for_the_digest() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(50_000, 4);
    fs::write(rx.dir.join("same.bin"), &data).unwrap();
    let mut p = RawPeer::greet(rx.addr);
    offer_without_digest(&mut p, "same.bin", data.len() as u64);
    assert_eq!(p.read().unwrap(), Message::Reply(Reply::NeedDigest));
    p.offer("same.bin", data.len() as u64, sha256(&data));
    assert_eq!(p.read().unwrap(), Message::Reply(Reply::AlreadyHave { name: "same.bin".into() }));
    // Answering NeedDigest with anything but the same offer plus its digest is refused.
    let mut p = RawPeer::greet(rx.addr);
    offer_without_digest(&mut p, "same.bin", data.len() as u64);
    assert_eq!(p.read().unwrap(), Message::Reply(Reply::NeedDigest));
    p.offer("other-name.bin", data.len() as u64, sha256(&data));
    assert!(p.closed_by_peer());
    rx.wait_log("expected the same offer with its digest");
    rx.assert_files(&["same.bin"]);
}

#[test]
fn an_uncached_send_of_a_file_the_receiver_has_sends_no_body() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(2 << 20, 9);
    let (_src, path) = source_file("have.bin", &data);
    send(&path, &rx.target(), &["--no-cache"]).expect(0);
    let again = send(&path, &rx.target(), &["--no-cache"]).expect(0);
    assert!(again.stdout().contains("receiver already has it as \"have.bin\""), "{}", again.report());
    // A different file of the same name and size: asked for its digest, then sent beside it.
    let other = random_bytes(2 << 20, 10);
    let (_src2, path2) = source_file("have.bin", &other);
    let run = send(&path2, &rx.target(), &["--no-cache"]).expect(0);
    assert!(run.stdout().contains("stored as \"have (1).bin\""), "{}", run.report());
    assert!(fs::read(rx.dir.join("have (1).bin")).unwrap() == other);
}
