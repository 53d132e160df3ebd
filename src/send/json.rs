//! `xfer send --json`: one JSON object a line on stdout for scripts, instead of the summary lines.
//!
//! Schema (README, "Scripts"): a line `{"type":"entry", ...}` per entry in manifest order, then
//! one `{"type":"summary", ...}`; or, when the send failed before any entry was decided, one
//! `{"type":"error","error":...,"exit":N}`. Names are the entries' own (not shell-escaped), but
//! every character a terminal could act on (C0 and C1 controls, DEL, bidirectional overrides) is
//! a `\uXXXX` escape, so the output is safe to print and parses to the exact names.

use serde_json::{Value, json};

use super::{EntryOutcome, Report};
use crate::error::Error;
use crate::protocol::HashAlg;

/// One JSON value as a line, with everything a terminal could act on escaped.
fn line(v: &Value) -> String {
    let text = v.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let deceives = matches!(c, '\u{7f}'..='\u{9f}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if deceives {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The lines for a finished send.
pub fn report(r: &Report, hash: HashAlg) -> Vec<String> {
    let mut out = Vec::with_capacity(r.entries.len() + 1);
    let (mut verified, mut there, mut failed) = (0, 0, 0);
    for e in &r.entries {
        let mut v = json!({
            "type": "entry",
            "path": e.path,
            "kind": if e.is_dir { "dir" } else { "file" },
            "size": e.size,
        });
        if let Some(d) = &e.digest {
            v["hash"] = json!(hash.to_string());
            v["digest"] = json!(d.to_hex());
            v["cached"] = json!(e.cached);
        }
        if e.offset > 0 {
            v["resumed_at"] = json!(e.offset);
        }
        match &e.outcome {
            EntryOutcome::Verified(stored) => {
                verified += 1;
                v["outcome"] = json!("verified");
                v["stored_as"] = json!(stored);
            }
            EntryOutcome::AlreadyThere(stored) => {
                there += 1;
                v["outcome"] = json!("already_there");
                v["stored_as"] = json!(stored);
            }
            EntryOutcome::Failed(err) => {
                failed += 1;
                v["outcome"] = json!("failed");
                v["error"] = json!(err.to_string());
                v["exit"] = json!(err.exit() as u8);
            }
        }
        out.push(line(&v));
    }
    let exit = r.worst().map_or(0, |e| e.exit() as u8);
    out.push(line(&json!({
        "type": "summary",
        "entries": r.entries.len(),
        "files": r.files,
        "bytes": r.bytes,
        "sent": r.sent,
        "resumed": r.resumed,
        "seconds": (r.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "verified": verified,
        "already_there": there,
        "failed": failed,
        "skipped": r.skipped.len(),
        "exit": exit,
    })));
    out
}

/// The line for a send that failed as a whole.
pub fn error(e: &Error) -> String {
    line(&json!({ "type": "error", "error": e.to_string(), "exit": e.exit() as u8 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_terminal_could_act_on_is_escaped_and_parses_back() {
        let name = "a\u{1b}]0;x\u{7}\u{9b}b\u{202e}c\"d";
        let l = line(&json!({ "path": name }));
        assert!(l.chars().all(|c| !c.is_control() && !('\u{202a}'..='\u{202e}').contains(&c)), "{l}");
        let back: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(back["path"], name);
    }
}
