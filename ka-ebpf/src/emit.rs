//! Reserving events in the ring buffer and counting in place.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    maps::ring_buf::RingBufEntry,
};
use ka_common::{EventHeader, EventKind, Stat};

use crate::{EVENTS, STATS, WAKEUP_BYTES};

/// Adds one to a `STATS` slot on this CPU.
#[inline(always)]
pub fn count(slot: u32) {
    if let Some(counter) = STATS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and
        // is only touched by this CPU while the program runs (no preemption
        // inside a BPF program on one CPU).
        unsafe { *counter += 1 };
    }
}

/// Reserves an event of type `T` or counts it as lost.
///
/// The reservation is tested for null once, each branch counting on its
/// own: a second test of the same pointer (a merged count, then the `?`)
/// is a leaked reference to 6.1's verifier, which does not know a reserved
/// pointer it already tested is not null ("Unreleased reference").
#[inline(always)]
pub fn reserve<T: 'static>(kind: EventKind) -> Option<RingBufEntry<T>> {
    let Some(entry) = EVENTS.reserve::<T>(0) else {
        count(Stat::lost(kind));
        return None;
    };
    count(Stat::submitted(kind));
    Some(entry)
}

/// Counts an event of `kind` the agent does not need.
#[inline(always)]
pub fn filtered(kind: EventKind) {
    count(Stat::filtered(kind));
}

/// Submits an event without waking the agent, unless the ring buffer holds
/// more than `WAKEUP_BYTES`: the agent drains on a short timer, and a wake-up
/// per event (an `irq_work` and a task wake-up) cost more than the program.
#[inline(always)]
pub fn submit<T>(entry: RingBufEntry<T>) {
    let waiting = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    if let Some(high) = STATS.get_ptr_mut(Stat::RingHighWater as u32) {
        // SAFETY: a per-CPU slot from a successful lookup, touched only by
        // this CPU while the program runs (the agent only reads and zeroes).
        unsafe {
            if waiting > *high {
                *high = waiting;
            }
        }
    }
    let flags = if waiting >= WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(flags));
}

/// The header every event starts with.
#[inline(always)]
pub fn header(kind: EventKind) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        // SAFETY: helper without preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
        // SAFETY: helper without preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    }
}
