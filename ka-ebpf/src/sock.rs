//! Reading a `struct sock` at the offsets the agent resolved from BTF.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_probe_read_kernel};
use ka_common::{
    ABSENT, AF_INET, AF_INET6, SNAP_CNT_FROM_SOCKET, SNAP_IDLE_FROM_SOCKET, SNAP_INCOMPLETE,
    SNAP_INTVL_FROM_SOCKET, SNAP_KEEPALIVE_ON, SockOffsets, SockSnapshot, Stat,
};

use crate::{SOCK_OFFSETS, emit::count};

/// TCP states whose socket is not a full `struct sock`: only `sock_common`
/// may be read from them.
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// Reads a `T` at `base + offset`; `None` for an absent field or a failed read
/// (the latter is counted).
#[inline(always)]
fn field<T>(base: *const u8, offset: u16) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address itself and fails
    // cleanly on an unmapped one; `base` is a kernel pointer from the hook.
    match unsafe { bpf_probe_read_kernel(base.wrapping_add(usize::from(offset)).cast::<T>()) } {
        Ok(value) => Some(value),
        Err(_) => {
            count(Stat::ReadFailures as u32);
            None
        }
    }
}

/// Fills `out` from the socket at `sk`, in place (the event lives in the ring
/// buffer; a copy on the 512-byte stack would not fit twice).
#[inline(always)]
pub fn snapshot(sk: *const u8, out: &mut SockSnapshot) {
    clear(out);
    let off: SockOffsets = SOCK_OFFSETS.load();
    let mut complete = true;
    let mut flags = 0u8;

    out.sk = sk as u64;
    // SAFETY: helper without preconditions.
    out.jiffies = unsafe { bpf_jiffies64() };
    out.family = field::<u16>(sk, off.skc_family).unwrap_or(0);
    out.state = field::<u8>(sk, off.skc_state).unwrap_or(0);
    out.sport = field::<u16>(sk, off.skc_num).unwrap_or(0);
    out.dport = u16::from_be(field::<u16>(sk, off.skc_dport).unwrap_or(0));
    out.cookie = field::<u64>(sk, off.skc_cookie).unwrap_or(0);
    if out.family == AF_INET {
        let saddr = field::<[u8; 4]>(sk, off.skc_rcv_saddr).unwrap_or([0; 4]);
        let daddr = field::<[u8; 4]>(sk, off.skc_daddr).unwrap_or([0; 4]);
        out.saddr[..4].copy_from_slice(&saddr);
        out.daddr[..4].copy_from_slice(&daddr);
    } else if out.family == AF_INET6 {
        out.saddr = field::<[u8; 16]>(sk, off.skc_v6_rcv_saddr).unwrap_or([0; 16]);
        out.daddr = field::<[u8; 16]>(sk, off.skc_v6_daddr).unwrap_or([0; 16]);
    }
    let net = field::<u64>(sk, off.skc_net).unwrap_or(0) as *const u8;
    if net.is_null() {
        complete = false;
    } else {
        out.netns = field::<u32>(net, off.net_ns_inum).unwrap_or(0);
    }

    if out.state != TCP_TIME_WAIT && out.state != TCP_NEW_SYN_RECV {
        let sk_flags = field::<u64>(sk, off.sk_flags).unwrap_or(0);
        if off.sock_keepopen_bit < 64 && sk_flags & (1u64 << off.sock_keepopen_bit) != 0 {
            flags |= SNAP_KEEPALIVE_ON;
        }
        out.sk_err = field::<i32>(sk, off.sk_err).unwrap_or(0);
        out.probes_out = field::<u8>(sk, off.icsk_probes_out).unwrap_or(0);
        out.retransmits = field::<u8>(sk, off.icsk_retransmits).unwrap_or(0);
        out.user_timeout_ms = field::<u32>(sk, off.icsk_user_timeout).unwrap_or(0);
        out.lrcvtime = field::<u32>(sk, off.icsk_ack_lrcvtime).unwrap_or(0);
        out.rcv_tstamp = field::<u32>(sk, off.tp_rcv_tstamp).unwrap_or(0);
        out.lsndtime = field::<u32>(sk, off.tp_lsndtime).unwrap_or(0);
        out.packets_out = field::<u32>(sk, off.tp_packets_out).unwrap_or(0);

        // Zero on the socket means "use the namespace's sysctl" (which is in
        // jiffies for time and interval, like the socket's own values).
        let idle = field::<u32>(sk, off.tp_keepalive_time).unwrap_or(0);
        let intvl = field::<u32>(sk, off.tp_keepalive_intvl).unwrap_or(0);
        let cnt = field::<u8>(sk, off.tp_keepalive_probes).unwrap_or(0);
        out.keepalive_time = if idle != 0 {
            flags |= SNAP_IDLE_FROM_SOCKET;
            idle
        } else if net.is_null() {
            0
        } else {
            field::<u32>(net, off.net_keepalive_time).unwrap_or(0)
        };
        out.keepalive_intvl = if intvl != 0 {
            flags |= SNAP_INTVL_FROM_SOCKET;
            intvl
        } else if net.is_null() {
            0
        } else {
            field::<u32>(net, off.net_keepalive_intvl).unwrap_or(0)
        };
        out.keepalive_probes = if cnt != 0 {
            flags |= SNAP_CNT_FROM_SOCKET;
            cnt
        } else if net.is_null() {
            0
        } else {
            field::<u8>(net, off.net_keepalive_probes).unwrap_or(0)
        };
    }
    if !complete {
        flags |= SNAP_INCOMPLETE;
    }
    out.flags = flags;
}

/// Zeroes a snapshot: ring-buffer slots are not zeroed by the kernel, and
/// every byte of an event goes to user space.
#[inline(always)]
pub fn clear(out: &mut SockSnapshot) {
    // SAFETY: `out` is a valid, exclusive reference; all-zero is a valid
    // `SockSnapshot` (plain integers and arrays).
    unsafe { core::ptr::write_bytes(core::ptr::from_mut(out), 0, 1) };
}

/// The network namespace of a reset sent without a socket: the device the
/// offending packet arrived on.
#[inline(always)]
pub fn netns_of_skb(skb: *const u8) -> u32 {
    let off: SockOffsets = SOCK_OFFSETS.load();
    let Some(dev) = field::<u64>(skb, off.skb_dev) else {
        return 0;
    };
    if dev == 0 {
        return 0;
    }
    let Some(net) = field::<u64>(dev as *const u8, off.dev_nd_net) else {
        return 0;
    };
    if net == 0 {
        return 0;
    }
    field::<u32>(net as *const u8, off.net_ns_inum).unwrap_or(0)
}
