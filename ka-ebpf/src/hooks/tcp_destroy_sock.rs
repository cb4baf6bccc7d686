//! `tcp:tcp_destroy_sock`: the kernel frees a socket.
//!
//! A socket reaches CLOSE before it is freed, and that transition already
//! told the agent everything; only a socket freed in another state (which
//! the agent would otherwise keep as a stale record) is sent. The raw
//! tracepoint program where BTF declares its argument, else the tracepoint.

use aya_ebpf::{
    Global,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use ka_common::{DestroySockEvent, EventKind, SkRecordFields, tcp_state};

use super::{record, record_at};
use crate::{emit, sock};

#[unsafe(no_mangle)]
static DESTROY_SOCK_FIELDS: Global<SkRecordFields> = Global::new(SkRecordFields::ABSENT);

#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_destroy_sock(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn tcp_destroy_sock_raw(ctx: RawTracePointContext) -> u32 {
    let _ = on_destroy(ctx.arg(0));
    0
}

fn try_tcp_destroy_sock(ctx: &TracePointContext) -> Option<()> {
    const USUAL: SkRecordFields = SkRecordFields::USUAL;
    let fields = DESTROY_SOCK_FIELDS.load();
    let sk = if fields == USUAL {
        record_at::<u64, { USUAL.skaddr as usize }>(ctx)
    } else {
        record::<u64>(ctx, fields.skaddr)?
    };
    on_destroy(sk)
}

/// Sends the destruction of a socket that did not reach CLOSE.
#[inline(always)]
fn on_destroy(sk: u64) -> Option<()> {
    if sock::state(sk as *const u8) == tcp_state::CLOSE {
        emit::filtered(EventKind::DestroySock);
        return None;
    }
    let mut entry = emit::reserve::<DestroySockEvent>(EventKind::DestroySock)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::DestroySock);
        sock::snapshot(sk as *const u8, &mut (*event).sock, EventKind::DestroySock);
    }
    emit::submit(entry, EventKind::DestroySock);
    Some(())
}
