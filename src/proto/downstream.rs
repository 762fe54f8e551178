//! Pending downstream commands: commands that go *down* to local clients, from the cloud (P§5.8)
//! or from a phone on the LAN (P§4.7), and the replies that go back up (ARCHITECTURE.md §3).
//!
//! Contract: sans-IO, no log state. One implementation of what both the cloud and the LAN machine
//! need for such a command: the bound on pending entries (a further command is answered -9999 at
//! once), the first reply wins, a -10000/-32601 reply is held and sent at the deadline instead of
//! -9999 (P§5.8 D16), per-command deadlines ([`Downstream::poll_timeout`], [`Downstream::pop_due`]),
//! and the reply cache that answers a repeated command (32 entries, 60 s, a size cap on the text;
//! P§4.5 D7, P§5.8), which expires lazily and never wakes the daemon.
//!
//! Each machine owns one table, typed by what it keeps per origin (`O`: the cloud's command id;
//! the LAN's phone id, address, replay-guard key and route) and by what its cache is keyed on (`K`:
//! the cloud's command id; the LAN's replay-guard key). The table decides nothing about sending:
//! the machine seals and sends, and tells the table what happened.
//!
//! Also here, because both machines read them: the methods the daemon answers itself (P§4.6) and
//! the LAN-only subset of them, and the seeded PRNG of the core.

use serde_json::Value;

use crate::time::{Duration, Instant};
use crate::wire::rpc;

/// Pending commands per machine; a further one gets -9999 at once (P§5.8).
pub const MAX_PENDING: usize = 64;
/// Reply cache: size and lifetime (P§4.5 D7, P§5.8).
pub const CACHE_MAX: usize = 32;
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// The largest reply text the cache keeps (P§4.5 D7); a longer one is sent but not kept.
pub const CACHE_MAX_TEXT: usize = 2048;

/// Methods the daemon answers itself (P§4.6); the node builds their replies.
pub const SELF_METHODS: [&str; 7] = [
    "miIO.info",
    "miIO.wifi_assoc_state",
    "miIO.config_router",
    "miIO.config_tz",
    "miIO.config_loglevel",
    "miIO.config",
    "miIO.stop_diag_mode",
];
/// The self-answered methods accepted only from the LAN; the cloud gets -32601 (P§4.6).
pub const LAN_ONLY: [&str; 3] = ["miIO.config_router", "miIO.config", "miIO.stop_diag_mode"];

/// True when the daemon answers `method` itself on the LAN (P§4.6).
pub fn self_answered(method: &str) -> bool {
    SELF_METHODS.contains(&method)
}

/// True for the self-answered methods the cloud may not call (P§4.6).
pub fn lan_only(method: &str) -> bool {
    LAN_ONLY.contains(&method)
}

/// True for an error code whose reply is held as a fallback (P§5.8 D16).
pub fn is_fallback(code: Option<i64>) -> bool {
    matches!(code, Some(-10000 | -32601))
}

/// The -9999 reply of a command nobody answered in time (P§5.8).
pub fn user_ack_timeout_reply(id: u32) -> String {
    rpc::error_reply(Some(&Value::from(id)), -9999, "user ack timeout")
}

/// One pending command.
#[derive(Clone, Debug)]
pub struct Pending<O> {
    pub origin: O,
    pub deadline: Instant,
    /// D16: a -10000/-32601 reply, sent at the deadline instead of -9999.
    pub held: Option<String>,
}

impl<O> Pending<O> {
    /// What goes up when the deadline passed: the held reply, else -9999 for `id` (P§5.8 D16).
    pub fn timeout_reply(&self, now: Instant, id: u32) -> String {
        self.held.clone().unwrap_or_else(|| {
            crate::info_limited!(now, "user ack timeout, id:{id}");
            user_ack_timeout_reply(id)
        })
    }
}

#[derive(Clone, Debug)]
struct Cached<K> {
    key: K,
    text: String,
    until: Instant,
}

/// The table of one machine's pending downstream commands and its reply cache.
#[derive(Clone, Debug)]
pub struct Downstream<O, K> {
    pending: Vec<Pending<O>>,
    cache: Vec<Cached<K>>,
    /// Longer replies are sent but not cached.
    cache_max_text: usize,
}

impl<O, K: PartialEq> Downstream<O, K> {
    /// An empty table whose cache keeps replies of at most `cache_max_text` bytes.
    pub fn new(cache_max_text: usize) -> Self {
        Downstream {
            pending: Vec::new(),
            cache: Vec::new(),
            cache_max_text,
        }
    }

    /// No room for another command: the caller answers -9999 at once (P§5.8).
    pub fn is_full(&self) -> bool {
        self.pending.len() >= MAX_PENDING
    }

    /// Adds a command due at `deadline`. False (nothing added) when the table is full.
    pub fn insert(&mut self, origin: O, deadline: Instant) -> bool {
        if self.is_full() {
            return false;
        }
        self.pending.push(Pending {
            origin,
            deadline,
            held: None,
        });
        true
    }

    /// The index of the first pending command whose origin matches.
    pub fn position(&self, f: impl Fn(&O) -> bool) -> Option<usize> {
        self.pending.iter().position(|p| f(&p.origin))
    }

    pub fn contains(&self, f: impl Fn(&O) -> bool) -> bool {
        self.position(f).is_some()
    }

    pub fn get(&self, i: usize) -> Option<&Pending<O>> {
        self.pending.get(i)
    }

    /// D16: keeps `text` as the fallback of entry `i` unless one is held already; any other
    /// reply replaces it (the caller [`Downstream::remove`]s the entry and sends that one).
    pub fn hold(&mut self, i: usize, text: String) {
        if let Some(p) = self.pending.get_mut(i) {
            p.held.get_or_insert(text);
        }
    }

    /// Takes entry `i` out: its reply is being sent, so later replies find nothing (first wins).
    pub fn remove(&mut self, i: usize) -> Option<Pending<O>> {
        (i < self.pending.len()).then(|| self.pending.remove(i))
    }

    /// Forgets every pending command (their replies can no longer go anywhere).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }

    /// The earliest deadline; None when nothing is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }

    /// Takes out a command whose deadline is at or before `now`, oldest command first.
    pub fn pop_due(&mut self, now: Instant) -> Option<Pending<O>> {
        let i = self.pending.iter().position(|p| p.deadline <= now)?;
        self.remove(i)
    }

    /// Remembers the reply `text` sent for `key` (P§4.5, P§5.8): an older entry for the same key
    /// goes, then the oldest when 32 are kept. A text over the size cap is not kept.
    pub fn cache_put(&mut self, now: Instant, key: K, text: String) {
        if text.len() > self.cache_max_text {
            return;
        }
        self.cache.retain(|c| c.until > now && c.key != key);
        if self.cache.len() >= CACHE_MAX {
            self.cache.remove(0);
        }
        self.cache.push(Cached {
            key,
            text,
            until: now + CACHE_TTL,
        });
    }

    /// The cached reply for `key`, if it has not expired.
    pub fn cached(&self, now: Instant, key: &K) -> Option<&str> {
        self.cache
            .iter()
            .find(|c| c.key == *key && c.until > now)
            .map(|c| c.text.as_str())
    }

    /// Lazy expiry of the cache, oldest first (no deadline is armed for it).
    pub fn expire(&mut self, now: Instant) {
        let old = self.cache.iter().take_while(|c| c.until <= now).count();
        self.cache.drain(..old);
    }

    /// Forgets the cache (its replies belong to an old secret).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Pending commands holding a D16 fallback.
    pub fn held(&self) -> usize {
        self.pending.iter().filter(|p| p.held.is_some()).count()
    }

    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }
}

/// splitmix64: the core's one PRNG, tiny and seeded (ids, shuffles, jitter), so a run replays.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0); the modulo bias is irrelevant at these sizes.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Instant = Instant::from_millis(1_000_000);

    fn at(secs: u64) -> Instant {
        T0 + Duration::from_secs(secs)
    }

    fn table() -> Downstream<u32, u32> {
        Downstream::new(2048)
    }

    #[test]
    fn first_reply_wins() {
        let mut t = table();
        assert!(t.insert(7, at(5)));
        let i = t.position(|&o| o == 7).unwrap();
        assert_eq!(t.remove(i).map(|p| p.origin), Some(7));
        // A second reply finds nothing.
        assert_eq!(t.position(|&o| o == 7), None);
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn the_first_fallback_is_held_and_sent_at_the_deadline() {
        let mut t = table();
        t.insert(7, at(5));
        assert!(is_fallback(Some(-10000)) && is_fallback(Some(-32601)));
        assert!(!is_fallback(Some(-1)) && !is_fallback(None));
        t.hold(0, "first".into());
        t.hold(0, "second".into());
        assert_eq!(t.held(), 1);
        assert!(t.pop_due(at(4)).is_none());
        let p = t.pop_due(at(5)).unwrap();
        assert_eq!(p.timeout_reply(at(5), 7), "first");
        assert!(t.is_empty());
    }

    #[test]
    fn without_a_fallback_the_deadline_answers_9999() {
        let mut t = table();
        t.insert(9, at(5));
        let p = t.pop_due(at(6)).unwrap();
        let r = rpc::parse_object(p.timeout_reply(at(6), 9).as_bytes()).unwrap();
        assert_eq!(r["id"], 9);
        assert_eq!(r["error"]["code"], -9999);
    }

    #[test]
    fn deadlines_come_out_oldest_first() {
        let mut t = table();
        t.insert(1, at(9));
        t.insert(2, at(3));
        t.insert(3, at(3));
        assert_eq!(t.poll_timeout(), Some(at(3)));
        assert_eq!(t.pop_due(at(3)).map(|p| p.origin), Some(2));
        assert_eq!(t.pop_due(at(3)).map(|p| p.origin), Some(3));
        assert!(t.pop_due(at(3)).is_none());
        assert_eq!(t.poll_timeout(), Some(at(9)));
    }

    #[test]
    fn pending_is_bounded() {
        let mut t = table();
        for i in 0..MAX_PENDING as u32 {
            assert!(t.insert(i, at(5)));
        }
        assert!(t.is_full());
        assert!(!t.insert(99, at(5)));
        assert_eq!(t.len(), MAX_PENDING);
        t.clear_pending();
        assert!(t.is_empty());
    }

    #[test]
    fn cache_keeps_32_for_60_s() {
        let mut t = table();
        for k in 0..40u32 {
            t.cache_put(at(0), k, format!("r{k}"));
        }
        assert_eq!(t.cache_len(), CACHE_MAX);
        assert_eq!(t.cached(at(0), &0), None);
        assert_eq!(t.cached(at(0), &39), Some("r39"));
        assert_eq!(t.cached(at(59), &8), Some("r8"));
        assert_eq!(t.cached(at(60), &8), None);
        // A new reply for a key replaces the old one.
        t.cache_put(at(1), 39, "again".into());
        assert_eq!(t.cached(at(1), &39), Some("again"));
        t.expire(at(60));
        assert_eq!(t.cache_len(), 1);
        t.clear_cache();
        assert_eq!(t.cache_len(), 0);
    }

    #[test]
    fn cache_skips_long_texts() {
        let mut t: Downstream<u32, u32> = Downstream::new(4);
        t.cache_put(at(0), 1, "12345".into());
        t.cache_put(at(0), 2, "1234".into());
        assert_eq!(t.cached(at(0), &1), None);
        assert_eq!(t.cached(at(0), &2), Some("1234"));
    }

    #[test]
    fn self_methods_and_the_lan_only_subset() {
        assert!(LAN_ONLY.iter().all(|m| self_answered(m) && lan_only(m)));
        assert!(self_answered("miIO.info") && !lan_only("miIO.info"));
        assert!(!self_answered("get_prop"));
    }

    #[test]
    fn rng_is_splitmix64() {
        // The first output of splitmix64 seeded with 0.
        assert_eq!(Rng::new(0).next_u64(), 0xe220_a839_7b1d_cdaf);
        let mut r = Rng::new(5);
        assert!((0..100).all(|_| r.below(7) < 7));
    }
}
