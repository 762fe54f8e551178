//! Command line of the applets (LOCAL_API.md §18).
