//! Suspend (LOCAL_API.md §12): the `wakeup_time` of `local.resp_suspend`, read from the node's own
//! deadlines (ARCHITECTURE.md §4.4).

use super::Node;
use crate::proto::cloud::Cloud;
use crate::time::Instant;

impl Node {
    /// L§12: 0 while busy, else whole seconds to the earliest real deadline, 1..=max_sleep.
    pub fn wakeup_time(&self, now: Instant) -> u64 {
        let busy = self.cloud.as_ref().is_some_and(Cloud::is_busy)
            || self.cloud_backlog
            || self.helper.busy()
            || self.provisioning.is_some()
            || self.writing.is_some();
        if busy {
            return 0;
        }
        let max = self.cfg.max_sleep.secs_ceil().max(1);
        match self.poll_timeout() {
            Some(t) => (t.saturating_since(now).secs_ceil()).clamp(1, max),
            None => max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::*;

    #[test]
    fn ap_mode_idle_sleeps_max_and_broadcasts_ap_mode() {
        let mut n = node();
        let t0 = Instant(5_000);
        n.local_accept(t0, 1, Port::Local);
        n.set_identity(t0, identity(false));
        assert_eq!(n.state(), State::WifiApMode);
        // The classification window of conn 1 is the only deadline; once it passed the wheel is empty.
        let t1 = t0 + Duration::from_secs(2);
        let out = advance(&mut n, t1);
        assert!(
            out.iter().any(|(_, t)| t.contains("wifi_ap_mode")),
            "{out:?}"
        );
        assert_eq!(n.poll_timeout(), None);
        assert_eq!(ask_suspend(&mut n, t1), 3600);
    }

    #[test]
    fn suspend_busy_while_trying_then_keepalive_bound() {
        let mut n = node();
        let t0 = Instant(10_000);
        n.local_accept(t0, 1, Port::Local);
        n.handle_timeout(t0); // the helper grace (2 s) is over: file mode
        n.set_identity(t0, identity(true));
        // Before the cloud answered anything an attempt is in progress → 0. (`ask_suspend` then
        // plays the session to cloud_connected.)
        assert_eq!(ask_suspend(&mut n, t0), 0);
        assert_eq!(n.state(), State::CloudConnected);
        let t1 = t0 + Duration::from_secs(2);
        advance(&mut n, t1); // conn 1 classified
                             // First keepalive 20 s after connect; answered at once by `serve`.
        let ka = t0 + Duration::from_secs(20);
        advance(&mut n, ka);
        // L§12 example: 7.2 s after a keepalive, interval 20 s → 13.
        assert_eq!(ask_suspend(&mut n, ka + Duration::from_millis(7200)), 13);
        // An upstream request awaiting its ack makes the board busy.
        let t2 = ka + Duration::from_millis(7300);
        n.local_value(t2, 1, br#"{"id":1,"method":"props","params":{}}"#);
        let mut sent = false;
        while let Some(a) = n.poll_action() {
            sent |= matches!(a, Action::CloudSend(_));
        }
        assert!(sent);
        assert_eq!(ask_suspend(&mut n, t2), 0);
    }

    #[test]
    fn one_day_jump_fires_overdue_timers_once() {
        let mut n = node();
        let t0 = Instant(10_000);
        n.handle_timeout(t0); // the helper grace (2 s) is over: file mode
        n.set_identity(t0, identity(true));
        serve(&mut n, t0);
        assert_eq!(n.state(), State::CloudConnected);
        // Suspended for a day: the keepalive is overdue. One tick fires once (one keepalive sent),
        // then the next deadline is a full interval from now, not a burst of catch-up ticks.
        let later = t0 + Duration::from_secs(86_400);
        n.handle_timeout(later);
        let mut keepalives = 0;
        while let Some(a) = n.poll_action() {
            if let Action::CloudSend(b) = a {
                // 32 bytes with our did: a keepalive (the refresh hello has ff ids).
                if b.len() == 32 && b[8..12] == DID.to_be_bytes() {
                    keepalives += 1;
                }
            }
        }
        assert_eq!(keepalives, 1);
        let next = n.poll_timeout().expect("keepalive re-armed");
        assert!(
            next > later && next <= later + Duration::from_secs(20),
            "{next:?}"
        );
    }
}
