//! A local TCP connection (54322/54323 clients, the helper channel): non-blocking reads fed to the
//! JSON stream splitter (LOCAL_API.md §3) and a bounded write queue (64 KiB, §2) so that a client
//! that never reads is closed instead of growing the daemon's memory.

use std::io::{self, Read, Write};

use mio::net::TcpStream;

use crate::wire::json_stream::{SplitError, Splitter};

/// What one readable event produced.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    /// Complete top-level JSON values (or the splitter's error, after which the caller closes).
    pub values: Vec<Result<Vec<u8>, SplitError>>,
    /// The peer closed its write side (or the socket failed).
    pub eof: bool,
}

pub struct Conn {
    pub stream: TcpStream,
    split: Splitter,
    out: Vec<u8>,
    out_pos: usize,
    out_limit: usize,
    /// Close once the output queue is flushed (one-shot helper writes, errors before close).
    pub close_after_flush: bool,
    /// Shut the write side once the output queue is flushed (one message per hello, L§9.2).
    shutdown_pending: bool,
}

/// Output beyond the per-connection limit: the caller closes the connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

impl Conn {
    pub fn new(stream: TcpStream, max_msg: usize, out_limit: usize) -> Conn {
        Conn {
            stream,
            split: Splitter::new(max_msg),
            out: Vec::new(),
            out_pos: 0,
            out_limit,
            close_after_flush: false,
            shutdown_pending: false,
        }
    }

    /// Reads until WouldBlock, feeding the splitter. Stops early at the first split error.
    pub fn read_ready(&mut self) -> ReadOutcome {
        let mut o = ReadOutcome::default();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    o.eof = true;
                    break;
                }
                Ok(n) => {
                    self.split.push(&buf[..n]);
                    let mut failed = false;
                    while let Some(v) = self.split.next() {
                        failed = v.is_err();
                        o.values.push(v);
                        if failed {
                            break;
                        }
                    }
                    if failed {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    o.eof = true;
                    break;
                }
            }
        }
        o
    }

    pub fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Queues one whole message and tries to write it at once.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Overflow> {
        if self.pending_out() + bytes.len() > self.out_limit {
            return Err(Overflow);
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        self.out.extend_from_slice(bytes);
        // A write error surfaces as a readable/closed event and is handled there.
        let _ = self.flush();
        Ok(())
    }

    /// Writes queued output until WouldBlock. Ok(true) when the queue is empty.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if self.shutdown_pending {
            self.shutdown_pending = false;
            self.shutdown_write();
        }
        Ok(true)
    }

    /// Shuts the write side as soon as everything queued is written.
    pub fn shutdown_after_flush(&mut self) {
        if self.pending_out() == 0 {
            self.shutdown_write();
        } else {
            self.shutdown_pending = true;
        }
    }

    /// Shuts the write side (the helper hello connection gets one message, then EOF, L§9.2).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}
