//! The sans-IO state machines. They take `now` and inputs, queue actions, and expose `poll_timeout()`;
//! they never touch a socket, a file, a process or the clock.

#[cfg(feature = "agent")]
pub mod agent;
pub mod cloud;
pub mod downstream;
pub mod helper;
pub mod ioerr;
pub mod lan;
pub mod local;
pub mod mdns;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod node;
#[cfg(feature = "ota")]
pub mod ota;
pub mod outbox;
pub mod provision;
#[cfg(test)]
mod sim;
pub mod state;
