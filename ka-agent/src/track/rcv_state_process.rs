//! Interprets the `tcp_rcv_state_process` kprobe: the peer sent a segment
//! while the connection winds down, so it is alive; the snapshot refreshes
//! the record.

use ka_common::RcvStateProcessEvent;

use super::Tracker;

impl Tracker {
    pub(super) fn on_rcv_state_process(&mut self, event: &RcvStateProcessEvent) {
        let _ = self.adopt(&event.sock, event.header.ktime_ns);
    }
}
