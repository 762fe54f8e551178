//! Reading the data dir at run time (LOCAL_API.md §17, §9.5 file mode): device.conf, device.token,
//! wifi.conf, device.country and os-release. Parsing is done by the pure `config` parsers; this file
//! only does the file system and the token step of the file mode (L§9.3).

use std::io;
use std::path::{Path, PathBuf};

use crate::config::{self, device::DeviceConf, wifi::WifiConf, ConfError, Secret16};

/// Data files are tiny; anything larger is refused rather than read into RAM.
const MAX_FILE: usize = 64 * 1024;

/// The identity and the provisioning state the daemon needs to leave `device_init`.
#[derive(Debug)]
pub struct Identity {
    pub device: DeviceConf,
    pub token: Secret16,
    /// `wifi.conf` exists (its presence means provisioned).
    pub provisioned: bool,
    pub wifi: Option<WifiConf>,
    pub country: Option<String>,
    pub fw_ver: Option<String>,
}

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

/// Loads everything in file mode. `fresh` is a token to store when a new one is needed (drawn from
/// the OS random source by the caller).
pub fn load(datadir: &str, os_release: &str, fresh: &Secret16) -> Result<Identity, ConfError> {
    let device = load_device(datadir)?;

    let wifi_path = path(datadir, "wifi.conf");
    let wifi_text = read(&wifi_path).map_err(|e| io_err(&wifi_path, e))?;
    let provisioned = wifi_text.is_some();
    let wifi = match wifi_text {
        Some(t) => match config::wifi::parse(&t) {
            Ok(w) => Some(w),
            Err(e) => {
                // Presence still means provisioned; the network is managed outside the daemon.
                log::warn!("{}", at(&wifi_path, e));
                None
            }
        },
        None => None,
    };

    // L§9.3 token step: no wifi.conf → a fresh token (reset); a valid file → keep it; else store one.
    let token_path = path(datadir, "device.token");
    if !provisioned {
        config::store::remove_durable(&token_path).map_err(|e| ConfError {
            file: token_path.display().to_string(),
            line: 0,
            reason: format!("cannot remove: {e}"),
        })?;
    }
    let existing = read(&token_path).map_err(|e| io_err(&token_path, e))?;
    let token = match existing.map(|t| config::token::parse(&t)) {
        Some(Ok(t)) => t,
        other => {
            if let Some(Err(e)) = other {
                log::warn!("{}; storing a new token", at(&token_path, e));
            }
            config::store::write_atomic(&token_path, fresh.as_bytes(), 0o600).map_err(|e| {
                ConfError {
                    file: token_path.display().to_string(),
                    line: 0,
                    reason: format!("cannot write: {e}"),
                }
            })?;
            log::info!("stored a new token in {}", token_path.display());
            fresh.clone()
        }
    };

    let cpath = path(datadir, "device.country");
    let country = match read(&cpath) {
        Ok(Some(t)) => match config::country::parse(&t) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("{}", at(&cpath, e));
                None
            }
        },
        _ => None,
    };

    let fw_ver = match read(Path::new(os_release)) {
        Ok(Some(t)) => config::osrelease::fw_version(&t, &device.vendor),
        _ => None,
    };

    Ok(Identity {
        device,
        token,
        provisioned,
        wifi,
        country,
        fw_ver,
    })
}
