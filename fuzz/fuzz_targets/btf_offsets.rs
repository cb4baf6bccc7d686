//! The BTF reader and the socket offset resolver.
#![no_main]

use ka_agent::offsets::btf::{KernelBtf, reset_reasons, sock_offsets};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = KernelBtf::from_bytes(data, "fuzz") {
        let mut absent = Vec::new();
        let _ = sock_offsets(&btf, &mut absent);
        let _ = reset_reasons(&btf);
    }
});
