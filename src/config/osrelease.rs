//! `/etc/os-release` (LOCAL_API.md §17, §14): the firmware version the daemon reports as `fw_ver`.
//!
//! Contract: [`fw_version`] finds `<VENDOR>_VERSION=` (VENDOR = `device.conf` `vendor`, upper-cased) and
//! returns its value with one pair of surrounding quotes removed, or `None`. The value is reported
//! as it is; [`version_rule_ok`] says whether it keeps the `x.y.z_nnnn` rule (L§14),
//! which the daemon checks once at start-up for a warning. Pure: no I/O, no panics.

/// The value of `<VENDOR>_VERSION=` in os-release text. If the key appears twice the last line wins,
/// as a shell sourcing the file would see it. `None` when the vendor is empty, the key is absent,
/// or the value is empty.
pub fn fw_version(text: &str, vendor: &str) -> Option<String> {
    if vendor.is_empty() {
        return None;
    }
    let want = format!("{}_VERSION", vendor.to_ascii_uppercase());
    let mut found = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim() == want {
            found = Some(unquote(v.trim()));
        }
    }
    found.filter(|v| !v.is_empty()).map(str::to_string)
}

/// L§14: `x.y.z_nnnn`, three dot-separated decimal numbers (Xiaomi's part), an
/// underscore, and exactly four digits (the maker's, strictly increasing from one release to the
/// next), e.g. `2.1.1_9527`.
pub fn version_rule_ok(v: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some((xyz, n)) = v.split_once('_') else {
        return false;
    };
    let mut parts = xyz.split('.');
    n.len() == 4
        && digits(n)
        && (0..3).all(|_| parts.next().is_some_and(digits))
        && parts.next().is_none()
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_rule() {
        for good in ["2.1.1_9527", "0.0.0_0000", "10.20.300_0001"] {
            assert!(version_rule_ok(good), "{good}");
        }
        for bad in [
            "",
            "2.1.1",
            "2.1_9527",
            "2.1.1.1_9527",
            "2.1.1_952",
            "2.1.1_95270",
            "2.1.1_95a7",
            "2..1_9527",
            "a.b.c_9527",
            "2.1.1-9527",
            "2.1.1_9527_1",
            " 2.1.1_9527",
            "2.1.1_+527",
        ] {
            assert!(!version_rule_ok(bad), "{bad}");
        }
    }

    #[test]
    fn vendor_example() {
        let text = "NAME=\"Buildroot\"\nVERSION_ID=2024.02\nXIAOMI_VERSION=2.1.1_9527\n";
        assert_eq!(fw_version(text, "xiaomi").as_deref(), Some("2.1.1_9527"));
        assert_eq!(fw_version(text, "XiaoMi").as_deref(), Some("2.1.1_9527"));
    }

    #[test]
    fn quotes_and_whitespace() {
        assert_eq!(
            fw_version("COOL_VERSION=\"1.2.3_0001\"\n", "cool").as_deref(),
            Some("1.2.3_0001")
        );
        assert_eq!(
            fw_version("  COOL_VERSION = '1.2.3_0002'  \r\n", "cool").as_deref(),
            Some("1.2.3_0002")
        );
        // Unbalanced quotes are kept as they are.
        assert_eq!(
            fw_version("COOL_VERSION=\"1.2.3\n", "cool").as_deref(),
            Some("\"1.2.3")
        );
    }

    #[test]
    fn absent_empty_or_other_vendor() {
        let text = "VERSION=\"14.04\"\nOTHER_VERSION=9.9.9_0001\nCOOL_VERSION=\n";
        assert_eq!(fw_version(text, "cool"), None);
        assert_eq!(fw_version(text, "nope"), None);
        assert_eq!(fw_version(text, ""), None);
        // `VERSION=` must not match vendor "" or a suffix of another key.
        assert_eq!(fw_version("XCOOL_VERSION=1\n", "cool"), None);
        assert_eq!(fw_version("COOL_VERSION=\"\"\n", "cool"), None);
    }

    #[test]
    fn last_line_wins() {
        let text = "COOL_VERSION=1.0.0_0001\nCOOL_VERSION=1.0.0_0002\n";
        assert_eq!(fw_version(text, "cool").as_deref(), Some("1.0.0_0002"));
    }
}
