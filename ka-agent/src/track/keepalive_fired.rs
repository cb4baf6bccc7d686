//! Interprets `timer:timer_expire_entry` for the keepalive timer: remembers
//! the probe count `tcp_keepalive_timer` is about to act on. What it did is
//! known from the next event on that CPU (re-arm after a probe, or a death).

use ka_common::KeepaliveFiredEvent;

use super::{Observation, PendingFire, Tracker};

impl Tracker {
    pub(super) fn on_keepalive_fired(&mut self, event: &KeepaliveFiredEvent) {
        let Some(conn) = self.adopt(&event.sock, event.header.ktime_ns) else {
            return;
        };
        let probes_out = event.sock.probes_out;
        // The re-arm after the previous expiry went unseen (its program run
        // was skipped: a timer softirq interrupting `timer_start`'s program
        // in process context on the same CPU). The timer fired again, so
        // the handler re-armed it; one more unanswered probe means it sent
        // one then. Only that handler moves `icsk_probes_out` while the
        // timer waits (zero-window probes need queued data, with which the
        // keepalive handler re-arms without probing, and that re-arm is
        // seen).
        let missed_probe = conn
            .pending_fire
            .is_some_and(|fire| probes_out == fire.probes_out.wrapping_add(1));
        let ka = &mut conn.keepalive;
        if missed_probe {
            ka.probes_sent += 1;
            ka.probe_outstanding = true;
        }
        // Every acceptable ACK resets icsk_probes_out: if the last expiry
        // sent a probe and the count is back at zero, the peer answered. A
        // probe still counted here went a whole interval without an answer.
        if ka.probe_outstanding && probes_out == 0 {
            ka.probes_answered += 1;
        }
        ka.probe_outstanding = false;
        ka.unanswered = probes_out;
        conn.pending_fire = Some(PendingFire {
            cpu: event.header.cpu,
            ktime_ns: event.header.ktime_ns,
            probes_out,
        });
        conn.last_fire = Some((event.header.cpu, event.header.ktime_ns));
        if missed_probe {
            let labels = conn.labels();
            self.observations.push(Observation::ProbeSent(labels));
        }
    }
}

#[cfg(test)]
mod tests {
    use ka_common::{
        EventKind, KeepaliveArmedEvent, KeepaliveFiredEvent, SNAP_KEEPALIVE_ON, SockSnapshot,
        tcp_state,
    };

    use crate::{
        decode::Event,
        track::{
            Observation, Tracker, TrackerConfig,
            fixtures::{header, socket},
        },
    };

    fn idle_socket(probes_out: u8) -> SockSnapshot {
        SockSnapshot {
            flags: SNAP_KEEPALIVE_ON,
            probes_out,
            ..socket(9000, tcp_state::ESTABLISHED)
        }
    }

    fn fired(probes_out: u8, ktime_ns: u64) -> Event {
        Event::KeepaliveFired(KeepaliveFiredEvent {
            header: header(EventKind::KeepaliveFired, ktime_ns),
            sock: idle_socket(probes_out),
        })
    }

    fn armed(probes_out: u8, ktime_ns: u64) -> Event {
        Event::KeepaliveArmed(KeepaliveArmedEvent {
            header: header(EventKind::KeepaliveArmed, ktime_ns),
            sock: idle_socket(probes_out),
            expires: 0,
        })
    }

    /// How many probes the tracker counts after `events`, in order.
    fn probes_counted(events: &[Event]) -> usize {
        let mut tracker = Tracker::new(TrackerConfig::default());
        for event in events {
            tracker.handle(event);
        }
        tracker
            .drain_observations()
            .iter()
            .filter(|o| matches!(o, Observation::ProbeSent(_)))
            .count()
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn every_probe_is_counted_when_each_rearm_is_seen() {
        let events = [
            fired(0, 0),
            armed(1, 10_000),
            fired(1, SECOND),
            armed(2, SECOND + 10_000),
            fired(2, 2 * SECOND),
            armed(3, 2 * SECOND + 10_000),
            fired(3, 3 * SECOND),
        ];
        assert_eq!(probes_counted(&events), 3);
    }

    #[test]
    fn a_probe_whose_rearm_went_unseen_is_counted_at_the_next_expiry() {
        // The kernel skipped `timer_start`'s run for the second re-arm.
        let events = [
            fired(0, 0),
            armed(1, 10_000),
            fired(1, SECOND),
            fired(2, 2 * SECOND),
            armed(3, 2 * SECOND + 10_000),
            fired(3, 3 * SECOND),
        ];
        assert_eq!(probes_counted(&events), 3);
    }

    #[test]
    fn a_rearm_without_a_probe_counts_nothing() {
        // The socket was busy (owned by its user) or had data in flight:
        // the handler re-armed without probing, and the peer answered the
        // earlier probe in between.
        let events = [
            fired(0, 0),
            armed(0, 10_000),
            fired(0, 50_000_000),
            armed(1, 50_010_000),
            fired(0, SECOND + 50_000_000),
        ];
        assert_eq!(probes_counted(&events), 1);
    }
}
