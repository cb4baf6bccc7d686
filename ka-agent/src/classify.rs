//! Deciding why a connection died, from the evidence the tracker collected.
//! Pure functions: unit-tested here, exercised for real by the lab scenarios.

use crate::model::{CloseCause, Closer, TcpState, ZombieKind};

use libc::{ECONNABORTED, ECONNREFUSED, ECONNRESET, EPIPE, ETIMEDOUT};

/// What was known about a connection at the moment it reached CLOSE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent pieces of kernel evidence"
)]
pub struct DeathEvidence {
    /// State it left for CLOSE.
    pub old_state: Option<TcpState>,
    /// `sk_err` at the transition (set before `tcp_done` on every kernel),
    /// positive.
    pub sk_err: i32,
    /// `icsk_retransmits` at the transition.
    pub retransmits: u8,
    /// `icsk_probes_out` at the transition.
    pub probes_out: u8,
    /// `tcp:tcp_receive_reset` was seen for this socket.
    pub reset_received: bool,
    /// `tcp:tcp_send_reset` was seen for this socket.
    pub reset_sent: bool,
    /// The reset it sent carried reason `TCP_KEEPALIVE_TIMEOUT` (6.12+).
    pub reset_reason_keepalive: bool,
    /// The transition happened inside `tcp_keepalive_timer` (same CPU,
    /// right after a keepalive timer expiry for this socket): the evidence
    /// kernels without reset reasons still give.
    pub in_keepalive_timer: bool,
    /// Who sent the first FIN, if anybody did.
    pub closer: Option<Closer>,
}

/// The death cause (`ka_connections_closed_total{cause}`).
pub fn close_cause(e: &DeathEvidence) -> CloseCause {
    if e.reset_received || matches!(e.sk_err, ECONNRESET | EPIPE) {
        return CloseCause::ResetReceived;
    }
    if timed_out(e) {
        // Of the timeouts only the keepalive timer sends an RST
        // (tcp_send_active_reset): the evidence on kernels without reset
        // reasons (< 6.10) when the timer-callback window is missed.
        return if e.reset_reason_keepalive || e.in_keepalive_timer || e.reset_sent {
            CloseCause::KeepaliveTimeout
        } else if e.retransmits > 0 {
            CloseCause::RetransmitTimeout
        } else if e.probes_out > 0 {
            CloseCause::ZeroWindowTimeout
        } else {
            CloseCause::Other
        };
    }
    if e.sk_err == ECONNREFUSED {
        return CloseCause::ResetReceived;
    }
    if e.reset_sent {
        return CloseCause::ResetSent;
    }
    let closing = matches!(
        e.old_state,
        Some(
            TcpState::FinWait1
                | TcpState::FinWait2
                | TcpState::Closing
                | TcpState::TimeWait
                | TcpState::LastAck
        )
    );
    if e.closer.is_some() && closing {
        CloseCause::Normal
    } else {
        CloseCause::Other
    }
}

/// Whether the kernel gave up on a timer (`tcp_write_err`): it sets
/// `sk_err` to the last soft error when there is one (an ICMP unreachable
/// from a router in front of a vanished host, a route that went away),
/// else `ETIMEDOUT`. A soft error is never fatal on its own once the
/// handshake is done; before it (`SYN_SENT`, `SYN_RECV`) an ICMP error
/// fails the connect at once (`tcp_v4_err`), so there only `ETIMEDOUT`
/// is a timeout. `ECONNABORTED` is a socket destroyed from outside
/// (`ss -K`, `tcp_abort`).
fn timed_out(e: &DeathEvidence) -> bool {
    match e.sk_err {
        0 | ECONNABORTED => false,
        ETIMEDOUT => true,
        _ => e
            .old_state
            .is_some_and(|state| !matches!(state, TcpState::SynSent | TcpState::SynRecv)),
    }
}

/// The zombie kind a death reveals, if any: a peer found dead on a
/// connection that had been established (a connect that never completed is
/// not a zombie). A zero-window probe timeout is the sender's death too
/// (design.md): the peer had closed its window and then stopped answering
/// the probes, which a peer that is only slow to read does.
pub fn zombie_of_death(cause: CloseCause, was_established: bool) -> Option<ZombieKind> {
    if !was_established {
        return None;
    }
    match cause {
        CloseCause::KeepaliveTimeout => Some(ZombieKind::DeadPeerKeepalive),
        CloseCause::RetransmitTimeout | CloseCause::ZeroWindowTimeout => {
            Some(ZombieKind::DeadPeerRetransmit)
        }
        CloseCause::Normal
        | CloseCause::ResetReceived
        | CloseCause::ResetSent
        | CloseCause::Other => None,
    }
}

/// Silence (jiffies) before the last send, at the time an RST arrived: the
/// last send came after this long without anything received. A middlebox
/// whose idle timeout is shorter than this may have forgotten the flow.
pub fn silence_before_last_send(lsndtime: u32, lrcvtime: u32, rcv_tstamp: u32) -> Option<u32> {
    let last_heard = if jiffies_after(lrcvtime, rcv_tstamp) {
        lrcvtime
    } else {
        rcv_tstamp
    };
    jiffies_after(lsndtime, last_heard).then(|| lsndtime.wrapping_sub(last_heard))
}

/// `time_after(a, b)` on 32-bit jiffies.
pub fn jiffies_after(a: u32, b: u32) -> bool {
    b.wrapping_sub(a).cast_signed() < 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence() -> DeathEvidence {
        DeathEvidence {
            old_state: Some(TcpState::Established),
            ..DeathEvidence::default()
        }
    }

    #[test]
    fn keepalive_death_with_and_without_reset_reason() {
        let with_reason = DeathEvidence {
            sk_err: ETIMEDOUT,
            probes_out: 3,
            reset_sent: true,
            reset_reason_keepalive: true,
            ..evidence()
        };
        assert_eq!(close_cause(&with_reason), CloseCause::KeepaliveTimeout);
        // 6.1: no reason field, but the death happened inside the timer.
        let without_reason = DeathEvidence {
            reset_reason_keepalive: false,
            in_keepalive_timer: true,
            ..with_reason
        };
        assert_eq!(close_cause(&without_reason), CloseCause::KeepaliveTimeout);
        // 6.1 under a slow clock: the RST without a reason still tells.
        let rst_only = DeathEvidence {
            in_keepalive_timer: false,
            ..without_reason
        };
        assert_eq!(close_cause(&rst_only), CloseCause::KeepaliveTimeout);
    }

    #[test]
    fn timeouts_and_resets() {
        let rto = DeathEvidence {
            sk_err: ETIMEDOUT,
            retransmits: 5,
            ..evidence()
        };
        assert_eq!(close_cause(&rto), CloseCause::RetransmitTimeout);
        let probe0 = DeathEvidence {
            sk_err: ETIMEDOUT,
            probes_out: 4,
            ..evidence()
        };
        assert_eq!(close_cause(&probe0), CloseCause::ZeroWindowTimeout);
        let reset = DeathEvidence {
            sk_err: ECONNRESET,
            ..evidence()
        };
        assert_eq!(close_cause(&reset), CloseCause::ResetReceived);
        let sent = DeathEvidence {
            reset_sent: true,
            ..evidence()
        };
        assert_eq!(close_cause(&sent), CloseCause::ResetSent);
    }

    /// A host that vanished behind a router answers the retransmissions
    /// (or keepalive probes) with ICMP unreachables: the timeout then
    /// carries that soft error instead of `ETIMEDOUT`.
    #[test]
    fn timeouts_with_a_soft_error() {
        for soft in [libc::EHOSTUNREACH, libc::ENETUNREACH, libc::EPROTO] {
            let rto = DeathEvidence {
                sk_err: soft,
                retransmits: 6,
                ..evidence()
            };
            assert_eq!(close_cause(&rto), CloseCause::RetransmitTimeout, "{soft}");
            let keepalive = DeathEvidence {
                sk_err: soft,
                probes_out: 3,
                reset_sent: true,
                ..evidence()
            };
            assert_eq!(close_cause(&keepalive), CloseCause::KeepaliveTimeout);
            // The same error before the handshake completed: the connect
            // failed at once.
            let connect = DeathEvidence {
                old_state: Some(TcpState::SynSent),
                sk_err: soft,
                retransmits: 1,
                ..evidence()
            };
            assert_eq!(close_cause(&connect), CloseCause::Other, "{soft}");
        }
        // An ICMP port unreachable as the soft error, against a refused
        // connect.
        let port_unreachable = DeathEvidence {
            sk_err: ECONNREFUSED,
            retransmits: 6,
            ..evidence()
        };
        assert_eq!(
            close_cause(&port_unreachable),
            CloseCause::RetransmitTimeout
        );
        let refused = DeathEvidence {
            old_state: Some(TcpState::SynSent),
            sk_err: ECONNREFUSED,
            ..evidence()
        };
        assert_eq!(close_cause(&refused), CloseCause::ResetReceived);
        let destroyed = DeathEvidence {
            sk_err: ECONNABORTED,
            retransmits: 2,
            ..evidence()
        };
        assert_eq!(close_cause(&destroyed), CloseCause::Other);
    }

    #[test]
    fn normal_closes() {
        for (old, closer) in [
            (TcpState::LastAck, Closer::Peer),
            (TcpState::FinWait2, Closer::Local),
            (TcpState::FinWait1, Closer::Local),
            (TcpState::Closing, Closer::Local),
        ] {
            let e = DeathEvidence {
                old_state: Some(old),
                closer: Some(closer),
                ..DeathEvidence::default()
            };
            assert_eq!(close_cause(&e), CloseCause::Normal, "{old:?}");
        }
        assert_eq!(close_cause(&evidence()), CloseCause::Other);
    }

    #[test]
    fn zombies_need_an_established_connection() {
        assert_eq!(
            zombie_of_death(CloseCause::KeepaliveTimeout, true),
            Some(ZombieKind::DeadPeerKeepalive)
        );
        assert_eq!(zombie_of_death(CloseCause::RetransmitTimeout, false), None);
        assert_eq!(
            zombie_of_death(CloseCause::ZeroWindowTimeout, true),
            Some(ZombieKind::DeadPeerRetransmit)
        );
    }

    #[test]
    fn silence_handles_wraparound() {
        assert_eq!(silence_before_last_send(1000, 500, 400), Some(500));
        assert_eq!(silence_before_last_send(400, 500, 400), None);
        assert_eq!(
            silence_before_last_send(10, u32::MAX - 9, u32::MAX - 20),
            Some(20)
        );
    }
}
