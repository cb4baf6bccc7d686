//! `tcp:tcp_send_reset`: this host sent an RST, with or without a socket.
//!
//! The raw tracepoint program where BTF declares its arguments, else the
//! tracepoint: raw for the count (see `tcp_retransmit_skb`).

use aya_ebpf::{
    Global,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use ka_common::{EventKind, RESET_REASON_UNKNOWN, SendResetEvent, SendResetFields};

use super::record;
use crate::{emit, sock};

#[unsafe(no_mangle)]
static SEND_RESET_FIELDS: Global<SendResetFields> = Global::new(SendResetFields::ABSENT);

/// Non-zero when the raw tracepoint has the `enum sk_rst_reason reason`
/// argument (6.10+). Read-only at load, so on older kernels the verifier
/// drops the read of the third argument, which the kernel would refuse at
/// attach.
#[unsafe(no_mangle)]
static SEND_RESET_REASON_ARGUMENT: Global<u32> = Global::new(0);

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_send_reset(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset_raw(ctx: RawTracePointContext) -> u32 {
    let _ = try_tcp_send_reset_raw(&ctx);
    0
}

/// `(const struct sock *sk, const struct sk_buff *skb[, enum sk_rst_reason
/// reason])`, checked against BTF by the agent.
fn try_tcp_send_reset_raw(ctx: &RawTracePointContext) -> Option<()> {
    let reason: u32 = if SEND_RESET_REASON_ARGUMENT.load() == 0 {
        RESET_REASON_UNKNOWN
    } else {
        ctx.arg(2)
    };
    on_send_reset(ctx.arg(0), ctx.arg(1), reason)
}

fn try_tcp_send_reset(ctx: &TracePointContext) -> Option<()> {
    let fields = SEND_RESET_FIELDS.load();
    let sk = record::<u64>(ctx, fields.skaddr)?;
    let skb = record::<u64>(ctx, fields.skbaddr).unwrap_or(0);
    // `enum sk_rst_reason` exists from 6.10 on.
    let reason = record::<u32>(ctx, fields.reason).unwrap_or(RESET_REASON_UNKNOWN);
    on_send_reset(sk, skb, reason)
}

#[inline(always)]
fn on_send_reset(sk: u64, skb: u64, reason: u32) -> Option<()> {
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
