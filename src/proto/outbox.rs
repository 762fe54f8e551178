//! The outbox: the one queue of effects out of the sans-IO core (ARCHITECTURE.md §3).
//!
//! Every machine pushes what the reactor must do into the same [`Outbox`], in the order it decides
//! it, and the reactor executes the actions in that order. The vocabulary is [`Action`]: a socket,
//! a file, a resolver or the logger, never a decision.

use std::net::{SocketAddr, SocketAddrV4};

use super::cloud;
use super::helper::Step;
use super::local::{ConnId, LocalAction};
use crate::config::Secret16;
use crate::wire::dns::ServiceInfo;

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
    /// Provisioning (L§8): read the present `wifi.conf`, then write this one atomically, mode 0600.
    /// Answer with [`crate::proto::node::Node::wifi_written`] (the result and the file it replaced)
    /// before running the next action: the requester's reply waits for it.
    WriteWifi(WifiText),
    /// A failed provisioning (L§8): write this `wifi.conf` back (0600), or delete the file (None).
    /// The node chose it from what [`crate::proto::node::Node::wifi_written`] reported.
    RestoreWifi(Option<WifiText>),
    /// The token step of the file mode (L§9.3): store this token in `device.token` (0600), or
    /// remove the file (None). Answer with [`crate::proto::node::Node::token_written`].
    TokenFile(Option<Secret16>),
    /// Provisioning: write `device.country` (0644).
    WriteCountry(String),
    /// A did/key assignment the helper did not store (L§16 step 4): rewrite the `did=` and `key=`
    /// lines of `device.conf` in one atomic write, every other line kept. Answer with
    /// [`crate::proto::node::Node::didkey_written`]. `Debug` shows no key ([`Secret16`]).
    StoreDidkey { did: u32, key: Secret16 },
    /// Read the ssid of `wifi.conf` ("" without one) and answer with [`crate::proto::node::Node::file_ssid`]: INFO's
    /// `ap.ssid` is the file's (P§5.4) even when a helper answered the Wi-Fi step or after a
    /// failed provisioning put the file back.
    ReadSsid,
    /// Give the mDNS responder this service to announce and answer for, or none (P§4.8). The node
    /// pushes it when the service changes.
    MdnsService(Option<ServiceInfo>),
    /// Send the mDNS announcement of the service (P§4.8): at once when it changed, and once more
    /// a second later (RFC 6762 §8.3).
    MdnsAnnounce,
    /// Open a fresh TCP connection to the MQTT broker (L§11), closing any older one; answer with
    /// [`crate::proto::node::Node::broker_connected`] / [`crate::proto::node::Node::broker_connect_failed`].
    #[cfg(feature = "mqtt")]
    BrokerConnect,
    /// Whole MQTT packets for the broker connection; a write that fails, or a backlog over its
    /// cap, is reported with [`crate::proto::node::Node::broker_closed`].
    #[cfg(feature = "mqtt")]
    BrokerSend(Vec<u8>),
    /// Close the broker connection; no report is expected.
    #[cfg(feature = "mqtt")]
    BrokerClose,
}

/// The text of a `wifi.conf`. It holds the router's password, so `Debug` shows its length only
/// (LOCAL_API.md §17: no secret in a log line).
#[derive(Clone, PartialEq, Eq)]
pub struct WifiText(pub String);

impl core::ops::Deref for WifiText {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl core::fmt::Debug for WifiText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "WifiText({} bytes)", self.0.len())
    }
}

/// The effects queued by the core, taken oldest first. Two plain `Vec`s rather than a `VecDeque`,
/// whose ring-buffer code would be linked for this one type (ARCHITECTURE.md §6): actions are
/// pushed onto `back`; when `front` runs dry, `back` becomes `front`, reversed, and is popped from
/// its end. Each action is moved twice at most.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Pushed since the last refill of `front`, oldest first.
    back: Vec<Action>,
    /// Older than all of `back`, newest first: the next action is the last.
    front: Vec<Action>,
}

impl Outbox {
    /// Queues `a` after everything already queued.
    pub fn push(&mut self, a: Action) {
        self.back.push(a);
    }

    /// The oldest queued action.
    pub fn pop(&mut self) -> Option<Action> {
        if self.front.is_empty() {
            core::mem::swap(&mut self.front, &mut self.back);
            self.front.reverse();
        }
        self.front.pop()
    }

    pub fn is_empty(&self) -> bool {
        self.front.is_empty() && self.back.is_empty()
    }

    pub fn len(&self) -> usize {
        self.front.len() + self.back.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Actions come out in the order they went in, however pushes and pops interleave.
    #[test]
    fn fifo_across_refills() {
        let mut o = Outbox::default();
        let mut next = 0u8;
        let mut want = 0u8;
        for round in 0..20u8 {
            for _ in 0..round % 4 {
                o.push(Action::SetLogLevel(next));
                next += 1;
            }
            assert_eq!(o.len(), usize::from(next - want));
            for _ in 0..round % 3 {
                match o.pop() {
                    Some(Action::SetLogLevel(n)) => {
                        assert_eq!(n, want);
                        want += 1;
                    }
                    None => assert_eq!(want, next),
                    Some(a) => panic!("{a:?}"),
                }
            }
        }
        while let Some(a) = o.pop() {
            assert_eq!(a, Action::SetLogLevel(want));
            want += 1;
        }
        assert_eq!(want, next);
        assert!(o.is_empty());
    }

    /// A `wifi.conf` in an action never shows its password in `Debug` (L§17).
    #[test]
    fn wifi_text_is_not_printed() {
        let text = WifiText("ssid=\"home\"\npsk=\"secret-pw\"\n".into());
        for a in [
            Action::WriteWifi(text.clone()),
            Action::RestoreWifi(Some(text)),
        ] {
            let d = format!("{a:?}");
            assert!(!d.contains("secret-pw") && !d.contains("home"), "{d}");
        }
    }
}
