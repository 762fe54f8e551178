//! miio_client: the MIIO/OT client daemon and its applets, as a library the multicall binary drives.
//!
//! Layer rules (see ARCHITECTURE.md):
//! - `time`, `timer`, `wire` and `config` parsers are pure: no I/O, no clock, never panic on input.
//! - `proto` holds the sans-IO state machines: `handle_*(now, ..)`, `poll_action()`, `poll_timeout()`.
//! - `io` is the only layer with syscalls; it decides nothing. All `unsafe` lives in `io::sys`.
#![deny(unsafe_code)]

pub mod applets;
pub mod cli;
pub mod config;
/// Bodies of the fuzz targets (fuzz/README.md); nothing in the daemon calls it.
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod proto;
pub mod ratelimit;
pub mod time;
pub mod timer;
pub mod wire;

/// The version printed by `-v` (`miio-client <version>`, LOCAL_API.md §18).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The optional parts built into this binary (cargo features, ARCHITECTURE.md §6), as `-v` lists
/// them: `miio-client <version> (features: …)`.
pub const FEATURES: &[&str] = &[
    #[cfg(feature = "agent")]
    "agent",
    #[cfg(feature = "mqtt")]
    "mqtt",
    #[cfg(feature = "ota")]
    "ota",
    #[cfg(feature = "fakecloud")]
    "fakecloud",
];
