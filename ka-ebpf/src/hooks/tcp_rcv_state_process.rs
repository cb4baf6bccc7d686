//! `tcp_rcv_state_process` (kprobe, where the kernel has kprobes): a segment
//! arrived for a socket outside ESTABLISHED. Kept only for closing states,
//! where it shows the peer is still alive while the connection winds down.

use aya_ebpf::{macros::kprobe, programs::ProbeContext};
use aya_log_ebpf::debug;
use ka_common::{EventKind, RcvStateProcessEvent};

use crate::{SOCK_OFFSETS, emit, sock};

const TCP_FIN_WAIT1: u8 = 4;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

#[kprobe]
pub fn tcp_rcv_state_process(ctx: ProbeContext) -> u32 {
    if try_tcp_rcv_state_process(&ctx).is_none() {
        debug!(&ctx, "tcp_rcv_state_process: nothing emitted");
    }
    0
}

fn try_tcp_rcv_state_process(ctx: &ProbeContext) -> Option<()> {
    let sk: *const u8 = ctx.arg(0)?;
    let state_offset = SOCK_OFFSETS.load().skc_state;
    // SAFETY: bpf_probe_read_kernel checks the address; `sk` is the first
    // argument of tcp_rcv_state_process, a `struct sock *`.
    let state: u8 = unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel(
            sk.wrapping_add(usize::from(state_offset)).cast::<u8>(),
        )
    }
    .ok()?;
    // FIN_WAIT1..LAST_ACK and CLOSING, skipping TIME_WAIT (6) and CLOSE (7).
    if !(TCP_FIN_WAIT1..=TCP_LAST_ACK).contains(&state) && state != TCP_CLOSING
        || state == 6
        || state == 7
    {
        return None;
    }
    let mut entry = emit::reserve::<RcvStateProcessEvent>(EventKind::RcvStateProcess)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::RcvStateProcess);
        sock::snapshot(sk, &mut (*event).sock, EventKind::RcvStateProcess);
    }
    emit::submit(entry, EventKind::RcvStateProcess);
    Some(())
}
