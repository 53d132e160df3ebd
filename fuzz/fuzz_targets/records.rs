//! The secure channel's records over untrusted bytes: the input as a peer's record stream
//! (opened whole and in pieces, the same outcome; no read past one record), then as pieces sealed
//! and opened again (the same plaintext), one byte flipped (fails, nothing unauthenticated
//! handed out).
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in the library (`xfer::fuzzing`) so tests/fuzz_corpus.rs replays the corpus
// with exactly the same ones.
fuzz_target!(|data: &[u8]| xfer::fuzzing::records(data));
