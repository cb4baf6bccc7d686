//! Reserving events in the ring buffer and counting in place.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    maps::ring_buf::RingBufEntry,
};
use ka_common::{EventHeader, EventKind, Stat};

use crate::{EVENTS, STATS, WAKEUP_BYTES};

/// Adds one to a `STATS` slot on this CPU.
///
/// Not atomic (the BPF target has no atomic read-modify-write in Rust): a
/// raw tracepoint program can interrupt another program on this CPU, but the
/// slots are per event kind, hence per program, except `ReadFailures`,
/// where an interrupted increment could lose one count of a failure that
/// does not occur on a sane kernel.
#[inline(always)]
pub fn count(slot: u32) {
    if let Some(counter) = STATS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup:
        // an aligned u64 touched only by this CPU's programs.
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
        // SAFETY: a per-CPU slot from a successful lookup, an aligned u64
        // touched only by this CPU's programs (the agent only reads and
        // zeroes). A program interrupting this one between the compare and
        // the store can have its larger mark overwritten: a mark, not a
        // count, and the next submit sees the ring again.
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

/// Zeroes padding bytes one volatile store each: a plain `[0; N]` becomes
/// a call to a byte-looping BPF `memset` subprogram (see `sock::clear`).
#[inline(always)]
pub fn zero<const N: usize>(bytes: &mut [u8; N]) {
    for byte in bytes {
        // SAFETY: an exclusive reference to one byte.
        unsafe { core::ptr::from_mut(byte).write_volatile(0) };
    }
}
