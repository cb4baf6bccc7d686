//! `tcp:tcp_receive_reset`: an RST reset a connection.

use aya_ebpf::{Global, macros::tracepoint, programs::TracePointContext};
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

fn try_tcp_receive_reset(ctx: &TracePointContext) -> Option<()> {
    let sk = record::<u64>(ctx, RECEIVE_RESET_FIELDS.load().skaddr)?;
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
