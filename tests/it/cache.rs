//! The sender's digest cache: a repeat send does not hash again, a changed file always is, the
//! cache can never turn a wrong digest into "verified", and a file changed mid-send fails.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc;

use xfer::protocol::{self, Message, Reply, Verdict};

use crate::util::{Receiver, random_bytes, sha256, source_file, xfer_in};

fn send_with_cache(file: &Path, to: &str, cache: &Path, extra: &[&str]) -> crate::util::Run {
    let mut args: Vec<std::ffi::OsString> = vec!["send".into(), file.into(), to.into()];
    args.extend(extra.iter().map(Into::into));
    xfer_in(&args, cache)
}

#[test]
fn repeat_send_uses_the_cache_and_a_change_invalidates_it() {
    let cache = tempfile::tempdir().unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let (_src, path) = source_file("doc.txt", b"version one");
    let first = send_with_cache(&path, &rx.target(), cache.path(), &[]).expect(0);
    assert!(!first.stdout().contains("(cached)"), "{}", first.report());
    assert!(cache.path().join("xfer/digests-v1").is_file(), "no cache file written");

    // Same file again: digest from the cache, and the receiver already has it.
    let again = send_with_cache(&path, &rx.target(), cache.path(), &[]).expect(0);
    assert!(again.stdout().contains("(cached)"), "{}", again.report());
    assert!(again.stdout().contains("already has it"), "{}", again.report());
    assert!(again.stdout().contains(&sha256(b"version one").to_hex()), "{}", again.report());

    // Changed content (same size, even): hashed again, sent, verified.
    std::fs::write(&path, b"version two").unwrap();
    let changed = send_with_cache(&path, &rx.target(), cache.path(), &[]).expect(0);
    assert!(!changed.stdout().contains("(cached)"), "{}", changed.report());
    assert!(changed.stdout().contains(&sha256(b"version two").to_hex()), "{}", changed.report());
    assert_eq!(std::fs::read(rx.dir.join("doc (1).txt")).unwrap(), b"version two");

    // --no-cache reads the file whatever the cache holds.
    let uncached = send_with_cache(&path, &rx.target(), cache.path(), &["--no-cache"]).expect(0);
    assert!(!uncached.stdout().contains("(cached)"), "{}", uncached.report());
}

#[test]
fn a_lying_cache_cannot_make_a_transfer_verified() {
    let cache = tempfile::tempdir().unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let (_src, path) = source_file("victim.bin", b"real content");
    send_with_cache(&path, &rx.target(), cache.path(), &["--as", "first.bin"]).expect(0);
    // Corrupt the cached digest for this exact stamp.
    let file = cache.path().join("xfer/digests-v1");
    let text = std::fs::read_to_string(&file).unwrap();
    let good = sha256(b"real content").to_hex();
    std::fs::write(&file, text.replace(&good, &sha256(b"forged").to_hex())).unwrap();
    let run = send_with_cache(&path, &rx.target(), cache.path(), &["--as", "second.bin"]).expect(5);
    assert!(run.stderr().contains("hashed to"), "{}", run.report());
    rx.assert_files(&["first.bin"]);
}

#[test]
fn a_file_changed_while_being_sent_is_never_verified() {
    // A receiver that reads the first frame, lets the test modify the file, then drains the
    // body and says "verified" regardless: the sender must still fail.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (paused_tx, paused_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (trailer_tx, trailer_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        protocol::write_hello(&mut s).unwrap();
        protocol::read_hello(&mut s).unwrap();
        let Message::Offer(offer) = protocol::read_message(&mut s).unwrap() else { panic!("no offer") };
        protocol::write_message(&mut s, &Message::Reply(Reply::Accept { offset: 0 })).unwrap();
        let mut got = 0u64;
        let mut buf = Vec::new();
        while got < offer.size {
            let h = protocol::read_frame_header(&mut s).unwrap();
            buf.resize(h.len as usize, 0);
            s.read_exact(&mut buf).unwrap();
            if got == 0 {
                paused_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            got += u64::from(h.len);
        }
        // Offered without a digest (--no-cache): the sender's trailer comes after the body.
        trailer_tx.send((offer.digest, protocol::read_message(&mut s).ok())).unwrap();
        let v = Verdict::Verified { name: offer.name };
        protocol::write_message(&mut s, &Message::Verdict(v)).unwrap();
    });
    // Far larger than loopback socket buffers, so the sender is still reading the file.
    let (_src, path) = source_file("growing.log", &random_bytes(64 << 20, 8));
    let sender = {
        let path = path.clone();
        std::thread::spawn(move || crate::util::send(&path, &addr, &["--no-cache"]))
    };
    paused_rx.recv().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"appended while sending").unwrap();
    drop(f);
    go_tx.send(()).unwrap();
    let run = sender.join().unwrap().expect(5);
    assert!(run.stderr().contains("changed while it was being sent"), "{}", run.report());
    assert_eq!(run.stdout(), "", "no success summary\n{}", run.report());
    // And the receiver was told: no digest describes what was sent.
    let (offered, trailer) = trailer_rx.recv().unwrap();
    assert_eq!(offered, None, "--no-cache offers no digest up front");
    assert_eq!(trailer, Some(Message::Trailer(protocol::Trailer { digest: None })));
}
