//! `manifest::validate` over manifests decoded from untrusted payloads, as the receiver does:
//! the input is a message payload; a `Message::Manifest` has its entries validated. Must never
//! panic (nor take more than linear time: libFuzzer reports slow inputs as timeouts).
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in the library (`xfer::fuzzing`) so tests/fuzz_corpus.rs replays the corpus
// with exactly the same ones.
fuzz_target!(|data: &[u8]| xfer::fuzzing::manifest(data));
