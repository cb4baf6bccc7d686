//! Reading a `struct sock` at the offsets the agent resolved from BTF: a
//! snapshot copies a few spans (`ka_common::SockCopyPlan`) and loads its fields from
//! the copy; the filters read their one field directly.

use aya_ebpf::helpers::{bpf_jiffies64, generated};
use ka_common::{
    ABSENT, AF_INET, AF_INET6, EventKind, SNAP_CNT_FROM_SOCKET, SNAP_IDLE_FROM_SOCKET,
    SNAP_INCOMPLETE, SNAP_INTVL_FROM_SOCKET, SNAP_KEEPALIVE_ON, SOCK_COPY_MASK, SPAN_BYTES,
    SockOffsets, SockSnapshot, Span, Stat, tcp_state,
};

use crate::{
    KEEPALIVE_TIMER_FN, SOCK_COPY, SOCK_COPY_AT, SOCK_COPY_COMMON, SOCK_COPY_FULL, SOCK_COPY_NET,
    SOCK_OFFSETS, emit::count,
};

/// Reads a `T` at `base + offset`: zero for an absent field or a failed read
/// (the latter is counted). The destination is initialized before the read,
/// so no path can hand an undefined value to the verifier.
#[inline(always)]
fn field<T: Copy + Default>(base: *const u8, offset: u16) -> T {
    let mut value = T::default();
    if offset == ABSENT {
        return value;
    }
    // SAFETY: bpf_probe_read_kernel validates the source address itself and
    // fails cleanly on an unmapped one; the destination is a local of
    // exactly `size_of::<T>()` bytes.
    let ret = unsafe {
        generated::bpf_probe_read_kernel(
            core::ptr::from_mut(&mut value).cast(),
            // Fields are at most 16 bytes.
            u32::try_from(size_of::<T>()).unwrap_or(0),
            base.wrapping_add(usize::from(offset)).cast(),
        )
    };
    if ret != 0 {
        count(Stat::ReadFailures as u32);
        return T::default();
    }
    value
}

/// The socket's TCP state.
#[inline(always)]
pub fn state(sk: *const u8) -> u8 {
    field::<u8>(sk, SOCK_OFFSETS.load().skc_state)
}

/// Whether `timer` is a socket's keepalive timer (its callback is
/// `tcp_keepalive_timer`): one read of the timer, done only when the agent
/// found the callback's address.
#[inline(always)]
pub fn is_keepalive_timer(timer: u64) -> bool {
    let keepalive_fn = KEEPALIVE_TIMER_FN.load();
    keepalive_fn != 0
        && field::<u64>(timer as *const u8, SOCK_OFFSETS.load().timer_function) == keepalive_fn
}

/// Whether the socket has `SO_KEEPALIVE` on (a full socket only).
#[inline(always)]
pub fn keepalive_on(sk: *const u8) -> bool {
    let off: SockOffsets = SOCK_OFFSETS.load();
    off.sock_keepopen_bit < 64
        && field::<u64>(sk, off.sk_flags) & (1u64 << off.sock_keepopen_bit) != 0
}

/// Copies `spans` of the structure at `base` into the copy, each where the
/// plan packed it: one helper call per span instead of one per field. A
/// failed copy is counted; the helper zeroes its destination, so the fields
/// in it read as zero rather than as a previous socket's.
#[inline(always)]
fn copy_spans<const N: usize>(copy: *mut u8, base: *const u8, spans: &[Span; N]) {
    for span in spans {
        // The agent fills spans in order; the first unused one ends them.
        if span.len == 0 {
            break;
        }
        let len = span.len.min(SPAN_BYTES);
        let to = copy.wrapping_add(usize::from(span.to & SOCK_COPY_MASK));
        // SAFETY: the destination starts below SOCK_COPY_AREA in the
        // per-CPU copy, which has SPAN_BYTES more room than that (sized in
        // ka-common), and `len` is at most SPAN_BYTES;
        // bpf_probe_read_kernel validates the source itself and fails
        // cleanly on an unmapped address.
        let ret = unsafe {
            generated::bpf_probe_read_kernel(
                to.cast(),
                u32::from(len),
                base.wrapping_add(usize::from(span.offset)).cast(),
            )
        };
        if ret != 0 {
            count(Stat::ReadFailures as u32);
        }
    }
}

/// The `T` at `position` in the copy; zero for a field not copied.
#[inline(always)]
fn at<T: Copy + Default>(copy: *const u8, position: u16) -> T {
    if position == ABSENT {
        return T::default();
    }
    let position = usize::from(position & SOCK_COPY_MASK);
    // SAFETY: the mask keeps the position inside the copy with room for the
    // widest field (SOCK_COPY_BYTES), which the verifier checks too; the
    // copy is 8-byte aligned and every position keeps its field's alignment
    // in the socket (the agent starts spans at 8-byte boundaries), so the
    // load is aligned.
    unsafe { copy.add(position).cast::<T>().read() }
}

/// Fills `out` from the socket at `sk`, in place (the event lives in the ring
/// buffer; a copy on the 512-byte stack would not fit twice). The copy is
/// the slot of the event's kind: raw tracepoint programs can interrupt
/// other programs on the same CPU (only a program's own runs exclude each
/// other), so each program has a copy of its own.
///
/// Returns the socket's protocol (`sk_protocol`; zero when it is not a full
/// socket or the field was not copied).
#[inline(always)]
pub fn snapshot(sk: *const u8, out: &mut SockSnapshot, kind: EventKind) -> u16 {
    clear(out);
    out.sk = sk as u64;
    // SAFETY: helper without preconditions.
    out.jiffies = unsafe { bpf_jiffies64() };
    let Some(copy) = SOCK_COPY.get_ptr_mut(kind as u32) else {
        out.flags = SNAP_INCOMPLETE;
        return 0;
    };
    let copy = copy.cast::<u8>();
    let at_: SockOffsets = SOCK_COPY_AT.load();
    let mut complete = true;
    let mut flags = 0u8;
    let mut protocol = 0u16;

    copy_spans(copy, sk, &SOCK_COPY_COMMON.load());
    out.family = at::<u16>(copy, at_.skc_family);
    out.state = at::<u8>(copy, at_.skc_state);
    out.sport = at::<u16>(copy, at_.skc_num);
    out.dport = u16::from_be(at::<u16>(copy, at_.skc_dport));
    out.cookie = at::<u64>(copy, at_.skc_cookie);
    if out.family == AF_INET {
        set_ipv4(&mut out.saddr, at::<u32>(copy, at_.skc_rcv_saddr));
        set_ipv4(&mut out.daddr, at::<u32>(copy, at_.skc_daddr));
    } else if out.family == AF_INET6 {
        out.saddr = at::<[u8; 16]>(copy, at_.skc_v6_rcv_saddr);
        out.daddr = at::<[u8; 16]>(copy, at_.skc_v6_daddr);
    }
    let net = at::<u64>(copy, at_.skc_net) as *const u8;
    if net.is_null() {
        complete = false;
    } else {
        copy_spans(copy, net, &SOCK_COPY_NET.load());
        out.netns = at::<u32>(copy, at_.net_ns_inum);
    }

    // Time-wait and request sockets are not a full `struct sock`: only
    // `sock_common` may be read from them.
    if out.state != tcp_state::TIME_WAIT && out.state != tcp_state::NEW_SYN_RECV {
        copy_spans(copy, sk, &SOCK_COPY_FULL.load());
        protocol = at::<u16>(copy, at_.sk_protocol);
        let bit = at_.sock_keepopen_bit;
        if bit < 64 && at::<u64>(copy, at_.sk_flags) & (1u64 << bit) != 0 {
            flags |= SNAP_KEEPALIVE_ON;
        }
        out.sk_err = at::<i32>(copy, at_.sk_err);
        out.probes_out = at::<u8>(copy, at_.icsk_probes_out);
        out.retransmits = at::<u8>(copy, at_.icsk_retransmits);
        out.user_timeout_ms = at::<u32>(copy, at_.icsk_user_timeout);
        out.lrcvtime = at::<u32>(copy, at_.icsk_ack_lrcvtime);
        out.rcv_tstamp = at::<u32>(copy, at_.tp_rcv_tstamp);
        out.lsndtime = at::<u32>(copy, at_.tp_lsndtime);
        out.packets_out = at::<u32>(copy, at_.tp_packets_out);

        // Zero on the socket means "use the namespace's sysctl" (which is in
        // jiffies for time and interval, like the socket's own values).
        let idle = at::<u32>(copy, at_.tp_keepalive_time);
        let intvl = at::<u32>(copy, at_.tp_keepalive_intvl);
        let cnt = at::<u8>(copy, at_.tp_keepalive_probes);
        out.keepalive_time = if idle != 0 {
            flags |= SNAP_IDLE_FROM_SOCKET;
            idle
        } else if net.is_null() {
            0
        } else {
            at::<u32>(copy, at_.net_keepalive_time)
        };
        out.keepalive_intvl = if intvl != 0 {
            flags |= SNAP_INTVL_FROM_SOCKET;
            intvl
        } else if net.is_null() {
            0
        } else {
            at::<u32>(copy, at_.net_keepalive_intvl)
        };
        out.keepalive_probes = if cnt != 0 {
            flags |= SNAP_CNT_FROM_SOCKET;
            cnt
        } else if net.is_null() {
            0
        } else {
            at::<u8>(copy, at_.net_keepalive_probes)
        };
    }
    if !complete {
        flags |= SNAP_INCOMPLETE;
    }
    out.flags = flags;
    protocol
}

/// Zeroes a snapshot: ring-buffer slots are not zeroed by the kernel, and
/// every byte of an event goes to user space.
///
/// Word by word with volatile stores: LLVM turns plain zeroing (a struct
/// literal, `write_bytes`) into a call to a BPF `memset` subprogram that
/// loops byte by byte, which perf showed at a quarter of the program's
/// own cost.
#[inline(always)]
pub fn clear(out: &mut SockSnapshot) {
    const WORDS: usize = size_of::<SockSnapshot>() / 8;
    let words = core::ptr::from_mut(out).cast::<u64>();
    for i in 0..WORDS {
        // SAFETY: `out` is an exclusive reference to a snapshot that is a
        // whole number of 8-byte-aligned words (asserted below), so word
        // `i < WORDS` is inside it and aligned; any bit pattern is a valid
        // value of its fields.
        unsafe { words.add(i).write_volatile(0) };
    }
}

const _: () = assert!(size_of::<SockSnapshot>().is_multiple_of(8));
const _: () = assert!(align_of::<SockSnapshot>() == 8);
const _: () = assert!(core::mem::offset_of!(SockSnapshot, saddr).is_multiple_of(4));
const _: () = assert!(core::mem::offset_of!(SockSnapshot, daddr).is_multiple_of(4));

/// Writes an IPv4 address into the first four bytes of a cleared 16-byte
/// address, as one store (an array literal with twelve zeros becomes a
/// `memset` call, see [`clear`]).
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "the address is 4-aligned in the snapshot, asserted above"
)]
fn set_ipv4(address: &mut [u8; 16], v4: u32) {
    // SAFETY: the address is at a 4-aligned offset of a snapshot (asserted
    // above) and has room for a u32 in its first four bytes.
    unsafe { address.as_mut_ptr().cast::<u32>().write_volatile(v4) };
}

/// The network namespace of a reset sent without a socket: the device the
/// offending packet arrived on.
#[inline(always)]
pub fn netns_of_skb(skb: *const u8) -> u32 {
    let off: SockOffsets = SOCK_OFFSETS.load();
    let dev = field::<u64>(skb, off.skb_dev);
    if dev == 0 {
        return 0;
    }
    let net = field::<u64>(dev as *const u8, off.dev_nd_net);
    if net == 0 {
        return 0;
    }
    field::<u32>(net as *const u8, off.net_ns_inum)
}
