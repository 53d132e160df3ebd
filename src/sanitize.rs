//! Names from the wire made safe: validated as a single path component before they touch the file
//! system, and escaped before they reach a terminal.
//!
//! The rules follow the bugs this kind of tool keeps having (scp CVE-2019-6111, croc
//! CVE-2023-43619/43620, magic-wormhole's lost `basename()`): a name from the peer is one
//! component, never a path; it avoids what Windows would alter or treat as a device; and it cannot
//! hide from a human reading the log.

use std::fmt::Write as _;

use crate::protocol::MAX_NAME_LEN;

/// Prefix of every file xfer keeps in the target folder (partials and their records); names from
/// the wire may not use it.
pub const TEMP_PREFIX: &str = ".xfer-";

/// Why a name was refused. The message is sent to the peer as the rejection reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes long, the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("name is `.` or `..`")]
    DotOrDotDot,
    #[error("name contains a path separator ({0:?}); only a single file name is allowed")]
    Separator(char),
    #[error("name contains `:` (drive letter or alternate data stream)")]
    Colon,
    #[error("name contains control or invisible character U+{0:04X}")]
    ControlChar(u32),
    #[error("name ends with a dot or a space")]
    TrailingDotOrSpace,
    #[error("name is a reserved device name on Windows ({0})")]
    ReservedDevice(String),
    #[error("name starts with `{TEMP_PREFIX}`, reserved for xfer's temporary files")]
    ReservedPrefix,
}

/// Windows device names, reserved with any extension (`CON.txt` too).
const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM0", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT0", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9", "CONIN$",
    "CONOUT$",
];

/// True for characters that must never be in a stored name or reach a terminal raw: controls
/// (C0, DEL, C1), line and paragraph separators, and every default-ignorable code point — the
/// characters that render as nothing or reorder text (bidi marks, overrides and isolates,
/// zero-width joiners, fillers, variation selectors, tags). croc CVE-2023-43620 hid a file name
/// behind such characters.
fn is_hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' // soft hyphen
            | '\u{034F}' // combining grapheme joiner
            | '\u{061C}' // Arabic letter mark
            | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' // Hangul fillers
            | '\u{17B4}' | '\u{17B5}' // Khmer inherent vowels
            | '\u{180B}'..='\u{180F}' // Mongolian selectors, vowel separator
            | '\u{200B}'..='\u{200F}' // zero-width space/joiners, LRM, RLM
            | '\u{2028}' | '\u{2029}' // line and paragraph separators
            | '\u{202A}'..='\u{202E}' // bidi embeddings and overrides
            | '\u{2060}'..='\u{206F}' // word joiner, invisible operators, bidi isolates
            | '\u{FE00}'..='\u{FE0F}' // variation selectors
            | '\u{FEFF}' // BOM / zero-width no-break space
            | '\u{FFF0}'..='\u{FFFB}' // unassigned specials, interlinear annotations
            | '\u{1BCA0}'..='\u{1BCA3}' // shorthand format controls
            | '\u{1D173}'..='\u{1D17A}' // musical format controls
            | '\u{E0000}'..='\u{E0FFF}' // tags, variation selectors supplement
        )
}

/// Checks that `name` is a single, safe file name. Returns the first rule it breaks.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    if name == "." || name == ".." {
        return Err(NameError::DotOrDotDot);
    }
    for c in name.chars() {
        match c {
            '/' | '\\' => return Err(NameError::Separator(c)),
            ':' => return Err(NameError::Colon),
            c if is_hidden_char(c) => return Err(NameError::ControlChar(c as u32)),
            _ => {}
        }
    }
    if name.starts_with(TEMP_PREFIX) {
        return Err(NameError::ReservedPrefix);
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err(NameError::TrailingDotOrSpace);
    }
    let stem = name.split('.').next().unwrap_or(name).trim_end();
    if let Some(r) = RESERVED.iter().find(|r| r.eq_ignore_ascii_case(stem)) {
        return Err(NameError::ReservedDevice((*r).to_string()));
    }
    Ok(())
}

/// Escapes a string for a terminal or log: printable characters pass; backslash and `"` get a
/// backslash (log lines quote names, so a name cannot forge the fields after it); the characters
/// [`validate_name`] refuses as hidden become `\u{..}` escapes. Used for every name or peer
/// message printed, valid or not, because a rejected name is still logged.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
            out.push(c);
        } else if is_hidden_char(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Text from the peer (a reason, a message) made fit for our terminal: cut to
/// [`MAX_REASON_LEN`](crate::protocol::MAX_REASON_LEN) bytes, and every character that could act
/// on a terminal or hide itself escaped. Quotes and backslashes stay as they are: the text is not
/// quoted here, and names the peer quoted in it are already escaped once (escaping them again
/// showed `\"src/Case.txt\"`).
pub fn peer_text(text: String) -> String {
    let text = crate::protocol::bounded_reason(text);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_hidden_char(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// The `n`th keep-both alternative of a valid name: `img.jpg` → `img (1).jpg`,
/// `data.tar.gz` → `data (1).tar.gz`, `.bashrc` → `.bashrc (1)`. The stem is shortened if the
/// suffix would push the name past [`MAX_NAME_LEN`].
pub fn numbered_name(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_string();
    }
    // Split at the last dot that is not the first character, treating `.tar.*` as one extension.
    let split = match name.rfind('.').filter(|&i| i > 0) {
        Some(i) => match name[..i].strip_suffix(".tar") {
            Some(stem) if !stem.is_empty() => i - 4,
            _ => i,
        },
        None => name.len(),
    };
    let suffix = format!(" ({n})");
    // An extension too long to keep beside the suffix is treated as part of the stem.
    let split = if suffix.len() + (name.len() - split) >= MAX_NAME_LEN { name.len() } else { split };
    let (stem, ext) = name.split_at(split);
    let mut stem_len = stem.len().min(MAX_NAME_LEN.saturating_sub(suffix.len() + ext.len()));
    while !stem.is_char_boundary(stem_len) {
        stem_len -= 1;
    }
    format!("{}{}{}", &stem[..stem_len], suffix, ext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_escapes_what_acts_on_a_terminal_and_nothing_twice() {
        let reason = "name \"src/Case.txt\" and back\\slash.txt\u{1b}]0;x\u{7}\u{202e}".to_string();
        assert_eq!(peer_text(reason), "name \"src/Case.txt\" and back\\slash.txt\\u{1b}]0;x\\u{7}\\u{202e}");
    }

    #[test]
    fn accepted_names() {
        for name in [
            "img.jpg",
            "a",
            "...x",
            ".bashrc",
            "-leading-dash",
            "#hash#",
            "with space.txt",
            "résumé.pdf",
            "日本語.txt",
            "emoji 🎉.png",
            "CONSOLE.txt",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert_eq!(validate_name(name), Ok(()), "{name:?} should be accepted");
        }
    }

    #[test]
    fn rejected_names() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let cases: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            (".", NameError::DotOrDotDot),
            ("..", NameError::DotOrDotDot),
            ("../x", NameError::Separator('/')),
            ("/etc/x", NameError::Separator('/')),
            ("a/b", NameError::Separator('/')),
            ("C:\\x", NameError::Colon),
            ("C:x", NameError::Colon),
            ("\\\\srv\\x", NameError::Separator('\\')),
            ("..\\x", NameError::Separator('\\')),
            ("file.txt:stream", NameError::Colon),
            ("a\0b", NameError::ControlChar(0)),
            ("a\x1b[2Jb", NameError::ControlChar(0x1b)),
            ("a\nb", NameError::ControlChar(0x0a)),
            ("a\x7fb", NameError::ControlChar(0x7f)),
            ("a\u{85}b", NameError::ControlChar(0x85)),
            ("evil\u{202E}gpj.exe", NameError::ControlChar(0x202e)),
            ("zero\u{200B}width", NameError::ControlChar(0x200b)),
            ("trailing.", NameError::TrailingDotOrSpace),
            ("trailing ", NameError::TrailingDotOrSpace),
            ("a\u{2028}b", NameError::ControlChar(0x2028)),
            ("a\u{061C}b", NameError::ControlChar(0x061c)),
            ("a\u{00AD}b", NameError::ControlChar(0xad)),
            ("blank\u{3164}", NameError::ControlChar(0x3164)),
            ("tag\u{E0041}", NameError::ControlChar(0xe0041)),
            ("vs\u{FE0F}", NameError::ControlChar(0xfe0f)),
            (".xfer-abc123.part", NameError::ReservedPrefix),
            ("CON", NameError::ReservedDevice("CON".into())),
            ("nul.txt", NameError::ReservedDevice("NUL".into())),
            ("com1.tar.gz", NameError::ReservedDevice("COM1".into())),
            (&long, NameError::TooLong(MAX_NAME_LEN + 1)),
        ];
        for (name, want) in cases {
            assert_eq!(validate_name(name).as_ref(), Err(want), "{name:?}");
        }
    }

    #[test]
    fn multibyte_name_limit_counts_bytes() {
        let name = "é".repeat(MAX_NAME_LEN / 2 + 1); // 2 bytes each
        assert_eq!(validate_name(&name), Err(NameError::TooLong(name.len())));
    }

    #[test]
    fn escape_makes_names_inert() {
        assert_eq!(escape("plain.txt"), "plain.txt");
        assert_eq!(escape("a\x1b[31mb"), "a\\u{1b}[31mb");
        assert_eq!(escape("evil\u{202E}gpj.exe"), "evil\\u{202e}gpj.exe");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
        assert_eq!(escape("a\" 1 B: verified"), "a\\\" 1 B: verified");
        assert_eq!(escape("line\u{2028}break"), "line\\u{2028}break");
        assert!(!escape("\0\r\n\x07").chars().any(|c| c.is_control()));
    }

    #[test]
    fn numbered_names() {
        assert_eq!(numbered_name("img.jpg", 0), "img.jpg");
        assert_eq!(numbered_name("img.jpg", 1), "img (1).jpg");
        assert_eq!(numbered_name("data.tar.gz", 2), "data (2).tar.gz");
        assert_eq!(numbered_name(".bashrc", 1), ".bashrc (1)");
        assert_eq!(numbered_name("README", 3), "README (3)");
        assert_eq!(numbered_name(".tar.gz", 1), ".tar (1).gz");
        let long = format!("{}.txt", "é".repeat(200));
        let n = numbered_name(&long, 12);
        assert!(n.len() <= MAX_NAME_LEN && n.ends_with(" (12).txt"), "{n}");
        assert_eq!(validate_name(&n), Ok(()));
        // An extension too long to keep: the whole name is shortened instead.
        let long_ext = format!("a.{}", "x".repeat(MAX_NAME_LEN - 2));
        let n = numbered_name(&long_ext, 1);
        assert!(n.len() <= MAX_NAME_LEN && n.ends_with(" (1)"), "{n}");
    }

    use proptest::prelude::*;

    /// Names built from the characters the rules are about: mostly ordinary ones (so that many
    /// are accepted and the properties about accepted names are exercised), sometimes one that a
    /// rule refuses, sometimes near the length limit, sometimes any text at all.
    fn names() -> impl Strategy<Value = String> {
        let ordinary = prop::sample::select(vec![
            '.', ' ', '-', '"', 'x', 'C', 'O', 'N', '1', 'é', '日', '🎉', 't', 'a', 'r', 'g', 'z',
        ]);
        let refused = prop::sample::select(vec![
            '/',
            '\\',
            ':',
            '\0',
            '\x1b',
            '\n',
            '\u{85}',
            '\u{202e}',
            '\u{200b}',
            '\u{feff}',
            '\u{e0041}',
        ]);
        let ch = prop_oneof![40 => ordinary, 1 => refused, 1 => any::<char>()];
        let text = |len: std::ops::Range<usize>| {
            proptest::collection::vec(ch.clone(), len).prop_map(|v| v.into_iter().collect::<String>())
        };
        let prefix = prop_oneof![8 => Just(""), 1 => Just(".."), 1 => Just(".xfer-"), 1 => Just("CON"), 1 => Just("nul."), 1 => Just("../")];
        prop_oneof![
            4 => (prefix, text(0..24)).prop_map(|(p, b)| format!("{p}{b}")),
            1 => text(60..130),
            1 => any::<String>(),
        ]
    }

    /// The inverse of `escape`, to show it loses nothing.
    fn unescape(s: &str) -> Option<String> {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next()? {
                e @ ('\\' | '"') => out.push(e),
                'u' => {
                    let rest: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let hex = rest.strip_prefix('{')?;
                    out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
                }
                _ => return None,
            }
        }
        Some(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A name that passes is one component of the folder it is joined to, whatever it holds.
        #[test]
        fn an_accepted_name_stays_one_component_inside_the_folder(name in names()) {
            if validate_name(&name).is_ok() {
                let base = std::path::Path::new("/srv/dir");
                let joined = base.join(&name);
                prop_assert_eq!(joined.parent(), Some(base));
                prop_assert_eq!(joined.file_name().and_then(|n| n.to_str()), Some(name.as_str()));
                prop_assert!(name.len() <= MAX_NAME_LEN);
                prop_assert!(!name.contains(['/', '\\', ':', '\0']));
                prop_assert!(!name.chars().any(is_hidden_char));
                prop_assert!(!name.starts_with(TEMP_PREFIX));
                prop_assert!(!name.ends_with(['.', ' ']));
                prop_assert_eq!(escape(&name).chars().filter(|&c| c == '\n').count(), 0);
            }
        }

        /// Every keep-both alternative of an accepted name is accepted too, and is another name.
        #[test]
        fn numbered_alternatives_of_an_accepted_name_are_accepted(name in names(), n in 1u32..=9999) {
            if validate_name(&name).is_ok() {
                let alt = numbered_name(&name, n);
                prop_assert_eq!(validate_name(&alt), Ok(()), "{:?} -> {:?}", name, alt);
                prop_assert_ne!(alt, name);
            }
        }

        /// Escaped text is one inert line (no control, bidi or invisible character, every quote
        /// escaped) and loses nothing: it unescapes to the original, so two names never print alike.
        #[test]
        fn escaped_text_is_inert_and_loses_nothing(text in names()) {
            let shown = escape(&text);
            prop_assert!(!shown.chars().any(is_hidden_char), "{:?}", shown);
            let unquoted = shown.replace("\\\\", "").replace("\\\"", "");
            prop_assert!(!unquoted.contains('"'), "{:?}", shown);
            prop_assert_eq!(unescape(&shown), Some(text));
        }
    }
}
