//! JSON-RPC message shapes of the miio world (PROTOCOL.md §3, LOCAL_API.md §3–§5).
//!
//! Contract: [`parse_object`] maps raw bytes to an object or to the -32700/-32600 error of L§3;
//! [`classify`] tells requests from replies as L§4.1 does; [`rewrite_id`] swaps the value of the
//! top-level `id` member in the raw text and keeps every other byte (D5: messages are forwarded
//! verbatim except the id); the builders emit compact JSON with members in the vendor order.
//! Nothing here panics on any input.

use core::fmt;

use serde_json::{Map, Value};

/// Why a local message could not be taken (LOCAL_API.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcError {
    /// Not JSON: answered with -32700 and the connection is closed.
    Parse,
    /// JSON, but not an object: answered with -32600; the connection stays open.
    NotObject,
}

impl RpcError {
    pub fn code(self) -> i64 {
        match self {
            RpcError::Parse => -32700,
            RpcError::NotObject => -32600,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            RpcError::Parse => "Parse error",
            RpcError::NotObject => "Invalid Request",
        }
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.code())
    }
}

impl std::error::Error for RpcError {}

/// One complete JSON value as the splitter cut it, which must be an object.
pub fn parse_object(raw: &[u8]) -> Result<Map<String, Value>, RpcError> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(RpcError::NotObject),
        Err(_) => Err(RpcError::Parse),
    }
}

/// What a message is, by its members (P§3, LOCAL_API.md §4.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind<'a> {
    /// Has a string `method`; without `id` it is a notification.
    Request {
        method: &'a str,
        id: Option<&'a Value>,
    },
    /// No `method`, an `id`, and `result` or `error`.
    Reply { id: &'a Value },
    /// Anything else (including a `method` that is not a string).
    Other,
}

pub fn classify(obj: &Map<String, Value>) -> Kind<'_> {
    match (obj.get("method"), obj.get("id")) {
        (Some(Value::String(method)), id) => Kind::Request { method, id },
        (None, Some(id)) if obj.contains_key("result") || obj.contains_key("error") => {
            Kind::Reply { id }
        }
        _ => Kind::Other,
    }
}

/// The id as the u32 of P§3: a non-negative integer that fits.
pub fn id_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// Replaces the value of every top-level `id` member of the JSON object `text` with `new_id`,
/// keeping all other bytes. None if `text` is not an object or has no top-level `id`.
///
/// The text is expected to have parsed already; this scanner only finds member boundaries. Keys are
/// compared after unescaping, as a parser sees them (`"\u0069d"` is `id`). Every top-level `id` is
/// replaced, so no parser (first-wins or last-wins) can see the old one.
pub fn rewrite_id(text: &str, new_id: u64) -> Option<String> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut spans = Vec::new();
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            let key_end = skip_string(b, i)?;
            let key = b.get(i..key_end)?;
            i = skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(b, i + 1);
            let end = skip_value(b, start)?;
            if key_is_id(key) {
                spans.push((start, end));
            }
            i = skip_ws(b, end);
            match b.get(i) {
                Some(b',') => i = skip_ws(b, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    if skip_ws(b, i) != b.len() || spans.is_empty() {
        return None;
    }
    let id = new_id.to_string();
    let mut out = String::with_capacity(text.len() + id.len());
    let mut last = 0;
    for (start, end) in spans {
        // Spans start and end at ASCII bytes, so these are char boundaries; get() keeps it panic-free.
        out.push_str(text.get(last..start)?);
        out.push_str(&id);
        last = end;
    }
    out.push_str(text.get(last..)?);
    Some(out)
}

/// Whitespace between JSON tokens; NUL too, since texts may come with a terminator (D3).
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\r' | b'\n' | 0)) {
        i += 1;
    }
    i
}

/// The end (exclusive) of the string starting at `i`.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// The end (exclusive) of the value starting at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            // Nesting by depth only: the text has parsed, so brackets match.
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(&c) = b.get(j) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n' | 0) {
                    break;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

fn key_is_id(raw: &[u8]) -> bool {
    if raw == b"\"id\"" {
        return true;
    }
    // Escaped spellings of "id" (rare, but a parser accepts them).
    raw.contains(&b'\\') && serde_json::from_slice::<String>(raw).is_ok_and(|k| k == "id")
}

/// A JSON string literal with proper escapes.
fn json_str(s: &str) -> String {
    Value::from(s).to_string()
}

/// `{"id":N,"error":{"code":C,"message":"M"}}`, without the id member when there is none (L§3).
pub fn error_reply(id: Option<&Value>, code: i64, message: &str) -> String {
    let err = format!(
        r#""error":{{"code":{code},"message":{}}}}}"#,
        json_str(message)
    );
    match id {
        Some(id) => format!(r#"{{"id":{id},{err}"#),
        None => format!("{{{err}"),
    }
}

/// `{"id":N,"result":R}`.
pub fn result_reply(id: &Value, result: &Value) -> String {
    format!(r#"{{"id":{id},"result":{result}}}"#)
}

/// The broadcast `{"method":"local.status","params":"E"}` (LOCAL_API.md §6), compact (L§3).
pub fn local_status(event: &str) -> String {
    format!(
        r#"{{"method":"local.status","params":{}}}"#,
        json_str(event)
    )
}

/// `{"id":N,"method":"M","params":P}`, or without the id member (a notification).
pub fn request(id: Option<&Value>, method: &str, params: &Value) -> String {
    let rest = format!(r#""method":{},"params":{params}}}"#, json_str(method));
    match id {
        Some(id) => format!(r#"{{"id":{id},{rest}"#),
        None => format!("{{{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(s: &str) -> Map<String, Value> {
        parse_object(s.as_bytes()).unwrap()
    }

    #[test]
    fn parse_errors() {
        assert_eq!(parse_object(b"{\"a\":}"), Err(RpcError::Parse));
        assert_eq!(parse_object(b"garbage"), Err(RpcError::Parse));
        assert_eq!(parse_object(b"{\"a\":\"\xff\"}"), Err(RpcError::Parse));
        assert_eq!(parse_object(b"{}{}"), Err(RpcError::Parse));
        assert_eq!(parse_object(b""), Err(RpcError::Parse));
        assert_eq!(parse_object(b"[1]"), Err(RpcError::NotObject));
        assert_eq!(parse_object(b"\"s\""), Err(RpcError::NotObject));
        assert_eq!(parse_object(b"12"), Err(RpcError::NotObject));
        assert_eq!(parse_object(b" {\"a\":1}\n").unwrap()["a"], json!(1));
        // A deeply nested value is refused, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert_eq!(parse_object(deep.as_bytes()), Err(RpcError::Parse));
        assert_eq!(
            (RpcError::Parse.code(), RpcError::Parse.message()),
            (-32700, "Parse error")
        );
        assert_eq!(
            (RpcError::NotObject.code(), RpcError::NotObject.message()),
            (-32600, "Invalid Request")
        );
    }

    #[test]
    fn classify_messages() {
        let m = obj(r#"{"id":3,"method":"miIO.info","params":[]}"#);
        assert_eq!(
            classify(&m),
            Kind::Request {
                method: "miIO.info",
                id: Some(&json!(3))
            }
        );
        let m = obj(r#"{"method":"props","params":{}}"#);
        assert_eq!(
            classify(&m),
            Kind::Request {
                method: "props",
                id: None
            }
        );
        let m = obj(r#"{"id":3,"result":["ok"]}"#);
        assert_eq!(classify(&m), Kind::Reply { id: &json!(3) });
        let m = obj(r#"{"error":{"code":-1},"id":"x"}"#);
        assert_eq!(classify(&m), Kind::Reply { id: &json!("x") });
        for s in [
            r#"{"id":3}"#,
            r#"{"result":1}"#,
            r#"{"method":5,"id":1,"result":1}"#,
            r#"{"method":null,"id":1}"#,
            "{}",
        ] {
            assert_eq!(classify(&obj(s)), Kind::Other, "{s}");
        }
    }

    #[test]
    fn ids() {
        assert_eq!(id_u32(&json!(0)), Some(0));
        assert_eq!(id_u32(&json!(4294967295u64)), Some(u32::MAX));
        assert_eq!(id_u32(&json!(4294967296u64)), None);
        assert_eq!(id_u32(&json!(-1)), None);
        assert_eq!(id_u32(&json!(1.0)), None);
        assert_eq!(id_u32(&json!("1")), None);
        assert_eq!(id_u32(&Value::Null), None);
    }

    #[test]
    fn rewrite_top_level_id_only() {
        let cases = [
            (r#"{"id":5,"method":"x"}"#, r#"{"id":77,"method":"x"}"#),
            // Nested ids and ids inside strings stay.
            (
                r#"{"params":{"id":1,"a":[{"id":2}]},"s":"\"id\":3","id":4}"#,
                r#"{"params":{"id":1,"a":[{"id":2}]},"s":"\"id\":3","id":77}"#,
            ),
            (r#"{"x":"id","id":"old"}"#, r#"{"x":"id","id":77}"#),
            // Spacing, member order, big numbers and unknown members are kept byte for byte.
            (
                "{ \"method\" : \"a\" ,\n \"id\" :\t12 , \"big\": 123456789012345678901234567890, \"f\":1.50 }",
                "{ \"method\" : \"a\" ,\n \"id\" :\t77 , \"big\": 123456789012345678901234567890, \"f\":1.50 }",
            ),
            (r#"{"id":-3.5e2}"#, r#"{"id":77}"#),
            (r#"{"id":{"a":"}"},"b":1}"#, r#"{"id":77,"b":1}"#),
            (r#"{"id":[1,[2]],"b":1}"#, r#"{"id":77,"b":1}"#),
            (r#"{"id":null}"#, r#"{"id":77}"#),
            // Escaped keys: "\u0069d" is "id" to any parser; "i\"d" is not.
            (r#"{"\u0069d":1,"i\"d":2}"#, r#"{"\u0069d":77,"i\"d":2}"#),
            // Duplicates: all are replaced.
            (r#"{"id":1,"id":2}"#, r#"{"id":77,"id":77}"#),
            // Unicode around the id and a trailing NUL or newline.
            ("{\"ü\":\"é\",\"id\":9}\n", "{\"ü\":\"é\",\"id\":77}\n"),
            ("{\"id\":9}\0", "{\"id\":77}\0"),
        ];
        for (input, want) in cases {
            assert_eq!(rewrite_id(input, 77).as_deref(), Some(want), "{input}");
            // The result still parses, with the new id and everything else equal.
            if !input.contains("\"id\":1,\"id\"") {
                let mut a = obj(input.trim_end_matches('\0'));
                let b = obj(want.trim_end_matches('\0'));
                a.insert("id".into(), json!(77));
                assert_eq!(a, b);
            }
        }
        assert_eq!(
            rewrite_id(r#"{"id":1}"#, u64::MAX).as_deref(),
            Some(r#"{"id":18446744073709551615}"#)
        );
    }

    #[test]
    fn rewrite_refuses() {
        for s in [
            r#"{"method":"x","params":{"id":1}}"#,
            r#"{"s":"\"id\":1"}"#,
            "{}",
            "[{\"id\":1}]",
            "\"id\"",
            "",
            "{\"id\":1",
            "{\"id\"1}",
            "{\"id\":}",
            "{\"id\":1}x",
            "{\"id\":1,}",
            "{\"id\":\"unterminated}",
            "{\"a\":[1,2}",
        ] {
            assert_eq!(rewrite_id(s, 1), None, "{s}");
        }
    }

    #[test]
    fn builders() {
        assert_eq!(
            error_reply(Some(&json!(7)), -30011, "OT server disconnected"),
            r#"{"id":7,"error":{"code":-30011,"message":"OT server disconnected"}}"#
        );
        assert_eq!(
            error_reply(None, -32700, "Parse error"),
            r#"{"error":{"code":-32700,"message":"Parse error"}}"#
        );
        assert_eq!(
            error_reply(Some(&json!("a\"b")), -1, "x\"y\\z\n"),
            r#"{"id":"a\"b","error":{"code":-1,"message":"x\"y\\z\n"}}"#
        );
        assert_eq!(
            result_reply(&json!(12), &json!(["on"])),
            r#"{"id":12,"result":["on"]}"#
        );
        assert_eq!(
            result_reply(&json!(1), &json!({"b":1,"a":[null]})),
            r#"{"id":1,"result":{"b":1,"a":[null]}}"#
        );
        assert_eq!(
            local_status("cloud_connected"),
            r#"{"method":"local.status","params":"cloud_connected"}"#
        );
        assert_eq!(
            local_status("a\"b"),
            r#"{"method":"local.status","params":"a\"b"}"#
        );
        assert_eq!(
            request(Some(&json!(1001)), "props", &json!({"ota_state":"idle"})),
            r#"{"id":1001,"method":"props","params":{"ota_state":"idle"}}"#
        );
        assert_eq!(
            request(None, "local.status", &json!("x")),
            r#"{"method":"local.status","params":"x"}"#
        );
        // Every builder output parses.
        for s in [
            error_reply(Some(&json!(1)), -1, "\u{1}\u{7f}é"),
            error_reply(None, 0, ""),
            local_status("\\"),
        ] {
            parse_object(s.as_bytes()).unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn rewrite_never_panics(s in "\\PC{0,60}", id in any::<u64>()) {
            let _ = rewrite_id(&s, id);
        }

        #[test]
        fn rewrite_matches_parser(keys in proptest::collection::vec("[a-z]{0,3}|id", 0..6),
                                  id in any::<u32>()) {
            // Objects with unique keys: rewrite_id succeeds exactly when the parser sees an id.
            let mut m = Map::new();
            for (i, k) in keys.iter().enumerate() {
                m.insert(k.clone(), json!({"id": i, "s": "\"id\":0"}));
            }
            let text = Value::Object(m.clone()).to_string();
            let out = rewrite_id(&text, u64::from(id));
            prop_assert_eq!(out.is_some(), m.contains_key("id"));
            if let Some(out) = out {
                m.insert("id".into(), json!(id));
                prop_assert_eq!(obj(&out), m);
            }
        }
    }
}
