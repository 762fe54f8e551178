//! JSON-RPC message shapes of the miio world (PROTOCOL.md §3, LOCAL_API.md §3–§5).
//!
//! Contract: [`parse_object`] maps raw bytes to an object or to the -32700/-32600 error of L§3;
//! [`classify`] tells requests from replies as L§4.1 does; [`rewrite_id`] swaps the value of the
//! top-level `id` member in the raw text and keeps every other byte (D5: messages are forwarded
//! verbatim except the id); the builders emit compact JSON with members in the vendor order.
//! Nothing here panics on any input.

use core::fmt;
use core::ops::Range;

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
///
/// Valid JSON that a serde `Value` cannot hold (a number beyond f64 such as `1e400` or an id of 400
/// digits, nesting deeper than 128, a lone surrogate escape) is still an object here: each top-level
/// member is parsed on its own, a value that does not fit reads as `null` and a key that does not fit
/// drops its member. Callers forward the raw text, so such a message goes on byte for byte (P§3),
/// and an `id` that reads as `null` is "not an integer" (L§4.1).
pub fn parse_object(raw: &[u8]) -> Result<Map<String, Value>, RpcError> {
    match value(raw) {
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(RpcError::NotObject),
        None => parse_object_lenient(raw),
    }
}

/// The one parse of JSON text into a `Value` in this module, with `serde_json::from_slice`'s
/// verdict and value for every input (`tests::value_is_serde_json` holds them together): at most
/// 127 nested containers, strings checked as UTF-8 with surrogate escapes paired, the last of a
/// duplicated key kept, integers as `u64` (or `i64` when negative), whitespace around the value.
/// A number with a fraction or an exponent, or an integer beyond those types, is the `f64`
/// serde_json makes of it ([`float`]). serde_json's `Value` deserializer, string and number
/// readers and error positions were several KB of the board's flash that this walk replaces.
#[inline(never)]
pub fn value(raw: &[u8]) -> Option<Value> {
    let mut i = 0;
    let v = tree(raw, &mut i, 128)?;
    (skip_json_ws(raw, i) == raw.len()).then_some(v)
}

/// The value at `*i` (after whitespace), `*i` moved past it. `depth` is serde_json's remaining
/// recursion budget: a container that brings it to 0 is refused.
fn tree(b: &[u8], i: &mut usize, depth: u8) -> Option<Value> {
    *i = skip_json_ws(b, *i);
    let c = *b.get(*i)?;
    let (word, v): (&[u8], Value) = match c {
        b'{' | b'[' => return container(b, i, c, depth.checked_sub(1).filter(|&d| d > 0)?),
        b'"' => return string(b, i).map(Value::String),
        b't' => (b"true", Value::Bool(true)),
        b'f' => (b"false", Value::Bool(false)),
        b'n' => (b"null", Value::Null),
        _ => return number(b, i),
    };
    let end = *i + word.len();
    (b.get(*i..end) == Some(word)).then(|| {
        *i = end;
        v
    })
}

/// An object or an array (`open` at `*i`), its members or elements parsed with `depth`.
fn container(b: &[u8], i: &mut usize, open: u8, depth: u8) -> Option<Value> {
    let mut map = Map::new();
    let mut arr = Vec::new();
    *i = skip_json_ws(b, *i + 1);
    if b.get(*i) != Some(&(open + 2)) {
        loop {
            if open == b'{' {
                let k = string(b, i)?;
                *i = colon(b, *i)?;
                map.insert(k, tree(b, i, depth)?);
            } else {
                arr.push(tree(b, i, depth)?);
            }
            *i = skip_json_ws(b, *i);
            match *b.get(*i)? {
                b',' => *i = skip_json_ws(b, *i + 1),
                c if c == open + 2 => break,
                _ => return None,
            }
        }
    }
    *i += 1;
    Some(if open == b'{' {
        Value::Object(map)
    } else {
        Value::Array(arr)
    })
}

/// The string at `*i` (RFC 8259 §7, as [`json_string`] checks it), unescaped: None when its
/// bytes are not UTF-8 or a `\u` surrogate has no partner.
fn string(b: &[u8], i: &mut usize) -> Option<String> {
    let end = json_string(b, *i)?;
    let body = b.get(*i + 1..end - 1)?;
    *i = end;
    let mut out = Vec::with_capacity(body.len());
    let mut j = 0;
    while let Some(&c) = body.get(j) {
        j += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let e = *body.get(j)?;
        j += 1;
        let ch = match e {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(body, j)?;
                j += 4;
                let n = match hi {
                    0xD800..=0xDBFF => {
                        // A leading surrogate: the trailing one must follow at once.
                        let lo = match body.get(j..j + 2) {
                            Some(b"\\u") => hex4(body, j + 2)?,
                            _ => return None,
                        };
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return None;
                        }
                        j += 6;
                        0x1_0000 + ((hi - 0xD800) << 10 | (lo - 0xDC00))
                    }
                    n => n,
                };
                char::from_u32(n)?
            }
            // `"`, `\\` and `/` stand for themselves (json_string allowed no other escape).
            e => char::from(e),
        };
        let mut utf8 = [0u8; 4];
        out.extend_from_slice(ch.encode_utf8(&mut utf8).as_bytes());
    }
    String::from_utf8(out).ok()
}

/// The four hex digits at `j` (checked by [`json_string`]).
fn hex4(b: &[u8], j: usize) -> Option<u32> {
    b.get(j..j + 4)?.iter().try_fold(0, |n, &c| {
        let d = char::from(c).to_digit(16)?;
        Some(n << 4 | d)
    })
}

/// The number at `*i`, as serde_json reads it: an integer that fits as `u64`, or as `i64` when
/// negative (`-0` is a float there); any other as an `f64` by [`float`].
fn number(b: &[u8], i: &mut usize) -> Option<Value> {
    let start = *i;
    let end = json_number(b, start)?;
    *i = end;
    let text = b.get(start..end)?;
    let (neg, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let int = digits.iter().try_fold(0u64, |n, &d| {
        let d = u64::from(d.wrapping_sub(b'0'));
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(d)
    });
    match int {
        Some(n) if !neg => Some(Value::from(n)),
        Some(n @ 1..=0x8000_0000_0000_0000) => Some(Value::from((n as i64).wrapping_neg())),
        _ => serde_json::Number::from_f64(float(digits, neg)?).map(Value::Number),
    }
}

/// serde_json's conversion of a number to `f64` (its default one, not `float_roundtrip`), bit for
/// bit: the digits into a `u64` significand while it has room (the integer digits beyond it
/// scale by ten, the fraction digits beyond it are dropped), then one multiplication or division
/// by a power of ten ([`pow10`]). None where it refuses the number: out of `f64`'s range.
/// `digits` is a number of [`json_number`]'s grammar without its sign.
fn float(digits: &[u8], neg: bool) -> Option<f64> {
    // The next digit `d` does not fit: serde_json's `overflow!` test.
    let full = |n: u64, d: u64| n >= u64::MAX / 10 && (n > u64::MAX / 10 || d > u64::MAX % 10);
    let mut sig = 0u64;
    let mut exp = 0i32;
    let mut j = 0;
    let mut spilled = false;
    while let Some(d) = digits.get(j).and_then(|c| char::from(*c).to_digit(10)) {
        let d = u64::from(d);
        if spilled || full(sig, d) {
            spilled = true;
            exp += 1;
        } else {
            sig = sig * 10 + d;
        }
        j += 1;
    }
    if digits.get(j) == Some(&b'.') {
        j += 1;
        let mut spilled = false;
        while let Some(d) = digits.get(j).and_then(|c| char::from(*c).to_digit(10)) {
            let d = u64::from(d);
            if spilled || full(sig, d) {
                spilled = true;
            } else {
                sig = sig * 10 + d;
                exp -= 1;
            }
            j += 1;
        }
    }
    if let Some(b'e' | b'E') = digits.get(j) {
        j += 1;
        let minus = digits.get(j) == Some(&b'-');
        j += usize::from(matches!(digits.get(j), Some(b'+' | b'-')));
        let mut e = 0i32;
        while let Some(d) = digits.get(j).and_then(|c| char::from(*c).to_digit(10)) {
            let d = d as i32;
            if e >= i32::MAX / 10 && (e > i32::MAX / 10 || d > i32::MAX % 10) {
                // An exponent beyond i32: infinity is refused, anything else is zero.
                if sig != 0 && !minus {
                    return None;
                }
                return Some(if neg { -0.0 } else { 0.0 });
            }
            e = e * 10 + d;
            j += 1;
        }
        exp = if minus {
            exp.saturating_sub(e)
        } else {
            exp.saturating_add(e)
        };
    }
    let mut f = sig as f64;
    loop {
        match Some(exp.wrapping_abs() as usize)
            .filter(|&e| e <= 308)
            .map(pow10)
        {
            Some(pow) => {
                if exp >= 0 {
                    f *= pow;
                    if f.is_infinite() {
                        return None;
                    }
                } else {
                    f /= pow;
                }
                break;
            }
            None => {
                if f == 0.0 {
                    break;
                }
                if exp >= 0 {
                    return None;
                }
                f /= 1e308;
                exp += 308;
            }
        }
    }
    Some(if neg { -f } else { f })
}

/// The `f64` nearest to 10^`e` (ties to even), for `e` in 0..=308: what the literal `1e<e>`
/// is, and so each entry of the table serde_json scales by (`tests::pow10_is_the_literal`
/// checks all 309). Computed, not stored: the table was 2.4 KB of flash. 10^e is 5^e · 2^e;
/// 5^e (at most 716 bits) is rounded to 53 bits here, and the power of two is exact.
fn pow10(e: usize) -> f64 {
    // 5^e in little-endian 32-bit limbs, multiplied up 5^13 (the largest power below 2^32) at a
    // time: about 550 word products for 5^308, so a text full of floats costs little CPU.
    let mut n = [0u32; 24];
    n[0] = 1;
    let mut used = 1;
    let mut left = e;
    while left > 0 {
        let k = left.min(13);
        left -= k;
        let m = 5u64.pow(k as u32);
        let mut carry = 0;
        for l in n.iter_mut().take(used) {
            let x = u64::from(*l) * m + carry;
            *l = x as u32;
            carry = x >> 32;
        }
        if let (true, Some(l)) = (carry > 0, n.get_mut(used)) {
            *l = carry as u32;
            used += 1;
        }
    }
    let bit = |i: usize| n.get(i / 32).is_some_and(|l| l >> (i % 32) & 1 == 1);
    let top = n
        .get(used - 1)
        .map_or(0, |l| 32 - l.leading_zeros() as usize);
    let len = (used - 1) * 32 + top;
    let shift = len.saturating_sub(53);
    let mut mant = (shift..len)
        .rev()
        .fold(0u64, |m, i| m << 1 | u64::from(bit(i)));
    if shift > 0 && bit(shift - 1) && ((0..shift - 1).any(bit) || mant & 1 == 1) {
        mant += 1;
    }
    // 2^(shift + e) as an f64 (at most 2^970): exact, as is the product.
    let scale = f64::from_bits((1023 + (shift + e) as u64) << 52);
    mant as f64 * scale
}

/// The slow path of [`parse_object`], taken only when [`value`] refused the text.
#[cold]
fn parse_object_lenient(raw: &[u8]) -> Result<Map<String, Value>, RpcError> {
    if core::str::from_utf8(raw).is_err() {
        return Err(RpcError::Parse);
    }
    let Some(members) = members(raw) else {
        // Not a valid object: valid JSON of another kind (`[1e400]`) is -32600, the rest -32700.
        let end = value_end(raw, skip_json_ws(raw, 0));
        return Err(match end.map(|e| skip_json_ws(raw, e) == raw.len()) {
            Some(true) => RpcError::NotObject,
            _ => RpcError::Parse,
        });
    };
    let mut m = Map::new();
    for (key, v) in members {
        let (Some(key), Some(v)) = (raw.get(key), raw.get(v)) else {
            continue;
        };
        if let Some(Value::String(k)) = value(key) {
            m.insert(k, value(v).unwrap_or(Value::Null));
        }
    }
    Ok(m)
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

/// What routing needs of a message: its `method`, `id`, whether it is an answer, and an error's
/// code, found in one scan of the bytes without building a tree (ARCHITECTURE.md §6). A report
/// and its ack need nothing else; the tree ([`parse_object`]) is built only where params are read.
///
/// The same message as [`parse_object`] sees it: members are matched after unescaping their keys,
/// the last of a duplicated key wins, and a value no `Value` can hold reads as `null`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Head {
    /// `None`: no `method` member; `Some(None)`: one that is not a string.
    pub method: Option<Option<Method>>,
    pub id: Option<Value>,
    /// A `result` or an `error` member is present.
    pub answer: bool,
    /// `error.code`, when `error` is an object with an integer `code`.
    pub error_code: Option<i64>,
    /// Where the value of the one top-level `id` is in the scanned text (None when there are
    /// several, or the text went through the tree): [`rewrite_id_scanned`] needs no second pass.
    pub id_span: Option<Range<usize>>,
}

impl Head {
    /// As [`classify`] tells it from the tree.
    pub fn kind(&self) -> Kind<'_> {
        match (&self.method, &self.id) {
            (Some(Some(method)), id) => Kind::Request {
                method: method.as_str(),
                id: id.as_ref(),
            },
            (None, Some(id)) if self.answer => Kind::Reply { id },
            _ => Kind::Other,
        }
    }

    /// The method when it is a string, else "".
    pub fn method(&self) -> &str {
        match &self.method {
            Some(Some(m)) => m.as_str(),
            _ => "",
        }
    }

    fn from_tree(obj: &Map<String, Value>) -> Head {
        Head {
            method: obj.get("method").map(|m| m.as_str().map(Method::new)),
            id: obj.get("id").cloned(),
            answer: obj.contains_key("result") || obj.contains_key("error"),
            error_code: error_code(obj.get("error")),
            id_span: None,
        }
    }
}

/// A `method` string as a [`Head`] holds it: inline when it is short, as the method names of
/// reports and commands are, so that a scan allocates nothing; on the heap otherwise.
#[derive(Clone)]
pub struct Method(MethodRepr);

/// Method names up to this many bytes are held inline.
const METHOD_INLINE: usize = 46;

#[derive(Clone)]
enum MethodRepr {
    Inline { len: u8, bytes: [u8; METHOD_INLINE] },
    Heap(Box<str>),
}

impl Method {
    pub fn new(s: &str) -> Method {
        let mut bytes = [0u8; METHOD_INLINE];
        match (bytes.get_mut(..s.len()), u8::try_from(s.len())) {
            (Some(dst), Ok(len)) => {
                dst.copy_from_slice(s.as_bytes());
                Method(MethodRepr::Inline { len, bytes })
            }
            _ => Method(MethodRepr::Heap(s.into())),
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Copied from a `str` whole, so always UTF-8.
            MethodRepr::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|b| core::str::from_utf8(b).ok())
                .unwrap_or(""),
            MethodRepr::Heap(s) => s,
        }
    }
}

impl core::ops::Deref for Method {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Method) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

fn error_code(e: Option<&Value>) -> Option<i64> {
    e?.get("code")?.as_i64()
}

/// [`parse_object`]'s verdict and the [`Head`] of its object, in one pass over the bytes with no
/// tree (the text is checked against RFC 8259 syntax and UTF-8 as the lenient parser does). Only
/// text that this scan refuses goes through `parse_object` to learn which error it is.
pub fn scan(raw: &[u8]) -> Result<Head, RpcError> {
    match core::str::from_utf8(raw) {
        Ok(text) => scan_str(text),
        // Not UTF-8: the parser gives the error.
        Err(_) => parse_object(raw).map(|m| Head::from_tree(&m)),
    }
}

/// [`scan`] of a text already known to be UTF-8 (a `str`), which it does not check again.
pub fn scan_str(text: &str) -> Result<Head, RpcError> {
    let raw = text.as_bytes();
    match scan_walk(raw) {
        Some((end, head)) if skip_ws(raw, end) == raw.len() => Ok(head),
        // Not one valid object: the parser says which error (or, should it ever accept what the
        // scan refused, the tree gives the head).
        _ => parse_object(raw).map(|m| Head::from_tree(&m)),
    }
}

/// The object at the start of `b` (its first byte `{`, nothing before it), as the splitter meets
/// it: the end of the object and its [`Head`], or None when `b` does not begin with one whole valid
/// object. Bytes after the object are not looked at. The head is [`scan`]'s of `b[..end]` when
/// that text is UTF-8, which is the caller's check (json_stream, LOCAL_API.md §3).
pub fn scan_prefix(b: &[u8]) -> Option<(usize, Head)> {
    if b.first() != Some(&b'{') {
        return None;
    }
    scan_walk(b)
}

/// The walk of [`scan_str`] and [`scan_prefix`]: the end of the object and its head.
fn scan_walk(raw: &[u8]) -> Option<(usize, Head)> {
    let mut head = Head::default();
    let mut ids = 0;
    let end = each_member_at(raw, |k, span| {
        let (Some(key), Some(v)) = (raw.get(k), raw.get(span.clone())) else {
            return;
        };
        match member_name(key) {
            Some(Name::Method) => {
                // Without escapes, the text between the quotes (UTF-8 checked above).
                let plain = v
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .filter(|m| !m.contains(&b'\\'));
                head.method = Some(if let Some(m) = plain {
                    core::str::from_utf8(m).ok().map(Method::new)
                } else {
                    match value(v) {
                        Some(Value::String(m)) => Some(Method::new(&m)),
                        _ => None,
                    }
                });
            }
            Some(Name::Id) => {
                head.id = Some(id_value(v));
                ids += 1;
                head.id_span = (ids == 1).then_some(span);
            }
            Some(Name::Result) => head.answer = true,
            Some(Name::Error) => {
                head.answer = true;
                head.error_code = error_code(value(v).as_ref());
            }
            None => {}
        }
    })?;
    Some((end, head))
}

/// An id's value: the common unsigned integer at once, anything else through [`value`] (`null`
/// for a value no `Value` holds, as in the lenient parse).
fn id_value(v: &[u8]) -> Value {
    if !v.is_empty()
        && v.len() <= 19
        && v.iter().all(u8::is_ascii_digit)
        && (v[0] != b'0' || v.len() == 1)
    {
        let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        return Value::from(n);
    }
    value(v).unwrap_or(Value::Null)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Name {
    Method,
    Id,
    Result,
    Error,
}

/// Which of the members routing reads `key` (with its quotes) names, after unescaping.
fn member_name(key: &[u8]) -> Option<Name> {
    const NAMES: [(&[u8], Name); 4] = [
        (b"\"method\"", Name::Method),
        (b"\"id\"", Name::Id),
        (b"\"result\"", Name::Result),
        (b"\"error\"", Name::Error),
    ];
    // The plain spellings by length first: most keys are none of them.
    let plain = match key {
        b"\"id\"" => Some(Name::Id),
        b"\"error\"" => Some(Name::Error),
        b"\"method\"" => Some(Name::Method),
        b"\"result\"" => Some(Name::Result),
        _ => None,
    };
    if plain.is_some() {
        return plain;
    }
    if !key.contains(&b'\\') {
        return None;
    }
    // Escaped spellings (rare, but a parser accepts them), through the one `Value` parse.
    let Some(Value::String(k)) = value(key) else {
        return None;
    };
    NAMES
        .iter()
        .find(|(n, _)| n.get(1..n.len() - 1) == Some(k.as_bytes()))
        .map(|&(_, n)| n)
}

/// The id as the u32 of P§3: a non-negative integer that fits.
pub fn id_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// Replaces the value of every top-level `id` member of the JSON object `text` with `new_id`,
/// keeping all other bytes. None if `text` is not an object or has no top-level `id`.
///
/// The text must be one valid JSON object (it has parsed already). Keys are compared after unescaping, as a parser sees them (`"\u0069d"` is `id`). Every top-level `id` is
/// replaced, so no parser (first-wins or last-wins) can see the old one.
pub fn rewrite_id(text: &str, new_id: u64) -> Option<String> {
    let mut digits = [0u8; 20];
    rewrite_id_raw(text, decimal(new_id, &mut digits))
}

/// [`rewrite_id`] with the JSON text `id` as the new value (any JSON value, written as given).
pub fn rewrite_id_raw(text: &str, id: &str) -> Option<String> {
    let b = text.as_bytes();
    let spans: Vec<Range<usize>> = members(b)?
        .into_iter()
        .filter(|(k, _)| b.get(k.clone()).is_some_and(key_is_id))
        .map(|(_, v)| v)
        .collect();
    if spans.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len() + id.len());
    let mut last = 0;
    for Range { start, end } in spans {
        // Spans start and end at ASCII bytes, so these are char boundaries; get() keeps it panic-free.
        out.push_str(text.get(last..start)?);
        out.push_str(id);
        last = end;
    }
    out.push_str(text.get(last..)?);
    Some(out)
}

/// [`rewrite_id`] of a text [`scan`] read into `head`, reusing the id's place it found.
pub fn rewrite_id_scanned(text: &str, head: &Head, new_id: u64) -> Option<String> {
    let mut out = String::new();
    rewrite_id_scanned_into(text, head, new_id, &mut out).then_some(out)
}

/// [`rewrite_id_scanned`] into `out` (cleared first), a buffer its caller reuses: false, and `out`
/// left empty, where that gives None.
pub fn rewrite_id_scanned_into(text: &str, head: &Head, new_id: u64, out: &mut String) -> bool {
    out.clear();
    let Some(span) = head.id_span.clone() else {
        return match rewrite_id(text, new_id) {
            Some(t) => {
                out.push_str(&t);
                true
            }
            None => false,
        };
    };
    let (Some(before), Some(after)) = (text.get(..span.start), text.get(span.end..)) else {
        return false;
    };
    let mut digits = [0u8; 20];
    let id = decimal(new_id, &mut digits);
    out.reserve(text.len() + id.len());
    out.push_str(before);
    out.push_str(id);
    out.push_str(after);
    true
}

/// [`rewrite_id_scanned`] of `text` in place, where `head` is [`scan`]'s of it: the id's digits
/// replace the old value's bytes, so a text with room for them (`capacity`) is not copied. False,
/// and `text` unchanged, where [`rewrite_id_scanned`] gives None.
pub fn rewrite_id_in_place(text: &mut String, head: &Head, new_id: u64) -> bool {
    let Some(span) = head.id_span.clone() else {
        return match rewrite_id(text, new_id) {
            Some(t) => {
                *text = t;
                true
            }
            None => false,
        };
    };
    if text.get(span.clone()).is_none() {
        return false;
    }
    let mut digits = [0u8; 20];
    text.replace_range(span, decimal(new_id, &mut digits));
    true
}

/// `n` in decimal, written at the end of `buf`. By hand: the formatting machinery costs more than
/// the rest of an id rewrite.
pub fn decimal(n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    core::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// A piece's text and what [`scan_str`] says of it, the splitter's scan reused when it made one;
/// None: not UTF-8 (the splitter passes only valid JSON, so only a `Raw` value can be that). The
/// applets' one way from a piece to what they route on, without a tree.
pub fn piece_text(piece: super::json_stream::Piece) -> Option<(String, Result<Head, RpcError>)> {
    use super::json_stream::Piece;
    match piece {
        Piece::Scanned { text, head } => Some((text, Ok(head))),
        Piece::Raw(raw) => String::from_utf8(raw).ok().map(|t| {
            let head = scan_str(&t);
            (t, head)
        }),
    }
}

/// A member that is a string, unescaped (the one parse, [`value`]): None when there is no such
/// member (or `text` is not one valid object), `Some(None)` when its value is not a string.
pub fn str_member(text: &str, name: &str) -> Option<Option<String>> {
    raw_member(text, name).map(|v| match value(v.as_bytes()) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    })
}

/// The raw text of the last top-level `id` member (the one a parser keeps), as sent: the id to echo
/// in a -32600 reply when it is not a u32 (L§4.1), even one no `Value` can hold.
pub fn raw_id(text: &str) -> Option<&str> {
    raw_member(text, "id")
}

/// The raw text of the last top-level member named `name` (after unescaping its key, as a parser
/// sees it), as written: one member read without building a tree. None when `text` is not one
/// valid object or has no such member.
pub fn raw_member<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let b = text.as_bytes();
    let (_, v) = members(b)?.into_iter().rfind(|(k, _)| {
        b.get(k.clone()).is_some_and(|k| {
            // The plain spelling between the quotes, or an escaped one through the one parse.
            k.get(1..k.len() - 1) == Some(name.as_bytes())
                || (k.contains(&b'\\') && matches!(value(k), Some(Value::String(s)) if s == name))
        })
    })?;
    text.get(v)
}

/// The (key, value) byte ranges of the top-level members of the JSON object `b` (the key with its
/// quotes), in order. None if `b` is not one valid JSON object (RFC 8259 syntax, see
/// [`value_end`]) with only whitespace or NUL around it.
fn members(b: &[u8]) -> Option<Vec<(Range<usize>, Range<usize>)>> {
    let mut out = Vec::new();
    each_member(b, |k, v| out.push((k, v)))?;
    Some(out)
}

/// [`members`] without the vector: `f` sees each (key, value) as it is found, and the result says
/// whether the whole text was one valid object (so a caller discards what it saw on None).
fn each_member(b: &[u8], f: impl FnMut(Range<usize>, Range<usize>)) -> Option<()> {
    let end = each_member_at(b, f)?;
    (skip_ws(b, end) == b.len()).then_some(())
}

/// [`each_member`] of the object at the start of `b` (after whitespace): the index just past its
/// closing brace, whatever follows it.
fn each_member_at(b: &[u8], mut f: impl FnMut(Range<usize>, Range<usize>)) -> Option<usize> {
    // One flat loop over the tokens (no call per value, no recursion): what a report costs
    // is mostly this walk. The grammar is [`value_end`]'s; `tests::each_member_is_the_grammar`
    // holds the two together.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Want {
        Key,
        KeyOrEnd,
        Colon,
        Value,
        ValueOrEnd,
        CommaOrEnd,
    }
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut open = Closers::default();
    open.push(b'}');
    let mut want = Want::KeyOrEnd;
    // The top-level member being read: its key, and where its value starts.
    let mut key = 0..0;
    let mut val = 0;
    loop {
        let c = loop {
            let c = *b.get(i)?;
            if !matches!(c, b' ' | b'\t' | b'\r' | b'\n') {
                break c;
            }
            i += 1;
        };
        let closes = c == b'}' || c == b']';
        match want {
            Want::KeyOrEnd | Want::ValueOrEnd | Want::CommaOrEnd if closes => {
                if open.last() != Some(c) {
                    return None;
                }
                open.pop();
                i += 1;
                match open.depth {
                    0 => return Some(i),
                    1 => f(key.clone(), val..i),
                    _ => {}
                }
                want = Want::CommaOrEnd;
            }
            Want::Key | Want::KeyOrEnd => {
                let end = json_string(b, i)?;
                if open.depth == 1 {
                    key = i..end;
                }
                i = end;
                want = Want::Colon;
            }
            Want::Colon => {
                if c != b':' {
                    return None;
                }
                i += 1;
                want = Want::Value;
            }
            Want::CommaOrEnd => {
                if c != b',' {
                    return None;
                }
                i += 1;
                want = if open.last() == Some(b'}') {
                    Want::Key
                } else {
                    Want::Value
                };
            }
            Want::Value | Want::ValueOrEnd => {
                if open.depth == 1 {
                    val = i;
                }
                let scalar_end = match c {
                    b'{' | b'[' => {
                        open.push(c + 2);
                        i += 1;
                        want = if c == b'{' {
                            Want::KeyOrEnd
                        } else {
                            Want::ValueOrEnd
                        };
                        continue;
                    }
                    b'"' => json_string(b, i)?,
                    b't' if b.get(i..i + 4) == Some(b"true") => i + 4,
                    b'f' if b.get(i..i + 5) == Some(b"false") => i + 5,
                    b'n' if b.get(i..i + 4) == Some(b"null") => i + 4,
                    _ => json_number(b, i)?,
                };
                i = scalar_end;
                if open.depth == 1 {
                    f(key.clone(), val..i);
                }
                want = Want::CommaOrEnd;
            }
        }
    }
}

/// The end of the one JSON value at `i`, checked against RFC 8259 syntax only: no number is
/// converted, a surrogate escape needs no partner, and nesting has no limit (a heap stack, no
/// recursion). UTF-8 is the caller's check. (serde's own skipping reader would do, at 2.4 KB
/// more flash.)
fn value_end(b: &[u8], mut i: usize) -> Option<usize> {
    // The closers of the open containers: '{' + 2 is '}', '[' + 2 is ']'.
    let mut open = Closers::default();
    loop {
        // A value starts at i.
        match *b.get(i)? {
            c @ (b'{' | b'[') => {
                i = skip_json_ws(b, i + 1);
                if b.get(i) == Some(&(c + 2)) {
                    i += 1;
                } else {
                    open.push(c + 2);
                    if c == b'{' {
                        i = json_key(b, i)?;
                    }
                    continue;
                }
            }
            b'"' => i = json_string(b, i)?,
            b't' if b.get(i..i + 4) == Some(b"true") => i += 4,
            b'f' if b.get(i..i + 5) == Some(b"false") => i += 5,
            b'n' if b.get(i..i + 4) == Some(b"null") => i += 4,
            _ => i = json_number(b, i)?,
        }
        // After a value: close what ends here, then a comma (and a key) or the end.
        loop {
            let Some(close) = open.last() else {
                return Some(i);
            };
            i = skip_json_ws(b, i);
            match *b.get(i)? {
                c if c == close => {
                    open.pop();
                    i += 1;
                }
                b',' => {
                    i = skip_json_ws(b, i + 1);
                    if close == b'}' {
                        i = json_key(b, i)?;
                    }
                    break;
                }
                _ => return None,
            }
        }
    }
}

/// A stack of `}`/`]`, one bit each: the first 64 levels in a word (no allocation for what
/// messages really hold), deeper ones in a heap vector.
#[derive(Default)]
struct Closers {
    bits: u64,
    depth: usize,
    deep: Vec<bool>,
}

impl Closers {
    fn push(&mut self, close: u8) {
        let brace = close == b'}';
        if self.depth < 64 {
            self.bits = (self.bits << 1) | u64::from(brace);
        } else {
            self.deep.push(brace);
        }
        self.depth += 1;
    }

    fn last(&self) -> Option<u8> {
        let brace = match self.depth {
            0 => return None,
            1..=64 => self.bits & 1 == 1,
            _ => *self.deep.last()?,
        };
        Some(if brace { b'}' } else { b']' })
    }

    fn pop(&mut self) {
        match self.depth {
            0 => return,
            1..=64 => self.bits >>= 1,
            _ => {
                self.deep.pop();
            }
        }
        self.depth -= 1;
    }
}

/// JSON's whitespace (no NUL, unlike [`skip_ws`]).
fn skip_json_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// `"key"` then `:`; the index of the member's value.
fn json_key(b: &[u8], i: usize) -> Option<usize> {
    colon(b, json_string(b, i)?)
}

/// `:` after a key ending at `i`; the index of the member's value.
fn colon(b: &[u8], i: usize) -> Option<usize> {
    let i = skip_json_ws(b, i);
    (b.get(i) == Some(&b':')).then(|| skip_json_ws(b, i + 1))
}

/// The bytes that end a run of plain characters in a JSON string: `"`, `\\` and controls.
static STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// The end of a string at `i`: no control characters, only the escapes of RFC 8259 §7.
fn json_string(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    loop {
        // Plain characters in one tight run: one table load per byte.
        let c = loop {
            let c = *b.get(j)?;
            if STRING_STOP[usize::from(c)] {
                break c;
            }
            j += 1;
        };
        match c {
            b'"' => return Some(j + 1),
            b'\\' => match *b.get(j + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => j += 2,
                b'u' if b.get(j + 2..j + 6)?.iter().all(u8::is_ascii_hexdigit) => j += 6,
                _ => return None,
            },
            c if c < 0x20 => return None,
            _ => j += 1,
        }
    }
}

/// The end of a number at `i`: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn json_number(b: &[u8], i: usize) -> Option<usize> {
    let digits = |j: usize| {
        let mut k = j;
        while let Some(c) = b.get(k) {
            if c.wrapping_sub(b'0') > 9 {
                break;
            }
            k += 1;
        }
        (k > j).then_some(k)
    };
    let mut j = i + usize::from(b.get(i) == Some(&b'-'));
    j = match b.get(j)? {
        b'0' => j + 1,
        _ => digits(j)?,
    };
    if b.get(j) == Some(&b'.') {
        j = digits(j + 1)?;
    }
    if matches!(b.get(j), Some(b'e' | b'E')) {
        j += 1 + usize::from(matches!(b.get(j + 1), Some(b'+' | b'-')));
        j = digits(j)?;
    }
    Some(j)
}

/// Whitespace between JSON tokens; NUL too, since texts may come with a terminator (D3).
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\r' | b'\n' | 0)) {
        i += 1;
    }
    i
}

fn key_is_id(raw: &[u8]) -> bool {
    // Escaped spellings of "id" too, through the one `Value` parse rather than a second reader.
    member_name(raw) == Some(Name::Id)
}

/// A JSON string literal with proper escapes.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_str(&mut out, s);
    out
}

/// `v` as compact JSON, in `format!` arguments: `{}` of [`Compact`] writes what serde_json's
/// compact serializer writes (keys in the map's order, the same string escapes, numbers as
/// `Number` prints them). One small writer instead of serde_json's `Display` for `Value`, which
/// carries its pretty printer too (~1 KB of flash per board).
pub struct Compact<'a>(pub &'a Value);

impl core::fmt::Display for Compact<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut out = String::new();
        write_value(&mut out, self.0);
        f.write_str(&out)
    }
}

/// Appends `v` as compact JSON.
pub fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            use core::fmt::Write;
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, x);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, k);
                out.push(':');
                write_value(out, x);
            }
            out.push('}');
        }
    }
}

/// Appends `s` as a JSON string literal, escaped as serde_json escapes: `"` `\\` and the
/// control characters (the short forms where JSON has one, `\u00XX` otherwise); nothing else.
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `{"id":N,"error":{"code":C,"message":"M"}}`, without the id member when there is none (L§3).
pub fn error_reply(id: Option<&Value>, code: i64, message: &str) -> String {
    let err = format!(
        r#""error":{{"code":{code},"message":{}}}}}"#,
        json_str(message)
    );
    match id {
        Some(id) => format!(r#"{{"id":{},{err}"#, Compact(id)),
        None => format!("{{{err}"),
    }
}

/// `{"id":<raw>,"error":{"code":-32600,"message":"Invalid Request"}}` with the id as the sender
/// wrote it (L§4.1), even one no `Value` holds.
pub fn invalid_request(raw_id: &str) -> String {
    format!(r#"{{"id":{raw_id},"error":{{"code":-32600,"message":"Invalid Request"}}}}"#)
}

/// `{"id":N,"result":R}`.
pub fn result_reply(id: &Value, result: &Value) -> String {
    format!(r#"{{"id":{},"result":{}}}"#, Compact(id), Compact(result))
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
    let rest = format!(
        r#""method":{},"params":{}}}"#,
        json_str(method),
        Compact(params)
    );
    match id {
        Some(id) => format!(r#"{{"id":{},{rest}"#, Compact(id)),
        None => format!("{{{rest}"),
    }
}

/// The members of a JSON object in their order, each value kept as compact JSON text: how the
/// daemon builds the objects whose member order peers see (INFO of `miIO.info` and `_otc.info`,
/// P§5.4). A `serde_json::Map` sorts its keys; this keeps the order in which members came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members(Vec<(String, String)>);

impl Members {
    pub fn new() -> Members {
        Members::default()
    }

    /// The top-level members of the JSON object `raw`, in the order of the text, or None if it is
    /// not one valid object. Keys are unescaped (a key no `String` holds drops its member, as in
    /// [`parse_object`]); values stay as written, whitespace outside strings removed. A key that
    /// comes again keeps its first place and takes the last value, as a parser that keeps the
    /// order sees it.
    pub fn of_object(raw: &[u8]) -> Option<Members> {
        core::str::from_utf8(raw).ok()?;
        let mut m = Members::new();
        // The walk `rewrite_id` already uses: another closure over `each_member` would be a second
        // copy of it in flash.
        for (k, v) in members(raw)? {
            let (Some(key), Some(v)) = (raw.get(k), raw.get(v)) else {
                continue;
            };
            if let Some(Value::String(key)) = value(key) {
                m.set(&key, compact(v));
            }
        }
        Some(m)
    }

    /// Sets `key` to the JSON text `json`: in its place when the key is there, else at the end.
    pub fn set(&mut self, key: &str, json: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = json,
            None => self.0.push((key.to_owned(), json)),
        }
    }

    /// [`Members::set`] with a JSON string.
    pub fn set_str(&mut self, key: &str, s: &str) {
        self.set(key, json_str(s));
    }

    /// The JSON text of `key`'s value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (key, JSON text of the value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `{"k":v,...}`, compact, members in order.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&json_str(k));
            out.push(':');
            out.push_str(v);
        }
        out.push('}');
        out
    }
}

/// The JSON text `raw` (valid, UTF-8) without the whitespace between its tokens.
fn compact(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let (mut in_string, mut escaped) = (false, false);
    for &c in raw {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if matches!(c, b' ' | b'\t' | b'\r' | b'\n') {
            continue;
        } else if c == b'"' {
            in_string = true;
        }
        out.push(c);
    }
    // Only ASCII whitespace outside strings was dropped, so the text is still UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// The walk [`each_member`] replaced: a key, a colon and [`value_end`] per member.
    fn each_member_reference(
        b: &[u8],
        mut f: impl FnMut(Range<usize>, Range<usize>),
    ) -> Option<()> {
        let mut i = skip_ws(b, 0);
        if b.get(i) != Some(&b'{') {
            return None;
        }
        i = skip_json_ws(b, i + 1);
        if b.get(i) == Some(&b'}') {
            i += 1;
        } else {
            loop {
                let key_end = json_string(b, i)?;
                let start = colon(b, key_end)?;
                let end = value_end(b, start)?;
                f(i..key_end, start..end);
                i = skip_json_ws(b, end);
                match b.get(i) {
                    Some(b',') => i = skip_json_ws(b, i + 1),
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        (skip_ws(b, i) == b.len()).then_some(())
    }

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
    fn method_names_short_and_long() {
        for m in [
            "",
            "props",
            "é.ü",
            &"x".repeat(46),
            &"y".repeat(47),
            &"z".repeat(300),
        ] {
            let n = Method::new(m);
            assert_eq!(n.as_str(), m);
            assert_eq!(n, Method::new(m));
            assert_eq!(format!("{n:?}"), format!("{m:?}"));
        }
        assert_ne!(Method::new("a"), Method::new("b"));
    }

    #[test]
    fn scan_reads_what_routing_needs() {
        let h = scan(br#"{"id":17,"method":"props","params":{"id":3,"method":"x"}}"#).unwrap();
        assert_eq!(
            h.kind(),
            Kind::Request {
                method: "props",
                id: Some(&json!(17))
            }
        );
        let h = scan(br#" {"result":["ok"],"id":4294967295}"#).unwrap();
        assert_eq!(
            h.kind(),
            Kind::Reply {
                id: &json!(4294967295u64)
            }
        );
        let h = scan(br#"{"id":5,"error":{"message":"x","code":-30011}}"#).unwrap();
        assert_eq!(
            (h.kind(), h.error_code),
            (Kind::Reply { id: &json!(5) }, Some(-30011))
        );
        // Escaped keys and method, the last duplicate, an id no Value holds, a method not a string.
        let h = scan(br#"{"\u0069d":1,"id":2,"m\u0065thod":"a\u0062"}"#).unwrap();
        assert_eq!(
            h.kind(),
            Kind::Request {
                method: "ab",
                id: Some(&json!(2))
            }
        );
        assert_eq!(
            scan(br#"{"id":1e400,"result":0}"#).unwrap().id,
            Some(Value::Null)
        );
        assert_eq!(scan(br#"{"id":1,"method":7}"#).unwrap().kind(), Kind::Other);
        assert_eq!(scan(br#"{"id":007}"#), Err(RpcError::Parse));
        assert_eq!(scan(b"[1]"), Err(RpcError::NotObject));
        assert_eq!(scan(b"{\"a\":\"\xff\"}"), Err(RpcError::Parse));
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

    /// The order-keeping writer: members come out in the order they came, a replaced member keeps
    /// its place, nested objects keep the text's order, and only whitespace outside strings goes.
    #[test]
    fn members_keep_their_order() {
        let mut m = Members::new();
        m.set_str("z", "last\"first");
        m.set("b", "2".into());
        m.set("a", "[1]".into());
        m.set("b", "3".into());
        assert_eq!(m.to_json(), r#"{"z":"last\"first","b":3,"a":[1]}"#);
        assert_eq!(m.get("b"), Some("3"));
        assert_eq!(m.get("c"), None);
        assert_eq!(Members::new().to_json(), "{}");

        let raw =
            br#" { "y" : { "k" : "a b\" c" , "d" : [ 1 , 2 ] } , "x":1, "\u0061":true, "x":2 } "#;
        let m = Members::of_object(raw).unwrap();
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            [
                ("y", r#"{"k":"a b\" c","d":[1,2]}"#),
                ("x", "2"),
                ("a", "true")
            ]
        );
        assert_eq!(
            m.to_json(),
            r#"{"y":{"k":"a b\" c","d":[1,2]},"x":2,"a":true}"#
        );
        // A key that needs escaping is written escaped.
        let mut e = Members::new();
        e.set("q\"\n", "null".into());
        assert_eq!(e.to_json(), r#"{"q\"\n":null}"#);
        parse_object(e.to_json().as_bytes()).unwrap();

        for bad in [
            &b"[1]"[..],
            b"{\"a\":}",
            b"{\"a\":1}{}",
            b"\"s\"",
            b"{\"a\":\"\xff\"}",
        ] {
            assert_eq!(Members::of_object(bad), None);
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
            result_reply(&json!(1), &json!({"a":[null],"b":1})),
            r#"{"id":1,"result":{"a":[null],"b":1}}"#
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

    #[test]
    fn valid_json_serde_cannot_hold_is_an_object() {
        // RFC 8259 numbers and strings outside what a serde Value holds: the members that fit are
        // kept, the others read as null; the text (forwarded verbatim) is not ours to judge.
        let big = "9".repeat(400);
        let t = format!(r#"{{"id":{big},"method":"props","params":[1]}}"#);
        let m = parse_object(t.as_bytes()).expect("valid JSON");
        assert_eq!(m["id"], Value::Null);
        assert_eq!(m["method"], "props");
        assert_eq!(m["params"], json!([1]));
        let t = r#"{"id":5,"method":"props","params":{"x":1e400,"y":-1E+999}}"#;
        let m = parse_object(t.as_bytes()).expect("valid JSON");
        assert_eq!(
            (m["id"].clone(), m["params"].clone()),
            (json!(5), Value::Null)
        );
        assert_eq!(rewrite_id(t, 9).unwrap(), t.replace(":5,", ":9,"));
        // Nesting deeper than serde's limit, and a lone surrogate escape.
        let deep = format!(
            r#"{{"id":1,"params":{}{},"method":"m"}}"#,
            "[".repeat(300),
            "]".repeat(300)
        );
        let m = parse_object(deep.as_bytes()).expect("valid JSON");
        assert_eq!(
            (m["id"].clone(), m["params"].clone()),
            (json!(1), Value::Null)
        );
        let m = parse_object(br#"{"id":2,"method":"m","params":"\ud800"}"#).expect("valid JSON");
        assert_eq!(
            (m["id"].clone(), m["params"].clone()),
            (json!(2), Value::Null)
        );
        // A key serde cannot hold drops that member only.
        let m = parse_object(br#"{"\udc00":1,"id":3}"#).expect("valid JSON");
        assert_eq!(Value::Object(m), json!({"id": 3}));
        // Valid JSON that is not an object stays -32600.
        let deep_array = format!("{}{}", "[".repeat(300), "]".repeat(300));
        for s in ["1e400", "[1e400]", deep_array.as_str()] {
            assert_eq!(parse_object(s.as_bytes()), Err(RpcError::NotObject), "{s}");
        }
        // Not JSON stays -32700, whatever serde would have said first.
        for s in [
            &b"{\"id\":1e400"[..],
            b"{\"a\":1e400,}",
            b"{\"a\":1e}",
            b"{\"a\":01}",
            b"{\"a\":\"\xff\",\"b\":1e400}",
            b"{\"a\":1e400}x",
            b"{\"a\":\"\\x\",\"b\":1e400}",
        ] {
            assert_eq!(
                parse_object(s),
                Err(RpcError::Parse),
                "{}",
                String::from_utf8_lossy(s)
            );
        }
    }

    #[test]
    fn raw_id_is_the_text_as_sent() {
        let big = "9".repeat(400);
        let t = format!(r#"{{"method":"x", "id" : {big} }}"#);
        assert_eq!(raw_id(&t), Some(big.as_str()));
        assert_eq!(raw_id(r#"{"id":1.50,"id":"a"}"#), Some(r#""a""#));
        assert_eq!(raw_id(r#"{"params":{"id":1}}"#), None);
        assert_eq!(raw_id("[1]"), None);
    }

    #[test]
    fn str_member_unescapes_and_tells_absent_from_not_a_string() {
        let t = r#"{"a":"x\"\u0041","b":1,"\u0063":"k","d":null,"a2":"\ud800"}"#;
        assert_eq!(str_member(t, "a"), Some(Some("x\"A".to_string())));
        assert_eq!(str_member(t, "b"), Some(None));
        assert_eq!(
            str_member(t, "c"),
            Some(Some("k".to_string())),
            "escaped key"
        );
        assert_eq!(str_member(t, "d"), Some(None));
        assert_eq!(
            str_member(t, "a2"),
            Some(None),
            "a lone surrogate is no string"
        );
        assert_eq!(str_member(t, "e"), None);
        assert_eq!(str_member("[]", "a"), None);
    }

    #[test]
    fn piece_text_scans_raw_pieces_too() {
        use crate::wire::json_stream::Piece;
        let (t, h) = piece_text(Piece::Raw(br#"{"id":3,"method":"m"}"#.to_vec())).unwrap();
        assert_eq!(t, r#"{"id":3,"method":"m"}"#);
        assert_eq!(h.unwrap().method(), "m");
        assert!(piece_text(Piece::Raw(vec![b'"', 0xff, b'"'])).is_none());
        assert!(piece_text(Piece::Raw(b"[1]".to_vec())).unwrap().1.is_err());
    }

    /// Any JSON value: strings from any characters (control characters, quotes, backslashes,
    /// non-ASCII), integers of both signs, finite floats, nested arrays and objects.
    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// [`value`] against `serde_json::from_slice`, the parser it stands in for: the same verdict,
    /// and the same value down to the kind of each number and the bits of each float.
    fn check_value_is_serde(b: &[u8]) -> Result<(), TestCaseError> {
        let want = serde_json::from_slice::<Value>(b).ok();
        let got = value(b);
        let text = String::from_utf8_lossy(b);
        prop_assert_eq!(&got, &want, "{}", text);
        let show = |v: &Option<Value>| v.as_ref().map(|v| serde_json::to_string(v).unwrap());
        prop_assert_eq!(show(&got), show(&want), "{}", text);
        Ok(())
    }

    #[test]
    fn pow10_is_the_literal() {
        for e in 0..=308 {
            let lit: f64 = format!("1e{e}").parse().unwrap();
            assert_eq!(pow10(e).to_bits(), lit.to_bits(), "1e{e}");
        }
    }

    #[test]
    fn value_is_serde_json() {
        let nest =
            |n: usize, open: &str, close: &str| format!("{}{}", open.repeat(n), close.repeat(n));
        let mut cases: Vec<Vec<u8>> = [
            "",
            " ",
            "null",
            " true ",
            "false",
            "nul",
            "truex",
            "[]",
            "{}",
            "[ ]",
            "{ }",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" : [1 , 2] , \"a\" : {\"b\":null}}",
            "{\"a\"}",
            "{1:2}",
            "[1 2]",
            "\"\\ud83d\\ude00\"",
            "\"\\ud83d\"",
            "\"\\ud83dx\"",
            "\"\\ud83d\\n\"",
            "\"\\ud83d\\u0041\"",
            "\"\\ude00\"",
            "\"\\ud83d\\ud83d\"",
            "\"\\u0000\\u00e9\\u20AC\\/\\b\\f\\n\\r\\t\\\"\\\\\"",
            "\"\\x\"",
            "\"\\u12\"",
            "\"a\tb\"",
            "\"é€😀\"",
            "0",
            "-0",
            "-0.0",
            "0.0",
            "01",
            "-",
            "1.",
            ".5",
            "1e5",
            "1E+5",
            "1e-5",
            "-1",
            "1.5",
            "0.1",
            "123456789012345678901234567890",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "-18446744073709551615",
            "-18446744073709551616",
            "1e400",
            "-1e400",
            "1e-400",
            "1.7976931348623157e308",
            "2.2250738585072014e-308",
            "4.9e-324",
            "0.30000000000000004",
            "123.456e-7",
            "9007199254740993",
            "1e",
            "1e+",
            "[1e400]",
            "{\"a\":1e400}",
            "\u{feff}1",
            "\t\r\n 1 \n",
            "18446744073709551619.5",
            "18446744073709551615.5",
            "1844674407370955161.59e3",
            "184467440737095516150000.0001e-4",
            "0.000000000000000000000000000000000000001234",
            "1e2147483647",
            "1e2147483648",
            "1e-2147483648",
            "1e-2147483649",
            "0e99999999999",
            "-0e99999999999",
            "1e-99999999999",
            "-1.5e-99999999999",
            "0.0e-9999999999",
            "1.5e-2147483647",
            "123e-330",
            "-123e-330",
            "1e-320",
            "17976931348623157e292",
            "17976931348623159e292",
            "0.0000000000000000000000000000001e330",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        for n in [126, 127, 128, 129] {
            cases.push(nest(n, "[", "]").into_bytes());
            cases.push(format!("{}{}", "{\"a\":".repeat(n), "}".repeat(n)).into_bytes());
            cases.push(format!("{}1{}", "[".repeat(n), "]".repeat(n)).into_bytes());
        }
        cases.push(b"\"\xff\"".to_vec());
        cases.push(b"\"\xc3\"".to_vec());
        cases.push(b"\xc3\xa9".to_vec());
        cases.push(b"\"a\x00b\"".to_vec());
        cases.push(b"\"a\x1fb\"".to_vec());
        cases.push(b"1\x00".to_vec());
        for c in &cases {
            check_value_is_serde(c).unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn value_is_serde_json_on_any_text(s in "[\\[\\]{}\",:0-9eE.+ \\-tnrufalsxbd\\\\/\u{e9}\u{1F600}\t]{0,32}") {
            check_value_is_serde(s.as_bytes())?;
        }

        #[test]
        fn value_is_serde_json_on_any_value(v in any_value(), ws in "[ \t\r\n]{0,2}") {
            let text = serde_json::to_string(&v).unwrap();
            check_value_is_serde(text.as_bytes())?;
            check_value_is_serde(format!("{ws}[{text}{ws},{ws}{text}]{ws}").as_bytes())?;
            // The escaped spelling of every character in the strings.
            let escaped: String = text.chars().flat_map(|c| {
                if c.is_ascii() { vec![c.to_string()] } else {
                    let mut u = [0u16; 2];
                    c.encode_utf16(&mut u).iter().map(|x| format!("\\u{x:04x}")).collect()
                }
            }).collect();
            check_value_is_serde(escaped.as_bytes())?;
        }

        #[test]
        fn value_is_serde_json_on_numbers(f in any::<f64>(), i in any::<i64>(), u in any::<u64>(),
                                          e in -400i32..400, d in "[0-9]{1,30}") {
            for t in [format!("{f:e}"), format!("{f}"), format!("{i}"), format!("{u}"),
                      format!("{d}e{e}"), format!("-{d}.{d}E{e}"), format!("0.{d}"), format!("-{d}")] {
                check_value_is_serde(t.as_bytes())?;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The small writer writes what serde_json's compact serializer writes.
        #[test]
        fn compact_writer_matches_serde(v in any_value()) {
            prop_assert_eq!(Compact(&v).to_string(), serde_json::to_string(&v).unwrap());
        }
    }

    #[test]
    fn compact_writer_escapes_like_serde() {
        let s: String = (0u8..0x80).map(char::from).chain("é€😀".chars()).collect();
        let v = Value::String(s.clone());
        assert_eq!(json_str(&s), serde_json::to_string(&v).unwrap());
        assert_eq!(json_str("a\u{7f}\"\\/"), "\"a\u{7f}\\\"\\\\/\"");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn syntax_check_agrees_with_serde(s in "[\\[\\]{}\",:0-9eE.+ \\-tnrufalsx\\\\/]{0,24}") {
            // serde's skipping reader converts no number and pairs no surrogate either: the same
            // language as value_end.
            let b = s.as_bytes();
            let ours = value_end(b, skip_json_ws(b, 0)).is_some_and(|e| skip_json_ws(b, e) == b.len());
            let serde = serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok();
            prop_assert_eq!(ours, serde, "{}", s);
        }

        #[test]
        fn scan_agrees_with_the_tree(s in "[\\[\\]{}\",:0-9eE.+ \\-a-z\\\\/]{0,40}",
                                     id in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]) {
            // Random text over JSON's alphabet, and the same wrapped as members named like the
            // ones routing reads.
            for t in [s.clone(), format!(r#"{{"id":{s},"method":{s},"error":{s}}}"#),
                      format!(r#"{{"m\u0065thod":"x","error":{{"code":{s}}},"id":1,"id":{s}}}"#)] {
                let b = t.as_bytes();
                let mut h = scan(b);
                if let Ok(h) = &mut h {
                    // The rewrite through the span is the rewrite through a second pass.
                    prop_assert_eq!(rewrite_id_scanned(&t, h, id), rewrite_id(&t, id), "{}", t);
                    let mut own = t.clone();
                    let done = rewrite_id_in_place(&mut own, h, id);
                    prop_assert_eq!(done.then_some(own), rewrite_id(&t, id), "{}", t);
                    h.id_span = None;
                }
                prop_assert_eq!(h, parse_object(b).map(|m| Head::from_tree(&m)), "{}", t);
            }
        }

        #[test]
        fn each_member_is_the_grammar(s in "[\\[\\]{}\",:0-9eE.+ \\-a-z\\\\/\\x00]{0,40}") {
            for t in [s.clone(), format!("{{\"k\":{s}}}"), format!("{{\"a\":[{s}],\"b\":{{{s}}}}}")] {
                let b = t.as_bytes();
                let (mut new, mut old) = (Vec::new(), Vec::new());
                let ok = each_member(b, |k, v| new.push((k, v))).is_some();
                let ok_ref = each_member_reference(b, |k, v| old.push((k, v))).is_some();
                prop_assert_eq!(ok, ok_ref, "{}", t);
                if ok {
                    prop_assert_eq!(new, old, "{}", t);
                }
            }
        }

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
