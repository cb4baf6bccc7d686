//! `tcp:tcp_receive_reset`: an RST reset a connection.
//!
//! The raw tracepoint program where BTF declares its argument, else the
//! tracepoint: raw for the count (see `tcp_retransmit_skb`).

use aya_ebpf::{
    Global,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use ka_common::{EventKind, ReceiveResetEvent, SkRecordFields};

use super::record;
use crate::{emit, sock};

#[unsafe(no_mangle)]
static RECEIVE_RESET_FIELDS: Global<SkRecordFields> = Global::new(SkRecordFields::ABSENT);

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_receive_reset(&ctx);
    0
}

/// `(struct sock *sk)`, checked against BTF by the agent.
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset_raw(ctx: RawTracePointContext) -> u32 {
    let _ = on_receive_reset(ctx.arg(0));
    0
}

fn try_tcp_receive_reset(ctx: &TracePointContext) -> Option<()> {
    on_receive_reset(record::<u64>(ctx, RECEIVE_RESET_FIELDS.load().skaddr)?)
}

#[inline(always)]
fn on_receive_reset(sk: u64) -> Option<()> {
    let mut entry = emit::reserve::<ReceiveResetEvent>(EventKind::ReceiveReset)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::ReceiveReset);
        sock::snapshot(sk as *const u8, &mut (*event).sock, EventKind::ReceiveReset);
    }
    emit::submit(entry, EventKind::ReceiveReset);
    Some(())
}
