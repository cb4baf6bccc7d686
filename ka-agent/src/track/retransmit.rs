//! Interprets `tcp:tcp_retransmit_skb`.

use ka_common::{RetransmitEvent, SNAP_INCOMPLETE, SNAP_TOTAL_RETRANS};

use super::{Observation, Tracker};

/// Errors of an attempt the kernel gave up before sending and counting the
/// segment (`Tcp.RetransSegs`): socket memory full, the previous copy still
/// in the host's queue, no memory to split it, no route. Since 6.17 the
/// tracepoint reports them too; they are not retransmissions. Only needed
/// where the socket's own counter is not read (see below).
const NOT_RETRANSMITTED: [i32; 4] = [
    -libc::EAGAIN,
    -libc::EBUSY,
    -libc::ENOMEM,
    -libc::EHOSTUNREACH,
];

impl Tracker {
    pub(super) fn on_retransmit(&mut self, event: &RetransmitEvent) {
        let snap = &event.sock;
        let by_socket_counter = snap.flags & SNAP_TOTAL_RETRANS != 0
            && snap.flags & SNAP_INCOMPLETE == 0
            && self
                .connections
                .get(&snap.sk)
                .is_some_and(|conn| conn.total_retrans.is_some());
        // Counts what the socket's counter moved since the connection's
        // last event, this retransmission included, where it was read before.
        let Some(conn) = self.adopt(snap, event.header.ktime_ns) else {
            return;
        };
        if event.err != 0 {
            tracing::debug!(err = event.err, local = %conn.local, remote = %conn.remote, "retransmission attempt failed");
        }
        if by_socket_counter {
            return;
        }
        // First sight of the socket's counter (it starts at this event, so
        // this retransmission is counted here), or none on this kernel:
        // one retransmission per event the kernel did send.
        if NOT_RETRANSMITTED.contains(&event.err) {
            return;
        }
        conn.retransmits += 1;
        let labels = conn.labels();
        self.observations.push(Observation::Retransmit {
            labels,
            segments: 1,
        });
    }
}

#[cfg(test)]
mod tests {
    use ka_common::{
        EventKind, RetransmitEvent, SNAP_TOTAL_RETRANS, SockSnapshot, StateChangeEvent, tcp_state,
    };

    use crate::{
        decode::Event,
        track::{
            Observation, Tracker, TrackerConfig,
            fixtures::{header, socket, transition},
        },
    };

    fn counted(sock: SockSnapshot) -> SockSnapshot {
        SockSnapshot {
            flags: SNAP_TOTAL_RETRANS,
            ..sock
        }
    }

    fn retransmit(sock: SockSnapshot, err: i32, ktime_ns: u64) -> Event {
        Event::Retransmit(RetransmitEvent {
            header: header(EventKind::Retransmit, ktime_ns),
            sock,
            err,
            reserved: 0,
        })
    }

    /// The segments of every `Retransmit` observation so far, in order.
    fn segments(tracker: &mut Tracker) -> Vec<u32> {
        tracker
            .drain_observations()
            .into_iter()
            .filter_map(|o| match o {
                Observation::Retransmit { segments, .. } => Some(segments),
                _ => None,
            })
            .collect()
    }

    /// With the socket's own counter the count is `RetransSegs`'s: a
    /// retransmission of three segments counts three, an attempt given up
    /// before sending none, and a retransmission whose event the kernel
    /// skipped is made up at the next event, here the close.
    #[test]
    fn retransmissions_follow_the_sockets_own_counter() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let sock = counted(socket(80, tcp_state::ESTABLISHED));
        let with_total = |total_retrans| SockSnapshot {
            total_retrans,
            ..sock
        };
        tracker.handle(&transition(
            sock,
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            1,
        ));
        tracker.handle(&retransmit(with_total(1), 0, 2));
        tracker.handle(&retransmit(with_total(4), 0, 3));
        tracker.handle(&retransmit(with_total(4), -libc::EHOSTUNREACH, 4));
        // Two more retransmissions, their events skipped; then the end.
        tracker.handle(&Event::StateChange(StateChangeEvent {
            sock: SockSnapshot {
                sk_err: libc::ETIMEDOUT,
                ..with_total(6)
            },
            ..match transition(sock, tcp_state::ESTABLISHED, tcp_state::CLOSE, 5) {
                Event::StateChange(e) => e,
                _ => unreachable!(),
            }
        }));
        assert_eq!(segments(&mut tracker), [1, 3, 2]);
    }

    /// The first event that reads the counter is where it starts: a
    /// connection first seen at a retransmission counts that one, whatever
    /// the socket retransmitted before the agent watched it.
    #[test]
    fn a_connection_first_seen_retransmitting_counts_from_there() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let sock = SockSnapshot {
            total_retrans: 7,
            ..counted(socket(80, tcp_state::ESTABLISHED))
        };
        tracker.handle(&retransmit(sock, 0, 1));
        tracker.handle(&retransmit(
            SockSnapshot {
                total_retrans: 8,
                ..sock
            },
            0,
            2,
        ));
        assert_eq!(segments(&mut tracker), [1, 1]);
        assert_eq!(tracker.connection(0xA).unwrap().retransmits, 2);
    }

    /// Without the counter (BTF lacks `tcp_sock.total_retrans`), each event
    /// is one retransmission, unless the kernel gave the attempt up.
    #[test]
    fn without_the_counter_each_sent_retransmission_counts_one() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let sock = socket(80, tcp_state::ESTABLISHED);
        tracker.handle(&retransmit(sock, 0, 1));
        tracker.handle(&retransmit(sock, -libc::EAGAIN, 2));
        tracker.handle(&retransmit(sock, 0, 3));
        assert_eq!(segments(&mut tracker), [1, 1]);
    }
}
