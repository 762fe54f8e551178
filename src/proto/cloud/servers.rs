//! The server list, name resolution, connect and the reconnect backoff of the cloud link
//! (P§5.1, P§5.2, P§5.9): which server is tried next, the 10 s lookup deadline, the D1 address
//! filters, the 5 s connect deadline, and what a failed attempt or a lost link closes.

use std::net::{Ipv4Addr, SocketAddrV4};

use log::{debug, info, warn};

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Server {
    pub(super) addr: SocketAddrV4,
    pub(super) from_dns: bool,
}

impl Cloud {
    // ---- attempts, DNS, connect ------------------------------------------------------------

    pub(super) fn begin_attempt(&mut self, now: Instant, out: &mut Outbox) {
        self.phase = Phase::Resolving;
        self.note(Event::State(CloudEvent::Trying));
        self.next_server(now, out);
    }

    pub(super) fn transport(&self) -> Transport {
        self.cfg
            .transports
            .get(self.tidx)
            .copied()
            .unwrap_or(Transport::Udp)
    }

    pub(super) fn endpoint(&self, t: Transport) -> &Endpoint {
        match t {
            Transport::Udp => &self.cfg.udp,
            Transport::Tcp => &self.cfg.tcp,
        }
    }

    /// Connects to the next server, or asks for the next transport's list (P§5.1, §5.9).
    pub(super) fn next_server(&mut self, now: Instant, out: &mut Outbox) {
        // Each round either connects, asks the resolver, or builds a list from an IP literal; a list of
        // literals can be empty only when filtered, so one pass over the transports is enough.
        for _ in 0..=self.cfg.transports.len() {
            if let Some(&s) = self.list.get(self.pos).filter(|_| self.list_built) {
                self.pos += 1;
                self.connect(now, s, out);
                return;
            }
            if self.list_built {
                self.tidx = (self.tidx + 1) % self.cfg.transports.len().max(1);
            }
            self.list_built = false;
            self.list.clear();
            self.pos = 0;
            let t = self.transport();
            let ep = self.endpoint(t).clone();
            match ep.host.parse::<Ipv4Addr>() {
                Ok(ip) => self.build_list(vec![ip]),
                Err(_) => {
                    self.phase = Phase::Resolving;
                    info!("getaddrinfo ({}:{}) for {t}", ep.host, ep.port);
                    self.dns_attempt = self.dns_attempt.wrapping_add(1);
                    self.wheel.set(Timer::Dns, now + DNS_TIMEOUT);
                    out.push(Action::Resolve {
                        transport: t,
                        host: ep.host,
                        port: ep.port,
                        attempt: self.dns_attempt,
                    });
                    return;
                }
            }
        }
        self.dns_failed(now, "no usable server address", out);
    }

    /// The resolver's answer to `Resolve` number `attempt`. Stale answers are ignored.
    pub fn handle_resolved(
        &mut self,
        now: Instant,
        attempt: u32,
        result: Result<Vec<Ipv4Addr>, String>,
        out: &mut Outbox,
    ) {
        if self.phase != Phase::Resolving || attempt != self.dns_attempt {
            debug!("late DNS answer (attempt {attempt}) ignored");
            return;
        }
        self.wheel.cancel(Timer::Dns);
        match result {
            Ok(addrs) => {
                self.build_list(addrs);
                if self.list.is_empty() {
                    self.dns_failed(now, "no usable address", out);
                } else {
                    self.next_server(now, out);
                }
            }
            Err(e) => {
                // Keep what does not need DNS (otc_list) for the next attempt.
                self.build_list(Vec::new());
                self.dns_failed(now, &e, out);
            }
        }
    }

    pub(super) fn dns_failed(&mut self, now: Instant, why: &str, out: &mut Outbox) {
        let t = self.transport();
        warn!("resolving {} for {t} failed: {why}", self.endpoint(t).host);
        self.note(Event::State(CloudEvent::InternetFailed));
        self.fail(now, "name resolution failed", out);
    }

    /// DNS records (filtered unless explicit, shuffled), then for UDP the `otc_list` entries (P§5.1).
    pub(super) fn build_list(&mut self, mut addrs: Vec<Ipv4Addr>) {
        let t = self.transport();
        let ep = self.endpoint(t);
        let (port, from_dns) = (ep.port, !ep.explicit);
        if from_dns {
            addrs.retain(|a| {
                let o = a.octets()[0];
                let bad = o == 0 || o == 127 || o >= 224;
                if bad {
                    warn!("server ip({a}) from DNS refused");
                }
                !bad
            });
        }
        // Fisher-Yates.
        for i in (1..addrs.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            addrs.swap(i, j);
        }
        addrs.truncate(MAX_DNS);
        let mut list: Vec<Server> = Vec::new();
        let dns = addrs.into_iter().map(|ip| Server {
            addr: SocketAddrV4::new(ip, port),
            from_dns,
        });
        let otc = self.otc_list.iter().map(|&addr| Server {
            addr,
            from_dns: false,
        });
        let otc = otc.filter(|_| t == Transport::Udp);
        for s in dns.chain(otc) {
            if !list.iter().any(|x| x.addr == s.addr) {
                list.push(s);
            }
        }
        self.list = list;
        self.pos = 0;
        self.list_built = true;
    }

    pub(super) fn connect(&mut self, now: Instant, s: Server, out: &mut Outbox) {
        let t = self.transport();
        self.phase = Phase::Connecting;
        self.current = Some(s);
        self.link = Some(t);
        self.generation = self.generation.wrapping_add(1);
        info!("connecting to {} over {t}", s.addr);
        out.push(Action::Connect {
            transport: t,
            addr: s.addr,
        });
        self.wheel.set(Timer::Connect, now + CONNECT_TIMEOUT);
    }

    /// The socket is set up; `local` is its local address (the route to the server).
    pub fn handle_connected(&mut self, now: Instant, local: Ipv4Addr, out: &mut Outbox) {
        if self.phase != Phase::Connecting {
            return;
        }
        self.wheel.cancel(Timer::Connect);
        if let Some(s) = self.current {
            // P§5.1 D1: a router that answers DNS with a LAN address.
            if s.from_dns && s.addr.ip().octets()[0] == local.octets()[0] {
                warn!(
                    "server ip({}), my ip({local}), we might be using a buggy router.",
                    s.addr.ip()
                );
                self.connect_failed(now, "server address on the local network", out);
                return;
            }
        }
        self.note(Event::State(CloudEvent::InternetConnected));
        self.last_tx = 0;
        self.sent_stamps = [0; SENT_STAMPS];
        self.last_rx = None;
        self.rx_buf.clear();
        self.phase = Phase::Hello;
        self.hellos = 0;
        self.hello_tick(now, out);
    }

    /// The connect failed (refused, unreachable, ...).
    pub fn handle_connect_failed(&mut self, now: Instant, reason: &str, out: &mut Outbox) {
        if self.phase == Phase::Connecting {
            self.connect_failed(now, reason, out);
        }
    }

    pub(super) fn connect_failed(&mut self, now: Instant, reason: &str, out: &mut Outbox) {
        if let Some(s) = self.current {
            warn!("connect to {} failed: {reason}", s.addr);
        }
        self.note(Event::State(CloudEvent::InternetFailed));
        self.fail(now, "connect failed", out);
    }

    /// EOF or an error on the cloud socket (not `ECONNREFUSED` on UDP).
    pub fn handle_link_down(&mut self, now: Instant, out: &mut Outbox) {
        match self.phase {
            Phase::Connecting => self.connect_failed(now, "socket error", out),
            Phase::Hello | Phase::Info | Phase::Up => self.fail(now, "link down", out),
            _ => {}
        }
    }

    /// Closes the socket and fails what depends on it; no state change, no event.
    pub(super) fn end_session(&mut self, out: &mut Outbox) {
        if self.link.take().is_some() {
            out.push(Action::CloudClose);
        }
        for t in [
            Timer::Dns,
            Timer::Connect,
            Timer::Hello,
            Timer::Info,
            Timer::Keepalive,
            Timer::Refresh,
            Timer::RefreshHello,
        ] {
            self.wheel.cancel(t);
        }
        self.current = None;
        self.hello_out = false;
        self.info_for = None;
        self.announced = false;
        self.rx_buf = Vec::new();
        // P§5.7 D5: every pending request fails at once.
        for up in std::mem::take(&mut self.ups) {
            self.wheel.cancel(Timer::Ack(up.cloud_id));
            if let Origin::Client { client, orig } = up.origin {
                self.tell_client(client, orig, -30011, "OT server disconnected", out);
            }
        }
        // Replies to this session's commands can no longer go up.
        self.downs.clear_pending();
    }

    /// An attempt failed or the link was lost (P§5.9): close, fail pending, back off.
    pub(super) fn fail(&mut self, now: Instant, why: &str, out: &mut Outbox) {
        warn!("cloud: {why}, retry later");
        self.end_session(out);
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff(self.failures);
        info!("next cloud attempt in {delay}");
        self.wheel.set(Timer::Backoff, now + delay);
        if self.phase != Phase::Retry {
            self.note(Event::State(CloudEvent::Retry));
        }
        self.phase = Phase::Retry;
    }

    /// D4: min(cap, base·2^(k−1)) · U[0.8, 1.2], clamped to [1 s, cap].
    pub(super) fn backoff(&mut self, k: u32) -> Duration {
        let cap = self.cfg.backoff_max.millis().max(1000);
        let shift = k.saturating_sub(1).min(40);
        let d = self
            .cfg
            .backoff_min
            .millis()
            .saturating_mul(1u64 << shift)
            .min(cap);
        let permille = 800 + self.rng.below(401);
        let d = d.saturating_mul(permille) / 1000;
        Duration::from_millis(d.clamp(1000, cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cloud::testkit::Action;
    use crate::proto::cloud::testkit::*;

    // ---- backoff, server list, DNS ---------------------------------------------------------

    fn d4_bounds(k: u32, min: u64, cap: u64) -> (u64, u64) {
        let d = min.saturating_mul(1 << (k - 1)).min(cap);
        (
            (d * 8 / 10).clamp(1000, cap),
            (d * 12 / 10).clamp(1000, cap),
        )
    }

    #[test]
    fn backoff_within_d4_bounds_and_reset_after_connect() {
        for seed in 0..20 {
            let mut c = cfg();
            c.seed = seed;
            let mut h = H::new(c);
            h.c.start(h.now, &mut h.o);
            for k in 1..=8 {
                h.expect_event(CloudEvent::Trying);
                assert!(matches!(h.next(), Action::Resolve { .. }));
                h.resolved(Err("NXDOMAIN".into()));
                assert_eq!(
                    h.take(),
                    vec![
                        Action::Event(CloudEvent::InternetFailed),
                        Action::Event(CloudEvent::Retry)
                    ]
                );
                let d = h.c.poll_timeout().unwrap().0 - h.now.0;
                let (lo, hi) = d4_bounds(k, 5000, 300_000);
                assert!(lo <= d && d <= hi, "k={k} d={d} not in [{lo},{hi}]");
                h.advance(d);
            }
            h.expect_event(CloudEvent::Trying);
            h.finish_attempt();
            h.c.handle_link_down(h.now, &mut h.o);
            h.take();
            let d = h.c.poll_timeout().unwrap().0 - h.now.0;
            let (lo, hi) = d4_bounds(1, 5000, 300_000);
            assert!(lo <= d && d <= hi, "after a connect k=1 again: {d}");
        }
    }

    #[test]
    fn backoff_clamped_to_one_second_and_cap() {
        let mut c = cfg();
        c.backoff_min = Duration::from_millis(100);
        c.backoff_max = Duration::from_secs(2);
        let mut cl = Cloud::new(c);
        assert_eq!(cl.backoff(1), Duration::from_secs(1));
        for k in 6..40 {
            let d = cl.backoff(k).millis();
            assert!((1600..=2000).contains(&d), "k={k} d={d}");
        }
        assert!(cl.backoff(u32::MAX) <= Duration::from_secs(2));
    }

    #[test]
    fn dns_addresses_filtered_and_shuffled_otc_list_appended() {
        let mut h = H::connected(cfg());
        // Teach an otc_list through a refresh reply.
        h.c.apply_otc(&obj(
            r#"{"otc_list":[{"ip":"1.2.3.4","port":8053},{"ip":"9.9.9.9","port":8054},{"ip":"","port":1},{"ip":"bad"},{"ip":"8.8.8.8","port":0},{"ip":"127.0.0.1","port":8053}]}"#,
        ));
        h.c.handle_link_down(h.now, &mut h.o);
        h.take();
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        // The old list (one server) is used up: the next transport (TCP) resolves.
        assert!(matches!(
            h.next(),
            Action::Resolve {
                transport: Transport::Tcp,
                ..
            }
        ));
        h.resolved(Err("x".into()));
        h.take();
        let t = h.c.poll_timeout().unwrap();
        h.advance(t.0 - h.now.0);
        h.expect_event(CloudEvent::Trying);
        // TCP had no list: back to UDP, resolved again.
        assert!(matches!(
            h.next(),
            Action::Resolve {
                transport: Transport::Udp,
                ..
            }
        ));
        let dns = vec![
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(250, 0, 0, 1),
            SERVER,
            Ipv4Addr::new(4, 4, 4, 4),
        ];
        h.resolved(Ok(dns));
        let mut order = Vec::new();
        loop {
            match h.next() {
                Action::Connect { addr, .. } => order.push(addr),
                a => panic!("{a:?}"),
            }
            h.c.handle_connect_failed(h.now, "refused", &mut h.o);
            h.take();
            let t = h.c.poll_timeout().unwrap();
            h.advance(t.0 - h.now.0);
            h.expect_event(CloudEvent::Trying);
            if order.len() == 4 {
                break;
            }
        }
        let a = |a, b, c, d, p| SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), p);
        let mut dns_part = order[..2].to_vec();
        dns_part.sort();
        assert_eq!(dns_part, vec![a(1, 2, 3, 4, 8053), a(4, 4, 4, 4, 8053)]);
        // otc_list entries: no duplicate of 1.2.3.4, never filtered (127.0.0.1 kept).
        assert_eq!(order[2..], [a(9, 9, 9, 9, 8054), a(127, 0, 0, 1, 8053)]);
        // After the last UDP server: TCP.
        assert!(matches!(
            h.next(),
            Action::Resolve {
                transport: Transport::Tcp,
                ..
            }
        ));
    }

    #[test]
    fn explicit_hosts_are_never_filtered() {
        let mut c = cfg();
        c.udp = Endpoint {
            host: "127.0.0.1".into(),
            port: 8053,
            explicit: true,
        };
        let mut h = H::new(c);
        h.c.start(h.now, &mut h.o);
        h.expect_event(CloudEvent::Trying);
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8053);
        assert_eq!(
            h.next(),
            Action::Connect {
                transport: Transport::Udp,
                addr: lo
            }
        );
        // Same first octet as the local address: fine for an explicit host.
        h.c.handle_connected(h.now, Ipv4Addr::LOCALHOST, &mut h.o);
        h.expect_event(CloudEvent::InternetConnected);

        // An explicit name: its DNS answer is not filtered either.
        let mut c = cfg();
        c.udp.host = "localhost".into();
        c.udp.explicit = true;
        let mut h = H::new(c);
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![Ipv4Addr::LOCALHOST]));
        assert_eq!(
            h.next(),
            Action::Connect {
                transport: Transport::Udp,
                addr: lo
            }
        );
    }

    #[test]
    fn dns_answer_in_our_subnet_is_a_buggy_router() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![Ipv4Addr::new(10, 0, 0, 1)]));
        assert!(matches!(h.next(), Action::Connect { .. }));
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        assert_eq!(
            h.take(),
            vec![
                Action::Close,
                Action::Event(CloudEvent::InternetFailed),
                Action::Event(CloudEvent::Retry)
            ]
        );
    }

    #[test]
    fn all_dns_answers_refused_is_a_dns_failure() {
        let mut h = H::new(cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![Ipv4Addr::LOCALHOST]));
        assert_eq!(
            h.take(),
            vec![
                Action::Event(CloudEvent::InternetFailed),
                Action::Event(CloudEvent::Retry)
            ]
        );
    }

    #[test]
    fn tcp_connect_deadline_is_five_seconds() {
        let mut h = H::new(tcp_cfg());
        h.c.start(h.now, &mut h.o);
        h.take();
        h.resolved(Ok(vec![SERVER]));
        assert!(matches!(
            h.next(),
            Action::Connect {
                transport: Transport::Tcp,
                ..
            }
        ));
        assert!(h.c.is_busy());
        h.advance(4999);
        h.quiet();
        h.advance(1);
        assert_eq!(
            h.take(),
            vec![
                Action::Close,
                Action::Event(CloudEvent::InternetFailed),
                Action::Event(CloudEvent::Retry)
            ]
        );
        // A late connect is ignored.
        h.c.handle_connected(h.now, LOCAL, &mut h.o);
        h.quiet();
    }

    #[test]
    fn stop_closes_and_fails_pending() {
        let mut h = H::connected(cfg());
        h.upstream(1, r#"{"id":5,"method":"m"}"#);
        h.take();
        h.c.stop(h.now, &mut h.o);
        assert_eq!(
            h.take(),
            vec![
                Action::Close,
                to_client(
                    1,
                    r#"{"id":5,"error":{"code":-30011,"message":"OT server disconnected"}}"#
                )
            ]
        );
        assert_eq!(h.c.state(), CloudState::Stopped);
        assert_eq!(h.c.poll_timeout(), None);
        h.advance(1_000_000);
        h.quiet();
        // And it starts again at once.
        h.c.start(h.now, &mut h.o);
        h.expect_event(CloudEvent::Trying);
        assert!(matches!(
            h.next(),
            Action::Resolve {
                transport: Transport::Udp,
                ..
            }
        ));
    }
}
