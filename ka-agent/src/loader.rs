//! Loading the kernel programs with this kernel's offsets, attaching every
//! hook the kernel allows, and reporting hook by hook what it did not.

use std::fmt;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{KProbe, RawTracePoint, TracePoint},
};
use ka_common::{EventKind, KernelTypes, STAT_SLOTS, Stat};

use crate::offsets::{Casts, KernelLayout, RawTracepoints};

/// The kernel programs, embedded at build time.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ka"));

/// Where a hook attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
    Kprobe {
        function: &'static str,
    },
}

/// A kernel hook of ka: one program in `ka-ebpf/src/hooks/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    InetSockSetState,
    TcpRetransmitSkb,
    TcpSendReset,
    TcpReceiveReset,
    TcpDestroySock,
    InetSkErrorReport,
    TimerStart,
    TimerExpireEntry,
    TcpRcvStateProcess,
}

impl Hook {
    pub const ALL: [Self; 9] = [
        Self::InetSockSetState,
        Self::TcpRetransmitSkb,
        Self::TcpSendReset,
        Self::TcpReceiveReset,
        Self::TcpDestroySock,
        Self::InetSkErrorReport,
        Self::TimerStart,
        Self::TimerExpireEntry,
        Self::TcpRcvStateProcess,
    ];

    /// The program's name in the object, also the `hook` label.
    pub const fn program(self) -> &'static str {
        match self {
            Self::InetSockSetState => "inet_sock_set_state",
            Self::TcpRetransmitSkb => "tcp_retransmit_skb",
            Self::TcpSendReset => "tcp_send_reset",
            Self::TcpReceiveReset => "tcp_receive_reset",
            Self::TcpDestroySock => "tcp_destroy_sock",
            Self::InetSkErrorReport => "inet_sk_error_report",
            Self::TimerStart => "timer_start",
            Self::TimerExpireEntry => "timer_expire_entry",
            Self::TcpRcvStateProcess => "tcp_rcv_state_process",
        }
    }

    pub const fn attachment(self) -> Attachment {
        const fn tp(category: &'static str, name: &'static str) -> Attachment {
            Attachment::Tracepoint { category, name }
        }
        match self {
            Self::InetSockSetState => tp("sock", "inet_sock_set_state"),
            Self::TcpRetransmitSkb => tp("tcp", "tcp_retransmit_skb"),
            Self::TcpSendReset => tp("tcp", "tcp_send_reset"),
            Self::TcpReceiveReset => tp("tcp", "tcp_receive_reset"),
            Self::TcpDestroySock => tp("tcp", "tcp_destroy_sock"),
            Self::InetSkErrorReport => tp("sock", "inet_sk_error_report"),
            Self::TimerStart => tp("timer", "timer_start"),
            Self::TimerExpireEntry => tp("timer", "timer_expire_entry"),
            Self::TcpRcvStateProcess => Attachment::Kprobe {
                function: "tcp_rcv_state_process",
            },
        }
    }

    /// What is lost without it.
    pub const fn feature(self) -> &'static str {
        match self {
            Self::InetSockSetState => "connection lifecycle (required)",
            Self::TcpRetransmitSkb => "retransmission counts",
            Self::TcpSendReset => "resets sent and their reasons",
            Self::TcpReceiveReset => "resets received, reset_after_idle",
            Self::TcpDestroySock => "socket reuse cleanup",
            Self::InetSkErrorReport => {
                "socket errors reported to applications (the API's last_error)"
            }
            Self::TimerStart | Self::TimerExpireEntry => "keepalive probes and keepalive deaths",
            Self::TcpRcvStateProcess => "peer liveness while closing",
        }
    }

    /// The raw tracepoint program of a hook that has one, used when
    /// `raw` says this kernel declares the arguments it reads.
    pub const fn raw_program(self, raw: RawTracepoints) -> Option<&'static str> {
        match self {
            Self::InetSockSetState if raw.inet_sock_set_state => Some("inet_sock_set_state_raw"),
            Self::TcpDestroySock if raw.tcp_destroy_sock => Some("tcp_destroy_sock_raw"),
            Self::TimerStart if raw.timer_start => Some("timer_start_raw"),
            Self::TimerExpireEntry if raw.timer_expire_entry => Some("timer_expire_entry_raw"),
            Self::TcpRetransmitSkb if raw.tcp_retransmit_skb => Some("tcp_retransmit_skb_raw"),
            Self::TcpReceiveReset if raw.tcp_receive_reset => Some("tcp_receive_reset_raw"),
            Self::TcpSendReset if raw.tcp_send_reset => Some("tcp_send_reset_raw"),
            Self::InetSkErrorReport if raw.inet_sk_error_report => Some("inet_sk_error_report_raw"),
            _ => None,
        }
    }

    /// Takes this hook's raw tracepoint program out of `raw` (the kernel
    /// refused it).
    fn stop_raw(self, raw: &mut RawTracepoints) {
        match self {
            Self::InetSockSetState => raw.inet_sock_set_state = false,
            Self::TcpDestroySock => raw.tcp_destroy_sock = false,
            Self::TimerStart => raw.timer_start = false,
            Self::TimerExpireEntry => raw.timer_expire_entry = false,
            Self::TcpRetransmitSkb => raw.tcp_retransmit_skb = false,
            Self::TcpReceiveReset => raw.tcp_receive_reset = false,
            Self::TcpSendReset => raw.tcp_send_reset = false,
            Self::InetSkErrorReport => raw.inet_sk_error_report = false,
            Self::TcpRcvStateProcess => {}
        }
    }

    /// Without it the agent cannot do its main job.
    pub const fn required(self) -> bool {
        matches!(self, Self::InetSockSetState)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.attachment() {
            Attachment::Tracepoint { category, name } => write!(f, "{category}:{name}"),
            Attachment::Kprobe { function } => write!(f, "kprobe:{function}"),
        }
    }
}

/// What happened to one hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookStatus {
    Attached,
    /// This kernel lacks what the hook needs (tracepoint, field, symbol).
    Unavailable(String),
    /// The kernel refused to load or attach it.
    Failed(String),
}

impl HookStatus {
    pub fn is_attached(&self) -> bool {
        matches!(self, Self::Attached)
    }
}

/// Why the programs could not be loaded at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the kernel programs were not built into this binary (built with AYA_BUILD_SKIP)")]
    NotBuilt,
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the required hook {hook} is not attached: {why}")]
    Required { hook: Hook, why: String },
    #[error("the kernel programs' object is not what this agent expects: {0}")]
    Object(String),
    #[error("opening map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Loaded and attached programs. Dropping it detaches everything.
pub struct Probes {
    pub ebpf: Ebpf,
    pub hooks: Vec<(Hook, HookStatus)>,
    /// Which hooks run as raw tracepoints.
    pub raw: RawTracepoints,
    /// Whether the programs load kernel memory directly (`bpf_rdonly_cast`)
    /// rather than with `bpf_probe_read_kernel`.
    pub direct: bool,
    /// The first program the kernel refused to load (the verifier), as
    /// opposed to one it could not attach.
    refused: Option<String>,
}

/// Options of the load.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
}

impl Probes {
    /// Loads the programs with `layout`'s offsets and attaches every hook
    /// this kernel supports: with direct loads where `layout` has them,
    /// and again without them if the kernel refuses any program that way
    /// (warned, and said by [`Probes::direct`]).
    pub fn load(layout: &KernelLayout, options: LoadOptions) -> Result<Self, LoadError> {
        if PROGRAMS.is_empty() {
            return Err(LoadError::NotBuilt);
        }
        if let Some(casts) = layout.casts {
            let refused = match Self::load_with(layout, options, Some(casts)) {
                Ok(probes) => match probes.refusal() {
                    None => return Ok(probes),
                    Some(why) => why,
                },
                Err(error) => error.to_string(),
            };
            tracing::warn!(why = %refused, "kernel refused the programs' direct loads; reading with bpf_probe_read_kernel");
        }
        Self::load_with(layout, options, None)
    }

    /// Why a load with direct loads is not kept: the kernel refused a
    /// program (a hook failed, or a raw tracepoint fell back, because of it).
    fn refusal(&self) -> Option<String> {
        self.refused.clone()
    }

    fn load_with(
        layout: &KernelLayout,
        options: LoadOptions,
        casts: Option<Casts>,
    ) -> Result<Self, LoadError> {
        let object = resolve_casts(PROGRAMS, casts.map(|c| c.kfunc))?;
        let types = casts.map_or(KernelTypes::ABSENT, |c| c.types);
        let keepalive_fn = layout.keepalive_timer_fn.unwrap_or(0);
        let set_state = layout
            .set_state
            .unwrap_or(ka_common::SetStateFields::ABSENT);
        let retransmit = layout
            .retransmit
            .unwrap_or(ka_common::RetransmitFields::ABSENT);
        let retransmit_err_argument = u32::from(layout.raw.retransmit_err_argument);
        let send_reset_reason_argument = u32::from(layout.raw.send_reset_reason_argument);
        let send_reset = layout
            .send_reset
            .unwrap_or(ka_common::SendResetFields::ABSENT);
        let receive_reset = layout
            .receive_reset
            .unwrap_or(ka_common::SkRecordFields::ABSENT);
        let destroy_sock = layout
            .destroy_sock
            .unwrap_or(ka_common::SkRecordFields::ABSENT);
        let error_report = layout
            .error_report
            .unwrap_or(ka_common::ErrorReportFields::ABSENT);
        let timer_start = layout.timer_start.unwrap_or(ka_common::TimerFields::ABSENT);
        let timer_expire = layout
            .timer_expire_entry
            .unwrap_or(ka_common::TimerFields::ABSENT);
        // A quarter full wakes the agent early; below that its drain timer
        // collects the events (see the kernel's `emit::submit`).
        let wakeup_bytes = u64::from(options.ring_buffer_bytes / 4);
        let mut ebpf = EbpfLoader::new()
            .override_global("SOCK_OFFSETS", &layout.sock, true)
            .override_global("SOCK_COPY_COMMON", &layout.sock_copy.common, true)
            .override_global("SOCK_COPY_FULL", &layout.sock_copy.full, true)
            .override_global("SOCK_COPY_NET", &layout.sock_copy.net, true)
            .override_global("SOCK_COPY_AT", &layout.sock_copy.at, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .override_global("KEEPALIVE_TIMER_FN", &keepalive_fn, true)
            .override_global("KERNEL_TYPES", &types, true)
            .override_global("SET_STATE_FIELDS", &set_state, true)
            .override_global("RETRANSMIT_FIELDS", &retransmit, true)
            .override_global("RETRANSMIT_ERR_ARGUMENT", &retransmit_err_argument, true)
            .override_global(
                "SEND_RESET_REASON_ARGUMENT",
                &send_reset_reason_argument,
                true,
            )
            .override_global("SEND_RESET_FIELDS", &send_reset, true)
            .override_global("RECEIVE_RESET_FIELDS", &receive_reset, true)
            .override_global("DESTROY_SOCK_FIELDS", &destroy_sock, true)
            .override_global("ERROR_REPORT_FIELDS", &error_report, true)
            .override_global("TIMER_START_FIELDS", &timer_start, true)
            .override_global("TIMER_EXPIRE_FIELDS", &timer_expire, true)
            .map_max_entries("EVENTS", options.ring_buffer_bytes)
            .load(object.bytes())?;
        let mut hooks = Vec::new();
        let mut raw = layout.raw;
        let mut refused = None;
        for hook in Hook::ALL {
            let status = match unavailable_reason(layout, hook) {
                Some(why) => HookStatus::Unavailable(why),
                None => match attach(&mut ebpf, hook, &mut raw, layout, &mut refused) {
                    Ok(()) => HookStatus::Attached,
                    Err(why) => HookStatus::Failed(why),
                },
            };
            if hook.required()
                && let HookStatus::Unavailable(why) | HookStatus::Failed(why) = &status
            {
                return Err(LoadError::Required {
                    hook,
                    why: why.clone(),
                });
            }
            hooks.push((hook, status));
        }
        Ok(Self {
            ebpf,
            hooks,
            raw,
            direct: casts.is_some(),
            refused,
        })
    }

    /// The program attached for `hook` (its raw tracepoint program where
    /// this kernel allows it).
    pub fn program_of(&self, hook: Hook) -> &'static str {
        hook.raw_program(self.raw).unwrap_or(hook.program())
    }

    /// What an attached hook provides, and how it is attached when that is
    /// not its plain tracepoint.
    pub fn attached_detail(&self, hook: Hook) -> String {
        if hook.raw_program(self.raw).is_some() {
            format!("{} (raw tracepoint)", hook.feature())
        } else {
            hook.feature().to_owned()
        }
    }

    /// The event ring buffer (taken once by the reader).
    pub fn take_events(&mut self) -> Result<RingBuf<aya::maps::MapData>, LoadError> {
        let map = self.ebpf.take_map("EVENTS").ok_or(LoadError::Map {
            name: "EVENTS",
            source: aya::maps::MapError::InvalidName {
                name: "EVENTS".into(),
            },
        })?;
        RingBuf::try_from(map).map_err(|source| LoadError::Map {
            name: "EVENTS",
            source,
        })
    }

    /// The in-kernel counters.
    pub fn take_stats(&mut self) -> Result<KernelStats, LoadError> {
        let map = self.ebpf.take_map("STATS").ok_or(LoadError::Map {
            name: "STATS",
            source: aya::maps::MapError::InvalidName {
                name: "STATS".into(),
            },
        })?;
        let array = PerCpuArray::try_from(map).map_err(|source| LoadError::Map {
            name: "STATS",
            source,
        })?;
        Ok(KernelStats { array })
    }
}

/// The `STATS` per-CPU array.
pub struct KernelStats {
    array: PerCpuArray<MapData, u64>,
}

impl KernelStats {
    fn slot(&self, slot: u32) -> u64 {
        self.array
            .get(&slot, 0)
            .map_or(0, |values| values.iter().sum())
    }

    /// Events lost in the kernel, all kinds.
    pub fn lost(&self) -> u64 {
        EventKind::ALL
            .iter()
            .map(|kind| self.slot(Stat::lost(*kind)))
            .sum()
    }

    /// Events submitted by the programs, by kind.
    pub fn submitted(&self, kind: EventKind) -> u64 {
        self.slot(Stat::submitted(kind))
    }

    /// Events the programs filtered out (counted, not sent), by kind.
    pub fn filtered(&self, kind: EventKind) -> u64 {
        self.slot(Stat::filtered(kind))
    }

    /// Events lost, by kind.
    pub fn lost_of(&self, kind: EventKind) -> u64 {
        self.slot(Stat::lost(kind))
    }

    pub fn read_failures(&self) -> u64 {
        self.slot(Stat::ReadFailures as u32)
    }

    /// State transitions of sockets that are not TCP (see `Stat::NotTcp`).
    pub fn not_tcp(&self) -> u64 {
        self.slot(Stat::NotTcp as u32)
    }

    /// Sockets that left `SYN_SENT` without a recorded connector (see
    /// `Stat::ConnectorsUnknown`).
    pub fn connectors_unknown(&self) -> u64 {
        self.slot(Stat::ConnectorsUnknown as u32)
    }

    /// The ring buffer's high-water mark (bytes waiting) since the last
    /// call, which starts the next period.
    pub fn take_ring_high_water(&mut self) -> u64 {
        let slot = Stat::RingHighWater as u32;
        let high = self
            .array
            .get(&slot, 0)
            .map_or(0, |values| values.iter().copied().max().unwrap_or(0));
        if let Ok(cpus) = aya::util::nr_cpus()
            && let Ok(zeros) = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
        {
            // A submit racing with this write loses one sample of a mark.
            let _ = self.array.set(slot, zeros, 0);
        }
        high
    }

    pub fn keepalive_timer_hits(&self) -> u64 {
        self.slot(Stat::KeepaliveTimerHits as u32)
    }
}

const _: () = assert!(Stat::SubmittedBase as u32 + 9 < Stat::FilteredBase as u32);
const _: () = assert!(Stat::FilteredBase as u32 + 9 < STAT_SLOTS);

/// Why this kernel cannot support `hook`, judged from the layout alone.
fn unavailable_reason(layout: &KernelLayout, hook: Hook) -> Option<String> {
    let missing = |what: &str| Some(format!("{what} not available on this kernel"));
    // A raw tracepoint program reads the arguments, not the record.
    let raw = hook.raw_program(layout.raw).is_some();
    match hook {
        Hook::InetSockSetState => (layout.set_state.is_none() && !raw)
            .then(|| "tracepoint sock:inet_sock_set_state missing or unusable".to_owned()),
        Hook::TcpRetransmitSkb => (layout.retransmit.is_none() && !raw)
            .then(|| "tracepoint tcp:tcp_retransmit_skb missing".to_owned()),
        Hook::TcpSendReset => (layout.send_reset.is_none() && !raw)
            .then(|| "tracepoint tcp:tcp_send_reset missing".to_owned()),
        Hook::TcpReceiveReset => (layout.receive_reset.is_none() && !raw)
            .then(|| "tracepoint tcp:tcp_receive_reset missing".to_owned()),
        Hook::TcpDestroySock => (layout.destroy_sock.is_none() && !raw)
            .then(|| "tracepoint tcp:tcp_destroy_sock missing".to_owned()),
        Hook::InetSkErrorReport => (layout.error_report.is_none() && !raw)
            .then(|| "tracepoint sock:inet_sk_error_report missing (kernel < 5.14)".to_owned()),
        Hook::TimerStart | Hook::TimerExpireEntry => {
            if layout.keepalive_timer_fn.is_none() {
                missing("the address of tcp_keepalive_timer (/proc/kallsyms)")
            } else if layout.sock.keepalive_timer == ka_common::ABSENT {
                missing("the keepalive timer's offset in struct sock (BTF)")
            } else if hook == Hook::TimerStart && layout.timer_start.is_none() && !raw {
                missing("tracepoint timer:timer_start")
            } else if hook == Hook::TimerExpireEntry && layout.timer_expire_entry.is_none() && !raw
            {
                missing("tracepoint timer:timer_expire_entry")
            } else {
                None
            }
        }
        Hook::TcpRcvStateProcess => None,
    }
}

/// Attaches `hook`: its raw tracepoint program where `raw` allows it, else
/// (also when the kernel refuses the raw one, which then leaves `raw`) its
/// tracepoint or kprobe program.
fn attach(
    ebpf: &mut Ebpf,
    hook: Hook,
    raw: &mut RawTracepoints,
    layout: &KernelLayout,
    refused: &mut Option<String>,
) -> Result<(), String> {
    if let (
        Some(name),
        Attachment::Tracepoint {
            name: tracepoint, ..
        },
    ) = (hook.raw_program(*raw), hook.attachment())
    {
        let attached = attach_raw(ebpf, name, tracepoint, refused);
        match attached {
            Ok(()) => return Ok(()),
            Err(why) if has_record_layout(layout, hook) => {
                tracing::warn!(hook = %hook, why = %why, "raw tracepoint refused; using the tracepoint");
                hook.stop_raw(raw);
            }
            Err(why) => return Err(why),
        }
    }
    let name = hook.program();
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?;
    match hook.attachment() {
        Attachment::Tracepoint {
            category,
            name: tracepoint,
        } => {
            let program: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            program.load().map_err(|e| refusal(name, &e, refused))?;
            program
                .attach(category, tracepoint)
                .map_err(|e| describe(&e))?;
        }
        Attachment::Kprobe { function } => {
            let program: &mut KProbe = program.try_into().map_err(|e| format!("{e}"))?;
            program.load().map_err(|e| refusal(name, &e, refused))?;
            program.attach(function, 0).map_err(|e| {
                let text = describe(&e);
                if std::path::Path::new("/sys/kernel/tracing/kprobe_events").exists() {
                    text
                } else {
                    format!("kernel has no kprobes (CONFIG_KPROBES off): {text}")
                }
            })?;
        }
    }
    Ok(())
}

fn attach_raw(
    ebpf: &mut Ebpf,
    name: &str,
    tracepoint: &str,
    refused: &mut Option<String>,
) -> Result<(), String> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program.load().map_err(|e| refusal(name, &e, refused))?;
    program.attach(tracepoint).map_err(|e| describe(&e))?;
    Ok(())
}

/// Whether the tracepoint program of `hook` has its record layout (tracefs).
fn has_record_layout(layout: &KernelLayout, hook: Hook) -> bool {
    match hook {
        Hook::InetSockSetState => layout.set_state.is_some(),
        Hook::TcpRetransmitSkb => layout.retransmit.is_some(),
        Hook::TcpSendReset => layout.send_reset.is_some(),
        Hook::TcpReceiveReset => layout.receive_reset.is_some(),
        Hook::TcpDestroySock => layout.destroy_sock.is_some(),
        Hook::InetSkErrorReport => layout.error_report.is_some(),
        Hook::TimerStart => layout.timer_start.is_some(),
        Hook::TimerExpireEntry => layout.timer_expire_entry.is_some(),
        Hook::TcpRcvStateProcess => false,
    }
}

/// The programs' object, 8-byte aligned (the ELF parser reads it in place).
struct Object(Vec<u64>);

impl Object {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the vector's initialized u64s, viewed as their bytes: same
        // memory and lifetime, u8 has no alignment or validity requirement.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 8) }
    }
}

/// A copy of `object` with every `bpf_rdonly_cast` call placeholder
/// (`ka_common::RDONLY_CAST_PLACEHOLDER`) resolved: a call of the kfunc
/// with BTF id `kfunc`, or, without it, `r0 = r1` (what the verifier turns
/// the call into; the programs then never load through the result, as
/// `KERNEL_TYPES` names no type).
fn resolve_casts(object: &[u8], kfunc: Option<u32>) -> Result<Object, LoadError> {
    // Instructions are 8-byte aligned in their sections, and sections in
    // the file; the object is little-endian, like the BPF target.
    if !object.len().is_multiple_of(8) {
        return Err(LoadError::Object(
            "its size is not a multiple of 8".to_owned(),
        ));
    }
    let mut words: Vec<u64> = object
        .chunks_exact(8)
        .map(|chunk| u64::from_ne_bytes(chunk.try_into().unwrap_or_default()))
        .collect();
    let placeholder = ka_common::RDONLY_CAST_PLACEHOLDER.to_le();
    let call = kfunc.map_or(ka_common::MOV_R0_R1, |id| {
        (ka_common::RDONLY_CAST_PLACEHOLDER & 0xffff_ffff) | (u64::from(id) << 32)
    });
    let mut patched = 0;
    for word in words.iter_mut().filter(|word| **word == placeholder) {
        *word = call.to_le();
        patched += 1;
    }
    if patched == 0 {
        return Err(LoadError::Object(
            "no bpf_rdonly_cast call to resolve".to_owned(),
        ));
    }
    Ok(Object(words))
}

/// Describes a program the kernel refused to load, remembering the first.
fn refusal(program: &str, error: &dyn std::error::Error, refused: &mut Option<String>) -> String {
    let why = describe(error);
    refused.get_or_insert_with(|| format!("{program}: {why}"));
    why
}

/// The error with its whole cause chain on one line.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    tracing::debug!(error = %text, "kernel refused a program");
    text.lines().next().unwrap_or_default().to_owned()
}

/// Kernel memory of the BPF maps this process holds (the agent holds only
/// its own), as the kernel accounts it: the `memlock` of each map in
/// `/proc/self/fdinfo`, once per map however many descriptors refer to it.
pub fn own_map_bytes() -> u64 {
    let Ok(fds) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    map_bytes(
        fds.flatten()
            .filter_map(|fd| std::fs::read_to_string(fd.path()).ok()),
    )
}

fn map_bytes(fdinfos: impl IntoIterator<Item = String>) -> u64 {
    let mut maps = std::collections::HashMap::new();
    for info in fdinfos {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, memlock);
        }
    }
    maps.values().sum()
}

#[cfg(test)]
mod tests {
    use ka_common::{MOV_R0_R1, RDONLY_CAST_PLACEHOLDER};

    use super::*;

    fn words(object: &Object) -> Vec<u64> {
        object
            .bytes()
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn every_cast_placeholder_becomes_the_kfunc_call_or_a_move() {
        let other = 0x0000_0001_0000_0085_u64; // call helper 1
        let object: Vec<u8> = [other, RDONLY_CAST_PLACEHOLDER, 7, RDONLY_CAST_PLACEHOLDER]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let kfunc = words(&resolve_casts(&object, Some(65_486)).unwrap());
        let call = 0x85 | (0x20 << 8) | (65_486_u64 << 32);
        assert_eq!(kfunc, [other, call, 7, call]);
        let without = words(&resolve_casts(&object, None).unwrap());
        assert_eq!(without, [other, MOV_R0_R1, 7, MOV_R0_R1]);
    }

    #[test]
    fn an_object_without_placeholders_or_of_odd_size_is_refused() {
        let object = 0x85_u64.to_le_bytes();
        assert!(matches!(
            resolve_casts(&object, None),
            Err(LoadError::Object(_))
        ));
        assert!(matches!(
            resolve_casts(&object[..5], None),
            Err(LoadError::Object(_))
        ));
    }

    #[test]
    fn the_built_programs_carry_placeholders_only_as_instructions() {
        if PROGRAMS.is_empty() {
            eprintln!("SKIPPED: programs not built into this test binary");
            return;
        }
        // Unaligned occurrences would be data the patch must not touch:
        // the placeholder's bytes appear only where the calls are.
        let needle = RDONLY_CAST_PLACEHOLDER.to_le_bytes();
        let anywhere = PROGRAMS.windows(8).filter(|w| *w == needle).count();
        let resolved = resolve_casts(PROGRAMS, Some(1)).unwrap();
        let left = resolved.bytes().windows(8).filter(|w| *w == needle).count();
        assert!(anywhere > 0);
        assert_eq!(
            left, 0,
            "{anywhere} placeholders, {left} left after patching"
        );
    }

    #[test]
    fn map_memory_counts_each_map_once() {
        let ring = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t27\nkey_size:\t0\nvalue_size:\t0\nmax_entries:\t4194304\nmap_flags:\t0x0\nmap_extra:\t0x0\nmemlock:\t4210688\nmap_id:\t42\nfrozen:\t0\n";
        let stats = "map_type:\t6\nmemlock:\t9216\nmap_id:\t43\n";
        let program = "prog_type:\t17\nmemlock:\t4096\nprog_id:\t7\n";
        let file = "pos:\t0\nflags:\t0100000\n";
        let infos = [ring, stats, ring, program, file].map(str::to_owned);
        assert_eq!(map_bytes(infos), 4_210_688 + 9_216);
    }
}
