//! Encrypted records: the frame stream of a secure connection, cut into AES-256-GCM records.
//!
//! A record is a frame of kind [`FrameKind::Record`]: the 5-byte header (length, kind) in the
//! clear and used as associated data, then the ciphertext of at most [`MAX_RECORD_PLAIN`] bytes of
//! the frame stream and its 16-byte tag. Each direction has its own key from the handshake and
//! counts its records from 0; the nonce is 4 zero bytes then the record's number as a big-endian
//! `u64` (Noise's AESGCM nonce), so a record replayed, reordered, dropped or reflected fails to
//! open. Every [`REKEY_RECORDS`] records the key is replaced by Noise's `REKEY` of it (the first
//! 32 bytes of encrypting 32 zero bytes under nonce 2^64-1), so no key protects more than 16 GiB,
//! well inside AES-GCM's usage limits. Any failure to open ends the connection: there is no
//! resynchronising after a forged or lost record.
//!
//! [`Opener`] tolerates a record arriving in pieces across read timeouts (the bytes already in
//! are kept), but a record once begun must keep arriving at [`MIN_RATE`] per idle-timeout window,
//! so a peer cannot trickle one record for days and hold a transfer slot.
//!
//! [`MIN_RATE`]: crate::transport::MIN_RATE

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroize;

use crate::error::ChannelBroken;

use crate::protocol::{
    FRAME_HEADER_LEN, FrameHeader, FrameKind, MAX_RECORD_LEN, MAX_RECORD_PLAIN, ProtocolError,
};

/// Length of the AES-GCM tag at the end of every record.
pub const TAG_LEN: usize = 16;

/// Records sealed under one key before both sides replace it: 65,536 records of at most 256 KiB
/// is 16 GiB per key.
pub const REKEY_RECORDS: u64 = 65_536;

/// One direction's key and record counter.
pub(crate) struct CipherState {
    raw: [u8; 32],
    key: LessSafeKey,
    /// Number of the next record (the nonce), counted over the whole connection.
    next: u64,
    /// Records between rekeys (lowered only by a test setting).
    rekey_every: u64,
}

impl Drop for CipherState {
    fn drop(&mut self) {
        self.raw.zeroize();
    }
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; NONCE_LEN];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

fn aes_key(raw: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, raw).expect("32-byte key"))
}

/// Noise's REKEY for AESGCM: the first 32 bytes of ENCRYPT(k, 2^64-1, "", 32 zero bytes).
pub(crate) fn rekey(raw: &[u8; 32]) -> [u8; 32] {
    let mut zeros = [0u8; 32];
    let _tag = aes_key(raw)
        .seal_in_place_separate_tag(nonce(u64::MAX), Aad::empty(), &mut zeros)
        .expect("32 bytes always seal");
    zeros
}

impl CipherState {
    pub(crate) fn new(raw: [u8; 32], rekey_every: u64) -> CipherState {
        CipherState { key: aes_key(&raw), raw, next: 0, rekey_every: rekey_every.max(1) }
    }

    /// The nonce for the next record, moving to the next key when this one has done its share.
    fn advance(&mut self) -> Nonce {
        let n = self.next;
        if n > 0 && n.is_multiple_of(self.rekey_every) {
            let new = rekey(&self.raw);
            self.raw.zeroize();
            self.raw = new;
            self.key = aes_key(&self.raw);
        }
        self.next += 1;
        nonce(n)
    }
}

/// The records' rekey interval: [`REKEY_RECORDS`], or lower when the test setting
/// `XFER_TEST_REKEY_RECORDS` asks (it can only lower it; both sides must agree).
pub(crate) fn rekey_interval() -> u64 {
    std::env::var("XFER_TEST_REKEY_RECORDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n >= 1)
        .map_or(REKEY_RECORDS, |n| n.min(REKEY_RECORDS))
}

/// Room for one whole record: header, the most plaintext, tag.
const RECORD_BUF: usize = FRAME_HEADER_LEN + MAX_RECORD_PLAIN as usize + TAG_LEN;

/// A record buffer, made on first use (zeroed by the allocator, so pages a connection never
/// fills cost nothing) and never cleared or zeroed again: filling, sealing and opening a record
/// touch its bytes once.
fn record_buf(buf: &mut Vec<u8>) -> &mut [u8] {
    if buf.is_empty() {
        *buf = vec![0u8; RECORD_BUF];
    }
    buf
}

/// Seals what is written into records and writes them to `inner`. Each `write` seals at most
/// [`MAX_RECORD_PLAIN`] bytes into one record and writes the whole record before returning: a
/// record is never left half-written on a healthy connection.
pub(crate) struct Sealer {
    cipher: CipherState,
    buf: Vec<u8>,
}

impl Sealer {
    pub(crate) fn new(cipher: CipherState) -> Sealer {
        Sealer { cipher, buf: Vec::new() }
    }

    /// Seals `plain` (its first [`MAX_RECORD_PLAIN`] bytes) as one record and writes it.
    pub(crate) fn write_record<W: Write>(&mut self, inner: &mut W, plain: &[u8]) -> io::Result<usize> {
        // An empty record is refused by the opener: nothing to write is no record.
        if plain.is_empty() {
            return Ok(0);
        }
        let n = plain.len().min(MAX_RECORD_PLAIN as usize);
        record_buf(&mut self.buf)[FRAME_HEADER_LEN..FRAME_HEADER_LEN + n].copy_from_slice(&plain[..n]);
        self.seal_and_write(inner, n)?;
        Ok(n)
    }

    /// Builds one record in place: `fill` writes plaintext at the start of the room it is given
    /// ([`MAX_RECORD_PLAIN`] bytes: the bytes of a file straight from a read, for instance) and
    /// says how many; the record is sealed in that buffer and written. One copy of a body's
    /// bytes, not three. Nothing is written when `fill` gives nothing.
    pub(crate) fn write_record_with<W: Write, E>(
        &mut self,
        inner: &mut W,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<Result<(), io::Error>, E> {
        let room =
            &mut record_buf(&mut self.buf)[FRAME_HEADER_LEN..FRAME_HEADER_LEN + MAX_RECORD_PLAIN as usize];
        let n = fill(room)?;
        assert!(n <= MAX_RECORD_PLAIN as usize, "record too large");
        if n == 0 {
            return Ok(Ok(()));
        }
        Ok(self.seal_and_write(inner, n))
    }

    /// Seals the `n` plaintext bytes after the header slot and writes header, ciphertext, tag.
    fn seal_and_write<W: Write>(&mut self, inner: &mut W, n: usize) -> io::Result<()> {
        seal_in(&mut self.cipher, &mut self.buf, n)?;
        inner.write_all(&self.buf[..FRAME_HEADER_LEN + n + TAG_LEN])
    }

    /// Seals and writes a record built in a buffer of the caller's ([`record_buffer`]): its `n`
    /// plaintext bytes at [`RECORD_ROOM`]. For a pipeline that lends record buffers to another
    /// thread between filling and sealing them (the sender's hashing thread reading a body's
    /// bytes as they go out). The buffer is left holding the ciphertext.
    pub(crate) fn seal_buffer<W: Write>(
        &mut self,
        inner: &mut W,
        buf: &mut [u8],
        n: usize,
    ) -> io::Result<()> {
        assert!(n > 0 && n <= MAX_RECORD_PLAIN as usize, "record size");
        seal_in(&mut self.cipher, buf, n)?;
        inner.write_all(&buf[..FRAME_HEADER_LEN + n + TAG_LEN])
    }
}

/// A buffer for one whole record, for [`Sealer::seal_buffer`].
pub(crate) fn record_buffer() -> Vec<u8> {
    vec![0u8; RECORD_BUF]
}

/// Where a record's plaintext goes in a record buffer: after the header slot, room for the most
/// plaintext (the tag's room follows).
pub(crate) const RECORD_ROOM: std::ops::Range<usize> =
    FRAME_HEADER_LEN..FRAME_HEADER_LEN + MAX_RECORD_PLAIN as usize;

/// Seals the `n` plaintext bytes of `buf` after its header slot in place: header, ciphertext, tag.
fn seal_in(cipher: &mut CipherState, buf: &mut [u8], n: usize) -> io::Result<()> {
    let header = FrameHeader { kind: FrameKind::Record, len: (n + TAG_LEN) as u32 }.encode();
    let nonce = cipher.advance();
    let buf = &mut buf[..FRAME_HEADER_LEN + n + TAG_LEN];
    buf[..FRAME_HEADER_LEN].copy_from_slice(&header);
    let (body, tag_room) = buf[FRAME_HEADER_LEN..].split_at_mut(n);
    let tag = cipher
        .key
        .seal_in_place_separate_tag(nonce, Aad::from(header), body)
        .map_err(|_| io::Error::other("sealing a record failed"))?;
    tag_room.copy_from_slice(tag.as_ref());
    Ok(())
}

/// Why a record could not be opened: always the end of the connection.
fn broken(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, ChannelBroken(what.to_string()))
}

/// Opens records read from an inner reader and hands out their plaintext.
pub(crate) struct Opener {
    cipher: CipherState,
    /// The record being read (header, ciphertext, tag) or, once opened, its plaintext.
    buf: Vec<u8>,
    /// Bytes of the current record read so far (while reading), or 0 once opened.
    have: usize,
    /// Bytes the current record has in all (its header until the header is in).
    need: usize,
    /// Plaintext of the opened record: `buf[pos..end]` is still to be handed out.
    pos: usize,
    end: usize,
    /// Idle timeout and least rate a begun record must keep arriving at.
    idle: Option<Duration>,
    min_rate: u64,
    /// The current window of a begun record: when it started and the bytes it brought.
    window: Option<(Instant, u64)>,
    /// The first record has not been opened yet: a plaintext refusal may come instead, where the
    /// handshake leaves the peer a reason to refuse (a code to check) and `plain_refusals` is on.
    first: bool,
    plain_refusals: bool,
}

impl Opener {
    pub(crate) fn new(cipher: CipherState, idle: Option<Duration>, min_rate: u64) -> Opener {
        Opener {
            cipher,
            buf: Vec::new(),
            have: 0,
            need: FRAME_HEADER_LEN,
            pos: 0,
            end: 0,
            idle,
            min_rate,
            window: None,
            first: true,
            plain_refusals: true,
        }
    }

    /// From now on, a plaintext frame in place of the first record breaks the channel: after a
    /// pinned handshake (the receiver proved its key) or on the receiver (senders never refuse).
    pub(crate) fn without_plain_refusals(mut self) -> Opener {
        self.plain_refusals = false;
        self
    }

    /// Whether a record has opened.
    pub(crate) fn opened_one(&self) -> bool {
        !self.first
    }

    /// Hands out plaintext, reading and opening the next record from `inner` when none is left.
    pub(crate) fn read<R: Read>(&mut self, inner: &mut R, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos == self.end {
            if !self.next_record(inner)? {
                return Ok(0);
            }
        }
        let n = (self.end - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    /// Reads one whole record and opens it. `Ok(false)`: the peer closed cleanly between
    /// records. A timeout keeps the bytes already read for the next call.
    fn next_record<R: Read>(&mut self, inner: &mut R) -> io::Result<bool> {
        record_buf(&mut self.buf);
        if self.have == 0 {
            self.need = FRAME_HEADER_LEN;
        }
        while self.have < self.need {
            let got = self.read_some(inner);
            match got {
                Ok(0) if self.have == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.have += n;
                    if self.have == FRAME_HEADER_LEN && self.need == FRAME_HEADER_LEN {
                        self.expect_body()?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let header: [u8; FRAME_HEADER_LEN] = self.buf[..FRAME_HEADER_LEN].try_into().expect("5 bytes");
        let nonce = self.cipher.advance();
        let opened = self
            .cipher
            .key
            .open_in_place(nonce, Aad::from(header), &mut self.buf[FRAME_HEADER_LEN..self.need])
            .map(|p| p.len());
        let Ok(len) = opened else {
            return Err(broken("a record failed authentication (tampered, replayed, reordered or dropped)"));
        };
        self.first = false;
        (self.pos, self.end, self.have, self.window) = (FRAME_HEADER_LEN, FRAME_HEADER_LEN + len, 0, None);
        Ok(true)
    }

    /// The header is in: checks it and sizes the buffer for the rest of the record.
    fn expect_body(&mut self) -> io::Result<()> {
        let header: [u8; FRAME_HEADER_LEN] = self.buf[..FRAME_HEADER_LEN].try_into().expect("5 bytes");
        let decoded = FrameHeader::decode(header);
        match decoded {
            Ok(h) if h.kind == FrameKind::Record && h.len as usize > TAG_LEN => {
                self.need = FRAME_HEADER_LEN + h.len as usize;
                Ok(())
            }
            Ok(h) if h.kind == FrameKind::Record => Err(broken("an empty record")),
            // The peer's handshake failed and it says why in the clear, as a message frame.
            Ok(h) if self.first && self.plain_refusals && h.kind == FrameKind::Message => {
                Err(io::Error::other(PlainRefusalError(h.len)))
            }
            Ok(h) => Err(broken(&format!("a {} frame where a record was due", h.kind))),
            Err(ProtocolError::FrameTooLarge { len, .. }) => {
                Err(broken(&format!("a record of {len} bytes (limit {MAX_RECORD_LEN})")))
            }
            Err(e) => Err(broken(&e.to_string())),
        }
    }

    /// One read of the record's remaining bytes, with the minimum-rate rule for a begun record.
    fn read_some<R: Read>(&mut self, inner: &mut R) -> io::Result<usize> {
        let begun = self.have > 0;
        let r = inner.read(&mut self.buf[self.have..self.need]);
        let Some(idle) = self.idle else { return r };
        let now = Instant::now();
        let got = *r.as_ref().unwrap_or(&0) as u64;
        if !begun {
            if got > 0 {
                self.window = Some((now, got));
            }
            return r;
        }
        let (since, bytes) = self.window.get_or_insert((now, 0));
        *bytes += got;
        if now.duration_since(*since) >= idle {
            if *bytes < self.min_rate.saturating_mul(idle.as_secs().max(1)) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "a record arrived at less than {} bytes/s for {} s (MIN_RATE; see --timeout)",
                        self.min_rate,
                        idle.as_secs()
                    ),
                ));
            }
            self.window = Some((now, 0));
        }
        r
    }

    /// After [`PlainRefusalError`]: the refusal's message payload, read in the clear.
    pub(crate) fn take_refusal<R: Read>(&mut self, inner: &mut R, len: u32) -> io::Result<Vec<u8>> {
        let mut payload = vec![0u8; len as usize];
        inner.read_exact(&mut payload)?;
        Ok(payload)
    }
}

/// The first frame of a secure connection was a plaintext message: the peer refused in the
/// clear. Carried inside an `io::Error` so the reader can tell it from a broken record.
#[derive(Debug)]
pub(crate) struct PlainRefusalError(pub u32);

impl std::fmt::Display for PlainRefusalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the peer refused in the clear")
    }
}

impl std::error::Error for PlainRefusalError {}

/// The record layer by hand, for harnesses that speak the secure channel themselves: the test
/// bridge (`tests/it/bridge.rs`) seals a raw test peer's frame stream into records with it. Not
/// part of xfer's API (hidden from the docs; it changes with the protocol). It rekeys at the
/// binary's interval (`XFER_TEST_REKEY_RECORDS` included), so both ends agree.
#[doc(hidden)]
pub struct RecordSealer(Sealer);

impl RecordSealer {
    /// Seals under `key`, one direction's key of a finished handshake
    /// ([`Keys`](super::handshake::Keys)), numbering records from 0.
    pub fn new(key: [u8; 32]) -> RecordSealer {
        RecordSealer(Sealer::new(CipherState::new(key, rekey_interval())))
    }

    /// Seals the first [`MAX_RECORD_PLAIN`] bytes (at most) of `plain` as one record and writes
    /// the whole record to `out`. Returns the bytes sealed.
    pub fn seal<W: Write>(&mut self, out: &mut W, plain: &[u8]) -> io::Result<usize> {
        self.0.write_record(out, plain)
    }
}

/// The other half of [`RecordSealer`]: opens records read from a socket and hands out their
/// plaintext, as the binary does (no timeouts, no minimum rate). Test harnesses only.
#[doc(hidden)]
pub struct RecordOpener {
    opener: Opener,
    /// A refusal said in the clear, still to be handed out; `passthrough` once it was seen.
    refusal: Vec<u8>,
    passthrough: bool,
}

impl RecordOpener {
    /// Opens records sealed under `key`, numbered from 0.
    pub fn new(key: [u8; 32]) -> RecordOpener {
        RecordOpener {
            opener: Opener::new(CipherState::new(key, rekey_interval()), None, 0),
            refusal: Vec::new(),
            passthrough: false,
        }
    }

    /// Reads plaintext: `Ok(0)` once the peer closed between records, an error (kind
    /// `InvalidData`) for a record that does not open. A refusal the peer said in the clear
    /// instead of its first record is handed out as the message frame it is (header, payload),
    /// and what follows it as it comes: what the plaintext stream would have carried.
    pub fn read<R: Read>(&mut self, inner: &mut R, out: &mut [u8]) -> io::Result<usize> {
        if !self.refusal.is_empty() {
            let n = self.refusal.len().min(out.len());
            out[..n].copy_from_slice(&self.refusal[..n]);
            self.refusal.drain(..n);
            return Ok(n);
        }
        if self.passthrough {
            return inner.read(out);
        }
        match self.opener.read(inner, out) {
            Err(e) => match e.get_ref().and_then(|i| i.downcast_ref::<PlainRefusalError>()) {
                Some(&PlainRefusalError(len)) => {
                    let payload = self.opener.take_refusal(inner, len)?;
                    let header = FrameHeader { kind: FrameKind::Message, len }.encode();
                    self.refusal = [&header[..], &payload].concat();
                    self.passthrough = true;
                    self.read(inner, out)
                }
                None => Err(e),
            },
            ok => ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(rekey_every: u64) -> (Sealer, Opener) {
        let key = [7u8; 32];
        (
            Sealer::new(CipherState::new(key, rekey_every)),
            Opener::new(CipherState::new(key, rekey_every), None, 1024),
        )
    }

    fn seal_all(s: &mut Sealer, pieces: &[&[u8]]) -> Vec<Vec<u8>> {
        pieces
            .iter()
            .map(|p| {
                let mut out = Vec::new();
                s.write_record(&mut out, p).unwrap();
                out
            })
            .collect()
    }

    fn open_all(o: &mut Opener, wire: &[u8]) -> io::Result<Vec<u8>> {
        let mut r = wire;
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = o.read(&mut r, &mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn records_round_trip_across_rekeys() {
        let (mut s, mut o) = pair(3);
        let pieces: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100 + i as usize]).collect();
        let refs: Vec<&[u8]> = pieces.iter().map(|p| p.as_slice()).collect();
        let wire = seal_all(&mut s, &refs).concat();
        assert_eq!(open_all(&mut o, &wire).unwrap(), pieces.concat());
    }

    #[test]
    fn every_flipped_byte_fails() {
        let (mut s, _) = pair(REKEY_RECORDS);
        let wire = seal_all(&mut s, &[b"hello, records"]).concat();
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x01;
            let (_, mut o) = pair(REKEY_RECORDS);
            assert!(open_all(&mut o, &bad).is_err(), "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn replayed_reordered_dropped_and_reflected_records_fail() {
        let (mut s, _) = pair(REKEY_RECORDS);
        let r = seal_all(&mut s, &[b"one", b"two", b"three"]);
        for wire in [
            [r[0].clone(), r[0].clone()].concat(),
            [r[1].clone(), r[0].clone()].concat(),
            [r[0].clone(), r[2].clone()].concat(),
        ] {
            let (_, mut o) = pair(REKEY_RECORDS);
            assert!(open_all(&mut o, &wire).is_err());
        }
        // A rekey that one side makes a record late fails from that record on.
        let (mut s, _) = pair(2);
        let wire = seal_all(&mut s, &[b"a", b"b", b"c"]).concat();
        let mut o = Opener::new(CipherState::new([7u8; 32], 3), None, 1024);
        assert!(open_all(&mut o, &wire).is_err());
    }

    #[test]
    fn a_record_in_pieces_across_timeouts_opens() {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 += 1;
                if self.1.is_multiple_of(2) {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = self.0.len().min(3).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let (mut s, mut o) = pair(REKEY_RECORDS);
        let wire = seal_all(&mut s, &[b"pieces across timeouts"]).concat();
        let mut t = Trickle(&wire, 0);
        let mut out = [0u8; 64];
        let n = loop {
            match o.read(&mut t, &mut out) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&out[..n], b"pieces across timeouts");
    }

    #[test]
    fn the_harness_halves_round_trip_and_hand_out_a_plain_refusal_as_its_frame() {
        let (mut s, mut o) = (RecordSealer::new([3u8; 32]), RecordOpener::new([3u8; 32]));
        let mut wire = Vec::new();
        for piece in [&b"frames"[..], b" in ", b"records"] {
            s.seal(&mut wire, piece).unwrap();
        }
        let (mut r, mut out, mut got) = (&wire[..], [0u8; 4], Vec::new());
        while let n @ 1.. = o.read(&mut r, &mut out).unwrap() {
            got.extend_from_slice(&out[..n]);
        }
        assert_eq!(got, b"frames in records");
        // A refusal in the clear where the first record was due: the frame as the plaintext
        // stream carries it, then whatever follows.
        let refusal = [&[0, 0, 0, 3, FrameKind::Message as u8][..], b"no!", b"rest"].concat();
        let mut o = RecordOpener::new([3u8; 32]);
        let (mut r, mut out, mut got) = (&refusal[..], [0u8; 3], Vec::new());
        while let n @ 1.. = o.read(&mut r, &mut out).unwrap() {
            got.extend_from_slice(&out[..n]);
        }
        assert_eq!(got, refusal);
    }

    #[test]
    fn rekey_is_noise_rekey() {
        // REKEY(k) = first 32 bytes of AES-256-GCM(k, nonce 2^64-1, "", 32 zero bytes): checked
        // against ring's seal directly, and it changes the key.
        let k = [1u8; 32];
        let new = rekey(&k);
        assert_ne!(new, k);
        assert_eq!(rekey(&k), new);
    }
}
