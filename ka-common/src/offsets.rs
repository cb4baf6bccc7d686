//! Offset tables handed to the kernel programs as globals.
//!
//! Rust eBPF has no CO-RE relocations, so the agent resolves every field the
//! programs read (tracepoint record fields from tracefs `format` files, kernel
//! struct members from BTF) at start-up. A field the running kernel does not
//! have is [`ABSENT`]; the programs test for it and degrade instead of
//! guessing.

/// Marks a field the running kernel does not have.
pub const ABSENT: u16 = u16::MAX;

/// Returns whether `offset` names a field that exists on this kernel.
#[inline]
pub const fn present(offset: u16) -> bool {
    offset != ABSENT
}

/// Record fields of `sock:inet_sock_set_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetStateFields {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub protocol: u16,
}

impl SetStateFields {
    /// The layout every kernel since 4.16 reports: the programs load these
    /// offsets directly (no helper call) when tracefs says exactly this.
    pub const USUAL: Self = Self {
        skaddr: 8,
        oldstate: 16,
        newstate: 20,
        protocol: 30,
    };

    pub const ABSENT: Self = Self {
        skaddr: ABSENT,
        oldstate: ABSENT,
        newstate: ABSENT,
        protocol: ABSENT,
    };
}

/// Record fields of `tcp:tcp_retransmit_skb`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetransmitFields {
    pub skaddr: u16,
    pub skbaddr: u16,
    /// Added in 6.17; absent before.
    pub err: u16,
    pub reserved: u16,
}

impl RetransmitFields {
    pub const ABSENT: Self = Self {
        skaddr: ABSENT,
        skbaddr: ABSENT,
        err: ABSENT,
        reserved: 0,
    };
}

/// Record fields of `tcp:tcp_send_reset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendResetFields {
    pub skaddr: u16,
    pub skbaddr: u16,
    /// `enum sk_rst_reason`, 6.10+; absent before.
    pub reason: u16,
    /// 6.10+; absent before.
    pub state: u16,
}

impl SendResetFields {
    pub const ABSENT: Self = Self {
        skaddr: ABSENT,
        skbaddr: ABSENT,
        reason: ABSENT,
        state: ABSENT,
    };
}

/// Record fields of `tcp:tcp_receive_reset` and `tcp:tcp_destroy_sock`
/// (both use the `tcp_event_sk` class).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkRecordFields {
    pub skaddr: u16,
    pub reserved: [u16; 3],
}

impl SkRecordFields {
    /// The usual layout (see [`SetStateFields::USUAL`]).
    pub const USUAL: Self = Self {
        skaddr: 8,
        reserved: [0; 3],
    };

    pub const ABSENT: Self = Self {
        skaddr: ABSENT,
        reserved: [0; 3],
    };
}

/// Record fields of `sock:inet_sk_error_report` (it carries no socket pointer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorReportFields {
    pub error: u16,
    pub protocol: u16,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
    pub reserved: [u16; 3],
}

impl ErrorReportFields {
    pub const ABSENT: Self = Self {
        error: ABSENT,
        protocol: ABSENT,
        family: ABSENT,
        sport: ABSENT,
        dport: ABSENT,
        saddr: ABSENT,
        daddr: ABSENT,
        saddr_v6: ABSENT,
        daddr_v6: ABSENT,
        reserved: [0; 3],
    };
}

/// Record fields of `timer:timer_start` and `timer:timer_expire_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerFields {
    pub timer: u16,
    pub function: u16,
    /// Only `timer_start` has it.
    pub expires: u16,
    pub reserved: u16,
}

impl TimerFields {
    /// The usual `timer_start` layout (see [`SetStateFields::USUAL`]).
    pub const START_USUAL: Self = Self {
        timer: 8,
        function: 16,
        expires: 24,
        reserved: 0,
    };

    /// The usual `timer_expire_entry` layout (no `expires`).
    pub const EXPIRE_USUAL: Self = Self {
        timer: 8,
        function: 24,
        expires: ABSENT,
        reserved: 0,
    };

    pub const ABSENT: Self = Self {
        timer: ABSENT,
        function: ABSENT,
        expires: ABSENT,
        reserved: 0,
    };
}

/// Members of the kernel's socket structures, all relative to the
/// `struct sock *` (`inet_connection_sock` and `tcp_sock` embed `sock` at
/// offset 0), plus the few other structures the programs walk.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    // struct sock_common
    pub skc_family: u16,
    pub skc_state: u16,
    pub skc_num: u16,
    pub skc_dport: u16,
    pub skc_rcv_saddr: u16,
    pub skc_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
    pub skc_v6_daddr: u16,
    pub skc_net: u16,
    pub skc_cookie: u16,
    // struct sock
    pub sk_flags: u16,
    pub sk_err: u16,
    /// `sock.sk_err_soft`: the last error the socket survived (an ICMP
    /// unreachable for its segments, a failed route).
    pub sk_err_soft: u16,
    /// The keepalive `timer_list`: `sock.sk_timer` before 6.19,
    /// `inet_connection_sock.icsk_keepalive_timer` from 6.19.
    pub keepalive_timer: u16,
    // struct inet_connection_sock
    pub icsk_probes_out: u16,
    pub icsk_retransmits: u16,
    pub icsk_user_timeout: u16,
    pub icsk_ack_lrcvtime: u16,
    // struct tcp_sock
    pub tp_keepalive_time: u16,
    pub tp_keepalive_intvl: u16,
    pub tp_keepalive_probes: u16,
    pub tp_rcv_tstamp: u16,
    pub tp_lsndtime: u16,
    pub tp_packets_out: u16,
    /// `tcp_sock.total_retrans`: segments retransmitted, as `RetransSegs`.
    pub tp_total_retrans: u16,
    // struct net (relative to the `struct net *`)
    pub net_ns_inum: u16,
    pub net_keepalive_time: u16,
    pub net_keepalive_intvl: u16,
    pub net_keepalive_probes: u16,
    // struct sk_buff / net_device: the netns of a reset sent without a socket
    pub skb_dev: u16,
    pub dev_nd_net: u16,
    /// Bit number of `SOCK_KEEPOPEN` in `sk_flags` (`enum sock_flags`).
    pub sock_keepopen_bit: u16,
    /// `sock.sk_protocol`, a plain `u16` (5.6+; before, a bitfield, left
    /// absent): the raw `inet_sock_set_state` program's protocol filter,
    /// read from the snapshot's copy.
    pub sk_protocol: u16,
    /// `timer_list.function`: the raw timer programs' filter.
    pub timer_function: u16,
    /// `inet_sock.inet_sport` (network order): the local port where
    /// `skc_num` reads 0, which it does at every CLOSE transition (the
    /// kernel releases the port before the tracepoint).
    pub inet_sport: u16,
    /// `sock.sk_socket`: the `struct socket` a process holds the socket by.
    pub sk_socket: u16,
    /// `socket_alloc.vfs_inode.i_ino`, relative to the `struct socket *`
    /// (`socket_alloc` starts with its `socket`): the number
    /// `/proc/<pid>/fd` shows as `socket:[N]`.
    pub socket_ino: u16,
}

impl SockOffsets {
    pub const ABSENT: Self = Self {
        skc_family: ABSENT,
        skc_state: ABSENT,
        skc_num: ABSENT,
        skc_dport: ABSENT,
        skc_rcv_saddr: ABSENT,
        skc_daddr: ABSENT,
        skc_v6_rcv_saddr: ABSENT,
        skc_v6_daddr: ABSENT,
        skc_net: ABSENT,
        skc_cookie: ABSENT,
        sk_flags: ABSENT,
        sk_err: ABSENT,
        sk_err_soft: ABSENT,
        keepalive_timer: ABSENT,
        icsk_probes_out: ABSENT,
        icsk_retransmits: ABSENT,
        icsk_user_timeout: ABSENT,
        icsk_ack_lrcvtime: ABSENT,
        tp_keepalive_time: ABSENT,
        tp_keepalive_intvl: ABSENT,
        tp_keepalive_probes: ABSENT,
        tp_rcv_tstamp: ABSENT,
        tp_lsndtime: ABSENT,
        tp_packets_out: ABSENT,
        tp_total_retrans: ABSENT,
        net_ns_inum: ABSENT,
        net_keepalive_time: ABSENT,
        net_keepalive_intvl: ABSENT,
        net_keepalive_probes: ABSENT,
        skb_dev: ABSENT,
        dev_nd_net: ABSENT,
        sock_keepopen_bit: ABSENT,
        sk_protocol: ABSENT,
        timer_function: ABSENT,
        inet_sport: ABSENT,
        sk_socket: ABSENT,
        socket_ino: ABSENT,
    };
}

/// Kernel BTF type ids the programs cast socket, namespace and timer
/// pointers to with the `bpf_rdonly_cast` kfunc (Linux 6.2+): a load
/// through a cast pointer is one instruction the kernel guards against
/// faults, where `bpf_probe_read_kernel` is a helper call (and a socket
/// snapshot six of them). All [`NO_TYPE`] where the kernel lacks the kfunc
/// or a type: the programs then read with the helper.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTypes {
    /// `struct tcp_sock`, which embeds `inet_connection_sock`, `sock` and
    /// `sock_common` at offset 0 (every [`SockOffsets`] socket member).
    pub tcp_sock: u32,
    /// `struct net`.
    pub net: u32,
    /// `struct timer_list`.
    pub timer_list: u32,
    /// `struct socket_alloc` (a `struct socket` and its inode); may be
    /// [`NO_TYPE`] where the others are not: the socket's inode is then
    /// read with the helper.
    pub socket_alloc: u32,
}

/// No BTF type: type id 0 is `void`, never a structure.
pub const NO_TYPE: u32 = 0;

impl KernelTypes {
    pub const ABSENT: Self = Self {
        tcp_sock: NO_TYPE,
        net: NO_TYPE,
        timer_list: NO_TYPE,
        socket_alloc: NO_TYPE,
    };

    /// Whether the programs load through cast pointers.
    #[inline]
    pub const fn direct(&self) -> bool {
        self.tcp_sock != NO_TYPE && self.net != NO_TYPE && self.timer_list != NO_TYPE
    }
}

/// The instruction the programs carry where they call `bpf_rdonly_cast`: a
/// kfunc call (`BPF_JMP | BPF_CALL`, source register `BPF_PSEUDO_KFUNC_CALL`)
/// whose immediate, the kfunc's BTF id, is a placeholder. The toolchain
/// cannot emit a kfunc relocation, and aya 0.14 would not resolve one, so
/// the agent writes the id from this kernel's BTF into every copy of this
/// instruction before loading (or, where the kfunc is missing, the `r0 = r1`
/// the verifier itself turns the call into; the programs then never take
/// the cast path).
pub const RDONLY_CAST_PLACEHOLDER: u64 = 0x85 | (0x20 << 8) | ((RDONLY_CAST_MARK as u64) << 32);
/// The placeholder's immediate ("kaRC"): its eight bytes occur nowhere else
/// in the object (checked when the agent patches it).
pub const RDONLY_CAST_MARK: u32 = 0x6B61_5243;
/// `r0 = r1` (`BPF_ALU64 | BPF_MOV | BPF_X`, dst r0, src r1).
pub const MOV_R0_R1: u64 = 0xbf | (0x10 << 8);

/// Bytes one [`Span`] copies at most. Large: a helper call costs more here
/// than copying a few hundred bytes more (docs/benchmarks.md), so fields up
/// to this far apart share a span.
pub const SPAN_BYTES: u16 = 512;
/// Spans of `sock_common` (readable in every kind of socket).
pub const COMMON_SPANS: usize = 2;
/// Spans of the full socket (`sock`, `inet_connection_sock`, `tcp_sock`).
pub const FULL_SPANS: usize = 8;
/// Spans of the socket's `struct net`.
pub const NET_SPANS: usize = 2;
/// Bytes of the per-CPU copy the spans are packed into, one after the other;
/// a power of two, so a mask bounds every span start and field position for
/// the verifier.
pub const SOCK_COPY_AREA: u16 = 2048;
/// Mask applied to span starts and positions in the copy.
pub const SOCK_COPY_MASK: u16 = SOCK_COPY_AREA - 1;
/// Size of the per-CPU copy: the area, plus room for a whole span starting
/// at its last byte (what the verifier must allow for a masked start).
pub const SOCK_COPY_BYTES: usize = SOCK_COPY_AREA as usize + SPAN_BYTES as usize;

/// A run of bytes a program copies with one helper call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// Start, relative to the structure's pointer.
    pub offset: u16,
    /// Length in bytes (at most [`SPAN_BYTES`]; 0 = unused).
    pub len: u16,
    /// Where it lands in the copy (8-byte aligned, below [`SOCK_COPY_AREA`]).
    pub to: u16,
}

/// How the programs read a socket: a few spans copied into a per-CPU
/// buffer, then every field loaded from there.
///
/// Reading each field with its own `bpf_probe_read_kernel` cost ~25 helper
/// calls per event; the fields the programs read cluster in a handful of
/// places, so the agent groups them at start-up (from the BTF offsets in
/// [`SockOffsets`]) into spans, packed one after the other in the copy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockCopyPlan {
    pub common: [Span; COMMON_SPANS],
    pub full: [Span; FULL_SPANS],
    pub net: [Span; NET_SPANS],
    /// Each field's position in the copy, under the field's name; [`ABSENT`]
    /// for a field this kernel lacks and for those the programs read
    /// directly (`keepalive_timer`, `skb_dev`, `dev_nd_net`,
    /// `timer_function`, `sk_socket`, `socket_ino`).
    /// `sock_keepopen_bit` is the bit number itself, as in [`SockOffsets`].
    pub at: SockOffsets,
}

impl SockCopyPlan {
    pub const ABSENT: Self = Self {
        common: [Span {
            offset: 0,
            len: 0,
            to: 0,
        }; COMMON_SPANS],
        full: [Span {
            offset: 0,
            len: 0,
            to: 0,
        }; FULL_SPANS],
        net: [Span {
            offset: 0,
            len: 0,
            to: 0,
        }; NET_SPANS],
        at: SockOffsets::ABSENT,
    };
}

const _: () = assert!(size_of::<SetStateFields>() == 8);
const _: () = assert!(size_of::<RetransmitFields>() == 8);
const _: () = assert!(size_of::<SendResetFields>() == 8);
const _: () = assert!(size_of::<SkRecordFields>() == 8);
const _: () = assert!(size_of::<ErrorReportFields>() == 24);
const _: () = assert!(size_of::<TimerFields>() == 8);
const _: () = assert!(size_of::<KernelTypes>() == 16);
const _: () = assert!(size_of::<SockOffsets>() == 74);
const _: () = assert!(size_of::<Span>() == 6);
const _: () =
    assert!(size_of::<SockCopyPlan>() == 6 * (COMMON_SPANS + FULL_SPANS + NET_SPANS) + 74);
const _: () = assert!(SOCK_COPY_AREA.is_power_of_two());
// The widest field read at the last position stays inside the copy.
const _: () = assert!(SPAN_BYTES >= 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, made only of `u16`s with no implicit
    // padding (sizes asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::SetStateFields {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RetransmitFields {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SendResetFields {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SkRecordFields {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ErrorReportFields {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TimerFields {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Span {}
    // SAFETY: `#[repr(C)]`, four `u32`s, no padding (size asserted above).
    unsafe impl aya::Pod for super::KernelTypes {}
}
