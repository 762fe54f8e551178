//! The one write queue of the daemon's TCP streams: the local connections (54322/54323, the helper
//! channel) and the cloud's TCP link (ARCHITECTURE.md §4.2). It holds whole messages, not bytes, and
//! is bounded: a message that would take the unsent bytes over the queue's cap is refused with
//! [`Overflow`], and the caller applies its rule (a local client is closed, L§2; a cloud packet is
//! dropped). The queue itself decides nothing.
//!
//! A message is kept as it was handed over, never copied: a broadcast is one `Rc<str>` that every
//! client's queue shares (20 clients that do not read hold one copy of it, not 20), and a cloud
//! packet is the sealed `Vec<u8>` itself. The cap counts, per queue, the bytes still to be written.

use std::io::{self, Write};
use std::rc::Rc;

/// One queued message.
#[derive(Debug)]
pub enum Chunk {
    /// Text that other queues may hold too (a broadcast to local clients).
    Shared(Rc<str>),
    /// Bytes this queue alone holds (a cloud packet).
    Owned(Vec<u8>),
}

impl Chunk {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(s) => s.as_bytes(),
            Chunk::Owned(v) => v,
        }
    }
}

impl From<Rc<str>> for Chunk {
    fn from(s: Rc<str>) -> Chunk {
        Chunk::Shared(s)
    }
}

impl From<Vec<u8>> for Chunk {
    fn from(v: Vec<u8>) -> Chunk {
        Chunk::Owned(v)
    }
}

/// A message beyond the queue's cap: nothing was queued, the caller applies its rule.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

/// Two plain `Vec`s rather than a `VecDeque`, whose ring-buffer code would be linked for this one
/// type (ARCHITECTURE.md §6): messages are pushed onto `back`; when `front` runs dry, `back`
/// becomes `front`, reversed, and is written from its end.
#[derive(Debug)]
pub struct WriteQueue {
    /// Messages pushed since the last refill of `front`, oldest first.
    back: Vec<Chunk>,
    /// Messages older than all of `back`, newest first: the one being written is the last.
    front: Vec<Chunk>,
    /// Bytes of the first message already written.
    pos: usize,
    /// Bytes queued and not yet written: what the cap counts.
    len: usize,
    limit: usize,
}

impl WriteQueue {
    /// An empty queue that holds at most `limit` unsent bytes.
    pub fn new(limit: usize) -> WriteQueue {
        WriteQueue {
            back: Vec::new(),
            front: Vec::new(),
            pos: 0,
            len: 0,
            limit,
        }
    }

    /// Queues one whole message after the others, or refuses it when the unsent bytes would exceed
    /// the cap. It writes nothing: the caller flushes.
    pub fn push(&mut self, msg: impl Into<Chunk>) -> Result<(), Overflow> {
        let msg = msg.into();
        let n = msg.bytes().len();
        if self.len + n > self.limit {
            return Err(Overflow);
        }
        self.len += n;
        self.back.push(msg);
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Writes queued messages in order until the queue is empty or `w` would block. Ok(true) when
    /// the queue is empty; an error (a zero-length write counts as one) is the stream's failure.
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<bool> {
        loop {
            if self.front.is_empty() {
                std::mem::swap(&mut self.front, &mut self.back);
                self.front.reverse();
            }
            let Some(msg) = self.front.last() else { break };
            let rest = &msg.bytes()[self.pos..];
            if rest.is_empty() {
                self.front.pop();
                self.pos = 0;
                continue;
            }
            match w.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pos += n;
                    self.len -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The queued messages, oldest first, and how much of the first is written (tests).
    #[cfg(test)]
    pub fn chunks(&self) -> (Vec<&Chunk>, usize) {
        (
            self.front.iter().rev().chain(&self.back).collect(),
            self.pos,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `room` bytes, then would block.
    struct Pipe {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn shared_and_owned_messages_go_out_in_order_under_one_cap() {
        let mut q = WriteQueue::new(10);
        let s: Rc<str> = "abc".into();
        q.push(s.clone()).unwrap();
        q.push(b"defg".to_vec()).unwrap();
        assert_eq!(q.len(), 7);
        // 7 + 4 > 10: refused, nothing queued.
        assert_eq!(q.push(b"hijk".to_vec()), Err(Overflow));
        assert_eq!(q.len(), 7);
        let mut p = Pipe {
            got: Vec::new(),
            room: 5,
        };
        assert!(!q.write_to(&mut p).unwrap());
        assert_eq!(q.len(), 2);
        assert_eq!(q.chunks().1, 2);
        p.room = 100;
        assert!(q.write_to(&mut p).unwrap());
        assert_eq!(p.got, b"abcdefg");
        assert!(q.is_empty());
        assert_eq!(Rc::strong_count(&s), 1);
    }

    #[test]
    fn a_zero_length_write_is_a_failure() {
        struct Zero;
        impl Write for Zero {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut q = WriteQueue::new(10);
        q.push(b"x".to_vec()).unwrap();
        assert!(q.write_to(&mut Zero).is_err());
    }
}
