//! Events written by the kernel programs into the shared ring buffer.
//!
//! One event type per hook. Every event starts with an [`EventHeader`] whose
//! `kind` tells the decoder which type follows.

/// Which hook produced an event; the value of [`EventHeader::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    StateChange = 1,
    Retransmit = 2,
    SendReset = 3,
    ReceiveReset = 4,
    DestroySock = 5,
    ErrorReport = 6,
    KeepaliveArmed = 7,
    KeepaliveFired = 8,
    RcvStateProcess = 9,
}

impl EventKind {
    pub const ALL: [Self; 9] = [
        Self::StateChange,
        Self::Retransmit,
        Self::SendReset,
        Self::ReceiveReset,
        Self::DestroySock,
        Self::ErrorReport,
        Self::KeepaliveArmed,
        Self::KeepaliveFired,
        Self::RcvStateProcess,
    ];

    pub const fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::StateChange,
            2 => Self::Retransmit,
            3 => Self::SendReset,
            4 => Self::ReceiveReset,
            5 => Self::DestroySock,
            6 => Self::ErrorReport,
            7 => Self::KeepaliveArmed,
            8 => Self::KeepaliveFired,
            9 => Self::RcvStateProcess,
            _ => return None,
        })
    }

    /// The `type` label of `ka_events_total`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::StateChange => "state_change",
            Self::Retransmit => "retransmit",
            Self::SendReset => "send_reset",
            Self::ReceiveReset => "receive_reset",
            Self::DestroySock => "destroy_sock",
            Self::ErrorReport => "error_report",
            Self::KeepaliveArmed => "keepalive_armed",
            Self::KeepaliveFired => "keepalive_fired",
            Self::RcvStateProcess => "rcv_state_process",
        }
    }
}

/// Starts every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u16,
    /// CPU the hook ran on: events of one timer callback share it.
    pub cpu: u16,
    /// The event's number among the events of its kind submitted on its
    /// CPU, from 1 (the kernel's count of them, `Stat::submitted`); 0 when
    /// unnumbered. The runs of one program on one CPU do not overlap and
    /// the ring buffer keeps the order of reservations, so the agent reads
    /// each CPU's numbers of a kind in order: a gap is an event that was
    /// submitted and never read.
    pub sequence: u32,
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`).
    pub ktime_ns: u64,
}

/// An event type: a `#[repr(C)]` struct that starts with an
/// [`EventHeader`], which the programs number at submit time.
///
/// # Safety
///
/// Only for `#[repr(C)]` structs whose first field is `header:
/// EventHeader` (asserted for each below).
pub unsafe trait Event {}

macro_rules! events {
    ($($event:ident),* $(,)?) => {
        $(
            // SAFETY: `#[repr(C)]` with `header: EventHeader` first, as
            // asserted next to it.
            unsafe impl Event for $event {}
            const _: () = assert!(core::mem::offset_of!($event, header) == 0);
        )*
    };
}

events!(
    StateChangeEvent,
    RetransmitEvent,
    SendResetEvent,
    ReceiveResetEvent,
    DestroySockEvent,
    ErrorReportEvent,
    KeepaliveArmedEvent,
    KeepaliveFiredEvent,
    RcvStateProcessEvent,
);

/// [`SockSnapshot::flags`]: `SOCK_KEEPOPEN` is set (`SO_KEEPALIVE` on).
pub const SNAP_KEEPALIVE_ON: u8 = 1 << 0;
/// The idle time comes from `TCP_KEEPIDLE`, not the namespace's sysctl.
pub const SNAP_IDLE_FROM_SOCKET: u8 = 1 << 1;
/// The interval comes from `TCP_KEEPINTVL`, not the namespace's sysctl.
pub const SNAP_INTVL_FROM_SOCKET: u8 = 1 << 2;
/// The probe count comes from `TCP_KEEPCNT`, not the namespace's sysctl.
pub const SNAP_CNT_FROM_SOCKET: u8 = 1 << 3;
/// At least one read of the socket failed: the snapshot is partial.
pub const SNAP_INCOMPLETE: u8 = 1 << 4;
/// `total_retrans` was read (BTF has `tcp_sock.total_retrans`).
pub const SNAP_TOTAL_RETRANS: u8 = 1 << 5;

/// What a program reads from a `struct sock` at the moment of a hook.
///
/// Taken from the socket itself, not from earlier events, so connections
/// that existed before the agent started are described completely by their
/// first event. Times are the kernel's 32-bit jiffies (`tcp_jiffies32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockSnapshot {
    /// The socket's address: identifies a connection while it lives.
    pub sk: u64,
    /// `sk->sk_cookie` (0 until somebody asked for it).
    pub cookie: u64,
    /// `bpf_jiffies64()` at the hook.
    pub jiffies: u64,
    /// Local and remote address; IPv4 uses the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Inode of the socket's network namespace.
    pub netns: u32,
    /// Effective keepalive idle time (jiffies): `TCP_KEEPIDLE` or the sysctl.
    pub keepalive_time: u32,
    /// Effective keepalive interval (jiffies).
    pub keepalive_intvl: u32,
    /// `TCP_USER_TIMEOUT` in milliseconds (0 = off).
    pub user_timeout_ms: u32,
    /// Last data received (`icsk_ack.lrcvtime`).
    pub lrcvtime: u32,
    /// Last ACK received (`tp->rcv_tstamp`).
    pub rcv_tstamp: u32,
    /// Last data sent (`tp->lsndtime`).
    pub lsndtime: u32,
    /// Segments in flight.
    pub packets_out: u32,
    /// `sk->sk_err` (positive errno).
    pub sk_err: i32,
    /// Segments the socket retransmitted (`tp->total_retrans`), counted
    /// where and as the namespace's `Tcp.RetransSegs` counts them (with
    /// [`SNAP_TOTAL_RETRANS`]).
    pub total_retrans: u32,
    pub family: u16,
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    /// `sk_state` (TCP state number).
    pub state: u8,
    /// Effective keepalive probe count.
    pub keepalive_probes: u8,
    /// Unanswered keepalive or zero-window probes (`icsk_probes_out`).
    pub probes_out: u8,
    /// RTO retransmissions of the head segment (`icsk_retransmits`).
    pub retransmits: u8,
    /// `SNAP_*` bits.
    pub flags: u8,
    /// `sk->sk_err_soft` (positive errno; errno values fit a byte): an
    /// error the socket survived, the sign of a peer a router reports
    /// unreachable while the retransmissions go on. Cleared by the kernel
    /// when the peer acknowledges again.
    pub sk_err_soft: u8,
    pub reserved: [u8; 4],
}

/// `sock:inet_sock_set_state` for a TCP socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateChangeEvent {
    pub header: EventHeader,
    pub sock: SockSnapshot,
    pub oldstate: u8,
    pub newstate: u8,
    pub reserved: [u8; 2],
    /// At a CLOSE with a socket error (the kernel ended the connection):
    /// the inode of the socket a process may still hold (`socket:[N]`);
    /// else 0, as where the kernel's layout is unknown.
    pub socket_inode: u32,
    /// Leaving `SYN_SENT`: who called `connect()`, as recorded then; else all
    /// zero.
    pub connector: Connector,
}

/// The process that called `connect()` on an outbound socket: the program
/// records it at the socket's `SYN_SENT` transition, which runs in that
/// process's context (its ESTABLISHED runs in a softirq, any process's),
/// and sends it with the transition leaving `SYN_SENT`.
///
/// Kept for sharing: the agent reads it only in events.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connector {
    /// Its process id (thread group id); 0 when not recorded.
    pub tgid: u32,
    pub reserved: u32,
    /// Its thread's name (`comm`), NUL-padded.
    pub comm: [u8; 16],
}

/// `tcp:tcp_retransmit_skb`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransmitEvent {
    pub header: EventHeader,
    pub sock: SockSnapshot,
    /// Transmit error (6.17+ only; 0 where the kernel does not report it).
    pub err: i32,
    pub reserved: u32,
}

/// Reason value when the kernel does not report one (before 6.10).
pub const RESET_REASON_UNKNOWN: u32 = u32::MAX;

/// `tcp:tcp_send_reset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendResetEvent {
    pub header: EventHeader,
    /// All zero except `netns` when the reset answers a packet without a socket.
    pub sock: SockSnapshot,
    /// `enum sk_rst_reason` or [`RESET_REASON_UNKNOWN`].
    pub reason: u32,
    /// 1 when `sock` describes a real socket.
    pub has_sock: u32,
}

/// `tcp:tcp_receive_reset`: an RST reset this socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveResetEvent {
    pub header: EventHeader,
    pub sock: SockSnapshot,
}

/// `tcp:tcp_destroy_sock`: the kernel frees the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestroySockEvent {
    pub header: EventHeader,
    pub sock: SockSnapshot,
}

/// `sock:inet_sk_error_report` for TCP.
///
/// From the raw tracepoint, `sock` is the reporting socket's snapshot. The
/// tracepoint's record has no socket pointer: from it, `sock` holds only
/// the family, addresses and ports, and `sk` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorReportEvent {
    pub header: EventHeader,
    pub sock: SockSnapshot,
    /// `sk->sk_err` at the report (positive errno).
    pub error: i32,
    pub reserved: u32,
}

/// `timer:timer_start` for a socket's keepalive timer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepaliveArmedEvent {
    pub header: EventHeader,
    pub sock: SockSnapshot,
    /// Absolute expiry in jiffies.
    pub expires: u64,
}

/// `timer:timer_expire_entry` for a socket's keepalive timer: the state the
/// handler `tcp_keepalive_timer` is about to act on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepaliveFiredEvent {
    pub header: EventHeader,
    pub sock: SockSnapshot,
}

/// `tcp_rcv_state_process` (kprobe where the kernel allows it): a segment
/// arrived for a socket outside ESTABLISHED.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RcvStateProcessEvent {
    pub header: EventHeader,
    pub sock: SockSnapshot,
}

const _: () = assert!(size_of::<EventHeader>() == 16);
const _: () = assert!(size_of::<SockSnapshot>() == 112);
const _: () = assert!(align_of::<SockSnapshot>() == 8);
const _: () = assert!(size_of::<Connector>() == 24);
const _: () = assert!(size_of::<StateChangeEvent>() == 160);
const _: () = assert!(size_of::<RetransmitEvent>() == 136);
const _: () = assert!(size_of::<SendResetEvent>() == 136);
const _: () = assert!(size_of::<ReceiveResetEvent>() == 128);
const _: () = assert!(size_of::<DestroySockEvent>() == 128);
const _: () = assert!(size_of::<ErrorReportEvent>() == 136);
const _: () = assert!(size_of::<KeepaliveArmedEvent>() == 136);
const _: () = assert!(size_of::<KeepaliveFiredEvent>() == 128);
const _: () = assert!(size_of::<RcvStateProcessEvent>() == 128);
