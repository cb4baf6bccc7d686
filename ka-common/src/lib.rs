//! Every type that crosses the kernel/user boundary.
//!
//! The kernel programs (`ka-ebpf`) write these into the ring buffer and read
//! the offset tables as globals; the agent (`ka-agent`) fills the offset
//! tables at start-up and decodes the events. All types are `#[repr(C)]`
//! with explicit padding, and their sizes are asserted at compile time so a
//! layout change on one side cannot silently corrupt the other.
#![no_std]

pub mod event;
pub mod offsets;
pub mod stats;

pub use event::*;
pub use offsets::*;
pub use stats::*;

/// `IPPROTO_TCP`: tracepoints shared with SCTP/MPTCP are filtered on it.
pub const IPPROTO_TCP: u16 = 6;
/// `AF_INET`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// Capacity of the per-CPU statistics array (see [`Stat`]).
pub const STAT_SLOTS: u32 = 64;

/// Size in bytes of the ring buffer the agent sizes by default.
pub const DEFAULT_RING_BYTES: u32 = 4 * 1024 * 1024;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`, also
/// the values of the `inet_sock_set_state` tracepoint's fields).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}
