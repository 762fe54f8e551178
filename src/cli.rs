//! Command line of the daemon applet (LOCAL_API.md §18): the vendor getopt string
//! `Dp:H:i:l:L:hvd:eEC:o:n:` plus our long options. Pure: argv in, a typed config or an error out.
//! Options whose feature comes later are accepted now, so that scripts written today never break.

use core::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::time::Duration;

/// Cloud transports, in the order they are tried (PROTOCOL.md §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Everything the daemon takes from its command line. Defaults are those of the spec sections cited.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientArgs {
    pub daemonize: bool,
    /// Always ends with `/` (vendor helpers build paths by concatenation, LOCAL_API.md §9.3).
    pub datadir: String,
    pub loglevel: u8,
    pub logfile: Option<String>,
    /// `-H`: host of both transports (D1: the vendor's moves TCP only).
    pub host: Option<String>,
    pub port: Option<u16>,
    pub udp_host: Option<String>,
    pub udp_port: Option<u16>,
    pub tcp_host: Option<String>,
    pub tcp_port: Option<u16>,
    pub transports: Vec<Transport>,
    /// `-i`: the `_otc.info` refresh period, in ms as on the vendor.
    pub interval_ms: Option<u64>,
    /// `-C`: country host prefix.
    pub country: Option<String>,
    pub lan_port: u16,
    pub local_port: u16,
    pub ble_port: u16,
    pub max_clients: usize,
    pub max_msg: usize,
    pub max_cloud_payload: usize,
    pub keepalive: Duration,
    pub ack_timeout: Duration,
    pub user_ack_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub helper_grace: Duration,
    pub helper_timeout: Duration,
    pub max_sleep: Duration,
    pub didkey_method: String,
    pub os_release: String,
    pub mqtt: Option<SocketAddrV4>,
    pub mqtt_id: String,
    pub mqtt_keepalive: u16,
    pub mdns: bool,
    pub mdns_port: u16,
    /// `-e`/`-E`: accepted, no effect (LOCAL_API.md §19).
    pub enckey: bool,
    pub encdata: bool,
}

impl Default for ClientArgs {
    fn default() -> Self {
        ClientArgs {
            daemonize: false,
            datadir: "/etc/miio/".into(),
            loglevel: 2,
            logfile: None,
            host: None,
            port: None,
            udp_host: None,
            udp_port: None,
            tcp_host: None,
            tcp_port: None,
            transports: vec![Transport::Udp, Transport::Tcp],
            interval_ms: None,
            country: None,
            lan_port: 54321,
            local_port: 54322,
            ble_port: 54323,
            max_clients: 20,
            max_msg: 16384,
            max_cloud_payload: 1024,
            keepalive: Duration::from_secs(20),
            ack_timeout: Duration::from_secs(3),
            user_ack_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            helper_grace: Duration::from_secs(2),
            helper_timeout: Duration::from_secs(10),
            max_sleep: Duration::from_secs(3600),
            didkey_method: "_otc.didkey_req".into(),
            os_release: "/etc/os-release".into(),
            mqtt: None,
            mqtt_id: "miio_client".into(),
            mqtt_keepalive: 0,
            mdns: true,
            mdns_port: 5353,
            enckey: false,
            encdata: false,
        }
    }
}

/// Why parsing stopped. `Help` and `Version` are not failures of the user, but exit 1 as the vendor does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CliError {
    Help,
    Version,
    Usage(String),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Help => f.write_str("help requested"),
            CliError::Version => f.write_str("version requested"),
            CliError::Usage(m) => f.write_str(m),
        }
    }
}

pub const USAGE: &str = "\
Usage: miio_client [options]
  -D, --daemonize         detach and run in the background
  -d, --datadir DIR       data dir with device.conf, device.token, wifi.conf (default /etc/miio/)
  -l, --loglevel N        0 error, 1 warning, 2 info (default), 3 debug, 4 verbose
  -L, --logfile FILE      append the log to FILE (reopened on SIGHUP) instead of stdout
  -H, --host HOST         cloud host for UDP and TCP
  -p, --port PORT         cloud port for UDP and TCP
  -C, --dcountry CC       country host prefix (not together with -H)
  -i, --interval MS       _otc.info refresh period in milliseconds
  -e, --enckey / -E, --encdata   accepted for compatibility, no effect
  -o OPT, -n N            accepted for compatibility, ignored
  -h, --help              this text (exit 1)
  -v, --version           print the version (exit 1)
Cloud:   --udp-host H --udp-port P --tcp-host H --tcp-port P --transports udp,tcp
Local:   --lan-port P (0 off) --local-port P --ble-port P (0 off) --max-clients N
         --max-msg BYTES --max-cloud-payload BYTES (<= 16384)
Timers (seconds, fractions allowed): --keepalive --ack-timeout --user-ack-timeout
         --backoff-min --backoff-max --helper-grace --helper-timeout --max-sleep
Other:   --didkey-method M --os-release FILE --mqtt[=IP:PORT] --mqtt-id ID
         --mqtt-keepalive S --mdns-port P (0 off) --no-mdns
Signals: TERM/INT stop cleanly, HUP reopens the log and re-reads the data files.
";

fn usage(msg: impl Into<String>) -> CliError {
    CliError::Usage(msg.into())
}

/// The crate's one decimal parser of unsigned numbers: `str::parse` of a `u64` (an optional `+`,
/// then digits), narrowed to `T`, so it accepts exactly what `str::parse::<T>` accepts. One copy of
/// the digit loop instead of one per integer type: the board's flash counts each.
pub fn uint<T: TryFrom<u64>>(s: &str) -> Option<T> {
    T::try_from(u64_of(s)?).ok()
}

#[inline(never)]
fn u64_of(s: &str) -> Option<u64> {
    s.parse().ok()
}

fn num<T: TryFrom<u64>>(opt: &str, v: &str) -> Result<T, CliError> {
    uint(v.trim()).ok_or_else(|| usage(format!("option {opt}: '{v}' is not a valid number")))
}

fn port(opt: &str, v: &str, allow_zero: bool) -> Result<u16, CliError> {
    let p: u16 = num(opt, v)?;
    if p == 0 && !allow_zero {
        return Err(usage(format!("option {opt}: port 0 is not allowed")));
    }
    Ok(p)
}

fn secs(opt: &str, v: &str) -> Result<Duration, CliError> {
    Duration::parse_secs(v)
        .ok_or_else(|| usage(format!("option {opt}: '{v}' is not a number of seconds")))
}

fn host(opt: &str, v: &str) -> Result<String, CliError> {
    // PROTOCOL.md §5.1: a host name must be shorter than 32 bytes.
    if v.is_empty() || v.len() >= 32 {
        return Err(usage(format!(
            "option {opt}: host length must be 1..31 bytes, got {}",
            v.len()
        )));
    }
    Ok(v.to_owned())
}

fn country(v: &str) -> Result<String, CliError> {
    let v = v.trim().to_ascii_lowercase();
    if v.len() >= 8 || !v.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(usage(format!("Illegal country domain: '{v}'")));
    }
    Ok(v)
}

/// Short options that take a value, per the vendor getopt string.
const SHORT_WITH_ARG: &str = "pHilLdCon";
const SHORT_FLAGS: &str = "DhveE";

/// What an option sets: `apply` matches on this, found by name in [`OPTS`], rather than on the
/// names themselves, whose string compares cost flash (ARCHITECTURE.md §6).
#[derive(Clone, Copy)]
enum Opt {
    Daemonize,
    Help,
    Version,
    Enckey,
    Encdata,
    Ignored,
    Datadir,
    Loglevel,
    Logfile,
    Host,
    Port,
    Interval,
    Dcountry,
    UdpHost,
    UdpPort,
    TcpHost,
    TcpPort,
    Transports,
    LanPort,
    LocalPort,
    BlePort,
    MaxClients,
    MaxMsg,
    MaxCloudPayload,
    Keepalive,
    AckTimeout,
    UserAckTimeout,
    BackoffMin,
    BackoffMax,
    HelperGrace,
    HelperTimeout,
    MaxSleep,
    DidkeyMethod,
    OsRelease,
    Mqtt,
    MqttId,
    MqttKeepalive,
    MdnsPort,
    NoMdns,
}

/// Every option: (name, what it sets, takes a value). Long names, in the order `--help` lists them
/// and with whether they take a value (`mqtt` takes an optional one, `--mqtt=IP:PORT`), then the
/// short ones (their values per [`SHORT_WITH_ARG`]; a one-letter name is never a long option).
const OPTS: &[(&str, Opt, bool)] = &[
    ("daemonize", Opt::Daemonize, false),
    ("datadir", Opt::Datadir, true),
    ("loglevel", Opt::Loglevel, true),
    ("logfile", Opt::Logfile, true),
    ("host", Opt::Host, true),
    ("port", Opt::Port, true),
    ("interval", Opt::Interval, true),
    ("dcountry", Opt::Dcountry, true),
    ("enckey", Opt::Enckey, false),
    ("encdata", Opt::Encdata, false),
    ("help", Opt::Help, false),
    ("version", Opt::Version, false),
    ("udp-host", Opt::UdpHost, true),
    ("udp-port", Opt::UdpPort, true),
    ("tcp-host", Opt::TcpHost, true),
    ("tcp-port", Opt::TcpPort, true),
    ("transports", Opt::Transports, true),
    ("lan-port", Opt::LanPort, true),
    ("local-port", Opt::LocalPort, true),
    ("ble-port", Opt::BlePort, true),
    ("max-clients", Opt::MaxClients, true),
    ("max-msg", Opt::MaxMsg, true),
    ("max-cloud-payload", Opt::MaxCloudPayload, true),
    ("keepalive", Opt::Keepalive, true),
    ("ack-timeout", Opt::AckTimeout, true),
    ("user-ack-timeout", Opt::UserAckTimeout, true),
    ("backoff-min", Opt::BackoffMin, true),
    ("backoff-max", Opt::BackoffMax, true),
    ("helper-grace", Opt::HelperGrace, true),
    ("helper-timeout", Opt::HelperTimeout, true),
    ("max-sleep", Opt::MaxSleep, true),
    ("didkey-method", Opt::DidkeyMethod, true),
    ("os-release", Opt::OsRelease, true),
    ("mqtt", Opt::Mqtt, false),
    ("mqtt-id", Opt::MqttId, true),
    ("mqtt-keepalive", Opt::MqttKeepalive, true),
    ("mdns-port", Opt::MdnsPort, true),
    ("no-mdns", Opt::NoMdns, false),
    ("D", Opt::Daemonize, false),
    ("h", Opt::Help, false),
    ("v", Opt::Version, false),
    ("e", Opt::Enckey, false),
    ("E", Opt::Encdata, false),
    ("o", Opt::Ignored, false),
    ("n", Opt::Ignored, false),
    ("d", Opt::Datadir, false),
    ("l", Opt::Loglevel, false),
    ("L", Opt::Logfile, false),
    ("H", Opt::Host, false),
    ("p", Opt::Port, false),
    ("i", Opt::Interval, false),
    ("C", Opt::Dcountry, false),
];

fn apply(a: &mut ClientArgs, name: &str, val: Option<&str>) -> Result<(), CliError> {
    let v = val.unwrap_or("");
    let o = name;
    #[cfg(not(feature = "mqtt"))]
    if name.starts_with("mqtt") {
        return Err(usage("--mqtt: this build has no MQTT (feature mqtt)"));
    }
    let Some(&(_, opt, _)) = OPTS.iter().find(|(n, ..)| *n == name) else {
        return Err(usage(format!("unknown option {name}")));
    };
    match opt {
        Opt::Daemonize => a.daemonize = true,
        Opt::Help => return Err(CliError::Help),
        Opt::Version => return Err(CliError::Version),
        Opt::Enckey => a.enckey = true,
        Opt::Encdata => a.encdata = true,
        Opt::Ignored => {} // newer gateway builds pass these; meaning unknown (LOCAL_API.md §19).
        Opt::Datadir => {
            if v.is_empty() {
                return Err(usage("option -d: empty data dir"));
            }
            a.datadir = if v.ends_with('/') {
                v.to_owned()
            } else {
                format!("{v}/")
            };
        }
        Opt::Loglevel => {
            let l: u8 = num(o, v)?;
            if l > 4 {
                return Err(usage(format!("option -l: level {l} is not in 0..4")));
            }
            a.loglevel = l;
        }
        Opt::Logfile => {
            if v.is_empty() {
                return Err(usage("option -L: empty file name"));
            }
            a.logfile = Some(v.to_owned());
        }
        Opt::Host => a.host = Some(host(o, v)?),
        Opt::Port => a.port = Some(port(o, v, false)?),
        Opt::Interval => {
            let ms: u64 = num(o, v)?;
            if ms == 0 {
                return Err(usage("option -i: the interval must be positive"));
            }
            a.interval_ms = Some(ms);
        }
        Opt::Dcountry => a.country = Some(country(v)?),
        Opt::UdpHost => a.udp_host = Some(host(o, v)?),
        Opt::UdpPort => a.udp_port = Some(port(o, v, false)?),
        Opt::TcpHost => a.tcp_host = Some(host(o, v)?),
        Opt::TcpPort => a.tcp_port = Some(port(o, v, false)?),
        Opt::Transports => {
            let mut t = Vec::new();
            for part in v.split(',') {
                let x = match part.trim() {
                    "udp" => Transport::Udp,
                    "tcp" => Transport::Tcp,
                    other => {
                        return Err(usage(format!(
                            "option --transports: unknown transport '{other}' (udp, tcp)"
                        )))
                    }
                };
                if t.contains(&x) {
                    return Err(usage("option --transports: a transport is named twice"));
                }
                t.push(x);
            }
            a.transports = t;
        }
        Opt::LanPort => a.lan_port = port(o, v, true)?,
        Opt::LocalPort => a.local_port = port(o, v, true)?,
        Opt::BlePort => a.ble_port = port(o, v, true)?,
        Opt::MaxClients => {
            a.max_clients = num(o, v)?;
            if a.max_clients == 0 || a.max_clients > 1000 {
                return Err(usage("option --max-clients: must be 1..1000"));
            }
        }
        Opt::MaxMsg => {
            a.max_msg = num(o, v)?;
            if !(256..=1 << 20).contains(&a.max_msg) {
                return Err(usage("option --max-msg: must be 256..1048576"));
            }
        }
        Opt::MaxCloudPayload => {
            a.max_cloud_payload = num(o, v)?;
            if !(64..=16384).contains(&a.max_cloud_payload) {
                return Err(usage("option --max-cloud-payload: must be 64..16384"));
            }
        }
        Opt::Keepalive => a.keepalive = secs(o, v)?,
        Opt::AckTimeout => a.ack_timeout = secs(o, v)?,
        Opt::UserAckTimeout => a.user_ack_timeout = secs(o, v)?,
        Opt::BackoffMin => a.backoff_min = secs(o, v)?,
        Opt::BackoffMax => a.backoff_max = secs(o, v)?,
        Opt::HelperGrace => a.helper_grace = secs(o, v)?,
        Opt::HelperTimeout => a.helper_timeout = secs(o, v)?,
        Opt::MaxSleep => a.max_sleep = secs(o, v)?,
        Opt::DidkeyMethod => {
            if v.is_empty() {
                return Err(usage("option --didkey-method: empty method"));
            }
            a.didkey_method = v.to_owned();
        }
        Opt::OsRelease => a.os_release = v.to_owned(),
        Opt::Mqtt => {
            // L§11: the broker is on this host or the LAN, named by its IPv4 address (no lookup).
            a.mqtt = Some(match val {
                None => SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1883),
                Some(hp) => match hp.rsplit_once(':').map(|(h, p)| (h.parse(), p)) {
                    Some((Ok(h), p)) => SocketAddrV4::new(h, port(o, p, false)?),
                    _ => return Err(usage("option --mqtt: expected IPV4:PORT")),
                },
            });
        }
        Opt::MqttId => {
            if v.is_empty() || v.len() > 23 {
                return Err(usage("option --mqtt-id: must be 1..23 bytes"));
            }
            a.mqtt_id = v.to_owned();
        }
        Opt::MqttKeepalive => a.mqtt_keepalive = num(o, v)?,
        Opt::MdnsPort => a.mdns_port = port(o, v, true)?,
        Opt::NoMdns => a.mdns = false,
    }
    Ok(())
}

/// Parses the arguments after the applet name.
pub fn parse_client<S: AsRef<str>>(args: &[S]) -> Result<ClientArgs, CliError> {
    let mut a = ClientArgs::default();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_ref();
        i += 1;
        if arg == "--" {
            if i < args.len() {
                return Err(usage(format!("unexpected argument '{}'", args[i].as_ref())));
            }
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            let Some(&(.., takes)) = OPTS.iter().find(|(n, ..)| n.len() > 1 && *n == name) else {
                return Err(usage(format!("unknown option --{name}")));
            };
            let val = if takes {
                match inline {
                    Some(v) => Some(v),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].as_ref())
                    }
                    None => return Err(usage(format!("option --{name} needs a value"))),
                }
            } else if name == "mqtt" {
                inline
            } else if inline.is_some() {
                return Err(usage(format!("option --{name} takes no value")));
            } else {
                None
            };
            apply(&mut a, name, val)?;
            continue;
        }
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            return Err(usage(format!("unexpected argument '{arg}'")));
        };
        // getopt clustering: `-Dl3`, `-d/tmp`, `-d /tmp`.
        for (pos, c) in cluster.char_indices() {
            let name = c.to_string();
            if SHORT_FLAGS.contains(c) {
                apply(&mut a, &name, None)?;
            } else if SHORT_WITH_ARG.contains(c) {
                let rest = &cluster[pos + c.len_utf8()..];
                let val = if !rest.is_empty() {
                    rest
                } else if i < args.len() {
                    i += 1;
                    args[i - 1].as_ref()
                } else {
                    return Err(usage(format!("option -{c} needs a value")));
                };
                apply(&mut a, &name, Some(val))?;
                break;
            } else {
                return Err(usage(format!("unknown option -{c}")));
            }
        }
    }
    if a.country.is_some() && a.host.is_some() {
        return Err(usage("-C and -H cannot be given together"));
    }
    if a.backoff_min > a.backoff_max {
        return Err(usage("--backoff-min is larger than --backoff-max"));
    }
    if a.keepalive.millis() < 100 {
        return Err(usage("--keepalive must be at least 0.1 s"));
    }
    if a.max_sleep.millis() < 1000 {
        return Err(usage("--max-sleep must be at least 1 s"));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<ClientArgs, CliError> {
        parse_client(args)
    }

    #[test]
    fn defaults() {
        let a = p(&[]).unwrap();
        assert_eq!(a.datadir, "/etc/miio/");
        assert_eq!(a.loglevel, 2);
        assert_eq!(a.keepalive, Duration::from_secs(20));
        assert_eq!(a.transports, vec![Transport::Udp, Transport::Tcp]);
        assert_eq!(
            (a.lan_port, a.local_port, a.ble_port),
            (54321, 54322, 54323)
        );
    }

    #[test]
    fn vendor_short_options_and_clusters() {
        let a = p(&[
            "-D",
            "-d/tmp/x",
            "-l",
            "3",
            "-L",
            "/tmp/log",
            "-H",
            "127.0.0.1",
            "-p8053",
        ])
        .unwrap();
        assert!(a.daemonize);
        assert_eq!(a.datadir, "/tmp/x/");
        assert_eq!(a.loglevel, 3);
        assert_eq!(a.logfile.as_deref(), Some("/tmp/log"));
        assert_eq!(a.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(a.port, Some(8053));
        let b = p(&[
            "-Dl4",
            "-eE",
            "-o",
            "FILE_STORE",
            "-n",
            "128",
            "-i",
            "60000",
        ])
        .unwrap();
        assert!(b.daemonize && b.enckey && b.encdata);
        assert_eq!(b.loglevel, 4);
        assert_eq!(b.interval_ms, Some(60000));
    }

    #[test]
    fn long_options() {
        let a = p(&[
            "--datadir=/data",
            "--transports",
            "tcp",
            "--keepalive=0.5",
            "--lan-port",
            "0",
            "--no-mdns",
            "--udp-port=9000",
        ])
        .unwrap();
        assert_eq!(a.datadir, "/data/");
        assert_eq!(a.transports, vec![Transport::Tcp]);
        assert_eq!(a.keepalive, Duration::from_millis(500));
        assert_eq!(a.lan_port, 0);
        assert!(!a.mdns);
        assert_eq!(a.udp_port, Some(9000));
    }

    #[cfg(feature = "mqtt")]
    #[test]
    fn mqtt_options() {
        let a = p(&["--lan-port", "0", "--mqtt", "--no-mdns"]).unwrap();
        assert_eq!(a.mqtt, Some("127.0.0.1:1883".parse().unwrap()));
        let b = p(&["--mqtt=10.0.0.1:1884"]).unwrap();
        assert_eq!(b.mqtt, Some("10.0.0.1:1884".parse().unwrap()));
        // L§11: an address, not a name; MQTT options are notes no more.
        assert!(matches!(
            p(&["--mqtt=localhost:1883"]),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(p(&["--mqtt=127.0.0.1"]), Err(CliError::Usage(_))));
    }

    /// A build without the `mqtt` feature refuses its options (L§18).
    #[cfg(not(feature = "mqtt"))]
    #[test]
    fn mqtt_options_need_the_feature() {
        for o in ["--mqtt", "--mqtt-id=x", "--mqtt-keepalive=5"] {
            let Err(CliError::Usage(m)) = p(&[o]) else {
                panic!("{o} accepted")
            };
            assert!(m.contains("this build has no MQTT"), "{m}");
        }
    }

    #[test]
    fn help_version_and_errors() {
        assert_eq!(p(&["-h"]), Err(CliError::Help));
        assert_eq!(p(&["--version"]), Err(CliError::Version));
        assert!(matches!(p(&["-x"]), Err(CliError::Usage(_))));
        assert!(matches!(p(&["--bogus"]), Err(CliError::Usage(_))));
        assert!(matches!(p(&["-l"]), Err(CliError::Usage(_))));
        assert!(matches!(p(&["-l", "9"]), Err(CliError::Usage(_))));
        assert!(matches!(p(&["-p", "70000"]), Err(CliError::Usage(_))));
        assert!(matches!(
            p(&["--keepalive", "abc"]),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            p(&["--transports", "udp,udp"]),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(p(&["--no-mdns=1"]), Err(CliError::Usage(_))));
        assert!(matches!(p(&["stray"]), Err(CliError::Usage(_))));
        assert!(matches!(
            p(&["-H", "a-very-long-host-name-over-32.example.com"]),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn country_with_host_is_an_error() {
        assert!(p(&["-C", "de"]).is_ok());
        match p(&["-C", "de", "-H", "127.0.0.1"]) {
            Err(CliError::Usage(m)) => assert!(m.contains("-C and -H")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(p(&["-C", "de1"]), Err(CliError::Usage(_))));
    }

    #[test]
    fn arbitrary_args_never_panic() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(256), |(args in proptest::collection::vec(".{0,12}", 0..6))| {
            let _ = parse_client(&args);
        });
    }
}
