//! Offsets of tracepoint fields and kernel struct members, read at start-up
//! from tracefs and BTF (Rust eBPF has no CO-RE), plus the kernel facts the
//! programs and the tracker need (symbol addresses, HZ, reset reasons).

pub mod btf;
pub mod kernel;
pub mod tracefs;

use std::{collections::BTreeMap, fmt, path::PathBuf};

use ka_common::{
    ErrorReportFields, RetransmitFields, SendResetFields, SetStateFields, SkRecordFields,
    SockOffsets, TimerFields,
};

pub use kernel::ensure_tracefs_mounted;

/// Why the layout could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error("cannot tell the kernel's HZ (no /proc/config.gz, /boot/config, or /proc/timer_list)")]
    NoHz,
}

impl OffsetsError {
    /// A file that exists but holds garbage was given by the operator.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Btf(btf::BtfError::Parse { .. })
                | Self::Tracefs(tracefs::TracefsError::Parse { .. })
        )
    }
}

/// Where the facts come from (the live system by default).
#[derive(Clone, Debug)]
pub struct LayoutSources {
    pub tracefs: PathBuf,
    pub btf: PathBuf,
    pub kallsyms: PathBuf,
}

impl Default for LayoutSources {
    fn default() -> Self {
        Self {
            tracefs: PathBuf::from("/sys/kernel/tracing"),
            btf: PathBuf::from("/sys/kernel/btf/vmlinux"),
            kallsyms: PathBuf::from("/proc/kallsyms"),
        }
    }
}

/// Something this kernel lacks, for `ka-agent check` and the start-up log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutNote(pub String);

impl fmt::Display for LayoutNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The fields of a tracepoint, or `None` (with the reason noted) when the
/// tracepoint is missing or lacks a field its program needs.
fn usable<T>(
    notes: &mut Vec<LayoutNote>,
    result: Option<Result<T, tracefs::TracefsError>>,
) -> Option<T> {
    match result {
        Some(Ok(fields)) => Some(fields),
        Some(Err(e)) => {
            notes.push(LayoutNote(e.to_string()));
            None
        }
        None => None,
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
    pub sock: SockOffsets,
    pub reset_reasons: BTreeMap<u32, String>,
    pub keepalive_timer_fn: Option<u64>,
    pub hz: u32,
    pub kernel_release: String,
    pub notes: Vec<LayoutNote>,
}

impl KernelLayout {
    pub fn discover(sources: &LayoutSources) -> Result<Self, OffsetsError> {
        let kernel_btf = btf::KernelBtf::from_file(&sources.btf)?;
        let mut absent = Vec::new();
        let sock = btf::sock_offsets(&kernel_btf, &mut absent)?;
        let mut notes: Vec<LayoutNote> = absent
            .into_iter()
            .map(|member| LayoutNote(format!("BTF member {member} absent")))
            .collect();
        let reset_reasons = btf::reset_reasons(&kernel_btf);
        if reset_reasons.is_empty() {
            notes.push(LayoutNote(
                "enum sk_rst_reason absent: reset reasons not reported (kernel < 6.10)".into(),
            ));
        }
        let mut tracepoint = |category: &str,
                              name: &str|
         -> Result<Option<tracefs::TracepointFormat>, OffsetsError> {
            let format = tracefs::TracepointFormat::read(&sources.tracefs, category, name)?;
            if format.is_none() {
                notes.push(LayoutNote(format!("tracepoint {category}:{name} absent")));
            }
            Ok(format)
        };
        // A tracepoint that lacks a field a program needs makes that hook
        // unavailable; the reason is kept for `check`.
        let set_state = tracepoint("sock", "inet_sock_set_state")?;
        let retransmit = tracepoint("tcp", "tcp_retransmit_skb")?;
        let send_reset = tracepoint("tcp", "tcp_send_reset")?;
        let receive_reset = tracepoint("tcp", "tcp_receive_reset")?;
        let destroy_sock = tracepoint("tcp", "tcp_destroy_sock")?;
        let error_report = tracepoint("sock", "inet_sk_error_report")?;
        let timer_start = tracepoint("timer", "timer_start")?;
        let timer_expire_entry = tracepoint("timer", "timer_expire_entry")?;
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let layout = Self {
            set_state: usable(
                &mut notes,
                set_state.as_ref().map(tracefs::TracepointFormat::set_state),
            ),
            retransmit: usable(
                &mut notes,
                retransmit
                    .as_ref()
                    .map(tracefs::TracepointFormat::retransmit),
            ),
            send_reset: usable(
                &mut notes,
                send_reset
                    .as_ref()
                    .map(tracefs::TracepointFormat::send_reset),
            ),
            receive_reset: usable(
                &mut notes,
                receive_reset
                    .as_ref()
                    .map(tracefs::TracepointFormat::sk_record),
            ),
            destroy_sock: usable(
                &mut notes,
                destroy_sock
                    .as_ref()
                    .map(tracefs::TracepointFormat::sk_record),
            ),
            error_report: usable(
                &mut notes,
                error_report
                    .as_ref()
                    .map(tracefs::TracepointFormat::error_report),
            ),
            timer_start: usable(
                &mut notes,
                timer_start.as_ref().map(tracefs::TracepointFormat::timer),
            ),
            timer_expire_entry: usable(
                &mut notes,
                timer_expire_entry
                    .as_ref()
                    .map(tracefs::TracepointFormat::timer),
            ),
            sock,
            reset_reasons,
            keepalive_timer_fn: kernel::symbol_address(&sources.kallsyms, "tcp_keepalive_timer")?,
            hz: kernel::config_hz(&release).ok_or(OffsetsError::NoHz)?,
            kernel_release: release,
            notes,
        };
        Ok(layout)
    }
}
