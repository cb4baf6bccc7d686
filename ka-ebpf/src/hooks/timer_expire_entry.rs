//! `timer:timer_expire_entry`, kept only for a socket's keepalive timer: the
//! snapshot is the state `tcp_keepalive_timer` is about to act on (probe,
//! kill, or re-arm), which the agent pairs with what follows on that CPU.
//!
//! As for `timer_start`, the raw tracepoint program where BTF declares its
//! arguments, else the tracepoint.

use aya_ebpf::{
    Global,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use ka_common::{EventKind, KeepaliveFiredEvent, Stat, TimerFields};

use super::{record, record_at};
use crate::{KEEPALIVE_TIMER_FN, SOCK_OFFSETS, emit, sock};

#[unsafe(no_mangle)]
static TIMER_EXPIRE_FIELDS: Global<TimerFields> = Global::new(TimerFields::ABSENT);

#[tracepoint]
pub fn timer_expire_entry(ctx: TracePointContext) -> u32 {
    let _ = try_timer_expire_entry(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn timer_expire_entry_raw(ctx: RawTracePointContext) -> u32 {
    let _ = try_timer_expire_entry_raw(&ctx);
    0
}

/// `(struct timer_list *timer, ...)`, checked against BTF by the agent.
fn try_timer_expire_entry_raw(ctx: &RawTracePointContext) -> Option<()> {
    let timer: u64 = ctx.arg(0);
    if !sock::is_keepalive_timer(timer) {
        return None;
    }
    on_keepalive_timer_expiry(timer)
}

fn try_timer_expire_entry(ctx: &TracePointContext) -> Option<()> {
    const USUAL: TimerFields = TimerFields::EXPIRE_USUAL;
    let fields = TIMER_EXPIRE_FIELDS.load();
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
    let timer = if usual {
        record_at::<u64, { USUAL.timer as usize }>(ctx)
    } else {
        record::<u64>(ctx, fields.timer)?
    };
    on_keepalive_timer_expiry(timer)
}

/// Sends the expiry of a keepalive timer of a socket with `SO_KEEPALIVE`.
#[inline(always)]
fn on_keepalive_timer_expiry(timer: u64) -> Option<()> {
    emit::count(Stat::KeepaliveTimerHits as u32);
    let sk = timer.wrapping_sub(u64::from(SOCK_OFFSETS.load().keepalive_timer));
    // The same timer is the FIN_WAIT2 timer of every closing socket; only a
    // socket with SO_KEEPALIVE can be probing.
    if !sock::keepalive_on(sk as *const u8) {
        emit::filtered(EventKind::KeepaliveFired);
        return None;
    }
    let mut entry = emit::reserve::<KeepaliveFiredEvent>(EventKind::KeepaliveFired)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::KeepaliveFired);
        sock::snapshot(
            sk as *const u8,
            &mut (*event).sock,
            EventKind::KeepaliveFired,
        );
    }
    emit::submit(entry, EventKind::KeepaliveFired);
    Some(())
}
