//! Ring-buffer records → events → the connection tracker.
#![no_main]

use ka_agent::{
    decode::{Delivery, decode},
    track::{Tracker, TrackerConfig},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut tracker = Tracker::new(TrackerConfig::default());
    let mut delivery = Delivery::default();
    // Several records back to back, each prefixed by its length.
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (record, next) = tail.split_at(len);
        if let Ok(event) = decode(record) {
            delivery.note(event.header());
            tracker.handle(&event);
        }
        rest = next;
    }
    tracker.sweep(u64::MAX / 2);
    tracker.settle_closes(u64::MAX / 2);
    tracker.flush_observations(|_| {});
});
