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
    /// Most bytes seen waiting in the ring buffer at a submit since the
    /// agent last read (and zeroed) this slot: a high-water mark, not a
    /// count.
    RingHighWater = 18,
    /// `inet_sock_set_state` ran for a socket that is not TCP (MPTCP,
    /// SCTP) and sent nothing; also counted in `FilteredBase + kind`. Kept
    /// apart so that a TCP transition the agent never received can be told
    /// from one whose protocol was misread.
    NotTcp = 19,
    /// A socket left `SYN_SENT` without a recorded connector (its `connect()`
    /// came before the programs were attached, or another socket connecting
    /// meanwhile took its slot): its event carries no process.
    ConnectorsUnknown = 20,
    /// An event was reserved and submitted. Slots `SubmittedBase + kind`:
    /// what the agent receives plus what it has yet to read, so that
    /// received + lost accounts for every event the programs produced.
    SubmittedBase = 32,
    /// The program ran but the event was one the agent does not need (a
    /// transition it can reconstruct, a timer of a socket without
    /// keepalive). Slots `FilteredBase + kind`: counted, not sent.
    FilteredBase = 48,
}

impl Stat {
    /// Slot counting lost events of `kind`.
    pub const fn lost(kind: EventKind) -> u32 {
        Self::LostBase as u32 + kind as u32
    }

    /// Slot counting submitted events of `kind`.
    pub const fn submitted(kind: EventKind) -> u32 {
        Self::SubmittedBase as u32 + kind as u32
    }

    /// Slot counting events of `kind` filtered out in the kernel.
    pub const fn filtered(kind: EventKind) -> u32 {
        Self::FilteredBase as u32 + kind as u32
    }
}
