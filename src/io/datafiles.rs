//! Reading the data dir at run time (LOCAL_API.md §17, §9.5 file mode): device.conf, device.token,
//! wifi.conf, device.country and os-release. Parsing is done by the pure `config` parsers; this file
//! only does the file system, the token step of the file mode (L§9.3) and a fresh random token.

use std::io;
use std::path::{Path, PathBuf};

use crate::config::{self, device::DeviceConf, ConfError, Secret16};

/// Data files are tiny; anything larger is refused rather than read into RAM.
const MAX_FILE: usize = 64 * 1024;

fn path(datadir: &str, name: &str) -> PathBuf {
    Path::new(datadir).join(name)
}

fn read(p: &Path) -> io::Result<Option<String>> {
    match config::store::read_limited(p, MAX_FILE) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn io_err(p: &Path, e: io::Error) -> ConfError {
    ConfError {
        file: p.display().to_string(),
        line: 0,
        reason: format!("cannot read: {e}"),
    }
}

/// Names the full path in a parser's error, so the log line says which file to fix.
fn at(p: &Path, mut e: ConfError) -> ConfError {
    e.file = p.display().to_string();
    e
}

/// Reads `device.conf` alone (used to report the first problem clearly).
pub fn load_device(datadir: &str) -> Result<DeviceConf, ConfError> {
    let p = path(datadir, "device.conf");
    match read(&p) {
        Ok(Some(text)) => config::device::parse(&text).map_err(|e| at(&p, e)),
        Ok(None) => Err(ConfError {
            file: p.display().to_string(),
            line: 0,
            reason: "missing (the device identity: did, key, mac, model)".into(),
        }),
        Err(e) => Err(io_err(&p, e)),
    }
}

/// `device.country`, if present and valid (a bad one is logged and ignored).
pub fn load_country(datadir: &str) -> Option<String> {
    let cpath = path(datadir, "device.country");
    match read(&cpath) {
        Ok(Some(t)) => match config::country::parse(&t) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("{}", at(&cpath, e));
                None
            }
        },
        _ => None,
    }
}

/// The Wi-Fi status in file mode: `wifi.conf` exists (provisioned), and its ssid and uid if readable.
pub fn wifi_status(datadir: &str) -> (bool, String, Option<u64>) {
    let wifi_path = path(datadir, "wifi.conf");
    match read(&wifi_path) {
        Ok(Some(t)) => match config::wifi::parse(&t) {
            Ok(w) => (true, w.ssid, w.uid),
            Err(e) => {
                // Presence still means provisioned; the network is managed outside the daemon.
                log::warn!("{}", at(&wifi_path, e));
                (true, String::new(), None)
            }
        },
        Ok(None) => (false, String::new(), None),
        Err(e) => {
            log::warn!("{}", io_err(&wifi_path, e));
            (true, String::new(), None)
        }
    }
}

/// The raw content of a data file (None when absent or unreadable), e.g. to restore wifi.conf.
pub fn read_raw(datadir: &str, name: &str) -> Option<String> {
    read(&path(datadir, name)).ok().flatten()
}

/// The token step of the file mode (L§9.3): no `wifi.conf` → delete `device.token` (a reset makes a
/// fresh token); a valid token file → that token; otherwise `fresh` is stored (0600) and used.
/// A data dir that is read-only or full cannot keep the device out of AP mode (L§8): when the old
/// token cannot be deleted or the fresh one cannot be stored, the fresh one is used from memory
/// (logged with the errno).
pub fn token_step(datadir: &str, fresh: &Secret16) -> Result<Secret16, ConfError> {
    let token_path = path(datadir, "device.token");
    let in_memory = |what: &str, e: io::Error| {
        log::error!(
            "{}: cannot {what}: {e}; using a new token in memory",
            token_path.display()
        );
        Ok(fresh.clone())
    };
    if !path(datadir, "wifi.conf").exists() {
        if let Err(e) = config::store::remove_durable(&token_path) {
            return in_memory("remove", e);
        }
    }
    let existing = read(&token_path).map_err(|e| io_err(&token_path, e))?;
    match existing.map(|t| config::token::parse(&t)) {
        Some(Ok(t)) => Ok(t),
        other => {
            if let Some(Err(e)) = other {
                log::warn!("{}; storing a new token", at(&token_path, e));
            }
            let text = config::token::render(fresh);
            if let Err(e) = config::store::write_atomic(&token_path, text.as_bytes(), 0o600) {
                return in_memory("write", e);
            }
            log::info!("stored a new token in {}", token_path.display());
            Ok(fresh.clone())
        }
    }
}

/// The text of os-release, if readable.
pub fn os_release(p: &str) -> Option<String> {
    read(Path::new(p)).ok().flatten()
}

/// A new random LAN token (the token step when the data dir holds none, and the node's first).
pub fn fresh_token() -> Secret16 {
    let mut raw = [0u8; 96];
    // A failing getrandom is near impossible; the token still must not be predictable, so fall
    // back to mixing in the clock only to keep the daemon alive, and say so.
    if let Err(e) = super::sys::random_bytes(&mut raw) {
        log::warn!("getrandom failed ({e}); token entropy is weak");
        let t = super::sys::boottime_ms().to_le_bytes();
        for (i, b) in raw.iter_mut().enumerate() {
            *b ^= t[i % 8].wrapping_mul(i as u8 | 1);
        }
    }
    crate::config::token::generate(&raw).unwrap_or_else(|| Secret16::new(*b"0123456789abcdef"))
}
