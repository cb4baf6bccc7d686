//! `sock:inet_sk_error_report`: a socket error (ETIMEDOUT, ECONNRESET,
//! EHOSTUNREACH...) was reported to the application.
//!
//! The raw tracepoint program where BTF declares its argument: it sends the
//! socket's snapshot, so the agent knows which socket reported. Else the
//! tracepoint, whose record names only addresses and ports, which sockets
//! of different namespaces can share: the agent then keeps the error only
//! where one connection alone has them.

use aya_ebpf::{
    Global,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use ka_common::{AF_INET, ErrorReportEvent, ErrorReportFields, EventKind, IPPROTO_TCP};

use super::record;
use crate::{emit, sock};

#[unsafe(no_mangle)]
static ERROR_REPORT_FIELDS: Global<ErrorReportFields> = Global::new(ErrorReportFields::ABSENT);

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sk_error_report(&ctx);
    0
}

/// `(const struct sock *sk)`, checked against BTF by the agent.
#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
pub fn inet_sk_error_report_raw(ctx: RawTracePointContext) -> u32 {
    let _ = on_error_report(ctx.arg(0));
    0
}

/// Sends the reporting socket; UDP and raw sockets report here too, and
/// only the snapshot tells their protocol.
#[inline(always)]
fn on_error_report(sk: u64) -> Option<()> {
    let mut entry = emit::reserve::<ErrorReportEvent>(EventKind::ErrorReport)?;
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring-buffer slot of the right size
    // and alignment that only this program writes until it is submitted.
    let protocol = unsafe {
        (*event).header = emit::header(EventKind::ErrorReport);
        (*event).reserved = 0;
        let protocol = sock::snapshot(sk as *const u8, &mut (*event).sock, EventKind::ErrorReport);
        (*event).error = (*event).sock.sk_err;
        protocol
    };
    if protocol != IPPROTO_TCP {
        emit::discard_filtered(entry, EventKind::ErrorReport);
        return None;
    }
    emit::submit(entry, EventKind::ErrorReport);
    Some(())
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
        sock::clear(&mut (*event).sock);
        (*event).sock.saddr = saddr;
        (*event).sock.daddr = daddr;
        (*event).sock.family = family;
        (*event).sock.sport = sport;
        (*event).sock.dport = dport;
        (*event).error = error;
        (*event).reserved = 0;
    }
    emit::submit(entry, EventKind::ErrorReport);
    Some(())
}
