//! The only `unsafe` in the crate: thin wrappers over the libc calls std does not offer
//! (CLOCK_BOOTTIME, timerfd, signal handlers, fork/setsid, localtime_r, getrandom, waitpid,
//! socket options, interface netmasks), and `open(2)`.
//! Each returns owned, safe values; every block states why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A timespec from seconds and nanoseconds. With 64-bit time_t on 32-bit musl the struct has a
/// padding field, so it is built from zeroes rather than a literal; `as _` avoids naming time_t.
fn timespec(sec: i64, nsec: i64) -> libc::timespec {
    // SAFETY: an all-zero timespec is a valid value of the plain C struct.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    ts.tv_sec = sec as _;
    ts.tv_nsec = nsec as _;
    ts
}

/// Milliseconds on CLOCK_BOOTTIME: counts time spent suspended (PROTOCOL.md §4.3, D10).
pub fn boottime_ms() -> u64 {
    let mut ts = timespec(0, 0);
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux since 2.6.39.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if ret != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec as u64 / 1_000_000)
}

/// Wall-clock seconds since the epoch (for log time stamps only; never for deadlines).
pub fn wall_secs() -> i64 {
    let mut ts = timespec(0, 0);
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    // time_t is 64 bits on every build we ship: the 32-bit musl boards are built with
    // `--cfg libc_unstable_musl_v1_2` (Makefile, static), which links musl's time64 symbols, so
    // nothing here wraps in 2038. The type is never named: libc marks musl's `time_t` deprecated.
    #[allow(clippy::unnecessary_cast)]
    let s = ts.tv_sec as i64;
    s
}

/// Broken-down local time: (year, month 1-12, day, hour, minute, second).
pub fn localtime(secs: i64) -> (i32, u32, u32, u32, u32, u32) {
    // A timespec only to get a `time_t` without naming the type (see wall_secs); on a build whose
    // time_t were 32 bits this cast would wrap, which `localtime_after_2038` catches.
    let t = timespec(secs, 0);
    // SAFETY: an all-zero `tm` is a valid value of the plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is the thread-safe variant.
    let ok = unsafe { !libc::localtime_r(&t.tv_sec, &mut tm).is_null() };
    if !ok {
        return (1970, 1, 1, 0, 0, 0);
    }
    (
        tm.tm_year + 1900,
        (tm.tm_mon + 1) as u32,
        tm.tm_mday as u32,
        tm.tm_hour as u32,
        tm.tm_min as u32,
        tm.tm_sec as u32,
    )
}

/// A non-blocking timerfd on CLOCK_BOOTTIME (ARCHITECTURE.md §4.5).
pub fn timerfd_boottime() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd = check(unsafe {
        libc::timerfd_create(libc::CLOCK_BOOTTIME, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC)
    })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arms the timerfd absolutely at `at_ms` on CLOCK_BOOTTIME, or disarms it with `None`.
pub fn timerfd_arm(fd: RawFd, at_ms: Option<u64>) -> io::Result<()> {
    let value = match at_ms {
        // A zero it_value disarms, so an absolute deadline of 0 becomes 1 ns: already due.
        Some(0) => timespec(0, 1),
        Some(ms) => timespec((ms / 1000) as i64, ((ms % 1000) * 1_000_000) as i64),
        None => timespec(0, 0),
    };
    let spec = libc::itimerspec {
        it_interval: timespec(0, 0),
        it_value: value,
    };
    // SAFETY: `spec` is a valid itimerspec, the old-value pointer may be null.
    check(unsafe {
        libc::timerfd_settime(fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut())
    })?;
    Ok(())
}

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Write end of the self-pipe, read by the signal handler.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `b` lives for the call. A full pipe just drops
        // the byte, which is fine: a pending byte already wakes the reactor.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// Routes `signals` to the self-pipe whose write end is `write_fd`, and ignores SIGPIPE.
/// The handler only writes one byte (ARCHITECTURE.md §4.6).
pub fn install_signal_pipe(write_fd: RawFd, signals: &[libc::c_int]) -> io::Result<()> {
    SIGNAL_PIPE.store(write_fd, Ordering::Relaxed);
    for &sig in signals {
        // SAFETY: an all-zero sigaction is valid; we then set a plain handler with SA_RESTART.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa.sa_mask` is a valid sigset to initialise; `sa` is valid for sigaction.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installing a handler for a catchable signal with a valid struct.
        check(unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) })?;
    }
    // SAFETY: SIG_IGN for SIGPIPE is always valid; writes to closed sockets then return EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Ok(())
}

/// Reaps every exited child without blocking; returns (pid, raw status) pairs.
pub fn reap_children() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: `status` is writable; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid, status));
    }
}

/// Starts the program at the path `argv[0]` with the arguments `argv[1..]`, each one argv element
/// as given (no shell sees them), in a new process group of its own (so [`kill_group`] reaches
/// everything it starts), with `env` (`NAME=` and value, each pair one entry) ahead of this
/// process's environment (the first entry of a name wins) and, when given, `stdout` as its
/// standard output. SIGPIPE is back to its default in the child. Returns the child's pid; a
/// program that cannot be run exits 127. Everything the child needs is made before `fork`, in one
/// buffer of NUL-terminated strings and one array of pointers into it (argv, a null, the
/// environment, a null). `execve`, not `execvp`: the commands are paths, and the `PATH` search
/// cost flash for nothing. A string with a NUL byte is `InvalidInput`.
#[cfg(feature = "ota")]
pub fn spawn(argv: &[&str], env: &[[&str; 2]], stdout: Option<RawFd>) -> io::Result<i32> {
    extern "C" {
        static environ: *const *const libc::c_char;
    }
    let bad = || io::Error::from(io::ErrorKind::InvalidInput);
    if argv.is_empty() {
        return Err(bad());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut starts = Vec::new();
    for parts in argv.iter().map(|a| [*a, ""]).chain(env.iter().copied()) {
        starts.push(buf.len());
        for p in parts {
            if p.as_bytes().contains(&0) {
                return Err(bad());
            }
            buf.extend_from_slice(p.as_bytes());
        }
        buf.push(0);
    }
    // `buf` is complete: the pointers into it stay valid.
    let mut ptrs: Vec<*const libc::c_char> =
        starts.iter().map(|&i| buf[i..].as_ptr().cast()).collect();
    ptrs.insert(argv.len(), std::ptr::null());
    // SAFETY: `environ` is libc's null-terminated array; nothing changes it while we read it
    // (miio_ota is single-threaded and never sets a variable).
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            ptrs.push(*p);
            p = p.add(1);
        }
    }
    ptrs.push(std::ptr::null());
    // SAFETY: miio_ota is single-threaded, and the child only makes async-signal-safe calls
    // (setpgid, dup2, fcntl, signal, execve, _exit) on memory prepared above.
    let pid = check(unsafe { libc::fork() })?;
    if pid == 0 {
        // SAFETY: see above; every pointer is into `buf` or `environ`, alive in the child's copy.
        unsafe {
            libc::setpgid(0, 0);
            if let Some(fd) = stdout {
                libc::dup2(fd, 1);
                // The pipe was made non-blocking for the reactor; the child writes blocking.
                libc::fcntl(1, libc::F_SETFL, 0);
            }
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::execve(ptrs[0], ptrs.as_ptr(), ptrs.as_ptr().add(argv.len() + 1));
            libc::_exit(127);
        }
    }
    // SAFETY: plain syscall; the child may already have done it (then this fails harmlessly).
    unsafe { libc::setpgid(pid, pid) };
    Ok(pid)
}

/// `mkdir(2)` with mode 0755, its result ignored (an existing directory is fine; one that cannot be
/// made shows later as a file that cannot be written). std's `create_dir` costs about 150 bytes
/// more for a `DirBuilder` miio_ota does not need. A path with a NUL byte is skipped.
#[cfg(feature = "ota")]
pub fn mkdir(path: &str) {
    // As bytes: the one `CString::new` for byte slices, shared with [`open`].
    if let Ok(c) = std::ffi::CString::new(path.as_bytes()) {
        // SAFETY: `c` is a NUL-terminated path alive for the call; mkdir reads nothing else.
        unsafe { libc::mkdir(c.as_ptr(), 0o755) };
    }
}

/// SIGKILL to the whole process group `pgid` (a child started by [`spawn`] leads its own).
#[cfg(feature = "ota")]
pub fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: plain syscall; a group already gone gives ESRCH, which is fine.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

/// Detaches from the terminal (LOCAL_API.md §18 `-D`): fork, parent exits 0, setsid, chdir /,
/// and, when `redirect_stdio`, stdin/stdout/stderr to /dev/null.
/// `open(2)` with `flags` (and `O_CLOEXEC`), `mode` for a file it creates; retried on EINTR. What
/// `File::open` and `OpenOptions::open` do, without std's check of the options, whose error
/// texts link `{:?}` of a string and its Unicode tables (ARCHITECTURE.md §6). A path with a NUL
/// byte is `InvalidInput`.
pub fn open(path: &std::path::Path, flags: libc::c_int, mode: u32) -> io::Result<std::fs::File> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: `c` is a NUL-terminated path alive for the call; open reads nothing else.
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
        if fd >= 0 {
            // SAFETY: a descriptor open(2) just returned, owned by nothing else.
            return Ok(unsafe { std::fs::File::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn daemonize(redirect_stdio: bool) -> io::Result<()> {
    // SAFETY: we are single-threaded at this point (called before any thread starts).
    let pid = check(unsafe { libc::fork() })?;
    if pid > 0 {
        // SAFETY: _exit skips atexit handlers and buffers that belong to the child now.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: plain syscall in the child.
    check(unsafe { libc::setsid() })?;
    std::env::set_current_dir("/")?;
    if redirect_stdio {
        let null = open("/dev/null".as_ref(), libc::O_RDWR, 0)?;
        use std::os::fd::AsRawFd;
        for target in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which this process owns.
            check(unsafe { libc::dup2(null.as_raw_fd(), target) })?;
        }
    }
    Ok(())
}

/// A seed for the node's PRNGs (cloud ids, backoff jitter): the kernel's random bytes mixed with
/// the clock, which is what is left should getrandom fail.
pub fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = random_bytes(&mut b);
    u64::from_le_bytes(b) ^ boottime_ms()
}

/// Fills `buf` from the kernel's random source (for tokens and id seeds, PROTOCOL.md §2.5).
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for writes of its length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Process id, for unique temp names and the log.
pub fn pid() -> u32 {
    std::process::id()
}

/// The netmask of the interface that holds `ip` (for INFO's `netif`, PROTOCOL.md §5.4): the
/// interfaces' IPv4 addresses from SIOCGIFCONF (the first `MAX_IFS`; aliases with a label count,
/// unlabelled secondary addresses are not listed), then SIOCGIFNETMASK on the one that holds `ip`.
/// Not getifaddrs: musl's walks rtnetlink dumps, which cost flash, and under qemu-user a big-endian
/// guest on a little-endian host gets them half converted and musl's walk never ends (the s390x test
/// build hung there, ARCHITECTURE.md §6).
pub fn netmask_of(ip: std::net::Ipv4Addr) -> Option<std::net::Ipv4Addr> {
    use std::os::fd::AsRawFd;
    const MAX_IFS: usize = 32;
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
            .ok()?;
    // SAFETY: `fd` is fresh and owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero ifreq is a valid value of the plain C struct (name "", address zeroes).
    let mut reqs: [libc::ifreq; MAX_IFS] = unsafe { std::mem::zeroed() };
    let mut conf = libc::ifconf {
        ifc_len: std::mem::size_of_val(&reqs) as libc::c_int,
        ifc_ifcu: libc::__c_anonymous_ifc_ifcu {
            ifcu_req: reqs.as_mut_ptr(),
        },
    };
    // SAFETY: `conf` points to `reqs` and gives its exact size; the kernel writes at most that.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFCONF as _, &mut conf) } != 0 {
        return None;
    }
    let n = (conf.ifc_len.max(0) as usize / std::mem::size_of::<libc::ifreq>()).min(MAX_IFS);
    // The union member as a sockaddr_in: SIOCGIFCONF and SIOCGIFNETMASK fill it with one for AF_INET.
    let sin = |r: &libc::ifreq| {
        // SAFETY: the union's sockaddr member is 16 plain bytes at offset 16 of a pointer-aligned
        // struct: the size of a sockaddr_in and aligned for it. Callers check the family.
        unsafe { *(&r.ifr_ifru.ifru_addr as *const libc::sockaddr).cast::<libc::sockaddr_in>() }
    };
    let req = reqs[..n].iter_mut().find(|r| {
        let a = sin(r);
        i32::from(a.sin_family) == libc::AF_INET && u32::from_be(a.sin_addr.s_addr) == u32::from(ip)
    })?;
    // SAFETY: `req` is a valid ifreq naming an interface; the kernel writes the netmask into it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFNETMASK as _, &mut *req) } != 0 {
        return None;
    }
    let m = sin(req);
    (i32::from(m.sin_family) == libc::AF_INET)
        .then(|| std::net::Ipv4Addr::from(u32::from_be(m.sin_addr.s_addr)))
}

/// A UDP socket bound to `0.0.0.0:port` with SO_REUSEADDR, and SO_REUSEPORT where the kernel has it,
/// so the mDNS responder can share 5353 with another responder on the board (PROTOCOL.md §4.8).
pub fn udp_bind_reuse(port: u16) -> io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall; on success we own the returned descriptor.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is fresh and owned by nobody else; dropping `sock` closes it on every error path.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for (opt, required) in [(libc::SO_REUSEADDR, true), (libc::SO_REUSEPORT, false)] {
        let ret = setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, opt, &one);
        // SO_REUSEPORT is missing before Linux 3.9 (ENOPROTOOPT); SO_REUSEADDR alone shares the port.
        if required {
            ret?;
        }
    }
    // SAFETY: an all-zero sockaddr_in is a valid value of the plain C struct.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = port.to_be();
    addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::UNSPECIFIED).to_be();
    // SAFETY: `addr` is a valid sockaddr_in and its exact size is passed.
    check(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(std::net::UdpSocket::from(sock))
}

/// Attaches a classic BPF socket filter (SO_ATTACH_FILTER): the kernel runs it on every datagram
/// before queueing it, so one it drops never wakes the reader.
pub fn attach_filter(fd: RawFd, prog: &[crate::wire::dns::BpfInsn]) -> io::Result<()> {
    let insns: Vec<libc::sock_filter> = prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let len =
        u16::try_from(insns.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fprog = libc::sock_fprog {
        len,
        filter: insns.as_ptr().cast_mut(),
    };
    // The kernel copies the program during the call, so `insns` only has to outlive it.
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: `val` points to a live, plain C value of exactly the size passed; the kernel only
    // reads it, and a bad `fd` or option is an error return, not undefined behaviour.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// SO_SNDBUF: caps the kernel's send queue of a socket (the kernel doubles `bytes` for its own
/// overhead and stops autotuning it).
pub fn set_sndbuf(fd: RawFd, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &bytes)
}

/// SO_LINGER {on, 0}: the next close sends a reset and frees the send queue at once, instead of
/// leaving an orphan that holds it while the peer does not read.
pub fn set_linger_reset(fd: RawFd) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &l)
}

/// Runs `f` on a new detached POSIX thread with a `stack`-byte stack, named `name` (at most 15
/// bytes). A bare thread, not a `std::thread`: nothing joins it or needs its handle, and std's spawn
/// machinery costs flash on every board (io/resolver.rs).
pub fn spawn_detached(
    stack: usize,
    name: &'static core::ffi::CStr,
    f: Box<dyn FnOnce() + Send>,
) -> io::Result<()> {
    type Job = Box<dyn FnOnce() + Send>;
    extern "C" fn start(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the `Box<Job>` leaked below, handed to exactly this one thread.
        let job = unsafe { Box::from_raw(arg.cast::<(Job, &'static core::ffi::CStr)>()) };
        let (f, name) = *job;
        // SAFETY: a NUL-terminated name, for the calling thread only (the kernel cuts it at 15 bytes).
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
        f();
        std::ptr::null_mut()
    }
    let arg = Box::into_raw(Box::new((f, name)));
    // SAFETY: plain pthread calls on a local attribute object, destroyed before return; on
    // success the new thread owns `arg`, on failure it is taken back here.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        let mut rc = libc::pthread_attr_init(&mut attr);
        if rc == 0 {
            rc = libc::pthread_attr_setstacksize(&mut attr, stack);
            if rc == 0 {
                rc = libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
            }
            if rc == 0 {
                let mut tid: libc::pthread_t = std::mem::zeroed();
                rc = libc::pthread_create(&mut tid, &attr, start, arg.cast());
            }
            libc::pthread_attr_destroy(&mut attr);
        }
        if rc != 0 {
            drop(Box::from_raw(arg));
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// The IPv4 addresses of `host` from `getaddrinfo` (names, `/etc/hosts`, IP literals; blocking),
/// in its order. `Ok` may be empty (a name with IPv6 addresses only). The error is the text std's
/// `ToSocketAddrs` gives for the same failure. Called directly rather than through std, whose lookup
/// path cost flash for conversions the resolver never uses (io/resolver.rs).
pub fn lookup_ipv4(host: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    let c_host =
        std::ffi::CString::new(host).map_err(|_| "host name contains a NUL byte".to_string())?;
    // SAFETY: a zeroed addrinfo is a valid hints value (all fields empty); the list getaddrinfo
    // returns is read only while it is alive and freed exactly once.
    unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_family = libc::AF_UNSPEC;
        hints.ai_socktype = libc::SOCK_STREAM;
        let mut res: *mut libc::addrinfo = std::ptr::null_mut();
        let rc = libc::getaddrinfo(c_host.as_ptr(), std::ptr::null(), &hints, &mut res);
        if rc != 0 {
            if rc == libc::EAI_SYSTEM {
                return Err(io::Error::last_os_error().to_string());
            }
            let detail = std::ffi::CStr::from_ptr(libc::gai_strerror(rc)).to_string_lossy();
            return Err(format!("failed to lookup address information: {detail}"));
        }
        let mut v = Vec::new();
        let mut p = res;
        while !p.is_null() {
            let ai = &*p;
            if ai.ai_family == libc::AF_INET && !ai.ai_addr.is_null() {
                let sin = &*ai.ai_addr.cast::<libc::sockaddr_in>();
                v.push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            p = ai.ai_next;
        }
        libc::freeaddrinfo(res);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lookup gives std's answers and std's error text, for what the resolver logs.
    #[test]
    fn lookup_ipv4_matches_std() {
        use std::net::{SocketAddr, ToSocketAddrs};
        let std_v4 = |h: &str| -> Result<Vec<std::net::Ipv4Addr>, String> {
            (h, 0)
                .to_socket_addrs()
                .map(|it| {
                    it.filter_map(|a| match a {
                        SocketAddr::V4(a) => Some(*a.ip()),
                        SocketAddr::V6(_) => None,
                    })
                    .collect()
                })
                .map_err(|e| e.to_string())
        };
        for h in ["127.0.0.1", "localhost", "::1", ""] {
            let ours = lookup_ipv4(h);
            let theirs = std_v4(h);
            match (&ours, &theirs) {
                // The order of a name's addresses is the resolver's; compare them as sets.
                (Ok(a), Ok(b)) => {
                    let (mut a, mut b) = (a.clone(), b.clone());
                    a.sort();
                    a.dedup();
                    b.sort();
                    b.dedup();
                    assert_eq!(a, b, "{h:?}");
                }
                _ => assert_eq!(ours, theirs, "{h:?}"),
            }
        }
        assert!(lookup_ipv4("").is_err());
        assert_eq!(
            lookup_ipv4("127.0.0.1"),
            Ok(vec![std::net::Ipv4Addr::LOCALHOST])
        );
    }

    /// 2039-01-01 12:00:00 UTC and 2100-03-01 00:00:00 UTC: past the 32-bit time_t limit of
    /// 2038-01-19. Runs on the 32-bit boards in `make static-test TARGET=armv7`; the date is at
    /// noon so a zone offset cannot move it to another year.
    #[test]
    fn localtime_after_2038() {
        let (y, mo, _d, _h, _mi, _s) = localtime(2_177_496_000);
        assert_eq!((y, mo), (2039, 1));
        let (y, ..) = localtime(4_107_542_400 + 43_200);
        assert_eq!(y, 2100);
        assert!(wall_secs() > 1_700_000_000, "wall clock before 2023");
    }

    #[test]
    fn boottime_advances_and_is_nonzero() {
        let a = boottime_ms();
        assert!(a > 0);
        assert!(boottime_ms() >= a);
    }

    #[test]
    fn loopback_has_a_netmask() {
        assert_eq!(
            netmask_of(std::net::Ipv4Addr::LOCALHOST),
            Some(std::net::Ipv4Addr::new(255, 0, 0, 0))
        );
    }

    #[test]
    fn udp_bind_reuse_shares_a_port() {
        let a = udp_bind_reuse(0).unwrap();
        let port = a.local_addr().unwrap().port();
        let b = udp_bind_reuse(port).unwrap();
        assert_eq!(b.local_addr().unwrap().port(), port);
        // A socket without the option cannot take the port.
        assert!(std::net::UdpSocket::bind(("0.0.0.0", port)).is_err());
    }

    #[test]
    fn random_bytes_fill() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        random_bytes(&mut a).unwrap();
        random_bytes(&mut b).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn timerfd_past_deadline_is_readable() {
        use std::io::Read;
        let fd = timerfd_boottime().unwrap();
        use std::os::fd::AsRawFd;
        timerfd_arm(fd.as_raw_fd(), Some(1)).unwrap();
        let mut f = std::fs::File::from(fd);
        let mut buf = [0u8; 8];
        // Non-blocking: a deadline already past has expired by the time settime returns.
        let deadline = boottime_ms() + 5000;
        loop {
            match f.read(&mut buf) {
                Ok(8) => break,
                Ok(_) => panic!("short timerfd read"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && boottime_ms() < deadline => {
                    std::hint::spin_loop()
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(u64::from_ne_bytes(buf) >= 1);
    }
}
