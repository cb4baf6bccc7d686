//! Ring-buffer records → typed events.

use ka_common::{
    DestroySockEvent, ErrorReportEvent, EventHeader, EventKind, KeepaliveArmedEvent,
    KeepaliveFiredEvent, RcvStateProcessEvent, ReceiveResetEvent, RetransmitEvent, SendResetEvent,
    StateChangeEvent,
};

/// One decoded kernel event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    StateChange(StateChangeEvent),
    Retransmit(RetransmitEvent),
    SendReset(SendResetEvent),
    ReceiveReset(ReceiveResetEvent),
    DestroySock(DestroySockEvent),
    ErrorReport(ErrorReportEvent),
    KeepaliveArmed(KeepaliveArmedEvent),
    KeepaliveFired(KeepaliveFiredEvent),
    RcvStateProcess(RcvStateProcessEvent),
}

impl Event {
    pub const fn header(&self) -> &EventHeader {
        match self {
            Self::StateChange(e) => &e.header,
            Self::Retransmit(e) => &e.header,
            Self::SendReset(e) => &e.header,
            Self::ReceiveReset(e) => &e.header,
            Self::DestroySock(e) => &e.header,
            Self::ErrorReport(e) => &e.header,
            Self::KeepaliveArmed(e) => &e.header,
            Self::KeepaliveFired(e) => &e.header,
            Self::RcvStateProcess(e) => &e.header,
        }
    }

    pub const fn kind(&self) -> EventKind {
        match self {
            Self::StateChange(_) => EventKind::StateChange,
            Self::Retransmit(_) => EventKind::Retransmit,
            Self::SendReset(_) => EventKind::SendReset,
            Self::ReceiveReset(_) => EventKind::ReceiveReset,
            Self::DestroySock(_) => EventKind::DestroySock,
            Self::ErrorReport(_) => EventKind::ErrorReport,
            Self::KeepaliveArmed(_) => EventKind::KeepaliveArmed,
            Self::KeepaliveFired(_) => EventKind::KeepaliveFired,
            Self::RcvStateProcess(_) => EventKind::RcvStateProcess,
        }
    }
}

/// A record that is not a valid event (a kernel/agent version mismatch).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record has {len} bytes, expected {expected}")]
    Size {
        kind: EventKind,
        len: usize,
        expected: usize,
    },
}

/// Reads a `T` from the start of `bytes`, which must be exactly its size.
fn read<T: Copy>(kind: EventKind, bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = size_of::<T>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            kind,
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length was checked above; every `T` used here is a
    // `#[repr(C)]` struct of plain integers for which any bit pattern is
    // valid, and `read_unaligned` does not require alignment.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let raw_kind = u32::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
    let kind = EventKind::from_raw(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    Ok(match kind {
        EventKind::StateChange => Event::StateChange(read(kind, bytes)?),
        EventKind::Retransmit => Event::Retransmit(read(kind, bytes)?),
        EventKind::SendReset => Event::SendReset(read(kind, bytes)?),
        EventKind::ReceiveReset => Event::ReceiveReset(read(kind, bytes)?),
        EventKind::DestroySock => Event::DestroySock(read(kind, bytes)?),
        EventKind::ErrorReport => Event::ErrorReport(read(kind, bytes)?),
        EventKind::KeepaliveArmed => Event::KeepaliveArmed(read(kind, bytes)?),
        EventKind::KeepaliveFired => Event::KeepaliveFired(read(kind, bytes)?),
        EventKind::RcvStateProcess => Event::RcvStateProcess(read(kind, bytes)?),
    })
}

/// Events the programs submitted that the agent never read, found as gaps
/// in each CPU's numbering of each kind (`EventHeader::sequence`).
///
/// Nothing between the ring buffer and the tracker is meant to lose an
/// event (a full ring is counted in the kernel, before a number is given);
/// this makes sure that, if something does, it is counted and not silent.
#[derive(Debug, Default)]
pub struct Delivery {
    /// The last number read, by CPU and kind (`cpu * KINDS + kind`).
    last: Vec<u32>,
    /// Missing events by kind, since the start.
    missing: [u64; KINDS],
}

/// Kind values are 1..=9; slot 0 is unused.
const KINDS: usize = EventKind::ALL.len() + 1;

impl Delivery {
    /// Notes `header`'s number; returns how many events of its kind and CPU
    /// were skipped before it.
    pub fn note(&mut self, header: &EventHeader) -> u32 {
        if header.sequence == 0 {
            return 0;
        }
        let kind = usize::from(header.kind);
        if kind >= KINDS {
            return 0;
        }
        let slot = usize::from(header.cpu) * KINDS + kind;
        if self.last.len() <= slot {
            self.last.resize(slot + 1, 0);
        }
        let last = &mut self.last[slot];
        let mut skipped = header.sequence.wrapping_sub(*last).wrapping_sub(1);
        // Numbers only go up on a CPU; one at or below the last (a program
        // of the kind interrupted by another of the same kind, which ka
        // does not attach) is not a gap.
        if skipped >= u32::MAX / 2 {
            return 0;
        }
        // Past 2^32 the count wraps to 0, which reads as unnumbered.
        if header.sequence < *last {
            skipped -= 1;
        }
        *last = header.sequence;
        self.missing[kind] += u64::from(skipped);
        skipped
    }

    /// Events of `kind` never read, since the start.
    pub fn missing(&self, kind: EventKind) -> u64 {
        self.missing[kind as usize]
    }

    /// Events of every kind never read, since the start.
    pub fn missing_total(&self) -> u64 {
        self.missing.iter().sum()
    }
}

/// The bytes of an event, as the kernel writes them (for tests and fuzzing).
pub fn encode<T: Copy>(event: &T) -> Vec<u8> {
    // SAFETY: `T` is one of the `#[repr(C)]` plain-integer event types whose
    // layout has no implicit padding (asserted in ka-common), so all its
    // bytes are initialized.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(event).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let mut event = StateChangeEvent::default();
        event.header.kind = EventKind::StateChange as u16;
        event.sock.sport = 443;
        event.newstate = 1;
        let bytes = encode(&event);
        assert_eq!(decode(&bytes), Ok(Event::StateChange(event)));
        assert_eq!(decode(&bytes[..4]), Err(DecodeError::Short(4)));
        assert!(matches!(
            decode(&bytes[..40]),
            Err(DecodeError::Size { .. })
        ));
        let mut bad = bytes;
        bad[0] = 99;
        assert_eq!(decode(&bad), Err(DecodeError::UnknownKind(99)));
    }

    fn numbered(kind: EventKind, cpu: u16, sequence: u32) -> EventHeader {
        EventHeader {
            kind: kind as u16,
            cpu,
            sequence,
            ktime_ns: 0,
        }
    }

    #[test]
    fn gaps_in_a_cpus_numbering_are_missing_events() {
        let mut delivery = Delivery::default();
        let close = EventKind::StateChange;
        // From 1, in order, on two CPUs: nothing missing.
        for sequence in 1..=3 {
            assert_eq!(delivery.note(&numbered(close, 0, sequence)), 0);
            assert_eq!(delivery.note(&numbered(close, 1, sequence)), 0);
        }
        // Another kind numbers on its own.
        assert_eq!(delivery.note(&numbered(EventKind::Retransmit, 0, 1)), 0);
        // 4 and 5 of CPU 0 never arrived.
        assert_eq!(delivery.note(&numbered(close, 0, 6)), 2);
        // The first event of a CPU that is not number 1.
        assert_eq!(delivery.note(&numbered(close, 7, 2)), 1);
        assert_eq!(delivery.missing(close), 3);
        assert_eq!(delivery.missing(EventKind::Retransmit), 0);
        assert_eq!(delivery.missing_total(), 3);
        // Unnumbered events and numbers that go back are not gaps.
        assert_eq!(delivery.note(&numbered(close, 0, 0)), 0);
        assert_eq!(delivery.note(&numbered(close, 0, 6)), 0);
        assert_eq!(delivery.note(&numbered(close, 0, 5)), 0);
        assert_eq!(delivery.note(&numbered(close, 0, 7)), 0);
        // Numbers wrap around 2^32, through the unnumbered 0.
        let mut wrapping = Delivery::default();
        for quarter in 1..=3 {
            wrapping.note(&numbered(close, 0, quarter << 30));
        }
        assert_eq!(wrapping.note(&numbered(close, 0, u32::MAX)), (1 << 30) - 2);
        assert_eq!(wrapping.note(&numbered(close, 0, 0)), 0);
        assert_eq!(wrapping.note(&numbered(close, 0, 1)), 0);
        assert_eq!(wrapping.note(&numbered(close, 0, 3)), 1);
    }
}
