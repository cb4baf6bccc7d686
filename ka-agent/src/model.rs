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

    /// A state a socket can be left in by a process that closed it or
    /// exited: the kernel finishes closing it alone.
    pub const fn is_orphanable(self) -> bool {
        match self {
            Self::FinWait1 | Self::FinWait2 | Self::Closing | Self::LastAck => true,
            Self::Established
            | Self::SynSent
            | Self::SynRecv
            | Self::TimeWait
            | Self::Close
            | Self::CloseWait
            | Self::Listen
            | Self::NewSynRecv
            | Self::BoundInactive
            | Self::Unknown => false,
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

/// A process name (`comm`), shared by every record and label set that
/// carries it: a clone is a reference count, not an allocation (a label
/// set is built for each observation, several per connection, and every
/// socket of a process carries its name). Empty when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Comm(Option<std::sync::Arc<str>>);

impl Comm {
    pub fn new(name: &str) -> Self {
        Self((!name.is_empty()).then(|| name.into()))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}
