//! The data files of LOCAL_API.md §17: pure `&str -> Result` parsers, and `store` for atomic writes.

pub mod device;
pub mod osrelease;
pub mod store;
pub mod token;
pub mod wifi;
