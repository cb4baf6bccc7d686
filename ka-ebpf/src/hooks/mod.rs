//! One file per kernel hook. Each exposes the program (named after the hook)
//! and a `try_*` body returning `Option<()>`: `None` means "nothing to emit".

mod inet_sk_error_report;
mod inet_sock_set_state;
mod tcp_destroy_sock;
mod tcp_rcv_state_process;
mod tcp_receive_reset;
mod tcp_retransmit_skb;
mod tcp_send_reset;
mod timer_expire_entry;
mod timer_start;

pub use inet_sock_set_state::{CONNECTOR_SLOTS, ConnectorSlot};

use aya_ebpf::{EbpfContext as _, programs::TracePointContext};
use ka_common::ABSENT;

/// Reads a tracepoint record field at an offset from the tracefs format;
/// `None` for a field this kernel's record lacks.
///
/// The read cannot fail, which is why a failure is not counted (counting
/// it here made LLVM compute the usual layouts' context loads in a
/// register, which the verifier refuses): the agent took the offset from
/// this kernel's format and checked that the field is `T`'s width, so the
/// read stays inside the record the kernel wrote into its own trace
/// buffer.
#[inline(always)]
fn record<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    // SAFETY: `read_at` uses bpf_probe_read_kernel, which checks the address;
    // the offset and width come from this kernel's own format file.
    unsafe { ctx.read_at::<T>(usize::from(offset)) }.ok()
}

/// Loads a record field at a constant offset, without a helper call.
///
/// The verifier accepts a direct context load only at an offset written in
/// the instruction, so this serves the usual layouts (`*Fields::USUAL`),
/// taken only after comparing them with the offsets the agent read from
/// tracefs; any other layout goes through [`record`].
#[inline(always)]
fn record_at<T: Copy, const OFFSET: usize>(ctx: &TracePointContext) -> T {
    // SAFETY: a tracepoint context is the kernel's per-CPU trace buffer of
    // PERF_MAX_TRACE_SIZE bytes, 8-byte aligned and readable from byte 8 on
    // (the verifier checks the constant offset and its alignment at load);
    // the caller has checked that this kernel's record has a field of type
    // `T` at `OFFSET`.
    unsafe { ctx.as_ptr().cast::<u8>().add(OFFSET).cast::<T>().read() }
}
