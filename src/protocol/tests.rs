//! Wire-format tests: golden vectors from fixtures/wire, frame round trips and every limit.

use std::path::Path;

use proptest::prelude::*;

use super::frame::FRAME_HEADER_LEN;
use super::*;

/// Reads an annotated hex fixture: hex byte pairs, `#` to end of line is a comment.
fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/wire").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .flat_map(|l| l.split('#').next().unwrap().split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .map(|b| u8::from_str_radix(&b, 16).unwrap_or_else(|_| panic!("{name}: bad hex byte {b:?}")))
        .collect()
}

fn sha(data: &[u8]) -> Digest {
    use sha2::Digest as _;
    Digest(sha2::Sha256::digest(data).into())
}

fn frame_of(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    write_message(&mut out, msg).unwrap();
    out
}

fn golden() -> Vec<(&'static str, Message)> {
    let file = |path: &[&str], size, mode, mtime| Entry {
        path: path.iter().map(|c| c.to_string()).collect(),
        kind: EntryKind::File { size, hash: HashAlg::Sha256, tag: std::array::from_fn(|i| i as u8) },
        mode,
        mtime,
    };
    vec![
        (
            "manifest-single.hex",
            Message::Manifest(ManifestPart {
                entries: vec![file(&["img.jpg"], 3, 0o644, (1_600_000_000, 0))],
                last: true,
            }),
        ),
        (
            "manifest-part.hex",
            Message::Manifest(ManifestPart {
                entries: vec![
                    Entry {
                        path: vec!["docs".into()],
                        kind: EntryKind::Dir,
                        mode: 0o755,
                        mtime: (1_600_000_000, 0),
                    },
                    file(&["docs", "a.txt"], 3, 0o644, (1_600_000_000, 500)),
                ],
                last: true,
            }),
        ),
        (
            "manifest-stream.hex",
            Message::Manifest(ManifestPart {
                entries: vec![Entry {
                    path: vec!["db.sql".into()],
                    kind: EntryKind::Stream { hash: HashAlg::Sha256 },
                    mode: 0o644,
                    mtime: (1_600_000_000, 0),
                }],
                last: true,
            }),
        ),
        ("answers-accept.hex", Message::Answers(AnswersPart { answers: vec![], last: false })),
        (
            "answers-part.hex",
            Message::Answers(AnswersPart {
                answers: vec![
                    Answer::Send { offset: 0 },
                    Answer::Have { name: "b (1).txt".into() },
                    Answer::Reject { code: RejectCode::Busy, reason: "busy".into() },
                ],
                last: true,
            }),
        ),
        (
            "digests-part.hex",
            Message::Digests(DigestsPart { first: 0, digests: vec![Some(sha(b"abc")), None] }),
        ),
        ("digests-keepalive.hex", Message::Digests(DigestsPart { first: 1, digests: vec![] })),
        ("body.hex", Message::Body(Body { index: 1 })),
        ("withdraw.hex", Message::Withdraw(Withdraw { index: 1, reason: "changed".into() })),
        (
            "file-verdict.hex",
            Message::FileVerdict(FileVerdict {
                index: 1,
                verdict: Verdict::Verified { name: "a.txt".into() },
            }),
        ),
        (
            "file-verdict-verified-as.hex",
            Message::FileVerdict(FileVerdict {
                index: 0,
                verdict: Verdict::Verified { name: "img (1).jpg".into() },
            }),
        ),
        (
            "file-verdict-hash-mismatch.hex",
            Message::FileVerdict(FileVerdict {
                index: 0,
                verdict: Verdict::HashMismatch { expected: sha(b"abc"), actual: sha(b"") },
            }),
        ),
        (
            "file-verdict-size-mismatch.hex",
            Message::FileVerdict(FileVerdict {
                index: 0,
                verdict: Verdict::SizeMismatch { expected: 3, received: 2 },
            }),
        ),
        (
            "file-verdict-failed.hex",
            Message::FileVerdict(FileVerdict {
                index: 0,
                verdict: Verdict::Failed { reason: "disk full".into() },
            }),
        ),
        (
            "reject.hex",
            Message::Reject(Reject { code: RejectCode::InvalidName, reason: "name is empty".into() }),
        ),
        ("queued.hex", Message::Queued(Queued { ahead: 3 })),
        (
            "split.hex",
            Message::Split(Split {
                index: 2,
                session: std::array::from_fn(|i| i as u8),
                secret: std::array::from_fn(|i| 0x20 + i as u8),
                lanes: 4,
            }),
        ),
        ("part.hex", Message::Part(Part { index: 2, offset: 8 << 20 })),
        ("split-end.hex", Message::SplitEnd(SplitEnd { index: 2 })),
    ]
}

/// `XFER_WRITE_FIXTURES=1 cargo test --lib write_golden_fixtures -- --ignored` rewrites the
/// vectors (after a deliberate change of the wire format), 16 bytes a line after the header.
#[test]
#[ignore]
fn write_golden_fixtures() {
    if std::env::var_os("XFER_WRITE_FIXTURES").is_none() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/wire");
    for (file, msg) in golden() {
        let bytes = frame_of(&msg);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ");
        let mut text = format!("# {msg:?}\n");
        text.push_str(&format!(
            "{:<50}# frame header: payload length {}, kind message\n",
            hex(&bytes[..5]),
            bytes.len() - 5
        ));
        text.push_str(&format!(
            "{:<50}# Message::{} (variant {}, u32)\n",
            hex(&bytes[5..9]),
            msg.name(),
            bytes[8]
        ));
        for line in bytes[9..].chunks(16) {
            text.push_str(&hex(line));
            text.push('\n');
        }
        std::fs::write(dir.join(file), text).unwrap();
    }
}

#[test]
fn golden_vectors_encode_and_decode() {
    for (file, msg) in golden() {
        let want = fixture(file);
        assert_eq!(frame_of(&msg), want, "encode({msg:?}) differs from {file}");
        assert_eq!(read_message(&mut &want[..]).unwrap(), msg, "decode({file})");
    }
}

#[test]
fn golden_hello() {
    let want = fixture("hello.hex");
    assert_eq!(hello().to_vec(), want);
    read_hello(&mut &want[..]).unwrap();
}

#[test]
fn golden_data_frame() {
    let want = fixture("data.hex");
    let mut out = Vec::new();
    write_frame_header(&mut out, FrameKind::Data, 3).unwrap();
    out.extend_from_slice(b"abc");
    assert_eq!(out, want);
    let h = read_frame_header(&mut &want[..]).unwrap();
    assert_eq!((h.kind, h.len), (FrameKind::Data, 3));
    assert_eq!(&want[FRAME_HEADER_LEN..], b"abc");
}

#[test]
fn golden_stream_end() {
    let want = fixture("stream-end.hex");
    assert_eq!(want, STREAM_END);
    // Inside a stream's body it ends the body; data frames still read as data frames.
    assert_eq!(read_stream_frame_header(&mut &want[..]).unwrap(), None);
    let h = read_stream_frame_header(&mut &fixture("data.hex")[..]).unwrap().unwrap();
    assert_eq!((h.kind, h.len), (FrameKind::Data, 3));
    // Anywhere else an empty data frame is still refused.
    assert!(matches!(read_frame_header(&mut &want[..]), Err(WireError::Protocol(ProtocolError::EmptyChunk))));
}

#[test]
fn hello_rejects_garbage_and_other_versions() {
    let mut garbage = *b"GET / HTTP";
    assert!(matches!(check_hello(&garbage), Err(ProtocolError::BadMagic(_))));
    garbage = hello();
    garbage[9] = 9;
    let err = check_hello(&garbage).unwrap_err();
    assert!(matches!(err, ProtocolError::VersionMismatch { peer: 9, ours: VERSION }));
    let text = err.to_string();
    assert!(text.contains("v9") && text.contains(&format!("v{VERSION}")), "names both versions: {text}");
    assert!(matches!(read_hello(&mut &hello()[..5]), Err(WireError::Io(_))), "short hello is an I/O error");
}

#[test]
fn frame_limits_are_checked_before_allocation() {
    // A 4 GiB message frame must be refused from its 5 header bytes alone.
    let h = [0xff, 0xff, 0xff, 0xff, FrameKind::Message as u8];
    let err = read_message(&mut &h[..]).unwrap_err();
    assert!(matches!(err, WireError::Protocol(ProtocolError::FrameTooLarge { len: u32::MAX, .. })), "{err}");
    for (kind, limit) in [(FrameKind::Message, MAX_MESSAGE_LEN), (FrameKind::Data, MAX_CHUNK_LEN)] {
        let ok = FrameHeader { kind, len: limit }.encode();
        assert_eq!(FrameHeader::decode(ok).unwrap().len, limit);
        let over = FrameHeader { kind, len: limit + 1 }.encode();
        assert!(matches!(FrameHeader::decode(over), Err(ProtocolError::FrameTooLarge { .. })));
    }
    assert!(matches!(FrameHeader::decode([0, 0, 0, 0, 2]), Err(ProtocolError::EmptyChunk)));
    assert!(matches!(FrameHeader::decode([0, 0, 0, 1, 9]), Err(ProtocolError::UnknownFrameKind(9))));
    assert_eq!(
        FrameHeader::decode([0, 0, 0, 0, 1]).unwrap().len,
        0,
        "empty message frames parse (then fail decode)"
    );
}

#[test]
fn data_frame_where_message_expected_is_refused() {
    let bytes = fixture("data.hex");
    let err = read_message(&mut &bytes[..]).unwrap_err();
    assert!(matches!(err, WireError::Protocol(ProtocolError::UnexpectedFrame { .. })), "{err}");
}

#[test]
fn malformed_payloads_are_refused() {
    let manifest = frame_of(&golden()[0].1);
    let payload = &manifest[FRAME_HEADER_LEN..];
    // Every strict prefix is incomplete.
    for cut in 0..payload.len() {
        assert!(decode_message(&payload[..cut]).is_err(), "prefix of {cut} bytes decoded");
    }
    // Trailing bytes give a second meaning to a payload: refused.
    let mut long = payload.to_vec();
    long.push(0);
    assert!(matches!(decode_message(&long), Err(ProtocolError::Malformed(m)) if m.contains("trailing")));
    // Unknown variants.
    assert!(decode_message(&[0, 0, 0, 9]).is_err(), "unknown message variant");
    // variant, entry count, path count, "img.jpg", kind, size, then the HashAlg's last byte
    let mut bad_alg = payload.to_vec();
    let alg = 4 + 8 + 8 + 8 + 7 + 4 + 8 + 3;
    assert_eq!(bad_alg[alg], 0, "SHA-256 is variant 0");
    bad_alg[alg] = 7;
    assert!(decode_message(&bad_alg).is_err(), "unknown hash algorithm");
    // A string length far beyond the payload (and the limit) must fail, not allocate.
    let mut huge = vec![0, 0, 0, 0];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    assert!(decode_message(&huge).is_err());
    // Invalid UTF-8 in a name.
    let mut bad_utf8 = payload.to_vec();
    bad_utf8[4 + 8 + 8 + 8] = 0xff;
    assert!(decode_message(&bad_utf8).is_err());
}

#[test]
fn largest_legal_messages_fit_the_frame_limit() {
    // One entry at the path length limit fits a part with room to spare.
    let deep = Entry {
        path: vec!["n".repeat(MAX_NAME_LEN); MAX_PATH_LEN / MAX_NAME_LEN],
        kind: EntryKind::File { size: u64::MAX, hash: HashAlg::Sha256, tag: [0xff; 16] },
        mode: u32::MAX,
        mtime: (i64::MAX, u32::MAX),
    };
    let part = Message::Manifest(ManifestPart { entries: vec![deep], last: true });
    assert!(encode_message(&part).len() < MAX_MESSAGE_LEN as usize);
    let reason = bounded_reason("é".repeat(MAX_REASON_LEN));
    assert!(reason.len() <= MAX_REASON_LEN && reason.len() > MAX_REASON_LEN - 2);
    let reject = Message::Reject(Reject { code: RejectCode::Failed, reason: reason.clone() });
    assert!(encode_message(&reject).len() < MAX_MESSAGE_LEN as usize);
    let failed = Message::FileVerdict(FileVerdict { index: u32::MAX, verdict: Verdict::Failed { reason } });
    assert!(encode_message(&failed).len() < MAX_MESSAGE_LEN as usize);
    let digests = Message::Digests(DigestsPart {
        first: u32::MAX,
        digests: vec![Some(Digest([0xff; 32])); MAX_DIGESTS_PER_PART],
    });
    assert!(encode_message(&digests).len() < MAX_MESSAGE_LEN as usize);
}

fn arb_digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn arb_message() -> impl Strategy<Value = Message> {
    let code = prop_oneof![
        Just(RejectCode::InvalidName),
        Just(RejectCode::InsufficientSpace),
        Just(RejectCode::Busy),
        Just(RejectCode::UnsupportedHash),
        Just(RejectCode::Failed),
        Just(RejectCode::InvalidManifest),
    ];
    let verdict = prop_oneof![
        ".{0,64}".prop_map(|name| Verdict::Verified { name }),
        (arb_digest(), arb_digest())
            .prop_map(|(expected, actual)| Verdict::HashMismatch { expected, actual }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(expected, received)| Verdict::SizeMismatch { expected, received }),
        ".{0,64}".prop_map(|reason| Verdict::Failed { reason }),
    ];
    let answer = prop_oneof![
        any::<u64>().prop_map(|offset| Answer::Send { offset }),
        ".{0,64}".prop_map(|name| Answer::Have { name }),
        (code.clone(), ".{0,64}").prop_map(|(code, reason)| Answer::Reject { code, reason }),
    ];
    prop_oneof![
        (prop::collection::vec(arb_entry(), 0..4), any::<bool>())
            .prop_map(|(entries, last)| Message::Manifest(ManifestPart { entries, last })),
        (prop::collection::vec(answer, 0..4), any::<bool>())
            .prop_map(|(answers, last)| Message::Answers(AnswersPart { answers, last })),
        (any::<u32>(), prop::collection::vec(prop::option::of(arb_digest()), 0..8))
            .prop_map(|(first, digests)| Message::Digests(DigestsPart { first, digests })),
        any::<u32>().prop_map(|index| Message::Body(Body { index })),
        (any::<u32>(), ".{0,64}").prop_map(|(index, reason)| Message::Withdraw(Withdraw { index, reason })),
        (any::<u32>(), verdict)
            .prop_map(|(index, verdict)| Message::FileVerdict(FileVerdict { index, verdict })),
        (code, ".{0,64}").prop_map(|(code, reason)| Message::Reject(Reject { code, reason })),
    ]
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    let kind = prop_oneof![
        Just(EntryKind::Dir),
        (any::<u64>(), any::<[u8; 16]>()).prop_map(|(size, tag)| EntryKind::File {
            size,
            hash: HashAlg::Blake3,
            tag
        }),
    ];
    (prop::collection::vec(".{0,20}", 0..5), kind, any::<u32>(), any::<(i64, u32)>())
        .prop_map(|(path, kind, mode, mtime)| Entry { path, kind, mode, mtime })
}

proptest! {
    #[test]
    fn entry_encoded_len_is_exact(entries in prop::collection::vec(arb_entry(), 0..4)) {
        let empty = encode_message(&Message::Manifest(ManifestPart { entries: vec![], last: true })).len();
        let full = encode_message(&Message::Manifest(ManifestPart { entries: entries.clone(), last: true })).len();
        prop_assert_eq!(full - empty, entries.iter().map(Entry::encoded_len).sum::<usize>());
    }

    #[test]
    fn messages_round_trip(msg in arb_message()) {
        let bytes = frame_of(&msg);
        prop_assert_eq!(read_message(&mut &bytes[..]).unwrap(), msg);
    }

    #[test]
    fn frame_headers_round_trip(len in 1..=MAX_CHUNK_LEN, data in any::<bool>()) {
        let kind = if data { FrameKind::Data } else { FrameKind::Message };
        let len = len.min(kind.limit());
        let h = FrameHeader { kind, len };
        prop_assert_eq!(FrameHeader::decode(h.encode()).unwrap(), h);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_message(&bytes);
        let _ = read_message(&mut &bytes[..]);
    }
}
