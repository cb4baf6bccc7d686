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
    let raw_kind = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
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
        event.header.kind = EventKind::StateChange as u32;
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
}
