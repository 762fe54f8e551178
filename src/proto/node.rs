//! The node: the daemon's decisions in one sans-IO machine. It holds the state of LOCAL_API.md §7,
//! the device identity, the local connection table and the cloud link machine, routes every message
//! between them (L§4, P§5.7–§5.8), answers `local.*` (L§5, §12) and the methods the daemon answers
//! itself (P§4.6), and turns cloud events into states and `local.status` broadcasts (L§6).
//!
//! The reactor feeds it inputs and executes its [`Action`]s; it never touches a socket or a file.

use std::net::{Ipv4Addr, SocketAddr};

use log::{info, warn};
use serde_json::{json, Map, Value};

use super::cloud::{self, Cloud, CloudConfig, CloudEvent, CloudState};
use super::helper::{self, Helper, Step};
use super::lan::{Lan, LanEvent};
use super::local::{ConnId, Inbound, Local, Port};
pub use super::outbox::{Action, Outbox};
use super::state::State;
use crate::config::device::DeviceConf;
use crate::config::Secret16;
use crate::time::{Duration, Instant};
use crate::wire::rpc::{self, Members};

/// The device identity and what the data files say about provisioning.
#[derive(Clone)]
pub struct Identity {
    pub did: u32,
    pub key: [u8; 16],
    pub mac: String,
    pub model: String,
    pub vendor: String,
    pub token: [u8; 16],
    pub provisioned: bool,
    pub ssid: String,
    pub fw_ver: Option<String>,
    pub country: Option<String>,
}

impl core::fmt::Debug for Identity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Identity")
            .field("did", &self.did)
            .field("model", &self.model)
            .field("mac", &self.mac)
            .field("provisioned", &self.provisioned)
            .finish_non_exhaustive()
    }
}

/// Settings fixed for a run (from the command line).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub max_clients: usize,
    pub max_sleep: Duration,
    /// The cloud template: identity fields are filled in when the identity is known.
    pub cloud: CloudConfig,
    /// `-C`: a country prefix from the command line wins over `device.country`.
    pub country_override: Option<String>,
    /// `-H`/`--udp-host`/`--tcp-host` given: hosts are not derived from the country.
    pub hosts_explicit: (bool, bool),
    /// The helper protocol: data dir, grace and timeout (L§9).
    pub helper: helper::Config,
}

/// The local network facts of the cloud socket, for INFO's `netif` (P§5.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Netif {
    pub ip: String,
    pub mask: String,
    pub gw: String,
}

/// How long `device_init` waits before it says again why and re-reads the data files (L§9.5).
pub const CONFIG_RETRY: Duration = Duration::from_secs(30);

/// Where a provisioning came from, for its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProvisionFrom {
    /// `miIO.config_router` from the phone, under this LAN handle: `["OK"]` / `["ERROR"]`.
    Lan(u64),
    /// `local.ble.config_router` (BLE on 54323, QR on 54322) from this connection: `["OK"]` /
    /// -33020 with the reason.
    Local(ConnId),
}

/// A checked provisioning whose `wifi.conf` is being written; it is answered when the write is.
struct Written {
    from: ProvisionFrom,
    id: Value,
    params: super::provision::Params,
}

/// What the start-up sequence has learnt so far (L§9.3), from the helper or the files.
#[derive(Default)]
struct Boot {
    device: Option<DeviceConf>,
    token: Option<Secret16>,
    provisioned: Option<bool>,
    ssid: String,
    /// `uid=` of wifi.conf (D18: kept when a provisioning brings none).
    uid: Option<u64>,
    country: Option<String>,
}

pub struct Node {
    cfg: NodeConfig,
    state: State,
    identity: Option<Identity>,
    local: Local,
    cloud: Option<Cloud>,
    lan: Lan,
    helper: Helper,
    boot: Boot,
    /// A token for `request_dtoken`'s `ntoken` (drawn from the OS by the reactor).
    fresh_token: Secret16,
    os_release: Option<String>,
    /// A provisioning in progress: true when it started in AP mode (L§8 failure rules).
    provisioning: Option<bool>,
    /// A provisioning waiting for its `wifi.conf` write (L§8: the reply comes after it).
    writing: Option<Written>,
    /// A LAN `miIO.config` (handle, id) waiting for its flag file (P§4.6): the answer says
    /// whether the file was written.
    trusting: Option<(u64, Value)>,
    /// uid and bind_key of a provisioning in this run, for `_otc.info` (P§5.4).
    bind: Option<(String, Option<String>)>,
    /// The id counter and D12 flag of the last cloud machine, for the next one (P§5.7 D5).
    cloud_carry: Option<cloud::Carry>,
    /// The helper's last `_internal.info` params: the base of `miIO.info`.
    helper_info: Option<Members>,
    netif: Netif,
    /// The cloud socket has unsent output (TCP): the board must not sleep (L§12).
    cloud_backlog: bool,
    /// In `device_init` without a usable `device.conf`: when to re-read the files (L§9.5).
    config_retry: Option<Instant>,
    /// The second mDNS announcement of a changed service (P§4.8).
    mdns_again: Option<Instant>,
    actions: Outbox,
}

/// The refusal of a provisioning (L§8), logged with its reason.
fn refusal(now: Instant, from: ProvisionFrom, id: &Value, reason: &str) -> String {
    match from {
        ProvisionFrom::Lan(_) => {
            crate::warn_limited!(now, "config_router refused: {reason}");
            rpc::result_reply(id, &json!(["ERROR"]))
        }
        ProvisionFrom::Local(_) => {
            crate::warn_limited!(now, "ble.config_router refused: {reason}");
            rpc::error_reply(Some(id), -33020, reason)
        }
    }
}

impl Node {
    /// A node at `now` (the helper grace period runs from here). `fresh_token` is the `ntoken` the
    /// helper is offered and the file mode stores when the device has none (L§9.3).
    pub fn new(now: Instant, cfg: NodeConfig, fresh_token: Secret16) -> Node {
        Node {
            helper: Helper::new(now, cfg.helper.clone()),
            boot: Boot::default(),
            fresh_token,
            os_release: None,
            provisioning: None,
            writing: None,
            trusting: None,
            bind: None,
            cloud_carry: None,
            helper_info: None,
            local: Local::new(cfg.max_clients),
            lan: Lan::new(
                cfg.cloud.seed ^ 0x9e37_79b9_7f4a_7c15,
                cfg.cloud.user_ack_timeout,
            ),
            cfg,
            state: State::DeviceInit,
            identity: None,
            cloud: None,
            netif: Netif::default(),
            cloud_backlog: false,
            config_retry: None,
            mdns_again: None,
            actions: Outbox::default(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            self.collect();
        }
        self.actions.pop()
    }

    /// The earliest deadline that must wake the daemon (cache expiry excluded).
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.local.poll_timeout(),
            self.cloud.as_ref().and_then(Cloud::poll_timeout),
            self.lan.poll_timeout(),
            self.helper.poll_timeout(),
            self.config_retry,
            self.mdns_again,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.config_retry.is_some_and(|t| t <= now) {
            // L§9.5: without a usable identity, say why again and re-read the files.
            self.config_retry = None;
            self.retry_files();
        }
        if self.mdns_again.is_some_and(|t| t <= now) {
            self.mdns_again = None;
            self.actions.push(Action::MdnsAnnounce);
        }
        self.local.handle_timeout(now);
        if let Some(c) = self.cloud.as_mut() {
            c.handle_timeout(now, &mut self.actions);
        }
        self.lan.handle_timeout(now, &mut self.actions);
        self.helper.handle_timeout(now);
        self.pump(now);
    }

    fn set_state(&mut self, to: State) {
        if to != self.state {
            info!("{}", State::transition_line(self.state, to));
            self.state = to;
            self.lan.set_state(to);
        }
    }

    fn broadcast(&mut self, event: &str) {
        info!("local.status: {event}");
        self.local.broadcast_status(&rpc::local_status(event));
    }

    /// The device stamp (P§4.3): boottime seconds + the time-sync offset.
    pub fn stamp(&self, now: Instant) -> u32 {
        match &self.cloud {
            Some(c) => c.stamp(now),
            None => now.secs() as u32,
        }
    }

    fn country(&self) -> Option<String> {
        self.cfg
            .country_override
            .clone()
            .or_else(|| self.identity.as_ref().and_then(|i| i.country.clone()))
    }

    /// Starts the start-up sequence (L§9.3): the helper is asked for the identity; without a helper
    /// the grace period ends in `LoadFiles(Dinfo)`.
    pub fn start(&mut self, now: Instant) {
        self.helper.ask_dinfo(now);
        self.pump(now);
    }

    /// The text of os-release; `fw_ver` is its `<VENDOR>_VERSION` (P§5.4, L§17).
    pub fn set_os_release(&mut self, text: Option<String>) {
        self.os_release = text;
    }

    fn fw_ver(&self) -> Option<String> {
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
        res: Result<DeviceConf, String>,
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

    /// The reactor's mDNS responder took a new service that the LAN can reach (P§4.8): announce it
    /// now and once more a second later.
    pub fn mdns_service_changed(&mut self, now: Instant) {
        self.actions.push(Action::MdnsAnnounce);
        self.mdns_again = Some(now + Duration::from_secs(1));
    }

    /// The token step done from the files (L§9.3 token logic, run by the reactor).
    pub fn file_token(&mut self, now: Instant, res: Result<Secret16, String>) {
        match res {
            Ok(t) => self.got_token(now, t),
            Err(e) => log::error!("{e}"),
        }
        self.pump(now);
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

    fn got_device(&mut self, now: Instant, d: DeviceConf) {
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
        self.helper.ask_token(now, &fresh);
    }

    fn got_token(&mut self, now: Instant, t: Secret16) {
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
        self.helper.ask_wifi_status(now);
    }

    fn got_wifi(&mut self, now: Instant, provisioned: bool) {
        if self.boot.token.is_none() || self.boot.provisioned == Some(provisioned) {
            return;
        }
        self.boot.provisioned = Some(provisioned);
        self.rebuild_identity(now, provisioned);
    }

    /// Closes a running cloud session (a new identity or Wi-Fi mode).
    fn drop_session(&mut self, now: Instant) {
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

    fn enter(&mut self, now: Instant, id: Identity) {
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

    /// L§8 validation: the checked parameters, or the refusal reply for the requester.
    fn provision_check(
        &mut self,
        now: Instant,
        params: Option<&Value>,
        id: &Value,
        from: ProvisionFrom,
    ) -> Result<super::provision::Params, String> {
        let refuse = |reason: &str| refusal(now, from, id, reason);
        if self.provisioning.is_some() || self.writing.is_some() {
            return Err(refuse("provisioning in progress."));
        }
        let p = super::provision::parse(params).map_err(|r| refuse(&r))?;
        if !self.state.token_known() || self.boot.device.is_none() {
            return Err(refuse("device not ready."));
        }
        Ok(p)
    }

    /// L§8 step 1, before any reply: write wifi.conf (D18: no uid keeps the previous uid= line).
    /// A data dir that is full or read-only must not get an `["OK"]` that loses the binding at
    /// the next restart, so the requester is answered from [`Node::wifi_written`].
    fn provision_write(
        &mut self,
        from: ProvisionFrom,
        id: Value,
        params: super::provision::Params,
    ) {
        let uid = params.uid.or(self.boot.uid);
        let w = crate::config::wifi::WifiConf::new(&params.ssid, &params.passwd, uid);
        self.actions
            .push(Action::WriteWifi(crate::config::wifi::render(&w)));
        self.writing = Some(Written { from, id, params });
    }

    /// The result of [`Action::WriteWifi`]. Written: `["OK"]`, then the rest of L§8. Not written
    /// (the reactor logged the errno): `["ERROR"]` or -33020 `cannot write wifi.conf`, and nothing
    /// else happens: no state change, no broadcast, no uid for `_otc.info`.
    pub fn wifi_written(&mut self, now: Instant, ok: bool) {
        let Some(Written { from, id, params }) = self.writing.take() else {
            return;
        };
        let reply = if ok {
            rpc::result_reply(&id, &json!(["OK"]))
        } else {
            refusal(now, from, &id, "cannot write wifi.conf")
        };
        match from {
            ProvisionFrom::Lan(handle) => {
                self.lan.answer(now, handle, &reply, &mut self.actions);
            }
            ProvisionFrom::Local(conn) => self.local.send_to(conn, reply),
        }
        if ok {
            self.provision_start(now, params);
        }
        self.pump(now);
    }

    /// The result of [`Action::TrustFlag`]: `["OK"]` when the flag file was created or removed,
    /// `["ERROR"]` when not (the reactor logged the errno), so a phone is never told that a
    /// setting is stored when it is not.
    pub fn trust_written(&mut self, now: Instant, ok: bool) {
        let Some((handle, id)) = self.trusting.take() else {
            return;
        };
        let r = if ok { json!(["OK"]) } else { json!(["ERROR"]) };
        self.lan
            .answer(now, handle, &rpc::result_reply(&id, &r), &mut self.actions);
        self.pump(now);
    }

    /// L§8 after the `["OK"]` went out (wifi.conf is written): the country, uid and bind_key,
    /// broadcast `wifi_connecting` and ask the helper to start Wi-Fi.
    fn provision_start(&mut self, now: Instant, p: super::provision::Params) {
        let in_ap = self.state == State::WifiApMode;
        info!(
            "provisioning ssid {:?} ({} mode)",
            p.ssid,
            if in_ap { "AP" } else { "STA" }
        );
        let uid = p.uid.or(self.boot.uid);
        // 2. country, uid and bind_key (memory only, for _otc.info).
        if let Some(cc) = &p.country {
            self.actions.push(Action::WriteCountry(cc.clone()));
            self.boot.country = Some(cc.clone()).filter(|c| c != "cn");
        }
        if let Some(u) = p.uid {
            self.bind = Some((u.to_string(), p.bind_key.clone()));
        }
        self.boot.ssid = p.ssid.clone();
        self.boot.uid = uid;
        self.provisioning = Some(in_ap);
        // In STA mode (a router password change) the session closes and restarts after Wi-Fi is up.
        if !in_ap {
            self.drop_session(now);
            self.set_state(State::WifiStaMode);
        }
        // 3. broadcast, 4. the helper starts Wi-Fi (without one: connected at once, D9).
        self.broadcast("wifi_connecting");
        let cc = p.country.clone().unwrap_or_default();
        let tz = p.tz.clone().unwrap_or_default();
        self.helper.wifi_start(
            now,
            &helper::WifiStart {
                ssid: &p.ssid,
                passwd: &p.passwd,
                uid: p.uid.unwrap_or(0),
                country_domain: &cc,
                tz: &tz,
            },
        );
    }

    fn wifi_connected(&mut self, now: Instant) {
        if self.provisioning.take().is_none() {
            crate::info_limited!(now, "helper: wifi connected");
            return;
        }
        self.broadcast("wifi_connected");
        self.boot.provisioned = Some(true);
        self.rebuild_identity(now, true);
    }

    fn wifi_failed(&mut self, now: Instant) {
        let Some(in_ap) = self.provisioning.take() else {
            crate::info_limited!(now, "helper: wifi failed");
            return;
        };
        self.broadcast("wifi_failed");
        // L§8: AP → delete wifi.conf and back to AP mode; STA → the old wifi.conf and sta_mode.
        self.actions.push(Action::RestoreWifi);
        self.actions.push(Action::ReadSsid);
        self.bind = None;
        self.boot.provisioned = Some(!in_ap);
        self.rebuild_identity(now, !in_ap);
    }

    /// The identity from what the start-up sequence learnt, entered with its Wi-Fi mode.
    fn rebuild_identity(&mut self, now: Instant, provisioned: bool) {
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

    fn on_helper_action(&mut self, now: Instant, a: helper::Action) {
        use helper::Action as H;
        match a {
            H::HelperWrite { conn, text } => self.local.send_to(conn, text.as_str().to_owned()),
            H::ShutdownWrite { conn } => {
                // After the message queued just before it.
                self.collect();
                self.actions.push(Action::ShutdownWrite(conn));
            }
            H::Close { conn } => self.local.close(conn),
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

    fn start_cloud(&mut self, now: Instant) {
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

    /// Drains the machines' actions into node actions and decisions.
    fn pump(&mut self, now: Instant) {
        loop {
            if let Some(e) = self.cloud.as_mut().and_then(Cloud::poll_event) {
                self.on_cloud_event(now, e);
                continue;
            }
            if let Some(a) = self.helper.poll_action() {
                self.on_helper_action(now, a);
                continue;
            }
            if let Some(c) = self.cloud.as_ref() {
                self.lan.set_offset(c.offset());
            }
            match self.lan.poll_event() {
                Some(e) => self.on_lan_event(now, e),
                None => break,
            }
        }
        self.collect();
    }

    fn on_lan_event(&mut self, now: Instant, e: LanEvent) {
        match e {
            LanEvent::Command { local_id, text } => {
                if self.local.command_audience() == 0 {
                    let r = rpc::error_reply(Some(&json!(local_id)), -9999, "user ack timeout");
                    self.lan.local_reply(now, local_id, &r, &mut self.actions);
                } else {
                    self.local.broadcast_command(&text);
                }
            }
            LanEvent::SelfMethod {
                handle,
                method,
                id,
                params,
            } if method == "miIO.config_router" => {
                let from = ProvisionFrom::Lan(handle);
                match self.provision_check(now, Some(&params), &json!(id), from) {
                    Err(r) => {
                        self.lan.answer(now, handle, &r, &mut self.actions);
                    }
                    Ok(p) => self.provision_write(from, json!(id), p),
                }
            }
            // P§4.6: answered once the flag file is written (`trust_written`).
            LanEvent::SelfMethod {
                handle,
                method,
                id,
                params,
            } if method == "miIO.config" => match params.get("enauth").and_then(Value::as_u64) {
                Some(v @ 0..=1) => {
                    self.trusting = Some((handle, json!(id)));
                    self.actions.push(Action::TrustFlag(v == 1));
                }
                _ => {
                    let r = rpc::result_reply(&json!(id), &json!(["ERROR"]));
                    self.lan.answer(now, handle, &r, &mut self.actions);
                }
            },
            LanEvent::SelfMethod {
                handle,
                method,
                id,
                params,
            } => {
                let reply = self.self_method(now, &method, &params, Some(json!(id)), true);
                if let Some(r) = reply {
                    self.lan.answer(now, handle, &r, &mut self.actions);
                }
            }
        }
    }

    /// A datagram on the LAN socket (54321).
    pub fn lan_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        self.lan.handle_datagram(now, from, data, &mut self.actions);
        self.pump(now);
    }

    fn collect(&mut self) {
        for a in self.local.drain() {
            self.actions.push(Action::Local(a));
        }
    }

    fn on_cloud_event(&mut self, now: Instant, e: cloud::Event) {
        let out = &mut self.actions;
        match e {
            cloud::Event::NeedInfo => self.helper.ask_info(now),
            cloud::Event::Command { text, id } => {
                if id.is_some_and(|i| self.lan.is_local_id_pending(i)) {
                    // P§4.7: a cloud id that collides with a pending LAN id is answered at once.
                    crate::warn_limited!(
                        now,
                        "cloud command id collides with a pending LAN command; answered -9999"
                    );
                    if let (Some(id), Some(c)) = (id, self.cloud.as_mut()) {
                        let r = rpc::error_reply(Some(&json!(id)), -9999, "user ack timeout");
                        c.self_reply(now, id, &r, out);
                    }
                } else if self.local.command_audience() == 0 {
                    // P§5.8: MAY answer at once when the command reached no local client.
                    if let (Some(id), Some(c)) = (id, self.cloud.as_mut()) {
                        let r = rpc::error_reply(Some(&json!(id)), -9999, "user ack timeout");
                        c.self_reply(now, id, &r, out);
                    }
                } else {
                    self.local.broadcast_command(&text);
                }
            }
            cloud::Event::SelfMethod { id, method, params } => {
                let reply = self.self_method(now, &method, &params, id.map(|i| json!(i)), false);
                if let (Some(id), Some(r), Some(c)) = (id, reply, self.cloud.as_mut()) {
                    c.self_reply(now, id, &r, &mut self.actions);
                }
            }
            cloud::Event::State(e) => self.on_cloud_state(now, e),
        }
    }

    fn on_cloud_state(&mut self, now: Instant, e: CloudEvent) {
        match e {
            CloudEvent::Trying => self.set_state(State::CloudTrying),
            CloudEvent::InternetConnected => self.broadcast("internet_connected"),
            CloudEvent::InternetFailed => {
                self.helper.offline_start(now);
                self.broadcast("internet_failed");
            }
            CloudEvent::Connected => {
                self.helper.offline_stop();
                self.set_state(State::CloudConnected);
                self.broadcast("cloud_connected");
            }
            CloudEvent::Retry => {
                self.helper.offline_start(now);
                self.set_state(State::CloudRetry);
                self.broadcast("cloud_retry");
            }
        }
    }

    /// INFO built by the daemon itself (P§5.4, no helper answer), members in the order shown there.
    fn own_info(&self) -> Members {
        let fw = self
            .identity
            .as_ref()
            .and_then(|i| i.fw_ver.clone())
            .or_else(|| self.fw_ver())
            .unwrap_or_else(|| "unknown".into());
        let ssid = self
            .identity
            .as_ref()
            .map(|i| i.ssid.clone())
            .unwrap_or_default();
        let mut ap = Members::new();
        ap.set_str("ssid", &ssid);
        ap.set_str("bssid", "");
        let mut netif = Members::new();
        netif.set_str("localIp", &self.netif.ip);
        netif.set_str("mask", &self.netif.mask);
        netif.set_str("gw", &self.netif.gw);
        let mut p = Members::new();
        p.set_str("hw_ver", "Linux");
        p.set_str("fw_ver", &fw);
        p.set("ap", ap.to_json());
        p.set("netif", netif.to_json());
        p
    }

    /// INFO for `miIO.info` (P§4.6): the `_otc.info` params without `bindkey`, in every state,
    /// AP mode included: the helper's last `_internal.info` (or the daemon's own), then `model`,
    /// `mac`, `token`, `life` (P§5.4) and the uid of a provisioning in this run.
    fn info(&self, now: Instant) -> Members {
        let mut p = match &self.helper_info {
            Some(h) => h.clone(),
            None => self.own_info(),
        };
        if let Some(d) = self.boot.device.as_ref() {
            p.set_str("model", &d.model);
            p.set_str("mac", &d.mac.to_ascii_uppercase());
        }
        if let Some(t) = self.boot.token.as_ref() {
            p.set_str("token", &crate::config::token::to_hex(t));
        }
        p.set("life", now.secs().to_string());
        if let Some((uid, _)) = &self.bind {
            p.set_str("uid", uid);
        }
        p
    }

    /// A method the daemon answers itself (P§4.6). Returns the reply text, if any.
    fn self_method(
        &mut self,
        now: Instant,
        method: &str,
        params: &Value,
        id: Option<Value>,
        from_lan: bool,
    ) -> Option<String> {
        let id = id?;
        let ok = json!(["OK"]);
        let err = json!(["ERROR"]);
        Some(match method {
            "miIO.info" => format!(
                "{{\"id\":{id},\"code\":0,\"message\":\"ok\",\"result\":{}}}",
                self.info(now).to_json()
            ),
            "miIO.wifi_assoc_state" => {
                let state = if self.state == State::CloudConnected {
                    "ONLINE"
                } else {
                    "CONNECTING"
                };
                format!(
                    "{{\"id\":{id},\"code\":0,\"message\":\"ok\",\"result\":{{\"state\":\"{state}\",\"auth_fail_count\":0,\"conn_success_count\":1,\"conn_fail_count\":0,\"dhcp_fail_count\":0}}}}"
                )
            }
            "miIO.config_loglevel" => match params.get("loglevel").and_then(Value::as_u64) {
                Some(l) if l <= 4 => {
                    self.actions.push(Action::SetLogLevel(l as u8));
                    rpc::result_reply(&id, &ok)
                }
                _ => rpc::result_reply(&id, &err),
            },
            // P§4.6: ["ERROR"] if tz is invalid (D15) or no helper runs.
            "miIO.config_tz" => {
                let tz = params.get("tz").and_then(Value::as_str).unwrap_or("");
                if self.helper.config_tz(now, tz) {
                    rpc::result_reply(&id, &ok)
                } else {
                    rpc::result_reply(&id, &err)
                }
            }
            // LAN-only methods (the cloud machine already refuses them from the cloud);
            // `miIO.config` waits for its file write (`on_lan_event`).
            "miIO.stop_diag_mode" if from_lan => rpc::result_reply(&id, &ok),
            _ => rpc::error_reply(Some(&id), -32601, "Method not found"),
        })
    }

    // ---- cloud I/O results ---------------------------------------------------------------

    pub fn cloud_resolved(
        &mut self,
        now: Instant,
        attempt: u32,
        result: Result<Vec<Ipv4Addr>, String>,
    ) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_resolved(now, attempt, result, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn cloud_connected(&mut self, now: Instant, netif: Netif, local: Ipv4Addr) {
        self.netif = netif;
        if let Some(c) = self.cloud.as_mut() {
            c.handle_connected(now, local, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn cloud_connect_failed(&mut self, now: Instant, reason: &str) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_connect_failed(now, reason, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn cloud_datagram(&mut self, now: Instant, data: &[u8]) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_datagram(now, data, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn cloud_stream(&mut self, now: Instant, data: &[u8]) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_stream(now, data, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn cloud_link_down(&mut self, now: Instant) {
        if let Some(c) = self.cloud.as_mut() {
            c.handle_link_down(now, &mut self.actions);
        }
        self.pump(now);
    }

    pub fn set_cloud_backlog(&mut self, backlog: bool) {
        self.cloud_backlog = backlog;
    }

    // ---- local connections -----------------------------------------------------------------

    /// A new local connection. False: the reactor closes it at once.
    pub fn local_accept(&mut self, now: Instant, conn: ConnId, port: Port) -> bool {
        self.local.accept(now, conn, port)
    }

    pub fn local_closed(&mut self, conn: ConnId) {
        self.local.closed(conn);
        self.helper.handle_closed(conn);
        // The reactor reuses the slot: acks still due to this connection must go to no one.
        if let Some(c) = self.cloud.as_mut() {
            c.client_gone(conn);
        }
    }

    /// A JSON syntax error in a local connection's stream.
    pub fn local_syntax_error(&mut self, now: Instant, conn: ConnId) {
        self.local.syntax_error(now, conn);
        self.collect();
    }

    /// One complete JSON value from a local connection.
    pub fn local_value(&mut self, now: Instant, conn: ConnId, raw: &[u8]) {
        match self.local.handle_value(now, conn, raw) {
            Some(Inbound::Local {
                conn,
                method,
                id,
                obj,
            }) => self.local_request(now, conn, &method, id, &obj),
            Some(Inbound::Internal {
                conn, obj, text, ..
            }) => self.helper.handle_message(now, conn, &obj, text.as_bytes()),
            Some(Inbound::Upstream { conn, head, text }) => match self.cloud.as_mut() {
                Some(c) => c.upstream(now, conn, &text, &head, &mut self.actions),
                None => {
                    if let Some(id) = head.id.as_ref() {
                        self.local.send_to(
                            conn,
                            rpc::error_reply(Some(id), -30011, "OT server disconnected"),
                        );
                    }
                }
            },
            Some(Inbound::Reply {
                conn,
                id,
                head,
                text,
            }) => {
                let taken = if self.lan.is_local_id_pending(id) {
                    self.lan.local_reply(now, id, &text, &mut self.actions)
                } else {
                    match self.cloud.as_mut() {
                        Some(c) => c.local_reply(now, conn, &text, &head, &mut self.actions),
                        None => false,
                    }
                };
                if !taken {
                    crate::info_limited!(
                        now,
                        "reply from local client {conn} matches no pending command; dropped"
                    );
                }
            }
            None => {}
        }
        self.pump(now);
    }

    /// `local.*` requests (L§5).
    fn local_request(
        &mut self,
        now: Instant,
        conn: ConnId,
        method: &str,
        id: Option<Value>,
        obj: &Map<String, Value>,
    ) {
        if method == "local.status" {
            // A helper notice (L§5): `wifi_ap_mode*` counts as `_internal.wifi_ap_mode`.
            // Only `_internal.info` reads the raw text.
            self.helper.handle_message(now, conn, obj, b"");
            return;
        }
        let Some(id) = id.filter(|v| v.is_u64() || v.is_i64()) else {
            crate::warn_limited!(now, "msg does not have 'id'");
            return;
        };
        let reply = match method {
            "local.query_status" => format!(
                "{{\"id\":{id},\"method\":\"local.status\",\"params\":\"{}\"}}",
                self.state.status()
            ),
            "local.query_time" => format!(
                "{{\"id\":{id},\"method\":\"local.time\",\"params\":{}}}",
                self.stamp(now)
            ),
            "local.query_country" => format!(
                "{{\"id\":{id},\"method\":\"local.country\",\"params\":{}}}",
                Value::String(self.country().unwrap_or_else(|| "prc".into()))
            ),
            "local.ble.config_router" => {
                let from = ProvisionFrom::Local(conn);
                match self.provision_check(now, obj.get("params"), &id, from) {
                    Err(r) => r,
                    Ok(p) => return self.provision_write(from, id, p),
                }
            }
            "local.prep_suspend" => format!(
                "{{\"id\":{id},\"method\":\"local.resp_suspend\",\"params\":{{\"wakeup_time\":{}}}}}",
                self.wakeup_time(now)
            ),
            _ => {
                crate::info_limited!(now, "Unknown local method: {method}");
                rpc::error_reply(Some(&id), -32601, "Method not found")
            }
        };
        self.local.send_to(conn, reply);
    }

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

    /// Cloud link state for tests and logs.
    pub fn cloud_state(&self) -> CloudState {
        self.cloud
            .as_ref()
            .map(Cloud::state)
            .unwrap_or(CloudState::Stopped)
    }

    /// Stops the cloud link (shutdown).
    pub fn shutdown(&mut self, now: Instant) {
        if let Some(c) = self.cloud.as_mut() {
            c.stop(now, &mut self.actions);
        }
        self.pump(now);
    }
}

/// Collection sizes for the month simulation (`proto::sim`): the node's own and every machine's.
#[cfg(test)]
impl Node {
    pub(crate) fn debug_sizes(&self, out: &mut Vec<(&'static str, usize)>) {
        out.push(("node.actions", self.actions.len()));
        out.push((
            "node.helper_info",
            self.helper_info.as_ref().map_or(0, Members::len),
        ));
        out.push(("cloud.machines", usize::from(self.cloud.is_some())));
        if let Some(c) = self.cloud.as_ref() {
            c.debug_sizes(out);
        }
        self.lan.debug_sizes(out);
        self.local.debug_sizes(out);
        self.helper.debug_sizes(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::local::LocalAction;
    use crate::wire::crypto::Keys;
    use crate::wire::miio;

    const KEY: [u8; 16] = *b"YWJjZGVmZ2hpamts";
    const DID: u32 = 1234567;

    fn identity(provisioned: bool) -> Identity {
        Identity {
            did: DID,
            key: KEY,
            mac: "aa:bb:cc:01:02:03".into(),
            model: "acme.dev.v1".into(),
            vendor: "acme".into(),
            token: *b"ABCDEFGHIJKLMNOP",
            provisioned,
            ssid: "home".into(),
            fw_ver: Some("1.2.3_0001".into()),
            country: None,
        }
    }

    fn node() -> Node {
        let mut c = CloudConfig::new(0, [0; 16], "", "", "", "");
        c.udp.host = "127.0.0.1".into();
        c.udp.explicit = true;
        c.udp.port = 8053;
        c.seed = 7;
        Node::new(
            Instant(0),
            NodeConfig {
                max_clients: 20,
                max_sleep: Duration::from_secs(3600),
                cloud: c,
                country_override: None,
                hosts_explicit: (true, false),
                helper: helper::Config::default(),
            },
            Secret16::new(*b"FreshToken012345"),
        )
    }

    /// Plays a cooperative cloud: answers resolve, connect, hello and every request. Returns the
    /// local-connection messages seen.
    fn serve(n: &mut Node, now: Instant) -> Vec<(ConnId, String)> {
        serve_with(n, now, None, &mut Vec::new())
    }

    const CONF: &str =
        "did=1234567\nkey=YWJjZGVmZ2hpamts\nmac=aa:bb:cc:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n";

    /// [`serve`], which also answers the file steps (L§9.5) from `conf` (a provisioned device with
    /// the token `ABCDEFGHIJKLMNOP`) and appends every request the node sent to the cloud to `sent`.
    fn serve_with(
        n: &mut Node,
        now: Instant,
        conf: Option<&str>,
        sent: &mut Vec<Value>,
    ) -> Vec<(ConnId, String)> {
        let keys = Keys::new(&KEY);
        let mut out = Vec::new();
        while let Some(a) = n.poll_action() {
            match a {
                Action::LoadFiles(step) if conf.is_some() => match step {
                    Step::Dinfo => {
                        let d = crate::config::device::parse(conf.unwrap_or_default());
                        n.file_dinfo(now, d.map_err(|e| e.to_string()), None)
                    }
                    Step::Token => n.file_token(now, Ok(Secret16::new(*b"ABCDEFGHIJKLMNOP"))),
                    Step::WifiStatus => n.file_wifi(now, true, "home".into(), None),
                    _ => {}
                },
                Action::WriteWifi(_) => n.wifi_written(now, true),
                Action::Resolve { attempt, .. } => {
                    n.cloud_resolved(now, attempt, Ok(vec![Ipv4Addr::LOCALHOST]))
                }
                Action::Connect { .. } => n.cloud_connected(
                    now,
                    Netif {
                        ip: "127.0.0.1".into(),
                        mask: "255.0.0.0".into(),
                        gw: String::new(),
                    },
                    Ipv4Addr::LOCALHOST,
                ),
                Action::CloudSend(b) => {
                    let Ok(p) = miio::Packet::new_checked(&b[..]) else {
                        continue;
                    };
                    if p.is_control() && p.ids_all_ff() {
                        n.cloud_datagram(now, &miio::time_sync_reply(1_700_000_000));
                    } else if p.is_control() {
                        n.cloud_datagram(now, &b); // pong
                    } else if let Ok(o) = miio::open(&keys, DID, &p) {
                        if o.value.contains_key("method") {
                            sent.push(Value::Object(o.value.clone()));
                        }
                        if let Some(id) = o.value.get("id") {
                            if let Some(m) = o.value.get("method") {
                                let ack = if m == "_otc.info" {
                                    format!("{{\"id\":{id},\"result\":{{\"otc_list\":[]}}}}")
                                } else {
                                    format!("{{\"id\":{id},\"result\":\"ok\"}}")
                                };
                                let pkt = miio::seal(&keys, DID, p.stamp(), ack.as_bytes());
                                n.cloud_datagram(now, &pkt);
                            }
                        }
                    }
                }
                Action::Local(LocalAction::Send(c, t)) => out.push((c, t.to_string())),
                _ => {}
            }
        }
        out
    }

    fn ask_suspend(n: &mut Node, now: Instant) -> u64 {
        n.local_value(
            now,
            1,
            br#"{"id":9527,"method":"local.prep_suspend","params":[]}"#,
        );
        let out = serve(n, now);
        let reply = out
            .iter()
            .find(|(_, t)| t.contains("resp_suspend"))
            .expect("resp_suspend");
        let v: Value = serde_json::from_str(&reply.1).unwrap();
        assert_eq!(v["id"], 9527);
        v["params"]["wakeup_time"].as_u64().unwrap()
    }

    /// ARCHITECTURE.md rule 4: every deadline of the process is the node's, so the suspend answer
    /// knows them: the re-read of a broken `device.conf` (L§9.5) and the second mDNS announcement.
    #[test]
    fn config_retry_and_mdns_announcements_are_node_deadlines() {
        let mut n = node();
        let t0 = Instant(10_000);
        n.handle_timeout(t0); // the helper grace is over: file mode
        n.file_dinfo(t0, Err("device.conf: no did".into()), None);
        while n.poll_action().is_some() {}
        assert_eq!(n.state(), State::DeviceInit);
        assert_eq!(n.poll_timeout(), Some(t0 + CONFIG_RETRY));
        n.local_accept(t0, 1, Port::Local);
        assert_eq!(ask_suspend(&mut n, t0), CONFIG_RETRY.secs_ceil());
        let t1 = t0 + CONFIG_RETRY;
        n.handle_timeout(t1);
        let mut again = Vec::new();
        while let Some(a) = n.poll_action() {
            again.push(a);
        }
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
        n.mdns_service_changed(t1);
        assert_eq!(announces(&mut n), 1);
        assert_eq!(n.poll_timeout(), Some(t1 + Duration::from_secs(1)));
        assert_eq!(ask_suspend(&mut n, t1), 1);
        n.handle_timeout(t1 + Duration::from_millis(999));
        assert_eq!(announces(&mut n), 0);
        n.handle_timeout(t1 + Duration::from_secs(1));
        assert_eq!(announces(&mut n), 1);
    }

    #[test]
    fn ap_mode_idle_sleeps_max_and_broadcasts_ap_mode() {
        let mut n = node();
        let t0 = Instant(5_000);
        n.local_accept(t0, 1, Port::Local);
        n.set_identity(t0, identity(false));
        assert_eq!(n.state(), State::WifiApMode);
        // The classification window of conn 1 is the only deadline; once it passed the wheel is empty.
        let t1 = t0 + Duration::from_secs(2);
        n.handle_timeout(t1);
        let out = serve(&mut n, t1);
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
        n.handle_timeout(t1); // conn 1 classified
        serve(&mut n, t1);
        // First keepalive 20 s after connect; answered at once by `serve`.
        let ka = t0 + Duration::from_secs(20);
        n.handle_timeout(ka);
        serve(&mut n, ka);
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

    #[test]
    fn local_queries_and_unknown_local_method() {
        let mut n = node();
        let t0 = Instant(65_000);
        n.local_accept(t0, 1, Port::Local);
        n.set_identity(t0, identity(false));
        n.local_value(t0, 1, br#"{"id":1,"method":"local.query_status"}"#);
        n.local_value(t0, 1, br#"{"id":2,"method":"local.query_time"}"#);
        n.local_value(t0, 1, br#"{"id":3,"method":"local.query_country"}"#);
        n.local_value(t0, 1, br#"{"id":4,"method":"local.nonesuch"}"#);
        n.local_value(t0, 1, br#"{"method":"local.query_time"}"#);
        let out: Vec<String> = serve(&mut n, t0).into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            out,
            vec![
                r#"{"method":"local.status","params":"wifi_ap_mode"}"#,
                r#"{"id":1,"method":"local.status","params":"wifi_ap_mode"}"#,
                r#"{"id":2,"method":"local.time","params":65}"#,
                r#"{"id":3,"method":"local.country","params":"prc"}"#,
                r#"{"id":4,"error":{"code":-32601,"message":"Method not found"}}"#,
            ]
        );
    }

    /// Plays the reactor's file side: `wifi.conf` holds `file` (its ssid), or is absent (None).
    /// Returns the other actions.
    fn files(n: &mut Node, now: Instant, file: Option<&str>) -> Vec<Action> {
        let mut other = Vec::new();
        while let Some(a) = n.poll_action() {
            match a {
                Action::LoadFiles(Step::Dinfo) => {
                    let d = crate::config::device::parse(
                        "did=123456789\nkey=YWJjZGVmZ2hpamts\nmac=AA:BB:CC:01:02:03\nvendor=acme\nmodel=acme.dev.v1\n",
                    );
                    n.file_dinfo(now, d.map_err(|e| e.to_string()), None)
                }
                Action::LoadFiles(Step::Token) => {
                    n.file_token(now, Ok(Secret16::new(*b"ABCDEFGHIJKLMNOP")))
                }
                Action::LoadFiles(Step::WifiStatus) => {
                    n.file_wifi(now, file.is_some(), file.unwrap_or("").into(), None)
                }
                Action::ReadSsid => n.file_ssid(file.unwrap_or("").into()),
                // The write succeeds; the caller still sees that it was asked for.
                Action::WriteWifi(w) => {
                    other.push(Action::WriteWifi(w));
                    n.wifi_written(now, true)
                }
                a => other.push(a),
            }
        }
        other
    }

    /// P§4.6/§5.4: `miIO.info` lists INFO's members in the order of P§5.4, and a helper's INFO
    /// in the helper's order with `model`, `mac`, `token`, `life` and `uid` set in place or after.
    #[test]
    fn miio_info_keeps_the_member_order() {
        let mut n = node();
        n.identity = Some(identity(true));
        n.netif = Netif {
            ip: "10.0.0.2".into(),
            mask: "255.0.0.0".into(),
            gw: "10.0.0.1".into(),
        };
        n.boot.token = Some(Secret16::new(*b"ABCDEFGHIJKLMNOP"));
        n.bind = Some(("42".into(), Some("bk".into())));
        let now = Instant(7_000);
        let ask =
            |n: &mut Node| n.self_method(now, "miIO.info", &Value::Null, Some(json!(3)), true);
        assert_eq!(
            ask(&mut n).unwrap(),
            r#"{"id":3,"code":0,"message":"ok","result":{"hw_ver":"Linux","fw_ver":"1.2.3_0001","ap":{"ssid":"home","bssid":""},"netif":{"localIp":"10.0.0.2","mask":"255.0.0.0","gw":"10.0.0.1"},"token":"4142434445464748494a4b4c4d4e4f50","life":7,"uid":"42"}}"#
        );
        n.helper_info = Members::of_object(br#"{"z":0,"token":"old","ap":{"y":1,"x":2}}"#);
        assert_eq!(
            ask(&mut n).unwrap(),
            r#"{"id":3,"code":0,"message":"ok","result":{"z":0,"token":"4142434445464748494a4b4c4d4e4f50","ap":{"y":1,"x":2},"life":7,"uid":"42"}}"#
        );
    }

    fn info_ssid(n: &Node, now: Instant) -> Value {
        let info: Value = serde_json::from_str(&n.info(now).to_json()).unwrap();
        info["ap"]["ssid"].clone()
    }

    #[test]
    fn a_failed_ap_provisioning_leaves_no_ssid_in_miio_info() {
        let mut n = node();
        let t0 = Instant(10_000);
        n.start(t0);
        n.handle_timeout(t0); // the helper grace is over: file mode
        files(&mut n, t0, None);
        assert_eq!(n.state(), State::WifiApMode);
        // A helper appears (it will run wifi_start), then the phone provisions over BLE.
        n.local_accept(t0, 1, Port::Local);
        n.local_value(t0, 1, br#"{"method":"_internal.helper_ready"}"#);
        n.local_accept(t0, 2, Port::Ble);
        n.local_value(
            t0,
            2,
            br#"{"id":1,"method":"local.ble.config_router","params":{"ssid":"newnet","passwd":"pw12345678"}}"#,
        );
        let a = files(&mut n, t0, Some("newnet"));
        assert!(a.iter().any(|a| matches!(a, Action::WriteWifi(_))), "{a:?}");
        // Wi-Fi fails: wifi.conf is deleted (L§8), and miIO.info must not name the failed network.
        n.local_value(t0, 1, br#"{"method":"_internal.wifi_ap_mode"}"#);
        let a = files(&mut n, t0, None);
        assert!(a.contains(&Action::RestoreWifi), "{a:?}");
        assert_eq!(n.state(), State::WifiApMode);
        assert_eq!(info_ssid(&n, t0), "");
    }

    #[test]
    fn offline_with_a_helper_miio_info_has_the_ssid_of_wifi_conf() {
        let mut n = node();
        let t0 = Instant(10_000);
        n.start(t0);
        n.local_accept(t0, 1, Port::Local);
        n.local_value(t0, 1, br#"{"method":"_internal.helper_ready"}"#);
        for answer in [
            r#"{"method":"_internal.response_dinfo","params":{"did":123456789,"key":"YWJjZGVmZ2hpamts","vendor":"acme","mac":"aa:bb:cc:01:02:03","model":"acme.dev.v1"}}"#,
            r#"{"method":"_internal.response_dtoken","params":"abcDEF0123456789"}"#,
            r#"{"method":"_internal.res_wifi_conf_status","params":1}"#,
        ] {
            files(&mut n, t0, Some("home"));
            n.local_value(t0, 1, answer.as_bytes());
        }
        files(&mut n, t0, Some("home"));
        assert!(n.identity().is_some_and(|i| i.provisioned));
        assert_ne!(n.state(), State::CloudConnected);
        // No cloud, no helper `_internal.info`: the daemon's own INFO, with wifi.conf's ssid (P§5.4).
        assert_eq!(info_ssid(&n, t0), "home");
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

    /// L§8: wifi.conf is written before the reply. When the write fails (a read-only or full data
    /// dir) the requester is refused and nothing else happens: no state change, no broadcast, no
    /// helper `wifi_start`, no uid for `_otc.info`, and the cloud session stays.
    #[test]
    fn provisioning_refused_when_wifi_conf_cannot_be_written() {
        let mut n = node();
        let t0 = Instant(10_000);
        let mut sent = Vec::new();
        n.local_accept(t0, 1, Port::Local);
        n.start(t0);
        let t1 = t0 + Duration::from_secs(3);
        n.handle_timeout(t1);
        serve_with(&mut n, t1, Some(CONF), &mut sent);
        assert_eq!(n.state(), State::CloudConnected);
        let before = sent.len();

        // QR path on 54322: the write fails, the reply is -33020, nothing else is done.
        let t2 = t1 + Duration::from_secs(5);
        n.local_value(
            t2,
            1,
            br#"{"id":5,"method":"local.ble.config_router","params":{"ssid":"new","uid":"42","country_domain":"de"}}"#,
        );
        let mut out = Vec::new();
        let mut wrote = 0;
        while let Some(a) = n.poll_action() {
            match a {
                Action::WriteWifi(text) => {
                    assert!(out.is_empty(), "no reply before the write: {out:?}");
                    assert!(text.contains("ssid=\"new\""), "{text}");
                    wrote += 1;
                    n.wifi_written(t2, false);
                }
                Action::Local(LocalAction::Send(c, t)) => out.push((c, t.to_string())),
                other => panic!("nothing else may happen: {other:?}"),
            }
        }
        assert_eq!(wrote, 1);
        assert_eq!(
            out,
            vec![(
                1,
                r#"{"id":5,"error":{"code":-33020,"message":"cannot write wifi.conf"}}"#
                    .to_string()
            )]
        );
        assert_eq!(n.state(), State::CloudConnected);
        assert_eq!(n.cloud_state(), CloudState::Connected);
        // A later provisioning is not "in progress", and the next session has no uid.
        let t3 = t2 + Duration::from_secs(1);
        n.local_value(
            t3,
            1,
            br#"{"id":6,"method":"local.ble.config_router","params":{"ssid":"other"}}"#,
        );
        let out = serve_with(&mut n, t3, Some(CONF), &mut sent);
        assert!(
            out.iter().any(|(_, t)| t == r#"{"id":6,"result":["OK"]}"#),
            "{out:?}"
        );
        let infos: Vec<&Value> = sent[before..]
            .iter()
            .filter(|v| v["method"] == "_otc.info")
            .collect();
        assert_eq!(infos.len(), 1, "{sent:?}");
        assert!(infos[0]["params"].get("uid").is_none(), "{infos:?}");
    }

    /// Found by the month simulation (`proto::sim`): a tool sends a report and closes before the
    /// ack; the reactor gives the next connection the same slot. The ack must not reach it: P§5.7
    /// drops the ack of a client that has gone.
    #[test]
    fn an_ack_never_reaches_the_next_connection_in_a_closed_slot() {
        let keys = Keys::new(&KEY);
        let mut n = node();
        let t0 = Instant(10_000);
        n.handle_timeout(t0); // the helper grace (2 s) is over: file mode
        n.set_identity(t0, identity(true));
        serve(&mut n, t0);
        assert_eq!(n.state(), State::CloudConnected);
        let t1 = t0 + Duration::from_secs(1);
        n.local_accept(t1, 3, Port::Local);
        n.local_value(t1, 3, br#"{"id":7,"method":"props","params":{"a":1}}"#);
        let mut up = Vec::new();
        while let Some(a) = n.poll_action() {
            if let Action::CloudSend(b) = a {
                up.push(miio::decode(&keys, DID, &b).unwrap().value);
            }
        }
        assert_eq!(up.len(), 1, "{up:?}");
        n.local_closed(3);
        assert!(n.local_accept(t1, 3, Port::Local));
        let ack = format!(r#"{{"id":{},"result":"ok"}}"#, up[0]["id"]);
        n.cloud_datagram(t1, &miio::seal(&keys, DID, 1_700_000_001, ack.as_bytes()));
        let out = serve(&mut n, t1);
        assert!(out.is_empty(), "the newcomer got {out:?}");
        // Nothing in flight (the next deadline is the newcomer's 1 s classification window).
        assert_eq!(n.wakeup_time(t1), 1);
    }

    /// The LAN path: `["ERROR"]` when the write fails, `["OK"]` only after it succeeded.
    #[test]
    fn lan_config_router_answers_after_the_write() {
        let keys = Keys::new(b"ABCDEFGHIJKLMNOP");
        let phone: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let mut n = node();
        let t0 = Instant(10_000);
        n.start(t0);
        let t1 = t0 + Duration::from_secs(3);
        n.handle_timeout(t1);
        while let Some(a) = n.poll_action() {
            match a {
                Action::LoadFiles(Step::Dinfo) => n.file_dinfo(
                    t1,
                    crate::config::device::parse(CONF).map_err(|e| e.to_string()),
                    None,
                ),
                Action::LoadFiles(Step::Token) => {
                    n.file_token(t1, Ok(Secret16::new(*b"ABCDEFGHIJKLMNOP")))
                }
                Action::LoadFiles(Step::WifiStatus) => n.file_wifi(t1, false, String::new(), None),
                _ => {}
            }
        }
        assert_eq!(n.state(), State::WifiApMode);
        let req = |id: u32| {
            let text = format!(
                r#"{{"id":{id},"method":"miIO.config_router","params":{{"ssid":"home","passwd":"pw12345678","uid":7}}}}"#
            );
            miio::seal(&keys, DID, 100 + id, text.as_bytes())
        };
        for (id, ok, want) in [(1u32, false, r#"["ERROR"]"#), (2, true, r#"["OK"]"#)] {
            n.lan_datagram(t1, phone, &req(id));
            let mut replies = Vec::new();
            let mut wrote = false;
            while let Some(a) = n.poll_action() {
                match a {
                    Action::WriteWifi(_) => {
                        assert!(replies.is_empty(), "no reply before the write");
                        wrote = true;
                        n.wifi_written(t1, ok);
                    }
                    Action::LanSend { bytes, .. } => {
                        let o = miio::decode(&keys, DID, &bytes).unwrap();
                        replies.push(o.value["result"].to_string());
                    }
                    _ => {}
                }
            }
            assert!(wrote);
            assert_eq!(replies, vec![want.to_string()], "id {id}");
            // The failed one changed nothing; without a helper the good one connects at once (D9).
            assert_eq!(n.state() == State::WifiApMode, !ok, "id {id}");
        }
    }

    /// `miIO.config` (P§4.6): the phone's answer follows the flag file's write, `["ERROR"]` when
    /// it failed; an `enauth` that is neither 0 nor 1 is `["ERROR"]` with nothing written.
    #[test]
    fn lan_trust_flag_answers_after_the_write() {
        let keys = Keys::new(b"ABCDEFGHIJKLMNOP");
        let phone: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let mut n = node();
        let t0 = Instant(10_000);
        n.start(t0);
        let t1 = t0 + Duration::from_secs(3);
        n.handle_timeout(t1);
        while let Some(a) = n.poll_action() {
            match a {
                Action::LoadFiles(Step::Dinfo) => n.file_dinfo(
                    t1,
                    crate::config::device::parse(CONF).map_err(|e| e.to_string()),
                    None,
                ),
                Action::LoadFiles(Step::Token) => {
                    n.file_token(t1, Ok(Secret16::new(*b"ABCDEFGHIJKLMNOP")))
                }
                Action::LoadFiles(Step::WifiStatus) => n.file_wifi(t1, false, String::new(), None),
                _ => {}
            }
        }
        let cases = [
            (1u32, 1, Some(false), r#"["ERROR"]"#),
            (2, 1, Some(true), r#"["OK"]"#),
            (3, 0, Some(true), r#"["OK"]"#),
            (4, 7, None, r#"["ERROR"]"#),
        ];
        for (id, enauth, written, want) in cases {
            let text =
                format!(r#"{{"id":{id},"method":"miIO.config","params":{{"enauth":{enauth}}}}}"#);
            n.lan_datagram(
                t1,
                phone,
                &miio::seal(&keys, DID, 100 + id, text.as_bytes()),
            );
            let mut replies = Vec::new();
            let mut flag = None;
            while let Some(a) = n.poll_action() {
                match a {
                    Action::TrustFlag(on) => {
                        assert!(replies.is_empty(), "no reply before the write");
                        flag = Some(on);
                        n.trust_written(t1, written.unwrap());
                    }
                    Action::LanSend { bytes, .. } => {
                        let o = miio::decode(&keys, DID, &bytes).unwrap();
                        replies.push(o.value["result"].to_string());
                    }
                    _ => {}
                }
            }
            assert_eq!(flag, written.map(|_| enauth == 1), "id {id}");
            assert_eq!(replies, vec![want.to_string()], "id {id}");
        }
    }
}
