//! Provisioning parameters (LOCAL_API.md §8): the one validation shared by the three paths (LAN
//! `miIO.config_router`, BLE on 54323, QR on 54322), with the exact refusal reasons of the L§8 table.
//! Pure: a JSON value in, checked parameters or a reason out.

use core::fmt;

use serde_json::Value;

use crate::config::country::valid_country;
use crate::proto::helper::valid_tz;

/// Checked provisioning parameters. Debug hides the password and the bind key.
#[derive(Clone, PartialEq, Eq)]
pub struct Params {
    pub ssid: String,
    pub passwd: String,
    /// None when absent or 0 (D18: keep the previous uid, leave it out of `_otc.info`).
    pub uid: Option<u64>,
    pub country: Option<String>,
    pub tz: Option<String>,
    pub bind_key: Option<String>,
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Params")
            .field("ssid", &self.ssid)
            .field("uid", &self.uid)
            .field("country", &self.country)
            .field("tz", &self.tz)
            .finish_non_exhaustive()
    }
}

fn bad_chars(s: &str) -> bool {
    s.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n')
}

/// Validates `params` of `miIO.config_router` / `local.ble.config_router`. The error is the
/// reason of the L§8 table, used as the -33020 message and in the log line of an `["ERROR"]`.
pub fn parse(params: Option<&Value>) -> Result<Params, String> {
    let Some(Value::Object(p)) = params else {
        return Err("params not an object.".into());
    };
    let ssid = match p.get("ssid") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("ssid not found.".into()),
    };
    if ssid.len() > 32 {
        return Err("ssid too long.".into());
    }
    let passwd = match p.get("passwd") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("illegal character in ssid or passwd.".into()),
    };
    if passwd.len() > 64 {
        return Err("passwd too long.".into());
    }
    if bad_chars(&ssid) || bad_chars(&passwd) {
        return Err("illegal character in ssid or passwd.".into());
    }
    let uid = match p.get("uid") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(u) => Some(u),
            None => return Err("uid not found, or uid not int.".into()),
        },
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            match crate::cli::uint::<u64>(s) {
                Some(u) => Some(u),
                None => return Err("uid not found, or uid not int.".into()),
            }
        }
        Some(_) => return Err("uid not found, or uid not int.".into()),
    }
    .filter(|&u| u != 0);
    // `country_domain`, or `cc` when that is absent.
    let country = match p.get("country_domain").or_else(|| p.get("cc")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            valid_country(s)?;
            Some(s.clone())
        }
        Some(_) => return Err("illegal country domain.".into()),
    };
    let tz = match p.get("tz") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if valid_tz(s) => Some(s.clone()),
        Some(_) => return Err("illegal tz.".into()),
    };
    let bind_key = match p.get("bind_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if s.len() <= 64 && s.bytes().all(|b| (0x20..0x7f).contains(&b)) => {
            Some(s.clone())
        }
        Some(_) => return Err("illegal bind_key.".into()),
    };
    Ok(Params {
        ssid,
        passwd,
        uid,
        country,
        tz,
        bind_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reason(v: Value) -> String {
        parse(Some(&v)).unwrap_err()
    }

    #[test]
    fn good_parameters() {
        let p = parse(Some(&json!({
            "ssid": "home", "passwd": "pw12345678", "uid": "1234", "country_domain": "de",
            "tz": "Europe/Berlin", "bind_key": "abc", "config_type": "app", "gmt_offset": 3600
        })))
        .unwrap();
        assert_eq!(p.ssid, "home");
        assert_eq!(p.uid, Some(1234));
        assert_eq!(p.country.as_deref(), Some("de"));
        assert_eq!(p.tz.as_deref(), Some("Europe/Berlin"));
        let q = parse(Some(&json!({"ssid": "x", "uid": 0, "cc": "us"}))).unwrap();
        assert_eq!(q.uid, None, "D18: uid 0 keeps the previous one");
        assert_eq!(q.country.as_deref(), Some("us"));
        assert_eq!(q.passwd, "");
        assert!(!format!("{p:?}").contains("pw12345678"));
    }

    #[test]
    fn refusal_reasons_of_the_table() {
        assert_eq!(
            parse(Some(&json!([1]))).unwrap_err(),
            "params not an object."
        );
        assert_eq!(parse(None).unwrap_err(), "params not an object.");
        assert_eq!(reason(json!({"passwd": "x"})), "ssid not found.");
        assert_eq!(reason(json!({"ssid": ""})), "ssid not found.");
        assert_eq!(reason(json!({"ssid": "a".repeat(33)})), "ssid too long.");
        assert!(parse(Some(&json!({"ssid": "a".repeat(32)}))).is_ok());
        assert_eq!(
            reason(json!({"ssid": "a", "passwd": "p".repeat(65)})),
            "passwd too long."
        );
        assert_eq!(
            reason(json!({"ssid": "a\nb"})),
            "illegal character in ssid or passwd."
        );
        assert_eq!(
            reason(json!({"ssid": "a", "passwd": "x\u{0}"})),
            "illegal character in ssid or passwd."
        );
        assert_eq!(
            reason(json!({"ssid": "a", "uid": "12a"})),
            "uid not found, or uid not int."
        );
        assert_eq!(
            reason(json!({"ssid": "a", "uid": -1})),
            "uid not found, or uid not int."
        );
        assert_eq!(
            reason(json!({"ssid": "a", "country_domain": "abcdefgh"})),
            "country domain too long: 8 >= 8"
        );
        assert_eq!(
            reason(json!({"ssid": "a", "cc": "D1"})),
            "illegal country domain."
        );
        assert_eq!(
            reason(json!({"ssid": "a", "tz": "../../etc/passwd"})),
            "illegal tz."
        );
        assert_eq!(
            reason(json!({"ssid": "a", "bind_key": "k".repeat(65)})),
            "illegal bind_key."
        );
        assert_eq!(
            reason(json!({"ssid": "a", "bind_key": "caf\u{e9}"})),
            "illegal bind_key."
        );
    }
}
