//! `device.conf` (LOCAL_API.md §17): the device identity the maker writes.
//!
//! Contract: [`parse`] turns the text into a validated [`DeviceConf`] or a [`ConfError`] naming
//! `device.conf` and the line. Format: `k=v` lines, whole-line `#` comments, blank lines; whitespace
//! around `k` and `v` is trimmed; unknown keys are ignored. [`rewrite_didkey`] changes only the
//! `did=` and `key=` lines (LOCAL_API.md §16 step 4). The `check_*` functions hold the field rules so
//! the same rules can judge a helper's `_internal.response_dinfo` (LOCAL_API.md §9.3).
//! Pure: no I/O, no panics, the key never appears in an error or in `Debug`.

use super::{shown, ConfError, Secret16};

const FILE: &str = "device.conf";

/// The validated content of `device.conf`. `Debug` shows the key as `***`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConf {
    /// 0 and 1 are valid: they ask for a dynamic did/key (LOCAL_API.md §16).
    pub did: u32,
    /// The cloud key: 16 printable ASCII bytes, used as bytes (PROTOCOL.md §2.5).
    pub key: Secret16,
    /// Upper-cased, `XX:XX:XX:XX:XX:XX`.
    pub mac: String,
    /// "" when the file has no `vendor=`.
    pub vendor: String,
    pub model: String,
}

/// What one line of a `k=v` file is.
enum Line<'a> {
    Skip,
    Kv(&'a str, &'a str),
    NoEquals,
}

fn classify(line: &str) -> Line<'_> {
    let t = line.trim();
    // A `#` only starts a comment at the beginning of a line: a key may contain `#`.
    if t.is_empty() || t.starts_with('#') {
        return Line::Skip;
    }
    match t.split_once('=') {
        Some((k, v)) => Line::Kv(k.trim(), v.trim()),
        None => Line::NoEquals,
    }
}

/// Parse `device.conf`. If a key appears more than once, the last line wins (and only that line
/// is validated), as a shell sourcing the file would see it.
pub fn parse(text: &str) -> Result<DeviceConf, ConfError> {
    // (line number, value) of the last occurrence of each key we know.
    let mut did = None;
    let mut key = None;
    let mut mac = None;
    let mut vendor = None;
    let mut model = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        match classify(line) {
            Line::Skip => {}
            Line::NoEquals => return Err(ConfError::new(FILE, n, "expected key=value")),
            Line::Kv(k, v) => {
                let slot = match k {
                    "did" => &mut did,
                    "key" => &mut key,
                    "mac" => &mut mac,
                    "vendor" => &mut vendor,
                    "model" => &mut model,
                    _ => continue,
                };
                *slot = Some((n, v));
            }
        }
    }
    let missing = |k: &str| ConfError::new(FILE, 0, format!("missing {k}="));
    let at = |n: usize| move |reason: String| ConfError::new(FILE, n, reason);

    let (n, v) = did.ok_or_else(|| missing("did"))?;
    let did = check_did(v).map_err(at(n))?;
    let (n, v) = key.ok_or_else(|| missing("key"))?;
    let key = check_key(v).map_err(at(n))?;
    let (n, v) = mac.ok_or_else(|| missing("mac"))?;
    let mac = check_mac(v).map_err(at(n))?;
    let (n, v) = model.ok_or_else(|| missing("model"))?;
    check_model(v).map_err(at(n))?;
    let model = v.to_string();
    let vendor = match vendor {
        Some((n, v)) => {
            check_vendor(v).map_err(at(n))?;
            v.to_string()
        }
        None => String::new(),
    };
    Ok(DeviceConf {
        did,
        key,
        mac,
        vendor,
        model,
    })
}

/// A did: decimal digits only (no sign), 0..=4294967295.
pub fn check_did(v: &str) -> Result<u32, String> {
    let bad = || {
        format!(
            "did must be a decimal number 0..4294967295 (got {})",
            shown(v)
        )
    };
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    crate::cli::uint::<u32>(v).ok_or_else(bad)
}

/// The cloud key: exactly 16 printable ASCII characters (LOCAL_API.md §9.3, PROTOCOL.md §2.5).
/// The reason never contains the key itself.
pub fn check_key(v: &str) -> Result<Secret16, String> {
    let n = v.chars().count();
    if n != 16 {
        return Err(format!("key must be 16 characters (got {n})"));
    }
    if v.len() != 16 || !v.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err("key must be printable ASCII".to_string());
    }
    let out: [u8; 16] = v
        .as_bytes()
        .try_into()
        .map_err(|_| "key must be printable ASCII".to_string())?;
    Ok(Secret16::new(out))
}

/// A MAC address as six hex pairs with colons, in any case. Returns it upper-cased.
pub fn check_mac(v: &str) -> Result<String, String> {
    let ok = v.len() == 17
        && v.bytes().enumerate().all(|(i, b)| {
            if i % 3 == 2 {
                b == b':'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    if ok {
        Ok(v.to_ascii_uppercase())
    } else {
        Err(format!(
            "mac must look like AA:BB:CC:DD:EE:FF (got {})",
            shown(v)
        ))
    }
}

/// Model and vendor end up in JSON, host names, SSIDs and shell variables (LOCAL_API.md §8), so
/// they are held to visible ASCII. The spec only gives the lengths; this is our stricter choice.
fn visible_ascii(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_graphic())
}

/// The model: 1 to 23 visible ASCII characters (vendor §4: "model max len 23").
pub fn check_model(v: &str) -> Result<(), String> {
    let n = v.chars().count();
    if !(1..=23).contains(&n) {
        return Err(format!("model must be 1 to 23 characters (got {n})"));
    }
    if !visible_ascii(v) {
        return Err(format!("model must be visible ASCII (got {})", shown(v)));
    }
    Ok(())
}

/// The vendor: at most 16 visible ASCII characters; empty is allowed.
pub fn check_vendor(v: &str) -> Result<(), String> {
    let n = v.chars().count();
    if n > 16 {
        return Err(format!("vendor must be at most 16 characters (got {n})"));
    }
    if !visible_ascii(v) {
        return Err(format!("vendor must be visible ASCII (got {})", shown(v)));
    }
    Ok(())
}

/// Replace every `did=` and `key=` line of `device.conf` with the new values, or append them when
/// absent; every other byte of the file is kept (LOCAL_API.md §16 step 4). All duplicates are
/// replaced, so the last-wins rule of [`parse`] sees the new values.
/// The caller passes a key that passed [`check_key`]; a key with a line break would break the file.
pub fn rewrite_didkey(text: &str, did: u32, key: &str) -> String {
    // A byte scan: `str::contains` of a two-byte pattern links a whole substring searcher.
    let crlf = text.as_bytes().windows(2).any(|w| w == b"\r\n");
    let eol = if crlf { "\r\n" } else { "\n" };
    let mut out = String::with_capacity(text.len() + 40);
    let (mut saw_did, mut saw_key) = (false, false);
    for piece in text.split_inclusive('\n') {
        let body = piece
            .strip_suffix('\n')
            .map(|b| b.strip_suffix('\r').unwrap_or(b))
            .unwrap_or(piece);
        let ending = piece.get(body.len()..).unwrap_or("");
        match classify(body) {
            Line::Kv("did", _) => {
                saw_did = true;
                out.push_str(&format!("did={did}{ending}"));
            }
            Line::Kv("key", _) => {
                saw_key = true;
                out.push_str("key=");
                out.push_str(key);
                out.push_str(ending);
            }
            _ => out.push_str(piece),
        }
    }
    let appending = !saw_did || !saw_key;
    if appending && !out.is_empty() && !out.ends_with('\n') {
        out.push_str(eol);
    }
    if !saw_did {
        out.push_str(&format!("did={did}{eol}"));
    }
    if !saw_key {
        out.push_str("key=");
        out.push_str(key);
        out.push_str(eol);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# cat /etc/miio/device.conf\n\
        # did must be a unsigned int\n\
        # key must be a string\n\
        #\n\
        did=10000\n\
        key=EsrtdeaInabcPQM0\n\
        mac=8C:BE:BE:AA:bb:59\n\
        vendor=coolvendor\n\
        # model max len 23\n\
        model=coolvendor.prod.v1\n";

    fn err(text: &str) -> (usize, String) {
        let e = parse(text).unwrap_err();
        assert_eq!(e.file, "device.conf");
        (e.line, e.reason)
    }

    const BASE: &str = "did=10000\nkey=EsrtdeaInabcPQM0\nmac=8C:BE:BE:AA:BB:59\nmodel=a.b.c\n";

    #[test]
    fn vendor_example_parses() {
        let d = parse(GOOD).unwrap();
        assert_eq!(d.did, 10000);
        assert_eq!(d.key.as_bytes(), b"EsrtdeaInabcPQM0");
        assert_eq!(d.mac, "8C:BE:BE:AA:BB:59");
        assert_eq!(d.vendor, "coolvendor");
        assert_eq!(d.model, "coolvendor.prod.v1");
    }

    #[test]
    fn whitespace_crlf_unknown_keys_and_duplicates() {
        let text =
            "  did = 5 \r\n\r\n\tkey\t=\tEsrtdeaInabcPQM0  \r\nfoo=bar\r\n  # indented comment\r\n\
                    mac=aa:bb:cc:dd:ee:ff\r\nmodel=x.y.z\r\ndid=1\r\n";
        let d = parse(text).unwrap();
        assert_eq!(d.did, 1, "last did= wins");
        assert_eq!(d.mac, "AA:BB:CC:DD:EE:FF");
        assert_eq!(d.vendor, "");
        assert_eq!(d.model, "x.y.z");
    }

    #[test]
    fn did_zero_and_max_are_valid() {
        let d = parse(&BASE.replace("did=10000", "did=0")).unwrap();
        assert_eq!(d.did, 0);
        let d = parse(&BASE.replace("did=10000", "did=4294967295")).unwrap();
        assert_eq!(d.did, u32::MAX);
    }

    #[test]
    fn missing_keys_are_named() {
        assert_eq!(err(""), (0, "missing did=".into()));
        assert_eq!(
            parse("").unwrap_err().to_string(),
            "device.conf: missing did="
        );
        assert_eq!(err("did=1\n"), (0, "missing key=".into()));
        assert_eq!(
            err("did=1\nkey=EsrtdeaInabcPQM0\n"),
            (0, "missing mac=".into())
        );
        assert_eq!(
            err("did=1\nkey=EsrtdeaInabcPQM0\nmac=00:11:22:33:44:55\nvendor=v\n"),
            (0, "missing model=".into())
        );
    }

    #[test]
    fn line_without_equals() {
        let (line, reason) = err("did=1\n\n# c\nkey EsrtdeaInabcPQM0\n");
        assert_eq!((line, reason.as_str()), (4, "expected key=value"));
    }

    #[test]
    fn bad_key_reports_line_and_length_but_not_the_key() {
        let text = "did=1\n# c\nkey=EsrtdeaInabc\nmac=00:11:22:33:44:55\nmodel=m\n";
        let e = parse(text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device.conf:3: key must be 16 characters (got 12)"
        );
        let text = BASE.replace("EsrtdeaInabcPQM0", "EsrtdeaInabcPQM\u{e9}");
        assert_eq!(err(&text), (2, "key must be printable ASCII".into()));
        let text = BASE.replace("EsrtdeaInabcPQM0", "EsrtdeaInabcPQM\u{1}");
        assert_eq!(err(&text), (2, "key must be printable ASCII".into()));
        let text = BASE.replace("EsrtdeaInabcPQM0", "EsrtdeaInabcPQM0X");
        let (_, reason) = err(&text);
        assert!(!reason.contains("Esrt"), "{reason}");
    }

    #[test]
    fn bad_did() {
        for bad in ["", "-1", "+5", "4294967296", "0x10", "1 2", "abc"] {
            let text = BASE.replace("did=10000", &format!("did={bad}"));
            let (line, reason) = err(&text);
            assert_eq!(line, 1, "{bad}");
            assert!(
                reason.starts_with("did must be a decimal number"),
                "{reason}"
            );
        }
    }

    #[test]
    fn bad_mac() {
        for bad in [
            "",
            "00:11:22:33:44",
            "00:11:22:33:44:55:66",
            "00-11-22-33-44-55",
            "0g:11:22:33:44:55",
            "001:1:22:33:44:55",
        ] {
            let text = BASE.replace("mac=8C:BE:BE:AA:BB:59", &format!("mac={bad}"));
            let (line, reason) = err(&text);
            assert_eq!(line, 3, "{bad}");
            assert!(reason.starts_with("mac must look like"), "{reason}");
        }
    }

    #[test]
    fn model_and_vendor_limits() {
        let m23 = "m".repeat(23);
        assert!(parse(&BASE.replace("model=a.b.c", &format!("model={m23}"))).is_ok());
        let text = BASE.replace("model=a.b.c", &format!("model={m23}x"));
        assert_eq!(
            err(&text),
            (4, "model must be 1 to 23 characters (got 24)".into())
        );
        let text = BASE.replace("model=a.b.c", "model=");
        assert_eq!(
            err(&text),
            (4, "model must be 1 to 23 characters (got 0)".into())
        );
        let text = BASE.replace("model=a.b.c", "model=a b");
        assert_eq!(err(&text).0, 4);

        let v16 = "v".repeat(16);
        let d = parse(&format!("{BASE}vendor={v16}\n")).unwrap();
        assert_eq!(d.vendor, v16);
        assert_eq!(parse(&format!("{BASE}vendor=\n")).unwrap().vendor, "");
        assert_eq!(
            err(&format!("{BASE}vendor={v16}v\n")),
            (5, "vendor must be at most 16 characters (got 17)".into())
        );
    }

    #[test]
    fn debug_hides_the_key() {
        let d = parse(GOOD).unwrap();
        let s = format!("{d:?}");
        assert!(!s.contains("EsrtdeaInabcPQM0"), "{s}");
        assert!(s.contains("***"));
    }

    #[test]
    fn rewrite_keeps_other_lines_byte_for_byte() {
        let out = rewrite_didkey(GOOD, 123456, "AAAABBBBCCCCDDDD");
        let want = GOOD
            .replace("did=10000", "did=123456")
            .replace("key=EsrtdeaInabcPQM0", "key=AAAABBBBCCCCDDDD");
        assert_eq!(out, want);
        let d = parse(&out).unwrap();
        assert_eq!((d.did, d.key.as_bytes()), (123456, b"AAAABBBBCCCCDDDD"));
    }

    #[test]
    fn rewrite_replaces_duplicates_and_keeps_crlf() {
        let text = "did = 1\r\n# key=old comment\r\nkey=EsrtdeaInabcPQM0\r\nmac=00:11:22:33:44:55\r\nmodel=m\r\ndid=0";
        let out = rewrite_didkey(text, 7, "AAAABBBBCCCCDDDD");
        assert_eq!(
            out,
            "did=7\r\n# key=old comment\r\nkey=AAAABBBBCCCCDDDD\r\nmac=00:11:22:33:44:55\r\nmodel=m\r\ndid=7"
        );
        assert_eq!(parse(&out).unwrap().did, 7);
    }

    #[test]
    fn rewrite_appends_when_absent() {
        let text = "mac=00:11:22:33:44:55\nmodel=m";
        let out = rewrite_didkey(text, 9, "AAAABBBBCCCCDDDD");
        assert_eq!(
            out,
            "mac=00:11:22:33:44:55\nmodel=m\ndid=9\nkey=AAAABBBBCCCCDDDD\n"
        );
        assert_eq!(parse(&out).unwrap().did, 9);
        assert_eq!(rewrite_didkey("", 2, "k"), "did=2\nkey=k\n");
        let out = rewrite_didkey("key=x\r\n", 2, "AAAABBBBCCCCDDDD");
        assert_eq!(out, "key=AAAABBBBCCCCDDDD\r\ndid=2\r\n");
    }
}
