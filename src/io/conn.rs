//! A local TCP connection (54322/54323 clients, the helper channel): non-blocking reads fed to the
//! JSON stream splitter (LOCAL_API.md §3) and a bounded [`WriteQueue`] (64 KiB, §2) so that a client
//! that never reads is closed instead of growing the daemon's memory. Input is read a bounded chunk
//! at a time and split values are handled one by one, so a fast writer costs no memory either.
//!
//! The write queue holds messages, not bytes: a broadcast is one `Rc<str>` that every client's queue
//! shares, so 20 clients that do not read hold one copy of it, not 20 (`io::writeq`).

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::rc::Rc;

use mio::net::TcpStream;

use super::sys;
use super::writeq::{Overflow, WriteQueue};
use crate::wire::json_stream::{SplitError, Splitter};

/// SO_SNDBUF of a local connection. Loopback autotunes a send buffer to MBs, so a client that does
/// not read would hold that much kernel memory long before the daemon's own 64 KiB cap (L§2) is
/// reached. 16 KiB (the kernel doubles it for its overhead) still takes one whole `--max-msg`
/// message; a queue beyond that is the daemon's, counted against the cap.
const SNDBUF: i32 = 16 * 1024;

/// Bytes read from a connection per turn of the reactor. One read per ready socket per turn keeps
/// the daemon fair (a fast writer cannot hold the loop) and bounds what one turn buffers: the
/// splitter holds at most one unfinished value (`max_msg`) plus this.
pub const READ_CHUNK: usize = 4096;

/// What one bounded read did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadStep {
    /// The socket may hold more: read again next turn without waiting for a new edge.
    More,
    /// Drained (WouldBlock, or a short read of a socket not reported closed): the next edge says
    /// when there is more.
    Drained,
    /// The peer closed its write side (or the socket failed).
    Eof,
}

pub struct Conn {
    pub stream: TcpStream,
    split: Splitter,
    /// Messages not yet written; a broadcast is shared with other clients' queues.
    out: WriteQueue,
    /// Close once the output queue is flushed (one-shot helper writes, errors before close).
    pub close_after_flush: bool,
    /// Shut the write side once the output queue is flushed (one message per hello, L§9.2).
    shutdown_pending: bool,
}

impl Conn {
    pub fn new(stream: TcpStream, max_msg: usize, out_limit: usize) -> Conn {
        // Best effort: without it the connection still works, with the kernel's default buffer.
        let _ = sys::set_sndbuf(stream.as_raw_fd(), SNDBUF);
        Conn {
            stream,
            split: Splitter::new(max_msg),
            out: WriteQueue::new(out_limit),
            close_after_flush: false,
            shutdown_pending: false,
        }
    }

    /// One read of at most [`READ_CHUNK`] bytes into the splitter. The caller then takes the values
    /// with [`Conn::next_value`] and handles each before reading again.
    ///
    /// `closed`: the readiness event also reported the peer's close or a socket error. Data and a
    /// FIN (or RST) that arrive together raise one edge; a short read then takes the data and
    /// leaves the end unread, and no later edge reports it, so the read must be repeated.
    ///
    /// `scratch` is the reactor's receive buffer (reused: no 4 KiB to clear per read); at most
    /// [`READ_CHUNK`] bytes of it are used.
    pub fn read_once(&mut self, closed: bool, scratch: &mut [u8]) -> ReadStep {
        let n = scratch.len().min(READ_CHUNK);
        let buf = &mut scratch[..n];
        loop {
            return match self.stream.read(buf) {
                Ok(0) => ReadStep::Eof,
                Ok(n) => {
                    self.split.push(&buf[..n]);
                    // A short read took all the data the kernel had; data arriving later raises a
                    // new edge, an end already reported does not.
                    if n < buf.len() && !closed {
                        ReadStep::Drained
                    } else {
                        ReadStep::More
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadStep::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => ReadStep::Eof,
            };
        }
    }

    /// The next complete value read so far, or the splitter's (sticky) error: the caller closes.
    pub fn next_value(&mut self) -> Option<Result<Vec<u8>, SplitError>> {
        self.split.next()
    }

    /// Backpressure: input is read only while the replies to earlier input are mostly written.
    /// Above half the cap the client's requests wait in the kernel and TCP slows the client down.
    /// The other half is room for the replies to one chunk (a 4 KiB chunk of `local.*` requests
    /// gives about 10 KiB) and for broadcasts, so in practice only a client that does not read
    /// reaches the cap (L§2) and is closed.
    pub fn wants_input(&self) -> bool {
        self.pending_out() <= self.out.limit() / 2
    }

    pub fn pending_out(&self) -> usize {
        self.out.len()
    }

    /// Queues one whole message (kept, not copied: a broadcast stays one allocation however many
    /// queues hold it) and tries to write it at once. Beyond the cap the caller closes (L§2).
    pub fn send(&mut self, msg: Rc<str>) -> Result<(), Overflow> {
        self.out.push(msg)?;
        // A write error surfaces as a readable/closed event and is handled there.
        let _ = self.flush();
        Ok(())
    }

    /// Writes queued output until WouldBlock. Ok(true) when the queue is empty.
    pub fn flush(&mut self) -> io::Result<bool> {
        if !self.out.write_to(&mut self.stream)? {
            return Ok(false);
        }
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

    /// Makes the coming close a reset: a client dropped for not reading leaves no orphan socket
    /// that holds its unsent data in the kernel.
    pub fn reset_on_close(&self) {
        let _ = sys::set_linger_reset(self.stream.as_raw_fd());
    }

    /// Shuts the write side (the helper hello connection gets one message, then EOF, L§9.2).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::writeq::Chunk;
    use std::io::Write;
    use std::net::TcpListener;

    /// A connection to a peer on loopback that reads only when the test says so.
    fn pair(limit: usize) -> (Conn, std::net::TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (Conn::new(TcpStream::from_std(s), 1024, limit), peer)
    }

    /// Data and the peer's end arrive before the daemon looks: one edge reports both. The loop
    /// the daemon runs (one read per turn, again while `More`, then wait for an edge) must reach
    /// the end: a FIN closes the slot, an RST (the cloud's reset mid-ack) fails the link now.
    fn end_with_data_is_seen(rst: bool) {
        use crate::io::reactor::Ready;
        use mio::{Events, Interest, Poll, Token};
        let (mut c, mut peer) = pair(1 << 16);
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut c.stream, Token(7), Interest::READABLE)
            .unwrap();
        let mut events = Events::with_capacity(8);
        poll.poll(&mut events, Some(std::time::Duration::ZERO))
            .unwrap();
        peer.write_all(b"{\"id\":1,\"result\":[\"ok\"]}").unwrap();
        if rst {
            sys::set_linger_reset(peer.as_raw_fd()).unwrap();
        }
        drop(peer);
        // Both are queued at the socket before the first wait.
        let mut ready = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ready.is_empty() {
            assert!(std::time::Instant::now() < deadline, "no event");
            poll.poll(&mut events, Some(std::time::Duration::from_millis(100)))
                .unwrap();
            ready.extend(events.iter().map(Ready::of));
        }
        let mut closed = ready.iter().any(|r| r.closed);
        for turn in 0.. {
            assert!(turn < 4, "the end was never read");
            match c.read_once(closed, &mut [0; READ_CHUNK]) {
                ReadStep::Eof => break,
                ReadStep::More => closed = false, // served again, with no new event
                ReadStep::Drained => {
                    // The daemon now waits for an edge: there must be one.
                    poll.poll(&mut events, Some(std::time::Duration::from_millis(200)))
                        .unwrap();
                    let evs: Vec<Ready> = events.iter().map(Ready::of).collect();
                    assert!(
                        !evs.is_empty(),
                        "drained, and no edge will say the peer left"
                    );
                    closed = evs.iter().any(|r| r.closed);
                }
            }
        }
        assert_eq!(
            c.next_value().unwrap().unwrap(),
            b"{\"id\":1,\"result\":[\"ok\"]}"
        );
    }

    #[test]
    fn fin_that_came_with_data_is_read() {
        end_with_data_is_seen(false);
    }

    #[test]
    fn reset_that_came_with_data_is_read() {
        end_with_data_is_seen(true);
    }

    #[test]
    fn a_broadcast_queued_for_clients_that_do_not_read_is_held_once() {
        const LIMIT: usize = 1 << 20;
        let (mut a, _pa) = pair(LIMIT);
        let (mut b, _pb) = pair(LIMIT);
        let msg: Rc<str> = "x".repeat(8192).into();
        // Until the kernel buffers are full, then some more: queued in the daemon.
        let mut sent = 0;
        let queued_msgs = |c: &Conn| c.out.chunks().0.len();
        while queued_msgs(&a) < 4 || queued_msgs(&b) < 4 {
            a.send(msg.clone()).unwrap();
            b.send(msg.clone()).unwrap();
            sent += 1;
            assert!(
                sent < 1000,
                "the kernel took {sent} messages: nothing queued"
            );
        }
        // Every queued piece of both queues is the one allocation.
        assert!(a
            .out
            .chunks()
            .0
            .iter()
            .chain(b.out.chunks().0.iter())
            .all(|m| matches!(m, Chunk::Shared(m) if Rc::ptr_eq(m, &msg))));
        assert_eq!(
            Rc::strong_count(&msg),
            1 + queued_msgs(&a) + queued_msgs(&b)
        );
        // The cap counts bytes per client as before.
        let queued = |c: &Conn| queued_msgs(c) * 8192 - c.out.chunks().1;
        assert_eq!(a.pending_out(), queued(&a));
        assert_eq!(b.pending_out(), queued(&b));
    }

    #[test]
    fn the_cap_counts_unsent_bytes_and_order_is_kept() {
        use std::io::Read as _;
        const LIMIT: usize = 64 * 1024;
        let (mut c, mut peer) = pair(LIMIT);
        let mut all = Vec::new();
        let mut n = 0u32;
        // Numbered messages until the cap refuses one; none of them is lost or reordered.
        let refused = loop {
            let m: Rc<str> = format!("[{n},\"{}\"]", "y".repeat(1000)).into();
            match c.send(m.clone()) {
                Ok(()) => all.extend_from_slice(m.as_bytes()),
                Err(Overflow) => break m,
            }
            assert!(c.pending_out() <= LIMIT);
            n += 1;
            assert!(n < 100_000, "never refused");
        };
        assert!(c.pending_out() + refused.len() > LIMIT);
        assert!(!c.wants_input());
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < all.len() {
            let _ = c.flush();
            let k = peer.read(&mut buf).unwrap();
            assert!(k > 0);
            got.extend_from_slice(&buf[..k]);
        }
        assert_eq!(got, all);
        assert!(c.flush().unwrap());
        assert_eq!(c.pending_out(), 0);
        assert!(c.wants_input());
    }
}
