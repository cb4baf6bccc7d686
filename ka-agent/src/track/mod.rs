//! The connection table: one record per live TCP socket, updated by the
//! interpreter of each hook (one file per hook here), emitting
//! [`Observation`]s that the exporter turns into metrics.

mod connector;
mod dead_held;
mod destroy_sock;
mod error_report;
mod inventory;
mod keepalive_armed;
mod keepalive_fired;
mod rcv_state_process;
mod receive_reset;
mod retransmit;
mod send_reset;
mod state_change;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ka_common::{
    AF_INET6, SNAP_CNT_FROM_SOCKET, SNAP_IDLE_FROM_SOCKET, SNAP_INCOMPLETE, SNAP_INTVL_FROM_SOCKET,
    SNAP_KEEPALIVE_ON, SNAP_TOTAL_RETRANS, SockSnapshot,
};
use serde::Serialize;

pub use self::{
    connector::{own_pid_in, self_probe_thread},
    inventory::{KeepaliveSource, ReconcileReport},
};
use crate::{
    attribution::PodLabels,
    decode::Event,
    model::{CloseCause, Closer, Comm, Direction, TcpState, ZombieKind},
};

/// How long a connection that reached CLOSE waits for its verdict.
pub const SETTLE_NS: u64 = 20_000_000;

/// A connection that reached CLOSE, waiting for its verdict.
struct Closing {
    connection: Box<Connection>,
    old_state: TcpState,
    event: ka_common::StateChangeEvent,
}

/// Most states kept in [`Connection::history`].
pub const HISTORY: usize = 12;
/// A connection's states, oldest first: inline, no allocation of its own
/// (a record is created, copied and dropped for every short connection).
pub type History = smallvec::SmallVec<[TcpState; HISTORY]>;
/// Most closed connections kept for the API.
pub const RECENTLY_CLOSED: usize = 1024;

/// A connection that ended, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ClosedConnection {
    #[serde(flatten)]
    pub connection: Box<Connection>,
    pub cause: CloseCause,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closer: Option<Closer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_before_close_secs: Option<f64>,
    /// The socket's error at the close (`sk_err`), as the C library words
    /// it: what a timeout's cause alone does not tell (a silent peer times
    /// out, a router in front of a vanished one answers "No route to
    /// host").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `CLOCK_MONOTONIC` ns of the close.
    pub closed_at_ns: u64,
    /// The process that still held the socket at the last inventory, of a
    /// connection the kernel ended under it (see `dead_held`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by_pid: Option<u32>,
}

/// How the tracker is tuned.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// Kernel `HZ`: jiffies per second.
    pub hz: u32,
    /// Smallest configured middlebox idle timeout (seconds): the silence
    /// after which an RST counts as `reset_after_idle`.
    pub reset_after_idle_secs: u64,
    /// `CLOSE_WAIT` older than this is a `close_wait_leak`.
    pub close_wait_leak_secs: u64,
    /// Most connections tracked at once; the oldest-touched are evicted.
    pub max_connections: usize,
    /// `enum sk_rst_reason` value → name, empty before 6.10.
    pub reset_reasons: BTreeMap<u32, String>,
    /// `net.ipv4.ip_local_port_range`: tells the direction of connections
    /// first seen already established.
    pub ephemeral_ports: (u16, u16),
    pub peer_label: PeerLabel,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            hz: 250,
            reset_after_idle_secs: 350,
            close_wait_leak_secs: 60,
            max_connections: 262_144,
            reset_reasons: BTreeMap::new(),
            ephemeral_ports: (32768, 60999),
            peer_label: PeerLabel::None,
        }
    }
}

/// Aggregation labels of a connection (never the ephemeral port).
#[derive(Clone, Debug, Eq, Hash, PartialOrd, Ord, Serialize)]
#[expect(
    clippy::derived_hash_with_manual_eq,
    reason = "the manual equality is the derived one, minus memcmp calls on empty strings"
)]
pub struct Labels {
    pub netns: u32,
    pub direction: Direction,
    /// Service port: local for inbound, remote for outbound.
    pub port: u16,
    pub comm: Comm,
    /// Remote address or network, only with `--peer-label ip|cidr`.
    pub peer: String,
    /// Kubernetes namespace, pod and container (empty outside Kubernetes).
    pub pod: PodLabels,
}

impl PartialEq for Labels {
    fn eq(&self, other: &Self) -> bool {
        let Self {
            netns,
            direction,
            port,
            comm,
            peer,
            pod,
        } = self;
        *netns == other.netns
            && *direction == other.direction
            && *port == other.port
            && comm == &other.comm
            && same_text(peer, &other.peer)
            && *pod == other.pod
    }
}

/// A connection's aggregation labels borrowed from its record, for
/// grouping the whole table every second (the table gauges): building
/// [`Labels`] per connection (a string clone each, a formatted address with
/// `--peer-label`) made that walk 60-100 ms with 200,000 connections.
///
/// At least as fine as [`Labels`]: two connections with equal keys have
/// equal labels (the peer is the whole remote address whatever
/// `--peer-label` renders of it; a record without a pod is apart from one
/// with an empty pod), so whoever groups by it sums the groups whose
/// labels come out the same.
#[derive(Clone, Copy, Debug, Eq, Hash)]
pub struct LabelKey<'c> {
    netns: u32,
    direction: Direction,
    port: u16,
    comm: &'c str,
    /// The remote address, only when a peer label is rendered from it.
    peer: Option<IpAddr>,
    pod: Option<&'c PodLabels>,
}

impl PartialEq for LabelKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        let Self {
            netns,
            direction,
            port,
            comm,
            peer,
            pod,
        } = self;
        *netns == other.netns
            && *direction == other.direction
            && *port == other.port
            && same_text(comm, other.comm)
            && *peer == other.peer
            && *pod == other.pod
    }
}

/// Whether two strings are equal, without a `memcmp` call for empty ones.
///
/// Series are looked up by these labels several times per connection, and
/// most label values are empty (no peer, no pod). An empty `String` points
/// at a dangling address; glibc's AVX-512 `memcmp` starts with a masked
/// load from it, which on the AMD EPYC machines here takes a microcode
/// assist (the masked-off access still meets an unmapped page): perf put
/// half of the agent's CPU time under churn in those zero-length compares.
pub fn same_text(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

/// How the remote address appears in labels (`--peer-label`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerLabel {
    /// No remote address label (the default: bounded cardinality).
    #[default]
    None,
    /// The remote IP address.
    Ip,
    /// The remote /24 (IPv4) or /64 (IPv6) network.
    Cidr,
}

impl PeerLabel {
    pub fn render(self, remote: IpAddr) -> String {
        match (self, remote) {
            (Self::None, _) => String::new(),
            (Self::Ip, ip) => ip.to_string(),
            (Self::Cidr, IpAddr::V4(v4)) => {
                let o = v4.octets();
                format!("{}.{}.{}.0/24", o[0], o[1], o[2])
            }
            (Self::Cidr, IpAddr::V6(v6)) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        }
    }
}

/// Something the exporter counts.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    Opened(Labels),
    Closed {
        labels: Labels,
        cause: CloseCause,
        /// Idle time before a normal close, and who closed first.
        idle_before_close: Option<(Closer, f64)>,
    },
    ProbeSent(Labels),
    /// Segments retransmitted (more than one for a retransmission of
    /// several, or for events the kernel skipped, made up at the next).
    Retransmit {
        labels: Labels,
        segments: u32,
    },
    ResetReceived(Labels),
    ResetSent {
        /// `None` for a reset answering a packet that had no socket.
        labels: Option<Labels>,
        netns: u32,
        reason: String,
    },
    Zombie {
        labels: Labels,
        kind: ZombieKind,
    },
}

/// Keepalive configuration and activity of one connection.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent socket settings, as the kernel keeps them"
)]
pub struct Keepalive {
    pub enabled: bool,
    /// Effective idle time before the first probe (seconds).
    pub idle_secs: f64,
    pub interval_secs: f64,
    pub probes: u8,
    /// Which of the three come from the socket (`TCP_KEEP*`), not the sysctl.
    pub idle_from_socket: bool,
    pub interval_from_socket: bool,
    pub probes_from_socket: bool,
    pub user_timeout_ms: u32,
    /// Probes that went a whole interval unanswered (`icsk_probes_out` when
    /// the timer last fired).
    pub unanswered: u8,
    /// A probe was sent at the last expiry; the next one tells its fate.
    #[serde(skip)]
    pub probe_outstanding: bool,
    pub probes_sent: u64,
    pub probes_answered: u64,
    /// Seconds until the keepalive timer fires, at the last time it was armed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub armed_in_secs: Option<f64>,
}

impl Keepalive {
    /// The longest silence keepalive leaves on an idle connection whose
    /// probes are answered: the idle time before the first probe, then the
    /// interval between the next ones (the kernel re-arms at the interval
    /// after every probe). A middlebox timeout shorter than this forgets
    /// the flow even though keepalive is on.
    pub fn longest_silence_secs(&self) -> f64 {
        self.idle_secs.max(self.interval_secs)
    }
}

/// A keepalive timer expiry whose outcome is not known yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PendingFire {
    cpu: u16,
    ktime_ns: u64,
    probes_out: u8,
}

/// The keepalive timer as last armed, seen by `timer_start`: when it is
/// due, and what the next expiry's lateness says (see
/// `keepalive_fired::unseen_expiry_probes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ArmedTimer {
    /// Monotonic time the timer is due.
    due_ns: u64,
    /// How far ahead it was armed.
    delay_ns: u64,
    /// The jiffy it is due (low 32 bits, as the socket keeps its times).
    due_jiffies: u32,
    /// `icsk_probes_out` when it was armed.
    probes_out: u8,
    /// A sweep found it a whole interval overdue and asked for an
    /// inventory.
    overdue: bool,
}

/// One tracked connection.
#[derive(Clone, Debug, Serialize)]
pub struct Connection {
    #[serde(skip)]
    pub sk: u64,
    pub cookie: u64,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub direction: Direction,
    pub state: TcpState,
    /// The states it went through, oldest first (at most [`HISTORY`]).
    pub history: History,
    pub comm: Comm,
    /// Its pod and container, in Kubernetes (from the owner's cgroup and
    /// the API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Box<PodLabels>>,
    /// Was it seen reaching ESTABLISHED (or found established)?
    #[serde(skip)]
    pub was_established: bool,
    /// `CLOCK_MONOTONIC` ns of the last state change (0: before we started).
    #[serde(skip)]
    pub state_since_ns: u64,
    /// `CLOCK_MONOTONIC` ns of the last event for it.
    #[serde(skip)]
    pub last_event_ns: u64,
    /// Idle seconds as of the last event (min of data received / ACK
    /// received / data sent).
    #[serde(skip)]
    pub idle_at_event_secs: f64,
    pub keepalive: Keepalive,
    pub retransmits: u64,
    /// The socket's `tcp_sock.total_retrans` as of its last event (none
    /// until an event read it): what `retransmits` advances by.
    #[serde(skip)]
    total_retrans: Option<u32>,
    /// Last socket error reported to the application (errno, 0 = none).
    pub last_error: i32,
    /// The error the socket last survived (`sk_err_soft`) as of its last
    /// event, in words: a router's unreachable answering its segments.
    #[serde(
        serialize_with = "serialize_soft_error",
        skip_serializing_if = "is_zero"
    )]
    pub soft_error: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zombie: Option<ZombieKind>,
    #[serde(skip)]
    closer: Option<(Closer, f64)>,
    #[serde(skip)]
    reset_received: bool,
    #[serde(skip)]
    reset_sent: Option<u32>,
    #[serde(skip)]
    pending_fire: Option<PendingFire>,
    #[serde(skip)]
    last_fire: Option<(u16, u64)>,
    #[serde(skip)]
    armed_timer: Option<ArmedTimer>,
    #[serde(skip)]
    close_wait_counted: bool,
    #[serde(skip)]
    name_source: NameSource,
    #[serde(skip)]
    peer_label: PeerLabel,
    /// The process holding the socket and the socket's inode, as the last
    /// inventory found them (none until one did).
    #[serde(skip)]
    holder: Option<Holder>,
}

/// A process holding a socket open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    /// 0 while not known: a socket the kernel named only at its death,
    /// which no inventory saw alive (the next inventories look for it in
    /// every process's descriptors).
    pub pid: u32,
    /// The socket's inode (`socket:[inode]` in the process's fds).
    pub inode: u64,
}

/// Whose name a connection's `comm` and `pod` are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum NameSource {
    /// The process holding the socket, as an inventory found it (empty
    /// until one did).
    #[default]
    Owner,
    /// The process listening on its port (an accepted connection no
    /// inventory has seen yet): the socket's own owner replaces it.
    Listener,
    /// The process that called `connect()` (an outbound connection no
    /// inventory has seen yet, named by the kernel program): the socket's
    /// owner replaces it, as it may have been handed on.
    Connector,
}

impl Connection {
    pub fn labels(&self) -> Labels {
        self.labels_with(self.peer_label)
    }

    /// Its labels' grouping key (see [`LabelKey`]).
    pub fn label_key(&self) -> LabelKey<'_> {
        LabelKey {
            netns: self.netns,
            direction: self.direction,
            port: self.service_port(),
            comm: self.comm.as_str(),
            peer: (self.peer_label != PeerLabel::None).then_some(self.remote.ip()),
            pod: self.pod.as_deref(),
        }
    }

    /// Local for inbound, remote for outbound.
    fn service_port(&self) -> u16 {
        match self.direction {
            Direction::Inbound => self.local.port(),
            Direction::Outbound => self.remote.port(),
        }
    }

    pub fn labels_with(&self, peer_label: PeerLabel) -> Labels {
        Labels {
            netns: self.netns,
            direction: self.direction,
            port: self.service_port(),
            comm: self.comm.clone(),
            peer: peer_label.render(self.remote.ip()),
            pod: self.pod.as_deref().cloned().unwrap_or_default(),
        }
    }

    /// A socket's record before anything happened to it: no history, no
    /// evidence, no owner.
    fn unseen(
        sk: u64,
        cookie: u64,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
        direction: Direction,
        state: TcpState,
    ) -> Self {
        Self {
            sk,
            cookie,
            netns,
            local,
            remote,
            direction,
            state,
            history: History::new(),
            comm: Comm::default(),
            pod: None,
            was_established: false,
            state_since_ns: 0,
            last_event_ns: 0,
            idle_at_event_secs: 0.0,
            keepalive: Keepalive::default(),
            retransmits: 0,
            total_retrans: None,
            last_error: 0,
            soft_error: 0,
            zombie: None,
            closer: None,
            reset_received: false,
            reset_sent: None,
            pending_fire: None,
            last_fire: None,
            armed_timer: None,
            close_wait_counted: false,
            name_source: NameSource::Owner,
            peer_label: PeerLabel::None,
            holder: None,
        }
    }

    /// A record built by hand, for tests of what consumes the table.
    #[doc(hidden)]
    pub fn for_tests(
        local: SocketAddr,
        remote: SocketAddr,
        direction: Direction,
        state: TcpState,
    ) -> Self {
        Self {
            history: smallvec::smallvec![state],
            was_established: true,
            ..Self::unseen(0, 0, 0, local, remote, direction, state)
        }
    }

    /// Idle seconds now, extrapolated from the last event.
    pub fn idle_secs(&self, now_ns: u64) -> f64 {
        self.idle_at_event_secs + ns_to_secs(now_ns.saturating_sub(self.last_event_ns))
    }
}

#[expect(clippy::cast_precision_loss, reason = "durations far below 2^52 ns")]
fn ns_to_secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The connection table.
pub struct Tracker {
    config: TrackerConfig,
    /// By socket address: a fast hash, these lookups run for every event.
    /// Boxed: the table's slack (up to half its slots) costs a pointer per
    /// slot, not a whole record, with 100,000 connections.
    connections: hashbrown::HashMap<u64, Box<Connection>>,
    observations: Vec<Observation>,
    evictions: u64,
    /// Keepalive timer expiries the kernel made and no program reported
    /// (see `keepalive_fired`).
    keepalive_expiries_unseen: u64,
    /// Keepalive timers found a whole interval overdue since the last
    /// [`Tracker::take_overdue_timers`].
    overdue_timers: usize,
    /// The last [`RECENTLY_CLOSED`] normal closes, and apart from them the
    /// last as many of every other cause: on a busy host normal churn
    /// would push a dead peer out within seconds.
    recently_closed: std::collections::VecDeque<ClosedConnection>,
    recently_closed_abnormally: std::collections::VecDeque<ClosedConnection>,
    closing: hashbrown::HashMap<u64, Closing>,
    inventory: inventory::InventoryState,
    /// Connections the kernel ended whose socket their process may still
    /// hold, by socket inode (see `dead_held`).
    dead_held: hashbrown::HashMap<u64, dead_held::DeadHeld>,
    /// Such connections not watched: the watch was full.
    dead_held_unwatched: u64,
    /// The names of the processes connecting outbound sockets.
    connector_names: connector::ConnectorNames,
}

impl Tracker {
    pub fn new(config: TrackerConfig) -> Self {
        Self {
            config,
            connections: hashbrown::HashMap::new(),
            observations: Vec::new(),
            evictions: 0,
            keepalive_expiries_unseen: 0,
            overdue_timers: 0,
            recently_closed: std::collections::VecDeque::new(),
            recently_closed_abnormally: std::collections::VecDeque::new(),
            closing: hashbrown::HashMap::new(),
            inventory: inventory::InventoryState::default(),
            dead_held: hashbrown::HashMap::new(),
            dead_held_unwatched: 0,
            connector_names: connector::ConnectorNames::new(),
        }
    }

    /// Whether the agent runs in a PID namespace of its own (see
    /// `connector`): its `/proc` does not show the kernel's process ids.
    pub fn own_pid_namespace(&self) -> bool {
        self.connector_names.foreign_pids()
    }

    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Interprets one event.
    pub fn handle(&mut self, event: &Event) {
        match event {
            Event::StateChange(e) => self.on_state_change(e),
            Event::Retransmit(e) => self.on_retransmit(e),
            Event::SendReset(e) => self.on_send_reset(e),
            Event::ReceiveReset(e) => self.on_receive_reset(e),
            Event::DestroySock(e) => self.on_destroy_sock(e),
            Event::ErrorReport(e) => self.on_error_report(e),
            Event::KeepaliveArmed(e) => self.on_keepalive_armed(e),
            Event::KeepaliveFired(e) => self.on_keepalive_fired(e),
            Event::RcvStateProcess(e) => self.on_rcv_state_process(e),
        }
    }

    /// Hands what happened since the last call to `apply`; the buffer
    /// keeps its room for the next batch.
    pub fn flush_observations(&mut self, apply: impl FnOnce(&[Observation])) {
        apply(&self.observations);
        self.observations.clear();
    }

    /// Takes what happened since the last call (the tests' view; the
    /// agent flushes in place with [`Self::flush_observations`]).
    #[cfg(test)]
    pub fn drain_observations(&mut self) -> Vec<Observation> {
        std::mem::take(&mut self.observations)
    }

    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.connections.values().map(|c| &**c)
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// The last [`RECENTLY_CLOSED`] connections that closed normally and
    /// the last as many that did not, newest first.
    pub fn recently_closed(&self) -> Vec<&ClosedConnection> {
        let mut closed: Vec<&ClosedConnection> = self
            .recently_closed
            .iter()
            .chain(&self.recently_closed_abnormally)
            .collect();
        closed.sort_by_key(|c| std::cmp::Reverse(c.closed_at_ns));
        closed
    }

    fn remember_closed(&mut self, closed: ClosedConnection) {
        let kept = if closed.cause == CloseCause::Normal {
            &mut self.recently_closed
        } else {
            &mut self.recently_closed_abnormally
        };
        if kept.len() >= RECENTLY_CLOSED {
            kept.pop_front();
        }
        kept.push_back(closed);
    }

    /// Some connection reached CLOSE and waits for its verdict.
    pub fn has_closing(&self) -> bool {
        !self.closing.is_empty()
    }

    /// Connections dropped because the table was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Keepalive timer expiries the kernel made that no program reported.
    pub fn keepalive_expiries_unseen(&self) -> u64 {
        self.keepalive_expiries_unseen
    }

    /// How many keepalive timers the sweeps found a whole interval overdue
    /// since the last call: their expiry went unseen, and with it perhaps
    /// the connection's death, which only an inventory can tell now.
    pub fn take_overdue_timers(&mut self) -> usize {
        std::mem::take(&mut self.overdue_timers)
    }

    /// Periodic work: `CLOSE_WAIT` leaks, closes waiting for a verdict,
    /// keepalive timers overdue.
    pub fn sweep(&mut self, now_ns: u64) {
        self.settle_closes(now_ns);
        self.forget_old_closes(now_ns);
        let threshold_ns = self
            .config
            .close_wait_leak_secs
            .saturating_mul(1_000_000_000);
        for conn in self.connections.values_mut() {
            if let Some(timer) = conn.armed_timer.as_mut()
                && !timer.overdue
                && keepalive_fired::overdue(timer, conn.keepalive.interval_secs, now_ns)
            {
                timer.overdue = true;
                self.overdue_timers += 1;
            }
            if conn.state == TcpState::CloseWait
                && !conn.close_wait_counted
                && conn.state_since_ns != 0
                && now_ns.saturating_sub(conn.state_since_ns) >= threshold_ns
            {
                conn.close_wait_counted = true;
                conn.zombie = Some(ZombieKind::CloseWaitLeak);
                let labels = conn.labels();
                tracing::warn!(
                    kind = ZombieKind::CloseWaitLeak.name(),
                    local = %conn.local,
                    remote = %conn.remote,
                    netns = conn.netns,
                    comm = %conn.comm,
                    close_wait_secs = ns_to_secs(now_ns.saturating_sub(conn.state_since_ns)),
                    "zombie: the peer closed, the local application never did"
                );
                self.observations.push(Observation::Zombie {
                    labels,
                    kind: ZombieKind::CloseWaitLeak,
                });
            }
        }
    }

    /// The record for a socket, created from the snapshot when the socket
    /// was not known (it existed before the agent started). `None` for
    /// sockets that are not connections (listeners, closed, time-wait).
    fn adopt(&mut self, snap: &SockSnapshot, ktime_ns: u64) -> Option<&mut Connection> {
        self.claim_inventoried(snap);
        if !self.connections.contains_key(&snap.sk) {
            let state = TcpState::from_raw(snap.state);
            if matches!(
                state,
                TcpState::Listen
                    | TcpState::Close
                    | TcpState::TimeWait
                    | TcpState::NewSynRecv
                    | TcpState::Unknown
            ) {
                return None;
            }
            // A live socket at this address: an earlier socket's close
            // waiting there is final. (A connection that never reached
            // ESTABLISHED has no opening event, which would settle it.)
            self.settle(snap.sk);
            let direction = self.guess_direction(snap);
            let mut conn = self.new_connection(snap, direction, ktime_ns);
            conn.state_since_ns = 0;
            conn.history.push(state);
            conn.was_established = !matches!(state, TcpState::SynSent | TcpState::SynRecv);
            self.insert(conn);
        }
        let hz = self.config.hz;
        let conn = self.connections.get_mut(&snap.sk)?;
        let segments = refresh(conn, snap, ktime_ns, hz);
        if segments > 0 {
            conn.retransmits += u64::from(segments);
            self.observations.push(Observation::Retransmit {
                labels: conn.labels(),
                segments,
            });
        }
        Some(conn)
    }

    fn insert(&mut self, conn: Connection) {
        if self.connections.len() >= self.config.max_connections
            && !self.connections.contains_key(&conn.sk)
        {
            // Evict the least recently touched record: O(n), but only when
            // full, which the exporter reports as an overload.
            if let Some(oldest) = self
                .connections
                .values()
                .min_by_key(|c| c.last_event_ns)
                .map(|c| c.sk)
            {
                self.connections.remove(&oldest);
                self.evictions += 1;
            }
        }
        self.connections.insert(conn.sk, Box::new(conn));
    }

    fn new_connection(
        &self,
        snap: &SockSnapshot,
        direction: Direction,
        ktime_ns: u64,
    ) -> Connection {
        let mut conn = Connection {
            state_since_ns: ktime_ns,
            last_event_ns: ktime_ns,
            peer_label: self.config.peer_label,
            ..Connection::unseen(
                snap.sk,
                snap.cookie,
                snap.netns,
                socket_addr(snap.family, snap.saddr, snap.sport),
                socket_addr(snap.family, snap.daddr, snap.dport),
                direction,
                TcpState::from_raw(snap.state),
            )
        };
        if direction == Direction::Inbound {
            self.name_after_listener(&mut conn);
        }
        refresh(&mut conn, snap, ktime_ns, self.config.hz);
        conn
    }

    fn guess_direction(&self, snap: &SockSnapshot) -> Direction {
        // Still opening: its state says who opened it (a connect refused or
        // timed out has no other record).
        match TcpState::from_raw(snap.state) {
            TcpState::SynSent => return Direction::Outbound,
            TcpState::SynRecv => return Direction::Inbound,
            _ => {}
        }
        let (low, high) = self.config.ephemeral_ports;
        let ephemeral = |port: u16| (low..=high).contains(&port);
        match (ephemeral(snap.sport), ephemeral(snap.dport)) {
            (true, false) => Direction::Outbound,
            (false, true) => Direction::Inbound,
            _ if snap.sport < snap.dport => Direction::Inbound,
            _ => Direction::Outbound,
        }
    }

    fn reset_reason_name(&self, reason: u32) -> String {
        if reason == ka_common::RESET_REASON_UNKNOWN {
            return "unknown".to_owned();
        }
        self.config
            .reset_reasons
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| format!("reason_{reason}"))
    }
}

/// Updates what the socket itself says: keepalive settings, probes, idle;
/// returns the segments it retransmitted since its last event.
fn refresh(conn: &mut Connection, snap: &SockSnapshot, ktime_ns: u64, hz: u32) -> u32 {
    let hz = f64::from(hz.max(1));
    conn.last_event_ns = ktime_ns;
    // A connecting socket enters SYN_SENT before its local port is chosen.
    if snap.sport != 0 {
        conn.local = socket_addr(snap.family, snap.saddr, snap.sport);
        conn.remote = socket_addr(snap.family, snap.daddr, snap.dport);
    }
    if snap.cookie != 0 {
        conn.cookie = snap.cookie;
    }
    let ka = &mut conn.keepalive;
    ka.enabled = snap.flags & SNAP_KEEPALIVE_ON != 0;
    ka.idle_secs = f64::from(snap.keepalive_time) / hz;
    ka.interval_secs = f64::from(snap.keepalive_intvl) / hz;
    ka.probes = snap.keepalive_probes;
    ka.idle_from_socket = snap.flags & SNAP_IDLE_FROM_SOCKET != 0;
    ka.interval_from_socket = snap.flags & SNAP_INTVL_FROM_SOCKET != 0;
    ka.probes_from_socket = snap.flags & SNAP_CNT_FROM_SOCKET != 0;
    ka.user_timeout_ms = snap.user_timeout_ms;
    if !ka.enabled {
        // `SO_KEEPALIVE` off deletes the timer, unseen.
        conn.armed_timer = None;
    }
    conn.soft_error = snap.sk_err_soft;
    #[expect(clippy::cast_possible_truncation, reason = "jiffies64 low bits")]
    let now = snap.jiffies as u32;
    let since = |t: u32| now.wrapping_sub(t);
    let idle = since(snap.lrcvtime)
        .min(since(snap.rcv_tstamp))
        .min(since(snap.lsndtime));
    conn.idle_at_event_secs = f64::from(idle) / hz;
    retransmitted_since_last_event(conn, snap)
}

/// Segments the socket retransmitted since the connection's last event, by
/// its own counter (`tcp_sock.total_retrans`, which moves exactly where and
/// as much as the namespace's `Tcp.RetransSegs`): a retransmission of
/// several segments counts each, an attempt the kernel gave up before
/// sending counts none, and a retransmission event the kernel skipped is
/// made up at the connection's next event (its close at the latest). Zero
/// on the first event that reads the counter (where it starts), and where
/// the snapshot has none (`retransmit.rs` counts events then).
fn retransmitted_since_last_event(conn: &mut Connection, snap: &SockSnapshot) -> u32 {
    if snap.flags & SNAP_TOTAL_RETRANS == 0 || snap.flags & SNAP_INCOMPLETE != 0 {
        return 0;
    }
    match conn.total_retrans.replace(snap.total_retrans) {
        // Backwards: another socket at this address; it starts here.
        Some(seen) => match snap.total_retrans.wrapping_sub(seen) {
            segments if segments < 1 << 31 => segments,
            _ => 0,
        },
        None => 0,
    }
}

/// An errno in words, without the "(os error N)" the standard library
/// appends; none for no error.
pub(crate) fn error_text(errno: i32) -> Option<String> {
    (errno != 0).then(|| {
        let text = std::io::Error::from_raw_os_error(errno).to_string();
        match text.rsplit_once(" (os error") {
            Some((words, _)) => words.to_owned(),
            None => text,
        }
    })
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with hands a reference"
)]
fn serialize_soft_error<S: serde::Serializer>(
    errno: &u8,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&error_text(i32::from(*errno)).unwrap_or_default())
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if hands a reference"
)]
fn is_zero(value: &u8) -> bool {
    *value == 0
}

fn socket_addr(family: u16, addr: [u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    };
    SocketAddr::new(ip, port)
}

/// Events for the interpreters' unit tests.
#[cfg(test)]
impl Tracker {
    /// Puts a record built by hand into the table, under its `sk`.
    pub(crate) fn insert_for_tests(&mut self, mut conn: Connection) {
        conn.peer_label = self.config.peer_label;
        self.insert(conn);
    }
}

#[cfg(test)]
mod recently_closed_tests {
    use super::{ClosedConnection, Connection, RECENTLY_CLOSED, Tracker, TrackerConfig};
    use crate::model::{CloseCause, Direction, TcpState};

    fn closed(cause: CloseCause, closed_at_ns: u64) -> ClosedConnection {
        let connection = Connection::for_tests(
            "198.18.10.1:40000".parse().unwrap(),
            "198.18.10.2:80".parse().unwrap(),
            Direction::Outbound,
            TcpState::Close,
        );
        ClosedConnection {
            connection: Box::new(connection),
            cause,
            closer: None,
            idle_before_close_secs: None,
            error: None,
            closed_at_ns,
            held_by_pid: None,
        }
    }

    /// Normal churn cannot push a dead peer out of the closed records.
    #[test]
    fn normal_closes_do_not_push_out_the_others() {
        let mut tracker = Tracker::new(TrackerConfig::default());
        tracker.remember_closed(closed(CloseCause::RetransmitTimeout, 1));
        for at in 2..2 + 2 * RECENTLY_CLOSED as u64 {
            tracker.remember_closed(closed(CloseCause::Normal, at));
        }
        let kept = tracker.recently_closed();
        assert_eq!(kept.len(), RECENTLY_CLOSED + 1);
        assert_eq!(
            kept[0].closed_at_ns,
            1 + 2 * RECENTLY_CLOSED as u64,
            "newest first"
        );
        assert_eq!(kept.last().unwrap().cause, CloseCause::RetransmitTimeout);
    }
}

#[cfg(test)]
mod fixtures {
    use ka_common::{EventHeader, EventKind, SockSnapshot};

    /// An IPv4 socket in `state` from 198.18.10.1 towards 198.18.10.2:`port`.
    pub fn socket(port: u16, state: u8) -> SockSnapshot {
        SockSnapshot {
            sk: 0xA,
            netns: 7,
            family: ka_common::AF_INET,
            saddr: [198, 18, 10, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [198, 18, 10, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 40000 + port,
            dport: port,
            state,
            ..SockSnapshot::default()
        }
    }

    pub fn header(kind: EventKind, ktime_ns: u64) -> EventHeader {
        EventHeader {
            kind: kind as u16,
            cpu: 0,
            sequence: 0,
            ktime_ns,
        }
    }

    /// `sock` moving from `old` to `new` at `ktime_ns`.
    pub fn transition(sock: SockSnapshot, old: u8, new: u8, ktime_ns: u64) -> crate::decode::Event {
        crate::decode::Event::StateChange(ka_common::StateChangeEvent {
            header: header(EventKind::StateChange, ktime_ns),
            sock: SockSnapshot { state: new, ..sock },
            oldstate: old,
            newstate: new,
            reserved: [0; 2],
            socket_inode: 0,
            connector: ka_common::Connector::default(),
        })
    }

    /// `sock`, connecting, established at `ktime_ns`.
    pub fn connected(sock: SockSnapshot, ktime_ns: u64) -> crate::decode::Event {
        transition(
            sock,
            ka_common::tcp_state::SYN_SENT,
            ka_common::tcp_state::ESTABLISHED,
            ktime_ns,
        )
    }
}
