//! The applets of the multicall binary.
