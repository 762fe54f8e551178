//! The `miio_ota` applet (LOCAL_API.md §14): the reference OTA agent. Its decisions are
//! `proto::ota`'s; this file is the command line and a small loop on the shared reactor (no tick:
//! idle, it sleeps until a message, a signal or its one deadline), with the daemon's connection type
//! (`io::conn::Conn`) for the one connection to the daemon (or to miio_agent with `--agent`), the
//! child processes (`io::sys::spawn`: a process group each, every value one argv element, no
//! shell), the download command's output read through a pipe on the reactor, and SIGCHLD through the
//! reactor's signal pipe. The core drives all of it through [`proto::ota::Io`](crate::proto::ota::Io),
//! implemented by [`Sys`].

use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;

use log::{error, info};
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Interest, Token};

use crate::io::conn::{Conn, ReadStep, READ_CHUNK};
use crate::io::log::{self as ilog, LogHandle};
use crate::io::reactor::{self, Reactor, Signal};
use crate::io::{clock, sys};
use crate::proto::ota::{self, Config, Io, Job, Kind, Ota};
use crate::time::{Duration, Instant};

const USAGE: &str = "Usage: miio_ota [-h] [-D] [-l 0-4] [-L logfile] [--agent] [--port N] \
[--ota-dir /tmp/miio_ota] [--download-cmd /etc/miio/ota_download.sh] \
[--install-cmd /etc/miio/ota_install.sh] [--busy-cmd P] [--download-timeout 3600]\n";

/// The daemon's messages (commands carry cloud payloads): bounded, as miio_agent's.
const MAX_MSG: usize = 65536;
/// What may wait for the daemon; beyond, the connection is closed and tried again.
const OUT_LIMIT: usize = 64 * 1024;
/// A line of the download command's output; a longer one is skipped.
const MAX_LINE: usize = 128;
/// The download file in `--ota-dir`.
const FILE: &str = "ota.bin";

const CONN: Token = Token(reactor::CLIENT_BASE);
const PIPE: Token = Token(reactor::CLIENT_BASE + 1);

#[derive(Debug, PartialEq, Eq)]
struct Args {
    agent: bool,
    port: Option<u16>,
    dir: String,
    download: String,
    install: String,
    busy: Option<String>,
    timeout: u32,
    loglevel: u8,
    logfile: Option<String>,
    daemonize: bool,
}

/// The options, by the place [`parse`] applies them at: two flags, then those with a value.
const OPTS: [&str; 10] = [
    "-D",
    "--agent",
    "-l",
    "-L",
    "--port",
    "--download-timeout",
    "--ota-dir",
    "--download-cmd",
    "--install-cmd",
    "--busy-cmd",
];

/// None: `-h`, or a usage error. Each option and its value are two arguments.
fn parse(args: &[String]) -> Option<Args> {
    let mut a = Args {
        agent: false,
        port: None,
        dir: "/tmp/miio_ota".into(),
        download: "/etc/miio/ota_download.sh".into(),
        install: "/etc/miio/ota_install.sh".into(),
        busy: None,
        timeout: 3600,
        loglevel: 2,
        logfile: None,
        daemonize: false,
    };
    let mut it = args.iter();
    while let Some(opt) = it.next() {
        // Found in one table and applied by its place (string compares cost flash).
        let i = OPTS.iter().position(|o| o == opt)?;
        match i {
            0 => a.daemonize = true,
            1 => a.agent = true,
            _ => {
                let v = it.next()?;
                match i {
                    2 => a.loglevel = crate::cli::uint(v).filter(|n| *n <= 4)?,
                    3 => a.logfile = Some(v.clone()),
                    4 => a.port = Some(crate::cli::uint(v).filter(|n| *n > 0)?),
                    5 => a.timeout = crate::cli::uint(v).filter(|n| *n > 0)?,
                    _ if v.is_empty() => return None,
                    6 => a.dir = v.clone(),
                    7 => a.download = v.clone(),
                    8 => a.install = v.clone(),
                    _ => a.busy = Some(v.clone()),
                }
            }
        }
    }
    Some(a)
}

/// Entry point of the applet.
pub fn main(args: &[String]) -> i32 {
    let Some(a) = parse(args) else {
        eprint!("{USAGE}");
        return 1;
    };
    let Ok(log) = ilog::init(a.loglevel, a.logfile.as_deref()) else {
        eprintln!("miio_ota: cannot open the log file");
        return 1;
    };
    match run(a, &log) {
        Ok(()) => 0,
        Err(e) => {
            error!("miio_ota: {e}");
            1
        }
    }
}

/// The running child.
struct Child {
    pid: i32,
    /// The download command's standard output, read for `progress N` lines.
    out: Option<File>,
    line: Vec<u8>,
    /// A line over [`MAX_LINE`] is being skipped up to its newline.
    skipping: bool,
}

/// miio_ota's side effects: what the core drives ([`Io`]) and the loop reads.
struct Sys {
    reactor: Reactor,
    conn: Option<Conn>,
    /// Input to read (edge seen, or the last read may have left more).
    rd: bool,
    hup: bool,
    /// The connection was dropped for a full queue: the loop tells the core.
    lost: bool,
    daemon: SocketAddr,
    child: Option<Child>,
    file: String,
    download: String,
    install: String,
    busy: Option<String>,
}

impl Io for Sys {
    fn send(&mut self, text: &str) -> bool {
        let Some(c) = self.conn.as_mut() else {
            return false;
        };
        if c.send(Rc::from(text)).is_ok() {
            return true;
        }
        self.conn = None;
        self.lost = true;
        false
    }

    fn spawn(&mut self, kind: Kind, job: &Job) -> bool {
        let mode = if job.silent { "silent" } else { "normal" };
        // Each entry made in spawn's one buffer: no `String` here.
        let env = [["MIIO_OTA_MODE=", mode], ["MIIO_OTA_MD5=", &job.md5]];
        let file = self.file.as_str();
        let (argv, n): ([&str; 3], usize) = match kind {
            Kind::Check => ([self.busy.as_deref().unwrap_or("/bin/false"), "", ""], 1),
            Kind::Download => ([&self.download, &job.url, file], 3),
            Kind::Install => ([&self.install, file, ""], 2),
        };
        // Only the download's output is read (progress lines); the others write to our stdout.
        let pipe = if kind == Kind::Download {
            match sys::pipe() {
                Ok(p) => Some(p),
                Err(_) => return false,
            }
        } else {
            None
        };
        let Ok(pid) = sys::spawn(&argv[..n], &env, pipe.as_ref().map(|(_, w)| w.as_raw_fd()))
        else {
            return false;
        };
        let out = pipe.and_then(|(r, _w)| self.watch(r));
        self.child = Some(Child {
            pid,
            out,
            line: Vec::new(),
            skipping: false,
        });
        true
    }

    fn kill(&mut self) {
        if let Some(c) = &self.child {
            sys::kill_group(c.pid);
        }
    }

    fn file_md5(&mut self) -> Option<[u8; 16]> {
        let mut f = sys::open(self.file.as_ref(), libc::O_RDONLY, 0).ok()?;
        let mut h = crate::wire::crypto::Md5Sum::default();
        let mut buf = vec![0u8; 16384];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return Some(h.finish()),
                Ok(n) => h.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    fn remove(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }

    fn connect(&mut self) -> bool {
        self.conn = None;
        let Ok(mut s) = TcpStream::connect(self.daemon) else {
            return false;
        };
        if self
            .reactor
            .registry()
            .register(&mut s, CONN, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            return false;
        }
        self.conn = Some(Conn::new(s, MAX_MSG, OUT_LIMIT));
        self.rd = false;
        self.hup = false;
        true
    }
}

impl Sys {
    /// The read end of the child's output on the reactor. None: it cannot be watched (the output
    /// is then lost, the download still runs).
    fn watch(&mut self, r: OwnedFd) -> Option<File> {
        self.reactor
            .registry()
            .register(&mut SourceFd(&r.as_raw_fd()), PIPE, Interest::READABLE)
            .ok()?;
        Some(File::from(r))
    }

    /// Reads what the child printed, each whole line to the core. True: there may be more.
    fn drain_child(core: &mut Ota<Sys>, now: Instant, buf: &mut [u8]) -> bool {
        for _ in 0..16 {
            let io = &mut core.io;
            let Some(c) = io.child.as_mut() else {
                return false;
            };
            let Some(out) = c.out.as_mut() else {
                return false;
            };
            let n = match out.read(buf) {
                Ok(0) => {
                    if let Some(f) = c.out.take() {
                        let _ = io
                            .reactor
                            .registry()
                            .deregister(&mut SourceFd(&f.as_raw_fd()));
                    }
                    return false;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            };
            // Each whole line to the core as it ends (the child's line buffer lent out meanwhile).
            let mut line = std::mem::take(&mut c.line);
            let mut skipping = c.skipping;
            for &b in &buf[..n] {
                // `\r` ends a line too (wget's progress meter rewrites one line).
                if b == b'\n' || b == b'\r' {
                    if !std::mem::replace(&mut skipping, false) && !line.is_empty() {
                        core.output_line(now, &line);
                    }
                    line.clear();
                } else if line.len() >= MAX_LINE {
                    skipping = true;
                    line.clear();
                } else if !skipping {
                    line.push(b);
                }
            }
            if let Some(c) = core.io.child.as_mut() {
                c.line = line;
                c.skipping = skipping;
            }
        }
        true
    }
}

/// The status of a reaped child: its exit code, or None when a signal ended it.
fn exit_code(status: i32) -> Option<i32> {
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

fn run(a: Args, log: &LogHandle) -> io::Result<()> {
    // Made if missing; a dir that cannot be made shows as failed downloads.
    sys::mkdir(&a.dir);
    if a.daemonize {
        sys::daemonize(true)?;
    }
    let port = a.port.unwrap_or(if a.agent { 54320 } else { 54322 });
    let reactor = Reactor::new()?;
    let cfg = Config {
        download_timeout: Duration::from_secs(u64::from(a.timeout)),
        busy_check: a.busy.is_some(),
        agent: a.agent,
    };
    info!("ota: to 127.0.0.1:{port}, files in {}", a.dir);
    let io = Sys {
        reactor,
        conn: None,
        rd: false,
        hup: false,
        lost: false,
        daemon: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
        child: None,
        file: format!("{}/{FILE}", a.dir.trim_end_matches('/')),
        download: a.download,
        install: a.install,
        busy: a.busy,
    };
    let mut core = Ota::new(cfg, io, clock::now());
    let mut rx = vec![0; READ_CHUNK];
    let mut busy = false;
    let mut pipe_rd = false;
    loop {
        let turn = core.io.reactor.wait(core.poll_timeout(), busy)?;
        let now = turn.now;
        let mut reap = false;
        for s in &turn.signals {
            match s {
                Signal::Stop => core.stop(now),
                Signal::Reload => {
                    let _ = log.reopen();
                }
                Signal::Child => reap = true,
            }
        }
        core.handle_timeout(now);
        for r in &turn.ready {
            if r.token == PIPE {
                pipe_rd = true;
                continue;
            }
            if r.token != CONN || core.io.conn.is_none() {
                continue;
            }
            if !core.is_connected() {
                // A connect that failed reports an error; one that succeeded, writable.
                if r.closed || !r.writable {
                    if r.closed {
                        core.io.conn = None;
                        core.disconnected(now);
                    }
                    continue;
                }
                core.connected(now);
            }
            let Some(c) = core.io.conn.as_mut() else {
                continue;
            };
            if r.writable && c.flush().is_err() {
                core.io.conn = None;
                core.disconnected(now);
                continue;
            }
            core.io.rd |= r.readable;
            core.io.hup |= r.closed;
        }
        core.io.reactor.recycle(turn.ready);
        busy = false;
        // The output first, so the last progress line comes before the exit.
        if pipe_rd || reap {
            pipe_rd = Sys::drain_child(&mut core, now, &mut rx);
            busy |= pipe_rd;
        }
        if reap {
            for (pid, status) in sys::reap_children() {
                if core.io.child.as_ref().is_some_and(|c| c.pid == pid) {
                    if let Some(f) = core.io.child.take().and_then(|c| c.out) {
                        let _ = core
                            .io
                            .reactor
                            .registry()
                            .deregister(&mut SourceFd(&f.as_raw_fd()));
                    }
                    pipe_rd = false;
                    core.child_exited(now, exit_code(status));
                }
            }
        }
        if core.io.rd {
            if let Some(c) = core.io.conn.as_mut() {
                let step = c.read_once(core.io.hup, &mut rx);
                core.io.rd = step == ReadStep::More;
                busy |= core.io.rd;
                while let Some(v) = core.io.conn.as_mut().and_then(Conn::next_piece) {
                    match v {
                        Ok(piece) => core.message(now, piece),
                        Err(_) => {
                            ota::note(now, "bad framing from the daemon; reconnecting");
                            core.io.conn = None;
                            core.disconnected(now);
                        }
                    }
                }
                if step == ReadStep::Eof && core.io.conn.take().is_some() {
                    core.disconnected(now);
                }
            }
        }
        if std::mem::take(&mut core.io.lost) {
            core.disconnected(now);
        }
        if core.can_exit() {
            if let Some(c) = core.io.conn.as_mut() {
                let _ = c.flush();
            }
            info!("ota: stopping on signal");
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn options() {
        let a = parse(&argv(
            "--agent --port 5 --ota-dir /d --download-cmd dl --install-cmd in --busy-cmd b \
             --download-timeout 9 -l 3 -L /tmp/x -D",
        ))
        .unwrap();
        assert_eq!(
            a,
            Args {
                agent: true,
                port: Some(5),
                dir: "/d".into(),
                download: "dl".into(),
                install: "in".into(),
                busy: Some("b".into()),
                timeout: 9,
                loglevel: 3,
                logfile: Some("/tmp/x".into()),
                daemonize: true,
            }
        );
        let d = parse(&[]).unwrap();
        assert_eq!(
            (d.port, d.timeout, d.dir.as_str()),
            (None, 3600, "/tmp/miio_ota")
        );
        for bad in [
            "-h",
            "--port",
            "--port 0",
            "--port x",
            "--download-timeout 0",
            "-l 9",
            "--ota-dir",
            "-x 1",
        ] {
            assert_eq!(parse(&argv(bad)), None, "{bad}");
        }
        assert_eq!(parse(&["--ota-dir".into(), String::new()]), None);
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_code(0), Some(0));
        assert_eq!(exit_code(3 << 8), Some(3));
        assert_eq!(exit_code(libc::SIGKILL), None);
    }
}
