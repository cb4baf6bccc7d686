//! Interprets `tcp:tcp_send_reset`.

use ka_common::SendResetEvent;

use super::{Observation, Tracker};

impl Tracker {
    pub(super) fn on_send_reset(&mut self, event: &SendResetEvent) {
        let reason = self.reset_reason_name(event.reason);
        let netns = event.sock.netns;
        let labels = if event.has_sock == 0 {
            None
        } else if let Some(closing) = self.closing.get_mut(&event.sock.sk) {
            // The RST of an abortive close, right after its move to CLOSE.
            closing.connection.reset_sent = Some(event.reason);
            let labels = closing.connection.labels();
            self.settle(event.sock.sk);
            Some(labels)
        } else {
            self.adopt(&event.sock, event.header.ktime_ns).map(|conn| {
                conn.reset_sent = Some(event.reason);
                conn.labels()
            })
        };
        self.observations.push(Observation::ResetSent {
            labels,
            netns,
            reason,
        });
    }
}
