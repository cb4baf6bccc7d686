//! Interprets `sock:inet_sk_error_report`. Death causes come from `sk_err`
//! in the CLOSE snapshot (set before the state change on every kernel, while
//! the order of this report changed in 6.11); the report is kept on the
//! connection with that tuple for the API.

use ka_common::ErrorReportEvent;

use super::Tracker;

impl Tracker {
    pub(super) fn on_error_report(&mut self, event: &ErrorReportEvent) {
        let local = super::socket_addr(event.family, event.saddr, event.sport);
        let remote = super::socket_addr(event.family, event.daddr, event.dport);
        // Rare (one per failing connection): a scan is cheaper than an index.
        if let Some(conn) = self
            .connections
            .values_mut()
            .find(|c| c.local == local && c.remote == remote)
        {
            conn.last_error = event.error;
        }
        tracing::debug!(
            error = event.error,
            sport = event.sport,
            dport = event.dport,
            "socket error reported"
        );
    }
}
