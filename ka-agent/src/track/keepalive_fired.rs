//! Interprets `timer:timer_expire_entry` for the keepalive timer: remembers
//! the probe count `tcp_keepalive_timer` is about to act on. What it did is
//! known from the next event on that CPU (re-arm after a probe, or a death).

use ka_common::KeepaliveFiredEvent;

use super::{PendingFire, Tracker};

impl Tracker {
    pub(super) fn on_keepalive_fired(&mut self, event: &KeepaliveFiredEvent) {
        let Some(conn) = self.adopt(&event.sock, event.header.ktime_ns) else {
            return;
        };
        let ka = &mut conn.keepalive;
        // Every acceptable ACK resets icsk_probes_out: if the last expiry
        // sent a probe and the count is back at zero, the peer answered. A
        // probe still counted here went a whole interval without an answer.
        if ka.probe_outstanding && event.sock.probes_out == 0 {
            ka.probes_answered += 1;
        }
        ka.probe_outstanding = false;
        ka.unanswered = event.sock.probes_out;
        conn.pending_fire = Some(PendingFire {
            cpu: event.header.cpu,
            ktime_ns: event.header.ktime_ns,
            probes_out: event.sock.probes_out,
        });
        conn.last_fire = Some((event.header.cpu, event.header.ktime_ns));
    }
}
