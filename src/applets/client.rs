//! The `miio_client` applet: the daemon's command line and start-up. It parses the arguments,
//! opens the log, binds the listeners (before detaching, so a port in use is an exit status),
//! detaches with `-D`, and hands over to the loop in `io::daemon`, which runs until SIGTERM/SIGINT
//! (exit 0). A usage error, a failed bind or a fatal set-up error exits 1 (LOCAL_API.md §18).

use log::{error, warn};

use crate::cli::{self, CliError, ClientArgs};
use crate::io::daemon;
use crate::io::log as ilog;
use crate::io::sys;
use crate::proto::cloud::CloudConfig;
use crate::proto::node::NodeConfig;
use crate::time::Duration;

/// The vendor's line for a port already in use (LOCAL_API.md §2).
pub const QUIT_BOUND: &str = "Quit, maybe another miio_client is already running.";

/// The node's settings from the command line (P§5.1 host and port rules, timers).
fn node_config(a: &ClientArgs) -> NodeConfig {
    let mut c = CloudConfig::new(0, [0; 16], "", "", "", a.country.as_deref().unwrap_or(""));
    c.transports.clone_from(&a.transports);
    // D1: -H and -p move both transports; the per-transport options win over them.
    let udp_host = a.udp_host.clone().or_else(|| a.host.clone());
    let tcp_host = a.tcp_host.clone().or_else(|| a.host.clone());
    if let Some(h) = &udp_host {
        c.udp.host = h.clone();
        c.udp.explicit = true;
    }
    if let Some(h) = &tcp_host {
        c.tcp.host = h.clone();
        c.tcp.explicit = true;
    }
    if let Some(p) = a.udp_port.or(a.port) {
        c.udp.port = p;
    }
    if let Some(p) = a.tcp_port.or(a.port) {
        c.tcp.port = p;
    }
    c.keepalive = a.keepalive;
    c.ack_timeout = a.ack_timeout;
    c.user_ack_timeout = a.user_ack_timeout;
    c.backoff_min = a.backoff_min;
    c.backoff_max = a.backoff_max;
    c.refresh = a.interval_ms.map(Duration::from_millis);
    c.max_cloud_payload = a.max_cloud_payload;
    c.didkey_method.clone_from(&a.didkey_method);
    c.seed = sys::random_seed();
    NodeConfig {
        max_clients: a.max_clients,
        max_sleep: a.max_sleep,
        cloud: c,
        country_override: a.country.clone(),
        hosts_explicit: (udp_host.is_some(), tcp_host.is_some()),
        helper: crate::proto::helper::Config {
            datadir: a.datadir.clone(),
            grace: a.helper_grace,
            timeout: a.helper_timeout,
        },
        // P§4.8: the responder runs unless disabled, and it names a LAN port that is open.
        mdns: (a.mdns && a.mdns_port != 0 && a.lan_port != 0).then_some(a.lan_port),
    }
}

/// L§14: a `fw_ver` that breaks `x.y.z_nnnn` is reported as it is, with a warning
/// at start-up that names the rule, since the cloud judges an upgrade by it. Read here once from
/// `device.conf`'s vendor and os-release; a missing file or vendor says nothing (the node logs
/// those itself).
fn check_fw_ver(a: &ClientArgs) {
    use crate::config::{device, osrelease, store};
    let Some(text) = crate::io::datafiles::os_release(&a.os_release) else {
        return;
    };
    let conf = format!("{}device.conf", a.datadir);
    let Some(vendor) = store::read_limited(conf.as_ref(), store::MAX_DATA_FILE)
        .ok()
        .and_then(|t| device::parse(&t).ok())
        .map(|d| d.vendor)
    else {
        return;
    };
    if let Some(v) = osrelease::fw_version(&text, &vendor) {
        if !osrelease::version_rule_ok(&v) {
            warn!(
                "fw_ver '{v}' in {} breaks the version rule x.y.z_nnnn (three numbers, '_', four \
                 digits, e.g. 2.1.1_9527)",
                a.os_release
            );
        }
    }
}

/// Entry point of the applet.
pub fn main(args: &[String]) -> i32 {
    let a = match cli::parse_client(args) {
        Ok(a) => a,
        Err(CliError::Help) => {
            eprint!("{}", cli::USAGE);
            return 1;
        }
        Err(CliError::Version) => {
            let f = match crate::FEATURES {
                [] => "none".to_string(),
                f => f.join(" "),
            };
            eprintln!("miio-client {} (features: {f})", crate::VERSION);
            return 1;
        }
        Err(CliError::Usage(m)) => {
            eprintln!("miio_client: {m}");
            eprint!("{}", cli::USAGE);
            return 1;
        }
    };
    let log = match ilog::init(a.loglevel, a.logfile.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "miio_client: cannot open log file {}: {e}",
                a.logfile.as_deref().unwrap_or("")
            );
            return 1;
        }
    };
    check_fw_ver(&a);
    if a.enckey || a.encdata {
        warn!("-e/-E (encrypted storage) are accepted for compatibility and have no effect");
    }
    // Bind before detaching, so a port in use is an exit status the init script sees.
    let sockets = match daemon::bind_all(&a) {
        Ok(s) => s,
        Err(e) => {
            error!("bind: {e}");
            error!("{QUIT_BOUND}");
            return 1;
        }
    };
    if a.daemonize {
        if let Err(e) = sys::daemonize(true) {
            error!("cannot daemonize: {e}");
            return 1;
        }
    }
    let config = node_config(&a);
    daemon::run(a, log, sockets, config)
}
