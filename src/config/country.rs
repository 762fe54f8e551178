//! `device.country` (LOCAL_API.md §17, §8): the country code that prefixes the cloud host names
//! (PROTOCOL.md §5.1).
//!
//! Contract: [`parse`] reads the one-line file into `None` (no prefix: empty or `cn`) or a code of
//! 1 to 7 letters `[a-z]`; [`valid_country`] is the rule with the reasons of LOCAL_API.md §8, shared
//! with provisioning. Pure: no I/O, no panics.

use super::ConfError;

const FILE: &str = "device.country";

/// Parse `device.country`. Surrounding whitespace (and the final newline) is ignored.
pub fn parse(text: &str) -> Result<Option<String>, ConfError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (i, t) = match lines.next() {
        Some((i, l)) => (i, l.trim()),
        None => (0, ""),
    };
    if let Some((j, _)) = lines.next() {
        return Err(ConfError::new(FILE, j + 1, "more than one line"));
    }
    valid_country(t).map_err(|why| ConfError::new(FILE, i + 1, why))?;
    if t.is_empty() || t == "cn" {
        // PROTOCOL.md §5.1: mainland China uses the hosts without a prefix.
        Ok(None)
    } else {
        Ok(Some(t.to_string()))
    }
}

/// A country code as provisioning accepts it: `[a-z]{0,7}` (LOCAL_API.md §8). The length is checked
/// first, in bytes, as the vendor does (`country domain too long: %d >= 8`).
pub fn valid_country(s: &str) -> Result<(), String> {
    if s.len() >= 8 {
        return Err(format!("country domain too long: {} >= 8", s.len()));
    }
    if !s.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err("illegal country domain.".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_files() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("\n").unwrap(), None);
        assert_eq!(parse("cn\n").unwrap(), None);
        assert_eq!(parse("sg").unwrap(), Some("sg".into()));
        assert_eq!(parse("  de \r\n").unwrap(), Some("de".into()));
        assert_eq!(parse("abcdefg\n").unwrap(), Some("abcdefg".into()));
    }

    #[test]
    fn bad_files_name_line_and_reason() {
        let e = parse("abcdefgh\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "device.country:1: country domain too long: 8 >= 8"
        );
        let e = parse("SG\n").unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (1, "illegal country domain."));
        let e = parse("s g").unwrap_err();
        assert_eq!(e.reason, "illegal country domain.");
        let e = parse("\u{e9}\n").unwrap_err();
        assert_eq!(e.reason, "illegal country domain.");
        let e = parse("sg\nde\n").unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (2, "more than one line"));
        let e = parse("\nsg\n\nde\n").unwrap_err();
        assert_eq!(e.line, 4);
        let e = parse("\n\nSG\n").unwrap_err();
        assert_eq!(e.line, 3);
    }

    #[test]
    fn valid_country_reasons() {
        assert_eq!(valid_country(""), Ok(()));
        assert_eq!(valid_country("us"), Ok(()));
        assert_eq!(
            valid_country("toolongcc"),
            Err("country domain too long: 9 >= 8".to_string())
        );
        assert_eq!(
            valid_country("u1"),
            Err("illegal country domain.".to_string())
        );
    }
}
