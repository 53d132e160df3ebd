//! Injected faults: a proxy between sender and receiver that flips a byte of the body, delivers
//! one byte at a time, stalls, or cuts the connection at random offsets. For each: no corrupted
//! file under a final name, a clear error on both sides, resume where it applies, and the
//! receiver keeps serving.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use crate::hostile::still_serves;
use crate::util::{Receiver, SmallDisk, list, random_bytes, send, source_file};

enum Fault {
    /// XOR 0xff into the byte at this offset of the sender → receiver stream.
    Flip(u64),
    /// Forward sender → receiver one byte per write.
    Trickle,
    /// Forward this many bytes, then nothing more (both connections stay open).
    Stall(u64),
    /// Forward this many bytes, then drop both connections.
    Cut(u64),
    /// Forward this many bytes, say so, wait to be released, then forward the rest.
    Gate(u64, mpsc::Sender<()>, mpsc::Receiver<()>),
}

/// A one-connection proxy to `target` that applies `fault` to what the sender sends.
fn proxy(target: SocketAddr, fault: Fault) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut client_r, mut server_w) = crate::util::relay(&listener, target);
        let mut buf = vec![0u8; 64 * 1024];
        let mut done = 0u64;
        let mut gate_passed = false;
        loop {
            let n = match client_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &mut buf[..n];
            let ok = match &fault {
                Fault::Flip(at) => {
                    let at = *at;
                    if (done..done + n as u64).contains(&at) {
                        chunk[(at - done) as usize] ^= 0xff;
                    }
                    server_w.write_all(chunk).is_ok()
                }
                Fault::Trickle => chunk.iter().all(|b| server_w.write_all(std::slice::from_ref(b)).is_ok()),
                Fault::Gate(_, _, _) if gate_passed => server_w.write_all(chunk).is_ok(),
                Fault::Gate(limit, paused, release) => {
                    let take = (limit.saturating_sub(done) as usize).min(n);
                    let mut ok = server_w.write_all(&chunk[..take]).is_ok();
                    if take < n || done + n as u64 == *limit {
                        let _ = paused.send(());
                        let _ = release.recv_timeout(Duration::from_secs(30));
                        gate_passed = true;
                        ok = ok && server_w.write_all(&chunk[take..]).is_ok();
                    }
                    ok
                }
                Fault::Stall(limit) | Fault::Cut(limit) => {
                    let limit = *limit;
                    let take = (limit.saturating_sub(done) as usize).min(n);
                    let ok = server_w.write_all(&chunk[..take]).is_ok();
                    if done + n as u64 >= limit {
                        if let Fault::Stall(_) = fault {
                            // Hold both connections open and silent until the peers give up.
                            std::thread::sleep(Duration::from_secs(60));
                        }
                        break;
                    }
                    ok
                }
            };
            done += n as u64;
            if !ok {
                break;
            }
        }
        if let Fault::Cut(_) = fault {
            let _ = server_w.shutdown(Shutdown::Both);
            let _ = client_r.shutdown(Shutdown::Both);
        } else {
            // The receiver may still have words for the sender (a verdict): the other thread
            // forwards them and closes the sender's side when the receiver is done.
            let _ = server_w.shutdown(Shutdown::Write);
        }
    });
    addr
}

const SIZE: usize = 4 << 20;

#[test]
fn a_flipped_body_byte_is_caught_and_nothing_is_stored() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(SIZE, 41);
    let (_src, path) = source_file("flip.bin", &data);
    // Past the hello and offer, in the middle of the body.
    let via = proxy(rx.addr, Fault::Flip(2 << 20));
    let run = send(&path, &via.to_string(), &["--quiet"]).expect(5);
    assert!(run.stderr().contains("receiver rejected \"flip.bin\": content hashed to"), "{}", run.report());
    rx.wait_log("\"flip.bin\"");
    rx.assert_files(&[]);
    still_serves(&rx, 0);
}

#[test]
fn one_byte_at_a_time_still_arrives_intact() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(256 * 1024, 42);
    let (_src, path) = source_file("trickle.bin", &data);
    let via = proxy(rx.addr, Fault::Trickle);
    send(&path, &via.to_string(), &["--quiet"]).expect(0);
    assert!(std::fs::read(rx.dir.join("trickle.bin")).unwrap() == data);
}

#[test]
fn a_stalled_link_times_out_on_both_sides_and_the_partial_resumes() {
    let rx = Receiver::start(&["--quiet", "--timeout", "2"]);
    let data = random_bytes(SIZE, 43);
    let (_src, path) = source_file("stall.bin", &data);
    let via = proxy(rx.addr, Fault::Stall(3 << 20));
    let run = send(&path, &via.to_string(), &["--quiet", "--timeout", "2"]);
    // Whichever side's timer fires first: the sender's own (3), or the receiver's, which it
    // reports in its verdict (1). Either way the timeout is named.
    assert!([1, 3].contains(&run.code()), "{}", run.report());
    assert!(run.stderr().contains("--timeout"), "the sender names the timeout\n{}", run.report());
    rx.wait_log("(nothing within 2 s, see --timeout)");
    let kept = rx.partial("stall.bin").1;
    assert!(kept > 0, "nothing kept for a resume");
    let again = send(&path, &rx.target(), &["--quiet"]).expect(0);
    assert!(again.stdout().contains("resumed at"), "{}", again.report());
    assert!(std::fs::read(rx.dir.join("stall.bin")).unwrap() == data);
}

#[test]
fn cuts_at_random_offsets_never_leave_a_bad_file_and_resume_finishes() {
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(SIZE, 44);
    let (_src, path) = source_file("cut.bin", &data);
    // Offsets from a fixed pseudo-random sequence: in the hello, the offer, and the body.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for round in 0..8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = x % (SIZE as u64 + 100);
        let via = proxy(rx.addr, Fault::Cut(at));
        let run = send(&path, &via.to_string(), &["--quiet"]);
        if run.code() == 0 {
            break; // the cut fell past the end of what the sender had to send
        }
        assert!(run.stderr().starts_with("xfer: error: "), "round {round}, cut at {at}\n{}", run.report());
        assert!(!rx.dir.join("cut.bin").exists(), "round {round}: a final name after a cut at {at}");
    }
    send(&path, &rx.target(), &["--quiet"]).expect(0);
    assert!(std::fs::read(rx.dir.join("cut.bin")).unwrap() == data);
    std::fs::remove_file(rx.dir.join("cut.bin")).unwrap();
    still_serves(&rx, 1);
}

#[test]
fn a_full_disk_refuses_what_cannot_fit_and_fails_cleanly_when_filled_mid_transfer() {
    let disk = SmallDisk::mount("8m");
    let dir = disk.0.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let rx = Receiver::start_in(tempfile::tempdir().unwrap(), dir.clone(), &["--quiet"]);
    // Too large for the disk: refused before any body byte, nothing written.
    let (_big, big) = source_file("big.bin", &random_bytes(10 << 20, 51));
    let run = send(&big, &rx.target(), &["--quiet"]).expect(4);
    assert!(run.stderr().contains("free"), "{}", run.report());
    assert_eq!(list(&dir), Vec::<String>::new());
    // Fits when offered; another writer fills the disk while the body is on its way.
    let data = random_bytes(5 << 20, 52);
    let (_src, path) = source_file("fits.bin", &data);
    let (paused_tx, paused) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let via = proxy(rx.addr, Fault::Gate(1 << 20, paused_tx, release_rx));
    let sender = {
        let path = path.clone();
        std::thread::spawn(move || send(&path, &via.to_string(), &["--quiet"]))
    };
    paused.recv_timeout(Duration::from_secs(30)).expect("the proxy never reached the gate");
    let filler = disk.0.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 64 * 1024]).is_ok() {}
    drop(f);
    release.send(()).unwrap();
    let run = sender.join().unwrap().expect(1);
    assert!(run.stderr().contains("No space left"), "the sender reports the full disk\n{}", run.report());
    rx.wait_log("\"fits.bin\"");
    // Nothing under the final name, and the temporary file is gone.
    assert_eq!(list(&dir), Vec::<String>::new());
    // Space again: the receiver kept serving.
    std::fs::remove_file(&filler).unwrap();
    send(&path, &rx.target(), &["--quiet"]).expect(0);
    assert!(std::fs::read(dir.join("fits.bin")).unwrap() == data);
}
