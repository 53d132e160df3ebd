//! Replays the fuzz corpora (fuzz/corpus/<target>/) and any saved fuzz findings
//! (fuzz/artifacts/<target>/) through the same checks as the cargo-fuzz targets in
//! fuzz/fuzz_targets/ (both call `xfer::fuzzing`), without libFuzzer, so plain `cargo test`
//! catches a regression on any input the fuzzer once found interesting.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use xfer::fuzzing::{frame, manifest, message};

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        read.map(|e| e.expect("reading a fuzz directory").path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs `check` on every corpus and artifact file of `target` and reports every input that
/// panicked, by path, rather than stopping at the first.
fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
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
