//! The checks the fuzz targets (`fuzz/fuzz_targets/`) run on untrusted bytes, in one place so the
//! corpus replay under `cargo test` (`tests/fuzz_corpus.rs`) runs exactly the same ones. Each
//! panics if a decoder misbehaves; none may panic, hang or allocate past the frame limits.
//!
//! The secure channel's checks (`handshake`, `records`) use fixed keys, a fixed code and fixed
//! randomness ([`Random::Fixed`]), so an input replays the same way every time, and the seeds
//! made here ([`handshake_seeds`], [`records_seeds`]) are real handshake steps and records that
//! the checks take all the way through.

use std::io::{self, Cursor, Read};
use std::sync::OnceLock;

use zeroize::Zeroizing;

use crate::code::Code;
use crate::protocol::{
    FRAME_HEADER_LEN, FrameHeader, FrameKind, MAX_HANDSHAKE_LEN, MAX_RECORD_LEN, MAX_RECORD_PLAIN, Message,
    Reject, RejectCode, decode_message, encode_message, read_frame_header, read_message, write_message,
};
use crate::recv::manifest::validate;
use crate::sanitize::FsRules;
use crate::transport::handshake::{self, Keys, MODE_INSECURE, MODE_PINNED, Random};
use crate::transport::records::{CipherState, Opener, PlainRefusalError, Sealer, TAG_LEN};
use crate::trust::Identity;

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
/// does on a Linux, a casefold and a Windows-like target, and a valid one is counted right, with
/// only entries it holds refused alone.
pub fn manifest(data: &[u8]) {
    let Ok(Message::Manifest(part)) = decode_message(data) else { return };
    for rules in [FsRules::POSIX, FsRules::CASEFOLD, FsRules::WINDOWS] {
        if let Ok(checked) = validate(&part.entries, rules) {
            assert_eq!(checked.summary.files + checked.summary.dirs, part.entries.len());
            assert!(checked.refused.len() <= part.entries.len());
            assert!(rules != FsRules::POSIX || checked.refused.is_empty());
        }
    }
}

// ---- The secure channel's handshake ----

/// The sender's and the receiver's identity keys in the `handshake` check (X25519; the public
/// halves are checked against the handshake's own view of them in the tests below).
const SENDER_KEY: [u8; 32] = [0x11; 32];
const SENDER_PUB: [u8; 32] = [
    0x7b, 0x4e, 0x90, 0x9b, 0xbe, 0x7f, 0xfe, 0x44, 0xc4, 0x65, 0xa2, 0x20, 0x03, 0x7d, 0x60, 0x8e, 0xe3,
    0x58, 0x97, 0xd3, 0x1e, 0xf9, 0x72, 0xf0, 0x7f, 0x74, 0x89, 0x2c, 0xb0, 0xf7, 0x3f, 0x13,
];
const RECEIVER_KEY: [u8; 32] = [0x22; 32];
const RECEIVER_PUB: [u8; 32] = [
    0x0f, 0xaa, 0x68, 0x4e, 0xd2, 0x88, 0x67, 0xb9, 0x7f, 0x4a, 0x6a, 0x2d, 0xee, 0x5d, 0xf8, 0xce, 0x97,
    0x4e, 0x76, 0xb7, 0x01, 0x8e, 0x3f, 0x22, 0xa1, 0xc4, 0xcf, 0x26, 0x78, 0x57, 0x0f, 0x20,
];
/// The code both sides of the check know.
const CODE: &str = "aardvark-abandoned-abbreviate-abdomen";
const SENDER_EPHEMERAL: [u8; 32] = [0x33; 32];
const RECEIVER_EPHEMERAL: [u8; 32] = [0x44; 32];

fn identity(private: [u8; 32], public: [u8; 32]) -> Identity {
    Identity { private: Zeroizing::new(private), public }
}

fn sender_random() -> Random<'static> {
    Random::Fixed { spake: [0x55; 32], ephemeral: &SENDER_EPHEMERAL }
}

fn receiver_random() -> Random<'static> {
    Random::Fixed { spake: [0x66; 32], ephemeral: &RECEIVER_EPHEMERAL }
}

fn fixed_code() -> &'static Code {
    static PARSED: OnceLock<Code> = OnceLock::new();
    PARSED.get_or_init(|| Code::parse(CODE).expect("a code from the word list"))
}

/// The handshake steps in a byte stream, read as `FrameReader::handshake` reads them: frames of
/// kind handshake, each checked against [`MAX_HANDSHAKE_LEN`] before its payload is read, until
/// EOF, a bad header, a refusal in the clear (a message frame) or a frame of another kind.
fn handshake_steps(data: &[u8]) -> Vec<Vec<u8>> {
    let mut r = Cursor::new(data);
    let mut steps = Vec::new();
    while let Ok(h) = read_frame_header(&mut r) {
        assert!(h.len <= h.kind.limit());
        if !matches!(h.kind, FrameKind::Handshake | FrameKind::Message) {
            break;
        }
        assert!(h.kind != FrameKind::Handshake || h.len <= MAX_HANDSHAKE_LEN);
        let mut payload = Vec::new();
        (&mut r).take(u64::from(h.len)).read_to_end(&mut payload).expect("reading from a slice cannot fail");
        if payload.len() < h.len as usize {
            break;
        }
        if h.kind == FrameKind::Message {
            // The peer refused in the clear (or broke the protocol): the handshake ends there.
            let _ = decode_message(&payload);
            break;
        }
        steps.push(payload);
    }
    steps
}

/// What this side sends must fit a handshake frame.
fn sent(step: &[u8]) {
    assert!(step.len() <= MAX_HANDSHAKE_LEN as usize, "a {}-byte handshake step", step.len());
}

/// The two directions of an accepted handshake have their own keys.
fn distinct(keys: &Keys) {
    assert_ne!(keys.to_receiver, keys.to_sender);
}

/// A peer's handshake frames. The first step is given to both roles, in both modes: as the
/// sender's first step to a receiver (code mode whatever its mode byte, pinned mode when the
/// byte is `02`, as `handshake::receive` dispatches it), the second step then as its m3; and as
/// the receiver's reply to a real sender's first step (code and pinned). Nothing may panic; what
/// is accepted must give distinct keys and answers that fit a frame.
pub fn handshake(data: &[u8]) {
    let steps = handshake_steps(data);
    let Some(first) = steps.first() else { return };
    let m3 = steps.get(1).map_or(&[][..], Vec::as_slice);
    let (sender, receiver) = (identity(SENDER_KEY, SENDER_PUB), identity(RECEIVER_KEY, RECEIVER_PUB));

    if let Ok((state, step2)) =
        handshake::receiver_code_start(fixed_code(), &receiver, first, true, receiver_random())
    {
        sent(&step2);
        if let Ok((_, keys)) = state.finish(m3) {
            distinct(&keys);
        }
    }
    if first.first() == Some(&MODE_PINNED)
        && let Ok((_, reply)) = handshake::receiver_pinned(&receiver, first, receiver_random())
    {
        let (m2, keys) = reply.finish();
        sent(&m2);
        distinct(&keys);
    }

    let (state, _) = handshake::sender_code_start(fixed_code(), &sender, sender_random());
    if let Ok(reply) = handshake::sender_code_reply(state, first) {
        let (m3, keys) = reply.finish();
        sent(&m3);
        distinct(&keys);
    }
    let (state, _) = handshake::sender_pinned_start(&sender, &RECEIVER_PUB, sender_random());
    if let Ok(keys) = state.finish(first) {
        distinct(&keys);
    }
}

fn handshake_frame(step: &[u8]) -> Vec<u8> {
    let mut f = FrameHeader { kind: FrameKind::Handshake, len: step.len() as u32 }.encode().to_vec();
    f.extend_from_slice(step);
    f
}

fn refusal_frame() -> Vec<u8> {
    let reject =
        Reject { code: RejectCode::AuthFailed, reason: "wrong code: the sender did not prove it".into() };
    let mut f = Vec::new();
    write_message(&mut f, &Message::Reject(reject)).expect("writing to a Vec cannot fail");
    f
}

/// Real handshakes between the `handshake` check's keys, code and randomness, as the streams
/// each side reads (named `seed-*`, committed in `fuzz/corpus/handshake/`).
pub fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let (sender, receiver) = (identity(SENDER_KEY, SENDER_PUB), identity(RECEIVER_KEY, RECEIVER_PUB));
    let other = Code::parse("abhorrence-abiding-abnormal-abrasion").expect("a code from the word list");
    // A code handshake, with the right code and with another one: what the receiver reads
    // (step 1 and m3) and what the sender reads (step 2).
    let code_run = |sender_code: &Code, receiver_code: &Code| {
        let (st, step1) = handshake::sender_code_start(sender_code, &sender, sender_random());
        let (_, step2) =
            handshake::receiver_code_start(receiver_code, &receiver, &step1, true, receiver_random())
                .expect("a real step 1 opens");
        let (m3, _) = handshake::sender_code_reply(st, &step2).expect("a real step 2 opens").finish();
        ([handshake_frame(&step1), handshake_frame(&m3)].concat(), handshake_frame(&step2))
    };
    let (code_receiver, code_sender) = code_run(fixed_code(), fixed_code());
    let (wrong_receiver, _) = code_run(&other, fixed_code());
    let (_, wrong_sender) = code_run(fixed_code(), &other);
    let (_, pinned) = handshake::sender_pinned_start(&sender, &RECEIVER_PUB, sender_random());
    let (_, reply) = handshake::receiver_pinned(&receiver, &pinned, receiver_random())
        .expect("a real pinned step 1 opens");
    let (pinned_m2, _) = reply.finish();
    let (_, pinned_other) = handshake::sender_pinned_start(&sender, &SENDER_PUB, sender_random());
    vec![
        ("seed-code-receiver", code_receiver),
        ("seed-code-sender", code_sender),
        ("seed-code-receiver-wrong-code", wrong_receiver),
        ("seed-code-sender-wrong-code", wrong_sender),
        ("seed-pinned-receiver", handshake_frame(&pinned)),
        ("seed-pinned-sender", handshake_frame(&pinned_m2)),
        ("seed-pinned-other-key", handshake_frame(&pinned_other)),
        ("seed-insecure", handshake_frame(&[MODE_INSECURE])),
        ("seed-refusal", refusal_frame()),
    ]
}

// ---- The secure channel's records ----

/// The key and rekey interval of the `records` check's stream (a short interval, so a stream of
/// a few records crosses rekeys).
const RECORD_KEY: [u8; 32] = [0x77; 32];
const RECORD_REKEY: u64 = 2;

/// A peer's bytes as the opener reads them, all at once or in pieces: with `trickle`, reads bring
/// 1 to 7 bytes and some fail with `WouldBlock` (a read timeout) or `Interrupted`. Every read
/// checks what the opener asks for: never more than a whole record.
struct Wire<'a> {
    data: &'a [u8],
    trickle: bool,
    reads: usize,
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        assert!(
            buf.len() <= FRAME_HEADER_LEN + MAX_RECORD_LEN as usize,
            "the opener reads {} bytes at once",
            buf.len()
        );
        self.reads += 1;
        let mut n = buf.len().min(self.data.len());
        if self.trickle {
            match self.reads % 5 {
                1 => return Err(io::ErrorKind::WouldBlock.into()),
                3 => return Err(io::ErrorKind::Interrupted.into()),
                _ => n = n.min(self.reads % 7 + 1),
            }
        }
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Opens `data` as a record stream until EOF or the first error, handing out plaintext `chunk`
/// bytes at most at a time (a read timeout is waited out, as the frame reader does). A plaintext
/// refusal is read as `FrameReader` reads it.
fn open_stream(data: &[u8], trickle: bool, every: u64, chunk: usize) -> (Vec<u8>, io::Result<()>) {
    let mut opener = Opener::new(CipherState::new(RECORD_KEY, every), None, 0);
    let mut wire = Wire { data, trickle, reads: 0 };
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match opener.read(&mut wire, &mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                if let Some(&PlainRefusalError(len)) = e.get_ref().and_then(|i| i.downcast_ref()) {
                    // Only the first frame may be a refusal in the clear.
                    assert!(!opener.opened_one() && out.is_empty());
                    assert!(len <= FrameKind::Message.limit());
                    if let Ok(payload) = opener.take_refusal(&mut wire, len) {
                        assert_eq!(payload.len(), len as usize);
                        let _ = decode_message(&payload);
                    }
                }
                return (out, Err(e));
            }
        }
    }
}

/// Input bytes taken from the front; zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }

    fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn uint(&mut self, n: usize) -> u32 {
        (0..n).fold(0, |acc, _| acc << 8 | u32::from(self.byte()))
    }
}

/// Records: the input as a peer's record stream, opened whole and in pieces with the same
/// outcome (nothing may panic, no read asks for more than a record); then a round trip: the
/// input read as parameters and pieces, sealed, must open to the same plaintext, and with one
/// byte flipped must fail, having handed out only the plaintext of the records before it.
pub fn records(data: &[u8]) {
    let (whole, end) = open_stream(data, false, RECORD_REKEY, 4096);
    let (pieces, end_pieces) = open_stream(data, true, RECORD_REKEY, 3);
    assert_eq!(whole, pieces);
    assert_eq!(end.map_err(|e| e.kind()), end_pieces.map_err(|e| e.kind()));
    round_trip(data);
}

/// The round trip's input: rekey interval (1 to 4), plaintext chunk handed out, where to flip and
/// with what, then pieces: a length byte and that many bytes. A first length byte from `F8` on is
/// instead followed by one byte that makes a piece of made-up bytes around a full record
/// ([`MAX_RECORD_PLAIN`] - 128 to + 127 bytes: the largest record, and a record split in two);
/// only the first, so few inputs pay for sealing and opening a quarter megabyte three times, and
/// then plaintext is handed out at least 4 KiB at a time (not a quarter million calls of 1 byte).
/// Empty pieces are skipped: the writer never seals nothing, and an empty record is refused.
fn round_trip(data: &[u8]) {
    let mut input = Bytes(data);
    let every = 1 + u64::from(input.byte() % 4);
    let mut chunk = 1 + usize::from(input.byte()) * 37;
    let at = input.uint(4) as usize;
    let mask = input.byte().max(1);
    let mut pieces = Vec::new();
    while !input.0.is_empty() {
        let t = input.byte();
        let piece = if t >= 0xf8 && pieces.is_empty() {
            chunk = chunk.max(4096);
            vec![t; MAX_RECORD_PLAIN as usize - 128 + usize::from(input.byte())]
        } else {
            input.take(usize::from(t)).to_vec()
        };
        if !piece.is_empty() {
            pieces.push(piece);
        }
    }

    let mut sealer = Sealer::new(CipherState::new(RECORD_KEY, every));
    let (mut wire, mut sealed) = (Vec::new(), 0);
    for piece in &pieces {
        let mut rest = &piece[..];
        while !rest.is_empty() {
            let n = sealer.write_record(&mut wire, rest).expect("writing to a Vec cannot fail");
            assert!(n > 0 && n <= MAX_RECORD_PLAIN as usize);
            rest = &rest[n..];
            sealed += 1;
        }
    }
    let plain = pieces.concat();
    assert_eq!(wire.len(), plain.len() + sealed * (FRAME_HEADER_LEN + TAG_LEN));
    let (out, end) = open_stream(&wire, false, every, chunk);
    assert!(end.is_ok(), "a sealed stream failed to open: {end:?}");
    assert!(out == plain, "a sealed stream opened to other bytes");

    if wire.is_empty() {
        return;
    }
    let at = at % wire.len();
    wire[at] ^= mask;
    let (out, end) = open_stream(&wire, false, every, chunk);
    assert!(end.is_err(), "byte {at} of {} flipped with {mask:#04x} went unnoticed", wire.len());
    assert!(out.len() < plain.len() && plain.starts_with(&out), "unauthenticated plaintext handed out");
}

/// Real record streams under the `records` check's key (named `seed-*`, committed in
/// `fuzz/corpus/records/`), and one round-trip input with a record of the largest size.
pub fn records_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let seal = |pieces: &[&[u8]]| {
        let mut sealer = Sealer::new(CipherState::new(RECORD_KEY, RECORD_REKEY));
        let mut wire = Vec::new();
        for p in pieces {
            sealer.write_record(&mut wire, p).expect("writing to a Vec cannot fail");
        }
        wire
    };
    let refusal = refusal_frame();
    let data = [&[0, 0, 0, 3, 2][..], b"abc"].concat(); // a 3-byte data frame
    let mut round_trip = vec![0x01, 0x1b, 0x00, 0x00, 0x01, 0x00, 0x80];
    round_trip.extend_from_slice(&[0xf8, 128, 5]); // 256 KiB, then 5 bytes
    round_trip.extend_from_slice(b"hello");
    vec![
        ("seed-record", seal(&[&refusal])),
        ("seed-records-rekeyed", seal(&[&refusal, &data, b"x", &[0xab; 300], &data])),
        ("seed-refusal", refusal.clone()),
        ("seed-record-then-plaintext", [seal(&[&data]), refusal].concat()),
        ("seed-round-trip", round_trip),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(seeds: &[(&'static str, Vec<u8>)], name: &str) -> Vec<u8> {
        seeds.iter().find(|(n, _)| *n == name).expect("a seed of that name").1.clone()
    }

    /// The handshake seeds reach what they are named for, under the check's fixed keys (which
    /// also checks the public keys written above against the private ones).
    #[test]
    fn handshake_seeds_go_all_the_way() {
        let seeds = handshake_seeds();
        let (sender, receiver) = (identity(SENDER_KEY, SENDER_PUB), identity(RECEIVER_KEY, RECEIVER_PUB));
        let steps = handshake_steps(&seed(&seeds, "seed-code-receiver"));
        let (state, _) =
            handshake::receiver_code_start(fixed_code(), &receiver, &steps[0], true, receiver_random())
                .ok()
                .unwrap();
        let (who, _) = state.finish(&steps[1]).unwrap();
        assert_eq!(who, SENDER_PUB);

        let steps = handshake_steps(&seed(&seeds, "seed-code-receiver-wrong-code"));
        let (state, _) =
            handshake::receiver_code_start(fixed_code(), &receiver, &steps[0], true, receiver_random())
                .ok()
                .unwrap();
        assert!(matches!(state.finish(&steps[1]), Err(handshake::HsError::WrongCode)));

        for name in ["seed-code-sender", "seed-code-sender-wrong-code"] {
            let steps = handshake_steps(&seed(&seeds, name));
            let (state, _) = handshake::sender_code_start(fixed_code(), &sender, sender_random());
            let reply = handshake::sender_code_reply(state, &steps[0]).unwrap();
            assert_eq!(reply.receiver, RECEIVER_PUB);
        }

        let steps = handshake_steps(&seed(&seeds, "seed-pinned-receiver"));
        let (who, _) = handshake::receiver_pinned(&receiver, &steps[0], receiver_random()).unwrap();
        assert_eq!(who, SENDER_PUB);
        let steps = handshake_steps(&seed(&seeds, "seed-pinned-other-key"));
        assert!(matches!(
            handshake::receiver_pinned(&receiver, &steps[0], receiver_random()),
            Err(handshake::HsError::NotOurKey)
        ));
        let steps = handshake_steps(&seed(&seeds, "seed-pinned-sender"));
        let (state, _) = handshake::sender_pinned_start(&sender, &RECEIVER_PUB, sender_random());
        assert!(state.finish(&steps[0]).is_ok());

        assert!(handshake_steps(&seed(&seeds, "seed-refusal")).is_empty());
        for (_, data) in &seeds {
            handshake(data);
        }
    }

    /// The record seeds open (or are refused) as named, and the round-trip seed seals a record
    /// of the largest size.
    #[test]
    fn records_seeds_open() {
        let seeds = records_seeds();
        for name in ["seed-record", "seed-records-rekeyed"] {
            let (out, end) = open_stream(&seed(&seeds, name), false, RECORD_REKEY, 4096);
            assert!(end.is_ok() && !out.is_empty(), "{name}");
        }
        let (out, end) = open_stream(&seed(&seeds, "seed-refusal"), false, RECORD_REKEY, 4096);
        assert!(out.is_empty() && end.unwrap_err().get_ref().unwrap().is::<PlainRefusalError>());
        let (out, end) = open_stream(&seed(&seeds, "seed-record-then-plaintext"), false, RECORD_REKEY, 4096);
        assert!(!out.is_empty() && end.unwrap_err().kind() == io::ErrorKind::InvalidData);
        for (_, data) in &seeds {
            records(data);
        }
    }
}
