//! Splits a byte stream of back-to-back JSON values into single values (LOCAL_API.md §3, §2).
//!
//! Contract: [`Splitter::push`] appends bytes, [`Splitter::next`] returns each complete top-level
//! value as its raw bytes, in order, whatever the chunking of the input. Whitespace (space, tab,
//! CR, LF) and NUL between values are skipped. Objects and arrays end when their nesting closes
//! (strings and escapes inside them are respected); a top-level string is one value; a bare scalar
//! (number, literal or garbage) ends before whitespace, NUL or a structural character. The splitter
//! only delimits: the caller parses each value (rpc::parse_object), so `{"a":}` comes out whole.
//! A stray or mismatched closer, `,` or `:` at top level is a [`SplitError::Syntax`]; a value that
//! grows past `max` bytes is [`SplitError::TooLarge`]. Errors are sticky: the caller closes the
//! connection. Each byte is scanned once (runs of bytes that cannot end a nested value in one
//! tight loop), and the buffer holds at most `max` bytes of an unfinished
//! value plus the last push, provided the caller drains `next` after each push.

use core::fmt;

/// The bytes a scanned object's buffer holds beyond its text: a u32 id's 10 digits.
const ID_ROOM: usize = 10;

use super::rpc;

/// Why the stream cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitError {
    /// A byte that cannot start or continue a value, at this offset from the start of the stream.
    Syntax { offset: u64 },
    /// A value reached `size` bytes, more than the limit (D8: 16384 by default).
    TooLarge { size: usize },
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitError::Syntax { offset } => write!(f, "JSON syntax error at byte {offset}"),
            SplitError::TooLarge { size } => {
                write!(f, "JSON message too large ({size} bytes and more)")
            }
        }
    }
}

impl std::error::Error for SplitError {}

/// One value as the splitter cut it.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// An object that arrived whole and was valid JSON and UTF-8: the walk that found its end
    /// also read what routing needs, so `head` is what [`rpc::scan`] gives for `text`.
    Scanned { text: String, head: rpc::Head },
    /// Any other value (or an object that arrived in parts), as its raw bytes.
    Raw(Vec<u8>),
}

impl Piece {
    /// The value's bytes, whichever way it was cut.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Piece::Scanned { text, .. } => text.into_bytes(),
            Piece::Raw(b) => b,
        }
    }
}

/// Where the scanner is, kept across pushes so no byte is scanned twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between values: skipping whitespace and NUL.
    Between,
    /// Inside an object or array; `closers` holds the expected closing bytes.
    Nested { in_str: bool, esc: bool },
    /// Inside a top-level string.
    Str { esc: bool },
    /// Inside a bare top-level scalar.
    Scalar,
}

/// Incremental splitter for one connection.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    /// Start of the current value (or of unscanned data between values) in `buf`.
    head: usize,
    /// Next byte of `buf` to scan.
    pos: usize,
    /// Stream offset of `buf[0]`, for error offsets.
    base: u64,
    max: usize,
    state: State,
    closers: Vec<u8>,
    err: Option<SplitError>,
}

/// [`STOP`] bits: the bytes that end a run inside a string, and outside one.
const IN_STR: u8 = 1;
const OUT_STR: u8 = 2;

/// Which bytes end a run of a nested value: `"` and `\\` in a string, `"` and brackets outside.
static STOP: [u8; 256] = {
    let mut t = [0u8; 256];
    t[b'"' as usize] = IN_STR | OUT_STR;
    t[b'\\' as usize] = IN_STR;
    t[b'{' as usize] = OUT_STR;
    t[b'}' as usize] = OUT_STR;
    t[b'[' as usize] = OUT_STR;
    t[b']' as usize] = OUT_STR;
    t
};

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n' | 0)
}

fn is_structural(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b',' | b':' | b'"')
}

impl Splitter {
    /// A splitter that refuses values longer than `max` bytes.
    pub fn new(max: usize) -> Splitter {
        Splitter {
            buf: Vec::new(),
            head: 0,
            pos: 0,
            base: 0,
            max,
            state: State::Between,
            closers: Vec::new(),
            err: None,
        }
    }

    /// Appends received bytes. After an error they are discarded.
    pub fn push(&mut self, data: &[u8]) {
        if self.err.is_some() {
            return;
        }
        // Drop what earlier values used up. What moves is the start of the unfinished value,
        // which then sits at 0 until it completes: each byte moves at most once (linear total).
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.base += self.head as u64;
            self.pos -= self.head;
            self.head = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes held: the unfinished value and the data not yet scanned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.head
    }

    /// The next complete value, None until more bytes arrive, or the (sticky) error.
    // Not an Iterator: after an error this returns the error forever, which would make a
    // `for` loop spin; callers use `while let` and close on the first error.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Vec<u8>, SplitError>> {
        self.next_piece().map(|r| r.map(Piece::into_bytes))
    }

    /// [`Splitter::next`], with an object that is already whole in the buffer read by
    /// [`rpc::scan_prefix`] in the pass that finds its end: the same values, cut in the same
    /// places, and for a valid object the scan its reader would otherwise make again.
    pub fn next_piece(&mut self) -> Option<Result<Piece, SplitError>> {
        if let Some(e) = self.err {
            return Some(Err(e));
        }
        loop {
            // Inside an object or array: one tight loop to the value's end, jumping from one byte
            // that can change the state to the next (a quote or backslash in a string, a quote or
            // bracket outside). It stops at `max` bytes of value, so the byte that makes the value
            // too large is met one at a time below, as are the states outside a nested value.
            if let State::Nested { in_str, esc } = self.state {
                match self.nested_run(in_str, esc) {
                    Ok(Some(end)) => {
                        let value = self.buf.get(self.head..end).map(<[u8]>::to_vec);
                        self.head = end;
                        self.state = State::Between;
                        return value.map(|v| Ok(Piece::Raw(v)));
                    }
                    Ok(None) => {}
                    Err(at) => return Some(Err(self.fail_syntax(at))),
                }
            }
            let Some(&b) = self.buf.get(self.pos) else {
                break;
            };
            let at = self.pos;
            self.pos += 1;
            let done = match self.state {
                State::Between => {
                    if is_space(b) {
                        self.head = self.pos;
                        continue;
                    }
                    self.head = at;
                    if b == b'{' {
                        if let Some(piece) = self.whole_object(at) {
                            return Some(Ok(piece));
                        }
                    }
                    match b {
                        b'{' | b'[' => {
                            self.closers.clear();
                            self.closers.push(if b == b'{' { b'}' } else { b']' });
                            self.state = State::Nested {
                                in_str: false,
                                esc: false,
                            };
                        }
                        b'"' => self.state = State::Str { esc: false },
                        b'}' | b']' | b',' | b':' => return Some(Err(self.fail_syntax(at))),
                        _ => self.state = State::Scalar,
                    }
                    None
                }
                State::Nested { in_str: true, esc } => {
                    let (in_str, esc) = match (esc, b) {
                        (true, _) => (true, false),
                        (false, b'\\') => (true, true),
                        (false, b'"') => (false, false),
                        _ => (true, false),
                    };
                    self.state = State::Nested { in_str, esc };
                    None
                }
                State::Nested { in_str: false, .. } => match b {
                    b'"' => {
                        self.state = State::Nested {
                            in_str: true,
                            esc: false,
                        };
                        None
                    }
                    b'{' => {
                        self.closers.push(b'}');
                        None
                    }
                    b'[' => {
                        self.closers.push(b']');
                        None
                    }
                    b'}' | b']' => {
                        if self.closers.pop() != Some(b) {
                            return Some(Err(self.fail_syntax(at)));
                        }
                        self.closers.is_empty().then_some(self.pos)
                    }
                    _ => None,
                },
                State::Str { esc: true } => {
                    self.state = State::Str { esc: false };
                    None
                }
                State::Str { esc: false } => match b {
                    b'\\' => {
                        self.state = State::Str { esc: true };
                        None
                    }
                    b'"' => Some(self.pos),
                    _ => None,
                },
                State::Scalar => {
                    if is_space(b) || is_structural(b) {
                        // The delimiter belongs to what follows; scan it again as such.
                        self.pos = at;
                        Some(at)
                    } else {
                        None
                    }
                }
            };
            let size = done.unwrap_or(self.pos) - self.head;
            if size > self.max {
                // Checked at every byte, so the error does not depend on how input was chunked.
                return Some(Err(self.fail(SplitError::TooLarge { size })));
            }
            if let Some(end) = done {
                let value = self.buf.get(self.head..end).map(<[u8]>::to_vec);
                self.head = end;
                self.state = State::Between;
                return value.map(|v| Ok(Piece::Raw(v)));
            }
        }
        None
    }

    /// The fast path of an object starting at `at`: when the buffer already holds all of it, at
    /// most `max` bytes, and it is valid JSON, one walk finds its end and its head. A valid
    /// object ends where the bracket count ends it, so the cut is the slow path's. Otherwise
    /// None, and the slow path scans it from `at` (each byte at most twice, whatever the pushes).
    fn whole_object(&mut self, at: usize) -> Option<Piece> {
        let limit = self.buf.len().min(at.saturating_add(self.max));
        let (len, head) = rpc::scan_prefix(self.buf.get(at..limit)?)?;
        let end = at + len;
        let bytes = self.buf.get(at..end)?;
        // Room for a longer id: a report's id is rewritten in place (P§5.7, `rpc::rewrite_id_in_place`).
        let mut value = Vec::with_capacity(bytes.len() + ID_ROOM);
        value.extend_from_slice(bytes);
        self.head = end;
        self.pos = end;
        self.state = State::Between;
        Some(match String::from_utf8(value) {
            Ok(text) => Piece::Scanned { text, head },
            Err(e) => Piece::Raw(e.into_bytes()),
        })
    }

    /// The nested-value states from `pos` up to `max` bytes of value: the value's end, or None with
    /// `pos` and the state where the run stopped, or the offset of a mismatched closer.
    fn nested_run(&mut self, mut in_str: bool, mut esc: bool) -> Result<Option<usize>, usize> {
        let limit = self.buf.len().min(self.head.saturating_add(self.max));
        let run = self.buf.get(..limit).unwrap_or(&[]);
        let mut p = self.pos;
        let mut end = None;
        if esc && p < limit {
            esc = false;
            p += 1;
        }
        // One table load per byte: the bytes that can change the state, in or out of a string.
        let mut mask = if in_str { IN_STR } else { OUT_STR };
        while let Some(&c) = run.get(p) {
            p += 1;
            if STOP[usize::from(c)] & mask == 0 {
                continue;
            }
            match c {
                b'\\' => {
                    // The escaped byte cannot change the state; it may be in the next push.
                    if p < limit {
                        p += 1;
                    } else {
                        esc = true;
                    }
                }
                b'"' => {
                    in_str = !in_str;
                    mask ^= IN_STR | OUT_STR;
                }
                b'{' => self.closers.push(b'}'),
                b'[' => self.closers.push(b']'),
                c => {
                    if self.closers.pop() != Some(c) {
                        self.pos = p;
                        return Err(p - 1);
                    }
                    if self.closers.is_empty() {
                        end = Some(p);
                        break;
                    }
                }
            }
        }
        self.pos = p;
        self.state = State::Nested { in_str, esc };
        Ok(end)
    }

    fn fail_syntax(&mut self, at: usize) -> SplitError {
        let offset = self.base + at as u64;
        self.fail(SplitError::Syntax { offset })
    }

    fn fail(&mut self, e: SplitError) -> SplitError {
        self.err = Some(e);
        // Nothing more will be read from this stream; release its memory.
        self.buf = Vec::new();
        self.closers = Vec::new();
        self.head = 0;
        self.pos = 0;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Everything the splitter yields until None or the first error.
    fn drain(s: &mut Splitter, out: &mut Vec<Result<Vec<u8>, SplitError>>) -> bool {
        while let Some(r) = s.next() {
            let err = r.is_err();
            out.push(r);
            if err {
                return true;
            }
        }
        false
    }

    fn split_chunks(max: usize, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, SplitError>> {
        let mut s = Splitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            if drain(&mut s, &mut out) {
                break;
            }
        }
        out
    }

    fn split(input: &[u8]) -> Vec<Result<Vec<u8>, SplitError>> {
        split_chunks(16384, &[input])
    }

    fn ok(vals: &[&str]) -> Vec<Result<Vec<u8>, SplitError>> {
        vals.iter().map(|v| Ok(v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn whole_valid_objects_come_scanned() {
        let mut s = Splitter::new(16384);
        s.push(b"{\"id\":1,\"method\":\"props\"} {\"a\":} {\"s\":\"\xff\"} [1] {\"id\":");
        let text = "{\"id\":1,\"method\":\"props\"}".to_owned();
        let head = rpc::scan(text.as_bytes()).unwrap();
        assert_eq!(s.next_piece(), Some(Ok(Piece::Scanned { text, head })));
        // Not valid JSON, not UTF-8, not an object: cut as before, left to the reader.
        assert_eq!(s.next_piece(), Some(Ok(Piece::Raw(b"{\"a\":}".to_vec()))));
        assert_eq!(
            s.next_piece(),
            Some(Ok(Piece::Raw(b"{\"s\":\"\xff\"}".to_vec())))
        );
        assert_eq!(s.next_piece(), Some(Ok(Piece::Raw(b"[1]".to_vec()))));
        // An object that arrives in parts goes the slow way.
        assert_eq!(s.next_piece(), None);
        s.push(b"2}");
        assert_eq!(s.next_piece(), Some(Ok(Piece::Raw(b"{\"id\":2}".to_vec()))));
    }

    #[test]
    fn several_values_in_one_push() {
        assert_eq!(
            split(br#"{"id":0,"result":["ok"]}{"id":0,"result":["ok"]}"#),
            ok(&[r#"{"id":0,"result":["ok"]}"#, r#"{"id":0,"result":["ok"]}"#])
        );
    }

    #[test]
    fn separators_skipped() {
        assert_eq!(
            split(b" \t\r\n\0{\"a\":1}\n\0\0 [1, 2]\r\n{}\0"),
            ok(&[r#"{"a":1}"#, "[1, 2]", "{}"])
        );
        assert_eq!(split(b" \n\0\t\r"), ok(&[]));
    }

    #[test]
    fn value_spans_pushes() {
        let chunks: [&[u8]; 5] = [
            b"{\"me",
            b"thod\":\"x\\",
            b"\"y\",\"p\":[",
            b"1,{}]",
            b"}  {",
        ];
        let mut s = Splitter::new(100);
        let mut out = Vec::new();
        for c in &chunks[..4] {
            s.push(c);
            assert!(s.next().is_none());
        }
        s.push(chunks[4]);
        drain(&mut s, &mut out);
        assert_eq!(out, ok(&[r#"{"method":"x\"y","p":[1,{}]}"#]));
        assert_eq!(s.buffered(), 1, "the started `{{` is held");
    }

    #[test]
    fn strings_and_escapes() {
        let input = br#"{"a":"}]{[","b":"\\","c":"\"}","d":"Asia\/Shanghai"}"#;
        assert_eq!(split(input), ok(&[core::str::from_utf8(input).unwrap()]));
        // A backslash at the end of a push escapes the first byte of the next.
        assert_eq!(
            split_chunks(100, &[b"[\"\\", b"\"]\"]"]),
            ok(&[r#"["\"]"]"#])
        );
        assert_eq!(
            split_chunks(100, &[b"\"a\\", b"\"b\" 1 "]),
            ok(&[r#""a\"b""#, "1"])
        );
    }

    #[test]
    fn top_level_scalars() {
        assert_eq!(
            split(b"\"str\" 123 true\0null\t-1.5e3 garbage{}"),
            ok(&["\"str\"", "123", "true", "null", "-1.5e3", "garbage", "{}"])
        );
        // A scalar is held until its delimiter arrives.
        let mut s = Splitter::new(100);
        s.push(b"12");
        assert!(s.next().is_none());
        s.push(b"34");
        assert!(s.next().is_none());
        assert_eq!(s.buffered(), 4);
        s.push(b"\n");
        assert_eq!(s.next(), Some(Ok(b"1234".to_vec())));
        assert!(s.next().is_none());
        // A scalar ended by a string or a closer.
        assert_eq!(split(b"1\"x\""), ok(&["1", "\"x\""]));
        assert_eq!(
            split(b"true]"),
            vec![Ok(b"true".to_vec()), Err(SplitError::Syntax { offset: 4 })]
        );
    }

    #[test]
    fn syntax_errors_are_sticky() {
        assert_eq!(split(b"}"), vec![Err(SplitError::Syntax { offset: 0 })]);
        assert_eq!(
            split(b"{}  ]"),
            vec![Ok(b"{}".to_vec()), Err(SplitError::Syntax { offset: 4 })]
        );
        assert_eq!(
            split(b"{\"a\":[1}"),
            vec![Err(SplitError::Syntax { offset: 7 })]
        );
        assert_eq!(split(b"[{]}"), vec![Err(SplitError::Syntax { offset: 2 })]);
        assert_eq!(
            split(b"{},{}"),
            vec![Ok(b"{}".to_vec()), Err(SplitError::Syntax { offset: 2 })]
        );
        assert_eq!(split(b":"), vec![Err(SplitError::Syntax { offset: 0 })]);

        // Offsets count from the start of the stream across pushes.
        let mut s = Splitter::new(100);
        s.push(b"{}{}");
        assert!(s.next().unwrap().is_ok());
        assert!(s.next().unwrap().is_ok());
        s.push(b" \n{]");
        let e = SplitError::Syntax { offset: 7 };
        assert_eq!(s.next(), Some(Err(e)));
        s.push(b"{}");
        assert_eq!(s.next(), Some(Err(e)));
        assert_eq!(s.next(), Some(Err(e)));
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn too_large() {
        // Exactly max is fine; one more byte is not.
        assert_eq!(split_chunks(8, &[b"{\"a\":12}"]), ok(&["{\"a\":12}"]));
        assert_eq!(
            split_chunks(8, &[b"{\"a\":123}"]),
            vec![Err(SplitError::TooLarge { size: 9 })]
        );
        // Refused while still incomplete, before the closer ever arrives.
        let mut s = Splitter::new(8);
        s.push(b"[\"012345");
        assert!(s.next().is_none());
        s.push(b"6");
        assert_eq!(s.next(), Some(Err(SplitError::TooLarge { size: 9 })));
        assert_eq!(s.buffered(), 0);
        s.push(b"]");
        assert_eq!(s.next(), Some(Err(SplitError::TooLarge { size: 9 })));
        // Separators do not count towards the limit; scalars and strings do.
        assert_eq!(split_chunks(2, &[b"   \n\n\0\0 {}  "]), ok(&["{}"]));
        assert_eq!(
            split_chunks(3, &[b"1234"]),
            vec![Err(SplitError::TooLarge { size: 4 })]
        );
        assert_eq!(
            split_chunks(3, &[b"\"ab\""]),
            vec![Err(SplitError::TooLarge { size: 4 })]
        );
    }

    #[test]
    fn memory_stays_bounded() {
        let max = 64;
        let mut s = Splitter::new(max);
        let mut out = Vec::new();
        for _ in 0..1000 {
            s.push(b"{\"id\":1}\n{\"id\":2}{\"x\":[");
            let _ = drain(&mut s, &mut out);
            s.push(b"]}");
            let _ = drain(&mut s, &mut out);
            assert!(s.buffered() <= max);
            assert!(s.buf.len() <= max + 40, "{}", s.buf.len());
        }
        assert_eq!(out.len(), 3000);
        assert!(out.iter().all(|r| r.is_ok()));
    }

    #[test]
    fn display() {
        assert_eq!(
            SplitError::Syntax { offset: 3 }.to_string(),
            "JSON syntax error at byte 3"
        );
        assert!(SplitError::TooLarge { size: 9 }.to_string().contains('9'));
    }

    /// Bytes biased towards JSON punctuation so nesting, strings and escapes get exercised.
    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            3 => prop::sample::select(b"{}[]\"\\ ,:\n\0a1".to_vec()),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..300)
    }

    /// A stream of valid values with separators, to check that good input splits exactly.
    fn values() -> impl Strategy<Value = Vec<String>> {
        let v = prop_oneof![
            Just(r#"{"id":1,"method":"a\"}","params":[{"x":"\\"}]}"#.to_string()),
            Just("[[],{},\"]\"]".to_string()),
            Just("\"}{\"".to_string()),
            Just("-12.5".to_string()),
            any::<String>().prop_map(|s| serde_json::Value::String(s).to_string()),
        ];
        prop::collection::vec(v, 0..8)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        #[test]
        fn chunking_does_not_matter(input in stream(),
                                    cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
                                    max in 1usize..64) {
            let whole = split_chunks(max, &[&input]);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            at.push(0);
            at.push(input.len());
            at.sort_unstable();
            let chunks: Vec<&[u8]> = at.windows(2).map(|w| &input[w[0]..w[1]]).collect();
            prop_assert_eq!(split_chunks(max, &chunks), whole);
            // One byte at a time, with the bound checked after every push.
            let mut s = Splitter::new(max);
            let mut out = Vec::new();
            for b in &input {
                s.push(core::slice::from_ref(b));
                if drain(&mut s, &mut out) {
                    break;
                }
                prop_assert!(s.buffered() <= max);
            }
            prop_assert_eq!(out, split_chunks(max, &[&input]));
        }

        #[test]
        fn valid_values_come_out_whole(vals in values(), seps in prop::collection::vec(
                prop::sample::select(vec!["", " ", "\n", "\0", "\r\n", "\t\0 "]), 8)) {
            let mut input = Vec::new();
            let mut want = Vec::new();
            for (i, v) in vals.iter().enumerate() {
                input.extend_from_slice(v.as_bytes());
                // A scalar needs a delimiter after it.
                let sep = if seps[i].is_empty() && v.starts_with('-') { " " } else { seps[i] };
                input.extend_from_slice(sep.as_bytes());
                want.push(Ok(v.as_bytes().to_vec()));
            }
            prop_assert_eq!(split(&input), want);
        }
    }
}
