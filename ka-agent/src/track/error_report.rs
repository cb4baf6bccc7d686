//! Interprets `sock:inet_sk_error_report`. Death causes come from `sk_err`
//! in the CLOSE snapshot (set before the state change on every kernel, while
//! the order of this report changed in 6.11), so the report only feeds the
//! debug log.

use ka_common::ErrorReportEvent;

use super::Tracker;

impl Tracker {
    pub(super) fn on_error_report(&mut self, event: &ErrorReportEvent) {
        tracing::debug!(
            error = event.error,
            sport = event.sport,
            dport = event.dport,
            "socket error reported"
        );
    }
}
