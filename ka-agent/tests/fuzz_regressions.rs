//! Replays every input under `fuzz/regressions/<target>/` (reproducers of
//! crashes the fuzzers found, and hand-made edge cases) through the code
//! the fuzz targets exercise: none may panic.

use std::path::Path;

use ka_agent::{
    decode::{Delivery, decode},
    idle_timeout::{IdleTimeout, parse_duration},
    offsets::{
        btf::{KernelBtf, reset_reasons, sock_offsets},
        tracefs::TracepointFormat,
    },
    track::{Tracker, TrackerConfig},
};

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    Some((
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "no regression inputs in {}",
        dir.display()
    );
    inputs
}

#[test]
fn tracefs_format() {
    for (name, data) in inputs("tracefs_format") {
        let text = String::from_utf8_lossy(&data);
        if let Ok(format) = TracepointFormat::parse(Path::new(&name), &text) {
            let _ = (format.set_state(), format.retransmit(), format.send_reset());
            let _ = (format.sk_record(), format.error_report(), format.timer());
        }
    }
}

#[test]
fn btf_offsets() {
    for (name, data) in inputs("btf_offsets") {
        if let Ok(btf) = KernelBtf::from_bytes(&data, &name) {
            let _ = sock_offsets(&btf, &mut Vec::new());
            let _ = reset_reasons(&btf);
        }
    }
}

#[test]
fn decode_event() {
    for (_, data) in inputs("decode_event") {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut delivery = Delivery::default();
        let mut rest = data.as_slice();
        while let Some((&len, tail)) = rest.split_first() {
            let (record, next) = tail.split_at(usize::from(len).min(tail.len()));
            if let Ok(event) = decode(record) {
                delivery.note(event.header());
                tracker.handle(&event);
            }
            rest = next;
        }
        tracker.sweep(u64::MAX / 2);
        tracker.settle_closes(u64::MAX / 2);
    }
}

#[test]
fn idle_timeout() {
    for (_, data) in inputs("idle_timeout") {
        let text = String::from_utf8_lossy(&data);
        let _ = parse_duration(&text);
        let _ = text.parse::<IdleTimeout>();
    }
}
