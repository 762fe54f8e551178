//! The cloud machine's configuration (P§5.1–§5.9): the fixed facts of a run, the transports and
//! their servers, and the default host names of a country.

use core::fmt;

use crate::time::Duration;

/// A cloud transport (P§5.2): the one type, from the command line's `--transports` on.
pub use crate::cli::Transport;

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        })
    }
}

/// One transport's server: a host name or IPv4 literal and a port (P§5.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Set by `-H`, `--udp-host`, `--tcp-host`: its addresses are never filtered (P§5.1 D1).
    pub explicit: bool,
}

/// Everything the machine needs to know, fixed for a run.
#[derive(Clone)]
pub struct CloudConfig {
    pub did: u32,
    /// The cloud key: 16 ASCII characters used as bytes (P§2.5). Secret.
    pub key: [u8; 16],
    pub model: String,
    pub mac: String,
    /// 32 lowercase hex chars of the token, for `_otc.info` (P§5.4). Secret.
    pub token_hex: String,
    /// Order of the transports tried (`--transports`).
    pub transports: Vec<Transport>,
    pub udp: Endpoint,
    pub tcp: Endpoint,
    pub keepalive: Duration,
    pub ack_timeout: Duration,
    pub user_ack_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// `-i`: overrides `otc_test.interval` (P§5.10).
    pub refresh: Option<Duration>,
    pub max_cloud_payload: usize,
    pub seed: u64,
    /// `--didkey-method`: the cloud method of the did/key exchange (P§5.11).
    pub didkey_method: String,
    /// Set for a bootstrap did (0 or 1): this session asks for an identity (P§5.11) instead of
    /// sending `_otc.info`, and is never announced.
    pub didkey: Option<DidkeyAsk>,
}

/// What the did/key request carries besides the did, model and mac of the config (P§5.11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DidkeyAsk {
    pub vendor: String,
    /// The helper's material as JSON text (`null` without it), passed unread (L§16 step 1).
    pub data: String,
}

impl CloudConfig {
    /// The defaults of P§5.1–§5.9 for a device identity; `cc` is the country code (`-C`).
    pub fn new(did: u32, key: [u8; 16], model: &str, mac: &str, token_hex: &str, cc: &str) -> Self {
        let (udp, tcp) = default_hosts(cc);
        CloudConfig {
            did,
            key,
            model: model.to_owned(),
            mac: mac.to_owned(),
            token_hex: token_hex.to_owned(),
            transports: vec![Transport::Udp, Transport::Tcp],
            udp: Endpoint {
                host: udp,
                port: 8053,
                explicit: false,
            },
            tcp: Endpoint {
                host: tcp,
                port: 80,
                explicit: false,
            },
            keepalive: Duration::from_secs(20),
            ack_timeout: Duration::from_secs(3),
            user_ack_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            refresh: None,
            max_cloud_payload: 1024,
            seed: 0,
            didkey_method: "_otc.didkey_req".into(),
            didkey: None,
        }
    }
}

/// Default host names for a country code: `<cc>.ot.io.mi.com` unless it is empty or `cn` (P§5.1 D1).
pub fn default_hosts(cc: &str) -> (String, String) {
    if cc.is_empty() || cc.eq_ignore_ascii_case("cn") {
        ("ot.io.mi.com".into(), "ott.io.mi.com".into())
    } else {
        (format!("{cc}.ot.io.mi.com"), format!("{cc}.ott.io.mi.com"))
    }
}

// The key and token never reach a log line (P§2.5).
impl fmt::Debug for CloudConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudConfig")
            .field("did", &self.did)
            .field("key", &"<redacted>")
            .field("model", &self.model)
            .field("mac", &self.mac)
            .field("token_hex", &"<redacted>")
            .field("transports", &self.transports)
            .field("udp", &self.udp)
            .field("tcp", &self.tcp)
            .field("keepalive", &self.keepalive)
            .field("ack_timeout", &self.ack_timeout)
            .field("user_ack_timeout", &self.user_ack_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("refresh", &self.refresh)
            .field("max_cloud_payload", &self.max_cloud_payload)
            .field("didkey_method", &self.didkey_method)
            .field("didkey", &self.didkey.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cloud::testkit::*;

    #[test]
    fn config_debug_hides_secrets() {
        let s = format!("{:?}", cfg());
        assert!(!s.contains("YWJj"), "{s}");
        assert!(!s.contains("4142434445"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn country_hosts() {
        assert_eq!(default_hosts("de").0, "de.ot.io.mi.com");
        assert_eq!(default_hosts("de").1, "de.ott.io.mi.com");
        assert_eq!(default_hosts("cn").0, "ot.io.mi.com");
        assert_eq!(default_hosts("").1, "ott.io.mi.com");
    }
}
