//! The node: the daemon's decisions in one sans-IO machine. It holds the state of LOCAL_API.md §7,
//! the device identity, the local connection table and the cloud link machine, routes every message
//! between them (L§4, P§5.7–§5.8), answers `local.*` (L§5, §12) and the methods the daemon answers
//! itself (P§4.6), and turns cloud events into states and `local.status` broadcasts (L§6).
//!
//! The reactor feeds it inputs and executes its [`Action`]s; it never touches a socket or a file.
//!
//! By concern (ARCHITECTURE.md §3): this file holds the struct, its construction, its queue and its
//! deadlines; `boot` the start-up sequence, the data files and the identity (L§9); `provisioning`
//! `config_router` and the flag file (L§8, P§4.6); `methods` the self-answered methods, `local.*` and
//! INFO (P§4.6, P§5.4, L§5); `routing` the glue to the cloud, the LAN and the local connections;
//! `power` the suspend answer (L§12). `harness` (tests only) drives a node in virtual time.

mod boot;
#[cfg(test)]
mod harness;
mod methods;
#[cfg(feature = "mqtt")]
pub mod mqtt;
mod power;
mod provisioning;
mod routing;

use std::net::Ipv4Addr;

use log::info;
use serde_json::Value;

use super::cloud::{self, Cloud, CloudConfig, CloudState};
use super::helper::{self, Helper};
use super::lan::Lan;
use super::local::Local;
pub use super::outbox::{Action, Outbox};
use super::state::State;
use crate::config::Secret16;
use crate::time::{Duration, Instant};
use crate::wire::dns::ServiceInfo;
use crate::wire::rpc::{self, Members};
use boot::Boot;
pub use boot::{TokenFiles, CONFIG_RETRY};
use provisioning::Written;
use routing::Conns;

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
    /// The LAN port the mDNS service names (P§4.8); None: no mDNS responder (disabled, or its
    /// port could not be bound), and the node decides no service.
    pub mdns: Option<u16>,
}

/// The local network facts of the cloud socket, for INFO's `netif` (P§5.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Netif {
    pub ip: String,
    pub mask: String,
    pub gw: String,
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
    /// The `wifi.conf` the last successful write replaced (None inside: there was none), for a
    /// failed Wi-Fi change (L§8).
    wifi_backup: Option<Option<super::outbox::WifiText>>,
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
    /// The local address of the cloud socket, while in a STA state (P§4.8: the service's A record).
    mdns_ip: Option<Ipv4Addr>,
    /// The mDNS service the responder was last given (P§4.8).
    mdns_service: Option<ServiceInfo>,
    /// The second mDNS announcement of a changed service (P§4.8).
    mdns_again: Option<Instant>,
    /// `--mqtt`: the broker session and its routing (L§11).
    #[cfg(feature = "mqtt")]
    mqtt: Option<mqtt::Bridge>,
    actions: Outbox,
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
            wifi_backup: None,
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
            mdns_ip: None,
            mdns_service: None,
            mdns_again: None,
            #[cfg(feature = "mqtt")]
            mqtt: None,
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
        // L§11: a message for the MQTT bridge is published when io takes it.
        #[cfg(feature = "mqtt")]
        loop {
            let a = self.actions.pop()?;
            if let Some(a) = self.mqtt_divert(a) {
                return Some(a);
            }
        }
        #[cfg(not(feature = "mqtt"))]
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
            #[cfg(feature = "mqtt")]
            self.mqtt_timeout(),
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
        self.local.handle_timeout(&mut self.actions, now);
        if let Some(c) = self.cloud.as_mut() {
            c.handle_timeout(now, &mut self.actions);
        }
        self.lan.handle_timeout(now, &mut self.actions);
        self.helper
            .handle_timeout(&mut Conns::new(&mut self.local, &mut self.actions), now);
        #[cfg(feature = "mqtt")]
        self.mqtt_handle_timeout(now);
        self.pump(now);
    }

    fn set_state(&mut self, to: State) {
        if to != self.state {
            info!("{}", State::transition_line(self.state, to));
            self.state = to;
            self.lan.set_state(to);
            if !sta(to) {
                // P§4.8: no service outside the STA states, until a cloud socket has an address.
                self.mdns_ip = None;
                self.mdns_update();
            }
        }
    }

    /// The mDNS service (P§4.8) from the identity, the state and the cloud socket's address: a
    /// provisioned identity in a STA state with a real address, else none. A change goes to the
    /// responder; one that the LAN can reach is announced now and once more a second later. A
    /// loopback address (a cloud on this host) reaches nobody on the LAN: queries are answered,
    /// but no multicast announcement is sent for it.
    fn mdns_update(&mut self) -> bool {
        let Some(port) = self.cfg.mdns else {
            return false;
        };
        let want = match (self.identity.as_ref(), self.mdns_ip) {
            // A bootstrap did (L§16) is no identity to announce.
            (Some(id), Some(ip))
                if id.provisioned && id.did >= 2 && !ip.is_unspecified() && sta(self.state) =>
            {
                Some(ServiceInfo {
                    model: id.model.clone(),
                    did: id.did,
                    ip,
                    port,
                })
            }
            _ => None,
        };
        if want == self.mdns_service {
            return false;
        }
        let routable = want.as_ref().is_some_and(|i| !i.ip.is_loopback());
        self.mdns_service.clone_from(&want);
        self.actions.push(Action::MdnsService(want));
        routable
    }

    fn broadcast(&mut self, event: &str) {
        info!("local.status: {event}");
        self.local
            .broadcast_status(&mut self.actions, &rpc::local_status(event));
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
        #[cfg(feature = "mqtt")]
        self.mqtt_stop(now);
    }
}

/// The states with Wi-Fi in STA mode, where the mDNS service may be set (P§4.8).
fn sta(s: State) -> bool {
    matches!(
        s,
        State::WifiStaMode | State::CloudTrying | State::CloudConnected | State::CloudRetry
    )
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
