//! `--hash blake3`: announced in the manifest, verified by the receiver with that
//! algorithm, cached apart from SHA-256 digests.

use std::fs;

use xfer::protocol::{Answer, Digest, Entry, EntryKind, FileVerdict, HashAlg, Message, Verdict};

use crate::util::{RawPeer, Receiver, file_entry, is_accept, random_bytes, send, sha256, source_file};

fn blake3(data: &[u8]) -> Digest {
    Digest(*::blake3::hash(data).as_bytes())
}

#[test]
fn a_file_sent_with_blake3_arrives_and_names_its_digest() {
    let rx = Receiver::start(&["--quiet"]);
    // Larger than a BLAKE3 chunk group and than one receive buffer, not a multiple of either.
    let data = random_bytes(3 * 1024 * 1024 + 77, 31);
    let (_src, path) = source_file("b3.bin", &data);
    let run = send(&path, &rx.target(), &["--hash", "blake3", "--no-cache"]).expect(0);
    let want = format!("blake3 {}: verified", blake3(&data).to_hex());
    assert!(run.stdout().contains(&want), "{}", run.report());
    assert!(fs::read(rx.dir.join("b3.bin")).unwrap() == data);
    // The same file again: the receiver recognises it by its BLAKE3 digest.
    let again = send(&path, &rx.target(), &["--hash", "blake3", "--no-cache"]).expect(0);
    assert!(again.stdout().contains("receiver already has it"), "{}", again.report());
    rx.assert_files(&["b3.bin"]);
}

#[test]
fn the_receiver_verifies_with_the_announced_algorithm() {
    let rx = Receiver::start(&["--quiet"]);
    let data = b"which hash?";
    for (name, alg, digest, ok) in [
        ("right", HashAlg::Blake3, blake3(data), true),
        // A SHA-256 digest announced as BLAKE3 must not pass.
        ("wrong", HashAlg::Blake3, sha256(data), false),
    ] {
        let mut p = RawPeer::greet(rx.addr);
        let size = data.len() as u64;
        let entry =
            Entry { kind: EntryKind::File { size, hash: alg, tag: [0; 16] }, ..file_entry(&[name], size) };
        p.manifest(vec![entry]);
        assert!(is_accept(&p.read().unwrap()));
        p.digests(0, vec![Some(digest)]);
        assert_eq!(p.answer(), Answer::Send { offset: 0 });
        p.body(0);
        p.data(data);
        match (p.read().unwrap(), ok) {
            (Message::FileVerdict(FileVerdict { verdict: Verdict::Verified { .. }, .. }), true) => {}
            (
                Message::FileVerdict(FileVerdict { verdict: Verdict::HashMismatch { actual, .. }, .. }),
                false,
            ) => {
                assert_eq!(actual, blake3(data))
            }
            (other, _) => panic!("{name}: unexpected {other:?}"),
        }
    }
    rx.assert_files(&["right"]);
}

#[test]
fn a_tree_sent_with_blake3_arrives_and_a_repeat_sends_nothing() {
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("t");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("a"), random_bytes(2 << 20, 1)).unwrap();
    fs::write(tree.join("sub/b"), b"bee").unwrap();
    fs::write(tree.join("sub/empty"), b"").unwrap();
    let rx = Receiver::start(&["--quiet"]);
    send(&tree, &rx.target(), &["--hash", "blake3", "--no-cache"]).expect(0);
    for f in ["a", "sub/b", "sub/empty"] {
        assert!(fs::read(tree.join(f)).unwrap() == fs::read(rx.dir.join("t").join(f)).unwrap(), "{f}");
    }
    let again = send(&tree, &rx.target(), &["--hash", "blake3", "--no-cache"]).expect(0);
    assert!(again.stdout().contains(", nothing sent:"), "{}", again.report());
}

#[test]
fn blake3_and_sha256_digests_are_cached_apart() {
    let cache = tempfile::tempdir().unwrap();
    let rx = Receiver::start(&["--quiet"]);
    let data = random_bytes(100_000, 5);
    let (_src, path) = source_file("c.bin", &data);
    let run = |alg: &str| {
        let args: Vec<std::ffi::OsString> =
            vec!["send".into(), path.clone().into(), rx.target().into(), "--hash".into(), alg.into()];
        crate::util::xfer_in(&args, cache.path()).expect(0)
    };
    assert!(!run("sha256").stdout().contains("(cached)"));
    // Another algorithm: not served from the SHA-256 entry.
    let b3 = run("blake3");
    assert!(
        !b3.stdout().contains("(cached)") && b3.stdout().contains(&blake3(&data).to_hex()),
        "{}",
        b3.report()
    );
    assert!(run("blake3").stdout().contains("(cached)"));
    assert!(run("sha256").stdout().contains("(cached)"));
}
