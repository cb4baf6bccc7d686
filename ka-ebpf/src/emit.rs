//! Reserving events in the ring buffer and counting in place.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    maps::ring_buf::RingBufEntry,
};
use ka_common::{Event, EventHeader, EventKind, Stat};

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
/// The reservation is tested for null once: a second test of the same
/// pointer (a merged count, then the `?`) is a leaked reference to 6.1's
/// verifier, which does not know a reserved pointer it already tested is
/// not null ("Unreleased reference").
#[inline(always)]
pub fn reserve<T: 'static>(kind: EventKind) -> Option<RingBufEntry<T>> {
    let Some(entry) = EVENTS.reserve::<T>(0) else {
        count(Stat::lost(kind));
        return None;
    };
    Some(entry)
}

/// Counts an event of `kind` the agent does not need.
#[inline(always)]
pub fn filtered(kind: EventKind) {
    count(Stat::filtered(kind));
}

/// Counts a transition of a socket that is not TCP: filtered, and apart.
#[inline(always)]
pub fn not_tcp(kind: EventKind) {
    count(Stat::NotTcp as u32);
    filtered(kind);
}

/// Gives a reserved event back, for a socket only the snapshot showed is
/// not TCP (the raw `inet_sock_set_state`).
#[inline(always)]
pub fn discard_not_tcp<T>(entry: RingBufEntry<T>, kind: EventKind) {
    entry.discard(u64::from(BPF_RB_NO_WAKEUP));
    not_tcp(kind);
}

/// Gives a reserved event back as filtered: the snapshot showed the agent
/// does not need it.
#[inline(always)]
pub fn discard_filtered<T>(entry: RingBufEntry<T>, kind: EventKind) {
    entry.discard(u64::from(BPF_RB_NO_WAKEUP));
    filtered(kind);
}

/// Every how many events of a kind a CPU looks at the ring's fill level.
const QUERY_EVERY: u64 = 16;

/// Submits an event without waking the agent, unless the ring buffer holds
/// more than `WAKEUP_BYTES`: the agent drains on a short timer, and a wake-up
/// per event (an `irq_work` and a task wake-up) cost more than the program.
///
/// The fill level (a helper call) is looked at every `QUERY_EVERY`th event
/// of a kind on a CPU: a few KiB late at worst, against a threshold of a
/// quarter of the ring; the high-water mark is sampled the same way.
///
/// The event is numbered with the count of its kind on this CPU (see
/// `EventHeader::sequence`): the agent counts the numbers it never reads.
#[inline(always)]
pub fn submit<T: Event>(mut entry: RingBufEntry<T>, kind: EventKind) {
    let Some(submitted) = STATS.get_ptr_mut(Stat::submitted(kind)) else {
        entry.submit(u64::from(BPF_RB_NO_WAKEUP));
        return;
    };
    // SAFETY: a per-CPU slot from a successful lookup, an aligned u64 only
    // this CPU's programs touch; its kind is this program's alone (see
    // `count`).
    let seen = unsafe {
        *submitted += 1;
        *submitted
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the agent compares numbers modulo 2^32"
    )]
    let sequence = seen as u32;
    let header = entry.as_mut_ptr().cast::<EventHeader>();
    // SAFETY: every `Event` starts with its header (asserted in
    // ka-common); the slot is reserved and only this program writes it
    // until it is submitted below.
    unsafe { (*header).sequence = sequence };
    if !seen.is_multiple_of(QUERY_EVERY) {
        entry.submit(u64::from(BPF_RB_NO_WAKEUP));
        return;
    }
    let waiting = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    if let Some(high) = STATS.get_ptr_mut(Stat::RingHighWater as u32) {
        // SAFETY: a per-CPU slot from a successful lookup, an aligned u64
        // touched only by this CPU's programs (the agent only reads and
        // zeroes). A program interrupting this one between the compare and
        // the store can have its larger mark overwritten: a mark, not a
        // count, and the next look at the ring sees it again.
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
    // SAFETY: helper without preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    EventHeader {
        kind: kind as u16,
        #[expect(
            clippy::cast_possible_truncation,
            reason = "CPU numbers are below 2^16 (NR_CPUS is at most 8192)"
        )]
        cpu: cpu as u16,
        sequence: 0,
        // SAFETY: helper without preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Zeroes a value one volatile word store at a time: a plain zeroing
/// becomes a call to a byte-looping BPF `memset` subprogram.
#[inline(always)]
pub fn zero_words<T>(value: &mut T) {
    const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() == 8) };
    let words = core::ptr::from_mut(value).cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: `value` is an exclusive reference to a whole number of
        // 8-byte-aligned words (asserted above), so word `i` is inside it
        // and aligned; the callers' types take any bit pattern.
        unsafe { words.add(i).write_volatile(0) };
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
