//! The only layer with syscalls: the reactor, the clock, signals, logging, files at run time.
