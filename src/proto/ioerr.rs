//! The errors the io side reports to the core (ARCHITECTURE.md §1 rule 5): typed values, not
//! strings, whose `Display` is the log text. A data file's error is [`crate::config::ConfError`]
//! (its path, line and reason); a socket's is an [`OsError`].

use core::fmt;
use std::io;

/// A failed system call on a socket, as the reactor saw it: the OS error number, or only the kind
/// when the error carried none. `Display` is the text `std::io::Error` gives for it, e.g.
/// `Connection refused (os error 111)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OsError {
    Errno(i32),
    Kind(io::ErrorKind),
}

impl From<&io::Error> for OsError {
    fn from(e: &io::Error) -> OsError {
        match e.raw_os_error() {
            Some(n) => OsError::Errno(n),
            None => OsError::Kind(e.kind()),
        }
    }
}

impl From<io::Error> for OsError {
    fn from(e: io::Error) -> OsError {
        OsError::from(&e)
    }
}

impl fmt::Display for OsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            OsError::Errno(n) => io::Error::from_raw_os_error(n).fmt(f),
            OsError::Kind(k) => io::Error::from(k).fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_text_is_the_io_error_text() {
        for e in [
            io::Error::from_raw_os_error(111),
            io::Error::from_raw_os_error(101),
            io::Error::from(io::ErrorKind::NotConnected),
        ] {
            assert_eq!(OsError::from(&e).to_string(), e.to_string());
        }
    }
}
