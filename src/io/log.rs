//! Logging in the vendor format `[YYYYmmdd HH:MM:SS] [I] message` (LOCAL_API.md §18), local time.
//!
//! A `log::Log` of a few lines does the plumbing (env_logger did, at ~4 KB more flash); it has no
//! filter of its own: the level is held by `log::set_max_level`, so `-l N` and `miIO.config_loglevel`
//! change it at run time.
//! The sink is stdout or an append-mode file (`-L FILE`) that SIGHUP reopens, for logrotate.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use log::LevelFilter;

use super::sys;

/// Vendor levels 0..4: error, warning, info (default), debug, verbose.
pub fn level_filter(level: u8) -> LevelFilter {
    match level {
        0 => LevelFilter::Error,
        1 => LevelFilter::Warn,
        2 => LevelFilter::Info,
        3 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Changes the level at run time.
pub fn set_level(level: u8) {
    log::set_max_level(level_filter(level));
}

fn letter(l: log::Level) -> char {
    match l {
        log::Level::Error => 'E',
        log::Level::Warn => 'W',
        log::Level::Info => 'I',
        log::Level::Debug => 'D',
        log::Level::Trace => 'V',
    }
}

/// `[YYYYmmdd HH:MM:SS]` for the given wall-clock seconds, in local time.
pub fn stamp(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = sys::localtime(secs);
    format!("[{y:04}{mo:02}{d:02} {h:02}:{mi:02}:{s:02}]")
}

#[derive(Default)]
struct Sink {
    path: Option<String>,
    file: Option<File>,
}

/// Handle kept by the daemon to reopen the log file on SIGHUP.
#[derive(Clone)]
pub struct LogHandle {
    sink: Arc<Mutex<Sink>>,
}

struct SharedWriter(Arc<Mutex<Sink>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match s.file.as_mut() {
            Some(f) => f.write(buf),
            None => io::stdout().write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match s.file.as_mut() {
            Some(f) => f.flush(),
            None => io::stdout().flush(),
        }
    }
}

fn open_append(path: &str) -> io::Result<File> {
    // What `OpenOptions::new().create(true).append(true)` opens, mode 0666 less the umask.
    super::sys::open(
        path.as_ref(),
        libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
        0o666,
    )
}

/// Installs the global logger. `path` None logs to stdout. Safe to call once per process; a
/// second call (tests) keeps the first logger and just sets the level.
pub fn init(level: u8, path: Option<&str>) -> io::Result<LogHandle> {
    let file = match path {
        Some(p) => Some(open_append(p)?),
        None => None,
    };
    let sink = Arc::new(Mutex::new(Sink {
        path: path.map(str::to_owned),
        file,
    }));
    let _ = log::set_boxed_logger(Box::new(Logger(sink.clone())));
    set_level(level);
    Ok(LogHandle { sink })
}

/// One line per record, written whole (one `write_all`, then a flush) to the sink.
struct Logger(Arc<Mutex<Sink>>);

impl log::Log for Logger {
    /// The `log` macros have checked `log::max_level()` already: no filter here.
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        use std::fmt::Write as _;
        let mut line = String::new();
        // A Display that fails leaves the line cut short, never a panic in the logger.
        let _ = writeln!(
            line,
            "{} [{}] {}",
            stamp(sys::wall_secs()),
            letter(record.level()),
            record.args()
        );
        let mut w = SharedWriter(self.0.clone());
        let _ = w.write_all(line.as_bytes());
        let _ = w.flush();
    }

    fn flush(&self) {}
}

impl LogHandle {
    /// Reopens the log file (after logrotate moved it). A failure keeps the old descriptor.
    pub fn reopen(&self) -> io::Result<()> {
        let mut s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = s.path.clone() {
            let f = open_append(&p)?;
            s.file = Some(f);
        }
        Ok(())
    }

    pub fn has_file(&self) -> bool {
        self.sink.lock().map(|s| s.file.is_some()).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_shape() {
        let s = stamp(1_700_000_000);
        assert_eq!(s.len(), "[20231114 22:13:20]".len());
        assert!(s.starts_with("[2023111"));
        assert_eq!(&s[9..10], " ");
    }

    #[test]
    fn levels_map_to_vendor_letters() {
        assert_eq!(level_filter(0), LevelFilter::Error);
        assert_eq!(level_filter(2), LevelFilter::Info);
        assert_eq!(level_filter(9), LevelFilter::Trace);
        assert_eq!(letter(log::Level::Trace), 'V');
        assert_eq!(letter(log::Level::Warn), 'W');
    }
}
