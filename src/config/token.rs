//! `device.token` (LOCAL_API.md §17, §9.3; PROTOCOL.md §2.5): the LAN token.
//!
//! Contract: [`parse`] reads the file's text (16 characters `[0-9A-Za-z]` used as raw bytes, or 32 hex
//! digits decoded to 16 bytes; trailing whitespace ignored) into a [`Secret16`]; [`render`] writes it back
//! in a form `parse` accepts. [`generate`] turns OS random bytes into a fresh token without modulo bias.
//! Pure: no I/O, no panics, and no error message ever contains the file's content.

use super::{ConfError, Secret16};

const FILE: &str = "device.token";

/// The 62 characters a token is made of (PROTOCOL.md §2.5).
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Parse `device.token`. The error says what shape was expected, never what was found.
pub fn parse(text: &str) -> Result<Secret16, ConfError> {
    let t = text.trim_end();
    if t.is_empty() {
        return Err(ConfError::new(FILE, 0, "empty"));
    }
    if is_valid_token_str(t) {
        let raw: [u8; 16] = t
            .as_bytes()
            .try_into()
            .map_err(|_| ConfError::new(FILE, 1, "bad token"))?;
        return Ok(Secret16::new(raw));
    }
    if t.len() == 32 {
        if let Some(raw) = decode_hex16(t) {
            return Ok(Secret16::new(raw));
        }
    }
    Err(ConfError::new(
        FILE,
        1,
        format!(
            "token must be 16 characters [0-9A-Za-z] or 32 hex digits (got {} characters)",
            t.chars().count()
        ),
    ))
}

/// Exactly 16 characters `[0-9A-Za-z]`: the only token a helper may answer with (LOCAL_API.md §9.3).
pub fn is_valid_token_str(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Map OS random bytes to a token of 16 characters `[0-9A-Za-z]`. Bytes of 248 or more are skipped
/// (248 = 4 × 62), so every character is equally likely. `None` if the bytes ran out first; 64 bytes
/// fail with a probability below 10^-40.
pub fn generate(random: &[u8]) -> Option<Secret16> {
    let mut out = [0u8; 16];
    let mut picked = random
        .iter()
        .filter(|&&b| b < 248)
        .map(|&b| ALPHABET[usize::from(b % 62)]);
    for slot in out.iter_mut() {
        *slot = picked.next()?;
    }
    Some(Secret16::new(out))
}

/// 32 lowercase hex digits of the token's bytes, as `_otc.info` sends it (PROTOCOL.md §5.4).
pub fn to_hex(t: &Secret16) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for &b in t.as_bytes() {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// The file content for a token: the 16 characters themselves (no newline, LOCAL_API.md §17), or the
/// 32 hex digits when the bytes are not all `[0-9A-Za-z]` (a token that was read in hex form).
pub fn render(t: &Secret16) -> String {
    match t.as_ascii() {
        Some(s) if is_valid_token_str(s) => s.to_string(),
        _ => to_hex(t),
    }
}

fn decode_hex16(s: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    let mut digits = s.chars().map(|c| c.to_digit(16));
    for slot in out.iter_mut() {
        let hi = digits.next()??;
        let lo = digits.next()??;
        *slot = u8::try_from((hi << 4) | lo).ok()?;
    }
    match digits.next() {
        None => Some(out),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_form_with_trailing_whitespace() {
        for text in [
            "abcDEF0123456789",
            "abcDEF0123456789\n",
            "abcDEF0123456789 \r\n\t",
        ] {
            assert_eq!(parse(text).unwrap().as_bytes(), b"abcDEF0123456789");
        }
    }

    #[test]
    fn hex_form_is_decoded() {
        let t = parse("00112233445566778899aabbccddeeff\n").unwrap();
        assert_eq!(
            t.as_bytes(),
            &[
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        let u = parse("00112233445566778899AABBCCDDEEFF").unwrap();
        assert_eq!(t, u);
        assert_eq!(to_hex(&t), "00112233445566778899aabbccddeeff");
        // A hex token round-trips through render in hex form.
        assert_eq!(render(&t), "00112233445566778899aabbccddeeff");
        assert_eq!(parse(&render(&t)).unwrap(), t);
    }

    #[test]
    fn to_hex_of_ascii_token() {
        let t = parse("abcDEF0123456789").unwrap();
        assert_eq!(to_hex(&t), "61626344454630313233343536373839");
        assert_eq!(render(&t), "abcDEF0123456789");
    }

    #[test]
    fn bad_tokens_are_refused_without_echo() {
        let e = parse("").unwrap_err();
        assert_eq!((e.line, e.reason.as_str()), (0, "empty"));
        assert_eq!(parse(" \n").unwrap_err().to_string(), "device.token: empty");
        for bad in [
            "abcDEF012345678",                   // 15
            "abcDEF01234567890",                 // 17
            "abcDEF01234567-9",                  // punctuation
            " abcDEF0123456789",                 // leading space
            "00112233445566778899aabbccddeefg",  // 32 but not hex
            "00112233445566778899aabbccddeeff0", // 33 hex
            "abcDEF0123456789\nabcDEF0123456789",
            "abcDEF012345678\u{e9}",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.file, "device.token");
            assert_eq!(e.line, 1, "{bad:?}");
            assert!(
                e.reason.starts_with("token must be 16 characters"),
                "{}",
                e.reason
            );
            assert!(!e.reason.contains("abcDEF"), "{}", e.reason);
            assert!(!e.reason.contains("0011"), "{}", e.reason);
        }
    }

    #[test]
    fn token_str_check() {
        assert!(is_valid_token_str("abcDEF0123456789"));
        assert!(!is_valid_token_str("abcDEF012345678"));
        assert!(!is_valid_token_str("abcDEF012345678_"));
        assert!(!is_valid_token_str("abcDEF012345678\u{e9}"));
        assert!(!is_valid_token_str("00112233445566778899aabbccddeeff"));
    }

    #[test]
    fn generate_is_deterministic_alphanumeric_and_unbiased() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let a = generate(&bytes).unwrap();
        let b = generate(&bytes).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_bytes(), b"0123456789ABCDEF");
        assert!(is_valid_token_str(a.as_ascii().unwrap()));

        // 248..=255 are rejected; 61 maps to 'z', 62 wraps to '0', 247 = 3*62+61 → 'z'.
        let mut bytes = vec![248, 255, 61, 62, 247];
        bytes.extend_from_slice(&[1; 13]);
        let t = generate(&bytes).unwrap();
        assert_eq!(t.as_bytes(), b"z0z1111111111111");

        // Not enough usable bytes.
        assert_eq!(generate(&[0; 15]), None);
        assert_eq!(generate(&[255; 64]), None);
        assert_eq!(generate(&[]), None);
    }

    #[test]
    fn generate_covers_the_alphabet() {
        let bytes: Vec<u8> = (0..62u8).collect();
        let mut seen = std::collections::BTreeSet::new();
        for chunk in bytes.chunks(16).filter(|c| c.len() == 16) {
            seen.extend(generate(chunk).unwrap().as_bytes().iter().copied());
        }
        seen.extend(generate(&bytes[46..62]).unwrap().as_bytes().iter().copied());
        assert_eq!(seen.len(), 62);
        assert!(seen.iter().all(|b| b.is_ascii_alphanumeric()));
    }
}
