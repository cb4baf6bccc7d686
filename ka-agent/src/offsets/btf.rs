//! Kernel struct member offsets and enum values from BTF.

use std::{collections::BTreeMap, path::Path};

use btf_rs::{Btf, Type};
use ka_common::{ABSENT, SockOffsets};

/// Why BTF could not give what ka needs.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot parse BTF from {path}: {message}")]
    Parse { path: String, message: String },
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF: {0} not found")]
    NoMember(String),
    #[error("BTF: {0} is a bitfield not on a byte boundary")]
    Bitfield(String),
    #[error("BTF: offset of {0} does not fit the offset table")]
    TooLarge(String),
    #[error("BTF lookup failed: {0}")]
    Lookup(String),
}

/// A parsed kernel BTF.
pub struct KernelBtf {
    btf: Btf,
}

fn lookup_error(e: impl std::fmt::Display) -> BtfError {
    BtfError::Lookup(e.to_string())
}

impl KernelBtf {
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
        // btf-rs trusts its input's header: keep garbage from reaching it
        // (and panicking) by checking the header first.
        if bytes.len() < 24 || u16::from_le_bytes([bytes[0], bytes[1]]) != 0xeb9f {
            return Err(parse_error("not a BTF file (bad magic)"));
        }
        let header_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let section = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
        };
        let (type_off, type_len, str_off, str_len) =
            (section(8), section(12), section(16), section(20));
        let fits = |off: usize, len: usize| {
            header_len
                .checked_add(off)
                .and_then(|start| start.checked_add(len))
                .is_some_and(|end| end <= bytes.len())
        };
        if header_len < 24 || !fits(type_off, type_len) || !fits(str_off, str_len) {
            return Err(parse_error("BTF sections out of bounds"));
        }
        let btf = std::panic::catch_unwind(|| Btf::from_bytes(bytes))
            .map_err(|_| parse_error("malformed BTF"))?
            .map_err(|e| parse_error(&e.to_string()))?;
        Ok(Self { btf })
    }

    fn strip(&self, mut ty: Type) -> Result<Type, BtfError> {
        for _ in 0..16 {
            match &ty {
                Type::Typedef(_)
                | Type::Volatile(_)
                | Type::Const(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => {
                    let inner = ty
                        .as_btf_type()
                        .ok_or_else(|| lookup_error("untyped chain"))?;
                    ty = self.btf.resolve_chained_type(inner).map_err(lookup_error)?;
                }
                _ => return Ok(ty),
            }
        }
        Err(lookup_error("type chain too long"))
    }

    fn find_struct(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) | Type::Union(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))
    }

    /// Searches `name` among the members of `st`, descending into anonymous
    /// structs and unions. Returns its bit offset and type.
    fn member(
        &self,
        st: &btf_rs::Struct,
        name: &str,
        depth: u32,
    ) -> Result<Option<(u32, Type, bool)>, BtfError> {
        if depth > 8 {
            return Ok(None);
        }
        for member in &st.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            let ty = self
                .btf
                .resolve_chained_type(member)
                .map_err(lookup_error)?;
            let bitfield = member.bitfield_size().is_some_and(|s| s != 0);
            if member_name == name {
                return Ok(Some((member.bit_offset(), ty, bitfield)));
            }
            if member_name.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = self.strip(ty)?
                && let Some((offset, ty, bitfield)) = self.member(&inner, name, depth + 1)?
            {
                return Ok(Some((member.bit_offset() + offset, ty, bitfield)));
            }
        }
        Ok(None)
    }

    /// Byte offset of `root.a.b.c`; `Ok(None)` when some member is absent.
    pub fn offset_of(&self, root: &str, path: &[&str]) -> Result<Option<u32>, BtfError> {
        let mut current = self.find_struct(root)?;
        let mut bits = 0u32;
        let what = || format!("{root}.{}", path.join("."));
        for (index, name) in path.iter().enumerate() {
            let Some((offset, ty, bitfield)) = self.member(&current, name, 0)? else {
                return Ok(None);
            };
            bits += offset;
            if index + 1 == path.len() {
                if bitfield || !bits.is_multiple_of(8) {
                    return Err(BtfError::Bitfield(what()));
                }
                return Ok(Some(bits / 8));
            }
            current = match self.strip(ty)? {
                Type::Struct(s) | Type::Union(s) => s,
                _ => return Err(BtfError::NoMember(what())),
            };
        }
        Ok(Some(bits / 8))
    }

    /// Value of `enumerator` in `enum name`.
    pub fn enum_value(&self, enum_name: &str, enumerator: &str) -> Option<u32> {
        self.enum_values(enum_name)
            .into_iter()
            .find_map(|(value, name)| (name == enumerator).then_some(value))
    }

    /// All enumerators of `enum name` (empty when the enum is absent).
    pub fn enum_values(&self, enum_name: &str) -> Vec<(u32, String)> {
        let types = self
            .btf
            .resolve_types_by_name(enum_name)
            .unwrap_or_default();
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Enum(e) => Some(
                    e.members
                        .iter()
                        .map(|m| (m.val(), self.btf.resolve_name(m).unwrap_or_default()))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    }
}

fn narrow(offset: Option<u32>, what: &str) -> Result<u16, BtfError> {
    match offset {
        None => Ok(ABSENT),
        Some(o) => u16::try_from(o)
            .ok()
            .filter(|o| *o != ABSENT)
            .ok_or_else(|| BtfError::TooLarge(what.to_owned())),
    }
}

/// Resolves every member the programs read. `absent` collects optional
/// members this kernel lacks; a missing required member is an error.
pub fn sock_offsets(btf: &KernelBtf, absent: &mut Vec<String>) -> Result<SockOffsets, BtfError> {
    let required = |root: &str, path: &[&str]| -> Result<u16, BtfError> {
        let what = format!("{root}.{}", path.join("."));
        let offset = btf.offset_of(root, path)?;
        if offset.is_none() {
            return Err(BtfError::NoMember(what));
        }
        narrow(offset, &what)
    };
    let skc_family = required("sock", &["__sk_common", "skc_family"])?;
    let skc_state = required("sock", &["__sk_common", "skc_state"])?;
    let skc_num = required("sock", &["__sk_common", "skc_num"])?;
    let skc_dport = required("sock", &["__sk_common", "skc_dport"])?;
    let skc_rcv_saddr = required("sock", &["__sk_common", "skc_rcv_saddr"])?;
    let skc_daddr = required("sock", &["__sk_common", "skc_daddr"])?;
    let skc_net = required("sock", &["__sk_common", "skc_net"])?;
    // 6.18 moved sk_flags into sock_common (`#define sk_flags __sk_common.skc_flags`).
    let sk_flags = match btf.offset_of("sock", &["sk_flags"])? {
        Some(o) => narrow(Some(o), "sock.sk_flags")?,
        None => required("sock", &["__sk_common", "skc_flags"])?,
    };
    let net_ns_inum = required("net", &["ns", "inum"])?;
    let mut optional = |root: &str, path: &[&str]| -> Result<u16, BtfError> {
        let what = format!("{root}.{}", path.join("."));
        let offset = btf.offset_of(root, path)?;
        if offset.is_none() {
            absent.push(what.clone());
        }
        narrow(offset, &what)
    };
    // 6.19 moved the keepalive timer out of `sk_timer`.
    let keepalive_timer = match btf.offset_of("inet_connection_sock", &["icsk_keepalive_timer"])? {
        Some(o) => narrow(Some(o), "inet_connection_sock.icsk_keepalive_timer")?,
        None => optional("sock", &["sk_timer"])?,
    };
    let offsets = SockOffsets {
        skc_family,
        skc_state,
        skc_num,
        skc_dport,
        skc_rcv_saddr,
        skc_daddr,
        skc_v6_rcv_saddr: optional("sock", &["__sk_common", "skc_v6_rcv_saddr"])?,
        skc_v6_daddr: optional("sock", &["__sk_common", "skc_v6_daddr"])?,
        skc_net,
        skc_cookie: optional("sock", &["__sk_common", "skc_cookie"])?,
        sk_flags,
        sk_err: optional("sock", &["sk_err"])?,
        keepalive_timer,
        icsk_probes_out: optional("inet_connection_sock", &["icsk_probes_out"])?,
        icsk_retransmits: optional("inet_connection_sock", &["icsk_retransmits"])?,
        icsk_user_timeout: optional("inet_connection_sock", &["icsk_user_timeout"])?,
        icsk_ack_lrcvtime: optional("inet_connection_sock", &["icsk_ack", "lrcvtime"])?,
        tp_keepalive_time: optional("tcp_sock", &["keepalive_time"])?,
        tp_keepalive_intvl: optional("tcp_sock", &["keepalive_intvl"])?,
        tp_keepalive_probes: optional("tcp_sock", &["keepalive_probes"])?,
        tp_rcv_tstamp: optional("tcp_sock", &["rcv_tstamp"])?,
        tp_lsndtime: optional("tcp_sock", &["lsndtime"])?,
        tp_packets_out: optional("tcp_sock", &["packets_out"])?,
        net_ns_inum,
        net_keepalive_time: optional("net", &["ipv4", "sysctl_tcp_keepalive_time"])?,
        net_keepalive_intvl: optional("net", &["ipv4", "sysctl_tcp_keepalive_intvl"])?,
        net_keepalive_probes: optional("net", &["ipv4", "sysctl_tcp_keepalive_probes"])?,
        skb_dev: optional("sk_buff", &["dev"])?,
        dev_nd_net: optional("net_device", &["nd_net"])?,
        sock_keepopen_bit: btf
            .enum_value("sock_flags", "SOCK_KEEPOPEN")
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or(ABSENT),
        reserved: [0; 2],
    };
    if offsets.sock_keepopen_bit == ABSENT {
        absent.push("enum sock_flags.SOCK_KEEPOPEN".to_owned());
    }
    Ok(offsets)
}

/// `enum sk_rst_reason` (6.10+): value → lowercase name without prefix.
pub fn reset_reasons(btf: &KernelBtf) -> BTreeMap<u32, String> {
    btf.enum_values("sk_rst_reason")
        .into_iter()
        .map(|(value, name)| {
            let short = name.strip_prefix("SK_RST_REASON_").unwrap_or(&name);
            (value, short.to_ascii_lowercase())
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
            eprintln!("SKIPPED: no live BTF");
            return None;
        }
        Some(KernelBtf::from_file(path).expect("live BTF parses"))
    }

    #[test]
    fn live_sock_offsets_are_consistent() {
        let Some(btf) = live() else { return };
        let mut absent = Vec::new();
        let offsets = sock_offsets(&btf, &mut absent).expect("resolves");
        // sock_common is at the start of sock; tcp_sock fields come after
        // inet_connection_sock's, which come after sock's.
        assert!(offsets.skc_family < 32);
        assert!(offsets.skc_daddr < offsets.skc_family);
        assert!(offsets.keepalive_timer > offsets.skc_net);
        assert!(offsets.tp_lsndtime > offsets.icsk_probes_out);
        assert_ne!(offsets.sock_keepopen_bit, ABSENT);
        assert_ne!(offsets.icsk_ack_lrcvtime, ABSENT);
        assert_ne!(offsets.net_keepalive_time, ABSENT);
        // The pointer arithmetic of the timer hooks: sk_timer is a timer_list.
        let via_sock = btf.offset_of("sock", &["sk_timer"]).unwrap();
        let via_icsk = btf
            .offset_of("inet_connection_sock", &["icsk_keepalive_timer"])
            .unwrap();
        assert_eq!(
            Some(u32::from(offsets.keepalive_timer)),
            via_icsk.or(via_sock)
        );
    }

    #[test]
    fn live_reset_reasons() {
        let Some(btf) = live() else { return };
        let reasons = reset_reasons(&btf);
        if reasons.is_empty() {
            eprintln!("kernel without enum sk_rst_reason");
            return;
        }
        assert!(reasons.values().any(|n| n == "tcp_keepalive_timeout"));
        assert!(reasons.values().any(|n| n == "no_socket"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("ka-btf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage");
        std::fs::write(&path, b"\x9f\xeb\x01\x00 not really btf at all, just noise").unwrap();
        assert!(KernelBtf::from_file(&path).is_err());
        std::fs::write(&path, b"hello").unwrap();
        assert!(KernelBtf::from_file(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
