//! The data files of LOCAL_API.md §17: pure `&str -> Result` parsers, and `store` for atomic writes.
//!
//! Contract: every parser here takes the file's text and returns a typed value or a [`ConfError`] that
//! names the file and the 1-based line (0 for the whole file). Parsers never touch the file system,
//! never panic on any input, and never put a secret (key, token, Wi-Fi password) in an error, a
//! `Debug` or a `Display` (LOCAL_API.md §17). Only `store` does file I/O.

use std::fmt;

pub mod country;
pub mod device;
pub mod osrelease;
pub mod store;
pub mod token;
pub mod wifi;

/// A data file that could not be used. `line` is 1-based; 0 means the file as a whole
/// (a missing key, an empty file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

impl ConfError {
    pub fn new(file: &str, line: usize, reason: impl Into<String>) -> ConfError {
        ConfError {
            file: file.to_string(),
            line,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}:{}: {}", self.file, self.line, self.reason)
        }
    }
}

impl std::error::Error for ConfError {}

/// 16 secret bytes: the cloud key of `device.conf` or the LAN token (PROTOCOL.md §2.5).
/// `Debug` prints `***`; there is deliberately no `Display`, so a secret cannot slip into a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret16([u8; 16]);

impl Secret16 {
    pub fn new(bytes: [u8; 16]) -> Secret16 {
        Secret16(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The bytes as text when they are all printable ASCII (a key always is; a token read from
    /// its hex form may not be). Needed to hand the key to the helper (LOCAL_API.md §16 step 4).
    pub fn as_ascii(&self) -> Option<&str> {
        if self.0.iter().all(|b| (0x20..=0x7e).contains(b)) {
            std::str::from_utf8(&self.0).ok()
        } else {
            None
        }
    }
}

impl fmt::Debug for Secret16 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A value for an error message: non-secret text from a file, cut short so a huge line cannot
/// flood the log, and quoted with escapes so control characters stay visible ([`Quoted`]).
pub(crate) fn shown(v: &str) -> String {
    const MAX: usize = 32;
    match v.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", Quoted(v.get(..cut).unwrap_or(""))),
        None => Quoted(v).to_string(),
    }
}

/// Text in a log or error line, between double quotes: `"` and `\` are escaped with a backslash,
/// tab, CR, LF and NUL as `\t`, `\r`, `\n`, `\0`, any other control character (C0, DEL, C1) as
/// `\u{..}` in hex; everything else, non-ASCII included, as it is. This is `{:?}`'s form for every
/// string without other non-printable characters, without the Unicode tables `{:?}` links.
pub(crate) struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        let s = self.0;
        f.write_char('"')?;
        let mut from = 0;
        for (i, c) in s.char_indices() {
            if !(c.is_control() || c == '"' || c == '\\') {
                continue;
            }
            f.write_str(s.get(from..i).unwrap_or(""))?;
            from = i + c.len_utf8();
            match c {
                '\t' => f.write_str("\\t")?,
                '\r' => f.write_str("\\r")?,
                '\n' => f.write_str("\\n")?,
                '\0' => f.write_str("\\0")?,
                '"' | '\\' => {
                    f.write_char('\\')?;
                    f.write_char(c)?;
                }
                _ => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            }
        }
        f.write_str(s.get(from..).unwrap_or(""))?;
        f.write_char('"')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_with_and_without_line() {
        let e = ConfError::new("device.conf", 3, "key must be 16 characters (got 12)");
        assert_eq!(
            e.to_string(),
            "device.conf:3: key must be 16 characters (got 12)"
        );
        let e = ConfError::new("device.conf", 0, "missing did=");
        assert_eq!(e.to_string(), "device.conf: missing did=");
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret16::new(*b"EsrtdeaInabcPQM0");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
        assert_eq!(s.as_bytes(), b"EsrtdeaInabcPQM0");
        assert_eq!(s.as_ascii(), Some("EsrtdeaInabcPQM0"));
        assert_eq!(Secret16::new([0xff; 16]).as_ascii(), None);
    }

    #[test]
    fn shown_cuts_long_values() {
        assert_eq!(shown("abc"), "\"abc\"");
        let long = "x".repeat(100);
        let s = shown(&long);
        assert!(s.len() < 40, "{s}");
        assert!(s.ends_with("..."));
        assert_eq!(shown("a\tb"), "\"a\\tb\"");
    }

    /// `Quoted` writes what `{:?}` writes for any string whose only non-printable characters are
    /// control characters; other non-ASCII text is written as it is.
    #[test]
    fn quoted_is_debug_for_control_characters() {
        for s in [
            "",
            "abc",
            "a\"b\\c",
            "\t\r\n\0",
            "\u{1}\u{1b}[0m\u{7f}\u{80}\u{9f}",
            "héllo wörld ☃ 日本",
            "'single'",
        ] {
            assert_eq!(Quoted(s).to_string(), format!("{s:?}"));
        }
        assert_eq!(Quoted("\u{200b}").to_string(), "\"\u{200b}\"");
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(text in "(\\PC|[\r\n\t\0\"\\\\=#])*") {
            let _ = device::parse(&text);
            let _ = token::parse(&text);
            let _ = wifi::parse(&text);
            let _ = country::parse(&text);
            let _ = osrelease::fw_version(&text, "cool");
        }

        #[test]
        fn rewrite_didkey_always_wins(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    "[ \t]*(did|key|mac|model|vendor|x)[ \t]*=[^\r\n]{0,20}",
                    "[ \t]*#[^\r\n]{0,20}",
                    "[ \t]*",
                ],
                0..8,
            ),
            crlf in proptest::prelude::any::<bool>(),
            did in proptest::prelude::any::<u32>(),
        ) {
            let text = lines.join(if crlf { "\r\n" } else { "\n" });
            let out = device::rewrite_didkey(&text, did, "AAAABBBBCCCCDDDD");
            // Every line that is not did= or key= is still there, in order.
            let kept = |t: &str| -> Vec<String> {
                t.lines()
                    .filter(|l| {
                        let k = l.split_once('=').map(|(k, _)| k.trim());
                        k != Some("did") && k != Some("key")
                    })
                    .map(str::to_string)
                    .collect()
            };
            proptest::prop_assert_eq!(kept(&out), kept(&text));
            let full = format!("{out}\nmac=00:11:22:33:44:55\nmodel=m\nvendor=v\n");
            let d = device::parse(&full);
            proptest::prop_assert!(d.is_ok(), "{:?}", d);
            if let Ok(d) = d {
                proptest::prop_assert_eq!(d.did, did);
                proptest::prop_assert_eq!(d.key.as_bytes(), b"AAAABBBBCCCCDDDD");
            }
        }
    }
}
