//! Reading a `struct sock` at the offsets the agent resolved from BTF: a
//! snapshot copies a few spans (`ka_common::SockCopyPlan`) and loads its fields from
//! the copy; the filters read their one field directly.

use aya_ebpf::helpers::{bpf_jiffies64, generated};
use ka_common::{
    ABSENT, AF_INET, AF_INET6, EventKind, NO_TYPE, SNAP_CNT_FROM_SOCKET, SNAP_IDLE_FROM_SOCKET,
    SNAP_INCOMPLETE, SNAP_INTVL_FROM_SOCKET, SNAP_KEEPALIVE_ON, SNAP_TOTAL_RETRANS, SOCK_COPY_MASK,
    SPAN_BYTES, SockOffsets, SockSnapshot, Span, Stat, tcp_state,
};

use crate::{
    KEEPALIVE_TIMER_FN, KERNEL_TYPES, SOCK_COPY, SOCK_COPY_AT, SOCK_COPY_COMMON, SOCK_COPY_FULL,
    SOCK_COPY_NET, SOCK_OFFSETS, emit::count,
};

/// One member of a global, read alone: `Global::load` reads the whole value
/// (a volatile load per member), and the verifier sees a member read from
/// the frozen read-only map as the constant it is, which a pointer offset
/// must be.
macro_rules! global {
    ($global:ident . $member:ident) => {{
        let value = crate::sock::inner(&$global);
        // SAFETY: `value` points to the global's initialized value (see
        // `inner`); the member pointer stays inside it and is aligned.
        unsafe { core::ptr::read_volatile(&raw const (*value).$member) }
    }};
}

/// The value inside a global.
#[inline(always)]
pub(crate) fn inner<T>(global: &aya_ebpf::Global<T>) -> *const T {
    // `Global<T>` is `repr(transparent)` over its (always initialized) value.
    core::ptr::from_ref(global).cast()
}

/// `ptr` as a pointer to the kernel type `btf_id`, through the
/// `bpf_rdonly_cast` kfunc: the verifier then allows plain loads from it at
/// offsets inside that type, each guarded by the kernel against faults (a
/// bad address reads as zero). Only called where `KERNEL_TYPES` names the
/// types, that is where the agent found the kfunc and patched its id into
/// the call (see `ka_common::RDONLY_CAST_PLACEHOLDER`).
#[cfg(target_arch = "bpf")]
#[inline(always)]
fn cast(ptr: u64, btf_id: u32) -> *const u8 {
    let cast: u64;
    // SAFETY: the instruction is a kfunc call the agent resolves before
    // loading (or turns into `r0 = r1`); like any call it takes r1 and r2,
    // returns in r0 and clobbers r1-r5. It reads and writes no memory of
    // this program.
    unsafe {
        core::arch::asm!(
            ".quad {call}",
            call = const ka_common::RDONLY_CAST_PLACEHOLDER,
            inlateout("r1") ptr => _,
            inlateout("r2") u64::from(btf_id) => _,
            lateout("r0") cast,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
            options(nostack, nomem, preserves_flags),
        );
    }
    cast as *const u8
}

#[cfg(not(target_arch = "bpf"))]
fn cast(ptr: u64, _btf_id: u32) -> *const u8 {
    ptr as *const u8
}

/// The `T` at `offset` of a cast pointer (see [`cast`]); zero for an absent
/// member. One load of exactly `T`'s width: the verifier checks the load
/// against the member at that offset.
#[inline(always)]
fn load<T: Copy + Default>(typed: *const u8, offset: u16) -> T {
    if offset == ABSENT {
        return T::default();
    }
    // SAFETY: `typed` is a cast pointer: the verifier checked that `offset`
    // is inside its type and the kernel turns a faulting load into zero
    // instead of an oops (`BPF_PROBE_MEM`). Kernel structure members are
    // naturally aligned.
    unsafe { typed.add(usize::from(offset)).cast::<T>().read_volatile() }
}

/// The `T` at `offset` in the kernel structure at `ptr`, of BTF type
/// `btf_id`: a direct load where the kernel allows it (`KERNEL_TYPES`),
/// else a helper read. Zero for an absent member.
#[inline(always)]
fn member<T: Copy + Default>(ptr: u64, btf_id: u32, offset: u16) -> T {
    if btf_id == NO_TYPE {
        field::<T>(ptr as *const u8, offset)
    } else {
        load::<T>(cast(ptr, btf_id), offset)
    }
}

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
    member::<u8>(
        sk as u64,
        global!(KERNEL_TYPES.tcp_sock),
        global!(SOCK_OFFSETS.skc_state),
    )
}

/// Whether `timer` is a socket's keepalive timer (its callback is
/// `tcp_keepalive_timer`): one read of the timer, done only when the agent
/// found the callback's address.
#[inline(always)]
pub fn is_keepalive_timer(timer: u64) -> bool {
    let keepalive_fn = KEEPALIVE_TIMER_FN.load();
    if keepalive_fn == 0 {
        return false;
    }
    let function = member::<u64>(
        timer,
        global!(KERNEL_TYPES.timer_list),
        global!(SOCK_OFFSETS.timer_function),
    );
    function == keepalive_fn
}

/// The inode number of the socket's `struct socket` (`socket:[N]` in
/// `/proc/<pid>/fd`); 0 for a socket no process holds, or where this
/// kernel's layout is unknown. Socket inodes come from `get_next_ino()`, an
/// `unsigned int`; a larger value would be a layout mistake and reads as 0.
#[inline(always)]
pub fn socket_inode(sk: *const u8) -> u32 {
    let socket = member::<u64>(
        sk as u64,
        global!(KERNEL_TYPES.tcp_sock),
        global!(SOCK_OFFSETS.sk_socket),
    );
    if socket == 0 {
        return 0;
    }
    let inode = member::<u64>(
        socket,
        global!(KERNEL_TYPES.socket_alloc),
        global!(SOCK_OFFSETS.socket_ino),
    );
    u32::try_from(inode).unwrap_or(0)
}

/// Whether the socket has `SO_KEEPALIVE` on (a full socket only).
#[inline(always)]
pub fn keepalive_on(sk: *const u8) -> bool {
    let bit = global!(SOCK_OFFSETS.sock_keepopen_bit);
    let flags = member::<u64>(
        sk as u64,
        global!(KERNEL_TYPES.tcp_sock),
        global!(SOCK_OFFSETS.sk_flags),
    );
    bit < 64 && flags & (1u64 << bit) != 0
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

/// Where a snapshot loads a structure's members from.
#[derive(Clone, Copy)]
enum Source {
    /// The structure itself, through a cast pointer ([`cast`]).
    Direct(*const u8),
    /// The per-CPU copy its spans were copied into.
    Copy(*mut u8),
}

/// The `$ty` member `$member` (a [`SockOffsets`] name) from a [`Source`].
macro_rules! get {
    ($source:expr, $ty:ty, $member:ident) => {
        match $source {
            Source::Direct(typed) => load::<$ty>(typed, global!(SOCK_OFFSETS.$member)),
            Source::Copy(copy) => at::<$ty>(copy, global!(SOCK_COPY_AT.$member)),
        }
    };
}

/// Fills `out` from the socket at `sk`, in place (the event lives in the ring
/// buffer; a copy on the 512-byte stack would not fit twice).
///
/// Where the kernel has `bpf_rdonly_cast`, every member is one guarded load
/// through a cast pointer. Elsewhere the spans of the agent's plan are
/// copied with `bpf_probe_read_kernel` into the per-CPU copy of the event's
/// kind (raw tracepoint programs can interrupt other programs on the same
/// CPU: only a program's own runs exclude each other) and loaded from there.
///
/// Returns the socket's protocol (`sk_protocol`; zero when it is not a full
/// socket or the field is unknown).
#[inline(always)]
pub fn snapshot(sk: *const u8, out: &mut SockSnapshot, kind: EventKind) -> u16 {
    clear(out);
    out.sk = sk as u64;
    // SAFETY: helper without preconditions.
    out.jiffies = unsafe { bpf_jiffies64() };
    let tcp_sock = global!(KERNEL_TYPES.tcp_sock);
    let source = if tcp_sock == NO_TYPE {
        let Some(copy) = SOCK_COPY.get_ptr_mut(kind as u32) else {
            out.flags = SNAP_INCOMPLETE;
            return 0;
        };
        let copy = copy.cast::<u8>();
        copy_spans(copy, sk, &SOCK_COPY_COMMON.load());
        Source::Copy(copy)
    } else {
        Source::Direct(cast(sk as u64, tcp_sock))
    };
    let mut complete = true;
    let mut flags = 0u8;
    let mut protocol = 0u16;

    out.family = get!(source, u16, skc_family);
    out.state = get!(source, u8, skc_state);
    out.sport = get!(source, u16, skc_num);
    out.dport = u16::from_be(get!(source, u16, skc_dport));
    out.cookie = get!(source, u64, skc_cookie);
    if out.family == AF_INET {
        set_ipv4(&mut out.saddr, get!(source, u32, skc_rcv_saddr));
        set_ipv4(&mut out.daddr, get!(source, u32, skc_daddr));
    } else if out.family == AF_INET6 {
        out.saddr = get!(source, [u8; 16], skc_v6_rcv_saddr);
        out.daddr = get!(source, [u8; 16], skc_v6_daddr);
    }
    let net_ptr = get!(source, u64, skc_net);
    let net = if net_ptr == 0 {
        complete = false;
        None
    } else {
        let net = match source {
            Source::Direct(_) => Source::Direct(cast(net_ptr, global!(KERNEL_TYPES.net))),
            Source::Copy(copy) => {
                copy_spans(copy, net_ptr as *const u8, &SOCK_COPY_NET.load());
                Source::Copy(copy)
            }
        };
        out.netns = get!(net, u32, net_ns_inum);
        Some(net)
    };

    // Time-wait and request sockets are not a full `struct sock`: only
    // `sock_common` may be read from them.
    if out.state != tcp_state::TIME_WAIT && out.state != tcp_state::NEW_SYN_RECV {
        if let Source::Copy(copy) = source {
            copy_spans(copy, sk, &SOCK_COPY_FULL.load());
        }
        protocol = get!(source, u16, sk_protocol);
        // The kernel releases the port (`skc_num` 0) before the CLOSE
        // transition's tracepoint; `inet_sport` keeps it.
        if out.sport == 0 {
            out.sport = u16::from_be(get!(source, u16, inet_sport));
        }
        let bit = global!(SOCK_OFFSETS.sock_keepopen_bit);
        if bit < 64 && get!(source, u64, sk_flags) & (1u64 << bit) != 0 {
            flags |= SNAP_KEEPALIVE_ON;
        }
        out.sk_err = get!(source, i32, sk_err);
        out.sk_err_soft = errno_byte(get!(source, i32, sk_err_soft));
        out.probes_out = get!(source, u8, icsk_probes_out);
        out.retransmits = get!(source, u8, icsk_retransmits);
        out.user_timeout_ms = get!(source, u32, icsk_user_timeout);
        out.lrcvtime = get!(source, u32, icsk_ack_lrcvtime);
        out.rcv_tstamp = get!(source, u32, tp_rcv_tstamp);
        out.lsndtime = get!(source, u32, tp_lsndtime);
        out.packets_out = get!(source, u32, tp_packets_out);
        if global!(SOCK_OFFSETS.tp_total_retrans) != ABSENT {
            out.total_retrans = get!(source, u32, tp_total_retrans);
            flags |= SNAP_TOTAL_RETRANS;
        }

        // Zero on the socket means "use the namespace's sysctl" (which is in
        // jiffies for time and interval, like the socket's own values).
        let idle = get!(source, u32, tp_keepalive_time);
        let intvl = get!(source, u32, tp_keepalive_intvl);
        let cnt = get!(source, u8, tp_keepalive_probes);
        out.keepalive_time = if idle != 0 {
            flags |= SNAP_IDLE_FROM_SOCKET;
            idle
        } else {
            net.map_or(0, |net| get!(net, u32, net_keepalive_time))
        };
        out.keepalive_intvl = if intvl != 0 {
            flags |= SNAP_INTVL_FROM_SOCKET;
            intvl
        } else {
            net.map_or(0, |net| get!(net, u32, net_keepalive_intvl))
        };
        out.keepalive_probes = if cnt != 0 {
            flags |= SNAP_CNT_FROM_SOCKET;
            cnt
        } else {
            net.map_or(0, |net| get!(net, u8, net_keepalive_probes))
        };
    }
    if !complete {
        flags |= SNAP_INCOMPLETE;
    }
    out.flags = flags;
    protocol
}

/// A positive errno in a byte (every errno is below 256); anything else,
/// which a sane kernel never stores, as 255.
#[inline(always)]
fn errno_byte(errno: i32) -> u8 {
    u8::try_from(errno).unwrap_or(u8::MAX)
}

/// Zeroes a snapshot: ring-buffer slots are not zeroed by the kernel, and
/// every byte of an event goes to user space. Word by word (see
/// [`crate::emit::zero_words`]): perf showed the `memset` subprogram LLVM
/// makes of plain zeroing at a quarter of the program's own cost.
#[inline(always)]
pub fn clear(out: &mut SockSnapshot) {
    crate::emit::zero_words(out);
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
