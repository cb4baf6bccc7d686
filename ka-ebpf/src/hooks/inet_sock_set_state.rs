//! `sock:inet_sock_set_state`: every TCP state transition.
//!
//! Under churn this fires five times per socket. Only three transitions
//! carry something the agent cannot learn later: the connection is up, the
//! first FIN (who closed, idle before it), and the end. The states in
//! between are the next event's `oldstate`, so the agent still knows them.
//!
//! An outbound socket's `SYN_SENT` transition is not sent either, but it
//! runs in the process calling `connect()`, the one moment the kernel
//! knows it: the program records that process for the socket's next
//! transition, which runs in a softirq.
//!
//! Two programs, one attached: the raw tracepoint where this kernel's BTF
//! declares the arguments it reads (no trace record is formatted for it),
//! else the tracepoint; both hand the transition to [`on_state_change`].

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, generated},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use ka_common::{
    Connector, EventKind, IPPROTO_TCP, SetStateFields, Stat, StateChangeEvent, tcp_state,
};

use super::{record, record_at};
use crate::{CONNECTORS, emit, sock};

const SYN_SENT: i32 = tcp_state::SYN_SENT as i32;

#[unsafe(no_mangle)]
static SET_STATE_FIELDS: Global<SetStateFields> = Global::new(SetStateFields::ABSENT);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> u32 {
    let _ = try_inet_sock_set_state_raw(&ctx);
    0
}

/// `(const struct sock *sk, const int oldstate, const int newstate)`,
/// checked against BTF by the agent.
fn try_inet_sock_set_state_raw(ctx: &RawTracePointContext) -> Option<()> {
    let sk: u64 = ctx.arg(0);
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    if !needed(oldstate, newstate) {
        filtered(sk, newstate);
        return None;
    }
    // Other protocols (SCTP, MPTCP) change state here too, rarely; the
    // protocol comes with the snapshot instead of a read of its own.
    on_state_change(sk, oldstate, newstate, Protocol::FromSnapshot)
}

/// Where the protocol of a transition is known from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// The tracepoint record said TCP.
    Tcp,
    /// Only the snapshot tells; not TCP means the event is discarded.
    FromSnapshot,
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Option<()> {
    const USUAL: SetStateFields = SetStateFields::USUAL;
    let fields = SET_STATE_FIELDS.load();
    let usual = fields == USUAL;
    let protocol = if usual {
        record_at::<u16, { USUAL.protocol as usize }>(ctx)
    } else {
        record::<u16>(ctx, fields.protocol)?
    };
    if protocol != IPPROTO_TCP {
        emit::not_tcp(EventKind::StateChange);
        return None;
    }
    let (sk, oldstate, newstate) = if usual {
        (
            record_at::<u64, { USUAL.skaddr as usize }>(ctx),
            record_at::<i32, { USUAL.oldstate as usize }>(ctx),
            record_at::<i32, { USUAL.newstate as usize }>(ctx),
        )
    } else {
        (
            record::<u64>(ctx, fields.skaddr)?,
            record::<i32>(ctx, fields.oldstate)?,
            record::<i32>(ctx, fields.newstate)?,
        )
    };
    if !needed(oldstate, newstate) {
        filtered(sk, newstate);
        return None;
    }
    on_state_change(sk, oldstate, newstate, Protocol::Tcp)
}

/// Sends a transition the agent needs, with the socket as it is now.
#[inline(always)]
fn on_state_change(sk: u64, oldstate: i32, newstate: i32, protocol: Protocol) -> Option<()> {
    let mut entry = emit::reserve::<StateChangeEvent>(EventKind::StateChange)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    let snapshot_protocol = unsafe {
        (*event).header = emit::header(EventKind::StateChange);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "TCP states are small non-negative numbers"
        )]
        {
            (*event).oldstate = oldstate as u8;
            (*event).newstate = newstate as u8;
        }
        emit::zero(&mut (*event).reserved);
        let protocol = sock::snapshot(sk as *const u8, &mut (*event).sock, EventKind::StateChange);
        // The kernel ended the connection under its application (timeout,
        // reset): the socket a process may still hold, which no dump will
        // list any more. Nothing extra on the transitions of churn.
        (*event).socket_inode =
            if newstate == i32::from(tcp_state::CLOSE) && (*event).sock.sk_err != 0 {
                sock::socket_inode(sk as *const u8)
            } else {
                0
            };
        if oldstate == SYN_SENT {
            hand_on_connector(sk, &mut (*event).connector);
        } else {
            emit::zero_words(&mut (*event).connector);
        }
        protocol
    };
    if protocol == Protocol::FromSnapshot && snapshot_protocol != IPPROTO_TCP {
        emit::discard_not_tcp(entry, EventKind::StateChange);
        return None;
    }
    emit::submit(entry, EventKind::StateChange);
    Some(())
}

/// Counts a transition the agent does not need; records the connector of
/// an outbound socket entering `SYN_SENT`.
#[inline(always)]
fn filtered(sk: u64, newstate: i32) {
    if newstate == SYN_SENT {
        remember_connector(sk);
    }
    emit::filtered(EventKind::StateChange);
}

/// Slots of connectors: connects in flight at once, spread by address
/// (two sockets connecting at once share a slot 1 time in 4096; the first
/// then goes unnamed, and counted).
pub const CONNECTOR_SLOTS: u32 = 1 << CONNECTOR_SLOT_BITS;
const CONNECTOR_SLOT_BITS: u32 = 12;

/// A socket connecting and who is connecting it. Not a hash map entry: an
/// update and a delete of one cost several times the array's stores.
#[repr(C)]
pub struct ConnectorSlot {
    /// The socket's address; 0 while the slot is free or being written.
    sk: u64,
    connector: Connector,
}

/// The slot of `sk`: socket addresses are spread over whole slab objects,
/// so their high bits, mixed (Fibonacci hashing), pick it.
#[inline(always)]
fn slot_of(sk: u64) -> u32 {
    (sk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - CONNECTOR_SLOT_BITS)) as u32
}

/// Records the process calling `connect()` on `sk` (this program runs in
/// it at `SYN_SENT`).
#[inline(always)]
fn remember_connector(sk: u64) {
    let Some(slot) = CONNECTORS.get_ptr_mut(slot_of(sk)) else {
        return;
    };
    // The thread group id is the upper half.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a pointer from a successful array lookup, to a slot any CPU
    // may write at once: the socket's address is cleared first and set
    // last, each a volatile store (the helper call between them is opaque
    // to the compiler), so a reader that finds it unchanged around its copy
    // copied one connector whole (see `hand_on_connector`). The helper
    // writes at most the 16 bytes of `comm`, NUL-padded.
    unsafe {
        (&raw mut (*slot).sk).write_volatile(0);
        let connector = &raw mut (*slot).connector;
        (&raw mut (*connector).tgid).write_volatile(tgid);
        (&raw mut (*connector).reserved).write_volatile(0);
        // Straight into the slot: aya's wrapper zeroes a byte array first,
        // which LLVM makes a call to its byte-looping `memset`.
        generated::bpf_get_current_comm(
            (&raw mut (*connector).comm).cast(),
            u32::try_from(size_of::<[u8; 16]>()).unwrap_or(0),
        );
        (&raw mut (*slot).sk).write_volatile(sk);
    }
}

/// Moves the connector recorded for `sk` into the event leaving `SYN_SENT`;
/// a socket without one is counted (`Stat::ConnectorsUnknown`).
#[inline(always)]
fn hand_on_connector(sk: u64, out: &mut Connector) {
    if let Some(slot) = CONNECTORS.get_ptr_mut(slot_of(sk)) {
        // SAFETY: as in `remember_connector`; `out` is this program's own
        // reserved event.
        unsafe {
            let at = &raw mut (*slot).sk;
            if at.read_volatile() == sk {
                copy_connector(&raw const (*slot).connector, out);
                if at.read_volatile() == sk {
                    at.write_volatile(0);
                    return;
                }
            }
        }
    }
    emit::zero_words(out);
    emit::count(Stat::ConnectorsUnknown as u32);
}

/// Copies a connector a volatile word at a time: the order against the
/// stores of the slot's address is what makes a torn copy detectable.
///
/// # Safety
///
/// Both pointers are valid for a connector.
#[inline(always)]
unsafe fn copy_connector(from: *const Connector, to: *mut Connector) {
    const WORDS: usize = size_of::<Connector>() / 8;
    let (from, to) = (from.cast::<u64>(), to.cast::<u64>());
    for i in 0..WORDS {
        // SAFETY: a connector is a whole number of 8-byte-aligned words
        // (asserted below); word `i < WORDS` is inside both.
        unsafe { to.add(i).write_volatile(from.add(i).read_volatile()) };
    }
}

const _: () = assert!(size_of::<Connector>().is_multiple_of(8));
const _: () = assert!(align_of::<Connector>() == 8);

/// Whether the agent needs this transition (see the module comment).
#[inline(always)]
fn needed(oldstate: i32, newstate: i32) -> bool {
    const ESTABLISHED: i32 = tcp_state::ESTABLISHED as i32;
    const CLOSE: i32 = tcp_state::CLOSE as i32;
    const LISTEN: i32 = tcp_state::LISTEN as i32;
    const FIN_WAIT1: i32 = tcp_state::FIN_WAIT1 as i32;
    const CLOSE_WAIT: i32 = tcp_state::CLOSE_WAIT as i32;
    match newstate {
        ESTABLISHED => true,
        CLOSE => oldstate != LISTEN,
        FIN_WAIT1 | CLOSE_WAIT => oldstate == ESTABLISHED,
        _ => false,
    }
}
