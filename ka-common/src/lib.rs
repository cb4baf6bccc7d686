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
