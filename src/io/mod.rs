//! The only layer with syscalls: the reactor, the clock, signals, logging, files at run time.
//! It decides nothing: bytes go to `wire`, decisions come from `proto`.

pub mod clock;
pub mod conn;
pub mod daemon;
pub mod datafiles;
pub mod effects;
pub mod log;
pub mod mdns;
pub mod netinfo;
pub mod reactor;
pub mod resolver;
pub mod sys;
pub mod writeq;
