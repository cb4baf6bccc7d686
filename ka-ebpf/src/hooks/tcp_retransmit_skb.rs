//! `tcp:tcp_retransmit_skb`: a segment was retransmitted.
//!
//! The raw tracepoint program where BTF declares its arguments, else the
//! tracepoint. Raw matters here for the count, not the speed: the kernel
//! skips a tracepoint program whenever any BPF program (another tool's
//! too) is running on that CPU, which a retransmission timer interrupting
//! one hits; a raw tracepoint program only when that same program is.

use aya_ebpf::{
    Global,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use ka_common::{EventKind, RetransmitEvent, RetransmitFields};

use super::record;
use crate::{emit, sock};

#[unsafe(no_mangle)]
static RETRANSMIT_FIELDS: Global<RetransmitFields> = Global::new(RetransmitFields::ABSENT);

/// Non-zero when the raw tracepoint has the `int err` argument (6.17+).
/// Read-only at load, so on older kernels the verifier drops the read of
/// the third argument, which the kernel would refuse at attach.
#[unsafe(no_mangle)]
static RETRANSMIT_ERR_ARGUMENT: Global<u32> = Global::new(0);

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_retransmit_skb(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_raw(ctx: RawTracePointContext) -> u32 {
    let _ = try_tcp_retransmit_skb_raw(&ctx);
    0
}

/// `(const struct sock *sk, const struct sk_buff *skb[, int err])`,
/// checked against BTF by the agent.
fn try_tcp_retransmit_skb_raw(ctx: &RawTracePointContext) -> Option<()> {
    let sk: u64 = ctx.arg(0);
    let err: i32 = if RETRANSMIT_ERR_ARGUMENT.load() == 0 {
        0
    } else {
        ctx.arg(2)
    };
    on_retransmit(sk, err)
}

fn try_tcp_retransmit_skb(ctx: &TracePointContext) -> Option<()> {
    let fields = RETRANSMIT_FIELDS.load();
    let sk = record::<u64>(ctx, fields.skaddr)?;
    // Before 6.17 the hook fires only for successful retransmissions.
    let err = record::<i32>(ctx, fields.err).unwrap_or(0);
    on_retransmit(sk, err)
}

#[inline(always)]
fn on_retransmit(sk: u64, err: i32) -> Option<()> {
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
