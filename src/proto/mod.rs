//! The sans-IO state machines. They take `now` and inputs, queue actions, and expose `poll_timeout()`;
//! they never touch a socket, a file, a process or the clock.

pub mod helper;
pub mod state;
