//! The applets of the multicall binary (BusyBox style): dispatch on the basename of argv[0], or on
//! the first argument when the binary is called by a name that is not an applet (or by its own
//! name with an applet name after it), for people without symlinks.

#[cfg(feature = "agent")]
pub mod agent;
pub mod client;
#[cfg(feature = "fakecloud")]
pub mod fakecloud;
pub mod line;
#[cfg(feature = "ota")]
pub mod ota;

/// An applet's entry point: the arguments after its name, returning the exit status.
pub type Entry = fn(&[String]) -> i32;

/// Only applets that really work are listed (and installed as links by `make install`).
pub const APPLETS: &[(&str, Entry)] = &[
    ("miio_client", client::main),
    ("miio_send_line", line::send_main),
    ("miio_recv_line", line::recv_main),
    #[cfg(feature = "agent")]
    ("miio_agent", agent::main),
    #[cfg(feature = "ota")]
    ("miio_ota", ota::main),
    #[cfg(feature = "fakecloud")]
    ("miio_fakecloud", fakecloud::main),
];

fn find(name: &str) -> Option<Entry> {
    APPLETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn list() -> String {
    APPLETS
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the applet named by `argv` and returns its exit status.
pub fn dispatch(argv: &[String]) -> i32 {
    let name = argv.first().map(|s| basename(s)).unwrap_or("miio_client");
    if argv.get(1).map(String::as_str) == Some("--list-applets") {
        for (n, _) in APPLETS {
            println!("{n}");
        }
        return 0;
    }
    // `miio_client miio_send_line MSG` or `anyname miio_fakecloud ...`.
    if let Some(f) = argv.get(1).and_then(|a| find(a)) {
        return f(&argv[2..]);
    }
    match find(name) {
        Some(f) => f(argv.get(1..).unwrap_or(&[])),
        None => {
            eprintln!("{name}: unknown applet; applets: {}", list());
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basename_strips_dirs() {
        assert_eq!(basename("/usr/bin/miio_client"), "miio_client");
        assert_eq!(basename("miio_client"), "miio_client");
    }

    #[test]
    fn unknown_applet_is_an_error() {
        assert_eq!(dispatch(&["/bin/nonesuch".to_string()]), 1);
    }
}
