//! Connections the kernel ended under their application: killed by the
//! keepalive, retransmission or zero-window timer, or reset by the peer,
//! while a process still held the socket open. The kernel has closed and
//! unhashed such a socket (no `ss`, no `sock_diag` lists it), but the
//! process's descriptor stays until the application next uses it, and a
//! connection pool hands it out and fails: the application-level zombie.
//!
//! The socket's inode comes from the inventory that saw the connection
//! alive (with the process holding it), or else from the kernel program at
//! the close (the process then unknown: the inventory thread looks for the
//! inode in every process's descriptors). At each inventory it looks for
//! the inodes in their processes' descriptors; a socket still there is
//! held, one gone was released.

use crate::{
    inventory::HeldSockets,
    model::{CloseCause, Comm},
};

use super::{Connection, Holder, Labels, Tracker};

/// How long a dead connection's socket whose process is unknown is looked
/// for: the inventory thread rescans every process's descriptors at least
/// once a minute; a socket not found by then was closed first.
const UNKNOWN_HOLDER_NS: u64 = 120_000_000_000;

/// A dead connection whose socket its process held when last looked at.
#[derive(Clone, Debug)]
pub struct DeadHeld {
    pub holder: Holder,
    pub labels: Labels,
    pub cause: CloseCause,
    /// An inventory after the death found the socket still open (before
    /// that, only the inventory before the death had).
    pub confirmed: bool,
    comm: Comm,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    closed_at_ns: u64,
}

/// The causes by which the kernel ends a connection its application still
/// uses: the application learns of it only at its next call on the socket.
fn ends_under_application(cause: CloseCause) -> bool {
    match cause {
        CloseCause::KeepaliveTimeout
        | CloseCause::RetransmitTimeout
        | CloseCause::ZeroWindowTimeout
        | CloseCause::ResetReceived => true,
        CloseCause::Normal | CloseCause::ResetSent | CloseCause::Other => false,
    }
}

impl Tracker {
    /// Watches the socket of `conn`, which ended by `cause`, if its
    /// application may still hold it.
    pub(super) fn note_dead(&mut self, conn: &Connection, cause: CloseCause, closed_at_ns: u64) {
        let Some(holder) = conn.holder else {
            return;
        };
        if !ends_under_application(cause) {
            return;
        }
        if self.dead_held.len() >= self.config.max_connections {
            self.dead_held_unwatched += 1;
            tracing::debug!(
                inode = holder.inode,
                "too many dead connections watched; not this one"
            );
            return;
        }
        self.dead_held.insert(
            holder.inode,
            DeadHeld {
                holder,
                labels: conn.labels(),
                cause,
                confirmed: false,
                comm: conn.comm.clone(),
                local: conn.local,
                remote: conn.remote,
                closed_at_ns,
            },
        );
    }

    /// Dead connections not watched for their holder because the watch
    /// already had `--max-connections` of them.
    pub fn dead_held_unwatched(&self) -> u64 {
        self.dead_held_unwatched
    }

    /// The sockets (process, inode) the next inventory should look for.
    pub fn dead_held_watch(&self) -> Vec<Holder> {
        self.dead_held.values().map(|d| d.holder).collect()
    }

    /// Dead connections whose sockets an inventory since their death found
    /// still held.
    pub fn dead_held(&self) -> impl Iterator<Item = &DeadHeld> {
        self.dead_held.values().filter(|d| d.confirmed)
    }

    /// Applies what an inventory found of the watched sockets; those
    /// watched since it began are left for the next. `now_ns`: when its
    /// dump began.
    pub(super) fn check_dead_held(&mut self, holds: &HeldSockets, now_ns: Option<u64>) {
        for (inode, owner) in &holds.found {
            let Some(dead) = self.dead_held.get_mut(inode) else {
                continue;
            };
            if dead.holder.pid != 0 {
                continue;
            }
            dead.holder.pid = owner.pid;
            if dead.comm.is_empty() {
                dead.comm = owner.comm.clone();
                dead.labels.comm = owner.comm.clone();
                if let Some(closed) = self
                    .recently_closed_abnormally
                    .iter_mut()
                    .rev()
                    .find(|c| c.connection.holder.is_some_and(|h| h.inode == *inode))
                {
                    closed.connection.comm = owner.comm.clone();
                }
            }
        }
        if let Some(now_ns) = now_ns {
            self.dead_held.retain(|_, dead| {
                let looking = dead.holder.pid != 0
                    || dead.closed_at_ns.saturating_add(UNKNOWN_HOLDER_NS) > now_ns;
                if !looking {
                    tracing::debug!(
                        inode = dead.holder.inode,
                        local = %dead.local,
                        remote = %dead.remote,
                        "no process holds a dead connection's socket: closed before any inventory found it"
                    );
                }
                looking
            });
        }
        for inode in &holds.checked {
            let Some(dead) = self.dead_held.get_mut(inode) else {
                continue;
            };
            let holder = dead.holder;
            if !holds.held.contains(inode) {
                tracing::debug!(
                    comm = %dead.comm,
                    pid = dead.holder.pid,
                    local = %dead.local,
                    remote = %dead.remote,
                    "a dead connection's socket was released"
                );
                self.dead_held.remove(inode);
                self.show_held(holder, None);
            } else if !dead.confirmed {
                dead.confirmed = true;
                tracing::info!(
                    comm = %dead.comm,
                    pid = dead.holder.pid,
                    local = %dead.local,
                    remote = %dead.remote,
                    cause = dead.cause.name(),
                    closed_at_ns = dead.closed_at_ns,
                    "the kernel ended this connection and its process still holds the socket: its next use fails"
                );
                self.show_held(holder, Some(holder.pid));
            }
        }
    }

    /// Sets who holds the socket in the API's record of the close.
    fn show_held(&mut self, holder: Holder, pid: Option<u32>) {
        if let Some(closed) = self
            .recently_closed_abnormally
            .iter_mut()
            .rev()
            .find(|c| c.connection.holder.is_some_and(|h| h.inode == holder.inode))
        {
            closed.held_by_pid = pid;
        }
    }
}

#[cfg(test)]
mod tests {
    use ka_common::{SockSnapshot, tcp_state};

    use super::*;
    use crate::track::{
        TrackerConfig,
        fixtures::{connected, socket, transition},
    };

    const SOCKET_INODE: u64 = 777;

    /// An established connection whose socket an inventory found held by
    /// pid 42, ended by `sk_err` (a reset when `reset`).
    fn ended(sk_err: i32, reset: bool) -> Tracker {
        let mut tracker = Tracker::new(TrackerConfig::default());
        end(
            &mut tracker,
            socket(80, tcp_state::SYN_SENT),
            SOCKET_INODE,
            sk_err,
            reset,
        );
        tracker
    }

    /// Ends `sock`, whose socket inode `inode` pid 42 holds, in `tracker`.
    fn end(tracker: &mut Tracker, sock: SockSnapshot, inode: u64, sk_err: i32, reset: bool) {
        tracker.handle(&connected(sock, 1_000));
        let conn = tracker.connections.get_mut(&sock.sk).unwrap();
        conn.holder = Some(Holder { pid: 42, inode });
        conn.reset_received = reset;
        tracker.handle(&transition(
            SockSnapshot {
                sk_err,
                retransmits: 5,
                ..sock
            },
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE,
            2_000,
        ));
        tracker.settle_closes(1_000_000_000);
    }

    fn holds(held: &[u64]) -> HeldSockets {
        HeldSockets {
            checked: vec![SOCKET_INODE],
            held: held.iter().copied().collect(),
            found: std::collections::HashMap::new(),
        }
    }

    #[test]
    fn a_connection_the_kernel_ended_is_held_until_its_socket_is_released() {
        let mut tracker = ended(libc::ETIMEDOUT, false);
        assert_eq!(
            tracker.dead_held_watch(),
            [Holder {
                pid: 42,
                inode: SOCKET_INODE
            }]
        );
        // Not held yet: no inventory has looked since the death.
        assert_eq!(tracker.dead_held().count(), 0);
        // Watched after this inventory began: left for the next.
        tracker.check_dead_held(&HeldSockets::default(), None);
        assert_eq!(tracker.dead_held_watch().len(), 1);
        tracker.check_dead_held(&holds(&[SOCKET_INODE]), None);
        let held: Vec<&DeadHeld> = tracker.dead_held().collect();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].cause, CloseCause::RetransmitTimeout);
        let shown = |tracker: &Tracker| tracker.recently_closed()[0].held_by_pid;
        assert_eq!(shown(&tracker), Some(42));
        tracker.check_dead_held(&holds(&[]), None);
        assert_eq!(tracker.dead_held().count(), 0);
        assert!(tracker.dead_held_watch().is_empty());
        assert_eq!(shown(&tracker), None);
    }

    #[test]
    fn a_reset_connection_is_watched_and_a_normal_close_is_not() {
        let tracker = ended(libc::ECONNRESET, true);
        assert_eq!(tracker.dead_held_watch().len(), 1);
        let tracker = ended(0, false);
        assert!(tracker.dead_held_watch().is_empty());
    }

    #[test]
    fn a_dead_connection_beyond_the_watch_is_counted_not_watched() {
        let mut tracker = Tracker::new(TrackerConfig {
            max_connections: 1,
            ..TrackerConfig::default()
        });
        let first = socket(80, tcp_state::SYN_SENT);
        end(&mut tracker, first, SOCKET_INODE, libc::ETIMEDOUT, false);
        let second = SockSnapshot {
            sk: 0xB,
            ..socket(81, tcp_state::SYN_SENT)
        };
        end(
            &mut tracker,
            second,
            SOCKET_INODE + 1,
            libc::ETIMEDOUT,
            false,
        );
        assert_eq!(tracker.dead_held_watch().len(), 1);
        assert_eq!(tracker.dead_held_unwatched(), 1);
    }

    /// A connection reset before any inventory saw it: the close names the
    /// socket's inode (555), and no process.
    fn reset_named_at_its_close() -> Tracker {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let sock = socket(80, tcp_state::SYN_SENT);
        tracker.handle(&connected(sock, 1_000));
        let conn = tracker.connections.get_mut(&sock.sk).unwrap();
        conn.reset_received = true;
        let crate::decode::Event::StateChange(mut close) = transition(
            SockSnapshot {
                sk_err: libc::ECONNRESET,
                ..sock
            },
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE,
            2_000,
        ) else {
            unreachable!("a transition is a state change");
        };
        close.socket_inode = 555;
        tracker.handle(&crate::decode::Event::StateChange(close));
        tracker.settle_closes(1_000_000_000);
        tracker
    }

    /// An inventory then finds the process and its name.
    #[test]
    fn a_socket_named_only_at_its_death_is_found_in_some_process() {
        let mut tracker = reset_named_at_its_close();
        let unknown = Holder { pid: 0, inode: 555 };
        assert_eq!(tracker.dead_held_watch(), [unknown]);
        // Not found yet: still looked for, until two minutes after the death.
        tracker.check_dead_held(&HeldSockets::default(), Some(60_000_000_000));
        assert_eq!(tracker.dead_held_watch(), [unknown]);
        let owner = crate::attribution::Owner {
            pid: 42,
            comm: Comm::new("pool"),
            workload: crate::attribution::Workload::default(),
            pod: None,
        };
        let found = HeldSockets {
            checked: vec![555],
            held: [555].into(),
            found: [(555, owner)].into(),
        };
        tracker.check_dead_held(&found, Some(61_000_000_000));
        let held: Vec<&DeadHeld> = tracker.dead_held().collect();
        assert_eq!(held.len(), 1);
        assert_eq!(
            (held[0].holder.pid, held[0].cause),
            (42, CloseCause::ResetReceived)
        );
        assert_eq!(held[0].labels.comm, "pool");
        assert_eq!(tracker.recently_closed()[0].held_by_pid, Some(42));
        assert_eq!(tracker.recently_closed()[0].connection.comm, "pool");
    }

    #[test]
    fn a_socket_no_process_is_found_holding_is_given_up_after_two_minutes() {
        let mut tracker = reset_named_at_its_close();
        tracker.check_dead_held(&HeldSockets::default(), Some(119_000_000_000));
        assert_eq!(tracker.dead_held_watch().len(), 1);
        tracker.check_dead_held(&HeldSockets::default(), Some(121_000_000_000));
        assert!(tracker.dead_held_watch().is_empty());
    }
}
