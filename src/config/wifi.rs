//! `wifi.conf` (LOCAL_API.md §17, §8): the Wi-Fi credentials written at provisioning.
//!
//! Contract: [`parse`] reads `ssid="…"`, `psk="…"`, `key_mgmt=WPA|NONE` and `uid=<decimal>` lines into a
//! [`WifiConf`]; other lines are ignored; a key given twice takes its last line. `ssid` and `psk` values
//! are in double quotes with `\"` and `\\` as the only escapes; `key_mgmt` and `uid` may be quoted or
//! not. [`render`] writes a file that `parse` reads back to the same value. Errors name `wifi.conf`
//! and the line and never contain the password; `Debug` shows the password as `***`.
//! Pure: no I/O, no panics.

use std::fmt;

use super::{shown, ConfError};

const FILE: &str = "wifi.conf";

#[derive(Clone, PartialEq, Eq)]
pub struct WifiConf {
    pub ssid: String,
    /// The passphrase; "" for an open network.
    pub psk: String,
    /// `WPA`, or `NONE` for an open network.
    pub key_mgmt: String,
    pub uid: Option<u64>,
}

impl WifiConf {
    /// Credentials as provisioning gives them; `key_mgmt` follows from whether there is a password.
    pub fn new(ssid: &str, psk: &str, uid: Option<u64>) -> WifiConf {
        WifiConf {
            ssid: ssid.to_string(),
            psk: psk.to_string(),
            key_mgmt: key_mgmt_for(psk).to_string(),
            uid,
        }
    }
}

impl fmt::Debug for WifiConf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let psk = if self.psk.is_empty() { "" } else { "***" };
        f.debug_struct("WifiConf")
            .field("ssid", &self.ssid)
            .field("psk", &psk)
            .field("key_mgmt", &self.key_mgmt)
            .field("uid", &self.uid)
            .finish()
    }
}

fn key_mgmt_for(psk: &str) -> &'static str {
    if psk.is_empty() {
        "NONE"
    } else {
        "WPA"
    }
}

/// Parse `wifi.conf`. Without a `key_mgmt=` line, it follows from the password.
pub fn parse(text: &str) -> Result<WifiConf, ConfError> {
    let mut ssid = None;
    let mut psk = None;
    let mut key_mgmt = None;
    let mut uid = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "ssid" => {
                let s = quoted(v, n, "ssid")?;
                if s.is_empty() {
                    return Err(ConfError::new(FILE, n, "ssid is empty"));
                }
                ssid = Some(s);
            }
            "psk" => psk = Some(quoted(v, n, "psk")?),
            "key_mgmt" => {
                let m = maybe_quoted(v, n, "key_mgmt")?;
                if m != "WPA" && m != "NONE" {
                    let why = format!("key_mgmt must be WPA or NONE (got {})", shown(&m));
                    return Err(ConfError::new(FILE, n, why));
                }
                key_mgmt = Some(m);
            }
            "uid" => {
                let u = maybe_quoted(v, n, "uid")?;
                let ok = !u.is_empty() && u.bytes().all(|b| b.is_ascii_digit());
                match crate::cli::uint::<u64>(&u) {
                    Some(x) if ok => uid = Some(x),
                    _ => {
                        let why = format!("uid must be a decimal number (got {})", shown(&u));
                        return Err(ConfError::new(FILE, n, why));
                    }
                }
            }
            _ => {}
        }
    }
    let ssid = ssid.ok_or_else(|| ConfError::new(FILE, 0, "missing ssid="))?;
    let psk = psk.unwrap_or_default();
    let key_mgmt = key_mgmt.unwrap_or_else(|| key_mgmt_for(&psk).to_string());
    Ok(WifiConf {
        ssid,
        psk,
        key_mgmt,
        uid,
    })
}

/// A value that must be in double quotes. The reasons never quote the value, since it may be the password.
fn quoted(v: &str, n: usize, key: &str) -> Result<String, ConfError> {
    let err = |why: &str| ConfError::new(FILE, n, format!("{key}: {why}"));
    let Some(body) = v.strip_prefix('"') else {
        return Err(err("value must be in double quotes"));
    };
    let mut out = String::new();
    let mut chars = body.chars();
    loop {
        match chars.next() {
            None => return Err(err("unterminated quote")),
            Some('"') => break,
            Some('\\') => match chars.next() {
                Some(c @ ('"' | '\\')) => out.push(c),
                _ => return Err(err("bad escape (only \\\" and \\\\ are allowed)")),
            },
            // render() cannot write these, and provisioning refuses them (LOCAL_API.md §8).
            Some('\0' | '\r') => return Err(err("illegal character")),
            Some(c) => out.push(c),
        }
    }
    if !chars.as_str().trim().is_empty() {
        return Err(err("text after the closing quote"));
    }
    Ok(out)
}

fn maybe_quoted(v: &str, n: usize, key: &str) -> Result<String, ConfError> {
    if v.starts_with('"') {
        quoted(v, n, key)
    } else {
        Ok(v.to_string())
    }
}

fn push_quoted(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// The file content for `w`. `key_mgmt` is written as `NONE` for an empty password and `WPA` otherwise;
/// `uid=` only when there is one. The caller has refused NUL, CR and LF in ssid and password
/// (LOCAL_API.md §8), which this format cannot carry.
pub fn render(w: &WifiConf) -> String {
    let mut out = String::with_capacity(w.ssid.len() + w.psk.len() + 64);
    out.push_str("ssid=");
    push_quoted(&mut out, &w.ssid);
    out.push_str("\npsk=");
    push_quoted(&mut out, &w.psk);
    out.push_str("\nkey_mgmt=");
    out.push_str(key_mgmt_for(&w.psk));
    out.push('\n');
    if let Some(uid) = w.uid {
        out.push_str(&format!("uid={uid}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(text: &str) -> (usize, String) {
        let e = parse(text).unwrap_err();
        assert_eq!(e.file, "wifi.conf");
        (e.line, e.reason)
    }

    #[test]
    fn typical_file() {
        let w = parse("ssid=\"home net\"\npsk=\"s3cr3t pass\"\nkey_mgmt=WPA\nuid=1234567890\n")
            .unwrap();
        assert_eq!(
            w,
            WifiConf::new("home net", "s3cr3t pass", Some(1234567890))
        );
    }

    #[test]
    fn escapes_quotes_other_lines_and_defaults() {
        let text =
            "# written by a helper\r\nctrl_interface=/var/run\r\n  ssid = \"a\\\"b\\\\c\"  \r\n\
                    network={\r\nkey_mgmt=\"NONE\"\r\nuid=\"42\"\r\n";
        let w = parse(text).unwrap();
        assert_eq!(w.ssid, "a\"b\\c");
        assert_eq!(w.psk, "");
        assert_eq!(w.key_mgmt, "NONE");
        assert_eq!(w.uid, Some(42));
        // No key_mgmt line: it follows from the password.
        assert_eq!(parse("ssid=\"x\"\npsk=\"p\"").unwrap().key_mgmt, "WPA");
        assert_eq!(parse("ssid=\"x\"").unwrap().key_mgmt, "NONE");
        // The last of a repeated key wins.
        assert_eq!(parse("ssid=\"x\"\nssid=\"y\"").unwrap().ssid, "y");
        // '=' inside a quoted value.
        assert_eq!(parse("ssid=\"a=b\"").unwrap().ssid, "a=b");
    }

    #[test]
    fn missing_or_empty_ssid() {
        assert_eq!(err(""), (0, "missing ssid=".into()));
        assert_eq!(
            parse("psk=\"x\"\n").unwrap_err().to_string(),
            "wifi.conf: missing ssid="
        );
        assert_eq!(err("\nssid=\"\"\n"), (2, "ssid is empty".into()));
    }

    #[test]
    fn quoting_errors_carry_the_line_and_not_the_password() {
        let (line, reason) = err("ssid=\"x\"\npsk=\"secretpass\n");
        assert_eq!((line, reason.as_str()), (2, "psk: unterminated quote"));
        let (line, reason) = err("ssid=\"x\"\n\npsk=\"secret\\npass\"\n");
        assert_eq!(line, 3);
        assert!(reason.starts_with("psk: bad escape"), "{reason}");
        assert!(!reason.contains("secret"));
        assert_eq!(
            err("psk=\"p\"\nssid=home\n"),
            (2, "ssid: value must be in double quotes".into())
        );
        assert_eq!(
            err("ssid=\"a\"b\n"),
            (1, "ssid: text after the closing quote".into())
        );
        assert_eq!(
            err("ssid=\"a\\"),
            (
                1,
                "ssid: bad escape (only \\\" and \\\\ are allowed)".into()
            )
        );
        assert_eq!(err("ssid=\"a\0b\""), (1, "ssid: illegal character".into()));
        assert_eq!(err("ssid=\"a\rb\""), (1, "ssid: illegal character".into()));
    }

    #[test]
    fn bad_key_mgmt_and_uid() {
        assert_eq!(
            err("ssid=\"x\"\nkey_mgmt=WPA-PSK\n"),
            (2, "key_mgmt must be WPA or NONE (got \"WPA-PSK\")".into())
        );
        for bad in ["", "-1", "12a", "18446744073709551616", "\"1 2\""] {
            let (line, reason) = err(&format!("ssid=\"x\"\nkey_mgmt=WPA\nuid={bad}\n"));
            assert_eq!(line, 3, "{bad}");
            assert!(
                reason.starts_with("uid must be a decimal number"),
                "{reason}"
            );
        }
        assert_eq!(err("ssid=\"x\"\nuid=\"5\n").0, 2);
    }

    #[test]
    fn render_exact_bytes() {
        let w = WifiConf::new("my \"net\"", "pa\\ss", Some(7));
        assert_eq!(
            render(&w),
            "ssid=\"my \\\"net\\\"\"\npsk=\"pa\\\\ss\"\nkey_mgmt=WPA\nuid=7\n"
        );
        let open = WifiConf::new("cafe", "", None);
        assert_eq!(render(&open), "ssid=\"cafe\"\npsk=\"\"\nkey_mgmt=NONE\n");
    }

    #[test]
    fn debug_hides_the_password() {
        let w = WifiConf::new("home", "hunter2hunter2", Some(1));
        let s = format!("{w:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("***") && s.contains("home"), "{s}");
    }

    proptest! {
        #[test]
        fn render_then_parse_is_identity(
            ssid in "[^\0\r\n]{1,40}",
            psk in "[^\0\r\n]{0,70}",
            uid in proptest::option::of(any::<u64>()),
        ) {
            let w = WifiConf::new(&ssid, &psk, uid);
            prop_assert_eq!(parse(&render(&w)).unwrap(), w);
        }

        #[test]
        fn parse_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }
    }
}
