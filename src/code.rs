//! Pairing codes: four words from the EFF short word list #2 (1,296 words, each with a unique
//! three-letter prefix; CC BY 3.0, packaged by `diceware_wordlists`), 41.4 bits. Codes are made
//! from its 1,295 words of letters only: `yo-yo` would read back as two words.
//!
//! A code is typed by people, so parsing forgives what people do: any case, any separators
//! (spaces, `-`, `.`, `_`), and a word shortened to its first three letters or more. A word that
//! is not in the list, or the wrong number of words, is caught here, before anything is sent:
//! a typo never costs one of the receiver's guesses. The canonical form, the one both sides feed
//! into the PAKE, is the full words in lower case joined by `-`.
//!
//! A code never goes on the command line (anyone on the machine can read `/proc/PID/cmdline`):
//! it comes from the terminal, `XFER_CODE` or `--code-file`. [`Code`]'s `Debug` prints nothing.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Words in a code.
pub const CODE_WORDS: usize = 4;

/// The word list.
pub fn words() -> &'static [&'static str] {
    diceware_wordlists::Wordlist::EffShort2.get_list()
}

/// Whether a code may hold `word`: letters only, as parsing splits at anything else.
fn is_code_word(word: &str) -> bool {
    word.bytes().all(|b| b.is_ascii_lowercase())
}

/// A pairing code in canonical form. Wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(Zeroizing<String>);

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Code(..)")
    }
}

impl Code {
    /// A new random code.
    pub fn generate() -> Code {
        let list = words();
        let rng = SystemRandom::new();
        let mut chosen = Vec::with_capacity(CODE_WORDS);
        while chosen.len() < CODE_WORDS {
            let mut b = [0u8; 2];
            rng.fill(&mut b).expect("the system's random source works");
            let n = u16::from_be_bytes(b) as usize;
            // Uniform over the list: draws past the largest multiple of its length are retried,
            // and so are the words a code could not be read back with.
            if n < 65536 / list.len() * list.len() && is_code_word(list[n % list.len()]) {
                chosen.push(list[n % list.len()]);
            }
        }
        Code(Zeroizing::new(chosen.join("-")))
    }

    /// Parses a code as a person typed it (see the module docs).
    pub fn parse(typed: &str) -> Result<Code, String> {
        let list = words();
        // Text after `#` on a line is a comment (a code file says where it came from).
        let mut kept = Zeroizing::new(String::with_capacity(typed.len()));
        for l in typed.lines() {
            kept.push_str(l.split('#').next().unwrap_or(""));
            kept.push(' ');
        }
        let typed = Zeroizing::new(kept.to_lowercase());
        let tokens: Vec<&str> =
            typed.split(|c: char| !c.is_ascii_alphabetic()).filter(|t| !t.is_empty()).collect();
        if tokens.len() != CODE_WORDS {
            return Err(format!(
                "a code is {CODE_WORDS} words (like `word-word-word-word`), this has {}",
                tokens.len()
            ));
        }
        let mut out = Vec::with_capacity(CODE_WORDS);
        for (i, t) in tokens.iter().enumerate() {
            let found = if t.len() >= 3 {
                list.iter().find(|w| **w == *t).or_else(|| {
                    let mut m = list.iter().filter(|w| w.starts_with(t));
                    m.next().filter(|_| m.next().is_none())
                })
            } else {
                None
            };
            match found {
                Some(w) => out.push(*w),
                // The word itself is not echoed: a near-miss of a secret is still half a secret.
                None => {
                    return Err(format!("word {} of the code is not in xfer's word list (a typo?)", i + 1));
                }
            }
        }
        Ok(Code(Zeroizing::new(out.join("-"))))
    }

    /// The canonical form, for the PAKE and for showing to the person who runs the receiver.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_has_unique_three_letter_prefixes() {
        let list = words();
        assert_eq!(list.len(), 1296);
        let mut prefixes: Vec<&str> = list.iter().map(|w| &w[..3]).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 1296);
    }

    #[test]
    fn every_word_a_code_is_made_of_reads_back() {
        // Before: `yo-yo` was drawn like any word (a code in about 320), and the code it made
        // read back as five words: no sender could type it, nor the receiver re-read its file.
        for w in words().iter().filter(|w| is_code_word(w)) {
            let code = [*w; CODE_WORDS].join("-");
            assert_eq!(Code::parse(&code).map(|c| c.expose().to_string()), Ok(code));
        }
        assert_eq!(words().iter().filter(|w| is_code_word(w)).count(), 1295);
        for _ in 0..2000 {
            let c = Code::generate();
            assert_eq!(Code::parse(c.expose()), Ok(c));
        }
    }

    #[test]
    fn people_type_codes_many_ways() {
        let c = Code::generate();
        let canon = c.expose().to_string();
        assert_eq!(canon.split('-').count(), CODE_WORDS);
        let spaced = canon.replace('-', "  ").to_uppercase();
        assert_eq!(Code::parse(&spaced).unwrap(), c);
        let short: Vec<String> = canon.split('-').map(|w| w[..3].to_string()).collect();
        assert_eq!(Code::parse(&short.join(".")).unwrap(), c);
        assert_eq!(Code::parse(&format!(" {canon}\n")).unwrap(), c);
    }

    #[test]
    fn typos_and_wrong_counts_are_caught_locally() {
        let c = Code::generate();
        let mut w: Vec<String> = c.expose().split('-').map(String::from).collect();
        w[1] = "zzzzqq".into();
        let e = Code::parse(&w.join("-")).unwrap_err();
        assert!(e.contains("word 2"), "{e}");
        assert!(!e.contains("zzzzqq"), "the typed word is not echoed: {e}");
        assert!(Code::parse("one-two").unwrap_err().contains("this has 2"));
        assert!(Code::parse("").is_err());
        // Two letters are not enough to name a word.
        let two: Vec<String> = c.expose().split('-').map(|w| w[..2].to_string()).collect();
        assert!(Code::parse(&two.join("-")).is_err());
    }

    #[test]
    fn debug_prints_nothing_secret() {
        let c = Code::generate();
        let shown = format!("{c:?}");
        for w in c.expose().split('-') {
            assert!(!shown.contains(w));
        }
    }
}
