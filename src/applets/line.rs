//! The helper's line tools (LOCAL_API.md §9.1), supersets of the vendor's:
//! - `miio_send_line MSG`: connect to 127.0.0.1:`$MIIO_LOCAL_PORT` (default 54322), write MSG exactly
//!   (no newline, no NUL), close, exit 0. No argument → usage, exit 1; more than 16384 bytes → exit 1;
//!   connect failure → exit 255.
//! - `miio_recv_line`: connect, write `{"method":"_internal.hello"}`, block until one complete JSON
//!   value (or EOF) arrives, print it and `\n` on stdout, exit 0. EOF before any byte → exit 255;
//!   a value over 16384 bytes → `ERROR, buffer too small`, exit 1.
//!
//! Blocking std sockets: each run does one short exchange. Diagnostics go to stderr, since helper
//! scripts capture stdout (`BUF=$(miio_recv_line)`).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpStream};

use crate::wire::json_stream::{SplitError, Splitter};

/// L§9.1 / D8: the largest message either tool handles.
const MAX: usize = 16384;
const DEFAULT_PORT: u16 = 54322;
const HELLO: &[u8] = br#"{"method":"_internal.hello"}"#;

/// `$MIIO_LOCAL_PORT`, or the default when unset or empty; `Err` names a value that is no port.
fn port() -> Result<u16, String> {
    match std::env::var("MIIO_LOCAL_PORT") {
        Ok(v) if !v.trim().is_empty() => match crate::cli::uint::<u16>(v.trim()) {
            Some(p) if p != 0 => Ok(p),
            _ => Err(v),
        },
        _ => Ok(DEFAULT_PORT),
    }
}

/// Connects to the daemon, or prints why and returns the exit status.
fn connect() -> Result<TcpStream, i32> {
    let port = port().map_err(|v| {
        eprintln!("invalid MIIO_LOCAL_PORT: {}", crate::config::Quoted(&v));
        1
    })?;
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|_| {
        eprintln!("Connect to server error: 127.0.0.1:{port}");
        255
    })
}

/// `miio_send_line MSG`.
pub fn send_main(args: &[String]) -> i32 {
    let Some(msg) = args.first() else {
        eprintln!("Usage: miio_send_line msg");
        return 1;
    };
    if msg.len() > MAX {
        eprintln!("msg too long, max {MAX}");
        return 1;
    }
    let mut s = match connect() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = s.write_all(msg.as_bytes()) {
        eprintln!("send error: {e}");
        return 255;
    }
    // Dropping the stream closes it: the daemon reads the message, then EOF.
    0
}

/// What the daemon said, as far as `miio_recv_line` is concerned.
enum Heard {
    /// One complete value (or, at EOF or on a syntax error, the bytes as they came).
    Said(Vec<u8>),
    /// EOF before any byte.
    Nothing,
    TooLarge,
}

/// Reads until one complete JSON value, EOF, or too many bytes.
fn listen(r: &mut impl Read) -> Heard {
    let mut split = Splitter::new(MAX);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match r.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A reset counts as EOF: print what arrived, if anything.
            Err(_) => 0,
        };
        let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
            return match trim_start(&raw) {
                [] if raw.is_empty() => Heard::Nothing,
                rest => Heard::Said(rest.to_vec()),
            };
        };
        if raw.len() <= MAX {
            raw.extend_from_slice(chunk);
        }
        split.push(chunk);
        match split.next() {
            Some(Ok(v)) => return Heard::Said(v),
            Some(Err(SplitError::TooLarge { .. })) => return Heard::TooLarge,
            // Not JSON: what came is all there is to tell.
            Some(Err(SplitError::Syntax { .. })) => return Heard::Said(trim_start(&raw).to_vec()),
            None => {}
        }
    }
}

/// Drops the whitespace and NULs the splitter skips between values (L§3).
fn trim_start(b: &[u8]) -> &[u8] {
    let skip = b
        .iter()
        .take_while(|&&c| matches!(c, b' ' | b'\t' | b'\r' | b'\n' | 0))
        .count();
    b.get(skip..).unwrap_or(&[])
}

/// `miio_recv_line`.
pub fn recv_main(_args: &[String]) -> i32 {
    let mut s = match connect() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if s.write_all(HELLO).is_err() {
        return 255;
    }
    match listen(&mut s) {
        Heard::Nothing => 255,
        Heard::TooLarge => {
            eprintln!("ERROR, buffer too small");
            1
        }
        Heard::Said(mut v) => {
            v.push(b'\n');
            let mut out = io::stdout().lock();
            match out.write_all(&v).and_then(|_| out.flush()) {
                Ok(()) => 0,
                Err(_) => 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out the given chunks, then EOF.
    struct Chunks(Vec<Vec<u8>>);

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            let c = self.0.remove(0);
            let n = c.len().min(buf.len());
            buf[..n].copy_from_slice(&c[..n]);
            if n < c.len() {
                self.0.insert(0, c[n..].to_vec());
            }
            Ok(n)
        }
    }

    fn heard(chunks: &[&[u8]]) -> Result<Vec<u8>, &'static str> {
        match listen(&mut Chunks(chunks.iter().map(|c| c.to_vec()).collect())) {
            Heard::Said(v) => Ok(v),
            Heard::Nothing => Err("nothing"),
            Heard::TooLarge => Err("too large"),
        }
    }

    #[test]
    fn one_value_whatever_the_chunking() {
        assert_eq!(heard(&[br#"{"a":1}"#]), Ok(br#"{"a":1}"#.to_vec()));
        assert_eq!(
            heard(&[b"\0\n {\"a\"", b":[1,", b"2]}{\"b\":2}"]),
            Ok(br#"{"a":[1,2]}"#.to_vec())
        );
    }

    #[test]
    fn eof_cases() {
        assert_eq!(heard(&[]), Err("nothing"));
        // Something, then EOF before the value completed: printed as it came.
        assert_eq!(heard(&[b"{\"a\":"]), Ok(b"{\"a\":".to_vec()));
        assert_eq!(heard(&[b"\n"]), Ok(Vec::new()));
    }

    #[test]
    fn size_limit() {
        let mut big = b"{\"a\":\"".to_vec();
        big.resize(MAX + 1, b'x');
        assert_eq!(heard(&[&big]), Err("too large"));
        let mut fits = b"{\"a\":\"".to_vec();
        fits.resize(MAX - 2, b'x');
        fits.extend_from_slice(b"\"}");
        assert_eq!(heard(&[&fits]).map(|v| v.len()), Ok(MAX));
    }
}
