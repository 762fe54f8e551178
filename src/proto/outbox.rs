//! The outbox: the one queue of effects out of the sans-IO core (ARCHITECTURE.md §4.4).
//!
//! Every machine pushes what the reactor must do into the same [`Outbox`], in the order it decides
//! it, and the reactor executes the actions in that order. The vocabulary is [`Action`]: a socket,
//! a file, a resolver or the logger, never a decision.

use std::collections::VecDeque;
use std::net::{SocketAddr, SocketAddrV4};

use super::cloud;
use super::helper::Step;
use super::local::{ConnId, LocalAction};

/// What the reactor must do: the one vocabulary of effects out of the core. Paths to the
/// node's `answer with` methods are written in full because this module does not import the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A message to one local connection, or a close.
    Local(LocalAction),
    /// Resolve a cloud host off the loop; answer with [`crate::proto::node::Node::cloud_resolved`].
    Resolve {
        transport: cloud::Transport,
        host: String,
        port: u16,
        attempt: u32,
    },
    /// Open a fresh cloud socket; answer with [`crate::proto::node::Node::cloud_connected`] / [`crate::proto::node::Node::cloud_connect_failed`].
    Connect {
        transport: cloud::Transport,
        addr: SocketAddrV4,
    },
    /// One packet on the cloud socket.
    CloudSend(Vec<u8>),
    /// Close the cloud socket.
    CloudClose,
    /// One datagram on the LAN socket (54321).
    LanSend { to: SocketAddr, bytes: Vec<u8> },
    /// Apply a new log level (`miIO.config_loglevel`).
    SetLogLevel(u8),
    /// Create (true) or remove (false) `<datadir>/otd_donot_trust_peer` (`miIO.config`, P§4.6).
    /// The reactor reports the result with [`crate::proto::node::Node::trust_written`]: the phone's answer waits for it.
    TrustFlag(bool),
    /// Shut the write side of a connection once its output is flushed (one message per hello).
    ShutdownWrite(ConnId),
    /// Take this start-up step from the data files (L§9.5); answer with the matching `file_*`.
    LoadFiles(Step),
    /// Provisioning (L§8): write `wifi.conf` atomically, mode 0600, keeping the old one in memory.
    /// Answer with [`crate::proto::node::Node::wifi_written`] before running the next action: the requester's reply
    /// waits for it.
    WriteWifi(String),
    /// A failed provisioning: put the previous `wifi.conf` back, or delete it if there was none.
    RestoreWifi,
    /// Provisioning: write `device.country` (0644).
    WriteCountry(String),
    /// Read the ssid of `wifi.conf` ("" without one) and answer with [`crate::proto::node::Node::file_ssid`]: INFO's
    /// `ap.ssid` is the file's (P§5.4) even when a helper answered the Wi-Fi step or after a
    /// failed provisioning put the file back.
    ReadSsid,
    /// Send the mDNS announcement of the service (P§4.8): at once when it changed, and once more
    /// a second later (RFC 6762 §8.3).
    MdnsAnnounce,
}

/// The effects queued by the core, oldest first.
#[derive(Debug, Default)]
pub struct Outbox {
    q: VecDeque<Action>,
}

impl Outbox {
    /// Queues `a` after everything already queued.
    pub fn push(&mut self, a: Action) {
        self.q.push_back(a);
    }

    /// The oldest queued action.
    pub fn pop(&mut self) -> Option<Action> {
        self.q.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }
}
