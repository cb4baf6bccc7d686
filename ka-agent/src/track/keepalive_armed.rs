//! Interprets `timer:timer_start` for the keepalive timer. Right after an
//! expiry, a re-arm with one more unanswered probe means the handler sent a
//! probe (`TcpExt` `TCPKeepAlive`); the timer is not pending inside its own
//! callback, so this re-arm is always traced.

use ka_common::KeepaliveArmedEvent;

use super::{ArmedTimer, Observation, Tracker};

impl Tracker {
    pub(super) fn on_keepalive_armed(&mut self, event: &KeepaliveArmedEvent) {
        let hz = f64::from(self.config.hz.max(1));
        let Some(conn) = self.adopt(&event.sock, event.header.ktime_ns) else {
            return;
        };
        let probes_out = event.sock.probes_out;
        let probe_sent = conn.pending_fire.take().is_some_and(|fire| {
            fire.cpu == event.header.cpu && probes_out == fire.probes_out.wrapping_add(1)
        });
        let ka = &mut conn.keepalive;
        #[expect(clippy::cast_precision_loss, reason = "jiffies deltas are small")]
        let armed_in = event.expires.wrapping_sub(event.sock.jiffies).cast_signed() as f64 / hz;
        ka.armed_in_secs = Some(armed_in);
        // The classic tracepoint's record may lack the expiry (0).
        conn.armed_timer = (event.expires != 0 && armed_in >= 0.0).then(|| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a non-negative delay in seconds, far below 2^64 ns"
            )]
            let delay_ns = (armed_in * 1e9) as u64;
            ArmedTimer {
                due_ns: event.header.ktime_ns.saturating_add(delay_ns),
                delay_ns,
                #[expect(clippy::cast_possible_truncation, reason = "jiffies64 low bits")]
                due_jiffies: event.expires as u32,
                probes_out,
                overdue: false,
            }
        });
        if probe_sent {
            ka.probes_sent += 1;
            ka.probe_outstanding = true;
            let labels = conn.labels();
            self.observations.push(Observation::ProbeSent(labels));
        }
    }
}
