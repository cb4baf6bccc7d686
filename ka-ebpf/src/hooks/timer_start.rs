//! `timer:timer_start`, kept only for a socket's keepalive timer being armed.
//!
//! This tracepoint fires for every timer in the kernel (tens of thousands a
//! second under churn), so the function comparison comes first and alone, from a direct load of
//! the record where its layout is the usual one.

use aya_ebpf::{Global, macros::tracepoint, programs::TracePointContext};
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
    emit::count(Stat::KeepaliveTimerHits as u32);
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
        sock::snapshot(sk as *const u8, &mut (*event).sock);
        (*event).expires = expires;
    }
    emit::submit(entry);
    Some(())
}
