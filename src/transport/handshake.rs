//! The secure channel's handshake: after the hellos, before any frame of the transfer.
//!
//! The sender's first handshake frame starts with a mode byte (PROTOCOL.md, "Secure channel"):
//! - `00` insecure: nothing more; the plaintext frame stream follows (both sides `--insecure`).
//! - `01` code (first contact): `01 ‖ A ‖ m1` → `B ‖ m2` → `m3`. A and B are SPAKE2 messages
//!   (Ed25519 group, identities `xfer sender` / `xfer receiver`) on the canonical code; the
//!   SPAKE2 key K gives the PSK of a Noise `XXpsk3` handshake (HKDF-SHA256, salt `xfer psk`,
//!   info `noise XXpsk3`). Both static keys travel encrypted; the PSK enters at m3, so the
//!   receiver learns whether the code was right from m3 alone: that, and only that, is a guess.
//!   m2 carries one byte: 1 when the receiver remembers paired senders (`--remember`).
//! - `02` pinned (repeat contact): `02 ‖ m1` → `m2`, Noise `IK` to the receiver key the sender
//!   pinned when it paired. No code.
//! - `03` lane (a further connection of a split file, PROTOCOL.md "Lanes"): `03 ‖ session ‖ Ns`
//!   → `Nr`; both sides derive the lane's record keys from the split's secret, which travelled
//!   inside the main connection's records, and the two nonces (HKDF-SHA256). No code, no DH:
//!   the secret is only as old as the split, and only the main connection's peers know it.
//!
//! The Noise prologue binds every plaintext byte before it: `xfer secure channel v1`, both hellos,
//! the mode byte and (code mode) A; B is bound through K. Then both sides take the two keys of
//! Noise's split (sender→receiver, receiver→sender) for the records (`records.rs`).
//!
//! A side that refuses before the channel is up says so in the clear with a `Reject` message
//! (codes `AuthRequired`, `AuthFailed`, `InsecureOnly`, `UnknownSender`, or `Busy`).

use std::net::IpAddr;

use ring::hkdf;
use snow::{Builder, HandshakeState};
use spake2::{Ed25519Group, Identity as SpakeId, Password, Spake2};
use zeroize::Zeroizing;

use super::records::{CipherState, rekey_interval};
use super::{FrameReader, FrameWriter, Handshake};
use crate::code::Code;
use crate::error::Error;
use crate::protocol::{self, Message, Reject, RejectCode};
use crate::trust::Identity;

/// Noise pattern of first contact (code).
pub const XX: &str = "Noise_XXpsk3_25519_AESGCM_SHA256";
/// Noise pattern of repeat contact (pinned receiver key).
pub const IK: &str = "Noise_IK_25519_AESGCM_SHA256";

pub const MODE_INSECURE: u8 = 0x00;
pub const MODE_CODE: u8 = 0x01;
pub const MODE_PINNED: u8 = 0x02;
pub const MODE_LANE: u8 = 0x03;
/// A lane's session id and each side's nonce.
pub const LANE_SESSION: usize = 16;
pub const LANE_NONCE: usize = 32;
/// The lane handshake's first step: mode, session, the sender's nonce.
pub const LANE_STEP1: usize = 1 + LANE_SESSION + LANE_NONCE;

const PROLOGUE: &[u8] = b"xfer secure channel v1";
const SPAKE_SENDER: &[u8] = b"xfer sender";
const SPAKE_RECEIVER: &[u8] = b"xfer receiver";
/// A SPAKE2 message on Ed25519: a side byte and a point.
pub const SPAKE_LEN: usize = 33;
/// Noise messages are small; this bounds the buffer a handshake step is written into.
const NOISE_BUF: usize = 512;

/// Why the handshake failed. The transport glue turns these into errors and refusals.
#[derive(Debug)]
pub enum HsError {
    /// The peer's bytes do not make a handshake step (wrong length, bad point, failed decryption
    /// before any secret was tested).
    Malformed(&'static str),
    /// The proof that the code was known failed (receiver, m3).
    WrongCode,
    /// The pinned-key message did not open: the sender pinned another key.
    NotOurKey,
}

fn noise_err(what: &'static str) -> impl Fn(snow::Error) -> HsError {
    move |_| HsError::Malformed(what)
}

/// Everything the Noise prologue binds.
pub fn prologue(mode: u8, spake_a: &[u8]) -> Vec<u8> {
    let hello = protocol::hello();
    let mut p = Vec::with_capacity(PROLOGUE.len() + 2 * hello.len() + 1 + spake_a.len());
    p.extend_from_slice(PROLOGUE);
    p.extend_from_slice(&hello); // the sender's
    p.extend_from_slice(&hello); // the receiver's (the same bytes, or the hellos failed)
    p.push(mode);
    p.extend_from_slice(spake_a);
    p
}

/// The PSK of `XXpsk3` from the SPAKE2 key.
pub fn psk(k: &[u8]) -> Zeroizing<[u8; 32]> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"xfer psk").extract(k);
    let mut out = Zeroizing::new([0u8; 32]);
    prk.expand(&[b"noise XXpsk3"], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out[..]))
        .expect("32 bytes is a valid HKDF length");
    out
}

/// `N` bytes from the system's randomness (ring's `SystemRandom`: getrandom).
pub fn random<const N: usize>() -> Result<[u8; N], Error> {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut out).map_err(|_| {
        Error::io("drawing random bytes", std::io::Error::other("the system's randomness failed"))
    })?;
    Ok(out)
}

/// A lane's record keys: `HKDF-SHA256(salt = "xfer lane v1", IKM = secret, info = prologue(03,
/// session ‖ Ns) ‖ Nr)`, 64 bytes: sender → receiver, then receiver → sender. Fresh nonces on
/// both sides make every lane's keys its own, so nothing recorded from one lane opens on another.
pub fn lane_keys(secret: &[u8; 32], step1: &[u8], nonce_r: &[u8]) -> Keys {
    struct Len64;
    impl hkdf::KeyType for Len64 {
        fn len(&self) -> usize {
            64
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"xfer lane v1").extract(secret);
    let info = prologue(MODE_LANE, &step1[1..]);
    let mut out = Zeroizing::new([0u8; 64]);
    prk.expand(&[&info, nonce_r], Len64)
        .and_then(|okm| okm.fill(&mut out[..]))
        .expect("64 bytes is a valid HKDF length");
    let mut keys = Keys { to_receiver: [0; 32], to_sender: [0; 32] };
    keys.to_receiver.copy_from_slice(&out[..32]);
    keys.to_sender.copy_from_slice(&out[32..]);
    keys
}

/// The sender's side of a lane: `03 ‖ session ‖ Ns` out, `Nr` in, then records both ways (in the
/// clear if `secure` is false: an `--insecure` split's lanes are plaintext too).
pub fn sender_lane(
    r: &mut FrameReader,
    w: &mut FrameWriter,
    session: &[u8; 16],
    secret: &[u8; 32],
    secure: bool,
) -> Result<(), Error> {
    let mut step1 = vec![MODE_LANE];
    step1.extend_from_slice(session);
    let nonce: [u8; LANE_NONCE] = random()?;
    step1.extend_from_slice(&nonce);
    w.handshake(&step1).map_err(|e| w.error("joining a lane", e.into()))?;
    let nonce_r = read_step(r, "waiting for the lane's handshake")?;
    if nonce_r.len() != LANE_NONCE {
        return Err(malformed(r, "a malformed lane handshake"));
    }
    if !secure {
        return Ok(());
    }
    let keys = lane_keys(secret, &step1, &nonce_r);
    start_records(r, w, (keys.to_receiver, keys.to_sender), false)
}

/// The two record keys of a finished handshake, named by direction.
pub struct Keys {
    pub to_receiver: [u8; 32],
    pub to_sender: [u8; 32],
}

fn split(hs: &mut HandshakeState) -> Keys {
    let (a, b) = hs.dangerously_get_raw_split();
    Keys { to_receiver: a, to_sender: b }
}

fn remote_static(hs: &HandshakeState) -> Result<[u8; 32], HsError> {
    hs.get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(HsError::Malformed("no static key from the peer"))
}

/// Randomness a handshake uses: the system's, or fixed bytes for the golden vectors.
#[derive(Clone, Copy)]
pub enum Random<'a> {
    System,
    /// SPAKE2 scalar seed and Noise ephemeral private key.
    Fixed {
        spake: [u8; 32],
        ephemeral: &'a [u8; 32],
    },
}

/// A deterministic RNG over a seed, for the golden vectors only.
struct SeedRng([u8; 32], usize);

impl rand_core::RngCore for SeedRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for d in dest {
            *d = self.0[self.1 % 32] ^ (self.1 / 32) as u8;
            self.1 += 1;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for SeedRng {}

fn spake_start(code: &Code, sender: bool, rnd: Random) -> (Spake2<Ed25519Group>, Vec<u8>) {
    let (pw, a, b) =
        (Password::new(code.expose().as_bytes()), SpakeId::new(SPAKE_SENDER), SpakeId::new(SPAKE_RECEIVER));
    match (rnd, sender) {
        (Random::System, true) => Spake2::<Ed25519Group>::start_a(&pw, &a, &b),
        (Random::System, false) => Spake2::<Ed25519Group>::start_b(&pw, &a, &b),
        (Random::Fixed { spake, .. }, true) => Spake2::start_a_with_rng(&pw, &a, &b, SeedRng(spake, 0)),
        (Random::Fixed { spake, .. }, false) => Spake2::start_b_with_rng(&pw, &a, &b, SeedRng(spake, 0)),
    }
}

fn builder<'a>(pattern: &str, rnd: Random<'a>) -> Builder<'a> {
    let b = Builder::new(pattern.parse().expect("valid Noise pattern"));
    match rnd {
        Random::System => b,
        Random::Fixed { ephemeral, .. } => b.fixed_ephemeral_key_for_testing_only(ephemeral),
    }
}

/// The sender's side of a code handshake, between its first and last step.
pub struct SenderCode {
    spake: Spake2<Ed25519Group>,
    noise: HandshakeState,
}

/// Step 1 of a code handshake: the sender's first frame (`01 ‖ A ‖ m1`).
pub fn sender_code_start(code: &Code, me: &Identity, rnd: Random) -> (SenderCode, Vec<u8>) {
    let (spake, a) = spake_start(code, true, rnd);
    let pro = prologue(MODE_CODE, &a);
    let mut noise = builder(XX, rnd)
        .local_private_key(&me.private[..])
        .and_then(|b| b.prologue(&pro))
        .and_then(|b| b.build_initiator())
        .expect("a valid XXpsk3 initiator");
    let mut out = vec![MODE_CODE];
    out.extend_from_slice(&a);
    let mut m = [0u8; NOISE_BUF];
    let n = noise.write_message(&[], &mut m).expect("m1 fits");
    out.extend_from_slice(&m[..n]);
    (SenderCode { spake, noise }, out)
}

/// What the sender learned in step 2: the receiver's static key and whether it remembers
/// senders. `finish` writes m3 and gives the keys.
pub struct SenderCodeReply {
    noise: HandshakeState,
    pub receiver: [u8; 32],
    pub remembers: bool,
}

/// Step 2, sender: reads `B ‖ m2`. The receiver's key is not proven yet: only once its first
/// record opens (it then knew the code) may it be pinned.
pub fn sender_code_reply(st: SenderCode, step2: &[u8]) -> Result<SenderCodeReply, HsError> {
    if step2.len() < SPAKE_LEN {
        return Err(HsError::Malformed("the receiver's reply is too short"));
    }
    let (b, m2) = step2.split_at(SPAKE_LEN);
    let k = Zeroizing::new(st.spake.finish(b).map_err(|_| HsError::Malformed("a bad SPAKE2 message"))?);
    let mut noise = st.noise;
    noise.set_psk(3, &psk(&k)[..]).map_err(noise_err("setting the PSK"))?;
    let mut payload = [0u8; NOISE_BUF];
    let n = noise.read_message(m2, &mut payload).map_err(noise_err("the receiver's m2 did not open"))?;
    let receiver = remote_static(&noise)?;
    Ok(SenderCodeReply { noise, receiver, remembers: n == 1 && payload[0] == 1 })
}

impl SenderCodeReply {
    /// Step 3, sender: m3 and the record keys.
    pub fn finish(mut self) -> (Vec<u8>, Keys) {
        let mut m = [0u8; NOISE_BUF];
        let n = self.noise.write_message(&[], &mut m).expect("m3 fits");
        (m[..n].to_vec(), split(&mut self.noise))
    }
}

/// The receiver's side of a code handshake, waiting for m3.
pub struct ReceiverCode {
    noise: HandshakeState,
}

/// Step 2, receiver: from the sender's `01 ‖ A ‖ m1` (mode byte already checked), its reply
/// `B ‖ m2`.
pub fn receiver_code_start(
    code: &Code,
    me: &Identity,
    step1: &[u8],
    remembers: bool,
    rnd: Random,
) -> Result<(ReceiverCode, Vec<u8>), HsError> {
    if step1.len() < 1 + SPAKE_LEN {
        return Err(HsError::Malformed("the sender's first step is too short"));
    }
    let (a, m1) = step1[1..].split_at(SPAKE_LEN);
    let (spake, b) = spake_start(code, false, rnd);
    let k = Zeroizing::new(spake.finish(a).map_err(|_| HsError::Malformed("a bad SPAKE2 message"))?);
    let (pro, key) = (prologue(MODE_CODE, a), psk(&k));
    let mut noise = builder(XX, rnd)
        .local_private_key(&me.private[..])
        .and_then(|bld| bld.prologue(&pro))
        .and_then(|bld| bld.psk(3, &key))
        .and_then(|bld| bld.build_responder())
        .expect("a valid XXpsk3 responder");
    let mut scratch = [0u8; NOISE_BUF];
    noise.read_message(m1, &mut scratch).map_err(noise_err("the sender's m1 did not open"))?;
    let mut out = b;
    let mut m = [0u8; NOISE_BUF];
    let n = noise.write_message(&[u8::from(remembers)], &mut m).expect("m2 fits");
    out.extend_from_slice(&m[..n]);
    Ok((ReceiverCode { noise }, out))
}

impl ReceiverCode {
    /// Step 3, receiver: m3 opens only if the sender knew the code. The sender's static key and
    /// the record keys.
    pub fn finish(mut self, m3: &[u8]) -> Result<([u8; 32], Keys), HsError> {
        let mut scratch = [0u8; NOISE_BUF];
        self.noise.read_message(m3, &mut scratch).map_err(|_| HsError::WrongCode)?;
        let sender = remote_static(&self.noise)?;
        Ok((sender, split(&mut self.noise)))
    }
}

/// The sender's side of a pinned handshake.
pub struct SenderPinned {
    noise: HandshakeState,
}

/// Step 1, pinned: `02 ‖ m1` to the receiver key pinned for this address.
pub fn sender_pinned_start(me: &Identity, receiver: &[u8; 32], rnd: Random) -> (SenderPinned, Vec<u8>) {
    let pro = prologue(MODE_PINNED, &[]);
    let mut noise = builder(IK, rnd)
        .local_private_key(&me.private[..])
        .and_then(|b| b.remote_public_key(receiver))
        .and_then(|b| b.prologue(&pro))
        .and_then(|b| b.build_initiator())
        .expect("a valid IK initiator");
    let mut out = vec![MODE_PINNED];
    let mut m = [0u8; NOISE_BUF];
    let n = noise.write_message(&[], &mut m).expect("m1 fits");
    out.extend_from_slice(&m[..n]);
    (SenderPinned { noise }, out)
}

impl SenderPinned {
    /// Step 2, sender: the receiver's m2 proves it holds the pinned key.
    pub fn finish(mut self, m2: &[u8]) -> Result<Keys, HsError> {
        let mut scratch = [0u8; NOISE_BUF];
        self.noise.read_message(m2, &mut scratch).map_err(noise_err("the receiver's m2 did not open"))?;
        Ok(split(&mut self.noise))
    }
}

/// Step 2, receiver, pinned: opens `02 ‖ m1`; gives the sender's static key, and a function
/// that writes m2 and gives the keys (called only once the sender is known to be trusted).
pub fn receiver_pinned(me: &Identity, step1: &[u8], rnd: Random) -> Result<([u8; 32], PinnedReply), HsError> {
    let pro = prologue(MODE_PINNED, &[]);
    let mut noise = builder(IK, rnd)
        .local_private_key(&me.private[..])
        .and_then(|b| b.prologue(&pro))
        .and_then(|b| b.build_responder())
        .expect("a valid IK responder");
    let m1 = step1.get(1..).ok_or(HsError::Malformed("an empty handshake step"))?;
    let mut scratch = [0u8; NOISE_BUF];
    noise.read_message(m1, &mut scratch).map_err(|_| HsError::NotOurKey)?;
    let sender = remote_static(&noise)?;
    Ok((sender, PinnedReply { noise }))
}

pub struct PinnedReply {
    noise: HandshakeState,
}

impl PinnedReply {
    pub fn finish(mut self) -> (Vec<u8>, Keys) {
        let mut m = [0u8; NOISE_BUF];
        let n = self.noise.write_message(&[], &mut m).expect("m2 fits");
        (m[..n].to_vec(), split(&mut self.noise))
    }
}

/// Switches both halves of a connection to records. `plain_refusals`: whether the peer may still
/// refuse in the clear in place of its first record (only a receiver checking a code).
pub fn start_records(
    r: &mut FrameReader,
    w: &mut FrameWriter,
    (send, recv): ([u8; 32], [u8; 32]),
    plain_refusals: bool,
) -> Result<(), Error> {
    let every = rekey_interval();
    r.open_records(CipherState::new(recv, every), crate::transport::MIN_RATE, plain_refusals);
    w.seal_records(CipherState::new(send, every))
        .map_err(|e| w.error("starting the secure channel", e.into()))
}

/// Looks up the secret of a split in progress by its session id, for a lane from an address.
pub type LaneSecret<'a> = dyn Fn(&[u8; 16], IpAddr) -> Option<Zeroizing<[u8; 32]>> + 'a;

/// How the receiver takes a connection's handshake.
pub struct Admit<'a> {
    /// `--insecure`: only plaintext senders.
    pub insecure: bool,
    /// This receiver's identity (secure mode).
    pub identity: Option<&'a Identity>,
    /// The code and its guess budget (secure mode).
    pub guard: Option<&'a crate::recv::guard::Guard>,
    /// `--remember`: where paired senders are kept.
    pub remember: Option<&'a crate::trust::TrustStore>,
    pub ip: IpAddr,
    /// The secret of a split in progress, by its session id, if `ip` may join it.
    pub lanes: &'a LaneSecret<'a>,
}

/// What a connection turned out to be, once its handshake is done.
pub enum Admitted {
    /// A transfer: a manifest follows.
    Transfer,
    /// A lane of the split with this session id: parts follow.
    Lane([u8; 16]),
}

/// A refusal in the clear, before the channel is up.
fn refuse_plain(w: &mut FrameWriter, code: RejectCode, reason: &str) -> Error {
    let _ = w
        .message(&Message::Reject(Reject { code, reason: protocol::bounded_reason(reason.to_string()) }))
        .and_then(|()| w.flush());
    match code {
        RejectCode::Busy => Error::Rejected { name: "the handshake".into(), code, reason: reason.into() },
        _ => Error::Auth(reason.to_string()),
    }
}

/// The receiver's side: reads the sender's handshake and, unless it refuses, leaves the
/// connection ready for the frame stream (plaintext or records).
pub fn receive(r: &mut FrameReader, w: &mut FrameWriter, admit: &Admit) -> Result<Admitted, Error> {
    let step1 = read_step(r, "waiting for the handshake")?;
    let mode = *step1.first().ok_or_else(|| malformed(r, "an empty handshake step"))?;
    if mode == MODE_LANE {
        return receive_lane(r, w, admit, &step1).map(Admitted::Lane);
    }
    match (mode, admit.insecure) {
        (MODE_INSECURE, true) if step1.len() == 1 => Ok(()),
        (MODE_INSECURE, false) => Err(refuse_plain(
            w,
            RejectCode::AuthRequired,
            "this receiver accepts only encrypted, authenticated senders: send without --insecure",
        )),
        (MODE_CODE | MODE_PINNED, true) => Err(refuse_plain(
            w,
            RejectCode::InsecureOnly,
            "this receiver runs with --insecure (plaintext): add --insecure to send in the clear",
        )),
        (MODE_CODE, false) => receive_code(r, w, admit, &step1),
        (MODE_PINNED, false) => receive_pinned(r, w, admit, &step1),
        _ => Err(malformed(r, "an unknown handshake mode")),
    }
    .map(|()| Admitted::Transfer)
}

/// A lane: its session must be a split in progress from the same address; the keys come from
/// that split's secret. A sender that does not know the secret fails at its first record.
fn receive_lane(
    r: &mut FrameReader,
    w: &mut FrameWriter,
    admit: &Admit,
    step1: &[u8],
) -> Result<[u8; 16], Error> {
    if step1.len() != LANE_STEP1 {
        return Err(malformed(r, "a malformed lane handshake"));
    }
    let session: [u8; 16] = step1[1..1 + LANE_SESSION].try_into().expect("length checked");
    let Some(secret) = (admit.lanes)(&session, admit.ip) else {
        return Err(refuse_plain(
            w,
            RejectCode::Failed,
            "no split transfer from this address has that lane id (it ended, or never began)",
        ));
    };
    let nonce: [u8; LANE_NONCE] = random()?;
    w.handshake(&nonce).map_err(|e| w.error("answering a lane", e.into()))?;
    if !admit.insecure {
        let keys = lane_keys(&secret, step1, &nonce);
        start_records(r, w, (keys.to_sender, keys.to_receiver), false)?;
    }
    Ok(session)
}

fn malformed(r: &FrameReader, what: &'static str) -> Error {
    Error::Protocol { peer: r.peer().to_string(), source: protocol::ProtocolError::Malformed(what.into()) }
}

fn read_step(r: &mut FrameReader, what: &'static str) -> Result<Vec<u8>, Error> {
    match r.handshake().map_err(|e| r.error(what, e))? {
        Handshake::Step(s) => Ok(s),
        Handshake::Refused(reject) => Err(Error::Rejected {
            name: "the handshake".into(),
            code: reject.code,
            reason: crate::sanitize::peer_text(reject.reason),
        }),
    }
}

fn receive_code(r: &mut FrameReader, w: &mut FrameWriter, admit: &Admit, step1: &[u8]) -> Result<(), Error> {
    let (Some(me), Some(guard)) = (admit.identity, admit.guard) else {
        unreachable!("a secure receiver has an identity and a guard")
    };
    let Some(code) = guard.current_code() else {
        return Err(refuse_plain(
            w,
            RejectCode::AuthFailed,
            "this receiver's code was retired after too many wrong guesses: ask its operator for a new one",
        ));
    };
    let (state, step2) = receiver_code_start(&code, me, step1, admit.remember.is_some(), Random::System)
        .map_err(|_| malformed(r, "a malformed code handshake"))?;
    w.handshake(&step2).map_err(|e| w.error("answering the handshake", e.into()))?;
    let m3 = read_step(r, "waiting for the handshake's last step")?;
    // A code retired (or replaced) while this handshake ran is not tested any more: the budget
    // bounds guesses at each code, not at each code and the handshakes begun before it went.
    if guard.current_code().as_ref() != Some(&code) {
        return Err(refuse_plain(
            w,
            RejectCode::AuthFailed,
            "this receiver's code was retired after too many wrong guesses while you connected: ask for the new one",
        ));
    }
    // Only now is a code tested: a guess costs a token of the budget, returned if it was right.
    if !guard.take(admit.ip) {
        return Err(refuse_plain(
            w,
            RejectCode::Busy,
            "too many wrong codes lately: this receiver is not checking codes for a while, try again in a minute",
        ));
    }
    match state.finish(&m3) {
        Ok((sender, keys)) => {
            guard.refund(admit.ip);
            if let Some(store) = admit.remember {
                store.trust_sender(sender, r.peer())?;
            }
            start_records(r, w, (keys.to_sender, keys.to_receiver), false)
        }
        Err(HsError::WrongCode) => {
            guard.wrong();
            Err(refuse_plain(w, RejectCode::AuthFailed, "wrong code: the sender did not prove it"))
        }
        Err(_) => Err(malformed(r, "a malformed code handshake")),
    }
}

fn receive_pinned(
    r: &mut FrameReader,
    w: &mut FrameWriter,
    admit: &Admit,
    step1: &[u8],
) -> Result<(), Error> {
    let me = admit.identity.expect("a secure receiver has an identity");
    let Some(store) = admit.remember else {
        return Err(refuse_plain(
            w,
            RejectCode::UnknownSender,
            "this receiver does not remember senders (it runs without --remember): pair with its code",
        ));
    };
    match receiver_pinned(me, step1, Random::System) {
        Ok((sender, reply)) => {
            if !store.trusts_sender(&sender)? {
                return Err(refuse_plain(
                    w,
                    RejectCode::UnknownSender,
                    "this receiver does not remember this sender: pair with its code",
                ));
            }
            let (m2, keys) = reply.finish();
            w.handshake(&m2).map_err(|e| w.error("answering the handshake", e.into()))?;
            start_records(r, w, (keys.to_sender, keys.to_receiver), false)
        }
        Err(HsError::NotOurKey) => Err(refuse_plain(
            w,
            RejectCode::AuthFailed,
            "the sender pinned a key this receiver does not hold",
        )),
        Err(_) => Err(malformed(r, "a malformed pinned handshake")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        let kp = Builder::new(XX.parse().unwrap()).generate_keypair().unwrap();
        let mut private = Zeroizing::new([0u8; 32]);
        private.copy_from_slice(&kp.private);
        Identity { private, public: kp.public.try_into().unwrap() }
    }

    #[test]
    fn code_handshake_agrees_and_a_wrong_code_fails_exactly_at_m3() {
        let (s, rcv) = (identity(), identity());
        let code = Code::generate();
        for (sender_code, right) in [(code.clone(), true), (Code::generate(), false)] {
            let (st, step1) = sender_code_start(&sender_code, &s, Random::System);
            assert_eq!(step1.len(), 1 + SPAKE_LEN + 48);
            let (rs, step2) = receiver_code_start(&code, &rcv, &step1, true, Random::System).unwrap();
            // Before m3 nothing tells either side whether the codes matched.
            let reply = sender_code_reply(st, &step2).expect("m2 opens whatever the code");
            assert_eq!(reply.receiver, rcv.public);
            assert!(reply.remembers);
            let (m3, ks) = reply.finish();
            match rs.finish(&m3) {
                Ok((sender, kr)) => {
                    assert!(right);
                    assert_eq!(sender, s.public);
                    assert_eq!((ks.to_receiver, ks.to_sender), (kr.to_receiver, kr.to_sender));
                }
                Err(HsError::WrongCode) => assert!(!right),
                Err(e) => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn lane_keys_are_hkdf_of_the_split_secret_over_the_prologue_and_both_nonces() {
        // Computed independently (Python's hmac and hashlib, RFC 5869 by hand) from PROTOCOL.md's
        // description: salt "xfer lane v1", IKM the secret, info = the prologue with mode 03,
        // session and Ns, then Nr; 64 bytes, sender → receiver first.
        let secret: [u8; 32] = std::array::from_fn(|i| 0x20 + i as u8);
        let mut step1 = vec![MODE_LANE];
        step1.extend(0u8..16);
        step1.extend(0x40u8..0x60);
        let nonce_r: Vec<u8> = (0x60u8..0x80).collect();
        let keys = lane_keys(&secret, &step1, &nonce_r);
        let hex = |k: &[u8]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(&keys.to_receiver),
            "9a0a83876db6e00a5d4cc39571745eea2ade0e023aa3071d2a985ee8181ba4da"
        );
        assert_eq!(hex(&keys.to_sender), "bc573e5c60f7c0b8edd3eea821f2c2fb539b16eeae1e93a6fa942cf6cb810f4c");
        // Another nonce, another secret: other keys.
        let mut other = step1.clone();
        other[LANE_STEP1 - 1] ^= 1;
        assert_ne!(lane_keys(&secret, &other, &nonce_r).to_receiver, keys.to_receiver);
        assert_ne!(lane_keys(&[0; 32], &step1, &nonce_r).to_sender, keys.to_sender);
    }

    #[test]
    fn pinned_handshake_needs_the_pinned_key() {
        let (s, rcv, other) = (identity(), identity(), identity());
        let (st, step1) = sender_pinned_start(&s, &rcv.public, Random::System);
        let (sender, reply) = receiver_pinned(&rcv, &step1, Random::System).ok().unwrap();
        assert_eq!(sender, s.public);
        let (m2, kr) = reply.finish();
        let ks = st.finish(&m2).ok().unwrap();
        assert_eq!((ks.to_receiver, ks.to_sender), (kr.to_receiver, kr.to_sender));
        let (_, step1) = sender_pinned_start(&s, &other.public, Random::System);
        assert!(matches!(receiver_pinned(&rcv, &step1, Random::System), Err(HsError::NotOurKey)));
    }
}

/// The golden handshakes in `fixtures/wire/handshake-*.hex`: fixed keys and randomness, the real
/// steps, every byte compared. `XFER_BLESS=1 cargo test golden_handshakes` rewrites them.
#[cfg(test)]
mod golden {
    use super::*;
    use crate::transport::records::{CipherState, REKEY_RECORDS, Sealer};
    use std::fmt::Write as _;
    use std::path::Path;

    /// Fixed X25519 key pairs (made once with snow's generator).
    const SENDER: ([u8; 32], &str) = ([0x11; 32], "sender");
    const RECEIVER: ([u8; 32], &str) = ([0x22; 32], "receiver");

    fn identity(private: [u8; 32]) -> Identity {
        // The public key of a fixed private key, by a DH with the base point through snow: a
        // one-message N handshake's `e` is the public key of its fixed ephemeral.
        let mut hs = Builder::new("Noise_N_25519_AESGCM_SHA256".parse().unwrap())
            .remote_public_key(&[9u8; 32])
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&private)
            .build_initiator()
            .unwrap();
        let mut m = [0u8; 128];
        hs.write_message(&[], &mut m).unwrap();
        Identity { private: Zeroizing::new(private), public: m[..32].try_into().unwrap() }
    }

    fn fixed_code() -> Code {
        let w = crate::code::words();
        Code::parse(&format!("{}-{}-{}-{}", w[0], w[1], w[2], w[3])).unwrap()
    }

    fn frame(kind: protocol::FrameKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        protocol::write_frame_header(&mut out, kind, payload.len() as u32).unwrap();
        out.extend_from_slice(payload);
        out
    }

    /// Sections of (comment, bytes), written as the annotated hex of `fixtures/wire/`.
    fn render(title: &str, sections: &[(String, Vec<u8>)]) -> String {
        let mut out = format!("# {title}\n# Annotated: each section is a comment, then its bytes in hex.\n");
        for (what, bytes) in sections {
            let _ = writeln!(out, "\n# {what}");
            for line in bytes.chunks(16) {
                let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(out, "{}", hex.join(" "));
            }
        }
        out
    }

    fn parse(text: &str) -> Vec<u8> {
        text.lines()
            .flat_map(|l| {
                l.split('#').next().unwrap().split_whitespace().map(str::to_owned).collect::<Vec<_>>()
            })
            .map(|b| u8::from_str_radix(&b, 16).unwrap())
            .collect()
    }

    fn check(name: &str, text: String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/wire").join(name);
        if std::env::var_os("XFER_BLESS").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(parse(&text), parse(&want), "{name} differs from the handshake the code makes");
    }

    fn sealed(key: [u8; 32], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Sealer::new(CipherState::new(key, REKEY_RECORDS)).write_record(&mut out, plain).unwrap();
        out
    }

    #[test]
    fn golden_handshakes() {
        let (s, r) = (identity(SENDER.0), identity(RECEIVER.0));
        let (es, er) = ([0x33u8; 32], [0x44u8; 32]);
        let rs = Random::Fixed { spake: [0x55; 32], ephemeral: &es };
        let rr = Random::Fixed { spake: [0x66; 32], ephemeral: &er };
        let hello = protocol::hello().to_vec();
        let accept = crate::protocol::encode_message(&Message::Answers(crate::protocol::AnswersPart {
            answers: Vec::new(),
            last: false,
        }));
        let accept = frame(protocol::FrameKind::Message, &accept);

        // First contact: the code.
        let (st, step1) = sender_code_start(&fixed_code(), &s, rs);
        let (rst, step2) = receiver_code_start(&fixed_code(), &r, &step1, true, rr).unwrap();
        let reply = sender_code_reply(st, &step2).unwrap();
        let (m3, ks) = reply.finish();
        let (_, kr) = rst.finish(&m3).unwrap();
        assert_eq!((ks.to_receiver, ks.to_sender), (kr.to_receiver, kr.to_sender));
        let sections = vec![
            (format!("sender's key pair: private {} public {}", crate::trust::hex(&s.private[..]), crate::trust::hex(&s.public)), vec![]),
            (format!("receiver's key pair: private {} public {}", crate::trust::hex(&r.private[..]), crate::trust::hex(&r.public)), vec![]),
            (format!("code {:?}; ephemerals 33.. (sender) and 44.. (receiver); SPAKE2 seeds 55.. and 66..", fixed_code().expose()), vec![]),
            ("hello, both ways (plaintext)".into(), hello.clone()),
            ("sender: handshake frame (kind 03): mode 01 (code), A (33 bytes), Noise XXpsk3 m1 (48 bytes: e, tag)".into(), frame(protocol::FrameKind::Handshake, &step1)),
            ("receiver: handshake frame: B (33 bytes), m2 (97 bytes: e, ee, s, es, payload 01 = remembers senders, tags)".into(), frame(protocol::FrameKind::Handshake, &step2)),
            ("sender: handshake frame: m3 (64 bytes: s, se, psk, tags)".into(), frame(protocol::FrameKind::Handshake, &m3)),
            (format!("record key sender->receiver: {}", crate::trust::hex(&ks.to_receiver)), vec![]),
            (format!("record key receiver->sender: {}", crate::trust::hex(&ks.to_sender)), vec![]),
            ("receiver: record 0 (kind 04) sealing the frame of Answers {[], last: false} (the acceptance); AAD = the 5-byte header, nonce 00000000 || 0 (u64 BE)".into(), sealed(ks.to_sender, &accept)),
        ];
        check("handshake-code.hex", render("The code handshake (first contact), byte by byte", &sections));

        // Repeat contact: the pinned key.
        let (st, step1) = sender_pinned_start(&s, &r.public, rs);
        let (sender, reply) = receiver_pinned(&r, &step1, rr).ok().unwrap();
        assert_eq!(sender, s.public);
        let (m2, kr) = reply.finish();
        let ks = st.finish(&m2).ok().unwrap();
        assert_eq!((ks.to_receiver, ks.to_sender), (kr.to_receiver, kr.to_sender));
        let sections = vec![
            ("same key pairs and ephemerals as handshake-code.hex".into(), vec![]),
            ("hello, both ways (plaintext)".into(), hello),
            ("sender: handshake frame: mode 02 (pinned), Noise IK m1 (96 bytes: e, es, s, ss, tags) to the pinned receiver key".into(), frame(protocol::FrameKind::Handshake, &step1)),
            ("receiver: handshake frame: m2 (48 bytes: e, ee, se, tag)".into(), frame(protocol::FrameKind::Handshake, &m2)),
            (format!("record key sender->receiver: {}", crate::trust::hex(&ks.to_receiver)), vec![]),
            (format!("record key receiver->sender: {}", crate::trust::hex(&ks.to_sender)), vec![]),
            ("receiver: record 0 sealing the acceptance, as above".into(), sealed(ks.to_sender, &accept)),
        ];
        check(
            "handshake-pinned.hex",
            render("The pinned handshake (repeat contact), byte by byte", &sections),
        );
    }
}
