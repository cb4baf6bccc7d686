//! Offsets of tracepoint fields and kernel struct members, read at start-up
//! from tracefs and BTF (Rust eBPF has no CO-RE), plus the kernel facts the
//! programs and the tracker need (symbol addresses, HZ, reset reasons).
//!
//! [`KernelLayout::discover`] gathers everything; what this kernel lacks is
//! not an error but a [`LayoutNote`] (the hook or the datum is then
//! unavailable), except for the few members without which nothing works.

pub mod btf;
pub mod copy_plan;
pub mod kernel;
pub mod tracefs;

use std::{collections::BTreeMap, fmt, path::PathBuf};

use ka_common::{
    ErrorReportFields, KernelTypes, NO_TYPE, RetransmitFields, SendResetFields, SetStateFields,
    SkRecordFields, SockCopyPlan, SockOffsets, TimerFields,
};

pub use kernel::ensure_tracefs_mounted;
use tracefs::{TracefsError, TracepointFormat};

/// Why the layout could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
}

impl OffsetsError {
    /// A file that exists but holds garbage (given by the operator, or a
    /// broken kernel), as opposed to a missing capability or file.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Btf(btf::BtfError::Parse { .. })
                | Self::Tracefs(
                    tracefs::TracefsError::Parse { .. }
                        | tracefs::TracefsError::OffsetTooLarge { .. }
                )
        )
    }
}

/// Where the facts come from; [`Default`] is the live system.
#[derive(Clone, Debug)]
pub struct LayoutSources {
    /// The tracefs mount (holding `events/`).
    pub tracefs: PathBuf,
    /// Raw BTF of the kernel.
    pub btf: PathBuf,
    /// The kernel symbol table.
    pub kallsyms: PathBuf,
}

impl Default for LayoutSources {
    fn default() -> Self {
        Self {
            tracefs: PathBuf::from(kernel::TRACEFS),
            btf: PathBuf::from("/sys/kernel/btf/vmlinux"),
            kallsyms: PathBuf::from("/proc/kallsyms"),
        }
    }
}

/// Something this kernel lacks and what follows from it, for
/// `ka-agent check` and the start-up log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutNote {
    /// What is absent or unusable (`tracepoint tcp:tcp_send_reset`,
    /// `BTF member sock.sk_err`).
    pub subject: String,
    /// Why, and what ka does without it.
    pub reason: String,
}

impl LayoutNote {
    fn new(subject: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for LayoutNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.reason)
    }
}

/// Everything the programs and the tracker need to know about this kernel.
#[derive(Clone, Debug)]
pub struct KernelLayout {
    pub set_state: Option<SetStateFields>,
    pub retransmit: Option<RetransmitFields>,
    pub send_reset: Option<SendResetFields>,
    pub receive_reset: Option<SkRecordFields>,
    pub destroy_sock: Option<SkRecordFields>,
    pub error_report: Option<ErrorReportFields>,
    pub timer_start: Option<TimerFields>,
    pub timer_expire_entry: Option<TimerFields>,
    /// The hot hooks whose raw tracepoint arguments are what the programs
    /// read; the others run on their tracepoint.
    pub raw: RawTracepoints,
    /// Loads through `bpf_rdonly_cast` instead of helper reads; `None`
    /// (noted) where the kernel lacks the kfunc or a type.
    pub casts: Option<Casts>,
    pub sock: SockOffsets,
    /// How the programs copy `sock`'s fields (grouped from `sock`).
    pub sock_copy: SockCopyPlan,
    /// `enum sk_rst_reason` value → lowercase name (`tcp_keepalive_timeout`);
    /// empty before 6.10.
    pub reset_reasons: BTreeMap<u32, String>,
    /// Address of `tcp_keepalive_timer`, which the timer hooks filter on.
    pub keepalive_timer_fn: Option<u64>,
    pub hz: u32,
    pub kernel_release: String,
    /// What is absent or unavailable, and why.
    pub notes: Vec<LayoutNote>,
}

/// Reads tracepoint formats and turns each into the table its program
/// needs, noting why a hook is unavailable instead of failing.
struct Tracepoints<'a> {
    tracefs: &'a std::path::Path,
    notes: &'a mut Vec<LayoutNote>,
}

impl Tracepoints<'_> {
    /// The format of `category:name`, `None` (noted) when the kernel lacks
    /// the tracepoint. A format that cannot be parsed is an error: tracefs
    /// itself is broken or not what it claims.
    fn format(
        &mut self,
        category: &str,
        name: &str,
    ) -> Result<Option<TracepointFormat>, TracefsError> {
        let format = TracepointFormat::read(self.tracefs, category, name)?;
        if format.is_none() {
            self.notes.push(LayoutNote::new(
                format!("tracepoint {category}:{name}"),
                "absent on this kernel; its hook is unavailable",
            ));
        }
        Ok(format)
    }

    /// The table built by `fields` from `category:name`, or `None` (noted)
    /// when the tracepoint is absent or lacks a required field.
    fn fields<T>(
        &mut self,
        category: &str,
        name: &str,
        fields: impl FnOnce(&TracepointFormat) -> Result<T, TracefsError>,
    ) -> Result<Option<T>, TracefsError> {
        let Some(format) = self.format(category, name)? else {
            return Ok(None);
        };
        match fields(&format) {
            Ok(table) => Ok(Some(table)),
            Err(unusable) if unusable.leaves_hook_unavailable() => {
                self.notes.push(LayoutNote::new(
                    format!("tracepoint {category}:{name}"),
                    format!("{unusable}; its hook is unavailable"),
                ));
                Ok(None)
            }
            Err(other) => Err(other),
        }
    }
}

impl KernelLayout {
    /// Resolves the layout of the kernel described by `sources`.
    pub fn discover(sources: &LayoutSources) -> Result<Self, OffsetsError> {
        let mut notes = Vec::new();

        let kernel_btf = btf::KernelBtf::from_file(&sources.btf)?;
        let mut absent = Vec::new();
        let sock = btf::sock_offsets(&kernel_btf, &mut absent)?;
        notes.extend(
            absent
                .into_iter()
                .map(|a| LayoutNote::new(format!("BTF member {}", a.member), a.reason)),
        );
        let (sock_copy, unplaced) = copy_plan::plan(&sock);
        notes.extend(unplaced.into_iter().map(|field| {
            LayoutNote::new(
                format!("socket field {field}"),
                "not reported: its members are spread wider than the spans the programs copy",
            )
        }));

        let mut tracepoints = Tracepoints {
            tracefs: &sources.tracefs,
            notes: &mut notes,
        };
        let set_state =
            tracepoints.fields("sock", "inet_sock_set_state", TracepointFormat::set_state)?;
        let retransmit =
            tracepoints.fields("tcp", "tcp_retransmit_skb", TracepointFormat::retransmit)?;
        let send_reset_format = tracepoints.format("tcp", "tcp_send_reset")?;
        let receive_reset =
            tracepoints.fields("tcp", "tcp_receive_reset", TracepointFormat::sk_record)?;
        let destroy_sock =
            tracepoints.fields("tcp", "tcp_destroy_sock", TracepointFormat::sk_record)?;
        let error_report = tracepoints.fields(
            "sock",
            "inet_sk_error_report",
            TracepointFormat::error_report,
        )?;
        let timer_start =
            tracepoints.fields("timer", "timer_start", TracepointFormat::timer_start)?;
        let timer_expire_entry =
            tracepoints.fields("timer", "timer_expire_entry", TracepointFormat::timer)?;

        let send_reset = match &send_reset_format {
            None => None,
            Some(format) => match format.send_reset() {
                Ok(fields) => Some(fields),
                Err(unusable) if unusable.leaves_hook_unavailable() => {
                    notes.push(LayoutNote::new(
                        "tracepoint tcp:tcp_send_reset",
                        format!("{unusable}; its hook is unavailable"),
                    ));
                    None
                }
                Err(other) => return Err(other.into()),
            },
        };
        let reset_reasons = reset_reasons(&kernel_btf, send_reset_format.as_ref(), &mut notes);

        let keepalive_timer_fn = kernel::symbol_address(&sources.kallsyms, "tcp_keepalive_timer")?;
        if keepalive_timer_fn.is_none() {
            notes.push(LayoutNote::new(
                format!(
                    "symbol tcp_keepalive_timer ({})",
                    sources.kallsyms.display()
                ),
                "absent; keepalive timer hooks unavailable",
            ));
        }
        let raw = RawTracepoints::check(&kernel_btf, &sock, &sock_copy, &mut notes)?;
        let casts = Casts::find(&kernel_btf, &mut notes);
        let kernel_release = kernel::kernel_release();
        let hz = kernel::config_hz(&kernel_release)?;
        Ok(Self {
            set_state,
            retransmit,
            send_reset,
            receive_reset,
            destroy_sock,
            error_report,
            timer_start,
            timer_expire_entry,
            raw,
            casts,
            sock,
            sock_copy,
            reset_reasons,
            keepalive_timer_fn,
            hz,
            kernel_release,
            notes,
        })
    }
}

/// What the programs need to load kernel memory directly: the
/// `bpf_rdonly_cast` kfunc (Linux 6.2+) and the types they cast to. A load
/// through a cast pointer is one instruction the kernel guards against
/// faults; `bpf_probe_read_kernel` is a helper call each time (six per
/// socket snapshot, one per timer the kernel starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Casts {
    /// BTF id of `bpf_rdonly_cast`, patched into the programs' calls.
    pub kfunc: u32,
    pub types: KernelTypes,
}

impl Casts {
    fn find(kernel_btf: &btf::KernelBtf, notes: &mut Vec<LayoutNote>) -> Option<Self> {
        let found = (
            kernel_btf.function_id("bpf_rdonly_cast"),
            kernel_btf.struct_id("tcp_sock"),
            kernel_btf.struct_id("net"),
            kernel_btf.struct_id("timer_list"),
        );
        let (Some(kfunc), Some(tcp_sock), Some(net), Some(timer_list)) = found else {
            let missing = [
                (found.0.is_none(), "the bpf_rdonly_cast kfunc"),
                (found.1.is_none(), "struct tcp_sock"),
                (found.2.is_none(), "struct net"),
                (found.3.is_none(), "struct timer_list"),
            ]
            .into_iter()
            .filter_map(|(missing, what)| missing.then_some(what))
            .collect::<Vec<_>>()
            .join(", ");
            notes.push(LayoutNote::new(
                "direct kernel loads",
                format!(
                    "BTF lacks {missing}; the programs read with bpf_probe_read_kernel (slower)"
                ),
            ));
            return None;
        };
        Some(Self {
            kfunc,
            types: KernelTypes {
                tcp_sock,
                net,
                timer_list,
                // Without it the socket's inode is read with the helper:
                // one read at a close the kernel made on an error.
                socket_alloc: kernel_btf.struct_id("socket_alloc").unwrap_or(NO_TYPE),
            },
        })
    }
}

/// The hooks that run as raw tracepoints.
///
/// A raw tracepoint hands the program the tracepoint's own arguments: the
/// kernel formats no trace record and takes no perf-event path for it,
/// which under connection churn costs more than a small program itself
/// (docs/benchmarks.md). Its arguments are positional, so each hook is
/// used raw only when this kernel's BTF declares the arguments the program
/// reads, in that order; otherwise (noted) the hook keeps its tracepoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one independent verdict per hook, read by name"
)]
pub struct RawTracepoints {
    /// `(struct sock *sk, int oldstate, int newstate)`, and `sk_protocol`
    /// in the snapshot's copy.
    pub inet_sock_set_state: bool,
    /// `(struct sock *sk)`.
    pub tcp_destroy_sock: bool,
    /// `(struct timer_list *timer, unsigned long expires, ...)`, and
    /// `timer_list.function`.
    pub timer_start: bool,
    /// `(struct timer_list *timer, ...)`, and `timer_list.function`.
    pub timer_expire_entry: bool,
    /// `(struct sock *sk, struct sk_buff *skb, ...)`.
    pub tcp_retransmit_skb: bool,
    /// `tcp_retransmit_skb`'s third argument is `int err` (6.17+); before,
    /// the hook fires only for retransmissions the kernel sent.
    pub retransmit_err_argument: bool,
    /// `(struct sock *sk)`.
    pub tcp_receive_reset: bool,
    /// `(struct sock *sk, struct sk_buff *skb, ...)`.
    pub tcp_send_reset: bool,
    /// `tcp_send_reset`'s third argument is `enum sk_rst_reason reason`
    /// (6.10+).
    pub send_reset_reason_argument: bool,
    /// `(const struct sock *sk)`: the report names its socket, where the
    /// record names only addresses.
    pub inet_sk_error_report: bool,
}

impl RawTracepoints {
    fn check(
        kernel_btf: &btf::KernelBtf,
        sock: &SockOffsets,
        sock_copy: &SockCopyPlan,
        notes: &mut Vec<LayoutNote>,
    ) -> Result<Self, btf::BtfError> {
        use btf::RawArg::{Int, PointerTo};
        let pointer = |name: &str| PointerTo(name.to_owned());
        let int = Int {
            size: 4,
            signed: true,
        };
        let unsigned_long = Int {
            size: 8,
            signed: false,
        };
        let mut usable = |name: &str, expected: &[btf::RawArg], fields: &[(u16, &str)]| {
            let found = kernel_btf.raw_tracepoint_args(name)?;
            let why = match &found {
                None => Some(format!("BTF has no btf_trace_{name}")),
                Some(args) if !args.starts_with(expected) => Some(format!(
                    "its arguments are ({}), not ({})",
                    list(args),
                    list(expected)
                )),
                Some(_) => fields
                    .iter()
                    .find(|(offset, _)| *offset == ka_common::ABSENT)
                    .map(|(_, member)| format!("{member} is not usable")),
            };
            let Some(why) = why else {
                return Ok::<bool, btf::BtfError>(true);
            };
            notes.push(LayoutNote::new(
                format!("raw tracepoint {name}"),
                format!("{why}; the hook uses its (slower) tracepoint"),
            ));
            Ok(false)
        };
        let retransmit_err_argument = kernel_btf
            .raw_tracepoint_args("tcp_retransmit_skb")?
            .is_some_and(|args| args.get(2) == Some(&int));
        let send_reset_reason_argument = kernel_btf
            .raw_tracepoint_args("tcp_send_reset")?
            .is_some_and(|args| {
                args.get(2) == Some(&btf::RawArg::Enum("sk_rst_reason".to_owned()))
            });
        Ok(Self {
            inet_sock_set_state: usable(
                "inet_sock_set_state",
                &[pointer("sock"), int.clone(), int],
                // Read from the snapshot's copy.
                &[(sock_copy.at.sk_protocol, "sock.sk_protocol")],
            )?,
            tcp_destroy_sock: usable("tcp_destroy_sock", &[pointer("sock")], &[])?,
            timer_start: usable(
                "timer_start",
                &[pointer("timer_list"), unsigned_long],
                &[(sock.timer_function, "timer_list.function")],
            )?,
            timer_expire_entry: usable(
                "timer_expire_entry",
                &[pointer("timer_list")],
                &[(sock.timer_function, "timer_list.function")],
            )?,
            tcp_retransmit_skb: usable(
                "tcp_retransmit_skb",
                &[pointer("sock"), pointer("sk_buff")],
                &[],
            )?,
            retransmit_err_argument,
            tcp_receive_reset: usable("tcp_receive_reset", &[pointer("sock")], &[])?,
            tcp_send_reset: usable(
                "tcp_send_reset",
                &[pointer("sock"), pointer("sk_buff")],
                &[],
            )?,
            send_reset_reason_argument,
            inet_sk_error_report: usable("inet_sk_error_report", &[pointer("sock")], &[])?,
        })
    }
}

fn list(args: &[btf::RawArg]) -> String {
    args.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reset reason names: from BTF `enum sk_rst_reason`, else from the
/// `__print_symbolic` table of `tcp_send_reset`'s print format (BTF may be
/// a trimmed file the operator supplied); empty (noted) before 6.10.
fn reset_reasons(
    kernel_btf: &btf::KernelBtf,
    send_reset: Option<&TracepointFormat>,
    notes: &mut Vec<LayoutNote>,
) -> BTreeMap<u32, String> {
    let from_btf = btf::reset_reasons(kernel_btf);
    if !from_btf.is_empty() {
        return from_btf;
    }
    let from_tracefs: BTreeMap<u32, String> = send_reset
        .map(|format| format.symbolic_values("reason"))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(value, name)| Some((u32::try_from(value).ok()?, name.to_ascii_lowercase())))
        .collect();
    notes.push(LayoutNote::new(
        "BTF enum sk_rst_reason",
        if from_tracefs.is_empty() {
            "absent (kernel < 6.10): reset reasons not reported"
        } else {
            "absent: reset reason names taken from tcp_send_reset's print format"
        },
    ));
    from_tracefs
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn live_sources() -> Option<LayoutSources> {
        let sources = LayoutSources::default();
        let readable = sources.btf.exists()
            && sources.tracefs.join("events").is_dir()
            && std::fs::File::open(&sources.kallsyms).is_ok();
        if readable {
            return Some(sources);
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "live BTF, tracefs and kallsyms must be readable in CI"
        );
        eprintln!("SKIPPED: live BTF/tracefs/kallsyms not readable (run as root)");
        None
    }

    #[test]
    fn discovers_the_live_kernel() {
        let Some(sources) = live_sources() else {
            return;
        };
        let layout = KernelLayout::discover(&sources).expect("live layout");
        assert!(layout.set_state.is_some());
        assert!(layout.send_reset.is_some());
        assert!(layout.receive_reset.is_some() && layout.destroy_sock.is_some());
        assert!(layout.timer_start.is_some() && layout.timer_expire_entry.is_some());
        assert!(matches!(layout.hz, 100 | 250 | 300 | 1000));
        assert!(!layout.kernel_release.is_empty());
        assert_ne!(layout.sock.keepalive_timer, ka_common::ABSENT);
        assert_ne!(layout.sock.sock_keepopen_bit, ka_common::ABSENT);
        // Every kernel ka is tested on (5.6+, BTF) runs the hot hooks and
        // the counted ones raw; `err` is an argument where the record has it.
        assert_eq!(
            layout.raw,
            RawTracepoints {
                inet_sock_set_state: true,
                tcp_destroy_sock: true,
                timer_start: true,
                timer_expire_entry: true,
                tcp_retransmit_skb: true,
                retransmit_err_argument: layout
                    .retransmit
                    .is_some_and(|f| f.err != ka_common::ABSENT),
                tcp_receive_reset: true,
                tcp_send_reset: true,
                send_reset_reason_argument: layout
                    .send_reset
                    .is_some_and(|f| f.reason != ka_common::ABSENT),
                inet_sk_error_report: true,
            }
        );
        if layout
            .send_reset
            .is_some_and(|f| f.reason != ka_common::ABSENT)
        {
            assert_eq!(
                layout.reset_reasons.get(&15).map(String::as_str),
                Some("tcp_keepalive_timeout")
            );
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(layout.keepalive_timer_fn.is_some());
        }
        for note in &layout.notes {
            eprintln!("note: {note}");
        }
    }

    #[test]
    fn a_6_1_style_kernel_degrades_with_notes() {
        let Some(live) = live_sources() else {
            return;
        };
        // 6.1-style tracefs (only two tracepoints, no reason, no err) with
        // the 6.19-style BTF fixture, which lacks nothing ka reads.
        let sources = LayoutSources {
            tracefs: fixtures().join("tracefs/6.1"),
            btf: fixtures().join("btf/sock-6.19.btf"),
            kallsyms: live.kallsyms,
        };
        let layout = KernelLayout::discover(&sources).expect("layout");
        let send_reset = layout.send_reset.expect("6.1 tcp_send_reset is usable");
        assert_eq!(send_reset.reason, ka_common::ABSENT);
        assert_eq!(layout.retransmit.map(|f| f.err), Some(ka_common::ABSENT));
        assert!(layout.set_state.is_none());
        let subjects: Vec<&str> = layout.notes.iter().map(|n| n.subject.as_str()).collect();
        assert!(
            subjects.contains(&"tracepoint sock:inet_sock_set_state"),
            "{subjects:?}"
        );
        assert!(
            subjects.contains(&"tracepoint timer:timer_start"),
            "{subjects:?}"
        );
        // The BTF fixture has the enum: names come from BTF.
        assert_eq!(
            layout.reset_reasons.get(&15).map(String::as_str),
            Some("tcp_keepalive_timeout")
        );
    }

    #[test]
    fn raw_tracepoints_fall_back_to_tracepoints_with_notes() {
        let sock = SockOffsets {
            sk_protocol: 84,
            timer_function: 24,
            ..SockOffsets::ABSENT
        };
        let (copy, _) = copy_plan::plan(&sock);
        let usual = btf::KernelBtf::from_file(&fixtures().join("btf/sock-6.19.btf")).unwrap();
        let mut notes = Vec::new();
        let raw = RawTracepoints::check(&usual, &sock, &copy, &mut notes).unwrap();
        assert!(
            raw.inet_sock_set_state
                && raw.tcp_destroy_sock
                && raw.timer_start
                && raw.timer_expire_entry
                && raw.tcp_retransmit_skb
                && raw.retransmit_err_argument
                && raw.tcp_receive_reset
                && raw.tcp_send_reset
                && raw.send_reset_reason_argument
                && raw.inet_sk_error_report
        );
        assert!(notes.is_empty(), "{notes:?}");

        // Without sock.sk_protocol the set_state program cannot filter.
        let no_protocol = SockOffsets {
            sk_protocol: ka_common::ABSENT,
            ..sock
        };
        let (no_protocol_copy, _) = copy_plan::plan(&no_protocol);
        let raw =
            RawTracepoints::check(&usual, &no_protocol, &no_protocol_copy, &mut notes).unwrap();
        assert!(!raw.inet_sock_set_state && raw.timer_start);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].reason.contains("sock.sk_protocol"), "{notes:?}");

        // Other prototypes, or none: each hook keeps its tracepoint. A
        // retransmission hook without `err` (before 6.17) runs raw all the
        // same.
        let other = btf::KernelBtf::from_file(&fixtures().join("btf/raw-other.btf")).unwrap();
        let mut notes = Vec::new();
        let raw = RawTracepoints::check(&other, &sock, &copy, &mut notes).unwrap();
        assert_eq!(
            raw,
            RawTracepoints {
                tcp_retransmit_skb: true,
                ..RawTracepoints::default()
            }
        );
        let shown: Vec<String> = notes.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "raw tracepoint inet_sock_set_state: its arguments are (struct sock *, s64, s32), \
                 not (struct sock *, s32, s32); the hook uses its (slower) tracepoint",
                "raw tracepoint tcp_destroy_sock: BTF has no btf_trace_tcp_destroy_sock; the hook \
                 uses its (slower) tracepoint",
                "raw tracepoint timer_start: its arguments are (u64, struct timer_list *), not \
                 (struct timer_list *, u64); the hook uses its (slower) tracepoint",
                "raw tracepoint timer_expire_entry: BTF has no btf_trace_timer_expire_entry; the \
                 hook uses its (slower) tracepoint",
                "raw tracepoint tcp_receive_reset: BTF has no btf_trace_tcp_receive_reset; the \
                 hook uses its (slower) tracepoint",
                "raw tracepoint tcp_send_reset: BTF has no btf_trace_tcp_send_reset; the hook \
                 uses its (slower) tracepoint",
                "raw tracepoint inet_sk_error_report: BTF has no btf_trace_inet_sk_error_report; \
                 the hook uses its (slower) tracepoint",
            ]
        );
    }

    #[test]
    fn malformed_tracefs_and_btf_are_bad_input() {
        let Some(live) = live_sources() else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("ka-layout-{}", std::process::id()));
        let format = dir.join("events/sock/inet_sock_set_state");
        std::fs::create_dir_all(&format).unwrap();
        std::fs::copy(
            fixtures().join("tracefs/malformed/events/ka/bad_offset/format"),
            format.join("format"),
        )
        .unwrap();
        let error = KernelLayout::discover(&LayoutSources {
            tracefs: dir.clone(),
            ..live.clone()
        })
        .unwrap_err();
        assert!(error.is_bad_input(), "{error}");
        assert!(
            error
                .to_string()
                .contains("inet_sock_set_state/format:6: cannot parse field"),
            "{error}"
        );
        // A tracepoint lacking a required field is a note, not an error.
        std::fs::copy(
            fixtures().join("tracefs/malformed/events/ka/no_skaddr/format"),
            format.join("format"),
        )
        .unwrap();
        let layout = KernelLayout::discover(&LayoutSources {
            tracefs: dir.clone(),
            ..live.clone()
        })
        .unwrap();
        assert!(layout.set_state.is_none());
        assert!(
            layout
                .notes
                .iter()
                .any(|n| n.reason.contains("lacks field skaddr")),
            "{:?}",
            layout.notes
        );
        let garbage = dir.join("garbage.btf");
        std::fs::write(&garbage, b"not btf").unwrap();
        let error = KernelLayout::discover(&LayoutSources {
            btf: garbage,
            ..live
        })
        .unwrap_err();
        assert!(error.is_bad_input(), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn direct_loads_need_the_kfunc_and_every_type() {
        // The fixture has the socket, namespace and timer structures but,
        // like a kernel before 6.2, no bpf_rdonly_cast.
        let fixture = btf::KernelBtf::from_file(&fixtures().join("btf/sock-6.19.btf")).unwrap();
        assert!(fixture.struct_id("tcp_sock").is_some());
        let mut notes = Vec::new();
        assert_eq!(Casts::find(&fixture, &mut notes), None);
        let note = notes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            note.contains("direct kernel loads: BTF lacks the bpf_rdonly_cast kfunc;"),
            "{note}"
        );
        assert!(!note.contains("struct tcp_sock"), "{note}");
    }

    #[test]
    fn live_direct_loads_name_the_kfunc_and_the_structures() {
        let Some(sources) = live_sources() else {
            return;
        };
        let live = btf::KernelBtf::from_file(&sources.btf).unwrap();
        let mut notes = Vec::new();
        let casts = Casts::find(&live, &mut notes);
        // Linux 6.2 added the kfunc; the 6.1 VM of the matrix has none.
        let Some(kfunc) = live.function_id("bpf_rdonly_cast") else {
            assert_eq!(casts, None);
            return;
        };
        let casts = casts.expect("casts with the kfunc and the structures present");
        assert_eq!(casts.kfunc, kfunc);
        let KernelTypes {
            tcp_sock,
            net,
            timer_list,
            socket_alloc,
        } = casts.types;
        assert_eq!(Some(socket_alloc), live.struct_id("socket_alloc"));
        assert_eq!(Some(tcp_sock), live.struct_id("tcp_sock"));
        assert_eq!(Some(net), live.struct_id("net"));
        assert_eq!(Some(timer_list), live.struct_id("timer_list"));
        assert!(casts.types.direct());
        assert!(notes.is_empty(), "{notes:?}");
    }
}
