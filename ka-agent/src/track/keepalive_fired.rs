//! Interprets `timer:timer_expire_entry` for the keepalive timer: remembers
//! the probe count `tcp_keepalive_timer` is about to act on. What it did is
//! known from the next event on that CPU (re-arm after a probe, or a death).

use ka_common::KeepaliveFiredEvent;

use super::{ArmedTimer, Keepalive, Observation, PendingFire, Tracker};

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
        // A whole expiry went unseen, its re-arm with it: this one came a
        // keepalive interval after the timer was due.
        let unseen = conn.armed_timer.take().and_then(|timer| {
            missed_expiry(&timer, conn.keepalive.interval_secs, event.header.ktime_ns)
                .then_some(timer)
        });
        let ka = &mut conn.keepalive;
        let mut probes_found = u64::from(missed_probe);
        if let Some(timer) = unseen {
            let (sent, answered) =
                unseen_expiry_probes(&timer, probes_out, answered_since_due(&timer, &event.sock));
            probes_found += u64::from(sent);
            if answered && ka.probe_outstanding {
                ka.probes_answered += 1;
                ka.probe_outstanding = false;
            }
            if sent > 0 {
                ka.probe_outstanding = true;
            }
        } else if missed_probe {
            ka.probe_outstanding = true;
        }
        ka.probes_sent += probes_found;
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
        if probes_found > 0 {
            let labels = conn.labels();
            for _ in 0..probes_found {
                self.observations
                    .push(Observation::ProbeSent(labels.clone()));
            }
        }
        if let Some(timer) = unseen {
            self.keepalive_expiries_unseen += 1;
            tracing::debug!(
                sk = event.sock.sk,
                late_ms = event.header.ktime_ns.saturating_sub(timer.due_ns) / 1_000_000,
                probes_then = timer.probes_out,
                probes_now = probes_out,
                "a keepalive timer expiry went unseen: the next came an interval late"
            );
        }
    }
}

/// How late after it was due a timer must fire for an expiry to have gone
/// unseen in between: three quarters of the longer of its delay and the
/// keepalive interval. The timer wheel fires at most an eighth of the
/// delay late (its coarsest granularity) and the timer softirq adds
/// milliseconds; an unseen expiry that probed re-armed a whole interval
/// ahead. (One that re-armed sooner sent no probe: a busy socket's 50 ms
/// retry, or a rest of the idle time after recent traffic.)
fn late_bound_ns(timer: &ArmedTimer, interval_secs: f64) -> u64 {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a keepalive interval in seconds (at most 32767), far below 2^64 ns"
    )]
    let interval_ns = (interval_secs.max(0.0) * 1e9) as u64;
    timer.delay_ns.max(interval_ns) / 4 * 3
}

/// Whether an expiry at `at_ns` of `timer` shows that an earlier one went
/// unseen.
fn missed_expiry(timer: &ArmedTimer, interval_secs: f64, at_ns: u64) -> bool {
    at_ns.saturating_sub(timer.due_ns) >= late_bound_ns(timer, interval_secs)
}

/// Whether `timer` is so far overdue at `now_ns` that its expiry went
/// unseen: it would fire within the late bound, and the event reaches the
/// agent within a second.
pub(super) fn overdue(timer: &ArmedTimer, interval_secs: f64, now_ns: u64) -> bool {
    now_ns.saturating_sub(timer.due_ns) >= late_bound_ns(timer, interval_secs) + 1_000_000_000
}

/// Whether the socket received an ACK without data since `timer` was due,
/// and sent no data since: the answer to a probe sent then (an answer
/// moves `rcv_tstamp` only; data received moves `lrcvtime` too, and an ACK
/// of data sent is no answer).
fn answered_since_due(timer: &ArmedTimer, snap: &ka_common::SockSnapshot) -> bool {
    let since_due = |jiffy: u32| jiffy.wrapping_sub(timer.due_jiffies).cast_signed() >= 0;
    since_due(snap.rcv_tstamp) && !since_due(snap.lrcvtime) && !since_due(snap.lsndtime)
}

/// What the unseen expiries since `timer` was armed did: the probes they
/// sent, and whether the peer answered one armed before. Only the
/// handler raises the count of unanswered probes, one per probe; only an
/// acceptable ACK lowers it, to zero.
/// - A count above the armed one is that many probes more (any answer
///   before them is not told).
/// - Else an answer reset it. One that came after the timer was due
///   (`answered_since_due`) answered a probe sent then, and the count is
///   the probes sent since; one that came before answered the armed
///   probes, and the count is the probes sent since.
fn unseen_expiry_probes(
    timer: &ArmedTimer,
    probes_out: u8,
    answered_since_due: bool,
) -> (u8, bool) {
    if probes_out > timer.probes_out {
        (probes_out - timer.probes_out, false)
    } else if answered_since_due {
        (probes_out.saturating_add(1), timer.probes_out > 0)
    } else {
        (probes_out, timer.probes_out > 0)
    }
}

/// Whether the expiry of `timer`, armed with as many unanswered probes as
/// keepalive allows, ends the connection (`tcp_keepalive_timer` kills it
/// then unless `TCP_USER_TIMEOUT` decides instead).
pub(super) fn kills(timer: &ArmedTimer, keepalive: &Keepalive) -> bool {
    keepalive.enabled
        && keepalive.user_timeout_ms == 0
        && keepalive.probes > 0
        && timer.probes_out >= keepalive.probes
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

    /// At the default 250 Hz.
    const JIFFY_NS: u64 = 4_000_000;

    /// Armed at `ktime_ns` (jiffy `ktime_ns / JIFFY_NS`) to fire
    /// `delay_ms` later, as `timer_start` reports it.
    fn armed_for(probes_out: u8, ktime_ns: u64, delay_ms: u64) -> Event {
        let jiffies = ktime_ns / JIFFY_NS;
        Event::KeepaliveArmed(KeepaliveArmedEvent {
            header: header(EventKind::KeepaliveArmed, ktime_ns),
            sock: SockSnapshot {
                jiffies,
                keepalive_intvl: 250,
                ..idle_socket(probes_out)
            },
            expires: jiffies + delay_ms * 1_000_000 / JIFFY_NS,
        })
    }

    /// The tracker after `events`, in order, and the probes it counted.
    fn track(events: &[Event]) -> (Tracker, usize) {
        let mut tracker = Tracker::new(TrackerConfig::default());
        for event in events {
            tracker.handle(event);
        }
        let probes = tracker
            .drain_observations()
            .iter()
            .filter(|o| matches!(o, Observation::ProbeSent(_)))
            .count();
        (tracker, probes)
    }

    /// How many probes the tracker counts after `events`, in order.
    fn probes_counted(events: &[Event]) -> usize {
        track(events).1
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

    /// Seen in the test suite: the kernel sent the third probe (its
    /// expiry and re-arm at 3 s) and the agent received neither event, with
    /// nothing counted as lost or skipped. The next expiry came a whole
    /// interval after the timer was due, with one unanswered probe: the
    /// second probe's answer had reset the count, the third raised it.
    #[test]
    fn an_expiry_unseen_with_its_rearm_is_found_from_the_next_ones_lateness() {
        const MS: u64 = 1_000_000;
        let events = [
            fired(0, SECOND),
            armed_for(1, SECOND + MS, 1000),
            fired(0, 2 * SECOND + MS),
            armed_for(1, 2 * SECOND + 2 * MS, 1000),
            // Unseen: fired(0) and armed(1) at 3 s.
            fired(1, 4 * SECOND + 3 * MS),
            armed_for(2, 4 * SECOND + 4 * MS, 1000),
            fired(2, 5 * SECOND + 4 * MS),
            armed_for(3, 5 * SECOND + 5 * MS, 1000),
            fired(3, 6 * SECOND + 5 * MS),
        ];
        let (tracker, probes) = track(&events);
        assert_eq!(probes, 5);
        assert_eq!(tracker.keepalive_expiries_unseen(), 1);
        let ka = &tracker.connection(0xA).unwrap().keepalive;
        assert_eq!((ka.probes_sent, ka.probes_answered), (5, 2));
    }

    /// The timer wheel and a busy softirq fire late by milliseconds, up to
    /// an eighth of the delay: no expiry went unseen then.
    #[test]
    fn a_late_expiry_is_not_taken_for_an_unseen_one() {
        let events = [
            fired(0, SECOND),
            armed_for(1, SECOND, 1000),
            fired(1, 2 * SECOND + 300_000_000),
            armed_for(2, 2 * SECOND + 300_000_000, 1000),
            fired(2, 3 * SECOND + 400_000_000),
        ];
        let (tracker, probes) = track(&events);
        assert_eq!((probes, tracker.keepalive_expiries_unseen()), (2, 0));
    }

    #[test]
    fn unseen_expiries_sent_what_the_unanswered_count_says() {
        use super::{ArmedTimer, unseen_expiry_probes};
        let armed_with = |probes_out| ArmedTimer {
            due_ns: 0,
            delay_ns: SECOND,
            due_jiffies: 0,
            probes_out,
            overdue: false,
        };
        // No answer: the count rose by the probes sent.
        assert_eq!(unseen_expiry_probes(&armed_with(1), 3, false), (2, false));
        assert_eq!(unseen_expiry_probes(&armed_with(0), 1, false), (1, false));
        // An answer before the timer was due reset it: what it shows was
        // sent since.
        assert_eq!(unseen_expiry_probes(&armed_with(2), 1, false), (1, true));
        assert_eq!(unseen_expiry_probes(&armed_with(1), 0, false), (0, true));
        // Re-armed without a probe (recent traffic), nothing outstanding.
        assert_eq!(unseen_expiry_probes(&armed_with(0), 0, false), (0, false));
        // An answer after it was due: the expiry then sent a probe.
        assert_eq!(unseen_expiry_probes(&armed_with(0), 0, true), (1, false));
        assert_eq!(unseen_expiry_probes(&armed_with(1), 1, true), (2, true));
    }

    /// Seen in the test suite once the agent looked for unseen expiries:
    /// the unseen one sent the first probe and the peer answered it, so
    /// the next expiry found no probe unanswered. The answer moved the
    /// socket's last ACK past the due time; no data came or went.
    #[test]
    fn an_unseen_expiry_whose_probe_was_answered_is_found_from_the_ack() {
        let answered_at = |probes_out, ktime_ns, ack_ns: u64| {
            Event::KeepaliveFired(KeepaliveFiredEvent {
                header: header(EventKind::KeepaliveFired, ktime_ns),
                sock: SockSnapshot {
                    #[expect(clippy::cast_possible_truncation, reason = "small test jiffies")]
                    rcv_tstamp: (ack_ns / JIFFY_NS) as u32,
                    ..idle_socket(probes_out)
                },
            })
        };
        let events = [
            armed_for(0, SECOND, 1000),
            // Unseen: fired(0) and armed(1) at 2 s, the answer at 2.001 s.
            answered_at(0, 3 * SECOND, 2 * SECOND + 1_000_000),
        ];
        let (tracker, probes) = track(&events);
        assert_eq!((probes, tracker.keepalive_expiries_unseen()), (1, 1));
        let ka = &tracker.connection(0xA).unwrap().keepalive;
        assert_eq!((ka.probes_sent, ka.probes_answered), (1, 1));
        // Data received since: that re-armed the timer, no probe needed.
        let with_data = Event::KeepaliveFired(KeepaliveFiredEvent {
            header: header(EventKind::KeepaliveFired, 3 * SECOND),
            sock: SockSnapshot {
                rcv_tstamp: 500,
                lrcvtime: 500,
                ..idle_socket(0)
            },
        });
        let (tracker, probes) = track(&[armed_for(0, SECOND, 1000), with_data]);
        assert_eq!((probes, tracker.keepalive_expiries_unseen()), (0, 1));
    }

    /// Three quarters of an interval and a second past due, a sweep asks
    /// for an inventory; before that it does not, and after it once only.
    #[test]
    fn a_timer_overdue_asks_for_an_inventory_once() {
        let (mut tracker, _) = track(&[fired(0, SECOND), armed_for(1, SECOND, 1000)]);
        tracker.sweep(3 * SECOND + SECOND / 2);
        assert_eq!(tracker.take_overdue_timers(), 0);
        tracker.sweep(4 * SECOND);
        assert_eq!(tracker.take_overdue_timers(), 1);
        tracker.sweep(5 * SECOND);
        assert_eq!(tracker.take_overdue_timers(), 0);
    }
}
