//! The checks the fuzz targets (`fuzz/fuzz_targets/`) run on untrusted bytes, in one place so the
//! corpus replay under `cargo test` (`tests/fuzz_corpus.rs`) runs exactly the same ones. Each
//! panics if a decoder misbehaves; none may panic, hang or allocate past the frame limits.

use std::io::{self, Cursor, Read};

use crate::protocol::{
    FrameKind, Message, decode_message, encode_message, read_frame_header, read_message, write_message,
};
use crate::recv::manifest::validate;

/// A stream of frames: message frames until the first error (what is accepted writes back and
/// reads back the same), then the same bytes as headers only, payloads skipped, as the body loop
/// reads them.
pub fn frame(data: &[u8]) {
    let mut r = Cursor::new(data);
    while let Ok(msg) = read_message(&mut r) {
        let mut out = Vec::new();
        write_message(&mut out, &msg).expect("writing to a Vec cannot fail");
        let again = read_message(&mut Cursor::new(&out)).expect("re-read of a written message");
        assert_eq!(again, msg);
    }

    let mut r = Cursor::new(data);
    while let Ok(h) = read_frame_header(&mut r) {
        assert!(h.len <= h.kind.limit());
        assert!(h.kind != FrameKind::Data || h.len > 0);
        let mut payload = (&mut r).take(u64::from(h.len));
        if h.kind == FrameKind::Message {
            let mut buf = Vec::new();
            payload.read_to_end(&mut buf).expect("reading from a slice cannot fail");
            if buf.len() < h.len as usize {
                break;
            }
            if let Ok(msg) = decode_message(&buf) {
                assert_eq!(decode_message(&encode_message(&msg)).ok(), Some(msg));
            }
        } else if io::copy(&mut payload, &mut io::sink()).expect("copy from a slice") < u64::from(h.len) {
            break;
        }
    }
}

/// A message payload: what decodes survives encode → decode unchanged.
pub fn message(data: &[u8]) {
    if let Ok(msg) = decode_message(data) {
        let bytes = encode_message(&msg);
        let again = decode_message(&bytes).expect("an encoded message decodes");
        assert_eq!(again, msg);
    }
}

/// A message payload that decodes to a manifest part has its entries validated, as the receiver
/// does, and a valid one is counted right.
pub fn manifest(data: &[u8]) {
    if let Ok(Message::Manifest(part)) = decode_message(data)
        && let Ok(summary) = validate(&part.entries)
    {
        assert_eq!(summary.files + summary.dirs, part.entries.len());
    }
}
