//! Interprets `sock:inet_sock_set_state`.

use ka_common::StateChangeEvent;

use super::{Connection, NameSource, Observation, Tracker};
use crate::{
    classify::{self, DeathEvidence},
    model::{Closer, Direction, TcpState},
};

/// A death inside the keepalive timer follows its expiry on the same CPU
/// within the same softirq: microseconds. The bound only has to exclude the
/// next expiry, which is at least a jiffy away.
const SAME_TIMER_CALLBACK_NS: u64 = 2_000_000;

impl Tracker {
    pub(super) fn on_state_change(&mut self, event: &StateChangeEvent) {
        let snap = &event.sock;
        let ktime = event.header.ktime_ns;
        let old = TcpState::from_raw(event.oldstate);
        let new = TcpState::from_raw(event.newstate);
        // The kernel sends only the transitions that matter (see the
        // program); a connection is born at ESTABLISHED, whose old state
        // says who opened it. SYN_SENT/SYN_RECV are handled too, for a
        // program that sends them.
        let opened_from = match (old, new) {
            (_, TcpState::Listen) => return,
            (_, TcpState::SynSent | TcpState::SynRecv) => Some(new),
            (TcpState::SynSent | TcpState::SynRecv, TcpState::Established) => Some(old),
            _ => None,
        };
        if let Some(opening) = opened_from {
            // A new connection, possibly on a reused socket address.
            let direction = if opening == TcpState::SynSent {
                Direction::Outbound
            } else {
                Direction::Inbound
            };
            let already_opening = self
                .connections
                .get(&snap.sk)
                .is_some_and(|c| !c.was_established && c.history.last() == Some(&opening));
            if !already_opening {
                let conn = self.new_connection(snap, direction, ktime);
                self.settle(snap.sk);
                if let Some(earlier) = self.connections.remove(&snap.sk) {
                    self.close_unseen(earlier, ktime, "socket address reused");
                }
                self.insert(conn);
            }
        }
        if old == TcpState::Listen && new == TcpState::Close {
            return;
        }
        let connector = self
            .connector_names
            .name(&event.connector, event.header.ktime_ns);
        let hz = self.config.hz;
        let Some(conn) = self.adopt(snap, ktime) else {
            if new == TcpState::Close {
                // A connection from before the agent, unknown yet: a dump
                // under way may have seen it alive.
                self.note_closed(
                    snap.netns,
                    super::socket_addr(snap.family, snap.saddr, snap.sport),
                    super::socket_addr(snap.family, snap.daddr, snap.dport),
                    ktime,
                );
            }
            return;
        };
        if let Some(named) = connector
            && conn.comm.is_empty()
        {
            conn.comm = named.comm;
            conn.pod = named.pod.map(Box::new);
            conn.name_source = NameSource::Connector;
        }
        conn.state = new;
        conn.state_since_ns = ktime;
        // States between the transitions the kernel sent are the old state
        // of this one.
        if conn.history.last() != Some(&old) && old != TcpState::Close {
            push_history(&mut conn.history, old);
        }
        push_history(&mut conn.history, new);
        match (old, new) {
            (TcpState::SynSent | TcpState::SynRecv, TcpState::Established) => {
                conn.was_established = true;
                let labels = conn.labels();
                self.observations.push(Observation::Opened(labels));
            }
            (TcpState::Established, TcpState::FinWait1 | TcpState::CloseWait) => {
                let closer = if new == TcpState::FinWait1 {
                    Closer::Local
                } else {
                    Closer::Peer
                };
                conn.closer = Some((closer, idle_before_close(snap, hz)));
            }
            (_, TcpState::Close) => {
                // An abortive close (unread data, SO_LINGER 0) moves to CLOSE
                // *before* sending its RST: the verdict waits for what
                // follows on this socket (see `settle_closes`).
                if let Some(conn) = self.connections.remove(&snap.sk) {
                    self.settle(snap.sk);
                    // Closed now, whatever the verdict: a dump that saw it
                    // alive must not bring it back.
                    self.note_closed(conn.netns, conn.local, conn.remote, ktime);
                    self.closing.insert(
                        snap.sk,
                        super::Closing {
                            connection: conn,
                            old_state: old,
                            event: *event,
                        },
                    );
                }
            }
            _ => {}
        }
    }

    /// Gives the verdict on a connection that reached CLOSE.
    pub(super) fn settle(&mut self, sk: u64) {
        if let Some(closing) = self.closing.remove(&sk) {
            self.finish(closing.connection, closing.old_state, &closing.event);
        }
    }

    /// Settles the closes nothing more can be learnt about: older than
    /// [`super::SETTLE_NS`] (the RST of an abortive close follows within
    /// the same system call).
    pub fn settle_closes(&mut self, now_ns: u64) {
        let due: Vec<u64> = self
            .closing
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.event.header.ktime_ns) >= super::SETTLE_NS)
            .map(|(sk, _)| *sk)
            .collect();
        for sk in due {
            self.settle(sk);
        }
    }

    fn finish(&mut self, mut conn: Box<Connection>, old: TcpState, event: &StateChangeEvent) {
        let snap = &event.sock;
        // A connection the kernel ended before any inventory named its
        // socket: the program read the socket's inode at the close.
        if conn.holder.is_none() && event.socket_inode != 0 {
            conn.holder = Some(super::Holder {
                pid: 0,
                inode: u64::from(event.socket_inode),
            });
        }
        let in_keepalive_timer = conn.last_fire.is_some_and(|(cpu, ktime)| {
            cpu == event.header.cpu
                && event.header.ktime_ns.saturating_sub(ktime) <= SAME_TIMER_CALLBACK_NS
        });
        let evidence = DeathEvidence {
            old_state: Some(old),
            sk_err: snap.sk_err,
            retransmits: snap.retransmits,
            probes_out: snap.probes_out,
            in_keepalive_timer,
            ..self.evidence_of(&conn)
        };
        self.conclude(conn, &evidence, event.header.ktime_ns);
    }

    /// Closes a connection whose CLOSE was never seen (a run of the
    /// program the kernel skipped, or an event lost) from what its record
    /// holds, as of `closed_at_ns`: found gone by an inventory, or its
    /// socket address taken by a new connection.
    pub(super) fn close_unseen(&mut self, conn: Box<Connection>, closed_at_ns: u64, found: &str) {
        self.forget_adopted(&conn);
        self.note_closed(conn.netns, conn.local, conn.remote, closed_at_ns);
        if !conn.was_established {
            return;
        }
        // Debug: after a mass exit with lost events there are hundreds of
        // thousands; the inventory's summary and the loss counters say it.
        tracing::debug!(
            local = %conn.local,
            remote = %conn.remote,
            netns = conn.netns,
            state = ?conn.state,
            found,
            "connection gone without its close event: closed from its record"
        );
        let mut evidence = self.evidence_of(&conn);
        if let Some(timer) = conn.armed_timer.filter(|timer| {
            closed_at_ns >= timer.due_ns && super::keepalive_fired::kills(timer, &conn.keepalive)
        }) {
            // Its keepalive timer was due with the last probe unanswered
            // before the socket was found gone: that expiry, unseen too,
            // ended it (`tcp_write_err`, ETIMEDOUT unless a soft error).
            self.keepalive_expiries_unseen += 1;
            evidence.in_keepalive_timer = true;
            if evidence.sk_err == 0 {
                evidence.sk_err = libc::ETIMEDOUT;
            }
            evidence.probes_out = evidence.probes_out.max(timer.probes_out);
        }
        self.conclude(conn, &evidence, closed_at_ns);
    }

    /// What the record of `conn` says about its death, without a CLOSE
    /// snapshot.
    pub(super) fn evidence_of(&self, conn: &Connection) -> DeathEvidence {
        DeathEvidence {
            old_state: Some(conn.state),
            sk_err: conn.last_error,
            retransmits: 0,
            probes_out: conn.keepalive.unanswered,
            reset_received: conn.reset_received,
            reset_sent: conn.reset_sent.is_some(),
            reset_reason_keepalive: conn
                .reset_sent
                .is_some_and(|reason| self.reset_reason_name(reason) == "tcp_keepalive_timeout"),
            in_keepalive_timer: false,
            closer: conn.closer.map(|(closer, _)| closer),
        }
    }

    /// Gives the verdict on a connection that ended at `closed_at_ns`; its
    /// record moves to the recently closed.
    pub(super) fn conclude(
        &mut self,
        conn: Box<Connection>,
        evidence: &DeathEvidence,
        closed_at_ns: u64,
    ) {
        let cause = classify::close_cause(evidence);
        let labels = conn.labels();
        let idle_before_close = match cause {
            crate::model::CloseCause::Normal => conn.closer,
            _ => None,
        };
        let zombie = classify::zombie_of_death(cause, conn.was_established);
        if let Some(kind) = zombie {
            tracing::warn!(
                kind = kind.name(),
                cause = cause.name(),
                local = %conn.local,
                remote = %conn.remote,
                netns = conn.netns,
                comm = %conn.comm,
                sk_err = evidence.sk_err,
                probes_unanswered = evidence.probes_out,
                retransmits = evidence.retransmits,
                keepalive_probes_sent = conn.keepalive.probes_sent,
                "zombie: the peer is gone"
            );
            self.observations.push(Observation::Zombie {
                labels: labels.clone(),
                kind,
            });
        }
        tracing::debug!(cause = cause.name(), local = %conn.local, remote = %conn.remote, "connection closed");
        self.note_dead(&conn, cause, closed_at_ns);
        let closer = conn.closer.map(|(closer, _)| closer);
        let mut record = conn;
        record.zombie = zombie.or(record.zombie);
        record.state = TcpState::Close;
        self.remember_closed(super::ClosedConnection {
            connection: record,
            cause,
            closer,
            idle_before_close_secs: idle_before_close.map(|(_, idle)| idle),
            error: super::error_text(evidence.sk_err),
            closed_at_ns,
            held_by_pid: None,
        });
        self.observations.push(Observation::Closed {
            labels,
            cause,
            idle_before_close,
        });
    }
}

fn push_history(history: &mut super::History, state: TcpState) {
    if history.len() >= super::HISTORY {
        history.remove(0);
    }
    history.push(state);
}

/// Idle seconds at the first FIN: since the last data in either direction.
fn idle_before_close(snap: &ka_common::SockSnapshot, hz: u32) -> f64 {
    #[expect(clippy::cast_possible_truncation, reason = "jiffies64 low bits")]
    let now = snap.jiffies as u32;
    let idle = now
        .wrapping_sub(snap.lrcvtime)
        .min(now.wrapping_sub(snap.lsndtime));
    f64::from(idle) / f64::from(hz.max(1))
}

#[cfg(test)]
mod tests {
    use ka_common::{Connector, EventKind, ReceiveResetEvent, StateChangeEvent, tcp_state};

    use crate::{
        decode::Event,
        track::{
            Observation, Tracker, TrackerConfig,
            fixtures::{header, socket, transition},
        },
    };

    /// A refused connect: the RST, then `SYN_SENT` -> `CLOSE`.
    fn refused(tracker: &mut Tracker, port: u16, ktime_ns: u64) {
        refused_from(tracker, port, ktime_ns, Connector::default());
    }

    /// The same, of a socket `connector` connected.
    fn refused_from(tracker: &mut Tracker, port: u16, ktime_ns: u64, connector: Connector) {
        let sock = socket(port, tcp_state::SYN_SENT);
        tracker.handle(&Event::ReceiveReset(ReceiveResetEvent {
            header: header(EventKind::ReceiveReset, ktime_ns),
            sock,
        }));
        tracker.handle(&Event::StateChange(StateChangeEvent {
            header: header(EventKind::StateChange, ktime_ns + 1),
            sock,
            oldstate: tcp_state::SYN_SENT,
            newstate: tcp_state::CLOSE,
            reserved: [0; 2],
            socket_inode: 0,
            connector,
        }));
    }

    /// Process `n`, whose thread `comm` connects: above any `pid_max`
    /// (2^22), so no such process is in `/proc` and the thread's name
    /// stands (see `connector`).
    fn connector(n: u32, comm: &str) -> Connector {
        let mut connector = Connector {
            tgid: 0x7fff_0000 + n,
            ..Connector::default()
        };
        connector.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        connector
    }

    /// Its state says a connecting socket is outbound, whatever its ports
    /// (here both ephemeral, the lower one local, which alone reads as
    /// inbound); its port label is the one it connected to.
    #[test]
    fn a_refused_connect_is_outbound_whatever_its_ports() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let sock = ka_common::SockSnapshot {
            sport: 40_001,
            dport: 50_000,
            ..socket(9, tcp_state::SYN_SENT)
        };
        tracker.handle(&Event::ReceiveReset(ReceiveResetEvent {
            header: header(EventKind::ReceiveReset, 1_000),
            sock,
        }));
        tracker.handle(&Event::StateChange(StateChangeEvent {
            header: header(EventKind::StateChange, 1_001),
            sock,
            oldstate: tcp_state::SYN_SENT,
            newstate: tcp_state::CLOSE,
            reserved: [0; 2],
            socket_inode: 0,
            connector: connector(1, "client"),
        }));
        tracker.settle_closes(u64::MAX);
        let closed: Vec<(crate::model::Direction, u16)> = tracker
            .drain_observations()
            .into_iter()
            .filter_map(|o| match o {
                Observation::Closed { labels, .. } => Some((labels.direction, labels.port)),
                _ => None,
            })
            .collect();
        assert_eq!(closed, [(crate::model::Direction::Outbound, 50_000)]);
    }

    #[test]
    fn an_outbound_connection_is_named_after_the_process_that_connected_it() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let Event::StateChange(mut opened) = transition(
            ka_common::SockSnapshot {
                sk: 0xC,
                ..socket(443, tcp_state::ESTABLISHED)
            },
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            1_000,
        ) else {
            unreachable!("a transition is a state change");
        };
        opened.connector = connector(1, "curl");
        tracker.handle(&Event::StateChange(opened));
        // A connect refused on another socket; then one whose `connect()`
        // came before the programs were attached: nobody to name.
        refused_from(&mut tracker, 9, 2_000, connector(2, "a-full-15-chars"));
        tracker.handle(&transition(
            ka_common::SockSnapshot {
                sk: 0xB,
                ..socket(8080, tcp_state::ESTABLISHED)
            },
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            3_000,
        ));
        tracker.settle_closes(u64::MAX);
        let mut names: Vec<(&str, u16, String)> = tracker
            .drain_observations()
            .into_iter()
            .filter_map(|o| match o {
                Observation::Opened(labels) => Some(("opened", labels.port, labels.comm)),
                Observation::Closed { labels, .. } => Some(("closed", labels.port, labels.comm)),
                _ => None,
            })
            .map(|(what, port, comm)| (what, port, comm.as_str().to_owned()))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("closed", 9, "a-full-15-chars".to_owned()),
                ("opened", 443, "curl".to_owned()),
                ("opened", 8080, String::new()),
            ]
        );
    }

    #[test]
    fn a_close_error_is_worded_without_its_number() {
        assert_eq!(crate::track::error_text(0), None);
        assert_eq!(
            crate::track::error_text(libc::ETIMEDOUT).as_deref(),
            Some("Connection timed out")
        );
        assert_eq!(
            crate::track::error_text(libc::EHOSTUNREACH).as_deref(),
            Some("No route to host")
        );
    }

    /// The soft error is the socket's as of its latest event: shown while
    /// the kernel keeps it, gone once it cleared it.
    #[test]
    fn a_soft_error_follows_the_socket() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let established = socket(80, tcp_state::ESTABLISHED);
        tracker.handle(&transition(
            established,
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            1_000,
        ));
        let unreachable = ka_common::SockSnapshot {
            sk_err_soft: 113,
            ..established
        };
        tracker.handle(&transition(
            unreachable,
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE_WAIT,
            2_000,
        ));
        let conn = tracker.connection(0xA).unwrap();
        assert_eq!(conn.soft_error, 113);
        let json = serde_json::to_value(conn).unwrap();
        assert_eq!(json["soft_error"], "No route to host");
        tracker.handle(&transition(
            established,
            tcp_state::CLOSE_WAIT,
            tcp_state::CLOSE_WAIT,
            3_000,
        ));
        let json = serde_json::to_value(tracker.connection(0xA).unwrap()).unwrap();
        assert!(json.get("soft_error").is_none(), "{json}");
    }

    #[test]
    fn a_reused_socket_address_does_not_swallow_the_earlier_close() {
        // Two refused connects in a row, the second on the freed socket's
        // address, within the settle delay: the kernel sends no opening
        // event for either (they never reach ESTABLISHED).
        let mut tracker = Tracker::new(TrackerConfig::default());
        refused(&mut tracker, 9, 1_000);
        refused(&mut tracker, 8081, 2_000);
        tracker.settle_closes(u64::MAX);
        let closed: Vec<_> = tracker
            .drain_observations()
            .into_iter()
            .filter_map(|o| match o {
                Observation::Closed { labels, .. } => Some(labels.port),
                _ => None,
            })
            .collect();
        assert_eq!(closed.len(), 2, "{closed:?}");
    }

    #[test]
    fn a_connection_whose_close_was_skipped_is_closed_when_its_address_is_reused() {
        // A connection reaches FIN_WAIT1; the kernel skips the run that
        // would have sent its CLOSE; a new connection opens on the freed
        // socket's address.
        let mut tracker = Tracker::new(TrackerConfig::default());
        let first = socket(80, tcp_state::ESTABLISHED);
        tracker.handle(&transition(
            first,
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            1_000,
        ));
        tracker.handle(&transition(
            first,
            tcp_state::ESTABLISHED,
            tcp_state::FIN_WAIT1,
            2_000,
        ));
        let second = socket(443, tcp_state::ESTABLISHED);
        tracker.handle(&transition(
            second,
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            3_000,
        ));
        let observations = tracker.drain_observations();
        let opened = observations
            .iter()
            .filter(|o| matches!(o, Observation::Opened(_)))
            .count();
        let closed: Vec<_> = observations
            .iter()
            .filter_map(|o| match o {
                Observation::Closed { labels, cause, .. } => Some((labels.port, *cause)),
                _ => None,
            })
            .collect();
        assert_eq!(opened, 2);
        // Closed by the local side: a normal close, from its record.
        assert_eq!(closed, [(80, crate::model::CloseCause::Normal)]);
        assert_eq!(tracker.connections.len(), 1);
    }
}
