//! The `miio_client` applet: the daemon. It parses the command line, binds its sockets, loads the
//! data dir and runs the reactor loop until SIGTERM/SIGINT (exit 0). A usage error, a failed bind or
//! a fatal set-up error exits 1 (LOCAL_API.md §18).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use log::{error, info, warn};
use mio::net::{TcpListener, UdpSocket};
use mio::Interest;

use crate::cli::{self, CliError, ClientArgs};
use crate::config::Secret16;
use crate::io::datafiles::{self, Identity};
use crate::io::log::{self as ilog, LogHandle};
use crate::io::reactor::{self, Reactor, Signal};
use crate::io::sys;
use crate::proto::state::State;
use crate::time::{Duration, Instant};
use crate::timer::TimerWheel;

/// The vendor's line for a port already in use (LOCAL_API.md §2).
pub const QUIT_BOUND: &str = "Quit, maybe another miio_client is already running.";

/// How often a daemon without a usable identity repeats why (LOCAL_API.md §9.5).
const CONFIG_RETRY: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// Re-log why the daemon is still in `device_init`.
    ConfigRetry,
}

struct Sockets {
    lan: Option<UdpSocket>,
    local: Option<TcpListener>,
    ble: Option<TcpListener>,
}

fn bind_tcp(port: u16) -> io::Result<TcpListener> {
    // D8: the local listeners are on loopback only.
    TcpListener::bind(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
}

fn bind_all(a: &ClientArgs) -> io::Result<Sockets> {
    let lan = match a.lan_port {
        0 => None,
        p => Some(UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::UNSPECIFIED,
            p,
        )))?),
    };
    let local = match a.local_port {
        0 => None,
        p => Some(bind_tcp(p)?),
    };
    let ble = match a.ble_port {
        0 => None,
        p => Some(bind_tcp(p)?),
    };
    Ok(Sockets { lan, local, ble })
}

struct Daemon {
    args: ClientArgs,
    log: LogHandle,
    reactor: Reactor,
    sockets: Sockets,
    wheel: TimerWheel<Timer>,
    state: State,
    identity: Option<Identity>,
}

fn fresh_token() -> Secret16 {
    let mut raw = [0u8; 96];
    // A failing getrandom is near impossible; the token still must not be predictable, so fall
    // back to mixing in the clock only to keep the daemon alive, and say so.
    if let Err(e) = sys::random_bytes(&mut raw) {
        warn!("getrandom failed ({e}); token entropy is weak");
        let t = sys::boottime_ms().to_le_bytes();
        for (i, b) in raw.iter_mut().enumerate() {
            *b ^= t[i % 8].wrapping_mul(i as u8 | 1);
        }
    }
    crate::config::token::generate(&raw).unwrap_or_else(|| Secret16::new(*b"0123456789abcdef"))
}

impl Daemon {
    fn set_state(&mut self, to: State) {
        if to != self.state {
            info!("{}", State::transition_line(self.state, to));
            self.state = to;
        }
    }

    /// Loads the data dir; on success walks device_init → … → sta_mode / wifi_ap_mode.
    fn load_identity(&mut self, now: Instant) {
        match datafiles::load(&self.args.datadir, &self.args.os_release, &fresh_token()) {
            Ok(id) => {
                self.wheel.cancel(Timer::ConfigRetry);
                info!(
                    "device did {} model {} mac {}",
                    id.device.did, id.device.model, id.device.mac
                );
                let provisioned = id.provisioned;
                self.identity = Some(id);
                self.set_state(State::DidkeyDone);
                self.set_state(State::TokenDone);
                self.set_state(if provisioned {
                    State::WifiStaMode
                } else {
                    State::WifiApMode
                });
            }
            Err(e) => {
                error!("{e}");
                error!("staying in device_init; fix the file and send SIGHUP");
                self.wheel.set(Timer::ConfigRetry, now + CONFIG_RETRY);
            }
        }
    }

    fn reload(&mut self, now: Instant) {
        if let Err(e) = self.log.reopen() {
            warn!("cannot reopen the log file: {e}");
        }
        if self.state == State::DeviceInit {
            self.load_identity(now);
        } else {
            // Identity changes need a restart of the session; the helper protocol covers them.
            info!("SIGHUP: log reopened");
        }
    }

    fn fire(&mut self, now: Instant, t: Timer) {
        match t {
            Timer::ConfigRetry => {
                if let Err(e) = datafiles::load_device(&self.args.datadir) {
                    error!("{e}");
                }
                self.wheel.set(Timer::ConfigRetry, now + CONFIG_RETRY);
            }
        }
    }

    fn drain_lan(&mut self) {
        let Some(lan) = self.sockets.lan.as_ref() else {
            return;
        };
        let mut buf = [0u8; 65536];
        loop {
            match lan.recv_from(&mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("LAN socket: {e}");
                    return;
                }
            }
        }
    }

    fn drain_accept(listener: Option<&TcpListener>) {
        let Some(l) = listener else { return };
        loop {
            match l.accept() {
                Ok((s, _)) => drop(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    fn run(&mut self) -> io::Result<i32> {
        let reg = self.reactor.registry();
        if let Some(s) = self.sockets.lan.as_mut() {
            reg.register(s, reactor::LAN, Interest::READABLE)?;
        }
        if let Some(s) = self.sockets.local.as_mut() {
            reg.register(s, reactor::LOCAL_LISTEN, Interest::READABLE)?;
        }
        if let Some(s) = self.sockets.ble.as_mut() {
            reg.register(s, reactor::BLE_LISTEN, Interest::READABLE)?;
        }
        let now = crate::io::clock::now();
        self.load_identity(now);
        loop {
            let turn = self.reactor.wait(self.wheel.earliest())?;
            let now = turn.now;
            for s in &turn.signals {
                match s {
                    Signal::Stop => {
                        info!("stopping on signal");
                        return Ok(0);
                    }
                    Signal::Reload => self.reload(now),
                    Signal::Child => {
                        sys::reap_children();
                    }
                }
            }
            for r in &turn.ready {
                match r.token {
                    reactor::LAN => self.drain_lan(),
                    reactor::LOCAL_LISTEN => Self::drain_accept(self.sockets.local.as_ref()),
                    reactor::BLE_LISTEN => Self::drain_accept(self.sockets.ble.as_ref()),
                    _ => {}
                }
            }
            while let Some(t) = self.wheel.pop_due(now) {
                self.fire(now, t);
            }
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
            eprintln!("miio-client {}", crate::VERSION);
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
    if a.enckey || a.encdata {
        warn!("-e/-E (encrypted storage) are accepted for compatibility and have no effect");
    }
    // Bind before detaching, so a port in use is an exit status the init script sees.
    let sockets = match bind_all(&a) {
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
    let reactor = match Reactor::new() {
        Ok(r) => r,
        Err(e) => {
            error!("cannot set up the reactor: {e}");
            return 1;
        }
    };
    info!(
        "miio_client {} starting, data dir {}",
        crate::VERSION,
        a.datadir
    );
    let mut d = Daemon {
        args: a,
        log,
        reactor,
        sockets,
        wheel: TimerWheel::new(),
        state: State::DeviceInit,
        identity: None,
    };
    match d.run() {
        Ok(code) => code,
        Err(e) => {
            error!("fatal: {e}");
            1
        }
    }
}
