//! PROTOCOL.md's "Limits and timeouts" section against the code: every limit a peer can run into
//! has a row there, and the value the row starts with is the one the code uses.

use std::time::Duration;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::protocol::{
    MAX_CHUNK_LEN, MAX_DEPTH, MAX_DIGESTS_PER_PART, MAX_ENTRIES, MAX_HANDSHAKE_LEN, MAX_MESSAGE_LEN,
    MAX_NAME_LEN, MAX_PATH_LEN, MAX_REASON_LEN, MAX_RECORD_LEN, MAX_TOTAL_SIZE,
};
use crate::recv::{answer, body, durable, guard, litter, manifest, queue, refuse, transfer};

const PROTOCOL_MD: &str = include_str!("../PROTOCOL.md");

/// 1234567 as "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn secs(d: Duration) -> String {
    assert_eq!(d.subsec_nanos(), 0, "a documented duration is whole seconds");
    format!("{} s", thousands(d.as_secs()))
}

/// PROTOCOL.md's "Limits and timeouts" section, up to the next `## ` heading.
fn section() -> &'static str {
    let start = PROTOCOL_MD.find("## Limits and timeouts").expect("PROTOCOL.md has a limits section");
    let section = &PROTOCOL_MD[start..];
    &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)]
}

/// The value cell of the row named `name` in the limits section (every row with that name).
fn cells(name: &str) -> Vec<&'static str> {
    let key = format!("| `{name}` |");
    section()
        .lines()
        .filter_map(|l| l.strip_prefix(&key))
        .map(|rest| rest.split('|').next().unwrap_or("").trim())
        .collect()
}

/// The table's rows, by name and the value their cell must start with.
fn expected() -> Vec<(&'static str, String)> {
    let Ok(Cli { command: Command::Recv(recv), .. }) = Cli::try_parse_from(["xfer", "recv"]) else {
        panic!("`xfer recv` parses")
    };
    let n = |v: u64| thousands(v);
    let bytes = |v: u64| format!("{} bytes", thousands(v));
    vec![
        ("MAX_MESSAGE_LEN", bytes(MAX_MESSAGE_LEN.into())),
        ("MAX_CHUNK_LEN", bytes(MAX_CHUNK_LEN.into())),
        ("MAX_REASON_LEN", bytes(MAX_REASON_LEN as u64)),
        ("MAX_DIGESTS_PER_PART", n(MAX_DIGESTS_PER_PART as u64)),
        ("MAX_HANDSHAKE_LEN", bytes(MAX_HANDSHAKE_LEN.into())),
        ("MAX_RECORD_LEN", bytes(MAX_RECORD_LEN.into())),
        ("REKEY_RECORDS", n(crate::transport::records::REKEY_RECORDS)),
        ("CODE_WORDS", n(crate::code::CODE_WORDS as u64)),
        ("AUTH_MAX_WRONG", n(guard::AUTH_MAX_WRONG.into())),
        ("AUTH_REFILL", secs(guard::AUTH_REFILL)),
        ("AUTH_BURST", n(guard::AUTH_BURST.into())),
        ("AUTH_PEER_BURST", n(guard::AUTH_PEER_BURST.into())),
        ("MAX_NAME_LEN", bytes(MAX_NAME_LEN as u64)),
        ("MAX_PATH_LEN", bytes(MAX_PATH_LEN as u64)),
        ("MAX_DEPTH", n(MAX_DEPTH as u64)),
        ("MAX_ENTRIES", n(MAX_ENTRIES as u64)),
        ("MAX_TOTAL_SIZE", bytes(MAX_TOTAL_SIZE)),
        ("MAX_MANIFEST_BYTES", bytes(manifest::MAX_MANIFEST_BYTES as u64)),
        ("PRE_SLOT_MANIFEST", bytes(manifest::PRE_SLOT_MANIFEST as u64)),
        ("MANIFEST_MEMORY", bytes(manifest::MANIFEST_MEMORY as u64)),
        ("MAX_KEEP_BOTH", n(crate::store::MAX_KEEP_BOTH.into())),
        ("--handshake-timeout", format!("{} s", recv.handshake_timeout)),
        ("--timeout", format!("{} s", recv.timeout)),
        ("MANIFEST_DEADLINE", secs(manifest::MANIFEST_DEADLINE)),
        ("ANSWER_FLUSH", secs(transfer::ANSWER_FLUSH)),
        ("KEEPALIVE_FLUSH", secs(transfer::KEEPALIVE_FLUSH)),
        ("MIN_RATE", format!("{} bytes/s", thousands(crate::transport::MIN_RATE))),
        ("WRITE_TICK", format!("{} ms", crate::transport::WRITE_TICK.as_millis())),
        ("MIN_HASH_RATE", format!("{} bytes/s", thousands(transfer::MIN_HASH_RATE))),
        ("KEEPALIVE", secs(crate::send::run::KEEPALIVE)),
        ("HANDOFF_WAIT", format!("{} ms", crate::send::handoff::HANDOFF_WAIT.as_millis())),
        ("LINGER", secs(refuse::LINGER)),
        ("--keep-partials", format!("{} h", recv.keep_partials)),
        ("SWEEP_EVERY", secs(crate::recv::SWEEP_EVERY)),
        ("PEER_PARTIALS", n(litter::PEER_PARTIALS as u64)),
        ("PEER_PARTIAL_BYTES", bytes(litter::PEER_PARTIAL_BYTES)),
        ("LITTER_NOTED", n(litter::LITTER_NOTED as u64)),
        ("--max-transfers", n(recv.max_transfers.into())),
        ("CONNECTIONS_PER_TRANSFER", n(crate::recv::CONNECTIONS_PER_TRANSFER as u64)),
        ("PEER_SHARE", n(crate::recv::PEER_SHARE as u64)),
        ("MAX_LINGERING", n(refuse::MAX_LINGERING as u64)),
        ("REFUSE_QUEUE", n(refuse::REFUSE_QUEUE as u64)),
        ("MAX_LANES", n(crate::protocol::MAX_LANES.into())),
        ("RTT_PER_LANE", format!("{} ms", crate::send::lanes::RTT_PER_LANE.as_millis())),
        ("LANE_CONNECT", secs(crate::send::lanes::LANE_CONNECT)),
        ("LANE_WAIT", secs(crate::recv::lanes::LANE_WAIT)),
        ("QUEUE_TICK", secs(queue::QUEUE_TICK)),
        ("QUEUE_WAIT", secs(queue::QUEUE_WAIT)),
        ("RECV_BUF", bytes(crate::transport::RECV_BUF as u64)),
        ("PIPE_BUF", bytes(body::PIPE_BUF as u64)),
        ("PIPELINE_BUFFERS", n(body::PIPELINE_BUFFERS as u64)),
        ("STREAM_STEP", bytes(body::STREAM_STEP)),
        ("SPLIT_MIN", bytes(crate::send::lanes::SPLIT_MIN)),
        ("SPLIT_CHUNK", bytes(crate::protocol::SPLIT_CHUNK)),
        ("UPTO_EVERY", bytes(crate::recv::lanes::UPTO_EVERY)),
        ("GROUP_FILES", n(durable::GROUP_FILES as u64)),
        ("GROUP_BYTES", bytes(durable::GROUP_BYTES)),
        ("MAX_HELD", n(transfer::MAX_HELD as u64)),
        ("TELL_AHEAD", n(crate::send::run::TELL_AHEAD as u64)),
        ("RESUME_MIN", bytes(answer::RESUME_MIN)),
        ("MAX_RECORD", bytes(crate::store::partial::MAX_RECORD)),
        ("EVENT_QUEUE", n(crate::send::events::EVENT_QUEUE as u64)),
        ("DEFER_MIN", bytes(crate::send::handoff::DEFER_MIN)),
        ("KEEP_MAX", bytes(crate::send::handoff::KEEP_MAX)),
        ("KEEP_BUDGET", bytes(crate::send::handoff::KEEP_BUDGET)),
    ]
}

#[test]
fn every_limit_has_a_row_whose_value_is_the_code_s() {
    let mut wrong = Vec::new();
    for (name, want) in expected() {
        let rows = cells(name);
        if rows.len() != 1 {
            wrong.push(format!("`{name}`: {} rows in PROTOCOL.md, want 1", rows.len()));
            continue;
        }
        let cell = rows[0];
        // The value must be the whole number, not a prefix of a longer one.
        let next = cell[want.len().min(cell.len())..].chars().next();
        if !cell.starts_with(&want) || next.is_some_and(|c| c.is_ascii_digit() || c == ',') {
            wrong.push(format!("`{name}`: PROTOCOL.md says {cell:?}, the code says {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "PROTOCOL.md's limits disagree with the code:\n{}", wrong.join("\n"));
}

#[test]
fn the_limits_section_has_no_row_the_code_does_not_know() {
    let known: Vec<_> = expected().into_iter().map(|(name, _)| name).collect();
    for line in section().lines().filter(|l| l.starts_with("| `")) {
        let name = line[3..].split('`').next().unwrap();
        assert!(known.contains(&name), "PROTOCOL.md lists `{name}`, which this test does not check");
    }
}

#[test]
fn thousands_groups_digits() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1000), "1,000");
    assert_eq!(thousands(1_125_899_906_842_624), "1,125,899,906,842,624");
}
