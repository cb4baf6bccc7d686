//! Interprets `tcp:tcp_send_reset`.

use ka_common::SendResetEvent;

use super::{Observation, Tracker};

impl Tracker {
    pub(super) fn on_send_reset(&mut self, event: &SendResetEvent) {
        let reason = self.reset_reason_name(event.reason);
        let netns = event.sock.netns;
        let labels = if event.has_sock == 0 {
            None
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
