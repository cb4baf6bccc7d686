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

use aya_ebpf::programs::TracePointContext;
use ka_common::ABSENT;

/// Reads a tracepoint record field at an offset from the tracefs format.
#[inline(always)]
fn record<T>(ctx: &TracePointContext, offset: u16) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    // SAFETY: `read_at` uses bpf_probe_read_kernel, which checks the address;
    // the offset comes from this kernel's own format file.
    unsafe { ctx.read_at::<T>(usize::from(offset)) }.ok()
}
