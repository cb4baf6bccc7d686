//! The tracefs `format` parser and the offset tables built from it.
#![no_main]

use ka_agent::offsets::tracefs::TracepointFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(format) = TracepointFormat::parse(std::path::Path::new("fuzz/format"), &text) {
        let _ = format.set_state();
        let _ = format.retransmit();
        let _ = format.send_reset();
        let _ = format.sk_record();
        let _ = format.error_report();
        let _ = format.timer();
    }
});
