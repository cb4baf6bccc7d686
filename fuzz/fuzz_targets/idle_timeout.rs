//! Durations and presets of `--idle-timeout`.
#![no_main]

use ka_agent::idle_timeout::{IdleTimeout, parse_duration};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_duration(&text);
    let _ = text.parse::<IdleTimeout>();
});
