//! Reading the data dir at run time (LOCAL_API.md §17, §9.5 file mode): device.conf, device.token,
//! wifi.conf, device.country and os-release. Parsing is done by the pure `config` parsers and the
//! token step's decisions by the node (L§9.3); this file only does the file system and a fresh
//! random token.

use std::io;
use std::path::{Path, PathBuf};

use crate::config::{self, device::DeviceConf, ConfError, Secret16};
use crate::proto::node::TokenFiles;

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

/// What the token step of the file mode reads (L§9.3): whether `wifi.conf` exists, the text of
/// `device.token`, and a fresh random token. The node decides; [`write_token`] does what it asks.
pub fn token_files(datadir: &str) -> TokenFiles {
    let token_path = path(datadir, "device.token");
    TokenFiles {
        wifi_conf: path(datadir, "wifi.conf").exists(),
        token: read(&token_path).map_err(|e| io_err(&token_path, e)),
        fresh: fresh_token(),
    }
}

/// `Action::TokenFile`: stores `token` in `device.token` (0600), or removes the file (None).
pub fn write_token(datadir: &str, token: Option<&Secret16>) -> io::Result<()> {
    let token_path = path(datadir, "device.token");
    match token {
        Some(t) => {
            config::store::write_atomic(&token_path, config::token::render(t).as_bytes(), 0o600)
        }
        None => config::store::remove_durable(&token_path),
    }
}

/// `Action::StoreDidkey` (L§16 step 4): the `did=` and `key=` lines of `device.conf` replaced in
/// one atomic write ([`config::store::write_atomic`]: a crash leaves the old file or the new one),
/// every other line and the file's mode kept. The result is read back by the parser first, so a
/// file that would not load is never written. The error names the file, never the key.
pub fn store_didkey(datadir: &str, did: u32, key: &Secret16) -> Result<(), ConfError> {
    let p = path(datadir, "device.conf");
    let fail = |reason: String| ConfError {
        file: p.display().to_string(),
        line: 0,
        reason,
    };
    let text = match read(&p) {
        Ok(Some(t)) => t,
        Ok(None) => return Err(fail("missing; the new identity is not stored".into())),
        Err(e) => return Err(io_err(&p, e)),
    };
    let key_text = key
        .as_ascii()
        .ok_or_else(|| fail("the key is not printable".into()))?;
    let new = config::device::rewrite_didkey(&text, did, key_text);
    match config::device::parse(&new) {
        Ok(d) if d.did == did && d.key == *key => {}
        Ok(_) => {
            return Err(fail(
                "the rewritten file does not load the new identity".into(),
            ))
        }
        Err(e) => return Err(at(&p, e)),
    }
    let mode = config::store::existing_mode(&p, 0o600);
    config::store::write_atomic(&p, new.as_bytes(), mode)
        .map_err(|e| fail(format!("cannot write: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// L§16 step 4: only the did and key lines change, the mode stays; a file that is missing or
    /// that would not load is not written, and no error text holds the key.
    #[test]
    fn store_didkey_rewrites_two_lines_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("miio_didkey_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.to_str().unwrap();
        let key = Secret16::new(*b"Nk3w9Zq0aB7cD1eF");
        let e = store_didkey(d, 555, &key).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let conf = dir.join("device.conf");
        let old = "# board\r\ndid=1\r\nkey=BootstrapKey0001\r\nmac=AA:BB:CC:01:02:03\r\nmodel=a.b.c\r\nx=y\r\n";
        std::fs::write(&conf, old).unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o640)).unwrap();
        store_didkey(d, 555, &key).unwrap();
        let new = std::fs::read_to_string(&conf).unwrap();
        assert_eq!(
            new,
            old.replace("did=1", "did=555")
                .replace("key=BootstrapKey0001", "key=Nk3w9Zq0aB7cD1eF")
        );
        let mode = std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // A file without a model would not load: left as it is.
        std::fs::write(
            &conf,
            "did=1\nkey=BootstrapKey0001\nmac=AA:BB:CC:01:02:03\n",
        )
        .unwrap();
        let e = store_didkey(d, 555, &key).unwrap_err();
        assert!(!e.to_string().contains("Nk3w9Zq0aB7cD1eF"), "{e}");
        assert!(std::fs::read_to_string(&conf).unwrap().contains("did=1\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
