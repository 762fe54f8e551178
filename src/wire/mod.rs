//! Bytes to values and back: the miio packet, its crypto, the 54322 JSON stream splitter, the
//! JSON-RPC message shapes and the MQTT 3.1.1 packets of the broker link. No I/O, no clock, no
//! logging; nothing here panics on any input.

pub mod crypto;
pub mod dns;
pub mod json_stream;
pub mod miio;
#[cfg(feature = "mqtt")]
pub mod mqtt;
pub mod rpc;
