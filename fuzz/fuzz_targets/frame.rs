//! Frame reading over untrusted bytes: `read_frame_header` and `read_message` in a loop until
//! the first error or EOF. Must never panic, hang or allocate past the frame limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The checks live in the library (`xfer::fuzzing`) so tests/fuzz_corpus.rs replays the corpus
// with exactly the same ones.
fuzz_target!(|data: &[u8]| xfer::fuzzing::frame(data));
