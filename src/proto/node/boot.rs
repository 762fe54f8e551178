//! The start-up sequence (LOCAL_API.md §9.3): the helper's answers or the data files (L§9.5), the
//! identity they make, the Wi-Fi mode it is entered in, and the cloud machine it starts.

use log::{info, warn};

use super::routing::Conns;
use super::{Identity, Node};
use crate::config::device::DeviceConf;
use crate::config::{ConfError, Secret16};
use crate::proto::cloud::{self, Cloud};
use crate::proto::helper::{self, Step};
use crate::proto::ioerr::OsError;
use crate::proto::outbox::Action;
use crate::proto::state::State;
use crate::time::{Duration, Instant};
use crate::wire::rpc::Members;

/// How long `device_init` waits before it says again why and re-reads the data files (L§9.5).
pub const CONFIG_RETRY: Duration = Duration::from_secs(30);

/// What the start-up sequence has learnt so far (L§9.3), from the helper or the files.
#[derive(Default)]
pub(super) struct Boot {
    pub(super) device: Option<DeviceConf>,
    pub(super) token: Option<Secret16>,
    pub(super) provisioned: Option<bool>,
    pub(super) ssid: String,
    /// `uid=` of wifi.conf (D18: kept when a provisioning brings none).
    pub(super) uid: Option<u64>,
    pub(super) country: Option<String>,
    /// The token step of the file mode waiting for io (L§9.3).
    pub(super) token_job: Option<TokenJob>,
}

/// A file-mode token step waiting for [`Node::token_written`]: the fresh token it will use, and
/// whether the request out is the removal of the old file (else the write of the fresh one).
pub(super) struct TokenJob {
    fresh: Secret16,
    removing: bool,
}

/// What io read for the token step of the file mode (L§9.3), with a fresh random token: the node
/// decides from it whether the token file is used, removed or replaced. `Debug` shows no token.
pub struct TokenFiles {
    /// `wifi.conf` exists: the device is provisioned.
    pub wifi_conf: bool,
    /// The text of `device.token` (None: no such file), or why it could not be read.
    pub token: Result<Option<String>, ConfError>,
    /// A new random token, for a device that has none or must get a new one.
    pub fresh: Secret16,
}

impl core::fmt::Debug for TokenFiles {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TokenFiles")
            .field("wifi_conf", &self.wifi_conf)
            .field(
                "token",
                &self.token.as_ref().map(|t| t.as_ref().map(|_| "***")),
            )
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts the start-up sequence (L§9.3): the helper is asked for the identity; without a helper
    /// the grace period ends in `LoadFiles(Dinfo)`.
    pub fn start(&mut self, now: Instant) {
        self.helper
            .ask_dinfo(&mut Conns::new(&mut self.local, &mut self.actions), now);
        self.pump(now);
    }

    /// The text of os-release; `fw_ver` is its `<VENDOR>_VERSION` (P§5.4, L§17).
    pub fn set_os_release(&mut self, text: Option<String>) {
        self.os_release = text;
    }

    pub(super) fn fw_ver(&self) -> Option<String> {
        let vendor = self.boot.device.as_ref().map(|d| d.vendor.as_str())?;
        crate::config::osrelease::fw_version(self.os_release.as_deref()?, vendor)
    }

    /// SIGHUP or the 30 s retry: in `device_init` without a helper, read the files again (L§9.5).
    /// In any state without a helper: SIGHUP re-reads device.conf, and a changed identity restarts
    /// the sequence from the token step (L§18, L§9.5); an unchanged one changes nothing.
    pub fn retry_files(&mut self) {
        if !self.helper.present() && self.provisioning.is_none() && self.writing.is_none() {
            self.actions.push(Action::LoadFiles(Step::Dinfo));
        }
    }

    /// `device.conf` (and `device.country`) read for the file mode.
    pub fn file_dinfo(
        &mut self,
        now: Instant,
        res: Result<DeviceConf, ConfError>,
        country: Option<String>,
    ) {
        match res {
            Ok(d) => {
                self.config_retry = None;
                if self.boot.device.is_none() {
                    self.boot.country = country;
                }
                self.got_device(now, d);
            }
            Err(e) => {
                log::error!("{e}");
                if self.state == State::DeviceInit {
                    self.config_retry = Some(now + CONFIG_RETRY);
                    log::error!("staying in device_init; fix the file and send SIGHUP");
                } else {
                    log::error!("keeping the identity in use");
                }
            }
        }
        self.pump(now);
    }

    /// A new service that the LAN can reach (P§4.8): announce it now and once more a second later
    /// (RFC 6762 §8.3).
    pub(super) fn mdns_announce(&mut self, now: Instant) {
        self.actions.push(Action::MdnsAnnounce);
        self.mdns_again = Some(now + Duration::from_secs(1));
    }

    /// The token step of the file mode (L§9.3) from what io read: no `wifi.conf` → the token file
    /// is removed (a reset makes a fresh token); a valid token file → that token; otherwise the
    /// fresh token is stored (0600) and used. The removal and the write are [`Action::TokenFile`],
    /// answered with [`Node::token_written`]. A token file that cannot be read leaves the device
    /// in `didkey_done` (logged).
    pub fn file_token(&mut self, now: Instant, files: TokenFiles) {
        if !files.wifi_conf {
            self.token_request(files.fresh, true);
        } else {
            match files.token {
                Ok(Some(text)) => match crate::config::token::parse(&text) {
                    Ok(t) => self.got_token(now, t),
                    Err(mut e) => {
                        e.file = self.token_path();
                        warn!("{e}; storing a new token");
                        self.token_request(files.fresh, false);
                    }
                },
                Ok(None) => self.token_request(files.fresh, false),
                Err(e) => log::error!("{e}"),
            }
        }
        self.pump(now);
    }

    /// The result of [`Action::TokenFile`]. A data dir that is read-only or full cannot keep the
    /// device out of AP mode (L§8): when the old token cannot be removed or the fresh one cannot
    /// be stored, the fresh one is used from memory (logged with the errno).
    pub fn token_written(&mut self, now: Instant, res: Result<(), OsError>) {
        let Some(TokenJob { fresh, removing }) = self.boot.token_job.take() else {
            return;
        };
        match res {
            // The old token is gone: store the fresh one.
            Ok(()) if removing => self.token_request(fresh, false),
            Ok(()) => {
                info!("stored a new token in {}", self.token_path());
                self.got_token(now, fresh);
            }
            Err(e) => {
                let what = if removing { "remove" } else { "write" };
                log::error!(
                    "{}: cannot {what}: {e}; using a new token in memory",
                    self.token_path()
                );
                self.got_token(now, fresh);
            }
        }
        self.pump(now);
    }

    /// Asks io to remove `device.token` (`removing`) or to store `fresh` in it.
    fn token_request(&mut self, fresh: Secret16, removing: bool) {
        let store = (!removing).then(|| fresh.clone());
        self.boot.token_job = Some(TokenJob { fresh, removing });
        self.actions.push(Action::TokenFile(store));
    }

    /// `device.token`'s path, as the log names it.
    fn token_path(&self) -> String {
        std::path::Path::new(&self.cfg.helper.datadir)
            .join("device.token")
            .display()
            .to_string()
    }

    /// The Wi-Fi status from the files: `wifi.conf` exists (provisioned), its ssid and uid.
    pub fn file_wifi(&mut self, now: Instant, provisioned: bool, ssid: String, uid: Option<u64>) {
        self.boot.ssid = ssid;
        self.boot.uid = uid;
        self.got_wifi(now, provisioned);
        self.pump(now);
    }

    /// The ssid of `wifi.conf` after [`Action::ReadSsid`]; changes nothing else.
    pub fn file_ssid(&mut self, ssid: String) {
        if let Some(id) = self.identity.as_mut() {
            id.ssid.clone_from(&ssid);
        }
        self.boot.ssid = ssid;
    }

    pub(super) fn got_device(&mut self, now: Instant, d: DeviceConf) {
        if self.boot.device.as_ref() == Some(&d) {
            return;
        }
        if d.did < 2 {
            warn!(
                "did {} asks for a dynamic did/key, which this build does not do yet",
                d.did
            );
        }
        if self.state != State::DeviceInit {
            info!("the identity changed; restarting from the token step");
        }
        info!("device did {} model {} mac {}", d.did, d.model, d.mac);
        self.boot.device = Some(d);
        self.boot.token = None;
        self.boot.provisioned = None;
        self.drop_session(now);
        self.set_state(State::DidkeyDone);
        let fresh = self.fresh_token.clone();
        self.helper.ask_token(
            &mut Conns::new(&mut self.local, &mut self.actions),
            now,
            &fresh,
        );
    }

    pub(super) fn got_token(&mut self, now: Instant, t: Secret16) {
        let Some(d) = self.boot.device.as_ref() else {
            return;
        };
        if self.boot.token.as_ref() == Some(&t) {
            return;
        }
        self.lan.set_identity(d.did, *t.as_bytes());
        self.boot.token = Some(t);
        self.boot.provisioned = None;
        self.drop_session(now);
        self.set_state(State::TokenDone);
        self.helper
            .ask_wifi_status(&mut Conns::new(&mut self.local, &mut self.actions), now);
    }

    pub(super) fn got_wifi(&mut self, now: Instant, provisioned: bool) {
        if self.boot.token.is_none() || self.boot.provisioned == Some(provisioned) {
            return;
        }
        self.boot.provisioned = Some(provisioned);
        self.rebuild_identity(now, provisioned);
    }

    /// Closes a running cloud session (a new identity or Wi-Fi mode).
    pub(super) fn drop_session(&mut self, now: Instant) {
        if self.cloud.is_some() {
            self.shutdown(now);
            self.cloud_carry = self.cloud.take().map(|c| c.carry());
        }
        self.identity = None;
    }

    /// The identity became known with its Wi-Fi mode: `sta_mode` (and the cloud) or `wifi_ap_mode`.
    pub fn set_identity(&mut self, now: Instant, id: Identity) {
        info!("device did {} model {} mac {}", id.did, id.model, id.mac);
        self.set_state(State::DidkeyDone);
        self.lan.set_identity(id.did, id.token);
        self.set_state(State::TokenDone);
        self.enter(now, id);
    }

    pub(super) fn enter(&mut self, now: Instant, id: Identity) {
        self.drop_session(now);
        let provisioned = id.provisioned;
        self.identity = Some(id);
        if provisioned {
            self.set_state(State::WifiStaMode);
            self.start_cloud(now);
        } else {
            self.helper.offline_stop();
            self.set_state(State::WifiApMode);
            self.broadcast("wifi_ap_mode");
        }
        self.pump(now);
    }

    /// The identity from what the start-up sequence learnt, entered with its Wi-Fi mode.
    pub(super) fn rebuild_identity(&mut self, now: Instant, provisioned: bool) {
        let (Some(d), Some(t)) = (self.boot.device.clone(), self.boot.token.clone()) else {
            return;
        };
        let id = Identity {
            did: d.did,
            key: *d.key.as_bytes(),
            mac: d.mac,
            model: d.model,
            vendor: d.vendor,
            token: *t.as_bytes(),
            provisioned,
            ssid: self.boot.ssid.clone(),
            fw_ver: self.fw_ver(),
            country: self.boot.country.clone(),
        };
        self.enter(now, id);
    }

    pub(super) fn on_helper_event(&mut self, now: Instant, e: helper::Event) {
        use helper::Event as H;
        match e {
            H::Identity(d) => self.got_device(now, d),
            H::Token(t) => self.got_token(now, t),
            H::Country(c) => self.boot.country = c,
            H::WifiStatus(p) => {
                self.actions.push(Action::ReadSsid);
                self.got_wifi(now, p)
            }
            H::Info(info) => {
                self.helper_info = info
                    .get("params")
                    .and_then(|p| Members::of_object(p.as_bytes()));
                if let Some(c) = self.cloud.as_mut() {
                    c.handle_info(now, &info, &mut self.actions);
                }
            }
            H::UseFiles(Step::Info) => {
                let mut info = Members::new();
                info.set("params", self.own_info().to_json());
                if let Some(c) = self.cloud.as_mut() {
                    c.handle_info(now, &info, &mut self.actions);
                }
            }
            H::UseFiles(Step::Didkeymac | Step::Didkeymac2) => {
                crate::info_limited!(now, "no helper answer for the did/key step")
            }
            H::UseFiles(step) => self.actions.push(Action::LoadFiles(step)),
            H::DidkeyMaterial(_) | H::DidkeyStored => {
                crate::info_limited!(now, "did/key helper answer ignored")
            }
            H::WifiConnected => self.wifi_connected(now),
            H::WifiFailed => self.wifi_failed(now),
            H::Reboot => self.broadcast("reboot"),
        }
    }

    pub(super) fn start_cloud(&mut self, now: Instant) {
        let Some(id) = self.identity.as_ref() else {
            return;
        };
        let mut cfg = self.cfg.cloud.clone();
        cfg.did = id.did;
        cfg.key = id.key;
        cfg.model = id.model.clone();
        cfg.mac = id.mac.clone();
        cfg.token_hex = crate::config::token::to_hex(&crate::config::Secret16::new(id.token));
        let cc = self.country().unwrap_or_default();
        let (udp, tcp) = cloud::default_hosts(&cc);
        if !self.cfg.hosts_explicit.0 {
            cfg.udp.host = udp;
        }
        if !self.cfg.hosts_explicit.1 {
            cfg.tcp.host = tcp;
        }
        let mut c = Cloud::new(cfg);
        // Ids never repeat within a run, and `ota_state idle` goes up once (P§5.7 D5, D12).
        if let Some(k) = self
            .cloud
            .take()
            .map(|c| c.carry())
            .or(self.cloud_carry.take())
        {
            c.resume(k);
        }
        if let Some((uid, bindkey)) = &self.bind {
            c.set_bind(uid.clone(), bindkey.clone());
        }
        c.start(now, &mut self.actions);
        self.cloud = Some(c);
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::*;
    use super::*;

    /// ARCHITECTURE.md rule 4: every deadline of the process is the node's, so the suspend answer
    /// knows them: the re-read of a broken `device.conf` (L§9.5) and the second mDNS announcement.
    #[test]
    fn config_retry_and_mdns_announcements_are_node_deadlines() {
        let mut n = node();
        let t0 = Instant(10_000);
        n.handle_timeout(t0); // the helper grace is over: file mode
        let no_did = ConfError {
            file: "device.conf".into(),
            line: 0,
            reason: "no did".into(),
        };
        n.file_dinfo(t0, Err(no_did), None);
        drain(&mut n);
        assert_eq!(n.state(), State::DeviceInit);
        assert_eq!(n.poll_timeout(), Some(t0 + CONFIG_RETRY));
        n.local_accept(t0, 1, Port::Local);
        assert_eq!(ask_suspend(&mut n, t0), CONFIG_RETRY.secs_ceil());
        let t1 = t0 + CONFIG_RETRY;
        n.handle_timeout(t1);
        let again = drain(&mut n);
        assert!(again.contains(&Action::LoadFiles(Step::Dinfo)), "{again:?}");
        // A good file ends the retries.
        n.set_identity(t1, identity(true));
        serve(&mut n, t1);
        assert_eq!(n.state(), State::CloudConnected);
        n.file_dinfo(t1, Ok(crate::config::device::parse(CONF).unwrap()), None);
        serve(&mut n, t1);
        assert!(
            n.poll_timeout().is_none_or(|t| t > t1 + CONFIG_RETRY),
            "retry still armed"
        );

        // mDNS: now, and once more a second later, which a suspend must not sleep through.
        let announces = |n: &mut Node| {
            let mut k = 0;
            while let Some(a) = n.poll_action() {
                k += usize::from(a == Action::MdnsAnnounce);
            }
            k
        };
        n.mdns_announce(t1);
        assert_eq!(announces(&mut n), 1);
        assert_eq!(n.poll_timeout(), Some(t1 + Duration::from_secs(1)));
        assert_eq!(ask_suspend(&mut n, t1), 1);
        n.handle_timeout(t1 + Duration::from_millis(999));
        assert_eq!(announces(&mut n), 0);
        n.handle_timeout(t1 + Duration::from_secs(1));
        assert_eq!(announces(&mut n), 1);
    }

    /// P§4.8: the mDNS service is the node's decision: a provisioned identity in a STA state with
    /// the cloud socket's real address; a change goes to io, and one the LAN can reach (not
    /// loopback) is announced; leaving the STA states withdraws it until the next socket.
    #[test]
    fn the_mdns_service_follows_identity_state_and_address() {
        use crate::wire::dns::ServiceInfo;
        let t = Instant(10_000);
        let lan = Ipv4Addr::new(192, 168, 1, 20);
        let at = |ip| {
            Some(ServiceInfo {
                model: "acme.dev.v1".into(),
                did: DID,
                ip,
                port: 54321,
            })
        };
        let mdns = |n: &mut Node| -> Vec<Action> {
            drain(n)
                .into_iter()
                .filter(|a| matches!(a, Action::MdnsService(_) | Action::MdnsAnnounce))
                .collect()
        };
        // Without a responder there is nothing to decide.
        let mut n = node();
        n.set_identity(t, identity(true));
        n.cloud_connected(t, Netif::default(), lan);
        assert_eq!(mdns(&mut n), []);

        let mut n = node();
        n.cfg.mdns = Some(54321);
        n.set_identity(t, identity(true));
        assert_eq!(mdns(&mut n), [], "no address yet");
        n.cloud_connected(t, Netif::default(), Ipv4Addr::LOCALHOST);
        assert_eq!(mdns(&mut n), [Action::MdnsService(at(Ipv4Addr::LOCALHOST))]);
        assert_eq!(n.mdns_again, None, "no announcement for loopback");
        n.cloud_connected(t, Netif::default(), lan);
        let announced = [Action::MdnsService(at(lan)), Action::MdnsAnnounce];
        assert_eq!(mdns(&mut n), announced);
        assert_eq!(n.mdns_again, Some(t + Duration::from_secs(1)));
        n.cloud_connected(t, Netif::default(), lan);
        assert_eq!(mdns(&mut n), [], "unchanged");
        n.cloud_connected(t, Netif::default(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(mdns(&mut n), [Action::MdnsService(None)], "not IPv4");
        n.cloud_connected(t, Netif::default(), lan);
        assert_eq!(mdns(&mut n), announced);
        // AP mode: withdrawn; a socket there sets nothing, nor does STA mode before a socket.
        n.set_identity(t, identity(false));
        assert_eq!(mdns(&mut n), [Action::MdnsService(None)]);
        n.cloud_connected(t, Netif::default(), lan);
        assert_eq!(mdns(&mut n), []);
        n.set_identity(t, identity(true));
        assert_eq!(mdns(&mut n), []);
        n.cloud_connected(t, Netif::default(), lan);
        assert_eq!(mdns(&mut n), announced);
    }

    /// L§9.3, file mode: the token step is the node's decision; io only reads the files and
    /// removes or writes `device.token` as asked.
    #[test]
    fn the_token_step_decides_from_what_io_read() {
        const FILE: &[u8; 16] = b"ABCDEFGHIJKLMNOP";
        const FRESH: &[u8; 16] = b"NewToken01234567";
        let ro = || Err(OsError::Errno(30));
        // A node in `didkey_done`, asked for the token step; the requests it makes to io, each
        // answered from `results`, and the token it ends with.
        let step = |wifi_conf: bool,
                    token: Result<Option<&str>, ConfError>,
                    mut results: Vec<Result<(), OsError>>| {
            let mut n = node();
            let t = Instant(10_000);
            n.handle_timeout(t); // the helper grace is over: file mode
            n.file_dinfo(t, crate::config::device::parse(CONF), None);
            assert!(drain(&mut n).contains(&Action::LoadFiles(Step::Token)));
            let files = TokenFiles {
                wifi_conf,
                token: token.map(|o| o.map(str::to_string)),
                fresh: Secret16::new(*FRESH),
            };
            n.file_token(t, files);
            let mut asked = Vec::new();
            while let Some(a) = n.poll_action() {
                if let Action::TokenFile(op) = a {
                    asked.push(op.map(|t| *t.as_bytes()));
                    n.token_written(t, results.remove(0));
                }
            }
            assert!(results.is_empty(), "answers left: {results:?}");
            (asked, n.boot.token.as_ref().map(|t| *t.as_bytes()))
        };
        let good = || Ok(Some("ABCDEFGHIJKLMNOP"));
        // Provisioned with a valid token file: that token, nothing written.
        assert_eq!(step(true, good(), vec![]), (vec![], Some(*FILE)));
        // No wifi.conf (a reset): the old file goes, the fresh token is stored and used.
        assert_eq!(
            step(false, good(), vec![Ok(()), Ok(())]),
            (vec![None, Some(*FRESH)], Some(*FRESH))
        );
        // ... and when it cannot be removed, the fresh one is used from memory, not stored.
        assert_eq!(step(false, good(), vec![ro()]), (vec![None], Some(*FRESH)));
        // No token file, or a bad one: the fresh token is stored; a failed write uses it anyway.
        for file in [Ok(None), Ok(Some("short"))] {
            assert_eq!(
                step(true, file.clone(), vec![Ok(())]),
                (vec![Some(*FRESH)], Some(*FRESH))
            );
            assert_eq!(
                step(true, file, vec![ro()]),
                (vec![Some(*FRESH)], Some(*FRESH))
            );
        }
        // A token file that cannot be read: no token, nothing written (logged).
        let unreadable = ConfError {
            file: "device.token".into(),
            line: 0,
            reason: "cannot read".into(),
        };
        assert_eq!(step(true, Err(unreadable), vec![]), (vec![], None));
    }

    /// P§5.7 D5, D12: ids are unique for the life of the process and `ota_state idle` goes up once
    /// per start, across new cloud sessions: a router password change (L§8) and a SIGHUP identity
    /// change (L§18) each start a new cloud machine.
    #[test]
    fn cloud_ids_unique_across_sessions_and_idle_once() {
        let mut n = node();
        let t0 = Instant(10_000);
        let mut sent = Vec::new();
        n.local_accept(t0, 1, Port::Local);
        n.start(t0);
        let t1 = t0 + Duration::from_secs(3); // the helper grace is over: file mode
        n.handle_timeout(t1);
        serve_with(&mut n, t1, Some(CONF), &mut sent);
        assert_eq!(n.state(), State::CloudConnected);
        let first = sent.len();

        // A router password change on 54322 (the QR path; no helper: connected at once, D9).
        let t2 = t1 + Duration::from_secs(60);
        n.local_value(
            t2,
            1,
            br#"{"id":5,"method":"local.ble.config_router","params":{"ssid":"new","passwd":"pw12345678","uid":"42"}}"#,
        );
        let out = serve_with(&mut n, t2, Some(CONF), &mut sent);
        assert!(
            out.iter().any(|(_, t)| t == r#"{"id":5,"result":["OK"]}"#),
            "{out:?}"
        );
        assert_eq!(n.state(), State::CloudConnected);
        let second = sent.len();

        // SIGHUP with a changed device.conf: a new identity, a new session.
        let t3 = t2 + Duration::from_secs(60);
        n.retry_files();
        let conf2 = CONF.replace("acme.dev.v1", "acme.dev.v2");
        serve_with(&mut n, t3, Some(&conf2), &mut sent);
        assert_eq!(n.state(), State::CloudConnected);

        let infos = sent.iter().filter(|v| v["method"] == "_otc.info").count();
        assert_eq!(infos, 3, "one _otc.info per session: {sent:?}");
        assert!(
            first > 0 && second > first && sent.len() > second,
            "{sent:?}"
        );
        let idle = sent
            .iter()
            .filter(|v| v["method"] == "props" && v["params"]["ota_state"] == "idle")
            .count();
        assert_eq!(idle, 1, "D12: once per daemon start: {sent:?}");
        let mut ids: Vec<u64> = sent.iter().filter_map(|v| v["id"].as_u64()).collect();
        assert_eq!(ids.len(), sent.len(), "{sent:?}");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), sent.len(), "an id went up twice: {sent:?}");
    }
}
