//! Interprets `tcp:tcp_retransmit_skb`.

use ka_common::RetransmitEvent;

use super::{Observation, Tracker};

/// Errors of an attempt the kernel gave up before sending and counting the
/// segment (`Tcp.RetransSegs`): socket memory full, the previous copy still
/// in the host's queue, no memory to split it, no route. Since 6.17 the
/// tracepoint reports them too; they are not retransmissions.
const NOT_RETRANSMITTED: [i32; 4] = [
    -libc::EAGAIN,
    -libc::EBUSY,
    -libc::ENOMEM,
    -libc::EHOSTUNREACH,
];

impl Tracker {
    pub(super) fn on_retransmit(&mut self, event: &RetransmitEvent) {
        let Some(conn) = self.adopt(&event.sock, event.header.ktime_ns) else {
            return;
        };
        if NOT_RETRANSMITTED.contains(&event.err) {
            tracing::debug!(err = event.err, local = %conn.local, remote = %conn.remote, "retransmission not sent");
            return;
        }
        conn.retransmits += 1;
        let labels = conn.labels();
        self.observations.push(Observation::Retransmit(labels));
    }
}
