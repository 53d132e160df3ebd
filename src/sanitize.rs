//! Names from the wire made safe: validated as a single path component before they touch the file
//! system, and escaped before they reach a terminal.
//!
//! The rules follow the bugs this kind of tool keeps having (scp CVE-2019-6111, croc
//! CVE-2023-43619/43620, magic-wormhole's lost `basename()`): a name from the peer is one
//! component, never a path, and it cannot hide from a human reading the log. Two layers:
//!
//! - [`validate_name`]: the universal rules, the same on the sender and on every receiver. What a
//!   Linux file system can hold is accepted (`a:b.txt`, `back\slash.txt`, `CON`, a trailing
//!   space), except what is unsafe anywhere: separators, `.`/`..`, NUL, xfer's own `.xfer-`
//!   prefix, and characters that deceive a terminal. Those are refused rather than stored and
//!   shown escaped: a stored name with a bidi override deceives every later `ls`, not only our
//!   logs.
//! - [`validate_for`]: what the receiver's own file system cannot hold ([`FsRules`]): on FAT,
//!   exFAT, NTFS or SMB the characters, endings and device names Windows refuses or alters.

use std::fmt::Write as _;

use crate::protocol::MAX_NAME_LEN;

/// Prefix of every file xfer keeps in the target folder (partials and their records); names from
/// the wire may not use it.
pub const TEMP_PREFIX: &str = ".xfer-";

/// Why a name was refused. The message is sent to the peer as the rejection reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes long, the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("name is `.` or `..`")]
    DotOrDotDot,
    #[error("name contains a path separator ({0:?}); only a single file name is allowed")]
    Separator(char),
    #[error("name contains control or invisible character U+{0:04X}")]
    ControlChar(u32),
    #[error("name starts with `{TEMP_PREFIX}`, reserved for xfer's temporary files")]
    ReservedPrefix,
    // The rules of the receiver's file system (see `FsRules`).
    #[error("name contains `{0}`, which the receiver's file system (FAT, exFAT, NTFS or SMB) cannot hold")]
    WindowsChar(char),
    #[error(
        "name ends with a dot or a space, which the receiver's file system (FAT, exFAT, NTFS or SMB) drops"
    )]
    TrailingDotOrSpace,
    #[error(
        "name is the Windows device name {0}, which the receiver's file system (FAT, exFAT, NTFS or SMB) cannot hold"
    )]
    ReservedDevice(&'static str),
    #[error(
        "name starts with `{TEMP_PREFIX}` once case is ignored, as the receiver's file system does; reserved for xfer's temporary files"
    )]
    ReservedPrefixAnyCase,
}

/// What the receiver's file system adds to the universal rules, found once at start (see
/// `store::fs_rules`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsRules {
    /// FAT, exFAT, NTFS, SMB: refuse what Windows cannot hold ([`validate_for`]).
    pub windows: bool,
    /// Names equal once Unicode form and case are ignored are one name there.
    pub case_insensitive: bool,
}

impl FsRules {
    /// A Linux file system: the universal rules only.
    pub const POSIX: FsRules = FsRules { windows: false, case_insensitive: false };
    /// FAT, exFAT, NTFS, SMB.
    pub const WINDOWS: FsRules = FsRules { windows: true, case_insensitive: true };
    /// A case-insensitive folder of ext4 or f2fs (`chattr +F`).
    pub const CASEFOLD: FsRules = FsRules { windows: false, case_insensitive: true };

    /// Both sets of rules at once: the stricter.
    pub fn and(self, other: FsRules) -> FsRules {
        FsRules {
            windows: self.windows || other.windows,
            case_insensitive: self.case_insensitive || other.case_insensitive,
        }
    }
}

/// Windows device names, reserved with any extension (`CON.txt` too).
const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM0", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT0", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9", "CONIN$",
    "CONOUT$",
];

/// Characters FAT, exFAT, NTFS and SMB refuse in a name (controls are refused everywhere).
const WINDOWS_CHARS: &[char] = &['\\', ':', '*', '?', '"', '<', '>', '|'];

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

/// True for the spaces other than U+0020 that print as a blank: a name holding one looks like
/// the name with a plain space, or without it (`report.pdf` + U+00A0).
fn is_lookalike_space(c: char) -> bool {
    matches!(c, '\u{A0}' | '\u{1680}' | '\u{2000}'..='\u{200A}' | '\u{202F}' | '\u{205F}' | '\u{3000}')
}

/// Checks that `name` is a single, safe file name by the universal rules (see the module's
/// documentation). Returns the first rule it breaks.
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
            '/' => return Err(NameError::Separator(c)),
            c if is_hidden_char(c) => return Err(NameError::ControlChar(c as u32)),
            _ => {}
        }
    }
    if name.starts_with(TEMP_PREFIX) {
        return Err(NameError::ReservedPrefix);
    }
    Ok(())
}

/// Checks a name that passed [`validate_name`] against what the receiver's file system cannot
/// hold: on a Windows-like one (`rules.windows`) `\ : * ? " < > |`, a trailing dot or space (Windows
/// drops them, so `a.` would land as `a`) and the device names (`CON`, `nul.txt`, `COM1.tar.gz`);
/// on a case-insensitive one the `.xfer-` prefix in any case.
pub fn validate_for(name: &str, rules: FsRules) -> Result<(), NameError> {
    if rules.windows {
        if let Some(c) = name.chars().find(|c| WINDOWS_CHARS.contains(c)) {
            return Err(NameError::WindowsChar(c));
        }
        if name.ends_with(['.', ' ']) {
            return Err(NameError::TrailingDotOrSpace);
        }
        let stem = name.split('.').next().unwrap_or(name).trim_end();
        if let Some(r) = RESERVED.iter().find(|r| r.eq_ignore_ascii_case(stem)) {
            return Err(NameError::ReservedDevice(r));
        }
    }
    if rules.case_insensitive
        && name.get(..TEMP_PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(TEMP_PREFIX))
    {
        return Err(NameError::ReservedPrefixAnyCase);
    }
    Ok(())
}

/// Escapes a string for a terminal or log: printable characters pass; backslash and `"` get a
/// backslash (log lines quote names, so a name cannot forge the fields after it); the characters
/// [`validate_name`] refuses as hidden become `\u{..}` escapes, and so do the blanks that make a
/// name pass for another: spaces other than U+0020 (`report.pdf` + U+00A0 shows as
/// `report.pdf\u{a0}`), and a U+0020 at the start or end of a name (the string's ends, or beside a
/// `/` in a path: `\u{20}`). Used for every name or peer message printed, valid or not, because
/// a rejected name is still logged; it loses nothing, so two names never print alike.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev = None;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let edge_space =
            c == ' ' && (matches!(prev, None | Some('/')) || matches!(chars.peek(), None | Some('/')));
        if c == '\\' || c == '"' {
            out.push('\\');
            out.push(c);
        } else if is_hidden_char(c) || is_lookalike_space(c) || edge_space {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
        prev = Some(c);
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
            // Legal on Linux, refused only by a Windows-like receiver (`validate_for`).
            "a:b.txt",
            "backup-2024-01-01T10:00:00.tar",
            "trailing ",
            "trailing.",
            " leading",
            "CON",
            "nul.txt",
            "back\\slash.txt",
            "C:\\x",
            "what?*<>|\"",
            "report.pdf\u{a0}",
            ".XFER-upper",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert_eq!(validate_name(name), Ok(()), "{name:?} should be accepted");
            assert_eq!(validate_for(name, FsRules::POSIX), Ok(()), "{name:?} should be accepted");
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
            ("a\0b", NameError::ControlChar(0)),
            ("a\x1b[2Jb", NameError::ControlChar(0x1b)),
            ("a\nb", NameError::ControlChar(0x0a)),
            ("a\x7fb", NameError::ControlChar(0x7f)),
            ("a\u{85}b", NameError::ControlChar(0x85)),
            ("evil\u{202E}gpj.exe", NameError::ControlChar(0x202e)),
            ("zero\u{200B}width", NameError::ControlChar(0x200b)),
            ("a\u{2028}b", NameError::ControlChar(0x2028)),
            ("a\u{061C}b", NameError::ControlChar(0x061c)),
            ("a\u{00AD}b", NameError::ControlChar(0xad)),
            ("blank\u{3164}", NameError::ControlChar(0x3164)),
            ("tag\u{E0041}", NameError::ControlChar(0xe0041)),
            ("vs\u{FE0F}", NameError::ControlChar(0xfe0f)),
            (".xfer-abc123.part", NameError::ReservedPrefix),
            (&long, NameError::TooLong(MAX_NAME_LEN + 1)),
        ];
        for (name, want) in cases {
            assert_eq!(validate_name(name).as_ref(), Err(want), "{name:?}");
        }
    }

    #[test]
    fn what_a_windows_like_file_system_cannot_hold() {
        let w = FsRules::WINDOWS;
        let cases: &[(&str, NameError)] = &[
            ("a:b.txt", NameError::WindowsChar(':')),
            ("C:x", NameError::WindowsChar(':')),
            ("file.txt:stream", NameError::WindowsChar(':')),
            ("back\\slash.txt", NameError::WindowsChar('\\')),
            ("..\\x", NameError::WindowsChar('\\')),
            ("what?", NameError::WindowsChar('?')),
            ("a*b", NameError::WindowsChar('*')),
            ("a<b", NameError::WindowsChar('<')),
            ("a>b", NameError::WindowsChar('>')),
            ("a|b", NameError::WindowsChar('|')),
            ("say \"hi\"", NameError::WindowsChar('"')),
            ("trailing.", NameError::TrailingDotOrSpace),
            ("trailing ", NameError::TrailingDotOrSpace),
            ("CON", NameError::ReservedDevice("CON")),
            ("nul.txt", NameError::ReservedDevice("NUL")),
            ("com1.tar.gz", NameError::ReservedDevice("COM1")),
            ("Aux .txt", NameError::ReservedDevice("AUX")),
            (".XFER-abc.part", NameError::ReservedPrefixAnyCase),
        ];
        for (name, want) in cases {
            assert_eq!(validate_name(name), Ok(()), "{name:?} is legal on Linux");
            assert_eq!(validate_for(name, w).as_ref(), Err(want), "{name:?}");
            assert_eq!(validate_for(name, FsRules::POSIX), Ok(()), "{name:?}");
        }
        for name in ["CONSOLE.txt", "COM10", "img.jpg", " leading", "a.b.c", "日本語.txt"] {
            assert_eq!(validate_for(name, w), Ok(()), "{name:?}");
        }
        // A case-insensitive folder refuses the reserved prefix in any case, and nothing else.
        assert_eq!(validate_for(".Xfer-x", FsRules::CASEFOLD), Err(NameError::ReservedPrefixAnyCase));
        for name in ["a:b.txt", "CON", "trailing ", "back\\slash"] {
            assert_eq!(validate_for(name, FsRules::CASEFOLD), Ok(()), "{name:?}");
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
    fn escape_shows_lookalike_blanks() {
        // Not `report.pdf`: every blank that could hide is spelled out.
        assert_eq!(escape("report.pdf\u{a0}"), "report.pdf\\u{a0}");
        assert_eq!(escape("report.pdf "), "report.pdf\\u{20}");
        assert_eq!(escape(" report.pdf"), "\\u{20}report.pdf");
        assert_eq!(escape("with space.txt"), "with space.txt");
        assert_eq!(escape("a  b"), "a  b");
        // In a path, at the ends of each component.
        assert_eq!(escape("dir /x"), "dir\\u{20}/x");
        assert_eq!(escape("dir/ x"), "dir/\\u{20}x");
        assert_eq!(escape(" "), "\\u{20}");
        for c in
            ['\u{a0}', '\u{1680}', '\u{2000}', '\u{2007}', '\u{200a}', '\u{202f}', '\u{205f}', '\u{3000}']
        {
            assert_eq!(escape(&format!("a{c}b")), format!("a\\u{{{:x}}}b", c as u32));
        }
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
            '?',
            '\u{a0}',
            '\u{3000}',
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
        let prefix = prop_oneof![8 => Just(""), 1 => Just(".."), 1 => Just(".xfer-"), 1 => Just(".XFER-"), 1 => Just("CON"), 1 => Just("nul."), 1 => Just("../")];
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
                prop_assert!(!name.contains(['/', '\0']));
                prop_assert!(!name.chars().any(is_hidden_char));
                prop_assert!(!name.starts_with(TEMP_PREFIX));
                prop_assert_eq!(escape(&name).chars().filter(|&c| c == '\n').count(), 0);
            }
        }

        /// Every keep-both alternative of an accepted name is accepted too, and is another name.
        #[test]
        fn numbered_alternatives_of_an_accepted_name_are_accepted(name in names(), n in 1u32..=9999) {
            if validate_name(&name).is_ok() {
                let alt = numbered_name(&name, n);
                prop_assert_eq!(validate_name(&alt), Ok(()), "{:?} -> {:?}", name, alt);
                prop_assert_ne!(&alt, &name);
                // On a Windows-like receiver too: a keep-both copy must be storable there.
                if validate_for(&name, FsRules::WINDOWS).is_ok() {
                    prop_assert_eq!(validate_for(&alt, FsRules::WINDOWS), Ok(()), "{:?} -> {:?}", name, alt);
                }
            }
        }

        /// A name a Windows-like receiver accepts holds nothing Windows refuses or alters.
        #[test]
        fn a_name_accepted_for_windows_is_one_windows_keeps(name in names()) {
            if validate_name(&name).is_ok() && validate_for(&name, FsRules::WINDOWS).is_ok() {
                prop_assert!(!name.contains(WINDOWS_CHARS));
                prop_assert!(!name.ends_with(['.', ' ']));
                let stem = name.split('.').next().unwrap().trim_end().to_ascii_uppercase();
                prop_assert!(!RESERVED.contains(&stem.as_str()), "{:?}", name);
                prop_assert!(!name.to_ascii_lowercase().starts_with(TEMP_PREFIX));
            }
        }

        /// Escaped text is one inert line (no control, bidi or invisible character, no blank
        /// but inner plain spaces, every quote escaped) and loses nothing: it unescapes to the
        /// original, so two names never print alike.
        #[test]
        fn escaped_text_is_inert_and_loses_nothing(text in names()) {
            let shown = escape(&text);
            prop_assert!(!shown.chars().any(|c| is_hidden_char(c) || is_lookalike_space(c)), "{:?}", shown);
            prop_assert!(!shown.starts_with(' ') && !shown.ends_with(' '), "{:?}", shown);
            prop_assert!(!shown.contains(" /") && !shown.contains("/ "), "{:?}", shown);
            let unquoted = shown.replace("\\\\", "").replace("\\\"", "");
            prop_assert!(!unquoted.contains('"'), "{:?}", shown);
            prop_assert_eq!(unescape(&shown), Some(text));
        }
    }
}
