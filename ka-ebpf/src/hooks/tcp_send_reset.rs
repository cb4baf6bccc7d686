//! `tcp:tcp_send_reset`: this host sent an RST, with or without a socket.

use aya_ebpf::{Global, macros::tracepoint, programs::TracePointContext};
use ka_common::{EventKind, RESET_REASON_UNKNOWN, SendResetEvent, SendResetFields};

use super::record;
use crate::{emit, sock};

#[unsafe(no_mangle)]
static SEND_RESET_FIELDS: Global<SendResetFields> = Global::new(SendResetFields::ABSENT);

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_send_reset(&ctx);
    0
}

fn try_tcp_send_reset(ctx: &TracePointContext) -> Option<()> {
    let fields = SEND_RESET_FIELDS.load();
    let sk = record::<u64>(ctx, fields.skaddr)?;
    let skb = record::<u64>(ctx, fields.skbaddr).unwrap_or(0);
    // `enum sk_rst_reason` exists from 6.10 on.
    let reason = record::<u32>(ctx, fields.reason).unwrap_or(RESET_REASON_UNKNOWN);
    let mut entry = emit::reserve::<SendResetEvent>(EventKind::SendReset)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::SendReset);
        if sk == 0 {
            sock::clear(&mut (*event).sock);
            if skb != 0 {
                (*event).sock.netns = sock::netns_of_skb(skb as *const u8);
            }
            (*event).has_sock = 0;
        } else {
            sock::snapshot(sk as *const u8, &mut (*event).sock, EventKind::SendReset);
            (*event).has_sock = 1;
        }
        (*event).reason = reason;
    }
    emit::submit(entry, EventKind::SendReset);
    Some(())
}
