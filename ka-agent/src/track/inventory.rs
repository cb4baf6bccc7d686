//! Reconciles the connection table with a `sock_diag` inventory.
//!
//! The table is keyed by the kernel socket address (`sk`) that eBPF events
//! carry; `sock_diag` gives none, only the socket cookie, which equals the
//! eBPF snapshot's `cookie` once generated (the dump generates it). So a
//! connection first found by the inventory is keyed by its cookie (cookies
//! are small counters, kernel addresses are not: the two never collide),
//! and moves to its `sk` key when the first eBPF event for it arrives
//! ([`Tracker::claim_inventoried`]).

use std::{collections::HashMap, hash::BuildHasher as _, net::SocketAddr};

use super::{Connection, Keepalive, NameSource, Tracker};
use crate::{
    attribution::Owner,
    inventory::{InventoryUpdate, KeepaliveEvidence, NamespaceInventory, SocketEntry},
    model::{Direction, TcpState},
};

/// The least time closes are kept for the reconciliation (see
/// `InventoryState::closed_kept_ns`): a dump and its reconciliation of a
/// small table take milliseconds.
const MIN_CLOSED_KEPT_NS: u64 = 1_000_000_000;

/// How long closes are kept before the first inventory is reconciled:
/// longer than a first inventory of a few hundred thousand sockets takes,
/// and bounded should it never come (a failing inventory).
const FIRST_CLOSED_KEPT_NS: u64 = 20_000_000_000;

/// Inventories in a row that must miss a namespace, with no event from it
/// since the first of them, before its records are closed: one could race
/// a namespace being made.
const ABSENCES_BEFORE_GONE: u32 = 2;

/// How long a record in a closing state of a namespace no inventory finds
/// may go without an event before it is closed, when no event was lost
/// since its last: a namespace lives on, out of the inventory's sight (no
/// process, no mount), while the orphaned sockets of its deleted pod
/// finish closing (`tcp_fin_timeout`, the orphans' retransmissions:
/// minutes at most), and their own close events end them.
const ORPHAN_LINGER_NS: u64 = 600_000_000_000;

/// The tracker's record of what the inventory contributed.
#[derive(Debug, Default)]
pub struct InventoryState {
    /// Records created from a dump and not seen in any event yet, by key
    /// (their cookie): what the dump proved about their keepalive.
    adopted: HashMap<u64, KeepaliveEvidence>,
    /// The same records by (netns, local, remote), for events without a
    /// cookie (kernels where the cookie offset is absent).
    adopted_by_tuple: HashMap<(u32, SocketAddr, SocketAddr), u64>,
    /// Connections that closed lately, by a hash of (netns, local,
    /// remote), with when: a socket a dump saw, that closed before the
    /// dump was reconciled, is not adopted from it.
    closed_lately: hashbrown::HashMap<u64, u64>,
    closed_hasher: hashbrown::DefaultHashBuilder,
    /// How long closes are kept in `closed_lately`: twice the last
    /// inventory's time from the start of its dump; before the first is
    /// reconciled, `FIRST_CLOSED_KEPT_NS`.
    closed_kept_ns: Option<u64>,
    /// At least one inventory was reconciled.
    first_done: bool,
    /// Records removed because their socket was gone from a dump.
    vanished_total: u64,
    /// The listening ports of each namespace at its last dump, with the
    /// process that listens when one alone does.
    listeners: hashbrown::HashMap<(u32, u16), Option<Listener>>,
    /// Namespaces of tracked records that the last inventories did not
    /// find (see [`Tracker::close_gone_namespaces`]).
    absent: hashbrown::HashMap<u32, Absence>,
    /// When events were last found lost, skipped or never read.
    last_loss_ns: Option<u64>,
}

/// A namespace missing from inventories in a row.
#[derive(Clone, Copy, Debug)]
struct Absence {
    /// Inventories in a row without it, and without an event from it
    /// since the first of them began.
    inventories: u32,
    since_ns: u64,
}

/// Who listens on a port: the name an accepted connection carries until
/// an inventory finds its own owner (the process that accepted it, in
/// practice the same program). Without it a connection that opens and
/// closes between two inventories has no `comm`.
#[derive(Debug)]
struct Listener {
    comm: crate::model::Comm,
    pod: Option<Box<crate::attribution::PodLabels>>,
}

/// What one reconciliation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Connections found by the dump that the table did not know.
    pub adopted: usize,
    /// Tracked connections whose idle time and probes were refreshed.
    pub refreshed: usize,
    /// Tracked connections whose socket was gone without an event.
    pub vanished: usize,
    pub namespaces: usize,
}

/// Where the keepalive settings of a record come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepaliveSource {
    /// An eBPF snapshot of the socket: exact.
    Socket,
    /// A dump: on/off from the pending timer, values from the namespace's
    /// sysctls (a socket's own shorter `TCP_KEEPIDLE` is not visible).
    Inventory(KeepaliveEvidence),
}

/// The process holding a dumped socket, if the attribution found one.
fn holder(entry: &SocketEntry, owner: Option<&Owner>) -> Option<super::Holder> {
    owner
        .filter(|_| entry.inode != 0)
        .map(|owner| super::Holder {
            pid: owner.pid,
            inode: entry.inode,
        })
}

/// States worth a record: the ones [`Tracker::adopt`] accepts, less
/// `SYN_RECV` (request sockets; the handshake's events create the record).
fn adoptable(state: TcpState) -> bool {
    !matches!(
        state,
        TcpState::Listen
            | TcpState::Close
            | TcpState::TimeWait
            | TcpState::NewSynRecv
            | TcpState::SynRecv
            | TcpState::Unknown
    )
}

impl Tracker {
    /// Brings the table in line with an inventory: adopts the connections
    /// it did not know (they existed before the agent, or their events were
    /// lost), refreshes idle times of the known ones (correcting the
    /// extrapolation from their last event), removes those whose socket is
    /// gone from the dump of their namespace without an event, and names
    /// the owning process. Namespaces absent from the inventory are left
    /// alone, a socket cannot be proven gone there, until they stay absent
    /// (see [`Self::close_gone_namespaces`]).
    pub fn reconcile(&mut self, update: &InventoryUpdate) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        self.connector_names.set_pods(update.pods.clone());
        for namespace in &update.inventory.namespaces {
            self.reconcile_namespace(namespace, &update.owners, &mut report);
            report.namespaces += 1;
        }
        if !update.own_namespace_only {
            self.close_gone_namespaces(&update.inventory.namespaces, &mut report);
        }
        let dumped_at_ns = update
            .inventory
            .namespaces
            .iter()
            .map(|n| n.dumped_at_ns)
            .min();
        self.check_dead_held(&update.holds, dumped_at_ns);
        let took_ns = u64::try_from(update.took.as_nanos()).unwrap_or(u64::MAX);
        self.inventory.closed_kept_ns = Some(took_ns.saturating_mul(2).max(MIN_CLOSED_KEPT_NS));
        self.inventory.first_done = true;
        self.inventory.vanished_total += report.vanished as u64;
        report
    }

    /// Events were found lost, skipped or never read at `at_ns`: closes
    /// among them may be missing from the records touched before.
    pub fn note_loss(&mut self, at_ns: u64) {
        self.inventory.last_loss_ns = Some(at_ns);
    }

    /// An inventory was reconciled: `/readyz` may say ready.
    pub fn inventory_done(&self) -> bool {
        self.inventory.first_done
    }

    /// The record under `key` (`sk`, or the cookie of a record adopted
    /// from a dump and not evented yet).
    pub fn connection(&self, key: u64) -> Option<&Connection> {
        self.connections.get(&key).map(|c| &**c)
    }

    /// Records removed because their socket vanished between dumps.
    pub fn vanished_total(&self) -> u64 {
        self.inventory.vanished_total
    }

    /// Where the keepalive settings of the record under `key` come from.
    pub fn keepalive_source(&self, key: u64) -> KeepaliveSource {
        self.inventory
            .adopted
            .get(&key)
            .map_or(KeepaliveSource::Socket, |e| KeepaliveSource::Inventory(*e))
    }

    fn reconcile_namespace(
        &mut self,
        namespace: &NamespaceInventory,
        owners: &HashMap<u64, Owner>,
        report: &mut ReconcileReport,
    ) {
        let netns = namespace.netns;
        // Sized and hashed for hundreds of thousands of connections: the
        // reconciliation holds the event loop (SipHash and regrowing took
        // a third of 300 ms with 200,000 connections).
        let tracked = self.connections.len();
        let mut by_cookie: hashbrown::HashMap<u64, u64> =
            hashbrown::HashMap::with_capacity(tracked);
        let mut by_tuple: hashbrown::HashMap<(SocketAddr, SocketAddr), u64> =
            hashbrown::HashMap::with_capacity(tracked);
        for conn in self.connections.values().filter(|c| c.netns == netns) {
            if conn.cookie != 0 {
                by_cookie.insert(conn.cookie, conn.sk);
            }
            by_tuple.insert((conn.local, conn.remote), conn.sk);
        }
        self.note_listeners(namespace, owners);
        let mut seen: hashbrown::HashSet<u64> =
            hashbrown::HashSet::with_capacity(namespace.sockets.len());
        for entry in &namespace.sockets {
            if !adoptable(entry.state) || entry.cookie == 0 {
                continue;
            }
            let key = by_cookie
                .get(&entry.cookie)
                .or_else(|| by_tuple.get(&(entry.local, entry.remote)))
                .copied();
            let owner = owners.get(&entry.inode);
            if key.is_none()
                && self.closed_since(netns, entry.local, entry.remote, namespace.dumped_at_ns)
            {
                // Alive when the dump saw it, closed (and counted) since.
                continue;
            }
            if let Some(key) = key {
                seen.insert(key);
                if self.refresh_from(key, entry, namespace, owner) {
                    report.refreshed += 1;
                }
            } else {
                seen.insert(entry.cookie);
                // A connection on the port of a listener of its namespace
                // was accepted, one to such a port (the other end of a
                // connection inside the namespace) made: better witnesses
                // of direction than port ranges.
                let listening = |port: u16| self.inventory.listeners.contains_key(&(netns, port));
                let direction = if listening(entry.local.port()) {
                    Direction::Inbound
                } else if listening(entry.remote.port()) {
                    Direction::Outbound
                } else {
                    self.direction_of(entry)
                };
                self.adopt_entry(entry, direction, namespace, owner);
                report.adopted += 1;
            }
        }
        // Gone from the dump, and not touched by an event since it began
        // (a connection opened during the dump is not in it).
        let vanished: Vec<u64> = self
            .connections
            .values()
            .filter(|c| {
                c.netns == netns
                    && !seen.contains(&c.sk)
                    && c.last_event_ns < namespace.dumped_at_ns
            })
            .map(|c| c.sk)
            .collect();
        for key in vanished {
            if let Some(conn) = self.connections.remove(&key) {
                report.vanished += 1;
                // Its CLOSE was never seen: a kernel run skipped (nested
                // in itself on that CPU, see ka_program_misses_total) or
                // an event lost. It is closed all the same, from what the
                // record holds (a reset sent by the keepalive timer, the
                // error reported), as of the dump that found it gone.
                self.close_unseen(conn, namespace.dumped_at_ns, "gone from the inventory");
            }
        }
    }

    /// Closes the records of a namespace that is gone: absent from
    /// [`ABSENCES_BEFORE_GONE`] inventories of every namespace in a row,
    /// with no event from it since the first of them began. A namespace
    /// dies only once no socket is left in it, so its connections closed;
    /// records stay only where their close events were lost (a pod deleted
    /// during a burst), and no dump of that namespace will ever find them
    /// gone: without this they would stay tracked, idle and at risk, until
    /// the agent restarts. A namespace kept alive only by a socket held
    /// from another one, or by a mount outside `/run/netns`, is out of the
    /// inventory's sight too: its connections' next events bring them back.
    /// So is one kept alive by the orphans of its deleted pod, closing
    /// alone: their records (in a closing state) wait for their own close
    /// events, unless events were lost since their last
    /// ([`ORPHAN_LINGER_NS`] at most).
    fn close_gone_namespaces(
        &mut self,
        dumped: &[NamespaceInventory],
        report: &mut ReconcileReport,
    ) {
        let Some(began_ns) = dumped.iter().map(|n| n.dumped_at_ns).min() else {
            return;
        };
        let found: hashbrown::HashSet<u32> = dumped.iter().map(|n| n.netns).collect();
        let mut latest_event: hashbrown::HashMap<u32, u64> = hashbrown::HashMap::new();
        for conn in self.connections.values() {
            if !found.contains(&conn.netns) {
                let latest = latest_event.entry(conn.netns).or_default();
                *latest = (*latest).max(conn.last_event_ns);
            }
        }
        let absent = &mut self.inventory.absent;
        absent.retain(|netns, _| latest_event.contains_key(netns));
        let mut gone = Vec::new();
        for (netns, last_event_ns) in latest_event {
            match absent.get_mut(&netns) {
                Some(absence) if last_event_ns < absence.since_ns => {
                    absence.inventories += 1;
                    if absence.inventories >= ABSENCES_BEFORE_GONE {
                        gone.push(netns);
                    }
                }
                _ => {
                    absent.insert(
                        netns,
                        Absence {
                            inventories: 1,
                            since_ns: began_ns,
                        },
                    );
                }
            }
        }
        if gone.is_empty() {
            return;
        }
        for netns in &gone {
            self.inventory.absent.remove(netns);
        }
        self.inventory
            .listeners
            .retain(|(netns, _), _| !gone.contains(netns));
        // A socket its process closed can outlive the process and keep
        // the namespace alive: it ends with its own close event, unless
        // events were lost since its last (its close among them).
        let last_loss_ns = self.inventory.last_loss_ns;
        let lingering = |c: &Connection| {
            c.state.is_orphanable()
                && last_loss_ns.is_none_or(|loss| loss < c.last_event_ns)
                && c.last_event_ns.saturating_add(ORPHAN_LINGER_NS) > began_ns
        };
        let closed: Vec<u64> = self
            .connections
            .values()
            .filter(|c| gone.contains(&c.netns) && !lingering(c))
            .map(|c| c.sk)
            .collect();
        if closed.is_empty() {
            return;
        }
        tracing::info!(
            namespaces = ?gone,
            connections = closed.len(),
            "network namespaces gone: their remaining connections closed"
        );
        for key in closed {
            if let Some(conn) = self.connections.remove(&key) {
                report.vanished += 1;
                self.close_unseen(conn, began_ns, "its network namespace is gone");
            }
        }
    }

    /// Replaces what the last dump of `namespace` said about its listeners.
    /// Two processes listening on one port (different addresses, or
    /// different programs sharing it) name nobody.
    fn note_listeners(&mut self, namespace: &NamespaceInventory, owners: &HashMap<u64, Owner>) {
        let netns = namespace.netns;
        let listeners = &mut self.inventory.listeners;
        listeners.retain(|&(of, _), _| of != netns);
        for entry in namespace.sockets.iter().filter(|s| s.is_listening()) {
            let owner = owners.get(&entry.inode);
            let listener = owner.map(|o| Listener {
                comm: o.comm.clone(),
                pod: o.pod.clone().map(Box::new),
            });
            listeners
                .entry((netns, entry.local.port()))
                .and_modify(|known| {
                    let same = match (&*known, &listener) {
                        (Some(a), Some(b)) => a.comm == b.comm && a.pod == b.pod,
                        _ => false,
                    };
                    if !same {
                        *known = None;
                    }
                })
                .or_insert(listener);
        }
    }

    /// Names a connection just accepted after the process listening on
    /// its port, if one alone does (see [`Listener`]).
    pub(super) fn name_after_listener(&self, conn: &mut Connection) {
        if let Some(Some(listener)) = self
            .inventory
            .listeners
            .get(&(conn.netns, conn.local.port()))
        {
            conn.comm.clone_from(&listener.comm);
            conn.pod.clone_from(&listener.pod);
            conn.name_source = NameSource::Listener;
        }
    }

    /// Refreshes a tracked record from its dump entry; false when an event
    /// newer than the dump already said more.
    fn refresh_from(
        &mut self,
        key: u64,
        entry: &SocketEntry,
        namespace: &NamespaceInventory,
        owner: Option<&Owner>,
    ) -> bool {
        let adopted = self.inventory.adopted.contains_key(&key);
        let Some(conn) = self.connections.get_mut(&key) else {
            return false;
        };
        if let Some(owner) = owner {
            if conn.comm.is_empty() || conn.name_source != NameSource::Owner {
                conn.comm.clone_from(&owner.comm);
                conn.name_source = NameSource::Owner;
            }
            conn.pod = owner.pod.clone().map(Box::new);
        }
        conn.holder = holder(entry, owner);
        if conn.last_event_ns > namespace.dumped_at_ns {
            return false;
        }
        conn.cookie = entry.cookie;
        if let Some(idle) = entry.idle_secs() {
            conn.idle_at_event_secs = idle;
            conn.last_event_ns = namespace.dumped_at_ns;
        }
        if adopted {
            conn.state = entry.state;
            let evidence = entry.keepalive_evidence();
            apply_evidence(&mut conn.keepalive, entry, evidence, namespace);
            self.inventory.adopted.insert(key, evidence);
        }
        true
    }

    fn adopt_entry(
        &mut self,
        entry: &SocketEntry,
        direction: Direction,
        namespace: &NamespaceInventory,
        owner: Option<&Owner>,
    ) {
        let mut conn = Connection::for_tests(entry.local, entry.remote, direction, entry.state);
        conn.sk = entry.cookie;
        conn.cookie = entry.cookie;
        conn.netns = entry.netns;
        conn.peer_label = self.config.peer_label;
        conn.was_established = !matches!(entry.state, TcpState::SynSent);
        conn.state_since_ns = 0;
        conn.last_event_ns = namespace.dumped_at_ns;
        conn.idle_at_event_secs = entry.idle_secs().unwrap_or(0.0);
        conn.comm = owner.map(|o| o.comm.clone()).unwrap_or_default();
        conn.pod = owner.and_then(|o| o.pod.clone()).map(Box::new);
        conn.holder = holder(entry, owner);
        let evidence = entry.keepalive_evidence();
        apply_evidence(&mut conn.keepalive, entry, evidence, namespace);
        self.inventory.adopted.insert(conn.sk, evidence);
        self.inventory
            .adopted_by_tuple
            .insert((conn.netns, conn.local, conn.remote), conn.sk);
        self.insert(conn);
    }

    fn direction_of(&self, entry: &SocketEntry) -> Direction {
        let (low, high) = self.config.ephemeral_ports;
        let ephemeral = |port: u16| (low..=high).contains(&port);
        let (local, remote) = (entry.local.port(), entry.remote.port());
        match (ephemeral(local), ephemeral(remote)) {
            (true, false) => Direction::Outbound,
            (false, true) => Direction::Inbound,
            _ if local < remote => Direction::Inbound,
            _ => Direction::Outbound,
        }
    }

    fn closed_key(&self, netns: u32, local: SocketAddr, remote: SocketAddr) -> u64 {
        self.inventory
            .closed_hasher
            .hash_one((netns, local, remote))
    }

    /// Remembers a close for the reconciliation of a dump under way.
    pub(super) fn note_closed(
        &mut self,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        closed_at_ns: u64,
    ) {
        let key = self.closed_key(netns, local, remote);
        self.inventory.closed_lately.insert(key, closed_at_ns);
    }

    /// Whether the connection (netns, local, remote) closed at or after
    /// `since_ns`.
    fn closed_since(
        &self,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        since_ns: u64,
    ) -> bool {
        self.inventory
            .closed_lately
            .get(&self.closed_key(netns, local, remote))
            .is_some_and(|closed_at| *closed_at >= since_ns)
    }

    /// Forgets the closes no dump still to be reconciled can have seen
    /// alive.
    pub(super) fn forget_old_closes(&mut self, now_ns: u64) {
        let kept_ns = self
            .inventory
            .closed_kept_ns
            .unwrap_or(FIRST_CLOSED_KEPT_NS);
        self.inventory
            .closed_lately
            .retain(|_, closed_at| closed_at.saturating_add(kept_ns) >= now_ns);
    }

    pub(super) fn forget_adopted(&mut self, conn: &Connection) {
        if self.inventory.adopted.remove(&conn.sk).is_some() {
            self.inventory
                .adopted_by_tuple
                .remove(&(conn.netns, conn.local, conn.remote));
        }
    }

    /// Moves a record adopted from a dump to the `sk` key of the first
    /// eBPF event about its socket (matched by cookie, or by addresses when
    /// the event has no cookie). Called before an event looks its socket up.
    pub(super) fn claim_inventoried(&mut self, snap: &ka_common::SockSnapshot) {
        if self.inventory.adopted.is_empty() || self.connections.contains_key(&snap.sk) {
            return;
        }
        let key = if snap.cookie != 0 && self.inventory.adopted.contains_key(&snap.cookie) {
            Some(snap.cookie)
        } else {
            let local = super::socket_addr(snap.family, snap.saddr, snap.sport);
            let remote = super::socket_addr(snap.family, snap.daddr, snap.dport);
            self.inventory
                .adopted_by_tuple
                .get(&(snap.netns, local, remote))
                .copied()
        };
        let Some(key) = key else { return };
        if let Some(mut conn) = self.connections.remove(&key) {
            self.forget_adopted(&conn);
            conn.sk = snap.sk;
            self.connections.insert(snap.sk, conn);
        }
    }
}

/// Keepalive of a record known only from dumps.
fn apply_evidence(
    keepalive: &mut Keepalive,
    entry: &SocketEntry,
    evidence: KeepaliveEvidence,
    namespace: &NamespaceInventory,
) {
    #[expect(clippy::cast_precision_loss, reason = "sysctl seconds are small")]
    let (time, intvl) = (
        namespace.keepalive.time_secs as f64,
        namespace.keepalive.intvl_secs as f64,
    );
    match evidence {
        KeepaliveEvidence::On => keepalive.enabled = true,
        KeepaliveEvidence::Off => keepalive.enabled = false,
        // Hidden by another timer: keep what the previous dump showed.
        KeepaliveEvidence::Unknown => {}
    }
    // A pending keepalive timer further away than both the sysctl's idle
    // time and its interval (the timer is re-armed at the interval after
    // each probe) proves the socket set a longer TCP_KEEPIDLE of its own.
    let timer_secs = f64::from(entry.timer_expires_ms) / 1000.0;
    let lower_bound = if evidence == KeepaliveEvidence::On && timer_secs > time.max(intvl) + 1.0 {
        Some(timer_secs)
    } else {
        None
    };
    keepalive.idle_secs = lower_bound.unwrap_or(time);
    keepalive.idle_from_socket = lower_bound.is_some();
    keepalive.interval_secs = intvl;
    keepalive.probes = u8::try_from(namespace.keepalive.probes).unwrap_or(u8::MAX);
    keepalive.interval_from_socket = false;
    keepalive.probes_from_socket = false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        inventory::{DiagTimer, Inventory, KeepaliveSysctls, TcpInfoSummary},
        track::TrackerConfig,
    };

    fn entry(
        cookie: u64,
        local: &str,
        remote: &str,
        timer: DiagTimer,
        idle_ms: u32,
    ) -> SocketEntry {
        SocketEntry {
            netns: 7,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: TcpState::Established,
            inode: cookie + 1000,
            cookie,
            uid: 0,
            timer,
            timer_expires_ms: 5000,
            timer_retransmits: 0,
            tcp_info: Some(TcpInfoSummary {
                state: 1,
                retransmits: 0,
                probes: 0,
                backoff: 0,
                last_data_sent_ms: idle_ms,
                last_data_recv_ms: idle_ms,
                last_ack_recv_ms: idle_ms,
            }),
            cgroup_id: None,
        }
    }

    fn update(sockets: Vec<SocketEntry>, at_ns: u64) -> InventoryUpdate {
        let owners = sockets
            .iter()
            .map(|s| {
                (
                    s.inode,
                    Owner {
                        pid: 42,
                        comm: crate::model::Comm::new("client"),
                        workload: crate::attribution::Workload::default(),
                        pod: None,
                    },
                )
            })
            .collect();
        InventoryUpdate {
            inventory: Inventory {
                namespaces: vec![NamespaceInventory {
                    netns: 7,
                    path: None,
                    keepalive: KeepaliveSysctls {
                        time_secs: 600,
                        intvl_secs: 10,
                        probes: 3,
                    },
                    conntrack_established_secs: None,
                    dumped_at_ns: at_ns,
                    sockets,
                }],
            },
            owners,
            dump_took: std::time::Duration::ZERO,
            took: std::time::Duration::ZERO,
            pod_list_failed: false,
            pods: None,
            own_namespace_only: false,
            trigger: crate::inventory::Trigger::Interval,
            holds: crate::inventory::HeldSockets::default(),
        }
    }

    /// Both ends of a connection inside a namespace, both ports ephemeral:
    /// the listener tells which end accepted and which connected, whatever
    /// the port numbers' order.
    #[test]
    fn a_listener_tells_both_ends_directions() {
        let listener = SocketEntry {
            state: TcpState::Listen,
            ..entry(9, "127.0.0.1:50000", "0.0.0.0:0", DiagTimer::None, 0)
        };
        let accepted = entry(1, "127.0.0.1:50000", "127.0.0.1:40000", DiagTimer::None, 0);
        let connected = entry(2, "127.0.0.1:40000", "127.0.0.1:50000", DiagTimer::None, 0);
        let mut tracker = Tracker::new(TrackerConfig::default());
        tracker.reconcile(&update(vec![listener, accepted, connected], 1_000_000_000));
        let direction = |cookie| tracker.connections.get(&cookie).unwrap().direction;
        assert_eq!(direction(1), Direction::Inbound);
        assert_eq!(direction(2), Direction::Outbound);
    }

    #[test]
    fn an_accepted_connection_carries_its_listeners_name_until_its_own_is_known() {
        use ka_common::tcp_state;

        use crate::track::{
            Observation,
            fixtures::{socket, transition},
        };

        let named = |comm: &str, sockets: Vec<SocketEntry>, at_ns| {
            let mut update = update(sockets, at_ns);
            for owner in update.owners.values_mut() {
                owner.comm = crate::model::Comm::new(comm);
            }
            update
        };
        let listener = |port: u16| SocketEntry {
            state: TcpState::Listen,
            ..entry(
                u64::from(port),
                &format!("198.18.10.1:{port}"),
                "0.0.0.0:0",
                DiagTimer::None,
                0,
            )
        };
        let mut tracker = Tracker::new(TrackerConfig::default());
        tracker.reconcile(&named("server", vec![listener(40080)], 1_000_000_000));
        // Accepted on the listener's port (the fixture's local port is
        // 40000 + its remote port).
        tracker.handle(&transition(
            socket(80, tcp_state::SYN_RECV),
            tcp_state::SYN_RECV,
            tcp_state::ESTABLISHED,
            2_000_000_000,
        ));
        assert_eq!(tracker.connections.get(&0xA).unwrap().comm, "server");
        let opened: Vec<_> = tracker
            .drain_observations()
            .into_iter()
            .filter_map(|o| match o {
                Observation::Opened(labels) => Some(labels.comm.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(opened, ["server"]);
        // The next inventory finds the socket's own owner.
        let accepted = entry(1, "198.18.10.1:40080", "198.18.10.2:80", DiagTimer::None, 0);
        tracker.reconcile(&named("worker", vec![accepted], 3_000_000_000));
        assert_eq!(tracker.connections.get(&0xA).unwrap().comm, "worker");

        // Another connection while nobody listens there any more: no name.
        let mut tracker = Tracker::new(TrackerConfig::default());
        tracker.reconcile(&named("server", vec![listener(40080)], 1_000_000_000));
        tracker.reconcile(&named("server", vec![], 2_000_000_000));
        tracker.handle(&transition(
            socket(80, tcp_state::SYN_RECV),
            tcp_state::SYN_RECV,
            tcp_state::ESTABLISHED,
            3_000_000_000,
        ));
        assert_eq!(tracker.connections.get(&0xA).unwrap().comm, "");
    }

    #[test]
    fn two_programs_listening_on_one_port_name_nobody() {
        use ka_common::tcp_state;

        use crate::track::fixtures::{socket, transition};

        let mut update = update(
            vec![
                SocketEntry {
                    state: TcpState::Listen,
                    ..entry(1, "198.18.10.1:40080", "0.0.0.0:0", DiagTimer::None, 0)
                },
                SocketEntry {
                    state: TcpState::Listen,
                    ..entry(2, "198.18.10.9:40080", "0.0.0.0:0", DiagTimer::None, 0)
                },
            ],
            1_000_000_000,
        );
        update.owners.get_mut(&1002).unwrap().comm = crate::model::Comm::new("other");
        let mut tracker = Tracker::new(TrackerConfig::default());
        tracker.reconcile(&update);
        tracker.handle(&transition(
            socket(80, tcp_state::SYN_RECV),
            tcp_state::SYN_RECV,
            tcp_state::ESTABLISHED,
            2_000_000_000,
        ));
        assert_eq!(tracker.connections.get(&0xA).unwrap().comm, "");
    }

    /// An inventory that found only namespace 9, at `at_ns`.
    fn without_namespace_7(at_ns: u64) -> InventoryUpdate {
        let mut update = update(vec![], at_ns);
        update.inventory.namespaces[0].netns = 9;
        update
    }

    fn closes(tracker: &mut Tracker) -> Vec<crate::model::CloseCause> {
        tracker
            .drain_observations()
            .into_iter()
            .filter_map(|o| match o {
                crate::track::Observation::Closed { cause, .. } => Some(cause),
                _ => None,
            })
            .collect()
    }

    /// A tracker that saw a connection's keepalive timer re-armed at 1 s,
    /// `interval` jiffies ahead (250 a second), after its third and last
    /// probe; then nothing more of it.
    fn last_probe_armed(interval: u32) -> Tracker {
        use ka_common::{EventKind, KeepaliveArmedEvent, SNAP_KEEPALIVE_ON, SockSnapshot};
        let mut tracker = Tracker::new(TrackerConfig::default());
        let jiffies = 250;
        tracker.handle(&crate::decode::Event::KeepaliveArmed(KeepaliveArmedEvent {
            header: crate::track::fixtures::header(EventKind::KeepaliveArmed, 1_000_000_000),
            sock: SockSnapshot {
                flags: SNAP_KEEPALIVE_ON,
                keepalive_probes: 3,
                keepalive_intvl: interval,
                probes_out: 3,
                jiffies,
                ..crate::track::fixtures::socket(9000, ka_common::tcp_state::ESTABLISHED)
            },
            expires: jiffies + u64::from(interval),
        }));
        let _ = tracker.drain_observations();
        tracker
    }

    /// Seen in the test suite: the last probe's re-arm was the last event
    /// the agent got for a connection; the kernel killed it at the next
    /// expiry, and no event of that (expiry, reset, error, CLOSE) came.
    /// Found gone after that expiry was due, it died of keepalive.
    #[test]
    fn a_connection_gone_after_its_last_probe_went_unanswered_died_of_keepalive() {
        let mut tracker = last_probe_armed(250);
        let report = tracker.reconcile(&update(vec![], 3_000_000_000));
        assert_eq!(report.vanished, 1);
        assert_eq!(
            closes(&mut tracker),
            [crate::model::CloseCause::KeepaliveTimeout]
        );
        assert_eq!(tracker.keepalive_expiries_unseen(), 1);
    }

    /// Found gone before its timer was due: nothing says how it ended.
    #[test]
    fn a_connection_gone_before_its_last_expiry_was_due_is_not_called_a_keepalive_death() {
        let mut tracker = last_probe_armed(2500);
        let report = tracker.reconcile(&update(vec![], 3_000_000_000));
        assert_eq!(report.vanished, 1);
        assert_eq!(closes(&mut tracker), [crate::model::CloseCause::Other]);
        assert_eq!(tracker.keepalive_expiries_unseen(), 0);
    }

    /// A namespace deleted after its connections' closes were lost: no
    /// dump of it will find them gone, so the records of a namespace two
    /// inventories in a row miss are closed, as `other`.
    #[test]
    fn the_records_of_a_namespace_that_is_gone_are_closed() {
        const S: u64 = 1_000_000_000;
        let mut tracker = Tracker::new(TrackerConfig::default());
        let held = entry(1, "10.0.0.1:40000", "10.0.0.2:443", DiagTimer::None, 0);
        let listener = SocketEntry {
            state: TcpState::Listen,
            ..entry(3, "10.0.0.1:8080", "0.0.0.0:0", DiagTimer::None, 0)
        };
        tracker.reconcile(&update(vec![held, listener], S));
        let _ = closes(&mut tracker);
        let report = tracker.reconcile(&without_namespace_7(2 * S));
        assert_eq!((report.vanished, tracker.len()), (0, 1), "missed once");
        let report = tracker.reconcile(&without_namespace_7(3 * S));
        assert_eq!((report.vanished, tracker.len()), (1, 0), "missed twice");
        assert_eq!(tracker.vanished_total(), 1);
        assert_eq!(closes(&mut tracker), [crate::model::CloseCause::Other]);
        assert!(tracker.inventory.absent.is_empty());
        assert!(
            tracker
                .inventory
                .listeners
                .keys()
                .all(|(netns, _)| *netns != 7)
        );
    }

    /// A deleted pod's namespace lives on, out of the inventory's sight,
    /// while the sockets its processes closed finish closing (orphans in
    /// `FIN_WAIT*`, `CLOSING` or `LAST_ACK`, whose retransmissions back off to
    /// minutes): their records wait for their own close events, and are
    /// closed only after ten minutes without one, or with their namespace
    /// when events were lost since their last.
    #[test]
    fn the_closing_orphans_of_an_unseen_namespace_end_with_their_own_close() {
        use ka_common::tcp_state;

        use crate::track::fixtures::{connected, socket, transition};

        const S: u64 = 1_000_000_000;
        // A connection of namespace 7 whose process closed it at 0.5 s.
        let closed_by_its_process = || {
            let mut tracker = Tracker::new(TrackerConfig::default());
            let sock = socket(80, tcp_state::SYN_SENT);
            tracker.handle(&connected(sock, S / 2));
            tracker.handle(&transition(
                sock,
                tcp_state::ESTABLISHED,
                tcp_state::FIN_WAIT1,
                S / 2 + 1,
            ));
            tracker
        };
        let mut tracker = closed_by_its_process();
        for at in 1..=3 {
            tracker.reconcile(&without_namespace_7(at * S));
        }
        assert_eq!(tracker.len(), 1, "closing: it lingers");
        assert_eq!(tracker.vanished_total(), 0);
        for at in [700, 701, 702] {
            tracker.reconcile(&without_namespace_7(at * S));
        }
        assert_eq!(tracker.len(), 0, "ten minutes without an event");
        assert_eq!(tracker.vanished_total(), 1);

        // Events lost since its last: its close may be among them.
        let mut tracker = closed_by_its_process();
        tracker.note_loss(S);
        for at in 1..=3 {
            tracker.reconcile(&without_namespace_7(at * S));
        }
        assert_eq!(tracker.len(), 0, "closed with its namespace");
    }

    /// A namespace the inventory cannot see whose connections still send
    /// events lives (kept only by a socket held from another namespace, say).
    #[test]
    fn a_namespace_out_of_sight_with_events_is_not_gone() {
        use ka_common::tcp_state;

        use crate::track::fixtures::{socket, transition};

        const S: u64 = 1_000_000_000;
        let mut tracker = Tracker::new(TrackerConfig::default());
        // Namespace 7 (the fixture's): a connection opened at 1.5 s.
        tracker.handle(&transition(
            socket(80, tcp_state::SYN_SENT),
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            S + S / 2,
        ));
        tracker.reconcile(&without_namespace_7(S));
        // Its event came after the first absence began: that one is void.
        tracker.reconcile(&without_namespace_7(2 * S));
        assert_eq!(tracker.len(), 1);
        tracker.reconcile(&without_namespace_7(3 * S));
        assert_eq!(tracker.len(), 0, "no event since the second began");

        // An inventory limited to the agent's own namespace proves nothing.
        let mut tracker = Tracker::new(TrackerConfig::default());
        tracker.handle(&transition(
            socket(80, tcp_state::SYN_SENT),
            tcp_state::SYN_SENT,
            tcp_state::ESTABLISHED,
            S / 2,
        ));
        for at in 1..5 {
            let mut own = without_namespace_7(at * S);
            own.own_namespace_only = true;
            tracker.reconcile(&own);
        }
        assert_eq!(tracker.len(), 1);
    }

    #[test]
    fn adopts_refreshes_and_forgets() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        assert!(!tracker.inventory_done());
        let first = update(
            vec![
                entry(
                    1,
                    "10.0.0.1:40000",
                    "10.0.0.2:443",
                    DiagTimer::Keepalive,
                    3000,
                ),
                entry(2, "10.0.0.1:40001", "10.0.0.2:443", DiagTimer::None, 9000),
            ],
            1_000_000_000,
        );
        let report = tracker.reconcile(&first);
        assert_eq!(
            (report.adopted, report.refreshed, report.vanished),
            (2, 0, 0)
        );
        assert!(tracker.inventory_done());
        let on = tracker.connections.get(&1).unwrap();
        assert!(on.keepalive.enabled);
        assert!((on.keepalive.idle_secs - 600.0).abs() < f64::EPSILON);
        assert_eq!(on.comm, "client");
        assert_eq!(on.direction, Direction::Outbound);
        assert!((on.idle_secs(2_000_000_000) - 4.0).abs() < 1e-9);
        assert!(!tracker.connections.get(&2).unwrap().keepalive.enabled);
        assert_eq!(
            tracker.keepalive_source(1),
            KeepaliveSource::Inventory(KeepaliveEvidence::On)
        );

        // Second dump: socket 2 is gone, socket 1 was active meanwhile.
        let second = update(
            vec![entry(
                1,
                "10.0.0.1:40000",
                "10.0.0.2:443",
                DiagTimer::Keepalive,
                100,
            )],
            5_000_000_000,
        );
        let report = tracker.reconcile(&second);
        assert_eq!(
            (report.adopted, report.refreshed, report.vanished),
            (0, 1, 1)
        );
        assert_eq!(tracker.len(), 1);
        assert!(
            (tracker
                .connections
                .get(&1)
                .unwrap()
                .idle_secs(5_000_000_000)
                - 0.1)
                .abs()
                < 1e-9
        );
        assert_eq!(tracker.vanished_total(), 1);
        // Its close was never seen: it is closed from its record, once, as
        // `other` (nothing in the record says how it ended).
        let closes: Vec<_> = tracker
            .drain_observations()
            .into_iter()
            .filter_map(|o| match o {
                crate::track::Observation::Closed { cause, .. } => Some(cause),
                _ => None,
            })
            .collect();
        assert_eq!(closes, [crate::model::CloseCause::Other]);
    }

    #[test]
    fn a_longer_pending_timer_is_a_lower_bound_of_the_socket_idle_time() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut long = entry(1, "10.0.0.1:40000", "10.0.0.2:443", DiagTimer::Keepalive, 0);
        long.timer_expires_ms = 3_000_000;
        tracker.reconcile(&update(vec![long], 1));
        let ka = &tracker.connections.get(&1).unwrap().keepalive;
        assert!((ka.idle_secs - 3000.0).abs() < f64::EPSILON);
        assert!(ka.idle_from_socket);
    }

    #[test]
    fn a_timer_at_the_interval_after_a_probe_is_not_a_socket_idle_time() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut probed = entry(1, "10.0.0.1:40000", "10.0.0.2:443", DiagTimer::Keepalive, 0);
        probed.timer_expires_ms = 9_000;
        let mut inventory = update(vec![probed], 1);
        inventory.inventory.namespaces[0].keepalive.time_secs = 1;
        tracker.reconcile(&inventory);
        let ka = &tracker.connections.get(&1).unwrap().keepalive;
        assert!(!ka.idle_from_socket);
        assert!((ka.longest_silence_secs() - 10.0).abs() < f64::EPSILON);
    }

    #[test]
    fn a_connection_closed_after_the_dump_is_not_adopted_from_it() {
        use ka_common::tcp_state;

        use crate::track::fixtures::{socket, transition};
        let transition_on = |port: u16, old: u8, new: u8, ktime_ns: u64| {
            let sock = ka_common::SockSnapshot {
                sk: 0xA + u64::from(port),
                ..socket(port, new)
            };
            transition(sock, old, new, ktime_ns)
        };
        let on_443 = |old: u8, new: u8, ktime_ns: u64| transition_on(443, old, new, ktime_ns);
        let mut tracker = Tracker::new(TrackerConfig::default());
        tracker.handle(&on_443(tcp_state::SYN_SENT, tcp_state::ESTABLISHED, 1_000));
        // The dump sees both established. The first closes before the dump
        // is reconciled; the second, from before the agent and unknown to
        // the table, too (only its CLOSE arrives).
        let dump = update(
            vec![
                entry(
                    5,
                    "198.18.10.1:40443",
                    "198.18.10.2:443",
                    DiagTimer::None,
                    0,
                ),
                entry(6, "198.18.10.1:40080", "198.18.10.2:80", DiagTimer::None, 0),
            ],
            2_000,
        );
        tracker.handle(&on_443(tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1, 3_000));
        tracker.handle(&on_443(tcp_state::FIN_WAIT1, tcp_state::CLOSE, 4_000));
        tracker.handle(&transition_on(
            80,
            tcp_state::LAST_ACK,
            tcp_state::CLOSE,
            4_500,
        ));
        // The first close still waits for its verdict (see
        // `settle_closes`) while the dump is reconciled.
        let report = tracker.reconcile(&dump);
        assert_eq!((report.adopted, report.vanished), (0, 0));
        assert!(tracker.connections.is_empty());
        tracker.settle_closes(u64::MAX);
        let closed = tracker
            .drain_observations()
            .iter()
            .filter(|o| matches!(o, crate::track::Observation::Closed { .. }))
            .count();
        assert_eq!(closed, 1);
    }

    #[test]
    fn remembered_closes_are_bounded_with_and_without_an_inventory() {
        const SEC: u64 = 1_000_000_000;
        let mut tracker = Tracker::new(TrackerConfig::default());
        let addr = |port: u16| SocketAddr::from(([198, 18, 0, 1], port));
        tracker.note_closed(7, addr(1), addr(443), SEC);
        tracker.note_closed(7, addr(2), addr(443), 15 * SEC);
        // No inventory reconciled yet (one that keeps failing): kept 20 s.
        tracker.forget_old_closes(22 * SEC);
        assert_eq!(tracker.inventory.closed_lately.len(), 1);
        assert!(tracker.closed_since(7, addr(2), addr(443), 0));
        tracker.forget_old_closes(36 * SEC);
        assert!(tracker.inventory.closed_lately.is_empty());

        // After one: twice its time, at least a second.
        let mut slow = update(vec![], 40 * SEC);
        slow.took = std::time::Duration::from_secs(3);
        tracker.reconcile(&slow);
        tracker.note_closed(7, addr(3), addr(443), 50 * SEC);
        tracker.forget_old_closes(56 * SEC);
        assert!(tracker.closed_since(7, addr(3), addr(443), 50 * SEC));
        tracker.forget_old_closes(57 * SEC);
        assert!(tracker.inventory.closed_lately.is_empty());
        tracker.reconcile(&update(vec![], 60 * SEC));
        tracker.note_closed(7, addr(4), addr(443), 70 * SEC);
        tracker.forget_old_closes(71 * SEC);
        assert_eq!(tracker.inventory.closed_lately.len(), 1);
        tracker.forget_old_closes(71 * SEC + 1);
        assert!(tracker.inventory.closed_lately.is_empty());
    }
}
