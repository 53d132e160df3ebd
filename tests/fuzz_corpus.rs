//! Replays the fuzz corpora (fuzz/corpus/<target>/) and any saved fuzz findings
//! (fuzz/artifacts/<target>/) through the same checks as the cargo-fuzz targets in
//! fuzz/fuzz_targets/ (both call `xfer::fuzzing`), without libFuzzer, so plain `cargo test`
//! catches a regression on any input the fuzzer once found interesting. The seeds the crate makes
//! for the secure channel's targets (real handshake steps and records) must match the committed
//! ones: `XFER_WRITE_SEEDS=1 cargo test --test fuzz_corpus` rewrites them after a change to the
//! handshake or the records.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use xfer::fuzzing::{frame, handshake, handshake_seeds, manifest, message, records, records_seeds};

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        read.map(|e| e.expect("reading a fuzz directory").path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Runs `check` on every corpus and artifact file of `target` and reports every input that
/// panicked, by path, rather than stopping at the first.
fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = fuzz_dir();
    let corpus = files_in(&fuzz.join("corpus").join(target));
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} is missing or empty");
    let artifacts = files_in(&fuzz.join("artifacts").join(target));

    let mut failed = Vec::new();
    for path in corpus.iter().chain(&artifacts) {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: {} input(s) panicked:\n{}", failed.len(), failed.join("\n"));
}

#[test]
fn frame_corpus() {
    replay("frame", frame);
}

#[test]
fn message_corpus() {
    replay("message", message);
}

#[test]
fn manifest_corpus() {
    replay("manifest", manifest);
}

#[test]
fn handshake_corpus() {
    replay("handshake", handshake);
}

#[test]
fn records_corpus() {
    replay("records", records);
}

/// The committed seeds of `handshake` and `records` are the ones the crate makes today: a stale
/// seed (after a change to the handshake, the hello or the records) would stop at the first
/// check instead of going all the way through.
#[test]
fn secure_channel_seeds_are_current() {
    let write = std::env::var_os("XFER_WRITE_SEEDS").is_some();
    let mut stale = Vec::new();
    for (target, seeds) in [("handshake", handshake_seeds()), ("records", records_seeds())] {
        let dir = fuzz_dir().join("corpus").join(target);
        for (name, bytes) in seeds {
            let path = dir.join(name);
            if write {
                fs::create_dir_all(&dir).expect("creating the corpus folder");
                fs::write(&path, &bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            } else if fs::read(&path).ok().as_ref() != Some(&bytes) {
                stale.push(path.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "stale or missing seeds (rewrite them with XFER_WRITE_SEEDS=1 cargo test --test fuzz_corpus):\n{}",
        stale.join("\n")
    );
}
