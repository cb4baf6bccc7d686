//! `sock:inet_sk_error_report`: a socket error (ETIMEDOUT, ECONNRESET...)
//! was reported to the application. The record has no socket pointer, so the
//! agent matches it by address and port.

use aya_ebpf::{Global, macros::tracepoint, programs::TracePointContext};
use ka_common::{AF_INET, ErrorReportEvent, ErrorReportFields, EventKind, IPPROTO_TCP};

use super::record;
use crate::emit;

#[unsafe(no_mangle)]
static ERROR_REPORT_FIELDS: Global<ErrorReportFields> = Global::new(ErrorReportFields::ABSENT);

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sk_error_report(&ctx);
    0
}

fn try_inet_sk_error_report(ctx: &TracePointContext) -> Option<()> {
    let fields = ERROR_REPORT_FIELDS.load();
    if record::<u16>(ctx, fields.protocol).unwrap_or(IPPROTO_TCP) != IPPROTO_TCP {
        emit::filtered(EventKind::ErrorReport);
        return None;
    }
    let error = record::<i32>(ctx, fields.error)?;
    let family = record::<u16>(ctx, fields.family)?;
    let sport = record::<u16>(ctx, fields.sport)?;
    let dport = record::<u16>(ctx, fields.dport)?;
    let (saddr, daddr) = if family == AF_INET {
        let s = record::<u32>(ctx, fields.saddr).unwrap_or(0).to_ne_bytes();
        let d = record::<u32>(ctx, fields.daddr).unwrap_or(0).to_ne_bytes();
        (
            [s[0], s[1], s[2], s[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [d[0], d[1], d[2], d[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )
    } else {
        (
            record::<[u8; 16]>(ctx, fields.saddr_v6).unwrap_or([0; 16]),
            record::<[u8; 16]>(ctx, fields.daddr_v6).unwrap_or([0; 16]),
        )
    };
    let mut entry = emit::reserve::<ErrorReportEvent>(EventKind::ErrorReport)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    unsafe {
        (*event).header = emit::header(EventKind::ErrorReport);
        (*event).saddr = saddr;
        (*event).daddr = daddr;
        (*event).error = error;
        (*event).family = family;
        (*event).sport = sport;
        (*event).dport = dport;
        emit::zero(&mut (*event).reserved);
    }
    emit::submit(entry, EventKind::ErrorReport);
    Some(())
}
