//! Interprets `tcp:tcp_receive_reset`, including the seed's case: an RST
//! answering the first send after a long silence (a middlebox forgot the
//! flow and another host answered).

use ka_common::ReceiveResetEvent;

use super::{Observation, Tracker};
use crate::{classify, model::ZombieKind};

impl Tracker {
    pub(super) fn on_receive_reset(&mut self, event: &ReceiveResetEvent) {
        let snap = event.sock;
        let hz = u64::from(self.config.hz.max(1));
        let threshold = self.config.reset_after_idle_secs.saturating_mul(hz);
        let Some(conn) = self.adopt(&snap, event.header.ktime_ns) else {
            return;
        };
        conn.reset_received = true;
        let labels = conn.labels();
        let silence =
            classify::silence_before_last_send(snap.lsndtime, snap.lrcvtime, snap.rcv_tstamp);
        let after_idle = conn.was_established
            && conn.zombie.is_none()
            && silence.is_some_and(|s| u64::from(s) >= threshold);
        if after_idle {
            conn.zombie = Some(ZombieKind::ResetAfterIdle);
            #[expect(clippy::cast_precision_loss, reason = "small jiffies counts")]
            let silence_secs = silence.map_or(0.0, |s| f64::from(s) / hz as f64);
            tracing::warn!(
                kind = ZombieKind::ResetAfterIdle.name(),
                local = %conn.local,
                remote = %conn.remote,
                netns = conn.netns,
                comm = %conn.comm,
                silence_before_send_secs = silence_secs,
                "zombie: reset after idle (a middlebox on the path forgot the connection)"
            );
            self.observations.push(Observation::Zombie {
                labels: labels.clone(),
                kind: ZombieKind::ResetAfterIdle,
            });
        }
        self.observations.push(Observation::ResetReceived(labels));
    }
}
