//! Slots of the per-CPU statistics array the programs count into in place.

use crate::EventKind;

/// Index into the `STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A ring-buffer reservation failed; the event of that kind is lost.
    /// Slots `LostBase + kind` (kinds 1..=9).
    LostBase = 0,
    /// A `bpf_probe_read_kernel` of a socket field failed.
    ReadFailures = 16,
    /// Keepalive timer callbacks seen (after the function filter).
    KeepaliveTimerHits = 17,
}

impl Stat {
    /// Slot counting lost events of `kind`.
    pub const fn lost(kind: EventKind) -> u32 {
        Self::LostBase as u32 + kind as u32
    }
}
