//! The start-up sequence (LOCAL_API.md §9.3): the helper's answers or the data files (L§9.5), the
//! identity they make, the Wi-Fi mode it is entered in, and the cloud machine it starts.

use log::{info, warn};

use super::routing::Conns;
use super::{Identity, Node};
use crate::config::device::DeviceConf;
use crate::config::{ConfError, Secret16};
use crate::proto::cloud::{self, Cloud, Didkey};
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
    /// A bootstrap did (L§16): the helper's material as JSON text, sent to the cloud as `data`.
    pub(super) didkey_data: Option<String>,
    /// An assigned did and key being stored (L§16 step 4), before the node switches to them.
    pub(super) assigned: Option<(u32, Secret16)>,
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
        // L§16: a did 0 device is online without `wifi.conf`; its token is kept across starts.
        let did0 = self.boot.device.as_ref().is_some_and(|d| d.did == 0);
        if !files.wifi_conf && !did0 {
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
        if self.state != State::DeviceInit {
            info!("the identity changed; restarting from the token step");
        }
        info!("device did {} model {} mac {}", d.did, d.model, d.mac);
        let bootstrap = d.did < 2;
        self.boot.device = Some(d);
        self.boot.token = None;
        self.boot.provisioned = None;
        self.boot.didkey_data = None;
        self.boot.assigned = None;
        self.drop_session(now);
        if bootstrap {
            // L§16 step 1: the helper's material for the cloud request.
            self.set_state(State::DidkeyReq1);
            self.helper
                .ask_didkeymac(&mut Conns::new(&mut self.local, &mut self.actions), now);
            return;
        }
        self.ask_token(now);
    }

    /// `didkey_done`: the token step (L§9.3).
    fn ask_token(&mut self, now: Instant) {
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
        // L§16 step 2: a did 0 device is already online, whatever the Wi-Fi status says.
        let provisioned = provisioned || self.boot.device.as_ref().is_some_and(|d| d.did == 0);
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
            H::UseFiles(Step::Didkeymac) => self.didkey_material(now, None),
            H::DidkeyMaterial(v) => self.didkey_material(now, Some(v)),
            H::UseFiles(Step::Didkeymac2) => {
                if let Some((did, key)) = self.boot.assigned.clone() {
                    self.actions.push(Action::StoreDidkey { did, key });
                }
            }
            H::DidkeyStored => {
                if self.boot.assigned.is_some() {
                    info!("the helper stored the new identity");
                    self.use_assigned(now);
                }
            }
            H::UseFiles(step) => self.actions.push(Action::LoadFiles(step)),
            H::WifiConnected => self.wifi_connected(now),
            H::WifiFailed => self.wifi_failed(now),
            H::Reboot => self.broadcast("reboot"),
        }
    }

    /// L§16 step 1 done: the helper's material (None: no helper, or no answer in time).
    fn didkey_material(&mut self, now: Instant, data: Option<String>) {
        if self.state != State::DidkeyReq1 {
            crate::info_limited!(now, "did/key material out of turn; ignored");
            return;
        }
        self.boot.didkey_data = Some(data.unwrap_or_else(|| "null".into()));
        self.ask_token(now);
    }

    /// The bootstrap session's exchange (P§5.11, L§16 steps 3 and 4).
    pub(super) fn on_didkey(&mut self, now: Instant, d: Didkey) {
        match d {
            Didkey::Asked => self.set_state(State::DidkeyReq2),
            // The state stays `didkey_req2`; the cloud machine holds the deadline.
            Didkey::RetryAfter(_) => {}
            Didkey::Assigned { did, key } => {
                self.boot.assigned = Some((did, key.clone()));
                self.helper.ask_didkeymac2(
                    &mut Conns::new(&mut self.local, &mut self.actions),
                    now,
                    did,
                    &key,
                );
            }
        }
    }

    /// The result of [`Action::StoreDidkey`]. A `device.conf` that cannot be written does not
    /// hold the device back: the new identity is used from memory (logged), and the next start
    /// asks the cloud again.
    pub fn didkey_written(&mut self, now: Instant, res: Result<(), ConfError>) {
        if self.boot.assigned.is_none() {
            return;
        }
        match res {
            Ok(()) => info!("stored the new identity in device.conf"),
            Err(e) => log::error!("{e}; using the new identity until the next start"),
        }
        self.use_assigned(now);
        self.pump(now);
    }

    /// L§16 step 5: `didkey_done`, then the normal connection under the assigned identity. The
    /// token and the Wi-Fi status are not asked again.
    fn use_assigned(&mut self, now: Instant) {
        let Some((did, key)) = self.boot.assigned.take() else {
            return;
        };
        let Some(d) = self.boot.device.as_mut() else {
            return;
        };
        d.did = did;
        d.key = key;
        info!("device did {did} model {} mac {}", d.model, d.mac);
        if let Some(t) = self.boot.token.as_ref() {
            // P§4.2: the LAN hello names the new did.
            self.lan.set_identity(did, *t.as_bytes());
        }
        self.drop_session(now);
        self.set_state(State::DidkeyDone);
        let provisioned = self.boot.provisioned.unwrap_or(true);
        self.rebuild_identity(now, provisioned);
    }

    pub(super) fn start_cloud(&mut self, now: Instant) {
        let Some(id) = self.identity.as_ref() else {
            return;
        };
        let mut cfg = self.cfg.cloud.clone();
        if id.did < 2 {
            cfg.didkey = Some(cloud::DidkeyAsk {
                vendor: id.vendor.clone(),
                data: self
                    .boot
                    .didkey_data
                    .clone()
                    .unwrap_or_else(|| "null".into()),
            });
        }
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

    const BOOT: &[u8; 16] = b"BootstrapKey0000";
    const NEW: &[u8; 16] = b"Nk3w9Zq0aB7cD1eF";
    const NEW_DID: u32 = 555;

    fn boot_conf(did: u32) -> String {
        format!("did={did}\nkey=BootstrapKey0000\nmac=aa:bb:cc:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n")
    }

    /// The io side of a bootstrap device (`conf` for the file steps, no `wifi.conf`) and a cloud
    /// that answers the did/key request with `reply(id, params)`; what else the node did goes to
    /// `seen`, with each message the cloud got as a `CloudSend` of its text.
    fn didkey_io(
        n: &mut Node,
        now: Instant,
        conf: &str,
        reply: &dyn Fn(&Value, &Value) -> String,
        seen: &mut Vec<Action>,
    ) {
        while let Some(a) = n.poll_action() {
            match a {
                Action::LoadFiles(Step::Dinfo) => {
                    n.file_dinfo(now, crate::config::device::parse(conf), None)
                }
                Action::LoadFiles(Step::Token) => n.file_token(now, token_files(false)),
                Action::LoadFiles(Step::WifiStatus) => n.file_wifi(now, false, String::new(), None),
                Action::StoreDidkey { did, ref key } => {
                    assert_eq!((did, key), (NEW_DID, &Secret16::new(*NEW)));
                    seen.push(a.clone());
                    n.didkey_written(now, Ok(()));
                }
                Action::Resolve { attempt, .. } => {
                    n.cloud_resolved(now, attempt, Ok(vec![Ipv4Addr::LOCALHOST]))
                }
                Action::Connect { .. } => {
                    n.cloud_connected(now, Netif::default(), Ipv4Addr::new(192, 168, 1, 20))
                }
                Action::CloudSend(b) => {
                    let p = miio::Packet::new_checked(&b[..]).unwrap();
                    if p.is_control() && p.ids_all_ff() {
                        n.cloud_datagram(now, &miio::time_sync_reply(1_700_000_000));
                        continue;
                    }
                    if p.is_control() {
                        continue;
                    }
                    let key = if p.did() < 2 { BOOT } else { NEW };
                    let keys = Keys::new(key);
                    let o = miio::open(&keys, p.did(), &p).expect("sealed with the key of its did");
                    let id = &o.value["id"];
                    let ack = match o.value["method"].as_str() {
                        Some("_otc.didkey_req") => {
                            assert_eq!(o.value["params"]["type"], p.did());
                            reply(id, &o.value["params"])
                        }
                        Some("_otc.info") => {
                            assert_eq!(p.did(), NEW_DID, "no _otc.info under a bootstrap did");
                            format!(r#"{{"id":{id},"result":{{"otc_list":[]}}}}"#)
                        }
                        _ => format!(r#"{{"id":{id},"result":"ok"}}"#),
                    };
                    seen.push(Action::CloudSend(o.text.into_bytes()));
                    let pkt = miio::seal(&keys, p.did(), p.stamp(), ack.as_bytes());
                    n.cloud_datagram(now, &pkt);
                }
                a => seen.push(a),
            }
        }
    }

    fn assign(id: &Value, _: &Value) -> String {
        format!(r#"{{"id":{id},"result":{{"did":{NEW_DID},"key":"Nk3w9Zq0aB7cD1eF"}}}}"#)
    }

    /// L§16, P§5.11 for did 0 in virtual time: no provisioning (the device is online without
    /// `wifi.conf`, and its token is kept), the request under the bootstrap did, a day-long
    /// `retry_after` that `wakeup_time` reports and the state keeps, the assignment on the next
    /// try, stored through io, then `cloud_connected` under the new identity.
    #[test]
    fn did0_waits_a_day_then_connects_under_the_assigned_identity() {
        let conf = boot_conf(0);
        let play =
            |n: &mut Node,
             now,
             reply: &dyn Fn(&Value, &Value) -> String,
             seen: &mut Vec<Action>| didkey_io(n, now, &conf, reply, seen);
        let mut n = node();
        n.cfg.mdns = Some(54321);
        n.cfg.max_sleep = Duration::from_secs(2 * 86_400);
        let t0 = Instant(10_000);
        n.local_accept(t0, 1, Port::Local);
        n.start(t0);
        n.handle_timeout(t0); // the helper grace is over: file mode
        let mut seen = Vec::new();
        let later = |id: &Value, p: &Value| {
            assert_eq!(p["data"], Value::Null, "no helper, no material");
            format!(r#"{{"id":{id},"result":{{"retry_after":86400}}}}"#)
        };
        play(&mut n, t0, &later, &mut seen);
        assert_eq!(n.state(), State::DidkeyReq2, "{seen:?}");
        assert!(
            !seen.iter().any(|a| matches!(a, Action::TokenFile(_))),
            "did 0 keeps its token without wifi.conf: {seen:?}"
        );
        assert!(
            !seen
                .iter()
                .any(|a| matches!(a, Action::MdnsService(Some(_)))),
            "no service for a bootstrap did: {seen:?}"
        );
        assert_eq!(n.identity().map(|i| i.did), Some(0));
        // Once the local connection is classified, the retry is the one deadline.
        let ta = t0 + Duration::from_secs(2);
        n.handle_timeout(ta);
        play(&mut n, ta, &later, &mut seen);
        assert_eq!(n.poll_timeout(), Some(t0 + Duration::from_secs(86_400)));
        assert_eq!(ask_suspend(&mut n, ta), 86_398);
        // Nothing happens before the day is over.
        let t1 = t0 + Duration::from_secs(86_399);
        n.handle_timeout(t1);
        seen.clear();
        play(&mut n, t1, &later, &mut seen);
        assert!(
            !seen.iter().any(|a| matches!(a, Action::CloudSend(_))),
            "{seen:?}"
        );
        assert_eq!(n.state(), State::DidkeyReq2);
        // The next try is assigned.
        let t2 = t0 + Duration::from_secs(86_400);
        n.handle_timeout(t2);
        seen.clear();
        play(&mut n, t2, &assign, &mut seen);
        assert_eq!(n.state(), State::CloudConnected, "{seen:?}");
        let stored = seen
            .iter()
            .position(|a| matches!(a, Action::StoreDidkey { .. }))
            .expect("stored");
        let info = seen
            .iter()
            .position(
                |a| matches!(a, Action::CloudSend(t) if t.windows(9).any(|w| w == b"_otc.info")),
            )
            .expect("_otc.info under the new identity");
        assert!(stored < info, "stored before the new session: {seen:?}");
        let id = n.identity().expect("identity");
        assert_eq!((id.did, id.key), (NEW_DID, *NEW));
        // The mDNS service is announced under the new did.
        assert!(
            seen.iter()
                .any(|a| matches!(a, Action::MdnsService(Some(s)) if s.did == NEW_DID)),
            "{seen:?}"
        );
    }

    /// L§16 with a helper: its material goes up as `data` unread; the assignment is handed to it
    /// (`req_didkeymac2`) and, when it answers "ok", the daemon writes nothing; without an answer
    /// in 10 s the daemon stores the identity itself. Either way the token is not asked again.
    #[test]
    fn did1_with_a_helper_material_up_and_the_store_by_helper_or_daemon() {
        let conf = boot_conf(1);
        let with_data = |id: &Value, p: &Value| {
            assert_eq!(p["data"], json!({"sn": "X1", "n": [1, 2]}));
            assign(id, p)
        };
        // `miio_recv_line`: a fresh connection's hello gets the head of the queue (L§9.1).
        let mut next = 10;
        let mut hello = |n: &mut Node, now| {
            next += 1;
            n.local_accept(now, next, Port::Local);
            n.local_value(now, next, br#"{"method":"_internal.hello"}"#);
        };
        for helper_stores in [true, false] {
            let mut n = node();
            let t0 = Instant(10_000);
            n.start(t0);
            n.local_accept(t0, 1, Port::Local);
            n.local_value(t0, 1, br#"{"method":"_internal.helper_ready"}"#);
            let mut seen = Vec::new();
            for answer in [
                r#"{"method":"_internal.response_dinfo","params":{"did":1,"key":"BootstrapKey0000","vendor":"acme","mac":"aa:bb:cc:01:02:03","model":"acme.dev.v1"}}"#,
                r#"{"method":"_internal.res_didkeymac","params":{"sn":"X1","n":[1,2]}}"#,
                r#"{"method":"_internal.response_dtoken","params":"ABCDEFGHIJKLMNOP"}"#,
                r#"{"method":"_internal.res_wifi_conf_status","params":1}"#,
            ] {
                hello(&mut n, t0);
                didkey_io(&mut n, t0, &conf, &with_data, &mut seen);
                n.local_value(t0, 1, answer.as_bytes());
            }
            hello(&mut n, t0);
            didkey_io(&mut n, t0, &conf, &with_data, &mut seen);
            let to_helper = |seen: &[Action], m: &str| {
                seen.iter()
                    .any(|a| matches!(a, Action::Local(LocalAction::Send(_, t)) if t.contains(m)))
            };
            assert!(
                to_helper(&seen, r#""method":"_internal.req_didkeymac","params":"#),
                "{seen:?}"
            );
            assert!(
                to_helper(
                    &seen,
                    r#""params":{"dir":"/etc/miio/","did":555,"key":"Nk3w9Zq0aB7cD1eF"}"#
                ),
                "{seen:?}"
            );
            assert_eq!(n.state(), State::DidkeyReq2, "waiting for the helper");
            seen.clear();
            if helper_stores {
                n.local_value(
                    t0,
                    1,
                    br#"{"method":"_internal.res_didkeymac2","params":"ok"}"#,
                );
                didkey_io(&mut n, t0, &conf, &with_data, &mut seen);
                assert!(
                    !seen.iter().any(|a| matches!(a, Action::StoreDidkey { .. })),
                    "{seen:?}"
                );
            } else {
                hello(&mut n, t0);
                let t1 = t0 + Duration::from_millis(9_999);
                n.handle_timeout(t1);
                didkey_io(&mut n, t1, &conf, &with_data, &mut seen);
                assert_eq!(n.state(), State::DidkeyReq2);
                let t2 = t0 + Duration::from_secs(10);
                n.handle_timeout(t2);
                didkey_io(&mut n, t2, &conf, &with_data, &mut seen);
                assert!(
                    seen.iter().any(|a| matches!(a, Action::StoreDidkey { .. })),
                    "{seen:?}"
                );
            }
            // The new session asks the helper for `_internal.info`; it is not answered: own INFO.
            let t3 = t0 + Duration::from_secs(20);
            n.handle_timeout(t3);
            didkey_io(&mut n, t3, &conf, &with_data, &mut seen);
            assert_eq!(n.state(), State::CloudConnected, "{seen:?}");
            assert_eq!(n.identity().map(|i| i.did), Some(NEW_DID));
            assert!(
                !to_helper(&seen, "request_dtoken") && !to_helper(&seen, "req_wifi_conf_status"),
                "{seen:?}"
            );
        }
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
