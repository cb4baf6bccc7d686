//! `timer:timer_start`, kept only for a socket's keepalive timer being armed.
//!
//! This tracepoint fires for every timer in the kernel (tens of thousands a
//! second under churn), so the function comparison comes first and alone:
//! one read of the timer in the raw tracepoint program (attached where
//! BTF declares its arguments; no trace record is formatted for it), else a
//! direct load of the record where its layout is the usual one.

use aya_ebpf::{
    Global,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use ka_common::{EventKind, KeepaliveArmedEvent, Stat, TimerFields};

use super::{record, record_at};
use crate::{KEEPALIVE_TIMER_FN, SOCK_OFFSETS, emit, sock};

#[unsafe(no_mangle)]
static TIMER_START_FIELDS: Global<TimerFields> = Global::new(TimerFields::ABSENT);

#[tracepoint]
pub fn timer_start(ctx: TracePointContext) -> u32 {
    let _ = try_timer_start(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "timer_start")]
pub fn timer_start_raw(ctx: RawTracePointContext) -> u32 {
    let _ = try_timer_start_raw(&ctx);
    0
}

/// `(struct timer_list *timer, unsigned long expires, ...)`, checked
/// against BTF by the agent.
fn try_timer_start_raw(ctx: &RawTracePointContext) -> Option<()> {
    let timer: u64 = ctx.arg(0);
    if !sock::is_keepalive_timer(timer) {
        return None;
    }
    on_keepalive_timer_start(timer, ctx.arg(1))
}

fn try_timer_start(ctx: &TracePointContext) -> Option<()> {
    const USUAL: TimerFields = TimerFields::START_USUAL;
    let fields = TIMER_START_FIELDS.load();
    let usual = fields == USUAL;
    let function = if usual {
        record_at::<u64, { USUAL.function as usize }>(ctx)
    } else {
        record::<u64>(ctx, fields.function)?
    };
    let keepalive_fn = KEEPALIVE_TIMER_FN.load();
    if function != keepalive_fn || keepalive_fn == 0 {
        return None;
    }
    let (timer, expires) = if usual {
        (
            record_at::<u64, { USUAL.timer as usize }>(ctx),
            record_at::<u64, { USUAL.expires as usize }>(ctx),
        )
    } else {
        (
            record::<u64>(ctx, fields.timer)?,
            record::<u64>(ctx, fields.expires).unwrap_or(0),
        )
    };
    on_keepalive_timer_start(timer, expires)
}

/// Sends the arming of a keepalive timer of a socket with `SO_KEEPALIVE`.
#[inline(always)]
fn on_keepalive_timer_start(timer: u64, expires: u64) -> Option<()> {
    emit::count(Stat::KeepaliveTimerHits as u32);
    let sk = timer.wrapping_sub(u64::from(SOCK_OFFSETS.load().keepalive_timer));
    // The same timer is the FIN_WAIT2 timer of every closing socket; only a
    // socket with SO_KEEPALIVE can be probing.
    if !sock::keepalive_on(sk as *const u8) {
        emit::filtered(EventKind::KeepaliveArmed);
        return None;
    }
    let mut entry = emit::reserve::<KeepaliveArmedEvent>(EventKind::KeepaliveArmed)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::KeepaliveArmed);
        sock::snapshot(
            sk as *const u8,
            &mut (*event).sock,
            EventKind::KeepaliveArmed,
        );
        (*event).expires = expires;
    }
    emit::submit(entry, EventKind::KeepaliveArmed);
    Some(())
}
