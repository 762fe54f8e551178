//! Durable writes of the data files (LOCAL_API.md §17, D15): the only file-system code of `config`.
//!
//! Contract: [`write_atomic`] replaces a file so that a crash or a failure leaves either the old
//! content or the new one, never a mix: temp file in the same directory, write, fsync, chmod, rename
//! over the target, fsync the directory. On failure the temp file is removed and the old file is
//! untouched. [`remove_durable`] deletes a file durably. [`read_limited`] reads a small text file and
//! refuses anything larger than the cap, so a wrong path cannot make the daemon swallow a huge file.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

// std's `File::open` and `OpenOptions::open` would link `{:?}` of a string (ARCHITECTURE.md §6).
use crate::io::sys::open;

/// The cap for every data file: they hold a few lines each.
pub const MAX_DATA_FILE: usize = 64 * 1024;

/// Makes temp names unique between threads of one process; the pid separates processes.
static SEQ: AtomicU32 = AtomicU32::new(0);

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| why(io::ErrorKind::InvalidInput, "path has no file name".into()))?;
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    Ok(parent_dir(path).join(t))
}

/// fsync a directory so a rename or unlink in it survives a power cut. Some file systems refuse
/// fsync on a directory with EINVAL; there is nothing more we can do on those.
fn sync_dir(dir: &Path) -> io::Result<()> {
    match open(dir, libc::O_RDONLY, 0)?.sync_all() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r,
    }
}

/// Replace `path` with `data`, file mode `mode` (0600 for `device.token` and `wifi.conf`).
/// An error after the rename (the directory fsync) means the new content is in place but may not
/// survive a power cut; every earlier error leaves the old file as it was and no temp file behind.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path)?;
    // Created with the final mode, so a secret is never readable by others, even for a moment.
    let mut f = open(&tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, mode)?;
    let written = fill(&mut f, data, mode).and_then(|()| {
        drop(f);
        fs::rename(&tmp, path)
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent_dir(path))
}

fn fill(f: &mut File, data: &[u8], mode: u32) -> io::Result<()> {
    f.write_all(data)?;
    // The umask may have cleared bits at creation; set exactly what was asked.
    f.set_permissions(Permissions::from_mode(mode))?;
    f.sync_all()
}

/// The permission bits of an existing file, or `default`. `device.conf` keeps its mode when the
/// daemon rewrites its did/key lines (LOCAL_API.md §17 "unchanged").
pub fn existing_mode(path: &Path, default: u32) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(default)
}

/// Delete `path` and fsync its directory. A file that is already gone is fine.
pub fn remove_durable(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent_dir(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The reason of an `io::Error` of our own, as text. `io::Error::new` with a `String` would do the
/// same but links `{:?}` of a string for its `Debug` (ARCHITECTURE.md §6); this one's `Debug` is
/// [`super::Quoted`].
struct Why(String);

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&super::Quoted(&self.0), f)
    }
}

impl std::error::Error for Why {}

fn why(kind: io::ErrorKind, text: String) -> io::Error {
    io::Error::new(kind, Why(text))
}

/// Read a UTF-8 text file of at most `max` bytes ([`MAX_DATA_FILE`] for the data files).
pub fn read_limited(path: &Path, max: usize) -> io::Result<String> {
    let too_big = |n: u64| {
        why(
            io::ErrorKind::InvalidData,
            format!("file too large: {n} bytes, the limit is {max}"),
        )
    };
    let f = open(path, libc::O_RDONLY, 0)?;
    let len = f.metadata()?.len();
    let max64 = u64::try_from(max).unwrap_or(u64::MAX);
    if len > max64 {
        return Err(too_big(len));
    }
    // The size may change under us (or be 0 for special files): read at most one byte past the cap.
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(max64.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() > max {
        return Err(too_big(u64::try_from(buf.len()).unwrap_or(u64::MAX)));
    }
    String::from_utf8(buf)
        .map_err(|_| why(io::ErrorKind::InvalidData, "file is not UTF-8 text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("miio_store_{}_{name}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_new_then_replace() {
        let d = TempDir::new("replace");
        let p = d.0.join("device.token");
        write_atomic(&p, b"abcDEF0123456789", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abcDEF0123456789");
        assert_eq!(mode(&p), 0o600);

        write_atomic(&p, b"ZZZZ", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"ZZZZ");
        assert_eq!(mode(&p), 0o644);
        assert_eq!(d.names(), ["device.token"], "no temp file left behind");

        write_atomic(&p, b"", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(existing_mode(&p, 0o644), 0o600);
        assert_eq!(existing_mode(&d.0.join("absent"), 0o644), 0o644);
    }

    #[test]
    fn failed_rename_leaves_target_and_no_temp() {
        // rename(file, non-empty dir) fails even for root.
        let d = TempDir::new("fail_rename");
        let target = d.0.join("wifi.conf");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"old").unwrap();
        fs::write(d.0.join("other"), b"x").unwrap();
        assert!(write_atomic(&target, b"new", 0o600).is_err());
        assert!(target.is_dir());
        assert_eq!(fs::read(target.join("keep")).unwrap(), b"old");
        assert_eq!(d.names(), ["other", "wifi.conf"]);
    }

    #[test]
    fn failed_create_leaves_old_file() {
        // The parent "directory" is a regular file: creating the temp fails (ENOTDIR), even for root.
        let d = TempDir::new("fail_create");
        let file = d.0.join("device.conf");
        fs::write(&file, b"did=1\n").unwrap();
        assert!(write_atomic(&file.join("x"), b"new", 0o600).is_err());
        assert_eq!(fs::read(&file).unwrap(), b"did=1\n");
        assert_eq!(d.names(), ["device.conf"]);
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
    }

    #[test]
    fn remove_is_idempotent() {
        let d = TempDir::new("remove");
        let p = d.0.join("wifi.conf");
        fs::write(&p, b"ssid=\"x\"\n").unwrap();
        remove_durable(&p).unwrap();
        assert!(!p.exists());
        remove_durable(&p).unwrap();
        let sub = d.0.join("dir");
        fs::create_dir(&sub).unwrap();
        assert!(remove_durable(&sub).is_err(), "a directory is not removed");
    }

    #[test]
    fn read_limited_caps_size_and_wants_utf8() {
        let d = TempDir::new("read");
        let p = d.0.join("f");
        fs::write(&p, b"12345").unwrap();
        assert_eq!(read_limited(&p, 5).unwrap(), "12345");
        let e = read_limited(&p, 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(e.to_string(), "file too large: 5 bytes, the limit is 4");
        fs::write(&p, [0xff, 0xfe]).unwrap();
        let e = read_limited(&p, MAX_DATA_FILE).unwrap_err();
        assert_eq!(e.to_string(), "file is not UTF-8 text");
        let e = read_limited(&d.0.join("absent"), MAX_DATA_FILE).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
