//! `tcp:tcp_retransmit_skb`: a segment was retransmitted.

use aya_ebpf::{Global, macros::tracepoint, programs::TracePointContext};
use ka_common::{EventKind, RetransmitEvent, RetransmitFields};

use super::record;
use crate::{emit, sock};

#[unsafe(no_mangle)]
static RETRANSMIT_FIELDS: Global<RetransmitFields> = Global::new(RetransmitFields::ABSENT);

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_retransmit_skb(&ctx);
    0
}

fn try_tcp_retransmit_skb(ctx: &TracePointContext) -> Option<()> {
    let fields = RETRANSMIT_FIELDS.load();
    let sk = record::<u64>(ctx, fields.skaddr)?;
    // Before 6.17 the hook fires only for successful retransmissions.
    let err = record::<i32>(ctx, fields.err).unwrap_or(0);
    let mut entry = emit::reserve::<RetransmitEvent>(EventKind::Retransmit)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::Retransmit);
        sock::snapshot(sk as *const u8, &mut (*event).sock, EventKind::Retransmit);
        (*event).err = err;
        (*event).reserved = 0;
    }
    emit::submit(entry, EventKind::Retransmit);
    Some(())
}
