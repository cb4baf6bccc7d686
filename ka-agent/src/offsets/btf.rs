//! Kernel struct member offsets and enum values from BTF.
//!
//! Member paths are written as C would (`sock.__sk_common.skc_family`) and
//! may pass through anonymous structs and unions, which the lookup descends
//! into transparently (the kernel hides most `sock_common` members in them).

use std::{collections::BTreeMap, fmt, path::Path};

use btf_rs::{Btf, Type};
use ka_common::{ABSENT, SockOffsets};

/// Why BTF could not give what ka needs.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot parse BTF from {path}: {message}")]
    Parse { path: String, message: String },
    #[error("BTF lacks {member}, which ka cannot work without: {reason}")]
    MissingRequired { member: String, reason: String },
    #[error("BTF: {0} is a bitfield not on a byte boundary")]
    Bitfield(String),
    #[error("BTF: offset of {0} does not fit the u16 offset table")]
    TooLarge(String),
    #[error("BTF: {member}: expected struct sock at offset 0, found it at byte {offset}")]
    SockNotFirst { member: String, offset: u32 },
    #[error("BTF lookup failed: {0}")]
    Lookup(String),
}

/// A member this kernel's BTF does not have, and why (for `ka-agent check`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AbsentMember {
    /// `struct.member.path` as the programs would name it.
    pub member: String,
    pub reason: String,
}

impl fmt::Display for AbsentMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BTF member {} absent ({})", self.member, self.reason)
    }
}

/// Outcome of looking a member path up.
enum Resolved {
    /// Byte offset from the start of the root struct.
    At(u32),
    /// The path does not exist; the string says which step is missing.
    Missing(String),
}

/// A parsed kernel BTF.
pub struct KernelBtf {
    btf: Btf,
}

fn lookup_error(e: impl fmt::Display) -> BtfError {
    BtfError::Lookup(e.to_string())
}

/// Bound on typedef/qualifier chains and anonymous-member nesting: real
/// kernels need a handful; a loop in corrupt BTF must not hang us.
const MAX_DEPTH: u32 = 16;

impl KernelBtf {
    /// Reads a raw BTF blob (`/sys/kernel/btf/vmlinux`, or a `.BTF` section
    /// dumped from an object file: both start with the BTF header).
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let bytes = std::fs::read(path).map_err(|e| BtfError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses raw BTF (`label` names its origin in errors).
    pub fn from_bytes(bytes: &[u8], label: &str) -> Result<Self, BtfError> {
        let parse_error = |message: &str| BtfError::Parse {
            path: label.to_owned(),
            message: message.to_owned(),
        };
        // btf-rs trusts the section offsets in the header and slices with
        // them: check them first so garbage is an error, not a panic.
        let word = |at: usize| -> Option<usize> {
            let bytes: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
            usize::try_from(u32::from_le_bytes(bytes)).ok()
        };
        if bytes.get(..2) != Some(&[0x9f, 0xeb][..]) {
            return Err(parse_error(
                "not a little-endian BTF blob (bad magic; expected raw BTF such as /sys/kernel/btf/vmlinux)",
            ));
        }
        let (Some(header_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (word(4), word(8), word(12), word(16), word(20))
        else {
            return Err(parse_error("truncated BTF header"));
        };
        let fits = |off: usize, len: usize| {
            header_len
                .checked_add(off)
                .and_then(|start| start.checked_add(len))
                .is_some_and(|end| end <= bytes.len())
        };
        if header_len < 24 || !fits(type_off, type_len) || !fits(str_off, str_len) {
            return Err(parse_error("BTF sections out of bounds"));
        }
        // Belt and braces: btf-rs may still panic on corrupt type records.
        let btf = std::panic::catch_unwind(|| Btf::from_bytes(bytes))
            .map_err(|_| parse_error("malformed BTF type records"))?
            .map_err(|e| parse_error(&e.to_string()))?;
        Ok(Self { btf })
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip(&self, mut ty: Type) -> Result<Type, BtfError> {
        for _ in 0..MAX_DEPTH {
            match &ty {
                Type::Typedef(_)
                | Type::Volatile(_)
                | Type::Const(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => {
                    let inner = ty
                        .as_btf_type()
                        .ok_or_else(|| lookup_error("qualifier without a type"))?;
                    ty = self.btf.resolve_chained_type(inner).map_err(lookup_error)?;
                }
                _ => return Ok(ty),
            }
        }
        Err(lookup_error("typedef chain too long"))
    }

    /// The definition of `struct name` (not a forward declaration); when
    /// several types share the name, one with members wins.
    fn find_struct(&self, name: &str) -> Option<btf_rs::Struct> {
        let mut candidates: Vec<btf_rs::Struct> = self
            .btf
            .resolve_types_by_name(name)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|t| match t {
                Type::Struct(s) | Type::Union(s) => Some(s),
                _ => None,
            })
            .collect();
        let with_members = candidates.iter().position(|s| !s.members.is_empty());
        with_members
            .or((!candidates.is_empty()).then_some(0))
            .map(|index| candidates.swap_remove(index))
    }

    /// Searches `name` among the members of `st`, descending into anonymous
    /// structs and unions. Returns its bit offset, type and whether it is a
    /// bitfield.
    fn member(
        &self,
        st: &btf_rs::Struct,
        name: &str,
        depth: u32,
    ) -> Result<Option<(u32, Type, bool)>, BtfError> {
        if depth > MAX_DEPTH {
            return Ok(None);
        }
        for member in &st.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            let ty = self
                .btf
                .resolve_chained_type(member)
                .map_err(lookup_error)?;
            // In a struct with kind_flag set every member has a size; 0 means
            // "not a bitfield".
            let bitfield = member.bitfield_size().is_some_and(|size| size != 0);
            if member_name == name {
                return Ok(Some((member.bit_offset(), ty, bitfield)));
            }
            if member_name.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = self.strip(ty)?
                && let Some((offset, ty, bitfield)) = self.member(&inner, name, depth + 1)?
            {
                let offset = member
                    .bit_offset()
                    .checked_add(offset)
                    .ok_or_else(|| lookup_error("member offset overflows"))?;
                return Ok(Some((offset, ty, bitfield)));
            }
        }
        Ok(None)
    }

    fn resolve(&self, root: &str, path: &[&str]) -> Result<Resolved, BtfError> {
        let Some(mut current) = self.find_struct(root) else {
            return Ok(Resolved::Missing(format!("no struct {root}")));
        };
        let what = || format!("{root}.{}", path.join("."));
        let mut bits = 0u32;
        let mut parent = root.to_owned();
        for (index, name) in path.iter().enumerate() {
            let Some((offset, ty, bitfield)) = self.member(&current, name, 0)? else {
                return Ok(Resolved::Missing(format!("{parent} has no member {name}")));
            };
            bits = bits
                .checked_add(offset)
                .ok_or_else(|| lookup_error("member offset overflows"))?;
            // A byte-aligned bitfield can still be read from its byte;
            // anything else needs shifting the programs do not do.
            if !bits.is_multiple_of(8) {
                return Err(BtfError::Bitfield(what()));
            }
            if index + 1 == path.len() {
                return Ok(Resolved::At(bits / 8));
            }
            if bitfield {
                // Only a member of a struct type can be descended into.
                return Ok(Resolved::Missing(format!("{parent}.{name} is a bitfield")));
            }
            current = match self.strip(ty)? {
                Type::Struct(s) | Type::Union(s) => s,
                _ => {
                    return Ok(Resolved::Missing(format!(
                        "{parent}.{name} is not a struct"
                    )));
                }
            };
            parent = format!("{parent}.{name}");
        }
        Ok(Resolved::At(bits / 8))
    }

    /// Byte offset of `root.a.b.c` from the start of `struct root`;
    /// `Ok(None)` when the struct or some member is absent.
    pub fn offset_of(&self, root: &str, path: &[&str]) -> Result<Option<u32>, BtfError> {
        Ok(match self.resolve(root, path)? {
            Resolved::At(offset) => Some(offset),
            Resolved::Missing(_) => None,
        })
    }

    /// Value of `enumerator` in `enum name`.
    pub fn enum_value(&self, enum_name: &str, enumerator: &str) -> Option<u64> {
        self.enum_values(enum_name)
            .into_iter()
            .find_map(|(value, name)| (name == enumerator).then_some(value))
    }

    /// All enumerators of `enum name` (empty when the enum is absent).
    /// Values are the raw unsigned bits, as the kernel stores them.
    pub fn enum_values(&self, enum_name: &str) -> Vec<(u64, String)> {
        let name_of = |m: &dyn btf_rs::BtfType| self.btf.resolve_name(m).unwrap_or_default();
        self.btf
            .resolve_types_by_name(enum_name)
            .unwrap_or_default()
            .into_iter()
            .find_map(|t| match t {
                Type::Enum(e) => Some(
                    e.members
                        .iter()
                        .map(|m| (u64::from(m.val()), name_of(m)))
                        .collect(),
                ),
                Type::Enum64(e) => Some(e.members.iter().map(|m| (m.val(), name_of(m))).collect()),
                _ => None,
            })
            .unwrap_or_default()
    }
}

fn narrow(offset: u32, what: &str) -> Result<u16, BtfError> {
    u16::try_from(offset)
        .ok()
        // ABSENT itself would read as "missing" in the programs.
        .filter(|o| *o != ABSENT)
        .ok_or_else(|| BtfError::TooLarge(what.to_owned()))
}

fn describe(root: &str, path: &[&str]) -> String {
    format!("{root}.{}", path.join("."))
}

/// Offset of a member the programs cannot work without.
fn required(btf: &KernelBtf, root: &str, path: &[&str]) -> Result<u16, BtfError> {
    let what = describe(root, path);
    match btf.resolve(root, path)? {
        Resolved::At(offset) => narrow(offset, &what),
        Resolved::Missing(reason) => Err(BtfError::MissingRequired {
            member: what,
            reason,
        }),
    }
}

/// Offset of a member the programs can do without: [`ABSENT`] (and noted
/// in `absent`) when this kernel lacks it.
fn optional(
    btf: &KernelBtf,
    absent: &mut Vec<AbsentMember>,
    root: &str,
    path: &[&str],
    consequence: &str,
) -> Result<u16, BtfError> {
    let what = describe(root, path);
    match btf.resolve(root, path)? {
        Resolved::At(offset) => narrow(offset, &what),
        Resolved::Missing(reason) => {
            absent.push(AbsentMember {
                member: what,
                reason: format!("{reason}; {consequence}"),
            });
            Ok(ABSENT)
        }
    }
}

/// The programs treat a `struct sock *` as a `tcp_sock *` /
/// `inet_connection_sock *`: that only holds if `sock` is their first
/// member, which is checked here rather than assumed.
fn check_sock_first(btf: &KernelBtf) -> Result<(), BtfError> {
    for (root, path) in [
        ("inet_connection_sock", &["icsk_inet", "sk"][..]),
        ("tcp_sock", &["inet_conn", "icsk_inet", "sk"][..]),
    ] {
        if let Resolved::At(offset) = btf.resolve(root, path)?
            && offset != 0
        {
            return Err(BtfError::SockNotFirst {
                member: describe(root, path),
                offset,
            });
        }
    }
    Ok(())
}

/// Resolves every member the programs read, relative to the `struct sock *`
/// (or `struct net *`, `sk_buff *`, `net_device *` for those structs).
/// `absent` collects optional members this kernel lacks, with the reason;
/// a missing required member is an error.
#[expect(
    clippy::too_many_lines,
    reason = "a table: one member the programs read per entry"
)]
pub fn sock_offsets(
    btf: &KernelBtf,
    absent: &mut Vec<AbsentMember>,
) -> Result<SockOffsets, BtfError> {
    check_sock_first(btf)?;
    let common = |member: &'static str| ["__sk_common", member];
    let sk_flags = sk_flags_offset(btf)?;
    let keepalive_timer = keepalive_timer_offset(btf, absent)?;
    let sock_keepopen_bit = sock_keepopen_bit(btf, absent);
    let sk_protocol = sk_protocol_offset(btf, absent)?;
    let mut optional = |root: &str, path: &[&str], consequence: &str| {
        optional(btf, absent, root, path, consequence)
    };
    let no_ipv6 = "IPv6 addresses not reported (kernel without CONFIG_IPV6?)";
    let keepalive = "keepalive settings not reported";
    let netns_default = "netns keepalive defaults not reported";
    let offsets = SockOffsets {
        skc_family: required(btf, "sock", &common("skc_family"))?,
        skc_state: required(btf, "sock", &common("skc_state"))?,
        skc_num: required(btf, "sock", &common("skc_num"))?,
        skc_dport: required(btf, "sock", &common("skc_dport"))?,
        skc_rcv_saddr: required(btf, "sock", &common("skc_rcv_saddr"))?,
        skc_daddr: required(btf, "sock", &common("skc_daddr"))?,
        skc_v6_rcv_saddr: optional("sock", &common("skc_v6_rcv_saddr"), no_ipv6)?,
        skc_v6_daddr: optional("sock", &common("skc_v6_daddr"), no_ipv6)?,
        // possible_net_t wraps the pointer; the programs read the pointer.
        skc_net: required(btf, "sock", &["__sk_common", "skc_net", "net"])?,
        // atomic64_t wraps the counter.
        skc_cookie: required(btf, "sock", &["__sk_common", "skc_cookie", "counter"])?,
        sk_flags,
        sk_err: optional("sock", &["sk_err"], "socket error not reported")?,
        sk_err_soft: optional(
            "sock",
            &["sk_err_soft"],
            "soft errors of live connections not reported",
        )?,
        keepalive_timer,
        icsk_probes_out: optional(
            "inet_connection_sock",
            &["icsk_probes_out"],
            "unanswered probes not reported",
        )?,
        icsk_retransmits: optional(
            "inet_connection_sock",
            &["icsk_retransmits"],
            "retransmission count not reported",
        )?,
        icsk_user_timeout: optional(
            "inet_connection_sock",
            &["icsk_user_timeout"],
            "TCP_USER_TIMEOUT not reported",
        )?,
        icsk_ack_lrcvtime: optional(
            "inet_connection_sock",
            &["icsk_ack", "lrcvtime"],
            "last receive time not reported",
        )?,
        tp_keepalive_time: optional("tcp_sock", &["keepalive_time"], keepalive)?,
        tp_keepalive_intvl: optional("tcp_sock", &["keepalive_intvl"], keepalive)?,
        tp_keepalive_probes: optional("tcp_sock", &["keepalive_probes"], keepalive)?,
        tp_rcv_tstamp: optional("tcp_sock", &["rcv_tstamp"], "last ACK time not reported")?,
        tp_lsndtime: optional("tcp_sock", &["lsndtime"], "last send time not reported")?,
        tp_packets_out: optional("tcp_sock", &["packets_out"], "data in flight not reported")?,
        tp_total_retrans: optional(
            "tcp_sock",
            &["total_retrans"],
            "retransmissions counted per event (a multi-segment retransmission as one, a \
             skipped event not made up at the connection's next)",
        )?,
        net_ns_inum: required(btf, "net", &["ns", "inum"])?,
        net_keepalive_time: optional("net", &["ipv4", "sysctl_tcp_keepalive_time"], netns_default)?,
        net_keepalive_intvl: optional(
            "net",
            &["ipv4", "sysctl_tcp_keepalive_intvl"],
            netns_default,
        )?,
        net_keepalive_probes: optional(
            "net",
            &["ipv4", "sysctl_tcp_keepalive_probes"],
            netns_default,
        )?,
        skb_dev: optional(
            "sk_buff",
            &["dev"],
            "netns of socketless resets not reported",
        )?,
        dev_nd_net: optional(
            "net_device",
            &["nd_net", "net"],
            "netns of socketless resets not reported",
        )?,
        sock_keepopen_bit,
        sk_protocol,
        timer_function: optional(
            "timer_list",
            &["function"],
            "the timer hooks use their (slower) tracepoints",
        )?,
        inet_sport: optional(
            "inet_sock",
            &["inet_sport"],
            "a connection first seen at its close is reported without its local port",
        )?,
        sk_socket: optional("sock", &["sk_socket"], UNHELD_YOUNG)?,
        socket_ino: socket_ino_offset(btf, absent)?,
    };
    Ok(offsets)
}

/// What a kernel without the socket's inode members loses.
const UNHELD_YOUNG: &str = "a connection the kernel ended before an inventory saw it is not \
     watched for a process still holding it";

/// `socket_alloc.vfs_inode.i_ino` from the `struct socket *`, which is
/// only the same pointer as the `socket_alloc *` while the socket is its
/// first member: checked, not assumed.
fn socket_ino_offset(btf: &KernelBtf, absent: &mut Vec<AbsentMember>) -> Result<u16, BtfError> {
    let member = "socket_alloc.vfs_inode.i_ino";
    let reason = match (
        btf.resolve("socket_alloc", &["socket"])?,
        btf.resolve("socket_alloc", &["vfs_inode", "i_ino"])?,
    ) {
        (Resolved::At(0), Resolved::At(offset)) => return narrow(offset, member),
        (Resolved::At(_), Resolved::At(_)) => {
            "socket_alloc.socket is not its first member".to_owned()
        }
        (Resolved::Missing(reason), _) | (_, Resolved::Missing(reason)) => reason,
    };
    absent.push(AbsentMember {
        member: member.to_owned(),
        reason: format!("{reason}; {UNHELD_YOUNG}"),
    });
    Ok(ABSENT)
}

/// `sock.sk_protocol` when it is a plain `u16` (5.6+); before, it was an
/// 8-bit bitfield, which the raw program does not read.
fn sk_protocol_offset(btf: &KernelBtf, absent: &mut Vec<AbsentMember>) -> Result<u16, BtfError> {
    let consequence = "inet_sock_set_state uses its (slower) tracepoint";
    let plain = match btf.find_struct("sock") {
        Some(sock) => match btf.member(&sock, "sk_protocol", 0)? {
            Some((bits, ty, false))
                if bits.is_multiple_of(8)
                    && matches!(btf.strip(ty.clone())?, Type::Int(int) if int.size() == 2) =>
            {
                Some(bits / 8)
            }
            Some(_) => {
                absent.push(AbsentMember {
                    member: "sock.sk_protocol".to_owned(),
                    reason: format!("not a plain u16 (a bitfield before 5.6); {consequence}"),
                });
                return Ok(ABSENT);
            }
            None => None,
        },
        None => None,
    };
    if let Some(offset) = plain {
        return narrow(offset, "sock.sk_protocol");
    }
    absent.push(AbsentMember {
        member: "sock.sk_protocol".to_owned(),
        reason: format!("absent; {consequence}"),
    });
    Ok(ABSENT)
}

/// A raw tracepoint argument, as far as the programs care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawArg {
    /// A pointer to `struct <name>`.
    PointerTo(String),
    /// `enum <name>`.
    Enum(String),
    Int {
        size: usize,
        signed: bool,
    },
    Other,
}

impl fmt::Display for RawArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PointerTo(name) => write!(f, "struct {name} *"),
            Self::Enum(name) => write!(f, "enum {name}"),
            Self::Int { size, signed } => {
                write!(f, "{}{}", if *signed { "s" } else { "u" }, size * 8)
            }
            Self::Other => f.write_str("?"),
        }
    }
}

impl KernelBtf {
    /// The type id of the structure `name` (not a forward declaration).
    pub fn struct_id(&self, name: &str) -> Option<u32> {
        self.btf
            .resolve_ids_by_name(name)
            .ok()?
            .into_iter()
            .find(|id| matches!(self.btf.resolve_type_by_id(*id), Ok(Type::Struct(_))))
    }

    /// The type id of the function `name` (a kfunc, for one the kernel
    /// exports to BPF programs).
    pub fn function_id(&self, name: &str) -> Option<u32> {
        self.btf
            .resolve_ids_by_name(name)
            .ok()?
            .into_iter()
            .find(|id| matches!(self.btf.resolve_type_by_id(*id), Ok(Type::Func(_))))
    }
}

impl KernelBtf {
    /// The arguments a raw tracepoint program of `name` receives (its
    /// `TP_PROTO`), from the `btf_trace_<name>` typedef the kernel declares
    /// for every tracepoint, without the leading `void *__data`; `None`
    /// when this BTF lacks the typedef.
    pub fn raw_tracepoint_args(&self, name: &str) -> Result<Option<Vec<RawArg>>, BtfError> {
        let typedef = self
            .btf
            .resolve_types_by_name(&format!("btf_trace_{name}"))
            .unwrap_or_default()
            .into_iter()
            .find(|t| matches!(t, Type::Typedef(_)));
        let Some(Type::Typedef(typedef)) = typedef else {
            return Ok(None);
        };
        let Type::Ptr(pointer) = self
            .btf
            .resolve_chained_type(&typedef)
            .map_err(lookup_error)?
        else {
            return Ok(None);
        };
        let Type::FuncProto(proto) = self
            .btf
            .resolve_chained_type(&pointer)
            .map_err(lookup_error)?
        else {
            return Ok(None);
        };
        let mut args = Vec::new();
        for parameter in proto.parameters.iter().skip(1) {
            let ty = self
                .btf
                .resolve_chained_type(parameter)
                .map_err(lookup_error)?;
            args.push(match self.strip(ty)? {
                // `void *` and other pointees the programs do not read.
                Type::Ptr(pointer) => match self
                    .btf
                    .resolve_chained_type(&pointer)
                    .ok()
                    .map(|pointee| self.strip(pointee))
                {
                    Some(Ok(Type::Struct(st))) => {
                        RawArg::PointerTo(self.btf.resolve_name(&st).unwrap_or_default())
                    }
                    _ => RawArg::Other,
                },
                Type::Int(int) => RawArg::Int {
                    size: int.size(),
                    signed: int.is_signed(),
                },
                Type::Enum(e) => RawArg::Enum(self.btf.resolve_name(&e).unwrap_or_default()),
                _ => RawArg::Other,
            });
        }
        Ok(Some(args))
    }
}

/// `sk_flags`: 6.18 folded it into `sock_common` (`#define sk_flags
/// __sk_common.skc_flags`); older kernels have it in sock.
fn sk_flags_offset(btf: &KernelBtf) -> Result<u16, BtfError> {
    match btf.offset_of("sock", &["sk_flags"])? {
        Some(offset) => narrow(offset, "sock.sk_flags"),
        None => required(btf, "sock", &["__sk_common", "skc_flags"]),
    }
}

/// The keepalive `timer_list`: 6.19 moved it from `sock.sk_timer` into
/// `inet_connection_sock.icsk_keepalive_timer`.
fn keepalive_timer_offset(
    btf: &KernelBtf,
    absent: &mut Vec<AbsentMember>,
) -> Result<u16, BtfError> {
    match btf.offset_of("inet_connection_sock", &["icsk_keepalive_timer"])? {
        Some(offset) => narrow(offset, "inet_connection_sock.icsk_keepalive_timer"),
        None => optional(
            btf,
            absent,
            "sock",
            &["sk_timer"],
            "keepalive timer hooks unavailable",
        ),
    }
}

/// Bit number of `SOCK_KEEPOPEN` in `sk_flags` (an unsigned long).
fn sock_keepopen_bit(btf: &KernelBtf, absent: &mut Vec<AbsentMember>) -> u16 {
    let bit = btf
        .enum_value("sock_flags", "SOCK_KEEPOPEN")
        .filter(|bit| *bit < 64)
        .and_then(|bit| u16::try_from(bit).ok());
    bit.unwrap_or_else(|| {
        absent.push(AbsentMember {
            member: "enum sock_flags.SOCK_KEEPOPEN".to_owned(),
            reason: "no such enumerator below 64; SO_KEEPALIVE not reported".to_owned(),
        });
        ABSENT
    })
}

/// `enum sk_rst_reason` (6.10+): value → lowercase name without the
/// `SK_RST_REASON_` prefix (15 → `tcp_keepalive_timeout`); empty when the
/// enum is absent.
pub fn reset_reasons(btf: &KernelBtf) -> BTreeMap<u32, String> {
    btf.enum_values("sk_rst_reason")
        .into_iter()
        .filter_map(|(value, name)| {
            let short = name.strip_prefix("SK_RST_REASON_").unwrap_or(&name);
            Some((u32::try_from(value).ok()?, short.to_ascii_lowercase()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Option<KernelBtf> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "BTF must exist in CI"
            );
            eprintln!("SKIPPED: no live BTF at {}", path.display());
            return None;
        }
        Some(KernelBtf::from_file(path).expect("live BTF parses"))
    }

    fn fixture_6_19() -> KernelBtf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/btf/sock-6.19.btf");
        KernelBtf::from_file(&path).expect("fixture parses")
    }

    #[test]
    fn live_sock_offsets_are_consistent() {
        let Some(btf) = live() else { return };
        let mut absent = Vec::new();
        let offsets = sock_offsets(&btf, &mut absent).expect("resolves");
        // Everything the programs read exists on the development kernels.
        assert!(absent.is_empty(), "{absent:?}");
        // sock_common is at the start of sock; the address pair precedes the
        // family; tcp_sock members come after inet_connection_sock's.
        assert!(offsets.skc_daddr < offsets.skc_family);
        assert!(offsets.skc_family < 32);
        assert!(offsets.skc_net < offsets.skc_cookie);
        assert!(offsets.tp_lsndtime > offsets.icsk_probes_out);
        assert!(offsets.icsk_ack_lrcvtime > offsets.icsk_probes_out);
        // The same member through the embedding chain: sock is at offset 0
        // of tcp_sock, so icsk/tp offsets are relative to the sock pointer.
        assert_eq!(
            btf.offset_of(
                "tcp_sock",
                &["inet_conn", "icsk_inet", "sk", "__sk_common", "skc_family"]
            )
            .unwrap(),
            Some(u32::from(offsets.skc_family))
        );
        assert_eq!(
            btf.offset_of("tcp_sock", &["inet_conn", "icsk_probes_out"])
                .unwrap(),
            Some(u32::from(offsets.icsk_probes_out))
        );
        // The keepalive timer: icsk_keepalive_timer from 6.19, else sk_timer
        // (0x1c0 seen on the 6.18 development kernel; not asserted).
        let via_icsk = btf
            .offset_of("inet_connection_sock", &["icsk_keepalive_timer"])
            .unwrap();
        let via_sock = btf.offset_of("sock", &["sk_timer"]).unwrap();
        assert_eq!(
            Some(u32::from(offsets.keepalive_timer)),
            via_icsk.or(via_sock)
        );
        // The wrappers: the pointer inside possible_net_t and the counter
        // inside atomic64_t are their first members.
        assert_eq!(
            btf.offset_of("sock", &["__sk_common", "skc_net"]).unwrap(),
            Some(u32::from(offsets.skc_net))
        );
        assert_eq!(
            btf.enum_value("sock_flags", "SOCK_KEEPOPEN"),
            Some(u64::from(offsets.sock_keepopen_bit))
        );
        assert_ne!(offsets.skb_dev, ABSENT);
        assert_ne!(offsets.dev_nd_net, ABSENT);
    }

    #[test]
    fn live_reset_reasons_match_the_tracepoint() {
        let Some(btf) = live() else { return };
        let reasons = reset_reasons(&btf);
        if reasons.is_empty() {
            eprintln!("kernel without enum sk_rst_reason (< 6.10)");
            return;
        }
        assert!(reasons.values().any(|n| n == "no_socket"));
        // Cross-check against what tracefs prints for each value.
        let Ok(Some(format)) = super::super::tracefs::TracepointFormat::read(
            Path::new("/sys/kernel/tracing"),
            "tcp",
            "tcp_send_reset",
        ) else {
            eprintln!("SKIPPED cross-check: live tracefs not readable");
            return;
        };
        let printed = format.symbolic_values("reason");
        assert!(!printed.is_empty());
        for (value, name) in printed {
            let value = u32::try_from(value).expect("small enum");
            assert_eq!(
                reasons.get(&value),
                Some(&name.to_ascii_lowercase()),
                "value {value}"
            );
        }
        assert_eq!(
            reasons.get(&15).map(String::as_str),
            Some("tcp_keepalive_timeout")
        );
    }

    #[test]
    fn fixture_6_19_uses_icsk_keepalive_timer() {
        let btf = fixture_6_19();
        let mut absent = Vec::new();
        let offsets = sock_offsets(&btf, &mut absent).expect("resolves");
        assert!(absent.is_empty(), "{absent:?}");
        // The values of `expected[]` in sock-6.19.c (clang's offsetof).
        let expected: [u16; 36] = [
            16, 18, 14, 12, 4, 0, 48, 32, 24, 64, 72, 96, 200, 249, 245, 280, 272, 304, 308, 312,
            292, 296, 300, 24, 36, 44, 40, 16, 16, 84, 24, 316, 100, 112, 104, 40,
        ];
        let resolved = [
            offsets.skc_family,
            offsets.skc_state,
            offsets.skc_num,
            offsets.skc_dport,
            offsets.skc_rcv_saddr,
            offsets.skc_daddr,
            offsets.skc_v6_rcv_saddr,
            offsets.skc_v6_daddr,
            offsets.skc_net,
            offsets.skc_cookie,
            offsets.sk_flags,
            offsets.sk_err,
            offsets.keepalive_timer,
            offsets.icsk_probes_out,
            offsets.icsk_retransmits,
            offsets.icsk_user_timeout,
            offsets.icsk_ack_lrcvtime,
            offsets.tp_keepalive_time,
            offsets.tp_keepalive_intvl,
            offsets.tp_keepalive_probes,
            offsets.tp_rcv_tstamp,
            offsets.tp_lsndtime,
            offsets.tp_packets_out,
            offsets.net_ns_inum,
            offsets.net_keepalive_time,
            offsets.net_keepalive_intvl,
            offsets.net_keepalive_probes,
            offsets.skb_dev,
            offsets.dev_nd_net,
            offsets.sk_protocol,
            offsets.timer_function,
            offsets.tp_total_retrans,
            offsets.sk_err_soft,
            offsets.inet_sport,
            offsets.sk_socket,
            offsets.socket_ino,
        ];
        assert_eq!(resolved, expected);
        assert_eq!(offsets.sock_keepopen_bit, 3);
        assert!(btf.offset_of("sock", &["sk_timer"]).unwrap().is_none());
        let reasons = reset_reasons(&btf);
        assert_eq!(
            reasons.get(&15).map(String::as_str),
            Some("tcp_keepalive_timeout")
        );
        assert_eq!(reasons.get(&0).map(String::as_str), Some("not_specified"));
    }

    #[test]
    fn bitfields_need_a_byte_boundary() {
        let btf = fixture_6_19();
        assert_eq!(
            btf.offset_of("ka_bitfields", &["aligned"]).unwrap(),
            Some(1)
        );
        assert!(matches!(
            btf.offset_of("ka_bitfields", &["misaligned"]),
            Err(BtfError::Bitfield(member)) if member == "ka_bitfields.misaligned"
        ));
        // icsk_ca_state:5 starts on a byte; icsk_ca_initialized:1 does not.
        assert!(
            btf.offset_of("inet_connection_sock", &["icsk_ca_state"])
                .unwrap()
                .is_some()
        );
        assert!(
            btf.offset_of("inet_connection_sock", &["icsk_ca_initialized"])
                .is_err()
        );
    }

    #[test]
    fn absent_members_are_reported_with_reasons() {
        let btf = fixture_6_19();
        assert!(btf.offset_of("no_such_struct", &["x"]).unwrap().is_none());
        assert!(
            btf.offset_of("sock", &["no_such_member"])
                .unwrap()
                .is_none()
        );
        let mut absent = Vec::new();
        assert_eq!(
            optional(&btf, &mut absent, "sock", &["sk_timer"], "hooks off").unwrap(),
            ABSENT
        );
        assert_eq!(
            absent,
            [AbsentMember {
                member: "sock.sk_timer".into(),
                reason: "sock has no member sk_timer; hooks off".into(),
            }]
        );
        let error = required(&btf, "net", &["ns", "nope"]).unwrap_err();
        assert!(
            error.to_string().contains("net.ns has no member nope"),
            "{error}"
        );
        assert!(reset_reasons(&btf).len() >= 4);
        assert!(btf.enum_values("no_such_enum").is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let label = "garbage";
        for bytes in [
            &b""[..],
            b"hello",
            b"\x9f\xeb\x01\x00 not really btf at all, just noise",
            b"\x9f\xeb\x01\x00\x18\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        ] {
            assert!(KernelBtf::from_bytes(bytes, label).is_err());
        }
        // A truncated copy of a valid blob.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/btf/sock-6.19.btf");
        let bytes = std::fs::read(path).unwrap();
        assert!(KernelBtf::from_bytes(&bytes[..bytes.len() / 2], label).is_err());
        let error = KernelBtf::from_file(Path::new("/nonexistent/vmlinux"))
            .err()
            .unwrap();
        assert!(error.to_string().contains("/nonexistent/vmlinux"));
    }

    /// The prototypes ka's raw programs read, as the kernel declares them.
    fn expected_raw_args() -> [(&'static str, Vec<RawArg>); 8] {
        let sock = RawArg::PointerTo("sock".to_owned());
        let skb = RawArg::PointerTo("sk_buff".to_owned());
        let timer = RawArg::PointerTo("timer_list".to_owned());
        let int = RawArg::Int {
            size: 4,
            signed: true,
        };
        let unsigned_long = RawArg::Int {
            size: 8,
            signed: false,
        };
        [
            ("inet_sock_set_state", vec![sock.clone(), int.clone(), int]),
            ("tcp_destroy_sock", vec![sock.clone()]),
            ("tcp_retransmit_skb", vec![sock.clone(), skb.clone()]),
            ("tcp_send_reset", vec![sock.clone(), skb]),
            ("tcp_receive_reset", vec![sock.clone()]),
            ("inet_sk_error_report", vec![sock]),
            ("timer_start", vec![timer.clone(), unsigned_long]),
            ("timer_expire_entry", vec![timer]),
        ]
    }

    #[test]
    fn raw_tracepoint_arguments_come_from_btf_trace_typedefs() {
        let btf = fixture_6_19();
        for (name, expected) in expected_raw_args() {
            let args = btf
                .raw_tracepoint_args(name)
                .expect("resolves")
                .unwrap_or_else(|| panic!("btf_trace_{name} in the fixture"));
            assert!(args.starts_with(&expected), "{name}: {args:?}");
        }
        assert_eq!(btf.raw_tracepoint_args("no_such_tracepoint").unwrap(), None);
        let shown: Vec<String> = btf
            .raw_tracepoint_args("inet_sock_set_state")
            .unwrap()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["struct sock *", "s32", "s32"]);
    }

    #[test]
    fn live_raw_tracepoint_arguments_are_what_the_programs_read() {
        let Some(btf) = live() else { return };
        for (name, expected) in expected_raw_args() {
            let args = btf
                .raw_tracepoint_args(name)
                .expect("resolves")
                .unwrap_or_else(|| panic!("btf_trace_{name} in the live BTF"));
            assert!(args.starts_with(&expected), "{name}: {args:?}");
        }
    }
}
