//! One `NETLINK_SOCK_DIAG` dump of the TCP sockets of the calling thread's
//! network namespace (what `ss -tnoie` reads).

use std::net::SocketAddr;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, Timer, nlas::Nla},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

use super::{DiagTimer, InventoryError, SocketEntry, TcpInfoSummary};
use crate::model::TcpState;

/// `INET_DIAG_CGROUP_ID` (`include/uapi/linux/inet_diag.h`, 5.7+): sent
/// for every socket without being requested; the crate has no variant for
/// it, so it arrives as an unknown attribute.
const INET_DIAG_CGROUP_ID: u16 = 21;

/// Every state but `TIME_WAIT`: time-wait sockets are no longer
/// connections, have no owner and can number hundreds of thousands.
/// (`NEW_SYN_RECV` request sockets come with `SYN_RECV`.)
fn wanted_states() -> StateFlags {
    StateFlags::all() - StateFlags::TIME_WAIT
}

/// Dumps TCP over IPv4 then IPv6 in the namespace of the calling thread.
pub(super) fn dump_tcp(netns: u32) -> Result<Vec<SocketEntry>, InventoryError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(InventoryError::Netlink)?;
    socket.bind_auto().map_err(InventoryError::Netlink)?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(InventoryError::Netlink)?;
    let mut entries = Vec::new();
    for family in [AF_INET, AF_INET6] {
        request(&socket, family)?;
        receive(&socket, netns, &mut entries)?;
    }
    Ok(entries)
}

fn request(socket: &Socket, family: u8) -> Result<(), InventoryError> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: wanted_states(),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buffer = vec![0; packet.buffer_len()];
    packet.serialize(&mut buffer);
    socket.send(&buffer, 0).map_err(InventoryError::Netlink)?;
    Ok(())
}

/// Reads the answers of one dump request until `NLMSG_DONE`.
fn receive(
    socket: &Socket,
    netns: u32,
    entries: &mut Vec<SocketEntry>,
) -> Result<(), InventoryError> {
    loop {
        // Whole datagrams, however large the kernel made them.
        let (datagram, _) = socket.recv_from_full().map_err(InventoryError::Netlink)?;
        let mut bytes = datagram.as_slice();
        while !bytes.is_empty() {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
                .map_err(|e| InventoryError::Decode(e.to_string()))?;
            let length = usize::try_from(message.header.length).unwrap_or(usize::MAX);
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    entries.push(entry_of(&response, netns));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => {
                    return Err(InventoryError::Netlink(error.to_io()));
                }
                _ => {}
            }
            // Netlink messages are 4-byte aligned inside a datagram.
            let advance = length.checked_add(3).map_or(usize::MAX, |l| l & !3);
            if length == 0 || advance >= bytes.len() {
                break;
            }
            bytes = &bytes[advance..];
        }
    }
}

fn entry_of(response: &InetResponse, netns: u32) -> SocketEntry {
    let header = &response.header;
    let id = &header.socket_id;
    let (timer, expires, timer_retransmits) = match &header.timer {
        None => (DiagTimer::None, 0, 0),
        Some(Timer::Retransmit(expires, retransmits)) => {
            (DiagTimer::Retransmit, millis(*expires), *retransmits)
        }
        Some(Timer::KeepAlive(expires)) => (DiagTimer::Keepalive, millis(*expires), 0),
        Some(Timer::TimeWait) => (DiagTimer::TimeWait, 0, 0),
        Some(Timer::Probe(expires)) => (DiagTimer::ZeroWindowProbe, millis(*expires), 0),
    };
    let mut tcp_info = None;
    let mut cgroup_id = None;
    for nla in &response.nlas {
        match nla {
            Nla::TcpInfo(bytes) => tcp_info = TcpInfoSummary::parse(bytes),
            Nla::Other(other) if netlink_packet_core::Nla::kind(other) == INET_DIAG_CGROUP_ID => {
                let mut value = [0u8; 8];
                if netlink_packet_core::Nla::value_len(other) == 8 {
                    netlink_packet_core::Nla::emit_value(other, &mut value);
                    cgroup_id = Some(u64::from_ne_bytes(value));
                }
            }
            _ => {}
        }
    }
    // idiag_retrans is icsk_probes_out for the keepalive and zero-window
    // timers (inet_diag.c); the crate keeps it only for the retransmit
    // timer, and tcpi_probes is the same counter.
    let timer_retransmits = match timer {
        DiagTimer::Keepalive | DiagTimer::ZeroWindowProbe => {
            tcp_info.as_ref().map_or(0, |info| info.probes)
        }
        _ => timer_retransmits,
    };
    SocketEntry {
        netns,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        state: TcpState::from_raw(header.state),
        inode: u64::from(header.inode),
        cookie: cookie(id.cookie),
        uid: header.uid,
        timer,
        timer_expires_ms: expires,
        timer_retransmits,
        tcp_info,
        cgroup_id,
    }
}

fn millis(duration: std::time::Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// `idiag_cookie` is `__u32[2]`, low word first, each in host order
/// (`sock_diag_save_cookie`).
fn cookie(raw: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let high = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(high) << 32) | u64::from(low)
}

impl TcpInfoSummary {
    /// Reads the leading fields of `struct tcp_info`. The structure only
    /// ever grows at its end (it is UAPI), so fixed offsets into its prefix
    /// hold on every kernel, where a full-size parse would reject the
    /// shorter structure of older kernels.
    pub(super) fn parse(bytes: &[u8]) -> Option<Self> {
        let u32_at = |offset: usize| {
            bytes
                .get(offset..offset + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_ne_bytes)
        };
        Some(Self {
            state: *bytes.first()?,
            retransmits: *bytes.get(2)?,
            probes: *bytes.get(3)?,
            backoff: *bytes.get(4)?,
            last_data_sent_ms: u32_at(44)?,
            last_data_recv_ms: u32_at(52)?,
            last_ack_recv_ms: u32_at(56)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_words_are_low_first() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&7u32.to_ne_bytes());
        raw[4..].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(cookie(raw), (1 << 32) | 7);
    }

    #[test]
    fn tcp_info_prefix() {
        let mut bytes = vec![0u8; 104];
        bytes[0] = 1;
        bytes[2] = 2;
        bytes[3] = 3;
        bytes[4] = 4;
        bytes[44..48].copy_from_slice(&100u32.to_ne_bytes());
        bytes[52..56].copy_from_slice(&200u32.to_ne_bytes());
        bytes[56..60].copy_from_slice(&300u32.to_ne_bytes());
        let info = TcpInfoSummary::parse(&bytes).unwrap();
        assert_eq!(
            info,
            TcpInfoSummary {
                state: 1,
                retransmits: 2,
                probes: 3,
                backoff: 4,
                last_data_sent_ms: 100,
                last_data_recv_ms: 200,
                last_ack_recv_ms: 300,
            }
        );
        assert_eq!(info.idle_ms(), 100);
        assert!(TcpInfoSummary::parse(&bytes[..59]).is_none());
    }
}
