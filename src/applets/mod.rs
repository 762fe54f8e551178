//! The applets of the multicall binary.

#[cfg(feature = "fakecloud")]
pub mod fakecloud;
