//! ka's kernel programs: one file per hook under `hooks/`.
//!
//! Each program reads only what user space cannot get later, at offsets the
//! agent resolved at start-up (`OFFSETS`-style globals, see `ka-common`),
//! filters what the agent does not need, and reserves its event directly in
//! the ring buffer. A failed reservation is counted in `STATS`, never dropped
//! silently. No program panics: every fallible step returns early.
#![no_std]
#![no_main]
// Inline assembly for the BPF target: the one kfunc call (`sock::cast`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
#![expect(
    clippy::inline_always,
    reason = "BPF has no real calls across these helpers: inlining keeps the verifier's view and the 512-byte stack simple"
)]
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each program its context by value"
)]

mod emit;
mod hooks;
mod sock;

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use ka_common::{
    COMMON_SPANS, DEFAULT_RING_BYTES, EventKind, FULL_SPANS, KernelTypes, NET_SPANS,
    SOCK_COPY_BYTES, STAT_SLOTS, SockCopyPlan, SockOffsets, Span,
};

/// Every event, in the order the hooks reserved them. The agent resizes it at
/// load time (`--ring-buffer-bytes`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

/// Counters kept in place (`ka_common::Stat` slots): lost events per kind,
/// failed reads, keepalive timer hits.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

/// Who is connecting each outbound socket in `SYN_SENT`, in a slot chosen
/// by the socket's address (see `hooks::inet_sock_set_state`).
#[map]
static CONNECTORS: Array<hooks::ConnectorSlot> = Array::with_max_entries(hooks::CONNECTOR_SLOTS, 0);

/// Socket structure offsets from BTF, set by the agent before load.
#[unsafe(no_mangle)]
static SOCK_OFFSETS: Global<SockOffsets> = Global::new(SockOffsets::ABSENT);

// Which spans of a socket a snapshot copies, and where each field lands in
// the copy: `ka_common::SockCopyPlan`, in parts, because a global is loaded
// whole onto the 512-byte stack each time it is read.
#[unsafe(no_mangle)]
static SOCK_COPY_COMMON: Global<[Span; COMMON_SPANS]> = Global::new(SockCopyPlan::ABSENT.common);
#[unsafe(no_mangle)]
static SOCK_COPY_FULL: Global<[Span; FULL_SPANS]> = Global::new(SockCopyPlan::ABSENT.full);
#[unsafe(no_mangle)]
static SOCK_COPY_NET: Global<[Span; NET_SPANS]> = Global::new(SockCopyPlan::ABSENT.net);
#[unsafe(no_mangle)]
static SOCK_COPY_AT: Global<SockOffsets> = Global::new(SockCopyPlan::ABSENT.at);

/// The per-CPU copies a snapshot reads its fields from, one per event kind
/// (`kind as u32`; see `sock::snapshot`).
#[map]
static SOCK_COPY: PerCpuArray<[u8; SOCK_COPY_BYTES]> = PerCpuArray::with_max_entries(COPY_SLOTS, 0);

/// Event kinds count from 1.
#[expect(clippy::cast_possible_truncation, reason = "a handful of kinds")]
const COPY_SLOTS: u32 = EventKind::ALL.len() as u32 + 1;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that
    // could get here, and no code in this crate panics.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Bytes waiting in `EVENTS` above which a submit wakes the agent; below,
/// the agent's drain timer collects them. Set from the ring size at load.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(0);

/// BTF ids for `bpf_rdonly_cast`, set by the agent: all `NO_TYPE` where
/// the programs read with `bpf_probe_read_kernel` instead (`sock::cast`).
#[unsafe(no_mangle)]
static KERNEL_TYPES: Global<KernelTypes> = Global::new(KernelTypes::ABSENT);

/// Address of `tcp_keepalive_timer` from /proc/kallsyms: the timer hooks keep
/// only timers with this callback.
#[unsafe(no_mangle)]
static KEEPALIVE_TIMER_FN: Global<u64> = Global::new(0);
