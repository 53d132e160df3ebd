//! The secure channel's handshake over untrusted bytes: a peer's handshake frames given to both
//! roles (the receiver's code and pinned steps, the sender's reply steps) under fixed keys, code
//! and randomness. Must never panic; what is accepted gives distinct keys and answers that fit a
//! handshake frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in the library (`xfer::fuzzing`) so tests/fuzz_corpus.rs replays the corpus
// with exactly the same ones.
fuzz_target!(|data: &[u8]| xfer::fuzzing::handshake(data));
