//! Interprets `sock:inet_sk_error_report`. Death causes come from `sk_err`
//! in the CLOSE snapshot (set before the state change on every kernel, while
//! the order of this report changed in 6.11); the report is kept on its
//! connection for the API, and for the verdict on a connection whose close
//! is never seen.
//!
//! From the raw tracepoint the report names its socket: it is kept on that
//! socket's record, if it is still live (6.11 on, the report of a close
//! follows it). From the tracepoint it names only addresses and ports,
//! which connections of different namespaces share (loopback in two pods):
//! then it is kept only where one connection alone can be meant.

use ka_common::ErrorReportEvent;

use super::{Connection, SETTLE_NS, Tracker, error_text};

/// How long after a close its error report is taken to be that close's,
/// when the close's record has already been settled: a report follows the
/// close within the same kernel call.
const REPORT_AFTER_CLOSE_NS: u64 = 1_000_000_000;

impl Tracker {
    pub(super) fn on_error_report(&mut self, event: &ErrorReportEvent) {
        let sock = &event.sock;
        let local = super::socket_addr(sock.family, sock.saddr, sock.sport);
        let remote = super::socket_addr(sock.family, sock.daddr, sock.dport);
        let same = |c: &Connection| c.local == local && c.remote == remote;
        let attributed = if sock.sk == 0 {
            self.keep_report_by_addresses(event, &same)
        } else {
            // The record under that socket, unless it is a previous socket's
            // at the same kernel address whose close was lost.
            match self.connections.get_mut(&sock.sk) {
                Some(conn) if same(conn) && conn.netns == sock.netns => {
                    conn.last_error = event.error;
                    true
                }
                _ => false,
            }
        };
        tracing::debug!(
            error = event.error,
            sport = sock.sport,
            dport = sock.dport,
            exact = sock.sk != 0,
            attributed,
            "socket error reported"
        );
    }

    /// Keeps a report that names no socket on the one live connection with
    /// its addresses, if no other live one has them and it does not follow
    /// a close with that error; whether it was kept.
    fn keep_report_by_addresses(
        &mut self,
        event: &ErrorReportEvent,
        same: &impl Fn(&Connection) -> bool,
    ) -> bool {
        // Since 6.11 the report follows the close that set the error: its
        // connection has left the table, and a live one of another
        // namespace with the same addresses must not take the error.
        let reported_close = self
            .closing
            .values()
            .any(|c| same(&c.connection) && c.event.sock.sk_err == event.error)
            || {
                let error = error_text(event.error);
                let since = event
                    .header
                    .ktime_ns
                    .saturating_sub(REPORT_AFTER_CLOSE_NS + SETTLE_NS);
                self.recently_closed
                    .iter()
                    .chain(&self.recently_closed_abnormally)
                    .any(|c| same(&c.connection) && c.closed_at_ns >= since && c.error == error)
            };
        // Rare (one per failing connection): a scan is cheaper than an index.
        let mut live = self.connections.values_mut().filter(|c| same(c));
        match (reported_close, live.next(), live.next()) {
            (false, Some(conn), None) => {
                conn.last_error = event.error;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use ka_common::{ErrorReportEvent, EventKind, SockSnapshot, tcp_state};

    use crate::{
        decode::Event,
        track::{
            Tracker, TrackerConfig,
            fixtures::{connected, header, socket, transition},
        },
    };

    /// A report from the tracepoint: addresses and ports only.
    fn report(sock: &SockSnapshot, error: i32, ktime_ns: u64) -> Event {
        Event::ErrorReport(ErrorReportEvent {
            header: header(EventKind::ErrorReport, ktime_ns),
            sock: SockSnapshot {
                saddr: sock.saddr,
                daddr: sock.daddr,
                family: sock.family,
                sport: sock.sport,
                dport: sock.dport,
                ..SockSnapshot::default()
            },
            error,
            reserved: 0,
        })
    }

    /// A report from the raw tracepoint: the socket itself.
    fn raw_report(sock: &SockSnapshot, error: i32, ktime_ns: u64) -> Event {
        Event::ErrorReport(ErrorReportEvent {
            header: header(EventKind::ErrorReport, ktime_ns),
            sock: SockSnapshot {
                sk_err: error,
                ..*sock
            },
            error,
            reserved: 0,
        })
    }

    /// The same addresses and ports in namespace 7 (sk 0xA) and 8 (0xB).
    fn twins(tracker: &mut Tracker) -> (SockSnapshot, SockSnapshot) {
        let a = socket(80, tcp_state::SYN_SENT);
        let b = SockSnapshot {
            sk: 0xB,
            netns: 8,
            ..a
        };
        for sock in [a, b] {
            tracker.handle(&connected(sock, 1_000));
        }
        (a, b)
    }

    /// `sock` closes from ESTABLISHED with `error` in its snapshot.
    fn close_with(tracker: &mut Tracker, sock: SockSnapshot, error: i32, ktime_ns: u64) {
        let dying = SockSnapshot {
            sk_err: error,
            ..sock
        };
        tracker.handle(&transition(
            dying,
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE,
            ktime_ns,
        ));
    }

    #[test]
    fn a_report_is_kept_on_the_one_connection_with_its_addresses() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let sock = socket(80, tcp_state::SYN_SENT);
        tracker.handle(&connected(sock, 1_000));
        tracker.handle(&report(&sock, libc::ETIMEDOUT, 2_000));
        assert_eq!(tracker.connection(0xA).unwrap().last_error, libc::ETIMEDOUT);
    }

    #[test]
    fn a_report_two_namespaces_could_mean_is_kept_on_neither() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let (a, _) = twins(&mut tracker);
        tracker.handle(&report(&a, libc::ETIMEDOUT, 2_000));
        assert_eq!(tracker.connection(0xA).unwrap().last_error, 0);
        assert_eq!(tracker.connection(0xB).unwrap().last_error, 0);
    }

    /// 6.11 on: the report follows the close whose snapshot carries the
    /// error; the twin in the other namespace lives on without it, before
    /// and after the close is settled.
    #[test]
    fn a_report_after_its_close_is_not_given_to_a_live_twin() {
        for settle_first in [false, true] {
            let mut tracker = Tracker::new(TrackerConfig::default());
            let (a, _) = twins(&mut tracker);
            close_with(&mut tracker, a, libc::ETIMEDOUT, 5_000_000);
            if settle_first {
                tracker.settle_closes(100_000_000);
            }
            tracker.handle(&report(&a, libc::ETIMEDOUT, 5_000_100));
            assert!(tracker.connection(0xA).is_none());
            assert_eq!(
                tracker.connection(0xB).unwrap().last_error,
                0,
                "settled first: {settle_first}"
            );
        }
    }

    #[test]
    fn a_report_naming_its_socket_is_kept_on_it_beside_a_twin() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let (a, b) = twins(&mut tracker);
        tracker.handle(&raw_report(&b, libc::EHOSTUNREACH, 2_000));
        assert_eq!(tracker.connection(0xA).unwrap().last_error, 0);
        assert_eq!(
            tracker.connection(0xB).unwrap().last_error,
            libc::EHOSTUNREACH
        );
        tracker.handle(&raw_report(&a, libc::ETIMEDOUT, 3_000));
        assert_eq!(tracker.connection(0xA).unwrap().last_error, libc::ETIMEDOUT);
    }

    /// 6.11 on: the report of a close names a socket that has left the
    /// table; and a record at the same kernel address with other
    /// addresses (a socket whose close was lost) is not the reporter.
    #[test]
    fn a_report_naming_a_socket_no_live_record_has_is_kept_nowhere() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let (a, _) = twins(&mut tracker);
        close_with(&mut tracker, a, libc::ECONNRESET, 5_000_000);
        tracker.handle(&raw_report(&a, libc::ECONNRESET, 5_000_100));
        assert!(tracker.connection(0xA).is_none());
        assert_eq!(tracker.connection(0xB).unwrap().last_error, 0);

        let other_port = SockSnapshot { sport: 81, ..a };
        let mut tracker = Tracker::new(TrackerConfig::default());
        let (_, _) = twins(&mut tracker);
        tracker.handle(&raw_report(&other_port, libc::ETIMEDOUT, 2_000));
        assert_eq!(tracker.connection(0xA).unwrap().last_error, 0);
    }
}
