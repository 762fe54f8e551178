//! Bytes to values and back: the miio packet, its crypto, the 54322 JSON stream splitter and the
//! JSON-RPC message shapes. No I/O, no clock, no logging; nothing here panics on any input.

pub mod crypto;
pub mod dns;
pub mod json_stream;
pub mod miio;
pub mod rpc;
