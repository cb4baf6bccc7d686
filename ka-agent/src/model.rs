//! The vocabulary of the data path: TCP states, directions, death causes and
//! zombie kinds, with the exact label values of the public contract.

use serde::Serialize;

/// Kernel TCP state numbers (`include/net/tcp_states.h`; stable ABI, also
/// exported to user space through `tcp_info.tcpi_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
    Unknown,
}

impl TcpState {
    pub const ALL: [Self; 13] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
        Self::BoundInactive,
    ];

    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            12 => Self::NewSynRecv,
            13 => Self::BoundInactive,
            _ => Self::Unknown,
        }
    }

    /// The `state` label of `ka_connections`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
            Self::BoundInactive => "BOUND_INACTIVE",
            Self::Unknown => "UNKNOWN",
        }
    }
}

/// Who opened the connection, seen from this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Why a connection ended (`ka_connections_closed_total{cause}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseCause {
    Normal,
    KeepaliveTimeout,
    RetransmitTimeout,
    ZeroWindowTimeout,
    ResetReceived,
    ResetSent,
    Other,
}

impl CloseCause {
    pub const ALL: [Self; 7] = [
        Self::Normal,
        Self::KeepaliveTimeout,
        Self::RetransmitTimeout,
        Self::ZeroWindowTimeout,
        Self::ResetReceived,
        Self::ResetSent,
        Self::Other,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::RetransmitTimeout => "retransmit_timeout",
            Self::ZeroWindowTimeout => "zero_window_timeout",
            Self::ResetReceived => "reset_received",
            Self::ResetSent => "reset_sent",
            Self::Other => "other",
        }
    }

    /// Deaths the kernel counts in `TcpExt` `TCPAbortOnTimeout`.
    pub const fn is_timeout(self) -> bool {
        matches!(
            self,
            Self::KeepaliveTimeout | Self::RetransmitTimeout | Self::ZeroWindowTimeout
        )
    }
}

/// `ka_zombies_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ZombieKind {
    DeadPeerKeepalive,
    DeadPeerRetransmit,
    ResetAfterIdle,
    CloseWaitLeak,
}

impl ZombieKind {
    pub const ALL: [Self; 4] = [
        Self::DeadPeerKeepalive,
        Self::DeadPeerRetransmit,
        Self::ResetAfterIdle,
        Self::CloseWaitLeak,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::DeadPeerKeepalive => "dead_peer_keepalive",
            Self::DeadPeerRetransmit => "dead_peer_retransmit",
            Self::ResetAfterIdle => "reset_after_idle",
            Self::CloseWaitLeak => "close_wait_leak",
        }
    }
}

/// Which side sent the first FIN of a normal close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Closer {
    Local,
    Peer,
}

impl Closer {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
        }
    }
}
