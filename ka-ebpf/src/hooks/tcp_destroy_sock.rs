//! `tcp:tcp_destroy_sock`: the kernel frees a socket.

use aya_ebpf::{Global, macros::tracepoint, programs::TracePointContext};
use ka_common::{DestroySockEvent, EventKind, SkRecordFields};

use super::record;
use crate::{emit, sock};

#[unsafe(no_mangle)]
static DESTROY_SOCK_FIELDS: Global<SkRecordFields> = Global::new(SkRecordFields::ABSENT);

#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_destroy_sock(&ctx);
    0
}

fn try_tcp_destroy_sock(ctx: &TracePointContext) -> Option<()> {
    let sk = record::<u64>(ctx, DESTROY_SOCK_FIELDS.load().skaddr)?;
    let mut entry = emit::reserve::<DestroySockEvent>(EventKind::DestroySock)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::DestroySock);
        sock::snapshot(sk as *const u8, &mut (*event).sock);
    }
    entry.submit(0);
    Some(())
}
