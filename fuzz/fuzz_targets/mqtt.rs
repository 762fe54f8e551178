#![no_main]
// Thin wrapper: the body is miio_client::fuzzing::mqtt, which tests/fuzz_replay.rs also runs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| miio_client::fuzzing::mqtt(data));
