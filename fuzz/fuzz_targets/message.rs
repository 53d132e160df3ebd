//! `decode_message` over untrusted payloads; whatever decodes must survive an encode/decode
//! round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in the library (`xfer::fuzzing`) so tests/fuzz_corpus.rs replays the corpus
// with exactly the same ones.
fuzz_target!(|data: &[u8]| xfer::fuzzing::message(data));
