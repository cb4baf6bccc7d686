//! Interprets `tcp:tcp_retransmit_skb`.

use ka_common::RetransmitEvent;

use super::{Observation, Tracker};

impl Tracker {
    pub(super) fn on_retransmit(&mut self, event: &RetransmitEvent) {
        let Some(conn) = self.adopt(&event.sock, event.header.ktime_ns) else {
            return;
        };
        conn.retransmits += 1;
        let labels = conn.labels();
        self.observations.push(Observation::Retransmit(labels));
    }
}
